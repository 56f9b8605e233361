//! The request log and fault injection.
//!
//! Every HTTP request is recorded after it has been answered (so a test that
//! got its response always sees the record). Tests count requests, e.g.
//! writes to one resource, and arm faults: the next `n` requests matching a
//! [`RequestFilter`] are answered with an error `Status` and change nothing.

use std::time::{Duration, Instant};

use crate::error::ApiError;

/// One HTTP request as seen by the emulator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// Request path, e.g. `/api/v1/namespaces/default/configmaps/x`.
    pub path: String,
    /// Raw query string (without `?`; kube-rs sends e.g. `&fieldManager=x`).
    pub query: String,
    /// The request's `Content-Type`, if any.
    pub content_type: Option<String>,
    /// Resource plural, for resource requests.
    pub resource: Option<String>,
    /// Namespace from the path, for namespaced requests.
    pub namespace: Option<String>,
    /// Object name, for single-object requests.
    pub name: Option<String>,
    /// Subresource (`status`), if any.
    pub subresource: Option<String>,
    /// The `fieldManager` query parameter, if any.
    pub field_manager: Option<String>,
    /// The client's `User-Agent`, if any (tells replicas of one controller apart).
    pub user_agent: Option<String>,
    /// Whether this was a watch (`watch=true`).
    pub watch: bool,
    /// HTTP status of the response (200 for a watch that started).
    pub status: u16,
    /// When the request arrived (before any injected delay), to order requests and
    /// measure the time between retries.
    pub received_at: Instant,
}

impl RequestRecord {
    /// Whether the request was a write (`POST`, `PUT`, `PATCH` or `DELETE`).
    pub fn is_write(&self) -> bool {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }
}

/// Selects requests, for counting and for fault injection. Every field that
/// is set must match; [`RequestFilter::any`] matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// HTTP method (case-insensitive).
    pub method: Option<String>,
    /// Resource plural, e.g. `configmaps`.
    pub resource: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// Object name.
    pub name: Option<String>,
    /// Subresource, e.g. `status`.
    pub subresource: Option<String>,
    /// Only writes (`POST`, `PUT`, `PATCH`, `DELETE`).
    pub writes_only: bool,
    /// Only watches (`Some(true)`) or only non-watches (`Some(false)`).
    pub watch: Option<bool>,
    /// Only requests whose `User-Agent` contains this text (one replica of several).
    pub user_agent: Option<String>,
    /// Only requests whose raw query string contains this text (e.g. one label
    /// selector's list among several lists of a resource).
    pub query: Option<String>,
}

impl RequestFilter {
    /// Matches every request.
    pub fn any() -> Self {
        Self::default()
    }

    /// Matches only writes.
    pub fn writes() -> Self {
        Self {
            writes_only: true,
            ..Self::default()
        }
    }

    /// Restricts to an HTTP method.
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Restricts to a resource plural.
    pub fn resource(mut self, plural: &str) -> Self {
        self.resource = Some(plural.to_string());
        self
    }

    /// Restricts to a namespace.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    /// Restricts to an object name.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Restricts to a subresource such as `status`.
    pub fn subresource(mut self, sub: &str) -> Self {
        self.subresource = Some(sub.to_string());
        self
    }

    /// Restricts to watch (`true`) or non-watch (`false`) requests.
    pub fn watch(mut self, watch: bool) -> Self {
        self.watch = Some(watch);
        self
    }

    /// Restricts to clients whose `User-Agent` contains `text`.
    pub fn user_agent(mut self, text: &str) -> Self {
        self.user_agent = Some(text.to_string());
        self
    }

    /// Restricts to requests whose raw (URL-encoded) query string contains `text`.
    pub fn query_contains(mut self, text: &str) -> Self {
        self.query = Some(text.to_string());
        self
    }

    /// Whether `r` is selected.
    pub fn matches(&self, r: &RequestRecord) -> bool {
        fn eq(want: &Option<String>, got: &Option<String>) -> bool {
            want.as_ref().is_none_or(|w| got.as_ref() == Some(w))
        }
        self.method
            .as_ref()
            .is_none_or(|m| m.eq_ignore_ascii_case(&r.method))
            && eq(&self.resource, &r.resource)
            && eq(&self.namespace, &r.namespace)
            && eq(&self.name, &r.name)
            && eq(&self.subresource, &r.subresource)
            && (!self.writes_only || r.is_write())
            && self.watch.is_none_or(|w| w == r.watch)
            && self.user_agent.as_ref().is_none_or(|want| {
                r.user_agent
                    .as_deref()
                    .is_some_and(|got| got.contains(want.as_str()))
            })
            && self
                .query
                .as_ref()
                .is_none_or(|want| r.query.contains(want.as_str()))
    }
}

/// What an armed fault does to a matching request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FaultAction {
    /// Answer at once with this status code; change nothing.
    Fail(u16),
    /// Serve the request normally, after this long (a slow API server).
    Delay(Duration),
    /// Change nothing and answer `504 Timeout` after this long (the API server's own
    /// request deadline passing; a long one is a hang as far as the client can tell).
    TimeOut(Duration),
    /// Refuse as admission does (a quota, a webhook, a terminating namespace): this
    /// status code and message, nothing changed.
    Refuse(u16, &'static str),
}

#[derive(Debug)]
struct Fault {
    remaining: usize,
    action: FaultAction,
    filter: RequestFilter,
}

/// Recorded requests and armed faults.
#[derive(Debug, Default)]
pub(crate) struct RequestLog {
    records: Vec<RequestRecord>,
    faults: Vec<Fault>,
}

impl RequestLog {
    pub fn push(&mut self, record: RequestRecord) {
        self.records.push(record);
    }

    pub fn records(&self) -> &[RequestRecord] {
        &self.records
    }

    pub fn clear(&mut self) {
        self.records.clear();
    }

    pub fn arm(&mut self, n: usize, action: FaultAction, filter: RequestFilter) {
        if n > 0 {
            self.faults.push(Fault {
                remaining: n,
                action,
                filter,
            });
        }
    }

    pub fn armed(&self) -> usize {
        self.faults.iter().map(|f| f.remaining).sum()
    }

    pub fn disarm(&mut self) {
        self.faults.clear();
    }

    /// Consumes one matching fault, if any, and returns what to do.
    pub fn take_fault(&mut self, r: &RequestRecord) -> Option<FaultAction> {
        let index = self.faults.iter().position(|f| f.filter.matches(r))?;
        let fault = &mut self.faults[index];
        fault.remaining -= 1;
        let action = fault.action;
        if fault.remaining == 0 {
            self.faults.remove(index);
        }
        Some(action)
    }
}

/// The error an injected [`FaultAction::Fail`] answers with.
pub(crate) fn injected_error(code: u16, r: &RequestRecord) -> ApiError {
    ApiError::from_code(code, format!("injected fault for {} {}", r.method, r.path))
}

/// The error an injected [`FaultAction::TimeOut`] answers with, worded like the API
/// server's.
pub(crate) fn timeout_error() -> ApiError {
    ApiError::new(
        504,
        "Timeout",
        "the server was unable to return a response in the time allotted, but may still be processing the request",
    )
}
