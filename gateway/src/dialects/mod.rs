//! The wire formats the gateway speaks, each converted to and from the canonical model
//! (`crate::canonical`) once: requests, whole answers, stream events and error bodies.
//! A client dialect and an upstream dialect are the same code: OpenAI chat completions
//! are parsed from clients and rendered for OpenAI-style upstreams by `openai_chat`.

pub mod anthropic;
pub mod openai_chat;

use serde_json::Value;

use crate::canonical::{Request, Untranslatable};

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
}

/// A wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI chat completions and friends.
    OpenAi,
    /// Anthropic messages.
    Anthropic,
}

impl Operation {
    /// Every operation, in declaration order (`op as usize` indexes this).
    pub const ALL: [Self; 4] = [
        Self::ChatCompletions,
        Self::Completions,
        Self::Embeddings,
        Self::Messages,
    ];

    /// The name in logs.
    /// `gen_ai.operation.name`.
    pub fn genai_operation(self) -> &'static str {
        match self {
            Self::ChatCompletions | Self::Messages => "chat",
            Self::Completions => "text_completion",
            Self::Embeddings => "embeddings",
        }
    }

    pub fn label_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Messages => "messages",
        }
    }

    /// The wire format the client speaks.
    pub fn client_dialect(self) -> Dialect {
        if self == Self::Messages {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }
}

impl Dialect {
    /// A request body in this dialect, in the canonical model.
    pub fn parse_request(self, body: &Value) -> Result<Request, Untranslatable> {
        match self {
            Self::OpenAi => openai_chat::parse_request(body),
            Self::Anthropic => anthropic::parse_request(body),
        }
    }

    /// A canonical request in this dialect, for `model`.
    pub fn render_request(self, request: &Request, model: &str) -> Value {
        match self {
            Self::OpenAi => openai_chat::render_request(request, model),
            Self::Anthropic => anthropic::render_request(request, model),
        }
    }
}

#[cfg(test)]
mod tests;
