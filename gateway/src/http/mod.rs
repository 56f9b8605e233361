//! The HTTP surface: the router, its middleware stack, and the shared state handlers see.

mod admission;
mod anthropic;
mod auth;
mod caching;
mod drain;
pub(crate) mod guardrails;
mod health;
mod models;
mod observe;
mod openai;
mod pipeline;
mod stored;
mod throttle;
mod usage;

pub use throttle::{AuthThrottle, ClientAddr};

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Body,
    extract::Request,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http::{HeaderName, HeaderValue, Method, header};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    set_header::SetResponseHeaderLayer,
};

use crate::{config_source::ConfigState, error::ApiError, snapshot::Snapshot};

/// The request id header, honoured from clients and echoed back.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// State shared by every handler.
#[derive(Debug)]
pub struct AppState {
    /// Loaded configuration.
    pub config: Arc<ConfigState>,
    /// Body size limit.
    pub max_body_bytes: usize,
    /// Multipart upload size limit (`/v1/audio/transcriptions`).
    pub max_upload_bytes: usize,
    /// The budget of request memory in flight, shared by every request.
    pub memory: Arc<crate::memory::Budget>,
    /// Upstream answer size limit (non-streamed).
    pub max_response_bytes: usize,
    /// Deadline for receiving a request body.
    pub body_read_timeout: std::time::Duration,
    /// Set on SIGTERM: readiness fails so traffic moves away before the listener closes.
    pub draining: AtomicBool,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Limits and budgets (in process; shared through Redis when configured).
    pub limits: Arc<crate::limits::store::Limits>,
    /// Usage counters per key.
    pub usage: Arc<crate::usage::Usage>,
    /// Who stored which Responses API response.
    pub stored: Arc<crate::stored_responses::StoredResponses>,
    /// Keys revoked through Redis ahead of the mounted configuration.
    pub revocations: Arc<crate::revocation::Revocations>,
    /// Response cache.
    pub cache: Arc<crate::cache::Cache>,
    /// Whether the cache is on (`--cache-max-bytes` above 0).
    pub cache_enabled: bool,
    /// Failed-authentication throttle per client address.
    pub auth_throttle: AuthThrottle,
}

impl AppState {
    /// The snapshot to serve this request with, or 503 before the first load.
    pub fn snapshot(&self) -> Result<Arc<Snapshot>, ApiError> {
        self.config.current.load_full().ok_or(ApiError::Unavailable)
    }
}

/// Options for the middleware stack.
#[derive(Debug, Clone, Default)]
pub struct HttpOptions {
    /// CORS origins; empty disables CORS.
    pub cors_origins: Vec<String>,
    /// Raised near the shutdown deadline: open streams then end with an error event.
    pub end_streams: Option<tokio::sync::watch::Receiver<bool>>,
}

/// The gateway's router with its middleware.
pub fn app(state: Arc<AppState>, options: &HttpOptions) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(openai::responses))
        .route("/v1/moderations", post(openai::moderations))
        .route("/v1/images/generations", post(openai::image_generations))
        .route("/v1/audio/speech", post(openai::audio_speech))
        .route(
            "/v1/audio/transcriptions",
            post(openai::audio_transcriptions),
        )
        .route(
            "/v1/responses/{id}",
            get(stored::response).delete(stored::response),
        )
        .route("/v1/responses/{id}/input_items", get(stored::input_items))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(models::list_models))
        .route("/v1/usage", get(usage::usage))
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .fallback(unknown_route)
        .with_state(state);

    with_middleware(api, options)
}

/// The middleware stack, outermost first: request id (honoured or generated, then echoed),
/// panic → OpenAI-style 500 (so it carries the request id too), CORS when configured,
/// security headers, and the end of open streams at the shutdown deadline.
fn with_middleware(router: Router, options: &HttpOptions) -> Router {
    router.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new(REQUEST_ID, RequestIds::default()))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID))
            .layer(CatchPanicLayer::custom(panic_response))
            .option_layer(cors_layer(&options.cors_origins))
            .layer(SetResponseHeaderLayer::if_not_present(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ))
            .layer(SetResponseHeaderLayer::if_not_present(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            ))
            .option_layer(options.end_streams.clone().map(|end| {
                axum::middleware::from_fn(move |request, next| {
                    drain::end_streams_on(end.clone(), request, next)
                })
            })),
    )
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<&String> = origins.iter().filter(|o| !o.trim().is_empty()).collect();
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim()).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-api-key"),
                REQUEST_ID,
                HeaderName::from_static("anthropic-version"),
            ])
            .expose_headers([
                REQUEST_ID,
                header::RETRY_AFTER,
                HeaderName::from_static("x-tollgate-cache"),
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-remaining-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-remaining-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ]),
    )
}

async fn unknown_route(request: Request) -> Response {
    ApiError::NotFound {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
    }
    .into_response()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    // The request id is added on the way out by the propagation layer.
    tracing::error!("handler panicked");
    ApiError::Internal("see the x-request-id header".to_owned()).into_response()
}

/// The admin router: `/metrics` (Prometheus text format), plus the probes.
pub fn admin_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .fallback(unknown_route)
        .with_state(state)
}

async fn metrics(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> Response {
    state
        .metrics
        .set_memory(state.memory.in_use_bytes(), state.memory.total_bytes());
    let snapshot = state.config.current.load_full();
    let config = snapshot
        .as_deref()
        .map(|s| (s.config_hash.as_str(), s.key_count()));
    let body = state.metrics.render(
        config,
        &state.config.health.breakers,
        state.limits.redis_state(),
    );
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Request ids for requests that bring none: a per-process random prefix and a counter,
/// unique without coordination and cheap to make.
#[derive(Clone, Debug)]
struct RequestIds {
    prefix: Arc<str>,
    counter: Arc<AtomicU64>,
}

impl Default for RequestIds {
    fn default() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            prefix: format!("{seed:016x}").into(),
            counter: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &http::Request<B>) -> Option<RequestId> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("req_{}{n:08x}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// The request id of a request (set by the middleware).
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// Reads a whole body, answering 413 beyond `limit` and 408 when it takes longer than
/// `timeout` (a client trickling its upload).
/// Reads a request body of at most `limit` bytes within `timeout`, holding its bytes in
/// `share` of the in-flight budget as they arrive: a declared `Content-Length` is
/// checked and held before anything is read, and the buffer is sized to it (no growth by
/// doubling).
pub async fn read_body(
    body: Body,
    declared: Option<usize>,
    limit: usize,
    timeout: std::time::Duration,
    share: &crate::memory::Share,
) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    const WHAT: &str = "its body";
    let mut held = declared.unwrap_or(0);
    share.grow(held, WHAT)?;
    let read = async {
        let mut body = body;
        let mut buf = bytes::BytesMut::with_capacity(held);
        // A body in one frame is kept as it arrived, without a copy.
        let mut single: Option<bytes::Bytes> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request(format!("Could not read the request body: {e}"), None)
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = buf.len() + single.as_ref().map_or(0, |b| b.len()) + data.len();
            if len > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            if buf.is_empty() && single.is_none() {
                if len > held {
                    share.grow(len - held, WHAT)?;
                    held = len;
                }
                single = Some(data);
                continue;
            }
            if let Some(first) = single.take() {
                buf.reserve(first.len());
                buf.extend_from_slice(&first);
            }
            buf.reserve(data.len());
            if buf.capacity() > held {
                share.grow(buf.capacity() - held, WHAT)?;
                held = buf.capacity();
            }
            buf.extend_from_slice(&data);
        }
        Ok(single.unwrap_or_else(|| buf.freeze()))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ApiError::RequestTimeout)?
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, routing::get};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_becomes_an_openai_style_500_with_the_request_id() {
        async fn boom() -> &'static str {
            panic!("handler bug")
        }
        let router = with_middleware(
            Router::new().route("/boom", get(boom)),
            &HttpOptions::default(),
        );
        let request = http::Request::builder()
            .uri("/boom")
            .header("x-request-id", "req-7")
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(response.headers()["x-request-id"], "req-7");
        let body = axum::body::to_bytes(response.into_body(), 10_000)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "internal_error");
        // The service keeps answering after a panic.
        let again = router
            .oneshot(
                http::Request::builder()
                    .uri("/boom")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(again.status(), 500);
    }
}
