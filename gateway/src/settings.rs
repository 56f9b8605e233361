//! Process settings, from flags or `TOLLGATE_*` environment variables.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgGroup, Parser, ValueEnum};

use crate::limits::store::FailureMode;

/// Tollgate gateway: an OpenAI- and Anthropic-compatible gateway for LLM APIs.
///
/// Configuration comes either from the files the Tollgate operator mounts
/// (`--config-dir`, repeatable) or, standalone, from the same custom-resource manifests you
/// would `kubectl apply` (`--resources`). Either source is re-read while running; a
/// configuration that fails to load is rejected and the last good one keeps serving.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about)]
#[command(group(ArgGroup::new("source").required(true).args(["resources", "config_dirs"])))]
pub struct Settings {
    /// A manifest file or directory (Provider, RoutePolicy, ApiKey and Secret objects),
    /// compiled at start and whenever it changes. Standalone mode: no cluster needed.
    #[arg(long, env = "TOLLGATE_RESOURCES", value_name = "PATH")]
    pub resources: Option<PathBuf>,

    /// Directory holding compiled configuration files written by the operator
    /// (manifest.json, routing.json, credentials-*.json, keys-*.json). Repeat, or separate
    /// with commas, for the ConfigMap and Secret mounts.
    #[arg(
        long = "config-dir",
        env = "TOLLGATE_CONFIG_DIRS",
        value_name = "DIR",
        value_delimiter = ','
    )]
    pub config_dirs: Vec<PathBuf>,

    /// Address for client traffic and the /livez and /readyz probes.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the admin listener: Prometheus `/metrics` and the probes. Loopback by
    /// default; set `0.0.0.0:9090` in a pod so Prometheus can scrape it.
    #[arg(long, env = "TOLLGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// How often the configuration source is checked for changes.
    #[arg(long, env = "TOLLGATE_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// Largest accepted request body in bytes (long prompts and base64 images need room).
    #[arg(long, env = "TOLLGATE_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest audio upload (`/v1/audio/transcriptions`, the whole multipart body) in
    /// bytes; OpenAI's own limit is 25 MB. Larger uploads get 413 before anything is sent
    /// upstream. Counts against --max-inflight-bytes, about three times over while it is
    /// read and re-encoded (an upload that could never fit gets 413 too).
    #[arg(long, env = "TOLLGATE_MAX_UPLOAD_BYTES", default_value_t = 25 * 1024 * 1024)]
    pub max_upload_bytes: usize,

    /// Memory all requests in flight may hold for their bodies, in bytes: each body as it
    /// arrives, plus an estimate of the parsed tree where guardrails, the cache key,
    /// translation or content recording need one (96 bytes per JSON value). Beyond it
    /// requests get `503 overloaded` with Retry-After instead of growing the process; a
    /// single request that needs more than all of it gets 413. Must be at least
    /// --max-body-bytes; 0 disables the budget. Size it with the pod's memory limit
    /// (docs/production.md).
    #[arg(long, env = "TOLLGATE_MAX_INFLIGHT_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_inflight_bytes: usize,

    /// Largest upstream answer read whole (non-streamed calls), in bytes; a larger one
    /// fails with 502 instead of filling the gateway's memory. Streams are relayed event by
    /// event (one event may be at most 8 MiB), so this does not cap their length.
    #[arg(long, env = "TOLLGATE_MAX_RESPONSE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_response_bytes: usize,

    /// Longest a client may take to send a request's headers (slow clients are cut off).
    #[arg(long, env = "TOLLGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Longest a client may take to send a request body; slower uploads get 408.
    #[arg(long, env = "TOLLGATE_BODY_READ_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,

    /// Memory for cached answers, in bytes (RoutePolicies opt in with `cache`); 0 turns
    /// the cache off.
    #[arg(long, env = "TOLLGATE_CACHE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_max_bytes: usize,

    /// Redis for limits, budgets, usage, revocations and the cache shared by every
    /// replica: `redis://[user:password@]host:port/db`, or `rediss://…` for TLS. With
    /// --redis-cluster, a comma-separated list of seed nodes. Unset: all kept in process,
    /// exact for a single gateway only.
    #[arg(long, env = "TOLLGATE_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// The Redis URLs name Redis Cluster nodes (commands are routed by hash slot).
    #[arg(long, env = "TOLLGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Password for Redis (every URL, the cache's included), so URLs need not carry it.
    /// Prefer the environment variable (from a Secret) to the flag.
    #[arg(
        long,
        env = "TOLLGATE_REDIS_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub redis_password: Option<String>,

    /// A Redis for the shared response cache only (same password, TLS and cluster
    /// settings as --redis-url), so cache entries never compete for memory with limits,
    /// budgets and usage: run it with `maxmemory-policy allkeys-lru` and the state Redis
    /// with `noeviction`. Unset: the cache shares the --redis-url Redis.
    #[arg(
        long,
        env = "TOLLGATE_REDIS_CACHE_URL",
        value_name = "URL",
        requires = "redis_url"
    )]
    pub redis_cache_url: Option<String>,

    /// PEM file of the CAs that sign the Redis server certificate (`rediss://`), instead
    /// of the system's trusted roots.
    #[arg(long, env = "TOLLGATE_REDIS_CA_FILE", value_name = "FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM client certificate for Redis servers that require mutual TLS (with
    /// --redis-client-key).
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

    /// Deadline for every Redis call; a slow or hung Redis never holds requests longer.
    #[arg(long, env = "TOLLGATE_REDIS_TIMEOUT", default_value = "100ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// When Redis is unreachable: `failOpen` keeps serving with in-process limits (per
    /// replica), `failClosed` answers 503 to requests that need a limit decision.
    #[arg(long, env = "TOLLGATE_REDIS_FAILURE_MODE", value_enum, default_value_t = FailureMode::FailOpen)]
    pub redis_failure_mode: FailureMode,

    /// Failed authentications allowed per client address and minute; past that, the
    /// address gets 429 (`too_many_auth_failures`) until its allowance refills. 0 turns
    /// the throttle off.
    #[arg(long, env = "TOLLGATE_AUTH_FAILURES_PER_MINUTE", default_value_t = 60)]
    pub auth_failures_per_minute: u32,

    /// Proxies (addresses or CIDRs, comma-separated) whose forwarding header says who the
    /// client is. A request from one of them gets the rightmost address of
    /// `--client-address-header` that is not itself a trusted proxy (what the client wrote
    /// further left is ignored); any other request gets its peer address. Empty (the
    /// default): the header is never read. Behind an Ingress or L7 proxy, list its pod or
    /// node CIDRs, or every client shares the proxy's address for the failed-
    /// authentication throttle.
    #[arg(
        long,
        env = "TOLLGATE_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub trusted_proxies: Vec<String>,

    /// The forwarding header trusted proxies write (default `x-forwarded-for`); needs
    /// `--trusted-proxies`.
    #[arg(long, env = "TOLLGATE_CLIENT_ADDRESS_HEADER", value_name = "HEADER")]
    pub client_address_header: Option<String>,

    /// Let Providers call link-local addresses (169.254.0.0/16, fe80::/10) and cloud
    /// metadata endpoints (169.254.169.254, fd00:ec2::254, metadata.google.internal…).
    /// Refused by default, in `baseUrl`s and whatever a name resolves to: they hand out
    /// the node's credentials to whoever asks. Private ranges are always allowed.
    #[arg(long, env = "TOLLGATE_ALLOW_LINK_LOCAL_UPSTREAMS")]
    pub allow_link_local_upstreams: bool,

    /// Browser origins allowed to call the API (CORS), comma-separated; `*` allows any.
    /// Empty (the default) sends no CORS headers, so browsers refuse cross-origin calls.
    #[arg(long, env = "TOLLGATE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// Log format: `json` (one object per line), `text`, or `auto` (text on a terminal,
    /// json otherwise). The level comes from RUST_LOG (default `info`).
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// On SIGTERM, how long /readyz reports "draining" before the listener closes, so load
    /// balancers stop sending new requests first.
    #[arg(long, env = "TOLLGATE_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// After the listener closes, how long in-flight requests and streams may take to
    /// finish before the process exits anyway. Streams still open a moment before the end
    /// (a quarter of this, at most 1s) end with an error event, so clients see why and
    /// their limits and usage settle. Keep terminationGracePeriodSeconds above drain
    /// delay + this.
    #[arg(long, env = "TOLLGATE_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

impl Settings {
    /// The options of the state store's Redis, when `--redis-url` names one.
    pub fn redis_options(&self) -> Option<tollgate_api::redis_conn::RedisOptions> {
        let mut options = tollgate_api::redis_conn::RedisOptions::new(
            self.redis_url.as_ref()?,
            self.redis_timeout,
        );
        options.cluster = self.redis_cluster;
        options.password = self.redis_password.clone();
        options.ca_file = self.redis_ca_file.clone();
        options.client_cert = self
            .redis_client_cert
            .clone()
            .zip(self.redis_client_key.clone());
        Some(options)
    }
}

/// Log output format.
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
