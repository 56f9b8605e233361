//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Labels are bounded by configuration (route and provider ids, operations, outcome
//! classes), never by what clients send: no key ids, no raw model names from requests.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::circuit::Breakers;

/// Seconds, from 5 ms to about 10 minutes: LLM calls range from cached hits to long
/// generations.
const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 600.0,
];

/// The OpenAI-style operation.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum OperationLabel {
    /// Chat completions.
    chat_completions,
    /// Legacy completions.
    completions,
    /// Embeddings.
    embeddings,
    /// Anthropic messages.
    messages,
    /// OpenAI Responses.
    responses,
    /// Moderations.
    moderations,
    /// Image generations.
    images_generations,
    /// Text to speech.
    audio_speech,
    /// Audio transcriptions.
    audio_transcriptions,
    /// Anthropic token counts.
    count_tokens,
}

impl From<crate::dialects::Operation> for OperationLabel {
    fn from(operation: crate::dialects::Operation) -> Self {
        use crate::dialects::Operation;
        match operation {
            Operation::ChatCompletions => Self::chat_completions,
            Operation::Completions => Self::completions,
            Operation::Embeddings => Self::embeddings,
            Operation::Messages => Self::messages,
            Operation::Responses => Self::responses,
            Operation::Moderations => Self::moderations,
            Operation::ImageGenerations => Self::images_generations,
            Operation::AudioSpeech => Self::audio_speech,
            Operation::AudioTranscriptions => Self::audio_transcriptions,
            Operation::CountTokens => Self::count_tokens,
        }
    }
}

/// Labels of a finished client request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Operation.
    pub operation: OperationLabel,
    /// RoutePolicy id, or `none` when no route matched.
    pub route: String,
    /// Provider id that answered, or `none`.
    pub provider: String,
    /// HTTP status code.
    pub status: u16,
}

/// How an upstream attempt ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AttemptOutcome {
    /// A 2xx answer.
    success,
    /// A 4xx answer relayed to the client (the upstream judged the request).
    client_error,
    /// The connection failed.
    connect_error,
    /// No answer within the per-try or total timeout.
    timeout,
    /// A 429.
    rate_limited,
    /// A 5xx or 529.
    server_error,
    /// A 401 or 403: the Provider's credential was refused.
    credentials_rejected,
    /// A 3xx, never followed.
    redirect,
    /// A whole answer over `--max-response-bytes`.
    too_large,
    /// Skipped: the target's circuit is open.
    circuit_open,
    /// Skipped: the Provider's `maxConcurrency` is used up on this replica.
    saturated,
    /// Not sent: the target cannot take this request (no such model, no such endpoint,
    /// untranslatable).
    not_attempted,
}

impl AttemptOutcome {
    /// The label value, also the span's `error.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::success => "success",
            Self::client_error => "client_error",
            Self::connect_error => "connect_error",
            Self::timeout => "timeout",
            Self::rate_limited => "rate_limited",
            Self::server_error => "server_error",
            Self::credentials_rejected => "credentials_rejected",
            Self::redirect => "redirect",
            Self::too_large => "too_large",
            Self::circuit_open => "circuit_open",
            Self::saturated => "saturated",
            Self::not_attempted => "not_attempted",
        }
    }
}

/// Labels of an upstream attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// Provider id.
    pub provider: String,
    /// How it ended.
    pub outcome: AttemptOutcome,
}

/// Labels of token and cost counters. Owners come from ApiKey objects, so they are
/// bounded by configuration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// RoutePolicy id.
    pub route: String,
    /// Provider id that answered.
    pub provider: String,
    /// The provider's model that answered (a name from the Provider, so bounded).
    pub model: String,
    /// Key owner.
    pub owner: String,
    /// `input` or `output` (tokens); `total` (cost).
    pub kind: &'static str,
}

/// Labels of Redis calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisLabels {
    /// `admit`, `settle`, `usage`, `cache_get`, `cache_put`, `budget_read`, `ping`.
    pub operation: &'static str,
    /// `ok` or `error` (timeouts included).
    pub result: &'static str,
}

/// Latency of Redis calls.
pub type RedisLatency = Family<RedisLabels, Histogram, fn() -> Histogram>;

/// Seconds, from 100 µs to the longest sensible timeout.
fn redis_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ])
}

/// Labels of limit rejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    /// `requests`, `tokens`, `concurrency` or `budget`.
    pub limit: &'static str,
    /// `key` or `route`.
    pub scope: &'static str,
}

/// Labels of cache lookups.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// RoutePolicy id.
    pub route: String,
    /// `hit` or `miss`.
    pub result: &'static str,
}

/// Labels of guardrail hits. Rule names come from RoutePolicy and ApiKey objects, so
/// they are bounded by configuration; never the matched text.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardrailLabels {
    /// RoutePolicy id.
    pub route: String,
    /// Rule name.
    pub rule: String,
    /// `block`, `redact` or `log`.
    pub action: &'static str,
}

/// Labels naming a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// RoutePolicy id.
    pub route: String,
}

/// Labels of a routing decision: the first choice of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// RoutePolicy id.
    pub route: String,
    /// Provider chosen first.
    pub provider: String,
    /// `weighted`, `leastLatency` or `adaptive`.
    pub strategy: &'static str,
    /// Why (see `routing::Reason`).
    pub reason: &'static str,
}

/// Labels naming an upstream target of a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteTargetLabels {
    /// RoutePolicy id.
    pub route: String,
    /// Provider id.
    pub provider: String,
    /// Model name at the provider.
    pub model: String,
    /// Which moving average: `first_token` (streams) or `total`.
    pub latency: &'static str,
}

/// Labels naming an upstream target.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// `provider#model`.
    pub target: String,
}

/// Labels carrying the served configuration hash.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// First 16 hex digits of the configuration hash.
    pub config_hash: String,
}

/// Labels of configuration reloads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success`, `rejected` or `pending`.
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Seconds, from 25 µs to 1 s: the gateway's own share of a request is meant to be well
/// under a millisecond.
const OVERHEAD_BUCKETS: [f64; 14] = [
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    1.0,
];

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Client requests by operation, route, provider and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to the response head (whole answer for non-streamed calls).
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// The gateway's own time per request: total minus time waiting on upstreams.
    pub overhead: Histogram,
    /// Redis call latency by operation and result.
    pub redis_latency: RedisLatency,
    /// Time from the request to the first streamed byte.
    pub time_to_first_byte: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Upstream attempts by provider and outcome.
    pub upstream_attempts: Family<AttemptLabels, Counter>,
    /// Tokens by route, provider, owner and direction.
    pub tokens: Family<TokenLabels, Counter>,
    /// Cost by route, provider and owner, in the provider's currency.
    pub cost: Family<TokenLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Requests refused by a limit or budget.
    pub rejections: Family<RejectionLabels, Counter>,
    /// Cache lookups by route and result.
    pub cache: Family<CacheLabels, Counter>,
    /// Requests on which a guardrail rule fired, by route, rule and action.
    pub guardrail_hits: Family<GuardrailLabels, Counter>,
    /// First choices of the routing strategy, by route, provider, strategy and reason.
    pub route_decisions: Family<DecisionLabels, Counter>,
    /// Moving averages of upstream latency per route target, in seconds.
    pub target_latency: Family<RouteTargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    circuit_state: Family<TargetLabels, Gauge>,
    redis_up: Gauge,
    config_info: Family<ConfigLabels, Gauge>,
    config_keys: Gauge,
    inflight_bytes: Gauge,
    inflight_budget: Gauge,
}

impl Metrics {
    /// Counts a guardrail rule that fired and logs it, by rule name only (never the
    /// matched text); `on` is `request` or `response`.
    pub fn guardrail_hit(
        &self,
        route: &str,
        key_id: &str,
        request_id: &str,
        hit: &tollgate_api::guardrails::RuleHit,
        on: &'static str,
    ) {
        self.guardrail_hits
            .get_or_create(&GuardrailLabels {
                route: route.to_owned(),
                rule: hit.rule.clone(),
                action: hit.action.as_str(),
            })
            .inc();
        tracing::info!(
            target: "tollgate::guardrails",
            request_id,
            route,
            key_id,
            rule = %hit.rule,
            detector = hit.detector.as_str(),
            action = hit.action.as_str(),
            on,
            "guardrail hit"
        );
    }

    /// Registers every metric, including the reload counters `reloads` the configuration
    /// loader keeps.
    pub fn new(reloads: Family<ReloadLabels, Counter>) -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::default();
        registry.register(
            "requests",
            "Client requests by operation, route, answering provider and HTTP status",
            requests.clone(),
        );
        let request_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "request_duration_seconds",
            "Time until the response head was sent (the whole answer when not streamed)",
            request_duration.clone(),
        );
        let overhead = Histogram::new(OVERHEAD_BUCKETS);
        registry.register(
            "request_overhead_seconds",
            "The gateway's own time per request until the response head: total minus time waiting on upstreams (attempts and retry backoff)",
            overhead.clone(),
        );
        let redis_latency: RedisLatency =
            Family::new_with_constructor(redis_histogram as fn() -> Histogram);
        registry.register(
            "redis_call_duration_seconds",
            "Redis calls by operation and result (admission, settlement, usage, cache)",
            redis_latency.clone(),
        );
        let time_to_first_byte =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "stream_time_to_first_byte_seconds",
            "Time from the request to the first byte of a streamed answer",
            time_to_first_byte.clone(),
        );
        let upstream_attempts = Family::default();
        registry.register(
            "upstream_attempts",
            "Upstream attempts by provider and outcome",
            upstream_attempts.clone(),
        );
        let tokens = Family::default();
        registry.register(
            "tokens",
            "Tokens by route, answering provider and model, key owner and kind (input, output)",
            tokens.clone(),
        );
        let cost = Family::default();
        registry.register(
            "cost",
            "Cost by route, answering provider and model, and key owner, in the provider's currency",
            cost.clone(),
        );
        let cache = Family::default();
        registry.register(
            "cache_lookups",
            "Response cache lookups by route and result (hit, miss)",
            cache.clone(),
        );
        let rejections = Family::default();
        registry.register(
            "limit_rejections",
            "Requests refused with 429 by a limit or budget",
            rejections.clone(),
        );
        let guardrail_hits = Family::default();
        registry.register(
            "guardrail_hits",
            "Requests on which a guardrail rule fired, by route, rule and action (block, redact, log)",
            guardrail_hits.clone(),
        );
        let route_decisions = Family::default();
        registry.register(
            "route_decisions",
            "First choices of the routing strategy by route, provider, strategy and reason",
            route_decisions.clone(),
        );
        let target_latency = Family::default();
        registry.register(
            "target_latency_ewma_seconds",
            "Moving average of upstream latency per route target: time to the first token of streams (latency=\"first_token\") and to whole answers and completed streams (latency=\"total\")",
            target_latency.clone(),
        );
        let circuit_state = Family::default();
        registry.register(
            "circuit_state",
            "Circuit breaker state per upstream target: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        let config_info = Family::default();
        registry.register(
            "config_info",
            "The configuration being served (value 1, hash as a label)",
            config_info.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration loads by result (rejected: the last good one kept serving)",
            reloads,
        );
        let redis_up = Gauge::default();
        registry.register(
            "redis_up",
            "1 when the last Redis call succeeded, 0 when it failed, -1 without Redis",
            redis_up.clone(),
        );
        let config_keys = Gauge::default();
        registry.register(
            "config_keys",
            "Client key entries in the served configuration",
            config_keys.clone(),
        );
        let inflight_bytes = Gauge::default();
        registry.register(
            "inflight_request_bytes",
            "Request memory held by requests in flight (bodies and parsed-tree estimates), against --max-inflight-bytes",
            inflight_bytes.clone(),
        );
        let inflight_budget = Gauge::default();
        registry.register(
            "inflight_request_bytes_limit",
            "The budget of request memory in flight (--max-inflight-bytes; 0 when unlimited)",
            inflight_budget.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            overhead,
            redis_latency,
            time_to_first_byte,
            upstream_attempts,
            tokens,
            cost,
            rejections,
            cache,
            guardrail_hits,
            route_decisions,
            target_latency,
            circuit_state,
            redis_up,
            config_info,
            config_keys,
            inflight_bytes,
            inflight_budget,
        }
    }

    /// Mirrors the in-flight memory budget (bytes in use, and the budget; `usize::MAX`
    /// for none) into its gauges (before `render`).
    pub fn set_memory(&self, in_use: usize, total: usize) {
        self.inflight_bytes.set(in_use as i64);
        if total != usize::MAX {
            self.inflight_budget.set(total as i64);
        }
    }

    /// Renders the text exposition, refreshing the gauges that mirror other state: the
    /// served configuration (`(hash, key count)`), the circuits, and Redis.
    pub fn render(
        &self,
        config: Option<(&str, usize)>,
        breakers: &Breakers,
        redis: Option<bool>,
    ) -> String {
        self.redis_up.set(match redis {
            None => -1,
            Some(true) => 1,
            Some(false) => 0,
        });
        self.config_info.clear();
        if let Some((hash, keys)) = config {
            self.config_info
                .get_or_create(&ConfigLabels {
                    config_hash: hash.chars().take(16).collect(),
                })
                .set(1);
            self.config_keys.set(keys as i64);
        }
        for (target, state) in breakers.states() {
            let value = match state {
                crate::circuit::State::Closed => 0,
                crate::circuit::State::Open => 1,
                crate::circuit::State::HalfOpen => 2,
            };
            self.circuit_state
                .get_or_create(&TargetLabels { target })
                .set(value);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
