//! The resource registry: which group/version/plural the emulator serves.
//!
//! Each [`ResourceDef`] describes one resource as discovery reports it
//! (`APIResource`): plural and singular name, kind, scope and whether it has a
//! `status` subresource. The emulator serves CRUD, patch and watch for every
//! registered resource generically; a handful of kinds (Secrets, ConfigMaps,
//! Namespaces) get extra behaviour keyed on their group and plural.

use serde_json::Value;

/// Key of a resource inside the store: `(group, version, plural)`.
pub(crate) type ResKey = (String, String, String);

/// One served API resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    /// API version, e.g. `v1` or `v1alpha1`.
    pub version: String,
    /// Plural resource name used in URLs, e.g. `configmaps`.
    pub plural: String,
    /// Singular name reported by discovery, e.g. `configmap`.
    pub singular: String,
    /// Kind, e.g. `ConfigMap`.
    pub kind: String,
    /// Namespaced (`true`) or cluster-scoped.
    pub namespaced: bool,
    /// Whether `<plural>/status` is a separate subresource (spec/status split).
    pub status_subresource: bool,
    /// Short names reported by discovery.
    pub short_names: Vec<String>,
    /// Served like a custom resource: an immediate `DELETE` answers with the
    /// deleted object. Built-in kinds answer with a `Success` Status instead
    /// (kube-rs: `Either::Left` vs `Either::Right`).
    pub custom: bool,
}

impl ResourceDef {
    /// A namespaced resource; `api_version` is `v1` or `group/version`.
    pub fn namespaced(api_version: &str, plural: &str, kind: &str) -> Self {
        Self::build(api_version, plural, kind, true)
    }

    /// A cluster-scoped resource; `api_version` is `v1` or `group/version`.
    pub fn cluster_scoped(api_version: &str, plural: &str, kind: &str) -> Self {
        Self::build(api_version, plural, kind, false)
    }

    /// Enables the `status` subresource.
    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    /// Marks the resource as a custom resource (see [`ResourceDef::custom`]).
    pub fn as_custom_resource(mut self) -> Self {
        self.custom = true;
        self
    }

    /// Sets the short names reported by discovery.
    pub fn with_short_names(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    fn build(api_version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        let (group, version) = split_api_version(api_version);
        Self {
            group,
            version,
            plural: plural.to_string(),
            singular: kind.to_ascii_lowercase(),
            kind: kind.to_string(),
            namespaced,
            status_subresource: false,
            short_names: Vec::new(),
            custom: false,
        }
    }

    /// `v1` for the core group, otherwise `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The resource name used in error messages: `plural` or `plural.group`.
    pub(crate) fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub(crate) fn key(&self) -> ResKey {
        (
            self.group.clone(),
            self.version.clone(),
            self.plural.clone(),
        )
    }

    /// Whether this is the core `v1` resource `plural`.
    pub(crate) fn is_core(&self, plural: &str) -> bool {
        self.group.is_empty() && self.plural == plural
    }

    /// One definition per served version of a `CustomResourceDefinition`
    /// manifest (`apiextensions.k8s.io/v1`), as JSON. They are marked
    /// [`custom`](ResourceDef::custom).
    pub fn from_crd(crd: &Value) -> Result<Vec<ResourceDef>, String> {
        let spec = &crd["spec"];
        let group = spec["group"].as_str().ok_or("CRD has no spec.group")?;
        let names = &spec["names"];
        let plural = names["plural"]
            .as_str()
            .ok_or("CRD has no spec.names.plural")?;
        let kind = names["kind"].as_str().ok_or("CRD has no spec.names.kind")?;
        let namespaced = spec["scope"].as_str() != Some("Cluster");
        let singular = names["singular"]
            .as_str()
            .map_or_else(|| kind.to_ascii_lowercase(), str::to_string);
        let short_names: Vec<String> = names["shortNames"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let versions = spec["versions"]
            .as_array()
            .ok_or("CRD has no spec.versions")?;
        let mut defs = Vec::new();
        for v in versions {
            if v["served"].as_bool() == Some(false) {
                continue;
            }
            let version = v["name"].as_str().ok_or("CRD version without a name")?;
            defs.push(ResourceDef {
                group: group.to_string(),
                version: version.to_string(),
                plural: plural.to_string(),
                singular: singular.clone(),
                kind: kind.to_string(),
                namespaced,
                status_subresource: v["subresources"].get("status").is_some(),
                short_names: short_names.clone(),
                custom: true,
            });
        }
        Ok(defs)
    }
}

/// Splits `group/version` (or a bare core `version`) into its parts.
pub(crate) fn split_api_version(api_version: &str) -> (String, String) {
    match api_version.rsplit_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), api_version.to_string()),
    }
}

/// The resources every emulator starts with.
pub(crate) fn builtin_resources() -> Vec<ResourceDef> {
    vec![
        ResourceDef::cluster_scoped("v1", "namespaces", "Namespace")
            .with_status()
            .with_short_names(&["ns"]),
        ResourceDef::namespaced("v1", "configmaps", "ConfigMap").with_short_names(&["cm"]),
        ResourceDef::namespaced("v1", "secrets", "Secret"),
        ResourceDef::namespaced("v1", "events", "Event").with_short_names(&["ev"]),
        ResourceDef::namespaced("events.k8s.io/v1", "events", "Event").with_short_names(&["ev"]),
        ResourceDef::namespaced("coordination.k8s.io/v1", "leases", "Lease"),
        ResourceDef::namespaced("tollgate.dev/v1alpha1", "providers", "Provider")
            .as_custom_resource()
            .with_status()
            .with_short_names(&["tgp"]),
        ResourceDef::namespaced("tollgate.dev/v1alpha1", "routepolicies", "RoutePolicy")
            .as_custom_resource()
            .with_status()
            .with_short_names(&["tgr"]),
        ResourceDef::namespaced("tollgate.dev/v1alpha1", "apikeys", "ApiKey")
            .as_custom_resource()
            .with_status()
            .with_short_names(&["tgk"]),
    ]
}
