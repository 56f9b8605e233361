//! Azure OpenAI: OpenAI's wire format, one deployment per model in the URL, and the API
//! version as a query parameter.

use tollgate_api::config::CompiledProvider;

use super::{Adapter, openai};
use crate::dialects::{Dialect, Operation};

/// Azure OpenAI.
#[derive(Debug)]
pub struct AzureOpenAi;

impl Adapter for AzureOpenAi {
    fn name(&self) -> &'static str {
        "Azure OpenAI"
    }

    fn dialect(&self) -> Dialect {
        Dialect::OpenAi
    }

    fn offers(&self, _operation: Operation) -> bool {
        true
    }

    /// The upstream model name is the deployment's.
    fn endpoint(
        &self,
        provider: &CompiledProvider,
        operation: Operation,
        deployment: &str,
    ) -> String {
        format!(
            "{}/openai/deployments/{deployment}/{}?api-version={}",
            provider.base_url,
            openai::path(operation),
            provider.azure_api_version.as_deref().unwrap_or_default()
        )
    }

    fn asks_for_stream_usage(&self, operation: Operation) -> bool {
        operation != Operation::Embeddings
    }
}
