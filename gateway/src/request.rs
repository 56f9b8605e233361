//! The few request fields the gateway itself needs, parsed without touching the rest (the
//! original bytes are what gets forwarded).

use serde::Deserialize;

use crate::error::ApiError;

/// Fields read from an OpenAI-style request body.
#[derive(Debug, Deserialize)]
pub struct RequestHead {
    /// Client-facing model name.
    pub model: String,
    /// Whether the client wants SSE.
    #[serde(default)]
    pub stream: bool,
    /// `stream_options`.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// `max_tokens` (or its newer name), for token estimates.
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<u64>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Whether the client asked for the final usage chunk.
    #[serde(default)]
    pub include_usage: bool,
}

impl RequestHead {
    /// Whether the client asked for the usage chunk of a stream.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// Parses the head of a JSON body, with errors a client can act on.
pub fn parse_head(body: &[u8]) -> Result<RequestHead, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "The request body is empty; send a JSON object.",
            None,
        ));
    }
    serde_json::from_slice::<RequestHead>(body).map_err(|e| {
        let message = e.to_string();
        if message.contains("missing field `model`") {
            ApiError::bad_request("You must provide a model parameter.", Some("model"))
        } else if e.is_syntax() || e.is_eof() {
            ApiError::bad_request(format!("The request body is not valid JSON: {e}"), None)
        } else {
            ApiError::bad_request(format!("Invalid request: {e}"), None)
        }
    })
}

/// A rough prompt-token estimate (about four bytes per token), used for mock usage and
/// for reserving tokens before the upstream reports the real count.
pub fn estimate_prompt_tokens(body: &[u8]) -> u64 {
    (body.len() as u64).div_ceil(4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing_reads_model_stream_and_usage_flags_only() {
        let head = parse_head(br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":9}"#).unwrap();
        assert_eq!(head.model, "m");
        assert!(head.stream && head.include_usage());
        assert_eq!(head.max_tokens, Some(9));
    }

    #[test]
    fn malformed_bodies_give_actionable_400s() {
        for (body, needle) in [
            (&b""[..], "empty"),
            (b"{not json", "not valid JSON"),
            (br#"{"messages":[]}"#, "must provide a model"),
            (br#"{"model":42}"#, "Invalid request"),
        ] {
            let err = parse_head(body).unwrap_err();
            assert_eq!(err.status(), 400);
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}
