//! Redis faults under sustained load, in both failure modes: Redis killed and restarted
//! empty, hung (SIGSTOP), paused (`CLIENT PAUSE … ALL`) and out of memory (writes refused
//! with `noeviction`, keys evicted with `allkeys-lru`) while four clients keep calling one
//! gateway. failOpen answers every request; failClosed answers 503 only while Redis is
//! unreachable or refuses writes; no request waits much longer than the Redis timeout; and
//! once Redis answers again the gateway goes back to the shared limits on its own, without
//! a restart. Nor may a request the gateway gave up on at admission keep holding a
//! concurrency lease or a budget reservation once Redis is back; and usage written while
//! Redis refused writes arrives once it accepts them again, exactly once.
//!
//! Run with `--nocapture` to see each scenario's status mix, added latency and recovery
//! time.

use crate::common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Gateway, redis::Redis};
use serde_json::Value;

const KEY: &str = "tg_redisFaultsSteadyLoadKey00000000000000001";
/// A key whose only limit is concurrency: [`LOOPS`] requests in flight.
const CAPPED: &str = "tg_redisFaultsConcurrencyKey0000000000000002";
/// A key whose only limit is a budget of ten requests.
const BUDGETED: &str = "tg_redisFaultsBudgetKey000000000000000000003";
/// `max_tokens` matches the mock's 3 completion tokens, so a reservation costs exactly
/// what the answer does.
const BODY: &str =
    r#"{"model":"demo","messages":[{"role":"user","content":"steady load"}],"max_tokens":3}"#;
/// The gateways' `--redis-timeout`.
const REDIS_TIMEOUT: &str = "200ms";
/// Longest any single request may take: five Redis timeouts, slack for a loaded machine.
/// Admission makes one Redis call, so only a Redis call not bounded by the timeout comes
/// near this; and a request that waited for the whole fault would pass it.
const LATENCY_BOUND: Duration = Duration::from_secs(1);
/// How long after Redis is back the gateway must be using it again.
const RECOVERY_BOUND: Duration = Duration::from_secs(5);
/// How long each fault lasts.
const FAULT: Duration = Duration::from_millis(1500);
const _: () = assert!(FAULT.as_millis() > LATENCY_BOUND.as_millis() + 200);
/// Concurrent client loops.
const LOOPS: usize = 4;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL, then a fresh server on the same port (state lost).
    Killed,
    /// SIGSTOP, then SIGCONT: connections stay open but nothing answers.
    Hung,
    /// `CLIENT PAUSE 1500 ALL`: the server holds every command until the pause ends.
    Paused,
}

/// One request of the load, timed from the scenario's start.
#[derive(Debug)]
struct Sample {
    start: Duration,
    end: Duration,
    /// HTTP status, or 0 when the request failed at the transport level.
    status: u16,
    /// The body of answers other than 200.
    body: Value,
}

fn config(dir: &std::path::Path) {
    let text = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: mock}}\nspec: {{type: mock, models: [{{name: demo, pricing: {{inputPerMillion: 1000, outputPerMillion: 1000}}}}], mock: {{completionTokens: 3, latency: 5ms}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: demo}}\nspec: {{models: [demo], targets: [{{provider: mock}}]}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: load}}\nspec: {{owner: load, limits: {{requestsPerMinute: 100000}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: load-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: capped}}\nspec: {{owner: capped, limits: {{maxConcurrent: {LOOPS}}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: capped-key}}\nstringData: {{apiKey: {CAPPED}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: budgeted}}\nspec: {{owner: budgeted, budget: {{amount: {budget}, period: total}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: budgeted-key}}\nstringData: {{apiKey: {BUDGETED}}}\n",
        budget = 10.0 * cost(),
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

/// What one request costs: the mock reports the body's estimate (4 bytes a token) as
/// prompt tokens and 3 completion tokens, at 1000 per million tokens either way.
fn cost() -> f64 {
    (BODY.len().div_ceil(4) + 3) as f64 * 1000.0 / 1_000_000.0
}

/// The Redis key of the key's requests-per-minute bucket (written only by a shared
/// admission).
fn requests_bucket() -> String {
    format!("tollgate:v1:{{k:{}}}:rpm", key_id(KEY))
}

/// The key id of the ApiKey holding `key` (ids come from the ApiKey's name).
fn key_id(key: &str) -> String {
    let name = match key {
        KEY => "load",
        CAPPED => "capped",
        BUDGETED => "budgeted",
        _ => panic!("unknown test key"),
    };
    tollgate_api::compile::key_id("default", name)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// One chat request: its status and, unless it is 200, its body.
async fn call(http: &reqwest::Client, url: &str, key: &str) -> (u16, Value) {
    let resp = http
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await;
    match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.text().await {
                Ok(_) if status == 200 => (200, Value::Null),
                Ok(text) => (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                ),
                Err(e) => (0, Value::String(e.to_string())),
            }
        }
        Err(e) => (0, Value::String(e.to_string())),
    }
}

/// Calls the gateway in a loop until `stop`, with a short pause between calls.
async fn load(
    url: String,
    key: &'static str,
    stop: Arc<AtomicBool>,
    epoch: Instant,
) -> Vec<Sample> {
    let http = http();
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let start = epoch.elapsed();
        let (status, body) = call(&http, &url, key).await;
        samples.push(Sample {
            start,
            end: epoch.elapsed(),
            status,
            body,
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    samples
}

/// A gateway on the test config, sharing limits through `redis_url` in `mode`.
fn start_gateway(dir: &std::path::Path, redis_url: &str, mode: &str) -> Gateway {
    Gateway::with_redis(dir, redis_url, REDIS_TIMEOUT, mode)
}

/// [`LOOPS`] client loops calling `gw` with `key` until `stop`.
fn spawn_load(
    gw: &Gateway,
    key: &'static str,
    stop: &Arc<AtomicBool>,
    epoch: Instant,
) -> Vec<tokio::task::JoinHandle<Vec<Sample>>> {
    (0..LOOPS)
        .map(|_| {
            tokio::spawn(load(
                gw.url("/v1/chat/completions"),
                key,
                stop.clone(),
                epoch,
            ))
        })
        .collect()
}

/// Lets the load run 700 ms more, stops it and gathers its samples.
async fn finish(
    stop: &AtomicBool,
    loops: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
) -> Vec<Sample> {
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for l in loops {
        samples.extend(l.await.unwrap());
    }
    samples
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    let resp = http().get(gw.url("/readyz")).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

use common::redis::query as redis_query;

/// Whether a request sent now is admitted through Redis: it is answered 200 and the
/// shared requests bucket was stamped at or after the Redis server time read just before.
async fn admitted_through_redis(gw: &Gateway, redis_url: &str) -> bool {
    let Some(time) = redis_query::<Vec<u64>>(redis_url, &redis::cmd("TIME")).await else {
        return false;
    };
    let before_ms = time[0] * 1000 + time[1] / 1000;
    if call(&http(), &gw.url("/v1/chat/completions"), KEY).await.0 != 200 {
        return false;
    }
    let mut hget = redis::cmd("HGET");
    hget.arg(requests_bucket()).arg("t");
    let stamp = redis_query::<Option<String>>(redis_url, &hget)
        .await
        .flatten();
    stamp
        .and_then(|t| t.parse::<f64>().ok())
        .is_some_and(|t| t >= before_ms as f64)
}

fn mix<'a>(samples: impl Iterator<Item = &'a Sample>) -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for s in samples {
        *out.entry(s.status).or_default() += 1;
    }
    out
}

fn latency(s: &Sample) -> Duration {
    s.end - s.start
}

/// Answers other than 200 or failClosed's OpenAI-shaped 503.
fn neither_ok_nor_unavailable<'a>(samples: &[&'a Sample]) -> Vec<&'a Sample> {
    samples
        .iter()
        .copied()
        .filter(|s| !(s.status == 200 || (s.status == 503 && is_limits_unavailable_error(&s.body))))
        .collect()
}

/// Whether `body` is the OpenAI-shaped error failClosed answers while limits cannot be
/// checked.
fn is_limits_unavailable_error(body: &Value) -> bool {
    let e = &body["error"];
    e["message"]
        .as_str()
        .is_some_and(|m| m.contains("Limits cannot be checked"))
        && e["type"] == "service_unavailable"
        && e["code"] == "limits_unavailable"
        && e["code"].as_str().is_some_and(|c| !c.is_empty())
        && e.get("param").is_some()
}

/// Puts one gateway under steady load, injects `fault` for [`FAULT`], ends it, waits for
/// the gateway to use Redis again, and checks statuses, latency and recovery.
async fn scenario(mode: &str, fault: Fault) {
    let mut redis = Redis::start();
    let redis_url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let gw = start_gateway(dir.path(), &redis_url, mode);
    assert!(
        admitted_through_redis(&gw, &redis_url).await,
        "healthy: requests are admitted through Redis"
    );

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let loops = spawn_load(&gw, KEY, &stop, epoch);
    tokio::time::sleep(Duration::from_millis(700)).await;

    let fault_at = epoch.elapsed();
    tokio::task::block_in_place(|| match fault {
        Fault::Killed => redis.kill(),
        Fault::Hung => redis.signal("STOP"),
        Fault::Paused => {
            let pause = FAULT.as_millis().to_string();
            redis.cli(&["CLIENT", "PAUSE", &pause, "ALL"]);
        }
    });
    // The pause ends on its own, at the latest FAULT after the command returned.
    let fault_ends = epoch.elapsed().max(fault_at) + FAULT;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (ready_code, ready) = readyz(&gw).await;
    tokio::time::sleep(fault_ends.saturating_sub(epoch.elapsed())).await;
    tokio::task::block_in_place(|| match fault {
        Fault::Killed => redis.restart(),
        Fault::Hung => redis.signal("CONT"),
        Fault::Paused => {}
    });
    let back_at = epoch.elapsed();

    let mut recovered_at = None;
    while epoch.elapsed() < back_at + Duration::from_secs(10) {
        if readyz(&gw).await.1["redis"]["reachable"] == true
            && admitted_through_redis(&gw, &redis_url).await
        {
            recovered_at = Some(epoch.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let samples = finish(&stop, loops).await;

    let label = format!("{mode}, Redis {fault:?}");
    let recovered_at = recovered_at.unwrap_or_else(|| {
        panic!(
            "[{label}] the gateway did not use Redis again within 10 s after it was back:\n{}",
            gw.logs()
        )
    });
    let recovery = recovered_at - back_at;
    let before: Vec<&Sample> = samples.iter().filter(|s| s.end < fault_at).collect();
    let after: Vec<&Sample> = samples.iter().filter(|s| s.start > recovered_at).collect();
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.end >= fault_at && s.start <= recovered_at)
        .collect();
    let mut baseline: Vec<Duration> = before.iter().map(|s| latency(s)).collect();
    baseline.sort();
    let baseline_median = baseline
        .get(baseline.len() / 2)
        .copied()
        .unwrap_or_default();
    let baseline_max = baseline.last().copied().unwrap_or_default();
    let slowest = samples.iter().max_by_key(|s| latency(s)).unwrap();
    let during_max = during.iter().map(|s| latency(s)).max().unwrap_or_default();
    eprintln!(
        "[{label}] {} requests from {LOOPS} loops; status mix before {:?}, during {:?}, after {:?}; \
         latency before: median {baseline_median:?}, max {baseline_max:?}; during: max {during_max:?} \
         (added {:?} over the median); slowest overall {:?}; readyz mid-fault {ready_code} {}; \
         recovered {recovery:?} after Redis was back (fault {:?})",
        samples.len(),
        mix(before.iter().copied()),
        mix(during.iter().copied()),
        mix(after.iter().copied()),
        during_max.saturating_sub(baseline_median),
        latency(slowest),
        ready["redis"],
        back_at - fault_at,
    );

    assert!(
        before.len() >= LOOPS && after.len() >= LOOPS && during.len() >= LOOPS,
        "[{label}] every phase saw load: {} before, {} during, {} after",
        before.len(),
        during.len(),
        after.len()
    );
    let bad_before: Vec<_> = before.iter().filter(|s| s.status != 200).collect();
    assert!(
        bad_before.is_empty(),
        "[{label}] failed before the fault: {bad_before:?}"
    );
    let bad_after: Vec<_> = after.iter().filter(|s| s.status != 200).collect();
    assert!(
        bad_after.is_empty(),
        "[{label}] failed after the gateway recovered: {bad_after:?}"
    );
    assert!(
        latency(slowest) <= LATENCY_BOUND,
        "[{label}] a request took {:?} (bound {LATENCY_BOUND:?} for a {REDIS_TIMEOUT} Redis timeout): {slowest:?}",
        latency(slowest)
    );
    assert_eq!(
        ready["redis"]["reachable"], false,
        "[{label}] readyz reports Redis unreachable during the fault"
    );
    match mode {
        "failOpen" => {
            let failed: Vec<_> = during.iter().filter(|s| s.status != 200).collect();
            assert!(
                failed.is_empty(),
                "[{label}] failOpen answers every request: {failed:?}"
            );
            assert_eq!(ready_code, 200, "[{label}] failOpen stays ready");
        }
        _ => {
            let wrong = neither_ok_nor_unavailable(&during);
            assert!(
                wrong.is_empty(),
                "[{label}] during the outage, failClosed answers 200 or an OpenAI-shaped 503: {wrong:?}"
            );
            let refused = during.iter().filter(|s| s.status == 503).count();
            assert!(
                refused >= LOOPS,
                "[{label}] failClosed refuses limited requests while Redis is unreachable: only {refused} 503s"
            );
            assert_eq!(
                ready_code, 503,
                "[{label}] failClosed is not ready while Redis is unreachable"
            );
        }
    }
    assert!(
        recovery <= RECOVERY_BOUND,
        "[{label}] recovery took {recovery:?} (bound {RECOVERY_BOUND:?})"
    );
    let (code, ready) = readyz(&gw).await;
    assert_eq!(code, 200, "[{label}] ready again: {ready}");
    assert_eq!(ready["redis"]["reachable"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_serves_every_request_while_redis_is_killed_and_restarted() {
    scenario("failOpen", Fault::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_serves_every_request_while_redis_hangs() {
    scenario("failOpen", Fault::Hung).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_serves_every_request_while_redis_pauses_its_clients() {
    scenario("failOpen", Fault::Paused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_only_while_redis_is_killed_and_restarted() {
    scenario("failClosed", Fault::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_only_while_redis_hangs() {
    scenario("failClosed", Fault::Hung).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_only_while_redis_pauses_its_clients() {
    scenario("failClosed", Fault::Paused).await;
}

/// Drives `key` (limited by concurrency or budget, not by rate) through `fault`, waits
/// until no request is in flight, and checks that the key is usable again: a request the
/// gateway gave up on at admission must not keep holding a limit once Redis is back.
async fn nothing_left_held(mode: &str, fault: Fault, key: &'static str) {
    let redis = Redis::start();
    let redis_url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let gw = start_gateway(dir.path(), &redis_url, mode);
    let url = gw.url("/v1/chat/completions");
    assert_eq!(call(&http(), &url, key).await.0, 200);

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    tokio::task::block_in_place(|| match fault {
        Fault::Killed => unreachable!("a killed Redis loses its state anyway"),
        Fault::Hung => redis.signal("STOP"),
        Fault::Paused => {
            let pause = FAULT.as_millis().to_string();
            redis.cli(&["CLIENT", "PAUSE", &pause, "ALL"]);
        }
    });
    let loops = spawn_load(&gw, key, &stop, epoch);
    tokio::time::sleep(FAULT).await;
    if let Fault::Hung = fault {
        tokio::task::block_in_place(|| redis.signal("CONT"));
    }
    let back_at = epoch.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    for l in loops {
        samples.extend(l.await.unwrap());
    }
    // Every client has its answer: nothing is in flight from here on.
    let mut usable = None;
    let mut last = (0, Value::Null);
    while epoch.elapsed() < back_at + RECOVERY_BOUND {
        last = call(&http(), &url, key).await;
        if last.0 == 200 {
            usable = Some(epoch.elapsed() - back_at);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = key_id(key);
    let mut leases = redis::cmd("ZCARD");
    leases.arg(format!("tollgate:v1:{{k:{id}}}:conc"));
    let mut reserved = redis::cmd("HLEN");
    reserved.arg(format!("tollgate:v1:{{k:{id}}}:budget:total:amounts"));
    let mut spent = redis::cmd("HGET");
    spent
        .arg(tollgate_api::usage::usage_key(
            &id,
            &tollgate_api::usage::periods(jiff::Timestamp::now()).0,
        ))
        .arg(tollgate_api::usage::SPEND);
    eprintln!(
        "[{mode}, Redis {fault:?}, held limits] status mix during the fault {:?}; with nothing in flight, \
         Redis still holds {:?} concurrency leases and {:?} budget reservations (spend recorded today: {:?}, \
         one request costs {}); key usable again after {usable:?}; last answer {last:?}",
        mix(samples.iter()),
        redis_query::<u64>(&redis_url, &leases).await,
        redis_query::<u64>(&redis_url, &reserved).await,
        redis_query::<Option<String>>(&redis_url, &spent)
            .await
            .flatten(),
        cost(),
    );
    assert!(
        usable.is_some(),
        "[{mode}, Redis {fault:?}] with nothing in flight, the key is still refused {RECOVERY_BOUND:?} after Redis is back: {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_timed_out_on_a_hung_redis_leave_no_concurrency_leases_behind() {
    nothing_left_held("failOpen", Fault::Hung, CAPPED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_while_redis_was_paused_leave_no_budget_reservations_behind() {
    nothing_left_held("failClosed", Fault::Paused, BUDGETED).await;
}

/// Used memory of the server, from `INFO memory`.
fn used_memory(redis: &Redis) -> u64 {
    info_field(redis, "memory", "used_memory")
}

fn info_field(redis: &Redis, section: &str, field: &str) -> u64 {
    let info = redis.cli(&["INFO", section]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO {section} has {field}: {info}"))
}

/// Requests counted in the key's shared usage counters today.
async fn counted_requests(redis_url: &str) -> u64 {
    let mut hget = redis::cmd("HGET");
    hget.arg(tollgate_api::usage::usage_key(
        &key_id(KEY),
        &tollgate_api::usage::periods(jiff::Timestamp::now()).0,
    ))
    .arg("requests");
    redis_query::<Option<u64>>(redis_url, &hget)
        .await
        .flatten()
        .unwrap_or(0)
}

/// Redis runs out of memory under steady load: 2.5 MB of someone else's keys (no TTL)
/// fill it, and `maxmemory` drops below what is used for [`FAULT`]. With `noeviction`
/// every write is refused (`OOM command not allowed`), so the failure mode applies, and
/// usage written meanwhile must arrive once memory is back: nothing is lost. With
/// `allkeys-lru` Redis evicts instead of refusing, so the gateway keeps answering 200.
async fn memory_full(mode: &str, policy: &str) {
    let redis = Redis::start_with(&["--maxmemory-policy", policy]);
    let redis_url = redis.url();
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut fill = redis::pipe();
    for i in 0..2500 {
        fill.cmd("SET")
            .arg(format!("other-app:{i}"))
            .arg(vec![b'x'; 1000])
            .ignore();
    }
    let () = fill.query_async(&mut conn).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let gw = start_gateway(dir.path(), &redis_url, mode);
    let label = format!("{mode}, Redis memory full with {policy}");
    let mut probes_answered = 0;
    let mut probes = 0;
    assert!(
        admitted_through_redis(&gw, &redis_url).await,
        "[{label}] healthy: requests are admitted through Redis"
    );
    probes_answered += 1;

    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let loops = spawn_load(&gw, KEY, &stop, epoch);
    tokio::time::sleep(Duration::from_millis(700)).await;

    let fault_at = epoch.elapsed();
    let evicted_before = info_field(&redis, "stats", "evicted_keys");
    let limit = used_memory(&redis) - 512 * 1024;
    redis.cli(&["CONFIG", "SET", "maxmemory", &limit.to_string()]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (ready_code, ready) = readyz(&gw).await;
    tokio::time::sleep((fault_at + FAULT).saturating_sub(epoch.elapsed())).await;
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    let back_at = epoch.elapsed();
    let evicted = info_field(&redis, "stats", "evicted_keys") - evicted_before;

    let mut recovered_at = None;
    while epoch.elapsed() < back_at + Duration::from_secs(10) {
        probes += 1;
        if admitted_through_redis(&gw, &redis_url).await {
            probes_answered += 1;
            recovered_at = Some(epoch.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let samples = finish(&stop, loops).await;
    let recovered_at = recovered_at.unwrap_or_else(|| {
        panic!(
            "[{label}] the gateway did not use Redis again within 10 s after memory was freed:\n{}",
            gw.logs()
        )
    });
    let before: Vec<&Sample> = samples.iter().filter(|s| s.end < fault_at).collect();
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.end >= fault_at && s.start <= recovered_at)
        .collect();
    let after: Vec<&Sample> = samples.iter().filter(|s| s.start > recovered_at).collect();
    let slowest = samples.iter().map(latency).max().unwrap_or_default();
    let answered = samples.iter().filter(|s| s.status == 200).count() as u64 + probes_answered;
    // Usage batches refused meanwhile are retried until they land, each exactly once. A
    // recovery probe that was answered without going through Redis is counted by the
    // gateway but not in `answered`: at most `probes` more.
    let counted = {
        let mut counted = 0;
        let deadline = Instant::now() + RECOVERY_BOUND;
        while Instant::now() < deadline {
            counted = counted_requests(&redis_url).await;
            if counted >= answered {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        counted
    };
    eprintln!(
        "[{label}] {} requests from {LOOPS} loops; status mix before {:?}, during {:?}, after {:?}; \
         slowest {slowest:?}; readyz mid-fault {ready_code} {}; {evicted} keys evicted; recovered {:?} \
         after memory was freed; usage counted {counted} of {answered} answered",
        samples.len(),
        mix(before.iter().copied()),
        mix(during.iter().copied()),
        mix(after.iter().copied()),
        ready["redis"],
        recovered_at - back_at,
    );
    assert!(
        before.len() >= LOOPS && during.len() >= LOOPS && after.len() >= LOOPS,
        "[{label}] every phase saw load"
    );
    assert!(
        slowest <= LATENCY_BOUND,
        "[{label}] a request took {slowest:?}"
    );
    let not_ok = |phase: &[&Sample]| -> Vec<String> {
        phase
            .iter()
            .filter(|s| s.status != 200)
            .map(|s| format!("{} {}", s.status, s.body))
            .collect()
    };
    assert!(
        not_ok(&before).is_empty(),
        "[{label}] before: {:?}",
        not_ok(&before)
    );
    assert!(
        not_ok(&after).is_empty(),
        "[{label}] after: {:?}",
        not_ok(&after)
    );
    assert!(
        recovered_at - back_at <= RECOVERY_BOUND,
        "[{label}] recovery took {:?}",
        recovered_at - back_at
    );
    match (policy, mode) {
        ("noeviction", "failClosed") => {
            let wrong = neither_ok_nor_unavailable(&during);
            assert!(
                wrong.is_empty(),
                "[{label}] 200 or an OpenAI-shaped 503: {wrong:?}"
            );
            assert!(
                during.iter().filter(|s| s.status == 503).count() >= LOOPS,
                "[{label}] writes refused for lack of memory are refused like an outage"
            );
            assert_eq!(evicted, 0);
        }
        ("noeviction", _) => {
            assert!(
                not_ok(&during).is_empty(),
                "[{label}] failOpen answers everything: {:?}",
                not_ok(&during)
            );
            assert_eq!(evicted, 0);
        }
        _ => {
            assert!(
                not_ok(&during).is_empty(),
                "[{label}] an evicting Redis never refuses: {:?}",
                not_ok(&during)
            );
            assert!(evicted > 0, "[{label}] Redis evicted to make room");
        }
    }
    if policy == "noeviction" {
        assert!(
            counted >= answered && counted <= answered + probes,
            "[{label}] usage refused while memory was full is written once it is back, and \
             only once: {counted} counted, {answered} answered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_serves_every_request_and_loses_no_usage_while_redis_memory_is_full() {
    memory_full("failOpen", "noeviction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_only_while_redis_memory_is_full() {
    memory_full("failClosed", "noeviction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_at_full_memory_keeps_serving_in_fail_closed() {
    memory_full("failClosed", "allkeys-lru").await;
}
