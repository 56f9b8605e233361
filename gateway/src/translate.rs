//! Translation between OpenAI chat completions and Anthropic messages, both directions:
//! requests, complete responses, streamed events and error bodies. Pure functions and
//! small state machines, tested without sockets.

use serde_json::{Map, Value, json};

/// `max_tokens` sent to Anthropic when an OpenAI request has none (Anthropic requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// A request that cannot be translated.
#[derive(Debug, PartialEq, Eq)]
pub struct Untranslatable(pub String);

fn text_of(content: &Value) -> String {
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

// === OpenAI → Anthropic ===

/// An OpenAI content part as an Anthropic content block.
fn openai_part_to_block(part: &Value) -> Result<Value, Untranslatable> {
    match part["type"].as_str() {
        Some("text") => {
            Ok(json!({"type": "text", "text": part["text"].as_str().unwrap_or_default()}))
        }
        Some("image_url") => {
            let url = part["image_url"]["url"]
                .as_str()
                .or_else(|| part["image_url"].as_str())
                .unwrap_or_default();
            if let Some(rest) = url.strip_prefix("data:") {
                let (meta, data) = rest
                    .split_once(',')
                    .ok_or_else(|| Untranslatable("malformed data URL in image_url".into()))?;
                let media_type = meta.trim_end_matches(";base64");
                Ok(
                    json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
                )
            } else {
                Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
            }
        }
        other => Err(Untranslatable(format!(
            "content part type {other:?} cannot be sent to an Anthropic model"
        ))),
    }
}

fn openai_content_to_blocks(content: &Value) -> Result<Vec<Value>, Untranslatable> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => parts.iter().map(openai_part_to_block).collect(),
        _ => Err(Untranslatable(
            "message content must be a string or an array of parts".into(),
        )),
    }
}

/// Appends blocks as a turn of `role`, merging with the previous turn of the same role
/// (Anthropic requires alternating user and assistant turns).
fn push_turn(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if blocks.is_empty() {
        return;
    }
    if let Some(last) = messages.last_mut()
        && last["role"] == role
        && let Some(existing) = last["content"].as_array_mut()
    {
        existing.extend(blocks);
        return;
    }
    messages.push(json!({"role": role, "content": blocks}));
}

/// An OpenAI chat completion request as an Anthropic messages request.
pub fn openai_to_anthropic_request(
    req: &Value,
    upstream_model: &str,
) -> Result<Value, Untranslatable> {
    if req["n"].as_u64().is_some_and(|n| n > 1) {
        return Err(Untranslatable(
            "n > 1 is not supported by Anthropic models".into(),
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
            Some("user") => push_turn(
                &mut messages,
                "user",
                openai_content_to_blocks(&m["content"])?,
            ),
            Some("assistant") => {
                let mut blocks = openai_content_to_blocks(&m["content"])?;
                for call in m["tool_calls"].as_array().into_iter().flatten() {
                    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
                    let input: Value =
                        serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "input": input,
                    }));
                }
                push_turn(&mut messages, "assistant", blocks);
            }
            Some("tool") => push_turn(
                &mut messages,
                "user",
                vec![
                    json!({"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": text_of(&m["content"])}),
                ],
            ),
            other => return Err(Untranslatable(format!("unknown message role {other:?}"))),
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(upstream_model));
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), json!(system.join("\n\n")));
    }
    let max_tokens = req["max_completion_tokens"]
        .as_u64()
        .or_else(|| req["max_tokens"].as_u64())
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    for field in ["temperature", "top_p", "stream"] {
        if !req[field].is_null() {
            out.insert(field.into(), req[field].clone());
        }
    }
    match &req["stop"] {
        Value::String(s) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Value::Array(a) if !a.is_empty() => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(tools) = req["tools"].as_array() {
        let tools: Vec<Value> = tools
            .iter()
            .filter(|t| t["type"] == "function")
            .map(|t| {
                let f = &t["function"];
                let mut tool = json!({"name": f["name"], "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))});
                if let Some(d) = f.get("description") {
                    tool["description"] = d.clone();
                }
                tool
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    match &req["tool_choice"] {
        Value::String(s) if s == "auto" => {
            out.insert("tool_choice".into(), json!({"type": "auto"}));
        }
        Value::String(s) if s == "required" => {
            out.insert("tool_choice".into(), json!({"type": "any"}));
        }
        Value::String(s) if s == "none" => {
            out.insert("tool_choice".into(), json!({"type": "none"}));
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            // `Map` indexing panics on a missing key; `Value` indexing gives null.
            let name = o.get("function").map_or(&Value::Null, |f| &f["name"]);
            out.insert("tool_choice".into(), json!({"type": "tool", "name": name}));
        }
        _ => {}
    }
    if let Some(user) = req["user"].as_str() {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    Ok(Value::Object(out))
}

fn finish_reason_from_anthropic(stop_reason: &Value) -> Value {
    match stop_reason.as_str() {
        Some("max_tokens") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some("refusal") => json!("content_filter"),
        Some(_) => json!("stop"),
        None => Value::Null,
    }
}

/// Anthropic counts cached input apart; OpenAI's `prompt_tokens` includes it. Saturating:
/// the numbers come from the upstream.
fn anthropic_input_tokens(usage: &Value) -> u64 {
    [
        "input_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    ]
    .iter()
    .fold(0u64, |sum, field| {
        sum.saturating_add(usage[field].as_u64().unwrap_or(0))
    })
}

fn openai_usage_from_anthropic(usage: &Value) -> Value {
    let input = anthropic_input_tokens(usage);
    let output = usage["output_tokens"].as_u64().unwrap_or(0);
    let mut u = json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input.saturating_add(output)});
    if let Some(cached) = usage["cache_read_input_tokens"].as_u64() {
        u["prompt_tokens_details"] = json!({"cached_tokens": cached});
    }
    u
}

/// An Anthropic message as an OpenAI chat completion (`model` is the name the client used).
pub fn anthropic_to_openai_response(msg: &Value, model: &str, created: i64) -> Value {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in msg["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => tool_calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) }, "refusal": null});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    json!({
        "id": msg["id"],
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason_from_anthropic(&msg["stop_reason"])}],
        "usage": openai_usage_from_anthropic(&msg["usage"]),
    })
}

/// Turns Anthropic stream events into OpenAI chat completion chunks.
#[derive(Debug)]
pub struct AnthropicToOpenAiStream {
    id: String,
    model: String,
    created: i64,
    include_usage: bool,
    input_tokens: u64,
    output_tokens: u64,
    /// Content block index → OpenAI tool call index.
    tool_index: std::collections::HashMap<u64, usize>,
    finish: Value,
}

impl AnthropicToOpenAiStream {
    /// A translator for one stream.
    pub fn new(model: &str, created: i64, include_usage: bool) -> Self {
        Self {
            id: String::new(),
            model: model.to_owned(),
            created,
            include_usage,
            input_tokens: 0,
            output_tokens: 0,
            tool_index: Default::default(),
            finish: Value::Null,
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

    /// Usage reported so far (once `message_delta` has carried the output count).
    pub fn usage(&self) -> Option<crate::accounting::Usage> {
        (!self.finish.is_null()).then_some(crate::accounting::Usage {
            prompt: self.input_tokens,
            completion: self.output_tokens,
        })
    }

    /// The OpenAI `data:` payloads for one Anthropic event (`[DONE]` included at the end).
    pub fn on_event(&mut self, event: &str, data: &Value) -> Vec<String> {
        let mut out = Vec::new();
        match event {
            "message_start" => {
                self.id = data["message"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                self.input_tokens = anthropic_input_tokens(&data["message"]["usage"]);
                out.push(
                    self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)
                        .to_string(),
                );
            }
            "content_block_start" if data["content_block"]["type"] == "tool_use" => {
                let index = self.tool_index.len();
                self.tool_index
                    .insert(data["index"].as_u64().unwrap_or(0), index);
                let block = &data["content_block"];
                let delta = json!({"tool_calls": [{"index": index, "id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": ""}}]});
                out.push(self.chunk(delta, Value::Null).to_string());
            }
            "content_block_delta" => {
                let delta = &data["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => out.push(
                        self.chunk(json!({"content": delta["text"]}), Value::Null)
                            .to_string(),
                    ),
                    Some("input_json_delta") => {
                        let index = self
                            .tool_index
                            .get(&data["index"].as_u64().unwrap_or(0))
                            .copied()
                            .unwrap_or(0);
                        let d = json!({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]});
                        out.push(self.chunk(d, Value::Null).to_string());
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                self.finish = finish_reason_from_anthropic(&data["delta"]["stop_reason"]);
                if let Some(o) = data["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = o;
                }
            }
            "message_stop" => {
                let finish = if self.finish.is_null() {
                    json!("stop")
                } else {
                    self.finish.clone()
                };
                out.push(self.chunk(json!({}), finish).to_string());
                if self.include_usage {
                    let mut u = self.chunk(json!({}), Value::Null);
                    u["choices"] = json!([]);
                    u["usage"] = json!({
                        "prompt_tokens": self.input_tokens,
                        "completion_tokens": self.output_tokens,
                        "total_tokens": self.input_tokens.saturating_add(self.output_tokens),
                    });
                    out.push(u.to_string());
                }
                out.push("[DONE]".to_owned());
            }
            "error" => {
                let e = &data["error"];
                out.push(json!({"error": {"message": e["message"], "type": e["type"], "param": null, "code": "upstream_stream_error"}}).to_string());
            }
            _ => {}
        }
        out
    }
}

// === Anthropic → OpenAI ===

fn anthropic_blocks(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(blocks) => blocks.clone(),
        _ => Vec::new(),
    }
}

/// An Anthropic messages request as an OpenAI chat completion request.
pub fn anthropic_to_openai_request(
    req: &Value,
    upstream_model: &str,
) -> Result<Value, Untranslatable> {
    let mut messages = Vec::new();
    if !req["system"].is_null() {
        messages.push(json!({"role": "system", "content": text_of(&req["system"])}));
    }
    for m in req["messages"]
        .as_array()
        .ok_or_else(|| Untranslatable("messages must be an array".into()))?
    {
        let role = m["role"].as_str().unwrap_or("user");
        let mut parts = Vec::new();
        let mut tool_calls = Vec::new();
        for block in anthropic_blocks(&m["content"]) {
            match block["type"].as_str() {
                Some("text") => parts.push(json!({"type": "text", "text": block["text"]})),
                Some("image") => {
                    let source = &block["source"];
                    let url = if source["type"] == "base64" {
                        format!(
                            "data:{};base64,{}",
                            source["media_type"].as_str().unwrap_or_default(),
                            source["data"].as_str().unwrap_or_default()
                        )
                    } else {
                        source["url"].as_str().unwrap_or_default().to_owned()
                    };
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                Some("tool_use") => tool_calls.push(json!({
                    "id": block["id"],
                    "type": "function",
                    "function": {"name": block["name"], "arguments": block["input"].to_string()},
                })),
                Some("tool_result") => messages.push(json!({
                    "role": "tool",
                    "tool_call_id": block["tool_use_id"],
                    "content": text_of(&block["content"]),
                })),
                other => {
                    return Err(Untranslatable(format!(
                        "content block type {other:?} cannot be sent to an OpenAI-style model"
                    )));
                }
            }
        }
        if parts.is_empty() && tool_calls.is_empty() {
            continue;
        }
        let content = if parts.iter().all(|p| p["type"] == "text") {
            json!(
                parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("")
            )
        } else {
            Value::Array(parts)
        };
        let mut message = json!({"role": role, "content": content});
        if !tool_calls.is_empty() {
            message["tool_calls"] = Value::Array(tool_calls);
        }
        messages.push(message);
    }
    let mut out = json!({"model": upstream_model, "messages": messages});
    if let Some(n) = req["max_tokens"].as_u64() {
        out["max_tokens"] = json!(n);
    }
    for field in ["temperature", "top_p"] {
        if !req[field].is_null() {
            out[field] = req[field].clone();
        }
    }
    if let Some(stops) = req["stop_sequences"].as_array() {
        out["stop"] = Value::Array(stops.clone());
    }
    if req["stream"].as_bool() == Some(true) {
        out["stream"] = json!(true);
        // Needed to report usage in `message_delta`.
        out["stream_options"] = json!({"include_usage": true});
    }
    if let Some(tools) = req["tools"].as_array() {
        out["tools"] = Value::Array(
            tools
                .iter()
                .map(|t| json!({"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}))
                .collect(),
        );
    }
    match req["tool_choice"]["type"].as_str() {
        Some("auto") => out["tool_choice"] = json!("auto"),
        Some("any") => out["tool_choice"] = json!("required"),
        Some("none") => out["tool_choice"] = json!("none"),
        Some("tool") => {
            out["tool_choice"] =
                json!({"type": "function", "function": {"name": req["tool_choice"]["name"]}})
        }
        _ => {}
    }
    Ok(out)
}

fn stop_reason_from_openai(finish: &Value) -> Value {
    match finish.as_str() {
        Some("length") => json!("max_tokens"),
        Some("tool_calls" | "function_call") => json!("tool_use"),
        Some("content_filter") => json!("refusal"),
        Some(_) => json!("end_turn"),
        None => Value::Null,
    }
}

/// An OpenAI chat completion as an Anthropic message (`model` is the name the client used).
pub fn openai_to_anthropic_response(resp: &Value, model: &str) -> Value {
    let choice = &resp["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message["tool_calls"].as_array().into_iter().flatten() {
        let input: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or("{}"))
                .unwrap_or_else(|_| json!({}));
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input}));
    }
    json!({
        "id": resp["id"],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason_from_openai(&choice["finish_reason"]),
        "stop_sequence": null,
        "usage": {
            "input_tokens": resp["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            "output_tokens": resp["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        },
    })
}

/// Turns OpenAI chat completion chunks into Anthropic stream events.
#[derive(Debug)]
pub struct OpenAiToAnthropicStream {
    model: String,
    started: bool,
    /// Index of the open content block, and whether it is text.
    open_block: Option<(usize, bool)>,
    next_block: usize,
    stop_reason: Value,
    input_tokens: u64,
    output_tokens: u64,
    finished: bool,
}

impl OpenAiToAnthropicStream {
    /// A translator for one stream.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            started: false,
            open_block: None,
            next_block: 0,
            stop_reason: Value::Null,
            input_tokens: 0,
            output_tokens: 0,
            finished: false,
        }
    }

    fn start(&mut self, id: &Value, out: &mut Vec<(String, Value)>) {
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

    /// Usage reported so far (once the upstream's usage chunk has arrived).
    pub fn usage(&self) -> Option<crate::accounting::Usage> {
        (self.output_tokens > 0 || self.input_tokens > 0).then_some(crate::accounting::Usage {
            prompt: self.input_tokens,
            completion: self.output_tokens,
        })
    }

    /// Anthropic `(event, data)` pairs for one OpenAI `data:` payload.
    pub fn on_data(&mut self, data: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if data.trim() == "[DONE]" {
            self.finish(&mut out);
            return out;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return out;
        };
        if let Some(e) = chunk.get("error") {
            out.push((
                "error".into(),
                json!({"type": "error", "error": {"type": "api_error", "message": e["message"]}}),
            ));
            return out;
        }
        self.start(&chunk["id"], &mut out);
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.input_tokens = u["prompt_tokens"].as_u64().unwrap_or(self.input_tokens);
            self.output_tokens = u["completion_tokens"]
                .as_u64()
                .unwrap_or(self.output_tokens);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if !matches!(self.open_block, Some((_, true))) {
                self.close_block(&mut out);
                let index = self.next_block;
                self.next_block += 1;
                self.open_block = Some((index, true));
                out.push(("content_block_start".into(), json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
            }
            let index = self.open_block.map_or(0, |(i, _)| i);
            out.push(("content_block_delta".into(), json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}})));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            if call.get("id").is_some_and(|id| !id.is_null()) {
                self.close_block(&mut out);
                let index = self.next_block;
                self.next_block += 1;
                self.open_block = Some((index, false));
                out.push(("content_block_start".into(), json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": {}}})));
            }
            if let Some(args) = call["function"]["arguments"]
                .as_str()
                .filter(|a| !a.is_empty())
            {
                let index = self.open_block.map_or(0, |(i, _)| i);
                out.push(("content_block_delta".into(), json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": args}})));
            }
        }
        if !choice["finish_reason"].is_null() {
            self.stop_reason = stop_reason_from_openai(&choice["finish_reason"]);
        }
        out
    }

    fn finish(&mut self, out: &mut Vec<(String, Value)>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.start(&json!("msg_tollgate"), out);
        self.close_block(out);
        let stop = if self.stop_reason.is_null() {
            json!("end_turn")
        } else {
            self.stop_reason.clone()
        };
        out.push((
            "message_delta".into(),
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
            }),
        ));
        out.push(("message_stop".into(), json!({"type": "message_stop"})));
    }
}

// === Errors ===

/// An OpenAI error body in Anthropic's shape.
pub fn openai_error_to_anthropic(body: &Value, status: u16) -> Value {
    let kind = match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    };
    let message = body["error"]["message"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_owned);
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// An Anthropic error body in OpenAI's shape.
pub fn anthropic_error_to_openai(body: &Value) -> Value {
    let e = &body["error"];
    json!({"error": {"message": e["message"], "type": e["type"], "param": null, "code": e["type"]}})
}

#[cfg(test)]
mod tests;
