//! Guardrails: content rules checked on the text of every request before it is forwarded
//! (declared on a RoutePolicy, and optionally added to by an ApiKey).

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One guardrail rule: a detector and what to do when it fires.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("self.detector != 'regex' || has(self.pattern)").message("detector regex needs a pattern").field_path(".pattern"),
    validation = Rule::new("self.detector != 'blockedTerms' || (has(self.terms) && size(self.terms) > 0)").message("detector blockedTerms needs terms").field_path(".terms"),
    validation = Rule::new("!(self.detector in ['maxMessages', 'maxPromptBytes']) || has(self.limit)").message("detectors maxMessages and maxPromptBytes need a limit").field_path(".limit"),
    validation = Rule::new("!(self.detector in ['maxMessages', 'maxPromptBytes']) || self.action != 'redact'").message("a size limit cannot redact; use block or log").field_path(".action"),
    validation = Rule::new("!(self.detector in ['maxMessages', 'maxPromptBytes']) || !has(self.applyTo) || !('response' in self.applyTo)").message("size limits apply to requests only").field_path(".applyTo")
)]
#[serde(rename_all = "camelCase")]
pub struct Guardrail {
    /// Name of the rule, shown in the error a blocked client receives, in logs and in the
    /// `rule` label of `tollgate_guardrail_hits_total`. Defaults to the detector's name;
    /// names must be unique within one list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-_.A-Za-z0-9]*[A-Za-z0-9])?$")
    )]
    pub name: Option<String>,
    /// What the rule looks for in the request's text (chat and Anthropic messages and
    /// `system`, text content blocks, completion `prompt`, embedding `input`).
    pub detector: Detector,
    /// `regex` only: the pattern (Rust `regex` syntax, linear-time: no look-around or
    /// back-references). Matched case-sensitively unless it starts with `(?i)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,
    /// `blockedTerms` only: words or phrases matched case-insensitively as whole words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 256)))]
    pub terms: Vec<String>,
    /// `maxMessages`: most messages (or prompt/input items) a request may carry;
    /// `maxPromptBytes`: most bytes of text (UTF-8) a request may carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub limit: Option<u64>,
    /// What happens when the rule fires: `block` refuses the request with HTTP 400 and
    /// code `guardrail_blocked` (naming the rule, never the matched text); `redact`
    /// replaces each match with `[REDACTED:<name>]` before the request is forwarded
    /// or cached (not for size limits); `log` only logs and counts the hit.
    pub action: GuardrailAction,
    /// What the rule checks: `request` (the default) and/or `response`, the text of
    /// answers, complete or streamed. A `block` on a complete answer withholds it (HTTP
    /// 502, code `guardrail_blocked`) and ends a stream with an error event before any of
    /// the match is relayed; a `redact` rewrites the answer before it is cached and
    /// returned (streamed text is held back up to 128 bytes so a match split across
    /// chunks is still caught). Size limits apply to requests only.
    #[serde(default = "default_apply_to")]
    #[schemars(length(min = 1, max = 2), extend("x-kubernetes-list-type" = "set"))]
    pub apply_to: Vec<GuardrailTarget>,
}

fn default_apply_to() -> Vec<GuardrailTarget> {
    vec![GuardrailTarget::Request]
}

/// What a guardrail checks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GuardrailTarget {
    /// The request's text.
    Request,
    /// The text of an answer, complete or streamed.
    Response,
}

/// What a guardrail looks for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Detector {
    /// E-mail addresses (Unicode letters allowed).
    Email,
    /// Phone numbers: international (`+` and 8–15 digits) or national (10–11 digits),
    /// with spaces, dots, dashes or parentheses between groups; not next to a letter,
    /// digit or `.`, and not dates, Unix times or decimal numbers.
    Phone,
    /// Payment card numbers: 13–19 digits (spaces or dashes allowed) that pass the Luhn
    /// check, also when more digits follow (a CVV, an expiry date).
    CreditCard,
    /// IBANs (any case, spaces allowed) whose mod-97 check digits are valid.
    Iban,
    /// Credentials: OpenAI (`sk-…`, `sk-proj-…`), Anthropic (`sk-ant-…`), AWS access key
    /// ids (`AKIA…`, temporary `ASIA…`), GitHub tokens (`ghp_…` and kin), Google API keys
    /// (`AIza…`), Slack tokens (`xoxb-…`, `xoxp-…`), Tollgate keys (`tg_…`) and PEM and
    /// PGP private keys (through their END line).
    Secret,
    /// The custom `pattern` (refused if it can match empty text).
    Regex,
    /// Prompt-injection phrasing such as "ignore all previous instructions", "disregard
    /// the system prompt", "reveal your system prompt" or "you are now DAN" (the rule set
    /// is listed in docs/guardrails.md).
    PromptInjection,
    /// Any of `terms` (any white space between words).
    BlockedTerms,
    /// More than `limit` messages.
    MaxMessages,
    /// More than `limit` bytes of text.
    MaxPromptBytes,
}

impl Detector {
    /// The name used in manifests (and the default rule name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Phone => "phone",
            Self::CreditCard => "creditCard",
            Self::Iban => "iban",
            Self::Secret => "secret",
            Self::Regex => "regex",
            Self::PromptInjection => "promptInjection",
            Self::BlockedTerms => "blockedTerms",
            Self::MaxMessages => "maxMessages",
            Self::MaxPromptBytes => "maxPromptBytes",
        }
    }

    /// Whether the detector measures the request rather than matching text.
    pub fn is_limit(self) -> bool {
        matches!(self, Self::MaxMessages | Self::MaxPromptBytes)
    }
}

/// What a guardrail does when it fires.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GuardrailAction {
    /// Refuse the request (HTTP 400, code `guardrail_blocked`).
    Block,
    /// Replace each match with `[REDACTED:<name>]` (the rule name) before forwarding.
    Redact,
    /// Log and count only.
    Log,
}

impl GuardrailAction {
    /// The name used in manifests and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Redact => "redact",
            Self::Log => "log",
        }
    }
}
