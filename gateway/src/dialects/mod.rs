//! The wire formats the gateway speaks, each converted to and from the canonical model
//! (`crate::canonical`) once: requests, whole answers, stream events and error bodies.
//! A client dialect and an upstream dialect are the same code: OpenAI chat completions
//! are parsed from clients and rendered for OpenAI-style upstreams by `openai_chat`.

pub mod anthropic;
pub mod openai_chat;
pub mod responses;

use serde_json::Value;

use crate::canonical::{Answer, ErrorBody, Event, Request, Untranslatable};

/// What a client asks for (the endpoint it called).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `/chat/completions`.
    ChatCompletions,
    /// `/completions` (legacy text completions).
    Completions,
    /// `/embeddings`.
    Embeddings,
    /// Anthropic's `/messages` (the client speaks Anthropic).
    Messages,
    /// OpenAI's `/responses` (the client speaks the Responses API).
    Responses,
    /// `/moderations`.
    Moderations,
    /// `/images/generations`.
    ImageGenerations,
    /// `/audio/speech`: text to speech, answered with audio.
    AudioSpeech,
    /// `/audio/transcriptions`: a multipart upload of audio, answered with text.
    AudioTranscriptions,
    /// Anthropic's `/messages/count_tokens`: answered by an Anthropic target or
    /// estimated, never generating anything.
    CountTokens,
}

/// A wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI chat completions and friends.
    OpenAi,
    /// Anthropic messages.
    Anthropic,
    /// OpenAI's Responses API.
    Responses,
}

impl Operation {
    /// Every operation, in declaration order (`op as usize` indexes this).
    pub const ALL: [Self; 10] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Messages,
        Self::Responses,
        Self::Moderations,
        Self::ImageGenerations,
        Self::AudioSpeech,
        Self::AudioTranscriptions,
        Self::CountTokens,
    ];

    /// The name in logs.
    /// `gen_ai.operation.name`.
    pub fn genai_operation(self) -> &'static str {
        match self {
            Self::ChatCompletions | Self::Messages | Self::Responses => "chat",
            Self::Completions => "text_completion",
            Self::Embeddings => "embeddings",
            Self::Moderations => "moderation",
            Self::ImageGenerations => "image_generation",
            Self::AudioSpeech => "text_to_speech",
            Self::AudioTranscriptions => "transcription",
            Self::CountTokens => "count_tokens",
        }
    }

    pub fn label_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Messages => "messages",
            Self::Responses => "responses",
            Self::Moderations => "moderations",
            Self::ImageGenerations => "images_generations",
            Self::AudioSpeech => "audio_speech",
            Self::AudioTranscriptions => "audio_transcriptions",
            Self::CountTokens => "count_tokens",
        }
    }

    /// The wire format the client speaks.
    pub fn client_dialect(self) -> Dialect {
        match self {
            Self::Messages | Self::CountTokens => Dialect::Anthropic,
            Self::Responses => Dialect::Responses,
            Self::ChatCompletions
            | Self::Completions
            | Self::Embeddings
            | Self::Moderations
            | Self::ImageGenerations
            | Self::AudioSpeech
            | Self::AudioTranscriptions => Dialect::OpenAi,
        }
    }

    /// Whether the endpoint is forwarded as it is: never translated, sent only to
    /// Providers that serve it themselves, its answer (JSON, audio or an event stream)
    /// relayed byte for byte (`crate::passthrough`).
    pub fn is_raw(self) -> bool {
        matches!(
            self,
            Self::Moderations
                | Self::ImageGenerations
                | Self::AudioSpeech
                | Self::AudioTranscriptions
        )
    }

    /// The model OpenAI assumes when a request names none, where the API makes `model`
    /// optional (the gateway routes on it).
    pub fn default_model(self) -> Option<&'static str> {
        match self {
            Self::Moderations => Some("omni-moderation-latest"),
            Self::ImageGenerations => Some("dall-e-2"),
            _ => None,
        }
    }

    /// Whether the operation generates text (a chat in some dialect), so it can be
    /// translated to any dialect's chat.
    pub fn is_chat(self) -> bool {
        matches!(
            self,
            Self::ChatCompletions | Self::Messages | Self::Responses
        )
    }
}

impl Dialect {
    /// A request body in this dialect, in the canonical model.
    pub fn parse_request(self, body: &Value) -> Result<Request, Untranslatable> {
        match self {
            Self::OpenAi => openai_chat::parse_request(body),
            Self::Anthropic => anthropic::parse_request(body),
            Self::Responses => responses::parse_request(body),
        }
    }

    /// A canonical request in this dialect, for `model`.
    pub fn render_request(self, request: &Request, model: &str) -> Value {
        match self {
            Self::OpenAi => openai_chat::render_request(request, model),
            Self::Anthropic => anthropic::render_request(request, model),
            Self::Responses => responses::render_request(request, model),
        }
    }

    /// A whole answer in this dialect, in the canonical model.
    pub fn parse_answer(self, body: &Value) -> Answer {
        match self {
            Self::OpenAi => openai_chat::parse_answer(body),
            Self::Anthropic => anthropic::parse_answer(body),
            Self::Responses => responses::parse_answer(body),
        }
    }

    /// An error body in this dialect, in the canonical model.
    pub fn parse_error(self, body: &Value) -> ErrorBody {
        match self {
            Self::OpenAi | Self::Responses => openai_chat::parse_error(body),
            Self::Anthropic => anthropic::parse_error(body),
        }
    }
}

/// What a client of some dialect is answered with: its dialect and what its answers
/// echo (the model name it asked for, and for the Responses API its request).
#[derive(Debug, Clone)]
pub struct Client {
    /// The client's dialect.
    pub dialect: Dialect,
    /// The model name the client asked for.
    pub model: String,
    /// Whether an OpenAI chat client asked for the usage chunk.
    pub include_usage: bool,
    /// A Responses client's request, echoed in its response objects.
    pub echo: Option<Box<responses::Echo>>,
    /// The tool standing in for the structured output the client asked for, on an
    /// upstream without it (`Request::output_as_tool`): its call is the answer's text.
    pub answer_tool: Option<String>,
}

impl Client {
    /// What a Responses client's answers echo (its model alone when the request was not
    /// kept).
    fn echo(&self) -> responses::Echo {
        self.echo
            .as_deref()
            .cloned()
            .unwrap_or_else(|| responses::Echo {
                model: self.model.clone(),
                ..Default::default()
            })
    }

    /// A canonical answer as this client's whole answer body.
    pub fn render_answer(&self, answer: &Answer, created: i64) -> Value {
        if let Some(tool) = &self.answer_tool {
            let mut answer = answer.clone();
            answer.tool_as_output(tool);
            let client = Self {
                answer_tool: None,
                ..self.clone()
            };
            return client.render_answer(&answer, created);
        }
        match self.dialect {
            Dialect::OpenAi => openai_chat::render_answer(answer, &self.model, created),
            Dialect::Anthropic => anthropic::render_answer(answer, &self.model),
            Dialect::Responses => responses::render_answer(answer, &self.echo(), created),
        }
    }

    /// A canonical error as this client's error body (`status`: the HTTP status).
    pub fn render_error(&self, error: &ErrorBody, status: u16) -> Value {
        match self.dialect {
            Dialect::OpenAi => openai_chat::render_error(error),
            Dialect::Anthropic => anthropic::render_error(error, status),
            Dialect::Responses => responses::render_error(error),
        }
    }

    /// An encoder of canonical stream events for this client.
    pub fn encoder(&self, created: i64) -> Encoder {
        match self.dialect {
            Dialect::OpenAi => Encoder::OpenAi(openai_chat::StreamEncoder::new(
                &self.model,
                created,
                self.include_usage,
            )),
            Dialect::Anthropic => Encoder::Anthropic(anthropic::StreamEncoder::new(&self.model)),
            Dialect::Responses => Encoder::Responses(Box::new(responses::StreamEncoder::new(
                self.echo(),
                created,
            ))),
        }
    }
}

/// What a translated stream has said of its usage: the counts, once the upstream said
/// why it finished and sent non-zero counts (before that, an estimate stands in).
#[derive(Debug, Default)]
pub struct StreamUsage {
    usage: crate::canonical::Usage,
    finished: bool,
    counted: bool,
}

impl StreamUsage {
    /// Takes note of one canonical event.
    pub fn note(&mut self, event: &Event) {
        match event {
            Event::Start {
                input: Some(input), ..
            } => self.usage.input = *input,
            Event::Usage(usage) => {
                self.usage = *usage;
                self.counted |= usage.input > 0 || usage.output > 0;
            }
            Event::Finish(_) => self.finished = true,
            _ => {}
        }
    }

    /// The usage to account, once known.
    pub fn get(&self) -> Option<crate::canonical::Usage> {
        (self.finished && self.counted).then_some(self.usage)
    }
}

/// Reads an upstream stream of some dialect as canonical events.
#[derive(Debug)]
pub enum Decoder {
    /// Chat completion chunks.
    OpenAi(openai_chat::StreamDecoder),
    /// Messages events.
    Anthropic(anthropic::StreamDecoder),
    /// Responses events.
    Responses(responses::StreamDecoder),
}

impl Decoder {
    /// A decoder for a stream in `dialect`.
    pub fn new(dialect: Dialect) -> Self {
        match dialect {
            Dialect::OpenAi => Self::OpenAi(Default::default()),
            Dialect::Anthropic => Self::Anthropic(Default::default()),
            Dialect::Responses => Self::Responses(Default::default()),
        }
    }

    /// The canonical events of one SSE event (`name`: its `event:` line, if any).
    pub fn on_event(&mut self, name: Option<&str>, data: &str) -> Vec<Event> {
        match self {
            Self::OpenAi(d) => d.on_data(data),
            Self::Anthropic(d) => {
                let value: Value = serde_json::from_str(data).unwrap_or_default();
                let name = name
                    .or_else(|| value["type"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                d.on_event(&name, &value)
            }
            Self::Responses(d) => {
                let value: Value = serde_json::from_str(data).unwrap_or_default();
                d.on_event(&value)
            }
        }
    }
}

/// Writes canonical events as a client's stream.
#[derive(Debug)]
pub enum Encoder {
    /// Chat completion chunks.
    OpenAi(openai_chat::StreamEncoder),
    /// Messages events.
    Anthropic(anthropic::StreamEncoder),
    /// Responses events.
    Responses(Box<responses::StreamEncoder>),
}

impl Encoder {
    /// The SSE events (`event:` name, if any, and `data:`) for one canonical event.
    pub fn on_event(&mut self, event: &Event) -> Vec<(Option<String>, String)> {
        match self {
            Self::OpenAi(e) => e.on_event(event).into_iter().map(|d| (None, d)).collect(),
            Self::Anthropic(e) => e
                .on_event(event)
                .into_iter()
                .map(|(name, data)| (Some(name), data.to_string()))
                .collect(),
            Self::Responses(e) => e
                .on_event(event)
                .into_iter()
                .map(|(name, data)| (Some(name), data.to_string()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests;
