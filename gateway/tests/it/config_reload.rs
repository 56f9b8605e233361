//! Configuration sources and hot reload: standalone manifests edited in place, operator
//! files swapped the way kubelet swaps a mounted ConfigMap/Secret, broken configurations
//! rejected while the last good one keeps serving, and SIGTERM draining.

use crate::common;

use std::{path::Path, time::Duration};

use common::{DEV_KEY, Gateway, client, eventually, examples};
use serde_json::{Value, json};

const NEW_KEY: &str = "tg_freshlyAddedKeyForTheReloadTest000000001";

fn copy_examples(to: &Path) {
    for sub in ["", "standalone"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for entry in std::fs::read_dir(examples().join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, to.join(sub).join(path.file_name().unwrap())).unwrap();
            }
        }
    }
}

async fn status_with(gw: &Gateway, key: &str) -> u16 {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn readyz(gw: &Gateway) -> Value {
    client()
        .get(gw.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn new_key_manifest() -> String {
    format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{name: newcomer}}\nspec: {{owner: newcomer, allowedModels: [demo-chat]}}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: newcomer-key}}\nstringData: {{apiKey: {NEW_KEY}}}\n"
    )
}

#[tokio::test]
async fn edited_manifests_are_picked_up_and_a_broken_edit_leaves_the_last_good_config_serving() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    let gw = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--reload-interval",
        "100ms",
    ]);
    assert_eq!(status_with(&gw, NEW_KEY).await, 401);
    let first_hash = readyz(&gw).await["configHash"].clone();

    std::fs::write(dir.path().join("newcomer.yaml"), new_key_manifest()).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_with(&gw, NEW_KEY).await == 200
        })
        .await,
        "the new key starts working"
    );
    let second_hash = readyz(&gw).await["configHash"].clone();
    assert_ne!(first_hash, second_hash);

    // A broken file: the whole new version is rejected, the previous one keeps serving.
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: x}\nspec: {owner: [\n",
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("newcomer.yaml")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            readyz(&gw).await["reloads"]["failed"].as_u64() >= Some(1)
        })
        .await,
        "the broken version is counted as rejected"
    );
    let ready = readyz(&gw).await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(
        ready["configHash"], second_hash,
        "the last good config is still served"
    );
    assert!(
        ready["lastError"].as_str().unwrap().contains("broken.yaml"),
        "{ready}"
    );
    assert_eq!(
        status_with(&gw, NEW_KEY).await,
        200,
        "the last good config still has the new key"
    );
    assert_eq!(status_with(&gw, DEV_KEY).await, 200);
    assert!(gw.logs().contains("configuration rejected"));

    // Fixing it loads the fixed version.
    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_with(&gw, NEW_KEY).await == 401
        })
        .await
    );
    assert_eq!(readyz(&gw).await["lastError"], Value::Null);
}

#[tokio::test]
async fn requests_keep_succeeding_while_the_config_is_reloaded_repeatedly() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    let gw = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--reload-interval",
        "50ms",
    ]);
    // Each round changes the configuration, then keeps sending requests until the gateway
    // reports the reload (an observable counter, not an assumed delay).
    let succeeded = |v: Value| v["reloads"]["succeeded"].as_u64().unwrap();
    let mut statuses = Vec::new();
    let mut reloads = succeeded(readyz(&gw).await);
    for round in 0..6 {
        let text = if round % 2 == 0 {
            new_key_manifest()
        } else {
            String::from("# nothing\n")
        };
        std::fs::write(dir.path().join("churn.yaml"), text).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            statuses.push(status_with(&gw, DEV_KEY).await);
            let now = succeeded(readyz(&gw).await);
            if now > reloads {
                reloads = now;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: no reload reported within 30 s"
            );
        }
    }
    assert!(
        statuses.len() >= 6,
        "only {} requests were made",
        statuses.len()
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
}

/// Lays out `files` like a kubelet volume: `..<version>/` holds the data, `..data` links
/// to it, and each file is a link through `..data`.
fn kubelet_publish(dir: &Path, version: &str, files: &[(String, Vec<u8>)]) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).unwrap();
    for (name, bytes) in files {
        std::fs::write(data.join(name), bytes).unwrap();
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    // Atomic swap, as kubelet does it: a new link renamed over `..data`.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    // Then the links of files the new version lacks are removed (they dangle until then).
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !files.iter().any(|(f, _)| *f == name) {
            std::fs::remove_file(dir.join(&name)).unwrap();
        }
    }
}

/// Files by name, as a mounted volume holds them.
type Files = Vec<(String, Vec<u8>)>;

/// Compiles `resources` and returns (ConfigMap files, Secret files).
fn compiled_parts(resources: &Path) -> (Files, Files) {
    use tollgate_api::{compile, manifests, parts};
    let loaded = manifests::load_path(resources).unwrap();
    let secrets = compile::SecretStore::new(&loaded.secrets, compile::DEFAULT_NAMESPACE);
    let out = compile::compile(&loaded.resources, &secrets, jiff::Timestamp::now());
    let split = parts::split(&out.config).unwrap();
    let (mut cm, mut secret) = (Vec::new(), Vec::new());
    for part in split.parts {
        match part.store {
            parts::Store::ConfigMap => cm.push((part.file, part.bytes)),
            parts::Store::Secret => secret.push((part.file, part.bytes)),
        }
    }
    (cm, secret)
}

#[tokio::test]
async fn operator_files_are_loaded_across_kubelet_symlink_swaps_and_only_as_a_consistent_set() {
    let src = tempfile::tempdir().unwrap();
    copy_examples(src.path());
    let (cm1, secret1) = compiled_parts(src.path());
    std::fs::write(src.path().join("newcomer.yaml"), new_key_manifest()).unwrap();
    let (cm2, secret2) = compiled_parts(src.path());

    let cm_dir = tempfile::tempdir().unwrap();
    let secret_dir = tempfile::tempdir().unwrap();
    kubelet_publish(cm_dir.path(), "v1", &cm1);
    kubelet_publish(secret_dir.path(), "v1", &secret1);
    let dirs = format!(
        "{},{}",
        cm_dir.path().display(),
        secret_dir.path().display()
    );
    let gw = Gateway::start(&["--config-dir", &dirs, "--reload-interval", "100ms"]);
    assert_eq!(status_with(&gw, DEV_KEY).await, 200);
    assert_eq!(status_with(&gw, NEW_KEY).await, 401);
    let old_hash = readyz(&gw).await["configHash"].clone();

    // The ConfigMap updates first: its manifest names a key shard the Secret does not
    // have yet. The gateway keeps serving the old, consistent configuration and waits
    // for the missing part: no error.
    kubelet_publish(cm_dir.path(), "v2", &cm2);
    assert!(
        eventually(Duration::from_secs(10), || async {
            readyz(&gw).await["reloads"]["pending"].as_u64() >= Some(1)
        })
        .await,
        "the half-updated set is waited for"
    );
    let ready = readyz(&gw).await;
    assert_eq!(ready["configHash"], old_hash);
    assert_eq!(ready["reloads"]["failed"], 0, "{ready}");
    assert_eq!(ready["lastError"], Value::Null, "{ready}");
    assert!(
        ready["waitingFor"].as_str().unwrap().contains("keys-000-"),
        "{ready}"
    );
    assert_eq!(status_with(&gw, DEV_KEY).await, 200);

    // Then the Secret catches up and the new configuration goes live.
    kubelet_publish(secret_dir.path(), "v2", &secret2);
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_with(&gw, NEW_KEY).await == 200
        })
        .await
    );
    let ready = readyz(&gw).await;
    assert_ne!(ready["configHash"], old_hash);
    assert_eq!(ready["waitingFor"], Value::Null, "{ready}");
}

#[tokio::test]
async fn without_config_files_the_gateway_starts_not_ready_and_becomes_ready_when_they_appear() {
    let cm_dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&[
        "--config-dir",
        cm_dir.path().to_str().unwrap(),
        "--reload-interval",
        "100ms",
    ]);
    let resp = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(DEV_KEY)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));

    let src = tempfile::tempdir().unwrap();
    copy_examples(src.path());
    let (cm, secret) = compiled_parts(src.path());
    kubelet_publish(cm_dir.path(), "v1", &[cm, secret].concat());
    assert!(
        eventually(Duration::from_secs(10), || async {
            status_with(&gw, DEV_KEY).await == 200
        })
        .await
    );
}

#[test]
fn standalone_start_with_unloadable_manifests_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), "kind: [\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-gateway"))
        .args([
            "--resources",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "text",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.yaml"), "{stderr}");
}

#[tokio::test]
async fn sigterm_fails_readiness_first_then_exits_cleanly() {
    let mut gw = Gateway::start(&[
        "--resources",
        examples().to_str().unwrap(),
        "--drain-delay",
        "1s",
        "--shutdown-timeout",
        "5s",
    ]);
    assert_eq!(
        client()
            .get(gw.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        eventually(Duration::from_secs(2), || async {
            client()
                .get(gw.url("/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 503)
        })
        .await,
        "readiness fails during the drain delay"
    );
    assert_eq!(
        status_with(&gw, DEV_KEY).await,
        200,
        "requests are still served while draining"
    );
    let status = tokio::task::spawn_blocking(move || gw.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[tokio::test]
async fn standalone_diagnostics_are_logged_at_start_and_the_rest_serves() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path());
    std::fs::write(
        dir.path().join("broken-route.yaml"),
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: orphan}\nspec: {models: [orphan-model], targets: [{provider: nowhere}]}\n",
    )
    .unwrap();
    let gw = Gateway::start(&["--resources", dir.path().to_str().unwrap()]);
    let logs = gw.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("ProviderNotFound"))
        .unwrap_or_else(|| panic!("{logs}"));
    let entry: Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["level"], "WARN");
    assert_eq!(entry["object"], "RoutePolicy default/orphan");
    assert_eq!(entry["field"], "spec.targets[0].provider");
    assert_eq!(
        status_with(&gw, DEV_KEY).await,
        200,
        "the valid rest of the configuration serves"
    );
}
