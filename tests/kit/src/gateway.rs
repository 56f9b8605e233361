//! The real `tollgate-gateway` binary on free loopback ports, talked to over HTTP.

use std::{path::Path, process::ExitStatus, time::Duration};

use crate::{client, process::Proc};

/// A running gateway; killed on drop.
#[derive(Debug)]
pub struct Gateway {
    proc: Proc,
    /// `http://<api listener>`.
    pub base: String,
    /// `http://<admin listener>` (`/metrics`).
    pub admin: String,
}

impl Gateway {
    /// Starts the gateway with `args` (plus loopback listeners on port 0 and JSON logs)
    /// and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// Like [`Gateway::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let binary = crate::process::binary("tollgate-gateway", "tollgate-gateway");
        let mut all = args.to_vec();
        all.extend([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ]);
        let proc = Proc::spawn(binary, &all, env);
        let patience = Duration::from_secs(20);
        let (Some(api), Some(admin)) = (
            proc.try_addr("listening", patience),
            proc.try_addr("admin listening", patience),
        ) else {
            panic!("the gateway did not start listening:\n{}", proc.logs());
        };
        Self {
            proc,
            base: format!("http://{api}"),
            admin: format!("http://{admin}"),
        }
    }

    /// A standalone gateway on `resources` sharing its limits through `redis_url`, with
    /// this Redis timeout and failure mode.
    pub fn with_redis(resources: &Path, redis_url: &str, timeout: &str, mode: &str) -> Self {
        Self::start(&[
            "--resources",
            resources.to_str().expect("a UTF-8 path"),
            "--redis-url",
            redis_url,
            "--redis-timeout",
            timeout,
            "--redis-failure-mode",
            mode,
        ])
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The Prometheus text from the admin listener.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics is text")
    }

    /// Status of a one-message chat completion for `model` with `key`.
    pub async fn chat_status(&self, key: &str, model: &str) -> u16 {
        client()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("the gateway answers")
            .status()
            .as_u16()
    }

    /// `/readyz`: its status and JSON body.
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let resp = client()
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("/readyz answers");
        (
            resp.status().as_u16(),
            resp.json().await.expect("/readyz is JSON"),
        )
    }

    /// Everything the gateway has logged so far.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout)
    }
}
