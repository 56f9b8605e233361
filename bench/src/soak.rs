//! The soak run: one gateway with Redis under steady mixed traffic for a long time (30
//! minutes by default), sampling its memory (RSS), open file descriptors and threads, and
//! Redis's key count and memory. A leak shows up as a trend: each series is fitted with a
//! least-squares line after a warm-up, and the growth that line predicts over the run
//! must stay under a small threshold. Every answer must also be one the mix expects
//! (no 5xx, no broken connection).
//!
//! The mix: plain, large, streamed and cached answers, streams abandoned after their
//! first chunk, unknown keys (401), a key held to 60 requests a minute (429s), and
//! malformed bodies (400).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::HeaderValue;
use http_body_util::BodyExt;
use serde::Serialize;

use crate::{
    config,
    load::{self, Conn, Target},
    procs::{self, Proc},
};

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The gateway binary.
    pub gateway: PathBuf,
    /// How long.
    pub duration: Duration,
    /// Requests per second, in all.
    pub rate: f64,
    /// Concurrent client connections.
    pub connections: usize,
    /// Time between samples.
    pub sample_every: Duration,
    /// Where soak.md and soak.csv go.
    pub out: PathBuf,
    /// Scratch directory.
    pub work: PathBuf,
}

/// Kinds of request in the mix, with their weight (out of 100) and the statuses they may
/// get.
const MIX: &[(Kind, u32)] = &[
    (Kind::Small, 45),
    (Kind::Large, 5),
    (Kind::Stream, 15),
    (Kind::Cached, 10),
    (Kind::Abandoned, 5),
    (Kind::UnknownKey, 5),
    (Kind::Tight, 10),
    (Kind::BadBody, 5),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Kind {
    Small,
    Large,
    Stream,
    Cached,
    Abandoned,
    UnknownKey,
    Tight,
    BadBody,
}

impl Kind {
    fn pick(rng: &mut fastrand::Rng) -> Self {
        let mut n = rng.u32(0..100);
        for (kind, weight) in MIX {
            if n < *weight {
                return *kind;
            }
            n -= weight;
        }
        Kind::Small
    }

    fn expected(self, status: u16) -> bool {
        match self {
            Kind::UnknownKey => status == 401,
            Kind::Tight => status == 200 || status == 429,
            Kind::BadBody => status == 400,
            _ => status == 200,
        }
    }
}

/// The client key limited to 60 requests a minute.
fn tight_key() -> String {
    config::key_from_seed(1)
}

fn targets(addr: SocketAddr) -> BTreeMap<Kind, Target> {
    let auth = |key: &str| Some(HeaderValue::from_str(&format!("Bearer {key}")).expect("ascii"));
    let target = |key: &str, body: Bytes| Target {
        addr,
        path: "/v1/chat/completions".to_owned(),
        auth: auth(key),
        body,
        content_type: None,
    };
    let bench = config::bench_key();
    BTreeMap::from([
        (
            Kind::Small,
            target(&bench, load::chat_body("bench-small", false)),
        ),
        (
            Kind::Large,
            target(&bench, load::chat_body("bench-large", false)),
        ),
        (
            Kind::Stream,
            target(&bench, load::chat_body("bench-stream", true)),
        ),
        (
            Kind::Cached,
            target(&bench, load::chat_body("bench-cached", false)),
        ),
        (
            Kind::Abandoned,
            target(&bench, load::chat_body("bench-stream", true)),
        ),
        (
            Kind::UnknownKey,
            target(
                &config::key_from_seed(99),
                load::chat_body("bench-small", false),
            ),
        ),
        (
            Kind::Tight,
            target(&tight_key(), load::chat_body("bench-small", false)),
        ),
        (
            Kind::BadBody,
            target(&bench, Bytes::from_static(b"{\"model\": \"bench-small\", ")),
        ),
    ])
}

/// Answers by kind and status (0: the connection failed).
type Tally = BTreeMap<(Kind, u16), u64>;

/// One client connection sending its share of the rate until `end`.
async fn client(
    targets: Arc<BTreeMap<Kind, Target>>,
    addr: SocketAddr,
    interval: Duration,
    end: Instant,
    seed: u64,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut conn = Conn::new(addr);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        ticker.tick().await;
        let kind = Kind::pick(&mut rng);
        let status = send(&mut conn, &targets[&kind], kind == Kind::Abandoned).await;
        *tally
            .lock()
            .expect("not poisoned")
            .entry((kind, status))
            .or_default() += 1;
    }
}

/// Sends one request; reads the whole answer, or only its first chunk and then drops
/// the connection when `abandon`.
async fn send(conn: &mut Conn, target: &Target, abandon: bool) -> u16 {
    let Ok(sender) = conn.ready().await else {
        return 0;
    };
    let Ok(response) = sender.send_request(target.request()).await else {
        conn.reset();
        return 0;
    };
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if abandon {
        let _ = body.frame().await;
        drop(body);
        conn.reset();
        return status;
    }
    if body.collect().await.is_err() {
        conn.reset();
        return 0;
    }
    status
}

/// One sample of the gateway and Redis.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    seconds: f64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    redis_keys: u64,
    redis_memory_kib: u64,
    answered: u64,
}

impl Sample {
    /// The CSV row (columns as in the header `run` writes).
    fn csv_row(&self) -> String {
        format!(
            "{:.1},{},{},{},{},{},{}",
            self.seconds,
            self.rss_kib,
            self.fds,
            self.threads,
            self.redis_keys,
            self.redis_memory_kib,
            self.answered
        )
    }

    /// One progress line.
    fn describe(&self) -> String {
        let Self {
            seconds,
            rss_kib,
            fds,
            threads,
            redis_keys,
            redis_memory_kib,
            answered,
        } = self;
        format!(
            "{seconds:>6.0} s: RSS {rss_kib} KiB, {fds} fds, {threads} threads, \
             Redis {redis_keys} keys / {redis_memory_kib} KiB, {answered} answered"
        )
    }
}

fn sample(
    gateway: u32,
    redis: SocketAddr,
    started: Instant,
    answered: u64,
) -> anyhow::Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{gateway}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{gateway}/fd"))?.count() as u64;
    let dbsize = redis_command(redis, "DBSIZE")?;
    let keys = dbsize
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches(':')
        .parse()
        .with_context(|| format!("DBSIZE answered {dbsize:?}"))?;
    let info = redis_command(redis, "INFO memory")?;
    let memory = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Sample {
        seconds: started.elapsed().as_secs_f64(),
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
        redis_keys: keys,
        redis_memory_kib: memory / 1024,
        answered,
    })
}

/// Sends an inline command and returns the raw reply.
fn redis_command(addr: SocketAddr, command: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "{command}\r\nQUIT\r\n")?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out)
}

/// A series' fitted trend.
#[derive(Debug, Clone, Serialize)]
pub struct Trend {
    name: &'static str,
    unit: &'static str,
    first: f64,
    last: f64,
    min: f64,
    max: f64,
    mean: f64,
    /// Growth per hour of the least-squares line.
    slope_per_hour: f64,
    /// Growth the line predicts over the analysed window.
    predicted_growth: f64,
    /// Largest growth tolerated over the window.
    allowed: f64,
    flat: bool,
}

/// Least-squares slope of `ys` over `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 { 0.0 } else { num / den }
}

/// Fits `ys` (sampled at `xs` seconds) and judges it flat when the line's growth over
/// the window stays under `relative` of the mean or `floor`, whichever is larger.
fn trend(
    name: &'static str,
    unit: &'static str,
    xs: &[f64],
    ys: &[f64],
    relative: f64,
    floor: f64,
) -> Trend {
    let s = slope(xs, ys);
    let window = xs.last().copied().unwrap_or(0.0) - xs.first().copied().unwrap_or(0.0);
    let mean = ys.iter().sum::<f64>() / ys.len().max(1) as f64;
    let allowed = (mean * relative).max(floor);
    let predicted = s * window;
    Trend {
        name,
        unit,
        first: ys.first().copied().unwrap_or(0.0),
        last: ys.last().copied().unwrap_or(0.0),
        min: ys.iter().copied().fold(f64::INFINITY, f64::min),
        max: ys.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        mean,
        slope_per_hour: s * 3600.0,
        predicted_growth: predicted,
        allowed,
        flat: predicted <= allowed,
    }
}

/// The trends of every series, leaving out the first tenth of the run (warm-up: pools,
/// caches and allocator arenas fill).
fn trends(samples: &[Sample]) -> Vec<Trend> {
    let warm = samples.len() / 10;
    let s = &samples[warm.min(samples.len().saturating_sub(2))..];
    let xs: Vec<f64> = s.iter().map(|s| s.seconds).collect();
    let col = |f: fn(&Sample) -> u64| s.iter().map(|s| f(s) as f64).collect::<Vec<_>>();
    vec![
        trend("gateway RSS", "KiB", &xs, &col(|s| s.rss_kib), 0.05, 4096.0),
        trend("gateway open fds", "", &xs, &col(|s| s.fds), 0.05, 8.0),
        trend("gateway threads", "", &xs, &col(|s| s.threads), 0.0, 2.0),
        trend("Redis keys", "", &xs, &col(|s| s.redis_keys), 0.05, 10.0),
        trend(
            "Redis memory",
            "KiB",
            &xs,
            &col(|s| s.redis_memory_kib),
            0.05,
            1024.0,
        ),
    ]
}

/// The extra configuration: the tight key.
fn write_config(resources: &Path, upstream: SocketAddr) -> anyhow::Result<()> {
    config::write(resources, upstream)?;
    std::fs::write(
        resources.join("soak.yaml"),
        format!(
            "apiVersion: tollgate.dev/v1alpha1\nkind: ApiKey\nmetadata: {{ name: tight }}\nspec:\n  owner: soak\n  limits: {{ requestsPerMinute: 60 }}\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata: {{ name: tight-key }}\nstringData: {{ apiKey: {} }}\n",
            tight_key()
        ),
    )?;
    Ok(())
}

fn start_gateway(
    s: &Settings,
    resources: &Path,
    redis: SocketAddr,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = procs::free_addr()?;
    let admin = procs::free_addr()?;
    let mut cmd = Command::new(&s.gateway);
    cmd.arg("--resources")
        .arg(resources)
        .args(["--listen", &addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--redis-url", &format!("redis://{redis}")])
        // Every client is on 127.0.0.1: unknown keys must not throttle the others.
        .args(["--auth-failures-per-minute", "0"])
        .args(["--log-format", "json"])
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    let mut proc = Proc::spawn("tollgate", cmd, s.work.join("gateway.log"))?;
    proc.wait_listening(addr, Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while crate::scenarios::http_get_status(addr, "/readyz") != Some(200) {
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!("the gateway is not ready:\n{}", procs::tail(&proc.log, 20));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proc, addr))
}

/// Runs the soak and writes `soak.md` and `soak.csv`; fails when a series grows or an
/// answer was not one the mix expects.
pub async fn run(s: &Settings) -> anyhow::Result<()> {
    std::fs::create_dir_all(&s.work)?;
    std::fs::create_dir_all(&s.out)?;
    let (_upstream_proc, upstream) = procs::upstream(&s.work, 1)?;
    let (_redis_proc, redis) = procs::redis()?;
    let resources = s.work.join("resources");
    write_config(&resources, upstream)?;
    let (mut gateway, addr) = start_gateway(s, &resources, redis)?;
    // Described before the run: the commit is the one the binary was built from.
    let machine = crate::report::Machine::probe();
    let pid = gateway.pid();

    let started = Instant::now();
    let end = started + s.duration;
    let tally = Arc::new(Mutex::new(Tally::new()));
    let targets = Arc::new(targets(addr));
    let interval = Duration::from_secs_f64(s.connections as f64 / s.rate);
    let clients: Vec<_> = (0..s.connections)
        .map(|i| {
            tokio::spawn(client(
                targets.clone(),
                addr,
                interval,
                end,
                i as u64,
                tally.clone(),
            ))
        })
        .collect();

    let csv_path = s.out.join("soak.csv");
    let mut csv =
        String::from("seconds,rss_kib,fds,threads,redis_keys,redis_memory_kib,answered\n");
    let mut samples = Vec::new();
    let answered = |t: &Mutex<Tally>| t.lock().expect("not poisoned").values().sum::<u64>();
    loop {
        gateway.check_alive()?;
        let now = sample(pid, redis, started, answered(&tally))?;
        let _ = writeln!(csv, "{}", now.csv_row());
        std::fs::write(&csv_path, &csv)?;
        eprintln!("soak {}", now.describe());
        samples.push(now);
        if Instant::now() >= end {
            break;
        }
        tokio::time::sleep(
            s.sample_every
                .min(end.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    for c in clients {
        c.await?;
    }
    // Once the load stops, what is left held: sampled after the in-flight work settles.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = sample(pid, redis, started, answered(&tally))?;

    let tally = tally.lock().expect("not poisoned").clone();
    let unexpected: Vec<String> = tally
        .iter()
        .filter(|((kind, status), _)| !kind.expected(*status))
        .map(|((kind, status), n)| format!("{kind:?} → {status}: {n}"))
        .collect();
    let trends = trends(&samples);
    let md = markdown(s, &machine, &samples, &idle, &tally, &trends, &unexpected);
    std::fs::write(s.out.join("soak.md"), &md)?;
    println!("{md}");
    eprintln!("written to {}/soak.{{md,csv}}", s.out.display());
    if !unexpected.is_empty() {
        bail!("unexpected answers: {}", unexpected.join(", "));
    }
    let grown: Vec<&str> = trends.iter().filter(|t| !t.flat).map(|t| t.name).collect();
    if !grown.is_empty() {
        bail!("growth trend in {}", grown.join(", "));
    }
    Ok(())
}

/// "30 minutes", "90 seconds".
fn length(d: Duration) -> String {
    match d.as_secs() {
        60 => "1 minute".to_owned(),
        secs if secs % 60 == 0 => format!("{} minutes", secs / 60),
        secs => format!("{secs} seconds"),
    }
}

fn markdown(
    s: &Settings,
    machine: &crate::report::Machine,
    samples: &[Sample],
    idle: &Sample,
    tally: &Tally,
    trends: &[Trend],
    unexpected: &[String],
) -> String {
    let total: u64 = tally.values().sum();
    let mut md = String::new();
    let _ = writeln!(md, "# Soak run\n");
    let _ = writeln!(
        md,
        "{} at {} requests/s over {} connections, one gateway with Redis; {} samples, one every {} s. \
         Machine: {} ({} cores), commit {}.\n",
        length(s.duration),
        s.rate,
        s.connections,
        samples.len(),
        s.sample_every.as_secs(),
        machine.cpu,
        machine.cores,
        machine.commit,
    );
    let _ = writeln!(
        md,
        "## Answers\n\n{total} requests answered.\n\n| Kind | Status | Count |\n|---|---|---|"
    );
    for ((kind, status), n) in tally {
        let _ = writeln!(md, "| {kind:?} | {status} | {n} |");
    }
    let _ = writeln!(
        md,
        "\nUnexpected answers (5xx, broken connections, wrong status for the kind): {}.\n",
        if unexpected.is_empty() {
            "none".to_owned()
        } else {
            unexpected.join(", ")
        }
    );
    let _ = writeln!(
        md,
        "## Trends (after the first tenth of the run)\n\n| Series | First | Last | Min | Max | Slope per hour | Fitted growth over the run | Allowed | Verdict |\n|---|---|---|---|---|---|---|---|---|"
    );
    for t in trends {
        let _ = writeln!(
            md,
            "| {} ({}) | {:.0} | {:.0} | {:.0} | {:.0} | {:+.1} | {:+.1} | {:.0} | {} |",
            t.name,
            if t.unit.is_empty() { "count" } else { t.unit },
            t.first,
            t.last,
            t.min,
            t.max,
            t.slope_per_hour,
            t.predicted_growth,
            t.allowed,
            if t.flat { "flat" } else { "GROWS" }
        );
    }
    let _ = writeln!(
        md,
        "\nIdle after the load stopped (3 s later): RSS {} KiB, {} fds, {} threads, Redis {} keys / {} KiB.\n\n\
         Raw samples: soak.csv. Command: `bash bench/soak.sh {}`.",
        idle.rss_kib,
        idle.fds,
        idle.threads,
        idle.redis_keys,
        idle.redis_memory_kib,
        match s.duration.as_secs() {
            secs if secs % 60 == 0 => format!("--minutes {}", secs / 60),
            secs => format!("--seconds {secs}"),
        }
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flat_noisy_series_is_flat_and_a_steady_climb_is_not() {
        let xs: Vec<f64> = (0..100).map(|i| i as f64 * 10.0).collect();
        let noisy: Vec<f64> = (0..100)
            .map(|i| 50_000.0 + [0.0, 900.0, -700.0][i % 3])
            .collect();
        assert!(trend("rss", "KiB", &xs, &noisy, 0.05, 4096.0).flat);
        // 100 KiB more every sample: 9.9 MiB over the run.
        let leak: Vec<f64> = (0..100).map(|i| 50_000.0 + i as f64 * 100.0).collect();
        let t = trend("rss", "KiB", &xs, &leak, 0.05, 4096.0);
        assert!(!t.flat, "{t:?}");
        assert!((t.predicted_growth - 9_900.0).abs() < 1.0, "{t:?}");
    }

    #[test]
    fn the_mix_adds_up_to_one_hundred() {
        assert_eq!(MIX.iter().map(|(_, w)| w).sum::<u32>(), 100);
    }
}
