//! Accuracy of shared limits: three gateway processes share one redis-server and are
//! driven concurrently at one key. Tokens per minute, budgets and requests per minute
//! never admit more than the limit allows (its capacity plus what legitimately refilled
//! while the test ran), and never refuse a request that fit.
//!
//! The gateways run `failClosed` with a generous Redis timeout: a slow Redis shows up as a
//! 503 (and fails the test) instead of silently falling back to per-replica limits.
//!
//! Run with `--nocapture` to see each test's overshoot and false rejections.

use crate::common;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Gateway, redis::Redis};
use serde_json::Value;

const TOKENS: &str = "tg_redisAccuracyTokensKey0000000000000000001";
const REFUNDS: &str = "tg_redisAccuracyRefundsKey000000000000000002";
const BUDGET: &str = "tg_redisAccuracyBudgetKey0000000000000000003";
const REQUESTS: &str = "tg_redisAccuracyRequestsKey00000000000000004";

/// Completion tokens of every mock answer.
const COMPLETION: u64 = 5;
/// A request whose reservation is exactly its usage: `max_tokens` is the mock's
/// completion length, and the mock reports the gateway's own prompt estimate (4 bytes a
/// token of the body) as prompt tokens.
const EXACT: &str =
    r#"{"model":"demo","messages":[{"role":"user","content":"count me exactly"}],"max_tokens":5}"#;
/// A request that reserves 40 tokens more than it uses.
const GENEROUS: &str =
    r#"{"model":"demo","messages":[{"role":"user","content":"count me exactly"}],"max_tokens":45}"#;
/// Prices per million input and output tokens.
const PRICES: (f64, f64) = (1000.0, 4000.0);

/// Requests the tokens-per-minute key's capacity holds.
const TOKENS_FIT: u64 = 20;
/// Requests the budget pays for, with half a request to spare.
const BUDGET_FIT: f64 = 20.5;
/// Requests per minute of the requests key.
const RPM: u64 = 60;

/// Prompt tokens the gateway estimates (and the mock reports) for a body.
fn prompt(body: &str) -> u64 {
    (body.len() as u64).div_ceil(4)
}

/// Tokens an exact request reserves and uses.
fn exact_tokens() -> u64 {
    prompt(EXACT) + COMPLETION
}

/// What an exact request costs.
fn exact_cost() -> f64 {
    (prompt(EXACT) as f64 * PRICES.0 + COMPLETION as f64 * PRICES.1) / 1_000_000.0
}

fn tokens_capacity() -> u64 {
    TOKENS_FIT * exact_tokens()
}

/// Capacity of the refunds key: four generous reservations at once.
fn refunds_capacity() -> u64 {
    4 * (prompt(GENEROUS) + 45)
}

fn budget_amount() -> f64 {
    BUDGET_FIT * exact_cost()
}

fn config(dir: &std::path::Path) {
    let key = |name: &str, spec: String, secret: &str| {
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key}}\nstringData: {{apiKey: {secret}}}\n---\n"
        )
    };
    let text = [
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: mock}}\nspec: {{type: mock, \
             models: [{{name: demo, pricing: {{inputPerMillion: {}, outputPerMillion: {}}}}}], mock: {{completionTokens: {COMPLETION}}}}}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: demo}}\nspec: {{models: [demo], targets: [{{provider: mock}}]}}\n---\n",
            PRICES.0, PRICES.1
        ),
        key(
            "tokens",
            format!(
                "{{owner: t, limits: {{tokensPerMinute: {}}}}}",
                tokens_capacity()
            ),
            TOKENS,
        ),
        key(
            "refunds",
            format!(
                "{{owner: f, limits: {{tokensPerMinute: {}}}}}",
                refunds_capacity()
            ),
            REFUNDS,
        ),
        key(
            "budget",
            format!(
                "{{owner: b, budget: {{amount: {}, period: total}}}}",
                budget_amount()
            ),
            BUDGET,
        ),
        key(
            "requests",
            format!("{{owner: r, limits: {{requestsPerMinute: {RPM}}}}}"),
            REQUESTS,
        ),
    ]
    .concat();
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

/// One Redis and three gateways sharing it.
fn cluster() -> (Redis, Vec<Gateway>, tempfile::TempDir) {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let gateways = (0..3)
        .map(|_| {
            Gateway::start(&[
                "--resources",
                dir.path().to_str().unwrap(),
                "--redis-url",
                &redis.url(),
                "--redis-timeout",
                "1s",
                "--redis-failure-mode",
                "failClosed",
            ])
        })
        .collect();
    (redis, gateways, dir)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A chat answer: status and JSON body.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    body: Value,
}

async fn call(http: &reqwest::Client, url: &str, key: &str, body: &'static str) -> Answer {
    let resp = http
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    Answer {
        status: resp.status().as_u16(),
        body: resp.json().await.unwrap(),
    }
}

/// `per_gateway` requests to each gateway, all released at once.
async fn burst(
    gateways: &[Gateway],
    key: &'static str,
    body: &'static str,
    per_gateway: usize,
) -> Vec<Answer> {
    let http = http();
    let start = Arc::new(tokio::sync::Barrier::new(gateways.len() * per_gateway));
    let mut tasks = Vec::new();
    for i in 0..gateways.len() * per_gateway {
        let (http, start) = (http.clone(), start.clone());
        let url = gateways[i % gateways.len()].url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            call(&http, &url, key, body).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

fn mix(answers: &[Answer]) -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for a in answers {
        *out.entry(a.status).or_default() += 1;
    }
    out
}

/// Checks that every answer is a 200 or a 429 with `code`, and returns the 200s.
fn admitted<'a>(answers: &'a [Answer], code: &str) -> Vec<&'a Answer> {
    for a in answers {
        assert!(
            a.status == 200 || (a.status == 429 && a.body["error"]["code"] == code),
            "every answer is 200 or a 429 `{code}`: {a:?}"
        );
    }
    answers.iter().filter(|a| a.status == 200).collect()
}

fn usage(a: &Answer) -> (u64, u64) {
    let u = &a.body["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    )
}

/// Overshoot and false rejections of `admitted` against `[must_fit, allowed]`.
fn report(label: &str, admitted: u64, must_fit: u64, allowed: u64) {
    eprintln!(
        "[{label}] admitted {admitted}; must fit {must_fit}, allowed at most {allowed}: \
         overshoot {}, false rejections {}",
        admitted.saturating_sub(allowed),
        must_fit.saturating_sub(admitted)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_admit_exactly_the_tokens_per_minute_of_a_key() {
    let (_redis, gateways, _dir) = cluster();
    let per_request = exact_tokens();
    let started = Instant::now();
    let answers = burst(&gateways, TOKENS, EXACT, 20).await;
    let elapsed = started.elapsed().as_secs_f64();
    let ok = admitted(&answers, "rate_limit_exceeded");
    for a in &ok {
        assert_eq!(
            usage(a),
            (prompt(EXACT), COMPLETION),
            "the answer uses exactly what was reserved"
        );
    }
    let n = ok.len() as u64;
    // The bucket refills its capacity once a minute: a slow run may legitimately admit
    // what refilled while it ran.
    let refill = tokens_capacity() as f64 * elapsed / 60.0;
    let allowed = ((tokens_capacity() as f64 + refill) / per_request as f64).floor() as u64;
    eprintln!(
        "[tokens/min] {} requests of {per_request} tokens at a key allowing {} tokens/min \
         ({TOKENS_FIT} requests) through 3 gateways in {elapsed:.3} s: status mix {:?}",
        answers.len(),
        tokens_capacity(),
        mix(&answers)
    );
    report("tokens/min", n, TOKENS_FIT, allowed);
    assert!(n >= TOKENS_FIT, "false rejections: {}", TOKENS_FIT - n);
    assert!(n <= allowed, "overshoot: {} over {allowed}", n - allowed);
    for a in answers.iter().filter(|a| a.status == 429) {
        assert!(
            a.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("tokens per minute"),
            "{a:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refunds_across_gateways_never_admit_more_than_the_actual_usage_allows() {
    let (_redis, gateways, _dir) = cluster();
    let reserved = prompt(GENEROUS) + 45;
    let used = prompt(GENEROUS) + COMPLETION;
    let capacity = refunds_capacity();
    // Four workers per gateway, each sending 20 requests one after the other: refunds of
    // answered requests make room for more.
    let http = http();
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..12 {
        let http = http.clone();
        let url = gateways[i % 3].url("/v1/chat/completions");
        workers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..20 {
                answers.push(call(&http, &url, REFUNDS, GENEROUS).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(w.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = admitted(&answers, "rate_limit_exceeded");
    for a in &ok {
        assert_eq!(usage(a), (prompt(GENEROUS), COMPLETION));
    }
    let n = ok.len() as u64;
    // Whatever the interleaving, the tokens actually used fit in the capacity plus the
    // refill; the first four reservations fit before any refund.
    let budget = capacity as f64 * (1.0 + elapsed / 60.0);
    let allowed = (budget / used as f64).floor() as u64;
    let must_fit = capacity / reserved;
    eprintln!(
        "[tokens/min with refunds] {} requests reserving {reserved} and using {used} tokens at a key \
         allowing {capacity} tokens/min, 12 sequential workers on 3 gateways in {elapsed:.3} s: \
         status mix {:?} ({} admitted thanks to refunds)",
        answers.len(),
        mix(&answers),
        n.saturating_sub(must_fit)
    );
    report("tokens/min with refunds", n, must_fit, allowed);
    assert!(n >= must_fit, "false rejections: {}", must_fit - n);
    assert!(
        n <= allowed,
        "overshoot: {} tokens used of {budget:.0} allowed",
        n * used
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bursts_from_three_gateways_spend_the_budget_exactly_and_never_more() {
    let (redis, gateways, _dir) = cluster();
    let cost = exact_cost();
    let amount = budget_amount();
    let fit = BUDGET_FIT.floor() as u64;
    let first_day = tollgate_api::usage::periods(jiff::Timestamp::now()).0;
    let answers = burst(&gateways, BUDGET, EXACT, 20).await;
    let ok = admitted(&answers, "insufficient_quota");
    let n = ok.len() as u64;
    let charged: f64 = ok
        .iter()
        .map(|a| {
            let (p, c) = usage(a);
            (p as f64 * PRICES.0 + c as f64 * PRICES.1) / 1_000_000.0
        })
        .sum();
    eprintln!(
        "[budget] {} requests costing {cost} each at a budget of {amount} through 3 gateways: \
         status mix {:?}, spend from the answers' usage {charged:.6}",
        answers.len(),
        mix(&answers)
    );
    report("budget", n, fit, fit);

    // The shared usage counters (summed over the UTC days the test touched).
    let key_id = tollgate_api::compile::key_id("default", "budget");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut days = vec![first_day];
    days.push(tollgate_api::usage::periods(jiff::Timestamp::now()).0);
    days.dedup();
    let mut recorded = (0u64, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        recorded = (0, 0.0);
        for day in &days {
            let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(tollgate_api::usage::usage_key(&key_id, day))
                .query_async(&mut conn)
                .await
                .unwrap();
            recorded.0 += fields
                .get(tollgate_api::usage::REQUESTS)
                .map_or(0, |v| v.parse().unwrap());
            recorded.1 += fields
                .get(tollgate_api::usage::SPEND)
                .map_or(0.0, |v| v.parse().unwrap());
        }
        if recorded.0 >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "[budget] Redis usage counters: {} requests, spend {:.6} of {amount}",
        recorded.0, recorded.1
    );
    assert!(
        charged <= amount,
        "overspent: {charged} of {amount} ({n} requests)"
    );
    assert_eq!(
        n, fit,
        "exactly floor({amount} / {cost}) requests fit (reservations equal the actual cost)"
    );
    assert_eq!(
        recorded.0, n,
        "every admitted request is in the usage counters"
    );
    assert!(
        recorded.1 <= amount && (recorded.1 - n as f64 * cost).abs() < 1e-9,
        "recorded spend {} for {n} requests of {cost}",
        recorded.1
    );

    // Used up: every gateway refuses the next request for the budget.
    for gw in &gateways {
        let a = call(&http(), &gw.url("/v1/chat/completions"), BUDGET, EXACT).await;
        assert_eq!(a.status, 429, "{a:?}");
        assert_eq!(a.body["error"]["code"], "insufficient_quota");
        assert_eq!(a.body["error"]["type"], "insufficient_quota");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_stay_exact_over_bursts_separated_by_pauses() {
    let (_redis, gateways, _dir) = cluster();
    let per_second = RPM as f64 / 60.0;
    let pause = Duration::from_millis(2500);
    let started = Instant::now();
    let (mut admitted_total, mut must_fit, mut sent) = (0u64, RPM, 0usize);
    let mut last_end: Option<Duration> = None;
    let mut failures = Vec::new();
    for (round, per_gateway) in [30usize, 10, 10].into_iter().enumerate() {
        if last_end.is_some() {
            tokio::time::sleep(pause).await;
        }
        let begin = started.elapsed();
        if let Some(end) = last_end {
            // The bucket was below capacity when the last burst ended, so all of the
            // refill during the pause is usable; 10 ms covers clock differences.
            let gap = (begin - end).saturating_sub(Duration::from_millis(10));
            must_fit += (gap.as_secs_f64() * per_second).floor() as u64;
        }
        let answers = burst(&gateways, REQUESTS, EXACT, per_gateway).await;
        let end = started.elapsed();
        last_end = Some(end);
        sent += answers.len();
        let n = admitted(&answers, "rate_limit_exceeded").len() as u64;
        admitted_total += n;
        assert!(
            n < answers.len() as u64,
            "burst {round} exhausted the bucket (otherwise it proves nothing)"
        );
        let allowed = RPM + (end.as_secs_f64() * per_second).floor() as u64;
        eprintln!(
            "[requests/min] burst {round} at {begin:.2?}..{end:.2?}: {} sent, {n} admitted; cumulative {sent} sent",
            answers.len()
        );
        report(
            &format!("requests/min, cumulative after burst {round}"),
            admitted_total,
            must_fit,
            allowed,
        );
        if admitted_total > allowed {
            failures.push(format!(
                "burst {round}: overshoot {} over {allowed}",
                admitted_total - allowed
            ));
        }
        if admitted_total < must_fit {
            failures.push(format!(
                "burst {round}: false rejections {}",
                must_fit - admitted_total
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}
