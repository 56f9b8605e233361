//! The wire formats the gateway speaks, each converted to and from the canonical model
//! (`crate::canonical`) once: requests, whole answers, stream events and error bodies.
//! A client dialect and an upstream dialect are the same code: OpenAI chat completions
//! are parsed from clients and rendered for OpenAI-style upstreams by `openai_chat`.

pub mod anthropic;
pub mod openai_chat;

#[cfg(test)]
mod tests;
