//! The hostile-input scenario's load: chat bodies just under the gateway's 32 MiB limit
//! holding 16 million JSON values, sent many at once, while a sampler watches the
//! gateway's in-flight bytes (its `/metrics`) and resident memory, and a prober sends
//! normal requests one at a time to see whether they are still answered.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tokio::{sync::Barrier, task::JoinSet};

use crate::{
    load::{self, Conn, Stats, Target},
    procs,
};

/// Elements of the hostile body's `pad` array: with the model (`bench-stream`), the
/// messages and the commas, the body is 32,000,090 bytes (30.5 MiB), under the default
/// `--max-body-bytes` of 32 MiB.
pub const PAD_ELEMENTS: usize = 16_000_000;

/// The gauge of request memory the gateway holds for requests in flight.
const INFLIGHT: &str = "tollgate_inflight_request_bytes";

/// The gauge of the in-flight budget (`--max-inflight-bytes`).
const INFLIGHT_LIMIT: &str = "tollgate_inflight_request_bytes_limit";

/// A streamed chat request for `model` whose `pad` array holds `elements` zeros: cheap to
/// send, and as many JSON values as a body of its size can hold.
pub fn body(model: &str, elements: usize) -> Bytes {
    let head = format!(
        r#"{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"hi"}}],"pad":["#
    );
    let mut b = BytesMut::with_capacity(head.len() + 2 * elements + 2);
    b.extend_from_slice(head.as_bytes());
    for i in 0..elements {
        b.extend_from_slice(if i == 0 { b"0" } else { b",0" });
    }
    b.extend_from_slice(b"]}");
    b.freeze()
}

/// How the hostile requests of one burst ended.
#[derive(Debug, Default)]
pub struct Burst {
    /// Answers by kind: `200`, `503 overloaded`, `413`, another status, or how the
    /// connection failed.
    pub outcomes: BTreeMap<String, u64>,
    /// Wall time from the first request sent to the last answer read.
    pub seconds: f64,
}

impl Burst {
    /// Requests that ended as `kind`.
    pub fn count(&self, kind: &str) -> u64 {
        self.outcomes.get(kind).copied().unwrap_or(0)
    }

    /// Requests that ended any other way than the kinds named.
    pub fn others(&self, named: &[&str]) -> BTreeMap<String, u64> {
        self.outcomes
            .iter()
            .filter(|(k, _)| !named.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// Sends `n` copies of `target`'s request at once, each on its own connection (opened
/// first, so they start together), and reads every answer to its end. The body is
/// shared, not copied: the harness holds one.
pub async fn burst(target: &Target, n: usize) -> Burst {
    let start_line = Arc::new(Barrier::new(n + 1));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let target = target.clone();
        let start_line = start_line.clone();
        set.spawn(async move {
            let mut conn = Conn::new(target.addr);
            let ready = conn.ready().await.map(|_| ());
            start_line.wait().await;
            match ready {
                Ok(()) => once(&mut conn, &target).await,
                Err(e) => format!("no answer ({e})"),
            }
        });
    }
    start_line.wait().await;
    let started = Instant::now();
    let mut burst = Burst::default();
    while let Some(outcome) = set.join_next().await {
        let kind = outcome.unwrap_or_else(|_| "harness task failed".to_owned());
        *burst.outcomes.entry(kind).or_default() += 1;
    }
    burst.seconds = started.elapsed().as_secs_f64();
    burst
}

/// One hostile request: what it ended as.
async fn once(conn: &mut Conn, target: &Target) -> String {
    let Ok(sender) = conn.ready().await else {
        return "no answer (connect)".to_owned();
    };
    let response = match sender.send_request(target.request()).await {
        Ok(r) => r,
        Err(e) => {
            // Usually the gateway refused the body while it was still being sent and
            // closed the connection without reading the rest: its answer is lost.
            conn.reset();
            return format!("connection closed while sending ({})", io_kind(&e));
        }
    };
    let status = response.status();
    let retry_after = response.headers().contains_key(header::RETRY_AFTER);
    let body = response.into_body().collect().await.map(|b| b.to_bytes());
    conn.reset();
    match (status, body) {
        (StatusCode::OK, Ok(_)) => "200".to_owned(),
        (StatusCode::OK, Err(_)) => "200, stream cut short".to_owned(),
        (StatusCode::SERVICE_UNAVAILABLE, Ok(b))
            if retry_after && contains(&b, br#""code":"overloaded""#) =>
        {
            "503 overloaded".to_owned()
        }
        (s, _) => s.as_u16().to_string(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn io_kind(e: &hyper::Error) -> String {
    use std::error::Error as _;
    match e.source().and_then(|s| s.downcast_ref::<std::io::Error>()) {
        Some(io) => format!("{:?}", io.kind()),
        None if e.is_incomplete_message() => "connection closed".to_owned(),
        None => "io".to_owned(),
    }
}

/// What the sampler saw during a burst.
#[derive(Debug, Default, Clone, Copy)]
pub struct Samples {
    /// Largest `tollgate_inflight_request_bytes` read.
    pub max_inflight_bytes: f64,
    /// `tollgate_inflight_request_bytes_limit`.
    pub limit_bytes: f64,
    /// Largest VmRSS read, KiB (the fallback when the kernel's peak cannot be reset).
    pub max_rss_kib: u64,
    /// Samples taken.
    pub count: u64,
}

/// Polls the gateway's `/metrics` on `admin` and the VmRSS of `pid` until stopped.
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Samples>,
}

impl Sampler {
    /// Starts sampling every `every`.
    pub fn start(admin: SocketAddr, pid: u32, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut conn = Conn::new(admin);
            let mut samples = Samples::default();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // One more sample after the stop, so the end of the burst is seen too.
            let mut last = false;
            while !last {
                tick.tick().await;
                last = flag.load(Ordering::Relaxed);
                if let Some(text) = metrics_text(&mut conn).await {
                    if let Some(v) = metric_value(&text, INFLIGHT) {
                        samples.max_inflight_bytes = samples.max_inflight_bytes.max(v);
                    }
                    if let Some(v) = metric_value(&text, INFLIGHT_LIMIT) {
                        samples.limit_bytes = v;
                    }
                }
                if let Ok(rss) = procs::rss_kib(pid) {
                    samples.max_rss_kib = samples.max_rss_kib.max(rss);
                }
                samples.count += 1;
            }
            samples
        });
        Self { stop, task }
    }

    /// Stops sampling and returns what was seen.
    pub async fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// The gateway's Prometheus text, or `None` when it could not be read.
async fn metrics_text(conn: &mut Conn) -> Option<String> {
    let sender = conn.ready().await.ok()?;
    let req = Request::get("/metrics")
        .header(header::HOST, "bench")
        .body(Full::new(Bytes::new()))
        .expect("static request parts are valid");
    let Ok(response) = sender.send_request(req).await else {
        conn.reset();
        return None;
    };
    let body = response.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

/// The value of an unlabelled metric `name` in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The gateway's own time for a request (`x-tollgate-overhead-ms`): what it adds over
/// the upstream call, so a stalled gateway can be told from a busy machine.
const OVERHEAD_HEADER: &str = "x-tollgate-overhead-ms";

/// Normal requests sent one at a time: their latency, answers, and the gateway's own
/// time for each.
#[derive(Debug)]
pub struct Probed {
    /// Latency and answers as the client saw them.
    pub stats: Stats,
    /// The gateway's overhead per answered request, microseconds.
    pub overhead_p50_us: u64,
    /// 99th percentile.
    pub overhead_p99_us: u64,
}

/// Sends `target`'s request `count` times, one at a time, after `warmup` unmeasured ones.
pub async fn probe(target: &Target, warmup: usize, count: usize) -> Probed {
    let never = Arc::new(AtomicBool::new(false));
    let mut conn = Conn::new(target.addr);
    for _ in 0..warmup {
        let _ = conn.call(target).await;
    }
    probe_until(conn, target, &never, count).await
}

/// Normal requests sent one at a time, back to back, until stopped.
#[derive(Debug)]
pub struct Prober {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Probed>,
}

impl Prober {
    /// Starts sending `target`'s request.
    pub fn start(target: Target) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            probe_until(Conn::new(target.addr), &target, &flag, usize::MAX).await
        });
        Self { stop, task }
    }

    /// Stops after the request in progress and returns what was measured.
    pub async fn finish(self) -> anyhow::Result<Probed> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

async fn probe_until(mut conn: Conn, target: &Target, stop: &AtomicBool, count: usize) -> Probed {
    let mut latency = load::histogram();
    let mut overhead = load::histogram();
    let (mut ok, mut errors) = (0, BTreeMap::new());
    let started = Instant::now();
    for _ in 0..count {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let sent = Instant::now();
        match timed_call(&mut conn, target).await {
            Ok(gateway_ms) => {
                ok += 1;
                let _ = latency.record(load::micros(sent.elapsed()));
                if let Some(ms) = gateway_ms {
                    let _ = overhead.record(((ms * 1000.0) as u64).max(1));
                }
            }
            Err(kind) => {
                *errors.entry(kind).or_default() += 1;
                // A refused request comes back at once: do not spin.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    Probed {
        stats: Stats::from(&latency, ok, errors, started.elapsed().as_secs_f64()),
        overhead_p50_us: overhead.value_at_quantile(0.5),
        overhead_p99_us: overhead.value_at_quantile(0.99),
    }
}

/// One request read to its end: the gateway's overhead header (ms), or why it failed.
async fn timed_call(conn: &mut Conn, target: &Target) -> Result<Option<f64>, String> {
    let sender = conn.ready().await?;
    let Ok(response) = sender.send_request(target.request()).await else {
        conn.reset();
        return Err("io".to_owned());
    };
    let status = response.status();
    let overhead = response
        .headers()
        .get(OVERHEAD_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if response.into_body().collect().await.is_err() {
        conn.reset();
        return Err("body".to_owned());
    }
    if status.is_success() {
        Ok(overhead)
    } else {
        Err(format!("status {}", status.as_u16()))
    }
}

/// Watches the RSS of `pid` fall after a burst: until it is within `slack_kib` of
/// `idle_kib`, or has not reached a new low for two seconds, or `patience` runs out.
/// Returns the lowest reading (KiB) and how long after the start it was reached.
pub async fn rss_given_back(
    pid: u32,
    idle_kib: u64,
    slack_kib: u64,
    patience: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let (mut lowest, mut lowest_at) = (procs::rss_kib(pid)?, started);
    while lowest > idle_kib + slack_kib
        && lowest_at.elapsed() < Duration::from_secs(2)
        && started.elapsed() < patience
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rss = procs::rss_kib(pid)?;
        if rss < lowest {
            (lowest, lowest_at) = (rss, Instant::now());
        }
    }
    Ok((lowest, lowest_at - started))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hostile_body_is_a_streamed_chat_request_of_the_promised_size() {
        let small = body("bench-stream", 5);
        let v: serde_json::Value = serde_json::from_slice(&small).unwrap();
        assert_eq!(v["model"], "bench-stream");
        assert_eq!(v["stream"], true);
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!(v["pad"].as_array().unwrap().len(), 5);

        let full = body("bench-stream", PAD_ELEMENTS);
        assert_eq!(full.len(), small.len() + 2 * (PAD_ELEMENTS - 5));
        assert_eq!(full.len(), 32_000_090);
        assert!(full.len() < 32 * 1024 * 1024, "under --max-body-bytes");
    }

    #[test]
    fn metric_values_are_read_by_exact_name() {
        let text = "# HELP tollgate_inflight_request_bytes Request memory.\n\
                    # TYPE tollgate_inflight_request_bytes gauge\n\
                    tollgate_inflight_request_bytes 64004096\n\
                    tollgate_inflight_request_bytes_limit 268435456\n";
        assert_eq!(metric_value(text, INFLIGHT), Some(64_004_096.0));
        assert_eq!(metric_value(text, INFLIGHT_LIMIT), Some(268_435_456.0));
        assert_eq!(metric_value(text, "tollgate_inflight"), None);
    }
}
