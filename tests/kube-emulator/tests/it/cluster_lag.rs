//! Opt-in cluster lag: asynchronous garbage collection and namespace
//! termination (`EmulatorOptions::gc_delay`) and a watch cache that is behind
//! (`Emulator::delay_watches`).
//!
//! Nothing here asserts that something happens within a short time. A
//! delayed change is asserted *not yet* visible only while less than its
//! delay (several seconds) has passed since the write, measured after the check.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tollgate_kube_emulator::{Emulator, EmulatorOptions, RequestFilter};

const CM: &str = "/api/v1/namespaces/default/configmaps";
const KEYS: &str = "/apis/tollgate.dev/v1alpha1/namespaces/default/apikeys";
/// Long enough for "not yet" checks right after a write.
const LAG: Duration = Duration::from_secs(3);
/// For "eventually" checks.
const PATIENCE: Duration = Duration::from_secs(30);

async fn send(emu: &Emulator, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", emu.url()));
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    (code, resp.json().await.unwrap_or(Value::Null))
}

fn cm(name: &str, owners: &[&Value]) -> Value {
    let refs: Vec<Value> = owners
        .iter()
        .map(|o| {
            json!({"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"],
                   "uid": o["metadata"]["uid"]})
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "ownerReferences": refs}, "data": {"v": "1"}})
}

fn api_key(name: &str) -> Value {
    json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey", "metadata": {"name": name}, "spec": {}})
}

fn get_cm(emu: &Emulator, ns: &str, name: &str) -> Option<Value> {
    emu.get("v1", "configmaps", ns, name)
}

#[tokio::test]
async fn garbage_collection_lags_behind_background_deletes() {
    let emu = Emulator::start_with(EmulatorOptions {
        gc_delay: Some(LAG),
        ..EmulatorOptions::default()
    });
    let (_, owner) = send(&emu, "POST", KEYS, Some(api_key("owner"))).await;
    let (_, other) = send(&emu, "POST", KEYS, Some(api_key("other"))).await;
    let (_, child) = send(&emu, "POST", CM, Some(cm("child", &[&owner]))).await;
    send(&emu, "POST", CM, Some(cm("grandchild", &[&child]))).await;
    send(&emu, "POST", CM, Some(cm("shared", &[&owner, &other]))).await;

    let deleted = Instant::now();
    let (code, _) = send(&emu, "DELETE", &format!("{KEYS}/owner"), None).await;
    assert_eq!(code, 200);
    assert!(
        emu.get("tollgate.dev/v1alpha1", "apikeys", "default", "owner")
            .is_none()
    );
    let child_there = get_cm(&emu, "default", "child").is_some();
    let shared_refs = get_cm(&emu, "default", "shared").unwrap()["metadata"]["ownerReferences"]
        .as_array()
        .map_or(0, Vec::len);
    if deleted.elapsed() < LAG {
        assert!(child_there, "the dependent outlives its owner for a while");
        assert_eq!(
            shared_refs, 2,
            "the reference to the gone owner is still there"
        );
    }

    // The collector catches up, one level of the cascade after the other.
    assert!(
        emu.wait_for(PATIENCE, |e| get_cm(e, "default", "child").is_none())
            .await
    );
    assert!(
        emu.wait_for(PATIENCE, |e| get_cm(e, "default", "grandchild").is_none())
            .await,
        "cascades"
    );
    let shared = get_cm(&emu, "default", "shared").expect("a live owner keeps it");
    assert_eq!(
        shared["metadata"]["ownerReferences"][0]["name"], "other",
        "{shared}"
    );
    assert_eq!(
        shared["metadata"]["ownerReferences"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Foreground and Orphan act at once, as without a gc_delay.
    let (_, fg_owner) = send(&emu, "POST", KEYS, Some(api_key("fg"))).await;
    send(&emu, "POST", CM, Some(cm("fg-child", &[&fg_owner]))).await;
    send(
        &emu,
        "DELETE",
        &format!("{KEYS}/fg?propagationPolicy=Foreground"),
        None,
    )
    .await;
    assert!(get_cm(&emu, "default", "fg-child").is_none());
    let (_, orphan_owner) = send(&emu, "POST", KEYS, Some(api_key("orphaner"))).await;
    send(&emu, "POST", CM, Some(cm("orphan", &[&orphan_owner]))).await;
    send(
        &emu,
        "DELETE",
        &format!("{KEYS}/orphaner?propagationPolicy=Orphan"),
        None,
    )
    .await;
    let orphan = get_cm(&emu, "default", "orphan").unwrap();
    assert!(
        orphan["metadata"].get("ownerReferences").is_none(),
        "{orphan}"
    );

    // The direct API deletes in the background too; so does an owner whose
    // finalizer goes away.
    let owner = emu
        .apply_object(
            json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey",
            "metadata": {"name": "held", "finalizers": ["tollgate.dev/cleanup"]}, "spec": {}}),
        )
        .unwrap();
    emu.apply_object(cm("held-child", &[&owner])).unwrap();
    emu.delete("tollgate.dev/v1alpha1", "apikeys", "default", "held")
        .unwrap();
    assert!(
        get_cm(&emu, "default", "held-child").is_some(),
        "the finalizer holds the owner"
    );
    emu.patch_merge(
        "tollgate.dev/v1alpha1",
        "apikeys",
        "default",
        "held",
        json!({"metadata": {"finalizers": null}}),
    )
    .unwrap();
    assert!(
        emu.get("tollgate.dev/v1alpha1", "apikeys", "default", "held")
            .is_none()
    );
    assert!(
        emu.wait_for(PATIENCE, |e| get_cm(e, "default", "held-child").is_none())
            .await
    );
}

#[tokio::test]
async fn namespaces_terminate_before_they_go() {
    let emu = Emulator::start_with(EmulatorOptions {
        gc_delay: Some(LAG),
        ..EmulatorOptions::default()
    });
    send(
        &emu,
        "POST",
        "/api/v1/namespaces",
        Some(json!({"metadata": {"name": "tmp"}})),
    )
    .await;
    let tmp_cms = "/api/v1/namespaces/tmp/configmaps";
    send(&emu, "POST", tmp_cms, Some(cm("plain", &[]))).await;
    let mut held = cm("held", &[]);
    held["metadata"]["finalizers"] = json!(["tollgate.dev/cleanup"]);
    send(&emu, "POST", tmp_cms, Some(held)).await;

    let deleted = Instant::now();
    let (code, ns) = send(&emu, "DELETE", "/api/v1/namespaces/tmp", None).await;
    assert_eq!(code, 200);
    assert_eq!(
        ns["kind"], "Namespace",
        "a terminating namespace answers itself: {ns}"
    );
    assert_eq!(ns["status"]["phase"], "Terminating");
    assert!(ns["metadata"]["deletionTimestamp"].is_string());
    let plain_there = get_cm(&emu, "tmp", "plain").is_some();
    if deleted.elapsed() < LAG {
        assert!(
            plain_there,
            "contents go only when the namespace controller gets to them"
        );
    }
    // Nothing new may be created in it.
    let (code, status) = send(&emu, "POST", tmp_cms, Some(cm("late", &[]))).await;
    assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")));
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("because it is being terminated"),
        "{status}"
    );
    let (code, _) = send(&emu, "DELETE", "/api/v1/namespaces/tmp", None).await;
    assert_eq!(code, 200, "deleting it again is fine");

    // The contents are deleted; the finalizer keeps one, and the namespace, around.
    assert!(
        emu.wait_for(PATIENCE, |e| get_cm(e, "tmp", "plain").is_none()
            && get_cm(e, "tmp", "held")
                .is_some_and(|h| h["metadata"]["deletionTimestamp"].is_string()))
            .await
    );
    assert_eq!(
        emu.get("v1", "namespaces", "", "tmp").unwrap()["status"]["phase"],
        "Terminating"
    );
    emu.patch_merge(
        "v1",
        "configmaps",
        "tmp",
        "held",
        json!({"metadata": {"finalizers": null}}),
    )
    .unwrap();
    assert!(
        emu.wait_for(PATIENCE, |e| e.get("v1", "namespaces", "", "tmp").is_none())
            .await
    );
    assert!(emu.list("v1", "configmaps", "tmp").is_empty());
    // The name can be used again.
    let (code, _) = send(
        &emu,
        "POST",
        "/api/v1/namespaces",
        Some(json!({"metadata": {"name": "tmp"}})),
    )
    .await;
    assert_eq!(code, 201);
}

/// Newline-delimited watch events of one HTTP watch.
struct Watch {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Watch {
    async fn start(emu: &Emulator, query: &str) -> Watch {
        let resp = reqwest::get(format!("{}{CM}?watch=true&{query}", emu.url()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        Watch {
            resp,
            buf: Vec::new(),
        }
    }

    /// The next event as `(type, name, v)`, or `None` if nothing came within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<(String, String, String)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let ev: Value = serde_json::from_slice(&line).unwrap();
                let field = |v: &Value| v.as_str().unwrap_or_default().to_string();
                return Some((
                    field(&ev["type"]),
                    field(&ev["object"]["metadata"]["name"]),
                    field(&ev["object"]["data"]["v"]),
                ));
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }
}

fn event(ty: &str, name: &str, v: &str) -> Option<(String, String, String)> {
    Some((ty.into(), name.into(), v.into()))
}

#[tokio::test]
async fn watch_events_lag_while_reads_are_current() {
    let emu = Emulator::start();
    emu.delay_watches(LAG);
    let mut w = Watch::start(&emu, &format!("resourceVersion={}", emu.resource_version())).await;

    let created = Instant::now();
    let (code, _) = send(&emu, "POST", CM, Some(cm("a", &[]))).await;
    assert_eq!(code, 201);
    let (code, _) = send(&emu, "GET", &format!("{CM}/a"), None).await;
    assert_eq!(code, 200, "GET answers the latest state");
    let (_, list) = send(&emu, "GET", CM, None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "so does LIST");
    let early = w.next(Duration::from_millis(500)).await;
    assert!(early.is_none() || created.elapsed() >= LAG, "{early:?}");

    let modified = Instant::now();
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "a",
        json!({"data": {"v": "2"}}),
    )
    .unwrap();
    if early.is_none() {
        assert_eq!(w.next(PATIENCE).await, event("ADDED", "a", "1"));
    }
    assert!(created.elapsed() >= LAG, "not before the lag");
    assert_eq!(
        w.next(PATIENCE).await,
        event("MODIFIED", "a", "2"),
        "in order"
    );
    assert!(modified.elapsed() >= LAG);

    // A watch resuming from a resourceVersion replays with the same lag.
    let before = emu.resource_version();
    let deleted = Instant::now();
    emu.delete("v1", "configmaps", "default", "a").unwrap();
    let mut resumed = Watch::start(&emu, &format!("resourceVersion={before}")).await;
    assert_eq!(resumed.next(PATIENCE).await, event("DELETED", "a", "2"));
    assert!(deleted.elapsed() >= LAG);

    // A new lag applies at once, to waiting events too.
    emu.delay_watches(Duration::from_secs(3600));
    emu.apply_object(cm("b", &[])).unwrap();
    // Usually the stream is waiting for the hour to pass by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    emu.delay_watches(Duration::ZERO);
    let mut seen = Vec::new();
    while let Some(ev) = w.next(PATIENCE).await {
        seen.push(ev.clone());
        if ev.1 == "b" {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            event("DELETED", "a", "2").unwrap(),
            event("ADDED", "b", "1").unwrap()
        ]
    );
}

fn client(emu: &Emulator) -> Client {
    let mut config = Config::new(emu.url().parse().unwrap());
    config.default_retry = false;
    Client::try_from(config).unwrap()
}

/// A lagging watch cache hides a change from a reflector until the test
/// forces a relist: `compact()` then `close_watches()`.
#[tokio::test]
async fn compact_and_close_watches_force_a_relist_past_the_lag() {
    let emu = Emulator::start();
    emu.apply_object(cm("a", &[])).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&emu), "default");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let task = tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(PATIENCE, reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    let v = |reader: &reflector::Store<ConfigMap>| {
        reader.state()[0].data.as_ref().unwrap()["v"].clone()
    };
    assert_eq!(v(&reader), "1");
    let lists = RequestFilter::any()
        .method("GET")
        .resource("configmaps")
        .watch(false);
    assert_eq!(emu.count(&lists), 1);

    emu.delay_watches(Duration::from_secs(3600));
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "a",
        json!({"data": {"v": "2"}}),
    )
    .unwrap();
    assert_eq!(get_cm(&emu, "default", "a").unwrap()["data"]["v"], "2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(v(&reader), "1", "the watch cache is an hour behind");

    // The resumed watch is too old for the compacted history (410), so the
    // watcher relists, and LIST is current.
    emu.compact();
    emu.close_watches();
    assert!(
        emu.wait_for(PATIENCE, |_| v(&reader) == "2").await,
        "{:#?}",
        emu.requests()
    );
    assert_eq!(emu.count(&lists), 2);
    task.abort();
}
