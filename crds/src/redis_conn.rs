//! How the gateway reaches Redis: one server (`redis://`, or `rediss://` for TLS) through
//! the connection manager, or a Redis Cluster through the cluster client. Both reconnect
//! on their own and start even while Redis is down.

use std::{path::PathBuf, time::Duration};

use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager},
    cluster_async::ClusterConnection,
};

/// Where Redis is and how to talk to it.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` URLs; for a cluster, any number of seed nodes.
    pub urls: Vec<String>,
    /// Whether the URLs name Redis Cluster nodes.
    pub cluster: bool,
    /// PEM bundle of CAs trusted for `rediss://` instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for Redis servers that require mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Deadline for connecting and for every answer.
    pub timeout: Duration,
    /// Password for every URL (overrides one written in them), so a URL can live in
    /// configuration and the password in a Secret.
    pub password: Option<String>,
}

/// An invalid Redis configuration.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// No URL.
    #[error("no Redis URL given")]
    Missing,
    /// A file could not be read.
    #[error("cannot read {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The client library refused the URL or the TLS material.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

fn read(path: &PathBuf) -> Result<Vec<u8>, OptionsError> {
    std::fs::read(path).map_err(|error| OptionsError::File {
        path: path.clone(),
        error,
    })
}

impl RedisOptions {
    /// Splits a comma-separated list of URLs.
    pub fn new(urls: &str, timeout: Duration) -> Self {
        Self {
            urls: urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
            timeout,
            ..Self::default()
        }
    }

    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, OptionsError> {
        if self.ca_file.is_none() && self.client_cert.is_none() {
            return Ok(None);
        }
        let client_tls = match &self.client_cert {
            Some((cert, key)) => Some(redis::ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            None => None,
        };
        let root_cert = self.ca_file.as_ref().map(read).transpose()?;
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// A URL's connection details with the password applied.
    fn info(&self, url: &str) -> Result<redis::ConnectionInfo, OptionsError> {
        let info = redis::IntoConnectionInfo::into_connection_info(url)?;
        Ok(match &self.password {
            Some(password) => {
                let settings = info.redis_settings().clone().set_password(password);
                info.set_redis_settings(settings)
            }
            None => info,
        })
    }

    /// A client for one of the URLs (TLS material and password applied).
    fn client(&self, url: &str) -> Result<redis::Client, OptionsError> {
        let info = self.info(url)?;
        Ok(match self.certificates()? {
            Some(certs) => redis::Client::build_with_tls(info, certs)?,
            None => redis::Client::open(info)?,
        })
    }

    /// One client per URL, for pub/sub: classic pub/sub messages reach every node of a
    /// cluster, so any node will do.
    pub fn pubsub_clients(&self) -> Result<Vec<redis::Client>, OptionsError> {
        if self.urls.is_empty() {
            return Err(OptionsError::Missing);
        }
        self.urls.iter().map(|u| self.client(u)).collect()
    }

    /// A connection that connects on first use and reconnects on its own. Fails only for
    /// invalid options.
    pub fn connect_lazy(&self) -> Result<SharedConn, OptionsError> {
        let first = self.urls.first().ok_or(OptionsError::Missing)?;
        if self.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(self.urls.clone())
                .connection_timeout(self.timeout)
                .response_timeout(self.timeout)
                .retries(1);
            if let Some(certs) = self.certificates()? {
                builder = builder.certs(certs);
            }
            if let Some(password) = &self.password {
                builder = builder.password(password);
            }
            let client = builder.build()?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(self.timeout)
                .set_response_timeout(self.timeout);
            Ok(SharedConn::Cluster(
                client.get_pending_async_connection_with_config(config),
            ))
        } else {
            let client = self.client(first)?;
            // Reconnection backs off from 100 ms, doubling, but never waits more than
            // RECONNECT_MAX_DELAY: a Redis that comes back is used again within it.
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout))
                .set_max_delay(RECONNECT_MAX_DELAY);
            Ok(SharedConn::Single(ConnectionManager::new_lazy_with_config(
                client, config,
            )?))
        }
    }
}

/// Longest wait between two reconnection attempts to a single Redis (the library's
/// default backoff reaches 3.2 s, which kept a recovered Redis unused that long).
/// Why a bounded Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisCallError {
    /// No answer within its deadline (`what` the call was).
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// Redis answered with an error, or the connection failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// A value could not be encoded for Redis.
    #[error(transparent)]
    Encode(#[from] serde_json::Error),
    /// A subscription ended (`what` it was).
    #[error("{0} closed")]
    Closed(&'static str),
}

/// Runs `work` (named `what` in the error) within `timeout`.
pub async fn bounded<T>(
    what: &'static str,
    timeout: Duration,
    work: impl Future<Output = Result<T, RedisCallError>>,
) -> Result<T, RedisCallError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| RedisCallError::Timeout(what))?
}

pub const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// A connection to one Redis or to a cluster; cheap to clone (multiplexed).
#[derive(Clone)]
pub enum SharedConn {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster: commands are routed by key slot.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for SharedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "SharedConn::Single",
            Self::Cluster(_) => "SharedConn::Cluster",
        })
    }
}

impl SharedConn {
    /// Whether multi-key scripts must keep to one hash slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl ConnectionLike for SharedConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
