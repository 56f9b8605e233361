//! `compile`: Tollgate resources (and the Secrets they reference) → [`GatewayConfig`] plus
//! per-object diagnostics.
//!
//! Pure: no I/O, no clock (the caller passes `now`). Used by the operator and by the
//! gateway's standalone mode. A broken object is left out of the configuration and
//! reported; it never breaks the rest.

mod api_key;
pub mod egress;
mod guardrails;
pub mod patterns;
mod provider;
mod route;
pub mod secrets;
pub mod views;

use std::collections::BTreeMap;

use jiff::Timestamp;
use kube::ResourceExt;

use crate::{
    config::{CompiledLimits, GatewayConfig},
    diagnostics::{
        ConditionState, Diagnostic, Kind, ObjectRef, Severity, condition_types, conditions_for,
    },
    v1alpha1::{ApiKey, Limits, Provider, RoutePolicy},
};
pub use api_key::{key_id, key_prefix, secret_name, secret_name_problem};
pub use secrets::SecretStore;

/// Namespace assumed for objects that name none (standalone manifests).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The objects to compile.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    /// Providers.
    pub providers: Vec<Provider>,
    /// RoutePolicies.
    pub route_policies: Vec<RoutePolicy>,
    /// ApiKeys.
    pub api_keys: Vec<ApiKey>,
}

/// What compile made of one object, for its status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectOutcome {
    /// Whether it is part of the configuration.
    pub served: bool,
    /// `metadata.generation` compiled.
    pub generation: Option<i64>,
    /// One line describing a healthy object.
    pub summary: String,
    /// Provider: models compiled.
    pub model_count: Option<u32>,
    /// RoutePolicy: targets compiled.
    pub ready_targets: Option<u32>,
    /// ApiKey: key id.
    pub key_id: Option<String>,
    /// ApiKey: first characters of the key.
    pub key_prefix: Option<String>,
    /// ApiKey: the Secret read.
    pub secret_name: Option<String>,
}

/// The result of [`compile`].
#[derive(Clone, Debug, Default)]
pub struct CompileOutput {
    /// The configuration to serve.
    pub config: GatewayConfig,
    /// Every problem found, sorted by object.
    pub diagnostics: Vec<Diagnostic>,
    /// Outcome of every input object.
    pub objects: BTreeMap<ObjectRef, ObjectOutcome>,
}

impl CompileOutput {
    /// Diagnostics of one object.
    pub fn diagnostics_for<'a>(
        &'a self,
        object: &'a ObjectRef,
    ) -> impl Iterator<Item = &'a Diagnostic> + 'a {
        self.diagnostics.iter().filter(move |d| &d.object == object)
    }

    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }

    /// `Ready` and `ResolvedRefs` for one object.
    pub fn conditions(&self, object: &ObjectRef) -> Vec<ConditionState> {
        let outcome = self.objects.get(object).cloned().unwrap_or_default();
        conditions_for(object, &self.diagnostics, outcome.served, &outcome.summary)
    }
}

/// Collects diagnostics while compiling.
#[derive(Default)]
struct Report {
    diagnostics: Vec<Diagnostic>,
}

impl Report {
    fn push(
        &mut self,
        object: &ObjectRef,
        severity: Severity,
        condition: &'static str,
        reason: &'static str,
        field: &str,
        message: String,
    ) {
        self.diagnostics.push(Diagnostic {
            object: object.clone(),
            severity,
            condition,
            reason,
            message,
            field: (!field.is_empty()).then(|| field.to_owned()),
        });
    }

    /// An error that makes `Ready` false (or degraded).
    fn error(
        &mut self,
        object: &ObjectRef,
        reason: &'static str,
        field: &str,
        message: impl Into<String>,
    ) {
        self.push(
            object,
            Severity::Error,
            condition_types::READY,
            reason,
            field,
            message.into(),
        );
    }

    /// An error about a reference: sets `ResolvedRefs` false as well.
    fn ref_error(
        &mut self,
        object: &ObjectRef,
        reason: &'static str,
        field: &str,
        message: impl Into<String>,
    ) {
        self.push(
            object,
            Severity::Error,
            condition_types::RESOLVED_REFS,
            reason,
            field,
            message.into(),
        );
    }

    fn warning(
        &mut self,
        object: &ObjectRef,
        reason: &'static str,
        field: &str,
        message: impl Into<String>,
    ) {
        self.push(
            object,
            Severity::Warning,
            condition_types::READY,
            reason,
            field,
            message.into(),
        );
    }

    fn errors_for(&self, object: &ObjectRef) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| &d.object == object && d.severity == Severity::Error)
            .count()
    }
}

/// Namespace and name of an object, defaulting the namespace.
fn ns_name<K: ResourceExt>(obj: &K) -> (String, String) {
    (
        obj.namespace()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
        obj.name_any(),
    )
}

/// Precedence among objects that compete (model names, key values): oldest first, then
/// by namespace and name; objects without a creation time (standalone) come last.
fn precedence<K: ResourceExt>(obj: &K) -> (bool, Option<Timestamp>, String, String) {
    let created = obj.meta().creation_timestamp.as_ref().map(|t| t.0);
    let (ns, name) = ns_name(obj);
    (created.is_none(), created, ns, name)
}

fn compile_limits(
    object: &ObjectRef,
    field: &str,
    limits: &Limits,
    report: &mut Report,
) -> Option<CompiledLimits> {
    let zero = limits.requests_per_minute == Some(0)
        || limits.tokens_per_minute == Some(0)
        || limits.max_concurrent == Some(0);
    if zero {
        report.error(
            object,
            crate::diagnostics::reasons::INVALID_SPEC,
            field,
            "limits must be at least 1; leave a limit unset for no limit",
        );
        return None;
    }
    Some(CompiledLimits {
        requests_per_minute: limits.requests_per_minute,
        tokens_per_minute: limits.tokens_per_minute,
        max_concurrent: limits.max_concurrent,
    })
}

/// Choices of whoever runs `compile` (the operator's or the standalone gateway's flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileOptions {
    /// Accept Provider `baseUrl`s on link-local addresses and cloud metadata hosts
    /// (refused by default: see [`egress`]).
    pub allow_link_local_upstreams: bool,
}

/// Compiles `resources` against `secrets` as of `now`, with default options.
pub fn compile(resources: &Resources, secrets: &SecretStore, now: Timestamp) -> CompileOutput {
    compile_with(resources, secrets, now, CompileOptions::default())
}

/// Compiles `resources` against `secrets` as of `now`.
pub fn compile_with(
    resources: &Resources,
    secrets: &SecretStore,
    now: Timestamp,
    options: CompileOptions,
) -> CompileOutput {
    let mut report = Report::default();
    let mut objects = BTreeMap::new();
    let mut config = GatewayConfig::default();

    let known_providers = provider::compile_all(
        &resources.providers,
        secrets,
        options,
        &mut config,
        &mut report,
        &mut objects,
    );
    route::compile_all(
        &resources.route_policies,
        &known_providers,
        &mut config,
        &mut report,
        &mut objects,
    );
    api_key::compile_all(
        &resources.api_keys,
        secrets,
        now,
        &mut config,
        &mut report,
        &mut objects,
    );

    let mut diagnostics = report.diagnostics;
    diagnostics.sort_by(|a, b| a.object.cmp(&b.object).then(a.severity.cmp(&b.severity)));
    CompileOutput {
        config,
        diagnostics,
        objects,
    }
}

fn object_ref<K: ResourceExt>(kind: Kind, obj: &K) -> ObjectRef {
    let (ns, name) = ns_name(obj);
    ObjectRef {
        kind,
        namespace: ns,
        name,
    }
}

#[cfg(test)]
mod tests;
