//! Graceful shutdown under load: two gateway processes with the same configuration and one
//! Redis, behind a small round-robin client that acts as the load balancer (it polls each
//! gateway's `/readyz` every 50 ms and sends steady traffic, plain and streamed, only to
//! gateways it sees ready), while long streams from a slow upstream are open on the
//! gateway that gets SIGTERM, and a lagging client keeps calling it during the drain
//! delay.
//!
//! Streams that end within the bound (`--drain-delay` + `--shutdown-timeout`): readiness
//! fails first (503 `draining`); every request that started before the client saw it
//! flip, and every one after it (all on the surviving gateway), succeeds with a complete
//! body, streams ending with their usage and `[DONE]`; the open streams finish, and the
//! process exits 0 as soon as they have, before the bound; every concurrency lease is
//! given back and the usage of every answered request reaches Redis (shutdown writes the
//! last batch).
//!
//! A stream that outlives the bound is ended a moment before it (a quarter of the shutdown
//! timeout, at most a second) with an OpenAI-shaped error event and a clean end of the
//! body, never left hanging or cut mid-body; its concurrency lease is given back, its
//! usage counted, and the process still exits 0 within the bound.
//!
//! Run with `--nocapture` for the figures: requests served during the shutdown, time from
//! SIGTERM to the readiness flip and to exit, and the longest stream.

use crate::common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{Gateway, redis::Redis, upstream::Upstream};
use futures_util::StreamExt;
use serde_json::{Value, json};

const KEY: &str = "tg_shutdownLoadKey00000000000000000000000001";
/// The long streams' key: at most as many in flight as the scenario opens, so one lease
/// left behind refuses the next request.
const CAPPED: &str = "tg_shutdownCappedKey000000000000000000000001";
/// How often the client's balancer polls `/readyz`.
const POLL: Duration = Duration::from_millis(50);
/// How often the slow upstream sends a chunk of a long stream.
const TICK: Duration = Duration::from_millis(250);
/// Slack on every bound, for a loaded two-core machine.
const SLACK: Duration = Duration::from_millis(1500);

fn config(dir: &std::path::Path, up: &Upstream, capped: usize) {
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: mock}}\nspec: {{type: mock, models: [{{name: demo}}], \
         mock: {{completionTokens: 8, latency: 5ms, chunkInterval: 10ms}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: demo}}\nspec: {{models: [demo], targets: [{{provider: mock}}]}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: slow}}\nspec: {{type: openaiCompatible, baseUrl: '{}', \
         credentials: {{secretRef: {{name: up, key: token}}}}, models: [{{name: gpt-long}}]}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: long}}\nspec: {{models: [gpt-long], targets: [{{provider: slow}}], retries: {{attempts: 0}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: load}}\nspec: {{owner: load, limits: {{requestsPerMinute: 100000}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: load-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: capped}}\nspec: {{owner: capped, limits: {{maxConcurrent: {capped}}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: capped-key}}\nstringData: {{apiKey: {CAPPED}}}\n",
        up.base_url()
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A plain chat completion.
    Plain,
    /// A short stream from the mock provider.
    Stream,
    /// A long stream from the slow upstream, opened on the gateway that gets SIGTERM.
    Long,
    /// A plain chat completion sent straight to the stopping gateway after SIGTERM, as
    /// by a client whose view of the endpoints lags.
    Lagging,
}

/// One request, timed from the scenario's start.
#[derive(Debug, Clone)]
struct Outcome {
    gateway: usize,
    kind: Kind,
    start: Duration,
    end: Duration,
    status: u16,
    /// A complete answer: a JSON body with usage, or a stream with a usage chunk then
    /// `[DONE]` and no error event.
    complete: bool,
    /// The last SSE event (or the body).
    last: String,
    /// The transport error that ended the answer, if any.
    error: Option<String>,
}

/// The client-side load balancer: round robin over the gateways it last saw ready.
struct Balancer {
    bases: Vec<String>,
    ready: Vec<AtomicBool>,
    next: AtomicUsize,
    /// Per gateway: (time, ready, what /readyz answered) at each change the poller saw.
    changes: Mutex<Vec<(usize, Duration, bool, String)>>,
}

impl Balancer {
    fn pick(&self) -> Option<usize> {
        let n = self.bases.len();
        (0..n)
            .map(|_| self.next.fetch_add(1, Ordering::Relaxed) % n)
            .find(|g| self.ready[*g].load(Ordering::Relaxed))
    }

    /// When the client first saw `gateway` not ready, and what it saw.
    fn flipped(&self, gateway: usize) -> Option<(Duration, String)> {
        self.changes
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.0 == gateway && !c.2)
            .map(|c| (c.1, c.3.clone()))
    }
}

async fn poll_readiness(lb: Arc<Balancer>, gateway: usize, epoch: Instant, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let url = format!("{}/readyz", lb.bases[gateway]);
    while !stop.load(Ordering::Relaxed) {
        let (ready, seen) = match http.get(&url).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or_default();
                (status == 200, format!("{status} {}", body["status"]))
            }
            Err(e) => (false, format!("error: {e}")),
        };
        if lb.ready[gateway].swap(ready, Ordering::Relaxed) != ready {
            lb.changes
                .lock()
                .unwrap()
                .push((gateway, epoch.elapsed(), ready, seen));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn chat_body(model: &str, stream: bool) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "drain me"}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// Sends one request and reads the whole answer.
async fn call(
    http: &reqwest::Client,
    base: &str,
    gateway: usize,
    kind: Kind,
    epoch: Instant,
) -> Outcome {
    let start = epoch.elapsed();
    let body = match kind {
        Kind::Plain | Kind::Lagging => chat_body("demo", false),
        Kind::Stream => chat_body("demo", true),
        Kind::Long => chat_body("gpt-long", true),
    };
    let sent = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(if kind == Kind::Long { CAPPED } else { KEY })
        .json(&body)
        .send()
        .await;
    let mut outcome = Outcome {
        gateway,
        kind,
        start,
        end: start,
        status: 0,
        complete: false,
        last: String::new(),
        error: None,
    };
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            outcome.end = epoch.elapsed();
            outcome.error = Some(format!("{e:?}"));
            return outcome;
        }
    };
    outcome.status = resp.status().as_u16();
    let mut text = Vec::new();
    let mut error = None;
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(b) => text.extend_from_slice(&b),
            Err(e) => {
                error = Some(format!("{e:?}"));
                break;
            }
        }
    }
    outcome.end = epoch.elapsed();
    let text = String::from_utf8_lossy(&text).into_owned();
    outcome.complete = error.is_none()
        && outcome.status == 200
        && if matches!(kind, Kind::Plain | Kind::Lagging) {
            serde_json::from_str::<Value>(&text)
                .is_ok_and(|v| v["usage"]["total_tokens"].as_u64().is_some_and(|t| t > 0))
        } else {
            let events: Vec<&str> = text
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .collect();
            events.last() == Some(&"[DONE]")
                && events.iter().any(|e| {
                    serde_json::from_str::<Value>(e)
                        .is_ok_and(|v| v["usage"]["total_tokens"].as_u64().is_some_and(|t| t > 0))
                })
                && !events.iter().any(|e| e.contains("\"error\""))
        };
    outcome.last = text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .unwrap_or_default()
        .to_owned();
    outcome.error = error;
    outcome
}

/// Steady traffic through the balancer: plain and streamed requests in turn.
async fn steady(lb: Arc<Balancer>, epoch: Instant, stop: Arc<AtomicBool>) -> Vec<Outcome> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut out = Vec::new();
    let mut stream = false;
    while !stop.load(Ordering::Relaxed) {
        // A request starts when the balancer picks its gateway.
        let picked = epoch.elapsed();
        let Some(g) = lb.pick() else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        stream = !stream;
        let kind = if stream { Kind::Stream } else { Kind::Plain };
        let mut outcome = call(&http, &lb.bases[g], g, kind, epoch).await;
        outcome.start = picked;
        out.push(outcome);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

/// One OpenAI stream chunk of the slow upstream.
fn sse(v: Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Feeds a long stream a chunk every [`TICK`] until `until`, then ends it with a finish
/// chunk, the usage chunk and `[DONE]`. Stops quietly if the gateway hung up.
async fn feed(tx: tokio::sync::mpsc::UnboundedSender<Bytes>, until: Instant) {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1, "model": "gpt-long",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut sent = 0u64;
    let _ = tx.send(sse(chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )));
    while Instant::now() < until {
        tokio::time::sleep(TICK).await;
        if tx
            .send(sse(chunk(json!({"content": "tick "}), Value::Null)))
            .is_err()
        {
            return;
        }
        sent += 1;
    }
    let _ = tx.send(sse(chunk(json!({}), json!("stop"))));
    let _ = tx.send(sse(
        json!({"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 1,
        "model": "gpt-long", "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": sent, "total_tokens": 5 + sent}}),
    ));
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n"));
}

/// What a scenario measured.
struct Run {
    outcomes: Vec<Outcome>,
    term_at: Duration,
    /// When the client first saw the stopping gateway not ready, and what it saw.
    flipped: (Duration, String),
    /// When the stopping gateway's process exited, and how.
    exited: Option<(Duration, std::process::ExitStatus)>,
    logs: String,
    /// The surviving gateway's readiness after the run.
    survivor_ready: u16,
    /// Kept running until the run is dropped (its usage is written every 250 ms).
    _survivor: Gateway,
    /// Statuses of as many requests for the long streams' key as it allows at once,
    /// sent to the survivor after the stopping gateway exited.
    capped_after: Vec<u16>,
}

struct Case {
    redis: Option<String>,
    drain_delay: Duration,
    shutdown_timeout: Duration,
    /// Long streams on the stopping gateway: when each ends, after SIGTERM.
    long: Vec<Duration>,
}

impl Case {
    fn bound(&self) -> Duration {
        self.drain_delay + self.shutdown_timeout
    }
}

/// Runs two gateways under steady traffic, opens the long streams on gateway 0, sends it
/// SIGTERM, and waits for it to exit (or for the bound and slack to pass).
async fn scenario(case: &Case) -> Run {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &up, case.long.len());
    let drain = format!("{}ms", case.drain_delay.as_millis());
    let timeout = format!("{}ms", case.shutdown_timeout.as_millis());
    let mut args = vec![
        "--resources",
        dir.path().to_str().unwrap(),
        "--drain-delay",
        &drain,
        "--shutdown-timeout",
        &timeout,
    ];
    if let Some(url) = &case.redis {
        args.extend(["--redis-url", url, "--redis-failure-mode", "failClosed"]);
    }
    let stopping = Gateway::start(&args);
    let survivor = Gateway::start(&args);
    let lb = Arc::new(Balancer {
        bases: vec![stopping.base.clone(), survivor.base.clone()],
        ready: vec![AtomicBool::new(false), AtomicBool::new(false)],
        next: AtomicUsize::new(0),
        changes: Mutex::new(Vec::new()),
    });
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = (0..2)
        .map(|g| tokio::spawn(poll_readiness(lb.clone(), g, epoch, stop.clone())))
        .collect();
    let loops: Vec<_> = (0..4)
        .map(|_| tokio::spawn(steady(lb.clone(), epoch, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The long streams, opened one by one so each takes the next scripted reply.
    let term_at = Instant::now() + Duration::from_millis(1000);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut long = Vec::new();
    for after in &case.long {
        let tx = up.stream();
        tokio::spawn(feed(tx, term_at + *after));
        let (http, base) = (http.clone(), stopping.base.clone());
        long.push(tokio::spawn(async move {
            call(&http, &base, 0, Kind::Long, epoch).await
        }));
        // The upstream has the request (and its scripted reply) before the next one.
        let want = long.len();
        assert!(
            common::eventually(Duration::from_secs(5), || async {
                up.received().len() >= want
            })
            .await,
            "the long stream reached the upstream"
        );
    }
    tokio::time::sleep(term_at.saturating_duration_since(Instant::now())).await;

    let term = epoch.elapsed();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &stopping.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // A client that has not yet seen the readiness flip keeps calling during the drain
    // delay.
    let lagging = tokio::spawn({
        let (http, base) = (http.clone(), lb.bases[0].clone());
        let until = Instant::now() + case.drain_delay.saturating_sub(Duration::from_millis(500));
        async move {
            let mut out = Vec::new();
            while Instant::now() < until {
                out.push(call(&http, &base, 0, Kind::Lagging, epoch).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        }
    });
    let wait_for = case.bound() + SLACK * 2;
    let mut stopping = stopping;
    let (stopping, exited) = tokio::task::spawn_blocking(move || {
        let status = stopping.wait_exit(wait_for);
        (stopping, status)
    })
    .await
    .unwrap();
    let exited = exited.map(|s| (epoch.elapsed(), s));
    // The survivor keeps serving everyone for a while longer.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for l in loops {
        outcomes.extend(l.await.unwrap());
    }
    for p in pollers {
        p.await.unwrap();
    }
    for l in long {
        outcomes.push(l.await.unwrap());
    }
    outcomes.extend(lagging.await.unwrap());
    // Every lease of the long streams was given back: the capped key takes as many
    // streams again.
    let capped_after = futures_util::future::join_all((0..case.long.len()).map(|_| {
        http.post(survivor.url("/v1/chat/completions"))
            .bearer_auth(CAPPED)
            .json(&chat_body("demo", false))
            .send()
    }))
    .await
    .into_iter()
    .map(|r| r.map_or(0, |r| r.status().as_u16()))
    .collect();
    let survivor_ready = survivor.readyz().await.0;
    Run {
        outcomes,
        term_at: term,
        flipped: lb.flipped(0).unwrap_or_else(|| {
            panic!(
                "the client never saw gateway 0 not ready:\n{}",
                stopping.logs()
            )
        }),
        exited,
        logs: stopping.logs(),
        survivor_ready,
        _survivor: survivor,
        capped_after,
    }
}

/// Prints the run's figures.
fn report(label: &str, case: &Case, run: &Run) {
    let term = run.term_at;
    let during = |o: &&Outcome| o.end >= term && run.exited.is_none_or(|(at, _)| o.start <= at);
    let per_gateway = |g: usize| {
        run.outcomes
            .iter()
            .filter(during)
            .filter(|o| o.gateway == g)
            .count()
    };
    let failed = run.outcomes.iter().filter(|o| !o.complete).count();
    let longest = run
        .outcomes
        .iter()
        .filter(|o| o.kind == Kind::Long)
        .map(|o| o.end.saturating_sub(term))
        .max()
        .unwrap_or_default();
    eprintln!(
        "[{label}] {} requests ({} long streams); during the shutdown (SIGTERM to exit) the stopping gateway \
         served {} and the survivor {}; incomplete answers {failed} (a stream ended at the deadline counts); SIGTERM to readiness flip seen by the client {:?} ({}); \
         to exit {:?} ({:?}); longest stream ended {longest:?} after SIGTERM; bound {:?}",
        run.outcomes.len(),
        case.long.len(),
        per_gateway(0),
        per_gateway(1),
        run.flipped.0.saturating_sub(term),
        run.flipped.1,
        run.exited.map(|(at, _)| at.saturating_sub(term)),
        run.exited.map(|(_, s)| s),
        case.bound(),
    );
}

/// Requests counted in the usage of both keys in Redis (waiting up to 4 s for the
/// survivor's next write), and the requests answered.
async fn usage_in_redis(redis: &Redis, run: &Run) -> (u64, u64) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let day = tollgate_api::usage::periods(jiff::Timestamp::now()).0;
    // Answered: every request with a status 200, complete or cut, and the capped key's
    // requests after the run.
    let served = run.outcomes.iter().filter(|o| o.status == 200).count() as u64
        + run.capped_after.iter().filter(|s| **s == 200).count() as u64;
    let mut recorded = 0;
    for _ in 0..40 {
        recorded = 0;
        for name in ["load", "capped"] {
            let key_id = tollgate_api::compile::key_id("default", name);
            recorded += redis::cmd("HGET")
                .arg(tollgate_api::usage::usage_key(&key_id, &day))
                .arg(tollgate_api::usage::REQUESTS)
                .query_async::<Option<u64>>(&mut conn)
                .await
                .unwrap()
                .unwrap_or(0);
        }
        if recorded >= served {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (recorded, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_request_and_drains_open_streams_before_exiting() {
    let redis = Redis::start();
    let case = Case {
        redis: Some(redis.url()),
        drain_delay: Duration::from_secs(2),
        shutdown_timeout: Duration::from_secs(6),
        long: [1000, 2500, 4000, 5000].map(Duration::from_millis).to_vec(),
    };
    let run = scenario(&case).await;
    report("with Redis", &case, &run);
    let term = run.term_at;
    let flipped = run.flipped.0;

    assert!(
        run.flipped.1.starts_with("503") && run.flipped.1.contains("draining"),
        "readiness fails (503 draining) before the listener closes: {}",
        run.flipped.1
    );
    assert!(
        flipped.saturating_sub(term) <= POLL * 2 + SLACK,
        "readiness failed {:?} after SIGTERM",
        flipped.saturating_sub(term)
    );
    let before_flip: Vec<&Outcome> = run.outcomes.iter().filter(|o| o.start < flipped).collect();
    let failed: Vec<&&Outcome> = before_flip.iter().filter(|o| !o.complete).collect();
    assert!(
        failed.is_empty(),
        "every request started before readiness flipped succeeds: {failed:#?}"
    );
    let failed: Vec<&Outcome> = run.outcomes.iter().filter(|o| !o.complete).collect();
    assert!(failed.is_empty(), "no request fails at all: {failed:#?}");
    assert!(
        run.outcomes
            .iter()
            .filter(|o| o.kind == Kind::Lagging)
            .count()
            >= 5,
        "the stopping gateway served requests sent during its drain delay"
    );
    let late: Vec<&Outcome> = run
        .outcomes
        .iter()
        .filter(|o| matches!(o.kind, Kind::Plain | Kind::Stream))
        .filter(|o| o.gateway == 0 && o.start > flipped)
        .collect();
    assert!(
        late.is_empty(),
        "the balancer sent nothing to a gateway it saw not ready: {late:#?}"
    );

    let (exit_at, status) = run.exited.expect("the stopping gateway exited");
    assert!(status.success(), "it exits 0: {status:?}");
    let longest_end = run
        .outcomes
        .iter()
        .filter(|o| o.kind == Kind::Long)
        .map(|o| o.end)
        .max()
        .unwrap();
    assert!(
        longest_end.saturating_sub(term) <= case.bound(),
        "every open stream finished within the bound"
    );
    assert!(
        exit_at.saturating_sub(term) <= case.bound() + SLACK,
        "exited {:?} after SIGTERM",
        exit_at.saturating_sub(term)
    );
    assert!(
        !run.logs.contains("did not finish in time"),
        "nothing was cut: it exited once the streams were done, before the bound"
    );
    let survivor_after: Vec<&Outcome> = run
        .outcomes
        .iter()
        .filter(|o| o.gateway == 1 && o.start > flipped)
        .collect();
    assert!(
        survivor_after.len() >= 10,
        "the survivor took the traffic: {} requests",
        survivor_after.len()
    );
    assert_eq!(run.survivor_ready, 200, "the survivor is still ready");
    assert!(
        run.capped_after.iter().all(|s| *s == 200),
        "the long streams' concurrency leases were all given back: {:?}",
        run.capped_after
    );

    // Both gateways wrote every answered request's usage; the stopping one before it exited.
    let (recorded, served) = usage_in_redis(&redis, &run).await;
    eprintln!("[with Redis] usage counted in Redis: {recorded} requests of {served} answered");
    assert_eq!(
        recorded, served,
        "the usage of every answered request is in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outliving_the_drain_bound_ends_with_an_error_event_and_gives_back_its_limits_before_exit()
 {
    let redis = Redis::start();
    let case = Case {
        redis: Some(redis.url()),
        drain_delay: Duration::from_secs(1),
        shutdown_timeout: Duration::from_secs(3),
        // One stream ends well within the bound, one long after it.
        long: [2000, 20_000].map(Duration::from_millis).to_vec(),
    };
    let run = scenario(&case).await;
    report("a stream outliving the bound", &case, &run);
    let term = run.term_at;

    let (exit_at, status) = run.exited.expect("the stopping gateway exited");
    assert!(status.success(), "it exits 0: {status:?}");
    assert!(
        exit_at.saturating_sub(term) <= case.bound() + SLACK,
        "it exits by the bound: {:?} after SIGTERM",
        exit_at.saturating_sub(term)
    );
    assert!(
        run.logs
            .contains("in-flight requests did not finish in time; ending open streams"),
        "it says why the stream ended"
    );
    let long: Vec<&Outcome> = run
        .outcomes
        .iter()
        .filter(|o| o.kind == Kind::Long)
        .collect();
    // In the order of `case.long`.
    let [within, cut] = long[..] else {
        panic!("two long streams: {long:#?}")
    };
    assert!(
        within.complete,
        "the stream within the bound completes: {within:?}"
    );
    let ended = cut.end.saturating_sub(term);
    eprintln!(
        "[a stream outliving the bound] it ended {ended:?} after SIGTERM, last event {:?}, transport error {:?}",
        cut.last, cut.error
    );
    assert!(
        ended + Duration::from_secs(1) + Duration::from_millis(100) >= case.bound(),
        "the stream had the whole shutdown timeout but for a second at most: ended {ended:?} after SIGTERM"
    );
    assert!(
        ended <= case.bound() + SLACK,
        "the client is not left waiting: the cut stream ended {ended:?} after SIGTERM"
    );
    let last: Value = cut
        .last
        .strip_prefix("data: ")
        .and_then(|e| serde_json::from_str(e).ok())
        .unwrap_or_default();
    assert_eq!(
        (
            cut.status,
            &last["error"]["code"],
            &last["error"]["type"],
            &cut.error
        ),
        (
            200,
            &json!("gateway_shutting_down"),
            &json!("server_error"),
            &None
        ),
        "the cut stream ends with an OpenAI-shaped error event, then a clean end of the body: {cut:?}"
    );
    assert!(
        !cut.complete,
        "a cut stream does not look complete: {cut:?}"
    );
    let failed: Vec<&Outcome> = run
        .outcomes
        .iter()
        .filter(|o| !o.complete && o.kind != Kind::Long)
        .collect();
    assert!(
        failed.is_empty(),
        "every other request succeeds: {failed:#?}"
    );
    assert_eq!(run.survivor_ready, 200);
    assert!(
        run.capped_after.iter().all(|s| *s == 200),
        "the cut stream's concurrency lease was given back: {:?}",
        run.capped_after
    );
    let (recorded, served) = usage_in_redis(&redis, &run).await;
    eprintln!(
        "[a stream outliving the bound] usage counted in Redis: {recorded} requests of {served} answered"
    );
    assert_eq!(
        recorded, served,
        "the usage of every answered request, the cut stream's included, is in Redis"
    );
}
