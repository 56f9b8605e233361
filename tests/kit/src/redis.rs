//! A real `redis-server` on a free loopback port, stopped on drop. Never a mock.

use std::{
    io,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::ports::free_port;

/// A running Redis.
#[derive(Debug)]
pub struct Redis {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    extra: Vec<String>,
}

fn spawn(port: u16, extra: &[String]) -> io::Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

fn wait_listening(port: u16) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("redis-server did not listen on port {port} within 10 s"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Redis {
    /// Starts a server without persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (kept for [`Redis::restart`]); `{port}`
    /// in an argument stands for the chosen port (e.g. `--tls-port {port}`).
    pub fn start_with(extra: &[&str]) -> Self {
        Self::try_start_with(extra).unwrap_or_else(|e| {
            panic!("redis-server runs (bash tests/run.sh installs it; CI too): {e}")
        })
    }

    /// [`Redis::start_with`], failing with an error instead of a panic.
    pub fn try_start_with(extra: &[&str]) -> io::Result<Self> {
        let port = free_port();
        let extra: Vec<String> = extra
            .iter()
            .map(|s| s.replace("{port}", &port.to_string()))
            .collect();
        let mut child = spawn(port, &extra)?;
        if let Err(e) = wait_listening(port) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Self { child, port, extra })
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`STOP`, `CONT`) to the server.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} redis-server");
    }

    /// Stops (`true`) or resumes (`false`) the server process: a blip in which every
    /// connection stays open and nothing answers, with every key intact afterwards.
    pub fn freeze(&self, frozen: bool) {
        self.signal(if frozen { "STOP" } else { "CONT" });
    }

    /// Kills the server (SIGKILL): connections drop, state is lost.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a fresh server on the same port with the same arguments (empty: no
    /// persistence), after [`Redis::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.port, &self.extra).expect("redis-server restarts");
        wait_listening(self.port).expect("redis-server listens again");
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // Resumed first, in case a test left it stopped.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one command on a fresh connection (so it works across restarts), giving up after
/// 500 ms: `None` when Redis does not answer in time or fails.
pub async fn query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(url).ok()?;
    tokio::time::timeout(Duration::from_millis(500), async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        cmd.query_async(&mut conn).await.ok()
    })
    .await
    .ok()
    .flatten()
}
