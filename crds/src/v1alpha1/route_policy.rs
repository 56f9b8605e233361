//! `RoutePolicy`: which client-facing model names go to which upstream targets, and how.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    CommonStatus, DURATION_PATTERN, Limits, MODEL_PATTERN, NAME_PATTERN, NAMESPACE_PATTERN,
    SHARE_PATTERN,
};

/// Routes client-facing model names to Provider targets, with retries, fallback, caching
/// and route-wide limits.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "RoutePolicy",
    plural = "routepolicies",
    namespaced,
    status = "RoutePolicyStatus",
    shortname = "tgr",
    category = "tollgate",
    derive = "PartialEq",
    doc = "Routes client-facing model names to Provider targets, with retries, fallback, caching and route-wide limits.",
    printcolumn = r#"{"name":"Models","type":"string","jsonPath":".spec.models"}"#,
    printcolumn = r#"{"name":"Strategy","type":"string","jsonPath":".spec.strategy"}"#,
    printcolumn = r#"{"name":"Targets","type":"integer","jsonPath":".status.readyTargets"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self.targets.exists(t, t.weight > 0)").message("at least one target needs a weight above 0").field_path(".targets")
)]
#[serde(rename_all = "camelCase")]
pub struct RoutePolicySpec {
    /// Client-facing model names this policy serves: exact names (`gpt-4o`) or globs
    /// (`gpt-4o-*`, `claude-?-*`). An exact name beats any glob; among globs the longest
    /// pattern wins. Names are per namespace: only ApiKeys of this namespace (and of
    /// namespaces it is shared with, see `sharedWith`) reach them. Two policies of one
    /// namespace claiming the same name or pattern conflict: the older one keeps it and
    /// the newer one reports `ModelConflict`.
    #[schemars(length(min = 1, max = 256), inner(length(min = 1, max = 256), regex(pattern = MODEL_PATTERN)), extend("x-kubernetes-list-type" = "set"))]
    pub models: Vec<String>,

    /// Upstream targets. Requests go to the lowest `priority` tier that has a healthy
    /// target, chosen within the tier by `strategy`; when a tier's attempts fail the next
    /// tier is tried (fallback).
    #[schemars(length(min = 1, max = 64))]
    pub targets: Vec<RouteTarget>,

    /// How a target is chosen within a priority tier: `weighted` (random, proportional to
    /// `weight`), `leastLatency` (lowest moving average of recent latency: time to the
    /// first token for streamed requests, the whole answer otherwise; a failed attempt
    /// counts as its duration plus 1 s) or `adaptive` (Thompson sampling over each
    /// target's recent success rate, scaled by its speed, and optionally its price,
    /// relative to the best of the tier). With `leastLatency` and `adaptive`, targets not
    /// yet measured are tried first and 10% of requests (`strategyOptions`) try another
    /// healthy target so a recovered one is noticed. Targets with an open circuit are
    /// tried last in their tier. Statistics are kept by each gateway replica and, with
    /// Redis, merged across replicas about once a second (off the request path; local
    /// only while Redis fails).
    #[serde(default)]
    pub strategy: Strategy,

    /// Tuning of the `leastLatency` and `adaptive` strategies (exploration, how much
    /// history counts, and the weights of latency and price in `adaptive`'s score);
    /// defaults apply when unset, and `weighted` ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_options: Option<StrategyOptions>,

    /// Retries of failed upstream attempts. Retries and fallback happen only before the
    /// first byte is sent to the client.
    #[serde(default)]
    pub retries: Retries,

    /// Per-attempt and total timeouts; the Provider's timeouts still apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,

    /// Response caching; unset disables the cache for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CachePolicy>,

    /// Limits shared by every caller of this route, across all gateway replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<Limits>,

    /// What traces of this route may record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<RouteTelemetry>,

    /// Other namespaces whose ApiKeys may use this route (`*` for every namespace), when
    /// they accept it by listing this namespace in their `sharedRoutesFrom`. Empty (the
    /// default): only ApiKeys of this namespace. A key always resolves names among its
    /// own namespace's routes first, so a shared route never shadows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63), regex(pattern = SHARE_PATTERN)), extend("x-kubernetes-list-type" = "set"))]
    pub shared_with: Vec<String>,

    /// Content rules checked on every request's text before it is forwarded, and
    /// optionally on complete answers (PII, secrets, prompt injection, blocked terms,
    /// size limits), in order; the first `block` wins. An invalid rule keeps the whole
    /// route from being served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub guardrails: Vec<super::guardrails::Guardrail>,
}

/// Trace recording of a route.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTelemetry {
    /// Record prompts and non-streamed completions on trace spans
    /// (`gen_ai.input.messages`, `gen_ai.output.messages`). Off by default: they may hold
    /// personal or confidential data, and traces often have wider access than the API.
    #[serde(default)]
    pub record_content: bool,
}

/// One upstream target of a route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTarget {
    /// Name of the Provider.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub provider: String,
    /// Namespace of the Provider; defaults to this RoutePolicy's. A Provider in another
    /// namespace must list this namespace in its `sharedWith`, else the target reports
    /// `RefNotPermitted` and is left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = NAMESPACE_PATTERN))]
    pub provider_namespace: Option<String>,
    /// Model of that Provider (its `models[].name`). Defaults to the model the client
    /// asked for, which must then be one of the Provider's models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = MODEL_PATTERN))]
    pub model: Option<String>,
    /// Relative share of traffic within the tier (`weighted` strategy); 0 drains the
    /// target while keeping it as a fallback candidate.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 10000))]
    pub weight: u32,
    /// Fallback tier: 0 is tried first, then 1, and so on.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub priority: u32,
}

fn default_weight() -> u32 {
    1
}

/// How a target is chosen within a priority tier.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    /// Random choice proportional to `weight`.
    #[default]
    Weighted,
    /// The target with the lowest recent latency, ignoring weights. Two exponentially
    /// weighted moving averages are kept per target: time to the first token of streams,
    /// and total time of whole answers and of completed streams. Streamed requests are
    /// ranked by the first, others by the second. Targets without measurements are tried
    /// first, and 10% of requests go to another healthy target so a recovered one is
    /// noticed.
    LeastLatency,
    /// A Thompson-sampling bandit: each target's recent success rate (a Beta posterior
    /// whose past fades) is sampled and scaled by its latency (as for `leastLatency`) and
    /// optionally its price relative to the best target of the tier; the best score is
    /// tried first. 10% of requests explore another healthy target so a recovered one is
    /// noticed.
    Adaptive,
}

/// Tuning of the `leastLatency` and `adaptive` strategies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StrategyOptions {
    /// Percentage of requests whose first attempt goes to another healthy target of the
    /// tier than the strategy's best, so that a target that recovered is noticed. 0 turns
    /// exploration off: a target that fell behind is then retried only when the others
    /// degrade.
    #[serde(default = "default_exploration_percent")]
    #[schemars(range(min = 0, max = 50))]
    pub exploration_percent: u32,
    /// Roughly how many recent attempts of a target its statistics reflect: each attempt
    /// weighs 2/(memory+1) in the latency averages, and the success tally keeps
    /// (memory-1)/memory of its past at each new outcome. Smaller values react faster to
    /// a change and are noisier.
    #[serde(default = "default_memory")]
    #[schemars(range(min = 1, max = 100))]
    pub memory: u32,
    /// `adaptive` only: how much latency counts, in percent. A target's sampled success
    /// rate is multiplied by (fastest latency of the tier / its latency) to the power
    /// latencyWeight/100: at 50 a target four times slower than the fastest scores half,
    /// at 100 a quarter, at 0 latency is ignored.
    #[serde(default = "default_latency_weight")]
    #[schemars(range(min = 0, max = 400))]
    pub latency_weight: u32,
    /// `adaptive` only: how much price counts, in percent, like `latencyWeight`: the score
    /// is also multiplied by (cheapest price of the tier / its price) to the power
    /// costWeight/100, where a target's price is its model's input plus output price per
    /// million tokens (the Provider's `models[].pricing`). 0 ignores price; a target
    /// without a price counts as the cheapest.
    #[serde(default)]
    #[schemars(range(min = 0, max = 400))]
    pub cost_weight: u32,
}

fn default_exploration_percent() -> u32 {
    10
}
fn default_memory() -> u32 {
    5
}
fn default_latency_weight() -> u32 {
    50
}

impl Default for StrategyOptions {
    fn default() -> Self {
        Self {
            exploration_percent: default_exploration_percent(),
            memory: default_memory(),
            latency_weight: default_latency_weight(),
            cost_weight: 0,
        }
    }
}

impl StrategyOptions {
    /// Whether these are the defaults (left out of compiled configuration).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Share of requests that explore, in `[0, 0.5]`.
    pub fn exploration(&self) -> f64 {
        f64::from(self.exploration_percent.min(50)) / 100.0
    }

    /// Weight of a new sample in the latency moving averages, in `(0, 1]`.
    pub fn ewma_alpha(&self) -> f64 {
        2.0 / (f64::from(self.memory.max(1)) + 1.0)
    }

    /// Factor applied to the success/failure tally before each new outcome, in `[0, 1)`.
    pub fn outcome_decay(&self) -> f64 {
        1.0 - 1.0 / f64::from(self.memory.max(1))
    }

    /// Exponent of relative speed in the `adaptive` score.
    pub fn latency_exponent(&self) -> f64 {
        f64::from(self.latency_weight) / 100.0
    }

    /// Exponent of relative price in the `adaptive` score.
    pub fn cost_exponent(&self) -> f64 {
        f64::from(self.cost_weight) / 100.0
    }
}

impl Strategy {
    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Weighted => "weighted",
            Self::LeastLatency => "leastLatency",
            Self::Adaptive => "adaptive",
        }
    }
}

/// Retry policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("duration(self.maxBackoff) >= duration(self.initialBackoff)").message("maxBackoff must not be shorter than initialBackoff")
)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Extra attempts after the first, across all targets and tiers (0 disables retries).
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// Backoff before the first retry; it doubles on each retry, with full jitter.
    #[serde(default = "default_initial_backoff")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub initial_backoff: String,
    /// Upper bound of the backoff.
    #[serde(default = "default_max_backoff")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_backoff: String,
    /// Failures that are retried.
    #[serde(default = "default_retry_on")]
    #[schemars(length(max = 8))]
    pub retry_on: Vec<RetryOn>,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            retry_on: default_retry_on(),
        }
    }
}

fn default_attempts() -> u32 {
    2
}
fn default_initial_backoff() -> String {
    "100ms".to_owned()
}
fn default_max_backoff() -> String {
    "2s".to_owned()
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectError,
        RetryOn::Timeout,
        RetryOn::RateLimited,
        RetryOn::ServerError,
    ]
}

/// A retryable failure class.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RetryOn {
    /// Connection refused, reset or TLS failure before a response.
    ConnectError,
    /// No response within the attempt timeout.
    Timeout,
    /// HTTP 429 from the upstream (its `Retry-After` is honoured).
    RateLimited,
    /// HTTP 500, 502, 503, 504 and Anthropic's 529.
    ServerError,
}

/// Route timeouts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteTimeouts {
    /// Limit for one upstream attempt (until the full response, or the first streamed byte).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub per_try: Option<String>,
    /// Limit for the whole request including retries and fallback (until the first byte
    /// for streams).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub total: Option<String>,
}

/// Response cache policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicy {
    /// How long a cached answer is served.
    #[serde(default = "default_cache_ttl")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub ttl: String,
    /// Who shares cache entries: `owner` (keys with the same `owner` in the same
    /// namespace; default), `key` (each key alone), `namespace` (every key of the caller's
    /// namespace) or `shared` (every key that may use this route, which includes the
    /// namespaces it is shared with; only for non-sensitive data). No scope ever joins
    /// keys of two namespaces unless the route is shared with both.
    #[serde(default)]
    pub scope: CacheScope,
    /// Responses larger than this are not cached.
    #[serde(default = "default_cache_max_entry")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_entry_bytes: u32,
}

fn default_cache_ttl() -> String {
    "5m".to_owned()
}
fn default_cache_max_entry() -> u32 {
    1_048_576
}

/// Who shares cache entries.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CacheScope {
    /// Keys with the same `owner` in the same namespace share entries.
    #[default]
    Owner,
    /// Every key has its own entries.
    Key,
    /// Keys of the same namespace share entries.
    Namespace,
    /// Every key that may use the route shares entries.
    Shared,
}

/// Observed state of a RoutePolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutePolicyStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Targets compiled into the served configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_targets: Option<u32>,
}
