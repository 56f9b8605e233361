//! `tollgate-bench`: Tollgate's benchmark harness (see bench/README.md).

mod config;
mod dialects;
mod guardrails;
mod hostile;
mod load;
mod procs;
mod report;
mod scenarios;
mod soak;
mod upstream;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Tollgate's benchmark harness: measures the gateway against direct calls to a mock
/// upstream and against an nginx reverse proxy, in one run on one machine, and writes
/// the figures with their ratios as Markdown and JSON.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the scenarios and writes results.md and results.json.
    Run {
        /// Short runs: checks that the harness works (figures are noisier).
        #[arg(long)]
        quick: bool,
        /// The gateway binary (a release build).
        #[arg(long, default_value = "target/release/tollgate-gateway")]
        gateway: PathBuf,
        /// Where the results go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Scratch directory for configuration and logs (a new temporary one by default).
        #[arg(long)]
        work: Option<PathBuf>,
        /// The manifests whose idle memory is measured.
        #[arg(long, default_value = "examples")]
        examples: PathBuf,
        /// Only these scenarios (comma-separated): single, saturation, streaming,
        /// slow-upstream, reload, memory, guardrails, dialects, routing, hostile, media.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Closed-loop load against a running gateway (for profiling by hand).
    Load {
        /// The gateway's address.
        #[arg(long)]
        addr: SocketAddr,
        /// Client key (default: the harness's own).
        #[arg(long)]
        key: Option<String>,
        /// Model to ask for.
        #[arg(long, default_value = "bench-small")]
        model: String,
        /// Ask for a stream.
        #[arg(long)]
        stream: bool,
        /// Connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Open loop at this many requests per second (over up to `connections`
        /// connections) instead of closed loop.
        #[arg(long)]
        rate: Option<f64>,
        /// Instead: open this many streams, keep them open for `seconds`, then close them.
        #[arg(long)]
        hold: Option<usize>,
    },
    /// Soak: one gateway with Redis under steady mixed traffic for a long time, sampling
    /// RSS, open file descriptors, threads and Redis keys; fails on a growth trend or an
    /// unexpected answer. Writes soak.md and soak.csv.
    Soak {
        /// Minutes to run.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Seconds instead of minutes (for a quick check of the harness).
        #[arg(long)]
        seconds: Option<u64>,
        /// Requests per second, in all.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Client connections.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Seconds between samples.
        #[arg(long, default_value_t = 10)]
        sample_seconds: u64,
        /// The gateway binary (a release build).
        #[arg(long, default_value = "target/release/tollgate-gateway")]
        gateway: PathBuf,
        /// Where soak.md and soak.csv go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Serves the mock upstream (the harness starts it itself; this is for manual runs).
    Upstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Upstream { listen, threads } => upstream::run(listen, threads),
        Cmd::Soak {
            minutes,
            seconds,
            rate,
            connections,
            sample_seconds,
            gateway,
            out,
        } => {
            anyhow::ensure!(
                gateway.is_file(),
                "{} not found: build it with `cargo build --release -p tollgate-gateway` (bench/soak.sh does)",
                gateway.display()
            );
            anyhow::ensure!(
                rate > 0.0 && connections > 0,
                "--rate and --connections must be positive"
            );
            let work = std::env::temp_dir().join(format!("tollgate-soak-{}", std::process::id()));
            let settings = soak::Settings {
                gateway: gateway.canonicalize()?,
                duration: std::time::Duration::from_secs(seconds.unwrap_or(minutes * 60)),
                rate,
                connections,
                sample_every: std::time::Duration::from_secs(sample_seconds.max(1)),
                out,
                work: work.clone(),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let outcome = runtime.block_on(soak::run(&settings));
            match &outcome {
                Ok(()) => {
                    let _ = std::fs::remove_dir_all(&work);
                }
                Err(_) => eprintln!("logs kept in {}", work.display()),
            }
            outcome
        }
        Cmd::Load {
            addr,
            key,
            model,
            stream,
            connections,
            seconds,
            rate,
            hold,
        } => {
            let key = key.unwrap_or_else(config::bench_key);
            let target = load::Target {
                addr,
                path: "/v1/chat/completions".to_owned(),
                auth: Some(format!("Bearer {key}").parse()?),
                body: load::chat_body(&model, stream),
                content_type: None,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let duration = std::time::Duration::from_secs(seconds);
            if let Some(n) = hold {
                return runtime.block_on(async {
                    let held = load::hold_streams(&target, n, duration).await;
                    println!("{} streams open, {} failed", held.open, held.failed);
                    tokio::time::sleep(duration).await;
                    held.release().await;
                    Ok(())
                });
            }
            let stats = runtime.block_on(async {
                match rate {
                    Some(rate) => load::open(&target, rate, duration, connections).await,
                    None => {
                        load::closed(
                            &target,
                            connections,
                            std::time::Duration::from_secs(1),
                            duration,
                        )
                        .await
                    }
                }
            });
            println!("{}", serde_json::to_string_pretty(&stats)?);
            Ok(())
        }
        Cmd::Run {
            quick,
            gateway,
            out,
            work,
            examples,
            only,
        } => {
            for name in &only {
                anyhow::ensure!(
                    scenarios::SCENARIOS.contains(&name.as_str()),
                    "unknown scenario {name:?}; known: {}",
                    scenarios::SCENARIOS.join(", ")
                );
            }
            anyhow::ensure!(
                gateway.is_file(),
                "{} not found: build it with `cargo build --release -p tollgate-gateway` (bench/run.sh does)",
                gateway.display()
            );
            let keep = work.is_some();
            let scratch = match work {
                Some(dir) => dir,
                None => std::env::temp_dir().join(format!("tollgate-bench-{}", std::process::id())),
            };
            let settings = scenarios::Settings {
                quick,
                gateway: gateway.canonicalize()?,
                work: scratch.clone(),
                examples: examples.canonicalize().context("--examples")?,
                only,
            };
            let mut report = report::Report {
                machine: report::Machine::probe(),
                mode: if quick { "quick" } else { "full" }.to_owned(),
                ..Default::default()
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let outcome = runtime.block_on(scenarios::run(&settings, &mut report));
            if let Err(e) = &outcome {
                report.notes.push(format!("the run stopped early: {e:#}"));
            }
            report.write(&out)?;
            println!("{}", report.markdown());
            eprintln!("results written to {}/results.{{md,json}}", out.display());
            if outcome.is_ok() && !keep {
                let _ = std::fs::remove_dir_all(&scratch);
            } else {
                eprintln!("logs kept in {}", scratch.display());
            }
            outcome
        }
    }
}
