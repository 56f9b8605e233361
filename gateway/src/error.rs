//! The one error type whose variants reach clients, rendered as OpenAI-style JSON:
//! `{"error":{"message","type","param","code"}}`. Messages never contain keys,
//! credentials or upstream internals.

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use http::StatusCode;
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No key, or a key that is malformed (including a bad checksum), unknown, disabled,
    /// revoked or expired (deliberately one answer for all, so callers learn nothing
    /// about which).
    #[error(
        "Incorrect API key provided. Pass a valid key as `Authorization: Bearer <key>` or `x-api-key: <key>`."
    )]
    Unauthorized,
    /// Too many failed authentications from this client address.
    #[error("Too many failed authentications from this address; retry later.")]
    AuthThrottled(std::time::Duration),
    /// The key may not use this model.
    #[error("This API key is not allowed to use the model `{0}`.")]
    ModelNotAllowed(String),
    /// No route serves this model.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// The request is malformed.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The offending parameter.
        param: Option<&'static str>,
    },
    /// A guardrail of the route or key refused the request's content. The message names
    /// the rule and its detector, never the matched text.
    #[error("The request was blocked by guardrail `{rule}` (detector: {detector}).")]
    GuardrailBlocked {
        /// Rule name.
        rule: String,
        /// Detector name.
        detector: &'static str,
    },
    /// A guardrail withheld a complete answer (the upstream answered; the gateway does
    /// not relay it).
    #[error("The answer was withheld by guardrail `{rule}` (detector: {detector}).")]
    GuardrailBlockedAnswer {
        /// Rule name.
        rule: String,
        /// Detector name.
        detector: &'static str,
    },
    /// The body exceeds the configured limit.
    #[error("Request body is larger than the limit of {0} bytes.")]
    PayloadTooLarge(usize),
    /// The request needs more memory than the whole in-flight budget (`--max-inflight-bytes`).
    #[error("{0}")]
    TooComplex(String),
    /// The in-flight memory budget is used up by other requests right now.
    #[error("The gateway is at its limit of request memory in flight; retry shortly.")]
    Overloaded,
    /// The body did not arrive in time.
    #[error("The request body was not received in time.")]
    RequestTimeout,
    /// Wrong method or path.
    #[error("Unknown request URL: {method} {path}.")]
    NotFound {
        /// Method.
        method: String,
        /// Path.
        path: String,
    },
    /// The prompt plus the requested output exceed the context window of every target.
    #[error(
        "This model's maximum context length is {window} tokens. However, you requested about {} tokens ({prompt} in the messages, estimated, {output} in the completion). Please reduce the length of the messages or completion.",
        prompt + output
    )]
    ContextLengthExceeded {
        /// The largest window among the targets.
        window: u64,
        /// Estimated prompt tokens.
        prompt: u64,
        /// Requested output tokens.
        output: u64,
    },
    /// The requested output exceeds what every target's model generates.
    #[error(
        "max_tokens is too large: {requested}. This model supports at most {max} completion tokens, whereas you provided {requested}."
    )]
    OutputLimitExceeded {
        /// The largest output limit among the targets.
        max: u64,
        /// What the request asked for.
        requested: u64,
    },
    /// `previous_response_id` names a response this key's owner did not store through
    /// the gateway (OpenAI's answer for an unknown one).
    #[error("Previous response with id '{0}' not found.")]
    PreviousResponseNotFound(String),
    /// A stored response this key's owner did not store through the gateway.
    #[error("No response found with id '{0}'.")]
    ResponseNotFound(String),
    /// A per-key or per-route limit or budget refused the request.
    #[error("{}", limit_message(.0))]
    LimitExceeded(crate::limits::Rejection),
    /// Every attempt failed at the upstream (5xx, unreachable, credentials refused).
    #[error("{0}")]
    Upstream(String),
    /// Every attempt timed out.
    #[error("The upstream did not answer in time.")]
    UpstreamTimeout,
    /// The upstream kept answering 429.
    #[error("The upstream provider is rate limiting requests; retry later.")]
    UpstreamRateLimited(Option<std::time::Duration>),
    /// Every target is unavailable right now (circuit open or at max concurrency).
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// The route leads only to providers this build cannot call.
    #[error("{0}")]
    NotImplemented(String),
    /// No configuration has been loaded yet, or the gateway is shutting down.
    #[error("The gateway is not ready to serve requests.")]
    Unavailable,
    /// Redis is unreachable and the failure mode is `failClosed`.
    #[error(
        "Limits cannot be checked right now (the gateway's shared state is unreachable); retry shortly."
    )]
    LimitsUnavailable,
    /// `/v1/usage` could not read the shared counters (Redis unreachable).
    #[error(
        "Usage cannot be read right now (the gateway's shared state is unreachable); retry shortly."
    )]
    UsageUnavailable,
    /// A bug; details are logged, not returned.
    #[error("The gateway hit an internal error. Request id: {0}.")]
    Internal(String),
}

impl ApiError {
    /// A 400 with a message and optional parameter name.
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
        }
    }

    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::ModelNotFound(_) | Self::NotFound { .. } | Self::ResponseNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Self::BadRequest { .. }
            | Self::GuardrailBlocked { .. }
            | Self::PreviousResponseNotFound(_)
            | Self::ContextLengthExceeded { .. }
            | Self::OutputLimitExceeded { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) | Self::TooComplex(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable
            | Self::LimitsUnavailable
            | Self::UsageUnavailable
            | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Upstream(_) | Self::GuardrailBlockedAnswer { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamRateLimited(_) | Self::LimitExceeded(_) | Self::AuthThrottled(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::UpstreamUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// OpenAI's `type` field.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Unauthorized
            | Self::ModelNotFound(_)
            | Self::BadRequest { .. }
            | Self::GuardrailBlocked { .. }
            | Self::PayloadTooLarge(_)
            | Self::TooComplex(_)
            | Self::RequestTimeout
            | Self::NotFound { .. }
            | Self::PreviousResponseNotFound(_)
            | Self::ResponseNotFound(_)
            | Self::ContextLengthExceeded { .. }
            | Self::OutputLimitExceeded { .. } => "invalid_request_error",
            Self::ModelNotAllowed(_) => "permission_error",
            Self::Unavailable
            | Self::LimitsUnavailable
            | Self::UsageUnavailable
            | Self::Overloaded => "service_unavailable",
            Self::Internal(_)
            | Self::Upstream(_)
            | Self::GuardrailBlockedAnswer { .. }
            | Self::UpstreamTimeout
            | Self::NotImplemented(_) => "server_error",
            Self::UpstreamRateLimited(_) | Self::AuthThrottled(_) => "rate_limit_error",
            Self::LimitExceeded(r) if r.limit == crate::limits::Limit::Budget => {
                "insufficient_quota"
            }
            Self::LimitExceeded(_) => "rate_limit_error",
            Self::UpstreamUnavailable(_) => "service_unavailable",
        }
    }

    /// OpenAI's `code` field: stable, machine-readable.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "invalid_api_key",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::ModelNotFound(_) => "model_not_found",
            Self::BadRequest { .. } => "invalid_request",
            Self::GuardrailBlocked { .. } | Self::GuardrailBlockedAnswer { .. } => {
                "guardrail_blocked"
            }
            Self::PayloadTooLarge(_) | Self::TooComplex(_) => "request_too_large",
            Self::Overloaded => "overloaded",
            Self::RequestTimeout => "request_timeout",
            Self::NotFound { .. } => "unknown_url",
            Self::PreviousResponseNotFound(_) => "previous_response_not_found",
            Self::ResponseNotFound(_) => "response_not_found",
            Self::ContextLengthExceeded { .. } => "context_length_exceeded",
            Self::OutputLimitExceeded { .. } => "invalid_value",
            Self::Unavailable => "not_ready",
            Self::LimitsUnavailable => "limits_unavailable",
            Self::UsageUnavailable => "usage_unavailable",
            Self::Internal(_) => "internal_error",
            Self::Upstream(_) => "upstream_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamRateLimited(_) => "upstream_rate_limited",
            Self::AuthThrottled(_) => "too_many_auth_failures",
            Self::LimitExceeded(r) if r.limit == crate::limits::Limit::Budget => {
                "insufficient_quota"
            }
            Self::LimitExceeded(_) => "rate_limit_exceeded",
            Self::UpstreamUnavailable(_) => "upstream_unavailable",
            Self::NotImplemented(_) => "not_implemented",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { param, .. } => *param,
            Self::ModelNotAllowed(_) | Self::ModelNotFound(_) => Some("model"),
            Self::PreviousResponseNotFound(_) => Some("previous_response_id"),
            Self::ContextLengthExceeded { .. } => Some("messages"),
            Self::OutputLimitExceeded { .. } => Some("max_tokens"),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        let retry_after = match &self {
            Self::Unavailable
            | Self::LimitsUnavailable
            | Self::UsageUnavailable
            | Self::Overloaded
            | Self::UpstreamUnavailable(_) => Some(std::time::Duration::from_secs(1)),
            Self::UpstreamRateLimited(after) => {
                Some(after.unwrap_or(std::time::Duration::from_secs(1)))
            }
            Self::LimitExceeded(r) => r.retry_after,
            Self::AuthThrottled(wait) => Some(*wait),
            _ => None,
        };
        let headers = response.headers_mut();
        if let Some(after) = retry_after {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
            headers.insert(
                "retry-after-ms",
                http::HeaderValue::from(after.as_millis().max(1) as u64),
            );
        }
        if let Self::LimitExceeded(r) = &self {
            let kind = match r.limit {
                crate::limits::Limit::Requests => Some("requests"),
                crate::limits::Limit::Tokens => Some("tokens"),
                _ => None,
            };
            if let Some(kind) = kind
                && let Ok(name) =
                    http::HeaderName::try_from(format!("x-ratelimit-remaining-{kind}"))
            {
                headers.insert(name, http::HeaderValue::from_static("0"));
            }
        }
        response
    }
}

fn limit_message(r: &crate::limits::Rejection) -> String {
    use crate::limits::Limit;
    let scope = match r.scope {
        crate::limits::Scope::Key => "this API key",
        crate::limits::Scope::Route => "this route",
    };
    match r.limit {
        Limit::Requests => format!("Rate limit reached: too many requests per minute for {scope}."),
        Limit::Tokens => format!("Rate limit reached: too many tokens per minute for {scope}."),
        Limit::Concurrency => format!("Too many concurrent requests for {scope}."),
        Limit::Budget => "The budget of this API key is used up for the current period.".to_owned(),
    }
}
