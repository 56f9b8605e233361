//! Sending one client request to its route's targets: attempt order, retries with backoff,
//! fallback across tiers, timeouts, and relaying the answer (streamed as it arrives).
//!
//! Retries and fallback happen only before anything has been sent to the client: once a
//! stream has started, a failure ends it with an error event instead.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::StatusCode;
use tollgate_api::{
    config::{CompiledMock, CompiledRoute},
    v1alpha1::RetryOn,
};
use tracing::Instrument;

use crate::{
    accounting::{Accounting, Usage},
    dialects::{Client, Dialect, Operation},
    error::ApiError,
    metrics::{AttemptLabels, AttemptOutcome, DecisionLabels, Metrics},
    providers::{self, mock},
    relay::{self, Conversion, FirstByte, StreamGuards, StreamTranslator, WholeError},
    request::RequestHead,
    routing::{Observed, Planned, Tuning, backoff, plan},
    snapshot::Snapshot,
    target_stats::{Latency, Slot, StreamFeedback},
    targets::Provider,
    targets::{Fit, Health, Need, ProviderModel, ResolvedTarget, Route},
    upstream,
};

/// Longest upstream `Retry-After` the gateway waits for before retrying the same target.
const MAX_RETRY_AFTER_WAIT: Duration = Duration::from_secs(10);

/// One request on its way upstream.
#[derive(Debug)]
pub struct Forward<'a> {
    /// The configuration it is served with.
    pub snapshot: &'a Snapshot,
    /// Its route.
    pub route: &'a Route,
    /// Parsed head of the body.
    pub head: &'a RequestHead,
    /// The original body.
    pub body: Bytes,
    /// Request id, forwarded upstream.
    pub request_id: String,
    /// Largest upstream answer read whole.
    pub max_response_bytes: usize,
    /// The operation.
    pub operation: Operation,
    /// Circuit breakers and routing statistics.
    pub health: &'a Health,
    /// Metrics.
    pub metrics: &'a Arc<Metrics>,
    /// When the gateway received the request.
    pub started: Instant,
    /// Estimated prompt tokens (stands in until the answer reports its usage).
    pub prompt_estimate: u64,
    /// Where time spent on upstreams is added up.
    pub timing: &'a Timing,
    /// The caller's trace context, propagated upstream.
    pub trace: &'a opentelemetry::Context,
    /// Response guardrails for streamed answers (whole answers are checked by the
    /// caller).
    pub answers: Option<Arc<crate::stream_guard::AnswerRules>>,
    /// A Responses API request: where stored responses are recorded, for whom, and the
    /// Provider a continued conversation must go back to.
    pub stored: Option<Stored>,
    /// An Anthropic client's version, betas and query string, for Anthropic targets.
    pub anthropic: Option<providers::anthropic::ClientHints>,
    /// What the request needs of its targets' context windows and output limits, when
    /// some target declares them and the request might exceed one ([`need`]).
    pub need: Option<Need>,
    /// A multipart upload, encoded again for each attempt (its `body` is empty).
    pub form: Option<&'a crate::multipart::Form>,
}

/// What a request on `route` needs of its targets' model limits, when one of them
/// declares some and the request might not fit it: `None` when no target has limits, or
/// when even the byte count of the body (an upper bound of its tokens) fits them all.
pub fn need(route: &Route, head: &RequestHead, body: &[u8]) -> Option<Need> {
    let rough = Need {
        prompt: crate::request::estimate_prompt_tokens(body),
        output: head.max_tokens,
    };
    // On the request path: no allocation, and nothing parsed, unless some target's
    // limits might be exceeded.
    let fits_all = route
        .targets
        .iter()
        .flatten()
        .filter_map(|t| t.model(&head.model))
        .all(|m| m.fit(&rough) == Fit::Fits);
    if fits_all {
        return None;
    }
    Some(Need {
        prompt: crate::request::text_tokens_estimate(body).unwrap_or(rough.prompt),
        ..rough
    })
}

/// Drops from `order` the targets whose model the request does not fit (a context-window
/// fallback: what remains is tried in order), marking a new first choice as such. When
/// nothing remains, the error says why.
fn fitting(
    order: &mut Vec<Planned<'_, ResolvedTarget>>,
    need: &Need,
    requested: &str,
) -> Result<(), ApiError> {
    let (mut window, mut output) = (None::<u64>, None::<u64>);
    let before = order.len();
    let first = order.first().map(|p| std::ptr::from_ref(p.target));
    order.retain(|p| match p.target.model(requested).map(|m| m.fit(need)) {
        Some(Fit::TooLong { window: w }) => {
            window = Some(window.map_or(w, |x| x.max(w)));
            false
        }
        Some(Fit::OutputTooLarge { max }) => {
            output = Some(output.map_or(max, |x| x.max(max)));
            false
        }
        _ => true,
    });
    let dropped = order.len() < before;
    if let Some(p) = order.first_mut()
        && dropped
        && first != Some(std::ptr::from_ref(p.target))
    {
        p.reason = crate::routing::Reason::ContextWindow;
    }
    if !order.is_empty() {
        return Ok(());
    }
    Err(match (window, output) {
        (Some(window), _) => ApiError::ContextLengthExceeded {
            window,
            prompt: need.prompt,
            output: need.output.unwrap_or(0),
        },
        (None, Some(max)) => ApiError::OutputLimitExceeded {
            max,
            requested: need.output.unwrap_or(0),
        },
        (None, None) => ApiError::ModelNotFound(requested.to_owned()),
    })
}

/// What a Responses API request needs of the stored-response records.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The records.
    pub store: Arc<crate::stored_responses::StoredResponses>,
    /// The key's owner scope.
    pub scope: String,
    /// The Provider that stores the response this request continues
    /// (`previous_response_id`): the only target it may go to.
    pub pinned: Option<String>,
}

impl Forward<'_> {
    /// The client, as its answers are rendered (`echo`: a translated Responses request).
    fn client(&self, echo: Option<Box<crate::dialects::responses::Echo>>) -> Client {
        Client {
            dialect: self.operation.client_dialect(),
            model: self.head.model.clone(),
            include_usage: self.head.include_usage(),
            echo,
            answer_tool: None,
        }
    }

    /// A fresh guard for one streamed answer in the client's dialect.
    fn answer_guard(&self) -> Option<crate::stream_guard::StreamGuard> {
        self.answers.as_ref().map(|rules| {
            crate::stream_guard::StreamGuard::new(rules.clone(), self.operation.client_dialect())
        })
    }
}

/// Time a request spent waiting on upstreams (attempts, including failed ones, and the
/// backoff between them) and how many attempts it made. What remains of its total time is
/// the gateway's own overhead.
#[derive(Debug, Default)]
pub struct Timing {
    upstream_nanos: std::sync::atomic::AtomicU64,
    attempts: std::sync::atomic::AtomicU32,
}

impl Timing {
    fn wait(&self, d: Duration) {
        self.upstream_nanos.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Time spent waiting on upstreams.
    pub fn upstream(&self) -> Duration {
        Duration::from_nanos(
            self.upstream_nanos
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Upstream attempts made (mock answers included).
    pub fn attempts(&self) -> u32 {
        self.attempts.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Response extension naming the provider that answered, for metrics and logs.
#[derive(Debug, Clone)]
pub struct AnsweredBy(pub String);

/// Why an attempt failed.
#[derive(Debug)]
enum Failure {
    Connect(String),
    Timeout,
    RateLimited(Option<Duration>),
    Server(StatusCode),
    Credentials(String),
    Unsupported(String),
    NoModel(String),
    BadRequest(String),
    CircuitOpen(String),
    Saturated(String),
    /// A whole answer larger than `--max-response-bytes`.
    TooLarge(String, usize),
    /// A 3xx: redirects are never followed (they could carry the credential elsewhere).
    Redirect(String, StatusCode),
    /// An `anthropic-beta` the Provider's policy refuses (another target may allow it).
    BetaRefused(String),
}

impl Failure {
    fn retryable(&self, retry_on: &[RetryOn]) -> bool {
        match self {
            Self::Connect(_) => retry_on.contains(&RetryOn::ConnectError),
            Self::Timeout => retry_on.contains(&RetryOn::Timeout),
            Self::RateLimited(_) => retry_on.contains(&RetryOn::RateLimited),
            Self::Server(_) => retry_on.contains(&RetryOn::ServerError),
            // Another target may be configured correctly: move on without counting on luck.
            Self::Credentials(_)
            | Self::Unsupported(_)
            | Self::NoModel(_)
            | Self::BetaRefused(_) => true,
            // The same request would most likely get the same answer again.
            Self::BadRequest(_) | Self::TooLarge(..) | Self::Redirect(..) => false,
            Self::CircuitOpen(_) | Self::Saturated(_) => true,
        }
    }

    /// The metric label of this failure.
    fn outcome(&self) -> AttemptOutcome {
        match self {
            Self::Connect(_) => AttemptOutcome::connect_error,
            Self::Timeout => AttemptOutcome::timeout,
            Self::RateLimited(_) => AttemptOutcome::rate_limited,
            Self::Server(_) => AttemptOutcome::server_error,
            Self::TooLarge(..) => AttemptOutcome::too_large,
            Self::Redirect(..) => AttemptOutcome::redirect,
            Self::Credentials(_) => AttemptOutcome::credentials_rejected,
            Self::Saturated(_) => AttemptOutcome::saturated,
            Self::CircuitOpen(_) => AttemptOutcome::circuit_open,
            Self::Unsupported(_)
            | Self::NoModel(_)
            | Self::BadRequest(_)
            | Self::BetaRefused(_) => AttemptOutcome::not_attempted,
        }
    }

    /// Whether the upstream was actually called (and so the failure says something about
    /// its health).
    fn reached_upstream(&self) -> bool {
        matches!(
            self,
            Self::Connect(_)
                | Self::Timeout
                | Self::RateLimited(_)
                | Self::Server(_)
                | Self::Credentials(_)
                | Self::TooLarge(..)
                | Self::Redirect(..)
        )
    }

    fn into_error(self) -> ApiError {
        match self {
            Self::Connect(provider) => ApiError::Upstream(format!(
                "The upstream provider {provider} could not be reached."
            )),
            Self::Timeout => ApiError::UpstreamTimeout,
            Self::RateLimited(after) => ApiError::UpstreamRateLimited(after),
            Self::Server(status) => ApiError::Upstream(format!(
                "The upstream provider failed with HTTP {}.",
                status.as_u16()
            )),
            Self::Credentials(provider) => ApiError::Upstream(format!(
                "The upstream provider {provider} rejected the gateway's credentials."
            )),
            Self::Unsupported(message) => ApiError::NotImplemented(message),
            Self::NoModel(model) => ApiError::ModelNotFound(model),
            Self::BadRequest(message) => ApiError::bad_request(message, None),
            Self::BetaRefused(message) => ApiError::bad_request(message, Some("anthropic-beta")),
            Self::CircuitOpen(provider) => ApiError::UpstreamUnavailable(format!(
                "The upstream provider {provider} is failing and temporarily not called (circuit open); retry later."
            )),
            Self::TooLarge(provider, limit) => ApiError::Upstream(format!(
                "The upstream provider {provider} answered with more than the gateway's limit of {limit} bytes."
            )),
            Self::Saturated(provider) => ApiError::UpstreamUnavailable(format!(
                "The upstream provider {provider} is at its concurrency limit; retry later."
            )),
            Self::Redirect(provider, status) => ApiError::Upstream(format!(
                "The upstream provider {provider} answered with a redirect (HTTP {}), which the gateway never follows; check the Provider's baseUrl.",
                status.as_u16()
            )),
        }
    }
}

/// Tries the route's targets in order until one answers. `accounting` (when limits or
/// budgets apply) is settled with the answer's usage, or refunded when nothing answers.
pub async fn forward(
    req: Forward<'_>,
    mut accounting: Option<Accounting>,
) -> Result<Response, ApiError> {
    let route = req.route;
    let mut rng = fastrand::Rng::new();
    let mut order = plan_attempts(&req, &mut rng);
    if let Some(need) = &req.need {
        fitting(&mut order, need, &req.head.model)?;
    }
    let Some(first) = order.first() else {
        return Err(ApiError::ModelNotFound(req.head.model.clone()));
    };
    req.metrics
        .route_decisions
        .get_or_create(&DecisionLabels {
            route: route.id.clone(),
            provider: first.target.config.provider.clone(),
            strategy: route.strategy.as_str(),
            reason: first.reason.as_str(),
        })
        .inc();
    let deadline = route
        .total_timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let budget = 1 + route.retry_attempts as usize;
    let mut last: Option<(Failure, &str)> = None;
    let mut attempts = 0;
    // Targets skipped without an attempt (open circuit, no free slot) do not use up the
    // retry budget, but each position is visited a bounded number of times.
    for planned in order.iter().cycle().take(budget + order.len()) {
        if attempts >= budget {
            break;
        }
        let Some(target) = Target::of(&req, planned) else {
            continue;
        };
        let provider_id = planned.target.config.provider.as_str();
        let failure = match target.model.as_ref() {
            None => Failure::NoModel(req.head.model.clone()),
            Some(model) if !model.breaker.allow() => Failure::CircuitOpen(provider_id.to_owned()),
            Some(model) => {
                if attempts > 0 {
                    let wait = retry_wait(route, attempts, &last, provider_id, &mut rng);
                    if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                        model.breaker.release();
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    req.timing.wait(wait);
                }
                let why = last.as_ref().map(|(f, _)| f.outcome());
                match attempt(
                    &req,
                    &target,
                    model,
                    attempts,
                    why,
                    deadline,
                    &mut accounting,
                )
                .await
                {
                    Ok(response) => return Ok(response),
                    Err(failure) => {
                        if failure.reached_upstream() || matches!(failure, Failure::BadRequest(_)) {
                            attempts += 1;
                        }
                        failure
                    }
                }
            }
        };
        count_attempt(&req, provider_id, failure.outcome());
        tracing::debug!(attempts, provider = %provider_id, ?failure, "upstream attempt failed");
        let retryable = failure.retryable(&route.retry_on);
        last = Some((failure, provider_id));
        if !retryable {
            break;
        }
    }
    Err(last.map_or(ApiError::UpstreamTimeout, |(f, _)| f.into_error()))
}

/// The attempt order of a request: the route's strategy over its targets' statistics,
/// circuits and prices.
fn plan_attempts<'a>(
    req: &Forward<'a>,
    rng: &mut fastrand::Rng,
) -> Vec<Planned<'a, ResolvedTarget>> {
    let route = req.route;
    // `weighted` needs only the circuits: no statistics lookup on its requests.
    let measured = route.strategy != tollgate_api::v1alpha1::Strategy::Weighted;
    let priced = measured && route.strategy_options.cost_weight > 0;
    let mut order = plan(
        &route.targets,
        route.strategy,
        &Tuning {
            options: &route.strategy_options,
            latency: Latency::of_request(req.head.stream),
        },
        |t| {
            let model = t.model(&req.head.model);
            Observed {
                stats: measured
                    .then(|| t.stats(&route.id, &req.head.model, &req.health.stats).get())
                    .flatten(),
                open: model
                    .as_ref()
                    .is_some_and(|m| m.breaker.state() == crate::circuit::State::Open),
                price: priced
                    .then(|| model.and_then(|m| m.pricing.weight()))
                    .flatten(),
            }
        },
        rng,
    );
    // A continued conversation lives at the Provider that stored it.
    if let Some(pinned) = req.stored.as_ref().and_then(|s| s.pinned.as_deref()) {
        order.retain(|p| p.target.config.provider == pinned);
    }
    order
}

/// Backoff before retry number `attempts`, at least what the target said to wait when it
/// was the one that just answered 429 (up to [`MAX_RETRY_AFTER_WAIT`]).
fn retry_wait(
    route: &Route,
    attempts: usize,
    last: &Option<(Failure, &str)>,
    provider: &str,
    rng: &mut fastrand::Rng,
) -> Duration {
    let wait = backoff(
        attempts as u32,
        route.retry_initial_backoff_ms,
        route.retry_max_backoff_ms,
        rng,
    );
    match last {
        Some((Failure::RateLimited(Some(after)), p)) if *p == provider => {
            wait.max((*after).min(MAX_RETRY_AFTER_WAIT))
        }
        _ => wait,
    }
}

/// One planned target, resolved for this request.
struct Target<'a> {
    planned: &'a Planned<'a, ResolvedTarget>,
    provider: &'a Arc<Provider>,
    /// The model at the provider (the target's own or the requested one).
    model_name: &'a str,
    /// `None` when the provider does not serve it.
    model: Option<Arc<ProviderModel>>,
}

impl<'a> Target<'a> {
    /// `None` when the configuration lacks the target's provider.
    fn of(req: &'a Forward<'_>, planned: &'a Planned<'a, ResolvedTarget>) -> Option<Self> {
        let target = planned.target;
        Some(Self {
            planned,
            provider: target.provider.as_ref()?,
            model_name: target.model_name(&req.head.model),
            model: target.model(&req.head.model),
        })
    }

    fn id(&self) -> &'a str {
        &self.planned.target.config.provider
    }
}

/// Counts an attempt in `tollgate_upstream_attempts_total`.
fn count_attempt(req: &Forward<'_>, provider: &str, outcome: AttemptOutcome) {
    req.metrics
        .upstream_attempts
        .get_or_create(&AttemptLabels {
            provider: provider.to_owned(),
            outcome,
        })
        .inc();
}

/// One attempt at one target, in its own span, with what it teaches the breaker, the
/// routing statistics and the metrics. The breaker has let it through.
async fn attempt(
    req: &Forward<'_>,
    target: &Target<'_>,
    model: &Arc<ProviderModel>,
    attempts: usize,
    retry_of: Option<AttemptOutcome>,
    deadline: Option<Instant>,
    accounting: &mut Option<Accounting>,
) -> Result<Response, Failure> {
    let (route, provider) = (req.route, target.provider);
    let stats = target
        .planned
        .target
        .stats(&route.id, &req.head.model, &req.health.stats);
    req.timing
        .attempts
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    // One client span per attempt (GenAI conventions), with why it is a retry.
    let span = tracing::info_span!(
        "upstream",
        otel.name = %format_args!("{} {}", req.operation.genai_operation(), target.model_name),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        { crate::telemetry::attr::OPERATION_NAME } = req.operation.genai_operation(),
        { crate::telemetry::attr::PROVIDER_NAME } = provider.config.provider_type.genai_name(),
        // The older name of the same attribute, still read by many backends.
        "gen_ai.system" = provider.config.provider_type.genai_name(),
        { crate::telemetry::attr::REQUEST_MODEL } = target.model_name,
        "tollgate.provider" = target.id(),
        "tollgate.attempt" = attempts as i64 + 1,
        // Priority tier of the target: above 0 is a fallback.
        "tollgate.tier" = target.planned.tier as i64,
        "tollgate.strategy" = route.strategy.as_str(),
        // Why this target holds its place (`retry` past the first of its tier).
        "tollgate.route_reason" = target.planned.reason.as_str(),
        "tollgate.retry_reason" = retry_of.map(AttemptOutcome::as_str),
        "http.response.status_code" = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
    );
    let outcome = attempt_once(req, provider, model, &stats, deadline, started, accounting)
        .instrument(span.clone())
        .await;
    let elapsed = started.elapsed();
    req.timing.wait(elapsed);
    let options = &route.strategy_options;
    match outcome {
        Ok(mut response) => {
            span.record(
                "http.response.status_code",
                i64::from(response.status().as_u16()),
            );
            model.breaker.success();
            // A relayed stream reports its first token and its end itself.
            if response
                .extensions_mut()
                .remove::<ReportsItself>()
                .is_none()
            {
                stats.record(req.metrics, |s| {
                    s.observe_outcome(true, options);
                    s.observe_latency(Latency::Total, elapsed, options);
                });
            }
            let outcome = if response.status().is_success() {
                AttemptOutcome::success
            } else {
                AttemptOutcome::client_error
            };
            count_attempt(req, target.id(), outcome);
            response
                .extensions_mut()
                .insert(AnsweredBy(target.id().to_owned()));
            Ok(response)
        }
        Err(failure) => {
            span.record("error.type", failure.outcome().as_str());
            span.record("otel.status_code", "error");
            if failure.reached_upstream() {
                stats.record(req.metrics, |s| s.observe_failure(elapsed, options));
                model.breaker.failure(
                    provider.config.circuit_failure_threshold,
                    provider.config.circuit_open_ms,
                );
            } else {
                model.breaker.release();
            }
            Err(failure)
        }
    }
}

/// What an attempt may make of the body, over the targets of `route`: a translation
/// (the parsed body and its translation held at once), or a copy with `model` or
/// `stream_options` edited. Requests reserve that memory before the first attempt.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BodyWork {
    /// Some target speaks another dialect than the client.
    pub translates: bool,
    /// Some target gets an edited copy of the body.
    pub edits: bool,
}

/// [`BodyWork`] for a request on `route`.
pub fn body_work(
    snapshot: &Snapshot,
    route: &CompiledRoute,
    head: &RequestHead,
    operation: Operation,
) -> BodyWork {
    let client = operation.client_dialect();
    let mut work = BodyWork::default();
    for t in route.tiers.iter().flatten() {
        let Some(provider) = snapshot.provider(&t.provider) else {
            continue;
        };
        let Some(adapter) = provider.adapter else {
            continue;
        };
        if !adapter.offers(&provider.config, operation) {
            continue;
        }
        if adapter.upstream_dialect(&provider.config, operation) != client {
            work.translates = true;
            continue;
        }
        let model = t.model.as_deref().unwrap_or(&head.model);
        let renamed = provider
            .config
            .models
            .get(model)
            .is_some_and(|m| m.upstream_name != head.model);
        work.edits |= providers::edits_body(adapter, operation, head, renamed);
    }
    work
}

/// Marks a response whose stream reports to routing statistics itself.
#[derive(Clone, Copy)]
struct ReportsItself;

async fn attempt_once(
    req: &Forward<'_>,
    provider: &Arc<Provider>,
    model: &ProviderModel,
    stats: &Arc<Slot>,
    deadline: Option<Instant>,
    attempt_started: Instant,
    accounting: &mut Option<Accounting>,
) -> Result<Response, Failure> {
    let config = &provider.config;
    let pricing = model.pricing;
    let (Some(adapter), Some(client)) = (provider.adapter, provider.client.as_ref()) else {
        if let Some(a) = accounting.as_mut() {
            a.answered_by(&config.id, &model.name, pricing, req.prompt_estimate);
        }
        return serve_mock(
            req,
            config.mock.clone().unwrap_or_else(default_mock),
            accounting.take(),
        )
        .await;
    };
    if !adapter.offers(config, req.operation) {
        return Err(Failure::Unsupported(format!(
            "The model `{}` is served by {}, which has no {} endpoint{}.",
            req.head.model,
            adapter.name(),
            req.operation.label_str(),
            if req.operation.is_raw() {
                " on this Provider (it is not listed in the Provider's spec.apis)"
            } else {
                ""
            }
        )));
    }

    let upstream_model = model.upstream_name.as_str();
    // Streams from OpenAI-style upstreams always carry usage, for accounting; the extra
    // chunk is removed again when the client did not ask for it.
    let (body, form_type) = match req.form {
        Some(form) => {
            let (bytes, content_type) = form.encode(upstream_model);
            let body = providers::UpstreamBody {
                bytes,
                injected_usage: false,
                echo: None,
                answer_tool: None,
            };
            (body, Some(content_type))
        }
        None => (
            providers::request_body(
                adapter,
                config,
                req.operation,
                req.head,
                &req.body,
                upstream_model,
            )
            .map_err(|e| Failure::BadRequest(e.to_string()))?,
            None,
        ),
    };
    let (inject_usage, echo, answer_tool) = (body.injected_usage, body.echo, body.answer_tool);
    let upstream_dialect = adapter.upstream_dialect(config, req.operation);
    // A response the upstream stores is recorded for the key's owner.
    let remember = req
        .stored
        .as_ref()
        .filter(|_| upstream_dialect == Dialect::Responses)
        .map(|s| crate::stored_responses::Remember {
            store: s.store.clone(),
            owner: crate::stored_responses::Owner {
                scope: s.scope.clone(),
                provider: config.id.clone(),
                route: req.route.id.clone(),
            },
        });
    let body = body.bytes;
    // Parsed once per reload; parsing on the fly only for a model the snapshot lacks.
    let mut url = match model.endpoint(req.operation) {
        Some(url) => url.clone(),
        None => reqwest::Url::parse(&adapter.endpoint(config, req.operation, upstream_model))
            .map_err(|_| Failure::Connect(config.id.clone()))?,
    };
    let mut headers = providers::headers(
        adapter,
        config,
        provider.credential.as_deref(),
        &req.request_id,
    );
    if let Some(content_type) = form_type {
        headers.insert(http::header::CONTENT_TYPE, content_type);
    }
    // An Anthropic client's own body goes with its version, betas and query string.
    if upstream_dialect == Dialect::Anthropic
        && let Some(hints) = req.anthropic.as_ref()
    {
        if let Some(beta) = hints.refused_beta(config) {
            return Err(Failure::BetaRefused(format!(
                "The anthropic-beta `{beta}` is not allowed on the Provider serving `{}`.",
                req.head.model
            )));
        }
        hints.apply(&mut headers);
        url = hints.url(url);
    }
    crate::telemetry::inject(&tracing::Span::current(), req.trace, &mut headers);

    let mut per_try = Duration::from_millis(config.request_timeout_ms);
    if let Some(ms) = req.route.per_try_timeout_ms {
        per_try = per_try.min(Duration::from_millis(ms));
    }
    if let Some(d) = deadline {
        per_try = per_try.min(d.saturating_duration_since(Instant::now()));
    }
    let attempt_deadline = Instant::now() + per_try;
    // Held until the answer has been relayed in full (streams included).
    let permit = match &provider.slots {
        Some(slots) => Some(
            slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| Failure::Saturated(config.id.clone()))?,
        ),
        None => None,
    };
    let sent =
        tokio::time::timeout(per_try, client.post(url).headers(headers).body(body).send()).await;
    let response = match sent {
        Err(_) => return Err(Failure::Timeout),
        Ok(Err(e)) if e.is_timeout() => return Err(Failure::Timeout),
        Ok(Err(e)) => {
            // The cause (refused, reset, TLS, HTTP/2 GOAWAY…), for whoever debugs a 502.
            tracing::debug!(provider = %config.id, error = %ErrorChain(&e), "upstream request failed");
            return Err(Failure::Connect(config.id.clone()));
        }
        Ok(Ok(r)) => r,
    };
    let mut client = req.client(echo);
    client.answer_tool = answer_tool;
    let conversion = Conversion::between(client, upstream_dialect, inject_usage);
    let status = response.status();
    match status.as_u16() {
        200..=299 => {}
        429 => {
            return Err(Failure::RateLimited(upstream::retry_after(
                response.headers(),
            )));
        }
        500 | 502 | 503 | 504 | 529 => return Err(Failure::Server(status)),
        401 | 403 => return Err(Failure::Credentials(config.id.clone())),
        // Never followed and never relayed: a redirect would take the credential and the
        // prompt to a host the Provider does not name (cloud metadata, for one).
        300..=399 => return Err(Failure::Redirect(config.id.clone(), status)),
        // The upstream judged the request itself (400, 404, 422…): the client should see
        // what it said, in the client's dialect, but nothing of the Provider's credential
        // or headers that the upstream may echo. Nothing was generated: nothing is billed.
        _ => {
            let secrets = provider.secrets();
            return relay::upstream_error(response, attempt_deadline, &conversion, &secrets)
                .await
                .map_err(|e| match e {
                    WholeError::Timeout => Failure::Timeout,
                    WholeError::Broken | WholeError::TooLarge => {
                        Failure::Server(StatusCode::BAD_GATEWAY)
                    }
                });
        }
    }
    if let Some(a) = accounting.as_mut() {
        a.answered_by(&config.id, &model.name, pricing, req.prompt_estimate);
    }
    let is_sse = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    // Moderations, images and audio answers are relayed byte for byte as they come.
    let raw = req.operation.is_raw();
    // Some servers answer a stream request with a whole JSON body: relay it as such.
    if raw || (req.head.stream && is_sse) {
        // The stream outlives this attempt: its own span carries usage and ends with it.
        let span = tracing::info_span!(
            "stream",
            { crate::telemetry::attr::RESPONSE_MODEL } = tracing::field::Empty,
            { crate::telemetry::attr::INPUT_TOKENS } = tracing::field::Empty,
            { crate::telemetry::attr::OUTPUT_TOKENS } = tracing::field::Empty,
            "tollgate.cost" = tracing::field::Empty,
        );
        let mut accounting = accounting.take();
        if let Some(a) = accounting.as_mut() {
            a.trace_into(span.clone());
        }
        let guards = StreamGuards {
            answers: req.answer_guard(),
            span,
            permit,
            accounting,
            first_byte: Some(FirstByte {
                metrics: req.metrics.clone(),
                route: req.route.id.clone(),
                started: req.started,
            }),
            remember,
            feedback: Some(StreamFeedback {
                slot: stats.clone(),
                metrics: req.metrics.clone(),
                options: req.route.strategy_options,
                started: attempt_started,
                first_token_seen: false,
            }),
        };
        let idle = Duration::from_millis(config.stream_idle_timeout_ms);
        let mut response = if raw {
            crate::passthrough::relay(response, idle, guards)
        } else {
            relay::stream(response.bytes_stream(), idle, conversion, guards)
        };
        response.extensions_mut().insert(ReportsItself);
        Ok(response)
    } else {
        whole(
            response,
            attempt_deadline,
            req.max_response_bytes,
            &conversion,
            accounting.as_mut(),
            remember.as_ref(),
        )
        .await
        .map_err(|f| f.named(&config.id))
    }
}

async fn whole(
    response: reqwest::Response,
    deadline: Instant,
    limit: usize,
    conversion: &Conversion,
    accounting: Option<&mut Accounting>,
    remember: Option<&crate::stored_responses::Remember>,
) -> Result<Response, Failure> {
    relay::whole(response, deadline, limit, conversion, accounting, remember)
        .await
        .map_err(|e| match e {
            WholeError::Timeout => Failure::Timeout,
            WholeError::Broken => Failure::Server(StatusCode::BAD_GATEWAY),
            WholeError::TooLarge => Failure::TooLarge(String::new(), limit),
        })
}

impl Failure {
    /// Names the provider in a failure built without it.
    fn named(self, provider: &str) -> Self {
        match self {
            Self::TooLarge(_, limit) => Self::TooLarge(provider.to_owned(), limit),
            other => other,
        }
    }
}

fn default_mock() -> CompiledMock {
    CompiledMock {
        latency_ms: 0,
        chunk_interval_ms: 0,
        completion_tokens: 16,
        reply: None,
    }
}

async fn serve_mock(
    req: &Forward<'_>,
    settings: CompiledMock,
    mut accounting: Option<Accounting>,
) -> Result<Response, Failure> {
    if settings.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(settings.latency_ms)).await;
    }
    let shape = match req.operation {
        Operation::ChatCompletions | Operation::Messages | Operation::Responses => {
            mock::Shape::Chat
        }
        Operation::Completions => mock::Shape::Completion,
        Operation::Moderations
        | Operation::ImageGenerations
        | Operation::AudioSpeech
        | Operation::AudioTranscriptions
        | Operation::CountTokens => {
            return Err(Failure::Unsupported(format!(
                "The model `{}` is served by the built-in mock, which has no {} endpoint.",
                req.head.model,
                req.operation.label_str()
            )));
        }
        Operation::Embeddings => {
            let request: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let answer = mock::embeddings(&request, &req.head.model)
                .map_err(|e| Failure::BadRequest(e.to_string()))?;
            if let Some(a) = accounting.as_mut() {
                a.report(Usage {
                    prompt: answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
                    ..Default::default()
                });
            }
            return Ok(Json(answer).into_response());
        }
    };
    let prefix = if shape == mock::Shape::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{}", req.request_id);
    let created = jiff::Timestamp::now().as_second();
    let answer = mock::answer(&settings, &req.body, req.prompt_estimate);
    // The mock speaks OpenAI chat; clients of other dialects get its answer translated.
    let translated = req.operation.client_dialect() != Dialect::OpenAi;
    let client = || {
        let echo = (req.operation == Operation::Responses)
            .then(|| serde_json::from_slice::<serde_json::Value>(&req.body).ok())
            .flatten()
            .map(|body| Box::new(crate::dialects::responses::Echo::of(&body, &req.head.model)));
        req.client(echo)
    };
    if req.head.stream {
        // The mock's usage is known up front.
        if let Some(a) = accounting.as_mut() {
            a.report(Usage {
                prompt: answer.prompt_tokens,
                completion: answer.tokens.len() as u64,
                ..Default::default()
            });
        }
        let include_usage = req.head.include_usage() || translated;
        let frames = mock::stream(
            shape,
            answer,
            &settings,
            id,
            req.head.model.clone(),
            created,
            include_usage,
        );
        let conversion = Conversion::between(client(), Dialect::OpenAi, false);
        let translator = StreamTranslator::new(conversion).guarded(req.answer_guard());
        return Ok(relay::local_stream(
            Box::pin(frames),
            translator,
            accounting,
        ));
    }
    let completion = mock::completion(shape, &answer, &id, &req.head.model, created);
    if let Some(a) = accounting.as_mut() {
        a.report(Usage {
            prompt: answer.prompt_tokens,
            completion: answer.tokens.len() as u64,
            ..Default::default()
        });
    }
    if translated {
        let answer = crate::dialects::openai_chat::parse_answer(&completion);
        return Ok(Json(client().render_answer(&answer, created)).into_response());
    }
    Ok(Json(completion).into_response())
}

/// Sends an Anthropic client's `count_tokens` body to `provider`'s `model` (renamed to its
/// upstream name) and relays the count, or the upstream's refusal without its secrets.
pub async fn count_tokens(
    provider: &Provider,
    model: &ProviderModel,
    head: &RequestHead,
    body: Bytes,
    hints: &providers::anthropic::ClientHints,
    request_id: &str,
) -> Result<Response, ApiError> {
    let (Some(adapter), Some(client)) = (provider.adapter, provider.client.as_ref()) else {
        return Err(ApiError::ModelNotFound(head.model.clone()));
    };
    let config = &provider.config;
    if let Some(beta) = hints.refused_beta(config) {
        return Err(ApiError::bad_request(
            format!(
                "The anthropic-beta `{beta}` is not allowed on the Provider serving `{}`.",
                head.model
            ),
            Some("anthropic-beta"),
        ));
    }
    let body = providers::passthrough(&body, &head.model, &model.upstream_name).map_err(|e| {
        ApiError::bad_request(format!("The request body is not valid JSON: {e}"), None)
    })?;
    let url = reqwest::Url::parse(&format!("{}/messages/count_tokens", config.base_url))
        .map_err(|_| ApiError::Upstream("The Provider's baseUrl is not a URL.".into()))?;
    let mut headers =
        providers::headers(adapter, config, provider.credential.as_deref(), request_id);
    hints.apply(&mut headers);
    let timeout = Duration::from_millis(config.request_timeout_ms);
    let sent = tokio::time::timeout(
        timeout,
        client
            .post(hints.url(url))
            .headers(headers)
            .body(body)
            .send(),
    )
    .await;
    let response = match sent {
        Err(_) => return Err(ApiError::UpstreamTimeout),
        Ok(Err(_)) => {
            return Err(ApiError::Upstream(format!(
                "The upstream provider {} could not be reached.",
                config.id
            )));
        }
        Ok(Ok(r)) => r,
    };
    let deadline = Instant::now() + timeout;
    if !response.status().is_success() {
        let secrets = provider.secrets();
        return relay::upstream_error(
            response,
            deadline,
            &Conversion::passthrough(Dialect::Anthropic),
            &secrets,
        )
        .await
        .map_err(|_| ApiError::UpstreamTimeout);
    }
    relay::whole(
        response,
        deadline,
        64 * 1024,
        &Conversion::passthrough(Dialect::Anthropic),
        None,
        None,
    )
    .await
    .map_err(|_| ApiError::Upstream("The upstream answer could not be read.".into()))
}

/// Displays an error with its sources (reqwest's own message is only the outermost).
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
