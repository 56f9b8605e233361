//! Tollgate's data plane: an OpenAI- and Anthropic-compatible gateway for LLM APIs.
#![forbid(unsafe_code)]

pub mod accounting;
pub mod cache;
pub mod canonical;
pub mod circuit;
pub mod client_addr;
pub mod config_source;
pub mod dialects;
pub mod egress;
pub mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod heartbeat;
pub mod http;
pub mod limits;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod multipart;
pub mod passthrough;
pub mod pricing;
pub mod providers;
pub mod proxy;
pub mod redis;
pub mod relay;
pub mod request;
pub mod revocation;
pub mod routing;
pub mod server;
pub mod settings;
pub mod snapshot;
pub mod sse;
pub mod stored_responses;
pub mod stream_guard;
pub mod target_stats;
pub mod targets;
pub use tollgate_api::telemetry;
pub mod translate;
pub mod upstream;
pub mod usage;
