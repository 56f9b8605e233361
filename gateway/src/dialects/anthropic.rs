//! Anthropic messages (`/v1/messages`) to and from the canonical model.
//!
//! Requests: `max_tokens` is required (an absent one becomes [`DEFAULT_MAX_TOKENS`]), turns
//! must alternate (consecutive turns of one role are merged), tool results are user turns.
//! Structured output has no place here: `render_request` drops it, and requests translated
//! to Anthropic carry it as a tool instead (`Request::output_as_tool`, applied by
//! `providers::request_body`); `thinking` and document blocks in a request cannot be
//! translated and are refused.

use serde_json::{Map, Value, json};

use crate::canonical::{
    Answer, ErrorBody, Event, Finish, Image, Message, Part, Request, Role, Tool, ToolCall,
    ToolChoice, Untranslatable, Usage,
};

/// `max_tokens` sent to Anthropic when a request has none (Anthropic requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

fn string(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// The text of a `system` or `tool_result` content: a string, or its blocks' text joined
/// by newlines.
fn text_of(content: &Value) -> String {
    super::openai_chat::text_of(content)
}

fn blocks(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(blocks) => blocks.clone(),
        _ => Vec::new(),
    }
}

fn finish(stop_reason: &Value) -> Option<Finish> {
    Some(match stop_reason.as_str()? {
        "max_tokens" => Finish::Length,
        "tool_use" => Finish::ToolCalls,
        "refusal" => Finish::ContentFilter,
        _ => Finish::Stop,
    })
}

fn stop_reason(finish: Option<Finish>) -> Value {
    match finish {
        None => Value::Null,
        Some(Finish::Stop) => json!("end_turn"),
        Some(Finish::Length) => json!("max_tokens"),
        Some(Finish::ToolCalls) => json!("tool_use"),
        Some(Finish::ContentFilter) => json!("refusal"),
    }
}

/// Anthropic counts cached input apart; the canonical input includes it. Saturating: the
/// numbers come from the upstream.
fn parse_usage(usage: &Value) -> Usage {
    let input = [
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    ]
    .iter()
    .fold(0u64, |sum, field| {
        sum.saturating_add(usage[field].as_u64().unwrap_or(0))
    });
    Usage {
        input,
        output: usage["output_tokens"].as_u64().unwrap_or(0),
        cached_input: usage["cache_read_input_tokens"].as_u64(),
        cache_write: usage["cache_creation_input_tokens"].as_u64(),
        reasoning: None,
    }
}

/// A messages request in the canonical model.
pub fn parse_request(req: &Value) -> Result<Request, Untranslatable> {
    let mut messages = Vec::new();
    for m in req["messages"]
        .as_array()
        .ok_or_else(|| Untranslatable("messages must be an array".into()))?
    {
        let role = if m["role"] == "assistant" {
            Role::Assistant
        } else {
            Role::User
        };
        let mut parts = Vec::new();
        for block in blocks(&m["content"]) {
            parts.push(match block["type"].as_str() {
                Some("text") => Part::Text(string(&block["text"])),
                Some("image") => {
                    let source = &block["source"];
                    Part::Image(if source["type"] == "base64" {
                        Image::Base64 {
                            media_type: string(&source["media_type"]),
                            data: string(&source["data"]),
                        }
                    } else {
                        Image::Url(string(&source["url"]))
                    })
                }
                Some("tool_use") => Part::ToolCall(ToolCall {
                    id: string(&block["id"]),
                    name: string(&block["name"]),
                    arguments: block["input"].to_string(),
                }),
                Some("tool_result") => Part::ToolResult {
                    call_id: string(&block["tool_use_id"]),
                    content: text_of(&block["content"]),
                },
                other => {
                    return Err(Untranslatable(format!(
                        "content block type {other:?} cannot be translated for another provider"
                    )));
                }
            });
        }
        messages.push(Message { role, parts });
    }
    let tools = req["tools"].as_array().map(|tools| {
        tools
            .iter()
            .map(|t| Tool {
                name: string(&t["name"]),
                description: t["description"].as_str().map(str::to_owned),
                parameters: t.get("input_schema").filter(|s| !s.is_null()).cloned(),
            })
            .collect()
    });
    let tool_choice = match req["tool_choice"]["type"].as_str() {
        Some("auto") => Some(ToolChoice::Auto),
        Some("any") => Some(ToolChoice::Required),
        Some("none") => Some(ToolChoice::None),
        Some("tool") => Some(ToolChoice::Tool(string(&req["tool_choice"]["name"]))),
        _ => None,
    };
    Ok(Request {
        system: (!req["system"].is_null()).then(|| text_of(&req["system"])),
        messages,
        max_tokens: req["max_tokens"].as_u64(),
        temperature: req["temperature"].as_number().cloned(),
        top_p: req["top_p"].as_number().cloned(),
        stop: req["stop_sequences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        stream: req["stream"].as_bool(),
        tools,
        tool_choice,
        output: None,
        user: None,
    })
}

fn block(part: &Part) -> Option<Value> {
    Some(match part {
        Part::Text(text) => json!({"type": "text", "text": text}),
        Part::Image(Image::Url(url)) => {
            json!({"type": "image", "source": {"type": "url", "url": url}})
        }
        Part::Image(Image::Base64 { media_type, data }) => {
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
        }
        Part::ToolCall(call) => {
            let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
            json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input})
        }
        Part::ToolResult { call_id, content } => {
            json!({"type": "tool_result", "tool_use_id": call_id, "content": content})
        }
        Part::Reasoning(_) => return None,
    })
}

/// A canonical request as a messages request for `model`.
pub fn render_request(req: &Request, model: &str) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    for m in &req.messages {
        let role = match m.role {
            Role::Assistant => "assistant",
            Role::User | Role::Tool => "user",
        };
        let content: Vec<Value> = m.parts.iter().filter_map(block).collect();
        if content.is_empty() {
            continue;
        }
        // Turns must alternate: a turn of the previous one's role joins it.
        if let Some(last) = messages.last_mut()
            && last["role"] == role
            && let Some(existing) = last["content"].as_array_mut()
        {
            existing.extend(content);
            continue;
        }
        messages.push(json!({"role": role, "content": content}));
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    if let Some(system) = &req.system {
        out.insert("system".into(), json!(system));
    }
    out.insert(
        "max_tokens".into(),
        json!(req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    if let Some(t) = &req.temperature {
        out.insert("temperature".into(), Value::Number(t.clone()));
    }
    if let Some(p) = &req.top_p {
        out.insert("top_p".into(), Value::Number(p.clone()));
    }
    if let Some(stream) = req.stream {
        out.insert("stream".into(), json!(stream));
    }
    if !req.stop.is_empty() {
        out.insert("stop_sequences".into(), json!(req.stop));
    }
    if let Some(tools) = &req.tools {
        let tools = tools
            .iter()
            .map(|t| {
                let mut tool = json!({
                    "name": t.name,
                    "input_schema": t.parameters.clone().unwrap_or_else(|| json!({"type": "object"})),
                });
                if let Some(d) = &t.description {
                    tool["description"] = json!(d);
                }
                tool
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = &req.tool_choice {
        let choice = match choice {
            ToolChoice::Auto => json!({"type": "auto"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Tool(name) => json!({"type": "tool", "name": name}),
        };
        out.insert("tool_choice".into(), choice);
    }
    if let Some(user) = &req.user {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    Value::Object(out)
}

/// A message (a whole answer) in the canonical model.
pub fn parse_answer(msg: &Value) -> Answer {
    let mut parts = Vec::new();
    for block in msg["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => parts.push(Part::Text(string(&block["text"]))),
            Some("tool_use") => parts.push(Part::ToolCall(ToolCall {
                id: string(&block["id"]),
                name: string(&block["name"]),
                arguments: block["input"].to_string(),
            })),
            Some("thinking") => parts.push(Part::Reasoning(string(&block["thinking"]))),
            _ => {}
        }
    }
    Answer {
        id: string(&msg["id"]),
        parts,
        finish: finish(&msg["stop_reason"]),
        usage: parse_usage(&msg["usage"]),
    }
}

/// A canonical answer as a message; `model` is the name the client asked for.
pub fn render_answer(answer: &Answer, model: &str) -> Value {
    let content: Vec<Value> = answer
        .parts
        .iter()
        .filter(|p| !matches!(p, Part::Text(t) if t.is_empty()))
        .filter_map(block)
        .collect();
    json!({
        "id": answer.id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(answer.finish),
        "stop_sequence": null,
        "usage": {"input_tokens": answer.usage.input, "output_tokens": answer.usage.output},
    })
}

/// An Anthropic error body (`{"type": "error", "error": {...}}`) in the canonical model.
pub fn parse_error(body: &Value) -> ErrorBody {
    ErrorBody {
        kind: body["error"]["type"].as_str().map(str::to_owned),
        message: string(&body["error"]["message"]),
    }
}

/// The Anthropic error type of an HTTP status.
pub fn error_kind(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    }
}

/// A canonical error as an Anthropic error body; the type follows the HTTP `status`.
pub fn render_error(error: &ErrorBody, status: u16) -> Value {
    json!({"type": "error", "error": {"type": error_kind(status), "message": error.message}})
}

/// Reads a messages stream (named events) as canonical events.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    usage: Usage,
    /// Content block index → tool call number.
    calls: std::collections::HashMap<u64, usize>,
}

impl StreamDecoder {
    /// The events of one Anthropic event `name` with its `data`.
    pub fn on_event(&mut self, name: &str, data: &Value) -> Vec<Event> {
        match name {
            "message_start" => {
                self.usage = parse_usage(&data["message"]["usage"]);
                vec![Event::Start {
                    id: string(&data["message"]["id"]),
                    input: Some(self.usage.input),
                }]
            }
            "content_block_start" if data["content_block"]["type"] == "tool_use" => {
                let call = self.calls.len();
                self.calls.insert(data["index"].as_u64().unwrap_or(0), call);
                let block = &data["content_block"];
                vec![Event::ToolCallStart {
                    call,
                    id: string(&block["id"]),
                    name: string(&block["name"]),
                }]
            }
            "content_block_delta" => {
                let delta = &data["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => vec![Event::Text(string(&delta["text"]))],
                    Some("input_json_delta") => {
                        let index = data["index"].as_u64().unwrap_or(0);
                        vec![Event::ToolCallArguments {
                            call: self.calls.get(&index).copied().unwrap_or(0),
                            json: string(&delta["partial_json"]),
                        }]
                    }
                    _ => Vec::new(),
                }
            }
            "message_delta" => {
                if let Some(o) = data["usage"]["output_tokens"].as_u64() {
                    self.usage.output = o;
                }
                vec![
                    Event::Finish(finish(&data["delta"]["stop_reason"])),
                    Event::Usage(self.usage),
                ]
            }
            "message_stop" => vec![Event::Done],
            "error" => vec![Event::Error(parse_error(data))],
            _ => Vec::new(),
        }
    }
}

/// Writes canonical events as a messages stream: `(event name, data)` pairs in protocol
/// order (`message_start` first, blocks opened and closed in pairs, `message_delta` and
/// `message_stop` last).
#[derive(Debug)]
pub struct StreamEncoder {
    model: String,
    started: bool,
    /// Index of the open content block, and whether it is text.
    open_block: Option<(usize, bool)>,
    next_block: usize,
    finish: Option<Finish>,
    usage: Usage,
    finished: bool,
}

impl StreamEncoder {
    /// An encoder for one stream; `model` is the name the client asked for.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            started: false,
            open_block: None,
            next_block: 0,
            finish: None,
            usage: Usage::default(),
            finished: false,
        }
    }

    fn start(&mut self, id: &str, out: &mut Vec<(String, Value)>) {
        if !self.started {
            self.started = true;
            out.push(("message_start".into(), json!({
                "type": "message_start",
                "message": {"id": id, "type": "message", "role": "assistant", "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 0, "output_tokens": 0}},
            })));
        }
    }

    fn close_block(&mut self, out: &mut Vec<(String, Value)>) {
        if let Some((index, _)) = self.open_block.take() {
            out.push((
                "content_block_stop".into(),
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open_block(&mut self, text: bool, out: &mut Vec<(String, Value)>) -> usize {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open_block = Some((index, text));
        index
    }

    /// The `(event, data)` pairs for one canonical event.
    pub fn on_event(&mut self, event: &Event) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        match event {
            Event::Start { id, .. } => self.start(id, &mut out),
            Event::Text(text) => {
                if !matches!(self.open_block, Some((_, true))) {
                    let index = self.open_block(true, &mut out);
                    out.push(("content_block_start".into(), json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
                }
                let index = self.open_block.map_or(0, |(i, _)| i);
                out.push(("content_block_delta".into(), json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}})));
            }
            Event::ToolCallStart { id, name, .. } => {
                let index = self.open_block(false, &mut out);
                out.push(("content_block_start".into(), json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}})));
            }
            // Arguments go to the open block: calls arrive one after the other.
            Event::ToolCallArguments { json, .. } => {
                let index = self.open_block.map_or(0, |(i, _)| i);
                out.push(("content_block_delta".into(), json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": json}})));
            }
            Event::Finish(finish) => self.finish = *finish,
            Event::Usage(usage) => self.usage = *usage,
            Event::Error(e) => out.push((
                "error".into(),
                json!({"type": "error", "error": {"type": "api_error", "message": e.message}}),
            )),
            Event::Done => {
                self.finished = true;
                self.start("msg_tollgate", &mut out);
                self.close_block(&mut out);
                out.push((
                    "message_delta".into(),
                    json!({
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason(Some(self.finish.unwrap_or(Finish::Stop))), "stop_sequence": null},
                        "usage": {"input_tokens": self.usage.input, "output_tokens": self.usage.output},
                    }),
                ));
                out.push(("message_stop".into(), json!({"type": "message_stop"})));
            }
        }
        out
    }
}
