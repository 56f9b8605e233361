//! The guardrail engine: a list of [`CompiledGuardrail`]s compiled once per configuration
//! (one linear-time `RegexSet` pre-filter plus one `Regex` per text rule) and the check of
//! a request body against it. Pure: no I/O; the gateway decides what a verdict means.
//!
//! Text rules run on every user-supplied text of a request: `messages[].content` (strings
//! and `text`, `tool_result`, `tool_use` input and plain-text `document` content blocks),
//! the `arguments` of assistant tool calls, Anthropic's `system`, completion `prompt` and
//! embedding `input` (strings or arrays of strings). Checksummed detectors (cards, IBANs),
//! phone numbers, e-mail addresses and provider keys confirm each regex candidate in code,
//! which may narrow it to the valid part.

use std::{
    ops::Range,
    sync::atomic::{AtomicU64, Ordering},
};

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde_json::Value;

use crate::{
    config::CompiledGuardrail,
    v1alpha1::{Detector, GuardrailAction},
};

/// Compiled-program size cap for custom patterns (a few thousand states).
///
/// Built-in patterns use ASCII word boundaries (`(?-u:\b)`) or none: Unicode ones keep the
/// regex crate off its fast DFA engines on non-ASCII text, which costs about ten times as
/// much on long prompts. Unicode classes (`\w`, `\s`) are fine. The one Unicode boundary,
/// of `blockedTerms`, is only in the rule's own matcher, which runs only when the
/// pre-filter (with ASCII boundaries) found a candidate.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Local part and domain accept Unicode letters; the top-level domain letters only. The
/// end is checked in code (no word character may follow).
const EMAIL: &str = r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[\w&&[^\d_]]{2,}";
// Candidates only: digit counts, neighbours and date shapes are checked in code.
const PHONE: &str =
    r"(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{1,4}\)[ .-]?)?[0-9]{2,5}(?:[ .-]?[0-9]{2,5}){1,4}";
const CREDIT_CARD: &str = r"(?-u:\b)[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)";
const IBAN: &str =
    r"(?i-u)(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?-u:\b)";
const SECRET: &str = concat!(
    r"(?-u:\b)(?:",
    r"sk-ant-[A-Za-z0-9_-]{20,}",                        // Anthropic
    r"|sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}", // OpenAI (character mix checked in code)
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}",                       // AWS access key id (long-term, temporary)
    r"|gh[pousr]_[A-Za-z0-9]{36,255}",                   // GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,255}",                 // GitHub fine-grained tokens
    r"|AIza[0-9A-Za-z_-]{35}",                           // Google API key
    r"|xox[abposr]-[A-Za-z0-9-]{10,}",                   // Slack tokens
    r"|tg_[A-Za-z0-9]{32,}",                             // Tollgate keys
    r")(?-u:\b)",
    // PEM and PGP private keys, through the END line (or the end of the text).
    r"|-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?s:.)*?",
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\z)",
);

/// What `\s+` between words of the prompt-injection rules becomes: any run of Unicode
/// white space (no-break and typographic spaces included) or zero-width separators.
const INJECTION_SPACE: &str = r"[\s\x{200B}-\x{200D}\x{2060}\x{FEFF}]+";

/// The prompt-injection rule set: `(id, pattern)`, matched case-insensitively (except
/// `DAN`) by [`prompt_injection_pattern`]. Kept small and specific (phrasings seen in
/// public jailbreak collections) so ordinary prompts do not trip it; extend it with a
/// `regex` rule where a deployment needs more.
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
        // `DAN` in capitals only; "do anything now" only near `DAN` or "jailbreak".
        concat!(
            r"(?-u:\b)you\s+are\s+(?:now\s+)?(?-i:DAN)(?-u:\b)",
            r"|(?-u:\b)(?-i:DAN)\s+mode(?-u:\b)",
            r"|(?-u:\b)(?-i:DAN)s?(?-u:\b)[^\n]{0,60}?(?-u:\b)do\s+anything\s+now(?-u:\b)",
            r"|(?-u:\b)do\s+anything\s+now(?-u:\b)[^\n]{0,40}?(?-u:\b)(?-i:DAN)(?-u:\b)",
            r"|(?-u:\b)jailbr(?:eak|oken)[^\n]{0,60}?(?-u:\b)do\s+anything\s+now(?-u:\b)",
        ),
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
        r"(?-u:\b)pretend\s+(?:that\s+)?you\s+(?:have\s+no|are\s+not\s+bound\s+by|don['’]?t\s+have)\s+(?:any\s+)?(?:restrictions|rules|guidelines|filters|limits)(?-u:\b)",
    ),
];

/// One rule of [`PROMPT_INJECTION_RULES`] as production matches it: case-insensitive,
/// Unicode mode (ASCII word boundaries), any white space between words.
pub fn prompt_injection_pattern(rule: &str) -> String {
    format!("(?i:{})", rule.replace(r"\s+", INJECTION_SPACE))
}

/// Source of [`Guardrails`] ids: a hit is one per list and rule.
static NEXT_LIST: AtomicU64 = AtomicU64::new(1);

/// A compiled list of guardrails, ready for the hot path.
#[derive(Debug)]
pub struct Guardrails {
    /// Tells this list's hits from another's in one [`Verdict`].
    id: u64,
    rules: Vec<Rule>,
    /// Every text rule's pre-filter, for one pass that finds which rules may fire.
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

/// A rule that fired (once per list and request, however often it matched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleHit {
    /// Rule name.
    pub rule: String,
    /// Its detector.
    pub detector: Detector,
    /// Its action.
    pub action: GuardrailAction,
    /// The list (a [`Guardrails`] id) and the rule's index in it.
    source: (u64, usize),
}

/// What the guardrails made of a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The first blocking rule that fired, if any.
    pub blocked: Option<Blocked>,
    /// Every rule that fired: once per list, so a route rule and a key rule of the same
    /// name are two hits.
    pub hits: Vec<RuleHit>,
    /// Whether some text was replaced.
    pub redacted: bool,
}

impl Verdict {
    fn hit(&mut self, list: u64, index: usize, rule: &Rule) {
        let source = (list, index);
        if !self.hits.iter().any(|h| h.source == source) {
            self.hits.push(RuleHit {
                rule: rule.name.clone(),
                detector: rule.detector,
                action: rule.action,
                source,
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

/// The regexes of a text rule.
struct Patterns {
    /// For the `RegexSet`: matches wherever `matcher` does (perhaps more), fast engines
    /// only.
    prefilter: String,
    /// The rule's own regex.
    matcher: String,
}

impl Patterns {
    fn same(pattern: String) -> Self {
        Self {
            prefilter: pattern.clone(),
            matcher: pattern,
        }
    }
}

/// The regexes of a text detector (`None` for size limits).
fn patterns_of(rule: &CompiledGuardrail) -> Result<Option<Patterns>, String> {
    Ok(Some(match rule.detector {
        Detector::Email => Patterns::same(EMAIL.to_owned()),
        Detector::Phone => Patterns::same(PHONE.to_owned()),
        Detector::CreditCard => Patterns::same(CREDIT_CARD.to_owned()),
        Detector::Iban => Patterns::same(IBAN.to_owned()),
        Detector::Secret => Patterns::same(SECRET.to_owned()),
        Detector::PromptInjection => {
            let alternatives: Vec<String> = PROMPT_INJECTION_RULES
                .iter()
                .map(|(_, p)| prompt_injection_pattern(p))
                .collect();
            Patterns::same(alternatives.join("|"))
        }
        Detector::Regex => match &rule.pattern {
            Some(p) => Patterns::same(p.clone()),
            None => return Err("detector regex needs a pattern".to_owned()),
        },
        Detector::BlockedTerms => blocked_terms(&rule.terms)?,
        Detector::MaxMessages | Detector::MaxPromptBytes => return Ok(None),
    }))
}

/// `terms` as whole words or phrases, case-insensitively, any white space between words.
/// The matcher puts a Unicode word boundary at each end that is a word character; the
/// pre-filter an ASCII one where that character is ASCII (a Unicode boundary there
/// implies the ASCII one) and none otherwise.
fn blocked_terms(terms: &[String]) -> Result<Patterns, String> {
    if terms.is_empty() || terms.iter().any(|t| t.trim().is_empty()) {
        return Err("detector blockedTerms needs non-empty terms".to_owned());
    }
    let mut prefilter = Vec::with_capacity(terms.len());
    let mut matcher = Vec::with_capacity(terms.len());
    for term in terms {
        let words: Vec<String> = term.split_whitespace().map(regex::escape).collect();
        let body = words.join(r"\s+");
        let edge = |c: Option<char>| {
            let word = c.is_some_and(regex_syntax::is_word_character);
            let ascii = c.is_some_and(|c| c.is_ascii());
            (
                if word && ascii { r"(?-u:\b)" } else { "" },
                if word { r"\b" } else { "" },
            )
        };
        let (pre_start, start) = edge(term.trim().chars().next());
        let (pre_end, end) = edge(term.trim().chars().next_back());
        prefilter.push(format!("{pre_start}{body}{pre_end}"));
        matcher.push(format!("{start}{body}{end}"));
    }
    Ok(Patterns {
        prefilter: format!("(?i)(?:{})", prefilter.join("|")),
        matcher: format!("(?i)(?:{})", matcher.join("|")),
    })
}

fn build_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// Compiles `pattern` as a rule's regex; refuses what could match empty text (it would
/// fire on every text, or between every two characters: `\b`, `^`, `a*`).
fn check_pattern(pattern: &str) -> Result<Regex, String> {
    let re = build_regex(pattern).map_err(|e| match e {
        regex::Error::CompiledTooBig(_) => "the pattern is too large".to_owned(),
        other => format!("invalid pattern: {other}"),
    })?;
    // The parser `regex` uses, with its defaults.
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .map_err(|e| format!("invalid pattern: {e}"))?;
    match hir.properties().minimum_len() {
        Some(0) => Err(
            "the pattern can match empty text (such as a lone \\b, ^ or x*), so it would fire everywhere"
                .to_owned(),
        ),
        None => Err("the pattern can never match".to_owned()),
        Some(_) => Ok(re),
    }
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
    if let Some(p) = patterns_of(rule)? {
        check_pattern(&p.matcher)?;
        if p.prefilter != p.matcher {
            check_pattern(&p.prefilter)?;
        }
    }
    Ok(())
}

/// Checks a whole list (each rule, then its request rules and its response rules compiled
/// together, as [`Guardrails::for_side`] builds them for the gateway): what compile
/// reports for the list, without a rule name when the combination fails.
pub fn validate_list(rules: &[CompiledGuardrail]) -> Result<(), String> {
    for rule in rules {
        validate(rule).map_err(|e| format!("guardrail {}: {e}", rule.name))?;
    }
    for (response, side) in [(false, "request"), (true, "response")] {
        Guardrails::for_side(rules, response)
            .map_err(|e| format!("the {side} guardrails cannot be compiled together: {e}"))?;
    }
    Ok(())
}

impl Guardrails {
    /// Compiles the rules of `rules` that check responses (`response`) or requests;
    /// `None` when there are none.
    pub fn for_side(rules: &[CompiledGuardrail], response: bool) -> Result<Option<Self>, String> {
        let selected: Vec<CompiledGuardrail> = rules
            .iter()
            .filter(|r| if response { r.response } else { r.request })
            .cloned()
            .collect();
        if selected.is_empty() {
            return Ok(None);
        }
        Self::new(&selected).map(Some)
    }

    /// Compiles `rules`; fails (naming the rule) on any rule [`validate`] refuses, or when
    /// the rules together are too large for one pre-filter.
    pub fn new(rules: &[CompiledGuardrail]) -> Result<Self, String> {
        let mut compiled = Vec::with_capacity(rules.len());
        let mut prefilters = Vec::new();
        let mut set_rules = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            validate(rule).map_err(|e| format!("guardrail {}: {e}", rule.name))?;
            let patterns = patterns_of(rule)?;
            let regex = match &patterns {
                Some(p) => Some(build_regex(&p.matcher).map_err(|e| e.to_string())?),
                None => None,
            };
            if let Some(p) = patterns {
                prefilters.push(p.prefilter);
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
        let set = RegexSetBuilder::new(&prefilters)
            .size_limit(REGEX_SIZE_LIMIT * 8)
            .build()
            .map_err(|e| match e {
                regex::Error::CompiledTooBig(limit) => format!(
                    "the patterns of the list together exceed the compiled size limit of {limit} bytes; use fewer or smaller patterns or terms"
                ),
                other => format!("guardrails: {other}"),
            })?;
        Ok(Self {
            id: NEXT_LIST.fetch_add(1, Ordering::Relaxed),
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
            id: NEXT_LIST.fetch_add(1, Ordering::Relaxed),
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
    /// Linear: after each candidate the search resumes past its start, and a resume point
    /// inside a candidate only occurs for detectors whose candidates are a few dozen
    /// bytes at most.
    fn scan(&self, text: &str) -> Vec<(usize, Range<usize>)> {
        let mut found = Vec::new();
        if self.set_rules.is_empty() {
            return found;
        }
        for si in self.set.matches(text).iter() {
            let index = self.set_rules[si];
            let rule = &self.rules[index];
            let Some(regex) = &rule.regex else { continue };
            let mut at = 0;
            while at <= text.len() {
                let Some(m) = regex.find_at(text, at) else {
                    break;
                };
                let (confirmed, resume) = confirm(rule.detector, text, m.range());
                if let Some(range) = confirmed {
                    found.push((index, range));
                }
                at = if resume > m.start() {
                    resume
                } else {
                    match text[m.start()..].chars().next() {
                        Some(c) => m.start() + c.len_utf8(),
                        None => break,
                    }
                };
            }
        }
        found
    }

    /// Checks (and, for `redact` rules, rewrites) the answer texts of a complete response
    /// `doc`, adding to `verdict`: OpenAI `choices[].message.content` / `choices[].text`,
    /// `refusal`, `reasoning_content`, tool-call and legacy function-call `arguments`;
    /// Anthropic `content[]` text and thinking blocks and every string of `tool_use`
    /// inputs. Once anything was redacted or blocked, every choice's `logprobs` (which
    /// would repeat the original tokens) is set to null. Size limits do not apply.
    pub fn check_response(&self, doc: &mut Value, verdict: &mut Verdict) {
        if let Some(refuse) = &self.refuse {
            verdict.blocked.get_or_insert_with(|| refuse.clone());
        } else if !self.set_rules.is_empty() {
            visit_answer_texts(doc, &mut |text| self.check_text(text, verdict));
        }
        if verdict.redacted || verdict.blocked.is_some() {
            drop_logprobs(doc);
        }
    }

    /// The confirmed matches of the text rules in `text`, for callers that release text
    /// piece by piece (streamed answers): each hit is added to `verdict` (a `block` rule
    /// sets `blocked`; a list built by [`Guardrails::refuse_all`] blocks at once), and
    /// `redact` matches carry their placeholder. Nothing is rewritten here.
    pub fn find(&self, text: &str, verdict: &mut Verdict) -> Vec<Found<'_>> {
        if let Some(refuse) = &self.refuse {
            verdict.blocked.get_or_insert_with(|| refuse.clone());
            return Vec::new();
        }
        let mut found = Vec::new();
        for (index, range) in self.scan(text) {
            let rule = &self.rules[index];
            verdict.hit(self.id, index, rule);
            found.push(Found {
                range,
                placeholder: (rule.action == GuardrailAction::Redact)
                    .then_some(rule.placeholder.as_str()),
            });
        }
        found
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
            for (index, rule) in self.rules.iter().enumerate() {
                let size = match rule.detector {
                    Detector::MaxMessages => messages,
                    Detector::MaxPromptBytes => bytes,
                    _ => continue,
                };
                if size > rule.limit {
                    verdict.hit(self.id, index, rule);
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
            verdict.hit(self.id, index, rule);
            if rule.action == GuardrailAction::Redact {
                redact.push((range, index));
            }
        }
        if !redact.is_empty() && verdict.blocked.is_none() {
            *text = self.redact(text, redact);
            verdict.redacted = true;
        }
    }

    /// `text` with each range replaced by its rule's placeholder.
    fn redact(&self, text: &str, ranges: Vec<(Range<usize>, usize)>) -> String {
        let ranges = ranges
            .into_iter()
            .map(|(range, index)| (range, self.rules[index].placeholder.as_str()))
            .collect();
        redact(text, ranges)
    }
}

/// A confirmed match of [`Guardrails::find`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found<'a> {
    /// Where it is.
    pub range: Range<usize>,
    /// `[REDACTED:<rule>]` for a `redact` rule; `None` for the other actions.
    pub placeholder: Option<&'a str>,
}

/// `text` with each range replaced by its placeholder; overlapping ranges merge (the
/// earliest keeps its placeholder).
pub fn redact(text: &str, mut ranges: Vec<(Range<usize>, &str)>) -> String {
    ranges.sort_by_key(|(r, _)| (r.start, std::cmp::Reverse(r.end)));
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (range, placeholder) in ranges {
        if range.end <= at {
            continue;
        }
        if range.start >= at {
            out.push_str(&text[at..range.start]);
            out.push_str(placeholder);
        }
        at = range.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Confirms the regex candidate `range` of `text` in code where the pattern alone is too
/// loose: the confirmed (perhaps narrowed) range, if any, and where the search resumes.
fn confirm(detector: Detector, text: &str, range: Range<usize>) -> (Option<Range<usize>>, usize) {
    let candidate = &text[range.clone()];
    let narrowed = |len: Option<usize>| match len {
        Some(len) => (Some(range.start..range.start + len), range.start + len),
        None => (None, range.end),
    };
    match detector {
        Detector::CreditCard => narrowed(card_len(candidate)),
        Detector::Iban => narrowed(iban_len(candidate)),
        Detector::Phone => phone(text, range),
        Detector::Email => {
            // The top-level domain ends the address: no word character may follow.
            let glued = text[range.end..]
                .chars()
                .next()
                .is_some_and(regex_syntax::is_word_character);
            ((!glued).then_some(range.clone()), range.end)
        }
        Detector::Secret => (secret_valid(candidate).then_some(range.clone()), range.end),
        _ => (Some(range.clone()), range.end),
    }
}

/// Byte ranges (within `text`) of the runs between bytes `separator` accepts.
fn groups(text: &str, separator: impl Fn(u8) -> bool) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, b) in text.bytes().enumerate() {
        match (separator(b), start) {
            (true, Some(s)) => {
                out.push(s..i);
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push(s..text.len());
    }
    out
}

/// Length of the card number `candidate` starts with: all of it, or (when that fails the
/// checks, such as a card followed by its CVV) its longest valid prefix of whole groups
/// of at least three digits.
fn card_len(candidate: &str) -> Option<usize> {
    let valid = |s: &str| {
        let d = digits(s);
        (13..=19).contains(&d.len()) && luhn_valid(&d)
    };
    if valid(candidate) {
        return Some(candidate.len());
    }
    let groups = groups(candidate, |b| b == b' ' || b == b'-');
    (1..groups.len())
        .rev()
        .filter(|&k| groups[..k].iter().all(|g| g.len() >= 3))
        .map(|k| groups[k - 1].end)
        .find(|&end| valid(&candidate[..end]))
}

/// Length of the IBAN `candidate` starts with: all of it, or its longest valid prefix
/// ending before a space (a following word taken for the last group).
fn iban_len(candidate: &str) -> Option<usize> {
    if iban_valid(candidate) {
        return Some(candidate.len());
    }
    let groups = groups(candidate, |b| b == b' ');
    (1..groups.len())
        .rev()
        .map(|k| groups[k - 1].end)
        .find(|&end| iban_valid(&candidate[..end]))
}

/// A phone candidate: confirmed when nothing glues it to a word or number (a letter,
/// digit or `_` on either side, a `.` before it, a `.` and a digit after it), it holds no
/// date and its digit count fits; else its longest prefix ending before a space that
/// passes. A failed candidate resumes the search after its first space.
fn phone(text: &str, range: Range<usize>) -> (Option<Range<usize>>, usize) {
    let candidate = &text[range.clone()];
    let glued_before = text[..range.start]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.');
    let glued_after = |end: usize| {
        let mut rest = text[end..].chars();
        match rest.next() {
            Some('.') => rest.next().is_some_and(|c| c.is_ascii_digit()),
            Some(c) => c.is_alphanumeric() || c == '_',
            None => false,
        }
    };
    if !glued_before {
        let spaces = candidate
            .bytes()
            .enumerate()
            .filter(|(_, b)| *b == b' ')
            .map(|(i, _)| i);
        let mut ends: Vec<usize> = spaces.collect();
        ends.push(candidate.len());
        for &end in ends.iter().rev() {
            if phone_valid(&candidate[..end]) && !glued_after(range.start + end) {
                return (Some(range.start..range.start + end), range.start + end);
            }
        }
    }
    match candidate.find(' ') {
        Some(i) => (None, range.start + i + 1),
        None => (None, range.end),
    }
}

/// Digit count (`+` and 8–15 digits, or 10–11), and not a date, Unix timestamp or
/// decimal number.
fn phone_valid(candidate: &str) -> bool {
    let n = digits(candidate).len();
    let international = candidate.starts_with('+');
    let count_ok = if international {
        (8..=15).contains(&n)
    } else {
        (10..=11).contains(&n)
    };
    if !count_ok || has_date(candidate) {
        return false;
    }
    let mut others = candidate.bytes().filter(|b| !b.is_ascii_digit());
    let (first, second) = (others.next(), others.next());
    // 1700000000: a bare run of ten digits starting with 1 is a Unix time (North American
    // area codes never start with 1, national numbers with a trunk prefix start with 0).
    let timestamp = first.is_none() && n == 10 && candidate.starts_with('1');
    // 12.34567890: one dot and nothing else is a decimal number.
    let decimal = first == Some(b'.') && second.is_none();
    !timestamp && !decimal
}

/// Whether `text` holds `YYYY-MM-DD` or `DD-MM-YYYY` / `MM-DD-YYYY` (with `-`, `.` or
/// `/`, the same twice) with plausible months and days.
fn has_date(text: &str) -> bool {
    let groups = groups(text, |b| !b.is_ascii_digit());
    groups.windows(3).any(|w| {
        let (a, b, c) = (
            &text[w[0].clone()],
            &text[w[1].clone()],
            &text[w[2].clone()],
        );
        let (s1, s2) = (&text[w[0].end..w[1].start], &text[w[1].end..w[2].start]);
        if s1 != s2 || !matches!(s1, "-" | "." | "/") {
            return false;
        }
        let num = |s: &str| s.parse::<u32>().unwrap_or(0);
        let day = |v: u32| (1..=31).contains(&v);
        let month = |v: u32| (1..=12).contains(&v);
        match (a.len(), b.len(), c.len()) {
            (4, 2, 2) => month(num(b)) && day(num(c)),
            (2, 2, 4) => {
                let (x, y) = (num(a), num(b));
                day(x) && day(y) && (month(x) || month(y))
            }
            _ => false,
        }
    })
}

/// An OpenAI-style `sk-` key must mix at least two of lower case, upper case and digits
/// after `sk-` (real keys are random; `sk-learn-compatible-estimators` is not a key).
fn secret_valid(candidate: &str) -> bool {
    let Some(rest) = candidate.strip_prefix("sk-") else {
        return true;
    };
    let has = |f: fn(&u8) -> bool| rest.as_bytes().iter().any(f);
    let classes = [
        has(u8::is_ascii_lowercase),
        has(u8::is_ascii_uppercase),
        has(u8::is_ascii_digit),
    ];
    classes.iter().filter(|c| **c).count() >= 2
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

/// The ISO 13616 check of an IBAN (spaces allowed, any case): country letters, check
/// digits, and mod 97 of the rearranged number equal to 1.
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
    // `instructions`: the Responses API's system prompt.
    for field in ["system", "instructions"] {
        if let Some(system) = object.get_mut(field) {
            visit_content(system, false, f);
        }
    }
    if let Some(Value::Array(messages)) = object.get_mut("messages") {
        for message in messages {
            if let Some(content) = message.get_mut("content") {
                visit_content(content, false, f);
            }
            visit_tool_calls(message, f);
        }
    }
    for field in ["prompt", "input"] {
        match object.get_mut(field) {
            Some(Value::String(s)) => f(s),
            Some(Value::Array(items)) => {
                for item in items {
                    match item {
                        Value::String(s) => f(s),
                        Value::Object(_) => visit_input_item(item, f),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
}

/// One item of a Responses API `input` (a message's content, a function call's
/// arguments, a function call output) or a moderations `input` part (`text`).
fn visit_input_item(item: &mut Value, f: &mut impl FnMut(&mut String)) {
    if let Some(Value::String(s)) = item.get_mut("text") {
        f(s);
    }
    if let Some(content) = item.get_mut("content") {
        visit_content(content, false, f);
    }
    if let Some(Value::String(s)) = item.get_mut("arguments") {
        f(s);
    }
    if let Some(output) = item.get_mut("output") {
        visit_content(output, false, f);
    }
}

/// Calls `f` on every answer text of a complete response, OpenAI's or Anthropic's.
fn visit_answer_texts(doc: &mut Value, f: &mut impl FnMut(&mut String)) {
    if let Some(Value::Array(choices)) = doc.get_mut("choices") {
        for choice in choices {
            if let Some(Value::String(s)) = choice.get_mut("text") {
                f(s);
            }
            let Some(message) = choice.get_mut("message") else {
                continue;
            };
            if let Some(content) = message.get_mut("content") {
                visit_content(content, true, f);
            }
            for field in ["refusal", "reasoning_content"] {
                if let Some(Value::String(s)) = message.get_mut(field) {
                    f(s);
                }
            }
            visit_tool_calls(message, f);
        }
    }
    if let Some(content @ Value::Array(_)) = doc.get_mut("content") {
        visit_content(content, true, f);
    }
    // A Responses API response: message contents, function call arguments, reasoning
    // summaries.
    if let Some(Value::Array(items)) = doc.get_mut("output") {
        for item in items {
            if let Some(content) = item.get_mut("content") {
                visit_content(content, true, f);
            }
            if let Some(Value::String(s)) = item.get_mut("arguments") {
                f(s);
            }
            if let Some(summary) = item.get_mut("summary") {
                visit_content(summary, true, f);
            }
        }
    }
}

/// OpenAI `tool_calls[].function.arguments` and legacy `function_call.arguments` of a
/// message (JSON text, checked as text: a redaction inside a string keeps it JSON).
fn visit_tool_calls(message: &mut Value, f: &mut impl FnMut(&mut String)) {
    if let Some(Value::Array(calls)) = message.get_mut("tool_calls") {
        for call in calls {
            if let Some(Value::String(s)) = call
                .get_mut("function")
                .and_then(|function| function.get_mut("arguments"))
            {
                f(s);
            }
        }
    }
    if let Some(Value::String(s)) = message
        .get_mut("function_call")
        .and_then(|call| call.get_mut("arguments"))
    {
        f(s);
    }
}

/// A message `content` (or `system`): a string, or content blocks whose `text`,
/// `refusal`, `tool_result` contents, `tool_use` input strings and plain-text `document`
/// sources are text; `thinking` too when `thinking` is set (answers only: a request's
/// thinking blocks are signed and must come back unchanged).
fn visit_content(content: &mut Value, thinking: bool, f: &mut impl FnMut(&mut String)) {
    match content {
        Value::String(s) => f(s),
        Value::Array(blocks) => {
            for block in blocks {
                let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "text" | "input_text" | "output_text" | "summary_text" => {
                        if let Some(Value::String(s)) = block.get_mut("text") {
                            f(s);
                        }
                    }
                    "refusal" => {
                        if let Some(Value::String(s)) = block.get_mut("refusal") {
                            f(s);
                        }
                    }
                    "thinking" if thinking => {
                        if let Some(Value::String(s)) = block.get_mut("thinking") {
                            f(s);
                        }
                    }
                    "tool_result" => {
                        if let Some(inner) = block.get_mut("content") {
                            visit_content(inner, thinking, f);
                        }
                    }
                    "tool_use" => {
                        if let Some(input) = block.get_mut("input") {
                            visit_strings(input, f);
                        }
                    }
                    "document" => visit_document(block, thinking, f),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// An Anthropic `document` block: its `context` and a plain-text (`text`) or
/// content-block (`content`) source; base64 and URL sources cannot be read.
fn visit_document(block: &mut Value, thinking: bool, f: &mut impl FnMut(&mut String)) {
    if let Some(Value::String(s)) = block.get_mut("context") {
        f(s);
    }
    let Some(source) = block.get_mut("source") else {
        return;
    };
    match source.get("type").and_then(Value::as_str) {
        Some("text") => {
            if let Some(Value::String(s)) = source.get_mut("data") {
                f(s);
            }
        }
        Some("content") => {
            if let Some(inner) = source.get_mut("content") {
                visit_content(inner, thinking, f);
            }
        }
        _ => {}
    }
}

/// Every string inside `value`, however deep (object keys aside).
fn visit_strings(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => {
            for item in items {
                visit_strings(item, f);
            }
        }
        Value::Object(fields) => {
            for item in fields.values_mut() {
                visit_strings(item, f);
            }
        }
        _ => {}
    }
}

/// Sets `logprobs` to null in every choice that has it.
fn drop_logprobs(doc: &mut Value) {
    if let Some(Value::Array(choices)) = doc.get_mut("choices") {
        for choice in choices {
            if let Some(logprobs) = choice.get_mut("logprobs") {
                *logprobs = Value::Null;
            }
        }
    }
}

#[cfg(test)]
mod tests;
