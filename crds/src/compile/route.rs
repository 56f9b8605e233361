//! RoutePolicy → [`CompiledRoute`], including model-name conflicts between policies.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    ObjectOutcome, Report, compile_limits, object_ref, patterns, precedence,
    provider::{KnownProviders, shared_with},
};
use crate::{
    config::{
        CompiledCache, CompiledGuardrail, CompiledLimits, CompiledRoute, CompiledTarget,
        GatewayConfig, shares_with,
    },
    diagnostics::{Kind, ObjectRef, reasons},
    duration,
    v1alpha1::{RoutePolicy, RoutePolicySpec, Strategy},
};

pub(super) fn compile_all(
    policies: &[RoutePolicy],
    providers: &KnownProviders,
    config: &mut GatewayConfig,
    report: &mut Report,
    objects: &mut BTreeMap<ObjectRef, ObjectOutcome>,
) {
    let mut ordered: Vec<&RoutePolicy> = policies.iter().collect();
    ordered.sort_by_key(|p| precedence(*p));

    // Validate every policy first, so that an invalid older policy does not keep a model
    // name from a valid newer one.
    let mut valid = Vec::new();
    for policy in ordered {
        let object = object_ref(Kind::RoutePolicy, policy);
        let compiled = compile_one(&object, policy, providers, config, report);
        objects.insert(
            object.clone(),
            ObjectOutcome {
                served: false,
                generation: policy.metadata.generation,
                ..Default::default()
            },
        );
        if let Some(c) = compiled {
            valid.push((object, c));
        }
    }

    // Model names are claimed per namespace: a policy in one namespace never takes a
    // name from another (tenancy: docs/tenancy.md).
    let mut claimed: BTreeMap<(String, String), String> = BTreeMap::new();
    for (object, (mut route, wanted)) in valid {
        for (i, pattern) in wanted.iter().enumerate() {
            let claim = (object.namespace.clone(), pattern.clone());
            if let Some(owner) = claimed.get(&claim) {
                report.error(
                    &object,
                    reasons::MODEL_CONFLICT,
                    &format!("spec.models[{i}]"),
                    format!("{pattern:?} is already served by RoutePolicy {owner}; this policy does not serve it"),
                );
                continue;
            }
            claimed.insert(claim, route.id.clone());
            if patterns::is_glob(pattern) {
                route.globs.push(pattern.clone());
            } else {
                route.exact.push(pattern.clone());
            }
        }
        let outcome = objects.get_mut(&object).expect("inserted above");
        if route.exact.is_empty() && route.globs.is_empty() {
            continue;
        }
        let targets: usize = route.tiers.iter().map(Vec::len).sum();
        outcome.served = true;
        outcome.ready_targets = Some(targets as u32);
        outcome.summary = format!(
            "routing {} model name(s) to {} target(s) in {} tier(s)",
            route.exact.len() + route.globs.len(),
            targets,
            route.tiers.len()
        );
        config.routing.routes.push(route);
    }
    config.routing.routes.sort_by(|a, b| a.id.cmp(&b.id));
}

/// A valid route (models not yet assigned) and the model patterns it asks for.
type Candidate = (CompiledRoute, Vec<String>);

fn compile_one(
    object: &ObjectRef,
    policy: &RoutePolicy,
    providers: &KnownProviders,
    config: &GatewayConfig,
    report: &mut Report,
) -> Option<Candidate> {
    let spec = &policy.spec;
    let before = report.errors_for(object);
    // Errors that drop one model pattern or one target but leave the route serving.
    let mut partial = 0;
    let wanted = models(object, spec, report, &mut partial);
    let tiers = targets(
        object,
        spec,
        &wanted,
        providers,
        config,
        report,
        &mut partial,
    );
    let timings = timings(object, spec, report);
    check_strategy_options(object, spec, report);
    let rate_limit = spec
        .rate_limit
        .as_ref()
        .and_then(|l| compile_limits(object, "spec.rateLimit", l, report));
    let guardrails =
        super::guardrails::compile(object, "spec.guardrails", &spec.guardrails, report);
    if report.errors_for(object) > before + partial {
        return None;
    }
    let route = build(
        object,
        spec,
        tiers,
        timings,
        rate_limit,
        guardrails.unwrap_or_default(),
        report,
    );
    Some((route, wanted))
}

/// Validates `spec.models`: the patterns that serve, each once. An invalid pattern is
/// dropped (counted in `partial`); none left is an error.
fn models(
    object: &ObjectRef,
    spec: &RoutePolicySpec,
    report: &mut Report,
    partial: &mut usize,
) -> Vec<String> {
    let mut wanted = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, m) in spec.models.iter().enumerate() {
        let field = format!("spec.models[{i}]");
        if let Err(e) = patterns::validate(m) {
            report.error(object, reasons::INVALID_MODEL_PATTERN, &field, e);
            *partial += 1;
        } else if !seen.insert(m.as_str()) {
            report.warning(
                object,
                reasons::INVALID_SPEC,
                &field,
                format!("{m:?} is listed twice"),
            );
        } else {
            wanted.push(m.clone());
        }
    }
    if wanted.is_empty() {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.models",
            "at least one valid model name is required",
        );
    }
    wanted
}

/// Resolves `spec.targets` into priority tiers. Unusable targets (a Provider not found,
/// not shared, not Ready, or not serving the model) are dropped and reported, counted in
/// `partial`; the route survives while at least one usable target with a weight above 0
/// remains.
fn targets(
    object: &ObjectRef,
    spec: &RoutePolicySpec,
    wanted: &[String],
    providers: &KnownProviders,
    config: &GatewayConfig,
    report: &mut Report,
    partial: &mut usize,
) -> BTreeMap<u32, Vec<CompiledTarget>> {
    let mut tiers: BTreeMap<u32, Vec<CompiledTarget>> = BTreeMap::new();
    if spec.targets.is_empty() {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.targets",
            "at least one target is required",
        );
    }
    for (i, t) in spec.targets.iter().enumerate() {
        let field = format!("spec.targets[{i}]");
        let provider_ns = t.provider_namespace.as_deref().unwrap_or(&object.namespace);
        let id = format!("{provider_ns}/{}", t.provider);
        let known = providers.get(&id);
        // A Provider of another namespace is usable only when it is shared with this one;
        // "not found" and "not shared" read the same, so a policy cannot probe for names.
        if provider_ns != object.namespace
            && known.is_none_or(|p| !shares_with(&p.shared_with, &object.namespace))
        {
            report.ref_error(
                object,
                reasons::REF_NOT_PERMITTED,
                &format!("{field}.provider"),
                format!(
                    "Provider {id} does not exist or is not shared with namespace {} (its spec.sharedWith must name it)",
                    object.namespace
                ),
            );
            *partial += 1;
            continue;
        }
        match known.map(|p| p.served) {
            None => {
                report.ref_error(
                    object,
                    reasons::PROVIDER_NOT_FOUND,
                    &format!("{field}.provider"),
                    format!("Provider {id} not found"),
                );
                *partial += 1;
                continue;
            }
            Some(false) => {
                report.ref_error(
                    object,
                    reasons::PROVIDER_NOT_READY,
                    &format!("{field}.provider"),
                    format!("Provider {id} is not Ready"),
                );
                *partial += 1;
                continue;
            }
            Some(true) => {}
        }
        let provider = &config.routing.providers[&id];
        let missing: Vec<&str> = match &t.model {
            Some(m) => (!provider.models.contains_key(m))
                .then_some(m.as_str())
                .into_iter()
                .collect(),
            // Without an explicit model, each exact name the route serves is sent as is.
            None => wanted
                .iter()
                .filter(|m| !patterns::is_glob(m) && !provider.models.contains_key(*m))
                .map(String::as_str)
                .collect(),
        };
        if !missing.is_empty() {
            report.ref_error(
                object,
                reasons::MODEL_NOT_FOUND,
                &format!("{field}.model"),
                format!("Provider {id} does not serve {}", missing.join(", ")),
            );
            *partial += 1;
            continue;
        }
        tiers.entry(t.priority).or_default().push(CompiledTarget {
            provider: id,
            model: t.model.clone(),
            weight: t.weight,
        });
    }
    let usable = tiers.values().flatten().any(|t| t.weight > 0);
    if !spec.targets.is_empty() && !usable {
        let kept: usize = tiers.values().map(Vec::len).sum();
        let why = if kept < spec.targets.len() {
            "no usable target is left"
        } else {
            "every target has weight 0"
        };
        report.error(
            object,
            reasons::NO_USABLE_TARGETS,
            "spec.targets",
            format!("{why}; at least one target with a weight above 0 is needed"),
        );
    }
    tiers
}

/// The durations a route sets, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timings {
    initial_backoff: Option<u64>,
    max_backoff: Option<u64>,
    per_try: Option<u64>,
    total: Option<u64>,
    cache_ttl: Option<u64>,
}

/// Parses and checks the retry, timeout and cache durations (and the retry count).
fn timings(object: &ObjectRef, spec: &RoutePolicySpec, report: &mut Report) -> Timings {
    let r = &spec.retries;
    let mut ms = |field: &str, text: &str| match duration::parse_millis(text) {
        Ok(v) => Some(v),
        Err(e) => {
            report.error(object, reasons::INVALID_SPEC, field, e.to_string());
            None
        }
    };
    let initial = ms("spec.retries.initialBackoff", &r.initial_backoff);
    let max = ms("spec.retries.maxBackoff", &r.max_backoff);
    let per_try = spec
        .timeouts
        .as_ref()
        .and_then(|t| t.per_try.as_deref())
        .and_then(|t| ms("spec.timeouts.perTry", t));
    let total = spec
        .timeouts
        .as_ref()
        .and_then(|t| t.total.as_deref())
        .and_then(|t| ms("spec.timeouts.total", t));
    let cache_ttl = spec
        .cache
        .as_ref()
        .and_then(|c| ms("spec.cache.ttl", &c.ttl));
    if let (Some(i), Some(m)) = (initial, max)
        && m < i
    {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.retries.maxBackoff",
            "maxBackoff must not be shorter than initialBackoff",
        );
    }
    if r.attempts > 10 {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.retries.attempts",
            "at most 10 retries are allowed",
        );
    }
    if per_try == Some(0) || total == Some(0) {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.timeouts",
            "timeouts must be longer than 0",
        );
    }
    if let (Some(p), Some(t)) = (per_try, total)
        && p > t
    {
        report.warning(
            object,
            reasons::INVALID_SPEC,
            "spec.timeouts.perTry",
            "perTry is longer than total, so total always applies first",
        );
    }
    if let Some(c) = &spec.cache
        && (cache_ttl == Some(0) || c.max_entry_bytes == 0)
    {
        report.error(
            object,
            reasons::INVALID_SPEC,
            "spec.cache",
            "ttl and maxEntryBytes must be above 0",
        );
    }
    Timings {
        initial_backoff: initial,
        max_backoff: max,
        per_try,
        total,
        cache_ttl,
    }
}

/// Checks `spec.strategyOptions` against its bounds and the strategy.
fn check_strategy_options(object: &ObjectRef, spec: &RoutePolicySpec, report: &mut Report) {
    if let Some(o) = &spec.strategy_options {
        if o.exploration_percent > 50
            || !(1..=100).contains(&o.memory)
            || o.latency_weight > 400
            || o.cost_weight > 400
        {
            report.error(
                object,
                reasons::INVALID_SPEC,
                "spec.strategyOptions",
                "explorationPercent must be at most 50, memory between 1 and 100, latencyWeight and costWeight at most 400",
            );
        }
        if spec.strategy == Strategy::Weighted {
            report.warning(
                object,
                reasons::INVALID_SPEC,
                "spec.strategyOptions",
                "strategyOptions has no effect with the weighted strategy",
            );
        }
    }
}

/// The compiled route, once nothing in it is an error.
fn build(
    object: &ObjectRef,
    spec: &RoutePolicySpec,
    tiers: BTreeMap<u32, Vec<CompiledTarget>>,
    timings: Timings,
    rate_limit: Option<CompiledLimits>,
    guardrails: Vec<CompiledGuardrail>,
    report: &mut Report,
) -> CompiledRoute {
    let r = &spec.retries;
    let mut retry_on = Vec::with_capacity(r.retry_on.len());
    for class in &r.retry_on {
        if !retry_on.contains(class) {
            retry_on.push(*class);
        }
    }
    CompiledRoute {
        id: format!("{}/{}", object.namespace, object.name),
        exact: Vec::new(),
        globs: Vec::new(),
        strategy: spec.strategy,
        strategy_options: spec.strategy_options.unwrap_or_default(),
        tiers: tiers.into_values().collect(),
        retry_attempts: r.attempts,
        retry_initial_backoff_ms: timings.initial_backoff.unwrap_or_default(),
        retry_max_backoff_ms: timings.max_backoff.unwrap_or_default(),
        retry_on,
        per_try_timeout_ms: timings.per_try,
        total_timeout_ms: timings.total,
        cache: spec.cache.as_ref().map(|c| CompiledCache {
            ttl_ms: timings.cache_ttl.unwrap_or_default(),
            scope: c.scope,
            max_entry_bytes: c.max_entry_bytes,
        }),
        rate_limit,
        record_content: spec.telemetry.as_ref().is_some_and(|t| t.record_content),
        guardrails,
        shared_with: shared_with(object, &spec.shared_with, report),
    }
}
