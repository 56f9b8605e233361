//! Pure routing decisions: the order in which targets are tried, and retry backoff.

use std::time::Duration;

use tollgate_api::config::CompiledTarget;

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
