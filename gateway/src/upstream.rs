//! Calling OpenAI-style upstreams (OpenAI, Azure OpenAI, OpenAI-compatible servers):
//! endpoints, headers, and one pooled HTTP client per provider.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use tollgate_api::{
    config::CompiledProvider,
    v1alpha1::{HttpVersion, ProviderType},
};

use crate::request::Edit;

/// The OpenAI-style operation being proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `/chat/completions`.
    ChatCompletions,
    /// `/completions` (legacy text completions).
    Completions,
    /// `/embeddings`.
    Embeddings,
    /// Anthropic's `/messages` (the client speaks Anthropic).
    Messages,
}

/// A wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI chat completions and friends.
    OpenAi,
    /// Anthropic messages.
    Anthropic,
}

/// The wire format an upstream of this type speaks (`None` for the in-process mock).
pub fn dialect(kind: ProviderType) -> Option<Dialect> {
    match kind {
        ProviderType::Openai | ProviderType::OpenaiCompatible | ProviderType::AzureOpenAi => {
            Some(Dialect::OpenAi)
        }
        ProviderType::Anthropic => Some(Dialect::Anthropic),
        ProviderType::Mock => None,
    }
}

impl Operation {
    /// Every operation, in declaration order (`op as usize` indexes this).
    pub const ALL: [Self; 4] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Messages,
    ];

    /// The metric label.
    pub fn label(self) -> crate::metrics::OperationLabel {
        match self {
            Self::ChatCompletions => crate::metrics::OperationLabel::chat_completions,
            Self::Completions => crate::metrics::OperationLabel::completions,
            Self::Embeddings => crate::metrics::OperationLabel::embeddings,
            Self::Messages => crate::metrics::OperationLabel::messages,
        }
    }

    /// The name in logs.
    /// `gen_ai.operation.name`.
    pub fn genai_operation(self) -> &'static str {
        match self {
            Self::ChatCompletions | Self::Messages => "chat",
            Self::Completions => "text_completion",
            Self::Embeddings => "embeddings",
        }
    }

    pub fn label_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Messages => "messages",
        }
    }

    /// The wire format the client speaks.
    pub fn client_dialect(self) -> Dialect {
        if self == Self::Messages {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            // Sent to an OpenAI-style upstream after translation.
            Self::Messages => "chat/completions",
        }
    }
}

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

/// Whether the gateway calls this provider type over HTTP.
pub fn speaks_openai(kind: ProviderType) -> bool {
    dialect(kind).is_some()
}

/// The URL of `operation` for `upstream_model` on `provider`.
pub fn endpoint(provider: &CompiledProvider, operation: Operation, upstream_model: &str) -> String {
    let base = &provider.base_url;
    match provider.provider_type {
        ProviderType::Anthropic => format!("{base}/messages"),
        ProviderType::AzureOpenAi => format!(
            "{base}/openai/deployments/{upstream_model}/{}?api-version={}",
            operation.path(),
            provider.azure_api_version.as_deref().unwrap_or_default()
        ),
        _ => format!("{base}/{}", operation.path()),
    }
}

/// Headers for an upstream request: content type, the provider's credential and extra
/// headers, and the request id. Nothing of the client's own credentials is forwarded.
pub fn headers(
    provider: &CompiledProvider,
    credential: Option<&str>,
    request_id: &str,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in &provider.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            h.insert(n, v);
        }
    }
    if let (Some(auth), Some(credential)) = (&provider.auth, credential)
        && let (Ok(n), Ok(mut v)) = (
            HeaderName::try_from(auth.header.as_str()),
            HeaderValue::try_from(format!("{}{credential}", auth.prefix)),
        )
    {
        v.set_sensitive(true);
        h.insert(n, v);
    }
    if let Some(version) = provider.anthropic_version.as_deref()
        && let Ok(v) = HeaderValue::try_from(version)
    {
        h.insert(HeaderName::from_static("anthropic-version"), v);
    }
    if let Ok(v) = HeaderValue::try_from(request_id) {
        h.insert(HeaderName::from_static("x-request-id"), v);
    }
    h
}

/// The body to send: the client's bytes untouched when the upstream model name is the one
/// the client sent, otherwise with `model` replaced (the rest copied as it came, no tree).
pub fn body(
    original: &Bytes,
    requested_model: &str,
    upstream_model: &str,
) -> Result<Bytes, serde_json::Error> {
    if requested_model == upstream_model {
        return Ok(original.clone());
    }
    let model = serde_json::to_string(upstream_model)?;
    crate::request::edit_members(original, &[("model", Edit::Set(&model))]).map(Bytes::from)
}

/// The body of a stream to an OpenAI-style upstream with `stream_options.include_usage`
/// set, so the gateway can account the answer, and `model` set to `upstream_model`.
pub fn body_with_usage(original: &Bytes, upstream_model: &str) -> Result<Bytes, serde_json::Error> {
    let model = serde_json::to_string(upstream_model)?;
    crate::request::edit_members(
        original,
        &[
            ("model", Edit::Set(&model)),
            (
                "stream_options",
                Edit::Inside(vec![("include_usage", Edit::Set("true"))]),
            ),
        ],
    )
    .map(Bytes::from)
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
    use std::collections::BTreeMap;

    use tollgate_api::config::CompiledAuth;

    use super::*;

    fn provider(kind: ProviderType) -> CompiledProvider {
        CompiledProvider {
            id: "ns/p".into(),
            provider_type: kind,
            base_url: "https://up.example.com/v1".into(),
            auth: Some(CompiledAuth {
                header: "authorization".into(),
                prefix: "Bearer ".into(),
            }),
            azure_api_version: Some("2024-10-21".into()),
            anthropic_version: None,
            mock: None,
            models: BTreeMap::new(),
            currency: "USD".into(),
            connect_timeout_ms: 1000,
            request_timeout_ms: 1000,
            stream_idle_timeout_ms: 1000,
            max_concurrency: None,
            circuit_failure_threshold: 5,
            circuit_open_ms: 1000,
            headers: BTreeMap::from([("openai-organization".into(), "org-1".into())]),
            http_version: Default::default(),
        }
    }

    #[test]
    fn endpoints_follow_each_wire_format() {
        assert_eq!(
            endpoint(
                &provider(ProviderType::Openai),
                Operation::ChatCompletions,
                "gpt-4o"
            ),
            "https://up.example.com/v1/chat/completions"
        );
        assert_eq!(
            endpoint(
                &provider(ProviderType::AzureOpenAi),
                Operation::ChatCompletions,
                "prod-4o"
            ),
            "https://up.example.com/v1/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
        );
    }

    #[test]
    fn headers_carry_the_provider_credential_and_extras_marked_sensitive() {
        let h = headers(&provider(ProviderType::Openai), Some("sk-up"), "req-1");
        assert_eq!(h["authorization"], "Bearer sk-up");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["openai-organization"], "org-1");
        assert_eq!(h["x-request-id"], "req-1");
    }

    #[test]
    fn bodies_are_forwarded_byte_for_byte_unless_the_model_is_renamed() {
        let original = Bytes::from_static(br#"{ "model" : "gpt-4o", "messages": [], "zeta": 1 }"#);
        assert_eq!(body(&original, "gpt-4o", "gpt-4o").unwrap(), original);
        let renamed: serde_json::Value =
            serde_json::from_slice(&body(&original, "chat", "gpt-4o-2024").unwrap()).unwrap();
        assert_eq!(renamed["model"], "gpt-4o-2024");
        assert_eq!(renamed["zeta"], 1);
    }

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
