//! The benchmark scenarios, each measured against its baselines in the same run.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use http::HeaderValue;

mod media;

use crate::{
    config,
    load::{self, Stats, Target},
    procs::{self, Proc},
    report::Report,
};

/// What to run and where.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Shorter runs (a smoke test of the harness; figures are noisier).
    pub quick: bool,
    /// The gateway binary.
    pub gateway: PathBuf,
    /// Scratch directory (configs, logs).
    pub work: PathBuf,
    /// The repository's `examples/` (for the idle-memory figure).
    pub examples: PathBuf,
    /// Scenario names to run; empty runs all.
    pub only: Vec<String>,
}

impl Settings {
    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == name)
    }

    fn scale(&self, full: u64, quick: u64) -> u64 {
        if self.quick { quick } else { full }
    }
}

/// Every scenario name, in run order.
pub const SCENARIOS: &[&str] = &[
    "single",
    "saturation",
    "streaming",
    "slow-upstream",
    "reload",
    "memory",
    "guardrails",
    "dialects",
    "routing",
    "hostile",
    "media",
];

/// A running gateway.
#[derive(Debug)]
struct Gateway {
    proc: Proc,
    addr: SocketAddr,
    /// The admin listener (`/metrics`).
    admin: SocketAddr,
}

impl Gateway {
    fn start(
        s: &Settings,
        name: &str,
        resources: &Path,
        redis: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        Self::start_from(s, name, "--resources", resources, redis, &[])
    }

    /// Starts a gateway reading `source_flag` (`--resources` or `--config-dir`) `path`,
    /// with `extra` arguments.
    fn start_from(
        s: &Settings,
        name: &str,
        source_flag: &str,
        path: &Path,
        redis: Option<SocketAddr>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let addr = procs::free_addr()?;
        let admin = procs::free_addr()?;
        let mut cmd = Command::new(&s.gateway);
        cmd.arg(source_flag)
            .arg(path)
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", &admin.to_string()])
            .args(["--reload-interval", "100ms", "--log-format", "json"])
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        if let Some(redis) = redis {
            cmd.args(["--redis-url", &format!("redis://{redis}")]);
        }
        let log = s
            .work
            .join(format!("{}.log", name.replace([' ', '+'], "-")));
        let mut proc = Proc::spawn(name, cmd, log)?;
        proc.wait_listening(addr, Duration::from_secs(30))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get_status(addr, "/readyz") != Some(200) {
            proc.check_alive()?;
            if Instant::now() > deadline {
                bail!("{name} not ready:\n{}", procs::tail(&proc.log, 20));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { proc, addr, admin })
    }

    fn target(&self, model: &str, stream: bool) -> Target {
        Target {
            addr: self.addr,
            path: "/v1/chat/completions".to_owned(),
            auth: Some(
                HeaderValue::from_str(&format!("Bearer {}", config::bench_key()))
                    .expect("keys are header-safe"),
            ),
            body: load::chat_body(model, stream),
            content_type: None,
        }
    }

    /// `load_ms` of each "configuration loaded" log line.
    fn reload_times_ms(&self) -> Vec<f64> {
        std::fs::read_to_string(&self.proc.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("configuration loaded"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["fields"]["load_ms"].as_f64().or(v["load_ms"].as_f64()))
            .collect()
    }
}

pub(crate) fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The processes every scenario measures: the mock upstream, nginx in front of it, and
/// two gateways (standalone, and with Redis).
#[derive(Debug)]
struct Bed {
    upstream: SocketAddr,
    nginx: SocketAddr,
    nginx_pid: u32,
    redis_pid: u32,
    plain: Gateway,
    full: Gateway,
}

impl Bed {
    /// The process whose CPU time a subject costs (none for direct calls).
    fn pid_of(&self, subject: &str) -> Option<u32> {
        match subject {
            "nginx" => Some(self.nginx_pid),
            s if s.starts_with("tollgate + redis") => Some(self.full.proc.pid()),
            s if s.starts_with("tollgate") => Some(self.plain.proc.pid()),
            _ => None,
        }
    }

    /// The same request direct, through nginx, and through both gateways.
    fn subjects(&self, model: &str, stream: bool) -> Vec<(&'static str, Target)> {
        let base = direct(self.upstream, model, stream);
        vec![
            ("direct", base.clone()),
            ("nginx", via(self.nginx, &base)),
            ("tollgate", self.plain.target(model, stream)),
            ("tollgate + redis", self.full.target(model, stream)),
        ]
    }
}

/// A request straight to the mock upstream (what the gateway would send).
fn direct(upstream: SocketAddr, model: &str, stream: bool) -> Target {
    let path = config::MODELS
        .iter()
        .find(|(m, _, _)| *m == model)
        .map(|(_, p, _)| *p)
        .expect("a bench model");
    Target {
        addr: upstream,
        path: format!("/{path}/v1/chat/completions"),
        auth: None,
        body: load::chat_body(model, stream),
        content_type: None,
    }
}

fn via(proxy: SocketAddr, t: &Target) -> Target {
    Target {
        addr: proxy,
        ..t.clone()
    }
}

fn us(v: u64) -> f64 {
    v as f64
}

fn note_errors(report: &mut Report, scenario: &str, subject: &str, stats: &Stats) {
    if stats.failed() > 0 {
        report.notes.push(format!(
            "{scenario}, {subject}: {} failed requests {:?}",
            stats.failed(),
            stats.errors
        ));
    }
}

/// Sequential latency of each subject in three interleaved rounds (so a burst of noise
/// hits every subject alike), reported as the median of the rounds' p50 and p99.
async fn sequential_medians(
    report: &mut Report,
    scenario: &str,
    subjects: &[(&'static str, Target)],
    count: usize,
) -> (Vec<u64>, Vec<u64>) {
    let mut p50s: Vec<Vec<u64>> = vec![Vec::new(); subjects.len()];
    let mut p99s: Vec<Vec<u64>> = vec![Vec::new(); subjects.len()];
    for _round in 0..3 {
        for (i, (name, target)) in subjects.iter().enumerate() {
            let stats = load::sequential(target, count / 10, count / 3).await;
            note_errors(report, scenario, name, &stats);
            p50s[i].push(stats.p50_us);
            p99s[i].push(stats.p99_us);
        }
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let p50: Vec<u64> = p50s.iter_mut().map(median).collect();
    let p99: Vec<u64> = p99s.iter_mut().map(median).collect();
    for (i, (name, _)) in subjects.iter().enumerate() {
        report.add(scenario, name, "p50 latency", us(p50[i]), "µs");
        report.add(scenario, name, "p99 latency", us(p99[i]), "µs");
    }
    (p50, p99)
}

/// Adds what the second of two subjects adds over the first: p50 (with the first's as
/// its baseline, named `baseline`) and p99.
fn added_latency(
    report: &mut Report,
    scenario: &str,
    subjects: &[(&'static str, Target); 2],
    baseline: &str,
    (p50, p99): (Vec<u64>, Vec<u64>),
) {
    let subject = subjects[1].0;
    let added = |v: &[u64]| v[1] as f64 - v[0] as f64;
    let row = report.add(scenario, subject, "added p50", added(&p50), "µs");
    row.baseline = Some((baseline.to_owned(), us(p50[0])));
    report.add(scenario, subject, "added p99", added(&p99), "µs");
}

/// Runs the selected scenarios.
pub async fn run(s: &Settings, report: &mut Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(&s.work)?;
    let (_upstream, upstream) = procs::upstream(&s.work, 2)?;
    let (nginx_proc, nginx) = procs::nginx(&s.work, upstream)?;
    let (redis_proc, redis) = procs::redis()?;
    let resources = s.work.join("resources");
    config::write(&resources, upstream)?;
    let bed = Bed {
        upstream,
        nginx,
        nginx_pid: nginx_proc.pid(),
        redis_pid: redis_proc.pid(),
        plain: Gateway::start(s, "tollgate", &resources, None)?,
        full: Gateway::start(s, "tollgate + redis", &resources, Some(redis))?,
    };
    if s.wants("single") {
        single(s, report, &bed).await?;
    }
    if s.wants("saturation") {
        saturation(s, report, &bed).await?;
    }
    if s.wants("streaming") {
        streaming(s, report, &bed).await?;
    }
    if s.wants("slow-upstream") {
        slow_upstream(s, report, upstream, &bed.full).await?;
    }
    if s.wants("guardrails") {
        guardrails(s, report, &bed).await?;
    }
    if s.wants("dialects") {
        dialects(s, report, &bed).await?;
    }
    if s.wants("routing") {
        routing(s, report, &bed).await?;
    }
    let idle_full = bed.full.proc.rss_kib()?;
    drop(bed);
    if s.wants("reload") {
        reload(s, report, upstream).await?;
    }
    if s.wants("memory") {
        memory(s, report, idle_full).await?;
    }
    if s.wants("hostile") {
        hostile(s, report).await?;
    }
    if s.wants("media") {
        media::run(s, report, upstream).await?;
    }
    Ok(())
}

/// One request at a time: what each hop adds to a request's latency.
async fn single(s: &Settings, report: &mut Report, bed: &Bed) -> anyhow::Result<()> {
    const SCENARIO: &str = "One request at a time (1 KB answer)";
    let count = s.scale(20_000, 2_000) as usize;
    let mut subjects = bed.subjects("bench-small", false);
    subjects.extend([
        (
            "tollgate, cache hit",
            bed.plain.target("bench-cached", false),
        ),
        ("direct, 10 KB", direct(bed.upstream, "bench-large", false)),
        (
            "tollgate + redis, 10 KB",
            bed.full.target("bench-large", false),
        ),
    ]);
    let (p50, p99) = sequential_medians(report, SCENARIO, &subjects, count).await;
    let added = |i: usize, base: usize| {
        (
            p50[i] as f64 - p50[base] as f64,
            p99[i] as f64 - p99[base] as f64,
        )
    };
    let (nginx50, nginx99) = added(1, 0);
    report.add(SCENARIO, "nginx", "added p50", nginx50, "µs");
    report.add(SCENARIO, "nginx", "added p99", nginx99, "µs");
    let (plain50, plain99) = added(2, 0);
    let row = report.add(SCENARIO, "tollgate", "added p50", plain50, "µs");
    row.baseline = Some(("nginx added p50".to_owned(), nginx50));
    row.ratio = Some(plain50 / nginx50.max(1.0));
    row.target = Some("≤ 3× nginx's".to_owned());
    row.met = Some(plain50 <= 3.0 * nginx50.max(1.0));
    report.add(SCENARIO, "tollgate", "added p99", plain99, "µs");
    let (full50, full99) = added(3, 0);
    let row = report.add(SCENARIO, "tollgate + redis", "added p50", full50, "µs");
    row.target = Some("≤ 60 µs".to_owned());
    row.met = Some(full50 <= 60.0);
    let row = report.add(SCENARIO, "tollgate + redis", "added p99", full99, "µs");
    row.target = Some("≤ 250 µs".to_owned());
    row.met = Some(full99 <= 250.0);
    let (cache50, _) = added(4, 0);
    report.add(SCENARIO, "tollgate, cache hit", "added p50", cache50, "µs");
    let (large50, large99) = added(6, 5);
    report.add(
        SCENARIO,
        "tollgate + redis, 10 KB",
        "added p50",
        large50,
        "µs",
    );
    report.add(
        SCENARIO,
        "tollgate + redis, 10 KB",
        "added p99",
        large99,
        "µs",
    );
    Ok(())
}

/// Closed-loop saturation throughput at 16 and 64 connections.
async fn saturation(s: &Settings, report: &mut Report, bed: &Bed) -> anyhow::Result<()> {
    let secs = Duration::from_secs(s.scale(10, 3));
    let warmup = Duration::from_secs(1);
    for conns in [16, 64] {
        let scenario = format!("Saturation, {conns} connections (1 KB answer)");
        let mut subjects = bed.subjects("bench-small", false);
        subjects.push((
            "tollgate, cache hit",
            bed.plain.target("bench-cached", false),
        ));
        let mut nginx_rps = 0.0;
        let mut nginx_cpu = 0.0;
        for (name, target) in &subjects {
            let pid = bed.pid_of(name);
            let cpu_before = pid.map(procs::cpu_seconds);
            let redis_before = procs::cpu_seconds(bed.redis_pid);
            let stats = load::closed(target, conns, warmup, secs).await;
            let cpu = pid
                .zip(cpu_before)
                .map(|(p, before)| procs::cpu_seconds(p) - before);
            let redis_cpu = procs::cpu_seconds(bed.redis_pid) - redis_before;
            note_errors(report, &scenario, name, &stats);
            let row = report.add(&scenario, name, "throughput", stats.rps, "req/s");
            match *name {
                "nginx" => nginx_rps = stats.rps,
                "tollgate" => {
                    row.baseline = Some(("nginx".to_owned(), nginx_rps));
                    row.ratio = Some(stats.rps / nginx_rps);
                    row.target = Some("≥ 0.6× nginx".to_owned());
                    row.met = Some(stats.rps >= 0.6 * nginx_rps);
                }
                "tollgate + redis" => {
                    row.baseline = Some(("nginx".to_owned(), nginx_rps));
                    row.ratio = Some(stats.rps / nginx_rps);
                    row.target = Some("≥ 0.4× nginx".to_owned());
                    row.met = Some(stats.rps >= 0.4 * nginx_rps);
                }
                _ if nginx_rps > 0.0 => {
                    row.baseline = Some(("nginx".to_owned(), nginx_rps));
                    row.ratio = Some(stats.rps / nginx_rps);
                }
                _ => {}
            }
            report.add(&scenario, name, "p99 latency", us(stats.p99_us), "µs");
            if let Some(cpu) = cpu {
                // CPU time of the proxy process(es) per answered request: steadier than
                // throughput on a shared machine, and what capacity planning needs.
                let per = cpu * 1e6 / stats.answered_total.max(1) as f64;
                let row = report.add(&scenario, name, "proxy CPU per request", per, "µs");
                if *name == "nginx" {
                    nginx_cpu = per;
                } else if nginx_cpu > 0.0 {
                    row.baseline = Some(("nginx".to_owned(), nginx_cpu));
                    row.ratio = Some(per / nginx_cpu);
                }
            }
            if name.contains("redis") {
                let per = redis_cpu * 1e6 / stats.answered_total.max(1) as f64;
                report.add(&scenario, name, "Redis CPU per request", per, "µs");
            }
        }
    }
    Ok(())
}

/// Streams one at a time: time to first token and the gaps between chunks.
async fn streaming(s: &Settings, report: &mut Report, bed: &Bed) -> anyhow::Result<()> {
    const SCENARIO: &str = "Streaming (20 chunks, 5 ms apart), one stream at a time";
    let count = s.scale(300, 60) as usize;
    let subjects = bed.subjects("bench-stream", true);
    let mut direct_ttft = 0.0;
    let mut direct_gap = 0.0;
    for (name, target) in &subjects {
        let st = load::streams(target, 1, count / 10, count).await;
        if st.errors.values().sum::<u64>() > 0 {
            report.notes.push(format!(
                "{SCENARIO}, {name}: failed streams {:?}",
                st.errors
            ));
        }
        let row = report.add(
            SCENARIO,
            name,
            "time to first chunk p50",
            us(st.ttft_p50_us),
            "µs",
        );
        if *name == "direct" {
            direct_ttft = st.ttft_p50_us as f64;
            direct_gap = st.gap_p50_us as f64;
        } else {
            let added = st.ttft_p50_us as f64 - direct_ttft;
            row.baseline = Some(("direct".to_owned(), direct_ttft));
            report.add(SCENARIO, name, "added time to first chunk p50", added, "µs");
            if name.starts_with("tollgate") {
                let row = report.rows.last_mut().expect("just added");
                row.target = Some("≤ 200 µs".to_owned());
                row.met = Some(added <= 200.0);
            }
        }
        report.add(
            SCENARIO,
            name,
            "time to first chunk p99",
            us(st.ttft_p99_us),
            "µs",
        );
        let row = report.add(
            SCENARIO,
            name,
            "inter-chunk gap p50",
            us(st.gap_p50_us),
            "µs",
        );
        if *name != "direct" {
            row.baseline = Some(("direct".to_owned(), direct_gap));
            row.ratio = Some(st.gap_p50_us as f64 / direct_gap.max(1.0));
        }
        report.add(
            SCENARIO,
            name,
            "inter-chunk gap p99",
            us(st.gap_p99_us),
            "µs",
        );
        report.add(
            SCENARIO,
            name,
            "chunks received per stream",
            st.frames_per_stream,
            "count",
        );
    }
    Ok(())
}

/// A one-second upstream with thousands of requests in flight.
async fn slow_upstream(
    s: &Settings,
    report: &mut Report,
    upstream: SocketAddr,
    full: &Gateway,
) -> anyhow::Result<()> {
    let rate = s.scale(5_000, 2_000) as f64;
    let scenario =
        format!("One-second upstream, {rate:.0} requests/s open loop ({rate:.0} in flight)");
    let secs = Duration::from_secs(s.scale(15, 4));
    let conns = (rate * 1.25) as usize;
    let base = direct(upstream, "bench-slow", false);
    let mut base_p99 = 0.0;
    for (name, target) in [
        ("direct", base),
        ("tollgate + redis", full.target("bench-slow", false)),
    ] {
        // Two seconds first, not counted: connection pools fill up.
        let st = load::open_after(&target, rate, Duration::from_secs(2), secs, conns).await;
        note_errors(report, &scenario, name, &st);
        report.add(&scenario, name, "answered", st.ok as f64, "count");
        let row = report.add(&scenario, name, "failed", st.failed() as f64, "count");
        if name != "direct" {
            row.target = Some("0".to_owned());
            row.met = Some(st.failed() == 0);
        }
        report.add(&scenario, name, "p50 latency", us(st.p50_us) / 1000.0, "ms");
        let row = report.add(&scenario, name, "p99 latency", us(st.p99_us) / 1000.0, "ms");
        if name == "direct" {
            base_p99 = st.p99_us as f64 / 1000.0;
        } else {
            let p99 = st.p99_us as f64 / 1000.0;
            row.baseline = Some(("direct".to_owned(), base_p99));
            row.ratio = Some(p99 / base_p99);
            let added = p99 - base_p99;
            let row = report.add(&scenario, name, "added p99", added, "ms");
            row.target = Some("≤ 5 ms".to_owned());
            row.met = Some(added <= 5.0);
        }
    }
    Ok(())
}

/// Reloading a 10,000-key configuration while requests flow: from the files the operator
/// writes (the production path) and from standalone manifests (YAML compiled in process).
async fn reload(s: &Settings, report: &mut Report, upstream: SocketAddr) -> anyhow::Result<()> {
    const SCENARIO: &str =
        "Reload of a 10,000-key configuration under load (1,000 req/s open loop)";
    let manifests = s.work.join("reload");
    config::write(&manifests, upstream)?;
    config::write_many_keys(&manifests, 10_000, 0)?;
    let rendered = s.work.join("reload-rendered");
    config::render(&manifests, &rendered, 0)?;
    let secs = s.scale(10, 4);
    for (subject, flag, path) in [
        ("operator files", "--config-dir", &rendered),
        ("standalone manifests", "--resources", &manifests),
    ] {
        let gw = Gateway::start_from(s, &format!("tollgate ({subject})"), flag, path, None, &[])?;
        let from_files = flag == "--config-dir";
        let target = gw.target("bench-small", false);
        let quiet = load::open(&target, 1000.0, Duration::from_secs(secs), 32).await;
        let before = gw.reload_times_ms().len();
        let (manifests, rendered) = (manifests.clone(), rendered.clone());
        let writer = tokio::spawn(async move {
            for generation in 1..=secs as u32 / 2 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (m, r) = (manifests.clone(), rendered.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    config::write_many_keys(&m, 10_000, generation)?;
                    if from_files {
                        config::render(&m, &r, generation)?;
                    }
                    anyhow::Ok(())
                })
                .await;
            }
        });
        let busy = load::open(&target, 1000.0, Duration::from_secs(secs), 32).await;
        let _ = writer.await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let times: Vec<f64> = gw.reload_times_ms().into_iter().skip(before).collect();
        let who = format!("tollgate, {subject}");
        if times.is_empty() {
            report
                .notes
                .push(format!("{SCENARIO}, {who}: no reload was logged"));
        }
        let max = times.iter().copied().fold(0.0, f64::max);
        let row = report.add(SCENARIO, &who, "reloads", times.len() as f64, "count");
        row.target = Some(format!("{}", secs / 2));
        row.met = Some(times.len() as u64 == secs / 2);
        let row = report.add(SCENARIO, &who, "slowest reload", max, "ms");
        // The target is for the production path; standalone parses YAML (see README).
        if from_files {
            row.target = Some("≤ 100 ms".to_owned());
            row.met = Some(!times.is_empty() && max <= 100.0);
        }
        let row = report.add(
            SCENARIO,
            &who,
            "failed requests",
            busy.failed() as f64,
            "count",
        );
        row.target = Some("0".to_owned());
        row.met = Some(busy.failed() == 0);
        report.add(
            SCENARIO,
            &who,
            "p99 latency, no reloads",
            us(quiet.p99_us),
            "µs",
        );
        let row = report.add(
            SCENARIO,
            &who,
            "p99 latency, reloading",
            us(busy.p99_us),
            "µs",
        );
        row.baseline = Some(("no reloads".to_owned(), us(quiet.p99_us)));
        row.ratio = Some(busy.p99_us as f64 / quiet.p99_us.max(1) as f64);
        note_errors(report, SCENARIO, &who, &busy);
    }
    Ok(())
}

/// Resident memory idle and with 10,000 open streams.
async fn memory(s: &Settings, report: &mut Report, idle_after_load_kib: u64) -> anyhow::Result<()> {
    const SCENARIO: &str = "Memory (RSS)";
    let mib = |kib: u64| kib as f64 / 1024.0;
    {
        let gw = Gateway::start(s, "tollgate (examples)", &s.examples, None)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let row = report.add(
            SCENARIO,
            "tollgate, examples loaded, idle",
            "RSS",
            mib(gw.proc.rss_kib()?),
            "MiB",
        );
        row.target = Some("≤ 30 MiB".to_owned());
        row.met = Some(row.value <= 30.0);
    }
    report.add(
        SCENARIO,
        "tollgate + redis, idle after the scenarios above",
        "RSS",
        mib(idle_after_load_kib),
        "MiB",
    );
    let dir = s.work.join("resources");
    let mut gw = Gateway::start(s, "tollgate (streams)", &dir, None)?;
    let streams = s.scale(10_000, 1_000) as usize;
    let target = gw.target("bench-long-stream", true);
    let held = load::hold_streams(&target, streams, Duration::from_secs(60)).await;
    gw.proc
        .check_alive()
        .context("gateway died holding streams")?;
    let rss = gw.proc.rss_kib()?;
    let row = report.add(
        SCENARIO,
        &format!("tollgate, {streams} open streams"),
        "streams open",
        held.open as f64,
        "count",
    );
    row.target = Some(streams.to_string());
    row.met = Some(held.open as usize == streams);
    let row = report.add(
        SCENARIO,
        &format!("tollgate, {streams} open streams"),
        "RSS",
        mib(rss),
        "MiB",
    );
    row.target = Some(if s.quick {
        "—".to_owned()
    } else {
        "≤ 300 MiB".to_owned()
    });
    row.met = (!s.quick).then_some(mib(rss) <= 300.0);
    report.add(
        SCENARIO,
        &format!("tollgate, {streams} open streams"),
        "RSS per stream",
        rss as f64 / streams as f64,
        "KiB",
    );
    if held.failed > 0 {
        report.notes.push(format!(
            "{SCENARIO}: {} streams failed to open",
            held.failed
        ));
    }
    held.release().await;
    Ok(())
}

/// One burst of the hostile scenario, measured.
#[derive(Debug)]
struct Measured {
    burst: crate::hostile::Burst,
    /// Normal requests sent one at a time during the burst.
    during: crate::hostile::Probed,
    seen: crate::hostile::Samples,
    /// Peak RSS in the burst, KiB.
    peak_kib: u64,
    /// Why the kernel's peak could not be reset (the peak is then VmRSS sampled).
    no_hwm: Option<String>,
}

/// Sends `n` copies of `target`'s request at once to `gw` while sampling its in-flight
/// bytes and RSS and sending `normal` requests one at a time.
async fn measure_burst(
    gw: &mut Gateway,
    target: &Target,
    n: usize,
    normal: &Target,
) -> anyhow::Result<Measured> {
    let pid = gw.proc.pid();
    let no_hwm = procs::reset_peak_rss(pid).err().map(|e| format!("{e:#}"));
    let sampler = crate::hostile::Sampler::start(gw.admin, pid, Duration::from_millis(2));
    let prober = crate::hostile::Prober::start(normal.clone());
    let burst = crate::hostile::burst(target, n).await;
    let during = prober.finish().await?;
    let seen = sampler.finish().await;
    gw.proc
        .check_alive()
        .context("the gateway died during the hostile burst")?;
    let peak_kib = match no_hwm {
        None => procs::peak_rss_kib(pid)?.max(seen.max_rss_kib),
        Some(_) => seen.max_rss_kib,
    };
    Ok(Measured {
        burst,
        during,
        seen,
        peak_kib,
        no_hwm,
    })
}

/// The figures every burst of large requests reports: the request memory admitted
/// against the budget, the RSS growth over `idle` against it (at most 4×), the answers
/// (`single`: the one request must be answered), the refusals and anything else, and
/// how long the burst took.
fn report_burst(
    report: &mut Report,
    scenario: &str,
    who: &str,
    m: &Measured,
    idle: u64,
    single: bool,
) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let bytes_mib = |b: f64| b / (1024.0 * 1024.0);
    let admitted = bytes_mib(m.seen.max_inflight_bytes);
    let growth = mib(m.peak_kib.saturating_sub(idle));
    let row = report.add(
        scenario,
        who,
        "in-flight bytes admitted, max",
        admitted,
        "MiB",
    );
    row.baseline = Some(("budget".to_owned(), bytes_mib(m.seen.limit_bytes)));
    row.ratio = Some(m.seen.max_inflight_bytes / m.seen.limit_bytes.max(1.0));
    let row = report.add(scenario, who, "RSS growth over idle", growth, "MiB");
    row.baseline = Some(("admitted".to_owned(), admitted));
    row.ratio = (admitted > 0.0).then(|| growth / admitted);
    row.target = Some("≤ 4× admitted".to_owned());
    row.met = Some(admitted > 0.0 && growth <= 4.0 * admitted);
    let answered = m.burst.count("200");
    let row = report.add(scenario, who, "answered 200", answered as f64, "count");
    if single {
        // One request fits the budget whole: refusing it would be a regression.
        row.target = Some("1".to_owned());
        row.met = Some(answered == 1);
    }
    report.add(
        scenario,
        who,
        "refused, 503 overloaded",
        m.burst.count("503 overloaded") as f64,
        "count",
    );
    let others = m.burst.others(&["200", "503 overloaded"]);
    report.add(
        scenario,
        who,
        "other outcomes",
        others.values().sum::<u64>() as f64,
        "count",
    );
    if !others.is_empty() {
        report
            .notes
            .push(format!("{scenario}, {who}: other outcomes {others:?}"));
    }
    report.add(
        scenario,
        who,
        "burst duration",
        m.burst.seconds * 1000.0,
        "ms",
    );
}

/// Hostile input: streamed chat bodies just under `--max-body-bytes` holding 16 million
/// JSON values, one, 8 and 64 at once (16 in quick mode), against the default 256 MiB
/// in-flight budget: the gateway's peak RSS against the bytes it admitted, the requests
/// it refused, a normal request's latency meanwhile, and the memory given back after.
async fn hostile(s: &Settings, report: &mut Report) -> anyhow::Result<()> {
    // The chart's memory limit for the gateway container.
    const POD_LIMIT_MIB: f64 = 1024.0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let bytes_mib = |b: f64| b / (1024.0 * 1024.0);
    let body = crate::hostile::body("bench-stream", crate::hostile::PAD_ELEMENTS);
    let scenario = format!(
        "Hostile input ({} B = {:.1} MiB streamed chat bodies, {} array elements; 256 MiB in-flight budget)",
        body.len(),
        bytes_mib(body.len() as f64),
        crate::hostile::PAD_ELEMENTS
    );
    // The defaults, spelled out: the figures are only meaningful against them.
    let budget = [
        "--max-body-bytes",
        "33554432",
        "--max-inflight-bytes",
        "268435456",
    ];
    let resources = s.work.join("resources");
    let mut gw = Gateway::start_from(
        s,
        "tollgate (hostile)",
        "--resources",
        &resources,
        None,
        &budget,
    )?;
    let pid = gw.proc.pid();
    let normal = gw.target("bench-small", false);
    // Baseline latency with nothing else in flight; it also warms the pools, so the idle
    // figure after it is the gateway at work, not just started.
    let count = s.scale(2_000, 500) as usize;
    let quiet = crate::hostile::probe(&normal, count / 10, count).await;
    note_errors(report, &scenario, "normal requests, no burst", &quiet.stats);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = gw.proc.rss_kib()?;
    report.add(
        &scenario,
        "idle, after the baseline",
        "RSS",
        mib(idle),
        "MiB",
    );
    for (metric, value) in [
        ("p50 latency", quiet.stats.p50_us),
        ("p99 latency", quiet.stats.p99_us),
        ("gateway overhead p50", quiet.overhead_p50_us),
        ("gateway overhead p99", quiet.overhead_p99_us),
    ] {
        report.add(
            &scenario,
            "normal requests, no burst",
            metric,
            us(value),
            "µs",
        );
    }
    let hostile = Target {
        body,
        ..gw.target("bench-stream", true)
    };
    let sizes: &[usize] = if s.quick { &[1, 8, 16] } else { &[1, 8, 64] };
    let mut hwm_noted = false;
    for &n in sizes {
        let who = if n == 1 {
            "1 body".to_owned()
        } else {
            format!("{n} bodies at once")
        };
        let m = measure_burst(&mut gw, &hostile, n, &normal).await?;
        if let Some(why) = m.no_hwm.as_ref().filter(|_| !hwm_noted) {
            hwm_noted = true;
            report.notes.push(format!(
                "{scenario}: the kernel's peak RSS could not be reset ({why}); peaks are VmRSS sampled every 2 ms"
            ));
        }
        let peak = mib(m.peak_kib);
        let row = report.add(&scenario, &who, "peak RSS", peak, "MiB");
        row.baseline = Some(("idle".to_owned(), mib(idle)));
        row.target = Some(format!("< {POD_LIMIT_MIB:.0} MiB (chart limit)"));
        row.met = Some(peak < POD_LIMIT_MIB);
        report_burst(report, &scenario, &who, &m, idle, n == 1);
        let normal_who = format!("normal requests during {who}");
        let during = &m.during.stats;
        let row = report.add(
            &scenario,
            &normal_who,
            "answered",
            during.ok as f64,
            "count",
        );
        row.target = Some("all".to_owned());
        row.met = Some(during.ok > 0 && during.failed() == 0);
        note_errors(report, &scenario, &normal_who, during);
        for (metric, value, base) in [
            ("p50 latency", during.p50_us, quiet.stats.p50_us),
            ("p99 latency", during.p99_us, quiet.stats.p99_us),
            (
                "gateway overhead p50",
                m.during.overhead_p50_us,
                quiet.overhead_p50_us,
            ),
            (
                "gateway overhead p99",
                m.during.overhead_p99_us,
                quiet.overhead_p99_us,
            ),
        ] {
            let row = report.add(&scenario, &normal_who, metric, us(value), "µs");
            row.baseline = Some(("no burst".to_owned(), us(base)));
            row.ratio = Some(value as f64 / base.max(1) as f64);
        }
        // Memory given back: wait (bounded) for RSS to come down to idle or stop falling.
        let (after, waited) =
            crate::hostile::rss_given_back(pid, idle, 4 * 1024, Duration::from_secs(30)).await?;
        let row = report.add(
            &scenario,
            &who,
            "RSS after the burst, lowest",
            mib(after),
            "MiB",
        );
        row.baseline = Some(("idle".to_owned(), mib(idle)));
        row.ratio = Some(after as f64 / idle.max(1) as f64);
        // 0 when it was already at its lowest as the last answer ended.
        report.add(
            &scenario,
            &who,
            "time until RSS was lowest",
            waited.as_secs_f64() * 1000.0,
            "ms",
        );
    }
    // The same body on a route with guardrails: its parsed tree (16 million values) could
    // never fit the budget, so it is refused before anything parses it.
    let who = "1 body, route with guardrails";
    drop(hostile);
    let guarded = Target {
        body: crate::hostile::body("bench-guarded", crate::hostile::PAD_ELEMENTS),
        ..gw.target("bench-guarded", true)
    };
    let m = measure_burst(&mut gw, &guarded, 1, &normal).await?;
    let row = report.add(
        &scenario,
        who,
        "answered 413",
        m.burst.count("413") as f64,
        "count",
    );
    row.target = Some("1".to_owned());
    row.met = Some(m.burst.count("413") == 1);
    let others = m.burst.others(&["413"]);
    if !others.is_empty() {
        report
            .notes
            .push(format!("{scenario}, {who}: other outcomes {others:?}"));
    }
    let row = report.add(
        &scenario,
        who,
        "RSS growth over idle",
        mib(m.peak_kib.saturating_sub(idle)),
        "MiB",
    );
    row.baseline = Some(("admitted".to_owned(), bytes_mib(m.seen.max_inflight_bytes)));
    Ok(())
}

/// What guardrails add: the in-process CPU time of checking typical prompts against every
/// detector (vs parsing them alone), and the end-to-end latency of a route with every
/// detector vs the same upstream without guardrails, one request at a time.
async fn guardrails(s: &Settings, report: &mut Report, bed: &Bed) -> anyhow::Result<()> {
    const SCENARIO: &str = "Guardrails (every detector, typical prompts)";
    let iterations = s.scale(20_000, 2_000) as u32;
    for (label, parse, checked) in crate::guardrails::measure(iterations)? {
        report.add(SCENARIO, label, "parse only", parse * 1000.0, "ns");
        let row = report.add(
            SCENARIO,
            label,
            "added CPU per request",
            (checked - parse) * 1000.0,
            "ns",
        );
        row.baseline = Some(("parse only, ns".to_owned(), parse * 1000.0));
        row.ratio = Some((checked - parse) / parse.max(0.001));
    }
    let count = s.scale(20_000, 2_000) as usize;
    let subjects = [
        (
            "tollgate, no guardrails",
            bed.plain.target("bench-small", false),
        ),
        (
            "tollgate, guardrails",
            bed.plain.target("bench-guarded", false),
        ),
    ];
    let medians = sequential_medians(report, SCENARIO, &subjects, count).await;
    added_latency(report, SCENARIO, &subjects, "no guardrails p50", medians);
    Ok(())
}

/// What the canonical model costs and what the passthrough saves: the in-process CPU time
/// of preparing an upstream body on each path (vs `parse_head` alone on the same body),
/// and one request at a time through the gateway to the same OpenAI-style upstream from an
/// OpenAI client (passthrough) and from an Anthropic client (translated both ways).
async fn dialects(s: &Settings, report: &mut Report, bed: &Bed) -> anyhow::Result<()> {
    const SCENARIO: &str = "Dialects (body preparation, 1 KB chat)";
    let iterations = s.scale(200_000, 20_000) as u32;
    for m in crate::dialects::measure(iterations)? {
        report.add(SCENARIO, m.label, "parse only", m.baseline_ns, "ns");
        let row = report.add(
            SCENARIO,
            m.label,
            "added CPU per request",
            m.ns - m.baseline_ns,
            "ns",
        );
        row.baseline = Some(("parse only, ns".to_owned(), m.baseline_ns));
        row.ratio = Some(m.ns / m.baseline_ns.max(0.001));
        report.add(
            SCENARIO,
            m.label,
            "sends the client's own buffer",
            if m.same_buffer { 1.0 } else { 0.0 },
            "count",
        );
    }
    let count = s.scale(20_000, 2_000) as usize;
    let mut anthropic = bed.plain.target("bench-small", false);
    anthropic.path = "/v1/messages".to_owned();
    anthropic.body = crate::dialects::messages_body("bench-small", false);
    let subjects = [
        (
            "OpenAI client (passthrough)",
            bed.plain.target("bench-small", false),
        ),
        ("Anthropic client (translated)", anthropic),
    ];
    let medians = sequential_medians(report, SCENARIO, &subjects, count).await;
    added_latency(report, SCENARIO, &subjects, "passthrough p50", medians);
    Ok(())
}

/// What the routing strategies cost: the same two-target route under `weighted`,
/// `leastLatency` and `adaptive` (price weighed in), saturated with 16 connections;
/// proxy CPU per request and throughput against `weighted`'s, in this run.
async fn routing(s: &Settings, report: &mut Report, bed: &Bed) -> anyhow::Result<()> {
    const SCENARIO: &str = "Routing strategies (two targets, 16 connections, 1 KB answer)";
    let secs = Duration::from_secs(s.scale(10, 3));
    let warmup = Duration::from_secs(1);
    let pid = bed.plain.proc.pid();
    let mut baseline: Option<(f64, f64)> = None;
    for (model, strategy) in crate::config::ROUTING_STRATEGIES {
        let target = bed.plain.target(model, false);
        let cpu_before = procs::cpu_seconds(pid);
        let stats = load::closed(&target, 16, warmup, secs).await;
        let cpu = procs::cpu_seconds(pid) - cpu_before;
        note_errors(report, SCENARIO, strategy, &stats);
        let per = cpu * 1e6 / stats.answered_total.max(1) as f64;
        let rps = report.add(SCENARIO, strategy, "throughput", stats.rps, "req/s");
        if let Some((base_rps, _)) = baseline {
            rps.baseline = Some(("weighted".to_owned(), base_rps));
            rps.ratio = Some(stats.rps / base_rps);
        }
        report.add(SCENARIO, strategy, "p99 latency", us(stats.p99_us), "µs");
        let row = report.add(SCENARIO, strategy, "proxy CPU per request", per, "µs");
        match baseline {
            Some((_, base_cpu)) => {
                row.baseline = Some(("weighted".to_owned(), base_cpu));
                row.ratio = Some(per / base_cpu);
            }
            None => baseline = Some((stats.rps, per)),
        }
    }
    Ok(())
}
