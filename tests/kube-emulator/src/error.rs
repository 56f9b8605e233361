//! API errors, rendered as Kubernetes `Status` objects.
//!
//! kube-rs turns any 4xx/5xx JSON body that parses as a `Status` into
//! `kube::Error::Api`, and its helpers (`is_not_found`, `is_conflict`,
//! `is_already_exists`, ...) look at `reason` and `code`. Every error the
//! emulator produces therefore carries the same reason strings as the real
//! API server.

use serde_json::{Value, json};
use std::fmt;

/// An API error: an HTTP status code, a machine-readable `reason` and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code (404, 409, 422, ...).
    pub code: u16,
    /// Kubernetes `StatusReason`, e.g. `NotFound`, `AlreadyExists`, `Conflict`.
    pub reason: String,
    /// Human-readable message, worded like the real API server's.
    pub message: String,
}

impl ApiError {
    /// An error with an explicit code, reason and message.
    pub fn new(code: u16, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// An error for `code` with the reason the API server uses for it.
    pub fn from_code(code: u16, message: impl Into<String>) -> Self {
        Self::new(code, reason_for_code(code), message)
    }

    /// `404 NotFound` for `<resource> "<name>"`.
    pub fn not_found(resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
    }

    /// `409 AlreadyExists` for `<resource> "<name>"`.
    pub fn already_exists(resource: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        )
    }

    /// `409 Conflict`: optimistic-concurrency failure (stale resourceVersion or precondition).
    pub fn conflict(resource: &str, name: &str, detail: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {resource} \"{name}\": {detail}"),
        )
    }

    /// `400 BadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// `422 Invalid` for `<Kind> "<name>"` with the list of field errors.
    pub fn invalid(kind: &str, name: &str, causes: &[String]) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{kind} \"{name}\" is invalid: {}", causes.join(", ")),
        )
    }

    /// The `Status` object sent as the response body.
    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The `StatusReason` the API server reports for an HTTP status code.
pub fn reason_for_code(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}
