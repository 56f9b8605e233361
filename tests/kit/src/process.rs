//! Child processes whose stderr (JSON logs) is collected, killed on drop; and the
//! workspace's binaries, found next to the running test.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

/// What a process has logged, and the addresses its log lines announced.
#[derive(Debug, Default)]
struct Output {
    logs: String,
    /// `(message, address)` for each line with an `addr` or `admin_addr` field.
    announced: Vec<(String, String)>,
}

/// A child process whose stderr (JSON logs) is collected; killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// The process itself, for the tests that signal or wait for it.
    pub child: Child,
    output: Arc<Mutex<Output>>,
}

impl Proc {
    /// Starts `program` with `args` and `env`, stdout discarded. `RUST_LOG=info` and no
    /// authentication-failure throttling (tests poll with keys not yet, or no longer,
    /// valid) unless `env` says otherwise.
    pub fn spawn(program: impl AsRef<Path>, args: &[&str], env: &[(&str, &str)]) -> Self {
        let program = program.as_ref();
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("TOLLGATE_AUTH_FAILURES_PER_MINUTE", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", program.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let output = Arc::new(Mutex::new(Output::default()));
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut out = sink.lock().unwrap();
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    for field in ["addr", "admin_addr"] {
                        if let Some(addr) = v[field].as_str() {
                            let message = v["message"].as_str().unwrap_or_default();
                            out.announced.push((message.to_owned(), addr.to_owned()));
                        }
                    }
                }
                out.logs.push_str(&line);
                out.logs.push('\n');
            }
        });
        Self { child, output }
    }

    /// The address announced by the log line `message` (waiting up to 30 s for it).
    pub fn addr(&self, message: &str) -> String {
        self.try_addr(message, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("no {message:?} log line:\n{}", self.logs()))
    }

    /// The address announced by the log line `message`, if it comes within `patience`.
    pub fn try_addr(&self, message: &str, patience: Duration) -> Option<String> {
        let deadline = Instant::now() + patience;
        loop {
            let found = self
                .output
                .lock()
                .unwrap()
                .announced
                .iter()
                .find(|(m, _)| m == message)
                .map(|(_, a)| a.clone());
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the process has logged so far.
    pub fn logs(&self) -> String {
        self.output.lock().unwrap().logs.clone()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`…) to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends SIGTERM and waits (up to 10 s) for the process to exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            panic!("did not exit on SIGTERM:\n{}", self.logs());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace binary `name` (of package `package`), next to the running test or
/// benchmark in Cargo's target directory; built first if this run did not build it.
pub fn binary(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable's path");
    // target/<profile>/deps/<test>-<hash> for tests, target/<profile>/<bin> otherwise.
    let dir = exe.parent().expect("the executable's directory");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>")
    } else {
        dir
    };
    let path = dir.join(name);
    if !path.exists() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", package, "--bin", name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok && path.exists(),
            "build it first: cargo build -p {package} --bin {name}"
        );
    }
    path
}
