//! The kubelet-like projection of ConfigMaps and Secrets into a directory.

use serde_json::json;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tollgate_kube_emulator::{Emulator, Projection};

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
