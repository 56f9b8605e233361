//! The OpenAI-style endpoints: `POST /v1/chat/completions`, `/v1/completions` and
//! `/v1/embeddings`. Each authenticates, resolves the route, checks the key may use the
//! model, and forwards.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{Request, State},
    response::Response,
};

use super::{AppState, auth::authenticate, read_body, request_id};
use tollgate_api::{config::CompiledRoute, v1alpha1::CacheScope};

use crate::{
    accounting::Accounting,
    cache,
    error::ApiError,
    limits::{Ask, Quota, reset_string, store::AdmitError},
    metrics::{CacheLabels, RejectionLabels},
    metrics::{RequestLabels, RouteLabels},
    proxy::{AnsweredBy, Forward, forward},
    request::RequestHead,
    request::estimate_prompt_tokens,
    request::parse_head,
    snapshot::Key,
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
    let body = read_body(body, state.max_body_bytes, state.body_read_timeout).await?;
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
        match state.limits.admit(&ask, request_id).await {
            Ok((reservation, q)) => {
                quota = Some(q);
                Some((state.limits.clone(), reservation))
            }
            Err(AdmitError::Rejected(rejection)) => {
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
            Err(AdmitError::Unavailable) => {
                return Err(ApiError::UpstreamUnavailable(
                    "Limits cannot be checked right now (shared state unreachable); retry shortly."
                        .to_owned(),
                ));
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
    let cache = cache_plan(state, route, &key, operation, &head, &parts.headers, &body);
    if let CachePlan::Use {
        key: cache_key,
        lookup: true,
        ..
    } = &cache
        && let Some(hit) = state.cache.get(cache_key)
    {
        state
            .metrics
            .cache
            .get_or_create(&CacheLabels {
                route: route.id.clone(),
                result: "hit",
            })
            .inc();
        // Nothing is generated: the accounting refunds the reservation when dropped.
        drop(accounting);
        let mut response = Response::new(axum::body::Body::from(hit.body));
        if let Ok(v) = http::HeaderValue::try_from(hit.content_type) {
            response.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        response
            .headers_mut()
            .insert(CACHE_HEADER, http::HeaderValue::from_static("hit"));
        if let Some(quota) = quota {
            quota_headers(response.headers_mut(), &quota);
        }
        return Ok(response);
    }
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
    match cache {
        CachePlan::Use {
            key: cache_key,
            store,
            ttl,
            max_entry_bytes,
            ..
        } => {
            state
                .metrics
                .cache
                .get_or_create(&CacheLabels {
                    route: route.id.clone(),
                    result: "miss",
                })
                .inc();
            if store && response.status() == http::StatusCode::OK {
                let (mut parts, body) = response.into_parts();
                // Whole answers are already in memory; this only takes them back.
                let bytes = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                if bytes.len() <= max_entry_bytes {
                    let content_type = parts
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("application/json")
                        .to_owned();
                    state.cache.put(cache_key, bytes.clone(), content_type, ttl);
                }
                parts
                    .headers
                    .insert(CACHE_HEADER, http::HeaderValue::from_static("miss"));
                response = Response::from_parts(parts, axum::body::Body::from(bytes));
            } else {
                response
                    .headers_mut()
                    .insert(CACHE_HEADER, http::HeaderValue::from_static("miss"));
            }
        }
        CachePlan::Bypass => {
            response
                .headers_mut()
                .insert(CACHE_HEADER, http::HeaderValue::from_static("bypass"));
        }
    }
    if let Some(quota) = quota {
        // Set before the body starts, so streams carry them too.
        quota_headers(response.headers_mut(), &quota);
    }
    Ok(response)
}

/// Tells clients whether an answer came from the cache.
const CACHE_HEADER: http::HeaderName = http::HeaderName::from_static("x-tollgate-cache");

/// What the cache does for one request.
enum CachePlan {
    /// No cache on the route, a stream, or the client opted out.
    Bypass,
    /// Look up and/or store under `key`.
    Use {
        key: [u8; 32],
        lookup: bool,
        store: bool,
        ttl: std::time::Duration,
        max_entry_bytes: usize,
    },
}

/// Decides caching: routes with a cache policy, non-streamed calls, unless the client sends
/// `Cache-Control: no-store` / `x-tollgate-cache: bypass` (neither read nor write) or
/// `Cache-Control: no-cache` (fetch fresh, then store).
fn cache_plan(
    state: &AppState,
    route: &CompiledRoute,
    key: &Key,
    operation: Operation,
    head: &RequestHead,
    headers: &http::HeaderMap,
    body: &[u8],
) -> CachePlan {
    let Some(policy) = route
        .cache
        .as_ref()
        .filter(|_| !head.stream && state.cache_enabled)
    else {
        return CachePlan::Bypass;
    };
    let cache_control = headers
        .get(http::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let bypass = headers
        .get(CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("bypass"));
    if bypass || cache_control.contains("no-store") {
        return CachePlan::Bypass;
    }
    let scope = match policy.scope {
        CacheScope::Owner => format!("owner:{}", key.entry.owner),
        CacheScope::Key => format!("key:{}", key.entry.id),
        CacheScope::Shared => "shared".to_owned(),
    };
    match cache::key(&scope, &route.id, operation.label_str(), body) {
        Some(k) => CachePlan::Use {
            key: k,
            lookup: !cache_control.contains("no-cache"),
            store: true,
            ttl: std::time::Duration::from_millis(policy.ttl_ms),
            max_entry_bytes: policy.max_entry_bytes as usize,
        },
        None => CachePlan::Bypass,
    }
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
