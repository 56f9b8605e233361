//! Upstream LLM APIs emulated faithfully enough for the client software users run: the
//! official SDKs, agent frameworks and CLIs talk to the gateway, the gateway talks to
//! these. Each refuses what the real API refuses (a missing credential or version header,
//! an unknown parameter, a body field that needs a beta the request did not name, a
//! `previous_response_id` it never stored) with the real API's error shape, and answers
//! deterministically:
//!
//! - with a tool offered that the last user turn begins by asking for (`Use <name> …`), and no tool
//!   result since that turn, a call to that tool, with arguments made from its JSON Schema
//!   (agents that always offer tools, such as Codex and Claude Code, get plain answers to
//!   plain questions);
//! - after a tool result, a text that quotes it (`the tool said: …`);
//! - otherwise `emulated reply to: <the last user text>`, or JSON made from the schema
//!   when structured output was asked for.
//!
//! [`Flavor::OpenAi`] serves chat completions, the Responses API (whole and streamed,
//! stored responses, retrieve, delete, input items), embeddings, moderations, image
//! generations, text to speech and transcriptions ([`media`]); [`Flavor::ChatOnly`]
//! chat completions and embeddings only (404 for the rest, as such servers answer);
//! [`Flavor::Anthropic`] the Messages API (streamed and whole, `count_tokens`, prompt
//! caching usage).

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    response::Response,
};
use serde_json::{Map, Value, json};

use crate::upstream::Received;

pub mod media;

/// Which API is emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI: chat completions, Responses, embeddings.
    OpenAi,
    /// An OpenAI-compatible server without the Responses API.
    ChatOnly,
    /// Anthropic's Messages API.
    Anthropic,
}

/// The credential every emulated API expects.
pub const API_KEY: &str = "sk-emulated-upstream-key";

/// The beta that `context_management` needs on the Messages API.
pub const CONTEXT_MANAGEMENT_BETA: &str = "context-management-2025-06-27";

#[derive(Debug, Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    /// Stored responses by id, with their input items.
    responses: Mutex<HashMap<String, (Value, Vec<Value>)>>,
    /// Anthropic prompt-cache prefixes written so far.
    cached: Mutex<HashSet<String>>,
    counter: Mutex<u64>,
}

/// A running emulated API.
#[derive(Debug, Clone)]
pub struct Emulated {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it emulates.
    pub flavor: Flavor,
    shared: Arc<Shared>,
}

impl Emulated {
    /// Starts one on a free port.
    pub async fn start(flavor: Flavor) -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .fallback(handle)
            .with_state((flavor, shared.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            addr,
            flavor,
            shared,
        }
    }

    /// The base URL a Provider names (`…/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received, in order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// How many responses it stores.
    pub fn stored(&self) -> usize {
        self.shared.responses.lock().unwrap().len()
    }
}

type AppState = (Flavor, Arc<Shared>);

fn reply(status: u16, body: Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn openai_error(
    status: u16,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    reply(
        status,
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

fn anthropic_error(status: u16, kind: &str, message: &str) -> Response {
    reply(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

fn sse(events: Vec<(Option<String>, String)>) -> Response {
    let mut body = String::new();
    for (name, data) in events {
        if let Some(name) = name {
            body.push_str(&format!("event: {name}\n"));
        }
        body.push_str(&format!("data: {data}\n\n"));
    }
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(body))
        .unwrap()
}

async fn handle(State((flavor, shared)): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let path = parts.uri.path().to_owned();
    shared
        .received
        .lock()
        .unwrap()
        .push(Received::of(&parts, body.clone()));
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    match flavor {
        Flavor::Anthropic => {
            if header("x-api-key").as_deref() != Some(API_KEY) {
                return anthropic_error(401, "authentication_error", "invalid x-api-key");
            }
            if header("anthropic-version").is_none() {
                return anthropic_error(
                    400,
                    "invalid_request_error",
                    "anthropic-version: header is required",
                );
            }
            let Ok(req) = serde_json::from_slice::<Value>(&body) else {
                return anthropic_error(400, "invalid_request_error", "invalid JSON body");
            };
            let betas: Vec<String> = header("anthropic-beta")
                .unwrap_or_default()
                .split(',')
                .map(|b| b.trim().to_owned())
                .filter(|b| !b.is_empty())
                .collect();
            match (parts.method.as_str(), path.as_str()) {
                ("POST", "/v1/messages") => messages(&shared, &req, &betas, false),
                ("POST", "/v1/messages/count_tokens") => messages(&shared, &req, &betas, true),
                _ => anthropic_error(404, "not_found_error", "Not found"),
            }
        }
        Flavor::OpenAi | Flavor::ChatOnly => {
            if header("authorization").as_deref() != Some(&format!("Bearer {API_KEY}")) {
                return openai_error(
                    401,
                    "Incorrect API key provided.",
                    "invalid_request_error",
                    None,
                    Some("invalid_api_key"),
                );
            }
            let req = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
            let responses = flavor == Flavor::OpenAi;
            match (parts.method.as_str(), path.as_str()) {
                ("POST", "/v1/chat/completions") => chat(&req),
                ("POST", "/v1/embeddings") => embeddings(&req),
                ("POST", "/v1/responses") if responses => create_response(&shared, &req),
                ("GET" | "DELETE", p) if responses && p.starts_with("/v1/responses/") => {
                    stored_response(&shared, parts.method.as_str(), &p["/v1/responses/".len()..])
                }
                ("POST", "/v1/moderations") if responses => media::moderations(&req),
                ("POST", "/v1/images/generations") if responses => media::images(&req),
                ("POST", "/v1/audio/speech") if responses => media::speech(&req),
                ("POST", "/v1/audio/transcriptions") if responses => {
                    media::transcriptions(header("content-type"), body).await
                }
                _ => openai_error(
                    404,
                    &format!("Invalid URL ({} {path})", parts.method),
                    "invalid_request_error",
                    None,
                    None,
                ),
            }
        }
    }
}

/// OpenAI's answer to a body that is not a JSON object.
fn unparsable() -> Response {
    openai_error(
        400,
        "We could not parse the JSON body of your request.",
        "invalid_request_error",
        None,
        None,
    )
}

/// A text in streamed pieces: its words, each after the first with its space.
fn pieces(text: &str) -> Vec<String> {
    text.split(' ')
        .enumerate()
        .map(|(i, word)| {
            if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            }
        })
        .collect()
}

/// Rough tokens of a text (four characters each, at least one).
fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

/// What the model does next.
enum Turn {
    Call { name: String, arguments: String },
    Say(String),
}

/// Arguments for a tool from its JSON Schema: every required property filled in.
fn arguments_for(schema: &Value) -> Value {
    let mut out = Map::new();
    let props = schema["properties"].as_object();
    for name in schema["required"].as_array().into_iter().flatten() {
        let Some(name) = name.as_str() else { continue };
        let kind = props
            .and_then(|p| p.get(name))
            .map_or(&Value::Null, |p| &p["type"]);
        out.insert(
            name.to_owned(),
            match kind.as_str() {
                Some("number" | "integer") => json!(1),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("emulated"),
            },
        );
    }
    Value::Object(out)
}

/// An instance of a JSON Schema (structured output).
fn instance_of(schema: &Value) -> Value {
    match schema["type"].as_str() {
        Some("object") => {
            let mut out = Map::new();
            for (name, prop) in schema["properties"].as_object().into_iter().flatten() {
                out.insert(name.clone(), instance_of(prop));
            }
            Value::Object(out)
        }
        Some("array") => json!([instance_of(&schema["items"])]),
        Some("number" | "integer") => json!(1),
        Some("boolean") => json!(true),
        _ => json!("emulated"),
    }
}

/// The next turn, from the last user text, the last tool output after it (if any), the
/// tools offered (name and parameters) and the structured output schema.
fn decide<'a>(
    last_user: &str,
    tool_output: Option<&str>,
    tools: impl IntoIterator<Item = (&'a str, &'a Value)>,
    schema: Option<&Value>,
) -> Turn {
    if let Some(output) = tool_output {
        return Turn::Say(format!("the tool said: {output}"));
    }
    let mentioned = tools
        .into_iter()
        .find(|(name, _)| !name.is_empty() && last_user.starts_with(&format!("Use {name} ")));
    if let Some((name, parameters)) = mentioned {
        return Turn::Call {
            name: name.to_owned(),
            arguments: arguments_for(parameters).to_string(),
        };
    }
    if let Some(schema) = schema {
        return Turn::Say(instance_of(schema).to_string());
    }
    let said: String = last_user.chars().take(80).collect();
    Turn::Say(format!("emulated reply to: {said}"))
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn next_id(shared: &Shared, prefix: &str) -> String {
    let mut n = shared.counter.lock().unwrap();
    *n += 1;
    format!("{prefix}_emulated{:08}", *n)
}

// === OpenAI chat completions ===

const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "tools",
    "tool_choice",
    "response_format",
    "user",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "metadata",
    "store",
    "reasoning_effort",
    "service_tier",
    "modalities",
    "prediction",
    "audio",
    "logit_bias",
    "safety_identifier",
    "prompt_cache_key",
    "verbosity",
];

fn unknown_field(req: &Value, known: &[&str]) -> Option<String> {
    req.as_object()?
        .keys()
        .find(|k| !known.contains(&k.as_str()))
        .cloned()
}

fn chat(req: &Value) -> Response {
    if !req.is_object() {
        return unparsable();
    }
    if let Some(field) = unknown_field(req, CHAT_FIELDS) {
        return openai_error(
            400,
            &format!("Unrecognized request argument supplied: {field}"),
            "invalid_request_error",
            None,
            None,
        );
    }
    let Some(messages) = req["messages"].as_array().filter(|m| !m.is_empty()) else {
        return openai_error(
            400,
            "Missing required parameter: 'messages'.",
            "invalid_request_error",
            Some("messages"),
            Some("missing_required_parameter"),
        );
    };
    let model = req["model"].as_str().unwrap_or_default();
    let prompt: u64 = messages
        .iter()
        .map(|m| tokens(&text_of(&m["content"])))
        .sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| text_of(&m["content"]))
        .unwrap_or_default();
    let tool_output = messages
        .last()
        .filter(|m| m["role"] == "tool")
        .map(|m| text_of(&m["content"]));
    let tools = req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|_| req["tool_choice"] != "none")
        .map(|t| {
            (
                t["function"]["name"].as_str().unwrap_or_default(),
                &t["function"]["parameters"],
            )
        });
    let schema = (req["response_format"]["type"] == "json_schema")
        .then(|| &req["response_format"]["json_schema"]["schema"]);
    let turn = decide(&last_user, tool_output.as_deref(), tools, schema);
    let cached = if prompt >= 1024 { prompt / 2 } else { 0 };
    let (message, finish, completion) = match &turn {
        Turn::Say(text) => (
            json!({"role": "assistant", "content": text, "refusal": null}),
            "stop",
            text.split_whitespace().count() as u64,
        ),
        Turn::Call { name, arguments } => (
            json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": [{"id": "call_emulated1", "type": "function", "function": {"name": name, "arguments": arguments}}]}),
            "tool_calls",
            tokens(arguments),
        ),
    };
    let usage = json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    });
    if req["stream"] != true {
        return reply(
            200,
            json!({
                "id": "chatcmpl-emulated", "object": "chat.completion", "created": 1_700_000_000, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
                "usage": usage, "service_tier": "default", "system_fingerprint": "fp_emulated",
            }),
        );
    }
    let include_usage = req["stream_options"]["include_usage"] == true;
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-emulated", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "system_fingerprint": "fp_emulated", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        (None, c.to_string())
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    )];
    match &turn {
        Turn::Say(text) => {
            for piece in pieces(text) {
                events.push(chunk(json!({"content": piece}), Value::Null));
            }
        }
        Turn::Call { name, arguments } => {
            events.push(chunk(json!({"tool_calls": [{"index": 0, "id": "call_emulated1", "type": "function", "function": {"name": name, "arguments": ""}}]}), Value::Null));
            let (a, b) = arguments.split_at(arguments.len() / 2);
            for piece in [a, b] {
                events.push(chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                    Value::Null,
                ));
            }
        }
    }
    events.push(chunk(json!({}), json!(finish)));
    if include_usage {
        events.push((None, json!({"id": "chatcmpl-emulated", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model, "choices": [], "usage": usage}).to_string()));
    }
    events.push((None, "[DONE]".to_owned()));
    sse(events)
}

fn embeddings(req: &Value) -> Response {
    let inputs: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().map(|i| i.to_string()).collect(),
        _ => {
            return openai_error(
                400,
                "'input' is a required property",
                "invalid_request_error",
                Some("input"),
                None,
            );
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, _)| json!({"object": "embedding", "index": i, "embedding": [0.0, 1.0, 0.0]}))
        .collect();
    let prompt: u64 = inputs.iter().map(|i| tokens(i)).sum();
    reply(
        200,
        json!({"object": "list", "data": data, "model": req["model"], "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}),
    )
}

// === OpenAI Responses ===

const RESPONSES_FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "store",
    "previous_response_id",
    "include",
    "metadata",
    "reasoning",
    "parallel_tool_calls",
    "truncation",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "background",
    "conversation",
    "max_tool_calls",
    "top_logprobs",
    "stream_options",
    "prompt",
    // Codex CLI sends it; the API accepts it.
    "client_metadata",
];

/// The items of a Responses `input`.
fn input_items(input: &Value) -> Vec<Value> {
    match input {
        Value::String(s) => vec![
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": s}]}),
        ],
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    }
}

/// The newer APIs' refusal (Responses, images) of a body that is not an object or has a
/// parameter beyond `known`.
fn unknown_parameter(req: &Value, known: &[&str]) -> Option<Response> {
    if !req.is_object() {
        return Some(unparsable());
    }
    let field = unknown_field(req, known)?;
    Some(openai_error(
        400,
        &format!("Unknown parameter: '{field}'."),
        "invalid_request_error",
        Some(&field),
        Some("unknown_parameter"),
    ))
}

fn create_response(shared: &Shared, req: &Value) -> Response {
    if let Some(refused) = unknown_parameter(req, RESPONSES_FIELDS) {
        return refused;
    }
    let Some(model) = req["model"].as_str() else {
        return openai_error(
            400,
            "Missing required parameter: 'model'.",
            "invalid_request_error",
            Some("model"),
            Some("missing_required_parameter"),
        );
    };
    // The conversation: the stored one before this input, when continuing.
    let mut history = Vec::new();
    if let Some(previous) = req["previous_response_id"].as_str() {
        let stored = shared.responses.lock().unwrap();
        let Some((response, inputs)) = stored.get(previous) else {
            return openai_error(
                400,
                &format!("Previous response with id '{previous}' not found."),
                "invalid_request_error",
                Some("previous_response_id"),
                Some("previous_response_not_found"),
            );
        };
        history.extend(inputs.iter().cloned());
        history.extend(response["output"].as_array().cloned().unwrap_or_default());
    }
    let items = input_items(&req["input"]);
    for item in &items {
        if item["type"] == "item_reference" {
            let id = item["id"].as_str().unwrap_or_default();
            let known = shared.responses.lock().unwrap().values().any(|(r, _)| {
                r["output"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|o| o["id"] == id)
            });
            if !known {
                return openai_error(
                    404,
                    &format!("Item with id '{id}' not found."),
                    "invalid_request_error",
                    Some("input"),
                    None,
                );
            }
        }
    }
    history.extend(items.iter().cloned());
    let prompt: u64 = tokens(req["instructions"].as_str().unwrap_or_default())
        + history
            .iter()
            .map(|i| tokens(&text_of(&i["content"])) + tokens(&text_of(&i["output"])))
            .sum::<u64>();
    let last_user = history
        .iter()
        .rev()
        .find(|i| i["role"] == "user")
        .map(|i| text_of(&i["content"]))
        .unwrap_or_default();
    let last_user_at = history
        .iter()
        .rposition(|i| i["role"] == "user")
        .unwrap_or(0);
    let tool_output = history[last_user_at..]
        .iter()
        .rev()
        .find(|i| i["type"] == "function_call_output")
        .map(|i| text_of(&i["output"]));
    let tools = req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["type"] == "function" && req["tool_choice"] != "none")
        .map(|t| (t["name"].as_str().unwrap_or_default(), &t["parameters"]));
    let schema =
        (req["text"]["format"]["type"] == "json_schema").then(|| &req["text"]["format"]["schema"]);
    let turn = decide(&last_user, tool_output.as_deref(), tools, schema);
    let id = next_id(shared, "resp");
    let mut output = Vec::new();
    let wants_reasoning = req["reasoning"].is_object();
    if wants_reasoning {
        let mut item = json!({"id": next_id(shared, "rs"), "type": "reasoning", "summary": []});
        if req["include"]
            .as_array()
            .is_some_and(|i| i.iter().any(|x| x == "reasoning.encrypted_content"))
        {
            item["encrypted_content"] = json!("ZW11bGF0ZWQ=");
        }
        output.push(item);
    }
    let completion = match &turn {
        Turn::Say(text) => {
            output.push(json!({"id": next_id(shared, "msg"), "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}));
            text.split_whitespace().count() as u64
        }
        Turn::Call { name, arguments } => {
            output.push(
                json!({"id": next_id(shared, "fc"), "type": "function_call", "status": "completed",
                "call_id": next_id(shared, "call"), "name": name, "arguments": arguments}),
            );
            tokens(arguments)
        }
    };
    let cached = if prompt >= 1024 { prompt / 2 } else { 0 };
    let response = json!({
        "id": id, "object": "response", "created_at": 1_700_000_000, "status": "completed",
        "background": false, "error": null, "incomplete_details": null,
        "instructions": req["instructions"], "max_output_tokens": req["max_output_tokens"],
        "model": model, "output": output, "parallel_tool_calls": req.get("parallel_tool_calls").cloned().unwrap_or(json!(true)),
        "previous_response_id": req["previous_response_id"], "reasoning": req.get("reasoning").cloned().unwrap_or(json!({"effort": null, "summary": null})),
        "service_tier": "default", "store": req["store"] != false, "temperature": req.get("temperature").cloned().unwrap_or(json!(1.0)),
        "text": req.get("text").cloned().unwrap_or(json!({"format": {"type": "text"}})),
        "tool_choice": req.get("tool_choice").cloned().unwrap_or(json!("auto")), "tools": req.get("tools").cloned().unwrap_or(json!([])),
        "top_p": req.get("top_p").cloned().unwrap_or(json!(1.0)), "truncation": "disabled",
        "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": u64::from(wants_reasoning) * 4},
            "total_tokens": prompt + completion},
        "user": req["user"], "metadata": req.get("metadata").cloned().unwrap_or(json!({})),
    });
    if req["store"] != false {
        shared
            .responses
            .lock()
            .unwrap()
            .insert(id.clone(), (response.clone(), history));
    }
    if req["stream"] != true {
        return reply(200, response);
    }
    // The stream: created, in_progress, each item added / filled / done, completed.
    let mut seq = 0u64;
    let mut events = Vec::new();
    let mut push = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        events.push((Some(kind.to_owned()), data.to_string()));
    };
    let mut pending = response.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    pending["usage"] = Value::Null;
    push("response.created", json!({"response": pending.clone()}));
    push("response.in_progress", json!({"response": pending}));
    for (index, item) in response["output"].as_array().unwrap().iter().enumerate() {
        let mut added = item.clone();
        added["status"] = json!("in_progress");
        match item["type"].as_str() {
            Some("message") => {
                added["content"] = json!([]);
                push(
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                );
                let item_id = &item["id"];
                let part =
                    json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
                push(
                    "response.content_part.added",
                    json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part}),
                );
                let text = item["content"][0]["text"].as_str().unwrap_or_default();
                for piece in pieces(text) {
                    push(
                        "response.output_text.delta",
                        json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": piece, "logprobs": []}),
                    );
                }
                push(
                    "response.output_text.done",
                    json!({"item_id": item_id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                push(
                    "response.content_part.done",
                    json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": item["content"][0]}),
                );
            }
            Some("function_call") => {
                added["arguments"] = json!("");
                push(
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                );
                let arguments = item["arguments"].as_str().unwrap_or_default();
                push(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item["id"], "output_index": index, "delta": arguments}),
                );
                push(
                    "response.function_call_arguments.done",
                    json!({"item_id": item["id"], "output_index": index, "arguments": arguments}),
                );
            }
            _ => push(
                "response.output_item.added",
                json!({"output_index": index, "item": added}),
            ),
        }
        push(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }
    push("response.completed", json!({"response": response}));
    sse(events)
}

fn stored_response(shared: &Shared, method: &str, rest: &str) -> Response {
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stored = shared.responses.lock().unwrap();
    let not_found = || {
        openai_error(
            404,
            &format!("No response found with id '{id}'."),
            "invalid_request_error",
            None,
            None,
        )
    };
    match (method, tail) {
        ("GET", "") => stored.get(id).map_or_else(not_found, |(r, _)| reply(200, r.clone())),
        ("DELETE", "") => match stored.remove(id) {
            Some(_) => reply(200, json!({"id": id, "object": "response.deleted", "deleted": true})),
            None => not_found(),
        },
        ("GET", "input_items") => stored.get(id).map_or_else(not_found, |(_, inputs)| {
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let mut item = item.clone();
                    if item.get("id").is_none() {
                        item["id"] = json!(format!("msg_input{i}"));
                    }
                    item
                })
                .collect();
            reply(200, json!({"object": "list", "data": data, "first_id": data.first().map(|d| d["id"].clone()), "last_id": data.last().map(|d| d["id"].clone()), "has_more": false}))
        }),
        _ => not_found(),
    }
}

// === Anthropic messages ===

const MESSAGES_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "system",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
    "service_tier",
];

/// Body fields that exist only with a beta, and the beta's name prefix.
const BETA_FIELDS: &[(&str, &str)] = &[
    ("context_management", "context-management-"),
    ("mcp_servers", "mcp-client-"),
    ("container", "code-execution-"),
    ("output_config", "effort-"),
];

fn messages(shared: &Shared, req: &Value, betas: &[String], count_only: bool) -> Response {
    let invalid = |message: &str| anthropic_error(400, "invalid_request_error", message);
    for (field, _) in req.as_object().into_iter().flatten() {
        if MESSAGES_FIELDS.contains(&field.as_str()) {
            continue;
        }
        let enabled = BETA_FIELDS
            .iter()
            .any(|(f, beta)| f == field && betas.iter().any(|b| b.starts_with(beta)));
        if !enabled {
            return invalid(&format!("{field}: Extra inputs are not permitted"));
        }
    }
    let Some(messages) = req["messages"].as_array().filter(|m| !m.is_empty()) else {
        return invalid("messages: Field required");
    };
    if req["model"].as_str().is_none() {
        return invalid("model: Field required");
    }
    if !count_only && req["max_tokens"].as_u64().is_none() {
        return invalid("max_tokens: Field required");
    }
    for pair in messages.windows(2) {
        if pair[0]["role"] == pair[1]["role"] {
            return invalid("messages: roles must alternate between \"user\" and \"assistant\"");
        }
    }
    // Input tokens, with what `cache_control` marks read from or written to the cache.
    let mut input = tokens(&text_of(&req["system"]));
    let mut cache_read = 0;
    let mut cache_write = 0;
    let mut prefix = String::new();
    let mut blocks: Vec<&Value> = req["system"]
        .as_array()
        .map(|s| s.iter().collect())
        .unwrap_or_default();
    for m in messages {
        input += tokens(&text_of(&m["content"]));
        if let Some(content) = m["content"].as_array() {
            blocks.extend(content.iter());
        }
    }
    for block in blocks {
        prefix.push_str(block["text"].as_str().unwrap_or_default());
        if block.get("cache_control").is_some() {
            let marked = tokens(&prefix);
            if shared.cached.lock().unwrap().insert(prefix.clone()) {
                cache_write = marked;
            } else {
                cache_read = marked;
            }
        }
    }
    let cached = cache_read + cache_write;
    let plain = input.saturating_sub(cached);
    if count_only {
        return reply(200, json!({"input_tokens": input}));
    }
    let last = messages.last().unwrap();
    let last_user = text_of(&last["content"]);
    let tool_output = last["content"]
        .as_array()
        .and_then(|c| c.iter().find(|b| b["type"] == "tool_result"))
        .map(|b| text_of(&b["content"]));
    let tools: Vec<(&str, &Value)> = req["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|_| req["tool_choice"]["type"] != "none")
        .map(|t| (t["name"].as_str().unwrap_or_default(), &t["input_schema"]))
        .collect();
    // A forced `tool_choice` is always obeyed, as by the real API: `tool` calls that tool;
    // `any` the one the user asked for, else the last offered.
    let forced = match req["tool_choice"]["type"].as_str() {
        Some("tool") => tools
            .iter()
            .find(|(name, _)| Some(*name) == req["tool_choice"]["name"].as_str())
            .copied(),
        Some("any") => tools
            .iter()
            .find(|(name, _)| {
                tool_output.is_none() && last_user.starts_with(&format!("Use {name} "))
            })
            .or(tools.last())
            .copied(),
        _ => None,
    };
    let turn = match forced {
        Some((name, parameters)) => Turn::Call {
            name: name.to_owned(),
            arguments: arguments_for(parameters).to_string(),
        },
        None => decide(&last_user, tool_output.as_deref(), tools, None),
    };
    let (block, stop, output) = match &turn {
        Turn::Say(text) => (
            json!({"type": "text", "text": text}),
            "end_turn",
            text.split_whitespace().count() as u64,
        ),
        Turn::Call { name, arguments } => (
            json!({"type": "tool_use", "id": "toolu_emulated1", "name": name, "input": serde_json::from_str::<Value>(arguments).unwrap()}),
            "tool_use",
            tokens(arguments),
        ),
    };
    let usage = json!({"input_tokens": plain, "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cache_read, "output_tokens": output});
    let id = next_id(shared, "msg");
    if req["stream"] != true {
        return reply(
            200,
            json!({"id": id, "type": "message", "role": "assistant", "model": req["model"], "content": [block],
            "stop_reason": stop, "stop_sequence": null, "usage": usage}),
        );
    }
    let mut events = Vec::new();
    let mut push = |name: &str, data: Value| events.push((Some(name.to_owned()), data.to_string()));
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    push(
        "message_start",
        json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": req["model"], "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
    );
    push("ping", json!({"type": "ping"}));
    match &turn {
        Turn::Say(text) => {
            push(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            );
            for piece in pieces(text) {
                push(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
                );
            }
        }
        Turn::Call { name, arguments } => {
            push(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_emulated1", "name": name, "input": {}}}),
            );
            push(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": arguments}}),
            );
        }
    }
    push(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    push(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": output}}),
    );
    push("message_stop", json!({"type": "message_stop"}));
    sse(events)
}

/// Reads a Received body as JSON (for assertions).
pub fn body_json(received: &Received) -> Value {
    serde_json::from_slice(&received.body).unwrap_or(Value::Null)
}

/// The value of `header` in a Received request.
pub fn header(received: &Received, name: &str) -> Option<String> {
    received
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
