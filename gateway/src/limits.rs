//! Per-key and per-route limits and budgets: admission (check and reserve, all or
//! nothing) before the upstream call, settlement with the actual usage after it.
//!
//! This is the in-process store, exact for one replica; the Redis store (shared by every
//! replica) implements the same operations next. Requests and tokens per minute are token
//! buckets refilled continuously; concurrency is a counter of leases; budgets are spend
//! per period (UTC day, UTC month, or all time) counting in-flight reservations, so
//! concurrent requests cannot overspend.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tollgate_api::{
    config::{CompiledBudget, CompiledLimits},
    v1alpha1::BudgetPeriod,
};

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// Requests in flight.
    Concurrency,
    /// Spend in the budget period.
    Budget,
}

impl Limit {
    /// Stable name for errors and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Concurrency => "concurrency",
            Self::Budget => "budget",
        }
    }
}

/// Whose limits: the API key's or the route's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The API key's limits (and its budget).
    Key,
    /// The RoutePolicy's limits, shared by every key on the route.
    Route,
}

impl Scope {
    /// Stable name for errors, metrics and the in-process bucket names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Route => "route",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused admission.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The limit that refused.
    pub limit: Limit,
    /// Whose limit.
    pub scope: Scope,
    /// When a retry can succeed, if known.
    pub retry_after: Option<Duration>,
}

/// Rate-limit state reported to clients in `x-ratelimit-*` headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quota {
    /// (limit, remaining, time until full) for requests.
    pub requests: Option<(u64, u64, Duration)>,
    /// (limit, remaining, time until full) for tokens.
    pub tokens: Option<(u64, u64, Duration)>,
}

/// What one request asks of the limits.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    /// Key id.
    pub key_id: &'a str,
    /// The key's limits.
    pub key_limits: Option<&'a CompiledLimits>,
    /// The key's budget.
    pub budget: Option<&'a CompiledBudget>,
    /// Route id.
    pub route_id: &'a str,
    /// The route's limits.
    pub route_limits: Option<&'a CompiledLimits>,
    /// Estimated tokens (prompt + expected completion).
    pub tokens: u64,
    /// Estimated cost, in the budget's currency.
    pub cost: f64,
}

/// What an admitted request holds until it settles.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    key_id: String,
    route_id: String,
    tokens: u64,
    key_tpm: bool,
    route_tpm: bool,
    key_concurrency: bool,
    route_concurrency: bool,
    budget_slot: Option<String>,
    cost: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    /// The level now, for a bucket of `capacity` refilled over a minute.
    fn level(&self, capacity: f64, now: Instant) -> f64 {
        (self.level + capacity * now.saturating_duration_since(self.at).as_secs_f64() / 60.0)
            .min(capacity)
    }
}

#[derive(Debug, Default)]
struct State {
    buckets: HashMap<String, Bucket>,
    in_flight: HashMap<String, u32>,
    /// Spend per budget slot: (settled, reserved).
    spend: HashMap<String, (f64, f64)>,
}

/// Limits and budgets of this replica.
#[derive(Debug, Default)]
pub struct LocalLimits {
    state: Mutex<State>,
}

/// The budget slot of a key now: one per UTC day, UTC month, or for all time.
pub fn budget_slot(
    key_id: &str,
    period: BudgetPeriod,
    now: jiff::Timestamp,
) -> (String, Option<Duration>) {
    let date = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    let (slot, end) = match period {
        BudgetPeriod::Daily => (format!("{date}"), date.tomorrow().ok()),
        BudgetPeriod::Monthly => (
            format!("{:04}-{:02}", date.year(), date.month()),
            date.first_of_month()
                .checked_add(jiff::Span::new().months(1))
                .ok(),
        ),
        BudgetPeriod::Total => ("total".to_owned(), None),
    };
    let until = end
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| {
            let secs = z.timestamp().as_second() - now.as_second();
            Duration::from_secs(secs.max(1) as u64)
        });
    (format!("budget:{key_id}:{slot}"), until)
}

impl LocalLimits {
    /// Checks every applicable limit and reserves them all, or none.
    pub fn admit(&self, ask: &Ask<'_>) -> Result<(Reservation, Quota), Rejection> {
        self.admit_at(ask, Instant::now(), jiff::Timestamp::now())
    }

    fn admit_at(
        &self,
        ask: &Ask<'_>,
        now: Instant,
        wall: jiff::Timestamp,
    ) -> Result<(Reservation, Quota), Rejection> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let scopes = [
            (Scope::Key, ask.key_id, ask.key_limits),
            (Scope::Route, ask.route_id, ask.route_limits),
        ];

        // Check everything first.
        for (scope, id, limits) in scopes {
            let Some(limits) = limits else { continue };
            if let Some(rpm) = limits.requests_per_minute {
                let level = level_of(&state, &format!("rpm:{scope}:{id}"), f64::from(rpm), now);
                if level < 1.0 {
                    return Err(Rejection {
                        limit: Limit::Requests,
                        scope,
                        retry_after: Some(wait_for(1.0 - level, f64::from(rpm))),
                    });
                }
            }
            if let Some(tpm) = limits.tokens_per_minute {
                let capacity = tpm as f64;
                // A request larger than the whole minute's allowance waits for a full bucket.
                let need = (ask.tokens as f64).min(capacity);
                let level = level_of(&state, &format!("tpm:{scope}:{id}"), capacity, now);
                if level < need {
                    return Err(Rejection {
                        limit: Limit::Tokens,
                        scope,
                        retry_after: Some(wait_for(need - level, capacity)),
                    });
                }
            }
            if let Some(max) = limits.max_concurrent
                && state
                    .in_flight
                    .get(&format!("conc:{scope}:{id}"))
                    .copied()
                    .unwrap_or(0)
                    >= max
            {
                return Err(Rejection {
                    limit: Limit::Concurrency,
                    scope,
                    retry_after: Some(Duration::from_secs(1)),
                });
            }
        }
        let budget = ask.budget.map(|b| {
            let (slot, until) = budget_slot(ask.key_id, b.period, wall);
            (b.amount, slot, until)
        });
        if let Some((amount, slot, until)) = &budget {
            let (settled, reserved) = state.spend.get(slot).copied().unwrap_or_default();
            if settled + reserved + ask.cost > *amount {
                return Err(Rejection {
                    limit: Limit::Budget,
                    scope: Scope::Key,
                    retry_after: *until,
                });
            }
        }

        // Then reserve.
        let mut reservation = Reservation {
            key_id: ask.key_id.to_owned(),
            route_id: ask.route_id.to_owned(),
            tokens: ask.tokens,
            key_tpm: false,
            route_tpm: false,
            key_concurrency: false,
            route_concurrency: false,
            budget_slot: None,
            cost: ask.cost,
        };
        let mut quota = Quota::default();
        for (scope, id, limits) in scopes {
            let Some(limits) = limits else { continue };
            let is_key = scope == Scope::Key;
            if let Some(rpm) = limits.requests_per_minute {
                let level = take(
                    &mut state,
                    &format!("rpm:{scope}:{id}"),
                    f64::from(rpm),
                    1.0,
                    now,
                );
                if is_key || quota.requests.is_none() {
                    quota.requests = Some((
                        u64::from(rpm),
                        level.max(0.0) as u64,
                        wait_for(f64::from(rpm) - level, f64::from(rpm)),
                    ));
                }
            }
            if let Some(tpm) = limits.tokens_per_minute {
                let capacity = tpm as f64;
                let level = take(
                    &mut state,
                    &format!("tpm:{scope}:{id}"),
                    capacity,
                    ask.tokens as f64,
                    now,
                );
                if is_key {
                    reservation.key_tpm = true
                } else {
                    reservation.route_tpm = true
                }
                if is_key || quota.tokens.is_none() {
                    quota.tokens = Some((
                        tpm,
                        level.max(0.0) as u64,
                        wait_for(capacity - level, capacity),
                    ));
                }
            }
            if limits.max_concurrent.is_some() {
                *state
                    .in_flight
                    .entry(format!("conc:{scope}:{id}"))
                    .or_default() += 1;
                if is_key {
                    reservation.key_concurrency = true
                } else {
                    reservation.route_concurrency = true
                }
            }
        }
        if let Some((_, slot, _)) = budget {
            state.spend.entry(slot.clone()).or_default().1 += ask.cost;
            reservation.budget_slot = Some(slot);
        }
        Ok((reservation, quota))
    }

    /// Settles a reservation with the actual tokens and cost: refunds (or charges) the
    /// difference and releases concurrency.
    pub fn settle(&self, reservation: &Reservation, actual_tokens: u64, actual_cost: f64) {
        self.settle_at(reservation, actual_tokens, actual_cost);
    }

    fn settle_at(&self, r: &Reservation, actual_tokens: u64, actual_cost: f64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let refund = r.tokens as f64 - actual_tokens as f64;
        for (flag, scope, id) in [
            (r.key_tpm, Scope::Key, &r.key_id),
            (r.route_tpm, Scope::Route, &r.route_id),
        ] {
            if flag && let Some(b) = state.buckets.get_mut(&format!("tpm:{scope}:{id}")) {
                // Refunds cannot push the bucket over its capacity (unknown here, so the
                // refill clamp applies at the next read); overuse is charged as debt.
                b.level += refund;
            }
        }
        for (flag, scope, id) in [
            (r.key_concurrency, Scope::Key, &r.key_id),
            (r.route_concurrency, Scope::Route, &r.route_id),
        ] {
            if flag && let Some(n) = state.in_flight.get_mut(&format!("conc:{scope}:{id}")) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(slot) = &r.budget_slot {
            let entry = state.spend.entry(slot.clone()).or_default();
            entry.1 = (entry.1 - r.cost).max(0.0);
            entry.0 += actual_cost;
        }
    }

    /// Settled spend in a budget slot (for tests and `/v1/usage` later).
    pub fn spent(&self, slot: &str) -> f64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spend
            .get(slot)
            .map_or(0.0, |s| s.0)
    }
}

fn level_of(state: &State, id: &str, capacity: f64, now: Instant) -> f64 {
    state
        .buckets
        .get(id)
        .map_or(capacity, |b| b.level(capacity, now))
}

/// Takes `amount` from a bucket and returns the level left.
fn take(state: &mut State, id: &str, capacity: f64, amount: f64, now: Instant) -> f64 {
    let level = level_of(state, id, capacity, now) - amount;
    state
        .buckets
        .insert(id.to_owned(), Bucket { level, at: now });
    level
}

/// Time for a bucket of `capacity` per minute to refill `missing`.
fn wait_for(missing: f64, capacity: f64) -> Duration {
    if missing <= 0.0 || capacity <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(missing * 60.0 / capacity)
}

/// OpenAI's reset duration format: `1s`, `6m0s`, `12ms`.
pub fn reset_string(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        return format!("{}s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    let total = d.as_secs();
    if total < 3600 {
        format!("{}m{}s", total / 60, total % 60)
    } else {
        format!("{}h{}m{}s", total / 3600, total % 3600 / 60, total % 60)
    }
}

pub mod redis;
pub mod store;

#[cfg(test)]
mod tests;
