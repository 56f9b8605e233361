//! The OpenAI-style endpoints: `POST /v1/chat/completions`, `/v1/completions` and
//! `/v1/embeddings`. Each authenticates, resolves the route, checks the key may use the
//! model, and forwards.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{Request, State},
    response::{IntoResponse, Response},
};

use super::{
    AppState, admission, auth::authenticate_client, caching, guardrails, read_body, request_id,
};
use crate::{
    accounting::UsageReport,
    dialects::Operation,
    error::ApiError,
    metrics::{RequestLabels, RouteLabels},
    proxy::{AnsweredBy, Forward, Timing, forward},
    relay,
    request::{estimate_prompt_tokens, parse_head},
    telemetry::{self, attr},
};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub async fn chat_completions(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::ChatCompletions,
        ApiError::into_response,
    )
    .await
}

pub async fn completions(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::Completions,
        ApiError::into_response,
    )
    .await
}

pub async fn embeddings(state: State<Arc<AppState>>, request: Request) -> Response {
    handle(
        state,
        request,
        Operation::Embeddings,
        ApiError::into_response,
    )
    .await
}

/// Response header with the gateway's own time for the request, in milliseconds.
pub const OVERHEAD_HEADER: &str = "x-tollgate-overhead-ms";

/// What is known about a request for its access log line and metrics.
#[derive(Default)]
struct Seen {
    route: Option<String>,
    key_id: Option<String>,
    owner: Option<String>,
    model: Option<String>,
}

/// Serves one request and renders errors with `render` (OpenAI's or Anthropic's shape);
/// records metrics and the access log line, and reports the gateway's own overhead.
pub(super) async fn handle(
    State(state): State<Arc<AppState>>,
    request: Request,
    operation: Operation,
    render: fn(ApiError) -> Response,
) -> Response {
    let started = Instant::now();
    let request_id = request_id(request.headers());
    let mut seen = Seen::default();
    let timing = Timing::default();
    let usage = Arc::new(UsageReport::default());
    // One server span per request, continuing the caller's trace (W3C traceparent).
    let incoming = telemetry::extract(request.headers());
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
    let result = serve(
        &state,
        request,
        operation,
        Context {
            started,
            request_id: &request_id,
            timing: &timing,
            trace: &incoming,
            usage: &usage,
        },
        &mut seen,
    )
    .instrument(span.clone())
    .await;
    let mut response = result.unwrap_or_else(render);
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
    let trace_id = telemetry::trace_id(&span, &incoming);
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

/// What `serve` needs besides the request: when it started, its id, where upstream time
/// is added up, and the caller's trace context.
struct Context<'a> {
    started: Instant,
    request_id: &'a str,
    timing: &'a Timing,
    trace: &'a opentelemetry::Context,
    usage: &'a Arc<UsageReport>,
}

async fn serve(
    state: &AppState,
    request: Request,
    operation: Operation,
    cx: Context<'_>,
    seen: &mut Seen,
) -> Result<Response, ApiError> {
    let Context {
        started,
        request_id,
        timing,
        trace,
        usage,
    } = cx;
    let snapshot = state.snapshot()?;
    let (parts, body) = request.into_parts();
    let key = authenticate_client(state, &parts, &snapshot)?;
    seen.key_id = Some(key.entry.id.clone());
    seen.owner = Some(key.entry.owner.clone());
    // What this request holds of the gateway-wide memory budget, returned when the
    // response head is sent (streams hold none).
    let share = state.memory.share();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = read_body(
        body,
        declared,
        state.max_body_bytes,
        state.body_read_timeout,
        &share,
    )
    .await?;
    let head = parse_head(&body)?;
    let route = snapshot
        .route_for(&key, &head.model)
        .ok_or_else(|| ApiError::ModelNotFound(head.model.clone()))?;
    // The route id is bounded by configuration; the requested name only goes to logs.
    seen.route = Some(route.id.clone());
    seen.model = Some(head.model.clone());
    if !key.may_use(&head.model) {
        return Err(ApiError::ModelNotAllowed(head.model.clone()));
    }
    // Before anything else reads the content: a blocked request reaches no limit, cache
    // or upstream, and redacted text is all that the cache key, traces and upstream see.
    let body = guardrails::apply(state, &snapshot, route, &key, request_id, body, &share)?;
    if route.record_content {
        share.reserve_trees(&body, 1, "recording its content")?;
        let input = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("messages")
                    .or_else(|| v.get("prompt"))
                    .or_else(|| v.get("input"))
                    .cloned()
            })
            .map(|m| m.to_string())
            .unwrap_or_default();
        tracing::Span::current().record("gen_ai.input.messages", input.as_str());
    }
    // Admission: one check-and-reserve of every limit that applies, before any upstream
    // call; the reservation settles to the actual usage when the answer is done.
    let prompt_estimate = estimate_prompt_tokens(&body);
    let admitted = admission::admit(
        state,
        &snapshot,
        route,
        &key,
        &head,
        operation,
        prompt_estimate,
        request_id,
    )
    .instrument(tracing::info_span!("admission"))
    .await?;
    let (mut accounting, quota) = (admitted.accounting, admitted.quota);
    // Usage and cost go on the request's span (a stream's moves them to its own).
    accounting.trace_into(tracing::Span::current());
    accounting.report_to(usage.clone());
    let accounting = Some(accounting);
    let cache = caching::plan(state, route, &key, operation, &parts.headers, &body, &share)?;
    // What attempts may make of the body: a target of another dialect holds the parsed
    // body and its translation at once; an edited copy is one more body.
    let work = crate::proxy::body_work(&snapshot, route, &head, operation);
    if work.translates {
        share.reserve_trees(&body, 2, "translating it")?;
    }
    if work.edits {
        share.grow(body.len(), "an edited copy of it")?;
    }
    let lookup = caching::lookup(state, route, &cache)
        .instrument(tracing::info_span!("cache lookup"))
        .await;
    if let Some(mut hit) = lookup {
        // Nothing is generated: the accounting refunds the reservation when dropped.
        drop(accounting);
        // The entry may come from another key (shared scope) or predate a rule: this
        // key's and route's response rules apply to it as to a fresh answer.
        if guardrails::checks_responses(&snapshot, route, &key) {
            hit = match guardrails::answer_rules(state, &snapshot, route, &key, request_id) {
                Some(rules) if head.stream && relay::is_event_stream(&hit) => {
                    guardrails::apply_to_stored_stream(hit, rules, operation).await?
                }
                _ => {
                    guardrails::apply_response(state, &snapshot, route, &key, request_id, hit)
                        .await?
                }
            };
        }
        if let Some(quota) = quota {
            admission::quota_headers(hit.headers_mut(), &quota);
        }
        return Ok(hit);
    }
    let response = forward(
        Forward {
            snapshot: &snapshot,
            route,
            head: &head,
            body,
            request_id: request_id.to_owned(),
            max_response_bytes: state.max_response_bytes,
            operation,
            breakers: &state.breakers,
            target_stats: &state.target_stats,
            metrics: &state.metrics,
            started,
            prompt_estimate,
            timing,
            trace,
            // Streamed answers pass the response rules as they are relayed.
            answers: head
                .stream
                .then(|| guardrails::answer_rules(state, &snapshot, route, &key, request_id))
                .flatten(),
        },
        accounting,
    )
    .await?;
    // Complete answers pass the response rules before they are recorded, cached or
    // returned (a stream request answered with a whole body too).
    let guarded_in_relay = head.stream && relay::is_event_stream(&response);
    let response = if !guarded_in_relay && guardrails::checks_responses(&snapshot, route, &key) {
        guardrails::apply_response(state, &snapshot, route, &key, request_id, response).await?
    } else {
        response
    };
    // A non-streamed answer is whole in memory already: record it when the route opts in.
    let response = if route.record_content && !head.stream {
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        tracing::Span::current().record(
            "gen_ai.output.messages",
            String::from_utf8_lossy(&bytes).as_ref(),
        );
        Response::from_parts(parts, axum::body::Body::from(bytes))
    } else {
        response
    };
    let mut response = caching::store(state, route, cache, response).await;
    if let Some(quota) = quota {
        // Set before the body starts, so streams carry them too.
        admission::quota_headers(response.headers_mut(), &quota);
    }
    Ok(response)
}
