//! Limits and budgets shared by every replica through Redis: one script call checks and
//! reserves every applicable limit (all or nothing, on Redis server time), another settles.
//!
//! Key names carry a layout version (`tollgate:v1:`) so replicas that disagree on the data
//! layout never share state; scripts are called by content hash, so replicas of different
//! versions each run their own. Keys are hash-tagged per API key (`{k:…}`, holding its
//! limits, budget and usage) and per route (`{r:…}`). On one Redis a request limited at
//! both levels is admitted by one script call over both tags. On a Redis Cluster a script
//! must keep to one slot, so the two scopes are admitted by two calls sent at once; when
//! one refuses, the other's reservation is cancelled (refunded), so limits are never
//! exceeded, at the price of a briefly held unit.

use std::time::Duration;

use redis::Script;

use super::{Ask, CompiledLimits, Limit, Quota, Rejection, Scope, budget_slot};
use crate::redis::Redis;
pub use crate::redis::StoreError;

/// Version of the key layout and scripts.
pub const LAYOUT: &str = "v1";

/// How long a concurrency or budget reservation survives a replica that never settles it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);

/// How long a replica keeps trying to cancel a reservation whose admission it stopped
/// waiting for.
const CANCEL_FOR: Duration = Duration::from_secs(120);

/// Most cancellations waiting for Redis at once.
const MAX_PENDING_CANCELS: usize = 4096;

/// A Redis failure (unreachable, timed out, or an error reply).
/// What one script call reserved: keys in a single hash slot.
#[derive(Debug, Clone, Default)]
struct Part {
    keys: Vec<String>,
    /// Per scope: (requests limited, tokens limited, concurrency limited).
    scopes: Vec<(bool, bool, bool)>,
    budget: bool,
    budget_ttl: u64,
}

/// An admitted request's hold on the shared limits.
#[derive(Debug, Clone)]
pub struct SharedReservation {
    id: String,
    tokens: u64,
    parts: Vec<Part>,
}

/// The scopes and budget one script call covers, before it runs.
#[derive(Default)]
struct Group<'a> {
    /// Hash tag of the call's keys.
    tag: String,
    /// (scope, limits) in call order.
    scopes: Vec<(Scope, &'a CompiledLimits)>,
    part: Part,
    /// The key's budget for the period, when the call covers one.
    budget_amount: Option<f64>,
}

enum Outcome {
    Admitted(Vec<redis::Value>),
    Refused(Rejection),
}

/// The shared store.
#[derive(Clone)]
pub struct RedisLimits {
    redis: Redis,
    admit: Script,
    settle: Script,
    lease: Duration,
    cancels: std::sync::Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits")
            .field("redis", &self.redis)
            .field("lease", &self.lease)
            .finish()
    }
}

fn int(v: Option<&redis::Value>) -> i64 {
    match v {
        Some(redis::Value::Int(i)) => *i,
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).parse().unwrap_or(0),
        _ => 0,
    }
}

fn text(v: Option<&redis::Value>) -> String {
    match v {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(redis::Value::SimpleString(s)) => s.clone(),
        Some(redis::Value::Int(i)) => i.to_string(),
        _ => String::new(),
    }
}

impl RedisLimits {
    /// Limits kept in `redis`; a reservation not settled within `lease` expires.
    pub fn new(redis: Redis, lease: Duration) -> Self {
        Self {
            redis,
            admit: Script::new(include_str!("admit.lua")),
            settle: Script::new(include_str!("settle.lua")),
            lease,
            cancels: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_CANCELS)),
        }
    }

    /// Connects to `url` (checking that Redis answers); every call is bounded by
    /// `timeout`.
    pub async fn connect(
        url: &str,
        timeout: Duration,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        Ok(Self::new(Redis::connect(url, timeout).await?, lease))
    }

    /// Its Redis.
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn scope_keys(tag: &str) -> [String; 3] {
        [
            format!("tollgate:{LAYOUT}:{{{tag}}}:rpm"),
            format!("tollgate:{LAYOUT}:{{{tag}}}:tpm"),
            format!("tollgate:{LAYOUT}:{{{tag}}}:conc"),
        ]
    }

    /// Splits `ask` into script calls: one on a single Redis; one per hash tag on a
    /// cluster (the key's scope with its budget, and the route's scope).
    fn groups<'a>(
        &self,
        ask: &Ask<'a>,
        now: jiff::Timestamp,
    ) -> (Vec<Group<'a>>, Option<Duration>) {
        let key_tag = format!("k:{}", ask.key_id);
        let route_tag = format!("r:{}", ask.route_id);
        let (mut key_group, mut route_group) = (Group::default(), Group::default());
        key_group.tag = key_tag.clone();
        route_group.tag = route_tag.clone();
        let split = self.redis.is_cluster();
        if let Some(l) = ask.key_limits {
            key_group.scopes.push((Scope::Key, l));
            key_group.part.keys.extend(Self::scope_keys(&key_tag));
        }
        if let Some(l) = ask.route_limits {
            let group = if split {
                &mut route_group
            } else {
                &mut key_group
            };
            group.scopes.push((Scope::Route, l));
            group.part.keys.extend(Self::scope_keys(&route_tag));
        }
        let mut until = None;
        let budget_keys = |base: &str| {
            [
                format!("{base}:spent"),
                format!("{base}:resv"),
                format!("{base}:amounts"),
            ]
        };
        match ask.budget {
            Some(b) => {
                let (base, end) = budget_base(ask.key_id, b.period, now);
                key_group.part.keys.extend(budget_keys(&base));
                // Keep a period's spend a little beyond its end; "total" for a year past
                // the last use.
                key_group.part.budget_ttl =
                    end.map_or(366 * 24 * 3600, |d| d.as_secs() + 7 * 24 * 3600);
                key_group.part.budget = true;
                key_group.budget_amount = Some(b.amount);
                until = end;
            }
            None => key_group.part.keys.extend(budget_keys(&format!(
                "tollgate:{LAYOUT}:{{{key_tag}}}:nobudget"
            ))),
        }
        route_group.part.keys.extend(budget_keys(&format!(
            "tollgate:{LAYOUT}:{{{route_tag}}}:nobudget"
        )));
        let mut groups = Vec::new();
        for mut g in [key_group, route_group] {
            g.part.scopes = g
                .scopes
                .iter()
                .map(|(_, l)| {
                    (
                        l.requests_per_minute.is_some(),
                        l.tokens_per_minute.is_some(),
                        l.max_concurrent.is_some(),
                    )
                })
                .collect();
            if !g.scopes.is_empty() || g.part.budget || groups.is_empty() {
                groups.push(g);
            }
        }
        // Without key limits or a budget, only the route's call is needed.
        if groups.len() == 2 && groups[0].scopes.is_empty() && !groups[0].part.budget {
            groups.remove(0);
        }
        (groups, until)
    }

    async fn admit_group(
        &self,
        ask: &Ask<'_>,
        group: &Group<'_>,
        reservation_id: &str,
        until: Option<Duration>,
    ) -> Result<Outcome, StoreError> {
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .arg(reservation_id)
            .arg(ask.tokens)
            .arg(ask.cost)
            .arg(self.lease.as_millis() as u64)
            .arg(group.scopes.len());
        for (_, limits) in &group.scopes {
            invocation
                .arg(limits.requests_per_minute.unwrap_or(0))
                .arg(limits.tokens_per_minute.unwrap_or(0))
                .arg(limits.max_concurrent.unwrap_or(0));
        }
        // admit.lua reads a negative amount as "no budget".
        invocation
            .arg(group.budget_amount.unwrap_or(-1.0))
            .arg(group.part.budget_ttl);
        for k in &group.part.keys {
            invocation.key(k);
        }
        let mut conn = self.redis.conn();
        let reply: Vec<redis::Value> = self
            .redis
            .call("admit", invocation.invoke_async(&mut conn))
            .await?;
        if int(reply.first()) != 0 {
            return Ok(Outcome::Admitted(reply));
        }
        if text(reply.get(1)) == "cancelled" {
            // Cancelled before it ran: this call is stale (it cannot happen for a call
            // still being waited for, but is handled like a timeout anyway).
            return Err(StoreError::Timeout(self.redis.timeout()));
        }
        let limit = match text(reply.get(1)).as_str() {
            "requests" => Limit::Requests,
            "tokens" => Limit::Tokens,
            "concurrency" => Limit::Concurrency,
            _ => Limit::Budget,
        };
        let scope = group
            .scopes
            .get(int(reply.get(2)) as usize)
            .map_or(Scope::Key, |s| s.0);
        let retry_ms = int(reply.get(3));
        let retry_after = if limit == Limit::Budget {
            until
        } else {
            Some(Duration::from_millis(retry_ms.max(1) as u64))
        };
        Ok(Outcome::Refused(Rejection {
            limit,
            scope,
            retry_after,
        }))
    }

    /// Checks and reserves every limit of `ask`: one script call on a single Redis, one per
    /// hash tag (sent at once) on a cluster.
    pub async fn admit(
        &self,
        ask: &Ask<'_>,
        reservation_id: &str,
    ) -> Result<Result<(SharedReservation, Quota), Rejection>, StoreError> {
        let (mut groups, until) = self.groups(ask, jiff::Timestamp::now());
        for g in &mut groups {
            g.part.keys.push(format!(
                "tollgate:{LAYOUT}:{{{}}}:resv:{reservation_id}",
                g.tag
            ));
        }
        let outcomes = if let [only] = groups.as_slice() {
            vec![self.admit_group(ask, only, reservation_id, until).await]
        } else {
            futures_util::future::join_all(
                groups
                    .iter()
                    .map(|g| self.admit_group(ask, g, reservation_id, until)),
            )
            .await
        };
        let failed = outcomes
            .iter()
            .any(|o| !matches!(o, Ok(Outcome::Admitted(_))));
        if failed {
            // Give back whatever the other calls reserved, and whatever a call that timed
            // out or failed may still reserve once it reaches Redis.
            let pending: Vec<Part> = groups
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| !matches!(o, Ok(Outcome::Refused(_))))
                .map(|(g, _)| g.part.clone())
                .collect();
            if !pending.is_empty() {
                self.cancel_later(SharedReservation {
                    id: reservation_id.to_owned(),
                    tokens: ask.tokens,
                    parts: pending,
                });
            }
            let mut refused = None;
            for o in outcomes {
                match o {
                    Err(e) => return Err(e),
                    Ok(Outcome::Refused(r)) if refused.is_none() => refused = Some(r),
                    _ => {}
                }
            }
            return Ok(Err(refused.expect("a call refused")));
        }
        let mut quota = Quota::default();
        for (group, outcome) in groups.iter().zip(&outcomes) {
            let Ok(Outcome::Admitted(reply)) = outcome else {
                continue;
            };
            for (i, (scope, limits)) in group.scopes.iter().enumerate() {
                let level = |offset: usize| {
                    text(reply.get(1 + 2 * i + offset))
                        .parse::<f64>()
                        .unwrap_or(-1.0)
                };
                let key_scope = *scope == Scope::Key;
                if let Some(rpm) = limits.requests_per_minute
                    && (key_scope || quota.requests.is_none())
                {
                    let l = level(0);
                    quota.requests = Some((
                        u64::from(rpm),
                        l.max(0.0) as u64,
                        refill(f64::from(rpm) - l, f64::from(rpm)),
                    ));
                }
                if let Some(tpm) = limits.tokens_per_minute
                    && (key_scope || quota.tokens.is_none())
                {
                    let l = level(1);
                    quota.tokens =
                        Some((tpm, l.max(0.0) as u64, refill(tpm as f64 - l, tpm as f64)));
                }
            }
        }
        let reservation = SharedReservation {
            id: reservation_id.to_owned(),
            tokens: ask.tokens,
            parts: groups.into_iter().map(|g| g.part).collect(),
        };
        Ok(Ok((reservation, quota)))
    }

    /// Settles a reservation with the actual tokens and cost.
    pub async fn settle(
        &self,
        r: &SharedReservation,
        actual_tokens: u64,
        actual_cost: f64,
    ) -> Result<(), StoreError> {
        self.release(r, actual_tokens, actual_cost, false).await
    }

    /// Cancels `r` in the background, retrying while Redis is unreachable, for up to
    /// [`CANCEL_FOR`]. A cancel that reaches Redis before its admission leaves a tombstone
    /// that makes the admission reserve nothing, so the order does not matter. At most
    /// [`MAX_PENDING_CANCELS`] wait at once; beyond that, leases expire on their own.
    fn cancel_later(&self, r: SharedReservation) {
        let Ok(permit) = self.cancels.clone().try_acquire_owned() else {
            tracing::debug!(
                "too many pending cancellations; this one's leases expire on their own"
            );
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let deadline = tokio::time::Instant::now() + CANCEL_FOR;
            let mut backoff = Duration::from_millis(50);
            loop {
                match this.release(&r, 0, 0.0, true).await {
                    Ok(()) => return,
                    Err(e) if tokio::time::Instant::now() + backoff > deadline => {
                        tracing::debug!(error = %e, "cancelling a reservation failed; its leases expire on their own");
                        return;
                    }
                    Err(_) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
    }

    /// Settles (`cancel` false) or cancels (the request unit, tokens and budget
    /// reservation all given back) every part of a reservation.
    async fn release(
        &self,
        r: &SharedReservation,
        actual_tokens: u64,
        actual_cost: f64,
        cancel: bool,
    ) -> Result<(), StoreError> {
        let calls = r.parts.iter().map(|part| {
            let mut invocation = self.settle.prepare_invoke();
            invocation
                .arg(&r.id)
                .arg(r.tokens)
                .arg(actual_tokens)
                .arg(actual_cost)
                .arg(u8::from(cancel))
                .arg(part.scopes.len());
            for (requests, tokens, concurrency) in &part.scopes {
                invocation
                    .arg(u8::from(*requests))
                    .arg(u8::from(*tokens))
                    .arg(u8::from(*concurrency));
            }
            invocation
                .arg(u8::from(part.budget))
                .arg(part.budget_ttl)
                .arg(self.lease.as_millis() as u64);
            for k in &part.keys {
                invocation.key(k);
            }
            async move {
                let mut conn = self.redis.conn();
                self.redis
                    .call("settle", invocation.invoke_async::<i64>(&mut conn))
                    .await
                    .map(|_| ())
            }
        });
        for result in futures_util::future::join_all(calls).await {
            result?;
        }
        Ok(())
    }

    /// Settled spend of a key in its current budget period.
    pub async fn spent(
        &self,
        key_id: &str,
        period: tollgate_api::v1alpha1::BudgetPeriod,
    ) -> Result<f64, StoreError> {
        let mut conn = self.redis.conn();
        let (base, _) = budget_base(key_id, period, jiff::Timestamp::now());
        let value: Option<f64> = self
            .redis
            .call(
                "budget_read",
                redis::cmd("GET")
                    .arg(format!("{base}:spent"))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(value.unwrap_or(0.0))
    }
}

/// Key prefix of a key's budget in the period containing `now`, and the time to its end.
fn budget_base(
    key_id: &str,
    period: tollgate_api::v1alpha1::BudgetPeriod,
    now: jiff::Timestamp,
) -> (String, Option<Duration>) {
    let (slot, until) = budget_slot(key_id, period, now);
    let period_id = slot.rsplit(':').next().unwrap_or("total");
    debug_assert_eq!(
        period_id,
        tollgate_api::usage::budget_period_id(period, now)
    );
    (tollgate_api::usage::budget_prefix(key_id, period_id), until)
}

fn refill(missing: f64, capacity: f64) -> Duration {
    if missing <= 0.0 || capacity <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(missing * 60.0 / capacity)
    }
}
