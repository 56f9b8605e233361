//! The load generator: HTTP/1.1 keep-alive connections driven closed-loop (each connection
//! sends its next request when the previous answer is in: saturation throughput) or
//! open-loop (requests are due at a fixed rate whatever the answers do, and latency is
//! measured from when a request was due, not when it was sent, so a stalled server shows
//! up in the tail instead of hiding it: no coordinated omission).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpStream, task::JoinSet};

/// Where and what to send.
#[derive(Debug, Clone)]
pub struct Target {
    /// Server address.
    pub addr: SocketAddr,
    /// Request path.
    pub path: String,
    /// `Authorization` header value, if any.
    pub auth: Option<HeaderValue>,
    /// The body.
    pub body: Bytes,
    /// Its content type, when not JSON (a multipart upload).
    pub content_type: Option<HeaderValue>,
}

impl Target {
    pub(crate) fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::post(self.path.as_str())
            .header(header::HOST, "bench")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(self.body.clone()))
            .expect("static request parts are valid");
        if let Some(auth) = &self.auth {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
        }
        if let Some(content_type) = &self.content_type {
            req.headers_mut()
                .insert(header::CONTENT_TYPE, content_type.clone());
        }
        req
    }
}

/// A chat request body for `model`.
pub fn chat_body(model: &str, stream: bool) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant that answers briefly."},
                {"role": "user", "content": "Summarise the benefits of connection pooling in two sentences."}
            ],
            "max_tokens": 200,
            "temperature": 0,
            "stream": stream,
        })
        .to_string(),
    )
}

/// Latencies in microseconds, up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Successful (2xx, whole body read) requests.
    pub ok: u64,
    /// Failures by kind (`status 503`, `connect`, `io`…).
    pub errors: BTreeMap<String, u64>,
    /// Wall time of the measured part.
    pub seconds: f64,
    /// Successful requests per second.
    pub rps: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Requests answered in all, warm-up included (for CPU per request).
    pub answered_total: u64,
}

impl Stats {
    /// Failed requests, all kinds.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    pub(crate) fn from(
        h: &Histogram<u64>,
        ok: u64,
        errors: BTreeMap<String, u64>,
        seconds: f64,
    ) -> Self {
        Self {
            ok,
            errors,
            seconds,
            rps: ok as f64 / seconds.max(1e-9),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            answered_total: ok,
        }
    }
}

/// One worker's tally.
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    warmup: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: histogram(),
            ok: 0,
            warmup: 0,
            errors: BTreeMap::new(),
        }
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Self) {
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        self.warmup += other.warmup;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// One keep-alive connection, reopened after errors.
pub(crate) struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Conn {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None }
    }

    /// Closes the connection; the next request opens a new one.
    pub(crate) fn reset(&mut self) {
        self.sender = None;
    }

    pub(crate) async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if let Some(s) = &mut self.sender
            && s.ready().await.is_ok()
        {
            return Ok(self.sender.as_mut().expect("just checked"));
        }
        self.sender = None;
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {}", e.kind()))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| "handshake".to_owned())?;
        tokio::spawn(conn);
        Ok(self.sender.insert(sender))
    }

    /// Sends one request and reads the whole answer.
    pub(crate) async fn call(&mut self, target: &Target) -> Result<(), String> {
        let sender = self.ready().await?;
        let response = sender
            .send_request(target.request())
            .await
            .map_err(|_| "io".to_owned());
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e);
            }
        };
        let status = response.status();
        if response.into_body().collect().await.is_err() {
            self.sender = None;
            return Err("body".to_owned());
        }
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {}", status.as_u16()))
        }
    }
}

/// Opens `n` connections, a few hundred at a time (the listen backlog is finite).
async fn open_connections(addr: SocketAddr, n: usize) -> Vec<Conn> {
    let mut conns = Vec::with_capacity(n);
    let mut batch = JoinSet::new();
    for _ in 0..n {
        batch.spawn(async move {
            let mut c = Conn::new(addr);
            let _ = c.ready().await;
            c
        });
        if batch.len() >= 256 {
            while let Some(Ok(c)) = batch.join_next().await {
                conns.push(c);
            }
        }
    }
    while let Some(Ok(c)) = batch.join_next().await {
        conns.push(c);
    }
    conns
}

/// Closed loop: `connections` connections each send back to back for `duration` (after a
/// `warmup` that is not counted).
pub async fn closed(
    target: &Target,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> Stats {
    let conns = open_connections(target.addr, connections).await;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut set = JoinSet::new();
    for mut conn in conns {
        let target = target.clone();
        set.spawn(async move {
            let mut tally = Tally::new();
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = conn.call(&target).await;
                if sent < measure_from {
                    tally.warmup += u64::from(result.is_ok());
                    continue;
                }
                match result {
                    Ok(()) => {
                        tally.ok += 1;
                        let _ = tally.latency.record(micros(sent.elapsed()));
                    }
                    Err(kind) => {
                        tally.error(kind);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            tally
        });
    }
    let mut all = Tally::new();
    while let Some(Ok(t)) = set.join_next().await {
        all.merge(t);
    }
    let mut stats = Stats::from(&all.latency, all.ok, all.errors, duration.as_secs_f64());
    stats.answered_total = all.ok + all.warmup;
    stats
}

/// One request at a time on one connection, `count` times after `warmup` requests.
pub async fn sequential(target: &Target, warmup: usize, count: usize) -> Stats {
    let mut conn = Conn::new(target.addr);
    for _ in 0..warmup {
        let _ = conn.call(target).await;
    }
    let mut tally = Tally::new();
    let start = Instant::now();
    for _ in 0..count {
        let sent = Instant::now();
        match conn.call(target).await {
            Ok(()) => {
                tally.ok += 1;
                let _ = tally.latency.record(micros(sent.elapsed()));
            }
            Err(kind) => tally.error(kind),
        }
    }
    Stats::from(
        &tally.latency,
        tally.ok,
        tally.errors,
        start.elapsed().as_secs_f64(),
    )
}

/// Open loop: requests due at `rate` per second for `duration`, over up to `connections`
/// connections. Latency counts from each request's due time.
pub async fn open(target: &Target, rate: f64, duration: Duration, connections: usize) -> Stats {
    open_after(target, rate, Duration::ZERO, duration, connections).await
}

/// [`open`], after `warmup` at the same rate whose requests are not counted (pools fill,
/// connections open).
pub async fn open_after(
    target: &Target,
    rate: f64,
    warmup: Duration,
    duration: Duration,
    connections: usize,
) -> Stats {
    let conns = open_connections(target.addr, connections).await;
    let skipped = (rate * warmup.as_secs_f64()).round() as u64;
    let total = skipped + (rate * duration.as_secs_f64()).round() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut set = JoinSet::new();
    for mut conn in conns {
        let target = target.clone();
        let next = next.clone();
        set.spawn(async move {
            let mut tally = Tally::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due).await;
                let result = conn.call(&target).await;
                if i < skipped {
                    continue;
                }
                match result {
                    Ok(()) => {
                        tally.ok += 1;
                        let _ = tally.latency.record(micros(due.elapsed()));
                    }
                    Err(kind) => tally.error(kind),
                }
            }
            tally
        });
    }
    let mut all = Tally::new();
    while let Some(Ok(t)) = set.join_next().await {
        all.merge(t);
    }
    Stats::from(&all.latency, all.ok, all.errors, duration.as_secs_f64())
}

/// Streaming figures.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStats {
    /// Streams read to the end.
    pub ok: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Time to the first body bytes, microseconds (p50, p99).
    pub ttft_p50_us: u64,
    /// 99th percentile.
    pub ttft_p99_us: u64,
    /// Gap between consecutive chunks as received, microseconds (p50, p99, max).
    pub gap_p50_us: u64,
    /// 99th percentile.
    pub gap_p99_us: u64,
    /// Largest.
    pub gap_max_us: u64,
    /// Chunks (body frames) received per stream, on average.
    pub frames_per_stream: f64,
}

/// `count` streams, `concurrency` at a time: time to first token and inter-chunk gaps.
pub async fn streams(
    target: &Target,
    concurrency: usize,
    warmup: usize,
    count: usize,
) -> StreamStats {
    let conns = open_connections(target.addr, concurrency).await;
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for mut conn in conns {
        let target = target.clone();
        let next = next.clone();
        set.spawn(async move {
            let mut ttft = histogram();
            let mut gaps = histogram();
            let mut frames = 0u64;
            let mut ok = 0u64;
            let mut errors = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= warmup + count {
                    break;
                }
                let measured = i >= warmup;
                match stream_once(&mut conn, &target).await {
                    Ok((first, gap_list)) if measured => {
                        ok += 1;
                        let _ = ttft.record(micros(first));
                        frames += gap_list.len() as u64 + 1;
                        for g in gap_list {
                            let _ = gaps.record(micros(g));
                        }
                    }
                    Ok(_) => {}
                    Err(kind) => *errors.entry(kind).or_insert(0) += 1,
                }
            }
            (ttft, gaps, frames, ok, errors)
        });
    }
    let (mut ttft, mut gaps, mut frames, mut ok) = (histogram(), histogram(), 0, 0);
    let mut errors = BTreeMap::new();
    while let Some(Ok((t, g, f, o, e))) = set.join_next().await {
        let _ = ttft.add(&t);
        let _ = gaps.add(&g);
        frames += f;
        ok += o;
        for (k, v) in e {
            *errors.entry(k).or_insert(0) += v;
        }
    }
    StreamStats {
        ok,
        errors,
        ttft_p50_us: ttft.value_at_quantile(0.5),
        ttft_p99_us: ttft.value_at_quantile(0.99),
        gap_p50_us: gaps.value_at_quantile(0.5),
        gap_p99_us: gaps.value_at_quantile(0.99),
        gap_max_us: gaps.max(),
        frames_per_stream: frames as f64 / ok.max(1) as f64,
    }
}

/// One stream: time to the first body frame and the gaps between the following ones.
async fn stream_once(
    conn: &mut Conn,
    target: &Target,
) -> Result<(Duration, Vec<Duration>), String> {
    let sender = conn.ready().await?;
    let sent = Instant::now();
    let response = match sender.send_request(target.request()).await {
        Ok(r) => r,
        Err(_) => {
            conn.sender = None;
            return Err("io".to_owned());
        }
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut first = None;
    let mut last = sent;
    let mut gaps = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            conn.sender = None;
            return Err("body".to_owned());
        };
        if frame.data_ref().is_none_or(|d| d.is_empty()) {
            continue;
        }
        let now = Instant::now();
        if first.is_none() {
            first = Some(now - sent);
        } else {
            gaps.push(now - last);
        }
        last = now;
    }
    if !status.is_success() {
        return Err(format!("status {}", status.as_u16()));
    }
    first.map(|f| (f, gaps)).ok_or_else(|| "empty".to_owned())
}

/// Streams held open at once.
#[derive(Debug)]
pub struct Held {
    /// Streams that delivered their first chunk.
    pub open: u64,
    /// Streams that failed before it.
    pub failed: u64,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Held {
    /// Drops every stream.
    pub async fn release(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Opens `n` long streams and returns once each has delivered its first chunk (or
/// failed, or `patience` ran out); they stay open until [`Held::release`].
pub async fn hold_streams(target: &Target, n: usize, patience: Duration) -> Held {
    let conns = open_connections(target.addr, n).await;
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    for mut conn in conns {
        let target = target.clone();
        let (opened, failed, stop) = (opened.clone(), failed.clone(), stop.clone());
        tasks.spawn(async move {
            let Ok(sender) = conn.ready().await else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let Ok(response) = sender.send_request(target.request()).await else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if !response.status().is_success() {
                if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                    let status = response.status();
                    let body = response.into_body().collect().await.map(|b| b.to_bytes());
                    eprintln!(
                        "first failed stream: {status} {:?}",
                        body.unwrap_or_default()
                    );
                }
                return;
            }
            let mut body = response.into_body();
            let mut first = true;
            while let Some(Ok(_)) = body.frame().await {
                if first {
                    opened.fetch_add(1, Ordering::Relaxed);
                    first = false;
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
    }
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline
        && opened.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n as u64
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Held {
        open: opened.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        stop,
        tasks,
    }
}
