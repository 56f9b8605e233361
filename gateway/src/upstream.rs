//! The HTTP side of upstream calls, the same for every provider: one pooled client per
//! provider (timeouts, HTTP/2 tuning, no redirects, egress-checked name resolution) and
//! reading `Retry-After`. What differs per kind of upstream is in `crate::providers`.

use std::time::Duration;

use http::{HeaderMap, header};
use tollgate_api::{config::CompiledProvider, v1alpha1::HttpVersion};

/// Idle keep-alive connections kept per provider and replica.
pub const MAX_IDLE_CONNECTIONS: usize = 1024;

/// A pooled client for one provider, with its connect timeout.
pub fn client_for(provider: &CompiledProvider) -> Result<reqwest::Client, reqwest::Error> {
    let builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(provider.connect_timeout_ms))
        .pool_idle_timeout(Duration::from_secs(90))
        // After a burst, keep enough warm connections for the next one, not all of them:
        // each idle connection holds its buffers.
        .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
        .tcp_nodelay(true)
        // A redirect would send the credential header and the prompt to whatever host the
        // upstream names; the attempt fails with a 502 instead (proxy.rs).
        .redirect(reqwest::redirect::Policy::none())
        // Names resolve through the egress policy (no link-local or metadata addresses).
        .dns_resolver(crate::egress::EgressResolver::shared())
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")));
    // HTTP/2 carries every request to the provider on one connection. Token streams are
    // many small DATA frames, and h2 drops the whole connection (GOAWAY "too many data
    // frames") when small frames buffered but not yet read exceed a budget of half the
    // connection window: a large connection window keeps thousands of streams, a few of
    // them read slowly by their clients, from tripping it. Each stream's own window stays
    // modest, so a stalled client buffers little.
    let http2 = |b: reqwest::ClientBuilder| {
        b.http2_initial_connection_window_size(64 * 1024 * 1024)
            .http2_initial_stream_window_size(256 * 1024)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_while_idle(true)
    };
    match provider.http_version {
        HttpVersion::Http1 => builder.http1_only(),
        HttpVersion::Auto => http2(builder),
        HttpVersion::Http2 => http2(builder.http2_prior_knowledge()),
    }
    .build()
}

/// Seconds from a `Retry-After` (or `retry-after-ms`) header, if present and sane.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_millis(ms as u64));
    }
    let secs: f64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        h.clear();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }
}
