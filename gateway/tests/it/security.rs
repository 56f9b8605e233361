//! Security properties through the real gateway binary: every refused key gets the same
//! 401, and a canary client key and a canary upstream credential, pushed through every
//! path at the most verbose log level, appear in no log line, metric, response, exported
//! span or Redis key or value.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    Gateway, client,
    otlp::Receiver,
    redis::Redis,
    upstream::{Reply, Upstream},
};
use serde_json::{Value, json};
use tollgate_api::key_format;

/// A generated key from fixed bytes.
fn key(seed: u8) -> String {
    let random: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(seed))
        .collect();
    key_format::from_random(&random).unwrap()
}

fn api_key(name: &str, key: &str, extra: &str) -> String {
    format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}}}\nspec: {{owner: team{extra}}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key}}\nstringData: {{apiKey: {key}}}\n---\n"
    )
}

async fn post(gw: &Gateway, auth: Option<(&str, &str)>, body: &Value) -> (u16, String, Bytes) {
    let mut req = client().post(gw.url("/v1/chat/completions")).json(body);
    if let Some((name, value)) = auth {
        req = req.header(name, value);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let content_type = common::content_type(&resp);
    (status, content_type, resp.bytes().await.unwrap())
}

#[tokio::test]
async fn every_refused_key_gets_the_same_401() {
    let valid = key(1);
    let disabled = key(2);
    let expired = key(3);
    let unknown = key(4);
    let dir = tempfile::tempdir().unwrap();
    let mut config = String::from(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock}\nspec: {type: mock, models: [{name: demo}]}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: demo}\nspec: {models: [demo], targets: [{provider: mock}]}\n---\n",
    );
    config.push_str(&api_key("valid", &valid, ""));
    config.push_str(&api_key("disabled", &disabled, ", disabled: true"));
    config.push_str(&api_key(
        "expired",
        &expired,
        ", expiresAt: \"2020-01-01T00:00:00Z\"",
    ));
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    let body = json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}]});
    let bearer = |k: &str| format!("Bearer {k}");

    let (status, _, _) = post(&gw, Some(("authorization", &bearer(&valid))), &body).await;
    assert_eq!(status, 200, "the valid key works");

    // One character off: the checksum catches it.
    let last = if valid.ends_with('0') { "1" } else { "0" };
    let typo = format!("{}{last}", &valid[..valid.len() - 1]);
    assert_eq!(key_format::shape(&typo), key_format::Shape::BadChecksum);
    let cases: Vec<(&str, Option<(&str, String)>)> = vec![
        ("missing", None),
        ("empty", Some(("authorization", "Bearer ".to_owned()))),
        (
            "not a bearer token",
            Some(("authorization", "Basic Zm9vOmJhcg==".to_owned())),
        ),
        ("malformed", Some(("authorization", bearer("tg_short")))),
        ("bad checksum", Some(("authorization", bearer(&typo)))),
        ("unknown", Some(("authorization", bearer(&unknown)))),
        ("unknown, x-api-key", Some(("x-api-key", unknown.clone()))),
        ("disabled", Some(("authorization", bearer(&disabled)))),
        ("expired", Some(("authorization", bearer(&expired)))),
    ];
    let mut answers = Vec::new();
    for (case, auth) in &cases {
        let (status, content_type, bytes) =
            post(&gw, auth.as_ref().map(|(n, v)| (*n, v.as_str())), &body).await;
        assert_eq!(status, 401, "{case}");
        let parsed: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(parsed["error"]["code"], "invalid_api_key", "{case}");
        answers.push((case, content_type, bytes));
    }
    for (case, content_type, bytes) in &answers {
        assert_eq!(
            (content_type, bytes),
            (&answers[0].1, &answers[0].2),
            "{case}: every refusal is byte-for-byte the same"
        );
    }
    let logs = gw.logs();
    for secret in [&valid, &typo, &unknown, &disabled, &expired] {
        assert!(
            !logs.contains(secret.as_str()),
            "a presented key was logged"
        );
    }
}

/// Every string value held in Redis: key names, and string, hash, set, sorted-set and
/// list contents.
fn redis_dump(redis: &Redis) -> String {
    let mut out = String::new();
    for key in redis.cli(&["--scan"]).lines().filter(|l| !l.is_empty()) {
        out.push_str(key);
        out.push('\n');
        let kind = redis.cli(&["TYPE", key]);
        let args: Vec<&str> = match kind.trim() {
            "string" => vec!["GET", key],
            "hash" => vec!["HGETALL", key],
            "set" => vec!["SMEMBERS", key],
            "zset" => vec!["ZRANGE", key, "0", "-1", "WITHSCORES"],
            "list" => vec!["LRANGE", key, "0", "-1"],
            other => panic!("unexpected Redis type {other} for {key}"),
        };
        out.push_str(&redis.cli(&args));
    }
    out
}

#[tokio::test]
async fn canary_key_and_credential_appear_in_no_log_metric_response_span_or_redis_entry() {
    let canary_key = key(42);
    let canary_credential = "sk-canary-UPSTREAM-credential-7f3a9c1e5b";
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let otlp = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: up, labels: {{tollgate.dev/credential: 'true'}}}}\nstringData: {{token: {canary_credential}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: up}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
         \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n\
         \x20 models: [{{name: gpt-4o, pricing: {{inputPerMillion: 1, outputPerMillion: 2}}}}, {{name: other}}]\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat}}\nspec:\n  models: [gpt-4o]\n  targets: [{{provider: up}}]\n\
         \x20 retries: {{attempts: 1, initialBackoff: 10ms, maxBackoff: 10ms}}\n  cache: {{ttl: 1m}}\n  telemetry: {{recordContent: true}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: other}}\nspec: {{models: [other], targets: [{{provider: up}}]}}\n---\n",
        upstream.base_url()
    );
    config.push_str(&format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: canary}}\nspec:\n  owner: team\n  allowedModels: [gpt-4o]\n\
         \x20 limits: {{requestsPerMinute: 8}}\n  budget: {{amount: 100, period: monthly}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: canary-key}}\nstringData: {{apiKey: {canary_key}}}\n"
    ));
    std::fs::write(dir.path().join("config.yaml"), config).unwrap();
    let gw = Gateway::start_with_env(
        &[
            "--resources",
            dir.path().to_str().unwrap(),
            "--redis-url",
            &redis.url(),
        ],
        &[
            ("RUST_LOG", "trace"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );

    // Every path: an answer, the same from the cache, a stream, upstream errors (500,
    // and 401 for the gateway's own credential), a model the key may not use, an
    // unknown model, a bad request, the key in x-api-key, a mistyped key, and the rate
    // limit refusing.
    let mut seen = String::new();
    let send = |body: Value, auth: (&'static str, String)| {
        let gw = &gw;
        async move {
            let resp = client()
                .post(gw.url("/v1/chat/completions"))
                .header(auth.0, auth.1)
                .json(&body)
                .send()
                .await
                .unwrap();
            let mut text = format!("{} {:?}\n", resp.status(), resp.headers());
            text.push_str(&String::from_utf8_lossy(&resp.bytes().await.unwrap()));
            text
        }
    };
    let bearer = ("authorization", format!("Bearer {canary_key}"));
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]});
    seen.push_str(&send(chat.clone(), bearer.clone()).await);
    seen.push_str(&send(chat.clone(), bearer.clone()).await);
    let tx = upstream.stream();
    tx.send(Bytes::from_static(
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n",
    ))
    .unwrap();
    drop(tx);
    seen.push_str(
        &send(
            json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "stream"}]}),
            bearer.clone(),
        )
        .await,
    );
    upstream.script([Reply::Json(
        500,
        json!({"error": {"message": "boom"}}),
        vec![],
    )]);
    seen.push_str(
        &send(
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "fails"}]}),
            bearer.clone(),
        )
        .await,
    );
    upstream.script([Reply::Json(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {canary_credential}")}}),
        vec![],
    )]);
    seen.push_str(
        &send(
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "refused"}]}),
            bearer.clone(),
        )
        .await,
    );
    seen.push_str(&send(json!({"model": "other", "messages": []}), bearer.clone()).await);
    seen.push_str(&send(json!({"model": "nope", "messages": []}), bearer.clone()).await);
    seen.push_str(&send(json!({"messages": "not a list"}), bearer.clone()).await);
    seen.push_str(&send(chat.clone(), ("x-api-key", canary_key.clone())).await);
    let typo = format!("{}x", &canary_key[..canary_key.len() - 1]);
    seen.push_str(&send(chat.clone(), ("authorization", format!("Bearer {typo}"))).await);
    for i in 0..8 {
        seen.push_str(
            &send(
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("n{i}")}]}),
                bearer.clone(),
            )
            .await,
        );
    }
    assert!(seen.contains("429"), "the rate limit refused some: {seen}");
    assert!(
        upstream
            .received()
            .iter()
            .any(|r| r.headers["authorization"] == format!("Bearer {canary_credential}")),
        "the credential did reach the upstream"
    );

    let spans = otlp.wait_for(|s| s.len() >= 10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let places = [
        ("responses", seen),
        ("logs", gw.logs()),
        ("metrics", gw.metrics().await),
        (
            "spans",
            format!("{:?}", otlp.spans().len().max(spans.len())) + &format!("{:?}", otlp.spans()),
        ),
        ("redis", redis_dump(&redis)),
    ];
    assert!(
        places[1].1.contains("TRACE") || places[1].1.contains("\"level\":\"TRACE\""),
        "the gateway logged at trace level"
    );
    // The whole secrets, and their long tails (a truncated copy is still a leak).
    let needles = [
        canary_key.clone(),
        canary_key[3..40].to_owned(),
        canary_credential.to_owned(),
        canary_credential[3..30].to_owned(),
    ];
    let mut hits = 0;
    for (place, text) in &places {
        assert!(!text.is_empty(), "{place} is empty: nothing was scanned");
        let found = needles
            .iter()
            .filter(|needle| text.contains(needle.as_str()))
            .count();
        println!(
            "canary scan: {place}: {} bytes, {} lines, {found} hits",
            text.len(),
            text.lines().count()
        );
        hits += found;
    }
    println!("canary scan: {} spans exported", spans.len());
    assert_eq!(hits, 0, "a canary secret appears: see the lines above");
}

#[tokio::test]
async fn security_headers_are_on_every_response_errors_and_streams_included() {
    let gw = Gateway::start(&["--resources", common::examples().to_str().unwrap()]);
    let dev = "tg_localDevKeyForTheMockProviderOnly00000003";
    let chat = |body: Value, key: Option<&'static str>| {
        let mut req = client().post(gw.url("/v1/chat/completions")).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req
    };
    let requests = vec![
        (
            "answer",
            chat(json!({"model": "demo-chat", "messages": []}), Some(dev)),
        ),
        (
            "stream",
            chat(
                json!({"model": "demo-chat", "messages": [], "stream": true}),
                Some(dev),
            ),
        ),
        (
            "401",
            chat(json!({"model": "demo-chat", "messages": []}), None),
        ),
        (
            "404 model",
            chat(json!({"model": "nope", "messages": []}), Some(dev)),
        ),
        ("400", chat(json!({"messages": 1}), Some(dev))),
        ("404 path", client().get(gw.url("/v1/nothing-here"))),
        ("405", client().get(gw.url("/v1/chat/completions"))),
        (
            "models",
            client().get(gw.url("/v1/models")).bearer_auth(dev),
        ),
        ("usage", client().get(gw.url("/v1/usage")).bearer_auth(dev)),
        ("usage 401", client().get(gw.url("/v1/usage"))),
        ("livez", client().get(gw.url("/livez"))),
        ("readyz", client().get(gw.url("/readyz"))),
    ];
    for (what, req) in requests {
        let resp = req.send().await.unwrap();
        let headers = resp.headers().clone();
        let _ = resp.bytes().await;
        assert_eq!(
            headers
                .get("x-content-type-options")
                .map(|v| v.to_str().unwrap()),
            Some("nosniff"),
            "{what}"
        );
        let cache = headers
            .get("cache-control")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        assert!(
            cache == "no-store" || cache == "no-cache",
            "{what}: cache-control {cache:?}"
        );
        assert!(headers.contains_key("x-request-id"), "{what}");
    }
}

#[tokio::test]
async fn failed_authentications_are_throttled_per_client_address() {
    let gw = Gateway::start(&[
        "--resources",
        common::examples().to_str().unwrap(),
        "--auth-failures-per-minute",
        "5",
        // The test client (127.0.0.1) plays an ingress behind an internal hop (10.0.0.1).
        "--trusted-proxies",
        "127.0.0.1/32,10.0.0.0/8",
    ]);
    let dev = "tg_localDevKeyForTheMockProviderOnly00000003";
    let body = json!({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]});
    let call = |key: &'static str, from: Option<&'static str>| {
        let mut req = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body);
        if let Some(addr) = from {
            req = req.header("x-forwarded-for", format!("{addr}, 10.0.0.1"));
        }
        req.send()
    };
    let attacker = Some("203.0.113.7");
    for _ in 0..5 {
        assert_eq!(call("tg_guess", attacker).await.unwrap().status(), 401);
    }
    let refused = call("tg_guess", attacker).await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=12).contains(&retry_after),
        "about 60 s / 5: {retry_after}"
    );
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "too_many_auth_failures");
    // The address is throttled whatever key it sends, before any lookup…
    assert_eq!(call(dev, attacker).await.unwrap().status(), 429);
    // …and only that address.
    assert_eq!(call(dev, Some("198.51.100.1")).await.unwrap().status(), 200);
    assert_eq!(
        call(dev, None).await.unwrap().status(),
        200,
        "the peer address"
    );
}

/// A gateway (failures allowed a minute: 3) trusting `proxies`.
fn throttled_gateway(proxies: &str) -> Gateway {
    Gateway::start(&[
        "--resources",
        common::examples().to_str().unwrap(),
        "--auth-failures-per-minute",
        "3",
        "--trusted-proxies",
        proxies,
    ])
}

async fn guess(gw: &Gateway, forwarded: &str) -> u16 {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("tg_guess")
        .header("x-forwarded-for", forwarded)
        .json(&json!({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_client_that_is_not_a_trusted_proxy_cannot_dodge_the_throttle_with_forged_forwarding() {
    // The test client (127.0.0.1) is not among the trusted proxies: its header is ignored.
    let gw = throttled_gateway("10.0.0.0/8");
    for i in 0..3 {
        assert_eq!(guess(&gw, &format!("203.0.113.{i}")).await, 401);
    }
    for i in 3..6 {
        assert_eq!(
            guess(&gw, &format!("203.0.113.{i}")).await,
            429,
            "a fresh forged address is still the same peer"
        );
    }
}

#[tokio::test]
async fn behind_trusted_proxies_the_rightmost_untrusted_address_is_throttled_not_the_forged_one() {
    let gw = throttled_gateway("127.0.0.1/32,10.0.0.0/8");
    // The client forges the left part; the ingress appended its real address.
    for i in 0..3 {
        assert_eq!(
            guess(&gw, &format!("198.51.100.{i}, 203.0.113.7, 10.0.0.1")).await,
            401
        );
    }
    assert_eq!(
        guess(&gw, "198.51.100.99, 203.0.113.7, 10.0.0.1").await,
        429
    );
    // Nobody can get another client throttled by naming it on the left either.
    assert_eq!(guess(&gw, "203.0.113.7, 192.0.2.50, 10.0.0.1").await, 401);
}

#[tokio::test]
async fn ipv6_clients_are_throttled_per_64() {
    let gw = throttled_gateway("127.0.0.1/32");
    for host in ["2001:db8:5:6::1", "2001:db8:5:6::2", "2001:db8:5:6:aaaa::3"] {
        assert_eq!(guess(&gw, host).await, 401);
    }
    assert_eq!(
        guess(&gw, "2001:db8:5:6:ffff::4").await,
        429,
        "the same /64"
    );
    assert_eq!(guess(&gw, "2001:db8:5:7::1").await, 401, "another /64");
}

#[test]
fn a_forwarding_header_without_trusted_proxies_is_refused_at_startup() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-gateway"))
        .args([
            "--resources",
            common::examples().to_str().unwrap(),
            "--client-address-header",
            "x-forwarded-for",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--trusted-proxies"), "{stderr}");
}
