//! What Tollgate's tests and benchmarks share, so that each lives once: child processes
//! whose JSON logs are collected ([`process`]), free loopback ports ([`ports`]), real
//! `redis-server` instances ([`redis`], never a mock), the gateway binary started on free
//! ports ([`gateway`]), a scriptable OpenAI-style upstream ([`upstream`]), faithful emulations of the
//! OpenAI and Anthropic APIs for client software ([`emulated`]), and waiting on observable
//! state ([`wait`]).
//!
//! Everything here panics on failure with a message that says what to install or what the
//! process logged: it is test code. The benchmark harness uses the `try_` forms.

pub mod emulated;
pub mod gateway;
pub mod ports;
pub mod process;
pub mod redis;
pub mod upstream;
pub mod wait;

use std::time::Duration;

/// An HTTP client for tests: a 20 s timeout, nothing else configured.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("a plain reqwest client builds")
}

/// The sum of every Prometheus sample in `text` whose line starts with `prefix` (a metric
/// name and, optionally, the start of its labels).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A response's `content-type`, or empty.
pub fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}
