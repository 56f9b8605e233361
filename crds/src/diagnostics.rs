//! What `compile` found wrong, per object, in a form that maps directly onto
//! `status.conditions`.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

/// Condition types.
pub mod condition_types {
    /// The object is compiled into the served configuration.
    pub const READY: &str = "Ready";
    /// Every reference (Secrets, Providers) was found and usable.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
}

/// Condition reasons (CamelCase, stable: users alert on them).
pub mod reasons {
    /// Compiled without problems.
    pub const READY: &str = "Ready";
    /// Compiled and serving, but part of the object was left out (see message).
    pub const DEGRADED: &str = "Degraded";
    /// Every reference resolved.
    pub const RESOLVED: &str = "Resolved";
    /// A field is invalid in a way the schema could not catch (or the schema was bypassed).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A referenced Secret does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// A referenced Secret lacks the referenced key.
    pub const SECRET_KEY_NOT_FOUND: &str = "SecretKeyNotFound";
    /// A referenced Secret value is empty or malformed.
    pub const INVALID_SECRET: &str = "InvalidSecret";
    /// A RoutePolicy target names a Provider that does not exist.
    pub const PROVIDER_NOT_FOUND: &str = "ProviderNotFound";
    /// A RoutePolicy target names a Provider that is not Ready.
    pub const PROVIDER_NOT_READY: &str = "ProviderNotReady";
    /// A RoutePolicy target names a model its Provider does not serve.
    pub const MODEL_NOT_FOUND: &str = "ModelNotFound";
    /// A model name or glob is not valid.
    pub const INVALID_MODEL_PATTERN: &str = "InvalidModelPattern";
    /// Another RoutePolicy already claims this model name or pattern.
    pub const MODEL_CONFLICT: &str = "ModelConflict";
    /// No target of the RoutePolicy can be used.
    pub const NO_USABLE_TARGETS: &str = "NoUsableTargets";
    /// The ApiKey is disabled.
    pub const DISABLED: &str = "Disabled";
    /// The ApiKey has expired.
    pub const EXPIRED: &str = "Expired";
    /// The key value is not a usable API key.
    pub const INVALID_KEY: &str = "InvalidKey";
    /// Another ApiKey has the same key value.
    pub const KEY_CONFLICT: &str = "KeyConflict";
    /// An allowed model is served by no RoutePolicy.
    pub const UNKNOWN_MODEL: &str = "UnknownModel";
    /// Budget currency differs from every Provider's currency.
    pub const CURRENCY_MISMATCH: &str = "CurrencyMismatch";
    /// The ApiKey's Secret name is taken by a Secret the operator did not create.
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    /// The Kubernetes API refused to write the ApiKey's Secret (invalid, over a quota,
    /// denied by an admission webhook, a terminating namespace, no permission there); the
    /// message is the API's.
    pub const SECRET_REFUSED: &str = "SecretRefused";
    /// The object does not fit in the configuration the gateways mount (an ApiKey whose
    /// key needs a key shard beyond `--max-key-shards`); what is served keeps updating.
    pub const CONFIG_TOO_LARGE: &str = "ConfigTooLarge";
    /// A new key is in the configuration but not yet in its Secret: it is written there
    /// once every live gateway serves it (at most the operator's `--key-publish-wait`
    /// later), so a client never reads a key the gateways still refuse.
    pub const KEY_PENDING: &str = "KeyPending";
    /// A reference crosses a tenant boundary the other side has not opened (a Provider in
    /// another namespace not shared with this one, a Secret without credential consent).
    pub const REF_NOT_PERMITTED: &str = "RefNotPermitted";
    /// Two ApiKeys would get the same key id.
    pub const KEY_ID_CONFLICT: &str = "KeyIdConflict";
    /// The key can reach no route: none in its namespace, none shared with it.
    pub const NO_ROUTES: &str = "NoRoutes";
    /// A shared route's name is served by the key's own namespace (or an earlier shared
    /// namespace), which wins.
    pub const SHARED_ROUTE_SHADOWED: &str = "SharedRouteShadowed";
}

/// Kind of a Tollgate object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    /// `Provider`.
    Provider,
    /// `RoutePolicy`.
    RoutePolicy,
    /// `ApiKey`.
    ApiKey,
}

impl Kind {
    /// The kind as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provider => "Provider",
            Self::RoutePolicy => "RoutePolicy",
            Self::ApiKey => "ApiKey",
        }
    }
}

/// Identifies one object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    /// Kind.
    pub kind: Kind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// A reference to `kind` `namespace/name`.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Severity {
    /// The object, or the part of it named in the message, is not served.
    Error,
    /// Served, but probably not what was meant.
    Warning,
}

/// One problem found by `compile`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The object it concerns.
    pub object: ObjectRef,
    /// Error or warning.
    pub severity: Severity,
    /// The condition it sets to False (for errors): `Ready` or `ResolvedRefs`.
    pub condition: &'static str,
    /// CamelCase reason, from [`reasons`].
    pub reason: &'static str,
    /// Human-readable explanation; never contains a secret value.
    pub message: String,
    /// JSON path of the offending field, e.g. `spec.targets[1].provider`.
    pub field: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{level}: {}: ", self.object)?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{} ({})", self.message, self.reason)
    }
}

/// The computed value of one condition, before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConditionState {
    /// `Ready` or `ResolvedRefs`.
    pub type_: &'static str,
    /// `True` or `False`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Message (problems joined with `; `).
    pub message: String,
}

impl ConditionState {
    /// A `metav1.Condition`. `previous` is the condition currently in status, whose
    /// transition time is kept when the status did not change.
    pub fn to_condition(
        &self,
        generation: Option<i64>,
        now: Time,
        previous: Option<&Condition>,
    ) -> Condition {
        let last_transition_time = match previous {
            Some(p) if p.status == self.status => p.last_transition_time.clone(),
            _ => now,
        };
        Condition {
            type_: self.type_.to_owned(),
            status: self.status.to_owned(),
            reason: self.reason.to_owned(),
            message: self.message.clone(),
            observed_generation: generation,
            last_transition_time,
        }
    }
}

/// Computes the conditions of one object from its diagnostics and whether it was compiled
/// into the configuration. `summary` describes a healthy object (e.g. "serving 3 models").
pub fn conditions_for(
    object: &ObjectRef,
    diagnostics: &[Diagnostic],
    served: bool,
    summary: &str,
) -> Vec<ConditionState> {
    let mine: Vec<&Diagnostic> = diagnostics.iter().filter(|d| &d.object == object).collect();
    let errors: Vec<&&Diagnostic> = mine
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .collect();
    let join = |ds: &mut dyn Iterator<Item = &&Diagnostic>| {
        ds.map(|d| match &d.field {
            Some(f) => format!("{f}: {}", d.message),
            None => d.message.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
    };

    let ready = if !served {
        ConditionState {
            type_: condition_types::READY,
            status: "False",
            reason: errors.first().map_or(reasons::INVALID_SPEC, |d| d.reason),
            message: join(&mut mine.iter()),
        }
    } else if errors.is_empty() {
        let warnings = join(&mut mine.iter());
        ConditionState {
            type_: condition_types::READY,
            status: "True",
            reason: reasons::READY,
            message: if warnings.is_empty() {
                summary.to_owned()
            } else {
                format!("{summary}; {warnings}")
            },
        }
    } else {
        ConditionState {
            type_: condition_types::READY,
            status: "True",
            reason: reasons::DEGRADED,
            message: format!("{summary}; {}", join(&mut mine.iter())),
        }
    };

    // Every kind references something (Secrets or Providers), so every kind has both.
    let ref_errors: Vec<&&Diagnostic> = errors
        .iter()
        .copied()
        .filter(|d| d.condition == condition_types::RESOLVED_REFS)
        .collect();
    let resolved = match ref_errors.first() {
        None => ConditionState {
            type_: condition_types::RESOLVED_REFS,
            status: "True",
            reason: reasons::RESOLVED,
            message: "all references resolved".to_owned(),
        },
        Some(first) => ConditionState {
            type_: condition_types::RESOLVED_REFS,
            status: "False",
            reason: first.reason,
            message: join(&mut ref_errors.iter().copied()),
        },
    };
    vec![ready, resolved]
}
