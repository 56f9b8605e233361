//! OpenAI's API and the servers that copy it (`openai`, `openaiCompatible`): chat
//! completions, legacy completions and embeddings under the Provider's `baseUrl`.

use tollgate_api::config::CompiledProvider;

use super::Adapter;
use crate::dialects::{Dialect, Operation};

/// OpenAI and OpenAI-compatible servers.
#[derive(Debug)]
pub struct OpenAi;

/// The path of `operation` under an OpenAI-style base URL (Anthropic clients' messages are
/// sent as chat completions, translated).
pub(super) fn path(operation: Operation) -> &'static str {
    match operation {
        Operation::ChatCompletions | Operation::Messages => "chat/completions",
        Operation::Completions => "completions",
        Operation::Embeddings => "embeddings",
    }
}

impl Adapter for OpenAi {
    fn name(&self) -> &'static str {
        "OpenAI-compatible API"
    }

    fn dialect(&self) -> Dialect {
        Dialect::OpenAi
    }

    fn offers(&self, _operation: Operation) -> bool {
        true
    }

    fn endpoint(&self, provider: &CompiledProvider, operation: Operation, _model: &str) -> String {
        format!("{}/{}", provider.base_url, path(operation))
    }

    fn asks_for_stream_usage(&self, operation: Operation) -> bool {
        operation != Operation::Embeddings
    }
}
