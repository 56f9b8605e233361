//! The `leastLatency` and `adaptive` routing strategies through the real gateway binary,
//! against upstreams whose latency and error rate change while traffic flows: traffic
//! moves away from a target that degrades within a bounded number of requests, and comes
//! back once it recovers. Streams are judged by their first token and their end, whole
//! answers by their total time; statistics are shared through Redis and survive its loss.

use crate::common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, extract::State, response::IntoResponse};
use common::{Gateway, client, redis::Redis, upstream::completion};

const KEY: &str = "tg_adaptiveRoutingTestKey000000000000000001";
const BODY: &str = r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}"#;
const STREAM_BODY: &str =
    r#"{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;

/// An OpenAI-style upstream whose latency and health the test changes on the fly.
#[derive(Clone, Default)]
struct Tunable {
    /// Time to the first token (the whole answer waits for it too).
    latency_ms: Arc<AtomicU64>,
    /// Time from the first token to the end of the answer.
    tail_ms: Arc<AtomicU64>,
    /// Answer 503.
    failing: Arc<AtomicBool>,
    /// Break streams right after their first token.
    breaking: Arc<AtomicBool>,
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

fn chunk(content: &str) -> String {
    let c = serde_json::json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]
    });
    format!("data: {c}\n\n")
}

async fn answer(State(up): State<Tunable>, body: String) -> axum::response::Response {
    up.hits.fetch_add(1, Ordering::SeqCst);
    let wait = |d: &AtomicU64| tokio::time::sleep(Duration::from_millis(d.load(Ordering::SeqCst)));
    wait(&up.latency_ms).await;
    if up.failing.load(Ordering::SeqCst) {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "overloaded").into_response();
    }
    if !body.contains(r#""stream":true"#) && !body.contains(r#""stream": true"#) {
        wait(&up.tail_ms).await;
        return axum::Json(completion("gpt-4o", "hi")).into_response();
    }
    let up2 = up.clone();
    let events = async_stream(move |tx| async move {
        let _ = tx.send(Ok(chunk("hel")));
        if up2.breaking.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = tx.send(Err(std::io::Error::other("reset")));
            return;
        }
        wait(&up2.tail_ms).await;
        let _ = tx.send(Ok(chunk("lo")));
        let _ = tx.send(Ok("data: [DONE]\n\n".to_owned()));
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

/// A body stream fed by a task.
fn async_stream<F, Fut>(
    produce: F,
) -> impl futures_util::Stream<Item = Result<String, std::io::Error>> + Send
where
    F: FnOnce(tokio::sync::mpsc::UnboundedSender<Result<String, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(produce(tx));
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// A gateway routing `gpt-4o` over providers `a` and `b` (one tier) with `strategy`.
/// Circuits open only after many failures, so the strategy, not the breaker, decides.
fn start(strategy: &str, a: &str, b: &str) -> (Gateway, tempfile::TempDir) {
    let dir = resources(strategy, "", a, b);
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    (gw, dir)
}

/// The configuration `start` serves, in a temporary directory; `options` is the
/// RoutePolicy's `strategyOptions` (flow style), if any.
fn resources(strategy: &str, options: &str, a: &str, b: &str) -> tempfile::TempDir {
    let provider = |name: &str, url: &str| {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: {name}}}\nspec:\n  type: openaiCompatible\n  baseUrl: {url}\n\
             \x20 credentials: {{secretRef: {{name: up-credentials, key: token}}}}\n  models: [{{name: gpt-4o}}]\n\
             \x20 circuitBreaker: {{failureThreshold: 1000, openDuration: 1s}}\n---\n"
        )
    };
    let options = if options.is_empty() {
        String::new()
    } else {
        format!("  strategyOptions: {options}\n")
    };
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up-credentials, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec: {{owner: tests}}\n---\n\
         {}{}\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n  models: [gpt-4o]\n\
         \x20 strategy: {strategy}\n{options}  targets: [{{provider: a}}, {{provider: b}}]\n\
         \x20 retries: {{attempts: 1, initialBackoff: 1ms, maxBackoff: 1ms}}\n",
        provider("a", a),
        provider("b", b),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    dir
}

/// Sends one whole-answer request and tells whether `a` was tried first. With two
/// targets and one retry, `a` is hit exactly when it is the first choice (a failed `b` is
/// never retried on `a` here because `b` never fails).
async fn a_first(gw: &Gateway, a: &Tunable) -> bool {
    send(gw, a, BODY).await.0
}

/// Sends `body` and returns whether `a` was tried first and the response text.
async fn send(gw: &Gateway, a: &Tunable, body: &'static str) -> (bool, String) {
    let before = a.hits();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    (a.hits() > before, text)
}

/// Sends whole-answer requests until `run` consecutive ones chose `a` (when `want_a`) or
/// `b` first; returns how many it took, failing beyond `limit`.
async fn requests_until(
    gw: &Gateway,
    a: &Tunable,
    want_a: bool,
    run: usize,
    limit: usize,
) -> usize {
    streak_of(gw, a, BODY, want_a, run, limit).await
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
        metrics.contains(r#"tollgate_target_latency_ewma_seconds{route="default/chat",provider="default/b",model="gpt-4o",latency="total"}"#),
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
    let dir = resources("leastLatency", "", &a_url, &b_url);
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
    let dir = resources("leastLatency", "", &a_url, &b_url);
    let dead = format!("redis://127.0.0.1:{}/", common::free_port());
    let gw = Gateway::with_redis(dir.path(), &dead, "100ms", "failOpen");
    requests_until(&gw, &a, false, 5, 40).await;
    // 10% of requests explore: over 40, more than 12 on the slow target is a 1-in-10,000
    // chance (20 was 1 in 400, and was seen failing on a loaded machine).
    let share = a_share(&gw, &a, 40).await;
    assert!(share <= 0.3, "the slow target first in {share} of requests");
}

/// Sends `body` until `run` consecutive requests chose `a` (when `want_a`) or `b` first;
/// returns how many it took, failing beyond `limit`.
async fn streak_of(
    gw: &Gateway,
    a: &Tunable,
    body: &'static str,
    want_a: bool,
    run: usize,
    limit: usize,
) -> usize {
    let mut streak = 0;
    for n in 1..=limit {
        if send(gw, a, body).await.0 == want_a {
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

#[tokio::test]
async fn least_latency_ranks_streams_by_first_token_and_whole_answers_by_total_time() {
    // `a` starts answering at once but takes long to finish; `b` is steady.
    let (a, a_url) = Tunable::start(5).await;
    a.tail_ms.store(250, Ordering::SeqCst);
    let (b, b_url) = Tunable::start(80).await;
    // No exploration: once both are measured the choice is deterministic.
    let dir = resources(
        "leastLatency",
        "{explorationPercent: 0, memory: 3}",
        &a_url,
        &b_url,
    );
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);

    // Two requests of each kind measure both targets for that kind.
    for _ in 0..2 {
        send(&gw, &a, STREAM_BODY).await;
        send(&gw, &a, BODY).await;
    }
    let (a_before, b_before) = (a.hits(), b.hits());
    for _ in 0..10 {
        let (to_a, text) = send(&gw, &a, STREAM_BODY).await;
        assert!(
            to_a,
            "a stream went to b although a's first token comes first"
        );
        assert!(text.contains("[DONE]"), "{text}");
        assert!(
            !send(&gw, &a, BODY).await.0,
            "a whole answer went to the slower a"
        );
    }
    assert_eq!((a.hits() - a_before, b.hits() - b_before), (10, 10));

    let metrics = gw.metrics().await;
    let gauge = |provider: &str, latency: &str| {
        common::metric(
            &metrics,
            &format!(
                r#"tollgate_target_latency_ewma_seconds{{route="default/chat",provider="default/{provider}",model="gpt-4o",latency="{latency}"}}"#
            ),
        )
    };
    let (a_first_token, a_total) = (gauge("a", "first_token"), gauge("a", "total"));
    let (b_first_token, b_total) = (gauge("b", "first_token"), gauge("b", "total"));
    eprintln!(
        "first token: a {a_first_token:.3} s, b {b_first_token:.3} s; total: a {a_total:.3} s, b {b_total:.3} s"
    );
    assert!(a_first_token < b_first_token && a_total > b_total);
    // Completed streams feed the total average too: a's includes its streams' 255 ms.
    assert!(a_total > 0.2, "{a_total}");
    assert!(
        !metrics.contains(r#"reason="exploration""#),
        "explorationPercent 0 explores nothing:\n{metrics}"
    );
}

#[tokio::test]
async fn adaptive_moves_streams_off_a_target_whose_streams_break_midway() {
    streams_leave_a_target_that_breaks_them("adaptive").await;
}

#[tokio::test]
async fn least_latency_moves_streams_off_a_target_whose_streams_break_midway() {
    streams_leave_a_target_that_breaks_them("leastLatency").await;
}

async fn streams_leave_a_target_that_breaks_them(strategy: &str) {
    let (a, a_url) = Tunable::start(5).await;
    let (b, b_url) = Tunable::start(40).await;
    let (gw, _dir) = start(strategy, &a_url, &b_url);
    streak_of(&gw, &a, STREAM_BODY, true, 5, 40).await;

    // `a` still answers fast with a first token, then resets the connection: the client
    // gets an error event, and routing must count a failure, not the fast first token.
    a.breaking.store(true, Ordering::SeqCst);
    loop {
        let (to_a, text) = send(&gw, &a, STREAM_BODY).await;
        if to_a {
            assert!(text.contains("upstream_stream_error"), "{text}");
            break;
        }
    }
    let shift = streak_of(&gw, &a, STREAM_BODY, false, 5, 40).await;
    let mut broken_first = 0;
    for _ in 0..30 {
        if send(&gw, &a, STREAM_BODY).await.0 {
            broken_first += 1;
        }
    }
    assert!(
        broken_first <= 9,
        "{strategy}: a breaking target first {broken_first} of 30 times"
    );

    a.breaking.store(false, Ordering::SeqCst);
    let back = streak_of(&gw, &a, STREAM_BODY, true, 5, 300).await;
    eprintln!(
        "{strategy}: streams left the breaking target after {shift} requests (then first {broken_first}/30), back after {back}; b served {}",
        b.hits()
    );
}

/// Fields of the shared statistics hash, as `(target, instance) -> (total ms, successes)`.
async fn shared_reports(
    redis: &Redis,
) -> std::collections::BTreeMap<(String, String), (Option<f64>, f64)> {
    let fields: std::collections::HashMap<String, String> = common::redis::query(
        &redis.url(),
        redis::cmd("HGETALL").arg("tollgate:{routing}:targets"),
    )
    .await
    .unwrap_or_default();
    fields
        .into_iter()
        .filter_map(|(field, value)| {
            let (target, instance) = field.rsplit_once('|')?;
            let parts: Vec<&str> = value.split(' ').collect();
            Some((
                (target.to_owned(), instance.to_owned()),
                (parts[1].parse().ok(), parts[2].parse().ok()?),
            ))
        })
        .collect()
}

#[tokio::test]
async fn routing_keeps_adapting_on_local_statistics_while_redis_is_down_and_shares_again_after() {
    let mut redis = Redis::start();
    let (a, a_url) = Tunable::start(150).await;
    let (b, b_url) = Tunable::start(5).await;
    let dir = resources("leastLatency", "", &a_url, &b_url);
    let one = Gateway::with_redis(dir.path(), &redis.url(), "200ms", "failOpen");
    let two = Gateway::with_redis(dir.path(), &redis.url(), "200ms", "failOpen");
    for gw in [&one, &two] {
        requests_until(gw, &a, false, 5, 40).await;
    }
    // Both replicas' reports of both targets reach Redis.
    let reports = common::eventually_value(
        || shared_reports(&redis),
        |r| r.len() == 4 && r.values().all(|(total, _)| total.is_some()),
    )
    .await;
    let instances: std::collections::BTreeSet<String> =
        reports.keys().map(|(_, i)| i.clone()).collect();
    assert_eq!(instances.len(), 2, "{reports:?}");

    // Redis goes away, and then the targets swap speeds: each replica notices on its own.
    redis.kill();
    // The other replica's view is dropped at the next failed exchange (within a second
    // and the 500 ms timeout); until then it still counts.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    a.latency_ms.store(5, Ordering::SeqCst);
    b.latency_ms.store(150, Ordering::SeqCst);
    let mut shifts = Vec::new();
    for gw in [&one, &two] {
        shifts.push(requests_until(gw, &a, true, 5, 120).await);
        let share = a_share(gw, &a, 30).await;
        assert!(
            share >= 0.65,
            "without Redis, the now-fast a first in {share}"
        );
    }

    // Redis comes back empty: the replicas publish again within a couple of seconds,
    // with what they measured meanwhile (a now faster than b).
    redis.restart();
    let restarted = std::time::Instant::now();
    let reports = common::eventually_value(
        || shared_reports(&redis),
        |r| r.len() == 4 && r.values().all(|(total, _)| total.is_some()),
    )
    .await;
    eprintln!("republished after {:?}", restarted.elapsed());
    assert_eq!(reports.len(), 4, "not published again: {reports:?}");
    for instance in instances {
        let total =
            |t: &str| reports[&(format!("default/chat#default/{t}#gpt-4o"), instance.clone())].0;
        assert!(total("a") < total("b"), "{instance}: {reports:?}");
    }
    eprintln!(
        "without Redis, the replicas moved to the recovered target after {shifts:?} requests"
    );
}
