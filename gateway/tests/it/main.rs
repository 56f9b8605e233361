//! The gateway's integration tests, one binary (each module was a test binary of its own;
//! linking one saves minutes on a 2-core machine). They start the real `tollgate-gateway`
//! binary, real `redis-server`s and scriptable upstreams (`tollgate-testkit`), and talk to
//! them over HTTP.

mod common;

mod adaptive_routing;
mod agent_clis;
mod anthropic;
mod anthropic_clients;
mod cache;
mod cached_pricing;
mod client_disconnects;
mod client_faults;
mod config_reload;
mod fuzz_seeds;
mod guardrails;
mod http_api;
mod limiter_history;
mod limits;
mod metrics;
mod model_limits;
mod openai_endpoints;
mod python_sdks;
mod redis_accuracy;
mod redis_cluster_tls;
mod redis_faults;
mod redis_gateways;
mod redis_limits;
mod responses_api;
mod security;
mod shutdown;
mod tenancy;
mod traces;
mod upstream_faults;
mod upstreams;
mod usage;
