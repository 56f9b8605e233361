//! Translation between OpenAI chat completions and Anthropic messages, both directions:
//! requests, complete answers, streamed events and error bodies. Each is a composition
//! through the canonical model (`crate::canonical`): parsed by one dialect
//! (`crate::dialects`), rendered by the other. Pure functions and small state machines,
//! tested without sockets.

use serde_json::Value;

pub use crate::canonical::Untranslatable;
pub use crate::dialects::anthropic::DEFAULT_MAX_TOKENS;
use crate::{
    accounting,
    dialects::{StreamUsage, anthropic, openai_chat},
};

/// An OpenAI chat completion request as an Anthropic messages request.
pub fn openai_to_anthropic_request(
    req: &Value,
    upstream_model: &str,
) -> Result<Value, Untranslatable> {
    Ok(anthropic::render_request(
        &openai_chat::parse_request(req)?,
        upstream_model,
    ))
}

/// An Anthropic messages request as an OpenAI chat completion request.
pub fn anthropic_to_openai_request(
    req: &Value,
    upstream_model: &str,
) -> Result<Value, Untranslatable> {
    Ok(openai_chat::render_request(
        &anthropic::parse_request(req)?,
        upstream_model,
    ))
}

/// An Anthropic message as an OpenAI chat completion (`model` is the name the client used).
pub fn anthropic_to_openai_response(msg: &Value, model: &str, created: i64) -> Value {
    openai_chat::render_answer(&anthropic::parse_answer(msg), model, created)
}

/// An OpenAI chat completion as an Anthropic message (`model` is the name the client used).
pub fn openai_to_anthropic_response(resp: &Value, model: &str) -> Value {
    anthropic::render_answer(&openai_chat::parse_answer(resp), model)
}

/// An OpenAI error body in Anthropic's shape.
pub fn openai_error_to_anthropic(body: &Value, status: u16) -> Value {
    anthropic::render_error(&openai_chat::parse_error(body), status)
}

/// An Anthropic error body in OpenAI's shape.
pub fn anthropic_error_to_openai(body: &Value) -> Value {
    openai_chat::render_error(&anthropic::parse_error(body))
}

/// Turns Anthropic stream events into OpenAI chat completion chunks.
#[derive(Debug)]
pub struct AnthropicToOpenAiStream {
    decoder: anthropic::StreamDecoder,
    encoder: openai_chat::StreamEncoder,
    seen: StreamUsage,
}

impl AnthropicToOpenAiStream {
    /// A translator for one stream.
    pub fn new(model: &str, created: i64, include_usage: bool) -> Self {
        Self {
            decoder: anthropic::StreamDecoder::default(),
            encoder: openai_chat::StreamEncoder::new(model, created, include_usage),
            seen: StreamUsage::default(),
        }
    }

    /// Usage reported so far (once `message_delta` has said why the answer ended).
    pub fn usage(&self) -> Option<accounting::Usage> {
        self.seen.get().map(Into::into)
    }

    /// The OpenAI `data:` payloads for one Anthropic event (`[DONE]` included at the end).
    pub fn on_event(&mut self, event: &str, data: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.decoder.on_event(event, data) {
            self.seen.note(&e);
            out.extend(self.encoder.on_event(&e));
        }
        out
    }
}

/// Turns OpenAI chat completion chunks into Anthropic stream events.
#[derive(Debug)]
pub struct OpenAiToAnthropicStream {
    decoder: openai_chat::StreamDecoder,
    encoder: anthropic::StreamEncoder,
    seen: StreamUsage,
}

impl OpenAiToAnthropicStream {
    /// A translator for one stream.
    pub fn new(model: &str) -> Self {
        Self {
            decoder: openai_chat::StreamDecoder::default(),
            encoder: anthropic::StreamEncoder::new(model),
            seen: StreamUsage::default(),
        }
    }

    /// Usage reported so far (once the upstream's usage chunk has arrived).
    pub fn usage(&self) -> Option<accounting::Usage> {
        self.seen.get().map(Into::into)
    }

    /// Anthropic `(event, data)` pairs for one OpenAI `data:` payload.
    pub fn on_data(&mut self, data: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for e in self.decoder.on_data(data) {
            self.seen.note(&e);
            out.extend(self.encoder.on_event(&e));
        }
        out
    }
}

#[cfg(test)]
mod tests;
