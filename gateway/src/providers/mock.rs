//! The built-in `mock` provider: deterministic OpenAI-style answers with configurable
//! latency and streaming pace, for demos, local development and load tests.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tollgate_api::config::CompiledMock;

/// What a mock call answers.
#[derive(Debug, Clone)]
pub struct MockAnswer {
    /// Completion pieces, one per output token.
    pub tokens: Vec<String>,
    /// Estimated prompt tokens.
    pub prompt_tokens: u64,
}

/// Builds the deterministic answer for a request body: the configured reply, or a short
/// text tagged with the body's digest, cut or repeated to `completion_tokens` words.
pub fn answer(settings: &CompiledMock, body: &[u8], prompt_tokens: u64) -> MockAnswer {
    let text = match &settings.reply {
        Some(reply) => reply.clone(),
        None => {
            let digest: [u8; 32] = Sha256::digest(body).into();
            let tag: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "[mock {tag}] This is a deterministic answer from the Tollgate mock provider. The quick brown fox jumps over the lazy dog."
            )
        }
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    let words = if words.is_empty() { vec!["ok"] } else { words };
    let n = settings.completion_tokens.max(1) as usize;
    let tokens = (0..n)
        .map(|i| {
            let word = words[i % words.len()];
            if i + 1 < n {
                format!("{word} ")
            } else {
                word.to_owned()
            }
        })
        .collect();
    MockAnswer {
        tokens,
        prompt_tokens,
    }
}

fn usage(answer: &MockAnswer) -> Value {
    let completion = answer.tokens.len() as u64;
    json!({
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": answer.prompt_tokens + completion,
    })
}

/// A complete `chat.completion` object.
pub fn chat_completion(answer: &MockAnswer, id: &str, model: &str, created: i64) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": answer.tokens.concat(), "refusal": null },
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage(answer),
        "system_fingerprint": "tollgate-mock",
    })
}

/// The SSE body of a streamed chat completion: a role chunk, one chunk per token, a
/// finish chunk, the usage chunk when asked for, and `[DONE]`, paced by the settings.
pub fn chat_stream(
    answer: MockAnswer,
    settings: &CompiledMock,
    id: String,
    model: String,
    created: i64,
    include_usage: bool,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let interval = Duration::from_millis(settings.chunk_interval_ms);
    let usage_value = include_usage.then(|| usage(&answer));
    let chunk = move |delta: Value, finish: Option<&str>| -> Value {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "tollgate-mock",
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut frames = Vec::with_capacity(answer.tokens.len() + 4);
    frames.push(sse(&chunk(
        json!({ "role": "assistant", "content": "" }),
        None,
    )));
    for token in &answer.tokens {
        frames.push(sse(&chunk(json!({ "content": token }), None)));
    }
    let mut finish = chunk(json!({}), Some("stop"));
    frames.push(sse(&finish));
    if let Some(u) = usage_value {
        // The usage chunk has no choices, per OpenAI's stream_options contract.
        finish["choices"] = json!([]);
        finish["usage"] = u;
        frames.push(sse(&finish));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));

    let count = frames.len();
    stream::iter(frames.into_iter().enumerate()).then(move |(i, frame)| async move {
        // Pace between content chunks only; the role chunk goes out at once.
        if i > 0 && i + 2 < count && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        frame
    })
}

/// One `data:` SSE frame.
pub fn sse(value: &Value) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut out, value).expect("a JSON value serialises");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tokens: u32) -> CompiledMock {
        CompiledMock {
            latency_ms: 0,
            chunk_interval_ms: 0,
            completion_tokens: tokens,
            reply: None,
        }
    }

    #[test]
    fn answers_are_deterministic_per_prompt_and_sized_by_completion_tokens() {
        let a = answer(&settings(5), b"hello", 2);
        let b = answer(&settings(5), b"hello", 2);
        let c = answer(&settings(5), b"other", 2);
        assert_eq!(a.tokens, b.tokens);
        assert_ne!(a.tokens, c.tokens);
        assert_eq!(a.tokens.len(), 5);
    }

    #[tokio::test]
    async fn streams_end_with_usage_then_done_when_usage_is_requested() {
        let a = answer(&settings(3), b"x", 1);
        let frames: Vec<Bytes> = chat_stream(a, &settings(3), "id".into(), "m".into(), 0, true)
            .collect()
            .await;
        let text: Vec<String> = frames
            .iter()
            .map(|f| String::from_utf8(f.to_vec()).unwrap())
            .collect();
        assert_eq!(
            text.len(),
            1 + 3 + 1 + 1 + 1,
            "role, tokens, finish, usage, done"
        );
        assert_eq!(text.last().unwrap(), "data: [DONE]\n\n");
        let usage: Value =
            serde_json::from_str(text[text.len() - 2].trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        let token: Value =
            serde_json::from_str(text[1].trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(
            token["usage"],
            Value::Null,
            "earlier chunks carry usage: null"
        );
    }

    #[tokio::test]
    async fn streams_without_usage_have_no_usage_chunk() {
        let a = answer(&settings(2), b"x", 1);
        let frames: Vec<Bytes> = chat_stream(a, &settings(2), "id".into(), "m".into(), 0, false)
            .collect()
            .await;
        assert_eq!(frames.len(), 1 + 2 + 1 + 1);
        assert!(
            !frames
                .iter()
                .any(|f| String::from_utf8_lossy(f).contains("usage"))
        );
    }
}
