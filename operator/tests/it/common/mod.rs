//! What the process-level tests (`e2e`, `faults`, `tenancy`) share: the operator started
//! against the emulated Kubernetes API (on `tollgate-testkit`'s processes), the chart's
//! RBAC enforced there, and readers of what the operator wrote.

#![allow(dead_code)]

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use base64::Engine;
use serde_json::Value;
use tollgate_api::parts;
use tollgate_kube_emulator::{Emulator, rbac::Rbac};
pub use tollgate_testkit::{process::Proc, redis::Redis};

/// Selects the objects the operator generates for gateways (the configuration parts).
pub const CONFIG_SELECTOR: &str =
    "app.kubernetes.io/managed-by=tollgate-operator,tollgate.dev/config-part";
/// The API version of Tollgate's custom resources.
pub const TG: &str = "tollgate.dev/v1alpha1";

/// The operator binary Cargo built for these tests.
pub fn operator_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate-operator"))
}

/// Starts `tollgate-operator run` against `emulator` as `identity` (namespace `default`,
/// gateway namespace `tollgate`, debounce 100 ms, JSON logs) with `extra` arguments and
/// `env`, and waits until it serves its admin listener: returns it with that address.
pub fn start_operator(
    emulator: &Emulator,
    identity: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, String) {
    let url = emulator.url();
    let mut args = vec![
        "run",
        "--kube-url",
        &url,
        "--namespaces",
        "default",
        "--gateway-namespace",
        "tollgate",
        "--admin-listen",
        "127.0.0.1:0",
        "--debounce",
        "100ms",
        "--max-debounce",
        "1s",
        "--identity",
        identity,
        "--log-format",
        "json",
    ];
    args.extend_from_slice(extra);
    let mut env = env.to_vec();
    env.push(("POD_NAMESPACE", "tollgate"));
    let p = Proc::spawn(operator_binary(), &args, &env);
    let admin = p.addr("admin listening");
    (p, admin)
}

/// One series of the operator's `/metrics` at `admin` (0 when absent).
pub async fn metric(admin: &str, series: &str) -> u64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .unwrap();
    let series = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap_or(0))
}

/// The condition `type_` in the status of the Tollgate object `plural`/`name` (namespace
/// `default`), if it has one.
pub fn condition(e: &Emulator, plural: &str, name: &str, type_: &str) -> Option<Value> {
    e.get(TG, plural, "default", name)?["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Who holds the operator's leader-election Lease, if anybody.
pub fn lease_holder(emulator: &Emulator) -> Option<String> {
    emulator.get(
        "coordination.k8s.io/v1",
        "leases",
        "tollgate",
        "tollgate-operator",
    )?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// The bytes of a Secret's `data` value (base64), empty if it has none.
pub fn decode(data: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(data.as_str().unwrap_or_default())
        .unwrap_or_default()
}

/// The configuration gateways would load from the generated objects, if any: an error
/// when they are not a consistent set.
pub fn served(e: &Emulator) -> Option<Result<parts::AssembledConfig, String>> {
    e.get("v1", "configmaps", "tollgate", "tollgate-gateway-config")?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // The configuration ConfigMap and any routing shards.
    for cm in e
        .list_selected("v1", "configmaps", "tollgate", CONFIG_SELECTOR)
        .unwrap()
    {
        for (k, v) in cm["data"].as_object().into_iter().flatten() {
            files.insert(
                k.clone(),
                v.as_str().unwrap_or_default().as_bytes().to_vec(),
            );
        }
    }
    for s in e
        .list_selected("v1", "secrets", "tollgate", CONFIG_SELECTOR)
        .unwrap()
    {
        for (k, v) in s["data"].as_object().into_iter().flatten() {
            files.insert(k.clone(), decode(v));
        }
    }
    Some(parts::assemble(&files).map_err(|err| err.to_string()))
}

/// The chart rendered with `values` (release `tollgate` in namespace `tollgate`) by the
/// real Helm SDK, as objects.
fn rendered_chart(values: Value) -> Vec<Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var_os("TOLLGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/python"));
    let output = Command::new(&python)
        .arg(root.join("tests/chart/helm.py"))
        .args(["render", "--values-json", &values.to_string()])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; `bash tests/run.sh` installs the Helm SDK into .venv",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "helm.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    out["docs"].as_array().cloned().unwrap_or_default()
}

/// Authorizes every request to `emulator` with the RBAC rules the chart (rendered with
/// `values`) binds to the operator's ServiceAccount, as a cluster would.
pub fn enforce_chart_rbac(emulator: &Emulator, values: Value) {
    let rbac = Rbac::for_service_account(&rendered_chart(values), "tollgate", "tollgate-operator");
    assert!(
        !rbac.rules.is_empty(),
        "the chart binds rules to the operator"
    );
    emulator.enforce_rbac(Some(rbac));
}

/// Requests the emulator refused with 403, as `METHOD path?query`.
pub fn refused(emulator: &Emulator) -> Vec<String> {
    emulator
        .requests()
        .iter()
        .filter(|r| r.status == 403)
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect()
}

/// Asserts that the RBAC rules refused nothing the operator asked for.
#[track_caller]
pub fn assert_nothing_refused(emulator: &Emulator) {
    let refused = refused(emulator);
    assert!(
        refused.is_empty(),
        "requests the chart's RBAC refuses: {refused:#?}"
    );
}

/// Every example manifest (`examples/*.yaml`), as one multi-document YAML stream.
pub fn examples() -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap() + "\n---\n")
        .collect()
}
