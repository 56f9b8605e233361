//! The Helm chart, rendered and linted with the real Helm SDK (`tests/chart/helm.py`, from
//! `helm-python-sdk`) for several value sets. Every object is validated against the
//! Kubernetes schemas (kubernetes-validate), and the output is checked for the security
//! and consistency properties users rely on. `manifests/` must match the default render.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
};

use serde_json::{Value, json};
use tollgate_tests::{repo_root, tools_python};

struct Render {
    lint: Value,
    crds: Vec<Value>,
    docs: Vec<Value>,
    notes: String,
    validation: Vec<String>,
    error: Option<String>,
}

fn helm(args: &[&str]) -> std::process::Output {
    let python = tools_python();
    let output = Command::new(&python)
        .arg(repo_root().join("tests/chart/helm.py"))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run `bash tests/run.sh` (it installs the test tools into .venv)",
                python.display()
            )
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("No module named"),
        "the Helm SDK is not installed for {}; run `bash tests/run.sh`: {stderr}",
        python.display()
    );
    output
}

fn render_with(values: Value, api_versions: &[&str]) -> Render {
    let values = values.to_string();
    let mut args = vec!["render", "--values-json", &values];
    for a in api_versions {
        args.extend(["--api-version", a]);
    }
    let output = helm(&args);
    assert!(
        output.status.success(),
        "helm.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    let list = |k: &str| out[k].as_array().cloned().unwrap_or_default();
    Render {
        lint: out["lint"].clone(),
        crds: list("crds"),
        docs: list("docs"),
        notes: out["notes"].as_str().unwrap_or_default().to_owned(),
        validation: list("validation")
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect(),
        error: out["error"].as_str().map(str::to_owned),
    }
}

fn render(values: Value) -> Render {
    render_with(values, &[])
}

/// A render that must succeed, lint clean and validate.
fn good(values: Value, api_versions: &[&str]) -> Render {
    let r = render_with(values.clone(), api_versions);
    assert_eq!(r.error, None, "values {values}");
    assert_eq!(
        r.lint["ok"], true,
        "helm lint --strict with {values}: {}",
        r.lint
    );
    assert!(
        r.validation.is_empty(),
        "kubernetes-validate with {values}:\n{}",
        r.validation.join("\n")
    );
    r
}

const MONITORING: [&str; 3] = [
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
];

/// The value sets the chart is tested with.
fn value_sets() -> Vec<(&'static str, Value, &'static [&'static str])> {
    vec![
        ("defaults", json!({}), &[]),
        (
            "bundled Redis with persistence, network policies",
            json!({"redis": {"bundled": {"persistence": {"enabled": true}}}, "networkPolicy": {"enabled": true, "apiFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]}}),
            &[],
        ),
        (
            "external Redis URL",
            json!({"redis": {"mode": "external", "failureMode": "failClosed", "external": {"url": "rediss://redis.example:6380/0"}}}),
            &[],
        ),
        (
            "external Redis Cluster from a Secret with a private CA",
            json!({"redis": {"mode": "external", "external": {"existingSecret": "my-redis", "existingSecretKey": "uri", "cluster": true, "caSecret": "redis-ca"}}}),
            &[],
        ),
        ("no Redis", json!({"redis": {"mode": "none"}}), &[]),
        (
            "trusted proxies, link-local upstreams allowed",
            json!({"allowLinkLocalUpstreams": true, "gateway": {"trustedProxies": ["10.0.0.0/8", "fd00::/8"]}}),
            &[],
        ),
        (
            "monitoring on",
            json!({"monitoring": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}, "prometheusRule": {"enabled": true}}}),
            &MONITORING,
        ),
        (
            "HPA and PDB off",
            json!({"gateway": {"autoscaling": {"enabled": false}, "replicas": 3, "podDisruptionBudget": {"enabled": false}}}),
            &[],
        ),
        (
            "several namespaces, custom metrics",
            json!({"watchNamespaces": ["team-a", "team-b"], "gateway": {"autoscaling": {"customMetrics": [{"type": "Pods", "pods": {"metric": {"name": "tollgate_requests_per_second"}, "target": {"type": "AverageValue", "averageValue": "50"}}}]}}}),
            &[],
        ),
        ("every namespace", json!({"watchNamespaces": ["*"]}), &[]),
    ]
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in {:?}", kinds(docs)))
}

fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("Deployment" | "StatefulSet" | "DaemonSet" | "Job")
            )
        })
        .map(|d| {
            (
                d["metadata"]["name"].as_str().unwrap().to_owned(),
                &d["spec"]["template"]["spec"],
            )
        })
        .collect()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn every_value_set_renders_lints_and_validates_against_the_kubernetes_schemas() {
    for (what, values, apis) in value_sets() {
        let r = good(values, apis);
        assert!(!r.docs.is_empty(), "{what}");
        eprintln!("{what}: {} objects", r.docs.len());
    }
}

#[test]
fn every_pod_runs_under_the_restricted_pod_security_standard() {
    for (what, values, apis) in value_sets() {
        let r = good(values, apis);
        for (name, spec) in pod_specs(&r.docs) {
            let pod = &spec["securityContext"];
            assert_eq!(pod["runAsNonRoot"], true, "{what}: {name}");
            assert_eq!(
                pod["seccompProfile"]["type"], "RuntimeDefault",
                "{what}: {name}"
            );
            let containers = spec["containers"]
                .as_array()
                .unwrap()
                .iter()
                .chain(spec["initContainers"].as_array().into_iter().flatten());
            for c in containers {
                let sc = &c["securityContext"];
                let at = format!("{what}: {name}/{}", c["name"]);
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{at}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{at}");
                assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{at}");
                assert!(sc["capabilities"]["add"].is_null(), "{at}");
                assert!(
                    sc["privileged"].is_null() || sc["privileged"] == false,
                    "{at}"
                );
                assert!(
                    !c["resources"]["requests"].is_null(),
                    "{at}: resources requested"
                );
            }
            assert!(
                spec["hostNetwork"].is_null() && spec["hostPID"].is_null(),
                "{what}: {name}"
            );
        }
    }
}

#[test]
fn rbac_is_least_privilege_and_the_gateway_has_no_api_access() {
    for (what, values, apis) in value_sets() {
        let r = good(values, apis);
        for d in r
            .docs
            .iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole")))
        {
            for rule in d["rules"].as_array().unwrap() {
                for field in ["apiGroups", "resources", "verbs"] {
                    let items = rule[field].as_array().unwrap();
                    assert!(
                        !items.iter().any(|v| v.as_str().unwrap().contains('*')),
                        "{what}: {} has a wildcard: {rule}",
                        d["metadata"]["name"]
                    );
                }
                // Never cluster-wide Secret writes beyond what key issuance needs.
                if rule["resources"]
                    .as_array()
                    .unwrap()
                    .contains(&json!("secrets"))
                {
                    let verbs: BTreeSet<&str> = rule["verbs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap())
                        .collect();
                    if d["kind"] == "ClusterRole" {
                        assert!(
                            !verbs.contains("delete") && !verbs.contains("patch"),
                            "{what}: {rule}"
                        );
                    }
                }
            }
        }
        // The gateway: no token, and no binding names its ServiceAccount.
        let sa = find(&r.docs, "ServiceAccount", "tollgate-gateway");
        assert_eq!(sa["automountServiceAccountToken"], false, "{what}");
        let deployment = find(&r.docs, "Deployment", "tollgate-gateway");
        assert_eq!(
            deployment["spec"]["template"]["spec"]["automountServiceAccountToken"],
            false
        );
        for binding in r.docs.iter().filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("RoleBinding" | "ClusterRoleBinding")
            )
        }) {
            for subject in binding["subjects"].as_array().unwrap() {
                assert_ne!(subject["name"], "tollgate-gateway", "{what}: {binding}");
            }
        }
        // The operator's cluster-wide access only when asked for.
        let cluster_roles = r.docs.iter().filter(|d| d["kind"] == "ClusterRole").count();
        assert_eq!(cluster_roles > 0, what == "every namespace", "{what}");
    }
}

#[test]
fn operator_roles_follow_the_watched_namespaces() {
    let r = good(json!({"watchNamespaces": ["team-a", "team-b"]}), &[]);
    let roles: BTreeSet<String> = r
        .docs
        .iter()
        .filter(|d| d["kind"] == "Role")
        .map(|d| {
            format!(
                "{}/{}",
                d["metadata"]["namespace"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        roles,
        BTreeSet::from([
            "team-a/tollgate-operator-objects".to_owned(),
            "team-b/tollgate-operator-objects".to_owned(),
            "tollgate/tollgate-operator-gateway-config".to_owned(),
        ])
    );
    let operator = &find(&r.docs, "Deployment", "tollgate-operator")["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(
        env(operator, "TOLLGATE_NAMESPACES").unwrap()["value"],
        "team-a,team-b"
    );
}

#[test]
fn the_gateway_mounts_exactly_what_the_operator_writes() {
    for (shards, routing) in [(16, 4), (4, 2)] {
        let r = good(json!({"keyShards": shards, "routingShards": routing}), &[]);
        let operator = &find(&r.docs, "Deployment", "tollgate-operator")["spec"]["template"]["spec"]
            ["containers"][0];
        assert_eq!(
            env(operator, "TOLLGATE_MAX_KEY_SHARDS").unwrap()["value"],
            shards.to_string()
        );
        assert_eq!(
            env(operator, "TOLLGATE_MAX_ROUTING_SHARDS").unwrap()["value"],
            routing.to_string()
        );
        let prefix = env(operator, "TOLLGATE_CONFIG_PREFIX").unwrap()["value"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            env(operator, "TOLLGATE_GATEWAY_NAMESPACE").unwrap()["value"],
            "tollgate"
        );
        // The operator's naming (operator/src/desired.rs).
        let naming = tollgate_operator::desired::Naming {
            namespace: "tollgate".into(),
            prefix: prefix.clone(),
            max_key_shards: shards,
            max_routing_shards: routing,
        };
        let spec = &find(&r.docs, "Deployment", "tollgate-gateway")["spec"]["template"]["spec"];
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "config")
            .unwrap();
        let sources: Vec<(String, bool)> = volume["projected"]["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let (kind, src) = if s["configMap"].is_object() {
                    ("ConfigMap", &s["configMap"])
                } else {
                    ("Secret", &s["secret"])
                };
                (
                    format!("{kind}/{}", src["name"].as_str().unwrap()),
                    src["optional"] == true,
                )
            })
            .collect();
        let mut expected = vec![
            format!("ConfigMap/{}", naming.config_map()),
            format!("Secret/{}", naming.credentials()),
        ];
        expected.extend((0..shards).map(|i| format!("Secret/{}", naming.key_shard(i))));
        expected.extend((0..routing).map(|i| format!("ConfigMap/{}", naming.routing_shard(i))));
        assert_eq!(
            sources.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
            expected
        );
        assert!(
            sources.iter().all(|s| s.1),
            "every source optional: the gateway starts before the operator wrote"
        );
        let gateway = &spec["containers"][0];
        assert_eq!(
            env(gateway, "TOLLGATE_CONFIG_DIRS").unwrap()["value"],
            "/etc/tollgate/config"
        );
    }
}

#[test]
fn probes_shutdown_and_scaling_are_wired() {
    let r = good(json!({}), &[]);
    let spec = &find(&r.docs, "Deployment", "tollgate-gateway")["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["startupProbe"]["httpGet"]["path"], "/livez");
    // preStop sleep 5 s + drain 2 s + in-flight 30 s fit in the grace period.
    let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap();
    assert_eq!(env(c, "TOLLGATE_DRAIN_DELAY").unwrap()["value"], "2s");
    assert_eq!(env(c, "TOLLGATE_SHUTDOWN_TIMEOUT").unwrap()["value"], "30s");
    let grace = spec["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(grace > pre_stop + 2 + 30, "grace {grace}");
    let r = good(
        json!({"gateway": {"shutdown": {"preStopSleepSeconds": 10, "drainDelay": "1500ms", "shutdownTimeout": "5m"}}}),
        &[],
    );
    let spec = &find(&r.docs, "Deployment", "tollgate-gateway")["spec"]["template"]["spec"];
    assert!(spec["terminationGracePeriodSeconds"].as_i64().unwrap() > 10 + 2 + 300);

    let hpa = find(
        &good(json!({}), &[]).docs,
        "HorizontalPodAutoscaler",
        "tollgate-gateway",
    )
    .clone();
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        70
    );
    let r = good(
        json!({"gateway": {"autoscaling": {"enabled": false}, "replicas": 3}}),
        &[],
    );
    assert!(
        !kinds(&r.docs)
            .iter()
            .any(|k| k.starts_with("HorizontalPodAutoscaler"))
    );
    assert_eq!(
        find(&r.docs, "Deployment", "tollgate-gateway")["spec"]["replicas"],
        3
    );
    let operator = &find(&r.docs, "Deployment", "tollgate-operator")["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(operator["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(operator["args"], json!(["run"]));
}

#[test]
fn redis_modes_give_both_components_the_same_url_source() {
    for (values, secret, key) in [
        (json!({}), "tollgate-redis-url", "url"),
        (
            json!({"redis": {"mode": "external", "external": {"url": "redis://r:6379"}}}),
            "tollgate-redis-url",
            "url",
        ),
        (
            json!({"redis": {"mode": "external", "external": {"existingSecret": "mine", "existingSecretKey": "u"}}}),
            "mine",
            "u",
        ),
    ] {
        let r = good(values.clone(), &[]);
        for name in ["tollgate-gateway", "tollgate-operator"] {
            let c = &find(&r.docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0];
            let from = &env(c, "TOLLGATE_REDIS_URL").unwrap_or_else(|| panic!("{values}: {name}"))
                ["valueFrom"]["secretKeyRef"];
            assert_eq!(
                (from["name"].as_str(), from["key"].as_str()),
                (Some(secret), Some(key)),
                "{values}"
            );
        }
    }
    let r = good(json!({"redis": {"mode": "none"}}), &[]);
    for name in ["tollgate-gateway", "tollgate-operator"] {
        let c = &find(&r.docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0];
        assert!(env(c, "TOLLGATE_REDIS_URL").is_none());
    }
    assert!(
        r.notes
            .contains("limits and budgets are kept per gateway pod")
    );
    // The bundled Redis: reachable only by Tollgate's pods, and the notes say it is for trials.
    let r = good(json!({}), &[]);
    let policy = find(&r.docs, "NetworkPolicy", "tollgate-redis");
    let from = &policy["spec"]["ingress"][0]["from"];
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "gateway"
    );
    assert_eq!(
        from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "operator"
    );
    assert!(
        r.notes.contains("managed or highly available Redis"),
        "{}",
        r.notes
    );
}

#[test]
fn the_bundled_redis_has_a_generated_password_and_keeps_the_cache_apart_from_state() {
    let secret_ref = |c: &Value, name: &str| -> (String, String) {
        let from = &env(c, name).unwrap_or_else(|| panic!("{name}"))["valueFrom"]["secretKeyRef"];
        (
            from["name"].as_str().unwrap().to_owned(),
            from["key"].as_str().unwrap().to_owned(),
        )
    };
    let auth = ("tollgate-redis-auth".to_owned(), "password".to_owned());
    let r = good(json!({}), &[]);
    // A generated password: 32 random alphanumerics, different in every fresh render
    // (upgrades keep the one in the cluster through `lookup`).
    let password = |r: &Render| {
        let secret = find(&r.docs, "Secret", "tollgate-redis-auth");
        let b64 = secret["data"]["password"].as_str().unwrap().to_owned();
        String::from_utf8(base64_decode(&b64)).unwrap()
    };
    let first = password(&r);
    assert_eq!(first.len(), 32);
    assert!(first.chars().all(|c| c.is_ascii_alphanumeric()), "{first}");
    assert_ne!(first, password(&good(json!({}), &[])));
    let pod = &find(&r.docs, "Deployment", "tollgate-redis")["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    let arg_after = |c: &Value, flag: &str| -> String {
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args
            .iter()
            .position(|a| *a == flag)
            .unwrap_or_else(|| panic!("{flag} in {args:?}"));
        args[at + 1].to_owned()
    };
    // State: password, never evicted. Cache: password, its own memory, LRU.
    let state = containers.iter().find(|c| c["name"] == "redis").unwrap();
    let cache = containers
        .iter()
        .find(|c| c["name"] == "redis-cache")
        .unwrap();
    for (c, port, policy) in [
        (state, "6379", "noeviction"),
        (cache, "6380", "allkeys-lru"),
    ] {
        assert_eq!(arg_after(c, "--port"), port);
        assert_eq!(arg_after(c, "--maxmemory-policy"), policy);
        assert_eq!(arg_after(c, "--requirepass"), "$(REDIS_PASSWORD)");
        assert_eq!(secret_ref(c, "REDIS_PASSWORD"), auth);
    }
    // Both components get the password from the Secret, never in a plain value; the
    // gateway also gets the cache Redis.
    for name in ["tollgate-gateway", "tollgate-operator"] {
        let c = &find(&r.docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(secret_ref(c, "TOLLGATE_REDIS_PASSWORD"), auth, "{name}");
    }
    let gateway = &find(&r.docs, "Deployment", "tollgate-gateway")["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(
        secret_ref(gateway, "TOLLGATE_REDIS_CACHE_URL"),
        ("tollgate-redis-url".to_owned(), "cacheUrl".to_owned())
    );
    let urls = find(&r.docs, "Secret", "tollgate-redis-url");
    assert!(
        urls["stringData"]["cacheUrl"]
            .as_str()
            .unwrap()
            .ends_with(":6380/0")
    );
    let text = serde_json::to_string(&r.docs).unwrap();
    assert_eq!(
        text.matches(&first).count(),
        0,
        "the password appears only base64-encoded"
    );
    // Only Tollgate's pods reach either port.
    let policy = find(&r.docs, "NetworkPolicy", "tollgate-redis");
    assert_eq!(
        policy["spec"]["ingress"][0]["ports"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // An existing Secret: nothing generated, everything points at it.
    let r = good(
        json!({"redis": {"bundled": {"auth": {"existingSecret": "mine", "existingSecretKey": "pw"}}}}),
        &[],
    );
    assert!(!kinds(&r.docs).contains(&"Secret/tollgate-redis-auth".to_owned()));
    let c = &find(&r.docs, "Deployment", "tollgate-operator")["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(
        secret_ref(c, "TOLLGATE_REDIS_PASSWORD"),
        ("mine".to_owned(), "pw".to_owned())
    );

    // External Redis: no password variable; a separate cache Redis only when named.
    let r = good(
        json!({"redis": {"mode": "external", "external": {"url": "redis://r:6379"}}}),
        &[],
    );
    let gateway = &find(&r.docs, "Deployment", "tollgate-gateway")["spec"]["template"]["spec"]["containers"]
        [0];
    assert!(env(gateway, "TOLLGATE_REDIS_PASSWORD").is_none());
    assert!(env(gateway, "TOLLGATE_REDIS_CACHE_URL").is_none());
    let r = good(
        json!({"redis": {"mode": "external", "external": {"url": "redis://r:6379", "cacheUrl": "redis://c:6379"}}}),
        &[],
    );
    let gateway = &find(&r.docs, "Deployment", "tollgate-gateway")["spec"]["template"]["spec"]["containers"]
        [0];
    assert_eq!(
        secret_ref(gateway, "TOLLGATE_REDIS_CACHE_URL"),
        ("tollgate-redis-url".to_owned(), "cacheUrl".to_owned())
    );

    // The plain manifests commit no password: they name a Secret the user creates.
    let manifests =
        std::fs::read_to_string(repo_root().join("manifests/02-tollgate.yaml")).unwrap();
    assert!(manifests.contains("name: tollgate-redis-auth"));
    let docs: Vec<Value> = manifests
        .split("\n---\n")
        .filter_map(|d| serde_yaml::from_str(d).ok())
        .collect();
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "tollgate-redis-auth"),
        "manifests/ must not carry a password"
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

#[test]
fn invalid_values_are_refused_with_a_clear_message() {
    for (values, expect) in [
        (json!({"redis": {"mode": "cluster"}}), "mode"),
        (json!({"gateway": {"replicas": "two"}}), "replicas"),
        (
            json!({"gateway": {"shutdown": {"drainDelay": "soon"}}}),
            "drainDelay",
        ),
        (json!({"unknownKnob": true}), "unknownKnob"),
        (json!({"redis": {"mode": "external"}}), "redis.external.url"),
        (
            json!({"gateway": {"maxBodyBytes": 1048576, "maxInflightBytes": 1024}}),
            "gateway.maxInflightBytes",
        ),
    ] {
        let r = render(values.clone());
        let text = format!("{} {}", r.error.clone().unwrap_or_default(), r.lint);
        assert!(
            r.error.is_some() || r.lint["ok"] == false,
            "{values} was accepted"
        );
        assert!(text.contains(expect), "{values}: {text}");
    }
}

#[test]
fn monitoring_alerts_use_metrics_tollgate_exports() {
    let r = good(
        json!({"monitoring": {"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true, "thresholds": {"errorRate": 0.02}}}}),
        &MONITORING,
    );
    let monitors: Vec<&Value> = r
        .docs
        .iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .collect();
    assert_eq!(monitors.len(), 2);
    for m in &monitors {
        assert_eq!(m["spec"]["endpoints"][0]["port"], "admin");
        assert_eq!(m["spec"]["endpoints"][0]["path"], "/metrics");
        // Only the metrics Services carry the admin port.
        assert_eq!(
            m["spec"]["selector"]["matchLabels"]["tollgate.dev/metrics"],
            "true"
        );
    }
    let rule = r
        .docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .unwrap();
    let alerts: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let names: BTreeSet<&str> = alerts
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    for expected in [
        "TollgateHighErrorRate",
        "TollgateHighLatency",
        "TollgateProviderDown",
        "TollgateCostSpike",
        "TollgateRedisUnavailable",
        "TollgateConfigNotPropagating",
    ] {
        assert!(names.contains(expected), "{expected} in {names:?}");
    }
    let error_rate = alerts
        .iter()
        .find(|a| a["alert"] == "TollgateHighErrorRate")
        .unwrap();
    assert!(error_rate["expr"].as_str().unwrap().contains("> 0.02"));
    assert!(
        error_rate["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("2 %")
    );

    // Every metric an alert uses is one the gateway or the operator registers (families
    // without samples are not exposed, so the registrations are read from the source).
    let mut exported = BTreeSet::new();
    for (file, prefix) in [
        ("gateway/src/metrics.rs", "tollgate_"),
        ("operator/src/metrics.rs", "tollgate_operator_"),
    ] {
        let source = std::fs::read_to_string(repo_root().join(file)).unwrap();
        for part in source.split(".register(").skip(1) {
            let name = part
                .trim_start()
                .strip_prefix('"')
                .and_then(|p| p.split('"').next())
                .unwrap();
            exported.insert(format!("{prefix}{name}"));
        }
    }
    assert!(exported.len() > 15, "{exported:?}");
    for alert in &alerts {
        let expr = alert["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("tollgate_") {
                continue;
            }
            let family = ["_bucket", "_total", "_count", "_sum"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(word);
            assert!(
                exported.contains(family),
                "{}: {word} is not exported ({exported:?})",
                alert["alert"]
            );
        }
    }
}

/// The CustomResourceDefinitions among rendered documents, by the kind they define.
fn crds_by_kind(docs: &[Value]) -> BTreeMap<String, Value> {
    docs.iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(|c| {
            (
                c["spec"]["names"]["kind"].as_str().unwrap().to_owned(),
                c.clone(),
            )
        })
        .collect()
}

#[test]
fn the_chart_ships_the_generated_crds_as_templates_that_uninstall_keeps() {
    let r = good(json!({}), &[]);
    assert!(
        r.crds.is_empty(),
        "nothing in the chart's crds/, which Helm never upgrades: {:?}",
        kinds(&r.crds)
    );
    let shipped = crds_by_kind(&r.docs);
    let committed = tollgate_tests::committed_crds();
    assert_eq!(
        shipped.keys().collect::<Vec<_>>(),
        committed.keys().collect::<Vec<_>>()
    );
    for (kind, crd) in &committed {
        let mut shipped = shipped[kind].clone();
        let annotations = shipped["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        assert_eq!(
            annotations,
            Some(json!({"helm.sh/resource-policy": "keep"})),
            "{kind}: `helm uninstall` must leave the CRD (and every {kind}) in place"
        );
        assert!(
            shipped == *crd,
            "charts/tollgate/files/crds/ differs from crds/ for {kind}: run `cargo run -p tollgate-api --bin tollgate-crdgen`"
        );
    }
    // crds.keep=false: exactly the generated CRDs, which `helm uninstall` deletes.
    let r = good(json!({"crds": {"keep": false}}), &[]);
    assert!(
        crds_by_kind(&r.docs) == committed,
        "with crds.keep=false the chart renders exactly crds/"
    );
}

#[test]
fn crds_install_false_leaves_the_crds_to_whoever_manages_them() {
    let r = good(json!({"crds": {"install": false}}), &[]);
    assert!(
        r.crds.is_empty() && crds_by_kind(&r.docs).is_empty(),
        "{:?}",
        kinds(&r.docs)
    );
    // The rest of the release is unchanged.
    let rest: Vec<String> = kinds(&good(json!({}), &[]).docs)
        .into_iter()
        .filter(|k| !k.starts_with("CustomResourceDefinition/"))
        .collect();
    assert_eq!(kinds(&r.docs), rest);
}

#[test]
fn values_are_all_documented() {
    let text = std::fs::read_to_string(repo_root().join("charts/tollgate/values.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Free-form blocks documented as a whole.
    let free = [
        "resources:",
        "podSecurityContext:",
        "containerSecurityContext:",
    ];
    let mut skip_deeper_than: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if let Some(depth) = skip_deeper_than {
            if indent > depth {
                continue;
            }
            skip_deeper_than = None;
        }
        let Some((key, value)) = trimmed.split_once(':') else {
            continue;
        };
        if free.iter().any(|f| trimmed.starts_with(f)) {
            skip_deeper_than = Some(indent);
        }
        let is_group = value.trim().is_empty();
        if is_group {
            continue;
        }
        let documented = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.trim_start().starts_with('#'));
        assert!(
            documented,
            "values.yaml line {}: `{key}` has no comment",
            i + 1
        );
    }
}

#[test]
fn notes_tell_the_user_how_to_create_a_key_and_call_the_gateway() {
    let r = good(json!({}), &[]);
    for needle in [
        "kind: ApiKey",
        "my-first-key-key",
        "kubectl port-forward",
        "/v1/chat/completions",
        "svc/tollgate-gateway",
    ] {
        assert!(
            r.notes.contains(needle),
            "NOTES.txt lacks {needle}:\n{}",
            r.notes
        );
    }
}

#[test]
fn manifests_match_the_default_render() {
    let dir = tempfile::tempdir().unwrap();
    let out = helm(&["manifests", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed: PathBuf = repo_root().join("manifests");
    for name in ["00-namespace.yaml", "01-crds.yaml", "02-tollgate.yaml"] {
        let fresh = std::fs::read_to_string(dir.path().join(name)).unwrap();
        let current = std::fs::read_to_string(committed.join(name)).unwrap_or_default();
        assert!(
            fresh == current,
            "manifests/{name} drifted from the chart; regenerate with `.venv/bin/python tests/chart/helm.py manifests manifests`"
        );
    }
    // The CRDs (templates in the chart) have a file of their own, applied before the
    // objects of the other files.
    let docs = |name: &str| -> Vec<Value> {
        tollgate_tests::yaml_documents(&committed.join(name))
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    };
    let crd_file = docs("01-crds.yaml");
    let crds = crds_by_kind(&crd_file);
    assert_eq!(crds.len(), crd_file.len(), "01-crds.yaml holds only CRDs");
    assert_eq!(
        crds.keys().collect::<Vec<_>>(),
        tollgate_tests::committed_crds().keys().collect::<Vec<_>>()
    );
    assert!(crds_by_kind(&docs("02-tollgate.yaml")).is_empty());
    // And they validate, Namespace included.
    let files: Vec<PathBuf> = ["00-namespace.yaml", "01-crds.yaml", "02-tollgate.yaml"]
        .iter()
        .map(|n| committed.join(n))
        .collect();
    let (ok, output) = tollgate_tests::kubernetes_validate(&files[..2]);
    assert!(ok, "{output}");
}

/// A workspace binary (built if missing: `bash tests/run.sh` builds them all first).
fn binary(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let path = dir.join(name);
    if !path.exists() {
        let package = name.trim_start_matches("tollgate-");
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", &format!("tollgate-{package}"), "--bin", name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok && path.exists(),
            "build {name} first (cargo build --workspace)"
        );
    }
    path
}

/// Starts `program` with the container's environment from the render (secret references
/// replaced by `secrets`, listeners moved to free loopback ports) and waits for its
/// "admin listening" log line: every variable the chart sets is one the binary accepts.
fn runs_with_chart_env(
    program: &str,
    container: &Value,
    args: &[&str],
    secrets: &[(&str, &str)],
    overrides: &[(&str, String)],
) {
    let mut command = Command::new(binary(program));
    command.env_clear().args(args).env("PATH", "/usr/bin:/bin");
    for e in container["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        let value = match (&e["value"], &e["valueFrom"]) {
            (Value::String(v), _) => v.clone(),
            (_, from) if from["secretKeyRef"].is_object() => {
                let key = from["secretKeyRef"]["name"].as_str().unwrap();
                secrets
                    .iter()
                    .find(|(k, _)| *k == key)
                    .unwrap_or_else(|| panic!("no test value for Secret {key}"))
                    .1
                    .to_owned()
            }
            (_, from) if from["fieldRef"].is_object() => "tollgate".to_owned(),
            other => panic!("unexpected env source {other:?}"),
        };
        command.env(name, value);
    }
    for (k, v) in overrides {
        command.env(k, v);
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut seen = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("admin listening") {
                let _ = tx.send(Ok(()));
                return;
            }
        }
        let _ = tx.send(Err(seen));
    });
    let outcome = rx.recv_timeout(std::time::Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(logs)) => panic!("{program} refused the chart's environment:\n{logs}"),
        Err(_) => panic!("{program} did not start with the chart's environment"),
    }
}

#[test]
fn the_binaries_accept_every_setting_the_chart_passes() {
    let r = good(
        json!({"gateway": {"corsOrigins": ["https://app.example.com"], "tracing": {"endpoint": "http://127.0.0.1:1", "protocol": "grpc", "samplerRatio": 0.5}}, "redis": {"mode": "external", "failureMode": "failClosed", "external": {"url": "redis://127.0.0.1:1/0", "cluster": false}}}),
        &[],
    );
    let config = tempfile::tempdir().unwrap();
    let gateway = &find(&r.docs, "Deployment", "tollgate-gateway")["spec"]["template"]["spec"]["containers"]
        [0];
    assert!(
        gateway["args"].is_null(),
        "the image's entrypoint takes no arguments"
    );
    runs_with_chart_env(
        "tollgate-gateway",
        gateway,
        &[],
        &[("tollgate-redis-url", "redis://127.0.0.1:1/0")],
        &[
            ("TOLLGATE_LISTEN", "127.0.0.1:0".into()),
            ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:0".into()),
            ("TOLLGATE_CONFIG_DIRS", config.path().display().to_string()),
        ],
    );
    let operator = &find(&r.docs, "Deployment", "tollgate-operator")["spec"]["template"]["spec"]["containers"]
        [0];
    let args: Vec<&str> = operator["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    runs_with_chart_env(
        "tollgate-operator",
        operator,
        &args,
        &[("tollgate-redis-url", "redis://127.0.0.1:1/0")],
        &[
            ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:0".into()),
            // Nothing listens there: the operator starts and keeps retrying.
            ("TOLLGATE_KUBE_URL", "http://127.0.0.1:1".into()),
        ],
    );
}

/// Metric families the catalogue (docs/metrics.md) lists.
fn catalogued_metrics() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("| `tollgate_"))
        .map(|l| l.split('`').nth(1).unwrap().to_owned())
        .collect()
}

/// The `tollgate_*` metric families a PromQL expression uses.
fn metrics_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tollgate_"))
        .map(|w| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

#[test]
fn the_grafana_dashboard_is_valid_and_queries_only_catalogued_metrics() {
    let r = good(
        json!({"monitoring": {"grafanaDashboard": {"enabled": true, "namespace": "monitoring"}}}),
        &[],
    );
    let cm = find(&r.docs, "ConfigMap", "tollgate-dashboard");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(cm["data"]["tollgate.json"].as_str().unwrap()).expect("valid JSON");
    assert_eq!(dashboard["uid"], "tollgate-overview");
    let catalogue = catalogued_metrics();
    let mut used = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_i64().unwrap()),
            "panel ids are unique"
        );
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let metrics = metrics_in(expr);
            assert!(!metrics.is_empty(), "{expr}");
            for m in metrics {
                assert!(
                    catalogue.contains(&m),
                    "panel {:?} queries {m}, which is not in docs/metrics.md",
                    panel["title"]
                );
                used.insert(m);
            }
        }
    }
    // The areas the dashboard promises.
    for needed in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds",
        "tollgate_request_overhead_seconds",
        "tollgate_tokens_total",
        "tollgate_cost_total",
        "tollgate_limit_rejections_total",
        "tollgate_cache_lookups_total",
        "tollgate_upstream_attempts_total",
        "tollgate_redis_up",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
    // Off by default.
    assert!(
        !kinds(&good(json!({}), &[]).docs)
            .iter()
            .any(|k| k == "ConfigMap/tollgate-dashboard")
    );
    // The alerts use catalogued metrics too.
    let r = good(
        json!({"monitoring": {"prometheusRule": {"enabled": true}}}),
        &MONITORING,
    );
    let rule = r
        .docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .unwrap();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for alert in group["rules"].as_array().unwrap() {
            for m in metrics_in(alert["expr"].as_str().unwrap()) {
                assert!(
                    catalogue.contains(&m),
                    "{}: {m} not in docs/metrics.md",
                    alert["alert"]
                );
            }
        }
    }
}

#[test]
fn egress_and_proxy_settings_reach_the_pods_that_enforce_them() {
    let r = render(
        json!({"allowLinkLocalUpstreams": true, "gateway": {"trustedProxies": ["10.0.0.0/8"]}}),
    );
    let env_of = |component: &str| -> Vec<Value> {
        r.docs
            .iter()
            .find(|d| {
                d["kind"] == "Deployment"
                    && d["metadata"]["labels"]["app.kubernetes.io/component"] == component
            })
            .unwrap_or_else(|| panic!("a {component} Deployment"))["spec"]["template"]["spec"]
            ["containers"][0]["env"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let has = |env: &[Value], name: &str, value: &str| {
        env.iter().any(|e| e["name"] == name && e["value"] == value)
    };
    let gateway = env_of("gateway");
    assert!(has(&gateway, "TOLLGATE_TRUSTED_PROXIES", "10.0.0.0/8"));
    // The in-flight memory budget is always set (256 MiB by default).
    assert!(has(&gateway, "TOLLGATE_MAX_INFLIGHT_BYTES", "268435456"));
    assert!(has(&gateway, "TOLLGATE_ALLOW_LINK_LOCAL_UPSTREAMS", "true"));
    assert!(has(
        &env_of("operator"),
        "TOLLGATE_ALLOW_LINK_LOCAL_UPSTREAMS",
        "true"
    ));
    // Off by default: neither is set.
    let defaults = render(json!({}));
    let text = serde_json::to_string(&defaults.docs).unwrap();
    assert!(!text.contains("TOLLGATE_ALLOW_LINK_LOCAL_UPSTREAMS"));
    assert!(!text.contains("TOLLGATE_TRUSTED_PROXIES"));
}

#[test]
fn network_defaults_are_closed_and_metrics_never_share_the_api_service() {
    let port_names = |svc: &Value| -> Vec<String> {
        svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    // A public API does not publish the admin port (metrics, probes).
    let r = good(
        json!({"gateway": {"service": {"type": "LoadBalancer"}}}),
        &[],
    );
    let api = find(&r.docs, "Service", "tollgate-gateway");
    assert_eq!(api["spec"]["type"], "LoadBalancer");
    assert_eq!(port_names(api), ["http"]);
    let metrics = find(&r.docs, "Service", "tollgate-gateway-metrics");
    assert_eq!(metrics["spec"]["type"], "ClusterIP");
    assert_eq!(port_names(metrics), ["admin"]);

    // NetworkPolicies by default: the API open to the cluster's pods, admin ports closed.
    let r = good(json!({}), &[]);
    let gateway = find(&r.docs, "NetworkPolicy", "tollgate-gateway");
    let rules = gateway["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0]["ports"][0]["port"], "http");
    assert_eq!(rules[0]["from"], json!([{"namespaceSelector": {}}]));
    let operator = find(&r.docs, "NetworkPolicy", "tollgate-operator");
    assert_eq!(operator["spec"]["ingress"], json!([]));
    assert!(
        !r.docs
            .iter()
            .any(|d| d["metadata"]["name"] == "tollgate-gateway-egress"),
        "egress stays open unless asked"
    );

    // Scraping is opened to exactly the peers named.
    let scraper = json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]);
    let r = good(
        json!({"networkPolicy": {"metricsFrom": scraper, "egress": {"enabled": true, "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}], "ports": [{"port": 443, "protocol": "TCP"}]}}}),
        &[],
    );
    for name in ["tollgate-gateway", "tollgate-operator"] {
        let rules = find(&r.docs, "NetworkPolicy", name)["spec"]["ingress"]
            .as_array()
            .unwrap()
            .clone();
        let admin = rules
            .iter()
            .find(|r| r["ports"][0]["port"] == "admin")
            .unwrap_or_else(|| panic!("{name}: no admin rule"));
        assert_eq!(admin["from"], scraper, "{name}");
    }
    let egress = find(&r.docs, "NetworkPolicy", "tollgate-gateway-egress");
    let to: Vec<&Value> = egress["spec"]["egress"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(to[0]["ports"][0]["port"], 53, "DNS first");
    assert_eq!(
        to.last().unwrap()["to"][0]["ipBlock"]["except"],
        json!(["169.254.0.0/16"])
    );
}
