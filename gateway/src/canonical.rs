//! The gateway's own model of an LLM call, between the wire formats it speaks.
//!
//! Every dialect (`crate::dialects`: OpenAI chat completions, Anthropic messages, and the
//! ones to come) converts its requests, whole answers, stream events and error bodies to
//! and from these types once, so translating between any client dialect and any upstream
//! is a composition (`parse` in one, `render` in the other) instead of a function per
//! pair. When the client and the upstream speak the same dialect none of this runs: the
//! body is passed through as it came (`crate::providers::passthrough`).
//!
//! The model holds what a translation can carry faithfully; what one side has and the
//! other cannot express is either dropped where dropping is harmless (documented on the
//! dialect) or refused with [`Untranslatable`].

use serde_json::{Number, Value};

/// A request that cannot be expressed in the target dialect: a 400 naming why.
#[derive(Debug, PartialEq, Eq)]
pub struct Untranslatable(pub String);

/// Who speaks a turn. System instructions are not a turn: they are [`Request::system`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The user (or the application on its behalf).
    User,
    /// The model.
    Assistant,
    /// Results of the model's tool calls (OpenAI's `tool` role; a user turn in Anthropic's
    /// messages).
    Tool,
}

/// An image in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// Fetched by the provider.
    Url(String),
    /// Inline bytes, base64-encoded.
    Base64 {
        /// `image/png`, `image/jpeg`…
        media_type: String,
        /// The base64 text.
        data: String,
    },
}

/// One piece of a message or an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text.
    Text(String),
    /// An image (requests only).
    Image(Image),
    /// The model calling a tool.
    ToolCall(ToolCall),
    /// What a tool call returned.
    ToolResult {
        /// The call it answers.
        call_id: String,
        /// Its text.
        content: String,
    },
    /// The model's reasoning, where the provider returns it (Anthropic `thinking`).
    /// Dialects without a place for it drop it.
    Reasoning(String),
}

/// A tool call of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// Its id, which the tool result names.
    pub id: String,
    /// The tool.
    pub name: String,
    /// Its arguments as JSON text (OpenAI's form; Anthropic's object is serialised).
    pub arguments: String,
}

/// One turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said, in order.
    pub parts: Vec<Part>,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// The JSON Schema of its arguments.
    pub parameters: Option<Value>,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides.
    Auto,
    /// Some tool must be called.
    Required,
    /// No tool may be called.
    None,
    /// This tool must be called.
    Tool(String),
}

/// Structured output the client asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// Plain text.
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        /// The schema's name.
        name: String,
        /// The schema.
        schema: Value,
        /// Whether the provider must follow it exactly.
        strict: bool,
    },
}

/// A generation request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    /// System instructions, joined.
    pub system: Option<String>,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Most tokens to generate.
    pub max_tokens: Option<u64>,
    /// Sampling temperature, as the client wrote the number.
    pub temperature: Option<Number>,
    /// Nucleus sampling, as the client wrote the number.
    pub top_p: Option<Number>,
    /// Sequences that end the generation.
    pub stop: Vec<String>,
    /// Whether the answer is streamed (`None`: the client did not say).
    pub stream: Option<bool>,
    /// Tools the model may call.
    pub tools: Option<Vec<Tool>>,
    /// Which tool the model must call.
    pub tool_choice: Option<ToolChoice>,
    /// Structured output. Dialects without it (Anthropic messages) drop it.
    pub output: Option<OutputFormat>,
    /// The end user, for the provider's abuse monitoring.
    pub user: Option<String>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Naturally, or at a stop sequence.
    Stop,
    /// At the token limit.
    Length,
    /// To call tools.
    ToolCalls,
    /// Refused or filtered.
    ContentFilter,
}

/// Tokens an answer used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Input tokens, cached ones and cache writes included.
    pub input: u64,
    /// Generated tokens, reasoning included.
    pub output: u64,
    /// Input tokens read from the provider's prompt cache, where it says.
    pub cached_input: Option<u64>,
    /// Input tokens written to the provider's prompt cache, where it says.
    pub cache_write: Option<u64>,
    /// Reasoning tokens among `output`, where the provider says.
    pub reasoning: Option<u64>,
}

impl Usage {
    /// Input plus output, saturating (the numbers come from the upstream).
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Answer {
    /// The provider's id for it.
    pub id: String,
    /// What the model produced, in order.
    pub parts: Vec<Part>,
    /// Why it ended (`None`: the provider did not say).
    pub finish: Option<Finish>,
    /// Tokens used.
    pub usage: Usage,
}

/// An error body, in no dialect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// The provider's error type (`invalid_request_error`, `rate_limit_error`…), if it
    /// named one.
    pub kind: Option<String>,
    /// What it said.
    pub message: String,
}

/// One event of a streamed answer, in the order a client must see them.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The answer begins (`id`: the provider's id for it; `input`: input tokens when the
    /// provider says them up front).
    Start {
        /// The provider's id.
        id: String,
        /// Input tokens, if known now.
        input: Option<u64>,
    },
    /// More text.
    Text(String),
    /// A tool call begins; `call` numbers the calls of this answer from 0.
    ToolCallStart {
        /// Which call.
        call: usize,
        /// Its id.
        id: String,
        /// The tool.
        name: String,
    },
    /// More of a tool call's arguments (JSON text).
    ToolCallArguments {
        /// Which call.
        call: usize,
        /// The next piece of the JSON text.
        json: String,
    },
    /// Why the generation ended (`None`: the provider did not say).
    Finish(Option<Finish>),
    /// Token counts so far (each event replaces the previous).
    Usage(Usage),
    /// The provider reported an error mid-stream.
    Error(ErrorBody),
    /// The stream is complete.
    Done,
}
