//! Upstream providers: one adapter per kind of upstream API, behind [`Adapter`], and the
//! in-process [`mock`].
//!
//! An adapter knows its upstream's wire format (a [`Dialect`], converted to and from the
//! canonical model in `crate::dialects`), its endpoints, how it authenticates and which
//! headers it needs, and how to prepare a client body that already speaks its dialect
//! (renamed model, usage requested on streams). Everything else — choosing targets,
//! retries, timeouts, relaying — is the same for all of them (`crate::proxy`,
//! `crate::relay`).
//!
//! Adding a provider of an existing wire format: one file here implementing [`Adapter`],
//! one arm in [`adapter`], and the `ProviderType` value in the CRD
//! (`crds/src/v1alpha1/provider.rs`). A new wire format adds its module under
//! `crate::dialects` too (docs/architecture.md, "Adding a provider").

pub mod anthropic;
pub mod azure;
pub mod mock;
pub mod openai;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use tollgate_api::{config::CompiledProvider, v1alpha1::ProviderType};

use crate::{
    canonical::Untranslatable,
    dialects::{Dialect, Operation},
    request::{Edit, RequestHead},
};

/// One kind of upstream API.
pub trait Adapter: Sync + std::fmt::Debug {
    /// Its name in messages to clients ("served by Anthropic, which has no…").
    fn name(&self) -> &'static str;

    /// The wire format its chat API speaks.
    fn dialect(&self) -> Dialect;

    /// The wire format `operation` is sent to `provider` in: the adapter's own, or
    /// another API of the provider (OpenAI's Responses API where it serves it).
    fn upstream_dialect(&self, _provider: &CompiledProvider, _operation: Operation) -> Dialect {
        self.dialect()
    }

    /// Whether `provider` has an endpoint for `operation` (a client's call, translated to
    /// this adapter's dialect when the client speaks another; the endpoints never
    /// translated only where the Provider serves them, `spec.apis`).
    fn offers(&self, provider: &CompiledProvider, operation: Operation) -> bool;

    /// The URL of `operation` for `upstream_model` on `provider`.
    fn endpoint(
        &self,
        provider: &CompiledProvider,
        operation: Operation,
        upstream_model: &str,
    ) -> String;

    /// Where `provider` keeps stored Responses API responses (`{base}/responses/{id}`),
    /// when it serves that API.
    fn responses_base(&self, _provider: &CompiledProvider) -> Option<String> {
        None
    }

    /// Headers this API needs beyond the common ones ([`headers`]): a version header,
    /// for one.
    fn extra_headers(&self, _provider: &CompiledProvider, _headers: &mut HeaderMap) {}

    /// Whether a streamed call must ask for usage explicitly (OpenAI's
    /// `stream_options.include_usage`): the gateway accounts every answer.
    fn asks_for_stream_usage(&self, _operation: Operation) -> bool {
        false
    }
}

/// The adapter of a provider type; `None` for the in-process mock.
pub fn adapter(kind: ProviderType) -> Option<&'static dyn Adapter> {
    match kind {
        ProviderType::Openai | ProviderType::OpenaiCompatible => Some(&openai::OpenAi),
        ProviderType::AzureOpenAi => Some(&azure::AzureOpenAi),
        ProviderType::Anthropic => Some(&anthropic::Anthropic),
        ProviderType::Mock => None,
    }
}

/// Headers for an upstream request: content type, the provider's credential and extra
/// headers, what its API needs, and the request id. Nothing of the client's own
/// credentials is forwarded.
pub fn headers(
    adapter: &dyn Adapter,
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
    adapter.extra_headers(provider, &mut h);
    if let Ok(v) = HeaderValue::try_from(request_id) {
        h.insert(HeaderName::from_static("x-request-id"), v);
    }
    h
}

/// Why a body could not be prepared for the upstream: a 400 for the client.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client's body is not JSON the gateway can edit.
    #[error("The request body is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The client's request has no equivalent in the upstream's dialect.
    #[error("{}", .0.0)]
    Untranslatable(Untranslatable),
}

/// The body for one upstream call and how it was made.
#[derive(Debug)]
pub struct UpstreamBody {
    /// The bytes to send.
    pub bytes: Bytes,
    /// Whether the gateway asked for a usage chunk the client did not (it is removed from
    /// the stream again).
    pub injected_usage: bool,
    /// A translated Responses request, echoed in its answers.
    pub echo: Option<Box<crate::dialects::responses::Echo>>,
    /// The tool standing in for structured output the upstream's dialect lacks.
    pub answer_tool: Option<String>,
}

/// Prepares the client's `body` (in the `operation`'s dialect) for `adapter`, for
/// `upstream_model`. The same dialect is a passthrough: the client's bytes untouched, or
/// copied with only `model` (and a stream's usage request) changed; another dialect goes
/// through the canonical model.
pub fn request_body(
    adapter: &dyn Adapter,
    provider: &CompiledProvider,
    operation: Operation,
    head: &RequestHead,
    body: &Bytes,
    upstream_model: &str,
) -> Result<UpstreamBody, BodyError> {
    let client = operation.client_dialect();
    let upstream = adapter.upstream_dialect(provider, operation);
    if client != upstream {
        let value: serde_json::Value = serde_json::from_slice(body)?;
        let mut request = client
            .parse_request(&value)
            .map_err(BodyError::Untranslatable)?;
        // Messages have no structured output: a tool the model must call carries it.
        let answer_tool = (upstream == Dialect::Anthropic)
            .then(|| request.output_as_tool())
            .flatten();
        let out = upstream.render_request(&request, upstream_model);
        return Ok(UpstreamBody {
            bytes: Bytes::from(serde_json::to_vec(&out)?),
            answer_tool,
            injected_usage: false,
            echo: (client == Dialect::Responses)
                .then(|| Box::new(crate::dialects::responses::Echo::of(&value, &head.model))),
        });
    }
    let injected_usage =
        head.stream && !head.include_usage() && adapter.asks_for_stream_usage(operation);
    let bytes = if injected_usage {
        passthrough_with_usage(body, upstream_model)?
    } else {
        passthrough(body, &head.model, upstream_model)?
    };
    Ok(UpstreamBody {
        bytes,
        injected_usage,
        echo: None,
        answer_tool: None,
    })
}

/// Whether a call from `operation` to `adapter` edits the client's body (renames the
/// model or asks for usage) rather than passing its bytes on.
pub fn edits_body(
    adapter: &dyn Adapter,
    operation: Operation,
    head: &RequestHead,
    renamed: bool,
) -> bool {
    renamed || (head.stream && !head.include_usage() && adapter.asks_for_stream_usage(operation))
}

/// The body to send: the client's bytes untouched when the upstream model name is the one
/// the client sent, otherwise with `model` replaced (the rest copied as it came, no tree).
pub fn passthrough(
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

/// The body of a stream with `stream_options.include_usage` set, so the gateway can
/// account the answer, and `model` set to `upstream_model`.
pub fn passthrough_with_usage(
    original: &Bytes,
    upstream_model: &str,
) -> Result<Bytes, serde_json::Error> {
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

#[cfg(test)]
mod tests;
