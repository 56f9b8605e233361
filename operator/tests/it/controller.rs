//! The reconcile against a mocked API server (tower-test, kube-rs style): every request the
//! operator makes is recorded and checked, with its method, path, field manager, content
//! type and body, for creation, a no-op, rotation, shard deletion and error paths.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Client, ResourceExt, client::Body, runtime::events::Recorder};
use serde_json::{Value, json};
use tollgate_api::v1alpha1::{ApiKey, Provider, RoutePolicy};
use tollgate_operator::{
    controller::{Reconciler, Report, Snapshot, reporter},
    desired::Naming,
    leader::Fence,
    metrics::Metrics,
};

/// One request the operator made.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    content_type: String,
    body: Value,
}

type Responder = dyn Fn(&Seen) -> Option<(u16, Value)> + Send + Sync;

/// A fake API server: records every request and answers through `respond` (or echoes the
/// body back as a real server would, with a resourceVersion and uid).
struct FakeApi {
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn echo(seen: &Seen) -> Value {
    let mut body = seen.body.clone();
    if body.is_object() {
        let meta = body
            .as_object_mut()
            .unwrap()
            .entry("metadata")
            .or_insert(json!({}));
        meta["resourceVersion"] = json!("100");
        if meta.get("uid").is_none() {
            meta["uid"] = json!("uid-created");
        }
        if seen.uri.contains("/status") {
            // A status merge patch answers with the whole object.
            body["apiVersion"] = json!("tollgate.dev/v1alpha1");
            body["kind"] = json!(kind_of(&seen.uri));
            body["metadata"]["name"] = json!(name_of(&seen.uri));
            body["spec"] = spec_of(&seen.uri);
        }
    }
    body
}

fn name_of(uri: &str) -> String {
    let path = uri.split('?').next().unwrap();
    let parts: Vec<&str> = path.split('/').collect();
    let i = parts.len() - if path.ends_with("/status") { 2 } else { 1 };
    parts[i].to_owned()
}

fn kind_of(uri: &str) -> &'static str {
    if uri.contains("/providers/") {
        "Provider"
    } else if uri.contains("/routepolicies/") {
        "RoutePolicy"
    } else {
        "ApiKey"
    }
}

fn spec_of(uri: &str) -> Value {
    match kind_of(uri) {
        "Provider" => json!({"type": "mock", "models": [{"name": "demo"}]}),
        "RoutePolicy" => json!({"models": ["demo"], "targets": [{"provider": "mock"}]}),
        _ => json!({"owner": "team-a"}),
    }
}

impl FakeApi {
    fn start(respond: Box<Responder>) -> (Client, Self) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().to_string();
                let uri = request.uri().to_string();
                let content_type = request
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let bytes = request.into_body().collect_bytes().await.unwrap();
                let body = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                };
                let s = Seen {
                    method,
                    uri,
                    content_type,
                    body,
                };
                let (status, reply) = respond(&s).unwrap_or_else(|| (200, echo(&s)));
                log.lock().unwrap().push(s);
                send.send_response(
                    Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
        });
        (Client::new(service, "default"), Self { seen })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests other than Events, as `METHOD uri`.
    fn writes(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| !s.uri.contains("/events"))
            .map(|s| format!("{} {}", s.method, s.uri))
            .collect()
    }

    fn events(&self) -> Vec<Value> {
        self.seen()
            .into_iter()
            .filter(|s| {
                s.uri
                    .starts_with("/apis/events.k8s.io/v1/namespaces/default/events")
            })
            .map(|s| s.body)
            .collect()
    }

    fn body_of(&self, method: &str, uri: &str) -> Value {
        self.seen()
            .into_iter()
            .find(|s| s.method == method && s.uri == uri)
            .unwrap_or_else(|| panic!("no {method} {uri}"))
            .body
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": format!("{reason} (test)")})
}

fn reconciler(client: Client) -> Reconciler {
    Reconciler {
        recorder: Recorder::new(client.clone(), reporter("test-replica")),
        client,
        naming: Naming {
            namespace: "tollgate".into(),
            prefix: "tollgate-gateway".into(),
            max_key_shards: 16,
            max_routing_shards: 4,
        },
        redis: None,
        redis_timeout: Duration::from_secs(1),
        metrics: Arc::new(Metrics::new()),
        fence: Fence::open(),
        compile_options: Default::default(),
        seen: Default::default(),
        holds: Default::default(),
        key_publish_wait: Duration::from_secs(180),
    }
}

/// The one file a key shard Secret holds (`keys-000-<content hash>.json`).
fn only_file(shard: &Secret) -> Vec<u8> {
    let data = shard.data.as_ref().unwrap();
    assert_eq!(data.len(), 1);
    let (name, bytes) = data.iter().next().unwrap();
    assert!(name.starts_with("keys-000-"), "{name}");
    bytes.0.clone()
}

fn object<K: serde::de::DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).unwrap()
}

fn provider() -> Provider {
    object(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "Provider",
        "metadata": {"name": "mock", "namespace": "default", "generation": 1, "uid": "uid-p"},
        "spec": {"type": "mock", "models": [{"name": "demo"}]}
    }))
}

fn route() -> RoutePolicy {
    object(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "RoutePolicy",
        "metadata": {"name": "demo", "namespace": "default", "generation": 1, "uid": "uid-r"},
        "spec": {"models": ["demo"], "targets": [{"provider": "mock"}]}
    }))
}

fn api_key(extra_spec: Value, status: Value) -> ApiKey {
    let mut spec = json!({"owner": "team-a"});
    spec.as_object_mut()
        .unwrap()
        .extend(extra_spec.as_object().cloned().unwrap_or_default());
    object(json!({
        "apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey",
        "metadata": {"name": "app", "namespace": "default", "generation": 1, "uid": "uid-k"},
        "spec": spec,
        "status": status,
    }))
}

fn world() -> Snapshot {
    Snapshot {
        providers: vec![provider()],
        routes: vec![route()],
        keys: vec![api_key(json!({}), Value::Null)],
        ..Snapshot::default()
    }
}

const SSA: &str = "?&force=true&fieldManager=tollgate-operator";

#[tokio::test]
async fn a_new_world_gets_a_key_secret_the_config_objects_and_statuses() {
    let (client, api) = FakeApi::start(Box::new(|_| None));
    let report = reconciler(client).reconcile(world()).await.unwrap();
    assert_eq!(
        api.writes(),
        [
            "POST /api/v1/namespaces/default/secrets?&fieldManager=tollgate-operator".to_owned(),
            format!("PATCH /api/v1/namespaces/tollgate/secrets/tollgate-gateway-credentials{SSA}"),
            format!("PATCH /api/v1/namespaces/tollgate/secrets/tollgate-gateway-keys-00{SSA}"),
            format!("PATCH /api/v1/namespaces/tollgate/configmaps/tollgate-gateway-config{SSA}"),
            "PATCH /apis/tollgate.dev/v1alpha1/namespaces/default/providers/mock/status?&fieldManager=tollgate-operator"
                .to_owned(),
            "PATCH /apis/tollgate.dev/v1alpha1/namespaces/default/routepolicies/demo/status?&fieldManager=tollgate-operator"
                .to_owned(),
            "PATCH /apis/tollgate.dev/v1alpha1/namespaces/default/apikeys/app/status?&fieldManager=tollgate-operator".to_owned(),
        ]
    );
    assert_eq!(
        (
            report.key_writes,
            report.config_writes,
            report.status_writes
        ),
        (1, 3, 3)
    );

    // The key Secret: generated key, owned by the ApiKey, labelled.
    let secret: Secret = object(api.body_of(
        "POST",
        "/api/v1/namespaces/default/secrets?&fieldManager=tollgate-operator",
    ));
    let key = String::from_utf8(secret.data.as_ref().unwrap()["apiKey"].0.clone()).unwrap();
    assert_eq!(
        tollgate_api::key_format::shape(&key),
        tollgate_api::key_format::Shape::Generated
    );
    assert_eq!(secret.owner_references()[0].uid, "uid-k");
    assert_eq!(secret.labels()["tollgate.dev/api-key"], "app");

    // Server-side apply: the right content type, apiVersion/kind in the body, and the
    // key shard holds the key's hash, never the key.
    let ssa: Vec<Seen> = api
        .seen()
        .into_iter()
        .filter(|s| s.uri.ends_with(SSA))
        .collect();
    assert!(
        ssa.iter()
            .all(|s| s.content_type == "application/apply-patch+yaml")
    );
    let shard = api.body_of(
        "PATCH",
        &format!("/api/v1/namespaces/tollgate/secrets/tollgate-gateway-keys-00{SSA}"),
    );
    assert_eq!(
        (shard["apiVersion"].as_str(), shard["kind"].as_str()),
        (Some("v1"), Some("Secret"))
    );
    let shard: Secret = object(shard);
    let file = String::from_utf8(only_file(&shard)).unwrap();
    let hash = tollgate_api::parts::sha256_hex(key.as_bytes());
    assert!(file.contains(&hash) && !file.contains(&key));
    let cm: ConfigMap = object(api.body_of(
        "PATCH",
        &format!("/api/v1/namespaces/tollgate/configmaps/tollgate-gateway-config{SSA}"),
    ));
    assert_eq!(
        cm.annotations()["tollgate.dev/config-hash"],
        report.config_hash
    );

    // Status: merge patches with conditions from the compile.
    let status = api.body_of(
        "PATCH",
        "/apis/tollgate.dev/v1alpha1/namespaces/default/apikeys/app/status?&fieldManager=tollgate-operator",
    );
    let s = &status["status"];
    assert_eq!(s["observedGeneration"], 1);
    assert_eq!(s["conditions"][0]["type"], "Ready");
    assert_eq!(s["conditions"][0]["status"], "True");
    assert_eq!(s["secretName"], "app-key");
    assert_eq!(s["keyPrefix"], &key[..7]);
    assert!(s.get("usage").is_none(), "usage has its own writer");

    // Events: the key issued; never the key itself.
    let events = api.events();
    let reasons: Vec<&str> = events
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["KeyIssued"],
        "new, healthy objects make no Ready Events"
    );
    assert_eq!(events[0]["reportingController"], "tollgate-operator");
    assert!(!serde_json::to_string(&events).unwrap().contains(&key));
}

/// The world as the API server holds it after a first reconcile.
async fn settled() -> (Snapshot, Vec<Seen>) {
    let (client, api) = FakeApi::start(Box::new(|_| None));
    let mut snapshot = world();
    reconciler(client)
        .reconcile(snapshot.clone())
        .await
        .unwrap();
    let seen = api.seen();
    let body = |m: &str, needle: &str| {
        seen.iter()
            .find(|s| s.method == m && s.uri.contains(needle))
            .unwrap()
            .body
            .clone()
    };
    let mut key_secret: Secret = object(echo(&Seen {
        body: body("POST", "/namespaces/default/secrets"),
        method: "POST".into(),
        uri: "/secrets".into(),
        content_type: String::new(),
    }));
    key_secret.metadata.namespace = Some("default".into());
    snapshot
        .key_secrets
        .insert(("default".into(), "app-key".into()), key_secret);
    snapshot.generated_maps = vec![object(body("PATCH", "configmaps/tollgate-gateway-config"))];
    snapshot.generated_secrets = vec![
        object(body("PATCH", "secrets/tollgate-gateway-credentials")),
        object(body("PATCH", "secrets/tollgate-gateway-keys-00")),
    ];
    let status = |needle: &str| body("PATCH", needle)["status"].clone();
    snapshot.providers[0].status = Some(object(status("providers/mock/status")));
    snapshot.routes[0].status = Some(object(status("routepolicies/demo/status")));
    snapshot.keys[0].status = Some(object(status("apikeys/app/status")));
    (snapshot, seen)
}

#[tokio::test]
async fn nothing_is_written_when_nothing_changed() {
    let (snapshot, _) = settled().await;
    let (client, api) = FakeApi::start(Box::new(|_| None));
    let report = reconciler(client).reconcile(snapshot).await.unwrap();
    assert_eq!(api.seen().len(), 0, "{:?}", api.writes());
    assert_eq!(
        (
            report.key_writes,
            report.config_writes,
            report.status_writes
        ),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn rotation_writes_the_new_key_and_the_old_keys_grace_in_one_secret_write() {
    let (mut snapshot, _) = settled().await;
    let old = snapshot.key_secrets[&("default".to_owned(), "app-key".to_owned())].clone();
    let old_key = String::from_utf8(old.data.as_ref().unwrap()["apiKey"].0.clone()).unwrap();
    snapshot.keys[0].spec.rotation = Some(object(json!({"generation": 1, "gracePeriod": "10m"})));
    let (client, api) = FakeApi::start(Box::new(|_| None));
    reconciler(client).reconcile(snapshot).await.unwrap();
    let writes = api.writes();
    // The Secret is the record (one write); then the shard and the manifest change (new
    // hash, old one kept for its grace period); the status shows it last.
    assert_eq!(
        &writes[..3],
        [
            "PUT /api/v1/namespaces/default/secrets/app-key?&fieldManager=tollgate-operator"
                .to_owned(),
            format!("PATCH /api/v1/namespaces/tollgate/secrets/tollgate-gateway-keys-00{SSA}"),
            format!("PATCH /api/v1/namespaces/tollgate/configmaps/tollgate-gateway-config{SSA}"),
        ]
    );
    let seen = api.seen();
    let status = seen
        .iter()
        .find(|s| s.uri.contains("apikeys/app/status"))
        .expect("the status shows the rotation");
    assert_eq!(status.body["status"]["rotatedGeneration"], 1);
    assert_eq!(
        status.body["status"]["previousKey"]["sha256"],
        tollgate_api::parts::sha256_hex(old_key.as_bytes())
    );
    let put: Secret = object(seen[0].body.clone());
    let data = put.data.as_ref().unwrap();
    assert_eq!(
        data["previousKeySha256"].0,
        tollgate_api::parts::sha256_hex(old_key.as_bytes()).into_bytes()
    );
    assert!(data.contains_key("previousKeyExpiresAt"));
    assert_eq!(
        put.metadata.resource_version.as_deref(),
        Some("100"),
        "conditional replace"
    );
    let new_key = String::from_utf8(put.data.unwrap()["apiKey"].0.clone()).unwrap();
    assert_ne!(new_key, old_key);
    let shard = api.body_of(
        "PATCH",
        &format!("/api/v1/namespaces/tollgate/secrets/tollgate-gateway-keys-00{SSA}"),
    );
    let file = String::from_utf8(only_file(&object::<Secret>(shard))).unwrap();
    assert!(file.contains(&tollgate_api::parts::sha256_hex(new_key.as_bytes())));
    assert!(
        file.contains(&tollgate_api::parts::sha256_hex(old_key.as_bytes())),
        "the old key keeps working during the grace period"
    );
    assert!(api.events().iter().any(|e| e["reason"] == "KeyRotated"));
}

#[tokio::test]
async fn a_removed_key_drops_from_the_config_and_unneeded_shards_are_deleted() {
    let (mut snapshot, _) = settled().await;
    snapshot.keys.clear();
    // A leftover shard from a larger configuration.
    let mut extra: Secret = snapshot.generated_secrets[1].clone();
    extra.metadata.name = Some("tollgate-gateway-keys-01".into());
    snapshot.generated_secrets.push(extra);
    let (client, api) = FakeApi::start(Box::new(|_| None));
    let report = reconciler(client).reconcile(snapshot).await.unwrap();
    assert_eq!(report.revoked, 1, "the removed key's hash is revoked");
    let writes = api.writes();
    assert!(writes.contains(&format!(
        "PATCH /api/v1/namespaces/tollgate/secrets/tollgate-gateway-keys-00{SSA}"
    )));
    assert_eq!(
        writes.last().unwrap(),
        "DELETE /api/v1/namespaces/tollgate/secrets/tollgate-gateway-keys-01?",
        "shards are deleted after the manifest stops naming them"
    );
    let manifest_at = writes
        .iter()
        .position(|w| w.contains("configmaps/tollgate-gateway-config"))
        .unwrap();
    assert!(manifest_at < writes.len() - 1);
}

#[tokio::test]
async fn an_api_error_fails_the_reconcile_before_any_status_is_written() {
    let (client, api) = FakeApi::start(Box::new(|s| {
        s.uri
            .contains("configmaps/tollgate-gateway-config")
            .then(|| (500, status(500, "InternalError")))
    }));
    let err = reconciler(client).reconcile(world()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("applying ConfigMap tollgate/tollgate-gateway-config"),
        "{err}"
    );
    assert!(
        !api.writes().iter().any(|w| w.contains("/status")),
        "{:?}",
        api.writes()
    );
}

#[tokio::test]
async fn a_secret_name_taken_by_someone_else_is_reported_not_overwritten() {
    // The Secret exists (the create says so), and read back it is somebody else's.
    let (client, api) = FakeApi::start(Box::new(|s| {
        if s.method == "POST" && s.uri.contains("/secrets") {
            return Some((409, status(409, "AlreadyExists")));
        }
        // Read back by a list on its name: the chart grants no `get` on these Secrets.
        (s.method == "GET"
            && s.uri.contains("/namespaces/default/secrets?")
            && s.uri.contains("metadata.name%3Dapp-key"))
        .then(|| {
            (
                200,
                serde_json::json!({
                    "apiVersion": "v1", "kind": "SecretList", "metadata": {},
                    "items": [{
                        "metadata": {"name": "app-key", "namespace": "default", "uid": "someone-elses"},
                        "data": {"apiKey": "dGdfbm90X3lvdXJz"},
                    }],
                }),
            )
        })
    }));
    reconciler(client).reconcile(world()).await.unwrap();
    assert!(
        !api.writes().iter().any(|w| w.starts_with("PUT")
            || w.starts_with("PATCH /api/v1/namespaces/default/secrets/app-key")),
        "never overwritten, never relabelled"
    );
    let status = api.body_of(
        "PATCH",
        "/apis/tollgate.dev/v1alpha1/namespaces/default/apikeys/app/status?&fieldManager=tollgate-operator",
    );
    let ready = &status["status"]["conditions"][0];
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "SecretConflict");
    assert!(ready["message"].as_str().unwrap().contains("app-key"));
    let events = api.events();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "Warning" && e["reason"] == "SecretConflict")
    );
}

#[tokio::test]
async fn expiring_keys_schedule_the_next_reconcile() {
    let mut snapshot = world();
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(90);
    snapshot.keys[0].spec.expires_at =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(soon));
    let (client, _api) = FakeApi::start(Box::new(|_| None));
    let report: Report = reconciler(client).reconcile(snapshot).await.unwrap();
    let wake = report.wake_in.unwrap();
    assert!(
        wake > Duration::from_secs(85) && wake <= Duration::from_secs(91),
        "{wake:?}"
    );
}
