//! Upstream faults, table-driven, through the real gateway: a raw TCP upstream that
//! resets connections, closes them unanswered, speaks garbage, sends headers and then
//! nothing, truncates or never ends its body, answers more than `--max-response-bytes`,
//! and streams malformed, oversized, reset or silent SSE.
//!
//! Every fault is met twice: on a route whose only target is the faulty upstream (one
//! retry), and on a route that falls back to a healthy one. Each row states what the
//! client must get, and how many calls the faulty upstream may see: retries stay within
//! the route's bound, fallback happens only before the first byte reached the client,
//! and every answer is either a well-formed success or a well-formed OpenAI error (an
//! error event, for streams already under way). The gateway serves normally afterwards.

use crate::common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Gateway, client};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const KEY: &str = "tg_upstreamFaultsClientKey00000000000000001";
/// The gateway's `--max-response-bytes`.
const MAX_RESPONSE: usize = 1 << 20;
/// Longest SSE event the gateway accepts (`sse::MAX_EVENT_BYTES`).
const MAX_EVENT: usize = 8 << 20;

/// How a stream from the faulty upstream ends.
#[derive(Clone, Copy, Debug)]
enum End {
    /// The connection is closed cleanly.
    Close,
    /// The connection is reset (RST).
    Reset,
    /// Nothing more is sent; the connection stays open.
    Silence,
}

/// What the faulty upstream does once it has read a request.
#[derive(Clone, Debug)]
enum Fault {
    /// Resets the connection (SO_LINGER 0, then close) without answering.
    Reset,
    /// Closes the connection without answering.
    Close,
    /// Answers bytes that are not HTTP.
    Garbage,
    /// Sends a 200's headers announcing a body, then nothing.
    HeadersThenSilence,
    /// Sends a 200 announcing 500 bytes, sends 100, closes.
    Truncated,
    /// A 200 whose `content-length` exceeds the gateway's limit.
    TooLong,
    /// A 200 without length whose body never ends (close-delimited).
    Endless,
    /// A 200 SSE stream of these raw bytes, ended by `End`.
    Sse(Vec<Vec<u8>>, End),
}

/// A raw TCP upstream: the first path segment picks the fault (`/{name}/v1/...`); calls
/// are counted per fault.
struct FaultyUpstream {
    addr: std::net::SocketAddr,
    calls: Arc<Mutex<HashMap<String, usize>>>,
    /// Bytes the endless body had written when the gateway stopped reading it.
    endless_written: Arc<AtomicUsize>,
}

impl FaultyUpstream {
    async fn start(faults: HashMap<String, Fault>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let endless_written = Arc::new(AtomicUsize::new(0));
        let faults = Arc::new(faults);
        let (c, w) = (calls.clone(), endless_written.clone());
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let (faults, calls, written) = (faults.clone(), c.clone(), w.clone());
                tokio::spawn(async move {
                    let _ = serve(socket, &faults, &calls, &written).await;
                });
            }
        });
        Self {
            addr,
            calls,
            endless_written,
        }
    }

    fn base_url(&self, fault: &str) -> String {
        format!("http://{}/{fault}/v1", self.addr)
    }

    fn calls(&self, fault: &str) -> usize {
        self.calls.lock().unwrap().get(fault).copied().unwrap_or(0)
    }
}

/// Reads one request (headers and `content-length` body) and answers it with its fault.
async fn serve(
    mut socket: TcpStream,
    faults: &HashMap<String, Fault>,
    calls: &Mutex<HashMap<String, usize>>,
    written: &AtomicUsize,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let name = head
        .split_whitespace()
        .nth(1)
        .and_then(|path| path.split('/').nth(1))
        .unwrap_or_default()
        .to_owned();
    *calls.lock().unwrap().entry(name.clone()).or_default() += 1;
    let Some(fault) = faults.get(&name) else {
        return Ok(());
    };
    let json = "application/json";
    match fault {
        Fault::Reset => reset(socket),
        Fault::Close => {}
        Fault::Garbage => socket.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await?,
        Fault::HeadersThenSilence => {
            ok_head(&mut socket, json, "content-length: 500").await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Fault::Truncated => {
            ok_head(&mut socket, json, "content-length: 500").await?;
            socket
                .write_all(b"{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"trunc")
                .await?;
        }
        Fault::TooLong => {
            let length = format!("content-length: {}", MAX_RESPONSE + 1);
            ok_head(&mut socket, json, &length).await?;
            socket
                .write_all(b"{\"id\":\"chatcmpl-1\",\"pad\":\"")
                .await?;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Fault::Endless => {
            ok_head(&mut socket, json, "connection: close").await?;
            let piece = vec![b'x'; 64 * 1024];
            loop {
                socket.write_all(&piece).await?;
                written.fetch_add(piece.len(), Ordering::Relaxed);
            }
        }
        Fault::Sse(frames, end) => {
            ok_head(&mut socket, "text/event-stream", "connection: close").await?;
            for frame in frames {
                socket.write_all(frame).await?;
                socket.flush().await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            match end {
                End::Close => {}
                End::Reset => reset(socket),
                End::Silence => tokio::time::sleep(Duration::from_secs(60)).await,
            }
        }
    }
    Ok(())
}

/// Writes a 200's head with this content type and framing header.
async fn ok_head(socket: &mut TcpStream, content_type: &str, framing: &str) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n{framing}\r\n\r\n");
    socket.write_all(head.as_bytes()).await
}

/// Closes with RST instead of FIN.
// A zero linger never blocks the thread on drop (the warning is about a positive one).
#[allow(deprecated)]
fn reset(socket: TcpStream) {
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    drop(socket);
}

/// One OpenAI chunk carrying `text`.
fn chunk(text: &str) -> Vec<u8> {
    format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\n\n"
    )
    .into_bytes()
}

/// What the client must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A whole OpenAI answer.
    Answer,
    /// An OpenAI error with this status and `code`.
    Error(u16, &'static str),
    /// A 200 stream that ends with `[DONE]`, carrying this text.
    Stream(&'static str),
    /// A 200 stream carrying this text first, then ending with an error event whose code
    /// is given.
    BrokenStream(&'static str, &'static str),
}

struct Row {
    name: &'static str,
    fault: Fault,
    stream: bool,
    /// On the route with only the faulty upstream and one retry.
    alone: Expect,
    /// Calls the faulty upstream sees for that request.
    alone_calls: usize,
    /// On the route falling back to a healthy upstream (one more attempt, which goes to
    /// the fallback).
    backed: Expect,
}

fn rows() -> Vec<Row> {
    let fallback = |stream| {
        if stream {
            Expect::Stream("")
        } else {
            Expect::Answer
        }
    };
    let before_first_byte = |name, fault, stream, status, code| Row {
        name,
        fault,
        stream,
        alone: Expect::Error(status, code),
        alone_calls: 2,
        backed: fallback(stream),
    };
    let garbage: Vec<Vec<u8>> = vec![
        chunk("Hel"),
        b"data: {not json\n\n".to_vec(),
        b"data: \xff\xfe\x00binary\n\n".to_vec(),
        b"a line with no field name\n\n".to_vec(),
        b"event: surprise\ndata: [1, 2, 3]\n\n".to_vec(),
        b": a comment\n\n".to_vec(),
        b"data: {\"choices\": \"not a list\"}\n\n".to_vec(),
        chunk("lo"),
        b"data: [DONE]\n\n".to_vec(),
    ];
    let mut huge = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"".to_vec();
    huge.resize(MAX_EVENT + 1024, b'x');
    vec![
        before_first_byte("reset", Fault::Reset, false, 502, "upstream_error"),
        before_first_byte("close", Fault::Close, false, 502, "upstream_error"),
        before_first_byte("garbage", Fault::Garbage, false, 502, "upstream_error"),
        before_first_byte(
            "silent-after-headers",
            Fault::HeadersThenSilence,
            false,
            504,
            "upstream_timeout",
        ),
        before_first_byte("truncated", Fault::Truncated, false, 502, "upstream_error"),
        before_first_byte("stream-reset", Fault::Reset, true, 502, "upstream_error"),
        before_first_byte(
            "stream-garbage",
            Fault::Garbage,
            true,
            502,
            "upstream_error",
        ),
        // An oversized answer would most likely be oversized again: not retried, no
        // fallback.
        Row {
            name: "too-long",
            fault: Fault::TooLong,
            stream: false,
            alone: Expect::Error(502, "upstream_error"),
            alone_calls: 1,
            backed: Expect::Error(502, "upstream_error"),
        },
        Row {
            name: "endless",
            fault: Fault::Endless,
            stream: false,
            alone: Expect::Error(502, "upstream_error"),
            alone_calls: 1,
            backed: Expect::Error(502, "upstream_error"),
        },
        // Once the stream's headers reached the client, nothing is retried elsewhere.
        Row {
            name: "malformed-sse",
            fault: Fault::Sse(garbage, End::Close),
            stream: true,
            alone: Expect::Stream("Hello"),
            alone_calls: 1,
            backed: Expect::Stream("Hello"),
        },
        Row {
            name: "reset-mid-stream",
            fault: Fault::Sse(vec![chunk("Hel")], End::Reset),
            stream: true,
            alone: Expect::BrokenStream("Hel", "upstream_stream_error"),
            alone_calls: 1,
            backed: Expect::BrokenStream("Hel", "upstream_stream_error"),
        },
        Row {
            name: "reset-after-stream-headers",
            fault: Fault::Sse(vec![], End::Reset),
            stream: true,
            alone: Expect::BrokenStream("", "upstream_stream_error"),
            alone_calls: 1,
            backed: Expect::BrokenStream("", "upstream_stream_error"),
        },
        Row {
            name: "silent-mid-stream",
            fault: Fault::Sse(vec![chunk("Hel")], End::Silence),
            stream: true,
            alone: Expect::BrokenStream("Hel", "upstream_stream_error"),
            alone_calls: 1,
            backed: Expect::BrokenStream("Hel", "upstream_stream_error"),
        },
        Row {
            name: "oversized-sse-event",
            fault: Fault::Sse(vec![chunk("Hel"), huge], End::Silence),
            stream: true,
            alone: Expect::BrokenStream("Hel", "upstream_stream_error"),
            alone_calls: 1,
            backed: Expect::BrokenStream("Hel", "upstream_stream_error"),
        },
    ]
}

/// One Provider per fault (model `alone-<fault>` and `backed-<fault>`), a healthy mock
/// Provider serving every `backed-` model, and two routes per fault.
fn config(dir: &std::path::Path, upstream: &FaultyUpstream, rows: &[Row]) {
    let mut docs = vec![
        format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: client-key}}\nstringData: {{apiKey: {KEY}}}\n"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: up, labels: {tollgate.dev/credential: 'true'}}\nstringData: {token: sk-up}\n".to_owned(),
        "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {name: client}\nspec: {owner: tests}\n".to_owned(),
    ];
    let backed: Vec<String> = rows
        .iter()
        .map(|r| format!("{{name: backed-{}}}", r.name))
        .collect();
    docs.push(format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: healthy}}\nspec:\n  type: mock\n  models: [{}]\n",
        backed.join(", ")
    ));
    for r in rows {
        let name = r.name;
        docs.push(format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: Provider\nmetadata: {{name: {name}}}\nspec:\n  type: openaiCompatible\n  baseUrl: {}\n\
             \x20 credentials: {{secretRef: {{name: up, key: token}}}}\n  models: [{{name: alone-{name}}}, {{name: backed-{name}}}]\n\
             \x20 timeouts: {{request: 500ms, streamIdle: 500ms}}\n  circuitBreaker: {{failureThreshold: 100}}\n",
            upstream.base_url(name)
        ));
        docs.push(format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: alone-{name}}}\nspec:\n  models: [alone-{name}]\n  targets: [{{provider: {name}}}]\n\
             \x20 retries: {{attempts: 1, initialBackoff: 1ms, maxBackoff: 1ms}}\n"
        ));
        docs.push(format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: backed-{name}}}\nspec:\n  models: [backed-{name}]\n\
             \x20 targets: [{{provider: {name}, priority: 0}}, {{provider: healthy, priority: 1}}]\n\
             \x20 retries: {{attempts: 1, initialBackoff: 1ms, maxBackoff: 1ms}}\n"
        ));
    }
    std::fs::write(dir.join("config.yaml"), docs.join("---\n")).unwrap();
}

/// The faulty upstream playing `rows`, and a gateway configured for them.
async fn start(rows: &[Row]) -> (FaultyUpstream, Gateway, tempfile::TempDir) {
    let faults = rows
        .iter()
        .map(|r| (r.name.to_owned(), r.fault.clone()))
        .collect();
    let upstream = FaultyUpstream::start(faults).await;
    let dir = tempfile::tempdir().unwrap();
    config(dir.path(), &upstream, rows);
    let max = MAX_RESPONSE.to_string();
    let gw = Gateway::start(&[
        "--resources",
        dir.path().to_str().unwrap(),
        "--max-response-bytes",
        &max,
    ]);
    (upstream, gw, dir)
}

/// Parses an SSE body into its data payloads, checking it is well-formed: events
/// separated by blank lines, each made of `data:` lines (or comments).
fn sse_data(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        let mut data = Vec::new();
        for line in event.lines() {
            if line.starts_with(':') {
                continue;
            }
            let value = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("a well-formed SSE line: {line:?} in {body:?}"));
            data.push(value);
        }
        if !data.is_empty() {
            out.push(data.join("\n"));
        }
    }
    out
}

/// Checks one answer against `expect`; returns a description of what went wrong.
async fn check(resp: reqwest::Response, expect: Expect) -> Result<(), String> {
    let status = resp.status().as_u16();
    let content_type = common::content_type(&resp);
    let body = resp.text().await.map_err(|e| format!("body: {e}"))?;
    let fail = |why: &str| Err(format!("{why}: {status} {content_type} {body:.300}"));
    match expect {
        Expect::Answer => {
            let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
            if status != 200 || v["object"] != "chat.completion" {
                return fail("a whole answer");
            }
        }
        Expect::Error(want, code) => {
            let Ok(v) = serde_json::from_str::<Value>(&body) else {
                return fail("a JSON error");
            };
            let e = &v["error"];
            if status != want
                || e["code"] != code
                || e["message"].as_str().is_none_or(str::is_empty)
                || !e["type"].is_string()
                || !content_type.starts_with("application/json")
            {
                return fail(&format!("an OpenAI error {want} {code}"));
            }
        }
        Expect::Stream(text) | Expect::BrokenStream(text, _) => {
            if status != 200 || !content_type.starts_with("text/event-stream") {
                return fail("a stream");
            }
            let data = sse_data(&body);
            let content: String = data
                .iter()
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|v| {
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            if !content.starts_with(text) {
                return fail(&format!("a stream carrying {text:?}, got {content:?}"));
            }
            let last = data.last().map(String::as_str).unwrap_or_default();
            match expect {
                Expect::Stream(_) if last != "[DONE]" => return fail("a stream ending in [DONE]"),
                Expect::BrokenStream(_, code) => {
                    let v: Value = serde_json::from_str(last).unwrap_or_default();
                    if v["error"]["code"] != code || !v["error"]["message"].is_string() {
                        return fail(&format!("a stream ending with an error event {code}"));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn call(gw: &Gateway, model: &str, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .timeout(Duration::from_secs(20))
        .json(&json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_fault_gets_a_well_formed_answer_bounded_retries_and_fallback_only_before_the_first_byte()
 {
    let rows = rows();
    let (upstream, gw, _dir) = start(&rows).await;

    // All rows at once: the faults must not disturb one another either.
    let results = futures_util::future::join_all(rows.iter().map(|r| {
        let (gw, upstream) = (&gw, &upstream);
        async move {
            let alone = check(
                call(gw, &format!("alone-{}", r.name), r.stream).await,
                r.alone,
            )
            .await;
            let alone_calls = upstream.calls(r.name);
            let backed = check(
                call(gw, &format!("backed-{}", r.name), r.stream).await,
                r.backed,
            )
            .await;
            let backed_calls = upstream.calls(r.name) - alone_calls;
            (r, alone, alone_calls, backed, backed_calls)
        }
    }))
    .await;

    let mut failures = Vec::new();
    for (r, alone, alone_calls, backed, backed_calls) in results {
        println!(
            "{:<28} alone: {:<9} {} call(s); with fallback: {:<9} {} call(s)",
            r.name,
            alone.is_ok(),
            alone_calls,
            backed.is_ok(),
            backed_calls
        );
        if let Err(e) = alone {
            failures.push(format!("{} (alone): {e}", r.name));
        }
        if let Err(e) = backed {
            failures.push(format!("{} (with fallback): {e}", r.name));
        }
        if alone_calls != r.alone_calls {
            failures.push(format!(
                "{}: {alone_calls} upstream calls alone, expected {}",
                r.name, r.alone_calls
            ));
        }
        if backed_calls != 1 {
            failures.push(format!(
                "{}: {backed_calls} upstream calls with a fallback, expected 1",
                r.name
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", gw.logs());

    // The endless body was abandoned near the limit, not read to the end of time.
    let written = upstream.endless_written.load(Ordering::Relaxed);
    println!("endless body: {written} bytes written before the gateway hung up");
    assert!(
        written < MAX_RESPONSE + (16 << 20),
        "the gateway stopped reading an endless body: {written} bytes"
    );

    // The gateway still serves, and stayed alive throughout.
    assert_eq!(call(&gw, "backed-reset", false).await.status(), 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("outcome=\"too_large\""),
        "oversized answers are counted as such"
    );
}

/// A translated stream (an Anthropic client, an OpenAI upstream) stays well-formed
/// whatever malformed frames the upstream sends: every event is named, its data is JSON,
/// and the stream ends with `message_stop` carrying the text that did arrive.
#[tokio::test]
async fn malformed_upstream_frames_never_break_a_translated_stream() {
    let rows: Vec<Row> = rows()
        .into_iter()
        .filter(|r| r.name == "malformed-sse")
        .collect();
    let (_upstream, gw, _dir) = start(&rows).await;
    let resp = client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(
            &json!({"model": "alone-malformed-sse", "max_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let mut names = Vec::new();
    let mut text = String::new();
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let name = event
            .lines()
            .find_map(|l| l.strip_prefix("event: "))
            .unwrap_or_else(|| panic!("every event is named: {event:?}"));
        let data = event
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap_or_else(|| panic!("every event has data: {event:?}"));
        let data: Value = serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("every event's data is JSON ({e}): {data:?}"));
        assert_eq!(data["type"], name, "{event}");
        if let Some(t) = data["delta"]["text"].as_str() {
            text.push_str(t);
        }
        names.push(name.to_owned());
    }
    assert_eq!(text, "Hello", "{body}");
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(
        names.last().map(String::as_str),
        Some("message_stop"),
        "{body}"
    );
}
