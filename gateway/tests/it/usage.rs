//! `GET /v1/usage` through the real gateway: a key sees its own requests, tokens and
//! spend for its budget period and the one before, its limits and its remaining budget,
//! read from the same Redis counters the operator mirrors into ApiKey status (or from the
//! gateway itself without Redis); a new period starts from zero with the whole budget;
//! bad keys get the usual 401; a Redis outage is a clear 503.

use crate::common;

use std::time::Duration;

use common::{Gateway, client, eventually_value, redis::Redis};
use serde_json::{Value, json};

const MONTHLY: &str = "tg_usageTestsMonthlyBudgetKey00000000000001";
const DAILY: &str = "tg_usageTestsDailyBudgetKey0000000000000002";
const PLAIN: &str = "tg_usageTestsNoBudgetKey000000000000000003";
/// Price per million tokens, input and output.
const PRICE: f64 = 1000.0;

fn config(dir: &std::path::Path) {
    let key = |name: &str, key: &str, spec: &str| {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}}}\nspec: {{owner: team-{name}{spec}}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key}}\nstringData: {{apiKey: {key}}}\n---\n"
        )
    };
    let text = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: mock}}\nspec: {{type: mock, models: [{{name: demo, pricing: {{inputPerMillion: {PRICE}, outputPerMillion: {PRICE}}}}}], mock: {{completionTokens: 3}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: demo}}\nspec: {{models: [demo], targets: [{{provider: mock}}]}}\n---\n{}{}{}",
        key(
            "monthly",
            MONTHLY,
            ", limits: {requestsPerMinute: 100, maxConcurrent: 5}, budget: {amount: 100, period: monthly}"
        ),
        key("daily", DAILY, ", budget: {amount: 50, period: daily}"),
        key("plain", PLAIN, ""),
    );
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

async fn usage(gw: &Gateway, key: &str) -> (u16, Value) {
    let resp = client()
        .get(gw.url("/v1/usage"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn chat(gw: &Gateway, key: &str) -> u16 {
    gw.chat_status(key, "demo").await
}

/// Waits until the key's current period shows `requests` (usage is written every
/// 250 ms) and returns the answer.
async fn usage_after(gw: &Gateway, key: &str, requests: u64) -> Value {
    eventually_value(
        || async { usage(gw, key).await.1 },
        |v: &Value| v["current"]["requests"] == requests,
    )
    .await
}

fn key_id(name: &str) -> String {
    tollgate_api::compile::key_id("default", name)
}

#[tokio::test]
async fn a_key_sees_its_own_usage_limits_and_budget_from_the_shared_counters() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let gw = Gateway::with_redis(dir.path(), &redis.url(), "500ms", "failClosed");
    for _ in 0..3 {
        assert_eq!(chat(&gw, MONTHLY).await, 200);
    }
    assert_eq!(chat(&gw, PLAIN).await, 200);

    let v = usage_after(&gw, MONTHLY, 3).await;
    assert_eq!(v["object"], "usage");
    assert_eq!(v["source"], "redis");
    assert_eq!(v["period"], "monthly");
    assert_eq!(v["key"]["api_key"], "default/monthly");
    assert_eq!(v["key"]["id"], key_id("monthly"));
    assert_eq!(v["key"]["owner"], "team-monthly");
    let (_, month) = tollgate_api::usage::periods(jiff::Timestamp::now());
    let current = &v["current"];
    assert_eq!(current["id"], month);
    assert_eq!(current["output_tokens"], 9, "3 mock tokens per answer: {v}");
    let input = current["input_tokens"].as_u64().unwrap();
    assert!(input > 0);
    assert_eq!(current["total_tokens"], input + 9);
    let spend = current["spend"].as_f64().unwrap();
    assert!(
        (spend - (input + 9) as f64 * PRICE / 1e6).abs() < 1e-9,
        "{v}"
    );
    assert!(
        current["start"]
            .as_str()
            .unwrap()
            .ends_with("-01T00:00:00Z")
    );
    assert_eq!(v["previous"]["requests"], 0);
    assert_eq!(
        v["limits"],
        json!({"requests_per_minute": 100, "tokens_per_minute": null, "max_concurrent": 5})
    );
    let budget = &v["budget"];
    assert_eq!(budget["amount"], 100.0);
    assert_eq!(budget["currency"], "USD");
    assert_eq!(budget["period"], "monthly");
    assert!(
        (budget["spent"].as_f64().unwrap() - spend).abs() < 1e-9,
        "{v}"
    );
    assert!((budget["remaining"].as_f64().unwrap() - (100.0 - spend)).abs() < 1e-9);
    assert_eq!(budget["resets_at"], current["end"]);

    // The same numbers the operator mirrors into ApiKey status: the Redis hash of the
    // key's budget period.
    let hash = redis.cli(&[
        "HGET",
        &tollgate_api::usage::usage_key(&key_id("monthly"), &month),
        tollgate_api::usage::REQUESTS,
    ]);
    assert_eq!(hash.trim(), "3");

    // Each key sees only itself; a key without a budget reports the month and no budget.
    let plain = usage_after(&gw, PLAIN, 1).await;
    assert_eq!(plain["key"]["api_key"], "default/plain");
    assert_eq!(plain["period"], "monthly");
    assert_eq!(plain["budget"], Value::Null);
    assert_eq!(plain["limits"], Value::Null);

    // Refused keys get the same 401 as everywhere else.
    let (status, body) = usage(&gw, "tg_usageTestsUnknownKey00000000000000000009").await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let resp = client().get(gw.url("/v1/usage")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn a_new_budget_period_starts_from_zero_with_the_whole_budget_and_shows_the_last_one() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    // Yesterday, the daily key spent its whole budget on 40 requests.
    let (today, _) = tollgate_api::usage::periods(jiff::Timestamp::now());
    let yesterday = today
        .parse::<jiff::civil::Date>()
        .unwrap()
        .yesterday()
        .unwrap()
        .to_string();
    let id = key_id("daily");
    redis.cli(&[
        "HSET",
        &tollgate_api::usage::usage_key(&id, &yesterday),
        "requests",
        "40",
        "input_tokens",
        "300",
        "output_tokens",
        "200",
        "spend",
        "50",
    ]);
    redis.cli(&[
        "SET",
        &format!(
            "{}:spent",
            tollgate_api::usage::budget_prefix(&id, &yesterday)
        ),
        "50",
    ]);
    let gw = Gateway::with_redis(dir.path(), &redis.url(), "500ms", "failClosed");

    let (status, v) = usage(&gw, DAILY).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["period"], "daily");
    assert_eq!(v["current"]["id"], today);
    assert_eq!(v["current"]["requests"], 0);
    assert_eq!(v["budget"]["spent"], 0.0);
    assert_eq!(v["budget"]["remaining"], 50.0);
    let previous = &v["previous"];
    assert_eq!(previous["id"], yesterday);
    assert_eq!(previous["requests"], 40);
    assert_eq!(previous["total_tokens"], 500);
    assert_eq!(previous["spend"], 50.0);
    assert_eq!(previous["end"], v["current"]["start"]);

    // Yesterday's exhausted budget does not refuse today's requests.
    assert_eq!(chat(&gw, DAILY).await, 200);
    let v = usage_after(&gw, DAILY, 1).await;
    assert!(v["budget"]["remaining"].as_f64().unwrap() < 50.0);
    assert_eq!(
        v["previous"]["requests"], 40,
        "the previous period is untouched"
    );
}

#[tokio::test]
async fn without_redis_the_gateway_counts_usage_itself() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    for _ in 0..2 {
        assert_eq!(chat(&gw, MONTHLY).await, 200);
    }
    let v = usage_after(&gw, MONTHLY, 2).await;
    assert_eq!(v["source"], "gateway");
    assert_eq!(v["current"]["output_tokens"], 6);
    let spend = v["current"]["spend"].as_f64().unwrap();
    assert!(spend > 0.0);
    assert!(
        (v["budget"]["spent"].as_f64().unwrap() - spend).abs() < 1e-9,
        "{v}"
    );
}

#[tokio::test]
async fn an_unreachable_redis_is_a_clear_503_not_a_hang() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let gw = Gateway::with_redis(dir.path(), &redis.url(), "200ms", "failOpen");
    assert_eq!(usage(&gw, MONTHLY).await.0, 200);
    redis.kill();
    let started = std::time::Instant::now();
    let (status, body) = usage(&gw, MONTHLY).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "usage_unavailable");
    assert!(started.elapsed() < Duration::from_secs(2));
}
