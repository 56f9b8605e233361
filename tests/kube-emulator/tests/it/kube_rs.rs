//! The real kube-rs 5 client and runtime against the emulator.

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Config, Discovery, Resource, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate_kube_emulator::{Emulator, EmulatorOptions, RequestFilter};

/// A kube client for the emulator's plain-HTTP URL. Retries are off so that
/// injected 5xx faults surface immediately instead of backing off.
fn client(emu: &Emulator) -> Client {
    let mut config = Config::new(emu.url().parse().unwrap());
    config.default_retry = false;
    Client::try_from(config).unwrap()
}

fn config_map(name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cm.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cm
}

fn data(cm: &ConfigMap, key: &str) -> Option<String> {
    cm.data.as_ref()?.get(key).cloned()
}

#[tokio::test]
async fn reflector_with_label_selector_sees_initial_state_and_changes() {
    let emu = Emulator::start();
    emu.apply_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mine, labels: {app: tollgate}}\ndata: {v: '1'}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: theirs, labels: {app: other}}\ndata: {v: '1'}\n",
    )
    .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&emu), "default");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let stream = watcher(
        api.clone(),
        watcher::Config::default().labels("app=tollgate"),
    )
    .default_backoff()
    .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let _ = events_tx.send(ev.map_err(|e| e.to_string()));
        }
    });

    tokio::time::timeout(Duration::from_secs(2), reader.wait_until_ready())
        .await
        .expect("reflector reaches InitDone")
        .unwrap();
    let names: Vec<String> = reader.state().iter().map(|c| c.name_any()).collect();
    assert_eq!(names, ["mine"]);

    // A change applied behind the operator's back reaches the store.
    emu.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: mine, labels: {app: tollgate}}\ndata: {v: '2'}\n")
        .unwrap();
    let changed = emu
        .wait_for(Duration::from_secs(2), |_| {
            reader
                .state()
                .iter()
                .any(|c| data(c, "v").as_deref() == Some("2"))
        })
        .await;
    assert!(changed, "reflector saw the applied change");

    // Selector transitions: a new matching object appears, a relabelled one disappears.
    api.create(
        &PostParams::default(),
        &config_map("new", &[("app", "tollgate")], &[]),
    )
    .await
    .unwrap();
    emu.patch_merge(
        "v1",
        "configmaps",
        "default",
        "mine",
        json!({"metadata": {"labels": {"app": "gone"}}}),
    )
    .unwrap();
    let moved = emu
        .wait_for(Duration::from_secs(2), |_| {
            let names: Vec<String> = reader.state().iter().map(|c| c.name_any()).collect();
            names == ["new"]
        })
        .await;
    assert!(
        moved,
        "store follows selector transitions: {:?}",
        reader.state()
    );

    task.abort();
    let mut seen = Vec::new();
    while let Ok(ev) = events.try_recv() {
        seen.push(match ev.expect("no watcher errors") {
            watcher::Event::Init => "Init".to_string(),
            watcher::Event::InitApply(c) => format!("InitApply({})", c.name_any()),
            watcher::Event::InitDone => "InitDone".to_string(),
            watcher::Event::Apply(c) => format!("Apply({})", c.name_any()),
            watcher::Event::Delete(c) => format!("Delete({})", c.name_any()),
        });
    }
    assert_eq!(
        seen[..4],
        ["Init", "InitApply(mine)", "InitDone", "Apply(mine)"]
    );
    assert!(
        seen.contains(&"Apply(new)".to_string()) && seen.contains(&"Delete(mine)".to_string()),
        "{seen:?}"
    );
}

#[tokio::test]
async fn streaming_list_watcher_reaches_init_done() {
    let emu = Emulator::start();
    emu.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n")
        .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client(&emu), "default");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = watcher(api.clone(), watcher::Config::default().streaming_lists())
        .default_backoff()
        .reflect(writer);
    let task = tokio::spawn(stream.for_each(|ev| {
        assert!(ev.is_ok(), "{ev:?}");
        async {}
    }));
    tokio::time::timeout(Duration::from_secs(2), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reader.len(), 2);
    api.create(&PostParams::default(), &config_map("c", &[], &[]))
        .await
        .unwrap();
    assert!(
        emu.wait_for(Duration::from_secs(2), |_| reader.len() == 3)
            .await
    );
    let watches = emu.requests_matching(&RequestFilter::any().watch(true));
    assert!(
        watches[0].query.contains("sendInitialEvents=true"),
        "{watches:?}"
    );
    task.abort();
}

/// Retries after 10 ms, so that recovery tests stay fast.
struct FastBackoff;

impl Iterator for FastBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(10))
    }
}

impl kube::runtime::utils::Backoff for FastBackoff {
    fn reset(&mut self) {}
}

#[tokio::test]
async fn watcher_recovers_from_closed_watches_and_410() {
    let emu = Emulator::start_with(EmulatorOptions {
        bookmark_interval: Duration::from_secs(60),
        ..EmulatorOptions::default()
    });
    let api: Api<ConfigMap> = Api::namespaced(client(&emu), "default");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let stream = watcher(api.clone(), watcher::Config::default())
        .backoff(FastBackoff)
        .reflect(writer);
    let task = tokio::spawn(stream.for_each(move |ev| {
        if let Err(e) = ev {
            let _ = errors_tx.send(e.to_string());
        }
        async {}
    }));
    tokio::time::timeout(Duration::from_secs(2), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    let lists = RequestFilter::any()
        .method("GET")
        .resource("configmaps")
        .watch(false);
    let watches = RequestFilter::any().resource("configmaps").watch(true);
    assert_eq!(emu.count(&lists), 1);
    // A watch is logged once its stream has started.
    assert!(
        emu.wait_for(Duration::from_secs(2), |e| e.count(&watches) == 1)
            .await
    );

    // The server ends the watch; the watcher resumes from its resourceVersion
    // without relisting.
    emu.close_watches();
    assert!(
        emu.wait_for(Duration::from_secs(2), |e| e.count(&watches) == 2)
            .await
    );
    api.create(&PostParams::default(), &config_map("a", &[], &[]))
        .await
        .unwrap();
    assert!(
        emu.wait_for(Duration::from_secs(2), |_| reader.len() == 1)
            .await
    );
    assert_eq!(emu.count(&lists), 1);

    // The history is compacted past the watcher's resourceVersion (a write it
    // does not watch moves the counter): the resumed watch gets 410 Gone and
    // the watcher relists.
    emu.apply_yaml("apiVersion: v1\nkind: Secret\nmetadata: {name: elsewhere}\n")
        .unwrap();
    emu.compact();
    emu.close_watches();
    api.create(&PostParams::default(), &config_map("b", &[], &[]))
        .await
        .unwrap();
    let recovered = emu
        .wait_for(Duration::from_secs(2), |e| {
            reader.len() == 2 && e.count(&lists) == 2
        })
        .await;
    assert!(recovered, "{:#?}", emu.requests());
    let error = errors.try_recv().expect("the watcher reported the 410");
    assert!(
        error.contains("410") || error.to_lowercase().contains("too old"),
        "{error}"
    );
    task.abort();
}

#[tokio::test]
async fn server_side_apply_get_opt_and_replace_conflict() {
    let emu = Emulator::start();
    let api: Api<ConfigMap> = Api::namespaced(client(&emu), "default");
    let ssa = PatchParams::apply("x").force();

    let created = api
        .patch(
            "applied",
            &ssa,
            &Patch::Apply(&config_map("applied", &[], &[("k", "1")])),
        )
        .await
        .unwrap();
    assert_eq!(data(&created, "k").as_deref(), Some("1"));
    let unchanged = api
        .patch(
            "applied",
            &ssa,
            &Patch::Apply(&config_map("applied", &[], &[("k", "1")])),
        )
        .await
        .unwrap();
    assert_eq!(
        unchanged.resource_version(),
        created.resource_version(),
        "no-op apply"
    );
    let updated = api
        .patch(
            "applied",
            &ssa,
            &Patch::Apply(&config_map("applied", &[], &[("k", "2")])),
        )
        .await
        .unwrap();
    assert_eq!(data(&updated, "k").as_deref(), Some("2"));
    assert_ne!(updated.resource_version(), created.resource_version());
    assert_eq!(emu.write_count_for("configmaps"), 3);

    assert!(api.get_opt("missing").await.unwrap().is_none());
    let err = api.get("missing").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.is_not_found()),
        "{err:?}"
    );

    let mut stale = api.get("applied").await.unwrap();
    let mut fresh = stale.clone();
    fresh.data = Some(BTreeMap::from([("k".to_string(), "3".to_string())]));
    api.replace("applied", &PostParams::default(), &fresh)
        .await
        .unwrap();
    stale.data = Some(BTreeMap::from([("k".to_string(), "stale".to_string())]));
    let err = api
        .replace("applied", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.is_conflict() && s.code == 409),
        "{err:?}"
    );

    let err = api
        .create(&PostParams::default(), &fresh)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.is_already_exists()),
        "{err:?}"
    );

    let listed = api
        .list(&ListParams::default().fields("metadata.name=applied"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let meta = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(meta.items[0].name_any(), "applied");
    let deleted = api
        .delete("applied", &DeleteParams::default())
        .await
        .unwrap();
    assert!(deleted.is_right(), "built-in kinds answer with a Status");
    assert!(api.get_opt("applied").await.unwrap().is_none());
}

#[tokio::test]
async fn custom_resource_status_and_generation_via_dynamic_api() {
    let emu = Emulator::start();
    let client = client(&emu);
    let gvk = GroupVersionKind::gvk("tollgate.dev", "v1alpha1", "ApiKey");
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let (resource, caps) = discovery.resolve_gvk(&gvk).expect("ApiKey is discoverable");
    assert_eq!(resource.plural, "apikeys");
    assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"));
    let aggregated = Discovery::new(client.clone())
        .run_aggregated()
        .await
        .unwrap();
    assert!(aggregated.resolve_gvk(&gvk).is_some());

    let api: Api<DynamicObject> = Api::namespaced_with(
        client,
        "default",
        &ApiResource::from_gvk_with_plural(&gvk, "apikeys"),
    );
    let ssa = PatchParams::apply("tollgate-operator").force();
    let body = |owner: &str| json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey", "spec": {"owner": owner}});
    let key = api
        .patch("k", &ssa, &Patch::Apply(body("a")))
        .await
        .unwrap();
    assert_eq!(key.metadata.generation, Some(1));
    assert!(key.controller_owner_ref(&resource).is_some(), "uid is set");

    let status = json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "ApiKey",
                        "status": {"phase": "Ready", "observedGeneration": 1}});
    let with_status = api
        .patch_status("k", &ssa, &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(with_status.data["status"]["phase"], "Ready");
    assert_eq!(with_status.data["spec"]["owner"], "a");
    let respec = api
        .patch("k", &ssa, &Patch::Apply(body("b")))
        .await
        .unwrap();
    assert_eq!(respec.metadata.generation, Some(2));
    assert_eq!(
        respec.data["status"]["phase"], "Ready",
        "spec apply keeps status"
    );
    let deleted = api.delete("k", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_left(), "custom resources answer with the object");
}

#[tokio::test]
async fn recorder_publishes_and_deduplicates_events() {
    let emu = Emulator::start();
    let client = client(&emu);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = cms
        .create(&PostParams::default(), &config_map("regarding", &[], &[]))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "tollgate-operator".into(),
            instance: None,
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "Compiled".into(),
        note: Some("configuration compiled".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = cm.object_ref(&());
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let writes = emu.requests_matching(&RequestFilter::writes().resource("events"));
    let methods: Vec<&str> = writes.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(methods, ["POST", "PATCH"]);
    let events = emu.list("events.k8s.io/v1", "events", "default");
    assert_eq!(events.len(), 1);
    let stored: K8sEvent = serde_json::from_value(events[0].clone()).unwrap();
    assert_eq!(stored.reason.as_deref(), Some("Compiled"));
    assert_eq!(stored.series.map(|s| s.count), Some(2));
    assert_eq!(
        stored.regarding.and_then(|r| r.name).as_deref(),
        Some("regarding")
    );
}

#[tokio::test]
async fn lease_acquire_and_conflicting_renewal() {
    let emu = Emulator::start();
    let leases: Api<Lease> = Api::namespaced(client(&emu), "default");
    let mut lease = Lease::default();
    lease.metadata.name = Some("tollgate-leader".into());
    lease.spec = Some(LeaseSpec {
        holder_identity: Some("pod-a".into()),
        lease_duration_seconds: Some(15),
        ..LeaseSpec::default()
    });
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let err = leases
        .create(&PostParams::default(), &lease)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.is_already_exists()),
        "{err:?}"
    );

    // Two candidates read the same version; the second write loses.
    let seen_by_a = leases.get("tollgate-leader").await.unwrap();
    let seen_by_b = seen_by_a.clone();
    let mut renew = seen_by_a;
    renew.spec.as_mut().unwrap().lease_transitions = Some(0);
    leases
        .replace("tollgate-leader", &PostParams::default(), &renew)
        .await
        .unwrap();
    let mut steal = seen_by_b;
    steal.spec.as_mut().unwrap().holder_identity = Some("pod-b".into());
    let err = leases
        .replace("tollgate-leader", &PostParams::default(), &steal)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.is_conflict()),
        "{err:?}"
    );
    let holder = leases
        .get("tollgate-leader")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some("pod-a"));
}

#[tokio::test]
async fn injected_faults_and_kubeconfig_client() {
    let emu = Emulator::start();
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&emu.kubeconfig()).unwrap();
    let mut config =
        Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    config.default_retry = false;
    let api: Api<ConfigMap> = Api::default_namespaced(Client::try_from(config).unwrap());

    emu.fail_next(1, 500, RequestFilter::any().resource("configmaps"));
    let err = api.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 500),
        "{err:?}"
    );
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        0
    );
    emu.fail_next(1, 409, RequestFilter::writes());
    let err = api
        .patch(
            "x",
            &PatchParams::apply("m"),
            &Patch::Apply(&config_map("x", &[], &[])),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.is_conflict()),
        "{err:?}"
    );
    assert!(emu.get("v1", "configmaps", "default", "x").is_none());
}
