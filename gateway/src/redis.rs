//! The gateway's one owner of Redis: the connections the settings name, every call
//! bounded by the timeout and timed in `tollgate_redis_call_duration_seconds`, and whether
//! Redis answered last time (for `/readyz`, metrics and the failure mode).
//!
//! Users hold a [`Redis`] (cheap to clone) and never a bare connection: the limits
//! (`limits::redis`), usage counters ([`crate::usage`]), the shared cache
//! ([`crate::cache`]); revocations, heartbeats and routing statistics borrow its
//! connection for their own background loops.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tollgate_api::redis_conn::{OptionsError, RedisCallError, RedisOptions, SharedConn, bounded};

use crate::metrics::RedisLatency;

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The call did not finish within the timeout.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error or the connection failed.
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A Redis (one server or a cluster) and how calls to it are bounded and measured.
#[derive(Clone)]
pub struct Redis {
    conn: SharedConn,
    timeout: Duration,
    latency: Option<RedisLatency>,
    /// Whether the last call answered, and what the limits do when it did not; shared by
    /// every clone.
    health: Arc<Health>,
}

#[derive(Debug)]
struct Health {
    up: AtomicBool,
    failure_mode: std::sync::OnceLock<&'static str>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("conn", &self.conn)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Redis {
    /// Over an existing connection; every call is bounded by `timeout`.
    pub fn with(conn: SharedConn, timeout: Duration) -> Self {
        Self {
            conn,
            timeout,
            latency: None,
            health: Arc::new(Health {
                up: AtomicBool::new(true),
                failure_mode: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Connects on first use and reconnects on its own: the gateway starts while Redis is
    /// down. Fails only for invalid options.
    pub fn lazy(options: &RedisOptions) -> Result<Self, OptionsError> {
        Ok(Self::with(options.connect_lazy()?, options.timeout))
    }

    /// Connects and checks that Redis answers.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let redis = Self::lazy(&RedisOptions::new(url, timeout)).map_err(|e| match e {
            OptionsError::Redis(e) => StoreError::Redis(e),
            other => StoreError::Redis(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "invalid Redis options",
                other.to_string(),
            ))),
        })?;
        let mut conn = redis.conn();
        let _: String = redis
            .call("ping", redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(redis)
    }

    /// Records every call's latency in `latency`.
    pub fn with_metrics(mut self, latency: RedisLatency) -> Self {
        self.latency = Some(latency);
        self
    }

    /// The connection, for loops that manage their own calls (revocations, heartbeats,
    /// routing statistics) and for scripts.
    pub fn conn(&self) -> SharedConn {
        self.conn.clone()
    }

    /// Whether this is a Redis Cluster (scripts must then keep to one slot).
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// The bound of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the last call answered.
    pub fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Relaxed)
    }

    /// Names the limits' failure mode in the transition logs.
    pub fn set_failure_mode(&self, mode: &'static str) {
        let _ = self.health.failure_mode.set(mode);
    }

    /// Records whether Redis answered, logging each transition once (never once per
    /// request).
    pub fn mark(&self, up: bool) {
        let was = self.health.up.swap(up, Ordering::Relaxed);
        let mode = self
            .health
            .failure_mode
            .get()
            .copied()
            .unwrap_or("failOpen");
        match (was, up) {
            (true, false) => {
                tracing::error!(
                    mode,
                    "Redis unreachable: limits now follow the failure mode"
                )
            }
            (false, true) => {
                tracing::info!("Redis reachable again: limits are shared across replicas")
            }
            _ => {}
        }
    }

    /// Runs `call` (named `operation` in metrics) within the timeout; a client-side
    /// timeout is reported as such, whoever noticed it first.
    pub async fn call<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = bounded(operation, self.timeout, async {
            call.await.map_err(RedisCallError::from)
        })
        .await;
        if let Some(latency) = &self.latency {
            latency
                .get_or_create(&crate::metrics::RedisLabels {
                    operation,
                    result: if result.is_ok() { "ok" } else { "error" },
                })
                .observe(started.elapsed().as_secs_f64());
        }
        result.map_err(|e| match e {
            RedisCallError::Redis(e) if !e.is_timeout() => StoreError::Redis(e),
            _ => StoreError::Timeout(self.timeout),
        })
    }
}

/// The Redis connections the settings name: the state store (limits, budgets, usage,
/// revocations, heartbeats, routing statistics) and the response cache's (its own Redis
/// when `--redis-cache-url` names one, so cache pressure never evicts limits, budgets or
/// usage).
#[derive(Debug)]
pub struct Connections {
    /// The options of the state store (pub/sub clients are made from them).
    pub options: RedisOptions,
    /// The state store.
    pub state: Redis,
    /// The cache's Redis (the state store unless `--redis-cache-url` is set).
    pub cache: Redis,
}

impl Connections {
    /// Connects lazily (the gateway starts while Redis is down): the state store with
    /// `options`, the cache with the same options at `cache_url` when one is given.
    pub fn connect(
        options: RedisOptions,
        cache_url: Option<&str>,
        latency: &RedisLatency,
    ) -> anyhow::Result<Self> {
        let open = |options: &RedisOptions, flag: &str| -> anyhow::Result<Redis> {
            Ok(Redis::lazy(options)
                .map_err(|e| anyhow::anyhow!("{flag}: {e}"))?
                .with_metrics(latency.clone()))
        };
        let state = open(&options, "--redis-url")?;
        let cache = match cache_url {
            Some(url) => {
                let cache_options = RedisOptions {
                    urls: RedisOptions::new(url, options.timeout).urls,
                    ..options.clone()
                };
                open(&cache_options, "--redis-cache-url")?
            }
            None => state.clone(),
        };
        Ok(Self {
            options,
            state,
            cache,
        })
    }
}
