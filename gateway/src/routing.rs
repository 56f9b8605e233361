//! Pure routing decisions: the order in which targets are tried (per strategy), and retry
//! backoff.

use std::{cmp::Ordering, time::Duration};

use tollgate_api::{
    config::CompiledTarget,
    v1alpha1::{Strategy, StrategyOptions},
};

use crate::target_stats::{Latency, TargetStats};

/// How `leastLatency` and `adaptive` judge targets for one request.
#[derive(Debug, Clone, Copy)]
pub struct Tuning<'a> {
    /// The route's options (exploration, latency and price weights).
    pub options: &'a StrategyOptions,
    /// The latency the request is ranked by: first token for streams, total otherwise.
    pub latency: Latency,
}

/// Why a target holds its place in the attempt order, for spans and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Drawn by weight (`weighted`).
    Weighted,
    /// No measurement yet: tried before measured targets (`leastLatency`, `adaptive`).
    Unexplored,
    /// Lowest latency average (`leastLatency`).
    LowestEwma,
    /// Best sampled score (`adaptive`).
    ThompsonSample,
    /// The exploration floor picked a target that is not the current best.
    Exploration,
    /// The strategy's choice has an open circuit; the next healthy target goes first.
    OnlyHealthy,
    /// Not a first choice: the rest of a tier, in the strategy's order, for retries.
    Retry,
    /// The strategy's choice cannot hold the request (its context window or output
    /// limit): the first target that can goes first.
    ContextWindow,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Weighted => "weighted",
            Self::Unexplored => "unexplored",
            Self::LowestEwma => "lowest_ewma",
            Self::ThompsonSample => "thompson_sample",
            Self::Exploration => "exploration",
            Self::OnlyHealthy => "only_healthy",
            Self::Retry => "retry",
            Self::ContextWindow => "context_window",
        }
    }
}

/// What the strategies need to know of a target itself.
pub trait Weighted {
    /// Its weight within its tier.
    fn weight(&self) -> u32;
}

impl Weighted for CompiledTarget {
    fn weight(&self) -> u32 {
        self.weight
    }
}

/// One position of the attempt order.
#[derive(Debug)]
pub struct Planned<'a, T> {
    /// The target.
    pub target: &'a T,
    /// Its priority tier (index into the route's tiers; above 0 is a fallback).
    pub tier: usize,
    /// Why it holds this place.
    pub reason: Reason,
}

/// What selection knows of a target: its recent record and whether its circuit is open.
#[derive(Debug, Clone, Copy, Default)]
pub struct Observed {
    /// Recent record, `None` when never attempted.
    pub stats: Option<TargetStats>,
    /// Its circuit is open (checked without taking a half-open probe slot).
    pub open: bool,
    /// Its price (input plus output per million tokens), when `adaptive` weighs price.
    pub price: Option<f64>,
}

/// The attempt order under `strategy`: tier by tier (fallback), each tier ordered by the
/// strategy; within a tier, targets with an open circuit go after the healthy ones.
pub fn plan<'a, T: Weighted>(
    tiers: &'a [Vec<T>],
    strategy: Strategy,
    tuning: &Tuning<'_>,
    observe: impl Fn(&T) -> Observed,
    rng: &mut fastrand::Rng,
) -> Vec<Planned<'a, T>> {
    let mut order = Vec::with_capacity(tiers.iter().map(Vec::len).sum());
    for (tier, members) in tiers.iter().enumerate() {
        let observed: Vec<(&T, Observed)> = members.iter().map(|t| (t, observe(t))).collect();
        let (ranked, reason) = match strategy {
            Strategy::Weighted => (
                attempt_order(std::slice::from_ref(members), rng),
                Reason::Weighted,
            ),
            Strategy::LeastLatency | Strategy::Adaptive => rank(&observed, strategy, tuning, rng),
        };
        // Open circuits last (stable, so the strategy's order holds among the rest).
        let is_open = |t: &T| {
            observed
                .iter()
                .any(|(o, obs)| std::ptr::eq(*o, t) && obs.open)
        };
        let strategy_first = ranked.first().copied();
        let (mut healthy, open): (Vec<_>, Vec<_>) = ranked.into_iter().partition(|t| !is_open(t));
        let first_reason = match (strategy_first, healthy.first()) {
            (Some(a), Some(b)) if !std::ptr::eq(a, *b) => Reason::OnlyHealthy,
            _ => reason,
        };
        healthy.extend(open);
        order.extend(healthy.into_iter().enumerate().map(|(i, target)| Planned {
            target,
            tier,
            reason: if i == 0 { first_reason } else { Reason::Retry },
        }));
    }
    order
}

/// Orders one tier by `leastLatency` or `adaptive`, returning the reason of the first.
fn rank<'a, T>(
    members: &[(&'a T, Observed)],
    strategy: Strategy,
    tuning: &Tuning<'_>,
    rng: &mut fastrand::Rng,
) -> (Vec<&'a T>, Reason) {
    let latency = |o: &Observed| o.stats.and_then(|s| s.latency_ms(tuning.latency));
    // Targets not measured for this kind of request go first, in random order, so each
    // gets measured.
    let mut unexplored: Vec<&T> = members
        .iter()
        .filter(|(_, o)| latency(o).is_none())
        .map(|(t, _)| *t)
        .collect();
    rng.shuffle(&mut unexplored);
    let measured: Vec<(&T, TargetStats, f64, Option<f64>)> = members
        .iter()
        .filter_map(|(t, o)| Some((*t, o.stats?, latency(o)?, o.price)))
        .collect();
    let mut scored: Vec<(&T, f64)> = match strategy {
        Strategy::Adaptive => {
            let best = |values: &mut dyn Iterator<Item = f64>| values.fold(f64::INFINITY, f64::min);
            let fastest = best(&mut measured.iter().map(|m| m.2)).max(1.0);
            let cheapest = best(&mut measured.iter().filter_map(|m| m.3));
            let (latency_exp, cost_exp) = (
                tuning.options.latency_exponent(),
                tuning.options.cost_exponent(),
            );
            measured
                .iter()
                .map(|(t, s, latency, price)| {
                    // At the default exponent (0.5) success stays dominant: a target four
                    // times slower scores half, one failing most of the time near 0.
                    let speed = (fastest / latency.max(1.0)).powf(latency_exp);
                    let thrift = match price {
                        Some(p) if cost_exp > 0.0 => (cheapest / p).powf(cost_exp),
                        _ => 1.0,
                    };
                    (*t, s.sample_success_rate(rng) * speed * thrift)
                })
                .collect()
        }
        // Higher is better: the negated average.
        _ => measured.iter().map(|m| (m.0, -m.2)).collect(),
    };
    scored.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal));
    let mut ranked = unexplored.clone();
    ranked.extend(scored.into_iter().map(|(t, _)| t));
    let mut reason = if !unexplored.is_empty() {
        Reason::Unexplored
    } else if strategy == Strategy::Adaptive {
        Reason::ThompsonSample
    } else {
        Reason::LowestEwma
    };
    // The exploration floor: now and then another healthy target goes first.
    let healthy_others: Vec<usize> = (1..ranked.len())
        .filter(|&i| {
            members
                .iter()
                .any(|(t, o)| std::ptr::eq(*t, ranked[i]) && !o.open)
        })
        .collect();
    if !healthy_others.is_empty() && rng.f64() < tuning.options.exploration() {
        let pick = healthy_others[rng.usize(0..healthy_others.len())];
        let chosen = ranked.remove(pick);
        ranked.insert(0, chosen);
        reason = Reason::Exploration;
    }
    (ranked, reason)
}

/// The order of attempts: tier by tier (fallback), and within a tier a weighted random
/// permutation, so the first attempt follows the weights and retries go to the other
/// targets of the tier before falling back. Weight-0 targets come last in their tier.
pub fn attempt_order<'a, T: Weighted>(tiers: &'a [Vec<T>], rng: &mut fastrand::Rng) -> Vec<&'a T> {
    let mut order = Vec::with_capacity(tiers.iter().map(Vec::len).sum());
    for tier in tiers {
        let mut rest: Vec<&T> = tier.iter().collect();
        while !rest.is_empty() {
            let total: u64 = rest.iter().map(|t| u64::from(t.weight())).sum();
            let index = if total == 0 {
                0
            } else {
                let mut pick = rng.u64(0..total);
                rest.iter()
                    .position(|t| {
                        let w = u64::from(t.weight());
                        if pick < w {
                            true
                        } else {
                            pick -= w;
                            false
                        }
                    })
                    .unwrap_or(0)
            };
            order.push(rest.remove(index));
        }
    }
    order
}

/// Backoff before retry `n` (1 for the first retry): exponential from `initial`, capped at
/// `max`, with full jitter (uniform between zero and the cap), which spreads retries of
/// many clients instead of synchronising them.
pub fn backoff(n: u32, initial_ms: u64, max_ms: u64, rng: &mut fastrand::Rng) -> Duration {
    let cap = initial_ms
        .saturating_mul(1u64 << n.saturating_sub(1).min(20))
        .min(max_ms);
    Duration::from_millis(if cap == 0 { 0 } else { rng.u64(0..=cap) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(provider: &str, weight: u32) -> CompiledTarget {
        CompiledTarget {
            provider: provider.into(),
            model: None,
            weight,
        }
    }

    #[test]
    fn first_choices_follow_the_weights_within_a_tier() {
        let tiers = vec![vec![t("a", 80), t("b", 20)], vec![t("c", 1)]];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut first_a = 0;
        for _ in 0..10_000 {
            let order = attempt_order(&tiers, &mut rng);
            assert_eq!(order.len(), 3);
            assert_eq!(
                order[2].provider, "c",
                "the fallback tier always comes after"
            );
            if order[0].provider == "a" {
                first_a += 1;
            }
        }
        assert!(
            (7_700..8_300).contains(&first_a),
            "a first {first_a} times out of 10000"
        );
    }

    #[test]
    fn zero_weight_targets_are_tried_last_in_their_tier() {
        let tiers = vec![vec![t("drained", 0), t("live", 1)]];
        let mut rng = fastrand::Rng::with_seed(1);
        for _ in 0..100 {
            let order = attempt_order(&tiers, &mut rng);
            assert_eq!(order[0].provider, "live");
            assert_eq!(order[1].provider, "drained");
        }
    }

    const DEFAULTS: StrategyOptions = StrategyOptions {
        exploration_percent: 10,
        memory: 5,
        latency_weight: 50,
        cost_weight: 0,
    };

    /// Default tuning for a request judged by total latency (not streamed).
    fn whole() -> Tuning<'static> {
        Tuning {
            options: &DEFAULTS,
            latency: Latency::Total,
        }
    }

    fn measured(latency_ms: f64, successes: f64, failures: f64) -> Observed {
        Observed {
            stats: Some(TargetStats {
                first_token_ms: None,
                total_ms: Some(latency_ms),
                successes,
                failures,
            }),
            open: false,
            price: None,
        }
    }

    /// How often each provider is chosen first over `n` plans with `seed`.
    fn first_choices(
        tiers: &[Vec<CompiledTarget>],
        strategy: Strategy,
        observe: impl Fn(&CompiledTarget) -> Observed,
        seed: u64,
        n: usize,
    ) -> std::collections::BTreeMap<String, usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            let order = plan(tiers, strategy, &whole(), &observe, &mut rng);
            *counts.entry(order[0].target.provider.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn least_latency_prefers_the_lowest_average_and_explores_at_the_floor() {
        let tiers = vec![
            vec![t("slow", 1), t("fast", 1), t("mid", 1)],
            vec![t("c", 1)],
        ];
        let observe = |x: &CompiledTarget| match x.provider.as_str() {
            "slow" => measured(400.0, 5.0, 0.0),
            "fast" => measured(20.0, 5.0, 0.0),
            _ => measured(100.0, 5.0, 0.0),
        };
        let mut rng = fastrand::Rng::with_seed(9);
        let mut reasons = std::collections::BTreeMap::new();
        for _ in 0..2_000 {
            let order = plan(&tiers, Strategy::LeastLatency, &whole(), observe, &mut rng);
            assert_eq!(order.len(), 4);
            assert_eq!(order[3].target.provider, "c");
            assert_eq!(order[3].tier, 1);
            *reasons.entry(order[0].reason.as_str()).or_insert(0) += 1;
            if order[0].reason == Reason::LowestEwma {
                let names: Vec<&str> = order[..3]
                    .iter()
                    .map(|p| p.target.provider.as_str())
                    .collect();
                assert_eq!(names, ["fast", "mid", "slow"]);
                assert!(
                    order[1..]
                        .iter()
                        .all(|p| p.reason == Reason::Retry || p.tier == 1)
                );
            } else {
                assert_eq!(order[0].reason, Reason::Exploration);
                assert_ne!(order[0].target.provider, "fast");
            }
        }
        let explored = reasons["exploration"];
        assert!(
            (140..260).contains(&explored),
            "explored {explored} of 2000"
        );
    }

    #[test]
    fn unmeasured_targets_are_tried_first() {
        let tiers = vec![vec![t("known", 1), t("new", 1)]];
        let observe = |x: &CompiledTarget| {
            if x.provider == "known" {
                measured(1.0, 10.0, 0.0)
            } else {
                Observed::default()
            }
        };
        for strategy in [Strategy::LeastLatency, Strategy::Adaptive] {
            let counts = first_choices(&tiers, strategy, observe, 4, 1_000);
            assert!(counts["new"] > 850, "{strategy:?}: {counts:?}");
        }
    }

    #[test]
    fn adaptive_prefers_the_target_that_succeeds_and_is_fast() {
        let tiers = vec![vec![t("failing", 1), t("healthy", 1), t("slow", 1)]];
        let observe = |x: &CompiledTarget| match x.provider.as_str() {
            "failing" => measured(20.0, 0.5, 4.5),
            "healthy" => measured(20.0, 4.5, 0.5),
            _ => measured(200.0, 5.0, 0.0),
        };
        let counts = first_choices(&tiers, Strategy::Adaptive, observe, 21, 2_000);
        assert!(counts["healthy"] > 1_600, "{counts:?}");
        assert!(
            counts["failing"] > 40,
            "the floor still explores: {counts:?}"
        );
        assert!(counts["slow"] > 40, "the floor still explores: {counts:?}");
    }

    #[test]
    fn adaptive_choices_are_deterministic_under_a_fixed_seed() {
        let tiers = vec![vec![t("a", 1), t("b", 1), t("c", 1)]];
        let observe = |x: &CompiledTarget| match x.provider.as_str() {
            "a" => measured(30.0, 3.0, 1.0),
            "b" => measured(25.0, 2.0, 2.0),
            _ => measured(60.0, 4.0, 0.0),
        };
        let run = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..50)
                .map(|_| {
                    plan(&tiers, Strategy::Adaptive, &whole(), observe, &mut rng)
                        .iter()
                        .map(|p| p.target.provider.clone())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(77), run(77));
        assert_ne!(run(77), run(78));
    }

    #[test]
    fn a_target_with_an_open_circuit_is_never_first_while_another_is_healthy() {
        let tiers = vec![vec![t("broken", 1000), t("ok", 1)]];
        let observe = |x: &CompiledTarget| Observed {
            open: x.provider == "broken",
            ..measured(if x.provider == "broken" { 1.0 } else { 500.0 }, 9.0, 0.0)
        };
        for strategy in [
            Strategy::Weighted,
            Strategy::LeastLatency,
            Strategy::Adaptive,
        ] {
            let mut rng = fastrand::Rng::with_seed(2);
            for _ in 0..500 {
                let order = plan(&tiers, strategy, &whole(), observe, &mut rng);
                assert_eq!(order[0].target.provider, "ok", "{strategy:?}");
                assert_eq!(order[1].target.provider, "broken", "kept for retries");
            }
        }
        // The strategy's own pick was the broken one: the reason says so.
        let mut rng = fastrand::Rng::with_seed(2);
        let order = plan(&tiers, Strategy::Weighted, &whole(), observe, &mut rng);
        assert_eq!(order[0].reason, Reason::OnlyHealthy);
        // When every member is open the order stays the strategy's.
        let all_open = |x: &CompiledTarget| Observed {
            open: true,
            ..observe(x)
        };
        let order = plan(&tiers, Strategy::LeastLatency, &whole(), all_open, &mut rng);
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn weighted_plans_keep_the_weighted_first_choice() {
        let tiers = vec![vec![t("a", 80), t("b", 20)]];
        let counts = first_choices(
            &tiers,
            Strategy::Weighted,
            |_| Observed::default(),
            7,
            10_000,
        );
        assert!((7_700..8_300).contains(&counts["a"]), "{counts:?}");
    }

    #[test]
    fn backoff_grows_exponentially_within_the_cap_with_jitter() {
        let mut rng = fastrand::Rng::with_seed(3);
        for n in 1..10 {
            for _ in 0..200 {
                let d = backoff(n, 100, 2_000, &mut rng).as_millis() as u64;
                let cap = (100u64 << (n - 1)).min(2_000);
                assert!(d <= cap, "retry {n}: {d} > {cap}");
            }
        }
        let spread: std::collections::HashSet<u128> = (0..50)
            .map(|_| backoff(3, 100, 2_000, &mut rng).as_millis())
            .collect();
        assert!(spread.len() > 10, "jittered");
        assert_eq!(backoff(1, 0, 0, &mut rng), Duration::ZERO);
    }

    /// Shares of first choices over `n` plans with `tuning`.
    fn first_shares(
        tiers: &[Vec<CompiledTarget>],
        strategy: Strategy,
        tuning: &Tuning<'_>,
        observe: impl Fn(&CompiledTarget) -> Observed,
        n: usize,
    ) -> std::collections::BTreeMap<String, f64> {
        let mut rng = fastrand::Rng::with_seed(13);
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            let order = plan(tiers, strategy, tuning, &observe, &mut rng);
            *counts.entry(order[0].target.provider.clone()).or_insert(0) += 1;
        }
        counts
            .into_iter()
            .map(|(k, c)| (k, f64::from(c) / n as f64))
            .collect()
    }

    #[test]
    fn streamed_requests_are_ranked_by_first_token_and_others_by_total_latency() {
        // `quick` starts streaming fast but takes long to finish; `steady` the reverse.
        let tiers = vec![vec![t("quick", 1), t("steady", 1)]];
        let observe = |x: &CompiledTarget| {
            let (first_token, total) = if x.provider == "quick" {
                (20.0, 2_000.0)
            } else {
                (200.0, 500.0)
            };
            Observed {
                stats: Some(TargetStats {
                    first_token_ms: Some(first_token),
                    total_ms: Some(total),
                    successes: 5.0,
                    failures: 0.0,
                }),
                ..Observed::default()
            }
        };
        let no_exploration = StrategyOptions {
            exploration_percent: 0,
            ..DEFAULTS
        };
        for (latency, best) in [(Latency::FirstToken, "quick"), (Latency::Total, "steady")] {
            let tuning = Tuning {
                options: &no_exploration,
                latency,
            };
            let shares = first_shares(&tiers, Strategy::LeastLatency, &tuning, observe, 200);
            assert_eq!(shares[best], 1.0, "{latency:?}: {shares:?}");
        }
        // A target measured only by whole answers is still unexplored for streams.
        let only_totals = |x: &CompiledTarget| {
            if x.provider == "quick" {
                measured(10.0, 5.0, 0.0)
            } else {
                observe(x)
            }
        };
        let streamed = Tuning {
            options: &no_exploration,
            latency: Latency::FirstToken,
        };
        let mut rng = fastrand::Rng::with_seed(1);
        let order = plan(
            &tiers,
            Strategy::LeastLatency,
            &streamed,
            only_totals,
            &mut rng,
        );
        assert_eq!(order[0].target.provider, "quick");
        assert_eq!(order[0].reason, Reason::Unexplored);
    }

    #[test]
    fn the_exploration_share_follows_the_option() {
        let tiers = vec![vec![t("best", 1), t("other", 1), t("third", 1)]];
        let observe = |x: &CompiledTarget| match x.provider.as_str() {
            "best" => measured(10.0, 5.0, 0.0),
            "other" => measured(50.0, 5.0, 0.0),
            _ => measured(90.0, 5.0, 0.0),
        };
        for (percent, low, high) in [(0, 0.0, 0.0), (10, 0.07, 0.13), (50, 0.45, 0.55)] {
            let options = StrategyOptions {
                exploration_percent: percent,
                ..DEFAULTS
            };
            let tuning = Tuning {
                options: &options,
                latency: Latency::Total,
            };
            let shares = first_shares(&tiers, Strategy::LeastLatency, &tuning, observe, 4_000);
            let explored = 1.0 - shares["best"];
            assert!(
                (low..=high).contains(&explored),
                "{percent}%: explored {explored}"
            );
        }
    }

    #[test]
    fn adaptive_weighs_latency_and_price_as_configured() {
        let tiers = vec![vec![t("fast-dear", 1), t("slow-cheap", 1)]];
        // Equally reliable; `fast-dear` 4x faster and 10x dearer.
        let observe = |x: &CompiledTarget| {
            let dear = x.provider == "fast-dear";
            Observed {
                price: Some(if dear { 20.0 } else { 2.0 }),
                ..measured(if dear { 100.0 } else { 400.0 }, 20.0, 0.0)
            }
        };
        let share = |latency_weight, cost_weight| {
            let options = StrategyOptions {
                exploration_percent: 0,
                latency_weight,
                cost_weight,
                ..DEFAULTS
            };
            let tuning = Tuning {
                options: &options,
                latency: Latency::Total,
            };
            first_shares(&tiers, Strategy::Adaptive, &tuning, observe, 2_000)
                .get("fast-dear")
                .copied()
                .unwrap_or(0.0)
        };
        // Latency only (the default weights): the fast one.
        let default = share(50, 0);
        assert!(default > 0.95, "default: fast first in {default}");
        // Neither latency nor price: a coin toss between equally reliable targets.
        let neither = share(0, 0);
        assert!((0.4..0.6).contains(&neither), "neither: {neither}");
        // Price weighed in fully: the cheap one, though slower.
        let priced = share(50, 100);
        assert!(priced < 0.05, "priced: fast-dear first in {priced}");
        // Without a price for either, price cannot count.
        let unpriced = |x: &CompiledTarget| Observed {
            price: None,
            ..observe(x)
        };
        let options = StrategyOptions {
            exploration_percent: 0,
            cost_weight: 100,
            ..DEFAULTS
        };
        let tuning = Tuning {
            options: &options,
            latency: Latency::Total,
        };
        let shares = first_shares(&tiers, Strategy::Adaptive, &tuning, unpriced, 500);
        assert!(shares["fast-dear"] > 0.95, "{shares:?}");
    }
}
