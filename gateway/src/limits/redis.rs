//! Limits and budgets shared by every replica through Redis: one script call checks and
//! reserves every applicable limit (all or nothing, on Redis server time), another settles.
//! Not yet selected by the gateway (`--redis-url` lands with the rest of issue #4).
//!
//! Key names carry a layout version (`tollgate:v1:`) so replicas running a different
//! script version never share state, and hash tags per key and per route
//! (`{k:…}`, `{r:…}`). Until the Redis Cluster mode lands, a request limited at both key
//! and route level touches two tags in one script, which a single Redis accepts.

use std::time::Duration;

use redis::{Script, aio::ConnectionManager};

use super::{Ask, Limit, Quota, Rejection, budget_slot};

/// Version of the key layout and scripts.
pub const LAYOUT: &str = "v1";

/// How long a concurrency or budget reservation survives a replica that never settles it.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);

/// A Redis failure (unreachable, timed out, or an error reply).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The call did not finish within the timeout.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error or the connection failed.
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

/// An admitted request's hold on the shared limits.
#[derive(Debug, Clone)]
pub struct SharedReservation {
    id: String,
    keys: Vec<String>,
    tokens: u64,
    /// Per scope: (tokens limited, concurrency limited).
    scopes: Vec<(bool, bool)>,
    budget: bool,
    budget_ttl: u64,
}

/// The shared store.
#[derive(Clone)]
pub struct RedisLimits {
    conn: ConnectionManager,
    admit: Script,
    settle: Script,
    timeout: Duration,
    lease: Duration,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits")
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .finish()
    }
}

impl RedisLimits {
    /// A store that connects on first use and reconnects on its own: the gateway starts
    /// even while Redis is down. Fails only for an invalid URL.
    pub fn lazy(url: &str, timeout: Duration, lease: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self::with(conn, timeout, lease))
    }

    fn with(conn: ConnectionManager, timeout: Duration, lease: Duration) -> Self {
        Self {
            conn,
            admit: Script::new(include_str!("admit.lua")),
            settle: Script::new(include_str!("settle.lua")),
            timeout,
            lease,
        }
    }

    /// Connects (the connection manager reconnects on its own afterwards). Every call is
    /// bounded by `timeout`.
    pub async fn connect(
        url: &str,
        timeout: Duration,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let conn =
            tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
                .await
                .map_err(|_| StoreError::Timeout(timeout))??;
        Ok(Self::with(conn, timeout, lease))
    }

    /// A client-side timeout is reported as such, whoever noticed it first.
    fn classify(&self, e: redis::RedisError) -> StoreError {
        if e.is_timeout() {
            StoreError::Timeout(self.timeout)
        } else {
            StoreError::Redis(e)
        }
    }

    fn scope_keys(tag: &str) -> [String; 3] {
        [
            format!("tollgate:{LAYOUT}:{{{tag}}}:rpm"),
            format!("tollgate:{LAYOUT}:{{{tag}}}:tpm"),
            format!("tollgate:{LAYOUT}:{{{tag}}}:conc"),
        ]
    }

    /// Checks and reserves every limit of `ask` in one script call.
    pub async fn admit(
        &self,
        ask: &Ask<'_>,
        reservation_id: &str,
    ) -> Result<Result<(SharedReservation, Quota), Rejection>, StoreError> {
        let mut scopes = Vec::new();
        if let Some(l) = ask.key_limits {
            scopes.push(("key", format!("k:{}", ask.key_id), l));
        }
        if let Some(l) = ask.route_limits {
            scopes.push(("route", format!("r:{}", ask.route_id), l));
        }
        let mut keys = Vec::new();
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .arg(reservation_id)
            .arg(ask.tokens)
            .arg(ask.cost)
            .arg(self.lease.as_millis() as u64)
            .arg(scopes.len());
        for (_, tag, limits) in &scopes {
            keys.extend(Self::scope_keys(tag));
            invocation
                .arg(limits.requests_per_minute.unwrap_or(0))
                .arg(limits.tokens_per_minute.unwrap_or(0))
                .arg(limits.max_concurrent.unwrap_or(0));
        }
        let now = jiff::Timestamp::now();
        let (budget_amount, budget_ttl, until) = match ask.budget {
            Some(b) => {
                let (base, until) = budget_base(ask.key_id, b.period, now);
                keys.extend([
                    format!("{base}:spent"),
                    format!("{base}:resv"),
                    format!("{base}:amounts"),
                ]);
                // Keep a period's spend a little beyond its end; "total" for a year past
                // the last use.
                let ttl = until.map_or(366 * 24 * 3600, |d| d.as_secs() + 7 * 24 * 3600);
                (b.amount, ttl, until)
            }
            None => {
                let base = format!("tollgate:{LAYOUT}:{{k:{}}}:nobudget", ask.key_id);
                keys.extend([
                    format!("{base}:spent"),
                    format!("{base}:resv"),
                    format!("{base}:amounts"),
                ]);
                (-1.0, 0, None)
            }
        };
        invocation.arg(budget_amount).arg(budget_ttl);
        for k in &keys {
            invocation.key(k);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<redis::Value> =
            tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))?
                .map_err(|e| self.classify(e))?;
        let int = |v: Option<&redis::Value>| -> i64 {
            match v {
                Some(redis::Value::Int(i)) => *i,
                Some(redis::Value::BulkString(b)) => {
                    String::from_utf8_lossy(b).parse().unwrap_or(0)
                }
                _ => 0,
            }
        };
        let text = |v: Option<&redis::Value>| -> String {
            match v {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(redis::Value::SimpleString(s)) => s.clone(),
                Some(redis::Value::Int(i)) => i.to_string(),
                _ => String::new(),
            }
        };
        if int(reply.first()) == 0 {
            let limit = match text(reply.get(1)).as_str() {
                "requests" => Limit::Requests,
                "tokens" => Limit::Tokens,
                "concurrency" => Limit::Concurrency,
                _ => Limit::Budget,
            };
            let scope = scopes
                .get(int(reply.get(2)) as usize)
                .map_or("key", |s| s.0);
            let retry_ms = int(reply.get(3));
            let retry_after = if limit == Limit::Budget {
                until
            } else {
                Some(Duration::from_millis(retry_ms.max(1) as u64))
            };
            return Ok(Err(Rejection {
                limit,
                scope,
                retry_after,
            }));
        }
        let mut quota = Quota::default();
        for (i, (scope, _, limits)) in scopes.iter().enumerate() {
            let level = |offset: usize| {
                text(reply.get(1 + 2 * i + offset))
                    .parse::<f64>()
                    .unwrap_or(-1.0)
            };
            let key_scope = *scope == "key";
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
                quota.tokens = Some((tpm, l.max(0.0) as u64, refill(tpm as f64 - l, tpm as f64)));
            }
        }
        let reservation = SharedReservation {
            id: reservation_id.to_owned(),
            keys,
            tokens: ask.tokens,
            scopes: scopes
                .iter()
                .map(|(_, _, l)| (l.tokens_per_minute.is_some(), l.max_concurrent.is_some()))
                .collect(),
            budget: ask.budget.is_some(),
            budget_ttl,
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
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .arg(&r.id)
            .arg(r.tokens)
            .arg(actual_tokens)
            .arg(actual_cost)
            .arg(r.scopes.len());
        for (tokens, concurrency) in &r.scopes {
            invocation
                .arg(u8::from(*tokens))
                .arg(u8::from(*concurrency));
        }
        invocation.arg(u8::from(r.budget)).arg(r.budget_ttl);
        for k in &r.keys {
            invocation.key(k);
        }
        let mut conn = self.conn.clone();
        let _: i64 = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// Adds one answered request to the key's daily and monthly usage counters, in one
    /// pipelined round trip.
    pub async fn record_usage(
        &self,
        key_id: &str,
        input: u64,
        output: u64,
        spend: f64,
    ) -> Result<(), StoreError> {
        use tollgate_api::usage;
        let (day, month) = usage::periods(jiff::Timestamp::now());
        let mut pipe = redis::pipe();
        for (period, ttl) in [
            (day, usage::DAILY_TTL_SECS),
            (month, usage::MONTHLY_TTL_SECS),
        ] {
            let key = usage::usage_key(key_id, &period);
            pipe.hincr(&key, usage::REQUESTS, 1u64)
                .ignore()
                .hincr(&key, usage::INPUT_TOKENS, input)
                .ignore()
                .hincr(&key, usage::OUTPUT_TOKENS, output)
                .ignore()
                .cmd("HINCRBYFLOAT")
                .arg(&key)
                .arg(usage::SPEND)
                .arg(spend)
                .ignore()
                .expire(&key, ttl)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let _: () = tokio::time::timeout(self.timeout, pipe.query_async(&mut conn))
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// A shared cache entry: its content type and body.
    pub async fn cache_get(&self, id: &str) -> Result<Option<(String, bytes::Bytes)>, StoreError> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = tokio::time::timeout(
            self.timeout,
            redis::cmd("GET").arg(cache_key(id)).query_async(&mut conn),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.timeout))?
        .map_err(|e| self.classify(e))?;
        Ok(value.and_then(|v| {
            // Stored as `<content type>\n<body>`.
            let split = v.iter().position(|b| *b == b'\n')?;
            let content_type = String::from_utf8(v[..split].to_vec()).ok()?;
            Some((content_type, bytes::Bytes::copy_from_slice(&v[split + 1..])))
        }))
    }

    /// Stores a shared cache entry for `ttl`.
    pub async fn cache_put(
        &self,
        id: &str,
        content_type: &str,
        body: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut value = Vec::with_capacity(content_type.len() + 1 + body.len());
        value.extend_from_slice(content_type.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(body);
        let mut conn = self.conn.clone();
        let _: () = tokio::time::timeout(
            self.timeout,
            redis::cmd("SET")
                .arg(cache_key(id))
                .arg(value)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.timeout))?
        .map_err(|e| self.classify(e))?;
        Ok(())
    }

    /// Settled spend of a key in its current budget period.
    pub async fn spent(
        &self,
        key_id: &str,
        period: tollgate_api::v1alpha1::BudgetPeriod,
    ) -> Result<f64, StoreError> {
        let mut conn = self.conn.clone();
        let (base, _) = budget_base(key_id, period, jiff::Timestamp::now());
        let value: Option<f64> = tokio::time::timeout(
            self.timeout,
            redis::cmd("GET")
                .arg(format!("{base}:spent"))
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.timeout))?
        .map_err(|e| self.classify(e))?;
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
    let period_id = slot.rsplit(':').next().unwrap_or("total").to_owned();
    (
        format!("tollgate:{LAYOUT}:{{k:{key_id}}}:budget:{period_id}"),
        until,
    )
}

fn cache_key(id: &str) -> String {
    format!("tollgate:{LAYOUT}:cache:{id}")
}

fn refill(missing: f64, capacity: f64) -> Duration {
    if missing <= 0.0 || capacity <= 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(missing * 60.0 / capacity)
    }
}
