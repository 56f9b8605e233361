//! Starts the real `tollgate-gateway` binary on a free port and talks to it over HTTP.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

/// The example local-development key (allowed `demo-*`).
pub const DEV_KEY: &str = "tg_localDevKeyForTheMockProviderOnly00000003";
/// The example search-team key (allowed `chat-default`, `text-embedding-3-small`).
pub const SEARCH_KEY: &str = "tg_exampleSearchTeamKeyDoNotUseInProduction01";

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A running gateway; killed on drop.
pub struct Gateway {
    child: Child,
    pub base: String,
    /// The admin listener (`/metrics`).
    pub admin: String,
    logs: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts the gateway with `args` (plus a loopback listener on port 0 and JSON logs)
    /// and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Like [`Gateway::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-gateway"))
            .args(args)
            // `env` may set its own level.
            .env("RUST_LOG", "info")
            // Tests poll with keys that are not (yet) valid; the throttle has its own test.
            .env("TOLLGATE_AUTH_FAILURES_PER_MINUTE", "0")
            .envs(env.iter().copied())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gateway binary starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "admin listening" {
                        let _ = tx.send((
                            "admin",
                            v["admin_addr"].as_str().unwrap_or_default().to_owned(),
                        ));
                    } else if v["message"] == "listening" {
                        let _ = tx.send(("api", v["addr"].as_str().unwrap_or_default().to_owned()));
                    }
                }
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let (mut api, mut admin) = (None, None);
        while api.is_none() || admin.is_none() {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(("admin", addr)) => admin = Some(addr),
                Ok((_, addr)) => api = Some(addr),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "the gateway did not start listening:\n{}",
                        logs.lock().unwrap()
                    );
                }
            }
        }
        Self {
            child,
            base: format!("http://{}", api.unwrap()),
            admin: format!("http://{}", admin.unwrap()),
            logs,
        }
    }

    /// A standalone gateway on `resources` sharing its limits through `redis_url`, with
    /// this Redis timeout and failure mode.
    pub fn with_redis(resources: &Path, redis_url: &str, timeout: &str, mode: &str) -> Self {
        Self::start(&[
            "--resources",
            resources.to_str().unwrap(),
            "--redis-url",
            redis_url,
            "--redis-timeout",
            timeout,
            "--redis-failure-mode",
            mode,
        ])
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The Prometheus text from the admin listener.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Status of a one-message chat completion for `model` with `key`.
    pub async fn chat_status(&self, key: &str, model: &str) -> u16 {
        client()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// `/readyz`: its status and JSON body.
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let resp = client().get(self.url("/readyz")).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
pub mod otlp;
pub mod redis;
pub mod upstream;

/// Calls `make` every 50 ms (for at most 5 s) until `done` accepts its value; returns the
/// last value.
pub async fn eventually_value<F, Fut, T>(mut make: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let value = make().await;
        if done(&value) || tokio::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sum of every Prometheus sample in `text` whose line starts with `prefix` (a metric
/// name and, optionally, the start of its labels).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A response's `content-type`, or empty.
pub fn content_type(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}
