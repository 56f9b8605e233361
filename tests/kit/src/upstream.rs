//! A scriptable OpenAI-style upstream for the tests: records every request it receives and
//! answers each with the next scripted reply (JSON, SSE fed by the test, or silence).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    response::Response,
};
use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub version: http::Version,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// A request as it arrived.
    pub fn of(parts: &http::request::Parts, body: Bytes) -> Self {
        Self {
            version: parts.version,
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            body,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// What the upstream answers next.
#[derive(Debug)]
pub enum Reply {
    /// Status, JSON body and extra headers.
    Json(u16, Value, Vec<(&'static str, String)>),
    /// An SSE response whose body chunks the test sends; dropping the sender ends it,
    /// keeping it open leaves the stream silent.
    Stream(mpsc::UnboundedReceiver<Bytes>),
    /// Never answer.
    Hang,
    /// An SSE response that sends these chunks, then breaks the connection.
    Broken(Vec<Bytes>),
}

#[derive(Debug, Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Reply>>,
}

/// A running upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

/// The chat completion the upstream answers by default.
pub fn completion(model: &str, text: &str) -> Value {
    json!({
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": null}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    })
}

impl Upstream {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, shared }
    }

    /// An upstream that speaks HTTP/2 only, with prior knowledge (h2c): HTTP/1.1 requests
    /// fail at the connection level.
    pub async fn start_h2c() -> Self {
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .http2_only()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Self { addr, shared }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues replies, answered in order; after them, a default 200 completion.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.script.lock().unwrap().extend(replies);
    }

    /// A stream reply and the sender that feeds it.
    pub fn stream(&self) -> mpsc::UnboundedSender<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.script([Reply::Stream(rx)]);
        tx
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let model = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["model"].as_str().map(str::to_owned))
        .unwrap_or_default();
    shared
        .received
        .lock()
        .unwrap()
        .push(Received::of(&parts, body));
    let reply = shared.script.lock().unwrap().pop_front();
    match reply.unwrap_or_else(|| Reply::Json(200, completion(&model, "upstream says hi"), vec![]))
    {
        Reply::Json(status, value, headers) => {
            let mut builder = Response::builder()
                .status(status)
                .header("content-type", "application/json");
            for (k, v) in headers {
                builder = builder.header(k, v);
            }
            builder.body(Body::from(value.to_string())).unwrap()
        }
        Reply::Stream(rx) => {
            let frames = stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(frames))
                .unwrap()
        }
        Reply::Hang => std::future::pending().await,
        Reply::Broken(chunks) => {
            // The chunks go out first; the connection breaks a moment later.
            let frames = stream::iter(chunks.into_iter().map(Ok)).chain(stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                Err(std::io::Error::other("connection reset by the test"))
            }));
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(frames))
                .unwrap()
        }
    }
}
