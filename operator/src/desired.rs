//! The objects the operator keeps in the gateway namespace, computed from a split
//! configuration (pure), and the plan that brings the live objects there: apply only what
//! changed, delete shards that are no longer needed.
//!
//! Layout (the chart mounts all of them in one projected volume, key shards as optional
//! sources, so kubelet swaps the whole directory at once):
//! - ConfigMap `<prefix>-config`: `manifest.json` and `routing.json`;
//! - Secret `<prefix>-credentials`: `credentials-<hash>.json` (upstream credentials);
//! - Secrets `<prefix>-keys-<NN>`: one key shard each (`keys-<NNN>-<hash>.json`, hashes
//!   only). Parts outside the manifest's ConfigMap are named by content, so a gateway
//!   whose kubelet has not caught up sees a part missing, not a different one.
//!
//! Each object carries the content hash of its data in an annotation, so an unchanged
//! object is recognised without comparing its data, and changing one key rewrites the
//! manifest and exactly one shard.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use tollgate_api::parts::{ConfigPart, MANIFEST_FILE, SplitConfig, Store, sha256_hex};

/// Label every generated object carries (with [`MANAGED_BY_VALUE`]).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// This operator's name, as a label value and SSA field manager.
pub const MANAGED_BY_VALUE: &str = "tollgate-operator";
/// Label naming the part of the configuration an object holds.
pub const PART_LABEL: &str = "tollgate.dev/config-part";
/// Label scoping generated objects to one release: the name prefix (the start of it and
/// a hash when it is longer than a label value may be). The watch selects by it, so two
/// releases in one namespace never see, repair or delete each other's objects.
pub const PREFIX_LABEL: &str = "tollgate.dev/config-prefix";
/// Annotation: SHA-256 of the object's data.
pub const CONTENT_HASH: &str = "tollgate.dev/content-hash";
/// Annotation on the ConfigMap: hash of the whole configuration.
pub const CONFIG_HASH: &str = "tollgate.dev/config-hash";

/// Key shard Secrets gateways mount by default (`--max-key-shards`; the chart's
/// `keyShards`): 16 × 512 KiB, room for well over 20,000 keys.
pub const DEFAULT_MAX_KEY_SHARDS: usize = 16;

/// Routing shard ConfigMaps gateways mount by default (`--max-routing-shards`; the
/// chart's `routingShards`): 4 × 512 KiB of Providers and routes.
pub const DEFAULT_MAX_ROUTING_SHARDS: usize = 4;

/// One object to keep in the gateway namespace.
#[derive(Clone, PartialEq)]
pub enum DesiredObject {
    /// The routing ConfigMap.
    ConfigMap(ConfigMap),
    /// A Secret (credentials or a key shard).
    Secret(Secret),
}

impl std::fmt::Debug for DesiredObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print Secret data.
        write!(
            f,
            "{} {} ({})",
            self.kind(),
            self.name(),
            self.content_hash()
        )
    }
}

impl DesiredObject {
    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::ConfigMap(c) => &c.metadata,
            Self::Secret(s) => &s.metadata,
        }
    }

    /// `ConfigMap` or `Secret`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ConfigMap(_) => "ConfigMap",
            Self::Secret(_) => "Secret",
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }

    /// The content hash annotation.
    pub fn content_hash(&self) -> &str {
        self.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(CONTENT_HASH))
            .map_or("", String::as_str)
    }
}

/// Names of the generated objects.
#[derive(Debug, Clone)]
pub struct Naming {
    /// Namespace the gateways run in.
    pub namespace: String,
    /// Name prefix, e.g. `tollgate-gateway`.
    pub prefix: String,
    /// Most key shard Secrets the gateways mount.
    pub max_key_shards: usize,
    /// Most routing shard ConfigMaps the gateways mount (used only when the routing
    /// part outgrows one object).
    pub max_routing_shards: usize,
}

impl Naming {
    /// The ConfigMap's name.
    pub fn config_map(&self) -> String {
        format!("{}-config", self.prefix)
    }

    /// The credentials Secret's name.
    pub fn credentials(&self) -> String {
        format!("{}-credentials", self.prefix)
    }

    /// A key shard Secret's name.
    pub fn key_shard(&self, index: usize) -> String {
        format!("{}-keys-{index:02}", self.prefix)
    }

    /// A routing shard ConfigMap's name.
    pub fn routing_shard(&self, index: usize) -> String {
        format!("{}-routing-{index:02}", self.prefix)
    }

    /// The value of [`PREFIX_LABEL`].
    pub fn prefix_label(&self) -> String {
        if self.prefix.len() <= 63 {
            return self.prefix.clone();
        }
        let hash = sha256_hex(self.prefix.as_bytes());
        let head = self.prefix[..50].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        format!("{head}-{}", &hash[..12])
    }

    /// The label selector of this release's generated objects.
    pub fn selector(&self) -> String {
        format!(
            "{MANAGED_BY}={MANAGED_BY_VALUE},{PART_LABEL},{PREFIX_LABEL}={}",
            self.prefix_label()
        )
    }

    /// Whether `name` is one of the objects this release generates (a Secret: the
    /// credentials or a key shard), so only those are ever deleted.
    pub fn owns_secret(&self, name: &str) -> bool {
        name == self.credentials() || self.is_shard(name, "keys")
    }

    /// Whether `name` is one of the ConfigMaps this release generates (the
    /// configuration or a routing shard).
    pub fn owns_config_map(&self, name: &str) -> bool {
        name == self.config_map() || self.is_shard(name, "routing")
    }

    fn is_shard(&self, name: &str, part: &str) -> bool {
        name.strip_prefix(&format!("{}-{part}-", self.prefix))
            .is_some_and(|n| n.len() >= 2 && n.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// Why the configuration cannot be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DesiredError {
    /// More key shards than the gateways mount.
    #[error(
        "the keys need {0} shards but gateways mount {1}; raise --max-key-shards and the chart's keyShards together"
    )]
    TooManyShards(usize, usize),
    /// More routing shards than the gateways mount.
    #[error(
        "the Providers and routes need {0} ConfigMaps but gateways mount {1}; raise --max-routing-shards and the chart's routingShards together"
    )]
    TooManyRoutingShards(usize, usize),
    /// A key shard file with an unexpected name.
    #[error("unexpected configuration file {0}")]
    UnexpectedFile(String),
}

fn meta(naming: &Naming, name: String, part: &str, data_hash: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(naming.namespace.clone()),
        labels: Some(BTreeMap::from([
            (MANAGED_BY.to_owned(), MANAGED_BY_VALUE.to_owned()),
            (
                "app.kubernetes.io/part-of".to_owned(),
                "tollgate".to_owned(),
            ),
            (PART_LABEL.to_owned(), part.to_owned()),
            (PREFIX_LABEL.to_owned(), naming.prefix_label()),
        ])),
        annotations: Some(BTreeMap::from([(CONTENT_HASH.to_owned(), data_hash)])),
        ..ObjectMeta::default()
    }
}

/// Hash of an object's data: over its files' names and contents, in order.
fn data_hash<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut text = Vec::new();
    for (name, bytes) in files {
        text.extend_from_slice(name.as_bytes());
        text.push(0);
        text.extend_from_slice(sha256_hex(bytes).as_bytes());
        text.push(b'\n');
    }
    sha256_hex(&text)
}

fn secret(naming: &Naming, name: String, part_label: &str, part: &ConfigPart) -> Secret {
    let hash = data_hash([(part.file.as_str(), part.bytes.as_slice())]);
    Secret {
        metadata: meta(naming, name, part_label, hash),
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            part.file.clone(),
            ByteString(part.bytes.clone()),
        )])),
        ..Secret::default()
    }
}

/// The objects that hold `split` in the gateway namespace.
pub fn desired_objects(
    split: &SplitConfig,
    naming: &Naming,
) -> Result<Vec<DesiredObject>, DesiredError> {
    let mut config_files: BTreeMap<String, String> = BTreeMap::new();
    let mut objects = Vec::new();
    let mut shards = 0;
    let mut routing_shards = 0;
    for part in &split.parts {
        match part.store {
            // A routing shard: a ConfigMap of its own.
            Store::ConfigMap if tollgate_api::parts::shard_index(&part.file).is_some() => {
                let index = tollgate_api::parts::shard_index(&part.file)
                    .ok_or_else(|| DesiredError::UnexpectedFile(part.file.clone()))?;
                routing_shards += 1;
                let files = BTreeMap::from([(
                    part.file.clone(),
                    String::from_utf8_lossy(&part.bytes).into_owned(),
                )]);
                let hash = data_hash([(part.file.as_str(), part.bytes.as_slice())]);
                objects.push(DesiredObject::ConfigMap(ConfigMap {
                    metadata: meta(naming, naming.routing_shard(index), "routing", hash),
                    data: Some(files),
                    ..ConfigMap::default()
                }));
            }
            Store::ConfigMap => {
                config_files.insert(
                    part.file.clone(),
                    String::from_utf8_lossy(&part.bytes).into_owned(),
                );
            }
            Store::Secret
                if tollgate_api::parts::kind_of(&part.file)
                    == Some(tollgate_api::parts::PartKind::Credentials) =>
            {
                objects.push(DesiredObject::Secret(secret(
                    naming,
                    naming.credentials(),
                    "credentials",
                    part,
                )));
            }
            Store::Secret => {
                let index = tollgate_api::parts::shard_index(&part.file)
                    .ok_or_else(|| DesiredError::UnexpectedFile(part.file.clone()))?;
                shards += 1;
                objects.push(DesiredObject::Secret(secret(
                    naming,
                    naming.key_shard(index),
                    "keys",
                    part,
                )));
            }
        }
    }
    if routing_shards > naming.max_routing_shards {
        return Err(DesiredError::TooManyRoutingShards(
            routing_shards,
            naming.max_routing_shards,
        ));
    }
    if shards > naming.max_key_shards {
        return Err(DesiredError::TooManyShards(shards, naming.max_key_shards));
    }
    let hash = data_hash(
        config_files
            .iter()
            .map(|(name, text)| (name.as_str(), text.as_bytes())),
    );
    let mut metadata = meta(naming, naming.config_map(), "routing", hash);
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(CONFIG_HASH.to_owned(), split.config_hash.clone());
    debug_assert!(config_files.contains_key(MANIFEST_FILE));
    objects.insert(
        0,
        DesiredObject::ConfigMap(ConfigMap {
            metadata,
            data: Some(config_files),
            ..ConfigMap::default()
        }),
    );
    Ok(objects)
}

/// What is live in the gateway namespace: (kind, name) → content hash (see
/// [`live_hash`]).
pub type LiveObjects = BTreeMap<(&'static str, String), String>;

/// The content hash of a live object, computed from its data: a hand edit of `data` (or
/// of the hash annotation) makes it differ from the desired one, so the object is
/// repaired on the next reconcile. Empty when the annotation disagrees with the data.
pub fn live_hash<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    annotations: Option<&BTreeMap<String, String>>,
) -> String {
    let computed = data_hash(files);
    match annotations.and_then(|a| a.get(CONTENT_HASH)) {
        Some(recorded) if *recorded == computed => computed,
        _ => String::new(),
    }
}

/// The writes that bring the live objects to the desired ones.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Objects to apply (new or changed), the parts before the ConfigMap that holds the
    /// manifest: it names the parts, so it goes last and gateways never see it before
    /// its parts.
    pub apply: Vec<DesiredObject>,
    /// Shards no longer needed, `(kind, name)`, deleted after the manifest is applied.
    pub delete: Vec<(&'static str, String)>,
}

impl Plan {
    /// Whether nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.apply.is_empty() && self.delete.is_empty()
    }
}

/// Compares desired and live objects. Only shards this release generates are ever
/// deleted (`<prefix>-keys-NN` Secrets, `<prefix>-routing-NN` ConfigMaps).
pub fn plan(desired: Vec<DesiredObject>, live: &LiveObjects, naming: &Naming) -> Plan {
    let wanted: BTreeSet<(&'static str, String)> = desired
        .iter()
        .map(|d| (d.kind(), d.name().to_owned()))
        .collect();
    let mut apply: Vec<DesiredObject> = desired
        .into_iter()
        .filter(|d| {
            live.get(&(d.kind(), d.name().to_owned()))
                .map(String::as_str)
                != Some(d.content_hash())
        })
        .collect();
    // Parts first, the manifest last.
    apply.sort_by_key(|d| {
        d.meta()
            .annotations
            .iter()
            .any(|a| a.contains_key(CONFIG_HASH))
    });
    let delete = live
        .keys()
        .filter(|k| !wanted.contains(*k))
        .filter(|(kind, name)| match *kind {
            "Secret" => naming.is_shard(name, "keys"),
            "ConfigMap" => naming.is_shard(name, "routing"),
            _ => false,
        })
        .cloned()
        .collect();
    Plan { apply, delete }
}

#[cfg(test)]
mod tests {
    use tollgate_api::{
        config::{CompiledKey, GatewayConfig},
        parts,
    };

    use super::*;

    fn naming() -> Naming {
        Naming {
            namespace: "tollgate".into(),
            prefix: "tollgate-gateway".into(),
            max_key_shards: DEFAULT_MAX_KEY_SHARDS,
            max_routing_shards: DEFAULT_MAX_ROUTING_SHARDS,
        }
    }

    fn config(keys: usize) -> GatewayConfig {
        let mut config = GatewayConfig::default();
        config.keys.keys = (0..keys)
            .map(|i| {
                let sha256 = sha256_hex(format!("key-{i}").as_bytes());
                CompiledKey {
                    id: sha256[..24].to_owned(),
                    sha256,
                    api_key: format!("default/key-{i}"),
                    owner: format!("team-{}", i % 7),
                    team: None,
                    allowed_models: vec!["gpt-*".into()],
                    shared_routes_from: Vec::new(),
                    limits: None,
                    budget: None,
                    expires_at: None,
                    guardrails: Vec::new(),
                }
            })
            .collect();
        config.keys.keys.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        config
    }

    fn live_of(objects: &[DesiredObject]) -> LiveObjects {
        objects
            .iter()
            .map(|o| ((o.kind(), o.name().to_owned()), o.content_hash().to_owned()))
            .collect()
    }

    #[test]
    fn objects_are_named_labelled_and_hashed() {
        let split = parts::split(&config(3)).unwrap();
        let objects = desired_objects(&split, &naming()).unwrap();
        let names: Vec<(&str, &str)> = objects.iter().map(|o| (o.kind(), o.name())).collect();
        assert_eq!(
            names,
            [
                ("ConfigMap", "tollgate-gateway-config"),
                ("Secret", "tollgate-gateway-credentials"),
                ("Secret", "tollgate-gateway-keys-00"),
            ]
        );
        let DesiredObject::ConfigMap(cm) = &objects[0] else {
            panic!()
        };
        let data = cm.data.as_ref().unwrap();
        assert!(data.contains_key("manifest.json") && data.contains_key("routing.json"));
        assert_eq!(
            cm.metadata.annotations.as_ref().unwrap()[CONFIG_HASH],
            split.config_hash
        );
        for o in &objects {
            assert_eq!(o.content_hash().len(), 64);
            let labels = o.meta().labels.as_ref().unwrap();
            assert_eq!(labels[MANAGED_BY], MANAGED_BY_VALUE);
            assert_eq!(o.meta().namespace.as_deref(), Some("tollgate"));
            // Generated objects belong to no custom resource.
            assert!(o.meta().owner_references.is_none());
        }
        // The Debug form never shows Secret data.
        let shown = format!("{objects:?}");
        assert!(!shown.contains("key-0") && !shown.contains("sha256"));
    }

    #[test]
    fn nothing_is_written_when_nothing_changed() {
        let split = parts::split(&config(50)).unwrap();
        let objects = desired_objects(&split, &naming()).unwrap();
        let live = live_of(&objects);
        assert!(plan(objects, &live, &naming()).is_empty());
    }

    #[test]
    fn changing_one_key_rewrites_the_manifest_and_one_shard_only() {
        // Small shards so 2,000 keys spread over several.
        let before = parts::split_with_limit(&config(2000), 64 * 1024).unwrap();
        let old = desired_objects(&before, &naming()).unwrap();
        let shard_count = old.len() - 2;
        assert!(shard_count >= 4, "{shard_count} shards");
        let mut changed = config(2000);
        changed.keys.keys[1234].owner = "someone-else".into();
        let after = parts::split_with_limit(&changed, 64 * 1024).unwrap();
        let new = desired_objects(&after, &naming()).unwrap();
        let p = plan(new, &live_of(&old), &naming());
        let names: Vec<&str> = p.apply.iter().map(|o| o.name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].starts_with("tollgate-gateway-keys-"));
        assert_eq!(
            names[1], "tollgate-gateway-config",
            "the manifest goes last"
        );
        assert!(p.delete.is_empty());
    }

    #[test]
    fn shards_no_longer_needed_are_deleted_and_unrelated_objects_kept() {
        let big = parts::split_with_limit(&config(2000), 64 * 1024).unwrap();
        let mut live = live_of(&desired_objects(&big, &naming()).unwrap());
        let small = parts::split_with_limit(&config(10), 64 * 1024).unwrap();
        let p = plan(
            desired_objects(&small, &naming()).unwrap(),
            &live,
            &naming(),
        );
        assert!(!p.delete.is_empty());
        assert!(
            p.delete
                .iter()
                .all(|(k, n)| *k == "Secret" && n.starts_with("tollgate-gateway-keys-"))
        );
        let has = |p: &Plan, kind: &str, name: &str| {
            p.delete.iter().any(|(k, n)| *k == kind && n == name)
        };
        assert!(!has(&p, "Secret", "tollgate-gateway-keys-00"));
        assert!(!has(&p, "Secret", "tollgate-gateway-credentials"));
        // Only shards of this release are ever deleted.
        for (kind, name) in [
            ("ConfigMap", "other"),
            ("Secret", "other-keys-01"),
            ("ConfigMap", "tollgate-gateway-config"),
        ] {
            live.insert((kind, name.into()), "x".into());
        }
        let p = plan(
            desired_objects(&small, &naming()).unwrap(),
            &live,
            &naming(),
        );
        assert!(!has(&p, "ConfigMap", "other") && !has(&p, "Secret", "other-keys-01"));
    }

    #[test]
    fn live_objects_are_compared_by_their_data_and_scoped_to_the_release() {
        let split = parts::split(&config(100)).unwrap();
        let objects = desired_objects(&split, &naming()).unwrap();
        let DesiredObject::Secret(shard) = objects.last().unwrap().clone() else {
            panic!("a key shard last")
        };
        let files = |s: &Secret| {
            s.data
                .clone()
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect::<Vec<_>>()
        };
        let hash_of = |s: &Secret| {
            let f = files(s);
            live_hash(
                f.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                s.metadata.annotations.as_ref(),
            )
        };
        assert_eq!(
            hash_of(&shard),
            shard.metadata.annotations.as_ref().unwrap()[CONTENT_HASH]
        );
        // A hand edit of the data, with the annotation left alone, is seen.
        let mut edited = shard.clone();
        edited.data.as_mut().unwrap().values_mut().next().unwrap().0 = b"{}".to_vec();
        assert_eq!(hash_of(&edited), "");
        // So is an annotation edited to match nothing.
        let mut relabelled = shard.clone();
        relabelled
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(CONTENT_HASH.into(), "0".repeat(64));
        assert_eq!(hash_of(&relabelled), "");

        let n = naming();
        assert_eq!(
            shard.metadata.labels.as_ref().unwrap()[PREFIX_LABEL],
            "tollgate-gateway"
        );
        assert!(
            n.selector()
                .ends_with(",tollgate.dev/config-prefix=tollgate-gateway")
        );
        assert!(
            n.owns_secret("tollgate-gateway-keys-03")
                && n.owns_secret("tollgate-gateway-credentials")
        );
        for other in [
            "tollgate-gateway-2-keys-03",
            "tollgate-keys-03",
            "tollgate-gateway-keys-x1",
            "tollgate-gateway-keys-",
        ] {
            assert!(!n.owns_secret(other), "{other}");
        }
        let long = Naming {
            prefix: "p".repeat(100),
            ..naming()
        };
        let label = long.prefix_label();
        assert!(label.len() <= 63, "{label}");
        assert_ne!(
            label,
            Naming {
                prefix: format!("{}q", "p".repeat(99)),
                ..naming()
            }
            .prefix_label()
        );
    }

    #[test]
    fn more_shards_than_the_gateways_mount_is_an_error() {
        let split = parts::split_with_limit(&config(2000), 64 * 1024).unwrap();
        let mut small = naming();
        small.max_key_shards = 2;
        let err = desired_objects(&split, &small).unwrap_err();
        assert!(matches!(err, DesiredError::TooManyShards(n, 2) if n > 2));
        assert!(err.to_string().contains("--max-key-shards"));
    }

    #[test]
    fn ten_thousand_keys_fit_in_objects_under_the_kubernetes_size_limit() {
        let split = parts::split(&config(10_000)).unwrap();
        let objects = desired_objects(&split, &naming()).unwrap();
        for o in &objects {
            let size = match o {
                DesiredObject::ConfigMap(c) => serde_json::to_vec(c).unwrap().len(),
                DesiredObject::Secret(s) => serde_json::to_vec(s).unwrap().len(),
            };
            // 1 MiB is the limit of a Secret or ConfigMap.
            assert!(size < 1024 * 1024, "{} is {size} bytes", o.name());
        }
    }
}
