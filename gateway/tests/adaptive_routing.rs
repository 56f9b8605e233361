//! The `leastLatency` and `adaptive` routing strategies through the real gateway binary,
//! against upstreams whose latency and error rate change while traffic flows: traffic
//! moves away from a target that degrades within a bounded number of requests, and comes
//! back once it recovers.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, response::IntoResponse};
use common::{Gateway, client, redis::Redis, upstream::completion};

const KEY: &str = "tg_adaptiveRoutingTestKey000000000000000001";
const BODY: &str = r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}"#;

/// An OpenAI-style upstream whose latency and health the test changes on the fly.
#[derive(Clone, Default)]
struct Tunable {
    latency_ms: Arc<AtomicU64>,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
}

impl Tunable {
    async fn start(latency_ms: u64) -> (Self, String) {
        let up = Self::default();
        up.latency_ms.store(latency_ms, Ordering::SeqCst);
        let app = Router::new().fallback(answer).with_state(up.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (up, url)
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn answer(State(up): State<Tunable>) -> axum::response::Response {
    up.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(up.latency_ms.load(Ordering::SeqCst))).await;
    if up.failing.load(Ordering::SeqCst) {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response();
    }
    axum::Json(completion("gpt-4o", "hi")).into_response()
}

/// A gateway routing `gpt-4o` over providers `a` and `b` (one tier) with `strategy`.
/// Circuits open only after many failures, so the strategy, not the breaker, decides.
fn start(strategy: &str, a: &str, b: &str) -> (Gateway, tempfile::TempDir) {
    let dir = resources(strategy, a, b);
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    (gw, dir)
}

/// The configuration `start` serves, in a temporary directory.
fn resources(strategy: &str, a: &str, b: &str) -> tempfile::TempDir {
    let provider = |name: &str, url: &str| {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: {name}}}\nspec:\n  type: openaiCompatible\n  baseUrl: {url}\n\
             \x20 credentials: {{secretRef: {{name: up-credentials, key: token}}}}\n  models: [{{name: gpt-4o}}]\n\
             \x20 circuitBreaker: {{failureThreshold: 1000, openDuration: 1s}}\n---\n"
        )
    };
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up-credentials}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests}}\n---\n\
         {}{}\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n  models: [gpt-4o]\n\
         \x20 strategy: {strategy}\n  targets: [{{provider: a}}, {{provider: b}}]\n\
         \x20 retries: {{attempts: 1, initialBackoff: 1ms, maxBackoff: 1ms}}\n",
        provider("a", a),
        provider("b", b),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    dir
}

/// Sends one request and tells whether `a` was tried first. With two targets and one
/// retry, `a` is hit exactly when it is the first choice (a failed `b` is never retried
/// on `a` here because `b` never fails).
async fn a_first(gw: &Gateway, a: &Tunable) -> bool {
    let before = a.hits();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    a.hits() > before
}

/// Sends requests until `run` consecutive ones chose `a` (when `want_a`) or `b` first;
/// returns how many it took, failing beyond `limit`.
async fn requests_until(
    gw: &Gateway,
    a: &Tunable,
    want_a: bool,
    run: usize,
    limit: usize,
) -> usize {
    let mut streak = 0;
    for n in 1..=limit {
        if a_first(gw, a).await == want_a {
            streak += 1;
            if streak == run {
                return n;
            }
        } else {
            streak = 0;
        }
    }
    panic!(
        "no run of {run} first choices of {} within {limit} requests",
        if want_a { "a" } else { "b" }
    );
}

/// Share of `n` requests that chose `a` first.
async fn a_share(gw: &Gateway, a: &Tunable, n: usize) -> f64 {
    let mut count = 0;
    for _ in 0..n {
        if a_first(gw, a).await {
            count += 1;
        }
    }
    count as f64 / n as f64
}

/// Degrades `a` with `degrade`, then restores it with `recover`, asserting the shifts.
async fn shifts_away_and_back(
    strategy: &str,
    degrade: impl Fn(&Tunable),
    recover: impl Fn(&Tunable),
) {
    let (a, a_url) = Tunable::start(5).await;
    let (b, b_url) = Tunable::start(40).await;
    let (gw, _dir) = start(strategy, &a_url, &b_url);

    // Both are measured first, then the faster one takes the traffic.
    let settle = requests_until(&gw, &a, true, 5, 40).await;
    let healthy_share = a_share(&gw, &a, 40).await;
    assert!(
        healthy_share >= 0.7,
        "{strategy}: a first in {healthy_share} of requests"
    );

    degrade(&a);
    let shift = requests_until(&gw, &a, false, 5, 40).await;
    let degraded_share = a_share(&gw, &a, 40).await;
    assert!(
        degraded_share <= 0.3,
        "{strategy}: degraded a still first in {degraded_share}"
    );

    recover(&a);
    let back = requests_until(&gw, &a, true, 5, 300).await;
    let recovered_share = a_share(&gw, &a, 40).await;
    assert!(
        recovered_share >= 0.7,
        "{strategy}: recovered a first in {recovered_share}"
    );

    eprintln!(
        "{strategy}: settled after {settle}, shifted away after {shift}, back after {back} requests \
         (a first: healthy {healthy_share}, degraded {degraded_share}, recovered {recovered_share}; b served {} attempts)",
        b.hits()
    );
    let metrics = gw.metrics().await;
    for reason in ["exploration", "unexplored"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\""))
                && metrics.contains(&format!("strategy=\"{strategy}\"")),
            "{strategy}: no {reason} decision counted:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(r#"tollgate_target_latency_ewma_seconds{route="default/chat",provider="default/b",model="gpt-4o"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn least_latency_moves_traffic_off_a_slowed_target_and_back_when_it_recovers() {
    shifts_away_and_back(
        "leastLatency",
        |a| a.latency_ms.store(150, Ordering::SeqCst),
        |a| a.latency_ms.store(5, Ordering::SeqCst),
    )
    .await;
}

#[tokio::test]
async fn adaptive_moves_traffic_off_a_failing_target_and_back_when_it_recovers() {
    shifts_away_and_back(
        "adaptive",
        |a| a.failing.store(true, Ordering::SeqCst),
        |a| a.failing.store(false, Ordering::SeqCst),
    )
    .await;
}

#[tokio::test]
async fn adaptive_prefers_the_faster_of_two_healthy_targets() {
    let (a, a_url) = Tunable::start(5).await;
    let (_b, b_url) = Tunable::start(80).await;
    let (gw, _dir) = start("adaptive", &a_url, &b_url);
    requests_until(&gw, &a, true, 5, 40).await;
    let share = a_share(&gw, &a, 30).await;
    assert!(
        share >= 0.6,
        "the faster target first in {share} of requests"
    );
}

#[tokio::test]
async fn with_redis_a_second_replica_starts_from_what_the_first_measured() {
    let redis = Redis::start();
    let (a, a_url) = Tunable::start(150).await;
    let (_b, b_url) = Tunable::start(5).await;
    let dir = resources("leastLatency", &a_url, &b_url);
    let first = Gateway::with_redis(dir.path(), &redis.url(), "200ms", "failOpen");
    for _ in 0..6 {
        a_first(&first, &a).await;
    }
    // Both targets are measured on the first replica; its report reaches Redis within a
    // second and the second replica reads it back within another.
    let second = Gateway::with_redis(dir.path(), &redis.url(), "200ms", "failOpen");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let a_hits = a.hits();
    let mut a_first_count = 0;
    for _ in 0..10 {
        if a_first(&second, &a).await {
            a_first_count += 1;
        }
    }
    assert!(
        a_first_count <= 3,
        "the slow target first {a_first_count} times of 10"
    );
    let metrics = second.metrics().await;
    assert!(
        !metrics.contains(r#"reason="unexplored""#),
        "the second replica had nothing left to explore:\n{metrics}"
    );
    assert!(a.hits() - a_hits <= 3);
}

#[tokio::test]
async fn without_reachable_redis_routing_falls_back_to_local_statistics() {
    let (a, a_url) = Tunable::start(120).await;
    let (_b, b_url) = Tunable::start(5).await;
    let dir = resources("leastLatency", &a_url, &b_url);
    let dead = format!("redis://127.0.0.1:{}/", common::redis::free_port());
    let gw = Gateway::with_redis(dir.path(), &dead, "100ms", "failOpen");
    requests_until(&gw, &a, false, 5, 40).await;
    let share = a_share(&gw, &a, 20).await;
    assert!(share <= 0.3, "the slow target first in {share} of requests");
}
