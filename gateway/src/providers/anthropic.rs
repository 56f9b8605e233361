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

    fn offers(&self, operation: Operation) -> bool {
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
