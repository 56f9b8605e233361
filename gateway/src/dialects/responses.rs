//! OpenAI's Responses API (`/v1/responses`) to and from the canonical model.
//!
//! Requests: `input` (a string, or items: messages with text and image parts,
//! `function_call` and `function_call_output` items), `instructions`, function tools
//! (flat, not nested under `function`), `tool_choice`, `text.format`,
//! `max_output_tokens`, sampling knobs and `user`. `reasoning` items and the `reasoning`,
//! `include`, `store`, `metadata`, `truncation` and `parallel_tool_calls` settings only
//! mean something to an upstream that speaks this API: they are dropped when the request
//! is translated. What a translated target cannot honour is refused with
//! [`Untranslatable`]: state kept upstream (`previous_response_id`, `item_reference`,
//! `conversation`), hosted tools (web search, file search, computer use…), files and
//! other item types.
//!
//! Answers and streams are rendered the way OpenAI writes them: a `response` object with
//! `message` and `function_call` output items, and typed SSE events with an increasing
//! `sequence_number`, ending with `response.completed` (or `response.incomplete`,
//! `response.failed`) and no `[DONE]`.

use serde_json::{Map, Value, json};

use crate::canonical::{
    Answer, ErrorBody, Event, Finish, Image, Message, OutputFormat, Part, Request, Role, Tool,
    ToolCall, ToolChoice, Untranslatable, Usage,
};

fn string(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn refuse<T>(why: impl Into<String>) -> Result<T, Untranslatable> {
    Err(Untranslatable(why.into()))
}

/// The text of a `function_call_output` or `instructions`-like value: a string, or the
/// text of its parts joined.
fn text_of(v: &Value) -> String {
    super::openai_chat::text_of(v)
}

/// One content part of an input message.
fn part(p: &Value) -> Result<Part, Untranslatable> {
    match p["type"].as_str() {
        Some("input_text" | "output_text" | "text") => Ok(Part::Text(string(&p["text"]))),
        Some("refusal") => Ok(Part::Text(string(&p["refusal"]))),
        Some("input_image") => {
            let Some(url) = p["image_url"].as_str() else {
                return refuse(
                    "input_image by file_id needs an upstream that speaks the Responses API",
                );
            };
            let Some(rest) = url.strip_prefix("data:") else {
                return Ok(Part::Image(Image::Url(url.to_owned())));
            };
            let (meta, data) = rest
                .split_once(',')
                .ok_or_else(|| Untranslatable("malformed data URL in input_image".into()))?;
            Ok(Part::Image(Image::Base64 {
                media_type: meta.trim_end_matches(";base64").to_owned(),
                data: data.to_owned(),
            }))
        }
        other => refuse(format!(
            "content part type {other:?} needs an upstream that speaks the Responses API"
        )),
    }
}

fn parts(content: &Value) -> Result<Vec<Part>, Untranslatable> {
    match content {
        Value::String(s) if s.is_empty() => Ok(Vec::new()),
        Value::String(s) => Ok(vec![Part::Text(s.clone())]),
        Value::Array(items) => items.iter().map(part).collect(),
        Value::Null => Ok(Vec::new()),
        _ => refuse("message content must be a string or an array of parts"),
    }
}

/// Appends `part` to the conversation as `role`, merging with the previous turn of the
/// same role (a message and its function calls are one assistant turn).
fn push(messages: &mut Vec<Message>, role: Role, part: Part) {
    match messages.last_mut() {
        Some(m) if m.role == role && role != Role::User => m.parts.push(part),
        _ => messages.push(Message {
            role,
            parts: vec![part],
        }),
    }
}

/// The system text and conversation of `input`.
fn conversation(input: &Value) -> Result<(Vec<String>, Vec<Message>), Untranslatable> {
    let mut system = Vec::new();
    let mut messages: Vec<Message> = Vec::new();
    let items = match input {
        Value::String(s) => {
            return Ok((
                system,
                vec![Message {
                    role: Role::User,
                    parts: vec![Part::Text(s.clone())],
                }],
            ));
        }
        Value::Array(items) => items,
        _ => return refuse("input must be a string or an array of items"),
    };
    for item in items {
        // A message may leave out `type`.
        let kind = item["type"]
            .as_str()
            .or_else(|| item.get("role").map(|_| "message"));
        match kind {
            Some("message") => match item["role"].as_str() {
                Some("system" | "developer") => system.push(text_of(&item["content"])),
                Some("user") => messages.push(Message {
                    role: Role::User,
                    parts: parts(&item["content"])?,
                }),
                Some("assistant") => {
                    for p in parts(&item["content"])? {
                        push(&mut messages, Role::Assistant, p);
                    }
                }
                other => return refuse(format!("unknown message role {other:?}")),
            },
            Some("function_call") => push(
                &mut messages,
                Role::Assistant,
                Part::ToolCall(ToolCall {
                    id: string(&item["call_id"]),
                    name: string(&item["name"]),
                    arguments: item["arguments"].as_str().unwrap_or("{}").to_owned(),
                }),
            ),
            Some("function_call_output") => push(
                &mut messages,
                Role::Tool,
                Part::ToolResult {
                    call_id: string(&item["call_id"]),
                    content: text_of(&item["output"]),
                },
            ),
            // Reasoning is the upstream model's own; another model cannot take it back.
            Some("reasoning") => {}
            Some("item_reference") => {
                return refuse(
                    "item_reference needs the upstream that stored the item: route this model to a Provider that speaks the Responses API",
                );
            }
            other => {
                return refuse(format!(
                    "input item type {other:?} needs an upstream that speaks the Responses API"
                ));
            }
        }
    }
    Ok((system, messages))
}

/// The function tools of a `tools` list, those grouped in a `namespace` included. Tools
/// OpenAI hosts (web search, file search, computer use, code interpreter, MCP…) are
/// offers only the upstream that hosts them can take up: a translated request goes
/// without them, and the model answers with what it has (a `tool_choice` that requires
/// one is refused instead).
fn function_tools(tools: &[Value], out: &mut Vec<Tool>) {
    for t in tools {
        match t["type"].as_str() {
            Some("function") => out.push(Tool {
                name: string(&t["name"]),
                description: t["description"].as_str().map(str::to_owned),
                parameters: t.get("parameters").filter(|p| !p.is_null()).cloned(),
            }),
            Some("namespace") => {
                if let Some(inner) = t["tools"].as_array() {
                    function_tools(inner, out);
                }
            }
            _ => {}
        }
    }
}

fn number(v: &Value) -> Option<serde_json::Number> {
    v.as_number().cloned()
}

/// A Responses request in the canonical model.
pub fn parse_request(req: &Value) -> Result<Request, Untranslatable> {
    for stateful in ["previous_response_id", "conversation"] {
        if req.get(stateful).is_some_and(|v| !v.is_null()) {
            return refuse(format!(
                "{stateful} needs the upstream that stored the conversation: route this model to a Provider that speaks the Responses API, or send the whole conversation in `input`"
            ));
        }
    }
    let (mut system, messages) = conversation(&req["input"])?;
    if let Some(instructions) = req["instructions"].as_str().filter(|i| !i.is_empty()) {
        system.insert(0, instructions.to_owned());
    }
    let tools = req["tools"].as_array().map(|tools| {
        let mut out = Vec::new();
        function_tools(tools, &mut out);
        out
    });
    let tool_choice = match &req["tool_choice"] {
        Value::String(s) if s == "auto" => Some(ToolChoice::Auto),
        Value::String(s) if s == "required" => Some(ToolChoice::Required),
        Value::String(s) if s == "none" => Some(ToolChoice::None),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            Some(ToolChoice::Tool(string(&req["tool_choice"]["name"])))
        }
        Value::Null => None,
        other => {
            return refuse(format!(
                "tool_choice {other} names a tool hosted by OpenAI: route this model to a Provider that speaks the Responses API"
            ));
        }
    };
    let format = &req["text"]["format"];
    let output = match format["type"].as_str() {
        Some("text") => Some(OutputFormat::Text),
        Some("json_object") => Some(OutputFormat::JsonObject),
        Some("json_schema") => Some(OutputFormat::JsonSchema {
            name: string(&format["name"]),
            schema: format["schema"].clone(),
            strict: format["strict"].as_bool().unwrap_or(false),
        }),
        _ => None,
    };
    Ok(Request {
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        messages,
        max_tokens: req["max_output_tokens"].as_u64(),
        temperature: number(&req["temperature"]),
        top_p: number(&req["top_p"]),
        stop: Vec::new(),
        stream: req["stream"].as_bool(),
        tools,
        tool_choice,
        output,
        user: req["user"]
            .as_str()
            .or_else(|| req["safety_identifier"].as_str())
            .map(str::to_owned),
    })
}

fn input_part(part: &Part, role: Role) -> Option<Value> {
    match part {
        Part::Text(text) if role == Role::Assistant => {
            Some(json!({"type": "output_text", "text": text, "annotations": []}))
        }
        Part::Text(text) => Some(json!({"type": "input_text", "text": text})),
        Part::Image(Image::Url(url)) => {
            Some(json!({"type": "input_image", "image_url": url, "detail": "auto"}))
        }
        Part::Image(Image::Base64 { media_type, data }) => Some(
            json!({"type": "input_image", "image_url": format!("data:{media_type};base64,{data}"), "detail": "auto"}),
        ),
        _ => None,
    }
}

/// A canonical request as a Responses request for `model` (nothing stored upstream).
pub fn render_request(req: &Request, model: &str) -> Value {
    let mut input = Vec::new();
    for m in &req.messages {
        let content: Vec<Value> = m
            .parts
            .iter()
            .filter_map(|p| input_part(p, m.role))
            .collect();
        if !content.is_empty() {
            let role = if m.role == Role::Assistant {
                "assistant"
            } else {
                "user"
            };
            input.push(json!({"type": "message", "role": role, "content": content}));
        }
        for p in &m.parts {
            match p {
                Part::ToolCall(call) => input.push(json!({"type": "function_call", "call_id": call.id, "name": call.name, "arguments": call.arguments})),
                Part::ToolResult { call_id, content } => input.push(json!({"type": "function_call_output", "call_id": call_id, "output": content})),
                _ => {}
            }
        }
    }
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    out.insert("input".into(), Value::Array(input));
    out.insert("store".into(), json!(false));
    if let Some(system) = &req.system {
        out.insert("instructions".into(), json!(system));
    }
    if let Some(n) = req.max_tokens {
        out.insert("max_output_tokens".into(), json!(n));
    }
    if let Some(t) = &req.temperature {
        out.insert("temperature".into(), Value::Number(t.clone()));
    }
    if let Some(p) = &req.top_p {
        out.insert("top_p".into(), Value::Number(p.clone()));
    }
    if req.stream == Some(true) {
        out.insert("stream".into(), json!(true));
    }
    if let Some(tools) = &req.tools {
        out.insert(
            "tools".into(),
            Value::Array(tools.iter().map(render_tool).collect()),
        );
    }
    if let Some(choice) = &req.tool_choice {
        out.insert("tool_choice".into(), render_tool_choice(choice));
    }
    if let Some(format) = &req.output {
        out.insert("text".into(), json!({"format": render_format(format)}));
    }
    if let Some(user) = &req.user {
        out.insert("user".into(), json!(user));
    }
    Value::Object(out)
}

fn render_tool(t: &Tool) -> Value {
    json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters, "strict": false})
}

fn render_tool_choice(choice: &ToolChoice) -> Value {
    match choice {
        ToolChoice::Auto => json!("auto"),
        ToolChoice::Required => json!("required"),
        ToolChoice::None => json!("none"),
        ToolChoice::Tool(name) => json!({"type": "function", "name": name}),
    }
}

fn render_format(format: &OutputFormat) -> Value {
    match format {
        OutputFormat::Text => json!({"type": "text"}),
        OutputFormat::JsonObject => json!({"type": "json_object"}),
        OutputFormat::JsonSchema {
            name,
            schema,
            strict,
        } => json!({"type": "json_schema", "name": name, "schema": schema, "strict": strict}),
    }
}

/// The `usage` object of a response.
fn parse_usage(u: &Value) -> Usage {
    Usage {
        input: u["input_tokens"].as_u64().unwrap_or(0),
        output: u["output_tokens"].as_u64().unwrap_or(0),
        cached_input: u["input_tokens_details"]["cached_tokens"].as_u64(),
        cache_write: None,
        reasoning: u["output_tokens_details"]["reasoning_tokens"].as_u64(),
    }
}

fn render_usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input,
        "input_tokens_details": {"cached_tokens": u.cached_input.unwrap_or(0)},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": u.reasoning.unwrap_or(0)},
        "total_tokens": u.total(),
    })
}

/// A response object in the canonical model.
pub fn parse_answer(resp: &Value) -> Answer {
    let mut parts = Vec::new();
    for item in resp["output"].as_array().into_iter().flatten() {
        match item["type"].as_str() {
            Some("message") => {
                for c in item["content"].as_array().into_iter().flatten() {
                    match c["type"].as_str() {
                        Some("output_text") => parts.push(Part::Text(string(&c["text"]))),
                        Some("refusal") => parts.push(Part::Text(string(&c["refusal"]))),
                        _ => {}
                    }
                }
            }
            Some("function_call") => parts.push(Part::ToolCall(ToolCall {
                id: string(&item["call_id"]),
                name: string(&item["name"]),
                arguments: item["arguments"].as_str().unwrap_or("{}").to_owned(),
            })),
            Some("reasoning") => {
                let summary: Vec<&str> = item["summary"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["text"].as_str())
                    .collect();
                if !summary.is_empty() {
                    parts.push(Part::Reasoning(summary.join("\n")));
                }
            }
            _ => {}
        }
    }
    let finish = match resp["status"].as_str() {
        Some("incomplete") if resp["incomplete_details"]["reason"] == "content_filter" => {
            Some(Finish::ContentFilter)
        }
        Some("incomplete") => Some(Finish::Length),
        Some("completed") if parts.iter().any(|p| matches!(p, Part::ToolCall(_))) => {
            Some(Finish::ToolCalls)
        }
        Some("completed") => Some(Finish::Stop),
        _ => None,
    };
    Answer {
        id: string(&resp["id"]),
        parts,
        finish,
        usage: parse_usage(&resp["usage"]),
    }
}

/// Ids of the items of one answer, derived from the answer's own id so they are stable.
fn item_id(prefix: &str, answer_id: &str, index: usize) -> String {
    let base: String = answer_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    format!("{prefix}_{base}{index}")
}

/// The response id for an upstream answer id (`resp_` is what clients expect).
fn response_id(answer_id: &str) -> String {
    if answer_id.starts_with("resp_") {
        answer_id.to_owned()
    } else {
        let base: String = answer_id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        format!("resp_{base}")
    }
}

/// What the client asked for, echoed in every response object the way OpenAI does.
#[derive(Debug, Clone, Default)]
pub struct Echo {
    /// The model name the client asked for.
    pub model: String,
    /// `instructions`, `tools`, `tool_choice`, `text`, `temperature`, `top_p`,
    /// `max_output_tokens`, `metadata`, `parallel_tool_calls`, `user` as sent.
    pub fields: Map<String, Value>,
}

impl Echo {
    /// The echo of a request body for `model`.
    pub fn of(req: &Value, model: &str) -> Self {
        let mut fields = Map::new();
        for key in [
            "instructions",
            "tools",
            "tool_choice",
            "text",
            "temperature",
            "top_p",
            "max_output_tokens",
            "metadata",
            "parallel_tool_calls",
            "user",
            "reasoning",
        ] {
            if let Some(v) = req.get(key).filter(|v| !v.is_null()) {
                fields.insert(key.into(), v.clone());
            }
        }
        Self {
            model: model.to_owned(),
            fields,
        }
    }

    /// A response object: its id, status and output so far, and the echoed request.
    fn response(&self, id: &str, created: i64, status: &str, output: Vec<Value>) -> Value {
        let get = |key: &str, default: Value| self.fields.get(key).cloned().unwrap_or(default);
        json!({
            "id": id,
            "object": "response",
            "created_at": created,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": null,
            "instructions": get("instructions", Value::Null),
            "max_output_tokens": get("max_output_tokens", Value::Null),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": get("parallel_tool_calls", json!(true)),
            "previous_response_id": null,
            "reasoning": get("reasoning", json!({"effort": null, "summary": null})),
            "service_tier": "default",
            "store": false,
            "temperature": get("temperature", json!(1.0)),
            "text": get("text", json!({"format": {"type": "text"}})),
            "tool_choice": get("tool_choice", json!("auto")),
            "tools": get("tools", json!([])),
            "top_p": get("top_p", json!(1.0)),
            "truncation": "disabled",
            "usage": null,
            "user": get("user", Value::Null),
            "metadata": get("metadata", json!({})),
        })
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    })
}

fn call_item(id: &str, call: &ToolCall, status: &str) -> Value {
    json!({
        "id": id,
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    })
}

/// Sets a finished response's status (`completed`, or `incomplete` with its reason) and
/// usage.
fn conclude(response: &mut Value, finish: Option<Finish>, usage: &Usage) {
    match finish {
        Some(Finish::Length) => {
            response["status"] = json!("incomplete");
            response["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        Some(Finish::ContentFilter) => {
            response["status"] = json!("incomplete");
            response["incomplete_details"] = json!({"reason": "content_filter"});
        }
        _ => response["status"] = json!("completed"),
    }
    response["usage"] = render_usage(usage);
}

/// A canonical answer as a response object.
pub fn render_answer(answer: &Answer, echo: &Echo, created: i64) -> Value {
    let id = response_id(&answer.id);
    let mut output = Vec::new();
    let mut text = String::new();
    let mut calls = Vec::new();
    for part in &answer.parts {
        match part {
            Part::Text(t) => text.push_str(t),
            Part::ToolCall(call) => calls.push(call),
            _ => {}
        }
    }
    if !text.is_empty() || calls.is_empty() {
        output.push(message_item(&item_id("msg", &id, 0), &text, "completed"));
    }
    for (i, call) in calls.into_iter().enumerate() {
        output.push(call_item(&item_id("fc", &id, i + 1), call, "completed"));
    }
    let mut response = echo.response(&id, created, "completed", output);
    conclude(&mut response, answer.finish, &answer.usage);
    response
}

/// A canonical error as a Responses error body (OpenAI's error shape).
pub fn render_error(error: &ErrorBody) -> Value {
    super::openai_chat::render_error(error)
}

/// Usage in a `response.completed` (or `incomplete`, `failed`) event, for accounting a
/// passed-through stream.
pub fn stream_usage(data: &Value) -> Option<Usage> {
    data["response"]["usage"]
        .is_object()
        .then(|| parse_usage(&data["response"]["usage"]))
}

/// One output item being streamed.
#[derive(Debug)]
enum Open {
    Message { id: String, text: String },
    Call { id: String, call: ToolCall },
}

/// Writes canonical events as a Responses stream: `(event name, data)` pairs in protocol
/// order (`response.created` and `response.in_progress` first, each output item added,
/// filled and done in turn, one terminal `response.completed` / `response.incomplete` /
/// `response.failed` last), each with its `sequence_number`.
#[derive(Debug)]
pub struct StreamEncoder {
    echo: Echo,
    created: i64,
    id: Option<String>,
    sequence: u64,
    open: Option<(usize, Open)>,
    /// Finished items, in output order.
    done: Vec<Value>,
    /// Canonical call number → output index.
    calls: std::collections::HashMap<usize, usize>,
    finish: Option<Finish>,
    usage: Usage,
    finished: bool,
}

impl StreamEncoder {
    /// An encoder for one stream, echoing the client's request.
    pub fn new(echo: Echo, created: i64) -> Self {
        Self {
            echo,
            created,
            id: None,
            sequence: 0,
            open: None,
            done: Vec::new(),
            calls: Default::default(),
            finish: None,
            usage: Usage::default(),
            finished: false,
        }
    }

    fn emit(&mut self, out: &mut Vec<(String, Value)>, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        out.push((kind.to_owned(), data));
    }

    fn response_id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| "resp_tollgate".to_owned())
    }

    fn start(&mut self, id: &str, out: &mut Vec<(String, Value)>) {
        if self.id.is_some() {
            return;
        }
        let id = response_id(if id.is_empty() { "tollgate" } else { id });
        self.id = Some(id.clone());
        let response = self
            .echo
            .response(&id, self.created, "in_progress", Vec::new());
        self.emit(out, "response.created", json!({"response": response}));
        let response = self
            .echo
            .response(&id, self.created, "in_progress", Vec::new());
        self.emit(out, "response.in_progress", json!({"response": response}));
    }

    fn next_index(&self) -> usize {
        self.done.len() + usize::from(self.open.is_some())
    }

    fn close(&mut self, out: &mut Vec<(String, Value)>) {
        let Some((index, open)) = self.open.take() else {
            return;
        };
        let item = match open {
            Open::Message { id, text } => {
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                self.emit(out, "response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                );
                message_item(&id, &text, "completed")
            }
            Open::Call { id, call } => {
                self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": call.arguments}),
                );
                call_item(&id, &call, "completed")
            }
        };
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.done.push(item);
    }

    /// The `(event, data)` pairs for one canonical event.
    pub fn on_event(&mut self, event: &Event) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        match event {
            Event::Start { id, input } => {
                if let Some(input) = input {
                    self.usage.input = *input;
                }
                self.start(id, &mut out);
            }
            Event::Text(text) => {
                self.start("", &mut out);
                if !matches!(self.open, Some((_, Open::Message { .. }))) {
                    self.close(&mut out);
                    let index = self.next_index();
                    let id = item_id("msg", &self.response_id(), index);
                    let item = json!({"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []});
                    self.emit(
                        &mut out,
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                    );
                    self.emit(&mut out, "response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}));
                    self.open = Some((
                        index,
                        Open::Message {
                            id,
                            text: String::new(),
                        },
                    ));
                }
                if let Some((index, Open::Message { id, text: all })) = &mut self.open {
                    all.push_str(text);
                    let data = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []});
                    self.emit(&mut out, "response.output_text.delta", data);
                }
            }
            Event::ToolCallStart { call, id, name } => {
                self.start("", &mut out);
                self.close(&mut out);
                let index = self.next_index();
                self.calls.insert(*call, index);
                let item_id = item_id("fc", &self.response_id(), index);
                let call = ToolCall {
                    id: id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                };
                let item = call_item(&item_id, &call, "in_progress");
                self.emit(
                    &mut out,
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                self.open = Some((index, Open::Call { id: item_id, call }));
            }
            // Arguments go to the open call: calls arrive one after the other.
            Event::ToolCallArguments { json, .. } => {
                if let Some((index, Open::Call { id, call })) = &mut self.open {
                    call.arguments.push_str(json);
                    let data = json!({"item_id": id, "output_index": index, "delta": json});
                    self.emit(&mut out, "response.function_call_arguments.delta", data);
                }
            }
            Event::Finish(finish) => self.finish = *finish,
            Event::Usage(usage) => self.usage = *usage,
            Event::Error(e) => {
                self.finished = true;
                self.start("", &mut out);
                let mut response = self.echo.response(
                    &self.response_id(),
                    self.created,
                    "failed",
                    self.done.clone(),
                );
                response["error"] = json!({"code": e.kind.clone().unwrap_or_else(|| "server_error".to_owned()), "message": e.message});
                self.emit(&mut out, "response.failed", json!({"response": response}));
            }
            Event::Done => {
                self.finished = true;
                self.start("", &mut out);
                self.close(&mut out);
                let mut response = self.echo.response(
                    &self.response_id(),
                    self.created,
                    "completed",
                    self.done.clone(),
                );
                conclude(&mut response, self.finish, &self.usage);
                let kind = if response["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                self.emit(&mut out, kind, json!({"response": response}));
            }
        }
        out
    }
}

/// Reads a Responses stream (typed events) as canonical events, for a Responses upstream
/// serving a client of another dialect.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    /// Output index → canonical call number.
    calls: std::collections::HashMap<u64, usize>,
}

impl StreamDecoder {
    /// The events of one Responses event.
    pub fn on_event(&mut self, data: &Value) -> Vec<Event> {
        match data["type"].as_str() {
            Some("response.created") => vec![Event::Start {
                id: string(&data["response"]["id"]),
                input: None,
            }],
            Some("response.output_text.delta") => vec![Event::Text(string(&data["delta"]))],
            Some("response.output_item.added") if data["item"]["type"] == "function_call" => {
                let call = self.calls.len();
                self.calls
                    .insert(data["output_index"].as_u64().unwrap_or(0), call);
                vec![Event::ToolCallStart {
                    call,
                    id: string(&data["item"]["call_id"]),
                    name: string(&data["item"]["name"]),
                }]
            }
            Some("response.function_call_arguments.delta") => {
                let index = data["output_index"].as_u64().unwrap_or(0);
                vec![Event::ToolCallArguments {
                    call: self.calls.get(&index).copied().unwrap_or(0),
                    json: string(&data["delta"]),
                }]
            }
            Some("response.completed" | "response.incomplete") => {
                let answer = parse_answer(&data["response"]);
                vec![
                    Event::Finish(answer.finish),
                    Event::Usage(answer.usage),
                    Event::Done,
                ]
            }
            Some("response.failed") => vec![Event::Error(ErrorBody {
                kind: data["response"]["error"]["code"]
                    .as_str()
                    .map(str::to_owned),
                message: string(&data["response"]["error"]["message"]),
            })],
            Some("error") => vec![Event::Error(ErrorBody {
                kind: data["code"].as_str().map(str::to_owned),
                message: string(&data["message"]),
            })],
            _ => Vec::new(),
        }
    }
}
