//! The HTTP front end: routing, discovery, and the REST verbs on resources.
//!
//! A single axum fallback handler parses Kubernetes API paths itself:
//!
//! ```text
//! /api/v1[/namespaces/<ns>]/<plural>[/<name>[/<subresource>]]
//! /apis/<group>/<version>[/namespaces/<ns>]/<plural>[/<name>[/<subresource>]]
//! /api, /api/v1, /apis, /apis/<group>, /apis/<group>/<version>, /version
//! ```
//!
//! Each request is checked against the armed faults, answered, and then
//! recorded in the request log.

use crate::Core;
use crate::error::ApiError;
use crate::log::{self, FaultAction, RequestRecord};
use crate::registry::ResourceDef;
use crate::selector::Selectors;
use crate::store::{DeleteOpts, Propagation, Target, Update, WriteOpts};
use crate::watch::{self, WatchParams};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Largest accepted request body (the real API server allows about 3 MiB).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// Verbs of every emulated resource.
const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// Verbs of a `status` subresource.
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

/// The axum application serving `core`.
pub(crate) fn router(core: Arc<Core>) -> Router {
    Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(core)
}

/// A parsed request path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Version,
    Health,
    /// `/api`
    CoreVersions,
    /// `/api/<version>`
    CoreResources(String),
    /// `/apis`
    Groups,
    /// `/apis/<group>`
    Group(String),
    /// `/apis/<group>/<version>`
    GroupResources(String, String),
    Resource(ResourcePath),
    Unknown,
}

/// The resource part of a request path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ResourcePath {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_route(path: &str) -> Route {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "readyz" | "livez"] => return Route::Health,
        ["api"] => return Route::CoreVersions,
        ["api", v] => return Route::CoreResources(v.to_string()),
        ["apis"] => return Route::Groups,
        ["apis", g] => return Route::Group(g.to_string()),
        ["apis", g, v] => return Route::GroupResources(g.to_string(), v.to_string()),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::Unknown,
    };
    // `namespaces/<ns>/status` and `/finalize` address the Namespace object.
    let (namespace, plural, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            (Some(ns.to_string()), *plural, tail)
        }
        [plural, tail @ ..] => (None, *plural, tail),
        [] => return Route::Unknown,
    };
    if plural.is_empty() || tail.len() > 2 || tail.iter().any(|s| s.is_empty()) {
        return Route::Unknown;
    }
    Route::Resource(ResourcePath {
        group: group.to_string(),
        version: version.to_string(),
        namespace,
        plural: plural.to_string(),
        name: tail.first().map(|s| s.to_string()),
        subresource: tail.get(1).map(|s| s.to_string()),
    })
}

/// The one handler behind every path.
async fn handle(
    State(core): State<Arc<Core>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let raw_query = uri.query().unwrap_or_default().to_string();
    let query: HashMap<String, String> = url::form_urlencoded::parse(raw_query.as_bytes())
        .into_owned()
        .collect();
    let route = parse_route(&path);
    let resource = match &route {
        Route::Resource(rp) => Some(rp),
        _ => None,
    };
    let mut record = RequestRecord {
        method: method.to_string(),
        path: path.clone(),
        query: raw_query,
        content_type: header_str(&headers, header::CONTENT_TYPE).map(str::to_string),
        resource: resource.map(|r| r.plural.clone()),
        namespace: resource.and_then(|r| r.namespace.clone()),
        name: resource.and_then(|r| r.name.clone()),
        subresource: resource.and_then(|r| r.subresource.clone()),
        field_manager: query.get("fieldManager").cloned(),
        user_agent: header_str(&headers, header::USER_AGENT).map(str::to_string),
        watch: is_true(query.get("watch")),
        status: 0,
        received_at: std::time::Instant::now(),
    };
    if let Some(denied) = route_forbidden(&core, &method, &route, &query, &headers) {
        let response = error_response(&denied);
        record.status = response.status().as_u16();
        core.log().push(record);
        return response;
    }
    let fault = core.log().take_fault(&record);
    let serve = |core: &Core| {
        let req = Req {
            core,
            method: &method,
            query: &query,
            headers: &headers,
            body: &body,
        };
        match route {
            Route::Resource(rp) => req.resource(&rp).unwrap_or_else(|e| error_response(&e)),
            other => req.discovery(&other),
        }
    };
    let response = match fault {
        Some(FaultAction::Fail(code)) => error_response(&log::injected_error(code, &record)),
        Some(FaultAction::Refuse(code, message)) => {
            error_response(&crate::error::ApiError::from_code(code, message.to_owned()))
        }
        Some(FaultAction::TimeOut(after)) => {
            // Logged on arrival: a client that gives up first never gets the answer.
            record.status = 504;
            core.log().push(record);
            tokio::time::sleep(after).await;
            return error_response(&log::timeout_error());
        }
        Some(FaultAction::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            serve(&core)
        }
        None => serve(&core),
    };
    record.status = response.status().as_u16();
    tracing::debug!(
        method = %record.method,
        path = %record.path,
        query = %record.query,
        status = record.status,
        "kube-emulator request"
    );
    core.log().push(record);
    response
}

/// The 403 for a resource request the enforced RBAC rules do not allow, if any.
fn route_forbidden(
    core: &Core,
    method: &Method,
    route: &Route,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Option<ApiError> {
    let rules = core.rbac().clone()?;
    let Route::Resource(rp) = route else {
        return None;
    };
    let collection = rp.name.is_none();
    let verb = match (method.as_str(), collection) {
        ("GET", true) if is_true(query.get("watch")) => "watch",
        ("GET", true) => "list",
        ("GET", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        _ => return None,
    };
    // A list or watch of one object by field selector may match `resourceNames`.
    let name = rp.name.clone().or_else(|| {
        query.get("fieldSelector").and_then(|f| {
            f.strip_prefix("metadata.name=")
                .filter(|n| !n.contains(','))
                .map(str::to_owned)
        })
    });
    let attributes = crate::rbac::Attributes {
        verb: verb.to_owned(),
        group: rp.group.clone(),
        resource: match &rp.subresource {
            Some(sub) => format!("{}/{sub}", rp.plural),
            None => rp.plural.clone(),
        },
        namespace: rp.namespace.clone(),
        name: if verb == "create" { None } else { name },
    };
    let forbidden = |a: &crate::rbac::Attributes| {
        ApiError::new(403, "Forbidden", crate::rbac::forbidden_message(a))
    };
    if !rules.allows(&attributes) {
        return Some(forbidden(&attributes));
    }
    // Server-side apply of a missing object creates it, which the API server authorizes
    // as `create` too (with the object's name).
    let apply = header_str(headers, header::CONTENT_TYPE)
        .is_some_and(|c| c.starts_with("application/apply-patch"));
    if verb == "patch" && apply && rp.subresource.is_none() {
        let store = core.store();
        let missing = store
            .resource(&rp.group, &rp.version, &rp.plural)
            .cloned()
            .zip(rp.name.as_deref())
            .is_some_and(|(def, name)| {
                store
                    .get(&def, rp.namespace.as_deref().unwrap_or_default(), name)
                    .is_err()
            });
        drop(store);
        let create = crate::rbac::Attributes {
            verb: "create".to_owned(),
            ..attributes
        };
        if missing && !rules.allows(&create) {
            return Some(forbidden(&create));
        }
    }
    None
}

/// One request being served.
struct Req<'a> {
    core: &'a Core,
    method: &'a Method,
    query: &'a HashMap<String, String>,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

impl Req<'_> {
    fn accept(&self) -> &str {
        header_str(self.headers, header::ACCEPT).unwrap_or_default()
    }

    fn wants_metadata_only(&self) -> bool {
        self.accept().contains("as=PartialObjectMetadata")
    }

    // ----- discovery ------------------------------------------------------

    fn discovery(&self, route: &Route) -> Response {
        if self.method != Method::GET {
            return error_response(&ApiError::from_code(405, "only GET is supported here"));
        }
        let store = self.core.store();
        let defs: Vec<ResourceDef> = store.resources().cloned().collect();
        drop(store);
        let aggregated = self.accept().contains("as=APIGroupDiscoveryList");
        match route {
            Route::Version => json_response(200, &version_info()),
            Route::Health => (StatusCode::OK, "ok").into_response(),
            Route::CoreVersions if aggregated => aggregated_response(&defs, true),
            Route::Groups if aggregated => aggregated_response(&defs, false),
            Route::CoreVersions => json_response(
                200,
                &json!({
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
                }),
            ),
            Route::CoreResources(v) if v == "v1" => {
                json_response(200, &resource_list(&defs, "", v))
            }
            Route::Groups => {
                let groups: Vec<Value> = group_versions(&defs)
                    .iter()
                    .map(|(g, vs)| api_group(g, vs))
                    .collect();
                json_response(
                    200,
                    &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
                )
            }
            Route::Group(g) => match group_versions(&defs).get(g.as_str()) {
                Some(vs) => json_response(200, &api_group(g, vs)),
                None => error_response(&not_served()),
            },
            Route::GroupResources(g, v)
                if defs.iter().any(|d| d.group == *g && d.version == *v) =>
            {
                json_response(200, &resource_list(&defs, g, v))
            }
            _ => error_response(&not_served()),
        }
    }

    // ----- resources ------------------------------------------------------

    fn resource(&self, rp: &ResourcePath) -> Result<Response, ApiError> {
        let def = self
            .core
            .store()
            .resource(&rp.group, &rp.version, &rp.plural)
            .cloned()
            .ok_or_else(not_served)?;
        // A namespaced resource needs a namespace except for cluster-wide
        // list/watch/deletecollection; a cluster-scoped one must not have one.
        let collection = rp.name.is_none() && self.method != Method::POST;
        if (def.namespaced && rp.namespace.is_none() && !collection)
            || (!def.namespaced && rp.namespace.is_some())
        {
            return Err(not_served());
        }
        let target = match rp.subresource.as_deref() {
            None => Target::Main,
            Some("status") if def.status_subresource && rp.name.is_some() => Target::Status,
            Some(_) => return Err(not_served()),
        };
        let ns = rp.namespace.as_deref().unwrap_or_default();
        let meta_only = self.wants_metadata_only();
        let method = self.method.clone();
        match (method, rp.name.as_deref()) {
            (Method::GET, None) if is_true(self.query.get("watch")) => {
                self.watch(def, rp.namespace.clone())
            }
            (Method::GET, None) => {
                let selectors = self.selectors()?;
                let store = self.core.store();
                let items = store.list(&def, rp.namespace.as_deref(), &selectors);
                Ok(list_response(&def, items, store.rv(), meta_only))
            }
            (Method::POST, None) => {
                let body = self.json_body()?;
                let obj = self
                    .core
                    .store()
                    .create(&def, ns, body, &self.write_opts(), false)?;
                Ok(object_response(201, obj, meta_only))
            }
            (Method::DELETE, None) => {
                let selectors = self.selectors()?;
                let opts = self.delete_opts()?;
                let mut store = self.core.store();
                let items =
                    store.delete_collection(&def, rp.namespace.as_deref(), &selectors, &opts);
                Ok(list_response(&def, items, store.rv(), meta_only))
            }
            (Method::GET, Some(name)) => {
                let obj = self.core.store().get(&def, ns, name)?;
                Ok(object_response(200, obj, meta_only))
            }
            (Method::PUT, Some(name)) => {
                let update = Update::Replace(self.json_body()?);
                let (obj, _) =
                    self.core
                        .store()
                        .update(&def, ns, name, target, update, &self.write_opts())?;
                Ok(object_response(200, obj, meta_only))
            }
            (Method::PATCH, Some(name)) => {
                let update = self.patch_body()?;
                let (obj, created) =
                    self.core
                        .store()
                        .update(&def, ns, name, target, update, &self.write_opts())?;
                Ok(object_response(
                    if created { 201 } else { 200 },
                    obj,
                    meta_only,
                ))
            }
            (Method::DELETE, Some(name)) if target == Target::Main => {
                let opts = self.delete_opts()?;
                let (obj, gone) = self.core.store().delete(&def, ns, name, &opts)?;
                if gone && !def.custom {
                    return Ok(json_response(200, &deleted_status(&def, &obj)));
                }
                Ok(object_response(200, obj, meta_only))
            }
            (method, _) => Err(ApiError::from_code(
                405,
                format!("{method} is not supported on this path"),
            )),
        }
    }

    fn watch(&self, def: ResourceDef, namespace: Option<String>) -> Result<Response, ApiError> {
        let options = &self.core.options;
        let resource_version =
            match self.query.get("resourceVersion").map(String::as_str) {
                None | Some("") => None,
                Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))
                })?),
            };
        let timeout = match self.query.get("timeoutSeconds") {
            Some(t) => Duration::from_secs(
                t.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {t:?}")))?,
            ),
            None => options.default_watch_timeout,
        };
        let params = WatchParams {
            def,
            namespace,
            selectors: self.selectors()?,
            resource_version,
            send_initial_events: is_true(self.query.get("sendInitialEvents")),
            timeout,
            bookmark_interval: is_true(self.query.get("allowWatchBookmarks"))
                .then_some(options.bookmark_interval),
            metadata_only: self.wants_metadata_only(),
        };
        let close = self.core.close_watches.subscribe();
        let lag = self.core.watch_lag.subscribe();
        let stream = watch::start(&self.core.store(), params, close, lag);
        let mut response = Body::from_stream(stream).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(response)
    }

    // ----- request parameters ---------------------------------------------

    fn selectors(&self) -> Result<Selectors, ApiError> {
        Selectors::parse(
            self.query.get("labelSelector").map(String::as_str),
            self.query.get("fieldSelector").map(String::as_str),
        )
        .map_err(ApiError::bad_request)
    }

    fn write_opts(&self) -> WriteOpts {
        let manager = self.query.get("fieldManager").cloned().unwrap_or_else(|| {
            header_str(self.headers, header::USER_AGENT)
                .and_then(|ua| ua.split('/').next())
                .filter(|m| !m.is_empty())
                .unwrap_or("unknown")
                .to_string()
        });
        WriteOpts {
            manager,
            dry_run: self.query.contains_key("dryRun"),
            privileged: false,
        }
    }

    fn delete_opts(&self) -> Result<DeleteOpts, ApiError> {
        let body = if self.body.is_empty() {
            Value::Null
        } else {
            self.json_body()?
        };
        let policy = self
            .query
            .get("propagationPolicy")
            .map(String::as_str)
            .or_else(|| body["propagationPolicy"].as_str());
        let pre = &body["preconditions"];
        Ok(DeleteOpts {
            dry_run: self.query.contains_key("dryRun")
                || body["dryRun"].as_array().is_some_and(|a| !a.is_empty()),
            propagation: match policy {
                Some("Orphan") => Propagation::Orphan,
                Some("Foreground") => Propagation::Foreground,
                _ if body["orphanDependents"].as_bool() == Some(true) => Propagation::Orphan,
                _ => Propagation::Background,
            },
            precondition_uid: pre["uid"].as_str().map(str::to_string),
            precondition_rv: pre["resourceVersion"].as_str().map(str::to_string),
        })
    }

    fn content_type(&self) -> &str {
        header_str(self.headers, header::CONTENT_TYPE).unwrap_or("application/json")
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        parse_body(self.body, self.content_type().contains("yaml"))
    }

    fn patch_body(&self) -> Result<Update, ApiError> {
        let ctype = self.content_type();
        let force = self.query.contains_key("force");
        if ctype.starts_with("application/apply-patch+yaml") {
            if self.query.get("fieldManager").is_none_or(String::is_empty) {
                return Err(ApiError::bad_request(
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            return Ok(Update::Apply(parse_body(self.body, true)?));
        }
        if force {
            return Err(ApiError::new(
                422,
                "Invalid",
                "force: Forbidden: may not be specified for non-apply patch",
            ));
        }
        if ctype.starts_with("application/merge-patch+json")
            || ctype.starts_with("application/strategic-merge-patch+json")
        {
            Ok(Update::Merge(parse_body(self.body, false)?))
        } else if ctype.starts_with("application/json-patch+json") {
            Ok(Update::Json(parse_body(self.body, false)?))
        } else {
            Err(ApiError::from_code(
                415,
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ctype:?})"
                ),
            ))
        }
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn is_true(value: Option<&String>) -> bool {
    value.is_some_and(|v| v == "true" || v == "1")
}

fn not_served() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Parses a JSON body, or a YAML one when `yaml` is allowed.
fn parse_body(body: &Bytes, yaml: bool) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(json_err) if yaml => serde_yaml::from_slice::<Value>(body).map_err(|e| {
            ApiError::bad_request(format!(
                "cannot parse the body as JSON ({json_err}) or YAML ({e})"
            ))
        }),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot parse the body as JSON: {e}"
        ))),
    }
}

// ----- responses -----------------------------------------------------------

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

fn error_response(err: &ApiError) -> Response {
    json_response(err.code, &err.to_status())
}

/// The `Success` Status built-in kinds answer an immediate delete with.
fn deleted_status(def: &ResourceDef, obj: &Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": obj["metadata"]["name"],
            "group": def.group,
            "kind": def.plural,
            "uid": obj["metadata"]["uid"],
        },
    })
}

fn object_response(code: u16, obj: Value, meta_only: bool) -> Response {
    let obj = if meta_only {
        watch::partial_metadata(&obj)
    } else {
        obj
    };
    json_response(code, &obj)
}

fn list_response(def: &ResourceDef, items: Vec<Value>, rv: u64, meta_only: bool) -> Response {
    let (api_version, kind, items) = if meta_only {
        let items = items.iter().map(watch::partial_metadata).collect();
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
            items,
        )
    } else {
        (def.api_version(), format!("{}List", def.kind), items)
    };
    json_response(
        200,
        &json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
    )
}

// ----- discovery documents ---------------------------------------------------

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0+tollgate-kube-emulator",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Served versions of every named group, in version order.
fn group_versions(defs: &[ResourceDef]) -> BTreeMap<&str, Vec<&str>> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for d in defs.iter().filter(|d| !d.group.is_empty()) {
        let versions = groups.entry(d.group.as_str()).or_default();
        if !versions.contains(&d.version.as_str()) {
            versions.push(d.version.as_str());
        }
    }
    groups
}

fn api_group(group: &str, versions: &[&str]) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": entries,
        "preferredVersion": entries.first(),
    })
}

/// `APIResourceList` of one group version, including `status` subresources.
fn resource_list(defs: &[ResourceDef], group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for d in defs
        .iter()
        .filter(|d| d.group == group && d.version == version)
    {
        resources.push(json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": VERBS,
            "shortNames": d.short_names,
        }));
        if d.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", d.plural),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    })
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2`) of the core group
/// (`core`) or of every named group.
fn aggregated_response(defs: &[ResourceDef], core: bool) -> Response {
    let mut groups: BTreeMap<&str, BTreeMap<&str, Vec<Value>>> = BTreeMap::new();
    for d in defs.iter().filter(|d| d.group.is_empty() == core) {
        let gvk = json!({"group": d.group, "version": d.version, "kind": d.kind});
        let subresources: Vec<Value> = if d.status_subresource {
            vec![json!({"subresource": "status", "responseKind": gvk, "verbs": STATUS_VERBS})]
        } else {
            Vec::new()
        };
        groups
            .entry(d.group.as_str())
            .or_default()
            .entry(d.version.as_str())
            .or_default()
            .push(json!({
                "resource": d.plural,
                "responseKind": gvk,
                "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": d.singular,
                "verbs": VERBS,
                "shortNames": d.short_names,
                "subresources": subresources,
            }));
    }
    let items: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .into_iter()
                .map(|(v, resources)| json!({"version": v, "freshness": "Current", "resources": resources}))
                .collect();
            json!({"metadata": {"name": group}, "versions": versions})
        })
        .collect();
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    });
    let mut response = json_response(200, &body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        ),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(
        group: &str,
        ns: Option<&str>,
        plural: &str,
        name: Option<&str>,
        sub: Option<&str>,
    ) -> Route {
        Route::Resource(ResourcePath {
            group: group.into(),
            version: if group.is_empty() {
                "v1".into()
            } else {
                "v1alpha1".into()
            },
            namespace: ns.map(str::to_string),
            plural: plural.into(),
            name: name.map(str::to_string),
            subresource: sub.map(str::to_string),
        })
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("/api"), Route::CoreVersions);
        assert_eq!(parse_route("/api/v1"), Route::CoreResources("v1".into()));
        assert_eq!(
            parse_route("/apis/tollgate.dev"),
            Route::Group("tollgate.dev".into())
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/default/configmaps"),
            res("", Some("default"), "configmaps", None, None)
        );
        assert_eq!(
            parse_route("/api/v1/configmaps"),
            res("", None, "configmaps", None, None)
        );
        assert_eq!(
            parse_route("/apis/tollgate.dev/v1alpha1/namespaces/a/apikeys/k/status"),
            res(
                "tollgate.dev",
                Some("a"),
                "apikeys",
                Some("k"),
                Some("status")
            )
        );
        assert_eq!(
            parse_route("/api/v1/namespaces"),
            res("", None, "namespaces", None, None)
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/default"),
            res("", None, "namespaces", Some("default"), None)
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/default/status"),
            res("", None, "namespaces", Some("default"), Some("status"))
        );
        assert_eq!(
            parse_route("/api/v1/namespaces/a/configmaps/x/y/z"),
            Route::Unknown
        );
        assert_eq!(parse_route("/nope"), Route::Unknown);
    }
}
