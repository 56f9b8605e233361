//! OpenAI chat completions (`/v1/chat/completions`) to and from the canonical model.
//!
//! Dropped on the way in: `n` (more than 1 is refused), `logprobs`, `seed`, penalties and
//! other sampling knobs no other dialect has. System and developer messages become
//! [`Request::system`] wherever they stood.

use serde_json::{Map, Value, json};

use crate::canonical::{
    Answer, ErrorBody, Event, Finish, Image, Message, OutputFormat, Part, Request, Role, Tool,
    ToolCall, ToolChoice, Untranslatable, Usage,
};

/// The text of a `content` (a string, or the `text` of each part joined by newlines).
pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn string(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn part(p: &Value) -> Result<Part, Untranslatable> {
    match p["type"].as_str() {
        Some("text") => Ok(Part::Text(string(&p["text"]))),
        Some("image_url") => {
            let url = p["image_url"]["url"]
                .as_str()
                .or_else(|| p["image_url"].as_str())
                .unwrap_or_default();
            let Some(rest) = url.strip_prefix("data:") else {
                return Ok(Part::Image(Image::Url(url.to_owned())));
            };
            let (meta, data) = rest
                .split_once(',')
                .ok_or_else(|| Untranslatable("malformed data URL in image_url".into()))?;
            Ok(Part::Image(Image::Base64 {
                media_type: meta.trim_end_matches(";base64").to_owned(),
                data: data.to_owned(),
            }))
        }
        other => Err(Untranslatable(format!(
            "content part type {other:?} cannot be translated for another provider"
        ))),
    }
}

fn parts(content: &Value) -> Result<Vec<Part>, Untranslatable> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(items) => items.iter().map(part).collect(),
        _ => Err(Untranslatable(
            "message content must be a string or an array of parts".into(),
        )),
    }
}

fn finish(reason: &Value) -> Option<Finish> {
    Some(match reason.as_str()? {
        "length" => Finish::Length,
        "tool_calls" | "function_call" => Finish::ToolCalls,
        "content_filter" => Finish::ContentFilter,
        _ => Finish::Stop,
    })
}

fn finish_reason(finish: Option<Finish>) -> Value {
    match finish {
        None => Value::Null,
        Some(Finish::Stop) => json!("stop"),
        Some(Finish::Length) => json!("length"),
        Some(Finish::ToolCalls) => json!("tool_calls"),
        Some(Finish::ContentFilter) => json!("content_filter"),
    }
}

/// The `tool_calls` of an assistant message or answer.
fn tool_calls(calls: &Value) -> impl Iterator<Item = Part> + '_ {
    calls.as_array().into_iter().flatten().map(|call| {
        Part::ToolCall(ToolCall {
            id: string(&call["id"]),
            name: string(&call["function"]["name"]),
            arguments: call["function"]["arguments"]
                .as_str()
                .unwrap_or("{}")
                .to_owned(),
        })
    })
}

fn number(v: &Value) -> Option<serde_json::Number> {
    v.as_number().cloned()
}

/// A chat completion request in the canonical model.
pub fn parse_request(req: &Value) -> Result<Request, Untranslatable> {
    if req["n"].as_u64().is_some_and(|n| n > 1) {
        return Err(Untranslatable(
            "n > 1 cannot be translated for another provider".into(),
        ));
    }
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for m in req["messages"]
        .as_array()
        .ok_or_else(|| Untranslatable("messages must be an array".into()))?
    {
        match m["role"].as_str() {
            Some("system" | "developer") => system.push(text_of(&m["content"])),
            Some("user") => messages.push(Message {
                role: Role::User,
                parts: parts(&m["content"])?,
            }),
            Some("assistant") => {
                let mut said = parts(&m["content"])?;
                said.extend(tool_calls(&m["tool_calls"]));
                messages.push(Message {
                    role: Role::Assistant,
                    parts: said,
                });
            }
            Some("tool") => messages.push(Message {
                role: Role::Tool,
                parts: vec![Part::ToolResult {
                    call_id: string(&m["tool_call_id"]),
                    content: text_of(&m["content"]),
                }],
            }),
            other => return Err(Untranslatable(format!("unknown message role {other:?}"))),
        }
    }
    let stop = match &req["stop"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    let tools = req["tools"].as_array().map(|tools| {
        tools
            .iter()
            .filter(|t| t["type"] == "function")
            .map(|t| {
                let f = &t["function"];
                Tool {
                    name: string(&f["name"]),
                    description: f["description"].as_str().map(str::to_owned),
                    parameters: f.get("parameters").filter(|p| !p.is_null()).cloned(),
                }
            })
            .collect()
    });
    let tool_choice = match &req["tool_choice"] {
        Value::String(s) if s == "auto" => Some(ToolChoice::Auto),
        Value::String(s) if s == "required" => Some(ToolChoice::Required),
        Value::String(s) if s == "none" => Some(ToolChoice::None),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o.get("function").map_or(&Value::Null, |f| &f["name"]);
            Some(ToolChoice::Tool(string(name)))
        }
        _ => None,
    };
    let format = &req["response_format"];
    let output = match format["type"].as_str() {
        Some("text") => Some(OutputFormat::Text),
        Some("json_object") => Some(OutputFormat::JsonObject),
        Some("json_schema") => Some(OutputFormat::JsonSchema {
            name: string(&format["json_schema"]["name"]),
            schema: format["json_schema"]["schema"].clone(),
            strict: format["json_schema"]["strict"].as_bool().unwrap_or(false),
        }),
        _ => None,
    };
    Ok(Request {
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        max_tokens: req["max_completion_tokens"]
            .as_u64()
            .or_else(|| req["max_tokens"].as_u64()),
        temperature: number(&req["temperature"]),
        top_p: number(&req["top_p"]),
        stop,
        stream: req["stream"].as_bool(),
        tools,
        tool_choice,
        output,
        user: req["user"].as_str().map(str::to_owned),
    })
}

fn tool_call(call: &ToolCall) -> Value {
    json!({
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    })
}

/// A canonical request as a chat completion request for `model`. A streamed one asks for
/// the usage chunk (the gateway accounts every answer).
pub fn render_request(req: &Request, model: &str) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = &req.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    for m in &req.messages {
        let mut content = Vec::new();
        let mut tool_calls = Vec::new();
        for part in &m.parts {
            match part {
                Part::Text(text) => content.push(json!({"type": "text", "text": text})),
                Part::Image(Image::Url(url)) => {
                    content.push(json!({"type": "image_url", "image_url": {"url": url}}))
                }
                Part::Image(Image::Base64 { media_type, data }) => content.push(
                    json!({"type": "image_url", "image_url": {"url": format!("data:{media_type};base64,{data}")}}),
                ),
                Part::ToolCall(call) => tool_calls.push(tool_call(call)),
                // Each result is a message of its own, before what else the turn says.
                Part::ToolResult { call_id, content } => messages.push(
                    json!({"role": "tool", "tool_call_id": call_id, "content": content}),
                ),
                Part::Reasoning(_) => {}
            }
        }
        if content.is_empty() && tool_calls.is_empty() {
            continue;
        }
        let content = if content.iter().all(|p| p["type"] == "text") {
            json!(
                content
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<String>()
            )
        } else {
            Value::Array(content)
        };
        let role = match m.role {
            Role::Assistant => "assistant",
            Role::User | Role::Tool => "user",
        };
        let mut message = json!({"role": role, "content": content});
        if !tool_calls.is_empty() {
            message["tool_calls"] = Value::Array(tool_calls);
        }
        messages.push(message);
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("messages".into(), Value::Array(messages));
    if let Some(n) = req.max_tokens {
        out.insert("max_tokens".into(), json!(n));
    }
    if let Some(t) = &req.temperature {
        out.insert("temperature".into(), Value::Number(t.clone()));
    }
    if let Some(p) = &req.top_p {
        out.insert("top_p".into(), Value::Number(p.clone()));
    }
    if !req.stop.is_empty() {
        out.insert("stop".into(), json!(req.stop));
    }
    if req.stream == Some(true) {
        out.insert("stream".into(), json!(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = &req.tools {
        let tools = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = &req.tool_choice {
        let choice = match choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Required => json!("required"),
            ToolChoice::None => json!("none"),
            ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
        };
        out.insert("tool_choice".into(), choice);
    }
    match &req.output {
        None => {}
        Some(OutputFormat::Text) => {
            out.insert("response_format".into(), json!({"type": "text"}));
        }
        Some(OutputFormat::JsonObject) => {
            out.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(OutputFormat::JsonSchema {
            name,
            schema,
            strict,
        }) => {
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}),
            );
        }
    }
    if let Some(user) = &req.user {
        out.insert("user".into(), json!(user));
    }
    Value::Object(out)
}

/// The usage object of an answer or chunk.
fn parse_usage(u: &Value) -> Usage {
    Usage {
        input: u["prompt_tokens"].as_u64().unwrap_or(0),
        output: u["completion_tokens"].as_u64().unwrap_or(0),
        cached_input: u["prompt_tokens_details"]["cached_tokens"].as_u64(),
        cache_write: None,
        reasoning: u["completion_tokens_details"]["reasoning_tokens"].as_u64(),
    }
}

fn render_usage(u: &Usage) -> Value {
    let mut out =
        json!({"prompt_tokens": u.input, "completion_tokens": u.output, "total_tokens": u.total()});
    if let Some(cached) = u.cached_input {
        out["prompt_tokens_details"] = json!({"cached_tokens": cached});
    }
    out
}

/// A chat completion (its first choice) in the canonical model.
pub fn parse_answer(resp: &Value) -> Answer {
    let choice = &resp["choices"][0];
    let message = &choice["message"];
    let mut parts = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        parts.push(Part::Text(text.to_owned()));
    }
    parts.extend(tool_calls(&message["tool_calls"]));
    Answer {
        id: string(&resp["id"]),
        parts,
        finish: finish(&choice["finish_reason"]),
        usage: parse_usage(&resp["usage"]),
    }
}

/// A canonical answer as a chat completion; `model` is the name the client asked for.
pub fn render_answer(answer: &Answer, model: &str, created: i64) -> Value {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for part in &answer.parts {
        match part {
            Part::Text(t) => text.push_str(t),
            Part::ToolCall(call) => tool_calls.push(tool_call(call)),
            _ => {}
        }
    }
    let content = if text.is_empty() && !tool_calls.is_empty() {
        Value::Null
    } else {
        json!(text)
    };
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    json!({
        "id": answer.id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(answer.finish)}],
        "usage": render_usage(&answer.usage),
    })
}

/// An error body (`{"error": {...}}`) in the canonical model.
pub fn parse_error(body: &Value) -> ErrorBody {
    ErrorBody {
        kind: body["error"]["type"].as_str().map(str::to_owned),
        message: body["error"]["message"]
            .as_str()
            .map_or_else(|| body.to_string(), str::to_owned),
    }
}

/// A canonical error as an OpenAI error body; its kind is the type and the code.
pub fn render_error(error: &ErrorBody) -> Value {
    json!({"error": {"message": error.message, "type": error.kind, "param": null, "code": error.kind}})
}

/// Reads a chat completion stream (`data:` payloads) as canonical events.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    usage: Usage,
}

impl StreamDecoder {
    /// The events of one `data:` payload.
    pub fn on_data(&mut self, data: &str) -> Vec<Event> {
        if data.trim() == "[DONE]" {
            return vec![Event::Done];
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return Vec::new();
        };
        if let Some(e) = chunk.get("error") {
            return vec![Event::Error(ErrorBody {
                kind: None,
                message: string(&e["message"]),
            })];
        }
        let mut out = vec![Event::Start {
            id: string(&chunk["id"]),
            input: None,
        }];
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            let parsed = parse_usage(u);
            // A field left out keeps its last value.
            self.usage = Usage {
                input: u["prompt_tokens"].as_u64().unwrap_or(self.usage.input),
                output: u["completion_tokens"].as_u64().unwrap_or(self.usage.output),
                ..parsed
            };
            out.push(Event::Usage(self.usage));
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            out.push(Event::Text(text.to_owned()));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or(0) as usize;
            if call.get("id").is_some_and(|id| !id.is_null()) {
                out.push(Event::ToolCallStart {
                    call: index,
                    id: string(&call["id"]),
                    name: string(&call["function"]["name"]),
                });
            }
            if let Some(args) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                out.push(Event::ToolCallArguments {
                    call: index,
                    json: args.to_owned(),
                });
            }
        }
        if !choice["finish_reason"].is_null() {
            out.push(Event::Finish(finish(&choice["finish_reason"])));
        }
        out
    }
}

/// Writes canonical events as chat completion chunks (`data:` payloads, `[DONE]` last).
#[derive(Debug)]
pub struct StreamEncoder {
    id: String,
    model: String,
    created: i64,
    include_usage: bool,
    usage: Usage,
    finish: Option<Finish>,
}

impl StreamEncoder {
    /// An encoder for one stream; `model` is the name the client asked for, and
    /// `include_usage` whether it asked for the usage chunk.
    pub fn new(model: &str, created: i64, include_usage: bool) -> Self {
        Self {
            id: String::new(),
            model: model.to_owned(),
            created,
            include_usage,
            usage: Usage::default(),
            finish: None,
        }
    }

    fn chunk(&self, delta: Value, finish: Value) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The `data:` payloads for one event.
    pub fn on_event(&mut self, event: &Event) -> Vec<String> {
        let mut out = Vec::new();
        match event {
            Event::Start { id, input } => {
                self.id.clone_from(id);
                if let Some(input) = input {
                    self.usage.input = *input;
                }
                out.push(
                    self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)
                        .to_string(),
                );
            }
            Event::ToolCallStart { call, id, name } => {
                let delta = json!({"tool_calls": [{"index": call, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]});
                out.push(self.chunk(delta, Value::Null).to_string());
            }
            Event::Text(text) => out.push(
                self.chunk(json!({"content": text}), Value::Null)
                    .to_string(),
            ),
            Event::ToolCallArguments { call, json } => {
                let delta =
                    json!({"tool_calls": [{"index": call, "function": {"arguments": json}}]});
                out.push(self.chunk(delta, Value::Null).to_string());
            }
            Event::Finish(finish) => self.finish = *finish,
            Event::Usage(usage) => self.usage = *usage,
            Event::Done => {
                let finish = finish_reason(Some(self.finish.unwrap_or(Finish::Stop)));
                out.push(self.chunk(json!({}), finish).to_string());
                if self.include_usage {
                    let mut u = self.chunk(json!({}), Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = json!({
                        "prompt_tokens": self.usage.input,
                        "completion_tokens": self.usage.output,
                        "total_tokens": self.usage.total(),
                    });
                    out.push(u.to_string());
                }
                out.push("[DONE]".to_owned());
            }
            Event::Error(e) => {
                out.push(json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": "upstream_stream_error"}}).to_string());
            }
        }
        out
    }
}
