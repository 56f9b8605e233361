//! Pure routing decisions: the order in which targets are tried (per strategy), and retry
//! backoff.

use std::{cmp::Ordering, time::Duration};

use tollgate_api::{config::CompiledTarget, v1alpha1::Strategy};

use crate::target_stats::TargetStats;

/// Share of requests whose first choice within a tier is another healthy target than the
/// best one (`leastLatency` and `adaptive`), so that a recovered target gets measured.
pub const EXPLORATION: f64 = 0.1;

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
        }
    }
}

/// One position of the attempt order.
#[derive(Debug, Clone, Copy)]
pub struct Planned<'a> {
    /// The target.
    pub target: &'a CompiledTarget,
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
}

/// The attempt order under `strategy`: tier by tier (fallback), each tier ordered by the
/// strategy; within a tier, targets with an open circuit go after the healthy ones.
pub fn plan<'a>(
    tiers: &'a [Vec<CompiledTarget>],
    strategy: Strategy,
    observe: impl Fn(&CompiledTarget) -> Observed,
    rng: &mut fastrand::Rng,
) -> Vec<Planned<'a>> {
    let mut order = Vec::with_capacity(tiers.iter().map(Vec::len).sum());
    for (tier, members) in tiers.iter().enumerate() {
        let observed: Vec<(&CompiledTarget, Observed)> =
            members.iter().map(|t| (t, observe(t))).collect();
        let (ranked, reason) = match strategy {
            Strategy::Weighted => (
                attempt_order(std::slice::from_ref(members), rng),
                Reason::Weighted,
            ),
            Strategy::LeastLatency | Strategy::Adaptive => rank(&observed, strategy, rng),
        };
        // Open circuits last (stable, so the strategy's order holds among the rest).
        let is_open = |t: &CompiledTarget| {
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
fn rank<'a>(
    members: &[(&'a CompiledTarget, Observed)],
    strategy: Strategy,
    rng: &mut fastrand::Rng,
) -> (Vec<&'a CompiledTarget>, Reason) {
    // Unmeasured targets first, in random order, so each gets measured.
    let mut unexplored: Vec<&CompiledTarget> = members
        .iter()
        .filter(|(_, o)| o.stats.and_then(|s| s.latency_ms).is_none())
        .map(|(t, _)| *t)
        .collect();
    rng.shuffle(&mut unexplored);
    let measured: Vec<(&CompiledTarget, TargetStats)> = members
        .iter()
        .filter_map(|(t, o)| o.stats.filter(|s| s.latency_ms.is_some()).map(|s| (*t, s)))
        .collect();
    let mut scored: Vec<(&CompiledTarget, f64)> = match strategy {
        Strategy::Adaptive => {
            let fastest = measured
                .iter()
                .filter_map(|(_, s)| s.latency_ms)
                .fold(f64::INFINITY, f64::min)
                .max(1.0);
            measured
                .iter()
                .map(|(t, s)| {
                    // The square root keeps success dominant: a target four times slower
                    // scores half, while one that fails most of the time scores near 0.
                    let speed = (fastest / s.latency_ms.unwrap_or(fastest).max(1.0)).sqrt();
                    (*t, s.sample_success_rate(rng) * speed)
                })
                .collect()
        }
        // Higher is better: the negated average.
        _ => measured
            .iter()
            .map(|(t, s)| (*t, -s.latency_ms.unwrap_or(0.0)))
            .collect(),
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
    if !healthy_others.is_empty() && rng.f64() < EXPLORATION {
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
pub fn attempt_order<'a>(
    tiers: &'a [Vec<CompiledTarget>],
    rng: &mut fastrand::Rng,
) -> Vec<&'a CompiledTarget> {
    let mut order = Vec::with_capacity(tiers.iter().map(Vec::len).sum());
    for tier in tiers {
        let mut rest: Vec<&CompiledTarget> = tier.iter().collect();
        while !rest.is_empty() {
            let total: u64 = rest.iter().map(|t| u64::from(t.weight)).sum();
            let index = if total == 0 {
                0
            } else {
                let mut pick = rng.u64(0..total);
                rest.iter()
                    .position(|t| {
                        let w = u64::from(t.weight);
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

    fn measured(latency_ms: f64, successes: f64, failures: f64) -> Observed {
        Observed {
            stats: Some(TargetStats {
                latency_ms: Some(latency_ms),
                successes,
                failures,
            }),
            open: false,
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
            let order = plan(tiers, strategy, &observe, &mut rng);
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
            let order = plan(&tiers, Strategy::LeastLatency, observe, &mut rng);
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
                    plan(&tiers, Strategy::Adaptive, observe, &mut rng)
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
                let order = plan(&tiers, strategy, observe, &mut rng);
                assert_eq!(order[0].target.provider, "ok", "{strategy:?}");
                assert_eq!(order[1].target.provider, "broken", "kept for retries");
            }
        }
        // The strategy's own pick was the broken one: the reason says so.
        let mut rng = fastrand::Rng::with_seed(2);
        let order = plan(&tiers, Strategy::Weighted, observe, &mut rng);
        assert_eq!(order[0].reason, Reason::OnlyHealthy);
        // When every member is open the order stays the strategy's.
        let all_open = |x: &CompiledTarget| Observed {
            open: true,
            ..observe(x)
        };
        let order = plan(&tiers, Strategy::LeastLatency, all_open, &mut rng);
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
}
