//! OpenAI's API and the servers that copy it (`openai`, `openaiCompatible`): chat
//! completions, legacy completions, embeddings and, where the Provider serves it, the
//! Responses API under the Provider's `baseUrl`.

use tollgate_api::{config::CompiledProvider, v1alpha1::OpenAiApi};

use super::Adapter;
use crate::dialects::{Dialect, Operation};

/// OpenAI and OpenAI-compatible servers.
#[derive(Debug)]
pub struct OpenAi;

/// The path of `operation` under an OpenAI-style base URL (Anthropic clients' messages,
/// and Responses requests to a Provider without the Responses API, are sent as chat
/// completions, translated).
pub(super) fn path(provider: &CompiledProvider, operation: Operation) -> &'static str {
    match operation {
        Operation::Responses if provider.serves(OpenAiApi::Responses) => "responses",
        Operation::ChatCompletions | Operation::Messages | Operation::Responses => {
            "chat/completions"
        }
        Operation::Completions => "completions",
        Operation::Embeddings => "embeddings",
        Operation::Moderations => "moderations",
        Operation::ImageGenerations => "images/generations",
        Operation::AudioSpeech => "audio/speech",
        Operation::AudioTranscriptions => "audio/transcriptions",
        // Not an OpenAI endpoint, never offered (`OpenAi::offers`): counts are answered by
        // Anthropic targets or estimated.
        Operation::CountTokens => "messages/count_tokens",
    }
}

/// The API a Provider must list in `spec.apis` (or serve by default) for an endpoint
/// the gateway never translates.
pub(super) fn raw_api(operation: Operation) -> Option<OpenAiApi> {
    match operation {
        Operation::Moderations => Some(OpenAiApi::Moderations),
        Operation::ImageGenerations => Some(OpenAiApi::ImageGenerations),
        Operation::AudioSpeech => Some(OpenAiApi::AudioSpeech),
        Operation::AudioTranscriptions => Some(OpenAiApi::AudioTranscriptions),
        _ => None,
    }
}

/// The dialect `operation` is sent in: the Responses API where the Provider serves it,
/// chat completions otherwise.
pub(super) fn upstream_dialect(provider: &CompiledProvider, operation: Operation) -> Dialect {
    if operation == Operation::Responses && provider.serves(OpenAiApi::Responses) {
        Dialect::Responses
    } else {
        Dialect::OpenAi
    }
}

impl Adapter for OpenAi {
    fn name(&self) -> &'static str {
        "OpenAI-compatible API"
    }

    fn dialect(&self) -> Dialect {
        Dialect::OpenAi
    }

    fn upstream_dialect(&self, provider: &CompiledProvider, operation: Operation) -> Dialect {
        upstream_dialect(provider, operation)
    }

    fn offers(&self, provider: &CompiledProvider, operation: Operation) -> bool {
        operation != Operation::CountTokens
            && raw_api(operation).is_none_or(|api| provider.serves(api))
    }

    fn responses_base(&self, provider: &CompiledProvider) -> Option<String> {
        provider
            .serves(OpenAiApi::Responses)
            .then(|| provider.base_url.clone())
    }

    fn endpoint(&self, provider: &CompiledProvider, operation: Operation, _model: &str) -> String {
        format!("{}/{}", provider.base_url, path(provider, operation))
    }

    fn asks_for_stream_usage(&self, operation: Operation) -> bool {
        matches!(
            operation,
            Operation::ChatCompletions | Operation::Completions
        )
    }
}
