//! Anthropic's messages API: every chat call goes to `/messages`, with the
//! `anthropic-version` header; it has no legacy completions or embeddings.

use http::{HeaderMap, HeaderName, HeaderValue};
use tollgate_api::config::CompiledProvider;

use super::Adapter;
use crate::dialects::{Dialect, Operation};

/// Anthropic.
#[derive(Debug)]
pub struct Anthropic;

impl Adapter for Anthropic {
    fn name(&self) -> &'static str {
        "Anthropic"
    }

    fn dialect(&self) -> Dialect {
        Dialect::Anthropic
    }

    fn offers(&self, _provider: &CompiledProvider, operation: Operation) -> bool {
        operation.is_chat()
    }

    fn endpoint(&self, provider: &CompiledProvider, _operation: Operation, _model: &str) -> String {
        format!("{}/messages", provider.base_url)
    }

    fn extra_headers(&self, provider: &CompiledProvider, headers: &mut HeaderMap) {
        if let Some(version) = provider.anthropic_version.as_deref()
            && let Ok(v) = HeaderValue::try_from(version)
        {
            headers.insert(HeaderName::from_static("anthropic-version"), v);
        }
    }
}

/// What an Anthropic client said about the API itself, forwarded to Anthropic targets when
/// its body is passed through (never when the gateway translates: it writes for the
/// Provider's `anthropic-version` then): its `anthropic-version`, its `anthropic-beta`
/// features (the bodies of some need them: without the header the API refuses their
/// fields) and its query string (Claude Code calls `/v1/messages?beta=true`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHints {
    /// `anthropic-version`.
    pub version: Option<http::HeaderValue>,
    /// `anthropic-beta` values, from every such header, comma-separated ones split.
    pub betas: Vec<String>,
    /// The query string, if any.
    pub query: Option<String>,
}

impl ClientHints {
    /// The hints of a client request.
    pub fn of(parts: &http::request::Parts) -> Self {
        let betas = parts
            .headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(str::to_owned)
            .collect();
        Self {
            version: parts.headers.get("anthropic-version").cloned(),
            betas,
            query: parts.uri.query().map(str::to_owned),
        }
    }

    /// The first beta `provider`'s policy refuses, if any.
    pub fn refused_beta(&self, provider: &CompiledProvider) -> Option<&str> {
        let policy = provider.anthropic_betas.as_ref()?;
        self.betas
            .iter()
            .find(|b| !policy.allows(b))
            .map(String::as_str)
    }

    /// Sets the client's version and betas on the upstream `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Some(version) = &self.version {
            headers.insert(
                HeaderName::from_static("anthropic-version"),
                version.clone(),
            );
        }
        if !self.betas.is_empty()
            && let Ok(v) = HeaderValue::try_from(self.betas.join(","))
        {
            headers.insert(HeaderName::from_static("anthropic-beta"), v);
        }
    }

    /// `url` with the client's query string.
    pub fn url(&self, mut url: reqwest::Url) -> reqwest::Url {
        if let Some(query) = &self.query {
            url.set_query(Some(query));
        }
        url
    }
}
