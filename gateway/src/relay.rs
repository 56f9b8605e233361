//! Relaying an upstream answer to the client: whole bodies, and SSE streams passed on
//! event by event as they arrive, translated between dialects when needed, with usage
//! recorded for accounting and an error event (never a silent cut) when the upstream
//! breaks or goes silent.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{body::Body, response::Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::{
    accounting::{Accounting, Usage, usage_from_body, usage_from_value},
    canonical::Event,
    dialects::{Client, Decoder, Dialect, Encoder, StreamUsage, responses},
    metrics::{Metrics, RouteLabels},
    request::RequestHead,
    sse,
};

/// How an upstream answer is rewritten for the client.
#[derive(Debug, Clone)]
pub enum Conversion {
    /// The client and the upstream speak the same dialect: the upstream's bytes as they
    /// come, except, for OpenAI chat, the usage chunk the gateway asked for and the client
    /// did not (`strip_usage`).
    Passthrough {
        /// The dialect both speak.
        dialect: Dialect,
        /// Drop the usage-only chunk.
        strip_usage: bool,
    },
    /// Through the canonical model: parsed in the upstream's dialect, rendered in the
    /// client's.
    Translate {
        /// The upstream's dialect.
        upstream: Dialect,
        /// The client, and what its answers echo.
        client: Box<Client>,
    },
}

impl Conversion {
    /// The conversion from an `upstream` dialect to `client`; `injected_usage` says
    /// whether the gateway added `stream_options.include_usage` to the upstream request.
    pub fn between(client: Client, upstream: Dialect, injected_usage: bool) -> Self {
        if client.dialect == upstream {
            Self::Passthrough {
                dialect: upstream,
                strip_usage: injected_usage,
            }
        } else {
            Self::Translate {
                upstream,
                client: Box::new(client),
            }
        }
    }

    /// Bytes passed through as they are, in `dialect`.
    pub fn passthrough(dialect: Dialect) -> Self {
        Self::Passthrough {
            dialect,
            strip_usage: false,
        }
    }

    /// The conversion a client of `head`'s request in `client` gets from `upstream`.
    pub fn for_request(client: Dialect, upstream: Dialect, head: &RequestHead) -> Self {
        Self::between(
            Client {
                dialect: client,
                model: head.model.clone(),
                include_usage: head.include_usage(),
                echo: None,
                answer_tool: None,
            },
            upstream,
            false,
        )
    }

    fn translates(&self) -> bool {
        matches!(self, Self::Translate { .. })
    }

    pub(crate) fn client_dialect(&self) -> Dialect {
        match self {
            Self::Passthrough { dialect, .. } => *dialect,
            Self::Translate { client, .. } => client.dialect,
        }
    }

    /// Rewrites a complete JSON body (answer or error) for the client.
    fn body(&self, status: StatusCode, bytes: Bytes) -> Bytes {
        let Self::Translate { upstream, client } = self else {
            return bytes;
        };
        let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
            return bytes;
        };
        let out = if status.is_success() {
            client.render_answer(
                &upstream.parse_answer(&value),
                jiff::Timestamp::now().as_second(),
            )
        } else {
            client.render_error(&upstream.parse_error(&value), status.as_u16())
        };
        Bytes::from(out.to_string())
    }
}

/// Read a whole upstream body within `deadline`.
#[derive(Debug)]
pub enum WholeError {
    /// The deadline passed.
    Timeout,
    /// The connection failed mid-body.
    Broken,
    /// The body is larger than the limit.
    TooLarge,
}

/// Relays a complete (non-streamed) upstream answer of at most `limit` bytes, recording
/// its usage.
pub async fn whole(
    response: reqwest::Response,
    deadline: Instant,
    limit: usize,
    conversion: &Conversion,
    accounting: Option<&mut Accounting>,
    remember: Option<&crate::stored_responses::Remember>,
) -> Result<Response, WholeError> {
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let remaining = deadline.saturating_duration_since(Instant::now());
    let bytes = match tokio::time::timeout(remaining, read_at_most(response, limit)).await {
        Err(_) => return Err(WholeError::Timeout),
        Ok(result) => result?,
    };
    if let Some(remember) = remember
        && status.is_success()
    {
        remember.body(&bytes);
    }
    let bytes = conversion.body(status, bytes);
    if let Some(accounting) = accounting
        && status.is_success()
        && let Some(usage) = usage_from_body(&bytes)
    {
        accounting.report(usage);
    }
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    let content_type = if conversion.translates() {
        None
    } else {
        content_type
    };
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or_else(|| HeaderValue::from_static("application/json")),
    );
    Ok(out)
}

/// Longest upstream error body read; the rest is not needed to say what went wrong.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Longest error message relayed from an upstream.
const MAX_ERROR_MESSAGE: usize = 2_000;

/// Relays an upstream's refusal (a non-2xx other than those the gateway answers itself)
/// as a fresh error body in the client's dialect: the upstream's status, and its message,
/// type and code when it gave them, with every `secrets` value (the Provider's credential
/// and extra header values) cut out. Nothing else of the upstream body reaches the client,
/// so an upstream that echoes request headers into its errors leaks nothing.
pub async fn upstream_error(
    response: reqwest::Response,
    deadline: Instant,
    conversion: &Conversion,
    secrets: &[&str],
) -> Result<Response, WholeError> {
    let status = response.status();
    let remaining = deadline.saturating_duration_since(Instant::now());
    let bytes = match tokio::time::timeout(remaining, read_at_most(response, MAX_ERROR_BODY)).await
    {
        Err(_) => return Err(WholeError::Timeout),
        Ok(Err(WholeError::TooLarge)) => Bytes::new(),
        Ok(result) => result?,
    };
    let body = error_body(status, &bytes, conversion.client_dialect(), secrets);
    let mut out = Response::new(Body::from(body.to_string()));
    *out.status_mut() = status;
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(out)
}

/// The error body for an upstream refusal (see [`upstream_error`]).
pub fn error_body(status: StatusCode, bytes: &[u8], dialect: Dialect, secrets: &[&str]) -> Value {
    let upstream: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let error = &upstream["error"];
    // OpenAI: {"error": {message, type, code, param}}; Anthropic: {"type": "error",
    // "error": {type, message}}.
    let text = |v: &Value| {
        v.as_str()
            .map(|t| redact(t, secrets))
            .filter(|t| !t.is_empty())
    };
    let message = text(&error["message"]).unwrap_or_else(|| {
        format!(
            "The upstream provider refused the request with HTTP {}.",
            status.as_u16()
        )
    });
    let kind = text(&error["type"]).filter(|t| is_token(t));
    let code = match &error["code"] {
        Value::Number(n) => Some(n.to_string()),
        other => text(other).filter(|t| is_token(t)),
    };
    let param = text(&error["param"]).filter(|t| t.len() <= 200);
    match dialect {
        Dialect::OpenAi | Dialect::Responses => json!({"error": {
            "message": message,
            "type": kind.unwrap_or_else(|| "upstream_error".to_owned()),
            "param": param,
            "code": code,
        }}),
        Dialect::Anthropic => json!({"type": "error", "error": {
            "type": kind.filter(|k| k.ends_with("_error")).unwrap_or_else(|| anthropic_kind(status).to_owned()),
            "message": message,
        }}),
    }
}

/// Anthropic's error type for an HTTP status.
fn anthropic_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

/// A short identifier-like string (an error type or code), nothing free-form.
fn is_token(text: &str) -> bool {
    text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Shortest run of a secret that is cut out of a message.
const SECRET_WINDOW: usize = 8;

/// `text` with every run of at least [`SECRET_WINDOW`] bytes taken from one of `secrets`
/// (a whole value, or a piece of one that was cut or wrapped) replaced by `[redacted]`,
/// cut to [`MAX_ERROR_MESSAGE`] bytes on a character boundary.
fn redact(text: &str, secrets: &[&str]) -> String {
    // Only what can be relayed is searched (a bounded cost on a 64 KiB body).
    let mut cut = text.len().min(2 * MAX_ERROR_MESSAGE);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let text = &text[..cut];
    let bytes = text.as_bytes();
    let mut hidden = vec![false; bytes.len()];
    for secret in secrets.iter().map(|s| s.as_bytes()) {
        for window in secret.windows(SECRET_WINDOW) {
            let mut from = 0;
            while let Some(at) = find(&bytes[from..], window) {
                let start = from + at;
                hidden[start..start + window.len()].fill(true);
                from = start + 1;
            }
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut in_secret = false;
    for (i, c) in text.char_indices() {
        if hidden[i..i + c.len_utf8()].iter().any(|h| *h) {
            if !in_secret {
                out.push_str("[redacted]");
                in_secret = true;
            }
        } else {
            in_secret = false;
            out.push(c);
        }
    }
    if out.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads a whole body, failing as soon as it is known to exceed `limit` bytes (from its
/// `content-length`, or while it arrives).
async fn read_at_most(response: reqwest::Response, limit: usize) -> Result<Bytes, WholeError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(WholeError::TooLarge);
    }
    let mut body = response.bytes_stream();
    let mut out = bytes::BytesMut::new();
    let mut only = None;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|_| WholeError::Broken)?;
        if out.len() + chunk.len() + only.as_ref().map_or(0, Bytes::len) > limit {
            return Err(WholeError::TooLarge);
        }
        // The usual single-chunk body is kept as is, without a copy.
        match only.take() {
            None if out.is_empty() => only = Some(chunk),
            first => {
                if let Some(first) = first {
                    out.extend_from_slice(&first);
                }
                out.extend_from_slice(&chunk);
            }
        }
    }
    Ok(only.unwrap_or_else(|| out.freeze()))
}

/// How a relayed stream ended, as far as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The answer's final event was relayed, with no error event before it.
    Complete,
    /// The upstream broke, went silent, sent an error event, or closed before its final
    /// event.
    Failed,
    /// A response guardrail ended it.
    Blocked,
}

/// A stream's ending, shared between the relay that sets it (once, when the stream ends)
/// and whoever needs it afterwards (the response cache stores only complete answers).
/// Travels as an extension of the streamed response; unset while the stream runs, and
/// for good when the client went away first.
#[derive(Debug, Clone, Default)]
pub struct Ending(Arc<std::sync::OnceLock<StreamEnd>>);

impl Ending {
    /// How the stream ended, once it has.
    pub fn get(&self) -> Option<StreamEnd> {
        self.0.get().copied()
    }

    pub(crate) fn set(&self, end: StreamEnd) {
        let _ = self.0.set(end);
    }
}

/// Records the time to the first streamed byte once.
#[derive(Debug)]
pub struct FirstByte {
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Route id.
    pub route: String,
    /// When the request arrived.
    pub started: Instant,
}

impl FirstByte {
    pub(crate) fn observe(self) {
        self.metrics
            .time_to_first_byte
            .get_or_create(&RouteLabels { route: self.route })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// What a relayed stream owns until it ends or the client goes away: the concurrency
/// slot, the accounting (settled on drop), the first-byte timer.
#[derive(Debug)]
pub struct StreamGuards {
    /// Provider concurrency slot.
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Usage accounting.
    pub accounting: Option<Accounting>,
    /// Time-to-first-byte timer.
    pub first_byte: Option<FirstByte>,
    /// Routing statistics of the target relayed from: first token, then how it ended.
    pub feedback: Option<crate::target_stats::StreamFeedback>,
    /// The stream's span, ended when the stream is.
    pub span: tracing::Span,
    /// The route's and key's response guardrails, applied as events are relayed.
    pub answers: Option<crate::stream_guard::StreamGuard>,
    /// Where a response the upstream stores is recorded for its owner.
    pub remember: Option<crate::stored_responses::Remember>,
}

/// Relays an upstream SSE stream. Dropping the response (client gone) drops the upstream
/// connection and settles what was relayed.
pub fn stream<S>(
    upstream: S,
    idle: Duration,
    conversion: Conversion,
    guards: StreamGuards,
) -> Response
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    let ending = Ending::default();
    let mut response = sse_response(Body::from_stream(relay_chunks(
        upstream,
        idle,
        conversion,
        guards,
        ending.clone(),
    )));
    response.extensions_mut().insert(ending);
    response
}

/// Relays `frames` an in-process provider (the mock) streams in OpenAI's format, through
/// `translator`, with `accounting` told what was relayed; the response carries its
/// [`Ending`] like a relayed upstream stream's.
pub fn local_stream<S>(
    frames: S,
    translator: StreamTranslator,
    accounting: Option<Accounting>,
) -> Response
where
    S: Stream<Item = Bytes> + Send + Unpin + 'static,
{
    let ending = Ending::default();
    let end = ending.clone();
    let body = stream::unfold(
        (frames, translator, accounting, false),
        move |(mut frames, mut t, mut accounting, finished)| {
            let end = end.clone();
            async move {
                if finished {
                    return None;
                }
                loop {
                    let Some(frame) = frames.next().await else {
                        end.set(t.ending());
                        let tail = t.finish();
                        return (!tail.is_empty())
                            .then_some((Ok(tail), (frames, t, accounting, true)));
                    };
                    let out = t.feed(&frame, accounting.as_mut()).unwrap_or_default();
                    if t.stopped() {
                        end.set(StreamEnd::Blocked);
                        return Some((Ok(out), (frames, t, accounting, true)));
                    }
                    if !out.is_empty() {
                        return Some((
                            Ok::<_, std::io::Error>(out),
                            (frames, t, accounting, false),
                        ));
                    }
                }
            }
        },
    );
    let mut response = sse_response(Body::from_stream(body));
    response.extensions_mut().insert(ending);
    response
}

/// Whether `response` is an SSE stream (by its content type).
pub fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// An empty SSE response with the usual headers.
pub fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Turns upstream SSE bytes into client SSE bytes, event by event, through the response
/// guardrails when the route or key has some.
#[derive(Debug)]
pub struct StreamTranslator {
    parser: sse::Parser,
    mode: Mode,
    /// An Anthropic stream's usage from `message_start` (input, cache reads and writes).
    start: Usage,
    guard: Option<crate::stream_guard::StreamGuard>,
    /// The upstream's final event (`[DONE]`, `message_stop`) has been read.
    saw_end: bool,
    /// The upstream sent an error event.
    saw_error: bool,
    /// Events sent to a Responses client so far (the next event's `sequence_number`).
    sent: u64,
    /// The client's dialect.
    client: Dialect,
    /// Records a response a Responses upstream stores.
    remember: Option<crate::stored_responses::Remember>,
}

#[derive(Debug)]
enum Mode {
    OpenAi { strip_usage: bool },
    Anthropic,
    Responses,
    Translate(Box<Translation>),
}

/// A stream translated through the canonical model.
#[derive(Debug)]
struct Translation {
    decoder: Decoder,
    encoder: Encoder,
    seen: StreamUsage,
    /// The structured-output stand-in's call, turned back into text.
    answer_tool: Option<crate::canonical::AnswerTool>,
}

impl StreamTranslator {
    /// A translator for one stream.
    pub fn new(conversion: Conversion) -> Self {
        let client = conversion.client_dialect();
        let mode = match conversion {
            Conversion::Passthrough {
                dialect: Dialect::OpenAi,
                strip_usage,
            } => Mode::OpenAi { strip_usage },
            Conversion::Passthrough {
                dialect: Dialect::Anthropic,
                ..
            } => Mode::Anthropic,
            Conversion::Passthrough {
                dialect: Dialect::Responses,
                ..
            } => Mode::Responses,
            Conversion::Translate { upstream, client } => Mode::Translate(Box::new(Translation {
                decoder: Decoder::new(upstream),
                encoder: client.encoder(jiff::Timestamp::now().as_second()),
                seen: StreamUsage::default(),
                answer_tool: client
                    .answer_tool
                    .clone()
                    .map(crate::canonical::AnswerTool::new),
            })),
        };
        Self {
            parser: sse::Parser::default(),
            mode,
            start: Usage::default(),
            guard: None,
            saw_end: false,
            saw_error: false,
            sent: 0,
            client,
            remember: None,
        }
    }

    /// Events sent so far to a Responses client (each ends with a blank line).
    pub fn events_sent(&self) -> u64 {
        self.sent
    }

    /// Counts the events of `out` when the client speaks the Responses API, whose events
    /// are numbered.
    fn count(&mut self, out: &[u8]) {
        if self.client == Dialect::Responses {
            self.sent += out.windows(2).filter(|w| w == b"\n\n").count() as u64;
        }
    }

    /// How the stream ends if the upstream stops here.
    pub fn ending(&self) -> StreamEnd {
        if self.stopped() {
            StreamEnd::Blocked
        } else if self.saw_end && !self.saw_error {
            StreamEnd::Complete
        } else {
            StreamEnd::Failed
        }
    }

    /// Records the response a Responses upstream stores for its owner.
    pub fn remembering(mut self, remember: Option<crate::stored_responses::Remember>) -> Self {
        self.remember = remember;
        self
    }

    /// Sends the client events through `guard` (response guardrails).
    pub fn guarded(mut self, guard: Option<crate::stream_guard::StreamGuard>) -> Self {
        self.guard = guard;
        self
    }

    /// Whether a guardrail ended the stream: its error event was the last output.
    pub fn stopped(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.stopped())
    }

    /// At the end of the upstream stream: what the guardrails still hold.
    pub fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        if let Some(guard) = self.guard.as_mut() {
            let mut events = Vec::new();
            guard.finish(&mut events);
            for (name, data) in events {
                sse::write_event(&mut out, name.as_deref(), &data);
            }
        }
        self.count(&out);
        Bytes::from(out)
    }

    /// The client bytes for an upstream chunk; usage seen goes to `accounting`.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut accounting: Option<&mut Accounting>,
    ) -> Result<Bytes, &'static str> {
        let mut out = Vec::new();
        if self.stopped() {
            return Ok(Bytes::new());
        }
        let guard = &mut self.guard;
        for event in self.parser.feed(chunk)? {
            if guard.as_ref().is_some_and(|g| g.stopped()) {
                break;
            }
            match &mut self.mode {
                Mode::OpenAi { strip_usage } => {
                    if event.data == "[DONE]" {
                        self.saw_end = true;
                    } else {
                        let head = ChunkHead::parse(&event.data);
                        self.saw_error |= head.error;
                        if let Some(u) = head.usage()
                            && let Some(a) = accounting.as_deref_mut()
                        {
                            a.report(u);
                        }
                        if head.choices > 0 {
                            if let Some(a) = accounting.as_deref_mut() {
                                a.relayed_piece();
                            }
                        } else if *strip_usage && head.usage.is_some() {
                            continue;
                        }
                    }
                    emit(&mut out, guard, None, &event.data);
                }
                Mode::Anthropic => {
                    let v: Value = serde_json::from_str(&event.data).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("message_stop") => self.saw_end = true,
                        Some("error") => self.saw_error = true,
                        Some("message_start") => {
                            self.start =
                                usage_from_value(&v["message"]["usage"]).unwrap_or_default()
                        }
                        Some("content_block_delta") => {
                            if let Some(a) = accounting.as_deref_mut() {
                                a.relayed_piece();
                            }
                        }
                        Some("message_delta") => {
                            if let (Some(a), Some(o)) = (
                                accounting.as_deref_mut(),
                                v["usage"]["output_tokens"].as_u64(),
                            ) {
                                a.report(Usage {
                                    completion: o,
                                    ..self.start
                                });
                            }
                        }
                        _ => {}
                    }
                    emit(&mut out, guard, event.event.as_deref(), &event.data);
                }
                Mode::Responses => {
                    let v: Value = serde_json::from_str(&event.data).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("response.created") => {
                            if let Some(remember) = &self.remember {
                                remember.response(&v["response"]);
                            }
                        }
                        Some("response.completed" | "response.incomplete") => {
                            self.saw_end = true;
                            if let (Some(a), Some(u)) =
                                (accounting.as_deref_mut(), responses::stream_usage(&v))
                            {
                                a.report(u.into());
                            }
                        }
                        Some("response.failed" | "error") => self.saw_error = true,
                        Some(
                            "response.output_text.delta" | "response.function_call_arguments.delta",
                        ) => {
                            if let Some(a) = accounting.as_deref_mut() {
                                a.relayed_piece();
                            }
                        }
                        _ => {}
                    }
                    emit(&mut out, guard, event.event.as_deref(), &event.data);
                }
                Mode::Translate(t) => {
                    for e in t.decoder.on_event(event.event.as_deref(), &event.data) {
                        let e = match t.answer_tool.as_mut() {
                            Some(tool) => match tool.map(e) {
                                Some(e) => e,
                                None => continue,
                            },
                            None => e,
                        };
                        match &e {
                            Event::Done => self.saw_end = true,
                            Event::Error(_) => self.saw_error = true,
                            Event::Text(_) | Event::ToolCallArguments { .. } => {
                                if let Some(a) = accounting.as_deref_mut() {
                                    a.relayed_piece();
                                }
                            }
                            _ => {}
                        }
                        t.seen.note(&e);
                        for (name, data) in t.encoder.on_event(&e) {
                            emit(&mut out, guard, name.as_deref(), &data);
                        }
                    }
                    if let (Some(a), Some(u)) = (accounting.as_deref_mut(), t.seen.get()) {
                        a.report(u.into());
                    }
                }
            }
        }
        self.count(&out);
        Ok(Bytes::from(out))
    }
}

/// What the gateway reads of an OpenAI stream chunk: its usage and how many choices it
/// carries. The content is skipped without building values (this runs for every token).
#[derive(Debug, Default)]
struct ChunkHead<'a> {
    usage: Option<&'a serde_json::value::RawValue>,
    choices: usize,
    /// The chunk is an error (`{"error": …}`).
    error: bool,
}

impl<'a> ChunkHead<'a> {
    fn parse(data: &'a str) -> Self {
        #[derive(serde::Deserialize)]
        struct Raw<'a> {
            #[serde(borrow, default)]
            usage: Option<&'a serde_json::value::RawValue>,
            // Zero-sized elements: counting them allocates nothing.
            #[serde(default)]
            choices: Option<Vec<serde::de::IgnoredAny>>,
            #[serde(default)]
            error: Option<serde::de::IgnoredAny>,
        }
        serde_json::from_str::<Raw<'a>>(data)
            .map(|raw| Self {
                usage: raw.usage,
                choices: raw.choices.map_or(0, |c| c.len()),
                error: raw.error.is_some(),
            })
            .unwrap_or_default()
    }

    fn usage(&self) -> Option<Usage> {
        let value: Value = serde_json::from_str(self.usage?.get()).ok()?;
        usage_from_value(&value)
    }
}

/// Writes one client event, through the guard when there is one.
fn emit(
    out: &mut Vec<u8>,
    guard: &mut Option<crate::stream_guard::StreamGuard>,
    name: Option<&str>,
    data: &str,
) {
    match guard {
        None => sse::write_event(out, name, data),
        Some(guard) => {
            let mut events = Vec::new();
            guard.on_event(name, data, &mut events);
            for (name, data) in events {
                sse::write_event(out, name.as_deref(), &data);
            }
        }
    }
}

fn relay_chunks<S>(
    upstream: S,
    idle: Duration,
    conversion: Conversion,
    guards: StreamGuards,
    ending: Ending,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    let dialect = conversion.client_dialect();
    let mut guards = guards;
    let translator = StreamTranslator::new(conversion)
        .guarded(guards.answers.take())
        .remembering(guards.remember.take());
    stream::unfold(
        (upstream, translator, guards, false),
        move |(mut s, mut t, mut guards, finished)| {
            let ending = ending.clone();
            async move {
                if finished {
                    return None;
                }
                loop {
                    let error = match tokio::time::timeout(idle, s.next()).await {
                        Ok(Some(Ok(bytes))) => match t.feed(&bytes, guards.accounting.as_mut()) {
                            // Translation may swallow a chunk (e.g. a ping): wait for the next one.
                            Ok(out) if out.is_empty() => continue,
                            Ok(out) => {
                                if let Some(fb) = guards.first_byte.take() {
                                    fb.observe();
                                }
                                if let Some(f) = guards.feedback.as_mut() {
                                    f.first_token();
                                }
                                // A guardrail that blocked the answer ended the stream with
                                // its error event; the upstream is dropped with the stream.
                                let stopped = t.stopped();
                                if stopped {
                                    ending.set(StreamEnd::Blocked);
                                    if let Some(f) = guards.feedback.take() {
                                        f.completed();
                                    }
                                }
                                return Some((Ok(out), (s, t, guards, stopped)));
                            }
                            Err(why) => why,
                        },
                        Ok(None) => {
                            ending.set(t.ending());
                            if let Some(f) = guards.feedback.take() {
                                f.completed();
                            }
                            // Text the guardrails still hold goes out (checked) last.
                            let tail = t.finish();
                            return (!tail.is_empty()).then_some((Ok(tail), (s, t, guards, true)));
                        }
                        Ok(Some(Err(_))) => "The upstream stream was interrupted.",
                        Err(_) => "The upstream stream went silent and was abandoned.",
                    };
                    ending.set(StreamEnd::Failed);
                    if let Some(f) = guards.feedback.take() {
                        f.failed();
                    }
                    let sequence = t.events_sent();
                    return Some((
                        Ok(stream_error(error, dialect, sequence)),
                        (s, t, guards, true),
                    ));
                }
            }
        },
    )
}

/// An SSE error event in the client's error shape (`sequence`: a Responses event's
/// number, the count of events sent before it).
fn stream_error(message: &str, dialect: Dialect, sequence: u64) -> Bytes {
    match dialect {
        Dialect::Responses => Bytes::from(format!(
            "event: error\ndata: {}\n\n",
            json!({ "type": "error", "code": "upstream_stream_error", "message": message, "param": null, "sequence_number": sequence })
        )),
        Dialect::OpenAi => Bytes::from(format!(
            "data: {}\n\n",
            json!({ "error": { "message": message, "type": "server_error", "param": null, "code": "upstream_stream_error" } })
        )),
        Dialect::Anthropic => Bytes::from(format!(
            "event: error\ndata: {}\n\n",
            json!({ "type": "error", "error": { "type": "api_error", "message": message } })
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(model: &str) -> RequestHead {
        crate::request::parse_head(format!(r#"{{"model":"{model}"}}"#).as_bytes()).unwrap()
    }

    fn guards() -> StreamGuards {
        StreamGuards {
            permit: None,
            accounting: None,
            first_byte: None,
            feedback: None,
            span: tracing::Span::none(),
            answers: None,
            remember: None,
        }
    }

    #[test]
    fn upstream_errors_are_rebuilt_in_the_clients_dialect_without_secrets() {
        let secrets = ["sk-live-credential-0123456789", "org-header-value-99"];
        let openai = br#"{"error": {"message": "bad key sk-live-credential-0123456789 (org-header-value-99), cut: sk-live-cred", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}, "debug": "sk-live-credential-0123456789"}"#;
        let out = error_body(StatusCode::NOT_FOUND, openai, Dialect::OpenAi, &secrets);
        let text = out.to_string();
        assert!(
            !text.contains("sk-live-cred") && !text.contains("org-header"),
            "{text}"
        );
        assert_eq!(out["error"]["type"], "invalid_request_error");
        assert_eq!(out["error"]["code"], "model_not_found");
        assert_eq!(out["error"]["param"], "model");
        assert!(out.get("debug").is_none());

        let anthropic =
            br#"{"type": "error", "error": {"type": "not_found_error", "message": "model: nope"}}"#;
        let out = error_body(
            StatusCode::NOT_FOUND,
            anthropic,
            Dialect::Anthropic,
            &secrets,
        );
        assert_eq!(
            out,
            json!({"type": "error", "error": {"type": "not_found_error", "message": "model: nope"}})
        );
        // Not JSON, or no message: a plain statement of the status, in either dialect.
        let out = error_body(
            StatusCode::IM_A_TEAPOT,
            b"<html>sk-live-credential-0123456789</html>",
            Dialect::Anthropic,
            &secrets,
        );
        assert_eq!(out["error"]["type"], "api_error");
        assert_eq!(
            out["error"]["message"],
            "The upstream provider refused the request with HTTP 418."
        );
        // Free text never passes as a type or code.
        let odd =
            br#"{"error": {"message": "m", "type": "a type with spaces", "code": {"nested": 1}}}"#;
        let out = error_body(StatusCode::BAD_REQUEST, odd, Dialect::OpenAi, &secrets);
        assert_eq!(out["error"]["type"], "upstream_error");
        assert_eq!(out["error"]["code"], Value::Null);
    }

    #[test]
    fn multi_line_data_is_relayed_as_several_data_lines() {
        for conversion in [
            Conversion::passthrough(Dialect::OpenAi),
            Conversion::passthrough(Dialect::Anthropic),
        ] {
            let mut t = StreamTranslator::new(conversion);
            let out = t
                .feed(b"data: a\ndata: b\n\ndata:\ndata: x\n\n", None)
                .unwrap();
            assert_eq!(&out[..], b"data: a\ndata: b\n\ndata: \ndata: x\n\n");
        }
    }

    #[tokio::test]
    async fn a_silent_stream_ends_with_an_error_event() {
        let upstream =
            stream::iter(vec![Ok(Bytes::from_static(b"data: {}\n\n"))]).chain(stream::pending());
        let ending = Ending::default();
        let chunks: Vec<Bytes> = relay_chunks(
            Box::pin(upstream),
            Duration::from_millis(50),
            Conversion::passthrough(Dialect::OpenAi),
            guards(),
            ending.clone(),
        )
        .map(|c| c.unwrap())
        .collect()
        .await;
        assert_eq!(chunks.len(), 2);
        assert!(String::from_utf8_lossy(&chunks[1]).contains("upstream_stream_error"));
        assert_eq!(ending.get(), Some(StreamEnd::Failed));
    }

    /// How a stream of `chunks` read by `conversion` ends.
    async fn ending_of(conversion: Conversion, chunks: &[&'static str]) -> Option<StreamEnd> {
        let upstream = stream::iter(
            chunks
                .iter()
                .map(|c| Ok(Bytes::from_static(c.as_bytes())))
                .collect::<Vec<_>>(),
        );
        let ending = Ending::default();
        let _: Vec<_> = relay_chunks(
            Box::pin(upstream),
            Duration::from_secs(5),
            conversion,
            guards(),
            ending.clone(),
        )
        .collect()
        .await;
        ending.get()
    }

    #[tokio::test]
    async fn the_relay_says_how_each_stream_ended() {
        let openai = || Conversion::passthrough(Dialect::OpenAi);
        let to_anthropic =
            || Conversion::for_request(Dialect::Anthropic, Dialect::OpenAi, &head("m"));
        let done = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n\n";
        let cut = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let error = "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        assert_eq!(
            ending_of(openai(), &[done]).await,
            Some(StreamEnd::Complete)
        );
        assert_eq!(
            ending_of(to_anthropic(), &[done]).await,
            Some(StreamEnd::Complete)
        );
        // Closed before its final event, or with an error event before it.
        assert_eq!(ending_of(openai(), &[cut]).await, Some(StreamEnd::Failed));
        assert_eq!(
            ending_of(openai(), &[error, done]).await,
            Some(StreamEnd::Failed)
        );
        assert_eq!(
            ending_of(to_anthropic(), &[error, done]).await,
            Some(StreamEnd::Failed)
        );
        let anthropic_done = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{}}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let anthropic_error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n";
        assert_eq!(
            ending_of(
                Conversion::passthrough(Dialect::Anthropic),
                &[anthropic_done]
            )
            .await,
            Some(StreamEnd::Complete)
        );
        assert_eq!(
            ending_of(
                Conversion::passthrough(Dialect::Anthropic),
                &[anthropic_error, anthropic_done]
            )
            .await,
            Some(StreamEnd::Failed)
        );
        let to_openai = Conversion::for_request(Dialect::OpenAi, Dialect::Anthropic, &head("m"));
        assert_eq!(
            ending_of(to_openai, &[anthropic_done]).await,
            Some(StreamEnd::Complete)
        );
    }

    #[test]
    fn an_injected_usage_chunk_is_stripped_and_everything_else_relayed() {
        let mut t = StreamTranslator::new(Conversion::Passthrough {
            dialect: Dialect::OpenAi,
            strip_usage: true,
        });
        let out = t
            .feed(
                b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n",
                None,
            )
            .unwrap();
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("\"content\":\"a\""));
        assert!(!text.contains("prompt_tokens"));
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
}
