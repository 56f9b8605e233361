use std::time::{Duration, Instant};

use tollgate_api::{
    config::{CompiledBudget, CompiledLimits},
    v1alpha1::BudgetPeriod,
};

use super::*;

fn limits(rpm: Option<u32>, tpm: Option<u64>, conc: Option<u32>) -> CompiledLimits {
    CompiledLimits {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
        max_concurrent: conc,
    }
}

fn ask<'a>(
    key: Option<&'a CompiledLimits>,
    route: Option<&'a CompiledLimits>,
    budget: Option<&'a CompiledBudget>,
    tokens: u64,
    cost: f64,
) -> Ask<'a> {
    Ask {
        key_id: "k1",
        key_limits: key,
        budget,
        route_id: "ns/r",
        route_limits: route,
        tokens,
        cost,
    }
}

fn wall() -> jiff::Timestamp {
    "2026-11-21T12:00:00Z".parse().unwrap()
}

#[test]
fn requests_per_minute_admit_exactly_the_limit_then_refill_over_time() {
    let store = LocalLimits::default();
    let l = limits(Some(3), None, None);
    let t0 = Instant::now();
    for _ in 0..3 {
        store
            .admit_at(&ask(Some(&l), None, None, 1, 0.0), t0, wall())
            .unwrap();
    }
    let err = store
        .admit_at(&ask(Some(&l), None, None, 1, 0.0), t0, wall())
        .unwrap_err();
    assert_eq!((err.limit, err.scope), (Limit::Requests, Scope::Key));
    assert_eq!(
        err.retry_after,
        Some(Duration::from_secs(20)),
        "one request refills every 20 s at 3/min"
    );
    assert!(
        store
            .admit_at(
                &ask(Some(&l), None, None, 1, 0.0),
                t0 + Duration::from_secs(20),
                wall()
            )
            .is_ok()
    );
}

#[test]
fn tokens_are_reserved_up_front_and_refunded_on_settlement() {
    let store = LocalLimits::default();
    let l = limits(None, Some(1000), None);
    let t0 = Instant::now();
    let (r, quota) = store
        .admit_at(&ask(Some(&l), None, None, 800, 0.0), t0, wall())
        .unwrap();
    assert_eq!(quota.tokens.unwrap().1, 200);
    assert_eq!(
        store
            .admit_at(&ask(Some(&l), None, None, 300, 0.0), t0, wall())
            .unwrap_err()
            .limit,
        Limit::Tokens
    );
    store.settle_at(&r, 100, 0.0);
    assert!(
        store
            .admit_at(&ask(Some(&l), None, None, 300, 0.0), t0, wall())
            .is_ok(),
        "700 refunded"
    );
}

#[test]
fn concurrency_leases_are_released_on_settlement() {
    let store = LocalLimits::default();
    let l = limits(None, None, Some(1));
    let t0 = Instant::now();
    let (r, _) = store
        .admit_at(&ask(Some(&l), None, None, 1, 0.0), t0, wall())
        .unwrap();
    assert_eq!(
        store
            .admit_at(&ask(Some(&l), None, None, 1, 0.0), t0, wall())
            .unwrap_err()
            .limit,
        Limit::Concurrency
    );
    store.settle_at(&r, 1, 0.0);
    assert!(
        store
            .admit_at(&ask(Some(&l), None, None, 1, 0.0), t0, wall())
            .is_ok()
    );
}

#[test]
fn admission_is_all_or_nothing_across_key_and_route_limits() {
    let store = LocalLimits::default();
    let key = limits(Some(100), None, Some(5));
    let route = limits(Some(1), None, None);
    let t0 = Instant::now();
    store
        .admit_at(&ask(Some(&key), Some(&route), None, 1, 0.0), t0, wall())
        .unwrap();
    let err = store
        .admit_at(&ask(Some(&key), Some(&route), None, 1, 0.0), t0, wall())
        .unwrap_err();
    assert_eq!((err.limit, err.scope), (Limit::Requests, Scope::Route));
    // The refused request took nothing from the key: 99 more fit.
    let key_only = limits(Some(100), None, None);
    let mut admitted = 0;
    while store
        .admit_at(&ask(Some(&key_only), None, None, 1, 0.0), t0, wall())
        .is_ok()
    {
        admitted += 1;
    }
    assert_eq!(admitted, 99);
}

#[test]
fn budgets_count_in_flight_reservations_and_settle_to_actual_spend() {
    let store = LocalLimits::default();
    let budget = CompiledBudget {
        amount: 1.0,
        period: BudgetPeriod::Daily,
        currency: "USD".into(),
    };
    let t0 = Instant::now();
    let (a, _) = store
        .admit_at(&ask(None, None, Some(&budget), 1, 0.6), t0, wall())
        .unwrap();
    let err = store
        .admit_at(&ask(None, None, Some(&budget), 1, 0.6), t0, wall())
        .unwrap_err();
    assert_eq!(err.limit, Limit::Budget);
    assert_eq!(
        err.retry_after,
        Some(Duration::from_secs(12 * 3600)),
        "until midnight UTC"
    );
    store.settle_at(&a, 1, 0.1);
    let (slot, _) = budget_slot("k1", BudgetPeriod::Daily, wall());
    assert!((store.spent(&slot) - 0.1).abs() < 1e-9);
    assert!(
        store
            .admit_at(&ask(None, None, Some(&budget), 1, 0.6), t0, wall())
            .is_ok()
    );
}

#[test]
fn budget_slots_follow_utc_days_months_and_all_time() {
    let now = wall();
    assert_eq!(
        budget_slot("k", BudgetPeriod::Daily, now).0,
        "budget:k:2026-11-21"
    );
    assert_eq!(
        budget_slot("k", BudgetPeriod::Monthly, now).0,
        "budget:k:2026-11"
    );
    let (slot, until) = budget_slot("k", BudgetPeriod::Total, now);
    assert_eq!((slot.as_str(), until), ("budget:k:total", None));
    let (_, until) = budget_slot("k", BudgetPeriod::Monthly, now);
    assert_eq!(until, Some(Duration::from_secs((9 * 24 + 12) * 3600)));
}

#[test]
fn reset_durations_use_openai_formatting() {
    assert_eq!(reset_string(Duration::from_millis(12)), "12ms");
    assert_eq!(reset_string(Duration::from_secs(1)), "1s");
    assert_eq!(reset_string(Duration::from_millis(1500)), "1.5s");
    assert_eq!(reset_string(Duration::from_secs(360)), "6m0s");
    assert_eq!(reset_string(Duration::from_secs(3725)), "1h2m5s");
}
