//! Answers of the endpoints the gateway forwards as they are (`Operation::is_raw`:
//! moderations, image generations, text to speech, transcriptions): relayed byte for byte
//! as they arrive, whatever they are (JSON, audio, an event stream), with the upstream's
//! content type, never held whole in memory (a generated image or a long speech can be
//! tens of megabytes). The usage the answer reports, when it reports one in tokens (an
//! image model's `usage`, a transcription model's, a `*.done` / `*.completed` event's),
//! is read from its last bytes and settles the request's accounting.

use std::time::Duration;

use axum::{body::Body, response::Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use http::{HeaderValue, header};

use crate::{
    accounting::{Usage, usage_from_value},
    relay::{Ending, StreamEnd, StreamGuards},
};

/// How many of an answer's last bytes are kept to find its usage in: an answer's `usage`
/// object comes last (in the JSON body, or in the final event of a stream).
const TAIL: usize = 16 * 1024;

/// The last chunks of an answer, at least [`TAIL`] bytes of them when it had that many
/// (held by reference, not copied: relaying costs no copy), and the usage they hold.
#[derive(Debug, Default)]
pub struct UsageTail {
    chunks: std::collections::VecDeque<Bytes>,
    len: usize,
}

impl UsageTail {
    /// Keeps `chunk`, and forgets the chunks no longer needed for the last [`TAIL`] bytes.
    pub fn feed(&mut self, chunk: &Bytes) {
        self.chunks.push_back(chunk.clone());
        self.len += chunk.len();
        while let Some(first) = self.chunks.front() {
            if self.len - first.len() < TAIL {
                break;
            }
            self.len -= first.len();
            self.chunks.pop_front();
        }
    }

    /// The usage of the last `"usage": {…}` member in the last [`TAIL`] bytes, when it
    /// counts tokens (a transcription billed by duration reports seconds, not tokens:
    /// `None`).
    pub fn usage(&self) -> Option<Usage> {
        let mut all = Vec::with_capacity(self.len);
        for c in &self.chunks {
            all.extend_from_slice(c);
        }
        let tail = &all[all.len().saturating_sub(TAIL)..];
        Self::usage_in(tail)
    }

    fn usage_in(tail: &[u8]) -> Option<Usage> {
        const NAME: &[u8] = b"\"usage\"";
        let mut end = tail.len();
        while let Some(at) = tail[..end].windows(NAME.len()).rposition(|w| w == NAME) {
            end = at;
            // `\"usage\"` is text inside a string, not a member name.
            if at > 0 && tail[at - 1] == b'\\' {
                continue;
            }
            let rest = &tail[at + NAME.len()..];
            let rest = rest.trim_ascii_start();
            let Some(value) = rest.strip_prefix(b":") else {
                continue;
            };
            let mut values =
                serde_json::Deserializer::from_slice(value).into_iter::<serde_json::Value>();
            if let Some(Ok(usage)) = values.next() {
                return usage_from_value(&usage);
            }
        }
        None
    }
}

/// Relays `upstream`'s answer (status 2xx, checked by the caller) to the client as it
/// comes. `idle` bounds the wait for each chunk; an upstream that breaks or goes silent
/// ends the client's body with an error (the connection is cut: a binary answer has no
/// room for an error event). `guards` are held until the body ends or the client goes
/// away; the accounting settles then, with the usage found at the end of the answer.
pub fn relay(upstream: reqwest::Response, idle: Duration, guards: StreamGuards) -> Response {
    let status = upstream.status();
    let content_type = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    let ending = Ending::default();
    let body = chunks(upstream.bytes_stream(), idle, guards, ending.clone());
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response.extensions_mut().insert(ending);
    response
}

fn chunks<S>(
    upstream: S,
    idle: Duration,
    guards: StreamGuards,
    ending: Ending,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    let state = (upstream, guards, UsageTail::default(), false);
    stream::unfold(state, move |(mut s, mut guards, mut tail, done)| {
        let ending = ending.clone();
        async move {
            if done {
                return None;
            }
            let why = match tokio::time::timeout(idle, s.next()).await {
                Ok(Some(Ok(bytes))) => {
                    if let Some(fb) = guards.first_byte.take() {
                        fb.observe();
                    }
                    if let Some(f) = guards.feedback.as_mut() {
                        f.first_token();
                    }
                    tail.feed(&bytes);
                    return Some((Ok(bytes), (s, guards, tail, false)));
                }
                Ok(None) => {
                    if let (Some(usage), Some(a)) = (tail.usage(), guards.accounting.as_mut()) {
                        a.report(usage);
                    }
                    ending.set(StreamEnd::Complete);
                    if let Some(f) = guards.feedback.take() {
                        f.completed();
                    }
                    // Dropping the guards settles the accounting and frees the slot.
                    drop(guards);
                    return None;
                }
                Ok(Some(Err(_))) => "the upstream answer was interrupted",
                Err(_) => "the upstream answer went silent and was abandoned",
            };
            ending.set(StreamEnd::Failed);
            if let Some(f) = guards.feedback.take() {
                f.failed();
            }
            tracing::warn!(why, "relayed answer cut short");
            Some((Err(std::io::Error::other(why)), (s, guards, tail, true)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage_of(chunks: &[&[u8]]) -> Option<Usage> {
        let mut tail = UsageTail::default();
        for c in chunks {
            tail.feed(&Bytes::copy_from_slice(c));
        }
        assert!(
            tail.chunks.len() <= 2 || tail.len - tail.chunks[0].len() < TAIL,
            "no more chunks kept than the tail needs"
        );
        tail.usage()
    }

    #[test]
    fn usage_is_found_at_the_end_of_json_answers_and_event_streams() {
        // An image answer, pretty-printed as OpenAI sends it, after a large base64 image.
        let image = "A".repeat(3 * TAIL);
        let body = format!(
            "{{\n  \"created\": 1,\n  \"data\": [{{\"b64_json\": \"{image}\"}}],\n  \"usage\": {{\n    \"input_tokens\": 50,\n    \"output_tokens\": 4160,\n    \"total_tokens\": 4210,\n    \"input_tokens_details\": {{\"text_tokens\": 50, \"image_tokens\": 0}}\n  }}\n}}\n"
        );
        let (a, b) = body.as_bytes().split_at(TAIL + 7);
        let u = usage_of(&[a, b]).unwrap();
        assert_eq!((u.prompt, u.completion), (50, 4160));
        // A transcription stream's final event, after many deltas.
        let mut stream = Vec::new();
        for _ in 0..2000 {
            stream.extend_from_slice(
                b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"word \"}\n\n",
            );
        }
        stream.extend_from_slice(b"data: {\"type\":\"transcript.text.done\",\"text\":\"...\",\"usage\":{\"type\":\"tokens\",\"input_tokens\":14,\"output_tokens\":45,\"total_tokens\":59}}\n\n");
        let chunks: Vec<&[u8]> = stream.chunks(1000).collect();
        let u = usage_of(&chunks).unwrap();
        assert_eq!((u.prompt, u.completion), (14, 45));
    }

    #[test]
    fn text_that_mentions_usage_and_duration_usage_are_not_token_usage() {
        // Inside a string, the quotes are escaped: not a member.
        assert_eq!(
            usage_of(&[br#"{"text":"say \"usage\": {\"input_tokens\": 999999}"}"#]),
            None
        );
        // whisper-1 reports seconds.
        assert_eq!(
            usage_of(&[br#"{"text":"hi","usage":{"type":"duration","seconds":3}}"#]),
            None
        );
        // Binary audio with no usage at all.
        assert_eq!(usage_of(&[&[0xff, 0xfb, 0x90, 0x00][..]; 10]), None);
        // A usage member cut off by the end of the answer is no usage.
        assert_eq!(usage_of(&[br#"{"usage":{"input_tokens":5,"#]), None);
    }
}
