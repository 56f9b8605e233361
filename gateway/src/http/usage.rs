//! `GET /v1/usage`: the calling key's own usage, limits and budget, with the key itself as
//! the credential, so key holders need no ticket to see where they stand.
//!
//! The figures are the ones the operator mirrors into `ApiKey.status.usage`: the usage
//! counters every replica writes to Redis (or this process's own without Redis), for the
//! key's budget period (the month when it has no budget) and the period before. The
//! budget's spend is the settled spend admission counts against it.

use std::sync::Arc;

use axum::{Json, extract::State};
use serde_json::{Value, json};
use tollgate_api::v1alpha1::BudgetPeriod;

use super::{AppState, auth::calling_key};
use crate::{
    error::ApiError,
    usage::{UsageTotals, previous_period},
};

/// One period's bounds: its id and, except for `total`, its start and end (RFC 3339).
struct Period {
    id: String,
    start: Option<jiff::Timestamp>,
    end: Option<jiff::Timestamp>,
}

fn midnight(date: jiff::civil::Date) -> Option<jiff::Timestamp> {
    date.to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

/// The period of kind `kind` containing `now`, and the one before it.
fn periods(kind: BudgetPeriod, now: jiff::Timestamp) -> (Period, Option<Period>) {
    let today = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    let (start, end, previous_start) = match kind {
        BudgetPeriod::Daily => (today, today.tomorrow().ok(), today.yesterday().ok()),
        BudgetPeriod::Monthly => {
            let first = today.first_of_month();
            let month = jiff::Span::new().months(1);
            (
                first,
                first.checked_add(month).ok(),
                first.checked_sub(month).ok(),
            )
        }
        BudgetPeriod::Total => {
            return (
                Period {
                    id: tollgate_api::usage::TOTAL.to_owned(),
                    start: None,
                    end: None,
                },
                None,
            );
        }
    };
    let id = tollgate_api::usage::budget_period_id(kind, now);
    let previous = Period {
        id: previous_period(&id),
        start: previous_start.and_then(midnight),
        end: midnight(start),
    };
    let current = Period {
        id,
        start: midnight(start),
        end: end.and_then(midnight),
    };
    (current, Some(previous))
}

fn period_name(kind: BudgetPeriod) -> &'static str {
    match kind {
        BudgetPeriod::Daily => "daily",
        BudgetPeriod::Monthly => "monthly",
        BudgetPeriod::Total => "total",
    }
}

fn period_json(period: &Period, usage: &UsageTotals) -> Value {
    json!({
        "id": period.id,
        "start": period.start.map(|t| t.to_string()),
        "end": period.end.map(|t| t.to_string()),
        "requests": usage.requests,
        "input_tokens": usage.input,
        "output_tokens": usage.output,
        "total_tokens": usage.input.saturating_add(usage.output),
        // Parts of `input_tokens`, each priced at its own rate.
        "cached_input_tokens": usage.cached_input,
        "cache_write_tokens": usage.cache_write,
        "spend": usage.spend,
    })
}

pub async fn usage(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
) -> Result<Json<Value>, ApiError> {
    let (_, key) = calling_key(&state, request)?;
    let entry = &key.entry;
    let kind = entry
        .budget
        .as_ref()
        .map_or(BudgetPeriod::Monthly, |b| b.period);
    let (current, previous) = periods(kind, jiff::Timestamp::now());
    let mut ids = vec![current.id.clone()];
    ids.extend(previous.as_ref().map(|p| p.id.clone()));
    let unavailable = |e: crate::redis::StoreError| {
        tracing::warn!(error = %e, "usage could not be read from Redis");
        ApiError::UsageUnavailable
    };
    let counters = state
        .usage
        .read(&entry.id, &ids)
        .await
        .map_err(unavailable)?;
    let budget = match &entry.budget {
        None => Value::Null,
        Some(b) => {
            let spent = state
                .limits
                .budget_spent(&entry.id, b.period)
                .await
                .map_err(unavailable)?;
            json!({
                "amount": b.amount,
                "currency": b.currency,
                "period": period_name(b.period),
                "spent": spent,
                "remaining": (b.amount - spent).max(0.0),
                "resets_at": current.end.map(|t| t.to_string()),
            })
        }
    };
    let limits = entry.limits.as_ref().map_or(Value::Null, |l| {
        json!({
            "requests_per_minute": l.requests_per_minute,
            "tokens_per_minute": l.tokens_per_minute,
            "max_concurrent": l.max_concurrent,
        })
    });
    Ok(Json(json!({
        "object": "usage",
        "key": {
            "id": entry.id,
            "api_key": entry.api_key,
            "owner": entry.owner,
            "team": entry.team,
        },
        "period": period_name(kind),
        "current": period_json(&current, &counters[0]),
        "previous": previous
            .as_ref()
            .map_or(Value::Null, |p| period_json(p, &counters[1])),
        "limits": limits,
        "budget": budget,
        "source": if state.usage.is_shared() { "redis" } else { "gateway" },
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn periods_and_the_ones_before_them() {
        let (current, previous) = periods(BudgetPeriod::Monthly, at("2026-01-15T10:00:00Z"));
        let previous = previous.unwrap();
        assert_eq!(current.id, "2026-01");
        assert_eq!(current.start, Some(at("2026-01-01T00:00:00Z")));
        assert_eq!(current.end, Some(at("2026-02-01T00:00:00Z")));
        assert_eq!(previous.id, "2025-12");
        assert_eq!(previous.start, Some(at("2025-12-01T00:00:00Z")));
        assert_eq!(previous.end, current.start);

        let (current, previous) = periods(BudgetPeriod::Daily, at("2026-03-01T00:30:00Z"));
        let previous = previous.unwrap();
        assert_eq!(current.id, "2026-03-01");
        assert_eq!(current.end, Some(at("2026-03-02T00:00:00Z")));
        assert_eq!(previous.id, "2026-02-28");
        assert_eq!(previous.start, Some(at("2026-02-28T00:00:00Z")));

        let (current, previous) = periods(BudgetPeriod::Total, at("2026-03-01T00:30:00Z"));
        assert_eq!(current.id, "total");
        assert!(current.start.is_none() && previous.is_none());
    }
}
