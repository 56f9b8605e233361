//! The admission step of a request: estimate what it may use, check and reserve every
//! limit and budget that applies, and report the remaining quota in OpenAI's headers.

use std::sync::Arc;

use tollgate_api::config::CompiledRoute;

use super::AppState;
use crate::{
    accounting::Accounting,
    dialects::Operation,
    error::ApiError,
    limits::{Ask, Quota, reset_string, store::AdmitError},
    metrics::RejectionLabels,
    request::RequestHead,
    snapshot::{Key, Snapshot},
};

/// An admitted request: its accounting (settled when the answer is done) and, when limits
/// apply, the quota left.
pub(super) struct Admitted {
    pub accounting: Accounting,
    pub quota: Option<Quota>,
}

/// Admits a request or refuses it with 429 (limit or budget) or 503 (`failClosed` without
/// Redis). Requests no limit applies to are only accounted.
#[allow(clippy::too_many_arguments)]
pub(super) async fn admit(
    state: &AppState,
    snapshot: &Snapshot,
    route: &CompiledRoute,
    key: &Arc<Key>,
    head: &RequestHead,
    operation: Operation,
    prompt_estimate: u64,
    request_id: &str,
) -> Result<Admitted, ApiError> {
    let limited =
        key.entry.limits.is_some() || key.entry.budget.is_some() || route.rate_limit.is_some();
    if !limited {
        let accounting = Accounting::new(
            None,
            state.usage.clone(),
            state.metrics.clone(),
            &key.entry.id,
            &route.id,
            &key.entry.owner,
        );
        return Ok(Admitted {
            accounting,
            quota: None,
        });
    }
    // Embeddings, moderations and audio generate no text tokens up front (a
    // transcription's are settled from its usage); an image model's output is tokens.
    let completion_estimate = match operation {
        Operation::Embeddings
        | Operation::Moderations
        | Operation::AudioSpeech
        | Operation::AudioTranscriptions
        | Operation::CountTokens => 0,
        _ => head.max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE),
    };
    let ask = Ask {
        key_id: &key.entry.id,
        key_limits: key.entry.limits.as_ref(),
        budget: key.entry.budget.as_ref(),
        route_id: &route.id,
        route_limits: route.rate_limit.as_ref(),
        tokens: prompt_estimate + completion_estimate,
        cost: max_cost(
            snapshot,
            route,
            &head.model,
            prompt_estimate,
            completion_estimate,
        ),
    };
    match state.limits.admit(&ask, request_id).await {
        Ok((reservation, quota)) => {
            let accounting = Accounting::new(
                Some((state.limits.clone(), reservation)),
                state.usage.clone(),
                state.metrics.clone(),
                &key.entry.id,
                &route.id,
                &key.entry.owner,
            );
            Ok(Admitted {
                accounting,
                quota: Some(quota),
            })
        }
        Err(AdmitError::Rejected(rejection)) => {
            state
                .metrics
                .rejections
                .get_or_create(&RejectionLabels {
                    limit: rejection.limit.as_str(),
                    scope: rejection.scope.as_str(),
                })
                .inc();
            Err(ApiError::LimitExceeded(rejection))
        }
        Err(AdmitError::Unavailable) => Err(ApiError::LimitsUnavailable),
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
                crate::pricing::Pricing::of(m).cost(&crate::accounting::Usage {
                    prompt,
                    completion,
                    ..Default::default()
                }),
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
