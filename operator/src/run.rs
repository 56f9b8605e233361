//! `tollgate-operator run`: wires the controller, leader election, the usage refresher and
//! the admin listener together, and shuts them down cleanly on SIGTERM.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use kube::{Api, Client, runtime::events::Recorder};
use tokio::sync::{Notify, watch};

use crate::{
    controller::{self, LoopTiming, Reconciler, Watches},
    desired::Naming,
    leader::{Elector, Fence, Timing},
    metrics::Metrics,
    settings::{RunSettings, own_namespace},
};

#[derive(Clone)]
struct Admin {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(admin): State<Admin>) -> (StatusCode, &'static str) {
    if admin.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}

async fn metrics_text(
    State(admin): State<Admin>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics.encode(),
    )
}

async fn client(settings: &RunSettings, identity: &str) -> anyhow::Result<Client> {
    let mut config = match &settings.kube_url {
        Some(url) => {
            let uri = url.parse().with_context(|| format!("--kube-url {url}"))?;
            let mut config = kube::Config::new(uri);
            config.default_namespace = own_namespace();
            config
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration or kubeconfig found")?,
    };
    // Names this replica in API server audit logs.
    let agent = format!(
        "tollgate-operator/{} ({identity})",
        env!("CARGO_PKG_VERSION")
    );
    if let Ok(value) = axum::http::HeaderValue::from_str(&agent) {
        config.headers.push((axum::http::header::USER_AGENT, value));
    }
    Client::try_from(config).context("building the Kubernetes client")
}

/// A future that resolves on SIGTERM or SIGINT.
async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs until SIGTERM: the admin listener, leader election, the watches (on every
/// replica, so a new leader starts warm), then the reconcile loop and the usage refresher
/// (each writing only while this replica leads).
pub async fn run(settings: RunSettings) -> anyhow::Result<()> {
    let identity = settings.identity();
    let client = client(&settings, &identity).await?;
    let namespaces = settings.watched_namespaces();
    let gateway_namespace = settings.gateway_namespace();
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_task = serve_admin(&settings, &metrics, &ready, stop_rx.clone()).await?;
    let redis = match settings.redis() {
        Some(options) => Some(
            options
                .connect_lazy()
                .map_err(|e| anyhow::anyhow!("--redis-url: {e}"))?,
        ),
        None => None,
    };
    let (leading_rx, fence, elector_task) =
        lead(&settings, &client, &identity, &metrics, stop_rx.clone());

    let naming = Naming {
        namespace: gateway_namespace.clone(),
        prefix: settings.config_prefix.clone(),
        max_key_shards: settings.max_key_shards,
        max_routing_shards: settings.max_routing_shards,
    };
    let notify = Arc::new(Notify::new());
    let watches = Arc::new(Watches::start(
        &client,
        &namespaces,
        &naming,
        notify.clone(),
        metrics.clone(),
    ));
    tracing::info!(namespaces = ?namespaces, gateway_namespace = %gateway_namespace, identity = %identity, "watching");
    tokio::select! {
        _ = watches.ready() => {}
        _ = signal() => {
            let _ = stop_tx.send(true);
            return Ok(());
        }
    }
    ready.store(true, Ordering::Relaxed);
    tracing::info!("caches synced");

    let reconciler = Reconciler {
        client: client.clone(),
        naming,
        redis: redis.clone(),
        redis_timeout: settings.redis_timeout,
        recorder: Recorder::new(client.clone(), controller::reporter(&identity)),
        metrics: metrics.clone(),
        fence: fence.clone(),
        compile_options: tollgate_api::compile::CompileOptions {
            allow_link_local_upstreams: settings.allow_link_local_upstreams,
        },
        seen: watches.seen.clone(),
        holds: Default::default(),
        key_publish_wait: settings.key_publish_wait,
    };
    let loop_task = tokio::spawn(controller::run_loop(
        reconciler,
        watches.clone(),
        notify.clone(),
        leading_rx.clone(),
        stop_rx.clone(),
        LoopTiming {
            debounce: settings.debounce,
            max_debounce: settings.max_debounce,
            resync: settings.resync,
            reconcile_timeout: settings.reconcile_timeout,
        },
    ));
    // The first reconcile runs as soon as we lead.
    notify.notify_one();
    let usage_task = redis.map(|conn| {
        tokio::spawn(refresh_usage(
            UsageRefresh {
                client: client.clone(),
                conn,
                watches: watches.clone(),
                metrics: metrics.clone(),
                leading: leading_rx.clone(),
                fence,
                interval: settings.usage_interval,
                timeout: settings.redis_timeout,
            },
            stop_rx.clone(),
        ))
    });

    signal().await;
    tracing::info!("shutting down");
    ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = loop_task.await;
    if let Some(t) = usage_task {
        let _ = t.await;
    }
    if let Some(t) = elector_task {
        let _ = t.await;
    }
    let _ = admin_task.await;
    Ok(())
}

/// Binds `--admin-listen` and serves `/livez`, `/readyz` and `/metrics` until `stop`.
async fn serve_admin(
    settings: &RunSettings,
    metrics: &Arc<Metrics>,
    ready: &Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding --admin-listen {}", settings.admin_listen))?;
    tracing::info!(admin_addr = %listener.local_addr()?, "admin listening");
    let admin = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Admin {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, admin)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
    }))
}

/// Leadership: with `--leader-election`, an elector on the Lease (its fence guards every
/// write); without, this replica leads from the start. The leader gauge follows it.
fn lead(
    settings: &RunSettings,
    client: &Client,
    identity: &str,
    metrics: &Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> (
    watch::Receiver<bool>,
    Fence,
    Option<tokio::task::JoinHandle<()>>,
) {
    let (leading_tx, leading_rx) = watch::channel(!settings.leader_election);
    let mut fence = Fence::open();
    let elector_task = if settings.leader_election {
        let elector = Elector::new(
            Api::namespaced(client.clone(), &own_namespace()),
            &settings.lease_name,
            identity,
            Timing {
                duration: settings.lease_duration,
                renew_deadline: settings.lease_renew_deadline,
                retry: settings.lease_retry,
            },
        );
        fence = elector.fence();
        Some(tokio::spawn(elector.run(leading_tx, stop)))
    } else {
        drop(leading_tx);
        None
    };
    let metrics = metrics.clone();
    let mut leading = leading_rx.clone();
    metrics.set_leader(*leading.borrow());
    tokio::spawn(async move {
        while leading.changed().await.is_ok() {
            metrics.set_leader(*leading.borrow());
        }
    });
    (leading_rx, fence, elector_task)
}

/// What the usage refresher needs.
struct UsageRefresh {
    client: Client,
    conn: tollgate_api::redis_conn::SharedConn,
    watches: Arc<Watches>,
    metrics: Arc<Metrics>,
    leading: watch::Receiver<bool>,
    fence: Fence,
    interval: std::time::Duration,
    timeout: std::time::Duration,
}

/// Every `--usage-interval`, while this replica leads and holds the Lease: usage and
/// spend read from Redis into ApiKey status (`usage.rs::refresh`, which checks the fence
/// again before each write).
async fn refresh_usage(u: UsageRefresh, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(u.interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !*u.leading.borrow() || !u.fence.holds() {
            continue;
        }
        let currencies: BTreeSet<String> = u
            .watches
            .providers
            .all()
            .iter()
            .map(|p| p.spec.currency.clone())
            .collect();
        match crate::usage::refresh(
            &u.client,
            &u.conn,
            &u.watches.keys.all(),
            &currencies,
            u.timeout,
            &u.fence,
        )
        .await
        {
            Ok(n) => {
                u.metrics.usage_read(true);
                if n > 0 {
                    tracing::debug!(updated = n, "usage refreshed");
                }
            }
            Err(e) => {
                u.metrics.usage_read(false);
                tracing::warn!(error = %e, "could not refresh usage from Redis");
            }
        }
    }
}
