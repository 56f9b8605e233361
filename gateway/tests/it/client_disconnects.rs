//! Clients that walk away: a client that disconnects mid-stream (in either dialect) or
//! before a slow answer must not leave anything behind. Through the real gateway, a real
//! redis-server holding the shared concurrency leases, budget and usage counters, and a
//! mock upstream whose streams the test feeds:
//!
//! - the upstream call is cancelled within a bound (its response body is dropped and the
//!   gateway's TCP connection to the upstream is closed, read from `/proc/net/tcp`);
//! - the tokens relayed before the disconnect are billed: usage counters, the budget's
//!   spend and the token metric all count exactly what was seen;
//! - no concurrency lease or budget reservation stays held in Redis, and no socket stays
//!   open in the gateway process.
//!
//! Run with `--nocapture` to see the cancellation times.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    Gateway, client, eventually, metric,
    redis::Redis,
    upstream::{Reply, Upstream},
};
use futures_util::StreamExt;
use serde_json::{Value, json};

const KEY: &str = "tg_disconnectTestsClientKey0000000000000001";
/// Streams opened at once; also the key's `maxConcurrent`, so a single leaked lease
/// shows up as a refused request afterwards.
const STREAMS: usize = 16;
/// Prices per million input and output tokens.
const PRICES: (f64, f64) = (1000.0, 2000.0);
/// Longest the gateway may take to cancel the upstream call after the client is gone.
const CANCEL_BOUND: Duration = Duration::from_secs(5);

fn config(dir: &std::path::Path, upstream: &Upstream) {
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: client}}\nspec:\n  owner: team-a\n\
         \x20 limits: {{maxConcurrent: {STREAMS}}}\n  budget: {{amount: 1000, period: monthly}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n\
         \x20 models: [{{name: gpt-4o, pricing: {{inputPerMillion: {}, outputPerMillion: {}}}}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n  models: [gpt-4o]\n  targets: [{{provider: up}}]\n  retries: {{attempts: 0}}\n",
        upstream.base_url(),
        PRICES.0,
        PRICES.1
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

async fn start() -> (Upstream, Redis, Gateway, tempfile::TempDir) {
    let up = Upstream::start().await;
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &up);
    let gw = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--redis-url",
        &redis.url(),
        "--redis-failure-mode",
        "failClosed",
    ]);
    (up, redis, gw, dir)
}

/// Which API a client speaks.
#[derive(Clone, Copy, Debug)]
enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    /// Sends a request; streamed when `stream`.
    async fn send(self, http: &reqwest::Client, gw: &Gateway, stream: bool) -> reqwest::Response {
        let messages = json!([{"role": "user", "content": "tell me a long story"}]);
        let (path, body) = match self {
            Dialect::OpenAi => (
                "/v1/chat/completions",
                json!({"model": "gpt-4o", "messages": messages, "stream": stream, "max_tokens": 50}),
            ),
            Dialect::Anthropic => (
                "/v1/messages",
                json!({"model": "gpt-4o", "messages": messages, "stream": stream, "max_tokens": 50}),
            ),
        };
        http.post(gw.url(path))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// How many pieces of output the client has seen in `text`, the stream so far.
    fn pieces(self, text: &str) -> usize {
        match self {
            Dialect::OpenAi => text.matches(r#""delta":{"content""#).count(),
            Dialect::Anthropic => text.matches(r#""type":"content_block_delta""#).count(),
        }
    }
}

/// One OpenAI stream chunk carrying one piece of output.
fn piece(i: usize) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}},\"finish_reason\":null}}]}}\n\n"
    ))
}

/// The gateway's established TCP connections to `port` (its side of them), from
/// `/proc/net/tcp`: a connection the gateway still holds open to the upstream.
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields[2].rsplit(':').next().unwrap();
            u16::from_str_radix(remote_port, 16).unwrap() == port && fields[3] == "01"
        })
        .count()
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Every Redis key matching `pattern`.
fn redis_keys(redis: &Redis, pattern: &str) -> Vec<String> {
    redis
        .cli(&["--scan", "--pattern", pattern])
        .lines()
        .map(str::to_owned)
        .filter(|k| !k.is_empty())
        .collect()
}

/// Concurrency leases held in Redis across every lease set.
fn leases_held(redis: &Redis) -> i64 {
    redis_keys(redis, "tollgate:*:conc")
        .iter()
        .map(|k| redis.cli(&["ZCARD", k]).trim().parse::<i64>().unwrap())
        .sum()
}

/// Budget reservations still open: fields of the reservation hashes other than the
/// running total.
fn reservations_open(redis: &Redis) -> Vec<String> {
    redis_keys(redis, "tollgate:*:budget:*:amounts")
        .iter()
        .flat_map(|k| {
            redis
                .cli(&["HKEYS", k])
                .lines()
                .map(str::to_owned)
                .filter(|f| !f.is_empty() && f != "#total")
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Waits until Redis holds no concurrency lease and no budget reservation.
async fn nothing_held(redis: &Redis) {
    assert!(
        eventually(Duration::from_secs(5), || async { leases_held(redis) == 0 }).await,
        "leases still held: {}",
        leases_held(redis)
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            reservations_open(redis).is_empty()
        })
        .await,
        "budget reservations still open: {:?}",
        reservations_open(redis)
    );
}

fn usage_counter(redis: &Redis, field: &str) -> f64 {
    let key_id = tollgate_api::compile::key_id("default", "client");
    let (_, month) = tollgate_api::usage::periods(jiff::Timestamp::now());
    let key = tollgate_api::usage::usage_key(&key_id, &month);
    redis
        .cli(&["HGET", &key, field])
        .trim()
        .parse()
        .unwrap_or(0.0)
}

fn budget_spent(redis: &Redis) -> f64 {
    let key_id = tollgate_api::compile::key_id("default", "client");
    let (_, month) = tollgate_api::usage::periods(jiff::Timestamp::now());
    let key = format!(
        "{}:spent",
        tollgate_api::usage::budget_prefix(&key_id, &month)
    );
    redis.cli(&["GET", &key]).trim().parse().unwrap_or(0.0)
}

#[tokio::test]
async fn clients_that_walk_away_mid_stream_cancel_the_upstream_are_billed_and_leave_nothing_held() {
    let (up, redis, gw, _dir) = start().await;
    let http = client();
    assert_eq!(established_to(up.addr.port()), 0);
    // One answered request first, so every lazily opened socket (Redis, the client's
    // connection) exists before the baseline is taken.
    up.script([Reply::Json(
        200,
        common::upstream::completion("gpt-4o", "warm"),
        vec![],
    )]);
    assert_eq!(Dialect::OpenAi.send(&http, &gw, false).await.status(), 200);
    let fds_before = open_fds(gw.pid());
    assert!(
        eventually(Duration::from_secs(5), || async {
            usage_counter(&redis, "requests") == 1.0
        })
        .await,
        "the warm-up request is counted"
    );
    let usage_before = (1.0, usage_counter(&redis, "output_tokens"));
    let spent_before = budget_spent(&redis);

    // Open every stream one by one, so stream i is fed by feeder i; then feed each a
    // different number of pieces and let its client read exactly that many.
    let mut open = Vec::new();
    for i in 0..STREAMS {
        let dialect = if i % 2 == 0 {
            Dialect::OpenAi
        } else {
            Dialect::Anthropic
        };
        let feed = up.stream();
        let response = dialect.send(&http, &gw, true).await;
        assert_eq!(response.status(), 200, "stream {i}");
        open.push((dialect, feed, response.bytes_stream()));
    }
    // While they are open, each holds a connection, a lease and a budget reservation
    // (which also shows the checks below look at the right places).
    assert_eq!(established_to(up.addr.port()), STREAMS);
    assert_eq!(leases_held(&redis), STREAMS as i64);
    assert_eq!(reservations_open(&redis).len(), STREAMS);
    let mut relayed = 0usize;
    let mut bodies = Vec::new();
    let mut feeds = Vec::new();
    for (i, (dialect, feed, mut body)) in open.into_iter().enumerate() {
        let want = 1 + i % 5;
        for p in 0..want {
            feed.send(piece(p)).unwrap();
        }
        let mut text = String::new();
        while dialect.pieces(&text) < want {
            let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
                .await
                .unwrap_or_else(|_| panic!("stream {i} relays its pieces: {text}"))
                .unwrap()
                .unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        relayed += want;
        bodies.push(body);
        feeds.push(feed);
    }

    // Every client walks away at once.
    let gone = Instant::now();
    drop(bodies);
    let mut cancelled = vec![None; STREAMS];
    while cancelled.iter().any(Option::is_none) && gone.elapsed() < CANCEL_BOUND {
        for (i, feed) in feeds.iter().enumerate() {
            if cancelled[i].is_none() && feed.send(Bytes::from_static(b": ping\n\n")).is_err() {
                cancelled[i] = Some(gone.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slowest = cancelled.iter().flatten().max().copied();
    println!(
        "{STREAMS} streams abandoned: upstream bodies dropped after at most {slowest:?}, \
         {} of {STREAMS} within {CANCEL_BOUND:?}",
        cancelled.iter().flatten().count()
    );
    assert!(
        cancelled.iter().all(Option::is_some),
        "every upstream call is cancelled within {CANCEL_BOUND:?}: {cancelled:?}"
    );
    assert!(
        eventually(CANCEL_BOUND, || async {
            established_to(up.addr.port()) == 0
        })
        .await,
        "the gateway closes its connections to the upstream: {} still open",
        established_to(up.addr.port())
    );
    println!(
        "connections to the upstream closed after {:?}",
        gone.elapsed()
    );

    // Nothing stays held: no lease, no budget reservation, no socket.
    nothing_held(&redis).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            open_fds(gw.pid()) <= fds_before
        })
        .await,
        "the gateway holds {} descriptors, {fds_before} before the streams",
        open_fds(gw.pid())
    );

    // What was seen is billed: one output token a relayed piece (the streams were cut
    // before their usage arrived), and the prompt estimate.
    let requests = usage_before.0 + STREAMS as f64;
    assert!(
        eventually(Duration::from_secs(5), || async {
            usage_counter(&redis, "requests") == requests
        })
        .await,
        "usage counts every abandoned stream: {} of {requests}",
        usage_counter(&redis, "requests")
    );
    let output = usage_counter(&redis, "output_tokens") - usage_before.1;
    assert_eq!(output, relayed as f64, "every relayed piece is billed");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"tollgate_tokens_total{route="default/chat",provider="default/up",model="gpt-4o",owner="team-a",kind="output"}"#
        ),
        usage_before.1 + relayed as f64,
        "{metrics}"
    );
    let input_tokens = usage_counter(&redis, "input_tokens");
    let output_tokens = usage_counter(&redis, "output_tokens");
    let expected = (input_tokens * PRICES.0 + output_tokens * PRICES.1) / 1e6;
    let spent = budget_spent(&redis);
    assert!(
        spent > spent_before && (spent - expected).abs() < 1e-6,
        "the budget is charged what the usage counters say: spent {spent}, expected {expected}"
    );

    // And the key can use all of its concurrency again, at once.
    let mut held = Vec::new();
    for _ in 0..STREAMS {
        let feed = up.stream();
        let response = Dialect::OpenAi.send(&http, &gw, true).await;
        assert_eq!(response.status(), 200, "every lease was given back");
        held.push((feed, response));
    }
    drop(held);
}

#[tokio::test]
async fn a_client_that_gives_up_before_the_answer_cancels_the_upstream_call_and_pays_nothing() {
    let (up, redis, gw, _dir) = start().await;
    let http = client();
    let spent_before = budget_spent(&redis);
    up.script((0..4).map(|_| Reply::Hang));
    let gone = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..4 {
        let http = http.clone();
        let url = gw.url("/v1/chat/completions");
        calls.push(tokio::spawn(async move {
            http.post(url)
                .bearer_auth(KEY)
                .timeout(Duration::from_millis(500))
                .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
        }));
    }
    for call in calls {
        assert!(call.await.unwrap().unwrap_err().is_timeout());
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            up.received().len() == 4
        })
        .await,
        "the upstream saw the four calls"
    );
    assert!(
        eventually(CANCEL_BOUND, || async {
            established_to(up.addr.port()) == 0
        })
        .await,
        "the upstream calls are cancelled: {} connections still open",
        established_to(up.addr.port())
    );
    println!(
        "four abandoned calls cancelled {:?} after they were sent",
        gone.elapsed()
    );
    nothing_held(&redis).await;
    assert_eq!(
        budget_spent(&redis),
        spent_before,
        "nothing was answered, nothing is charged"
    );
    let answered: Value = Dialect::OpenAi
        .send(&http, &gw, false)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(answered["object"], "chat.completion", "{answered}");
}
