//! Tollgate's API: the `tollgate.dev/v1alpha1` custom resources, the compiled
//! [`GatewayConfig`](config::GatewayConfig) the operator writes and gateways read, and the
//! [`compile`](compile::compile) function that turns one into the other.
#![forbid(unsafe_code)]

pub mod v1alpha1;

pub use k8s_openapi;
pub use kube;
pub mod compile;
pub mod config;
pub mod crd;
pub mod diagnostics;
pub mod duration;
pub mod guardrails;
pub mod heartbeat;
pub mod key_format;
#[cfg(feature = "redis")]
pub mod key_migration;
pub mod manifests;
pub mod parts;
#[cfg(feature = "redis")]
pub mod redis_conn;
pub mod revocation;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod usage;
