//! Gateways sharing limits through a real redis-server: exact across replicas, and calm
//! when Redis hangs (failOpen keeps serving, failClosed answers 503), recovering on their
//! own when it is back.

use crate::common;

use std::time::{Duration, Instant};

use common::{Gateway, client, eventually, redis::Redis};
use serde_json::{Value, json};

const LIMITED: &str = "tg_redisTestsLimitedKey00000000000000000001";
const FREE: &str = "tg_redisTestsUnlimitedKey000000000000000002";

fn config(dir: &std::path::Path, rpm: u32) {
    let text = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: mock}}\nspec: {{type: mock, models: [{{name: demo}}], mock: {{completionTokens: 3}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: demo}}\nspec: {{models: [demo], targets: [{{provider: mock}}]}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: limited}}\nspec: {{owner: a, limits: {{requestsPerMinute: {rpm}}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: limited-key}}\nstringData: {{apiKey: {LIMITED}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: free}}\nspec: {{owner: b}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: free-key}}\nstringData: {{apiKey: {FREE}}}\n"
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

fn gateway(dir: &std::path::Path, redis: &Redis, mode: &str) -> Gateway {
    Gateway::with_redis(dir, &redis.url(), "200ms", mode)
}

async fn call(gw: &Gateway, key: &str) -> u16 {
    gw.chat_status(key, "demo").await
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    gw.readyz().await
}

#[tokio::test]
async fn three_gateways_sharing_redis_admit_exactly_the_key_limit() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 30);
    let gateways: Vec<Gateway> = (0..3)
        .map(|_| gateway(dir.path(), &redis, "failOpen"))
        .collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..90 {
        let url = gateways[i % 3].url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(LIMITED)
                .json(&json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    // The bucket refills one request every 2 s: a slow machine may legitimately admit more.
    // So may fail-open: an admission whose Redis call missed the 200 ms deadline (a loaded
    // machine) is decided by the gateway's own limiter, by design; each such call is
    // counted as an `admit` error.
    let mut fell_open = 0.0;
    for gw in &gateways {
        let metrics = gw.metrics().await;
        fell_open += common::metric(
            &metrics,
            r#"tollgate_redis_call_duration_seconds_count{operation="admit",result="error"}"#,
        );
    }
    let allowed =
        30 + (started.elapsed().as_secs_f64() / 2.0).floor() as usize + fell_open as usize;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(admitted + refused, 90);
    assert!(admitted >= 30, "false rejections: {}", 30 - admitted);
    assert!(
        admitted <= allowed,
        "overshoot: {} over {allowed}",
        admitted - allowed
    );
    let (code, ready) = readyz(&gateways[0]).await;
    assert_eq!(code, 200);
    assert_eq!(
        ready["redis"],
        json!({"reachable": true, "failureMode": "failOpen"})
    );
}

#[tokio::test]
async fn fail_open_keeps_serving_when_redis_hangs_and_recovers() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 1000);
    let gw = gateway(dir.path(), &redis, "failOpen");
    assert_eq!(call(&gw, LIMITED).await, 200);
    redis.signal("STOP");
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(call(&gw, LIMITED).await, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a hung Redis must not hang requests: {:?}",
            started.elapsed()
        );
    }
    let (code, ready) = readyz(&gw).await;
    assert_eq!(code, 200, "failOpen stays ready");
    assert_eq!(ready["redis"]["reachable"], false);
    assert!(gw.metrics().await.contains("tollgate_redis_up 0"));
    redis.signal("CONT");
    assert!(
        eventually(Duration::from_secs(10), || async {
            call(&gw, LIMITED).await == 200 && readyz(&gw).await.1["redis"]["reachable"] == true
        })
        .await
    );
    let transitions = gw
        .logs()
        .lines()
        .filter(|l| l.contains("Redis unreachable"))
        .count();
    assert_eq!(
        transitions, 1,
        "one log line per transition, not per request"
    );
}

#[tokio::test]
async fn fail_closed_refuses_limited_requests_with_503_while_redis_hangs() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 1000);
    let gw = gateway(dir.path(), &redis, "failClosed");
    assert_eq!(call(&gw, LIMITED).await, 200);
    redis.signal("STOP");
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(LIMITED)
        .json(&json!({"model": "demo", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("Limits cannot be checked")
    );
    assert_eq!(
        call(&gw, FREE).await,
        200,
        "requests without limits need no decision"
    );
    assert_eq!(
        readyz(&gw).await.0,
        503,
        "failClosed reports not ready while Redis is unreachable"
    );
    redis.signal("CONT");
    assert!(
        eventually(Duration::from_secs(10), || async {
            call(&gw, LIMITED).await == 200
        })
        .await
    );
    assert_eq!(readyz(&gw).await.0, 200);
}

#[tokio::test]
async fn a_gateway_starts_while_redis_is_down_and_serves_in_fail_open() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 1000);
    let gw = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--redis-url",
        &format!("redis://127.0.0.1:{port}/"),
        "--redis-timeout",
        "200ms",
    ]);
    assert_eq!(
        call(&gw, LIMITED).await,
        200,
        "failOpen with Redis down from the start"
    );
    assert_eq!(readyz(&gw).await.1["redis"]["reachable"], false);
}

#[tokio::test]
async fn answered_requests_are_counted_in_shared_usage_counters() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 1000);
    let gateways: Vec<Gateway> = (0..2)
        .map(|_| gateway(dir.path(), &redis, "failOpen"))
        .collect();
    for i in 0..4 {
        assert_eq!(call(&gateways[i % 2], LIMITED).await, 200);
    }
    let key_id = tollgate_api::compile::key_id("default", "limited");
    let (day, month) = tollgate_api::usage::periods(jiff::Timestamp::now());
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let read = |period: String| {
        let mut conn = conn.clone();
        let key = tollgate_api::usage::usage_key(&key_id, &period);
        async move {
            let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            fields
        }
    };
    assert!(
        eventually(Duration::from_secs(5), || {
            let read = &read;
            let day = day.clone();
            async move { read(day).await.get("requests").map(String::as_str) == Some("4") }
        })
        .await,
        "both gateways recorded their requests"
    );
    let daily = read(day).await;
    assert_eq!(daily["output_tokens"], "12", "3 mock tokens per answer");
    assert!(daily["input_tokens"].parse::<u64>().unwrap() > 0);
    assert_eq!(read(month).await["requests"], "4");
    assert_eq!(
        read(tollgate_api::usage::TOTAL.to_owned()).await["requests"],
        "4"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(tollgate_api::usage::usage_key(
            &key_id,
            &tollgate_api::usage::periods(jiff::Timestamp::now()).0,
        ))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 0 && ttl <= tollgate_api::usage::DAILY_TTL_SECS,
        "usage keys expire: {ttl}"
    );
}

#[tokio::test]
async fn cached_answers_are_shared_by_every_gateway_and_a_redis_outage_is_only_a_miss() {
    let redis = Redis::start();
    let up = common::upstream::Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: gpt-4o}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: cached}}\nspec: {{models: [gpt-4o], targets: [{{provider: up}}], cache: {{ttl: 5m}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: free}}\nspec: {{owner: b}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: free-key}}\nstringData: {{apiKey: {FREE}}}\n",
        up.base_url()
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let one = gateway(dir.path(), &redis, "failOpen");
    let two = gateway(dir.path(), &redis, "failOpen");
    let ask = |gw: &Gateway, question: &'static str| {
        let url = gw.url("/v1/chat/completions");
        async move {
            let resp = client()
                .post(url)
                .bearer_auth(FREE)
                .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": question}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()["x-tollgate-cache"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(ask(&one, "shared?").await, "miss");
    assert!(
        eventually(Duration::from_secs(5), || async {
            ask(&two, "shared?").await == "hit"
        })
        .await,
        "the other gateway answers from the shared entry"
    );
    assert_eq!(up.received().len(), 1);

    redis.signal("STOP");
    let started = Instant::now();
    assert_eq!(ask(&two, "while redis hangs").await, "miss");
    assert!(started.elapsed() < Duration::from_secs(2));
    redis.signal("CONT");
}

#[tokio::test]
async fn a_key_removed_from_one_gateways_config_is_refused_by_all_within_a_second() {
    let redis = Redis::start();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for d in &dirs {
        config(d.path(), 100_000);
    }
    let gateways: Vec<Gateway> = dirs
        .iter()
        .map(|d| {
            Gateway::start(&[
                "--resources",
                d.path().to_str().unwrap(),
                "--redis-url",
                &redis.url(),
                "--reload-interval",
                "100ms",
            ])
        })
        .collect();
    for gw in &gateways {
        assert_eq!(call(gw, FREE).await, 200);
    }
    // Give every replica time to subscribe.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Only the first gateway's configuration loses the key (as if its pod got the update
    // first); the others still have it mounted.
    let text = std::fs::read_to_string(dirs[0].path().join("config.yaml")).unwrap();
    let without = text
        .split("---\n")
        .filter(|doc| !doc.contains("name: free"))
        .collect::<Vec<_>>()
        .join("---\n");
    let started = Instant::now();
    std::fs::write(dirs[0].path().join("config.yaml"), without).unwrap();
    let mut refused_by_all = None;
    while started.elapsed() < Duration::from_secs(5) {
        let mut all = true;
        for gw in &gateways {
            all &= call(gw, FREE).await == 401;
        }
        if all {
            refused_by_all = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = refused_by_all.expect("every gateway refuses the removed key");
    println!("revocation reached all three gateways in {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(
        call(&gateways[1], LIMITED).await,
        200,
        "other keys are unaffected"
    );

    // A replica that starts later catches up from the revocation set.
    let late = Gateway::start(&[
        "--resources",
        dirs[2].path().to_str().unwrap(),
        "--redis-url",
        &redis.url(),
    ]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            call(&late, FREE).await == 401
        })
        .await
    );
}

#[tokio::test]
async fn gateways_report_the_configuration_they_serve_for_the_operator() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 10);
    let gateways: Vec<Gateway> = (0..2)
        .map(|_| gateway(dir.path(), &redis, "failOpen"))
        .collect();
    let (_, ready) = readyz(&gateways[0]).await;
    let hash = ready["configHash"].as_str().unwrap().to_owned();
    let reported = eventually(Duration::from_secs(5), || async {
        let seen = redis.cli(&["ZRANGE", tollgate_api::heartbeat::SEEN, "0", "-1"]);
        let instances: Vec<&str> = seen.lines().collect();
        instances.len() == 2
            && instances.iter().all(|i| {
                redis
                    .cli(&["HGET", tollgate_api::heartbeat::CONFIG, i])
                    .trim()
                    == hash
            })
    })
    .await;
    assert!(reported, "both gateways report configuration {hash}");
    // Reports are recent (Unix milliseconds).
    let score: i64 = redis
        .cli(&[
            "ZRANGE",
            tollgate_api::heartbeat::SEEN,
            "0",
            "0",
            "WITHSCORES",
        ])
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let age = jiff::Timestamp::now().as_millisecond() - score;
    assert!((0..10_000).contains(&age), "report {age} ms old");
}

#[tokio::test]
async fn batched_usage_survives_a_redis_stall_and_is_flushed_at_shutdown() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), 100_000);
    let mut gw = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--redis-url",
        &redis.url(),
        "--redis-timeout",
        "200ms",
        "--drain-delay",
        "0s",
    ]);
    let key = tollgate_api::usage::usage_key(
        &tollgate_api::compile::key_id("default", "limited"),
        tollgate_api::usage::TOTAL,
    );
    let requests = || redis.cli(&["HGET", &key, "requests"]).trim().to_owned();
    for _ in 0..20 {
        assert_eq!(call(&gw, LIMITED).await, 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || async { requests() == "20" }).await,
        "20 requests written in batches: {}",
        requests()
    );

    // Redis stalls: answers go on (failOpen) and their usage waits in the gateway.
    redis.signal("STOP");
    for _ in 0..5 {
        assert_eq!(call(&gw, LIMITED).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.signal("CONT");
    assert!(
        eventually(Duration::from_secs(5), || async { requests() == "25" }).await,
        "usage kept through the stall and written after it: {}",
        requests()
    );

    // Answered just before SIGTERM: written on the way out, not lost.
    for _ in 0..3 {
        assert_eq!(call(&gw, LIMITED).await, 200);
    }
    std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(
        gw.wait_exit(Duration::from_secs(10)).is_some(),
        "gateway exits"
    );
    assert_eq!(requests(), "28", "the last batch is flushed at shutdown");
    // Each batch deletes its confirmed predecessor's marker: one is left, not one per
    // batch.
    let markers = redis.cli(&["KEYS", "*:usage:batch:*"]);
    assert!(
        markers.lines().filter(|l| !l.trim().is_empty()).count() <= 1,
        "batch markers pile up: {markers}"
    );
}

/// Every key name held by `redis` (authenticating with `password`).
fn keys(redis: &Redis, password: &str) -> String {
    redis.cli(&["--no-auth-warning", "-a", password, "--scan"])
}

#[tokio::test]
async fn a_password_protected_redis_and_a_separate_cache_redis_each_hold_only_their_state() {
    const PASSWORD: &str = "a9F3kPq7Zr2Lm8Xc4Vt6Bn1Hd5Js0Wy";
    let state = Redis::start_with(&[
        "--requirepass",
        PASSWORD,
        "--maxmemory-policy",
        "noeviction",
    ]);
    let cache = Redis::start_with(&[
        "--requirepass",
        PASSWORD,
        "--maxmemory-policy",
        "allkeys-lru",
    ]);
    let up = common::upstream::Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: sk-up}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: gpt-4o}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: cached}}\nspec: {{models: [gpt-4o], targets: [{{provider: up}}], cache: {{ttl: 5m}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: limited}}\nspec: {{owner: a, limits: {{requestsPerMinute: 100}}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: limited-key}}\nstringData: {{apiKey: {LIMITED}}}\n",
        up.base_url()
    );
    std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    let ask = |gw: &Gateway| {
        let url = gw.url("/v1/chat/completions");
        async move {
            client()
                .post(url)
                .bearer_auth(LIMITED)
                .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "cached?"}]}))
                .send()
                .await
                .unwrap()
        }
    };

    // Without the password the gateway cannot use Redis (fail open: it serves, Redis down).
    let blind = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--redis-url",
        &state.url(),
    ]);
    assert_eq!(ask(&blind).await.status(), 200);
    let metrics = blind.metrics().await;
    assert_eq!(
        common::metric(&metrics, "tollgate_redis_up "),
        0.0,
        "{metrics}"
    );
    drop(blind);
    assert_eq!(
        keys(&state, PASSWORD).trim(),
        "",
        "nothing was written without the password"
    );

    // With it (from the environment, as the chart passes it), limits go to the state
    // Redis and cache entries to the cache Redis only.
    let gw = Gateway::start_with_env(
        &[
            "--resources",
            dir.path().to_str().unwrap(),
            "--redis-url",
            &state.url(),
            "--redis-cache-url",
            &cache.url(),
        ],
        &[("TOLLGATE_REDIS_PASSWORD", PASSWORD)],
    );
    assert_eq!(ask(&gw).await.headers()["x-tollgate-cache"], "miss");
    assert!(
        eventually(Duration::from_secs(5), || async {
            ask(&gw).await.headers()["x-tollgate-cache"] == "hit"
        })
        .await
    );
    assert_eq!(
        common::metric(&gw.metrics().await, "tollgate_redis_up "),
        1.0
    );
    let (state_keys, cache_keys) = (keys(&state, PASSWORD), keys(&cache, PASSWORD));
    assert!(
        state_keys.contains("}:rpm"),
        "the key's rate window: {state_keys}"
    );
    assert!(!state_keys.contains(":cache:"), "{state_keys}");
    assert!(cache_keys.contains(":cache:"), "{cache_keys}");
    assert!(
        cache_keys.lines().all(|k| k.contains(":cache:")),
        "only cache entries in the cache Redis: {cache_keys}"
    );
    // The password is in no log line or metric.
    assert!(!gw.logs().contains(PASSWORD));
    assert!(!gw.metrics().await.contains(PASSWORD));
}
