//! The compiled configuration: what the operator writes and every gateway serves.
//!
//! It is split by where it may be stored: [`RoutingConfig`] (providers and routes, no
//! secrets) goes to a ConfigMap; [`CredentialsConfig`] (upstream credentials) and
//! [`KeysConfig`] (key hashes and per-key policy) go to Secrets. [`crate::parts`] turns a
//! [`GatewayConfig`] into size-bounded, hashed parts and back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::v1alpha1::{
    BudgetPeriod, CacheScope, Detector, GuardrailAction, ProviderType, RetryOn, Strategy,
    StrategyOptions,
};

/// Version of the compiled format. Gateways refuse parts of a version they do not know.
pub const SCHEMA_VERSION: u32 = 1;

/// A whole compiled configuration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct GatewayConfig {
    /// Providers and routes (ConfigMap-bound).
    pub routing: RoutingConfig,
    /// Upstream credentials (Secret-bound).
    pub credentials: CredentialsConfig,
    /// Client keys (Secret-bound, sharded).
    pub keys: KeysConfig,
}

/// Providers and routes; contains no secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingConfig {
    /// Providers by id (`namespace/name`).
    pub providers: BTreeMap<String, CompiledProvider>,
    /// Routes, sorted by id (`namespace/name`).
    pub routes: Vec<CompiledRoute>,
}

/// A Provider ready to call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledProvider {
    /// `namespace/name`.
    pub id: String,
    /// Wire protocol.
    #[serde(rename = "type")]
    pub provider_type: ProviderType,
    /// Base URL without a trailing slash (empty for `mock`).
    pub base_url: String,
    /// How the credential is sent; `None` when the Provider has no credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<CompiledAuth>,
    /// Azure `api-version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure_api_version: Option<String>,
    /// Anthropic `anthropic-version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic_version: Option<String>,
    /// Anthropic betas clients may send (unset: every one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anthropic_betas: Option<crate::v1alpha1::BetaPolicy>,
    /// The OpenAI APIs the upstream serves itself (unset: its type's defaults,
    /// `OpenAiApi::defaults`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apis: Option<Vec<crate::v1alpha1::OpenAiApi>>,
    /// Mock behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<CompiledMock>,
    /// Models by public name.
    pub models: BTreeMap<String, CompiledModel>,
    /// ISO 4217 currency of the prices.
    pub currency: String,
    /// Connect timeout.
    pub connect_timeout_ms: u64,
    /// Non-streaming response / first-byte timeout.
    pub request_timeout_ms: u64,
    /// Longest pause between stream chunks.
    pub stream_idle_timeout_ms: u64,
    /// Per-replica concurrency cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Consecutive failures that open the circuit.
    pub circuit_failure_threshold: u32,
    /// How long the circuit stays open.
    pub circuit_open_ms: u64,
    /// Extra headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// HTTP version towards the upstream.
    #[serde(
        default,
        skip_serializing_if = "crate::v1alpha1::HttpVersion::is_default"
    )]
    pub http_version: crate::v1alpha1::HttpVersion,
}

impl CompiledProvider {
    /// Whether the upstream serves `api` itself.
    pub fn serves(&self, api: crate::v1alpha1::OpenAiApi) -> bool {
        match &self.apis {
            Some(apis) => apis.contains(&api),
            None => crate::v1alpha1::OpenAiApi::defaults(self.provider_type).contains(&api),
        }
    }
}

/// Header that carries the upstream credential.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledAuth {
    /// Header name, e.g. `authorization` or `x-api-key`.
    pub header: String,
    /// Prepended to the credential, e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// Mock behaviour in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledMock {
    /// Delay before the answer.
    pub latency_ms: u64,
    /// Delay between chunks.
    pub chunk_interval_ms: u64,
    /// Completion tokens per answer.
    pub completion_tokens: u32,
    /// Fixed reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

/// One model of a Provider.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledModel {
    /// Name sent upstream.
    pub upstream_name: String,
    /// Price of a million input tokens.
    pub input_per_million: f64,
    /// Price of a million output tokens.
    pub output_per_million: f64,
    /// Price of a million cached input tokens.
    pub cached_input_per_million: f64,
    /// Price of a million input tokens written to the prompt cache (unset: the input
    /// price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_million: Option<f64>,
    /// Context window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u32>,
    /// Most tokens generated in one answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u32>,
}

/// A route ready to serve.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledRoute {
    /// `namespace/name` of the RoutePolicy.
    pub id: String,
    /// Exact model names this route owns (after conflict resolution).
    pub exact: Vec<String>,
    /// Glob patterns this route owns (after conflict resolution).
    pub globs: Vec<String>,
    /// Target choice within a tier.
    pub strategy: Strategy,
    /// Tuning of `leastLatency` and `adaptive`.
    #[serde(default, skip_serializing_if = "StrategyOptions::is_default")]
    pub strategy_options: StrategyOptions,
    /// Tiers in fallback order; each non-empty.
    pub tiers: Vec<Vec<CompiledTarget>>,
    /// Extra attempts.
    pub retry_attempts: u32,
    /// First backoff.
    pub retry_initial_backoff_ms: u64,
    /// Backoff cap.
    pub retry_max_backoff_ms: u64,
    /// Retryable failure classes.
    pub retry_on: Vec<RetryOn>,
    /// Per-attempt timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// Whole-request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_timeout_ms: Option<u64>,
    /// Cache policy, if caching is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CompiledCache>,
    /// Route-wide limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<CompiledLimits>,
    /// Whether traces record prompts and completions.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub record_content: bool,
    /// Guardrails checked on every request, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guardrails: Vec<CompiledGuardrail>,
    /// Other namespaces (or `*`) whose keys may use this route when they accept it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,
}

impl CompiledRoute {
    /// The namespace of the RoutePolicy.
    pub fn namespace(&self) -> &str {
        namespace_of(&self.id)
    }

    /// Whether keys of `namespace` may use this route (their own namespace's, or shared
    /// with it).
    pub fn usable_from(&self, namespace: &str) -> bool {
        self.namespace() == namespace || shares_with(&self.shared_with, namespace)
    }
}

/// Whether a `sharedWith` list opens to `namespace`.
pub fn shares_with(list: &[String], namespace: &str) -> bool {
    list.iter().any(|n| n == "*" || n == namespace)
}

/// The namespace part of a `namespace/name` id.
pub fn namespace_of(id: &str) -> &str {
    id.split_once('/').map_or("", |(ns, _)| ns)
}

/// One target of a route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledTarget {
    /// Provider id (`namespace/name`).
    pub provider: String,
    /// Provider model (public name); `None` means the requested model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Weight within the tier.
    pub weight: u32,
}

/// Cache policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledCache {
    /// Entry lifetime.
    pub ttl_ms: u64,
    /// Sharing scope.
    pub scope: CacheScope,
    /// Largest cached response.
    pub max_entry_bytes: u32,
}

/// Limits; `None` is unlimited.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledLimits {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Concurrent requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
}

/// Upstream credentials by provider id.
#[derive(Serialize, Deserialize, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialsConfig {
    /// Credential value by provider id.
    pub providers: BTreeMap<String, String>,
}

// Never print credentials, not even in debug output.
impl std::fmt::Debug for CredentialsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialsConfig")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Client keys.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeysConfig {
    /// Keys sorted by hash.
    pub keys: Vec<CompiledKey>,
}

/// One accepted client key (a rotated-out key in its grace period is a separate entry).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledKey {
    /// SHA-256 of the presented key, lowercase hex.
    pub sha256: String,
    /// Key id shown in logs, limits, budgets and usage (see [`crate::compile::key_id`]).
    pub id: String,
    /// `namespace/name` of the ApiKey.
    pub api_key: String,
    /// Owner, for attribution and cache scope (within the key's namespace).
    pub owner: String,
    /// Team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Allowed models (exact or globs); empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_models: Vec<String>,
    /// Other namespaces whose shared routes the key accepts, in order of precedence after
    /// its own namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_routes_from: Vec<String>,
    /// Per-key limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<CompiledLimits>,
    /// Budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<CompiledBudget>,
    /// Unix seconds after which the key is refused; the gateway checks this per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Guardrails checked after the route's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guardrails: Vec<CompiledGuardrail>,
}

/// A validated guardrail rule; [`crate::guardrails::Guardrails`] compiles a list of them
/// for the hot path.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledGuardrail {
    /// Rule name (the detector's name when the manifest gave none).
    pub name: String,
    /// What it looks for.
    pub detector: Detector,
    /// `regex`: the pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `blockedTerms`: the terms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub terms: Vec<String>,
    /// Size limits: the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// What happens on a hit.
    pub action: GuardrailAction,
    /// Whether it checks requests.
    pub request: bool,
    /// Whether it checks complete answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub response: bool,
}

/// Budget of a key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledBudget {
    /// Maximum spend per period.
    pub amount: f64,
    /// Period.
    pub period: BudgetPeriod,
    /// Currency.
    pub currency: String,
}
