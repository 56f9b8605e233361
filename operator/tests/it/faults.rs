//! Operator faults: the real operator binary against the emulated Kubernetes API while
//! the API server fails (500), conflicts (409) or times out on each kind of write the
//! operator makes; while a Provider's credential Secret is deleted and restored; while a
//! RoutePolicy names a Provider that does not exist yet; next to invalid objects; and
//! while the leader loses its lease in the middle of a reconcile.
//!
//! Every test runs on loopback with short timings (debounce 100 ms, lease 2 s); the
//! figures they print (`--nocapture`) are the ones quoted in docs.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use tollgate_api::{
    compile::{DEFAULT_NAMESPACE, Resources, SecretStore, compile},
    parts,
    v1alpha1::{ApiKey, Provider, RoutePolicy},
};
use tollgate_kube_emulator::{Emulator, RequestFilter, RequestRecord};

use crate::common;

use common::{CONFIG_SELECTOR, Proc, TG, condition, decode, lease_holder, served, start_operator};

/// Selects the key Secrets the operator issues for ApiKeys.
const KEY_SELECTOR: &str = "app.kubernetes.io/managed-by=tollgate-operator,tollgate.dev/api-key";
/// The generated manifest (the ConfigMap gateways load first).
const CONFIG_MAP: &str = "tollgate-gateway-config";

// === Processes ===

/// The operator binary (see [`start_operator`]), its logs collected; killed on drop.
struct Operator {
    process: Proc,
    identity: String,
    admin: String,
}

impl Operator {
    /// Starts `tollgate-operator run` against `emulator` with short timings (lease 2 s).
    fn start(emulator: &Emulator, identity: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--lease-duration",
            "2s",
            "--lease-renew-deadline",
            "1500ms",
            "--lease-retry",
            "200ms",
        ];
        args.extend_from_slice(extra);
        let (process, admin) = start_operator(emulator, identity, &args, &[]);
        Self {
            process,
            identity: identity.to_owned(),
            admin,
        }
    }

    /// Everything the operator has logged so far.
    fn logs(&self) -> String {
        self.process.logs()
    }

    /// Whether the process is still running (no crash, no exit).
    fn alive(&mut self) -> bool {
        matches!(self.process.child.try_wait(), Ok(None))
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.process.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal}");
    }

    /// `tollgate_operator_reconciles_total{result=…}` from `/metrics`.
    async fn reconciles(&self, result: &str) -> u64 {
        self.counter(&format!(
            "tollgate_operator_reconciles_total{{result=\"{result}\"}}"
        ))
        .await
    }

    /// One series of `/metrics` (0 when absent).
    async fn counter(&self, series: &str) -> u64 {
        common::metric(&self.admin, series).await
    }

    /// Writes this replica made (by its User-Agent), leases excluded.
    fn writes(&self, emulator: &Emulator) -> Vec<RequestRecord> {
        emulator
            .requests_matching(&RequestFilter::writes().user_agent(&format!("({})", self.identity)))
            .into_iter()
            .filter(|r| r.resource.as_deref() != Some("leases"))
            .collect()
    }
}

// === The world ===

/// Two Providers (one with a credential Secret), a RoutePolicy for each, an ApiKey
/// without a key yet, an ApiKey whose key is due for rotation, and a key shard Secret
/// left over from a larger configuration: the first reconcile makes every kind of write.
fn world() -> Emulator {
    let emulator = Emulator::start();
    emulator
        .apply_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {name: openai-credentials, namespace: default, labels: {tollgate.dev/credential: 'true'}}\nstringData: {apiKey: sk-test-openai-0001}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: mock, namespace: default}\nspec: {type: mock, models: [{name: demo-chat}]}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: openai, namespace: default}\nspec: {type: openai, credentials: {secretRef: {name: openai-credentials, key: apiKey}}, models: [{name: gpt-4o}]}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: demo, namespace: default}\nspec: {models: [demo-chat], targets: [{provider: mock}]}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: chat, namespace: default}\nspec: {models: [gpt-4o], targets: [{provider: openai}]}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: alpha, namespace: default}\nspec: {owner: team-a, allowedModels: [\"demo-*\"]}\n---\n\
             apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: beta, namespace: default}\nspec: {owner: team-b, rotation: {generation: 1, gracePeriod: 1h}}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata:\n  name: tollgate-gateway-keys-07\n  namespace: tollgate\n  labels: {app.kubernetes.io/managed-by: tollgate-operator, tollgate.dev/config-part: keys, tollgate.dev/config-prefix: tollgate-gateway}\n",
        )
        .unwrap();
    let uid = emulator.get(TG, "apikeys", "default", "beta").unwrap()["metadata"]["uid"].clone();
    // beta's key, issued before spec.rotation.generation became 1.
    emulator
        .apply_object(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": "beta-key", "namespace": "default",
                "labels": {"app.kubernetes.io/managed-by": "tollgate-operator", "tollgate.dev/api-key": "beta"},
                "annotations": {"tollgate.dev/key-generation": "0"},
                "ownerReferences": [{"apiVersion": TG, "kind": "ApiKey", "name": "beta", "uid": uid, "controller": true}],
            },
            "stringData": {"apiKey": "tg_beforeRotationKeyValue0000000000000000"},
        }))
        .unwrap();
    emulator
}

/// The objects of [`world`] (plural, name), every one of them valid.
const WORLD_OBJECTS: [(&str, &str); 6] = [
    ("providers", "mock"),
    ("providers", "openai"),
    ("routepolicies", "demo"),
    ("routepolicies", "chat"),
    ("apikeys", "alpha"),
    ("apikeys", "beta"),
];

/// Every Tollgate object of kind `plural` in `default`, typed.
fn typed<T: serde::de::DeserializeOwned>(e: &Emulator, plural: &str) -> Vec<T> {
    e.list(TG, plural, "default")
        .into_iter()
        .map(|o| serde_json::from_value(o).unwrap())
        .collect()
}

/// Every Secret in `default`, typed.
fn secrets(e: &Emulator) -> Vec<Secret> {
    e.list("v1", "secrets", "default")
        .into_iter()
        .map(|o| serde_json::from_value(o).unwrap())
        .collect()
}

/// The configuration hash a compile of what is in the cluster now gives.
fn expected_hash(e: &Emulator) -> String {
    let resources = Resources {
        providers: typed::<Provider>(e, "providers"),
        route_policies: typed::<RoutePolicy>(e, "routepolicies"),
        api_keys: typed::<ApiKey>(e, "apikeys"),
    };
    let secrets = secrets(e);
    let store = SecretStore::new(&secrets, DEFAULT_NAMESPACE);
    let out = compile(&resources, &store, jiff::Timestamp::now());
    parts::split(&out.config).unwrap().config_hash
}

/// The configuration hash the generated manifest announces, if there is one.
fn live_hash(e: &Emulator) -> Option<String> {
    e.get("v1", "configmaps", "tollgate", CONFIG_MAP)?["metadata"]["annotations"]
        ["tollgate.dev/config-hash"]
        .as_str()
        .map(str::to_owned)
}

/// Key hashes a gateway may legitimately accept: each ApiKey's current key and its
/// rotated-out key during the grace period (both in its Secret).
fn issued_hashes(e: &Emulator) -> BTreeSet<String> {
    let mut hashes = BTreeSet::new();
    for s in e
        .list_selected("v1", "secrets", "default", KEY_SELECTOR)
        .unwrap()
    {
        let key = decode(&s["data"]["apiKey"]);
        hashes.insert(parts::sha256_hex(
            String::from_utf8_lossy(&key).trim().as_bytes(),
        ));
        if s["data"]["previousKeySha256"].is_string() {
            let previous = decode(&s["data"]["previousKeySha256"]);
            hashes.insert(String::from_utf8_lossy(&previous).trim().to_owned());
        }
    }
    hashes
}

/// Why the generated objects are not a consistent configuration right now, if they are not.
fn inconsistency(e: &Emulator) -> Option<String> {
    let config = match served(e)? {
        Ok(c) => c.config,
        Err(err) => return Some(format!("the generated objects do not assemble: {err}")),
    };
    let issued = issued_hashes(e);
    config
        .keys
        .keys
        .iter()
        .find(|k| !issued.contains(&k.sha256))
        .map(|k| {
            format!(
                "the configuration accepts a key of {} that no Secret holds",
                k.api_key
            )
        })
}

/// Watches the generated objects change. With fixed object names, a configuration
/// change rewrites parts (Secrets) before the manifest (ConfigMap) that names them, so in
/// between the old manifest sits next to a new part (named by its content, so the file
/// the old manifest lists is missing): a torn set, which gateways recognise as an update
/// still arriving and skip (they keep what they serve). What must never happen is a
/// manifest written before its parts, or one naming keys nobody was issued.
#[derive(Debug, Default)]
struct Monitor {
    manifest_version: Option<String>,
    torn_since: Option<Instant>,
    /// Longest time the set was torn.
    torn_longest: Duration,
    violation: Option<String>,
}

impl Monitor {
    /// Looks at the generated objects once; records a torn set or a violation.
    fn check(&mut self, e: &Emulator) {
        let version = e
            .get("v1", "configmaps", "tollgate", CONFIG_MAP)
            .map(|cm| cm["metadata"]["resourceVersion"].to_string());
        let new_manifest = version != self.manifest_version;
        self.manifest_version = version;
        match inconsistency(e) {
            None => {
                if let Some(since) = self.torn_since.take() {
                    self.torn_longest = self.torn_longest.max(since.elapsed());
                }
            }
            Some(why) if new_manifest || !why.starts_with("the generated objects") => {
                self.violation.get_or_insert(why);
            }
            Some(_) => {
                self.torn_since.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// What a user can observe, with the random parts (generated keys, grace ends) taken
/// out: generated objects, served routing and credentials, served keys per ApiKey, key
/// Secrets, and every object's conditions.
fn state(e: &Emulator) -> Value {
    let generated: Vec<String> = ["configmaps", "secrets"]
        .iter()
        .flat_map(|plural| {
            e.list_selected("v1", plural, "tollgate", CONFIG_SELECTOR)
                .unwrap()
                .into_iter()
                .map(move |o| format!("{plural}/{}", o["metadata"]["name"].as_str().unwrap()))
        })
        .collect();
    let config = served(e).and_then(Result::ok).map(|c| c.config);
    let keys: Vec<Value> = config.as_ref().map_or_else(Vec::new, |c| {
        let mut keys: Vec<Value> = c
            .keys
            .keys
            .iter()
            .map(|k| {
                let mut v = serde_json::to_value(k).unwrap();
                v.as_object_mut().unwrap().remove("sha256");
                v.as_object_mut().unwrap().remove("id");
                // A rotated-out key's grace ends an hour after the rotation ran.
                let previous = v.as_object_mut().unwrap().remove("expiresAt").is_some();
                v["inGrace"] = json!(previous);
                v
            })
            .collect();
        keys.sort_by_key(|v| v.to_string());
        keys
    });
    let key_secrets: BTreeMap<String, Value> = e
        .list_selected("v1", "secrets", "default", KEY_SELECTOR)
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["metadata"]["name"].as_str().unwrap().to_owned(),
                s["metadata"]["annotations"]["tollgate.dev/key-generation"].clone(),
            )
        })
        .collect();
    let mut statuses = BTreeMap::new();
    for plural in ["providers", "routepolicies", "apikeys"] {
        for o in e.list(TG, plural, "default") {
            let s = &o["status"];
            let conditions: Vec<Value> = s["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| json!([c["type"], c["status"], c["reason"]]))
                .collect();
            statuses.insert(
                format!("{plural}/{}", o["metadata"]["name"].as_str().unwrap()),
                json!({
                    "conditions": conditions,
                    "observed": s["observedGeneration"] == o["metadata"]["generation"],
                    "keyPrefix": s["keyPrefix"].is_string(),
                    "secretName": s["secretName"],
                    "previousKey": s["previousKey"].is_object(),
                }),
            );
        }
    }
    json!({
        "generated": generated,
        "routing": config.as_ref().map(|c| serde_json::to_value(&c.routing).unwrap()),
        "credentials": config.as_ref().map(|c| serde_json::to_value(&c.credentials).unwrap()),
        "keys": keys,
        "keySecrets": key_secrets,
        "statuses": statuses,
    })
}

/// Whether the operator is done: the served configuration is what a compile of the
/// cluster gives, and every object's status describes its current generation.
fn settled(e: &Emulator) -> bool {
    live_hash(e).is_some_and(|h| h == expected_hash(e))
        && e.get("v1", "secrets", "tollgate", "tollgate-gateway-keys-07")
            .is_none()
        && ["providers", "routepolicies", "apikeys"]
            .iter()
            .all(|plural| {
                e.list(TG, plural, "default").iter().all(|o| {
                    o["status"]["observedGeneration"] == o["metadata"]["generation"]
                        && o["status"]["conditions"]
                            .as_array()
                            .is_some_and(|c| !c.is_empty())
                })
            })
}

/// Whether the Ready condition of `plural`/`name` has this `status`.
fn ready_is(e: &Emulator, plural: &str, name: &str, status: &str) -> bool {
    condition(e, plural, name, "Ready").is_some_and(|c| c["status"] == status)
}

/// Events recorded about `name` with `reason`.
fn events(e: &Emulator, name: &str, reason: &str) -> Vec<Value> {
    e.list("events.k8s.io/v1", "events", "default")
        .into_iter()
        .filter(|ev| ev["regarding"]["name"] == name && ev["reason"] == reason)
        .collect()
}

/// Waits until `done` holds, checking at every change that the generated objects never
/// form a wrong configuration (see [`Monitor`]). Returns how long it took and the longest
/// torn window, or what went wrong.
async fn converge(
    e: &Emulator,
    within: Duration,
    mut done: impl FnMut(&Emulator) -> bool,
) -> Result<(Duration, Duration), String> {
    let started = Instant::now();
    let mut monitor = Monitor::default();
    let ok = e
        .wait_for(within, |e| {
            monitor.check(e);
            monitor.violation.is_some() || (monitor.torn_since.is_none() && done(e))
        })
        .await;
    match (monitor.violation, ok) {
        (Some(why), _) => Err(why),
        (None, true) => Ok((started.elapsed(), monitor.torn_longest)),
        (None, false) => Err(format!("not done within {within:?}")),
    }
}

/// Like [`converge`], and panics with what went wrong and the logs of `ops`.
async fn converged(
    e: &Emulator,
    ops: &[&Operator],
    within: Duration,
    done: impl FnMut(&Emulator) -> bool,
) -> (Duration, Duration) {
    converge(e, within, done).await.unwrap_or_else(|why| {
        let logs: String = ops
            .iter()
            .map(|op| format!("\n--- {} ---\n{}", op.identity, op.logs()))
            .collect();
        panic!("{why}{logs}")
    })
}

/// Asserts that the condition `c` has this `status` and `reason`, and a message that
/// mentions `message`.
fn assert_condition(c: &Value, status: &str, reason: &str, message: &str) {
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some(status), Some(reason)),
        "{c}"
    );
    assert!(c["message"].as_str().unwrap().contains(message), "{c}");
}

/// Asserts that each of `objects` (plural, name) is Ready.
fn assert_ready(e: &Emulator, objects: &[(&str, &str)]) {
    for (plural, name) in objects {
        assert!(ready_is(e, plural, name, "True"), "{plural}/{name}");
    }
}

// === Every write fails ===

/// How the API server misbehaves.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Answers with this status code.
    Status(u16),
    /// Holds the request this long, changes nothing, answers 504 Timeout.
    TimeOut(Duration),
    /// Never answers (the operator runs with `--reconcile-timeout 2s`).
    Hang,
}

/// One kind of write the operator makes, selected in the request log.
struct WriteKind {
    name: &'static str,
    filter: fn() -> RequestFilter,
    /// A failure of this write fails the reconcile (else it is best-effort or the
    /// elector's, and the reconcile goes on).
    fails_reconcile: bool,
    /// The elector's write: a failure may cost the leadership (and so the reconcile in
    /// progress) until the next renewal.
    lease: bool,
    /// What the operator's log says when it fails.
    reported: &'static str,
}

/// Every kind of write the first reconcile of [`world`] makes.
fn write_kinds() -> Vec<WriteKind> {
    vec![
        WriteKind {
            name: "key Secret create",
            filter: || {
                RequestFilter::writes()
                    .method("POST")
                    .resource("secrets")
                    .namespace("default")
            },
            fails_reconcile: true,
            lease: false,
            reported: "creating Secret default/alpha-key",
        },
        WriteKind {
            name: "rotated key Secret replace",
            filter: || {
                RequestFilter::writes()
                    .method("PUT")
                    .resource("secrets")
                    .namespace("default")
            },
            fails_reconcile: true,
            lease: false,
            reported: "writing the rotated key into Secret default/beta-key",
        },
        WriteKind {
            name: "credentials Secret apply",
            filter: || {
                RequestFilter::writes()
                    .method("PATCH")
                    .resource("secrets")
                    .name("tollgate-gateway-credentials")
            },
            fails_reconcile: true,
            lease: false,
            reported: "applying Secret tollgate/tollgate-gateway-credentials",
        },
        WriteKind {
            name: "key shard Secret apply",
            filter: || {
                RequestFilter::writes()
                    .method("PATCH")
                    .resource("secrets")
                    .name("tollgate-gateway-keys-00")
            },
            fails_reconcile: true,
            lease: false,
            reported: "applying Secret tollgate/tollgate-gateway-keys-00",
        },
        WriteKind {
            name: "ConfigMap apply",
            filter: || {
                RequestFilter::writes()
                    .method("PATCH")
                    .resource("configmaps")
            },
            fails_reconcile: true,
            lease: false,
            reported: "applying ConfigMap tollgate/tollgate-gateway-config",
        },
        WriteKind {
            name: "stale shard delete",
            filter: || RequestFilter::writes().method("DELETE").resource("secrets"),
            fails_reconcile: true,
            lease: false,
            reported: "deleting Secret tollgate/tollgate-gateway-keys-07",
        },
        WriteKind {
            name: "Provider status",
            filter: || {
                RequestFilter::writes()
                    .resource("providers")
                    .name("openai")
                    .subresource("status")
            },
            fails_reconcile: true,
            lease: false,
            reported: "updating the status of Provider default/openai",
        },
        WriteKind {
            name: "RoutePolicy status",
            filter: || {
                RequestFilter::writes()
                    .resource("routepolicies")
                    .name("demo")
                    .subresource("status")
            },
            fails_reconcile: true,
            lease: false,
            reported: "updating the status of RoutePolicy default/demo",
        },
        WriteKind {
            name: "ApiKey status",
            filter: || {
                RequestFilter::writes()
                    .resource("apikeys")
                    .name("alpha")
                    .subresource("status")
            },
            fails_reconcile: true,
            lease: false,
            reported: "updating the status of ApiKey default/alpha",
        },
        WriteKind {
            name: "Event",
            filter: || RequestFilter::writes().resource("events"),
            fails_reconcile: false,
            lease: false,
            reported: "could not record an Event",
        },
        WriteKind {
            name: "Lease create",
            filter: || RequestFilter::writes().method("POST").resource("leases"),
            fails_reconcile: false,
            lease: true,
            reported: "",
        },
        WriteKind {
            name: "Lease renewal",
            filter: || RequestFilter::writes().method("PUT").resource("leases"),
            fails_reconcile: false,
            lease: true,
            reported: "",
        },
    ]
}

/// The outcome of one fault-free run, the reference every faulty run must reach.
struct Reference {
    state: Value,
    took: Duration,
    writes: usize,
}

/// Runs the operator on [`world`] without faults and records what it converges to.
async fn reference() -> Reference {
    let e = world();
    let op = Operator::start(&e, "op-reference", &[]);
    let (took, _) = converge(&e, Duration::from_secs(20), settled)
        .await
        .unwrap_or_else(|why| panic!("fault-free run: {why}\n{}", op.logs()));
    // Let follow-up reconciles (triggered by its own writes) finish.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(settled(&e));
    let state = state(&e);
    assert_eq!(
        state["generated"],
        json!([
            "configmaps/tollgate-gateway-config",
            "secrets/tollgate-gateway-credentials",
            "secrets/tollgate-gateway-keys-00"
        ])
    );
    assert_eq!(
        state["keys"].as_array().unwrap().len(),
        3,
        "alpha, beta and beta's previous key"
    );
    assert_eq!(
        (
            events(&e, "alpha", "KeyIssued").len(),
            events(&e, "beta", "KeyRotated").len()
        ),
        (1, 1)
    );
    Reference {
        state,
        took,
        writes: op.writes(&e).len(),
    }
}

/// What one faulty run showed.
#[derive(Debug)]
struct Outcome {
    converged_in: Duration,
    torn: Duration,
    attempts: usize,
    gaps: Vec<Duration>,
    errors: u64,
    successes: u64,
    writes: usize,
}

/// Runs the operator on [`world`] with `fault` injected `n` times into `kind`, and
/// checks that it reaches `reference` without a hot loop, reporting every failure.
async fn faulty_run(
    kind: &WriteKind,
    fault: Fault,
    n: usize,
    reference: &Value,
) -> Result<Outcome, String> {
    let e = world();
    let filter = (kind.filter)();
    match fault {
        Fault::Status(code) => e.fail_next(n, code, filter.clone()),
        Fault::TimeOut(after) => e.time_out_next(n, after, filter.clone()),
        Fault::Hang => e.time_out_next(n, Duration::from_secs(3600), filter.clone()),
    }
    let identity = format!(
        "op-{}",
        kind.name
            .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
            .to_lowercase()
    );
    let started = Instant::now();
    let mut op = Operator::start(&e, &identity, &["--reconcile-timeout", "2s"]);
    let context = |op: &Operator, why: &str| format!("{why}\n--- operator log ---\n{}", op.logs());
    let (_, torn) = converge(&e, Duration::from_secs(40), |e| {
        settled(e) && state(e) == *reference
    })
    .await
    .map_err(|why| {
        context(
            &op,
            &format!("{why}\nstate: {:#}\nreference: {reference:#}", state(&e)),
        )
    })?;
    let converged_in = started.elapsed();
    // Stays converged (no late write undoes it) and the process stays up.
    tokio::time::sleep(Duration::from_millis(600)).await;
    if state(&e) != *reference || !settled(&e) {
        return Err(context(&op, "left the converged state"));
    }
    if !op.alive() {
        return Err(context(&op, "the operator exited"));
    }
    // A timed-out request is logged when it is answered: wait for every fault to be hit.
    let hit = |e: &Emulator| {
        e.requests_matching(&filter)
            .iter()
            .filter(|r| r.status >= 400)
            .count()
    };
    let want_hits = if kind.name == "Event" && matches!(fault, Fault::Status(_)) {
        n.min(2)
    } else {
        n
    };
    e.wait_for(Duration::from_secs(10), |e| hit(e) >= want_hits)
        .await;
    let mut matching: Vec<RequestRecord> = e.requests_matching(&filter);
    matching.sort_by_key(|r| r.received_at);
    let failed: Vec<&RequestRecord> = matching.iter().filter(|r| r.status >= 400).collect();
    // Every fault is hit (only two Events are ever sent).
    if failed.len() != want_hits {
        return Err(context(
            &op,
            &format!("{} of {n} injected faults were hit", failed.len()),
        ));
    }
    let attempts = matching
        .iter()
        .position(|r| r.status < 400)
        .map_or(matching.len(), |i| i + 1);
    let gaps: Vec<Duration> = matching[..attempts]
        .windows(2)
        .map(|w| w[1].received_at.duration_since(w[0].received_at))
        .collect();
    let errors = op.reconciles("error").await;
    let successes = op.reconciles("success").await;
    let logs = op.logs();
    // kube-rs itself retries 504 (up to 15 times, from 5 ms); an answer that never comes
    // fails the reconcile at --reconcile-timeout, whatever the write (Events included).
    let (want, reported) = match fault {
        Fault::Status(_) if kind.fails_reconcile => (Some(n as u64), kind.reported),
        Fault::Status(_) => (None, kind.reported),
        // The elector gives up on an attempt at the renew deadline: with kube-rs'
        // retries inside, that may cost the leadership (and a reconcile) for a moment.
        Fault::TimeOut(_) if kind.lease => (None, ""),
        Fault::TimeOut(_) => (Some(0), ""),
        Fault::Hang if kind.lease => (None, "did not answer in time"),
        Fault::Hang => (Some(n as u64), "did not finish within"),
    };
    match want {
        Some(want) if errors != want => {
            return Err(context(
                &op,
                &format!("{errors} failed reconciles, expected {want}"),
            ));
        }
        // A lost leadership stops the reconcile in progress; it runs again once renewed.
        None if kind.lease && errors > n as u64 => {
            return Err(context(
                &op,
                &format!("{errors} failed reconciles for {n} lease fault(s)"),
            ));
        }
        None if !kind.lease && errors != 0 => {
            return Err(context(
                &op,
                &format!("{errors} failed reconciles for a best-effort write"),
            ));
        }
        _ => {}
    }
    if errors > 0 && !logs.contains("reconcile failed") {
        return Err(context(&op, "a failed reconcile is not logged"));
    }
    // The elector gives up on a hung call at the renew deadline, after convergence.
    e.wait_for(Duration::from_secs(5), |_| op.logs().contains(reported))
        .await;
    let logs = op.logs();
    if !logs.contains(reported) {
        return Err(context(
            &op,
            &format!("the failure is not reported: no {reported:?}"),
        ));
    }
    // No hot loop: failed reconciles are retried with growing pauses, and the whole run
    // takes a handful of reconciles.
    if kind.fails_reconcile && matches!(fault, Fault::Status(_)) {
        if let Some(short) = gaps.iter().find(|g| **g < Duration::from_millis(90)) {
            return Err(context(&op, &format!("retried after only {short:?}")));
        }
        if n >= 3
            && gaps
                .last()
                .is_some_and(|g| *g < Duration::from_millis(1800))
        {
            return Err(context(
                &op,
                &format!("no backoff between retries: {gaps:?}"),
            ));
        }
    }
    if successes + errors > 6 + 2 * n as u64 {
        return Err(context(
            &op,
            &format!("{} reconciles for {n} fault(s)", successes + errors),
        ));
    }
    Ok(Outcome {
        converged_in,
        torn,
        attempts,
        gaps,
        errors,
        successes,
        writes: op.writes(&e).len(),
    })
}

/// Runs every kind of write with `fault` injected `n` times, concurrently (each case has
/// its own emulator and operator process), and reports every case that went wrong.
async fn every_write_kind(label: &str, fault: Fault, n: usize) {
    let reference = reference().await;
    eprintln!(
        "fault-free run: converged in {:?}, {} writes",
        reference.took, reference.writes
    );
    let kinds = write_kinds();
    let runs = kinds
        .iter()
        .map(|kind| faulty_run(kind, fault, n, &reference.state));
    let outcomes = futures_util::future::join_all(runs).await;
    let mut failures = Vec::new();
    for (kind, outcome) in kinds.iter().zip(outcomes) {
        match outcome {
            Ok(o) => eprintln!(
                "{label} on {}: converged in {:?} (fault-free {:?}); {} attempt(s), gaps {:?}; {} failed and {} good reconciles; {} writes (fault-free {}); torn set for {:?}",
                kind.name,
                o.converged_in,
                reference.took,
                o.attempts,
                o.gaps,
                o.errors,
                o.successes,
                o.writes,
                reference.writes,
                o.torn
            ),
            Err(why) => failures.push(format!("{label} on {}: {why}", kind.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_500_on_any_write_is_retried_to_the_fault_free_result() {
    every_write_kind("500 once", Fault::Status(500), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_409_conflict_on_any_write_is_retried_to_the_fault_free_result() {
    every_write_kind("409 once", Fault::Status(409), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_500s_on_any_write_are_retried_with_backoff_to_the_fault_free_result() {
    every_write_kind("500 three times", Fault::Status(500), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_on_any_write_are_retried_to_the_fault_free_result() {
    // Absorbed by kube-rs' own retry of 504: the reconcile does not even fail.
    every_write_kind(
        "timeout once",
        Fault::TimeOut(Duration::from_millis(700)),
        1,
    )
    .await;
    every_write_kind(
        "timeout four times",
        Fault::TimeOut(Duration::from_millis(300)),
        4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_never_gets_an_answer_is_abandoned_and_retried() {
    every_write_kind("hang", Fault::Hang, 1).await;
}

// === Referenced objects come and go ===

/// The configuration gateways load now; panics if there is none or it is torn.
fn config_of(e: &Emulator) -> tollgate_api::config::GatewayConfig {
    served(e)
        .expect("a configuration is written")
        .expect("the configuration is consistent")
        .config
}

/// Waits for the first reconcile and for the follow-ups its own writes cause.
async fn settle(e: &Emulator, op: &Operator) {
    converged(e, &[op], Duration::from_secs(20), settled).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(settled(e), "{}", op.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_credential_secret_takes_out_only_its_provider_until_it_is_restored() {
    let e = world();
    let mut op = Operator::start(&e, "op-secret", &["--leader-election", "false"]);
    settle(&e, &op).await;
    let before = config_of(&e);
    let hash_before = live_hash(&e).unwrap();
    assert!(before.credentials.providers.contains_key("default/openai"));

    e.delete("v1", "secrets", "default", "openai-credentials")
        .unwrap();
    let (took, torn) = converged(&e, &[&op], Duration::from_secs(10), |e| {
        ready_is(e, "providers", "openai", "False") && settled(e)
    })
    .await;
    let ready = condition(&e, "providers", "openai", "Ready").unwrap();
    let refs = condition(&e, "providers", "openai", "ResolvedRefs").unwrap();
    for c in [&ready, &refs] {
        assert_condition(
            c,
            "False",
            "SecretNotFound",
            "Secret default/openai-credentials not found",
        );
    }
    assert!(
        e.wait_for(Duration::from_secs(5), |e| events(
            e,
            "openai",
            "SecretNotFound"
        )
        .iter()
        .any(|ev| ev["type"] == "Warning"))
            .await,
        "a Warning Event says why: {:?}",
        e.list("events.k8s.io/v1", "events", "default")
    );
    // DESIGN.md: a dangling reference surfaces as a condition and the rest keeps
    // working. The Provider itself leaves the configuration (no credential to call it
    // with), and so does the RoutePolicy whose only target it was.
    let during = config_of(&e);
    assert!(!during.routing.providers.contains_key("default/openai"));
    assert!(!during.credentials.providers.contains_key("default/openai"));
    assert!(during.routing.routes.iter().all(|r| r.id != "default/chat"));
    assert!(ready_is(&e, "routepolicies", "chat", "False"));
    // Everything else is served exactly as before.
    assert_eq!(
        during.routing.providers["default/mock"],
        before.routing.providers["default/mock"]
    );
    assert_eq!(
        during
            .routing
            .routes
            .iter()
            .find(|r| r.id == "default/demo"),
        before
            .routing
            .routes
            .iter()
            .find(|r| r.id == "default/demo")
    );
    assert_eq!(during.keys, before.keys, "every key still works");
    assert_ready(
        &e,
        &[
            ("providers", "mock"),
            ("routepolicies", "demo"),
            ("apikeys", "alpha"),
            ("apikeys", "beta"),
        ],
    );

    e.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: openai-credentials, namespace: default, labels: {tollgate.dev/credential: 'true'}}\nstringData: {apiKey: sk-test-openai-0001}\n")
        .unwrap();
    let (restored, torn_restore) = converged(&e, &[&op], Duration::from_secs(10), |e| {
        ready_is(e, "providers", "openai", "True")
            && ready_is(e, "routepolicies", "chat", "True")
            && settled(e)
    })
    .await;
    assert_eq!(
        live_hash(&e).unwrap(),
        hash_before,
        "the restored Secret brings back exactly the configuration before"
    );
    assert!(op.alive());
    eprintln!(
        "credential Secret deleted: Provider False and configuration updated in {took:?} (parts ahead of the manifest for {torn:?}); restored: back to True and the previous configuration in {restored:?} (torn {torn_restore:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_policy_naming_a_missing_provider_says_so_and_works_once_it_exists() {
    let e = world();
    e.apply_yaml("apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: early, namespace: default}\nspec: {models: [later-chat], targets: [{provider: later}]}\n")
        .unwrap();
    let op = Operator::start(&e, "op-missing", &["--leader-election", "false"]);
    settle(&e, &op).await;
    let refs = condition(&e, "routepolicies", "early", "ResolvedRefs").unwrap();
    assert_condition(
        &refs,
        "False",
        "ProviderNotFound",
        "Provider default/later not found",
    );
    assert!(ready_is(&e, "routepolicies", "early", "False"));
    // Every valid object is served.
    let config = config_of(&e);
    let routes: Vec<&str> = config
        .routing
        .routes
        .iter()
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(routes, ["default/chat", "default/demo"]);
    assert_eq!(config.routing.providers.len(), 2);
    assert_eq!(config.keys.keys.len(), 3);
    assert_ready(&e, &WORLD_OBJECTS);

    e.apply_yaml("apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: later, namespace: default}\nspec: {type: mock, models: [{name: later-chat}]}\n")
        .unwrap();
    let (took, torn) = converged(&e, &[&op], Duration::from_secs(10), |e| {
        ready_is(e, "routepolicies", "early", "True") && settled(e)
    })
    .await;
    let config = config_of(&e);
    assert!(
        config
            .routing
            .routes
            .iter()
            .any(|r| r.id == "default/early")
    );
    assert_eq!(config.routing.routes.len(), 3);
    eprintln!(
        "the missing Provider created: RoutePolicy Ready and served in {took:?} (torn {torn:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_next_to_valid_ones_change_nothing_that_is_served() {
    let e = world();
    let op = Operator::start(&e, "op-invalid", &["--leader-election", "false"]);
    settle(&e, &op).await;
    let before = config_of(&e);
    let hash_before = live_hash(&e).unwrap();

    // Each passes the CRD schema (and its CEL rules) but not the compile.
    e.apply_yaml(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {name: leaky, namespace: default}\nspec: {type: openaiCompatible, baseUrl: \"https://user:secret@llm.internal/v1\", models: [{name: internal-chat}]}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: to-leaky, namespace: default}\nspec: {models: [internal-chat], targets: [{provider: leaky}]}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: takeover, namespace: default}\nspec: {models: [demo-chat], targets: [{provider: openai, model: gpt-4o}]}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: broken-glob, namespace: default}\nspec: {owner: team-c, allowedModels: [\"demo-[\"]}\n",
    )
    .unwrap();
    let invalid = [
        ("providers", "leaky", "InvalidSpec"),
        ("routepolicies", "to-leaky", "ProviderNotReady"),
        ("routepolicies", "takeover", "ModelConflict"),
        ("apikeys", "broken-glob", "InvalidModelPattern"),
    ];
    let (took, torn) = converged(&e, &[&op], Duration::from_secs(10), |e| {
        invalid
            .iter()
            .all(|(plural, name, _)| ready_is(e, plural, name, "False"))
            && settled(e)
    })
    .await;
    for (plural, name, reason) in invalid {
        let c = condition(&e, plural, name, "Ready").unwrap();
        assert_eq!(c["reason"], reason, "{plural}/{name}: {c}");
        assert!(!c["message"].as_str().unwrap().is_empty());
    }
    // The configuration is exactly the one before: every valid object, nothing else.
    assert_eq!(config_of(&e), before);
    assert_eq!(live_hash(&e).unwrap(), hash_before);
    assert_ready(&e, &WORLD_OBJECTS);
    eprintln!(
        "four invalid objects added: reported, served configuration unchanged, in {took:?} (torn {torn:?})"
    );
}

// === Leader loss ===

/// On [`world`]: a leader, op-a, that has settled it, and a standby, op-b, whose caches
/// are synced.
async fn leader_and_standby(e: &Emulator) -> (Operator, Operator) {
    let a = Operator::start(e, "op-a", &[]);
    settle(e, &a).await;
    let b = Operator::start(e, "op-b", &[]);
    assert!(
        e.wait_for(Duration::from_secs(10), |_| b
            .logs()
            .contains("caches synced"))
            .await
    );
    (a, b)
}

/// Makes op-a's next key Secret creation take `delay`: the reconcile that sends it is
/// still running that long.
fn slow_key_secret_creation(e: &Emulator, delay: Duration) {
    e.delay_next(
        1,
        delay,
        RequestFilter::writes()
            .method("POST")
            .resource("secrets")
            .user_agent("(op-a)"),
    );
}

/// Adds the ApiKey gamma: the change whose reconcile creates a key Secret.
fn add_gamma(e: &Emulator) {
    e.apply_yaml("apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: gamma, namespace: default}\nspec: {owner: team-g}\n")
        .unwrap();
}

/// Whether gamma is Ready and the operator is done.
fn gamma_settled(e: &Emulator) -> bool {
    ready_is(e, "apikeys", "gamma", "True") && settled(e)
}

/// The Lease writes of replica `who` that succeeded, oldest first.
fn lease_writes(e: &Emulator, who: &str) -> Vec<RequestRecord> {
    let mut w: Vec<RequestRecord> = e
        .requests_matching(
            &RequestFilter::writes()
                .resource("leases")
                .user_agent(&format!("({who})")),
        )
        .into_iter()
        .filter(|r| r.status < 400)
        .collect();
    w.sort_by_key(|r| r.received_at);
    w
}

/// Asserts that A, the former leader, wrote nothing after `takeover` (B's first Lease
/// write); returns how many writes it made since then, for the report.
fn assert_no_writes_since(a: &Operator, e: &Emulator, takeover: Instant) -> usize {
    let late: Vec<String> = a
        .writes(e)
        .iter()
        .filter(|r| r.received_at > takeover)
        .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
        .collect();
    assert!(
        late.is_empty(),
        "A wrote after B took the Lease: {late:?}\n{}",
        a.logs()
    );
    late.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_its_lease_mid_reconcile_stops_writing_and_the_new_leader_converges() {
    let e = world();
    let (a, b) = leader_and_standby(&e).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.writes(&e).len(), 0, "the standby does not write");

    // A can no longer renew its Lease, and its next key Secret creation takes 3.5 s:
    // it is in the middle of a reconcile when its Lease runs out.
    e.fail_next(
        1_000_000,
        500,
        RequestFilter::writes()
            .resource("leases")
            .user_agent("(op-a)"),
    );
    slow_key_secret_creation(&e, Duration::from_millis(3500));
    add_gamma(&e);
    let changed = Instant::now();
    let (took, torn) = converged(&e, &[&a, &b], Duration::from_secs(20), gamma_settled).await;
    // Leave A time to finish the reconcile it was in (its delayed write answers at 3.5 s).
    tokio::time::sleep(Duration::from_millis(4500).saturating_sub(changed.elapsed())).await;

    let takeover = lease_writes(&e, "op-b")
        .first()
        .expect("B took the Lease")
        .received_at;
    let last_renewal = lease_writes(&e, "op-a")
        .last()
        .expect("A had renewed")
        .received_at;
    let late = assert_no_writes_since(&a, &e, takeover);
    assert!(
        e.wait_for(Duration::from_secs(5), |_| a
            .logs()
            .contains("stopped writing"))
            .await,
        "A's reconcile ends without writing:\n{}",
        a.logs()
    );
    let delayed = a
        .writes(&e)
        .into_iter()
        .find(|r| r.method == "POST" && r.resource.as_deref() == Some("secrets"))
        .expect("A's key Secret creation");
    assert!(delayed.received_at < takeover, "sent while A still led");
    // B finished the job: gamma's key is issued once, served, and never reported as
    // conflicting with "somebody else's" Secret (A's late 409).
    let gamma = condition(&e, "apikeys", "gamma", "Ready").unwrap();
    assert_eq!(gamma["reason"], "Ready", "{gamma}");
    assert!(events(&e, "gamma", "SecretConflict").is_empty());
    assert!(!b.writes(&e).is_empty(), "the new leader writes");
    assert_eq!(lease_holder(&e).as_deref(), Some("op-b"));
    assert!(settled(&e) && inconsistency(&e).is_none());
    eprintln!(
        "leader lost its Lease mid-reconcile: last renewal to takeover {:?}; change to converged under the new leader {took:?}; writes by the old leader after the takeover: {}; torn set for {torn:?}",
        takeover.duration_since(last_renewal),
        late
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_mid_reconcile_past_its_lease_writes_nothing_when_it_wakes_up() {
    let e = world();
    let (a, b) = leader_and_standby(&e).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A starts a reconcile (its key Secret creation is slow), then the process freezes
    // (a long GC-like pause, a throttled container) for longer than its Lease.
    slow_key_secret_creation(&e, Duration::from_millis(600));
    add_gamma(&e);
    // A's reconcile starts after the 100 ms debounce and waits for its slow write.
    tokio::time::sleep(Duration::from_millis(250)).await;
    a.signal("STOP");
    let stopped = Instant::now();
    let (took, torn) = converged(&e, &[&b], Duration::from_secs(20), gamma_settled).await;
    tokio::time::sleep(Duration::from_millis(3000).saturating_sub(stopped.elapsed())).await;
    a.signal("CONT");
    let resumed = Instant::now();
    // Give A every chance to carry on with the reconcile it was in.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let takeover = lease_writes(&e, "op-b")
        .first()
        .expect("B took the Lease")
        .received_at;
    let late = assert_no_writes_since(&a, &e, takeover);
    assert!(settled(&e) && inconsistency(&e).is_none());
    assert!(ready_is(&e, "apikeys", "gamma", "True"));
    assert_eq!(
        lease_holder(&e).as_deref(),
        Some("op-b"),
        "A does not take the Lease back"
    );
    eprintln!(
        "leader paused for {:?} mid-reconcile: standby took over {:?} after the pause began, converged in {took:?} (torn {torn:?}); writes by the paused leader after it woke: {}",
        resumed.duration_since(stopped),
        takeover.duration_since(stopped),
        late
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_config_map_write_after_a_change_never_publishes_a_manifest_without_its_parts() {
    let e = world();
    let op = Operator::start(&e, "op-torn", &["--leader-election", "false"]);
    settle(&e, &op).await;
    let hash_before = live_hash(&e).unwrap();
    // The upstream credential changes (a rotation by an external secrets manager), and
    // the manifest write fails three times.
    e.fail_next(
        3,
        500,
        RequestFilter::writes()
            .method("PATCH")
            .resource("configmaps"),
    );
    e.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: openai-credentials, namespace: default, labels: {tollgate.dev/credential: 'true'}}\nstringData: {apiKey: sk-test-openai-0002}\n")
        .unwrap();
    let (took, torn) = converged(&e, &[&op], Duration::from_secs(20), |e| {
        settled(e) && live_hash(e).is_some_and(|h| h != hash_before)
    })
    .await;
    let config = config_of(&e);
    assert!(
        serde_json::to_string(&config.credentials)
            .unwrap()
            .contains("sk-test-openai-0002")
    );
    // With fixed object names the new credentials part precedes its manifest: gateways
    // miss the part the old manifest lists and keep serving the previous configuration
    // until the manifest lands. That window lasts as long as the retries.
    assert!(
        torn > Duration::ZERO && torn < Duration::from_secs(10),
        "{torn:?}"
    );
    let patches = RequestFilter::writes()
        .method("PATCH")
        .resource("configmaps");
    // The emulator logs a request once it has answered it, after its write shows: wait
    // for the attempt that succeeded to be logged too.
    let sorted = |e: &Emulator| {
        let mut attempts: Vec<RequestRecord> = e.requests_matching(&patches);
        attempts.sort_by_key(|r| r.received_at);
        attempts
    };
    e.wait_for(Duration::from_secs(5), |e| {
        sorted(e).last().is_some_and(|r| r.status < 400)
    })
    .await;
    let mut attempts = sorted(&e);
    // From the first failure (a follow-up of the first reconcile may have come first).
    let first = attempts.iter().position(|r| r.status == 500).unwrap();
    attempts.drain(..first);
    let gaps: Vec<Duration> = attempts
        .windows(2)
        .map(|w| w[1].received_at.duration_since(w[0].received_at))
        .collect();
    eprintln!(
        "credential rotated while the ConfigMap write failed 3 times: converged in {took:?}; parts ahead of their manifest for {torn:?}; ConfigMap attempts {} gaps {gaps:?}",
        attempts.len()
    );
    assert_eq!(attempts.len(), 4);
    assert!(
        gaps.last().unwrap() >= &Duration::from_millis(1800),
        "backoff: {gaps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_operator_does_not_reconcile_in_a_loop_with_or_without_leader_election() {
    for election in ["true", "false"] {
        let e = world();
        let op = Operator::start(
            &e,
            &format!("op-idle-{election}"),
            &["--leader-election", election],
        );
        settle(&e, &op).await;
        let before = op.reconciles("success").await + op.reconciles("error").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = op.reconciles("success").await + op.reconciles("error").await;
        assert!(
            after - before <= 1,
            "--leader-election {election}: {} reconciles in 2 s of nothing changing",
            after - before
        );
    }
}

// === One object's failure stays its own ===

/// The ApiKeys of `config` (namespace/name) that are served.
fn served_keys(e: &Emulator) -> BTreeSet<String> {
    served(e)
        .and_then(Result::ok)
        .map(|s| s.config.keys.keys.into_iter().map(|k| k.api_key).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_name_or_a_refused_secret_marks_only_its_own_api_key() {
    let e = world();
    // 70 characters: longer than a label value may be. 250: `<name>-key` is no valid
    // Secret name at all.
    let long = format!("long-{}", "n".repeat(65));
    let too_long = format!("t{}", "o".repeat(249));
    e.apply_yaml(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: team-b}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: mock, namespace: team-b}}\nspec: {{type: mock, models: [{{name: b-chat}}]}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: chat, namespace: team-b}}\nspec: {{models: [b-chat], targets: [{{provider: mock}}]}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: quota, namespace: team-b}}\nspec: {{owner: team-b}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {long}, namespace: default}}\nspec: {{owner: team-a}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: {too_long}, namespace: default}}\nspec: {{owner: team-a}}\n"
    ))
    .unwrap();
    // team-b is over its Secret quota: every Secret creation there is refused.
    const QUOTA: &str = "secrets \"quota-key\" is forbidden: exceeded quota: secrets, requested: count/secrets=1, used: count/secrets=5, limited: count/secrets=5";
    e.refuse(
        RequestFilter::any()
            .method("POST")
            .resource("secrets")
            .namespace("team-b"),
        403,
        QUOTA,
    );
    let op = Operator::start(
        &e,
        "op-isolation",
        &["--leader-election", "false", "--namespaces", "team-b"],
    );
    let quota_ready = |e: &Emulator| {
        e.get(TG, "apikeys", "team-b", "quota").and_then(|o| {
            o["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")
                .cloned()
        })
    };
    let done = e
        .wait_for(Duration::from_secs(30), |e| {
            ready_is(e, "apikeys", "alpha", "True")
                && ready_is(e, "apikeys", &long, "True")
                && ready_is(e, "apikeys", &too_long, "False")
                && quota_ready(e).is_some_and(|c| c["status"] == "False")
        })
        .await;
    assert!(done, "{}", op.logs());
    // The refused one says why, in the API's words, and only it.
    let c = quota_ready(&e).unwrap();
    assert_eq!(c["reason"], "SecretRefused", "{c}");
    assert!(
        c["message"].as_str().unwrap().contains("exceeded quota"),
        "{c}"
    );
    let warned = e
        .wait_for(Duration::from_secs(10), |e| {
            e.list("events.k8s.io/v1", "events", "team-b")
                .iter()
                .any(|ev| ev["regarding"]["name"] == "quota" && ev["type"] == "Warning")
        })
        .await;
    assert!(warned, "a Warning Event on the ApiKey: {}", op.logs());
    let c = condition(&e, "apikeys", &too_long, "Ready").unwrap();
    assert_condition(&c, "False", "InvalidSpec", "not a valid Secret name");
    // Everything else is served: the long name got its Secret, with a label value an API
    // server accepts.
    let served = served_keys(&e);
    for key in ["default/alpha", "default/beta", &format!("default/{long}")] {
        assert!(served.contains(key), "{key} in {served:?}");
    }
    let secret = e
        .get("v1", "secrets", "default", &format!("{long}-key"))
        .unwrap();
    let label = secret["metadata"]["labels"]["tollgate.dev/api-key"]
        .as_str()
        .unwrap();
    assert!(label.len() <= 63 && label.starts_with("long-n"), "{label}");
    // No Secret was ever attempted for the invalid name: the only Secrets created in
    // `default` are alpha's and the long name's.
    let creates = e.count(
        &RequestFilter::any()
            .method("POST")
            .resource("secrets")
            .namespace("default"),
    );
    assert_eq!(creates, 2, "{}", op.logs());

    // The quota is raised: the key is issued on the next reconcile, nothing else moves.
    e.clear_faults();
    // (The operator retries refused writes every 30 s on its own; an edit of the object
    // retries at once.)
    e.patch_merge(
        TG,
        "apikeys",
        "team-b",
        "quota",
        json!({"metadata": {"annotations": {"nudge": "1"}}}),
    )
    .unwrap();
    let issued = e
        .wait_for(Duration::from_secs(20), |e| {
            quota_ready(e).is_some_and(|c| c["status"] == "True")
                && e.get("v1", "secrets", "team-b", "quota-key").is_some()
        })
        .await;
    assert!(issued, "{}", op.logs());
    assert!(served_keys(&e).contains("team-b/quota"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_secret_the_cache_does_not_show_is_read_before_anything_is_decided() {
    let e = world();
    // Within the chart's RBAC: no `get` or `patch` on Secrets where ApiKeys live.
    common::enforce_chart_rbac(&e, json!({"watchNamespaces": ["default"]}));
    let op = Operator::start(&e, "op-stale", &["--leader-election", "false"]);
    settle(&e, &op).await;
    let key_of = |e: &Emulator| {
        e.get("v1", "secrets", "default", "alpha-key")
            .and_then(|s| s["data"]["apiKey"].as_str().map(str::to_owned))
    };
    let issued = key_of(&e).expect("alpha's key");
    // Its labels go (a hand edit; the same as a watch cache that has not seen it): the
    // label-selected cache loses it, and creating it again answers AlreadyExists.
    e.patch_merge(
        "v1",
        "secrets",
        "default",
        "alpha-key",
        json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null, "tollgate.dev/api-key": null}}}),
    )
    .unwrap();
    let repaired = e
        .wait_for(Duration::from_secs(20), |e| {
            e.get("v1", "secrets", "default", "alpha-key")
                .is_some_and(|s| s["metadata"]["labels"]["tollgate.dev/api-key"] == "alpha")
        })
        .await;
    assert!(repaired, "{}", op.logs());
    settle(&e, &op).await;
    // The same key, still served, and never called a conflict.
    assert_eq!(key_of(&e), Some(issued));
    assert!(ready_is(&e, "apikeys", "alpha", "True"));
    assert!(served_keys(&e).contains("default/alpha"));
    assert!(
        events(&e, "alpha", "SecretConflict").is_empty(),
        "{}",
        op.logs()
    );
    common::assert_nothing_refused(&e);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_writes_and_resyncs_trigger_no_reconcile_and_spec_changes_do() {
    let e = world();
    let op = Operator::start(&e, "op-quiet", &["--leader-election", "false"]);
    settle(&e, &op).await;
    const IGNORED: &str =
        "tollgate_operator_watch_events_total{watch=\"apikeys\",result=\"ignored\"}";
    let (reconciles, ignored) = (op.reconciles("success").await, op.counter(IGNORED).await);
    // A status-only write, as the operator's own status writes are (or another replica's).
    e.patch_merge(
        TG,
        "apikeys",
        "default",
        "alpha",
        json!({"status": {"usage": {"requestsToday": 7}}}),
    )
    .unwrap();
    let mut seen = ignored;
    for _ in 0..200 {
        seen = op.counter(IGNORED).await;
        if seen > ignored {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, ignored + 1, "the status write was seen and ignored");
    // A spec change, after it on the same watch, is what the next reconcile is for.
    e.patch_merge(
        TG,
        "apikeys",
        "default",
        "beta",
        json!({"spec": {"allowedModels": ["gpt-4o"]}}),
    )
    .unwrap();
    let mut now = reconciles;
    for _ in 0..400 {
        now = op.reconciles("success").await;
        if now > reconciles {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(now, reconciles + 1, "{}", op.logs());
    settle(&e, &op).await;
    assert_eq!(
        op.reconciles("success").await,
        reconciles + 1,
        "the reconcile's own status writes caused no other: {}",
        op.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_of_generated_data_are_repaired_and_another_releases_objects_left_alone() {
    let e = world();
    // Another release in the same namespace (prefix `other`), with the same kinds of
    // generated objects.
    e.apply_yaml(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: other-keys-00\n  namespace: tollgate\n  labels: {app.kubernetes.io/managed-by: tollgate-operator, tollgate.dev/config-part: keys, tollgate.dev/config-prefix: other}\nstringData: {keys-000.json: '{}'}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: other-config\n  namespace: tollgate\n  labels: {app.kubernetes.io/managed-by: tollgate-operator, tollgate.dev/config-part: routing, tollgate.dev/config-prefix: other}\ndata: {manifest.json: '{}'}\n",
    )
    .unwrap();
    let theirs = |e: &Emulator| {
        [("secrets", "other-keys-00"), ("configmaps", "other-config")].map(|(plural, name)| {
            e.get("v1", plural, "tollgate", name)
                .map(|o| o["metadata"]["resourceVersion"].clone())
        })
    };
    let before = theirs(&e);
    let op = Operator::start(&e, "op-repair", &["--leader-election", "false"]);
    settle(&e, &op).await;
    assert!(
        e.get("v1", "secrets", "tollgate", "tollgate-gateway-keys-07")
            .is_none(),
        "this release's unneeded shard is deleted"
    );
    let cm = e.get("v1", "configmaps", "tollgate", CONFIG_MAP).unwrap();
    let served = cm["data"].clone();
    let shard_name = e
        .list_selected(
            "v1",
            "secrets",
            "tollgate",
            "tollgate.dev/config-part=keys,tollgate.dev/config-prefix=tollgate-gateway",
        )
        .unwrap()[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let shard = e.get("v1", "secrets", "tollgate", &shard_name).unwrap()["data"].clone();

    // Hand edits of the data (the content-hash annotation left as it was).
    let file = cm["data"]
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "manifest.json")
        .unwrap()
        .clone();
    e.patch_merge(
        "v1",
        "configmaps",
        "tollgate",
        CONFIG_MAP,
        json!({"data": {file.clone(): "{}"}}),
    )
    .unwrap();
    let shard_file = shard.as_object().unwrap().keys().next().unwrap().clone();
    e.patch_merge(
        "v1",
        "secrets",
        "tollgate",
        &shard_name,
        json!({"data": {shard_file: "e30="}}),
    )
    .unwrap();
    assert!(
        e.wait_for(Duration::from_secs(20), |e| {
            e.get("v1", "configmaps", "tollgate", CONFIG_MAP).unwrap()["data"] == served
                && e.get("v1", "secrets", "tollgate", &shard_name).unwrap()["data"] == shard
        })
        .await,
        "the edited ConfigMap and Secret are repaired:\n{}",
        op.logs()
    );
    settle(&e, &op).await;
    assert_eq!(
        theirs(&e),
        before,
        "the other release's objects are neither written nor deleted"
    );
    assert!(before.iter().all(Option::is_some));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reconcile_decides_from_a_cache_that_is_being_relisted() {
    let e = world();
    let op = Operator::start(&e, "op-relist", &["--leader-election", "false"]);
    settle(&e, &op).await;
    let before = op.reconciles("success").await;
    let deferred = "tollgate_operator_reconciles_total{result=\"deferred\"}";
    let apikey_lists = RequestFilter::any()
        .resource("apikeys")
        .method("GET")
        .watch(false);
    let lists = e.count(&apikey_lists);
    // An API server restart: every watch expires (410 Gone) and relists; the ApiKeys'
    // list is slow to come back. The other watches relist at once and ask for a reconcile.
    e.delay_next(1, Duration::from_secs(4), apikey_lists.clone());
    // A write no watch sees moves the resourceVersion on, so every resume is too old.
    e.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: unrelated, namespace: default}\n",
    )
    .unwrap();
    e.compact();
    e.close_watches();
    let mut waited = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while e.count(&apikey_lists) == lists {
        assert!(
            Instant::now() < deadline,
            "the ApiKeys are relisted:\n{}",
            op.logs()
        );
        let now = op.reconciles("success").await;
        assert_eq!(
            now,
            before,
            "no reconcile while the ApiKeys are being relisted:\n{}",
            op.logs()
        );
        waited |= op.counter(deferred).await > 0;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        waited,
        "a reconcile was asked for and deferred:\n{}",
        op.logs()
    );
    // Once the fresh list is in, the reconcile runs, on a complete view: nothing changes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while op.reconciles("success").await == before {
        assert!(Instant::now() < deadline, "{}", op.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle(&e, &op).await;
    assert_eq!(served_keys(&e).len(), 2, "both keys still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_whose_credentials_are_not_listed_yet_keeps_its_served_form() {
    let e = world();
    {
        let first = Operator::start(&e, "op-first", &["--leader-election", "false"]);
        settle(&e, &first).await;
    }
    let hash = live_hash(&e).unwrap();
    assert!(
        config_of(&e)
            .credentials
            .providers
            .contains_key("default/openai")
    );
    let openai_ready = common::condition(&e, "providers", "openai", "Ready");
    let beta_before = e.get(TG, "apikeys", "default", "beta").unwrap()["status"].clone();
    // The next leader starts while the API server is slow to list the credential
    // Secrets (`labelSelector=tollgate.dev/credential=true`).
    let credential_lists = RequestFilter::any()
        .resource("secrets")
        .method("GET")
        .watch(false)
        .query_contains("credential");
    let listed = e.count(&credential_lists);
    e.delay_next(1, Duration::from_secs(4), credential_lists.clone());
    let next = Operator::start(&e, "op-next", &["--leader-election", "false"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    // Until they are listed, nothing is decided: no write, the served configuration
    // (with the Provider's credentials) stays.
    while e.count(&credential_lists) == listed {
        assert!(Instant::now() < deadline, "{}", next.logs());
        assert_eq!(
            next.writes(&e),
            vec![],
            "no write before the credentials are listed"
        );
        assert_eq!(live_hash(&e).as_deref(), Some(hash.as_str()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    settle(&e, &next).await;
    assert_eq!(
        live_hash(&e).as_deref(),
        Some(hash.as_str()),
        "the Provider keeps its served form"
    );
    assert_eq!(
        common::condition(&e, "providers", "openai", "Ready"),
        openai_ready
    );
    assert_eq!(
        next.writes(&e),
        vec![],
        "nothing to write: beta before {beta_before:#}\nafter {:#}",
        e.get(TG, "apikeys", "default", "beta").unwrap()["status"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_pass_that_outlives_the_lease_writes_nothing_more() {
    let redis = common::Redis::start();
    let url = redis.url();
    let e = world();
    let args = ["--redis-url", url.as_str(), "--usage-interval", "200ms"];
    let a = Operator::start(&e, "op-a", &args);
    settle(&e, &a).await;
    let b = Operator::start(&e, "op-b", &args);
    assert!(
        e.wait_for(Duration::from_secs(10), |_| b
            .logs()
            .contains("caches synced"))
            .await
    );
    // A's next usage write is slow: its pass is still running when it loses the lease.
    let usage_writes = |who: &str| {
        RequestFilter::writes()
            .resource("apikeys")
            .subresource("status")
            .query_contains("tollgate-operator-usage")
            .user_agent(&format!("({who})"))
    };
    e.delay_next(1, Duration::from_secs(4), usage_writes("op-a"));
    // Both keys were used, in one transaction: the next pass has two statuses to write
    // (one key at a time, a pass could run between them and find one only).
    let month = tollgate_api::usage::periods(jiff::Timestamp::now()).1;
    let mut used = redis::pipe();
    used.atomic();
    for name in ["alpha", "beta"] {
        let id = e.get(TG, "apikeys", "default", name).unwrap()["status"]["keyId"]
            .as_str()
            .unwrap()
            .to_owned();
        used.hset(
            tollgate_api::usage::usage_key(&id, &month),
            tollgate_api::usage::REQUESTS,
            5,
        )
        .ignore();
    }
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let () = used.query(&mut conn).unwrap();
    // A's pass sent its first write (held by the API server), then A freezes past its
    // lease and B takes over.
    assert!(
        e.wait_for(Duration::from_secs(10), |e| e.armed_faults() == 0)
            .await,
        "A's usage pass writes:\n{}",
        a.logs()
    );
    a.signal("STOP");
    // The Lease shows B, and B's write is logged (the log follows the answer).
    assert!(
        e.wait_for(Duration::from_secs(20), |e| lease_holder(e).as_deref()
            == Some("op-b")
            && !lease_writes(e, "op-b").is_empty())
            .await
    );
    let takeover = lease_writes(&e, "op-b")[0].received_at;
    a.signal("CONT");
    // A's held write is answered; its pass goes on to the next key, and stops there.
    assert!(
        e.wait_for(Duration::from_secs(20), |e| e.count(&usage_writes("op-a"))
            == 1)
            .await
    );
    assert!(
        e.wait_for(Duration::from_secs(20), |_| a
            .logs()
            .contains("no longer holds the lease"))
            .await,
        "A's pass stops at its next write:\n{}",
        a.logs()
    );
    assert!(
        e.wait_for(Duration::from_secs(20), |e| ["alpha", "beta"].iter().all(
            |n| e
                .get(TG, "apikeys", "default", n)
                .is_some_and(|k| k["status"]["usage"]["requests"] == 5)
        ))
        .await,
        "B mirrors the usage:\n{}",
        b.logs()
    );
    assert_eq!(assert_no_writes_since(&a, &e, takeover), 0);
    assert_eq!(
        e.count(&usage_writes("op-a")),
        1,
        "A wrote one usage status, before the takeover"
    );
}
