//! Running the gateway: load configuration, serve, reload in the background, and shut down
//! gracefully on SIGTERM/SIGINT.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::{
    config_source::{self, ConfigState, Source},
    http::{AppState, HttpOptions, admin_app, app},
    limits::{self, redis::RedisLimits, store::Limits},
    metrics::Metrics,
    redis::Connections,
    revocation::{self, Revocations},
    settings::Settings,
    usage::Usage,
};

/// Runs until a shutdown signal has been handled: checks the settings, connects the
/// shared state, loads the configuration, starts the background tasks, and serves.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let addressing = check(&settings)?;
    // Before any configuration is compiled or any upstream client built.
    crate::egress::set_policy(settings.allow_link_local_upstreams);
    let source = match &settings.resources {
        Some(path) => Source::Resources(path.clone()),
        None => Source::ConfigDirs(settings.config_dirs.clone()),
    };
    let config = Arc::new(ConfigState::default());
    let metrics = Arc::new(Metrics::new(config.reloads.clone()));
    let redis = settings
        .redis_options()
        .map(|o| {
            Connections::connect(
                o,
                settings.redis_cache_url.as_deref(),
                &metrics.redis_latency,
            )
        })
        .transpose()?;
    let revocations = Arc::new(Revocations::default());
    if let Some(redis) = &redis {
        start_sharing(redis, &settings, &config, &revocations)?;
    }
    let heartbeat_conn = redis.as_ref().map(|r| r.state.conn());
    let shared_cache = redis
        .as_ref()
        .map(|r| r.cache.clone())
        .filter(|_| settings.cache_max_bytes > 0);
    let stored =
        crate::stored_responses::StoredResponses::new(redis.as_ref().map(|r| r.state.clone()));
    let (limits, usage) = match redis {
        Some(redis) => {
            tracing::info!(mode = ?settings.redis_failure_mode, "limits, budgets and the cache shared through Redis");
            (
                Limits::shared(
                    RedisLimits::new(redis.state.clone(), limits::redis::DEFAULT_LEASE),
                    settings.redis_failure_mode,
                ),
                Usage::shared(redis.state),
            )
        }
        None => (Limits::local(), Usage::local()),
    };
    load_configuration(source, &config, heartbeat_conn, settings.reload_interval).await?;

    let state = Arc::new(AppState {
        config,
        max_body_bytes: settings.max_body_bytes,
        max_upload_bytes: settings.max_upload_bytes,
        memory: crate::memory::Budget::new(settings.max_inflight_bytes),
        max_response_bytes: settings.max_response_bytes,
        body_read_timeout: settings.body_read_timeout,
        draining: Default::default(),
        metrics,
        limits: Arc::new(limits),
        usage: Arc::new(usage),
        stored: Arc::new(stored),
        revocations,
        cache: Arc::new(crate::cache::Cache::new(
            settings.cache_max_bytes,
            shared_cache,
        )),
        cache_enabled: settings.cache_max_bytes > 0,
        auth_throttle: crate::http::AuthThrottle::new(settings.auth_failures_per_minute),
    });
    // Raised shortly before the shutdown deadline: streams still open then end with an
    // error event instead of being cut when the process exits.
    let (end_streams, streams_end) = tokio::sync::watch::channel(false);
    let router = app(
        state.clone(),
        &HttpOptions {
            cors_origins: settings.cors_origins.clone(),
            end_streams: Some(streams_end),
        },
    );
    let listener = listen(&settings, &state).await?;
    crate::listener::serve(
        listener,
        router,
        crate::listener::Options {
            header_timeout: settings.header_read_timeout,
            client_address_header: addressing.header,
            trusted_proxies: std::sync::Arc::new(addressing.trusted_proxies),
        },
        shutdown(&settings, state.clone(), end_streams),
    )
    .await;
    // Usage is written to Redis in batches: write the last one before exiting.
    state.usage.flush(Duration::from_secs(2)).await;
    tracing::info!("stopped");
    Ok(())
}

/// Where client addresses come from (settings checked at start).
struct Addressing {
    trusted_proxies: crate::client_addr::TrustedProxies,
    header: http::HeaderName,
}

/// Settings that cannot work together, refused before anything starts.
fn check(settings: &Settings) -> anyhow::Result<Addressing> {
    if settings.max_inflight_bytes != 0 && settings.max_inflight_bytes < settings.max_body_bytes {
        anyhow::bail!(
            "--max-inflight-bytes ({}) is smaller than --max-body-bytes ({}): no body of the largest accepted size could ever be read",
            settings.max_inflight_bytes,
            settings.max_body_bytes
        );
    }
    let trusted_proxies = crate::client_addr::TrustedProxies::parse(&settings.trusted_proxies)
        .map_err(|e| anyhow::anyhow!("--trusted-proxies: {e}"))?;
    // A header believed from any peer would let every client pick its own address.
    if settings.client_address_header.is_some() && trusted_proxies.is_empty() {
        anyhow::bail!(
            "--client-address-header needs --trusted-proxies (the proxies' addresses or CIDRs): without them any client could name its own address"
        );
    }
    let name = settings
        .client_address_header
        .as_deref()
        .unwrap_or("x-forwarded-for");
    let header = http::HeaderName::try_from(name.trim())
        .with_context(|| format!("--client-address-header {name:?} is not a header name"))?;
    Ok(Addressing {
        trusted_proxies,
        header,
    })
}

/// With Redis: follows revocations (and publishes those of keys a reload removes),
/// and shares routing statistics across replicas once a second, off the hot path.
fn start_sharing(
    redis: &Connections,
    settings: &Settings,
    config: &Arc<ConfigState>,
    revocations: &Arc<Revocations>,
) -> anyhow::Result<()> {
    let store = &redis.state;
    let clients = redis
        .options
        .pubsub_clients()
        .map_err(|e| anyhow::anyhow!("--redis-url: {e}"))?;
    tokio::spawn(revocation::follow(
        clients,
        store.conn(),
        revocations.clone(),
    ));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<[u8; 32]>>();
    let _ = config.removed_keys.set(tx);
    let timeout = settings.redis_timeout.max(Duration::from_secs(1));
    let conn = store.conn();
    tokio::spawn(async move {
        while let Some(hashes) = rx.recv().await {
            match revocation::publish(conn.clone(), &hashes, timeout).await {
                Ok(()) => tracing::info!(
                    keys = hashes.len(),
                    "published the revocation of keys removed from the configuration"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "could not publish key revocations; other replicas catch up through their own configuration")
                }
            }
        }
    });
    tokio::spawn(crate::target_stats::share(
        config.health.stats.clone(),
        store.conn(),
        crate::heartbeat::instance_id(),
        settings.redis_timeout.max(Duration::from_millis(500)),
    ));
    Ok(())
}

/// Loads the first configuration (fatal only standalone), starts reporting it to Redis,
/// and keeps reloading it in the background.
async fn load_configuration(
    source: Source,
    config: &Arc<ConfigState>,
    heartbeat: Option<tollgate_api::redis_conn::SharedConn>,
    reload_interval: Duration,
) -> anyhow::Result<()> {
    let fingerprint = config_source::load_initial(&source, config).await;
    if let Some(conn) = heartbeat {
        // After the first load, so the first report already names a configuration.
        let instance = crate::heartbeat::instance_id();
        tracing::info!(instance = %instance, "reporting the served configuration to Redis");
        tokio::spawn(crate::heartbeat::run(conn, config.clone(), instance));
    }
    if config.current.load().is_none() {
        match &source {
            // Standalone: the manifests are right here; failing to load them is fatal.
            Source::Resources(path) => anyhow::bail!(
                "could not load {}: {}",
                path.display(),
                config.last_error().unwrap_or_default()
            ),
            // In a pod the operator may not have written the files yet: serve probes as
            // not ready and keep looking.
            Source::ConfigDirs(_) => {
                tracing::warn!("no configuration yet; /readyz reports notReady until one loads")
            }
        }
    }
    tokio::spawn(config_source::watch(
        source,
        config.clone(),
        reload_interval,
        fingerprint,
    ));
    Ok(())
}

/// Binds the client listener and starts the admin listener.
async fn listen(settings: &Settings, state: &Arc<AppState>) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let admin = TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", settings.admin_listen))?;
    let admin_addr = admin.local_addr()?;
    let admin_router = admin_app(state.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(admin, admin_router).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    tracing::info!(%admin_addr, "admin listening");
    tracing::info!(%addr, "listening");
    Ok(listener)
}

/// Completes on SIGTERM/SIGINT once readiness has failed for `--drain-delay`; then bounds
/// the drain by `--shutdown-timeout`: streams still open just before the deadline end
/// with an error event (their limits and usage settle, the connections close cleanly, and
/// the last usage is written); at the deadline the process exits whatever is left.
fn shutdown(
    settings: &Settings,
    state: Arc<AppState>,
    end_streams: tokio::sync::watch::Sender<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let drain_delay = settings.drain_delay;
    let shutdown_timeout = settings.shutdown_timeout;
    async move {
        shutdown_signal().await;
        state.draining.store(true, Ordering::Relaxed);
        tracing::info!(
            ?drain_delay,
            "shutdown requested: readiness now fails; draining"
        );
        tokio::time::sleep(drain_delay).await;
        tracing::info!(
            ?shutdown_timeout,
            "closing the listener; waiting for in-flight requests"
        );
        tokio::spawn(async move {
            let grace = stream_end_grace(shutdown_timeout);
            tokio::time::sleep(shutdown_timeout - grace).await;
            if end_streams.send(true).is_ok() {
                tracing::warn!(
                    ?grace,
                    "in-flight requests did not finish in time; ending open streams with an error event"
                );
            }
            tokio::time::sleep(grace).await;
            tracing::warn!("in-flight requests did not finish in time; exiting");
            std::process::exit(0);
        });
    }
}

/// How long before the shutdown deadline open streams are ended: time for their
/// connections to close and the last usage to be written.
fn stream_end_grace(shutdown_timeout: Duration) -> Duration {
    (shutdown_timeout / 4).min(Duration::from_secs(1))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_streams_end_a_quarter_of_the_timeout_before_the_deadline_at_most_a_second() {
        assert_eq!(
            stream_end_grace(Duration::from_secs(20)),
            Duration::from_secs(1)
        );
        assert_eq!(
            stream_end_grace(Duration::from_secs(2)),
            Duration::from_millis(500)
        );
    }
}
