//! The kubelet-like projection of ConfigMaps and Secrets into a directory.

use serde_json::json;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tollgate_kube_emulator::{Emulator, Projection, ProjectionOptions};

/// Names of the timestamped version directories.
fn versions(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("..") && n != "..data")
        .collect();
    names.sort();
    names
}

/// The entries a config reader sees (dot-entries skipped).
fn visible(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

fn read(dir: &Path, key: &str) -> String {
    fs::read_to_string(dir.join(key)).unwrap()
}

#[test]
fn projects_selected_configmaps_and_secrets_with_atomic_writer_layout() {
    let emu = Emulator::start();
    emu.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config, labels: {tollgate.dev/config: 'true'}}\n\
         data: {gateway.yaml: 'listen: 8080'}\nbinaryData: {blob.bin: AAEC}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: keys, labels: {tollgate.dev/config: 'true'}}\n\
         stringData: {keys.json: '{\"k\":1}'}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: unrelated}\ndata: {other.yaml: x}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: elsewhere, namespace: other, labels: {tollgate.dev/config: 'true'}}\n\
         data: {other-ns.yaml: x}\n",
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");
    let projection = Projection::start(&emu, "default", "tollgate.dev/config=true", &dir).unwrap();
    assert_eq!(projection.writes(), 1);

    assert_eq!(visible(&dir), ["blob.bin", "gateway.yaml", "keys.json"]);
    assert_eq!(read(&dir, "gateway.yaml"), "listen: 8080");
    assert_eq!(
        read(&dir, "keys.json"),
        "{\"k\":1}",
        "Secret values are decoded"
    );
    assert_eq!(fs::read(dir.join("blob.bin")).unwrap(), [0, 1, 2]);
    // Layout: ..data -> ..<timestamp>, <key> -> ..data/<key>.
    let version = versions(&dir);
    assert_eq!(version.len(), 1);
    assert!(version[0].starts_with(&format!("..{}", jiff::Timestamp::now().strftime("%Y_"))));
    assert_eq!(
        fs::read_link(dir.join("..data")).unwrap(),
        Path::new(&version[0])
    );
    assert_eq!(
        fs::read_link(dir.join("gateway.yaml")).unwrap(),
        Path::new("..data/gateway.yaml")
    );
    assert!(
        fs::symlink_metadata(dir.join("..data/gateway.yaml"))
            .unwrap()
            .is_file()
    );

    // Nothing changed: no new version.
    assert!(!projection.sync().unwrap());

    // A changed value: new version, old one removed, links unchanged.
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "config",
        json!({"data": {"gateway.yaml": "listen: 9090"}}),
    )
    .unwrap();
    assert!(
        emu.wait_for_blocking(Duration::from_secs(2), |_| read(&dir, "gateway.yaml")
            == "listen: 9090")
    );
    // Waits for a write the poller may still be finishing (old version removal).
    assert!(!projection.sync().unwrap());
    let next = versions(&dir);
    assert_eq!(next.len(), 1);
    assert_ne!(next, version);
    assert_eq!(projection.writes(), 2);

    // A key, a whole Secret, then the selector match disappear.
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "config",
        json!({"binaryData": null}),
    )
    .unwrap();
    emu.delete("v1", "secrets", "default", "keys").unwrap();
    projection.sync().unwrap();
    assert_eq!(visible(&dir), ["gateway.yaml"]);
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "config",
        json!({"metadata": {"labels": null}}),
    )
    .unwrap();
    projection.sync().unwrap();
    assert!(visible(&dir).is_empty());
    assert!(
        dir.join("..data").exists(),
        "an empty version is still a version"
    );

    // Polling stops when the projection is dropped.
    drop(projection);
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "config",
        json!({"metadata": {"labels": {"tollgate.dev/config": "true"}}}),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(visible(&dir).is_empty());
}

#[test]
fn readers_never_see_a_half_written_version() {
    let emu = Emulator::start();
    let doc = |n: u32| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: pair, labels: {{app: gw}}}}\ndata: {{a: '{n}', b: '{n}'}}\n"
        )
    };
    emu.apply_yaml(&doc(0)).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let projection = Projection::start(&emu, "default", "app=gw", &dir).unwrap();

    // A reader resolves ..data once and reads both files from that version,
    // like a config loader that follows the symlink.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut consistent_reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let Ok(version) = fs::read_link(dir.join("..data")) else {
                    continue;
                };
                let a = fs::read_to_string(dir.join(&version).join("a"));
                let b = fs::read_to_string(dir.join(&version).join("b"));
                // A version removed after the swap may vanish mid-read; a
                // version that exists is always complete.
                if let (Ok(a), Ok(b)) = (a, b) {
                    assert_eq!(a, b, "torn read in {version:?}");
                    consistent_reads += 1;
                }
            }
            consistent_reads
        })
    };
    for n in 1..=20 {
        emu.apply_yaml(&doc(n)).unwrap();
        projection.sync().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(read(&dir, "a"), "20");
    assert_eq!(versions(&dir).len(), 1, "old versions are cleaned up");
}

/// Reads `keys` from one resolved version, as a loader following `..data` does.
fn read_version(dir: &Path, keys: &[&str]) -> Option<Vec<String>> {
    let version = fs::read_link(dir.join("..data")).ok()?;
    keys.iter()
        .map(|key| fs::read_to_string(dir.join(&version).join(key)).ok())
        .collect()
}

fn rv_of(emu: &Emulator, plural: &str, name: &str) -> String {
    emu.get("v1", plural, "default", name).unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

const PAIR: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: config, labels: {app: gw}}\n\
                    data: {config.yaml: '1'}\n---\n\
                    apiVersion: v1\nkind: Secret\nmetadata: {name: keys, labels: {app: gw}}\n\
                    stringData: {keys.json: '1'}\n";

#[test]
fn a_lagging_secret_pairs_with_a_new_configmap_until_it_catches_up() {
    const SECRET_DELAY: Duration = Duration::from_secs(3);
    let emu = Emulator::start();
    emu.apply_yaml(PAIR).unwrap();
    let old_secret = rv_of(&emu, "secrets", "keys");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let options = ProjectionOptions {
        object_delays: BTreeMap::from([("secrets/keys".to_string(), (SECRET_DELAY, SECRET_DELAY))]),
        ..ProjectionOptions::default()
    };
    let projection = Projection::start_with(&emu, "default", "app=gw", &dir, options).unwrap();
    // The state at start is not delayed.
    assert_eq!(
        read_version(&dir, &["config.yaml", "keys.json"]).unwrap(),
        ["1", "1"]
    );

    // Both objects change together; the Secret's copy lags.
    let written = Instant::now();
    emu.patch_merge(
        "v1",
        "secrets",
        "default",
        "keys",
        json!({"stringData": {"keys.json": "2"}}),
    )
    .unwrap();
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "config",
        json!({"data": {"config.yaml": "2"}}),
    )
    .unwrap();
    let (new_config, new_secret) = (
        rv_of(&emu, "configmaps", "config"),
        rv_of(&emu, "secrets", "keys"),
    );
    assert!(emu.wait_for_blocking(Duration::from_secs(20), |_| {
        projection.visible_versions().get("configmaps/config") == Some(&new_config)
    }));
    let projected = projection.visible_versions();
    let files = read_version(&dir, &["config.yaml", "keys.json"]).unwrap();
    // The Secret's change cannot be visible before its delay has passed.
    if written.elapsed() < SECRET_DELAY {
        assert_eq!(projected["secrets/keys"], old_secret, "{projected:?}");
        assert_eq!(files, ["2", "1"], "a new ConfigMap with the old Secret");
        assert_eq!(projection.writes(), 2);
    }

    // Eventually both.
    assert!(emu.wait_for_blocking(Duration::from_secs(30), |_| {
        projection.visible_versions().get("secrets/keys") == Some(&new_secret)
    }));
    assert_eq!(
        read_version(&dir, &["config.yaml", "keys.json"]).unwrap(),
        ["2", "2"]
    );
    assert!(!projection.sync().unwrap(), "nothing left to catch up");

    // Deletions lag the same way.
    let deleted = Instant::now();
    emu.delete("v1", "secrets", "default", "keys").unwrap();
    projection.sync().unwrap();
    if deleted.elapsed() < SECRET_DELAY {
        assert_eq!(visible(&dir), ["config.yaml", "keys.json"]);
    }
    assert!(
        emu.wait_for_blocking(Duration::from_secs(30), |_| visible(&dir)
            == ["config.yaml"])
    );
    assert_eq!(
        projection.visible_versions().keys().collect::<Vec<_>>(),
        ["configmaps/config"]
    );
}

#[test]
fn random_delays_keep_each_object_in_order_and_converge() {
    let emu = Emulator::start();
    emu.apply_yaml(PAIR).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let options = ProjectionOptions {
        object_delay: (Duration::ZERO, Duration::from_millis(400)),
        seed: 42,
        sync_period: Duration::from_millis(20),
        ..ProjectionOptions::default()
    };
    let projection = Projection::start_with(&emu, "default", "app=gw", &dir, options).unwrap();
    let numbers = |versions: &BTreeMap<String, String>| -> Vec<u64> {
        versions.values().map(|rv| rv.parse().unwrap()).collect()
    };
    let mut last = numbers(&projection.visible_versions());
    for n in 2..=20 {
        emu.patch_merge(
            "v1",
            "configmaps",
            "default",
            "config",
            json!({"data": {"config.yaml": n.to_string()}}),
        )
        .unwrap();
        emu.patch_merge(
            "v1",
            "secrets",
            "default",
            "keys",
            json!({"stringData": {"keys.json": n.to_string()}}),
        )
        .unwrap();
        // Each object's projected version only moves forward.
        let now = numbers(&projection.visible_versions());
        assert!(
            now.iter().zip(&last).all(|(now, last)| now >= last),
            "{last:?} -> {now:?}"
        );
        last = now;
        std::thread::sleep(Duration::from_millis(30));
    }
    let final_versions = BTreeMap::from([
        (
            "configmaps/config".to_string(),
            rv_of(&emu, "configmaps", "config"),
        ),
        ("secrets/keys".to_string(), rv_of(&emu, "secrets", "keys")),
    ]);
    assert!(emu.wait_for_blocking(Duration::from_secs(30), |_| {
        projection.visible_versions() == final_versions
    }));
    assert_eq!(
        read_version(&dir, &["config.yaml", "keys.json"]).unwrap(),
        ["20", "20"]
    );
    assert_eq!(versions(&dir).len(), 1, "old versions are cleaned up");
}

#[test]
fn without_delays_every_change_is_projected_at_once() {
    let emu = Emulator::start();
    emu.apply_yaml(PAIR).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // No delays; a volume sync period long enough that only `sync()` writes.
    let options = ProjectionOptions {
        sync_period: Duration::from_secs(3600),
        ..ProjectionOptions::default()
    };
    let projection = Projection::start_with(&emu, "default", "app=gw", &dir, options).unwrap();
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "config",
        json!({"data": {"config.yaml": "2"}}),
    )
    .unwrap();
    emu.delete("v1", "secrets", "default", "keys").unwrap();
    // A forced sync sees every change at once, as with `start`.
    assert!(projection.sync().unwrap());
    assert_eq!(visible(&dir), ["config.yaml"]);
    assert_eq!(read(&dir, "config.yaml"), "2");
    assert_eq!(
        projection.visible_versions(),
        BTreeMap::from([(
            "configmaps/config".to_string(),
            rv_of(&emu, "configmaps", "config")
        )])
    );
    assert_eq!(projection.writes(), 2);
}
