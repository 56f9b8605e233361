//! `tollgate-operator run` settings: flags, each also read from a `TOLLGATE_*` variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Text,
}

fn parse_duration(text: &str) -> Result<Duration, tollgate_api::duration::DurationError> {
    tollgate_api::duration::parse(text)
}

/// The namespace this pod runs in (downward API `POD_NAMESPACE`), else `default`.
pub fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// Settings of the controller.
#[derive(Debug, Clone, Args)]
pub struct RunSettings {
    /// Namespaces whose Providers, RoutePolicies and ApiKeys are reconciled,
    /// comma-separated. Default: the operator's own namespace (POD_NAMESPACE).
    #[arg(long, env = "TOLLGATE_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Accept Provider baseUrls on link-local addresses (169.254.0.0/16, fe80::/10) and
    /// cloud metadata hosts; refused by default (gateways refuse them again at connect
    /// time unless they run with the same flag).
    #[arg(long, env = "TOLLGATE_ALLOW_LINK_LOCAL_UPSTREAMS")]
    pub allow_link_local_upstreams: bool,

    /// Namespace the gateways run in, where the generated ConfigMap and Secrets are
    /// written. Default: the operator's own namespace.
    #[arg(long, env = "TOLLGATE_GATEWAY_NAMESPACE")]
    pub gateway_namespace: Option<String>,

    /// Name prefix of the generated objects: `<prefix>-config` (ConfigMap),
    /// `<prefix>-credentials` and `<prefix>-keys-NN` (Secrets). The gateway Deployment
    /// mounts them (the Helm chart does this).
    #[arg(
        long,
        env = "TOLLGATE_CONFIG_PREFIX",
        default_value = "tollgate-gateway"
    )]
    pub config_prefix: String,

    /// Key shard Secrets the gateways mount (the chart's `keyShards`; both must match).
    /// 16 shards of at most 512 KiB hold well over 20,000 keys.
    #[arg(long, env = "TOLLGATE_MAX_KEY_SHARDS", default_value_t = crate::desired::DEFAULT_MAX_KEY_SHARDS)]
    pub max_key_shards: usize,

    /// Routing shard ConfigMaps the gateways mount (the chart's `routingShards`; both
    /// must match). Used only when the Providers and routes outgrow one 512 KiB part;
    /// then each shard is a ConfigMap `<prefix>-routing-NN`.
    #[arg(long, env = "TOLLGATE_MAX_ROUTING_SHARDS", default_value_t = crate::desired::DEFAULT_MAX_ROUTING_SHARDS)]
    pub max_routing_shards: usize,

    /// Quiet time after a change before compiling, so a burst (1,000 ApiKeys applied at
    /// once) causes one write of each changed object, not one per change.
    #[arg(long, env = "TOLLGATE_DEBOUNCE", default_value = "500ms", value_parser = parse_duration)]
    pub debounce: Duration,

    /// Longest a steady stream of changes may postpone a compile.
    #[arg(long, env = "TOLLGATE_MAX_DEBOUNCE", default_value = "5s", value_parser = parse_duration)]
    pub max_debounce: Duration,

    /// Full reconcile even without changes (repairs hand-edited generated objects).
    #[arg(long, env = "TOLLGATE_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub resync: Duration,

    /// Longest one reconcile may take: a Kubernetes API call that never answers is
    /// abandoned then, and the reconcile retried with backoff.
    #[arg(long, env = "TOLLGATE_RECONCILE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub reconcile_timeout: Duration,

    /// Redis the gateways share (same URL and TLS settings as theirs): key revocations
    /// are published there, usage and spend are read from it into ApiKey status, and the
    /// gateways' configuration reports feed the `Propagated` condition. Unset: none of
    /// these.
    #[arg(long, env = "TOLLGATE_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// The Redis URLs name Redis Cluster nodes.
    #[arg(long, env = "TOLLGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Password for Redis, so the URL need not carry it. Prefer the environment variable
    /// (from a Secret) to the flag.
    #[arg(
        long,
        env = "TOLLGATE_REDIS_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub redis_password: Option<String>,

    /// PEM file of the CAs that sign the Redis server certificate (`rediss://`).
    #[arg(long, env = "TOLLGATE_REDIS_CA_FILE", value_name = "FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM client certificate for Redis mutual TLS (with --redis-client-key).
    #[arg(
        long,
        env = "TOLLGATE_REDIS_CLIENT_CERT",
        value_name = "FILE",
        requires = "redis_client_key"
    )]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM private key of --redis-client-cert.
    #[arg(
        long,
        env = "TOLLGATE_REDIS_CLIENT_KEY",
        value_name = "FILE",
        requires = "redis_client_cert"
    )]
    pub redis_client_key: Option<PathBuf>,

    /// Deadline of every Redis call.
    #[arg(long, env = "TOLLGATE_REDIS_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// How often usage and spend are read from Redis into ApiKey status (only changed
    /// figures are written).
    #[arg(long, env = "TOLLGATE_USAGE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub usage_interval: Duration,

    /// With Redis, a new or rotated key is written into its Secret only once every live
    /// gateway reports serving a configuration that holds it, so a client never reads a
    /// key the gateways still refuse (the ApiKey shows `KeyPending` meanwhile). This is
    /// the longest that wait lasts (a gateway that never catches up); 0 writes keys at
    /// once. Keep it above the kubelet's sync period plus its cache TTL.
    #[arg(long, env = "TOLLGATE_KEY_PUBLISH_WAIT", default_value = "3m", value_parser = parse_duration)]
    pub key_publish_wait: Duration,

    /// Elect a leader on a coordination.k8s.io Lease so only one replica writes; the
    /// others keep their caches warm and take over within the lease duration.
    #[arg(long, env = "TOLLGATE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Name of the Lease.
    #[arg(long, env = "TOLLGATE_LEASE_NAME", default_value = "tollgate-operator")]
    pub lease_name: String,

    /// How long a leader's Lease holds without renewal.
    #[arg(long, env = "TOLLGATE_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// A leader that could not renew for this long stops writing (less than the lease
    /// duration).
    #[arg(long, env = "TOLLGATE_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub lease_renew_deadline: Duration,

    /// How often the Lease is renewed, or tried by standbys.
    #[arg(long, env = "TOLLGATE_LEASE_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry: Duration,

    /// This replica's identity in the Lease. Default: the pod name (HOSTNAME) and a
    /// random suffix.
    #[arg(long, env = "TOLLGATE_IDENTITY")]
    pub identity: Option<String>,

    /// `/livez`, `/readyz` and Prometheus `/metrics`.
    #[arg(long, env = "TOLLGATE_ADMIN_LISTEN", default_value = "0.0.0.0:8081")]
    pub admin_listen: SocketAddr,

    /// Log format; the level comes from RUST_LOG (default `info`).
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Kubernetes API server URL, bypassing kubeconfig and in-cluster discovery, without
    /// authentication (for local emulators and `kubectl proxy`). Default: in-cluster
    /// config, else the current kubeconfig context.
    #[arg(long, env = "TOLLGATE_KUBE_URL", value_name = "URL")]
    pub kube_url: Option<String>,
}

impl RunSettings {
    /// Namespaces to watch, each once (a namespace watched twice would list every object
    /// in it twice); `*` alone when it is among them.
    pub fn watched_namespaces(&self) -> Vec<String> {
        if self.namespaces.is_empty() {
            return vec![own_namespace()];
        }
        if self.namespaces.iter().any(|n| n == "*") {
            return vec!["*".to_owned()];
        }
        let mut out: Vec<String> = Vec::new();
        for ns in self
            .namespaces
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
        {
            if !out.iter().any(|o| o == ns) {
                out.push(ns.to_owned());
            }
        }
        out
    }

    /// Namespace of the generated objects.
    pub fn gateway_namespace(&self) -> String {
        self.gateway_namespace.clone().unwrap_or_else(own_namespace)
    }

    /// Identity in the Lease.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "tollgate-operator".to_owned());
            let mut suffix = [0u8; 3];
            let _ = getrandom::fill(&mut suffix);
            format!("{host}-{:02x}{:02x}{:02x}", suffix[0], suffix[1], suffix[2])
        })
    }

    /// Redis options, when Redis is configured.
    pub fn redis(&self) -> Option<tollgate_api::redis_conn::RedisOptions> {
        self.redis_url.as_ref().map(|url| {
            let mut o = tollgate_api::redis_conn::RedisOptions::new(url, self.redis_timeout);
            o.cluster = self.redis_cluster;
            o.password = self.redis_password.clone();
            o.ca_file = self.redis_ca_file.clone();
            o.client_cert = self
                .redis_client_cert
                .clone()
                .zip(self.redis_client_key.clone());
            o
        })
    }
}
