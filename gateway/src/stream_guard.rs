//! Response guardrails on streamed answers, applied to the events the client receives
//! (after any translation, so one implementation per client dialect serves every
//! upstream).
//!
//! Each text channel of the answer (a choice's `content`, `refusal`, reasoning, a tool
//! call's `arguments`, a completion's `text`; an Anthropic content block's text, thinking
//! or tool input JSON) keeps its last [`HOLD_BYTES`] unreleased. Every new piece is
//! scanned together with what is held (and a little released text before it, for word
//! boundaries), so a match split across chunks is seen whole before any of it leaves:
//!
//! - a `redact` match is replaced by its placeholder when the text around it is
//!   released; a match that reaches the end of what has arrived (it may still grow, like
//!   a private key block) is held until it stops growing;
//! - a `block` match ends the stream with an error event in the client's dialect; what
//!   was relayed before is billed as for any stream that ends early;
//! - a channel's remainder is released (checked once more) when its choice or content
//!   block finishes, or at the end of the stream.
//!
//! The cost: text reaches the client up to [`HOLD_BYTES`] later than it would (about 30
//! tokens), and each event of a guarded route is parsed once more. A match longer than
//! the hold that only becomes a match once complete (a long custom pattern) may have its
//! start released before it is recognised; the built-in detectors' matches are shorter,
//! except private key blocks, which match from their first line.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::{Value, json};
use tollgate_api::guardrails::{Guardrails, Verdict, redact};

use crate::{dialects::Dialect, error::ApiError, metrics::Metrics};

/// Text held back per channel until more has arrived.
pub const HOLD_BYTES: usize = 128;
/// Released text kept as context for the next scan (word boundaries at its start).
const BEHIND_BYTES: usize = 32;
/// Most text held for a match that keeps growing; then it is released redacted.
const MAX_HELD_BYTES: usize = 64 * 1024;

/// The response rules of one request, with what their hits are reported under.
#[derive(Debug)]
pub struct AnswerRules {
    /// The route's list, then the key's.
    pub lists: Vec<Arc<Guardrails>>,
    /// Route id (metrics label).
    pub route: String,
    /// Key id (log field).
    pub key_id: String,
    /// Request id (log field).
    pub request_id: String,
    /// Where hits are counted.
    pub metrics: Arc<Metrics>,
}

/// One text field of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Content,
    Refusal,
    Reasoning,
    /// Legacy `function_call.arguments`.
    FunctionArguments,
    /// `tool_calls[index].function.arguments`.
    ToolArguments(u64),
    /// `/v1/completions` `text`.
    Text,
    /// An Anthropic content block's `text_delta`, `thinking_delta` or
    /// `input_json_delta`.
    Block(BlockDelta),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum BlockDelta {
    Text,
    Thinking,
    InputJson,
}

impl BlockDelta {
    fn of(delta_type: &str) -> Option<Self> {
        match delta_type {
            "text_delta" => Some(Self::Text),
            "thinking_delta" => Some(Self::Thinking),
            "input_json_delta" => Some(Self::InputJson),
            _ => None,
        }
    }

    /// The delta's `type` and the name of its text field.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Self::Text => ("text_delta", "text"),
            Self::Thinking => ("thinking_delta", "thinking"),
            Self::InputJson => ("input_json_delta", "partial_json"),
        }
    }
}

/// Text of one channel not yet released, and the end of what was.
#[derive(Debug, Default)]
struct Channel {
    held: String,
    behind: String,
}

/// A client event: its `event:` name (Anthropic) and data.
pub type Event = (Option<String>, String);

/// The guard of one streamed answer.
#[derive(Debug)]
pub struct StreamGuard {
    rules: Arc<AnswerRules>,
    dialect: Dialect,
    /// By choice (OpenAI) or content block (Anthropic) index, then field.
    channels: BTreeMap<(u64, Field), Channel>,
    verdict: Verdict,
    /// Hits already counted and logged.
    reported: usize,
    /// OpenAI: the last chunk's fields besides `choices` and `usage`, for the chunks the
    /// guard adds to release held text.
    envelope: Option<serde_json::Map<String, Value>>,
    /// Responses: the last delta event of each channel, for the deltas the guard adds.
    deltas: BTreeMap<(u64, Field), Value>,
    /// Responses: the next `sequence_number` (events are renumbered as the guard adds and
    /// holds some back).
    sequence: u64,
    stopped: bool,
}

/// A blocking rule fired: the stream ends.
struct Blocked;

impl StreamGuard {
    /// A guard for a stream whose client speaks `dialect`.
    pub fn new(rules: Arc<AnswerRules>, dialect: Dialect) -> Self {
        Self {
            rules,
            dialect,
            channels: BTreeMap::new(),
            verdict: Verdict::default(),
            reported: 0,
            envelope: None,
            deltas: BTreeMap::new(),
            sequence: 0,
            stopped: false,
        }
    }

    /// Whether a blocking rule ended the stream (its error event was the last output).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The events to send for one client event (none, it, it rewritten, released text
    /// before it, or the error event of a blocking rule).
    pub fn on_event(&mut self, name: Option<&str>, data: &str, out: &mut Vec<Event>) {
        if self.stopped {
            return;
        }
        let result = match self.dialect {
            Dialect::OpenAi => self.openai(data, out),
            Dialect::Anthropic => self.anthropic(name, data, out),
            Dialect::Responses => self.responses(name, data, out),
        };
        if result.is_err() {
            self.stop(out);
        }
    }

    /// At the end of the upstream stream: what is still held, checked and released.
    pub fn finish(&mut self, out: &mut Vec<Event>) {
        if self.stopped {
            return;
        }
        let indices: Vec<u64> = self.channels.keys().map(|(i, _)| *i).collect();
        for index in indices {
            if self.flush(index, out).is_err() {
                self.stop(out);
                return;
            }
        }
    }

    fn stop(&mut self, out: &mut Vec<Event>) {
        self.stopped = true;
        self.channels.clear();
        let blocked = self.verdict.blocked.clone().expect("set when blocking");
        let error = ApiError::GuardrailBlockedAnswer {
            rule: blocked.rule,
            detector: blocked.detector.as_str(),
        };
        out.push(match self.dialect {
            Dialect::OpenAi => (None, error.body().to_string()),
            Dialect::Anthropic => (
                Some("error".to_owned()),
                json!({"type": "error", "error": {"type": "api_error", "message": error.to_string()}})
                    .to_string(),
            ),
            Dialect::Responses => self.responses_error("guardrail_blocked", &error.to_string()),
        });
    }

    /// A Responses `error` event, numbered.
    fn responses_error(&mut self, code: &str, message: &str) -> Event {
        let data = json!({"type": "error", "code": code, "message": message, "param": null, "sequence_number": self.sequence});
        self.sequence += 1;
        (Some("error".to_owned()), data.to_string())
    }

    /// Adds `piece` to a channel and returns what may be released now (all of it when
    /// `last`), redacted.
    fn release(&mut self, key: (u64, Field), piece: &str, last: bool) -> Result<String, Blocked> {
        let channel = self.channels.entry(key).or_default();
        channel.held.push_str(piece);
        let offset = channel.behind.len();
        let text = format!("{}{}", channel.behind, channel.held);
        // Matches as (range in `held`, placeholder for redact rules).
        let mut found: Vec<(std::ops::Range<usize>, Option<&str>)> = Vec::new();
        for list in &self.rules.lists {
            for m in list.find(&text, &mut self.verdict) {
                if m.range.end > offset {
                    let start = m.range.start.saturating_sub(offset);
                    found.push((start..m.range.end - offset, m.placeholder));
                }
            }
        }
        report_new_hits(&self.rules, &self.verdict, &mut self.reported);
        if self.verdict.blocked.is_some() {
            return Err(Blocked);
        }
        let held = &channel.held;
        let mut cut = if last {
            held.len()
        } else {
            floor_boundary(held, held.len().saturating_sub(HOLD_BYTES))
        };
        if !last {
            // Nothing of a match leaves before all of it has arrived.
            for (range, _) in &found {
                if range.end >= held.len() || (range.start < cut && range.end > cut) {
                    cut = cut.min(range.start);
                }
            }
            if held.len() > MAX_HELD_BYTES && cut == 0 {
                cut = held.len();
            }
        }
        let ranges = found
            .into_iter()
            .filter(|(range, _)| range.end <= cut)
            .filter_map(|(range, placeholder)| placeholder.map(|p| (range, p)))
            .collect();
        let released = redact(&held[..cut], ranges);
        let keep_from = floor_boundary(held, cut.saturating_sub(BEHIND_BYTES));
        channel.behind = if cut >= BEHIND_BYTES || channel.behind.is_empty() {
            held[keep_from..cut].to_owned()
        } else {
            // A short release: keep some of the older context too.
            let joined = format!("{}{}", channel.behind, &held[..cut]);
            let from = floor_boundary(&joined, joined.len().saturating_sub(BEHIND_BYTES));
            joined[from..].to_owned()
        };
        channel.held.drain(..cut);
        Ok(released)
    }

    /// Everything held for choice or block `index` (but its `except` fields), checked and
    /// released: the non-empty texts by field.
    fn release_rest(
        &mut self,
        index: u64,
        except: &[Field],
    ) -> Result<Vec<(Field, String)>, Blocked> {
        let fields: Vec<Field> = self
            .channels
            .range((index, Field::Content)..)
            .take_while(|((i, _), _)| *i == index)
            .filter(|((_, f), c)| !c.held.is_empty() && !except.contains(f))
            .map(|((_, f), _)| *f)
            .collect();
        let mut texts = Vec::new();
        for field in fields {
            let text = self.release((index, field), "", true)?;
            if !text.is_empty() {
                texts.push((field, text));
            }
        }
        Ok(texts)
    }

    /// Releases every channel of choice or block `index` (with events of their own).
    fn flush(&mut self, index: u64, out: &mut Vec<Event>) -> Result<(), Blocked> {
        let texts = self.release_rest(index, &[])?;
        if texts.is_empty() {
            return Ok(());
        }
        match self.dialect {
            Dialect::OpenAi => {
                if let Some(chunk) = self.openai_chunk(index, texts) {
                    out.push((None, chunk));
                }
            }
            Dialect::Responses => {
                for (field, text) in texts {
                    let Some(mut event) = self.deltas.get(&(index, field)).cloned() else {
                        continue;
                    };
                    event["delta"] = Value::String(text);
                    self.push_numbered(event, out);
                }
            }
            Dialect::Anthropic => {
                for (field, text) in texts {
                    let Field::Block(kind) = field else { continue };
                    let (delta_type, key) = kind.names();
                    let data = json!({
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": delta_type, key: text},
                    });
                    out.push((Some("content_block_delta".to_owned()), data.to_string()));
                }
            }
        }
        Ok(())
    }

    /// An OpenAI chunk carrying released `texts` of choice `index`.
    fn openai_chunk(&self, index: u64, texts: Vec<(Field, String)>) -> Option<String> {
        let mut chunk = self.envelope.clone()?;
        let completion = chunk.get("object").and_then(Value::as_str) == Some("text_completion");
        let mut choice = json!({"index": index, "finish_reason": null});
        let mut delta = serde_json::Map::new();
        let mut calls = Vec::new();
        for (field, text) in texts {
            match field {
                Field::Text => choice["text"] = Value::String(text),
                Field::Content => {
                    delta.insert("content".into(), text.into());
                }
                Field::Refusal => {
                    delta.insert("refusal".into(), text.into());
                }
                Field::Reasoning => {
                    delta.insert("reasoning_content".into(), text.into());
                }
                Field::FunctionArguments => {
                    delta.insert("function_call".into(), json!({"arguments": text}));
                }
                Field::ToolArguments(i) => {
                    calls.push(json!({"index": i, "function": {"arguments": text}}));
                }
                Field::Block(_) => {}
            }
        }
        if !calls.is_empty() {
            delta.insert("tool_calls".into(), Value::Array(calls));
        }
        if !completion {
            choice["delta"] = Value::Object(delta);
        }
        chunk.insert("choices".into(), Value::Array(vec![choice]));
        Some(Value::Object(chunk).to_string())
    }

    fn openai(&mut self, data: &str, out: &mut Vec<Event>) -> Result<(), Blocked> {
        if data.trim() == "[DONE]" {
            self.finish_all(out)?;
            out.push((None, data.to_owned()));
            return Ok(());
        }
        let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(data) else {
            out.push((None, data.to_owned()));
            return Ok(());
        };
        let Some(Value::Array(mut choices)) = chunk.remove("choices") else {
            out.push((None, data.to_owned()));
            return Ok(());
        };
        let mut envelope = chunk.clone();
        envelope.remove("usage");
        self.envelope = Some(envelope);
        let mut before = Vec::new();
        for choice in &mut choices {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let finishing = choice.get("finish_reason").is_some_and(|f| !f.is_null());
            let mut seen = Vec::new();
            for (field, pointer) in [
                (Field::Content, "/delta/content"),
                (Field::Refusal, "/delta/refusal"),
                (Field::Reasoning, "/delta/reasoning_content"),
                (Field::FunctionArguments, "/delta/function_call/arguments"),
                (Field::Text, "/text"),
            ] {
                if let Some(Value::String(text)) = choice.pointer_mut(pointer) {
                    *text = self.release((index, field), text, finishing)?;
                    seen.push(field);
                }
            }
            if let Some(Value::Array(calls)) = choice.pointer_mut("/delta/tool_calls") {
                for call in calls {
                    let i = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                    if let Some(Value::String(text)) = call.pointer_mut("/function/arguments") {
                        let field = Field::ToolArguments(i);
                        *text = self.release((index, field), text, finishing)?;
                        seen.push(field);
                    }
                }
            }
            if finishing {
                // Held text of fields this chunk does not carry goes out just before it.
                let texts = self.release_rest(index, &seen)?;
                if !texts.is_empty()
                    && let Some(extra) = self.openai_chunk(index, texts)
                {
                    before.push((None, extra));
                }
            }
        }
        chunk.insert("choices".into(), Value::Array(choices));
        out.extend(before);
        out.push((None, Value::Object(chunk).to_string()));
        Ok(())
    }

    fn finish_all(&mut self, out: &mut Vec<Event>) -> Result<(), Blocked> {
        let indices: Vec<u64> = self.channels.keys().map(|(i, _)| *i).collect();
        for index in indices {
            self.flush(index, out)?;
        }
        Ok(())
    }

    fn anthropic(
        &mut self,
        name: Option<&str>,
        data: &str,
        out: &mut Vec<Event>,
    ) -> Result<(), Blocked> {
        let Some(mut event) = parsed(name, data, out) else {
            return Ok(());
        };
        let kind = name
            .or_else(|| event.get("type").and_then(Value::as_str))
            .unwrap_or_default()
            .to_owned();
        let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
        match kind.as_str() {
            "content_block_delta" => {
                let delta_kind = event
                    .pointer("/delta/type")
                    .and_then(Value::as_str)
                    .and_then(BlockDelta::of);
                if let Some(delta_kind) = delta_kind {
                    let key = delta_kind.names().1;
                    if let Some(Value::String(text)) =
                        event.get_mut("delta").and_then(|d| d.get_mut(key))
                    {
                        let released =
                            self.release((index, Field::Block(delta_kind)), text, false)?;
                        if released.is_empty() {
                            return Ok(());
                        }
                        *text = released;
                        out.push((Some(kind), event.to_string()));
                        return Ok(());
                    }
                }
            }
            "content_block_stop" => self.flush(index, out)?,
            "message_delta" | "message_stop" => self.finish_all(out)?,
            _ => {}
        }
        out.push((name.map(str::to_owned), data.to_owned()));
        Ok(())
    }
}

impl StreamGuard {
    /// A Responses API event (`response.*`): deltas held and released like the other
    /// dialects' text; the events that repeat a whole text (`*.done`, the final
    /// response) carry it redacted, after the held deltas of their item.
    fn responses(
        &mut self,
        name: Option<&str>,
        data: &str,
        out: &mut Vec<Event>,
    ) -> Result<(), Blocked> {
        let Some(mut event) = parsed(name, data, out) else {
            return Ok(());
        };
        let kind = event["type"].as_str().unwrap_or_default().to_owned();
        let index = event["output_index"].as_u64().unwrap_or(0);
        match kind.as_str() {
            "response.output_text.delta"
            | "response.function_call_arguments.delta"
            | "response.reasoning_summary_text.delta" => {
                let field = match kind.as_str() {
                    "response.output_text.delta" => Field::Content,
                    "response.reasoning_summary_text.delta" => Field::Reasoning,
                    _ => Field::ToolArguments(0),
                };
                let Some(Value::String(text)) = event.get("delta").cloned() else {
                    self.push_numbered(event, out);
                    return Ok(());
                };
                self.deltas.insert((index, field), event.clone());
                let released = self.release((index, field), &text, false)?;
                if released.is_empty() {
                    return Ok(());
                }
                event["delta"] = Value::String(released);
            }
            "response.output_text.done"
            | "response.function_call_arguments.done"
            | "response.reasoning_summary_text.done"
            | "response.content_part.done"
            | "response.output_item.done" => {
                self.flush(index, out)?;
                self.redact_whole(&mut event)?;
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                self.finish_all(out)?;
                self.redact_whole(&mut event)?;
            }
            _ => {}
        }
        self.push_numbered(event, out);
        Ok(())
    }

    /// Sends a Responses event with the next `sequence_number`.
    fn push_numbered(&mut self, mut event: Value, out: &mut Vec<Event>) {
        event["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        let kind = event["type"].as_str().map(str::to_owned);
        out.push((kind, event.to_string()));
    }

    /// Every whole text of a Responses event (`text`, `arguments` and `refusal` strings,
    /// however deep) redacted; a blocking match ends the stream. Hits were counted when
    /// the deltas passed.
    fn redact_whole(&mut self, event: &mut Value) -> Result<(), Blocked> {
        let mut scratch = Verdict::default();
        let lists = self.rules.lists.clone();
        visit_named_strings(event, &mut |text| {
            let mut ranges = Vec::new();
            for list in &lists {
                for m in list.find(text, &mut scratch) {
                    if let Some(p) = m.placeholder {
                        ranges.push((m.range, p));
                    }
                }
            }
            if !ranges.is_empty() {
                *text = redact(text, ranges);
            }
        });
        if let Some(blocked) = scratch.blocked {
            self.verdict.blocked.get_or_insert(blocked);
            return Err(Blocked);
        }
        Ok(())
    }
}

/// `data` as JSON, or `None` after passing it on unchanged when it is not.
fn parsed(name: Option<&str>, data: &str, out: &mut Vec<Event>) -> Option<Value> {
    let parsed = serde_json::from_str::<Value>(data).ok();
    if parsed.is_none() {
        out.push((name.map(str::to_owned), data.to_owned()));
    }
    parsed
}

/// Calls `f` on every string under a `text`, `arguments` or `refusal` key in `value`.
fn visit_named_strings(value: &mut Value, f: &mut impl FnMut(&mut String)) {
    match value {
        Value::Object(fields) => {
            for (key, item) in fields.iter_mut() {
                match item {
                    Value::String(s)
                        if matches!(key.as_str(), "text" | "arguments" | "refusal") =>
                    {
                        f(s)
                    }
                    _ => visit_named_strings(item, f),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                visit_named_strings(item, f);
            }
        }
        _ => {}
    }
}

/// The largest char boundary of `text` at or before `at` (`str::floor_char_boundary`
/// is newer than the workspace's MSRV).
fn floor_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Counts and logs the hits of `verdict` not reported yet (by rule name only, never the
/// matched text).
fn report_new_hits(rules: &AnswerRules, verdict: &Verdict, reported: &mut usize) {
    for hit in &verdict.hits[*reported..] {
        rules.metrics.guardrail_hit(
            &rules.route,
            &rules.key_id,
            &rules.request_id,
            hit,
            "response",
        );
    }
    *reported = verdict.hits.len();
}

/// A whole SSE body (a cached stream) passed through a guard: the bytes to send.
pub fn guard_whole(body: &[u8], mut guard: StreamGuard) -> Vec<u8> {
    let mut parser = crate::sse::Parser::default();
    let mut events = Vec::new();
    match parser.feed(body) {
        Ok(parsed) => {
            for event in parsed {
                guard.on_event(event.event.as_deref(), &event.data, &mut events);
            }
            guard.finish(&mut events);
        }
        Err(_) => guard.stop_unreadable(&mut events),
    }
    let mut out = Vec::new();
    for (name, data) in events {
        crate::sse::write_event(&mut out, name.as_deref(), &data);
    }
    out
}

impl StreamGuard {
    /// An answer the guard cannot read is withheld: the stream is one error event.
    fn stop_unreadable(&mut self, out: &mut Vec<Event>) {
        self.stopped = true;
        let message =
            "The answer could not be read, so this route's response guardrails could not check it.";
        out.push(match self.dialect {
            Dialect::OpenAi => (
                None,
                json!({"error": {"message": message, "type": "server_error", "param": null, "code": "guardrail_blocked"}}).to_string(),
            ),
            Dialect::Anthropic => (
                Some("error".to_owned()),
                json!({"type": "error", "error": {"type": "api_error", "message": message}}).to_string(),
            ),
            Dialect::Responses => self.responses_error("guardrail_blocked", message),
        });
    }
}

#[cfg(test)]
mod tests {
    use tollgate_api::{
        config::CompiledGuardrail,
        v1alpha1::{Detector, GuardrailAction},
    };

    use super::*;

    const ANSWER: &str = "Sure. Write to jane.doe@example.com or call +44 20 7946 0958; \
        the card is 4111 1111 1111 1111 and the IBAN DE89 3704 0044 0532 0130 00. \
        Your key AKIAIOSFODNN7EXAMPLE must stay secret, and never say the word \
        pineapple-express. Der Schlüssel für die Tür ist grün: ça va. \
        -----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\nabc\n-----END RSA PRIVATE KEY----- done.";
    const SECRETS: &[&str] = &[
        "jane.doe@example.com",
        "7946 0958",
        "4111 1111 1111 1111",
        "DE89 3704",
        "AKIAIOSFODNN7EXAMPLE",
        "pineapple-express",
        "MIIEpAIBAAKCAQEA7",
    ];

    /// Every text detector the answer exercises.
    const DETECTORS: [Detector; 6] = [
        Detector::Email,
        Detector::Phone,
        Detector::CreditCard,
        Detector::Iban,
        Detector::Secret,
        Detector::BlockedTerms,
    ];

    fn rule(detector: Detector, action: GuardrailAction) -> CompiledGuardrail {
        CompiledGuardrail {
            name: detector.as_str().to_owned(),
            detector,
            pattern: None,
            terms: if detector == Detector::BlockedTerms {
                vec!["pineapple-express".to_owned()]
            } else {
                Vec::new()
            },
            limit: None,
            action,
            request: false,
            response: true,
        }
    }

    /// Every text detector, with `action`, split over a route list and a key list.
    fn rules(action: GuardrailAction) -> Arc<AnswerRules> {
        let route = [Detector::Email, Detector::Phone, Detector::CreditCard];
        let key = [Detector::Iban, Detector::Secret, Detector::BlockedTerms];
        let list = |ds: &[Detector]| ds.iter().map(|d| rule(*d, action)).collect();
        answer_rules(vec![list(&route), list(&key)])
    }

    fn answer_rules(lists: Vec<Vec<CompiledGuardrail>>) -> Arc<AnswerRules> {
        Arc::new(AnswerRules {
            lists: lists
                .iter()
                .map(|l| Arc::new(Guardrails::new(l).unwrap()))
                .collect(),
            route: "ns/route".into(),
            key_id: "k".into(),
            request_id: "r".into(),
            metrics: Arc::new(Metrics::new(Default::default())),
        })
    }

    /// `text` streamed in `how` pieces through a fresh guard: the guard and its output.
    fn guarded(
        rules: &Arc<AnswerRules>,
        dialect: Dialect,
        text: &str,
        how: &str,
        seed: u64,
        tool: bool,
    ) -> (StreamGuard, Vec<Event>) {
        let parts = pieces(text, how, seed);
        let events = match dialect {
            Dialect::OpenAi => openai_stream(&parts, tool),
            Dialect::Anthropic => anthropic_stream(&parts, tool),
            Dialect::Responses => responses_stream(&parts, tool),
        };
        let mut guard = StreamGuard::new(rules.clone(), dialect);
        let out = run(&mut guard, events);
        (guard, out)
    }

    /// What the non-streamed check makes of `text` as an answer's content, with every
    /// rule in one list: the stream merges overlapping matches of the route's and the
    /// key's lists as one list does (the earliest, then longest, wins).
    fn whole_answer(action: GuardrailAction, text: &str) -> (String, Verdict) {
        let mut doc = json!({"choices": [{"index": 0, "message": {"content": text}}]});
        let mut verdict = Verdict::default();
        let all: Vec<_> = DETECTORS.iter().map(|d| rule(*d, action)).collect();
        Guardrails::new(&all)
            .unwrap()
            .check_response(&mut doc, &mut verdict);
        let out = doc["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        (out, verdict)
    }

    /// `text` in pieces: one character each, seeded random sizes, or whole.
    fn pieces(text: &str, how: &str, seed: u64) -> Vec<String> {
        match how {
            "whole" => vec![text.to_owned()],
            "1-byte" => text.chars().map(String::from).collect(),
            _ => {
                let mut rng = fastrand::Rng::with_seed(seed);
                let mut out = Vec::new();
                let mut rest = text;
                while !rest.is_empty() {
                    let n = floor_boundary(rest, rng.usize(1..=24).min(rest.len()));
                    let n = if n == 0 {
                        rest.chars().next().unwrap().len_utf8()
                    } else {
                        n
                    };
                    out.push(rest[..n].to_owned());
                    rest = &rest[n..];
                }
                out
            }
        }
    }

    fn run(guard: &mut StreamGuard, events: Vec<Event>) -> Vec<Event> {
        let mut out = Vec::new();
        for (name, data) in events {
            guard.on_event(name.as_deref(), &data, &mut out);
        }
        guard.finish(&mut out);
        out
    }

    fn openai_stream(parts: &[String], tool: bool) -> Vec<Event> {
        let mut events = Vec::new();
        for part in parts {
            let delta = if tool {
                json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
            } else {
                json!({"content": part})
            };
            events.push((
                None,
                json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
                .to_string(),
            ));
        }
        events.push((
            None,
            json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            .to_string(),
        ));
        events.push((None, "[DONE]".to_owned()));
        events
    }

    /// A Responses stream of `parts`: the deltas, then the events that repeat the whole
    /// text (`*.done`, the completed response), as OpenAI sends them.
    fn responses_stream(parts: &[String], tool: bool) -> Vec<Event> {
        let whole: String = parts.concat();
        let (delta, done, item) = if tool {
            (
                "response.function_call_arguments.delta",
                json!({"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0, "arguments": whole}),
                json!({"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "c", "name": "f", "arguments": whole}),
            )
        } else {
            (
                "response.output_text.delta",
                json!({"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0, "content_index": 0, "text": whole}),
                json!({"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": whole, "annotations": []}]}),
            )
        };
        let mut seq = 0;
        let mut event = |mut data: Value| {
            data["sequence_number"] = json!(seq);
            seq += 1;
            ev(data["type"].as_str().unwrap().to_owned().as_str(), data)
        };
        let mut events = vec![
            event(json!({"type": "response.created", "response": {"id": "resp_1", "output": []}})),
            event(
                json!({"type": "response.output_item.added", "output_index": 0, "item": {"id": "x"}}),
            ),
        ];
        for part in parts {
            events.push(event(json!({"type": delta, "item_id": "x", "output_index": 0, "content_index": 0, "delta": part})));
        }
        events.push(event(done));
        if !tool {
            events.push(event(json!({"type": "response.content_part.done", "item_id": "msg_1", "output_index": 0, "content_index": 0, "part": item["content"][0]})));
        }
        events.push(event(
            json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
        ));
        events.push(event(json!({"type": "response.completed", "response": {"id": "resp_1", "status": "completed", "output": [item]}})));
        events
    }

    fn anthropic_stream(parts: &[String], tool: bool) -> Vec<Event> {
        let (block, delta_type, key) = if tool {
            (
                json!({"type": "tool_use", "id": "t", "name": "f", "input": {}}),
                "input_json_delta",
                "partial_json",
            )
        } else {
            (json!({"type": "text", "text": ""}), "text_delta", "text")
        };
        let mut events = vec![
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 1, "output_tokens": 0}}}),
            ),
            ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": block}),
            ),
        ];
        for part in parts {
            events.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": delta_type, key: part}}),
            ));
        }
        events.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push(ev("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}})));
        events.push(ev("message_stop", json!({"type": "message_stop"})));
        events
    }

    fn ev(name: &str, data: Value) -> Event {
        (Some(name.to_owned()), data.to_string())
    }

    /// The text the client assembles from the guarded events.
    fn assembled(out: &[Event], tool: bool) -> String {
        let mut text = String::new();
        for (_, data) in out {
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let responses_delta = v["type"] == "response.output_text.delta"
                || v["type"] == "response.function_call_arguments.delta";
            let piece = if responses_delta {
                v.get("delta")
            } else if tool {
                v.pointer("/choices/0/delta/tool_calls/0/function/arguments")
                    .or_else(|| v.pointer("/delta/partial_json"))
            } else {
                v.pointer("/choices/0/delta/content")
                    .or_else(|| v.pointer("/delta/text"))
            };
            if let Some(Value::String(s)) = piece {
                text.push_str(s);
            }
        }
        text
    }

    #[test]
    fn redaction_of_a_streamed_answer_matches_the_whole_answers_however_it_is_split() {
        let rules = rules(GuardrailAction::Redact);
        let (expected, _) = whole_answer(GuardrailAction::Redact, ANSWER);
        // Tool arguments are JSON text holding the answer in a string.
        let arguments = json!({"note": ANSWER}).to_string();
        let (expected_arguments, _) = whole_answer(GuardrailAction::Redact, &arguments);
        for dialect in [Dialect::OpenAi, Dialect::Anthropic, Dialect::Responses] {
            for tool in [false, true] {
                let source = if tool { &arguments } else { ANSWER };
                let want = if tool { &expected_arguments } else { &expected };
                for (how, seed) in [
                    ("whole", 0),
                    ("1-byte", 0),
                    ("random", 1),
                    ("random", 2),
                    ("random", 3),
                ] {
                    let (guard, out) = guarded(&rules, dialect, source, how, seed, tool);
                    let case = format!("{dialect:?} tool={tool} {how}/{seed}");
                    assert!(!guard.stopped(), "{case}");
                    assert_eq!(&assembled(&out, tool), want, "{case}");
                    let all: String = out.iter().map(|(_, d)| d.as_str()).collect();
                    for secret in SECRETS {
                        assert!(!all.contains(secret), "{case}: {secret} leaked");
                    }
                    // The stream still ends as streams end.
                    let last = &out.last().unwrap().1;
                    match dialect {
                        Dialect::OpenAi => assert_eq!(last, "[DONE]", "{case}"),
                        Dialect::Anthropic => assert!(last.contains("message_stop"), "{case}"),
                        Dialect::Responses => {
                            assert!(last.contains("response.completed"), "{case}");
                            // Renumbered in order, and the whole texts match the deltas.
                            for (i, (_, data)) in out.iter().enumerate() {
                                let v: Value = serde_json::from_str(data).unwrap();
                                assert_eq!(v["sequence_number"], i, "{case}");
                                let whole = v.get("text").or_else(|| v.get("arguments"));
                                if let Some(Value::String(whole)) = whole {
                                    assert_eq!(whole, want, "{case}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_blocking_rule_ends_the_stream_before_any_of_the_match_is_released() {
        for detector in DETECTORS {
            let rules = answer_rules(vec![vec![rule(detector, GuardrailAction::Block)]]);
            for dialect in [Dialect::OpenAi, Dialect::Anthropic, Dialect::Responses] {
                for (how, seed) in [("whole", 0), ("1-byte", 0), ("random", 7)] {
                    let (guard, out) = guarded(&rules, dialect, ANSWER, how, seed, false);
                    let case = format!("{detector:?} {dialect:?} {how}/{seed}");
                    assert!(guard.stopped(), "{case}");
                    let (name, error) = out.last().unwrap();
                    assert!(error.contains("withheld by guardrail"), "{case}: {error}");
                    if dialect != Dialect::OpenAi {
                        assert_eq!(name.as_deref(), Some("error"), "{case}");
                    }
                    if dialect == Dialect::Anthropic {
                        assert!(error.contains("api_error"), "{case}");
                    } else {
                        assert!(error.contains("guardrail_blocked"), "{case}");
                    }
                    // What was released is a prefix of the answer that stops before the
                    // first match of the rule.
                    let released = assembled(&out, false);
                    assert!(ANSWER.starts_with(&released), "{case}: {released}");
                    let first = rules.lists[0].find(ANSWER, &mut Verdict::default())[0]
                        .range
                        .start;
                    assert!(released.len() <= first, "{case}: released {released:?}");
                }
            }
        }
    }

    #[test]
    fn text_is_held_back_by_a_bounded_amount_and_released_at_the_end() {
        let rules = rules(GuardrailAction::Redact);
        let text = "plain words ".repeat(100);
        let parts = pieces(&text, "random", 5);
        let mut guard = StreamGuard::new(rules, Dialect::OpenAi);
        let mut out = Vec::new();
        let mut sent = 0;
        for (name, data) in openai_stream(&parts, false) {
            if data == "[DONE]" || data.contains("\"stop\"") {
                break;
            }
            sent += serde_json::from_str::<Value>(&data).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .len();
            guard.on_event(name.as_deref(), &data, &mut out);
            let released = assembled(&out, false).len();
            assert!(sent - released <= HOLD_BYTES, "held {}", sent - released);
        }
        guard.finish(&mut out);
        assert_eq!(assembled(&out, false), text);
    }

    #[test]
    fn a_stored_stream_is_checked_whole() {
        let rules = rules(GuardrailAction::Redact);
        let mut body = Vec::new();
        for (name, data) in openai_stream(&pieces(ANSWER, "random", 9), false) {
            crate::sse::write_event(&mut body, name.as_deref(), &data);
        }
        let out = guard_whole(&body, StreamGuard::new(rules.clone(), Dialect::OpenAi));
        let text = String::from_utf8(out).unwrap();
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret}");
        }
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
}
