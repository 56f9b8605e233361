//! Tollgate's data plane: an OpenAI- and Anthropic-compatible gateway for LLM APIs.
#![forbid(unsafe_code)]

pub mod config_source;
pub mod error;
pub mod http;
pub mod providers;
pub mod request;
pub mod server;
pub mod settings;
pub mod snapshot;
