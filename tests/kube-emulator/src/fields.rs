//! A simplified `metadata.managedFields` bookkeeping.
//!
//! Every effective write records which leaf fields its field manager set, in
//! the `FieldsV1` format (`{"f:data": {"f:key": {}}}`). Unlike the real API
//! server, lists are atomic (no `k:`/`v:` keys) and ownership never causes
//! apply conflicts. The one server-side-apply behaviour built on top of it is
//! field *removal*: when a manager applies again without a field it applied
//! before, and no other manager owns that field, the field is removed. This
//! is what makes "render the whole ConfigMap and apply it" drop stale keys, as
//! it does on a real cluster.

use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// A path of object keys from the root to a leaf.
pub(crate) type FieldPath = Vec<String>;
/// A set of owned leaf paths.
pub(crate) type FieldSet = BTreeSet<FieldPath>;

/// Metadata fields owned by the server, never by a field manager.
const SERVER_METADATA: &[&str] = &[
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// Which part of an object a write may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Everything (kinds without a status subresource, or direct test writes).
    Whole,
    /// Everything but `.status` (main resource of a kind with a status subresource).
    Main,
    /// Only `.status` (the `/status` subresource).
    Status,
}

impl Scope {
    /// Whether a path can be owned by a write in this scope.
    pub fn contains(self, path: &[String]) -> bool {
        let Some(first) = path.first() else {
            return false;
        };
        if first == "apiVersion" || first == "kind" {
            return false;
        }
        if first == "metadata" {
            match path.get(1) {
                None => return false,
                Some(field) if SERVER_METADATA.contains(&field.as_str()) => return false,
                Some(_) => {}
            }
        }
        match self {
            Scope::Whole => true,
            Scope::Main => first != "status",
            Scope::Status => first == "status",
        }
    }

    /// The `subresource` value recorded in a managed-fields entry.
    fn subresource(self) -> Option<&'static str> {
        (self == Scope::Status).then_some("status")
    }
}

/// One `metadata.managedFields` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ManagedEntry {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

impl ManagedEntry {
    fn same_owner(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }
}

/// The write being recorded.
#[derive(Clone, Debug)]
pub(crate) enum WriteKind {
    /// Server-side apply of a body whose leaf paths are `applied`.
    Apply { manager: String, applied: FieldSet },
    /// Any other write (create, replace, patch) by `manager`.
    Update { manager: String },
}

/// All leaf paths of `value` that lie within `scope`. Arrays, scalars and
/// empty objects are leaves.
pub(crate) fn leaf_paths(value: &Value, scope: Scope) -> FieldSet {
    let mut out = FieldSet::new();
    collect_leaves(value, &mut Vec::new(), &mut out);
    out.retain(|p| scope.contains(p));
    out
}

fn collect_leaves(value: &Value, prefix: &mut FieldPath, out: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(k.clone());
                collect_leaves(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// Leaf paths of `new` (within `scope`) whose value differs from `old`.
fn changed_paths(old: Option<&Value>, new: &Value, scope: Scope) -> FieldSet {
    let mut set = leaf_paths(new, scope);
    if let Some(old) = old {
        set.retain(|p| get(old, p) != get(new, p));
    }
    set
}

/// The value at `path`, if present.
pub(crate) fn get<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, k| v.as_object()?.get(k))
}

/// Removes the value at `path`, then every parent map left empty that is not
/// a prefix of a path in `keep`.
pub(crate) fn remove_path(value: &mut Value, path: &[String], keep: &FieldSet) {
    for depth in (1..=path.len()).rev() {
        let (parent, last) = path[..depth].split_at(depth - 1);
        let is_last = depth == path.len();
        let Some(Value::Object(map)) = get_mut(value, parent) else {
            return;
        };
        let prune = is_last
            || (map
                .get(&last[0])
                .is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
                && !keep.iter().any(|k| k.starts_with(&path[..depth]))
                && depth > 1);
        if !prune {
            return;
        }
        map.remove(&last[0]);
    }
}

fn get_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(value, |v, k| v.as_object_mut()?.get_mut(k))
}

/// Encodes a field set as `FieldsV1`.
fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for key in path {
            let entry = node
                .entry(format!("f:{key}"))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else {
                unreachable!("FieldsV1 nodes are always objects")
            };
            node = next;
        }
    }
    Value::Object(root)
}

/// Decodes `FieldsV1` written by [`to_fields_v1`]; other key kinds are ignored.
fn from_fields_v1(value: &Value) -> FieldSet {
    fn walk(value: &Value, prefix: &mut FieldPath, out: &mut FieldSet) {
        let Some(map) = value.as_object() else { return };
        let children: Vec<_> = map.iter().filter(|(k, _)| k.starts_with("f:")).collect();
        if children.is_empty() {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
            return;
        }
        for (k, v) in children {
            prefix.push(k[2..].to_string());
            walk(v, prefix, out);
            prefix.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

/// Reads the entries stored in `obj.metadata.managedFields`.
pub(crate) fn read_entries(obj: &Value) -> Vec<ManagedEntry> {
    let Some(entries) = obj["metadata"]["managedFields"].as_array() else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|e| ManagedEntry {
            manager: e["manager"].as_str().unwrap_or_default().to_string(),
            operation: e["operation"].as_str().unwrap_or_default().to_string(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: e["time"].as_str().unwrap_or_default().to_string(),
            subresource: e["subresource"].as_str().map(str::to_string),
            fields: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

/// Stores `entries` as `obj.metadata.managedFields` (removed when empty).
pub(crate) fn write_entries(obj: &mut Value, entries: &[ManagedEntry]) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if entries.is_empty() {
        meta.remove("managedFields");
        return;
    }
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if let Some(sub) = &e.subresource {
                v["subresource"] = json!(sub);
            }
            v
        })
        .collect();
    meta.insert("managedFields".into(), Value::Array(list));
}

/// Removes from `obj` the fields `manager` applied last time (in `scope`) but
/// no longer applies, unless another manager owns them too.
pub(crate) fn drop_unapplied(obj: &mut Value, manager: &str, scope: Scope, applied: &FieldSet) {
    let entries = read_entries(obj);
    let sub = scope.subresource();
    let mut previous = FieldSet::new();
    let mut others = FieldSet::new();
    for e in &entries {
        if e.same_owner(manager, "Apply", sub) {
            previous.extend(e.fields.iter().cloned());
        } else {
            others.extend(e.fields.iter().cloned());
        }
    }
    let keep: FieldSet = applied.union(&others).cloned().collect();
    for path in previous.difference(&keep) {
        remove_path(obj, path, &keep);
    }
}

/// Computes the managed-fields entries of `new` after `write` (the previous
/// state is `old`, `None` on create). Returns the entries and whether the
/// ownership information changed (ignoring timestamps).
pub(crate) fn record_write(
    old: Option<&Value>,
    new: &Value,
    write: &WriteKind,
    scope: Scope,
    api_version: &str,
    now: &str,
) -> (Vec<ManagedEntry>, bool) {
    let before = old.map(read_entries).unwrap_or_default();
    let mut entries = before.clone();
    let sub = scope.subresource();
    let (manager, operation, owned) = match write {
        WriteKind::Apply { manager, applied } => (manager, "Apply", applied.clone()),
        WriteKind::Update { manager } => {
            let mut owned = changed_paths(old, new, scope);
            if let Some(e) = entries
                .iter()
                .find(|e| e.same_owner(manager, "Update", sub))
            {
                owned.extend(e.fields.iter().cloned());
            }
            (manager, "Update", owned)
        }
    };
    match entries
        .iter_mut()
        .find(|e| e.same_owner(manager, operation, sub))
    {
        Some(e) => {
            e.fields = owned;
            e.time = now.to_string();
            e.api_version = api_version.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: manager.clone(),
            operation: operation.to_string(),
            api_version: api_version.to_string(),
            time: now.to_string(),
            subresource: sub.map(str::to_string),
            fields: owned,
        }),
    }
    for e in &mut entries {
        e.fields.retain(|p| get(new, p).is_some());
    }
    entries.retain(|e| !e.fields.is_empty());
    let key = |e: &ManagedEntry| {
        (
            e.manager.clone(),
            e.operation.clone(),
            e.subresource.clone(),
            e.fields.clone(),
        )
    };
    let changed = entries.iter().map(key).ne(before.iter().map(key));
    (entries, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> FieldPath {
        p.split('.').map(str::to_string).collect()
    }

    #[test]
    fn fields_v1_round_trip() {
        let obj = json!({"apiVersion": "v1", "metadata": {"name": "x", "labels": {"a": "1"}},
                         "data": {"k": "v", "e": {}}, "list": [1]});
        let set = leaf_paths(&obj, Scope::Whole);
        let expect: FieldSet = ["metadata.labels.a", "data.k", "data.e", "list"]
            .into_iter()
            .map(path)
            .collect();
        assert_eq!(set, expect);
        assert_eq!(from_fields_v1(&to_fields_v1(&set)), set);
        assert_eq!(
            to_fields_v1(&[path("data.k")].into_iter().collect()),
            json!({"f:data": {"f:k": {}}})
        );
    }

    #[test]
    fn scopes() {
        assert!(Scope::Main.contains(&path("spec.x")));
        assert!(!Scope::Main.contains(&path("status.x")));
        assert!(Scope::Status.contains(&path("status.x")));
        assert!(!Scope::Status.contains(&path("metadata.labels.a")));
        assert!(!Scope::Whole.contains(&path("metadata.resourceVersion")));
    }

    #[test]
    fn remove_path_prunes_empty_parents() {
        let mut obj = json!({"metadata": {"labels": {"a": "1"}}, "data": {"k": "v"}, "spec": {"x": {"y": 1}, "z": 2}});
        remove_path(&mut obj, &path("metadata.labels.a"), &FieldSet::new());
        remove_path(&mut obj, &path("spec.x.y"), &FieldSet::new());
        assert_eq!(
            obj,
            json!({"metadata": {}, "data": {"k": "v"}, "spec": {"z": 2}})
        );
        let keep: FieldSet = [path("data.other")].into_iter().collect();
        remove_path(&mut obj, &path("data.k"), &keep);
        assert_eq!(obj, json!({"metadata": {}, "data": {}, "spec": {"z": 2}}));
    }

    #[test]
    fn apply_drops_fields_only_it_owned() {
        let mut obj = json!({"metadata": {"name": "x"}, "data": {"a": "1", "b": "2", "c": "3"}});
        let applied: FieldSet = [path("data.a"), path("data.b")].into_iter().collect();
        let (entries, _) = record_write(
            None,
            &obj,
            &WriteKind::Apply {
                manager: "op".into(),
                applied,
            },
            Scope::Whole,
            "v1",
            "t",
        );
        write_entries(&mut obj, &entries);
        // Someone else edits c, then "op" re-applies only "a".
        let old = obj.clone();
        obj["data"]["c"] = json!("33");
        let (entries, changed) = record_write(
            Some(&old),
            &obj,
            &WriteKind::Update {
                manager: "kubectl".into(),
            },
            Scope::Whole,
            "v1",
            "t",
        );
        assert!(changed);
        write_entries(&mut obj, &entries);
        drop_unapplied(
            &mut obj,
            "op",
            Scope::Whole,
            &[path("data.a")].into_iter().collect(),
        );
        assert_eq!(obj["data"], json!({"a": "1", "c": "33"}));
    }
}
