//! The operator in a cluster shared by teams (docs/tenancy.md): it works within the
//! chart's own RBAC rules (enforced by the emulator, so a missing rule is a 403 as on a
//! cluster), sharing between namespaces compiles through it, and Secrets it did not make
//! never become keys.

use std::time::Duration;

use serde_json::{Value, json};
use tollgate_kube_emulator::Emulator;

use crate::common;

use common::{
    Proc, Redis, TG, assert_nothing_refused, decode, enforce_chart_rbac, examples, refused, served,
    start_operator,
};

/// Team A (`default`, the examples) offers the mock demo route to team B, whose key
/// accepts it; team B also has a Secret named like a key Secret, labelled as one, that
/// the operator did not create.
const TEAM_B: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team-b}
---
apiVersion: tollgate.dev/v1alpha1
kind: RoutePolicy
metadata: {name: offered, namespace: default}
spec:
  models: [offered-chat]
  targets: [{provider: mock, model: demo-chat}]
  sharedWith: [team-b]
---
apiVersion: tollgate.dev/v1alpha1
kind: ApiKey
metadata: {name: app, namespace: team-b}
spec: {owner: search, sharedRoutesFrom: [default]}
---
apiVersion: v1
kind: Secret
metadata:
  name: orphan-key
  namespace: team-b
  labels:
    app.kubernetes.io/managed-by: tollgate-operator
    tollgate.dev/api-key: orphan
stringData: {apiKey: tg_plantedKeyNobodyIssued0000000000000001}
---
apiVersion: tollgate.dev/v1alpha1
kind: ApiKey
metadata: {name: orphan, namespace: team-b}
spec: {owner: search}
---
apiVersion: v1
kind: Secret
metadata: {name: some-token, namespace: team-b}
stringData: {token: not-for-tollgate-0001}
---
apiVersion: tollgate.dev/v1alpha1
kind: Provider
metadata: {name: exfil, namespace: team-b}
spec:
  type: openaiCompatible
  baseUrl: http://collector.example
  credentials: {secretRef: {name: some-token, key: token}}
  models: [{name: m}]
"#;

fn condition(e: &Emulator, ns: &str, plural: &str, name: &str, type_: &str) -> Option<Value> {
    e.get(TG, plural, ns, name)?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Runs the operator as the chart's ServiceAccount with the chart's RBAC (rendered with
/// `values`) on the two teams, through a key rotation, and checks what it did.
async fn run_as_the_chart_allows(values: Value, namespaces: &str) {
    let emulator = Emulator::start();
    emulator
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n")
        .unwrap();
    emulator.apply_yaml(&examples()).unwrap();
    emulator.apply_yaml(TEAM_B).unwrap();
    enforce_chart_rbac(&emulator, values);

    let (operator, _) = start_operator(&emulator, "op-a", &["--namespaces", namespaces], &[]);
    let converged = emulator
        .wait_for(Duration::from_secs(30), |e| {
            condition(e, "team-b", "apikeys", "app", "Ready").is_some_and(|c| c["status"] == "True")
                && condition(e, "team-b", "apikeys", "orphan", "Ready").is_some()
                && condition(e, "team-b", "providers", "exfil", "Ready").is_some()
                && condition(e, "default", "apikeys", "local-dev", "Ready")
                    .is_some_and(|c| c["status"] == "True")
        })
        .await;
    assert!(converged, "{}", logs(&emulator, &operator));

    // Sharing compiled through the operator: team B's key accepts team A's offer.
    let config = served(&emulator).unwrap().unwrap().config;
    let team_b = config
        .keys
        .keys
        .iter()
        .find(|k| k.api_key == "team-b/app")
        .expect("team B's key is served");
    assert_eq!(team_b.shared_routes_from, ["default"]);
    let offered = config
        .routing
        .routes
        .iter()
        .find(|r| r.id == "default/offered");
    assert_eq!(offered.unwrap().shared_with, ["team-b"]);

    // A labelled Secret the operator did not create is never a key.
    let orphan = condition(&emulator, "team-b", "apikeys", "orphan", "Ready").unwrap();
    assert_eq!(orphan["status"], "False");
    assert_eq!(orphan["reason"], "SecretConflict", "{orphan}");
    assert!(
        config
            .keys
            .keys
            .iter()
            .all(|k| k.api_key != "team-b/orphan")
    );

    // A Provider naming a Secret that never consented gets nothing, and the operator
    // never asked the API for that Secret.
    let exfil = condition(&emulator, "team-b", "providers", "exfil", "ResolvedRefs").unwrap();
    assert_eq!(exfil["status"], "False");
    assert_eq!(exfil["reason"], "SecretNotFound", "{exfil}");
    assert!(!config.credentials.providers.contains_key("team-b/exfil"));
    let secret_reads: Vec<String> = emulator
        .requests()
        .iter()
        .filter(|r| r.resource.as_deref() == Some("secrets") && r.method == "GET")
        .filter(|r| !r.query.contains("labelSelector"))
        .map(|r| format!("{}?{}", r.path, r.query))
        .collect();
    assert!(
        secret_reads.is_empty(),
        "unselected Secret reads: {secret_reads:#?}"
    );

    // A rotation (replace of an owned Secret) is within the rules too.
    emulator
        .patch_merge(
            TG,
            "apikeys",
            "team-b",
            "app",
            json!({"spec": {"rotation": {"generation": 1, "gracePeriod": "10m"}}}),
        )
        .unwrap();
    let rotated = emulator
        .wait_for(Duration::from_secs(30), |e| {
            e.get("v1", "secrets", "team-b", "app-key")
                .is_some_and(|s| s["data"]["previousKeySha256"].is_string())
        })
        .await;
    assert!(rotated, "{}", logs(&emulator, &operator));
    let secret = emulator.get("v1", "secrets", "team-b", "app-key").unwrap();
    assert_eq!(decode(&secret["data"]["previousKeySha256"]).len(), 64);

    assert_nothing_refused(&emulator);

    // The rules are really enforced: what the chart does not grant is refused.
    let status = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/namespaces/default/secrets/openai-credentials",
            emulator.url()
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403, "the operator may not get a Secret by name");
    let status = reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/namespaces/tollgate/secrets/somebody-elses",
            emulator.url()
        ))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(
        status, 403,
        "the operator may delete only its generated Secrets"
    );
}

fn logs(emulator: &Emulator, operator: &Proc) -> String {
    format!("403s: {:#?}\n{}", refused(emulator), operator.logs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_needs_nothing_beyond_the_charts_rbac_for_listed_namespaces() {
    run_as_the_chart_allows(
        json!({"watchNamespaces": ["default", "team-b"]}),
        "default,team-b",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_needs_nothing_beyond_the_charts_rbac_cluster_wide() {
    run_as_the_chart_allows(json!({"watchNamespaces": ["*"]}), "*").await;
}

/// Upgrading from 48-bit key ids: the operator finds the served configuration on the old
/// ids and copies each key's budget spend and usage to its new id before switching, so a
/// budget never restarts because of the upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_longer_key_ids_carries_budget_spend_and_usage_over() {
    use tollgate_api::{parts, usage};
    let redis = Redis::start();
    let emulator = Emulator::start();
    emulator
        .apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: tollgate}\n")
        .unwrap();
    emulator.apply_yaml(&examples()).unwrap();
    enforce_chart_rbac(&emulator, json!({"watchNamespaces": ["default"]}));
    let redis_url = redis.url();
    let args = ["--redis-url", redis_url.as_str()];

    // A first run, then the configuration as an older operator would have served it.
    let (first, _) = start_operator(&emulator, "op-a", &args, &[]);
    let ready = emulator
        .wait_for(Duration::from_secs(30), |e| {
            condition(e, "default", "apikeys", "search-team", "Ready")
                .is_some_and(|c| c["status"] == "True")
        })
        .await;
    assert!(ready, "{}", first.logs());
    drop(first);
    let mut old = served(&emulator).unwrap().unwrap().config;
    for k in &mut old.keys.keys {
        k.id.truncate(12);
    }
    let naming = tollgate_operator::desired::Naming {
        namespace: "tollgate".into(),
        prefix: "tollgate-gateway".into(),
        max_key_shards: 16,
        max_routing_shards: 4,
    };
    let split = parts::split(&old).unwrap();
    for object in tollgate_operator::desired::desired_objects(&split, &naming).unwrap() {
        let json = match object {
            tollgate_operator::desired::DesiredObject::ConfigMap(cm) => {
                serde_json::to_value(&cm).unwrap()
            }
            tollgate_operator::desired::DesiredObject::Secret(s) => {
                serde_json::to_value(&s).unwrap()
            }
        };
        emulator.apply_object(json).unwrap();
    }
    let search = old
        .keys
        .keys
        .iter()
        .find(|k| k.api_key == "default/search-team")
        .unwrap()
        .clone();
    let now = jiff::Timestamp::now();
    let (_, month) = usage::periods(now);
    let period = usage::budget_period_id(tollgate_api::v1alpha1::BudgetPeriod::Monthly, now);
    let spent = |id: &str| format!("{}:spent", usage::budget_prefix(id, &period));
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(spent(&search.id))
        .arg("187.5")
        .ignore()
        .cmd("HSET")
        .arg(usage::usage_key(&search.id, &month))
        .arg(usage::REQUESTS)
        .arg(41)
        .arg(usage::SPEND)
        .arg("187.5")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();

    // The upgraded operator.
    let (second, _) = start_operator(&emulator, "op-b", &args, &[]);
    let switched = emulator
        .wait_for(Duration::from_secs(30), |e| {
            served(e)
                .and_then(Result::ok)
                .is_some_and(|c| c.config.keys.keys.iter().all(|k| k.id.len() == 24))
        })
        .await;
    assert!(switched, "{}", second.logs());
    let new_id = tollgate_api::compile::key_id("default", "search-team");
    let carried: Option<String> = redis::cmd("GET")
        .arg(spent(&new_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(carried.as_deref(), Some("187.5"), "{}", second.logs());
    let requests: Option<u64> = redis::cmd("HGET")
        .arg(usage::usage_key(&new_id, &month))
        .arg(usage::REQUESTS)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(requests, Some(41));
    assert!(
        second
            .logs()
            .contains("moved budget spend and usage to the new key ids")
    );
    assert_nothing_refused(&emulator);
}
