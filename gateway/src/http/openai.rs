//! The OpenAI-style endpoints: `POST /v1/chat/completions`, `/v1/completions` and
//! `/v1/embeddings`. Each authenticates, resolves the route, checks the key may use the
//! model, and forwards.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{Request, State},
    response::Response,
};

use super::{AppState, auth::authenticate, read_body, request_id};
use tollgate_api::config::CompiledRoute;

use crate::{
    accounting::Accounting,
    error::ApiError,
    limits::{Ask, Quota, reset_string},
    metrics::RejectionLabels,
    metrics::{RequestLabels, RouteLabels},
    proxy::{AnsweredBy, Forward, forward},
    request::estimate_prompt_tokens,
    request::parse_head,
    snapshot::Snapshot,
    upstream::Operation,
};

pub async fn chat_completions(
    state: State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(state, request, Operation::ChatCompletions).await
}

pub async fn completions(
    state: State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(state, request, Operation::Completions).await
}

pub async fn embeddings(
    state: State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(state, request, Operation::Embeddings).await
}

/// What is known about a request for its access log line and metrics.
#[derive(Default)]
struct Seen {
    route: Option<String>,
    key_id: Option<String>,
    owner: Option<String>,
    model: Option<String>,
}

pub(super) async fn handle(
    State(state): State<Arc<AppState>>,
    request: Request,
    operation: Operation,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let request_id = request_id(request.headers());
    let mut seen = Seen::default();
    let result = serve(&state, request, operation, started, &request_id, &mut seen).await;

    let status = match &result {
        Ok(r) => r.status(),
        Err(e) => e.status(),
    };
    let provider = result
        .as_ref()
        .ok()
        .and_then(|r| r.extensions().get::<AnsweredBy>())
        .map(|a| a.0.clone());
    let route = seen.route.clone().unwrap_or_else(|| "none".to_owned());
    let elapsed = started.elapsed();
    let metrics = &state.metrics;
    metrics
        .requests
        .get_or_create(&RequestLabels {
            operation: operation.label(),
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
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    result
}

async fn serve(
    state: &AppState,
    request: Request,
    operation: Operation,
    started: Instant,
    request_id: &str,
    seen: &mut Seen,
) -> Result<Response, ApiError> {
    let snapshot = state.snapshot()?;
    let (parts, body) = request.into_parts();
    let key = authenticate(&parts.headers, &snapshot)?;
    seen.key_id = Some(key.entry.id.clone());
    seen.owner = Some(key.entry.owner.clone());
    let body = read_body(body, state.max_body_bytes).await?;
    let head = parse_head(&body)?;
    let route = snapshot
        .route(&head.model)
        .ok_or_else(|| ApiError::ModelNotFound(head.model.clone()))?;
    // The route id is bounded by configuration; the requested name only goes to logs.
    seen.route = Some(route.id.clone());
    seen.model = Some(head.model.clone());
    if !key.may_use(&head.model) {
        return Err(ApiError::ModelNotAllowed(head.model.clone()));
    }
    // Admission: one check-and-reserve of every limit that applies, before any upstream
    // call; the reservation settles to the actual usage when the answer is done.
    let prompt_estimate = estimate_prompt_tokens(&body);
    let completion_estimate = match operation {
        Operation::Embeddings => 0,
        _ => head.max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE),
    };
    let limited =
        key.entry.limits.is_some() || key.entry.budget.is_some() || route.rate_limit.is_some();
    let mut quota = None;
    let reservation = if limited {
        let ask = Ask {
            key_id: &key.entry.id,
            key_limits: key.entry.limits.as_ref(),
            budget: key.entry.budget.as_ref(),
            route_id: &route.id,
            route_limits: route.rate_limit.as_ref(),
            tokens: prompt_estimate + completion_estimate,
            cost: max_cost(
                &snapshot,
                route,
                &head.model,
                prompt_estimate,
                completion_estimate,
            ),
        };
        match state.limits.admit(&ask) {
            Ok((reservation, q)) => {
                quota = Some(q);
                Some((state.limits.clone(), reservation))
            }
            Err(rejection) => {
                state
                    .metrics
                    .rejections
                    .get_or_create(&RejectionLabels {
                        limit: rejection.limit.as_str(),
                        scope: rejection.scope,
                    })
                    .inc();
                return Err(ApiError::LimitExceeded(rejection));
            }
        }
    } else {
        None
    };
    // Every request is accounted (tokens and cost metrics); limited ones also settle.
    let accounting = Some(Accounting::new(
        reservation,
        state.metrics.clone(),
        &route.id,
        &key.entry.owner,
    ));
    let mut response = forward(
        Forward {
            snapshot: &snapshot,
            route,
            head: &head,
            body,
            request_id: request_id.to_owned(),
            operation,
            breakers: &state.breakers,
            metrics: &state.metrics,
            started,
            prompt_estimate,
        },
        accounting,
    )
    .await?;
    if let Some(quota) = quota {
        // Set before the body starts, so streams carry them too.
        quota_headers(response.headers_mut(), &quota);
    }
    Ok(response)
}

/// `max_tokens` assumed for reservations when a request sets none.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 1024;

/// The most an answer could cost among the route's targets, for budget reservations.
fn max_cost(
    snapshot: &Snapshot,
    route: &CompiledRoute,
    model: &str,
    prompt: u64,
    completion: u64,
) -> f64 {
    route
        .tiers
        .iter()
        .flatten()
        .filter_map(|t| {
            let provider = snapshot.provider(&t.provider)?;
            let m = provider
                .config
                .models
                .get(t.model.as_deref().unwrap_or(model))?;
            Some(
                (prompt as f64 * m.input_per_million + completion as f64 * m.output_per_million)
                    / 1_000_000.0,
            )
        })
        .fold(0.0, f64::max)
}

/// OpenAI's `x-ratelimit-*` headers.
pub(super) fn quota_headers(headers: &mut http::HeaderMap, quota: &Quota) {
    for (kind, value) in [("requests", quota.requests), ("tokens", quota.tokens)] {
        let Some((limit, remaining, reset)) = value else {
            continue;
        };
        for (name, v) in [
            (format!("x-ratelimit-limit-{kind}"), limit.to_string()),
            (
                format!("x-ratelimit-remaining-{kind}"),
                remaining.to_string(),
            ),
            (format!("x-ratelimit-reset-{kind}"), reset_string(reset)),
        ] {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::try_from(name),
                http::HeaderValue::try_from(v),
            ) {
                headers.insert(n, v);
            }
        }
    }
}
