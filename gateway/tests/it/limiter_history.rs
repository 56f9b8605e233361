//! Limiter accuracy, Jepsen-style: three gateway processes share one redis-server while
//! concurrent bursts hit three keys with different limits: an opening burst well past
//! every capacity, bursts fired just before and just after the instants the requests
//! bucket refills its next unit, and steady bursts across three Redis faults (shut down
//! and restarted empty, SIGKILLed and restarted empty, hung with SIGSTOP then resumed).
//! Every request is logged as one JSONL history record (send and receive times, gateway,
//! key, status, rate-limit headers, request id) and the history is checked offline, after
//! the run, against a model of the limiter.
//!
//! The model is the one `admit.lua` implements: requests and tokens per minute are token
//! buckets holding a minute's allowance, refilled continuously on Redis server time (the
//! same clock as this test's: one machine). Limits have no fixed windows, so every window
//! is checked: for all `a <= b`, the requests admitted certainly within `[a, b]` (sent at
//! or after `a`, answered by `b`) are at most what the bucket can give in that time,
//! `capacity + rate * (b - a)`. Two documented allowances widen that bound and nothing
//! else does:
//! - a Redis that restarts empty forgets its buckets ("losing it resets windows",
//!   docs/production.md), so each Redis lifetime gets its own full bucket, and while no
//!   Redis runs the shared limits admit nothing;
//! - with `failOpen`, while a gateway cannot reach Redis ("limits are per pod for the
//!   duration") its own in-process bucket of the same size admits as well; that period
//!   runs from the fault until the gateway is seen admitting through Redis again.
//!
//! With `failClosed` the second allowance is zero: outside restarts the shared limits are
//! never exceeded, and while Redis is down limited requests get 503. Refusals are checked
//! too: a 429 is a false rejection when the history proves the bucket still held a unit
//! whenever the refusal can have happened (counted outside faults, where timed-out
//! admissions can hold units until they are cancelled).
//!
//! Run with `--nocapture` to see the history's path and the figures per key and phase; a
//! failing run keeps the history file.

use crate::common;

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{Gateway, redis::Redis};
use serde_json::{Value, json};

/// Completion tokens of every mock answer, and every request's `max_tokens`: a token
/// reservation is exactly the usage, so settlement refunds nothing.
const COMPLETION: u64 = 5;
const BODY: &str =
    r#"{"model":"demo","messages":[{"role":"user","content":"history"}],"max_tokens":5}"#;
/// The gateways' `--redis-timeout`: generous, so a loaded machine does not look like a
/// Redis fault.
const REDIS_TIMEOUT: &str = "1s";
/// How long each Redis fault lasts.
const DOWN: Duration = Duration::from_millis(1200);
/// How long after a fault ends every gateway must be admitting through Redis again.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// Clock slack of the checker: Redis stamps admissions in whole milliseconds.
const SLACK_MS: f64 = 2.0;
/// Refill instants the edge phase straddles, and by how much on either side.
const EDGE_TICKS: usize = 4;
const EDGE_OFFSET_MS: f64 = 30.0;

/// A key whose limit the history is checked against.
struct Key {
    name: &'static str,
    secret: &'static str,
    /// Capacity in requests: requests per minute, or tokens per minute over the tokens
    /// one request reserves (and uses).
    capacity: u64,
    /// Limited by tokens per minute instead of requests per minute.
    tokens: bool,
    /// Requests each gateway gets in the opening burst.
    opening: usize,
}

const KEYS: [Key; 3] = [
    Key {
        name: "edge",
        secret: "tg_limiterHistoryEdgeKey00000000000000000001",
        capacity: 60,
        tokens: false,
        opening: 30,
    },
    Key {
        name: "slow",
        secret: "tg_limiterHistorySlowKey00000000000000000001",
        capacity: 12,
        tokens: false,
        opening: 6,
    },
    Key {
        name: "tokens",
        secret: "tg_limiterHistoryTokensKey000000000000000001",
        capacity: 10,
        tokens: true,
        opening: 5,
    },
];
/// A key with a limit nobody reaches, for probing whether a gateway admits through Redis.
const PROBE: &str = "tg_limiterHistoryProbeKey0000000000000000001";

const OPENING: &str = "opening burst";
const EDGES: &str = "refill edges";

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGTERM (no persistence: the data is gone), then a fresh server.
    Restarted,
    /// SIGKILL, then a fresh server.
    Killed,
    /// SIGSTOP, then SIGCONT: the data survives, late scripts run when it resumes.
    Hung,
}

impl Fault {
    fn phase(self) -> &'static str {
        match self {
            Fault::Restarted => "Redis shut down, restarted empty",
            Fault::Killed => "Redis SIGKILLed, restarted empty",
            Fault::Hung => "Redis hung (SIGSTOP), resumed",
        }
    }
}

fn prompt_tokens() -> u64 {
    (BODY.len() as u64).div_ceil(4)
}

fn request_tokens() -> u64 {
    prompt_tokens() + COMPLETION
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn config(dir: &Path) {
    let key = |name: &str, limits: String, secret: &str| {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}}}\nspec: {{owner: {name}, limits: {limits}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key}}\nstringData: {{apiKey: {secret}}}\n---\n"
        )
    };
    let mut text = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: mock}}\nspec: {{type: mock, \
         models: [{{name: demo}}], mock: {{completionTokens: {COMPLETION}}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: demo}}\nspec: {{models: [demo], targets: [{{provider: mock}}]}}\n---\n"
    );
    for k in &KEYS {
        let limits = if k.tokens {
            format!("{{tokensPerMinute: {}}}", k.capacity * request_tokens())
        } else {
            format!("{{requestsPerMinute: {}}}", k.capacity)
        };
        text.push_str(&key(k.name, limits, k.secret));
    }
    text.push_str(&key("probe", "{requestsPerMinute: 100000}".into(), PROBE));
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

/// The Redis hash of a key's requests bucket (`l` level, `t` last update in ms).
fn requests_bucket(name: &str) -> String {
    format!(
        "tollgate:v1:{{k:{}}}:rpm",
        tollgate_api::compile::key_id("default", name)
    )
}

use common::redis::query as redis_query;

/// Redis server time, in microseconds.
async fn redis_time_us(url: &str) -> Option<i64> {
    let t: Vec<i64> = redis_query(url, &redis::cmd("TIME")).await?;
    Some(t[0] * 1_000_000 + t[1])
}

// === The history ===

/// The JSONL history of one run.
struct History {
    file: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl History {
    fn create(path: &Path) -> Self {
        Self {
            file: Mutex::new(std::io::BufWriter::new(
                std::fs::File::create(path).unwrap(),
            )),
        }
    }

    fn record(&self, v: Value) {
        let mut f = self.file.lock().unwrap();
        writeln!(f, "{v}").unwrap();
    }

    fn flush(&self) {
        self.file.lock().unwrap().flush().unwrap();
    }
}

/// What the clients share.
struct Run {
    http: reqwest::Client,
    chat: Vec<String>,
    redis_url: String,
    history: History,
}

/// The response headers a history record keeps.
const KEPT_HEADERS: [&str; 9] = [
    "x-request-id",
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// Sends one request for `key` (a name, or `probe`) to gateway `gw` and records it.
async fn send(run: &Run, phase: &str, key: &str, gw: usize) -> u16 {
    let secret = KEYS
        .iter()
        .find(|k| k.name == key)
        .map_or(PROBE, |k| k.secret);
    let send_us = now_us();
    let resp = run
        .http
        .post(&run.chat[gw])
        .bearer_auth(secret)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await;
    let (status, headers, body) = match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let headers: serde_json::Map<String, Value> = KEPT_HEADERS
                .iter()
                .filter_map(|h| {
                    let v = resp.headers().get(*h)?.to_str().ok()?;
                    Some((h.to_string(), Value::String(v.to_owned())))
                })
                .collect();
            match resp.text().await {
                Ok(text) => (
                    status,
                    headers,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                ),
                Err(e) => (0, headers, Value::String(e.to_string())),
            }
        }
        Err(e) => (0, Default::default(), Value::String(e.to_string())),
    };
    let recv_us = now_us();
    let usage = &body["usage"];
    let usage_exact = status != 200
        || (usage["prompt_tokens"] == prompt_tokens() && usage["completion_tokens"] == COMPLETION);
    run.history.record(json!({
        "kind": "request",
        "phase": phase,
        "key": key,
        "gateway": gw,
        "send_us": send_us,
        "recv_us": recv_us,
        "status": status,
        "code": body["error"]["code"],
        "request_id": headers.get("x-request-id"),
        "headers": headers,
        "usage_exact": usage_exact,
        "error": if status == 0 { body } else { Value::Null },
    }));
    status
}

/// `per_gateway` requests for `key` to each gateway, released at once.
async fn burst(run: &Arc<Run>, phase: &'static str, key: &'static str, per_gateway: usize) {
    let n = run.chat.len() * per_gateway;
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (run, start) = (run.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                send(&run, phase, key, i % run.chat.len()).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Two requests per gateway for every key, again and again until `stop`.
async fn steady(run: Arc<Run>, phase: &'static str, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        futures_util::future::join_all(KEYS.iter().map(|k| burst(&run, phase, k.name, 2))).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Whether gateway `gw` admits a request through Redis now: answered 200, and the probe
/// key's shared bucket stamped at or after the Redis time read just before.
async fn through_redis(run: &Run, phase: &str, gw: usize) -> bool {
    let Some(before_us) = redis_time_us(&run.redis_url).await else {
        return false;
    };
    if send(run, phase, "probe", gw).await != 200 {
        return false;
    }
    let mut hget = redis::cmd("HGET");
    hget.arg(requests_bucket("probe")).arg("t");
    redis_query::<Option<String>>(&run.redis_url, &hget)
        .await
        .flatten()
        .and_then(|t| t.parse::<f64>().ok())
        .is_some_and(|t| t * 1000.0 >= (before_us - before_us % 1000) as f64)
}

/// Sleeps until the wall-clock time `at_us`.
async fn sleep_until_us(at_us: f64) {
    let wait = at_us - now_us() as f64;
    if wait > 0.0 {
        tokio::time::sleep(Duration::from_micros(wait as u64)).await;
    }
}

/// Bursts straddling the instants the edge key's shared bucket refills its next unit:
/// two requests per gateway `EDGE_OFFSET_MS` before, two more as long after.
async fn refill_edges(run: &Arc<Run>) {
    let key = &KEYS[0];
    let per_unit_ms = 60_000.0 / key.capacity as f64;
    for _ in 0..EDGE_TICKS {
        let mut hmget = redis::cmd("HMGET");
        hmget.arg(requests_bucket(key.name)).arg("l").arg("t");
        let state: Vec<Option<String>> = redis_query(&run.redis_url, &hmget).await.unwrap();
        let level: f64 = state[0].as_deref().unwrap().parse().unwrap();
        let stamp_ms: f64 = state[1].as_deref().unwrap().parse().unwrap();
        let next_ms = stamp_ms + (1.0 - level).max(0.0) * per_unit_ms;
        sleep_until_us((next_ms - EDGE_OFFSET_MS) * 1000.0).await;
        let before = tokio::spawn({
            let run = run.clone();
            async move { burst(&run, EDGES, key.name, 2).await }
        });
        sleep_until_us((next_ms + EDGE_OFFSET_MS) * 1000.0).await;
        burst(run, EDGES, key.name, 2).await;
        before.await.unwrap();
    }
}

/// Runs steady bursts across `fault`, and records the fault, the Redis lifetimes and
/// when each gateway was admitting through Redis again.
async fn across(run: &Arc<Run>, redis: &mut Redis, fault: Fault) {
    let phase = fault.phase();
    run.history.record(json!({"kind": "phase", "phase": phase}));
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(steady(run.clone(), phase, stop.clone()));
    tokio::time::sleep(Duration::from_millis(600)).await;

    let fault_us = now_us();
    tokio::task::block_in_place(|| match fault {
        Fault::Restarted => {
            redis.signal("TERM");
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::net::TcpStream::connect(("127.0.0.1", redis.port)).is_ok() {
                assert!(std::time::Instant::now() < deadline, "Redis shut down");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Fault::Killed => redis.kill(),
        Fault::Hung => redis.signal("STOP"),
    });
    let down_us = now_us();
    if !matches!(fault, Fault::Hung) {
        // Nothing is admitted through this Redis any more.
        run.history
            .record(json!({"kind": "redis", "event": "stopped", "t_us": down_us}));
    }
    // More than a replica's own limits hold, while Redis cannot answer.
    let down_burst = tokio::spawn({
        let run = run.clone();
        async move {
            let keys = KEYS.iter().filter(|k| k.capacity < 20);
            futures_util::future::join_all(
                keys.map(|k| burst(&run, phase, k.name, k.capacity as usize + 4)),
            )
            .await;
        }
    });
    tokio::time::sleep(DOWN).await;
    let back_us = now_us();
    tokio::task::block_in_place(|| match fault {
        Fault::Hung => redis.signal("CONT"),
        _ => redis.restart(),
    });
    if !matches!(fault, Fault::Hung) {
        run.history
            .record(json!({"kind": "redis", "event": "started", "t_us": back_us}));
    }
    let mut recovered = Vec::new();
    for gw in 0..run.chat.len() {
        let deadline = back_us + RECOVERY_BOUND.as_micros() as i64;
        loop {
            if through_redis(run, phase, gw).await {
                recovered.push(now_us());
                break;
            }
            assert!(
                now_us() < deadline,
                "[{phase}] gateway {gw} admits through Redis again within {RECOVERY_BOUND:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    run.history.record(json!({
        "kind": "fault",
        "phase": phase,
        "from_us": fault_us,
        "down_us": down_us,
        "back_us": back_us,
        "recovered_us": recovered,
    }));
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    down_burst.await.unwrap();
}

/// Keeps the run's directory (and its history) when the test fails.
struct KeepOnFailure(Option<tempfile::TempDir>);

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("the history is kept in {}", dir.keep().display());
        }
    }
}

/// The gateways' own log of their fallbacks: (time, unreachable) per transition.
fn transitions(logs: &str) -> Vec<(i64, bool)> {
    logs.lines()
        .filter_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            let message = v["message"].as_str()?;
            let down = if message.starts_with("Redis unreachable") {
                true
            } else if message.starts_with("Redis reachable again") {
                false
            } else {
                return None;
            };
            let at: jiff::Timestamp = v["timestamp"].as_str()?.parse().ok()?;
            Some((at.as_microsecond(), down))
        })
        .collect()
}

async fn history_run(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    let keep = KeepOnFailure(Some(dir));
    let dir = keep.0.as_ref().unwrap().path();
    config(dir);
    let history = History::create(&path);
    eprintln!("[{mode}] history: {}", path.display());
    let started_us = now_us();
    let mut redis = Redis::start();
    history.record(json!({"kind": "redis", "event": "started", "t_us": started_us}));
    let gateways: Vec<Gateway> = (0..3)
        .map(|_| Gateway::with_redis(dir, &redis.url(), REDIS_TIMEOUT, mode))
        .collect();
    for k in &KEYS {
        history.record(
            json!({"kind": "key", "key": k.name, "capacity": k.capacity, "tokens": k.tokens}),
        );
    }
    history.record(json!({"kind": "mode", "mode": mode, "gateways": gateways.len()}));

    // The checker's clock is Redis's.
    let before = now_us();
    let redis_now = redis_time_us(&redis.url()).await.unwrap();
    let after = now_us();
    assert!(
        redis_now >= before - 1000 && redis_now <= after + 1000,
        "Redis and the test share a clock: {before} <= {redis_now} <= {after}"
    );

    let run = Arc::new(Run {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
        chat: gateways
            .iter()
            .map(|g| g.url("/v1/chat/completions"))
            .collect(),
        redis_url: redis.url(),
        history,
    });
    let t0 = std::time::Instant::now();
    run.history
        .record(json!({"kind": "phase", "phase": OPENING}));
    futures_util::future::join_all(KEYS.iter().map(|k| burst(&run, OPENING, k.name, k.opening)))
        .await;
    run.history.record(json!({"kind": "phase", "phase": EDGES}));
    refill_edges(&run).await;
    for fault in [Fault::Restarted, Fault::Killed, Fault::Hung] {
        across(&run, &mut redis, fault).await;
    }
    let elapsed = t0.elapsed();
    for (gw, g) in gateways.iter().enumerate() {
        let logged = transitions(&g.logs());
        assert!(
            logged.iter().any(|(_, down)| *down),
            "[{mode}] gateway {gw} logged that Redis was unreachable"
        );
        for (t_us, down) in logged {
            run.history.record(
                json!({"kind": "transition", "gateway": gw, "t_us": t_us, "unreachable": down}),
            );
        }
    }
    run.history.flush();
    drop(gateways);

    let report = check(&path);
    eprintln!("[{mode}] {} requests in {elapsed:.1?}", report.requests);
    eprint!("{}", report.table(mode));
    for f in &report.faults {
        eprintln!(
            "[{mode}] {}: Redis back after {:.0} ms; Redis unavailable to each gateway (from the fault until it admits through Redis \
             again; with failOpen, its fallback period) {:?} ms; the gateways' own transition logs \
             (gateway, ms after the fault, unreachable) {:?}",
            f.phase,
            (f.back - f.from),
            f.recovered
                .iter()
                .map(|r| (r - f.from).round())
                .collect::<Vec<_>>(),
            f.transitions
        );
    }
    assert!(
        report.problems.is_empty(),
        "[{mode}] {:#?}",
        report.problems
    );
    let total = |f: fn(&Figures) -> u64, phase: &str| -> u64 {
        report
            .figures
            .iter()
            .filter(|((_, p), _)| p == phase)
            .map(|(_, x)| f(x))
            .sum()
    };
    let mut phases = vec![OPENING, EDGES];
    phases.extend([Fault::Restarted, Fault::Killed, Fault::Hung].map(Fault::phase));
    for phase in &phases {
        assert!(
            total(|f| f.refused, phase) > 0,
            "[{mode}] {phase}: some requests were refused (otherwise the phase proves nothing)"
        );
        assert_eq!(
            total(|f| f.overshoot, phase),
            0,
            "[{mode}] {phase}: no window admitted more than the model allows; history {}",
            path.display()
        );
    }
    for phase in [OPENING, EDGES] {
        assert_eq!(
            total(|f| f.false_rejections, phase),
            0,
            "[{mode}] {phase}: no request that provably fitted was refused"
        );
    }
    for fault in [Fault::Restarted, Fault::Killed, Fault::Hung] {
        let phase = fault.phase();
        match mode {
            "failClosed" => assert!(
                total(|f| f.unavailable, phase) > 0,
                "[{mode}] {phase}: limited requests get 503 while Redis is down"
            ),
            _ => {
                assert_eq!(
                    total(|f| f.unavailable, phase),
                    0,
                    "[{mode}] {phase}: failOpen never answers 503"
                );
                // A hung Redis makes every request wait for the timeout first, so the
                // burst may only reach the replicas' own limits after Redis is back.
                if !matches!(fault, Fault::Hung) {
                    assert!(
                        total(|f| f.refused_locally, phase) > 0,
                        "[{mode}] {phase}: each replica's own limits refused requests while Redis was down"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_never_admits_more_than_the_shared_limits_at_refill_edges_or_across_redis_faults()
 {
    history_run("failClosed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_exceeds_the_shared_limits_only_while_redis_is_down_and_by_at_most_the_per_replica_limits()
 {
    history_run("failOpen").await;
}

// === The offline checker ===

/// One request of the history, times in milliseconds.
#[derive(Debug, Clone)]
struct Request {
    phase: String,
    key: String,
    gateway: usize,
    send: f64,
    recv: f64,
    status: u16,
    code: String,
    usage_exact: bool,
}

/// A fault as the history records it, times in milliseconds.
#[derive(Debug)]
struct FaultRecord {
    phase: String,
    from: f64,
    /// When the fault was in place.
    down: f64,
    back: f64,
    /// Per gateway: when it was seen admitting through Redis again.
    recovered: Vec<f64>,
    /// The gateways' logged transitions: (gateway, ms after the fault, unreachable).
    transitions: Vec<(usize, i64, bool)>,
}

/// Per key and phase.
#[derive(Debug, Default, Clone)]
struct Figures {
    sent: u64,
    admitted: u64,
    refused: u64,
    unavailable: u64,
    /// Refusals sent and answered while Redis could not answer: the per-replica limits'.
    refused_locally: u64,
    /// Most admissions over the model's bound in a window ending in this phase.
    overshoot: u64,
    /// Most admissions over the shared limit alone (the per-replica fallback's share).
    fallback_excess: u64,
    /// Most admissions over a bound that forgets nothing on a Redis restart: what the
    /// documented reset adds.
    restart_excess: u64,
    /// Refusals the history proves should have been admissions.
    false_rejections: u64,
}

struct Report {
    requests: usize,
    keys: Vec<String>,
    phases: Vec<String>,
    figures: BTreeMap<(String, String), Figures>,
    faults: Vec<FaultRecord>,
    problems: Vec<String>,
}

impl Report {
    fn table(&self, mode: &str) -> String {
        let mut out = String::new();
        let rows = self.keys.iter().flat_map(|k| {
            self.phases
                .iter()
                .filter_map(move |p| Some((k, p, self.figures.get(&(k.clone(), p.clone()))?)))
        });
        for (key, phase, f) in rows {
            out.push_str(&format!(
                "[{mode}] {key:>6} | {phase:<33} | sent {:>3} admitted {:>3} refused {:>3} 503 {:>3} | \
                 overshoot {} | false rejections {} | over the shared limit while failing open {}, \
                 refused by a replica's own limits {} | over a limit that survived restarts {}\n",
                f.sent,
                f.admitted,
                f.refused,
                f.unavailable,
                f.overshoot,
                f.false_rejections,
                f.fallback_excess,
                f.refused_locally,
                f.restart_excess,
            ));
        }
        out
    }
}

/// Token-bucket bound: a bucket of `capacity` refilled at `rate` a millisecond gives at
/// most `capacity + rate * span` in `span`, summed over `pieces` (each its own bucket);
/// `pieces` are intersected with `[a, b]`, and empty ones give nothing.
fn bucket_bound(pieces: &[(f64, f64)], capacity: f64, rate: f64, a: f64, b: f64) -> f64 {
    pieces
        .iter()
        .filter(|(s, e)| *s <= b + SLACK_MS && *e >= a - SLACK_MS)
        .map(|(s, e)| capacity + rate * (b.min(*e) - a.max(*s)).max(0.0) + rate * SLACK_MS)
        .sum()
}

/// The per-replica fallback's bound in `[a, b]`: each gateway's bucket can give its
/// capacity plus the refill between the first and last moment of `[a, b]` it was falling
/// back.
fn fallback_bound(periods: &[Vec<(f64, f64)>], capacity: f64, rate: f64, a: f64, b: f64) -> f64 {
    periods
        .iter()
        .map(|p| {
            let parts: Vec<(f64, f64)> = p
                .iter()
                .filter(|(s, e)| *s <= b && *e >= a)
                .map(|(s, e)| (a.max(*s), b.min(*e)))
                .collect();
            match (
                parts.iter().map(|x| x.0).reduce(f64::min),
                parts.iter().map(|x| x.1).reduce(f64::max),
            ) {
                (Some(lo), Some(hi)) => bucket_bound(&[(lo, hi)], capacity, rate, lo, hi),
                _ => 0.0,
            }
        })
        .sum()
}

/// Reads the history at `path` and checks every key's admissions against the model.
fn check(path: &Path) -> Report {
    let file = std::fs::File::open(path).unwrap();
    let mut requests = Vec::new();
    let mut keys = Vec::new();
    let mut mode = String::new();
    let mut phases = Vec::new();
    let mut gateways = 0;
    // Redis lifetimes from start/stop events, in order.
    let mut events: Vec<(f64, bool)> = Vec::new();
    let mut faults = Vec::new();
    let mut transitions = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let ms = |field: &str| v[field].as_i64().unwrap() as f64 / 1000.0;
        match v["kind"].as_str().unwrap() {
            "request" => requests.push(Request {
                phase: v["phase"].as_str().unwrap().to_owned(),
                key: v["key"].as_str().unwrap().to_owned(),
                gateway: v["gateway"].as_u64().unwrap() as usize,
                send: ms("send_us"),
                recv: ms("recv_us"),
                status: v["status"].as_u64().unwrap() as u16,
                code: v["code"].as_str().unwrap_or_default().to_owned(),
                usage_exact: v["usage_exact"].as_bool().unwrap(),
            }),
            "key" => keys.push((
                v["key"].as_str().unwrap().to_owned(),
                v["capacity"].as_u64().unwrap() as f64,
            )),
            "phase" => phases.push(v["phase"].as_str().unwrap().to_owned()),
            "mode" => {
                mode = v["mode"].as_str().unwrap().to_owned();
                gateways = v["gateways"].as_u64().unwrap() as usize;
            }
            "redis" => events.push((ms("t_us"), v["event"] == "started")),
            "fault" => faults.push(FaultRecord {
                phase: v["phase"].as_str().unwrap().to_owned(),
                from: ms("from_us"),
                down: ms("down_us"),
                back: ms("back_us"),
                recovered: v["recovered_us"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_i64().unwrap() as f64 / 1000.0)
                    .collect(),
                transitions: Vec::new(),
            }),
            "transition" => transitions.push((
                v["gateway"].as_u64().unwrap() as usize,
                ms("t_us"),
                v["unreachable"].as_bool().unwrap(),
            )),
            other => panic!("unknown record kind {other}"),
        }
    }
    let mut problems = Vec::new();
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut epochs: Vec<(f64, f64)> = Vec::new();
    for (t, started) in &events {
        if *started {
            epochs.push((*t, f64::INFINITY));
        } else if let Some(last) = epochs.last_mut() {
            last.1 = *t;
        }
    }
    let forever = [(epochs[0].0, f64::INFINITY)];
    // failOpen: each gateway may fall back from a fault until it was seen admitting
    // through Redis again.
    let mut fallback: Vec<Vec<(f64, f64)>> = vec![Vec::new(); gateways];
    if mode == "failOpen" {
        for f in &faults {
            for (gw, r) in f.recovered.iter().enumerate() {
                fallback[gw].push((f.from, *r));
            }
        }
    }
    let falling_back = |r: &Request| {
        fallback[r.gateway]
            .iter()
            .any(|(s, e)| r.recv >= *s && r.send <= *e)
    };
    for (gw, t, down) in &transitions {
        let within = faults
            .iter()
            .position(|f| *t >= f.from - SLACK_MS && *t <= f.recovered[*gw] + SLACK_MS);
        match within {
            Some(i) => {
                let after = (*t - faults[i].from).round() as i64;
                faults[i].transitions.push((*gw, after, *down));
            }
            None => problems.push(format!(
                "gateway {gw} logged Redis {} at {t:.1} ms, outside every fault",
                if *down { "unreachable" } else { "reachable" }
            )),
        }
    }

    // Faults (and the cancellations of timed-out admissions after them) leave no clean
    // history for proving false rejections.
    let disturbed = |r: &Request| {
        faults.iter().any(|f| {
            let end = f.recovered.iter().copied().fold(f.back, f64::max) + 3000.0;
            r.recv >= f.from && r.send <= end
        })
    };

    let mut figures: BTreeMap<(String, String), Figures> = BTreeMap::new();
    for r in &requests {
        let f = figures.entry((r.key.clone(), r.phase.clone())).or_default();
        f.sent += 1;
        let refused = r.status == 429 && r.code == "rate_limit_exceeded";
        let unavailable = r.status == 503 && r.code == "limits_unavailable";
        match r.status {
            200 => f.admitted += 1,
            _ if refused => {
                f.refused += 1;
                if faults.iter().any(|x| r.send >= x.down && r.recv <= x.back) {
                    f.refused_locally += 1;
                }
            }
            _ if unavailable && mode == "failClosed" => {
                f.unavailable += 1;
                let fault = faults
                    .iter()
                    .find(|x| r.recv >= x.from && r.send <= x.recovered[r.gateway]);
                if fault.is_none() {
                    problems.push(format!("a 503 outside every Redis fault: {r:?}"));
                }
            }
            _ => problems.push(format!("unexpected answer: {r:?}")),
        }
        if !r.usage_exact {
            problems.push(format!("usage differs from the reservation: {r:?}"));
        }
    }

    for (key, capacity) in &keys {
        let rate = capacity / 60_000.0;
        let mut admitted: Vec<&Request> = requests
            .iter()
            .filter(|r| r.key == *key && r.status == 200)
            .collect();
        admitted.sort_by(|a, b| a.send.total_cmp(&b.send));
        // Every window [send of i, receive of j]: a window's count only grows at a
        // receive and its bound only shrinks as its start moves right, so these are the
        // worst ones. `later` holds the receives of the admissions sent at or after
        // the window's start, sorted.
        let mut later: Vec<(f64, &str)> = Vec::new();
        for i in (0..admitted.len()).rev() {
            let at = later.partition_point(|x| x.0 < admitted[i].recv);
            later.insert(at, (admitted[i].recv, &admitted[i].phase));
            let a = admitted[i].send;
            for (k, (b, phase)) in later.iter().enumerate() {
                let count = (k + 1) as f64;
                let shared = bucket_bound(&epochs, *capacity, rate, a, *b);
                let local = fallback_bound(&fallback, *capacity, rate, a, *b);
                let f = figures.get_mut(&(key.clone(), phase.to_string())).unwrap();
                let over = |allowed: f64| (count - (allowed + 1e-9).floor()).max(0.0) as u64;
                f.overshoot = f.overshoot.max(over(shared + local));
                f.fallback_excess = f.fallback_excess.max(over(shared));
                f.restart_excess = f
                    .restart_excess
                    .max(over(bucket_bound(&forever, *capacity, rate, a, *b) + local));
            }
        }

        // False rejections: a refusal outside faults, within one Redis lifetime, when
        // the bucket's lowest possible level over the refusal's whole interval was still
        // a unit. The level at t is the least, over s since the lifetime began, of
        // capacity + refill since s - what was consumed since s; consumed counts every
        // admission that may fall in that time.
        let consumed: Vec<&Request> = requests
            .iter()
            .filter(|r| r.key == *key && (r.status == 200 || r.status == 0))
            .collect();
        for x in requests
            .iter()
            .filter(|r| r.key == *key && r.status == 429 && !disturbed(r) && !falling_back(r))
        {
            let Some(epoch) = epochs.iter().find(|(s, e)| *s <= x.send && x.recv <= *e) else {
                continue;
            };
            let possibly = |s: f64| {
                consumed
                    .iter()
                    .filter(|p| p.recv >= s - SLACK_MS && p.send <= x.recv + SLACK_MS)
                    .count() as f64
            };
            let lowest = consumed
                .iter()
                .map(|p| p.recv)
                .filter(|t| *t >= epoch.0 && *t <= x.send)
                .chain([x.send])
                .map(|s| capacity + rate * (x.send - s - SLACK_MS).max(0.0) - possibly(s))
                .fold(f64::INFINITY, f64::min);
            if lowest >= 1.0 + 1e-6 {
                figures
                    .get_mut(&(key.clone(), x.phase.clone()))
                    .unwrap()
                    .false_rejections += 1;
            }
        }
    }
    // The probe key is only a tool.
    figures.retain(|(key, _), _| keys.iter().any(|(k, _)| k == key));
    Report {
        requests: requests.len(),
        keys: keys.iter().map(|k| k.0.clone()).collect(),
        phases,
        figures,
        faults,
        problems,
    }
}

/// The checker over a made-up history written like a real one.
fn check_made_up(records: &[Value]) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.jsonl");
    let history = History::create(&path);
    for r in records {
        history.record(r.clone());
    }
    history.flush();
    check(&path)
}

/// A request of a made-up history, times in milliseconds.
fn made_up(phase: &str, send_ms: i64, recv_ms: i64, status: u16) -> Value {
    json!({
        "kind": "request", "phase": phase, "key": "k", "gateway": 0,
        "send_us": send_ms * 1000, "recv_us": recv_ms * 1000, "status": status,
        "code": if status == 429 { "rate_limit_exceeded" } else { "" }, "usage_exact": true,
    })
}

#[test]
fn the_checker_finds_overshoot_false_rejections_and_admissions_without_redis() {
    let mut records = vec![
        json!({"kind": "mode", "mode": "failClosed", "gateways": 1}),
        json!({"kind": "key", "key": "k", "capacity": 2, "tokens": false}),
        json!({"kind": "redis", "event": "started", "t_us": 0}),
        json!({"kind": "redis", "event": "stopped", "t_us": 300_000_000}),
        json!({"kind": "redis", "event": "started", "t_us": 400_000_000}),
    ];
    for phase in ["burst", "refill", "no redis"] {
        records.push(json!({"kind": "phase", "phase": phase}));
    }
    // Three admissions in 10 ms from a bucket of two.
    records.extend((0..3).map(|_| made_up("burst", 1_000, 1_010, 200)));
    // A refusal long after the bucket refilled.
    records.push(made_up("refill", 200_000, 200_010, 429));
    // An admission while no Redis ran.
    records.push(made_up("no redis", 350_000, 350_010, 200));
    let report = check_made_up(&records);
    let figures = |phase: &str| report.figures[&("k".to_owned(), phase.to_owned())].clone();
    assert_eq!(figures("burst").overshoot, 1);
    assert_eq!(figures("burst").false_rejections, 0);
    assert_eq!(figures("refill").false_rejections, 1);
    assert_eq!(figures("no redis").overshoot, 1);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn the_checker_allows_a_replicas_own_limits_and_no_more_while_it_falls_back() {
    let mut records = vec![
        json!({"kind": "mode", "mode": "failOpen", "gateways": 1}),
        json!({"kind": "key", "key": "k", "capacity": 2, "tokens": false}),
        json!({"kind": "redis", "event": "started", "t_us": 0}),
        json!({"kind": "phase", "phase": "within"}),
        json!({"kind": "phase", "phase": "beyond"}),
        json!({"kind": "redis", "event": "stopped", "t_us": 500_001_000}),
        json!({"kind": "redis", "event": "started", "t_us": 501_000_000}),
        json!({"kind": "fault", "phase": "within", "from_us": 500_000_000, "down_us": 500_001_000,
               "back_us": 501_000_000, "recovered_us": [502_000_000]}),
    ];
    // The replica's own bucket of two, while Redis is down: allowed.
    records.extend((0..2).map(|_| made_up("within", 500_100, 500_110, 200)));
    // Three more from the same emptied bucket: not.
    records.extend((0..3).map(|_| made_up("beyond", 500_500, 500_510, 200)));
    let report = check_made_up(&records);
    let figures = |phase: &str| report.figures[&("k".to_owned(), phase.to_owned())].clone();
    assert_eq!(figures("within").overshoot, 0);
    assert_eq!(figures("within").fallback_excess, 2);
    assert_eq!(figures("beyond").overshoot, 3);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
