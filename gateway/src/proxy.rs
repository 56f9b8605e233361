//! Sending one client request to its route's targets: attempt order, retries with backoff,
//! fallback across tiers, timeouts, and relaying the answer (streamed as it arrives).
//!
//! Retries and fallback happen only before anything has been sent to the client: once a
//! stream has started, a failure ends it with an error event instead.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;
use tollgate_api::{
    config::{CompiledMock, CompiledRoute},
    v1alpha1::RetryOn,
};

use crate::{
    circuit::Breakers,
    error::ApiError,
    metrics::{AttemptLabels, Metrics, RouteLabels},
    providers::mock,
    request::{RequestHead, estimate_prompt_tokens},
    routing::{attempt_order, backoff},
    snapshot::{Provider, Snapshot},
    sse,
    translate::{self, Untranslatable},
    upstream::Dialect,
    upstream::{self, Operation},
};

/// Longest upstream `Retry-After` the gateway waits for before retrying the same target.
const MAX_RETRY_AFTER_WAIT: Duration = Duration::from_secs(10);

/// One request on its way upstream.
#[derive(Debug)]
pub struct Forward<'a> {
    /// The configuration it is served with.
    pub snapshot: &'a Snapshot,
    /// Its route.
    pub route: &'a CompiledRoute,
    /// Parsed head of the body.
    pub head: &'a RequestHead,
    /// The original body.
    pub body: Bytes,
    /// Request id, forwarded upstream.
    pub request_id: String,
    /// The operation.
    pub operation: Operation,
    /// Circuit breakers.
    pub breakers: &'a Breakers,
    /// Metrics.
    pub metrics: &'a Arc<Metrics>,
    /// When the gateway received the request.
    pub started: Instant,
}

/// Response extension naming the provider that answered, for metrics and logs.
#[derive(Debug, Clone)]
pub struct AnsweredBy(pub String);

/// Why an attempt failed.
#[derive(Debug)]
enum Failure {
    Connect(String),
    Timeout,
    RateLimited(Option<Duration>),
    Server(StatusCode),
    Credentials(String),
    Unsupported(String),
    NoModel(String),
    BadRequest(String),
    CircuitOpen(String),
    Saturated(String),
}

impl Failure {
    fn retryable(&self, retry_on: &[RetryOn]) -> bool {
        match self {
            Self::Connect(_) => retry_on.contains(&RetryOn::ConnectError),
            Self::Timeout => retry_on.contains(&RetryOn::Timeout),
            Self::RateLimited(_) => retry_on.contains(&RetryOn::RateLimited),
            Self::Server(_) => retry_on.contains(&RetryOn::ServerError),
            // Another target may be configured correctly: move on without counting on luck.
            Self::Credentials(_) | Self::Unsupported(_) | Self::NoModel(_) => true,
            Self::BadRequest(_) => false,
            Self::CircuitOpen(_) | Self::Saturated(_) => true,
        }
    }

    /// The metric label of this failure.
    fn outcome(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect_error",
            Self::Timeout => "timeout",
            Self::RateLimited(_) => "rate_limited",
            Self::Server(_) => "server_error",
            Self::Credentials(_) => "credentials_rejected",
            Self::Saturated(_) => "saturated",
            Self::CircuitOpen(_) => "circuit_open",
            Self::Unsupported(_) | Self::NoModel(_) | Self::BadRequest(_) => "not_attempted",
        }
    }

    /// Whether the upstream was actually called (and so the failure says something about
    /// its health).
    fn reached_upstream(&self) -> bool {
        matches!(
            self,
            Self::Connect(_)
                | Self::Timeout
                | Self::RateLimited(_)
                | Self::Server(_)
                | Self::Credentials(_)
        )
    }

    fn into_error(self) -> ApiError {
        match self {
            Self::Connect(provider) => ApiError::Upstream(format!(
                "The upstream provider {provider} could not be reached."
            )),
            Self::Timeout => ApiError::UpstreamTimeout,
            Self::RateLimited(after) => ApiError::UpstreamRateLimited(after),
            Self::Server(status) => ApiError::Upstream(format!(
                "The upstream provider failed with HTTP {}.",
                status.as_u16()
            )),
            Self::Credentials(provider) => ApiError::Upstream(format!(
                "The upstream provider {provider} rejected the gateway's credentials."
            )),
            Self::Unsupported(message) => ApiError::NotImplemented(message),
            Self::NoModel(model) => ApiError::ModelNotFound(model),
            Self::BadRequest(message) => ApiError::bad_request(message, None),
            Self::CircuitOpen(provider) => ApiError::UpstreamUnavailable(format!(
                "The upstream provider {provider} is failing and temporarily not called (circuit open); retry later."
            )),
            Self::Saturated(provider) => ApiError::UpstreamUnavailable(format!(
                "The upstream provider {provider} is at its concurrency limit; retry later."
            )),
        }
    }
}

/// Tries the route's targets in order until one answers.
pub async fn forward(req: Forward<'_>) -> Result<Response, ApiError> {
    let route = req.route;
    let mut rng = fastrand::Rng::new();
    let order = attempt_order(&route.tiers, &mut rng);
    if order.is_empty() {
        return Err(ApiError::ModelNotFound(req.head.model.clone()));
    }
    let started = Instant::now();
    let deadline = route
        .total_timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    let budget = 1 + route.retry_attempts as usize;
    let mut last: Option<(Failure, &str)> = None;
    let mut attempts = 0;
    // Targets skipped without an attempt (open circuit, no free slot) do not use up the
    // retry budget, but each position is visited a bounded number of times.
    for target in order.iter().cycle().take(budget + order.len()) {
        if attempts >= budget {
            break;
        }
        let Some(provider) = req.snapshot.provider(&target.provider) else {
            continue;
        };
        let model = target.model.as_deref().unwrap_or(&req.head.model);
        let breaker = req.breakers.get(&target.provider, model);
        if !breaker.allow() {
            req.metrics
                .upstream_attempts
                .get_or_create(&AttemptLabels {
                    provider: target.provider.clone(),
                    outcome: "circuit_open",
                })
                .inc();
            last = Some((
                Failure::CircuitOpen(target.provider.clone()),
                target.provider.as_str(),
            ));
            continue;
        }
        if attempts > 0 {
            let mut wait = backoff(
                attempts as u32,
                route.retry_initial_backoff_ms,
                route.retry_max_backoff_ms,
                &mut rng,
            );
            if let Some((Failure::RateLimited(Some(after)), provider)) = &last
                && *provider == target.provider
            {
                wait = wait.max((*after).min(MAX_RETRY_AFTER_WAIT));
            }
            if let Some(d) = deadline
                && Instant::now() + wait >= d
            {
                breaker.release();
                break;
            }
            tokio::time::sleep(wait).await;
        }
        let failure = match attempt_once(&req, provider, model, deadline).await {
            Ok(mut response) => {
                breaker.success();
                let outcome = if response.status().is_success() {
                    "success"
                } else {
                    "client_error"
                };
                req.metrics
                    .upstream_attempts
                    .get_or_create(&AttemptLabels {
                        provider: target.provider.clone(),
                        outcome,
                    })
                    .inc();
                response
                    .extensions_mut()
                    .insert(AnsweredBy(target.provider.clone()));
                return Ok(response);
            }
            Err(failure) => failure,
        };
        req.metrics
            .upstream_attempts
            .get_or_create(&AttemptLabels {
                provider: target.provider.clone(),
                outcome: failure.outcome(),
            })
            .inc();
        if failure.reached_upstream() {
            attempts += 1;
            breaker.failure(
                provider.config.circuit_failure_threshold,
                provider.config.circuit_open_ms,
            );
        } else {
            breaker.release();
            if matches!(failure, Failure::BadRequest(_)) {
                attempts += 1;
            }
        }
        tracing::debug!(attempts, provider = %target.provider, ?failure, "upstream attempt failed");
        let retryable = failure.retryable(&route.retry_on);
        last = Some((failure, target.provider.as_str()));
        if !retryable {
            break;
        }
    }
    Err(last.map_or(ApiError::UpstreamTimeout, |(f, _)| f.into_error()))
}

async fn attempt_once(
    req: &Forward<'_>,
    provider: &Arc<Provider>,
    model: &str,
    deadline: Option<Instant>,
) -> Result<Response, Failure> {
    let config = &provider.config;
    let Some(compiled_model) = config.models.get(model) else {
        return Err(Failure::NoModel(req.head.model.clone()));
    };
    let client_dialect = req.operation.client_dialect();
    let (Some(upstream_dialect), Some(client)) = (
        upstream::dialect(config.provider_type),
        provider.client.as_ref(),
    ) else {
        return serve_mock(req, config.mock.clone().unwrap_or_else(default_mock)).await;
    };
    if upstream_dialect == Dialect::Anthropic
        && matches!(
            req.operation,
            Operation::Completions | Operation::Embeddings
        )
    {
        return Err(Failure::Unsupported(format!(
            "The model `{}` is served by Anthropic, which has no {} endpoint.",
            req.head.model,
            req.operation.label_str()
        )));
    }

    let upstream_model = compiled_model.upstream_name.as_str();
    let body = match (client_dialect, upstream_dialect) {
        (c, u) if c == u => upstream::body(&req.body, &req.head.model, upstream_model)
            .map_err(|e| Failure::BadRequest(e.to_string()))?,
        (Dialect::OpenAi, _) => translated(&req.body, |v| {
            translate::openai_to_anthropic_request(v, upstream_model)
        })?,
        (Dialect::Anthropic, _) => translated(&req.body, |v| {
            translate::anthropic_to_openai_request(v, upstream_model)
        })?,
    };
    let url = upstream::endpoint(config, req.operation, upstream_model);
    let headers = upstream::headers(config, provider.credential.as_deref(), &req.request_id);

    let mut per_try = Duration::from_millis(config.request_timeout_ms);
    if let Some(d) = deadline {
        per_try = per_try.min(d.saturating_duration_since(Instant::now()));
    }
    let attempt_deadline = Instant::now() + per_try;
    // Held until the answer has been relayed in full (streams included).
    let permit = match &provider.slots {
        Some(slots) => Some(
            slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| Failure::Saturated(config.id.clone()))?,
        ),
        None => None,
    };
    let sent =
        tokio::time::timeout(per_try, client.post(url).headers(headers).body(body).send()).await;
    let response = match sent {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(e)) if e.is_timeout() => return Err(Failure::Timeout),
        Ok(Err(_)) => return Err(Failure::Connect(config.id.clone())),
        Ok(Ok(r)) => r,
    };
    let conversion = Conversion::between(client_dialect, upstream_dialect, req.head);
    let status = response.status();
    match status.as_u16() {
        200..=299 => {}
        429 => {
            return Err(Failure::RateLimited(upstream::retry_after(
                response.headers(),
            )));
        }
        500 | 502 | 503 | 504 | 529 => return Err(Failure::Server(status)),
        401 | 403 => return Err(Failure::Credentials(config.id.clone())),
        // The upstream judged the request itself (400, 404, 422…): the client should see
        // what it said, in the client's dialect.
        _ => return relay_whole(response, attempt_deadline, &conversion).await,
    }
    if req.head.stream {
        let first_byte = FirstByte {
            metrics: req.metrics.clone(),
            route: req.route.id.clone(),
            started: req.started,
        };
        Ok(relay_stream(
            response,
            Duration::from_millis(config.stream_idle_timeout_ms),
            permit,
            first_byte,
            conversion,
        ))
    } else {
        relay_whole(response, attempt_deadline, &conversion).await
    }
}

/// Parses the client body and translates it, mapping failures to a 400.
fn translated(
    body: &Bytes,
    f: impl FnOnce(&serde_json::Value) -> Result<serde_json::Value, Untranslatable>,
) -> Result<Bytes, Failure> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Failure::BadRequest(format!("The request body is not valid JSON: {e}")))?;
    let out = f(&value).map_err(|Untranslatable(why)| Failure::BadRequest(why))?;
    Ok(Bytes::from(
        serde_json::to_vec(&out).expect("a JSON value serialises"),
    ))
}

/// How an upstream answer is rewritten for the client.
#[derive(Debug, Clone)]
enum Conversion {
    /// Same dialect: bytes pass through.
    None,
    /// Anthropic upstream, OpenAI client.
    AnthropicToOpenAi { model: String, include_usage: bool },
    /// OpenAI upstream, Anthropic client.
    OpenAiToAnthropic { model: String },
}

impl Conversion {
    fn between(client: Dialect, upstream: Dialect, head: &RequestHead) -> Self {
        match (client, upstream) {
            (c, u) if c == u => Self::None,
            (Dialect::OpenAi, _) => Self::AnthropicToOpenAi {
                model: head.model.clone(),
                include_usage: head.include_usage(),
            },
            (Dialect::Anthropic, _) => Self::OpenAiToAnthropic {
                model: head.model.clone(),
            },
        }
    }

    /// Rewrites a complete JSON body (answer or error) for the client.
    fn body(&self, status: StatusCode, bytes: Bytes) -> Bytes {
        if matches!(self, Self::None) {
            return bytes;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return bytes;
        };
        let out = match (self, status.is_success()) {
            (Self::AnthropicToOpenAi { model, .. }, true) => {
                translate::anthropic_to_openai_response(
                    &value,
                    model,
                    jiff::Timestamp::now().as_second(),
                )
            }
            (Self::AnthropicToOpenAi { .. }, false) => translate::anthropic_error_to_openai(&value),
            (Self::OpenAiToAnthropic { model }, true) => {
                translate::openai_to_anthropic_response(&value, model)
            }
            (Self::OpenAiToAnthropic { .. }, false) => {
                translate::openai_error_to_anthropic(&value, status.as_u16())
            }
            (Self::None, _) => return bytes,
        };
        Bytes::from(out.to_string())
    }
}

/// Relays a complete (non-streamed) upstream answer.
async fn relay_whole(
    response: reqwest::Response,
    deadline: Instant,
    conversion: &Conversion,
) -> Result<Response, Failure> {
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let remaining = deadline.saturating_duration_since(Instant::now());
    let bytes = match tokio::time::timeout(remaining, response.bytes()).await {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(_)) => return Err(Failure::Server(StatusCode::BAD_GATEWAY)),
        Ok(Ok(b)) => b,
    };
    let converted = !matches!(conversion, Conversion::None);
    let mut out = Response::new(Body::from(conversion.body(status, bytes)));
    *out.status_mut() = status;
    let content_type = if converted { None } else { content_type };
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    Ok(out)
}

/// Relays an upstream SSE stream chunk by chunk (translating events when the dialects
/// differ). A broken or silent upstream ends the stream with an error event rather than a
/// silent cut. Dropping the response (client gone) drops the upstream connection.
fn relay_stream(
    response: reqwest::Response,
    idle: Duration,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    first_byte: FirstByte,
    conversion: Conversion,
) -> Response {
    let mut first_byte = Some(first_byte);
    let chunks = relay_chunks(response.bytes_stream(), idle, conversion).map(move |chunk| {
        // The stream owns the concurrency slot: it is freed when the stream ends or the
        // client goes away.
        let _slot = &permit;
        if let Some(fb) = first_byte.take() {
            fb.observe();
        }
        chunk
    });
    sse_response(Body::from_stream(chunks))
}

/// Rewrites SSE events from one dialect to the other.
enum StreamTranslator {
    Pass,
    AnthropicToOpenAi(sse::Parser, translate::AnthropicToOpenAiStream),
    OpenAiToAnthropic(sse::Parser, translate::OpenAiToAnthropicStream),
}

impl StreamTranslator {
    fn new(conversion: Conversion) -> Self {
        match conversion {
            Conversion::None => Self::Pass,
            Conversion::AnthropicToOpenAi {
                model,
                include_usage,
            } => Self::AnthropicToOpenAi(
                sse::Parser::default(),
                translate::AnthropicToOpenAiStream::new(
                    &model,
                    jiff::Timestamp::now().as_second(),
                    include_usage,
                ),
            ),
            Conversion::OpenAiToAnthropic { model } => Self::OpenAiToAnthropic(
                sse::Parser::default(),
                translate::OpenAiToAnthropicStream::new(&model),
            ),
        }
    }

    fn client_dialect(&self) -> Dialect {
        match self {
            Self::OpenAiToAnthropic(..) => Dialect::Anthropic,
            _ => Dialect::OpenAi,
        }
    }

    /// The client bytes for an upstream chunk.
    fn feed(&mut self, chunk: Bytes) -> Result<Bytes, &'static str> {
        let mut out = Vec::new();
        match self {
            Self::Pass => return Ok(chunk),
            Self::AnthropicToOpenAi(parser, t) => {
                for event in parser.feed(&chunk)? {
                    let data: serde_json::Value =
                        serde_json::from_str(&event.data).unwrap_or_default();
                    let name = event
                        .event
                        .as_deref()
                        .or_else(|| data["type"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    for payload in t.on_event(&name, &data) {
                        out.extend_from_slice(b"data: ");
                        out.extend_from_slice(payload.as_bytes());
                        out.extend_from_slice(b"\n\n");
                    }
                }
            }
            Self::OpenAiToAnthropic(parser, t) => {
                for event in parser.feed(&chunk)? {
                    for (name, data) in t.on_data(&event.data) {
                        out.extend_from_slice(
                            format!("event: {name}\ndata: {data}\n\n").as_bytes(),
                        );
                    }
                }
            }
        }
        Ok(Bytes::from(out))
    }
}

fn relay_chunks<S>(
    upstream: S,
    idle: Duration,
    conversion: Conversion,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    let translator = StreamTranslator::new(conversion);
    stream::unfold(
        (upstream, translator, false),
        move |(mut s, mut t, finished)| async move {
            if finished {
                return None;
            }
            loop {
                let error = match tokio::time::timeout(idle, s.next()).await {
                    Ok(Some(Ok(bytes))) => match t.feed(bytes) {
                        // Translation may swallow a chunk (e.g. a ping): wait for the next one.
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Some((Ok(out), (s, t, false))),
                        Err(why) => why,
                    },
                    Ok(None) => return None,
                    Ok(Some(Err(_))) => "The upstream stream was interrupted.",
                    Err(_) => "The upstream stream went silent and was abandoned.",
                };
                let event = stream_error(error, t.client_dialect());
                return Some((Ok(event), (s, t, true)));
            }
        },
    )
}

/// An SSE error event in the client's error shape.
fn stream_error(message: &str, dialect: Dialect) -> Bytes {
    match dialect {
        Dialect::OpenAi => mock::sse(
            &json!({ "error": { "message": message, "type": "server_error", "param": null, "code": "upstream_stream_error" } }),
        ),
        Dialect::Anthropic => Bytes::from(format!(
            "event: error\ndata: {}\n\n",
            json!({ "type": "error", "error": { "type": "api_error", "message": message } })
        )),
    }
}

/// Records the time to the first streamed byte once.
struct FirstByte {
    metrics: Arc<Metrics>,
    route: String,
    started: Instant,
}

impl FirstByte {
    fn observe(self) {
        self.metrics
            .time_to_first_byte
            .get_or_create(&RouteLabels { route: self.route })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

fn default_mock() -> CompiledMock {
    CompiledMock {
        latency_ms: 0,
        chunk_interval_ms: 0,
        completion_tokens: 16,
        reply: None,
    }
}

async fn serve_mock(req: &Forward<'_>, settings: CompiledMock) -> Result<Response, Failure> {
    if settings.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;
    }
    let shape = match req.operation {
        Operation::ChatCompletions | Operation::Messages => mock::Shape::Chat,
        Operation::Completions => mock::Shape::Completion,
        Operation::Embeddings => {
            let request: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            return mock::embeddings(&request, &req.head.model)
                .map(|v| Json(v).into_response())
                .map_err(Failure::BadRequest);
        }
    };
    let prefix = if shape == mock::Shape::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{}", req.request_id);
    let created = jiff::Timestamp::now().as_second();
    let answer = mock::answer(&settings, &req.body, estimate_prompt_tokens(&req.body));
    // The mock speaks OpenAI; Anthropic clients get its answer translated.
    let anthropic = req.operation.client_dialect() == Dialect::Anthropic;
    if req.head.stream {
        let include_usage = req.head.include_usage() || anthropic;
        let frames = mock::stream(
            shape,
            answer,
            &settings,
            id,
            req.head.model.clone(),
            created,
            include_usage,
        );
        if anthropic {
            let mut translator = StreamTranslator::new(Conversion::OpenAiToAnthropic {
                model: req.head.model.clone(),
            });
            let translated = frames.map(move |frame| {
                Ok::<_, std::io::Error>(translator.feed(frame).unwrap_or_default())
            });
            return Ok(sse_response(Body::from_stream(translated)));
        }
        return Ok(sse_response(Body::from_stream(
            frames.map(Ok::<_, std::io::Error>),
        )));
    }
    let completion = mock::completion(shape, &answer, &id, &req.head.model, created);
    if anthropic {
        return Ok(Json(translate::openai_to_anthropic_response(
            &completion,
            &req.head.model,
        ))
        .into_response());
    }
    Ok(Json(completion).into_response())
}

fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_silent_stream_ends_with_an_error_event() {
        let upstream =
            stream::iter(vec![Ok(Bytes::from_static(b"data: {}\n\n"))]).chain(stream::pending());
        let chunks: Vec<Bytes> = relay_chunks(
            Box::pin(upstream),
            Duration::from_millis(50),
            Conversion::None,
        )
        .map(|c| c.unwrap())
        .collect()
        .await;
        assert_eq!(chunks.len(), 2);
        assert!(String::from_utf8_lossy(&chunks[1]).contains("upstream_stream_error"));
    }
}
