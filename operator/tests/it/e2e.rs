//! End to end: the real operator binary against an emulated Kubernetes API
//! (`tollgate-kube-emulator`), the objects it writes projected into files the way kubelet
//! mounts them, and a real gateway process serving those files.
//!
//! Needs the gateway binary next to the operator's (`bash tests/run.sh` builds the whole
//! workspace first; otherwise this test builds it).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::{Value, json};
use tollgate_kube_emulator::{Emulator, Projection, ProjectionOptions, RequestFilter};

use crate::common;

use common::{
    CONFIG_SELECTOR, Proc, Redis, TG, assert_nothing_refused, enforce_chart_rbac, examples,
    lease_holder, start_operator,
};

/// The gateway binary, built if this test runs without the rest of the workspace.
fn gateway_binary() -> PathBuf {
    tollgate_testkit::process::binary("tollgate-gateway", "tollgate-gateway")
}

/// The operator (see [`start_operator`]) with `extra` arguments.
fn operator(emulator: &Emulator, identity: &str, extra: &[&str]) -> Proc {
    start_operator(emulator, identity, extra, &[]).0
}

/// The key held by the key Secret `secret` in `default`, if it exists.
fn key_of(emulator: &Emulator, secret: &str) -> Option<String> {
    let s = emulator.get("v1", "secrets", "default", secret)?;
    let data = s["data"]["apiKey"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// The Ready condition of the Tollgate object `plural`/`name`, if it has one.
fn ready(emulator: &Emulator, plural: &str, name: &str) -> Option<Value> {
    common::condition(emulator, plural, name, "Ready")
}

/// Sends a chat completion through `gateway` with `key`; returns the status code.
async fn chat(gateway: &str, key: &str) -> u16 {
    chat_with(gateway, key, "demo-chat").await
}

/// Sends a chat completion for `model` through `gateway` with `key`; returns the status.
async fn chat_with(gateway: &str, key: &str, model: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// How long until a chat completion with `key` gets `want`, if it does within `within`.
async fn eventually_status(
    gateway: &str,
    key: &str,
    want: u16,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if chat(gateway, key).await == want {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// How many writes the replica `identity` made (by its User-Agent).
fn writes_by(emulator: &Emulator, identity: &str) -> usize {
    emulator
        .requests_matching(&RequestFilter::writes())
        .iter()
        .filter(|r| {
            r.user_agent
                .as_deref()
                .is_some_and(|a| a.contains(identity))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_to_files_to_gateway_with_leader_election_and_failover() {
    let emulator = Emulator::start();
    // As the chart's ServiceAccount, within the chart's RBAC rules.
    enforce_chart_rbac(&emulator, json!({"watchNamespaces": ["default"]}));
    emulator
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n")
        .unwrap();
    emulator.apply_yaml(&examples()).unwrap();

    // Two replicas: only the leader writes.
    let mut a = operator(
        &emulator,
        "op-a",
        &[
            "--lease-duration",
            "4s",
            "--lease-renew-deadline",
            "3s",
            "--lease-retry",
            "300ms",
        ],
    );
    let mut b = operator(
        &emulator,
        "op-b",
        &[
            "--lease-duration",
            "4s",
            "--lease-renew-deadline",
            "3s",
            "--lease-retry",
            "300ms",
        ],
    );
    assert!(
        emulator
            .wait_for(Duration::from_secs(30), |e| {
                e.get("v1", "configmaps", "tollgate", "tollgate-gateway-config")
                    .is_some()
                    && ready(e, "apikeys", "local-dev").is_some_and(|c| c["status"] == "True")
                    // Statuses are written concurrently: wait for all of them.
                    && [("providers", "mock"), ("providers", "openai"), ("routepolicies", "demo")]
                        .iter()
                        .all(|(plural, name)| ready(e, plural, name).is_some())
            })
            .await,
        "the operator writes the configuration and statuses:\n{}\n{}",
        a.logs(),
        b.logs()
    );

    // Statuses from the compile, the generated key and its Secret.
    let key = key_of(&emulator, "local-dev-key").expect("a key Secret for local-dev");
    assert_eq!(
        tollgate_api::key_format::shape(&key),
        tollgate_api::key_format::Shape::Generated
    );
    let status = emulator.get(TG, "apikeys", "default", "local-dev").unwrap()["status"].clone();
    assert_eq!(status["keyPrefix"], &key[..7]);
    assert_eq!(status["secretName"], "local-dev-key");
    assert_eq!(status["observedGeneration"], 1);
    for (plural, name) in [
        ("providers", "mock"),
        ("providers", "openai"),
        ("routepolicies", "demo"),
    ] {
        let c =
            ready(&emulator, plural, name).unwrap_or_else(|| panic!("{plural}/{name} has Ready"));
        assert_eq!(c["status"], "True", "{plural}/{name}: {c}");
    }
    // A key created with spec.rotation is issued for that generation, not rotated again.
    let support = emulator
        .get("v1", "secrets", "default", "support-bot-key")
        .unwrap();
    assert_eq!(
        support["metadata"]["annotations"]["tollgate.dev/key-generation"],
        "1"
    );

    // The files kubelet would mount, and a gateway serving them.
    let dir = tempfile::tempdir().unwrap();
    let _projection =
        Projection::start(&emulator, "tollgate", CONFIG_SELECTOR, dir.path()).unwrap();
    let gateway = gateway_on(dir.path(), None);
    let gw = gateway.addr("listening");
    assert!(
        eventually_status(&gw, &key, 200, Duration::from_secs(10))
            .await
            .is_some(),
        "the generated key works:\n{}",
        gateway.logs()
    );

    // Disabling the key: the operator recompiles, the files change, the gateway refuses it.
    emulator
        .patch_merge(
            TG,
            "apikeys",
            "default",
            "local-dev",
            json!({"spec": {"disabled": true}}),
        )
        .unwrap();
    let took = eventually_status(&gw, &key, 401, Duration::from_secs(15)).await;
    let took = took.unwrap_or_else(|| panic!("the disabled key is refused:\n{}", gateway.logs()));
    eprintln!(
        "disabled key refused by the gateway {took:?} after the change (debounce 100 ms, projection poll 100 ms, reload 100 ms)"
    );
    let c = ready(&emulator, "apikeys", "local-dev").unwrap();
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("Disabled"))
    );

    // Exactly one replica wrote.
    let leader = lease_holder(&emulator).expect("a lease holder");
    let (leader_proc, standby, standby_id) = if leader == "op-a" {
        (&mut a, &mut b, "op-b")
    } else {
        (&mut b, &mut a, "op-a")
    };
    assert!(writes_by(&emulator, &leader) > 0, "the leader writes");
    assert_eq!(
        writes_by(&emulator, standby_id),
        0,
        "the standby never writes (it only renews nothing)"
    );

    // Failover: the leader stops (releasing the lease); the standby takes over at once.
    let stopped = Instant::now();
    leader_proc.terminate();
    assert!(
        emulator
            .wait_for(Duration::from_secs(10), |e| lease_holder(e).as_deref()
                == Some(standby_id))
            .await,
        "the standby takes the lease:\n{}",
        standby.logs()
    );
    eprintln!("failover took {:?}", stopped.elapsed());
    emulator
        .patch_merge(
            TG,
            "apikeys",
            "default",
            "local-dev",
            json!({"spec": {"disabled": false}}),
        )
        .unwrap();
    assert!(
        eventually_status(&gw, &key, 200, Duration::from_secs(15))
            .await
            .is_some(),
        "the new leader serves the re-enabled key:\n{}",
        standby.logs()
    );
    assert!(
        writes_by(&emulator, standby_id) > 0,
        "the new leader writes"
    );
    assert_nothing_refused(&emulator);
}

/// A gateway process serving `dir` (a kubelet-style projection), with Redis if given.
fn gateway_on(dir: &std::path::Path, redis_url: Option<&str>) -> Proc {
    let mut args = vec![
        "--config-dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--reload-interval",
        "100ms",
        "--log-format",
        "json",
    ];
    if let Some(url) = redis_url {
        args.extend(["--redis-url", url]);
    }
    Proc::spawn(gateway_binary(), &args, &[])
}

/// Gateway processes, each on its own emulated kubelet.
struct Fleet {
    /// Each kubelet's projection (`None` once stopped: its files stay as they were).
    projections: Vec<Option<Projection>>,
    _gateways: Vec<Proc>,
    addrs: Vec<String>,
    _dirs: Vec<tempfile::TempDir>,
}

/// `n` gateways with Redis, each on its own kubelet whose copy of every generated object
/// catches up `delay` (drawn per object and change) after it changes, rewriting the
/// volume every `sync`.
fn fleet(
    emulator: &Emulator,
    n: usize,
    redis_url: &str,
    delay: (Duration, Duration),
    sync: Duration,
    seed: u64,
) -> Fleet {
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let projections = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let options = ProjectionOptions {
                object_delay: delay,
                seed: seed + i as u64,
                sync_period: sync,
                ..ProjectionOptions::default()
            };
            Some(
                Projection::start_with(emulator, "tollgate", CONFIG_SELECTOR, d.path(), options)
                    .unwrap(),
            )
        })
        .collect();
    let gateways: Vec<Proc> = dirs
        .iter()
        .map(|d| gateway_on(d.path(), Some(redis_url)))
        .collect();
    let addrs = gateways.iter().map(|g| g.addr("listening")).collect();
    Fleet {
        projections,
        _gateways: gateways,
        addrs,
        _dirs: dirs,
    }
}

/// Successful reconciles of the operator whose admin listener is `admin`.
async fn reconciles(admin: &str) -> u64 {
    common::metric(
        admin,
        "tollgate_operator_reconciles_total{result=\"success\"}",
    )
    .await
}

/// Waits (up to a minute) until the operator has reconciled successfully `n` times.
async fn reconciles_reach(admin: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while reconciles(admin).await < n {
        assert!(Instant::now() < deadline, "the operator reconciles");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The writes logged since the last `reset_log`, once whatever a follow-up reconcile
/// does is done (two more reconciles), leaving out usage writes: those mirror the
/// requests the test sent, not the change under test.
async fn writes_once_settled(
    emulator: &Emulator,
    admin: &str,
) -> Vec<tollgate_kube_emulator::RequestRecord> {
    let runs = reconciles(admin).await;
    reconciles_reach(admin, runs + 2).await;
    emulator
        .requests_matching(&RequestFilter::writes())
        .into_iter()
        .filter(|r| r.field_manager.as_deref() != Some("tollgate-operator-usage"))
        .collect()
}

/// The propagation record on the generated ConfigMap.
fn propagation_record(e: &Emulator) -> Option<Value> {
    let cm = e.get("v1", "configmaps", "tollgate", "tollgate-gateway-config")?;
    serde_json::from_str(cm["metadata"]["annotations"]["tollgate.dev/propagation"].as_str()?).ok()
}

/// Whether the ApiKey `name` is Ready and Propagated.
fn served_everywhere(e: &Emulator, name: &str) -> bool {
    let status = |t| common::condition(e, "apikeys", name, t).map(|c| c["status"] == "True");
    status("Ready") == Some(true) && status("Propagated") == Some(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_api_keys_with_redis_and_three_gateways_cost_a_handful_of_writes_per_change() {
    const KEYS: usize = 10_000;
    const GATEWAYS: usize = 3;
    let redis = Redis::start();
    let redis_url = redis.url();
    let emulator = Emulator::start();
    // As the chart's ServiceAccount, within the chart's RBAC rules.
    enforce_chart_rbac(&emulator, json!({"watchNamespaces": ["default"]}));
    emulator
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n")
        .unwrap();
    let mut yaml = String::from(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock}\nspec: {type: mock, models: [{name: demo-chat}]}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: demo}\nspec: {models: [demo-chat], targets: [{provider: mock}]}\n",
    );
    for i in 0..KEYS {
        yaml.push_str(&format!(
            "---\napiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: key-{i:05}}}\nspec: {{owner: team-{}, limits: {{requestsPerMinute: 60}}}}\n",
            i % 50
        ));
    }
    emulator.apply_yaml(&yaml).unwrap();
    let started = Instant::now();
    // A short resync, so reconciles run while Redis is paused below.
    let (op, admin) = common::start_operator(
        &emulator,
        "op-scale",
        &[
            "--leader-election",
            "false",
            "--redis-url",
            &redis_url,
            "--resync",
            "2s",
        ],
        &[],
    );
    let tail = |p: &Proc| {
        p.logs()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        emulator
            .wait_for(Duration::from_secs(240), |e| e
                .get("v1", "configmaps", "tollgate", "tollgate-gateway-config")
                .is_some())
            .await,
        "the configuration is written:\n{}",
        tail(&op)
    );
    // Three gateways, each with its own kubelet: every mounted object's copy catches up
    // on its own, 1–5 s after a change (a real kubelet: up to its sync period plus its
    // cache TTL, 60–90 s), and the volume is rewritten every second.
    let fleet = fleet(
        &emulator,
        GATEWAYS,
        &redis_url,
        (Duration::from_secs(1), Duration::from_secs(5)),
        Duration::from_secs(1),
        7,
    );
    let addrs = fleet.addrs.clone();

    let everything_served = |e: &Emulator| {
        let keys = e.list(TG, "apikeys", "default");
        keys.len() == KEYS + usize::from(keys.len() > KEYS)
            && keys.iter().all(|k| {
                k["status"]["conditions"].as_array().is_some_and(|cs| {
                    ["Ready", "Propagated"]
                        .iter()
                        .all(|t| cs.iter().any(|c| c["type"] == *t && c["status"] == "True"))
                })
            })
            && propagation_record(e)
                .is_some_and(|r| r["state"] == "Serving" && r["gateways"] == GATEWAYS)
    };
    // Polled every 2 s: listing 10,000 objects on every write (wait_for) would slow the
    // emulator down quadratically.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !everything_served(&emulator) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        everything_served(&emulator),
        "every ApiKey becomes Ready and Propagated, the record says Serving: {:?}\nfirst key not served: {:?}\n{}",
        propagation_record(&emulator),
        emulator
            .list(TG, "apikeys", "default")
            .iter()
            .find(|k| !served_everywhere(&emulator, k["metadata"]["name"].as_str().unwrap()))
            .map(|k| k["status"].clone()),
        tail(&op)
    );
    let took = started.elapsed();

    let count = |plural: &str, method: &str| {
        emulator.count(&RequestFilter::writes().resource(plural).method(method))
    };
    let config_writes = emulator
        .requests_matching(&RequestFilter::writes().namespace("tollgate"))
        .iter()
        .filter(|r| matches!(r.resource.as_deref(), Some("configmaps" | "secrets")))
        .count();
    let generated = emulator
        .list_selected("v1", "secrets", "tollgate", CONFIG_SELECTOR)
        .unwrap()
        .len()
        + emulator
            .list_selected("v1", "configmaps", "tollgate", CONFIG_SELECTOR)
            .unwrap()
            .len();
    let status_patches = emulator.count(
        &RequestFilter::writes()
            .resource("apikeys")
            .subresource("status"),
    );
    eprintln!(
        "{KEYS} ApiKeys reconciled and served by {GATEWAYS} gateways in {took:?}: {} key Secrets created, {status_patches} status patches, {config_writes} configuration writes for {generated} generated objects, {} Events, {} writes in all",
        count("secrets", "POST"),
        emulator.count(&RequestFilter::writes().resource("events")),
        emulator.write_count(),
    );
    assert_eq!(
        count("secrets", "POST"),
        KEYS,
        "one key Secret each, written once"
    );
    assert!(
        status_patches <= 2 * KEYS,
        "Ready, then Propagated: at most two status writes per new ApiKey, not one per configuration change: {status_patches}\n{}",
        op.logs()
            .lines()
            .filter(|l| l.contains("reconciled") || l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        config_writes <= 2 * generated + 8,
        "the burst causes a handful of configuration writes: {config_writes} for {generated} objects"
    );
    // The configuration holds every key, in objects under the size limit (the emulator
    // enforces Kubernetes' 1 MiB).
    let cm = emulator
        .get("v1", "configmaps", "tollgate", "tollgate-gateway-config")
        .unwrap();
    let manifest: Value =
        serde_json::from_str(cm["data"]["manifest.json"].as_str().unwrap()).unwrap();
    let shards = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "keys")
        .count();
    assert!(shards >= 2, "{shards} key shards");
    assert_eq!(generated, shards + 2);

    // One new ApiKey: a handful of writes, whatever the number of objects, and the time
    // until its key is readable, which is when every gateway accepts it.
    emulator.reset_log();
    let (key, _, readable) = apply_new_key(&emulator, "newcomer", Duration::from_secs(120), || {
        tail(&op)
    })
    .await;
    for gw in &addrs {
        assert_eq!(
            chat(gw, &key).await,
            200,
            "gateway {gw} accepts the new key as soon as it is readable"
        );
    }
    assert!(
        emulator
            .wait_for(Duration::from_secs(60), |e| served_everywhere(
                e, "newcomer"
            ) && propagation_record(e)
                .is_some_and(|r| r["state"] == "Serving"))
            .await,
        "the new key is reported Propagated: {:?}\n{}",
        common::condition(&emulator, "apikeys", "newcomer", "Propagated"),
        tail(&op)
    );
    let writes = writes_once_settled(&emulator, &admin).await;
    let described: Vec<String> = writes
        .iter()
        .map(|r| {
            format!(
                "{} {}{}",
                r.method,
                r.resource.as_deref().unwrap_or_default(),
                r.subresource
                    .as_deref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    eprintln!(
        "one new ApiKey next to {KEYS}: {} API writes ({described:?}); its key was readable, and accepted by every gateway, {readable:?} after it was applied",
        writes.len(),
    );
    assert!(
        writes.len() <= 10,
        "adding one ApiKey costs at most 10 writes: {described:?}"
    );

    // The usage refresher mirrors the three answered requests first (a write of its
    // own, every --usage-interval).
    assert!(
        emulator
            .wait_for(Duration::from_secs(90), |e| e
                .get(TG, "apikeys", "default", "newcomer")
                .is_some_and(|k| k["status"]["usage"]["requests"] == GATEWAYS))
            .await,
        "{}",
        tail(&op)
    );

    // A Redis blip (the server stopped, then resumed) while reconciles run: nothing
    // written.
    emulator.reset_log();
    let warned = |p: &Proc| {
        p.logs()
            .matches("propagation statuses keep their last value")
            .count()
    };
    let before = warned(&op);
    redis.freeze(true);
    let noticed = emulator
        .wait_for(Duration::from_secs(60), |_| warned(&op) > before)
        .await;
    redis.freeze(false);
    assert!(
        noticed,
        "a reconcile ran while Redis was stopped:\n{}",
        tail(&op)
    );
    let blip_writes = writes_once_settled(&emulator, &admin).await;
    eprintln!(
        "a Redis blip next to {} ApiKeys: {} API writes",
        KEYS + 1,
        blip_writes.len()
    );
    assert!(
        blip_writes.is_empty(),
        "a Redis blip writes nothing: {blip_writes:?}"
    );
    assert!(everything_served(&emulator));
    assert_nothing_refused(&emulator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_the_operator_revokes_keys_reports_usage_and_propagation() {
    let redis = Redis::start();
    let emulator = Emulator::start();
    // As the chart's ServiceAccount, within the chart's RBAC rules.
    enforce_chart_rbac(&emulator, json!({"watchNamespaces": ["default"]}));
    emulator
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n")
        .unwrap();
    emulator.apply_yaml(&examples()).unwrap();
    let redis_url = redis.url();
    let op = operator(
        &emulator,
        "op-redis",
        &[
            "--leader-election",
            "false",
            "--redis-url",
            &redis_url,
            "--usage-interval",
            "300ms",
        ],
    );
    assert!(
        emulator
            .wait_for(Duration::from_secs(30), |e| ready(
                e,
                "apikeys",
                "local-dev"
            )
            .is_some())
            .await,
        "{}",
        op.logs()
    );
    let key = key_of(&emulator, "local-dev-key").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let projection = Projection::start(&emulator, "tollgate", CONFIG_SELECTOR, dir.path()).unwrap();
    let gateway = gateway_on(dir.path(), Some(&redis_url));
    let gw = gateway.addr("listening");
    assert!(
        eventually_status(&gw, &key, 200, Duration::from_secs(10))
            .await
            .is_some()
    );
    for _ in 0..2 {
        assert_eq!(chat(&gw, &key).await, 200);
    }

    // Propagation: the gateway reports the configuration it serves.
    let propagated = |e: &Emulator| {
        e.get(TG, "routepolicies", "default", "demo").and_then(|r| {
            r["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Propagated")
                .cloned()
        })
    };
    assert!(
        emulator
            .wait_for(Duration::from_secs(20), |e| propagated(e)
                .is_some_and(|c| c["status"] == "True"))
            .await,
        "Propagated turns True: {:?}\n{}",
        propagated(&emulator),
        op.logs()
    );
    let message = propagated(&emulator).unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.starts_with("every live gateway (1) serves it, since configuration"),
        "{message}"
    );
    let record = propagation_record(&emulator).unwrap();
    assert_eq!(
        (&record["state"], &record["gateways"]),
        (&json!("Serving"), &json!(1)),
        "{record}"
    );

    // Usage: the three answered requests, mirrored into the ApiKey's status.
    let usage = |e: &Emulator| {
        e.get(TG, "apikeys", "default", "local-dev")
            .map(|k| k["status"]["usage"].clone())
    };
    assert!(
        emulator
            .wait_for(Duration::from_secs(10), |e| usage(e)
                .is_some_and(|u| u["requests"] == 3))
            .await,
        "usage reaches the status: {:?}",
        usage(&emulator)
    );
    let u = usage(&emulator).unwrap();
    assert!(u["outputTokens"].as_u64().unwrap() > 0);
    assert!(u["spend"].as_str().unwrap().ends_with(" USD"), "{u}");

    // Revocation: with the mounted files frozen (no projection), disabling the key still
    // reaches the gateway at once, through Redis.
    drop(projection);
    let started = Instant::now();
    emulator
        .patch_merge(
            TG,
            "apikeys",
            "default",
            "local-dev",
            json!({"spec": {"disabled": true}}),
        )
        .unwrap();
    let took = eventually_status(&gw, &key, 401, Duration::from_secs(5)).await;
    let took = took.unwrap_or_else(|| panic!("revoked through Redis:\n{}", op.logs()));
    eprintln!(
        "revocation published by the operator reached the gateway {took:?} after the change ({:?} since the edit)",
        started.elapsed()
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_nothing_refused(&emulator);
}

/// A minimal OTLP/HTTP receiver: span names and attributes (as text) of every export.
async fn otlp_receiver() -> (
    String,
    Arc<Mutex<Vec<(String, BTreeMap<String, String>, BTreeMap<String, String>)>>>,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    type Spans = Arc<Mutex<Vec<(String, BTreeMap<String, String>, BTreeMap<String, String>)>>>;
    let spans: Spans = Arc::new(Mutex::new(Vec::new()));
    let sink = spans.clone();
    let text =
        |kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]| -> BTreeMap<String, String> {
            kvs.iter()
                .map(|kv| {
                    let v = kv
                        .value
                        .as_ref()
                        .and_then(|v| v.value.as_ref())
                        .map(|v| format!("{v:?}"))
                        .unwrap_or_default();
                    (kv.key.clone(), v)
                })
                .collect()
        };
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = sink.lock().unwrap();
                for rs in request.resource_spans {
                    let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push((s.name.clone(), text(&s.attributes), resource.clone()));
                        }
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_are_traced_over_otlp() {
    let (endpoint, spans) = otlp_receiver().await;
    let emulator = Emulator::start();
    emulator
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n")
        .unwrap();
    emulator.apply_yaml(&examples()).unwrap();
    let (op, _) = start_operator(
        &emulator,
        "op-traced",
        &["--leader-election", "false"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        let got = spans.lock().unwrap().clone();
        if let Some(s) = got.iter().find(|(name, attrs, _)| {
            name == "reconcile"
                && attrs
                    .get("tollgate.config_writes")
                    .is_some_and(|v| v != "IntValue(0)")
        }) {
            break Some(s.clone());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (_, attrs, resource) = found.unwrap_or_else(|| {
        panic!(
            "a reconcile span: {:?}\n{}",
            spans.lock().unwrap(),
            op.logs()
        )
    });
    assert_eq!(
        resource["service.name"],
        "StringValue(\"tollgate-operator\")"
    );
    assert_eq!(attrs["tollgate.api_keys"], "IntValue(3)");
    assert!(attrs["tollgate.config_hash"].starts_with("StringValue("));
    assert!(attrs["tollgate.key_writes"] != "IntValue(0)", "{attrs:?}");
}

/// The ApiKey `name`'s Ready condition reason, if it has one.
fn ready_reason(e: &Emulator, name: &str) -> Option<String> {
    ready(e, "apikeys", name).and_then(|c| c["reason"].as_str().map(str::to_owned))
}

/// Polls (every 20 ms, up to `within`) until the key Secret `secret` holds a key other
/// than `old`, noting the ApiKey `name`'s Ready reasons seen meanwhile.
async fn readable_key(
    e: &Emulator,
    secret: &str,
    name: &str,
    old: Option<&str>,
    within: Duration,
) -> (Option<String>, BTreeMap<String, usize>) {
    let deadline = Instant::now() + within;
    let mut reasons = BTreeMap::new();
    while Instant::now() < deadline {
        if let Some(reason) = ready_reason(e, name) {
            *reasons.entry(reason).or_insert(0) += 1;
        }
        if let Some(key) = key_of(e, secret).filter(|k| Some(k.as_str()) != old) {
            return (Some(key), reasons);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (None, reasons)
}

/// Applies a new ApiKey `name` and waits (up to `within`) for its key to be readable;
/// returns the key, the Ready reasons seen meanwhile and how long it took.
async fn apply_new_key(
    e: &Emulator,
    name: &str,
    within: Duration,
    logs: impl Fn() -> String,
) -> (String, BTreeMap<String, usize>, Duration) {
    let applied = Instant::now();
    e.apply_yaml(&format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {name}}}\nspec: {{owner: team-{name}}}\n"
    ))
    .unwrap();
    let (key, reasons) = readable_key(e, &format!("{name}-key"), name, None, within).await;
    let took = applied.elapsed();
    let key = key.unwrap_or_else(|| panic!("the key of {name} is written\n{}", logs()));
    (key, reasons, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_or_rotated_key_is_readable_only_once_every_gateway_accepts_it() {
    const WAIT: &str = "30s";
    let redis = Redis::start();
    let redis_url = redis.url();
    let emulator = Emulator::start();
    enforce_chart_rbac(&emulator, json!({"watchNamespaces": ["default"]}));
    emulator
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n")
        .unwrap();
    emulator
        .apply_yaml(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock}\nspec: {type: mock, models: [{name: demo-chat}]}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: demo}\nspec: {models: [demo-chat], targets: [{provider: mock}]}\n",
        )
        .unwrap();
    let (op, admin) = start_operator(
        &emulator,
        "op-publish",
        &[
            "--leader-election",
            "false",
            "--redis-url",
            &redis_url,
            "--key-publish-wait",
            WAIT,
        ],
        &[],
    );
    // Two gateways, each on its own kubelet whose copies of the generated objects catch
    // up 1–4 s after each change, independently.
    let mut fleet = fleet(
        &emulator,
        2,
        &redis_url,
        (Duration::from_secs(1), Duration::from_secs(4)),
        Duration::from_millis(500),
        11,
    );
    let addrs = fleet.addrs.clone();
    assert!(
        emulator
            .wait_for(Duration::from_secs(60), |e| propagation_record(e)
                .is_some_and(|r| r["state"] == "Serving" && r["gateways"] == 2))
            .await,
        "both gateways report serving: {:?}\n{}",
        propagation_record(&emulator),
        op.logs()
    );

    // A new ApiKey: its Secret appears only once both gateways accept its key, so the
    // very first request made with it, through either, succeeds.
    let (key, reasons, readable_after) =
        apply_new_key(&emulator, "fresh", Duration::from_secs(60), || op.logs()).await;
    for gw in &addrs {
        assert_eq!(
            chat(gw, &key).await,
            200,
            "gateway {gw} accepts the key as soon as it is readable ({readable_after:?} after the apply)"
        );
    }
    assert!(
        reasons.contains_key("KeyPending"),
        "the ApiKey says why its Secret is not there yet: {reasons:?}"
    );
    assert!(
        emulator
            .wait_for(Duration::from_secs(30), |e| served_everywhere(e, "fresh"))
            .await,
        "{:?}",
        ready(&emulator, "apikeys", "fresh")
    );
    eprintln!("a new key was readable {readable_after:?} after its ApiKey was applied");

    // A rotation with a grace period: the new key is readable only once both gateways
    // accept it, and the old one keeps working.
    emulator
        .apply_yaml("apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: fresh}\nspec: {owner: team-a, rotation: {generation: 1, gracePeriod: 1h}}\n")
        .unwrap();
    let (rotated, _) = readable_key(
        &emulator,
        "fresh-key",
        "fresh",
        Some(&key),
        Duration::from_secs(60),
    )
    .await;
    let rotated = rotated.unwrap_or_else(|| panic!("the rotated key is written\n{}", op.logs()));
    for gw in &addrs {
        assert_eq!(
            chat(gw, &rotated).await,
            200,
            "{gw} accepts the rotated key"
        );
        assert_eq!(chat(gw, &key).await, 200, "{gw} still accepts the old key");
    }
    let published = |after: &'static str| {
        let admin = admin.clone();
        async move {
            common::metric(
                &admin,
                &format!("tollgate_operator_keys_published_total{{after=\"{after}\"}}"),
            )
            .await
        }
    };
    assert_eq!(published("served").await, 2);
    assert_eq!(published("waited").await, 0);

    // A gateway whose kubelet stops updating its files (it still reports): the key is
    // written after --key-publish-wait all the same, and the metric says so.
    fleet.projections[1] = None;
    let (late, reasons, took) =
        apply_new_key(&emulator, "late", Duration::from_secs(120), || op.logs()).await;
    assert!(
        took >= Duration::from_secs(29),
        "held for the whole wait: {took:?}"
    );
    assert!(reasons.contains_key("KeyPending"), "{reasons:?}");
    assert_eq!(chat(&addrs[0], &late).await, 200);
    assert_eq!(
        chat(&addrs[1], &late).await,
        401,
        "the stuck gateway does not know it"
    );
    assert_eq!(published("waited").await, 1);
    assert!(
        op.logs().contains("--key-publish-wait ran out"),
        "{}",
        op.logs()
    );
    assert_nothing_refused(&emulator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_route_policies_are_sharded_into_config_maps_the_gateway_mounts() {
    const ROUTES: usize = 2500;
    let emulator = Emulator::start();
    // As the chart's ServiceAccount: its RBAC names the routing shards it may write.
    enforce_chart_rbac(&emulator, json!({"watchNamespaces": ["default"]}));
    emulator
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n")
        .unwrap();
    let mut yaml = String::from(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock}\nspec: {type: mock, models: [{name: demo-chat}]}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: router}\nspec: {owner: team-router}\n",
    );
    for i in 0..ROUTES {
        yaml.push_str(&format!(
            "---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: route-{i:04}}}\nspec: {{models: [team-{i:04}-chat], targets: [{{provider: mock, model: demo-chat}}]}}\n"
        ));
    }
    emulator.apply_yaml(&yaml).unwrap();
    let op = operator(&emulator, "op-routes", &["--leader-election", "false"]);
    let shards = |e: &Emulator| {
        e.list_selected("v1", "configmaps", "tollgate", CONFIG_SELECTOR)
            .unwrap()
            .iter()
            .filter(|cm| {
                cm["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("tollgate-gateway-routing-")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let complete = |e: &Emulator| {
        common::served(e)
            .and_then(Result::ok)
            .is_some_and(|c| c.config.routing.routes.len() == ROUTES)
    };
    while !complete(&emulator) {
        assert!(Instant::now() < deadline, "{}", op.logs());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let written = shards(&emulator);
    eprintln!("{ROUTES} RoutePolicies: routing in {written} shard ConfigMaps");
    assert!(
        (2..=4).contains(&written),
        "{written} routing shard ConfigMaps"
    );
    let cm = emulator
        .get("v1", "configmaps", "tollgate", "tollgate-gateway-config")
        .unwrap();
    assert!(
        cm["data"].get("routing.json").is_none(),
        "the routing lives in its shards"
    );

    // A gateway mounting them (as the chart's projected volume does) serves every route.
    let dir = tempfile::tempdir().unwrap();
    let _projection =
        Projection::start(&emulator, "tollgate", CONFIG_SELECTOR, dir.path()).unwrap();
    let gateway = gateway_on(dir.path(), None);
    let gw = gateway.addr("listening");
    let key = key_of(&emulator, "router-key").unwrap();
    let ask = |model: String| {
        let (gw, key) = (gw.clone(), key.clone());
        async move { chat_with(&gw, &key, &model).await }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask("team-2499-chat".into()).await != 200 {
        assert!(Instant::now() < deadline, "{}", gateway.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in [0, 777, 1500] {
        assert_eq!(ask(format!("team-{i:04}-chat")).await, 200, "route {i}");
    }

    // Most RoutePolicies deleted: the routing fits in one part again, and the shard
    // ConfigMaps no longer needed are deleted.
    for i in 100..ROUTES {
        emulator
            .delete(TG, "routepolicies", "default", &format!("route-{i:04}"))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while shards(&emulator) > 0
        || common::served(&emulator)
            .and_then(Result::ok)
            .is_none_or(|c| c.config.routing.routes.len() != 100)
    {
        assert!(Instant::now() < deadline, "{}", op.logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask("team-2499-chat".into()).await != 404 {
        assert!(Instant::now() < deadline, "{}", gateway.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ask("team-0042-chat".into()).await, 200);
    assert_nothing_refused(&emulator);
}
