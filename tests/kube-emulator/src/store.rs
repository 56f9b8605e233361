//! The in-memory object store and its write pipeline.
//!
//! All objects live in one map keyed by resource, namespace and name, as
//! plain JSON. Every effective write bumps one global `resourceVersion`
//! counter, stores the object, appends a [`Change`] to a bounded history
//! (used to resume watches) and broadcasts it to live watches. Writes that
//! change nothing return the stored object untouched: no new
//! resourceVersion, no watch event.
//!
//! The same pipeline serves HTTP requests and the direct test API; direct
//! writes are "privileged" (they may set `.status` through the main resource).
//!
//! Garbage collection and namespace deletion happen inside the write that
//! removes the owner, or, with a `gc_delay`, later from a queue that the
//! emulator's collector task drains with [`Store::run_gc`].

use crate::error::ApiError;
use crate::fields::{self, Scope, WriteKind};
use crate::patch::{json_patch, merge_patch};
use crate::registry::{ResKey, ResourceDef, builtin_resources};
use crate::selector::Selectors;
use crate::validate::{check_body, fold_string_data, validate_object};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

/// Key of an object: resource, namespace (empty when cluster-scoped), name.
pub(crate) type ObjKey = (ResKey, String, String);

/// Field manager recorded for writes made through the direct test API.
pub(crate) const DIRECT_MANAGER: &str = "tollgate-kube-emulator";

/// Capacity of the live-change broadcast; a watch that falls further behind
/// is closed and resumes from the history.
const BROADCAST_CAPACITY: usize = 1024;

/// Kind of a stored change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One committed change, as kept in the history and sent to live watches.
#[derive(Debug)]
pub(crate) struct Change {
    pub res: ResKey,
    pub rv: u64,
    pub change: ChangeType,
    /// The object after the change (for deletions: its last state, new rv).
    pub object: Value,
    /// The object before the change, if it existed.
    pub previous: Option<Value>,
    /// When the change was committed (watch-cache lag counts from here).
    pub at: Instant,
}

/// Which part of an object a request addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Main,
    Status,
}

/// Options shared by all writes.
#[derive(Clone, Debug)]
pub(crate) struct WriteOpts {
    /// Field manager recorded in `managedFields`.
    pub manager: String,
    /// `dryRun=All`: compute and validate, but store nothing.
    pub dry_run: bool,
    /// Direct test access: no spec/status split.
    pub privileged: bool,
}

impl WriteOpts {
    pub fn direct() -> Self {
        Self {
            manager: DIRECT_MANAGER.into(),
            dry_run: false,
            privileged: true,
        }
    }
}

/// A modification of an existing object.
#[derive(Clone, Debug)]
pub(crate) enum Update {
    /// `PUT`: replace the object.
    Replace(Value),
    /// Merge patch (also used for strategic merge patch).
    Merge(Value),
    /// RFC 6902 JSON patch.
    Json(Value),
    /// Server-side apply (creates the object when missing).
    Apply(Value),
}

/// What happens to the dependents of a removed owner (`propagationPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Propagation {
    /// The default: the garbage collector deletes them (after
    /// `EmulatorOptions::gc_delay`, when set).
    #[default]
    Background,
    /// Deleted together with the owner, always at once.
    Foreground,
    /// They lose the owner reference instead, at once.
    Orphan,
}

/// Options of a delete.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeleteOpts {
    pub dry_run: bool,
    pub propagation: Propagation,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

/// Distinguishes emulator instances in generated uids.
static INSTANCE: AtomicU64 = AtomicU64::new(1);

/// The current time as a Kubernetes `Time` (RFC 3339, seconds, UTC).
pub(crate) fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Work left to the (lagging) garbage collector and namespace controller.
#[derive(Debug)]
enum GcJob {
    /// Delete (or un-own) the dependents of the removed owner with this uid.
    Dependents(String),
    /// Empty this terminating namespace, then remove it.
    Namespace(String),
}

/// Key of the Namespace object `name`.
fn namespace_key(name: &str) -> ObjKey {
    (
        (String::new(), "v1".to_string(), "namespaces".to_string()),
        String::new(),
        name.to_string(),
    )
}

fn is_namespace(key: &ObjKey) -> bool {
    key.0.0.is_empty() && key.0.1 == "v1" && key.0.2 == "namespaces"
}

/// The store; callers hold it behind a mutex.
#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    seq: u64,
    instance: u64,
    names: RandomState,
    resources: BTreeMap<ResKey, ResourceDef>,
    objects: BTreeMap<ObjKey, Value>,
    history: VecDeque<Arc<Change>>,
    history_limit: usize,
    /// All changes with a resourceVersion above this are in `history`.
    history_floor: u64,
    changes: broadcast::Sender<Arc<Change>>,
    revision: watch::Sender<u64>,
    /// `Some`: garbage collection and namespace deletion run this long after
    /// the removal that triggers them (see [`Store::run_gc`]).
    gc_delay: Option<Duration>,
    /// Pending collector work, in due order (the delay is constant).
    gc_queue: VecDeque<(Instant, GcJob)>,
}

impl Store {
    pub fn new(history_limit: usize, gc_delay: Option<Duration>) -> Self {
        let instance =
            (u64::from(std::process::id()) << 16) ^ INSTANCE.fetch_add(1, Ordering::Relaxed);
        let mut store = Self {
            rv: 0,
            seq: 0,
            instance,
            names: RandomState::new(),
            resources: BTreeMap::new(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            history_floor: 0,
            changes: broadcast::channel(BROADCAST_CAPACITY).0,
            revision: watch::channel(0).0,
            gc_delay,
            gc_queue: VecDeque::new(),
        };
        for def in builtin_resources() {
            store.register(def);
        }
        // Like every cluster, start with the `default` namespace.
        let namespaces = store
            .resource("", "v1", "namespaces")
            .cloned()
            .expect("namespaces are built in");
        let default =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}});
        store
            .create(&namespaces, "", default, &WriteOpts::direct(), false)
            .expect("the default namespace is valid");
        store
    }

    // ----- registry -------------------------------------------------------

    pub fn register(&mut self, def: ResourceDef) {
        self.resources.insert(def.key(), def);
    }

    pub fn resources(&self) -> impl Iterator<Item = &ResourceDef> {
        self.resources.values()
    }

    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceDef> {
        self.resources
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
    }

    /// The resource serving `kind` in `api_version`.
    pub fn resource_for_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceDef> {
        self.resources
            .values()
            .find(|d| d.api_version() == api_version && d.kind == kind)
    }

    // ----- reads ----------------------------------------------------------

    /// The current global resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Receiver of every future change.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Receiver notified whenever the global resourceVersion moves.
    pub fn revision(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn key(def: &ResourceDef, ns: &str, name: &str) -> ObjKey {
        let ns = if def.namespaced { ns } else { "" };
        (def.key(), ns.to_string(), name.to_string())
    }

    pub fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(def, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&def.qualified_plural(), name))
    }

    /// Objects of `def` in namespace `ns` (all namespaces when `None`),
    /// ordered by namespace and name.
    pub fn list(&self, def: &ResourceDef, ns: Option<&str>, sel: &Selectors) -> Vec<Value> {
        let res = def.key();
        self.objects
            .iter()
            .filter(|((r, ons, _), obj)| {
                *r == res && (!def.namespaced || ns.is_none_or(|ns| ns == ons)) && sel.matches(obj)
            })
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Changes of `res` newer than `since`, or `Err` when some of them are no
    /// longer in the history (the watch must answer 410 Gone).
    pub fn changes_since(&self, res: &ResKey, since: u64) -> Result<Vec<Arc<Change>>, ApiError> {
        if since < self.history_floor {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {since} ({})", self.history_floor),
            ));
        }
        Ok(self
            .history
            .iter()
            .filter(|c| c.rv > since && c.res == *res)
            .cloned()
            .collect())
    }

    /// Forgets the change history, like an etcd compaction: watches that
    /// resume from an older resourceVersion get 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.history_floor = self.rv;
    }

    // ----- writes ---------------------------------------------------------

    fn scope(def: &ResourceDef, target: Target, opts: &WriteOpts) -> Scope {
        match (opts.privileged || !def.status_subresource, target) {
            (true, _) => Scope::Whole,
            (false, Target::Main) => Scope::Main,
            (false, Target::Status) => Scope::Status,
        }
    }

    fn next_uid(&mut self) -> String {
        self.seq += 1;
        format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            self.instance & 0xffff_ffff,
            (self.instance >> 32) & 0xffff,
            self.seq
        )
    }

    /// A generated name: `prefix` plus five characters, unused in `ns`.
    fn generate_name(&mut self, def: &ResourceDef, ns: &str, prefix: &str) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        loop {
            self.seq += 1;
            let mut h = self.names.hash_one(self.seq);
            let mut name = prefix.to_string();
            for _ in 0..5 {
                name.push(char::from(ALPHABET[(h % ALPHABET.len() as u64) as usize]));
                h /= ALPHABET.len() as u64;
            }
            if !self.objects.contains_key(&Self::key(def, ns, &name)) {
                return name;
            }
        }
    }

    /// Creates an object (`POST`, or server-side apply of a missing object
    /// when `apply` is set).
    pub fn create(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        mut body: Value,
        opts: &WriteOpts,
        apply: bool,
    ) -> Result<Value, ApiError> {
        check_body(def, &mut body, def.namespaced.then_some(ns), None, apply)?;
        fold_string_data(def, &mut body);
        let scope = Self::scope(def, Target::Main, opts);
        let applied = apply.then(|| fields::leaf_paths(&body, scope));
        let name = match (
            body["metadata"]["name"].as_str(),
            body["metadata"]["generateName"].as_str(),
        ) {
            (Some(name), _) if !name.is_empty() => name.to_string(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                let prefix = prefix.to_string();
                self.generate_name(def, ns, &prefix)
            }
            _ => {
                return Err(ApiError::invalid(
                    &def.kind,
                    "",
                    &["metadata.name: Required value: name or generateName is required".into()],
                ));
            }
        };
        let key = Self::key(def, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&def.qualified_plural(), &name));
        }
        if def.namespaced
            && self
                .objects
                .get(&namespace_key(ns))
                .is_some_and(|n| n["metadata"].get("deletionTimestamp").is_some())
        {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    def.qualified_plural()
                ),
            ));
        }
        let uid = self.next_uid();
        let mut obj = body;
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("checked by check_body");
        for field in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            meta.remove(field);
        }
        meta.insert("name".into(), json!(name));
        if def.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(uid));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!(now()));
        if scope == Scope::Main
            && let Some(map) = obj.as_object_mut()
        {
            map.remove("status");
        }
        if def.is_core("namespaces") {
            obj["status"] = json!({"phase": "Active"});
        }
        validate_object(def, &obj)?;
        let write = match applied {
            Some(applied) => WriteKind::Apply {
                manager: opts.manager.clone(),
                applied,
            },
            None => WriteKind::Update {
                manager: opts.manager.clone(),
            },
        };
        let (entries, _) =
            fields::record_write(None, &obj, &write, scope, &def.api_version(), &now());
        fields::write_entries(&mut obj, &entries);
        if opts.dry_run {
            return Ok(obj);
        }
        Ok(self.commit(key, obj, ChangeType::Added))
    }

    /// Modifies an existing object. Returns the stored object and whether it
    /// was created (server-side apply of a missing object).
    pub fn update(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        target: Target,
        update: Update,
        opts: &WriteOpts,
    ) -> Result<(Value, bool), ApiError> {
        let key = Self::key(def, ns, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return match update {
                Update::Apply(mut body) if target == Target::Main => {
                    if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut)
                        && meta.get("name").is_some_and(|n| n != name)
                    {
                        return Err(ApiError::bad_request(format!(
                            "the name of the object ({}) does not match the name on the URL ({name})",
                            meta["name"]
                        )));
                    }
                    if body.is_object() {
                        body["metadata"]["name"] = json!(name);
                    }
                    self.create(def, ns, body, opts, true).map(|o| (o, true))
                }
                _ => Err(ApiError::not_found(&def.qualified_plural(), name)),
            };
        };
        let scope = Self::scope(def, target, opts);
        let url_ns = def.namespaced.then_some(ns);
        let manager = opts.manager.clone();
        let (mut new, write) = match update {
            Update::Replace(mut body) => {
                check_body(def, &mut body, url_ns, Some(name), false)?;
                check_precondition(def, &old, &body)?;
                fold_string_data(def, &mut body);
                (body, WriteKind::Update { manager })
            }
            Update::Merge(patch) => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                check_precondition(def, &old, &patch)?;
                let mut new = old.clone();
                merge_patch(&mut new, &patch);
                fold_string_data(def, &mut new);
                (new, WriteKind::Update { manager })
            }
            Update::Json(ops) => {
                let mut new = old.clone();
                json_patch(&mut new, &ops).map_err(|e| ApiError::new(422, "Invalid", e))?;
                fold_string_data(def, &mut new);
                (new, WriteKind::Update { manager })
            }
            Update::Apply(mut body) => {
                check_body(def, &mut body, url_ns, Some(name), true)?;
                check_precondition(def, &old, &body)?;
                fold_string_data(def, &mut body);
                let applied = fields::leaf_paths(&body, scope);
                let mut new = old.clone();
                fields::drop_unapplied(&mut new, &manager, scope, &applied);
                merge_patch(&mut new, &body);
                (new, WriteKind::Apply { manager, applied })
            }
        };
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the patched object is not a JSON object",
            ));
        }
        for (field, want) in [
            ("apiVersion", def.api_version()),
            ("kind", def.kind.clone()),
        ] {
            if new.get(field).is_some_and(|v| *v != json!(want)) {
                return Err(ApiError::bad_request(format!("{field} cannot be changed")));
            }
            new[field] = json!(want);
        }
        restore_server_metadata(&old, &mut new);
        match scope {
            Scope::Whole => {}
            Scope::Main => copy_field(&old, &mut new, "status"),
            Scope::Status => {
                let mut only_status = old.clone();
                copy_field(&new, &mut only_status, "status");
                new = only_status;
            }
        }
        validate_object(def, &new)?;
        if !same_ignoring(&old, &new, &["metadata", "status"]) || status_bumps(def, &old, &new) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(generation + 1);
        }
        let content_changed = without_bookkeeping(&old) != without_bookkeeping(&new);
        let (entries, ownership_changed) =
            fields::record_write(Some(&old), &new, &write, scope, &def.api_version(), &now());
        if !content_changed && !ownership_changed {
            return Ok((old, false));
        }
        fields::write_entries(&mut new, &entries);
        if opts.dry_run {
            return Ok((new, false));
        }
        Ok((self.commit(key, new, ChangeType::Modified), false))
    }

    /// Deletes an object. With finalizers it only gets a
    /// `deletionTimestamp`; otherwise it is removed and its dependents are
    /// garbage-collected. Returns the object's last state and whether it is
    /// gone.
    pub fn delete(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<(Value, bool), ApiError> {
        let key = Self::key(def, ns, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&def.qualified_plural(), name))?;
        let meta = &old["metadata"];
        if let Some(uid) = &opts.precondition_uid
            && meta["uid"].as_str() != Some(uid)
        {
            return Err(ApiError::conflict(
                &def.qualified_plural(),
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta["uid"]
                ),
            ));
        }
        if let Some(rv) = &opts.precondition_rv
            && meta["resourceVersion"].as_str() != Some(rv)
        {
            return Err(ApiError::conflict(
                &def.qualified_plural(),
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta["resourceVersion"]
                ),
            ));
        }
        if opts.dry_run {
            return Ok((old, false));
        }
        let last = self.delete_key(&key, opts.propagation);
        Ok((last, !self.objects.contains_key(&key)))
    }

    /// Deletes every object of `def` in `ns` selected by `sel`.
    pub fn delete_collection(
        &mut self,
        def: &ResourceDef,
        ns: Option<&str>,
        sel: &Selectors,
        opts: &DeleteOpts,
    ) -> Vec<Value> {
        let victims = self.list(def, ns, sel);
        if opts.dry_run {
            return victims;
        }
        victims
            .iter()
            .filter_map(|obj| {
                let key = (
                    def.key(),
                    obj["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    obj["metadata"]["name"].as_str()?.to_string(),
                );
                self.objects
                    .contains_key(&key)
                    .then(|| self.delete_key(&key, opts.propagation))
            })
            .collect()
    }

    /// Deletes a stored object (honouring finalizers) and returns its last state.
    /// With a `gc_delay` a Namespace only starts terminating (see [`Store::run_gc`]).
    fn delete_key(&mut self, key: &ObjKey, propagation: Propagation) -> Value {
        let Some(old) = self.objects.get(key).cloned() else {
            return Value::Null;
        };
        let terminating = old["metadata"].get("deletionTimestamp").is_some();
        if self.gc_delay.is_some() && is_namespace(key) {
            if terminating {
                return old;
            }
            let mut new = old;
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["status"]["phase"] = json!("Terminating");
            let new = self.commit(key.clone(), new, ChangeType::Modified);
            self.schedule(GcJob::Namespace(key.2.clone()));
            return new;
        }
        if has_finalizers(&old) {
            if terminating {
                return old;
            }
            let mut new = old;
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            return self.commit(key.clone(), new, ChangeType::Modified);
        }
        self.remove(key, old, propagation)
    }

    /// Removes a stored object now, publishes the deletion and cascades it.
    fn remove(&mut self, key: &ObjKey, old: Value, propagation: Propagation) -> Value {
        self.objects.remove(key);
        self.rv += 1;
        let mut last = old.clone();
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(key.0.clone(), ChangeType::Deleted, last.clone(), Some(old));
        self.after_removal(key, &last, propagation);
        last
    }

    /// Cascades a removal: dependents (ownerReferences) and, for a
    /// Namespace, everything in it. Background collection waits for the
    /// `gc_delay`, when set.
    fn after_removal(&mut self, key: &ObjKey, obj: &Value, propagation: Propagation) {
        if let Some(uid) = obj["metadata"]["uid"].as_str() {
            if propagation == Propagation::Background && self.gc_delay.is_some() {
                self.schedule(GcJob::Dependents(uid.to_string()));
            } else {
                self.collect_garbage(uid, propagation);
            }
        }
        if is_namespace(key) {
            for k in self.namespace_contents(&key.2) {
                self.delete_key(&k, Propagation::Background);
            }
        }
    }

    fn namespace_contents(&self, ns: &str) -> Vec<ObjKey> {
        self.objects.keys().filter(|k| k.1 == ns).cloned().collect()
    }

    /// Garbage collection of the dependents of a removed owner. A dependent
    /// that still has another live owner only loses the reference; with
    /// [`Propagation::Orphan`] every dependent just loses it. Deleted
    /// dependents cascade with the same propagation.
    fn collect_garbage(&mut self, owner_uid: &str, propagation: Propagation) {
        let owned_by = |obj: &Value| {
            obj["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(owner_uid)))
        };
        let dependents: Vec<ObjKey> = self
            .objects
            .iter()
            .filter(|(_, obj)| owned_by(obj))
            .map(|(k, _)| k.clone())
            .collect();
        for key in dependents {
            let Some(obj) = self.objects.get(&key).cloned() else {
                continue;
            };
            let remaining: Vec<Value> = obj["metadata"]["ownerReferences"]
                .as_array()
                .map(|refs| {
                    refs.iter()
                        .filter(|r| r["uid"].as_str() != Some(owner_uid))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let live_owner = remaining
                .iter()
                .any(|r| r["uid"].as_str().is_some_and(|uid| self.uid_exists(uid)));
            if propagation == Propagation::Orphan || live_owner {
                let mut new = obj;
                if remaining.is_empty() {
                    if let Some(meta) = new["metadata"].as_object_mut() {
                        meta.remove("ownerReferences");
                    }
                } else {
                    new["metadata"]["ownerReferences"] = Value::Array(remaining);
                }
                self.commit(key, new, ChangeType::Modified);
            } else {
                self.delete_key(&key, propagation);
            }
        }
    }

    /// Queues collector work for `gc_delay` from now.
    fn schedule(&mut self, job: GcJob) {
        let delay = self.gc_delay.unwrap_or_default();
        self.gc_queue.push_back((Instant::now() + delay, job));
    }

    /// Runs the collector work due by `now` and returns when the next is due.
    /// A terminating Namespace has its contents deleted (in the background);
    /// it is removed once it is empty and has no finalizers, else checked
    /// again a `gc_delay` later.
    pub fn run_gc(&mut self, now: Instant) -> Option<Instant> {
        while self.gc_queue.front().is_some_and(|(due, _)| *due <= now) {
            let Some((_, job)) = self.gc_queue.pop_front() else {
                break;
            };
            match job {
                GcJob::Dependents(uid) => self.collect_garbage(&uid, Propagation::Background),
                GcJob::Namespace(ns) => {
                    let key = namespace_key(&ns);
                    if !self.objects.contains_key(&key) {
                        continue;
                    }
                    for k in self.namespace_contents(&ns) {
                        self.delete_key(&k, Propagation::Background);
                    }
                    match self.objects.get(&key).cloned() {
                        Some(obj)
                            if !has_finalizers(&obj) && self.namespace_contents(&ns).is_empty() =>
                        {
                            self.remove(&key, obj, Propagation::Background);
                        }
                        Some(_) => self.schedule(GcJob::Namespace(ns)),
                        None => {}
                    }
                }
            }
        }
        self.gc_queue.front().map(|(due, _)| *due)
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects
            .values()
            .any(|o| o["metadata"]["uid"].as_str() == Some(uid))
    }

    /// Stores `obj` under a new resourceVersion and publishes the change. An
    /// object that is terminating and has no finalizers left is removed.
    fn commit(&mut self, key: ObjKey, mut obj: Value, change: ChangeType) -> Value {
        let previous = self.objects.get(&key).cloned();
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        // With a gc_delay a terminating Namespace waits for the namespace controller.
        if change == ChangeType::Modified
            && obj["metadata"].get("deletionTimestamp").is_some()
            && !has_finalizers(&obj)
            && !(self.gc_delay.is_some() && is_namespace(&key))
        {
            self.objects.remove(&key);
            self.emit(key.0.clone(), ChangeType::Deleted, obj.clone(), previous);
            self.after_removal(&key, &obj, Propagation::Background);
            return obj;
        }
        self.objects.insert(key.clone(), obj.clone());
        self.emit(key.0, change, obj.clone(), previous);
        obj
    }

    fn emit(&mut self, res: ResKey, change: ChangeType, object: Value, previous: Option<Value>) {
        let change = Arc::new(Change {
            res,
            rv: self.rv,
            change,
            object,
            previous,
            at: Instant::now(),
        });
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.history_floor = dropped.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(change);
        self.revision.send_replace(self.rv);
    }
}

fn has_finalizers(obj: &Value) -> bool {
    obj["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// `409 Conflict` when `body` names a resourceVersion other than the stored one.
fn check_precondition(def: &ResourceDef, old: &Value, body: &Value) -> Result<(), ApiError> {
    match body["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && Some(rv) != old["metadata"]["resourceVersion"].as_str() => {
            Err(ApiError::conflict(
                &def.qualified_plural(),
                old["metadata"]["name"].as_str().unwrap_or_default(),
                "the object has been modified; please apply your changes to the latest version and try again",
            ))
        }
        _ => Ok(()),
    }
}

/// Copies the server-owned metadata of `old` into `new`.
fn restore_server_metadata(old: &Value, new: &mut Value) {
    if !new["metadata"].is_object() {
        new["metadata"] = Value::Object(Map::new());
    }
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "generateName",
        "selfLink",
    ] {
        copy_field(&old["metadata"], &mut new["metadata"], field);
    }
}

/// Makes `to[field]` equal `from[field]` (removing it when absent).
fn copy_field(from: &Value, to: &mut Value, field: &str) {
    let Some(to) = to.as_object_mut() else { return };
    match from.get(field) {
        Some(v) => {
            to.insert(field.to_string(), v.clone());
        }
        None => {
            to.remove(field);
        }
    }
}

/// Whether two objects are equal apart from the top-level keys in `skip`
/// (and `apiVersion`/`kind`).
fn same_ignoring(a: &Value, b: &Value, skip: &[&str]) -> bool {
    let strip = |v: &Value| -> Map<String, Value> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| {
                        !skip.contains(&k.as_str()) && *k != "apiVersion" && *k != "kind"
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    strip(a) == strip(b)
}

/// For kinds without a status subresource, `.status` is ordinary content and
/// counts towards the generation too.
fn status_bumps(def: &ResourceDef, old: &Value, new: &Value) -> bool {
    !def.status_subresource && old.get("status") != new.get("status")
}

/// The object without resourceVersion and managedFields, for no-op detection.
fn without_bookkeeping(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(meta) = obj["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
    }
    obj
}
