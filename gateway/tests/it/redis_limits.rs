//! The Redis limits store against a real redis-server: exact limits shared by several
//! "replicas" (independent store clients) under concurrency, reservations settled,
//! leases that expire when a replica never settles, and bounded calls when Redis hangs.

use crate::common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::redis::Redis;
use tollgate_api::{
    config::{CompiledBudget, CompiledLimits},
    v1alpha1::BudgetPeriod,
};
use tollgate_gateway::limits::{
    Ask, Limit,
    redis::{RedisLimits, StoreError},
};

async fn replicas(redis: &Redis, n: usize, lease: Duration) -> Vec<Arc<RedisLimits>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(
            RedisLimits::connect(&redis.url(), Duration::from_secs(2), lease)
                .await
                .unwrap(),
        ));
    }
    out
}

fn limits(rpm: Option<u32>, tpm: Option<u64>, conc: Option<u32>) -> CompiledLimits {
    CompiledLimits {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
        max_concurrent: conc,
    }
}

fn ask<'a>(
    key: &'a str,
    l: Option<&'a CompiledLimits>,
    budget: Option<&'a CompiledBudget>,
    tokens: u64,
    cost: f64,
) -> Ask<'a> {
    Ask {
        key_id: key,
        key_limits: l,
        budget,
        route_id: "ns/route",
        route_limits: None,
        tokens,
        cost,
    }
}

#[tokio::test]
async fn three_replicas_admit_exactly_the_request_limit_under_concurrency() {
    let redis = Redis::start();
    let stores = replicas(&redis, 3, Duration::from_secs(60)).await;
    let l = Arc::new(limits(Some(25), None, None));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..90 {
        let store = stores[i % 3].clone();
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            store
                .admit(&ask("k-rpm", Some(&l), None, 1, 0.0), &format!("r{i}"))
                .await
                .unwrap()
                .is_ok()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    // One request refills every 2.4 s: count what a slow machine may legitimately add.
    let allowed = 25 + (started.elapsed().as_secs_f64() / 2.4).floor() as usize;
    assert!(admitted >= 25, "false rejections: {}", 25 - admitted);
    assert!(
        admitted <= allowed,
        "overshoot: {} over {allowed}",
        admitted - allowed
    );
}

#[tokio::test]
async fn token_reservations_settle_to_actual_usage_across_replicas() {
    let redis = Redis::start();
    let stores = replicas(&redis, 2, Duration::from_secs(60)).await;
    let l = limits(None, Some(1000), None);
    let (first, quota) = stores[0]
        .admit(&ask("k-tpm", Some(&l), None, 800, 0.0), "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(quota.tokens.unwrap().1, 200);
    let refused = stores[1]
        .admit(&ask("k-tpm", Some(&l), None, 300, 0.0), "b")
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.limit, Limit::Tokens);
    assert!(refused.retry_after.unwrap() <= Duration::from_secs(7));
    stores[0].settle(&first, 50, 0.0).await.unwrap();
    assert!(
        stores[1]
            .admit(&ask("k-tpm", Some(&l), None, 300, 0.0), "c")
            .await
            .unwrap()
            .is_ok(),
        "750 refunded"
    );
}

#[tokio::test]
async fn concurrency_leases_are_shared_released_and_expire_if_never_settled() {
    let redis = Redis::start();
    let stores = replicas(&redis, 2, Duration::from_millis(300)).await;
    let l = limits(None, None, Some(1));
    let (held, _) = stores[0]
        .admit(&ask("k-conc", Some(&l), None, 1, 0.0), "a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stores[1]
            .admit(&ask("k-conc", Some(&l), None, 1, 0.0), "b")
            .await
            .unwrap()
            .unwrap_err()
            .limit,
        Limit::Concurrency
    );
    stores[0].settle(&held, 1, 0.0).await.unwrap();
    let (_abandoned, _) = stores[1]
        .admit(&ask("k-conc", Some(&l), None, 1, 0.0), "c")
        .await
        .unwrap()
        .unwrap();
    // The replica holding "c" dies without settling: its lease runs out on its own.
    assert!(
        stores[0]
            .admit(&ask("k-conc", Some(&l), None, 1, 0.0), "d")
            .await
            .unwrap()
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        stores[0]
            .admit(&ask("k-conc", Some(&l), None, 1, 0.0), "e")
            .await
            .unwrap()
            .is_ok()
    );
}

#[tokio::test]
async fn concurrent_requests_cannot_overspend_a_budget() {
    let redis = Redis::start();
    let stores = replicas(&redis, 3, Duration::from_secs(60)).await;
    let budget = Arc::new(CompiledBudget {
        amount: 1.0,
        period: BudgetPeriod::Daily,
        currency: "USD".into(),
    });
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = stores[i % 3].clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            match store
                .admit(
                    &ask("k-budget", None, Some(&budget), 1, 0.3),
                    &format!("r{i}"),
                )
                .await
                .unwrap()
            {
                Ok((r, _)) => {
                    // Each answer actually costs 0.1 of its 0.3 reservation.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    store.settle(&r, 1, 0.1).await.unwrap();
                    1
                }
                Err(rejection) => {
                    assert_eq!(rejection.limit, Limit::Budget);
                    0
                }
            }
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    let spent = stores[0]
        .spent("k-budget", BudgetPeriod::Daily)
        .await
        .unwrap();
    assert!(spent <= 1.0 + 1e-9, "spent {spent} of 1.0");
    assert!((spent - admitted as f64 * 0.1).abs() < 1e-9);
    assert!(
        admitted >= 3,
        "at least the reservations that fit at once were admitted: {admitted}"
    );
}

#[tokio::test]
async fn a_hung_redis_fails_calls_within_the_timeout_instead_of_hanging() {
    let redis = Redis::start();
    let store = RedisLimits::connect(
        &redis.url(),
        Duration::from_millis(200),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let l = limits(Some(10), None, None);
    assert!(
        store
            .admit(&ask("k-hang", Some(&l), None, 1, 0.0), "a")
            .await
            .unwrap()
            .is_ok()
    );
    redis.signal("STOP");
    let started = Instant::now();
    let result = store
        .admit(&ask("k-hang", Some(&l), None, 1, 0.0), "b")
        .await;
    let elapsed = started.elapsed();
    redis.signal("CONT");
    assert!(matches!(result, Err(StoreError::Timeout(_))), "{result:?}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    // And it recovers once Redis is back.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            store
                .admit(&ask("k-hang", Some(&l), None, 1, 0.0), "c")
                .await
                .is_ok()
        })
        .await
    );
}
