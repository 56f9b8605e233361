//! `ApiKey`: a client credential with its owner, allowed models, limits and budget.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    CURRENCY_PATTERN, CommonStatus, DURATION_PATTERN, Limits, MODEL_PATTERN, NAME_PATTERN,
    NAMESPACE_PATTERN,
};

/// Name of the data key that holds the plaintext API key in an ApiKey's Secret.
pub const API_KEY_SECRET_KEY: &str = "apiKey";

/// Data key of an ApiKey's Secret holding the SHA-256 (lowercase hex) of the key replaced
/// by the last rotation, accepted until [`PREVIOUS_KEY_EXPIRES_SECRET_KEY`].
pub const PREVIOUS_KEY_SHA256_SECRET_KEY: &str = "previousKeySha256";

/// Data key of an ApiKey's Secret: end of the previous key's grace period (RFC 3339).
pub const PREVIOUS_KEY_EXPIRES_SECRET_KEY: &str = "previousKeyExpiresAt";

/// A client API key. The operator generates the key, writes it once into the Secret named
/// by `secretName` for the client application, and gives gateways only its SHA-256 hash.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "ApiKey",
    plural = "apikeys",
    namespaced,
    status = "ApiKeyStatus",
    shortname = "tgk",
    category = "tollgate",
    derive = "PartialEq",
    doc = "A client API key with its owner, allowed models, limits and budget.",
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".spec.owner"}"#,
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".status.keyPrefix"}"#,
    printcolumn = r#"{"name":"RPM","type":"integer","jsonPath":".spec.limits.requestsPerMinute"}"#,
    printcolumn = r#"{"name":"Spend","type":"string","jsonPath":".status.usage.spend"}"#,
    printcolumn = r#"{"name":"Budget","type":"string","jsonPath":".status.usage.budget"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","priority":1}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".spec.expiresAt","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySpec {
    /// Who the key belongs to (a team, service or person). The unit of attribution in
    /// usage, metrics and cache scope.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$")
    )]
    pub owner: String,

    /// Optional team or cost centre, for reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$")
    )]
    pub team: Option<String>,

    /// Free text shown to operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Other namespaces whose shared RoutePolicies this key may use, in order of
    /// precedence. The key resolves a model name among its own namespace's routes first,
    /// then among the routes of these namespaces that are shared with its namespace
    /// (RoutePolicy `sharedWith`), in the order listed. Empty (the default): only its own
    /// namespace's routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 63), regex(pattern = NAMESPACE_PATTERN)), extend("x-kubernetes-list-type" = "set"))]
    pub shared_routes_from: Vec<String>,

    /// Client-facing model names (or globs) the key may call. Empty allows every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 256), regex(pattern = MODEL_PATTERN)), extend("x-kubernetes-list-type" = "set"))]
    pub allowed_models: Vec<String>,

    /// Per-key limits, enforced exactly across all gateway replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,

    /// Guardrails for this key's requests, checked in addition to (after) those of the
    /// route; see RoutePolicy `spec.guardrails`. An invalid rule keeps the key from
    /// being accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub guardrails: Vec<super::guardrails::Guardrail>,

    /// Spending cap; requests are rejected with 429 once it is used up for the period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,

    /// When the key stops working (RFC 3339). Unset means never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,

    /// Turns the key off without deleting it.
    #[serde(default)]
    pub disabled: bool,

    /// Name of the Secret (same namespace) that holds the plaintext key under `apiKey`.
    /// Defaults to `<metadata.name>-key`. The operator creates it; in standalone mode you
    /// supply it yourself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub secret_name: Option<String>,

    /// Key rotation: change `rotation.generation` to issue a new key; the previous key
    /// keeps working for `gracePeriod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
}

/// Spending cap.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.amount > 0.0").message("budget amount must be positive").field_path(".amount"))]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// Maximum spend per period, in `currency`.
    pub amount: f64,
    /// Budget period: `daily` and `monthly` reset at 00:00 UTC (on the 1st for monthly);
    /// `total` never resets.
    #[serde(default)]
    pub period: BudgetPeriod,
    /// ISO 4217 currency; must match the currency of the Providers the key uses.
    #[serde(default = "default_currency")]
    #[schemars(regex(pattern = CURRENCY_PATTERN))]
    pub currency: String,
}

fn default_currency() -> String {
    "USD".to_owned()
}

/// Budget period.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BudgetPeriod {
    /// Resets every day at 00:00 UTC.
    Daily,
    /// Resets on the 1st of every month at 00:00 UTC.
    #[default]
    Monthly,
    /// Never resets.
    Total,
}

/// Rotation request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// Increase to rotate the key: the operator issues a new key when this differs from
    /// `status.rotatedGeneration`.
    #[schemars(range(min = 0))]
    pub generation: i64,
    /// How long the previous key keeps working after a rotation.
    #[serde(default = "default_grace_period")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub grace_period: String,
}

fn default_grace_period() -> String {
    "1h".to_owned()
}

/// Observed state of an ApiKey.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Stable identifier of this ApiKey in logs, limits, budgets and usage records: the
    /// first 24 hex digits (96 bits) of the SHA-256 of `apikey:<namespace>/<name>`. A
    /// rotation keeps it, so limits and budgets carry over to the new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// First characters of the key, to recognise it (e.g. `tg_4fZq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// The Secret holding the plaintext key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The `spec.rotation.generation` the current key was issued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_generation: Option<i64>,
    /// The key replaced by the last rotation, valid until `expiresAt`. Shown for
    /// information: gateways accept the previous key only as recorded in the key Secret
    /// (`previousKeySha256`, `previousKeyExpiresAt`), which the operator writes with the
    /// new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key: Option<PreviousKey>,
    /// Usage and spend in the current budget period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<KeyUsage>,
}

/// A rotated-out key still inside its grace period.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviousKey {
    /// SHA-256 of the previous key, lowercase hex.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// End of the grace period.
    pub expires_at: Time,
}

/// Usage in the current budget period, as last read from the gateways' shared store.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyUsage {
    /// Start of the period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<Time>,
    /// Requests admitted.
    #[serde(default)]
    pub requests: u64,
    /// Input (prompt) tokens.
    #[serde(default)]
    pub input_tokens: u64,
    /// Output (completion) tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// Spend, formatted with its currency (e.g. `12.34 USD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<String>,
    /// Budget, formatted with its currency (e.g. `100.00 USD/monthly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// When these figures were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
}
