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

    fn upstream_dialect(&self, provider: &CompiledProvider, operation: Operation) -> Dialect {
        openai::upstream_dialect(provider, operation)
    }

    fn offers(&self, provider: &CompiledProvider, operation: Operation) -> bool {
        operation != Operation::CountTokens
            && openai::raw_api(operation).is_none_or(|api| provider.serves(api))
    }

    fn responses_base(&self, provider: &CompiledProvider) -> Option<String> {
        provider
            .serves(tollgate_api::v1alpha1::OpenAiApi::Responses)
            .then(|| format!("{}/openai/v1", provider.base_url))
    }

    /// The upstream model name is the deployment's (in the path; for the Responses API,
    /// Azure's v1 API, in the body).
    fn endpoint(
        &self,
        provider: &CompiledProvider,
        operation: Operation,
        deployment: &str,
    ) -> String {
        if self.upstream_dialect(provider, operation) == Dialect::Responses {
            return format!("{}/openai/v1/responses", provider.base_url);
        }
        format!(
            "{}/openai/deployments/{deployment}/{}?api-version={}",
            provider.base_url,
            openai::path(provider, operation),
            provider.azure_api_version.as_deref().unwrap_or_default()
        )
    }

    fn asks_for_stream_usage(&self, operation: Operation) -> bool {
        matches!(
            operation,
            Operation::ChatCompletions | Operation::Completions
        )
    }
}
