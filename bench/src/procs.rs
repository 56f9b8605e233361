//! The processes a benchmark runs: the mock upstream, nginx and gateways, each on a free
//! loopback port, killed when dropped; redis-server comes from `tollgate-testkit`, as in
//! the tests.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tollgate_testkit::redis::Redis;

/// A loopback address on a free port (a tiny race with other programs is accepted).
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(tollgate_testkit::ports::free_addr())
}

/// A child process, killed and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// Asked to stop with SIGTERM before it is killed: a killed nginx master leaves its
    /// workers running.
    term_first: bool,
}

impl Proc {
    /// Starts `cmd` with its output in `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            term_first: false,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from `/proc`.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its output:\n{}",
                self.name,
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Waits until something accepts connections on `addr`.
    pub fn wait_listening(&mut self, addr: SocketAddr, patience: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience;
        loop {
            self.check_alive()?;
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {addr} in {patience:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.term_first
            && Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status()
                .is_ok_and(|s| s.success())
        {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) used so far by `pid` and its child processes that are still
/// running (nginx's workers), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let fields = |p: &str| -> Option<(u32, f64)> {
        let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        // Fields after the command name, which is parenthesised and may hold spaces.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        Some((ppid, (utime + stime) / ticks_per_second))
    };
    let mut total = fields(&pid.to_string()).map_or(0.0, |(_, t)| t);
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.bytes().all(|b| b.is_ascii_digit())
                && let Some((ppid, t)) = fields(&name)
                && ppid == pid
            {
                total += t;
            }
        }
    }
    total
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Peak resident set size of `pid` in KiB (since it started, or since
/// [`reset_peak_rss`]).
pub fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM")
}

/// Resets `pid`'s peak resident set size to its current one (Linux 4.0 and later).
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("writing 5 to /proc/{pid}/clear_refs"))
}

/// A `kB` field of `/proc/PID/status`.
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Finds a program on `PATH` (or in the usual sbin directories, for nginx).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Starts redis-server on a free port, without persistence (the tests' harness).
pub fn redis() -> anyhow::Result<(Redis, SocketAddr)> {
    let redis = Redis::try_start_with(&[])
        .context("starting redis-server (apt-get install redis-server)")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], redis.port));
    Ok((redis, addr))
}

/// Starts Debian's nginx as a plain keep-alive reverse proxy to `upstream`.
pub fn nginx(dir: &Path, upstream: SocketAddr) -> anyhow::Result<(Proc, SocketAddr)> {
    let bin = which("nginx").context("nginx not found (apt-get install nginx)")?;
    let addr = free_addr()?;
    let prefix = dir.join("nginx");
    fs::create_dir_all(&prefix)?;
    let p = prefix.display();
    let conf = format!(
        r#"# A plain reverse proxy, as a platform team would put in front of an LLM API.
worker_processes auto;
worker_rlimit_nofile 20000;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log {p}/access.log combined buffer=64k flush=1s;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    keepalive_requests 1000000;
    upstream mock {{
        server {upstream};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen {addr} backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"#
    );
    let conf_path = prefix.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p").arg(&prefix).arg("-c").arg(&conf_path);
    let mut proc = Proc::spawn("nginx", cmd, prefix.join("stdout.log"))?;
    proc.term_first = true;
    proc.wait_listening(addr, Duration::from_secs(10))?;
    Ok((proc, addr))
}

/// Starts the mock upstream (this same binary) with `threads` worker threads.
pub fn upstream(dir: &Path, threads: usize) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_addr()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["upstream", "--listen", &addr.to_string()])
        .args(["--threads", &threads.to_string()]);
    let mut p = Proc::spawn("mock upstream", cmd, dir.join("upstream.log"))?;
    p.wait_listening(addr, Duration::from_secs(10))?;
    Ok((p, addr))
}
