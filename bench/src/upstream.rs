//! The mock upstream: an OpenAI-compatible chat completions server that does as little
//! as possible, so the figures measure the proxy in front of it.
//!
//! The answer's shape is chosen by the request path, so one server serves every
//! scenario and every provider of the gateway's configuration points at its own prefix:
//!
//! `/{size}/{delay_ms}/{chunks}/{interval_ms}/v1/chat/completions`
//!
//! - `size`: `small` (a ~1 KB completion) or `large` (~10 KB);
//! - `delay_ms`: wait before the answer (or before the first chunk);
//! - `chunks`: 0 answers one JSON body; more answers an SSE stream of that many content
//!   chunks, then the finish chunk, the usage chunk and `[DONE]`;
//! - `interval_ms`: pause between chunks.
//!
//! The same prefix serves `v1/audio/speech` (`chunks` binary chunks of 64 KiB, as audio)
//! and `v1/audio/transcriptions` (a short transcript with token usage, once the upload is
//! read).
//!
//! Request bodies are read to the end and dropped frame by frame, never parsed.
//!
//! It speaks HTTP/1.1 with keep-alive, and HTTP/2 with prior knowledge (h2c).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

/// The canned answers.
#[derive(Debug)]
struct Answers {
    small: Bytes,
    large: Bytes,
    chunk: Bytes,
    tail: Bytes,
    /// 64 KiB of "audio".
    audio: Bytes,
    transcript: Bytes,
}

/// A chat completion whose content pads the body to about `bytes`.
fn completion(bytes: usize) -> Bytes {
    let head = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":""#;
    let tail = r#""},"finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":24,"completion_tokens":200,"total_tokens":224},"system_fingerprint":"fp_bench"}"#;
    let filler = "The quick brown fox jumps over the lazy dog. ";
    let mut content = String::new();
    while head.len() + content.len() + tail.len() < bytes {
        content.push_str(filler);
    }
    content.truncate(bytes.saturating_sub(head.len() + tail.len()));
    Bytes::from(format!("{head}{content}{tail}"))
}

impl Answers {
    fn new() -> Self {
        let chunk = r#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench-model","choices":[{"index":0,"delta":{"content":"token "},"finish_reason":null}]}"#;
        let finish = r#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        let usage = r#"data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench-model","choices":[],"usage":{"prompt_tokens":24,"completion_tokens":20,"total_tokens":44}}"#;
        Self {
            small: completion(1024),
            large: completion(10 * 1024),
            chunk: Bytes::from(format!("{chunk}\n\n")),
            tail: Bytes::from(format!("{finish}\n\n{usage}\n\ndata: [DONE]\n\n")),
            audio: Bytes::from((0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
            transcript: Bytes::from_static(
                br#"{"text":"bench transcript","usage":{"type":"tokens","input_tokens":120,"output_tokens":4,"total_tokens":124}}"#,
            ),
        }
    }
}

/// What a path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    large: bool,
    delay: Duration,
    chunks: u32,
    interval: Duration,
}

fn shape(path: &str) -> Option<Shape> {
    let mut parts = path.trim_start_matches('/').splitn(5, '/');
    let large = match parts.next()? {
        "small" => false,
        "large" => true,
        _ => return None,
    };
    let delay = Duration::from_millis(parts.next()?.parse().ok()?);
    let chunks = parts.next()?.parse().ok()?;
    let interval = Duration::from_millis(parts.next()?.parse().ok()?);
    parts.next().filter(|rest| rest.starts_with("v1/"))?;
    Some(Shape {
        large,
        delay,
        chunks,
        interval,
    })
}

async fn answer(answers: Arc<Answers>, req: Request<Incoming>) -> Response<Body> {
    let Some(shape) = shape(req.uri().path()) else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "application/json")
            .body(
                Full::new(Bytes::from_static(
                    br#"{"error":{"message":"unknown path","type":"invalid_request_error"}}"#,
                ))
                .boxed(),
            )
            .unwrap_or_default();
    };
    // Read the whole request, as a real server would before answering, dropping each
    // frame as it comes: the hostile scenario sends many 30 MiB bodies at once, and the
    // mock neither parses nor keeps them.
    let speech = req.uri().path().ends_with("/v1/audio/speech");
    let transcription = req.uri().path().ends_with("/v1/audio/transcriptions");
    let mut body = req.into_body();
    while let Some(Ok(_)) = body.frame().await {}
    if !shape.delay.is_zero() {
        tokio::time::sleep(shape.delay).await;
    }
    if transcription {
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(answers.transcript.clone()).boxed())
            .unwrap_or_default();
    }
    if speech {
        let audio = answers.audio.clone();
        let frames = stream::iter(
            (0..shape.chunks).map(move |_| Ok::<_, Infallible>(Frame::data(audio.clone()))),
        );
        return Response::builder()
            .header(header::CONTENT_TYPE, "audio/mpeg")
            .body(BodyExt::boxed(StreamBody::new(frames)))
            .unwrap_or_default();
    }
    if shape.chunks == 0 {
        let body = if shape.large {
            answers.large.clone()
        } else {
            answers.small.clone()
        };
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body).boxed())
            .unwrap_or_default();
    }
    let frames = stream::unfold(0u32, move |sent| {
        let answers = answers.clone();
        async move {
            if sent > shape.chunks {
                return None;
            }
            if sent == shape.chunks {
                return Some((Ok(Frame::data(answers.tail.clone())), sent + 1));
            }
            if sent > 0 && !shape.interval.is_zero() {
                tokio::time::sleep(shape.interval).await;
            }
            Some((Ok(Frame::data(answers.chunk.clone())), sent + 1))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap_or_default()
}

/// Serves forever on `listener`.
pub async fn serve(listener: TcpListener) {
    let answers = Arc::new(Answers::new());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Thousands of streams may share one HTTP/2 connection from the gateway, and when
    // clients go away the gateway resets thousands at once: no "too many resets" GOAWAY.
    builder
        .http2()
        .max_concurrent_streams(100_000)
        .max_pending_accept_reset_streams(usize::MAX)
        .max_local_error_reset_streams(None);
    let builder = Arc::new(builder);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let answers = answers.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answers = answers.clone();
                async move { Ok::<_, Infallible>(answer(answers, req).await) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds `addr` and serves on a runtime of `threads` worker threads (blocking).
pub fn run(addr: SocketAddr, threads: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(addr).await?;
        eprintln!("mock upstream listening on {}", listener.local_addr()?);
        serve(listener).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_choose_the_answer() {
        assert_eq!(
            shape("/large/1000/0/0/v1/chat/completions"),
            Some(Shape {
                large: true,
                delay: Duration::from_secs(1),
                chunks: 0,
                interval: Duration::ZERO
            })
        );
        assert_eq!(
            shape("/small/0/20/5/v1/chat/completions").map(|s| (s.chunks, s.interval)),
            Some((20, Duration::from_millis(5)))
        );
        assert_eq!(shape("/v1/chat/completions"), None);
        assert_eq!(shape("/small/x/0/0/v1/chat/completions"), None);
    }

    #[test]
    fn answers_are_valid_json_of_the_promised_size() {
        let answers = Answers::new();
        for (body, size) in [(&answers.small, 1024), (&answers.large, 10 * 1024)] {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 200);
            assert!(
                (size - 8..=size + 8).contains(&body.len()),
                "{}",
                body.len()
            );
        }
        for event in std::str::from_utf8(&answers.tail)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty() && *e != "data: [DONE]")
        {
            let _: serde_json::Value =
                serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        }
    }
}
