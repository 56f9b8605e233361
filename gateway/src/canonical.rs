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

/// The name of the tool that carries structured output to an upstream without it
/// ([`Request::output_as_tool`]), suffixed when a tool of the request has it already.
pub const ANSWER_TOOL: &str = "json_answer";

impl Request {
    /// Structured output asked of an upstream whose API has none (Anthropic's messages):
    /// the format becomes a tool whose arguments are the answer. Without tools of the
    /// request's own, the model must call it; with some, it must call one of them or it
    /// (a forced tool of the request's own stays forced). Returns the tool's name, to
    /// turn its call back into the answer's text ([`Answer::tool_as_output`],
    /// [`AnswerTool`]); `None` when the request asks for no structured output.
    pub fn output_as_tool(&mut self) -> Option<String> {
        let (schema, description) = match self.output.take()? {
            OutputFormat::Text => return None,
            OutputFormat::JsonObject => (
                serde_json::json!({"type": "object"}),
                "Give your final answer as a JSON object: call this tool with it.".to_owned(),
            ),
            OutputFormat::JsonSchema { name, schema, .. } => (
                schema,
                format!(
                    "Give your final answer as JSON matching the `{name}` schema: call this tool with it."
                ),
            ),
        };
        let tools = self.tools.get_or_insert_with(Vec::new);
        let mut name = ANSWER_TOOL.to_owned();
        let mut n = 1;
        while tools.iter().any(|t| t.name == name) {
            n += 1;
            name = format!("{ANSWER_TOOL}_{n}");
        }
        let own_tools = !tools.is_empty();
        tools.push(Tool {
            name: name.clone(),
            description: Some(description),
            parameters: Some(schema),
        });
        self.tool_choice = match self.tool_choice.take() {
            Some(ToolChoice::Tool(forced)) => Some(ToolChoice::Tool(forced)),
            Some(ToolChoice::Auto | ToolChoice::Required) | None if own_tools => {
                Some(ToolChoice::Required)
            }
            _ => Some(ToolChoice::Tool(name.clone())),
        };
        Some(name)
    }
}

impl Answer {
    /// The call of `tool` (the structured-output stand-in, [`Request::output_as_tool`])
    /// as the answer's text, where the call was; the answer stops rather than waits for
    /// tool results when no other call remains.
    pub fn tool_as_output(&mut self, tool: &str) {
        let Some(at) = self
            .parts
            .iter()
            .position(|p| matches!(p, Part::ToolCall(c) if c.name == tool))
        else {
            return;
        };
        if let Part::ToolCall(call) = &mut self.parts[at] {
            let text = std::mem::take(&mut call.arguments);
            self.parts[at] = Part::Text(text);
        }
        let calls = self.parts.iter().any(|p| matches!(p, Part::ToolCall(_)));
        if !calls && self.finish == Some(Finish::ToolCalls) {
            self.finish = Some(Finish::Stop);
        }
    }
}

/// [`Answer::tool_as_output`] for a stream: the stand-in tool's call becomes text as it
/// arrives, the other calls are numbered without it, and the answer stops rather than
/// waits for tool results when it called no other tool.
#[derive(Debug, Clone)]
pub struct AnswerTool {
    name: String,
    call: Option<usize>,
    others: bool,
}

impl AnswerTool {
    /// For the stand-in tool `name`.
    pub fn new(name: String) -> Self {
        Self {
            name,
            call: None,
            others: false,
        }
    }

    /// `event` as the client sees it (`None`: swallowed).
    pub fn map(&mut self, event: Event) -> Option<Event> {
        let renumber = |this: &Self, call: usize| match this.call {
            Some(answer) if call > answer => call - 1,
            _ => call,
        };
        Some(match event {
            Event::ToolCallStart { call, name, .. } if name == self.name => {
                self.call = Some(call);
                return None;
            }
            Event::ToolCallStart { call, id, name } => {
                self.others = true;
                Event::ToolCallStart {
                    call: renumber(self, call),
                    id,
                    name,
                }
            }
            Event::ToolCallArguments { call, json } if Some(call) == self.call => Event::Text(json),
            Event::ToolCallArguments { call, json } => Event::ToolCallArguments {
                call: renumber(self, call),
                json,
            },
            Event::Finish(Some(Finish::ToolCalls)) if self.call.is_some() && !self.others => {
                Event::Finish(Some(Finish::Stop))
            }
            other => other,
        })
    }
}

#[cfg(test)]
mod answer_tool_tests {
    use super::*;

    fn person() -> OutputFormat {
        OutputFormat::JsonSchema {
            name: "person".into(),
            schema: serde_json::json!({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}),
            strict: true,
        }
    }

    fn tool(name: &str) -> Tool {
        Tool {
            name: name.into(),
            description: None,
            parameters: None,
        }
    }

    #[test]
    fn structured_output_becomes_a_tool_forced_or_offered_beside_the_requests_own() {
        // No tools: the answer tool is forced.
        let mut alone = Request {
            output: Some(person()),
            ..Default::default()
        };
        assert_eq!(alone.output_as_tool().as_deref(), Some(ANSWER_TOOL));
        assert_eq!(alone.output, None);
        assert_eq!(
            alone.tool_choice,
            Some(ToolChoice::Tool(ANSWER_TOOL.into()))
        );
        let tools = alone.tools.unwrap();
        assert_eq!(tools.len(), 1);
        assert_eq!(tools[0].parameters.as_ref().unwrap()["required"][0], "name");
        // Tools of its own, one named like the answer tool: some tool must be called.
        let mut agent = Request {
            output: Some(OutputFormat::JsonObject),
            tools: Some(vec![tool("get_weather"), tool(ANSWER_TOOL)]),
            tool_choice: Some(ToolChoice::Auto),
            ..Default::default()
        };
        assert_eq!(agent.output_as_tool().as_deref(), Some("json_answer_2"));
        assert_eq!(agent.tool_choice, Some(ToolChoice::Required));
        assert_eq!(agent.tools.as_ref().unwrap().len(), 3);
        // A forced tool of its own stays forced; `none` forces the answer.
        for (choice, expected) in [
            (
                ToolChoice::Tool("get_weather".into()),
                ToolChoice::Tool("get_weather".into()),
            ),
            (ToolChoice::None, ToolChoice::Tool(ANSWER_TOOL.into())),
        ] {
            let mut r = Request {
                output: Some(person()),
                tools: Some(vec![tool("get_weather")]),
                tool_choice: Some(choice),
                ..Default::default()
            };
            r.output_as_tool();
            assert_eq!(r.tool_choice, Some(expected));
        }
        // Text, or nothing asked: nothing changes.
        let mut plain = Request {
            output: Some(OutputFormat::Text),
            ..Default::default()
        };
        assert_eq!(plain.output_as_tool(), None);
        assert_eq!(plain.tools, None);
    }

    #[test]
    fn the_answer_tools_call_comes_back_as_text_whole_or_streamed() {
        let call = |id: &str, name: &str, arguments: &str| {
            Part::ToolCall(ToolCall {
                id: id.into(),
                name: name.into(),
                arguments: arguments.into(),
            })
        };
        let mut answer = Answer {
            parts: vec![call("t1", ANSWER_TOOL, r#"{"name":"Ada"}"#)],
            finish: Some(Finish::ToolCalls),
            ..Default::default()
        };
        answer.tool_as_output(ANSWER_TOOL);
        assert_eq!(answer.parts, vec![Part::Text(r#"{"name":"Ada"}"#.into())]);
        assert_eq!(answer.finish, Some(Finish::Stop));
        // Beside a real call, the answer still waits for its result.
        let mut both = Answer {
            parts: vec![
                call("t1", "get_weather", "{}"),
                call("t2", ANSWER_TOOL, "{}"),
            ],
            finish: Some(Finish::ToolCalls),
            ..Default::default()
        };
        both.tool_as_output(ANSWER_TOOL);
        assert_eq!(both.finish, Some(Finish::ToolCalls));

        let mut map = AnswerTool::new(ANSWER_TOOL.into());
        let events = [
            Event::ToolCallStart {
                call: 0,
                id: "t1".into(),
                name: ANSWER_TOOL.into(),
            },
            Event::ToolCallArguments {
                call: 0,
                json: r#"{"name":"#.into(),
            },
            Event::ToolCallArguments {
                call: 0,
                json: r#""Ada"}"#.into(),
            },
            Event::Finish(Some(Finish::ToolCalls)),
        ];
        let out: Vec<Event> = events.into_iter().filter_map(|e| map.map(e)).collect();
        assert_eq!(
            out,
            [
                Event::Text(r#"{"name":"#.into()),
                Event::Text(r#""Ada"}"#.into()),
                Event::Finish(Some(Finish::Stop)),
            ]
        );
        // Calls after it are numbered without it, and the answer waits for their results.
        let mut map = AnswerTool::new(ANSWER_TOOL.into());
        let out: Vec<Event> = [
            Event::ToolCallStart {
                call: 0,
                id: "t1".into(),
                name: ANSWER_TOOL.into(),
            },
            Event::ToolCallStart {
                call: 1,
                id: "t2".into(),
                name: "get_weather".into(),
            },
            Event::ToolCallArguments {
                call: 1,
                json: "{}".into(),
            },
            Event::Finish(Some(Finish::ToolCalls)),
        ]
        .into_iter()
        .filter_map(|e| map.map(e))
        .collect();
        assert_eq!(
            out,
            [
                Event::ToolCallStart {
                    call: 0,
                    id: "t2".into(),
                    name: "get_weather".into()
                },
                Event::ToolCallArguments {
                    call: 0,
                    json: "{}".into()
                },
                Event::Finish(Some(Finish::ToolCalls)),
            ]
        );
    }
}
