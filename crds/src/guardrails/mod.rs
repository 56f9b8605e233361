//! The guardrail engine: a list of [`CompiledGuardrail`]s compiled once per configuration
//! (one linear-time `RegexSet` pre-filter plus one `Regex` per text rule) and the check of
//! a request body against it. Pure: no I/O; the gateway decides what a verdict means.
//!
//! Text rules run on every user-supplied text of a request: `messages[].content` (strings
//! and `text` / `tool_result` content blocks), Anthropic's `system`, completion `prompt`
//! and embedding `input` (strings or arrays of strings). Checksummed detectors (cards,
//! IBANs) and phone numbers confirm each regex candidate in code.

use std::ops::Range;

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde_json::Value;

use crate::{
    config::CompiledGuardrail,
    v1alpha1::{Detector, GuardrailAction},
};

/// Compiled-program size cap for custom patterns (a few thousand states).
///
/// Built-in patterns use ASCII word boundaries (`(?-u:\b)`): Unicode ones keep the regex
/// crate off its fast DFA engines, which costs about ten times as much on long prompts.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

const EMAIL: &str =
    r"(?i-u)(?-u:\b)[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,24}(?-u:\b)";
// Candidates only: digit counts are checked in code.
const PHONE: &str =
    r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{1,4}\)[ .-]?)?[0-9]{2,5}(?:[ .-]?[0-9]{2,5}){1,4}";
const CREDIT_CARD: &str = r"(?-u:\b)[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)";
const IBAN: &str = r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?-u:\b)";
const SECRET: &str = concat!(
    r"(?-u:\b)(?:",
    r"sk-ant-[A-Za-z0-9_-]{20,}",                            // Anthropic
    r"|sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",     // OpenAI
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}",                           // AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}",                       // GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,255}",                     // GitHub fine-grained tokens
    r"|AIza[0-9A-Za-z_-]{35}",                               // Google API key
    r"|xox[abposr]-[A-Za-z0-9-]{10,}",                       // Slack tokens
    r"|tg_[A-Za-z0-9]{32,}",                                 // Tollgate keys
    r")(?-u:\b)|-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----", // PEM private keys
);

/// The prompt-injection rule set: `(id, pattern)`, matched case-insensitively. Kept small
/// and specific (phrasings seen in public jailbreak collections) so ordinary prompts do
/// not trip it; extend it with a `regex` rule where a deployment needs more.
pub const PROMPT_INJECTION_RULES: &[(&str, &str)] = &[
    (
        "ignore-previous-instructions",
        r"(?-u:\b)(?:ignore|disregard|forget|override|skip)\s+(?:(?:all|any|the|your|my|of|these|those)\s+)*(?:previous|prior|above|earlier|preceding|original|initial|system)\s+(?:instructions?|prompts?|rules|directions|guidelines|directives)(?-u:\b)",
    ),
    (
        "disregard-system-prompt",
        r"(?-u:\b)(?:ignore|disregard|forget|override|bypass)\s+(?:the\s+|your\s+)?system\s+(?:prompt|message)(?-u:\b)",
    ),
    (
        "reveal-system-prompt",
        r"(?-u:\b)(?:reveal|show|print|repeat|output|display|leak|dump|tell\s+me)\s+(?:me\s+)?(?:your|the)\s+(?:(?:initial|original|hidden|secret|full|entire)\s+)?(?:system\s+(?:prompt|message|instructions)|(?:hidden|secret|initial|original)\s+instructions)(?-u:\b)",
    ),
    (
        "reveal-your-instructions",
        r"(?-u:\b)what\s+(?:are|were)\s+your\s+(?:initial\s+|original\s+|hidden\s+|system\s+)?instructions(?-u:\b)",
    ),
    (
        "dan-persona",
        r"(?-u:\b)you\s+are\s+(?:now\s+)?DAN(?-u:\b)|(?-u:\b)DAN\s+mode(?-u:\b)|(?-u:\b)do\s+anything\s+now(?-u:\b)",
    ),
    (
        "unrestricted-persona",
        r"(?-u:\b)you\s+are\s+now\s+(?:an?\s+)?(?:unrestricted|unfiltered|uncensored|jailbroken)(?-u:\b)",
    ),
    (
        "developer-mode",
        r"(?-u:\b)(?:enable|enter|activate|switch\s+to)\s+(?:developer|god|jailbreak)\s+mode(?-u:\b)",
    ),
    (
        "no-restrictions",
        r"(?-u:\b)pretend\s+(?:that\s+)?you\s+(?:have\s+no|are\s+not\s+bound\s+by|don'?t\s+have)\s+(?:any\s+)?(?:restrictions|rules|guidelines|filters|limits)(?-u:\b)",
    ),
];

/// A compiled list of guardrails, ready for the hot path.
#[derive(Debug)]
pub struct Guardrails {
    rules: Vec<Rule>,
    /// Every text rule's pattern, for one pass that finds which rules may fire.
    set: RegexSet,
    /// Rule index of each pattern of `set`.
    set_rules: Vec<usize>,
    /// Set by [`Guardrails::refuse_all`].
    refuse: Option<Blocked>,
}

#[derive(Debug)]
struct Rule {
    name: String,
    detector: Detector,
    action: GuardrailAction,
    /// Text rules: the matcher.
    regex: Option<Regex>,
    /// Size rules: the limit.
    limit: u64,
    /// `[REDACTED:<name>]`.
    placeholder: String,
}

/// A rule that blocked a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// Rule name.
    pub rule: String,
    /// Its detector.
    pub detector: Detector,
}

/// A rule that fired (once per request, however often it matched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleHit {
    /// Rule name.
    pub rule: String,
    /// Its detector.
    pub detector: Detector,
    /// Its action.
    pub action: GuardrailAction,
}

/// What the guardrails made of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The first blocking rule that fired, if any.
    pub blocked: Option<Blocked>,
    /// Every rule that fired.
    pub hits: Vec<RuleHit>,
    /// Whether some text was replaced.
    pub redacted: bool,
}

impl Verdict {
    fn hit(&mut self, rule: &Rule) {
        if !self.hits.iter().any(|h| h.rule == rule.name) {
            self.hits.push(RuleHit {
                rule: rule.name.clone(),
                detector: rule.detector,
                action: rule.action,
            });
        }
        if rule.action == GuardrailAction::Block && self.blocked.is_none() {
            self.blocked = Some(Blocked {
                rule: rule.name.clone(),
                detector: rule.detector,
            });
        }
    }
}

/// The regex of a text detector (`None` for size limits).
fn pattern_of(rule: &CompiledGuardrail) -> Result<Option<String>, String> {
    Ok(Some(match rule.detector {
        Detector::Email => EMAIL.to_owned(),
        Detector::Phone => PHONE.to_owned(),
        Detector::CreditCard => CREDIT_CARD.to_owned(),
        Detector::Iban => IBAN.to_owned(),
        Detector::Secret => SECRET.to_owned(),
        Detector::PromptInjection => {
            let alternatives: Vec<String> = PROMPT_INJECTION_RULES
                .iter()
                .map(|(_, p)| format!("(?:{p})"))
                .collect();
            format!("(?i-u){}", alternatives.join("|"))
        }
        Detector::Regex => match &rule.pattern {
            Some(p) => p.clone(),
            None => return Err("detector regex needs a pattern".to_owned()),
        },
        Detector::BlockedTerms => {
            if rule.terms.is_empty() || rule.terms.iter().any(|t| t.trim().is_empty()) {
                return Err("detector blockedTerms needs non-empty terms".to_owned());
            }
            // ASCII boundaries (fast, see above), so only next to ASCII word characters.
            let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            let alternatives: Vec<String> = rule
                .terms
                .iter()
                .map(|t| {
                    let t = t.trim();
                    let start = if word(t.chars().next()) {
                        r"(?-u:\b)"
                    } else {
                        ""
                    };
                    let end = if word(t.chars().last()) {
                        r"(?-u:\b)"
                    } else {
                        ""
                    };
                    format!("{start}{}{end}", regex::escape(t))
                })
                .collect();
            format!("(?i)(?:{})", alternatives.join("|"))
        }
        Detector::MaxMessages | Detector::MaxPromptBytes => return Ok(None),
    }))
}

fn build_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// Checks one rule the way compile reports problems: a message without the rule's name.
pub fn validate(rule: &CompiledGuardrail) -> Result<(), String> {
    if !rule.request && !rule.response {
        return Err("applyTo must name request, response or both".to_owned());
    }
    if rule.detector.is_limit() {
        if rule.response {
            return Err(format!(
                "detector {} applies to requests only",
                rule.detector.as_str()
            ));
        }
        if rule.limit.is_none_or(|l| l == 0) {
            return Err(format!(
                "detector {} needs a limit of at least 1",
                rule.detector.as_str()
            ));
        }
        if rule.action == GuardrailAction::Redact {
            return Err(format!(
                "detector {} cannot redact; use block or log",
                rule.detector.as_str()
            ));
        }
    } else if rule.limit.is_some() {
        return Err(format!(
            "limit applies only to maxMessages and maxPromptBytes, not {}",
            rule.detector.as_str()
        ));
    }
    if rule.detector != Detector::Regex && rule.pattern.is_some() {
        return Err("pattern applies only to detector regex".to_owned());
    }
    if rule.detector != Detector::BlockedTerms && !rule.terms.is_empty() {
        return Err("terms apply only to detector blockedTerms".to_owned());
    }
    if let Some(p) = pattern_of(rule)? {
        let re = build_regex(&p).map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => "the pattern is too large".to_owned(),
            other => format!("invalid pattern: {other}"),
        })?;
        if re.is_match("") {
            return Err("the pattern matches empty text".to_owned());
        }
    }
    Ok(())
}

impl Guardrails {
    /// Compiles `rules`; fails (naming the rule) on any rule [`validate`] refuses.
    pub fn new(rules: &[CompiledGuardrail]) -> Result<Self, String> {
        let mut compiled = Vec::with_capacity(rules.len());
        let mut patterns = Vec::new();
        let mut set_rules = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            validate(rule).map_err(|e| format!("guardrail {}: {e}", rule.name))?;
            let pattern = pattern_of(rule)?;
            let regex = match &pattern {
                Some(p) => Some(build_regex(p).map_err(|e| e.to_string())?),
                None => None,
            };
            if let Some(p) = pattern {
                patterns.push(p);
                set_rules.push(i);
            }
            compiled.push(Rule {
                name: rule.name.clone(),
                detector: rule.detector,
                action: rule.action,
                regex,
                limit: rule.limit.unwrap_or(u64::MAX),
                placeholder: format!("[REDACTED:{}]", rule.name),
            });
        }
        let set = RegexSetBuilder::new(&patterns)
            .size_limit(REGEX_SIZE_LIMIT * 8)
            .build()
            .map_err(|e| format!("guardrails: {e}"))?;
        Ok(Self {
            rules: compiled,
            set,
            set_rules,
            refuse: None,
        })
    }

    /// Guardrails that block every request under the rule `name`: what a gateway serves
    /// when a configuration carries rules it cannot compile (fail closed).
    pub fn refuse_all(name: &str) -> Self {
        Self {
            rules: Vec::new(),
            set: RegexSet::empty(),
            set_rules: Vec::new(),
            refuse: Some(Blocked {
                rule: name.to_owned(),
                detector: Detector::Regex,
            }),
        }
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.refuse.is_none()
    }

    /// Confirmed matches in `text`: `(rule index, byte range)`, by rule then position.
    fn scan(&self, text: &str) -> Vec<(usize, Range<usize>)> {
        let mut found = Vec::new();
        if self.set_rules.is_empty() {
            return found;
        }
        for si in self.set.matches(text).iter() {
            let index = self.set_rules[si];
            let rule = &self.rules[index];
            let Some(regex) = &rule.regex else { continue };
            for m in regex.find_iter(text) {
                if confirm(rule.detector, m.as_str()) {
                    found.push((index, m.range()));
                }
            }
        }
        found
    }

    /// Checks (and, for `redact` rules, rewrites) the answer texts of a complete response
    /// `doc` (OpenAI `choices[].message.content` / `choices[].text`, Anthropic
    /// `content[]` text blocks), adding to `verdict`. Size limits do not apply.
    pub fn check_response(&self, doc: &mut Value, verdict: &mut Verdict) {
        if let Some(refuse) = &self.refuse {
            verdict.blocked.get_or_insert_with(|| refuse.clone());
            return;
        }
        if self.set_rules.is_empty() {
            return;
        }
        visit_answer_texts(doc, &mut |text| self.check_text(text, verdict));
    }

    /// Names of the rules that fire on `text` alone (size limits aside).
    pub fn matching_rules(&self, text: &str) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for (i, _) in self.scan(text) {
            if !names.contains(&self.rules[i].name.as_str()) {
                names.push(&self.rules[i].name);
            }
        }
        names
    }

    /// Checks (and, for `redact` rules, rewrites) the texts of the request `doc`, adding to
    /// `verdict`. Stops at the first blocking rule.
    pub fn check(&self, doc: &mut Value, verdict: &mut Verdict) {
        if let Some(refuse) = &self.refuse {
            verdict.blocked.get_or_insert_with(|| refuse.clone());
            return;
        }
        if self.rules.is_empty() {
            return;
        }
        let has_limits = self.rules.iter().any(|r| r.detector.is_limit());
        if has_limits {
            let messages = message_count(doc);
            let mut bytes = 0u64;
            visit_texts(doc, &mut |t| bytes += t.len() as u64);
            for rule in &self.rules {
                let size = match rule.detector {
                    Detector::MaxMessages => messages,
                    Detector::MaxPromptBytes => bytes,
                    _ => continue,
                };
                if size > rule.limit {
                    verdict.hit(rule);
                }
            }
            if verdict.blocked.is_some() {
                return;
            }
        }
        if self.set_rules.is_empty() {
            return;
        }
        visit_texts(doc, &mut |text| self.check_text(text, verdict));
    }

    /// Runs the text rules on one text, redacting it in place when a `redact` rule fires
    /// and nothing blocked.
    fn check_text(&self, text: &mut String, verdict: &mut Verdict) {
        if verdict.blocked.is_some() {
            return;
        }
        let found = self.scan(text);
        let mut redact: Vec<(Range<usize>, usize)> = Vec::new();
        for (index, range) in found {
            let rule = &self.rules[index];
            verdict.hit(rule);
            if rule.action == GuardrailAction::Redact {
                redact.push((range, index));
            }
        }
        if !redact.is_empty() && verdict.blocked.is_none() {
            *text = self.redact(text, redact);
            verdict.redacted = true;
        }
    }

    /// `text` with each range replaced by its rule's placeholder; overlapping ranges merge
    /// (the earliest keeps its placeholder).
    fn redact(&self, text: &str, mut ranges: Vec<(Range<usize>, usize)>) -> String {
        ranges.sort_by_key(|(r, _)| (r.start, std::cmp::Reverse(r.end)));
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (range, index) in ranges {
            if range.end <= at {
                continue;
            }
            if range.start >= at {
                out.push_str(&text[at..range.start]);
                out.push_str(&self.rules[index].placeholder);
            }
            at = range.end;
        }
        out.push_str(&text[at..]);
        out
    }
}

/// Confirms a regex candidate in code where the pattern alone is too loose.
fn confirm(detector: Detector, candidate: &str) -> bool {
    match detector {
        Detector::CreditCard => {
            let digits: Vec<u8> = digits(candidate);
            (13..=19).contains(&digits.len()) && luhn_valid(&digits)
        }
        Detector::Iban => iban_valid(candidate),
        Detector::Phone => {
            let n = digits(candidate).len();
            if candidate.starts_with('+') {
                (8..=15).contains(&n)
            } else {
                (10..=11).contains(&n)
            }
        }
        _ => true,
    }
}

fn digits(text: &str) -> Vec<u8> {
    text.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

/// The Luhn (mod 10) check of payment card numbers.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// The ISO 13616 check of an IBAN (spaces allowed): country letters, check digits, and
/// mod 97 of the rearranged number equal to 1.
pub fn iban_valid(candidate: &str) -> bool {
    let compact: Vec<u8> = candidate
        .bytes()
        .filter(|b| *b != b' ')
        .map(|b| b.to_ascii_uppercase())
        .collect();
    if !(15..=34).contains(&compact.len())
        || !compact[..2].iter().all(u8::is_ascii_uppercase)
        || !compact[2..4].iter().all(u8::is_ascii_digit)
        || !compact.iter().all(u8::is_ascii_alphanumeric)
    {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in compact[4..].iter().chain(&compact[..4]) {
        if b.is_ascii_digit() {
            rem = (rem * 10 + u32::from(b - b'0')) % 97;
        } else {
            rem = (rem * 100 + u32::from(b - b'A' + 10)) % 97;
        }
    }
    rem == 1
}

/// Messages of a chat or Anthropic request, or items of a `prompt` / `input` array.
fn message_count(doc: &Value) -> u64 {
    for field in ["messages", "prompt", "input"] {
        match doc.get(field) {
            Some(Value::Array(items)) => return items.len() as u64,
            Some(Value::String(_)) => return 1,
            _ => {}
        }
    }
    0
}

/// Calls `f` on every user-supplied text of a request.
fn visit_texts(doc: &mut Value, f: &mut impl FnMut(&mut String)) {
    let Some(object) = doc.as_object_mut() else {
        return;
    };
    if let Some(system) = object.get_mut("system") {
        visit_content(system, f);
    }
    if let Some(Value::Array(messages)) = object.get_mut("messages") {
        for message in messages {
            if let Some(content) = message.get_mut("content") {
                visit_content(content, f);
            }
        }
    }
    for field in ["prompt", "input"] {
        match object.get_mut(field) {
            Some(Value::String(s)) => f(s),
            Some(Value::Array(items)) => {
                for item in items {
                    if let Value::String(s) = item {
                        f(s);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Calls `f` on every answer text of a complete response, OpenAI's or Anthropic's.
fn visit_answer_texts(doc: &mut Value, f: &mut impl FnMut(&mut String)) {
    if let Some(Value::Array(choices)) = doc.get_mut("choices") {
        for choice in choices {
            if let Some(Value::String(s)) = choice.get_mut("text") {
                f(s);
            }
            if let Some(content) = choice.get_mut("message").and_then(|m| m.get_mut("content")) {
                visit_content(content, f);
            }
        }
    }
    if let Some(content @ Value::Array(_)) = doc.get_mut("content") {
        visit_content(content, f);
    }
}

/// A message `content` (or `system`): a string, or content blocks whose `text` (and
/// `tool_result` contents) are user text.
fn visit_content(content: &mut Value, f: &mut impl FnMut(&mut String)) {
    match content {
        Value::String(s) => f(s),
        Value::Array(blocks) => {
            for block in blocks {
                let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "text" | "input_text" => {
                        if let Some(Value::String(s)) = block.get_mut("text") {
                            f(s);
                        }
                    }
                    "tool_result" => {
                        if let Some(inner) = block.get_mut("content") {
                            visit_content(inner, f);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
