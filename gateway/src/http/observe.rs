//! Observing one client request: its server span (continuing the caller's trace), and
//! once it is answered the overhead header, the span's attributes, the request metrics
//! and the access log line. Nothing here decides anything about the request.

use std::time::Instant;

use axum::{extract::Request, response::Response};

use super::{AppState, caching};
use crate::{
    accounting::UsageReport,
    dialects::Operation,
    metrics::{RequestLabels, RouteLabels},
    proxy::{AnsweredBy, Timing},
    telemetry::{self, attr},
};

/// Response header with the gateway's own time for the request, in milliseconds.
pub const OVERHEAD_HEADER: &str = "x-tollgate-overhead-ms";

/// What is known about a request for its access log line and metrics, filled in as the
/// pipeline learns it.
#[derive(Debug, Default)]
pub(super) struct Seen {
    pub(super) route: Option<String>,
    pub(super) key_id: Option<String>,
    pub(super) owner: Option<String>,
    pub(super) model: Option<String>,
}

/// The server span of one request to `operation`, continuing the caller's `incoming`
/// trace context.
pub(super) fn request_span(
    request: &Request,
    operation: Operation,
    request_id: &str,
    incoming: &opentelemetry::Context,
) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    // One server span per request, continuing the caller's trace (W3C traceparent).
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("POST {}", request.uri().path()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        "http.request.method" = "POST",
        "url.path" = request.uri().path(),
        "http.response.status_code" = tracing::field::Empty,
        { attr::OPERATION_NAME } = operation.genai_operation(),
        { attr::REQUEST_MODEL } = tracing::field::Empty,
        { attr::RESPONSE_MODEL } = tracing::field::Empty,
        { attr::INPUT_TOKENS } = tracing::field::Empty,
        { attr::OUTPUT_TOKENS } = tracing::field::Empty,
        "tollgate.request_id" = %request_id,
        "tollgate.key_id" = tracing::field::Empty,
        "tollgate.owner" = tracing::field::Empty,
        "tollgate.route" = tracing::field::Empty,
        "tollgate.provider" = tracing::field::Empty,
        "tollgate.cache" = tracing::field::Empty,
        "tollgate.cost" = tracing::field::Empty,
        "tollgate.overhead_ms" = tracing::field::Empty,
        // Only when the route opts in (RoutePolicy spec.telemetry.recordContent).
        "gen_ai.input.messages" = tracing::field::Empty,
        "gen_ai.output.messages" = tracing::field::Empty,
    );
    // Before the span starts (entering starts it); fails harmlessly when not exporting.
    let _ = span.set_parent(incoming.clone());
    span
}

/// What the pipeline hands over once a request is answered.
#[derive(Debug)]
pub(super) struct Answered<'a> {
    pub(super) operation: Operation,
    pub(super) request_id: &'a str,
    pub(super) started: Instant,
    pub(super) timing: &'a Timing,
    pub(super) usage: &'a UsageReport,
    pub(super) seen: Seen,
    pub(super) span: &'a tracing::Span,
    pub(super) incoming: &'a opentelemetry::Context,
}

/// Adds the overhead header, records the span's attributes and the request metrics, and
/// writes the access log line.
pub(super) fn finish(state: &AppState, answered: Answered<'_>, mut response: Response) -> Response {
    let Answered {
        operation,
        request_id,
        started,
        timing,
        usage,
        seen,
        span,
        incoming,
    } = answered;
    let status = response.status();
    let provider = response
        .extensions()
        .get::<AnsweredBy>()
        .map(|a| a.0.clone());
    let route = seen.route.clone().unwrap_or_else(|| "none".to_owned());
    let elapsed = started.elapsed();
    let overhead = elapsed.saturating_sub(timing.upstream());
    let overhead_ms = overhead.as_secs_f64() * 1000.0;
    if let Ok(v) = http::HeaderValue::from_str(&format!("{overhead_ms:.3}")) {
        response.headers_mut().insert(OVERHEAD_HEADER, v);
    }
    let cache = response
        .headers()
        .get(caching::CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    span.record("tollgate.overhead_ms", overhead_ms);
    if let Some(c) = &cache {
        span.record("tollgate.cache", c.as_str());
    }
    if let Some(p) = &provider {
        span.record("tollgate.provider", p.as_str());
    }
    for (field, value) in [
        ("tollgate.key_id", &seen.key_id),
        ("tollgate.owner", &seen.owner),
        ("tollgate.route", &seen.route),
        (attr::REQUEST_MODEL, &seen.model),
    ] {
        if let Some(v) = value {
            span.record(field, v.as_str());
        }
    }
    let trace_id = telemetry::trace_id(span, incoming);
    // Known here for whole answers; a stream's usage settles after its head was sent.
    let (input_tokens, output_tokens, cost) = match usage.get() {
        Some((i, o, c)) => (Some(i), Some(o), Some(c)),
        None => (None, None, None),
    };
    let metrics = &state.metrics;
    metrics
        .requests
        .get_or_create(&RequestLabels {
            operation: operation.into(),
            route: route.clone(),
            provider: provider.clone().unwrap_or_else(|| "none".to_owned()),
            status: status.as_u16(),
        })
        .inc();
    metrics
        .request_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(elapsed.as_secs_f64());
    metrics.overhead.observe(overhead.as_secs_f64());
    tracing::info!(
        target: "tollgate::access",
        request_id,
        operation = operation.label_str(),
        status = status.as_u16(),
        route,
        provider,
        model = seen.model,
        key_id = seen.key_id,
        owner = seen.owner,
        cache,
        attempts = timing.attempts(),
        trace_id,
        input_tokens,
        output_tokens,
        cost,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        overhead_ms,
        "request"
    );
    response
}
