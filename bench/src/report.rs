//! Results: every figure with its baseline from the same run, the ratio between them,
//! and the target it is held to, written as Markdown and JSON.

use std::{fmt::Write as _, fs, path::Path, process::Command};

use serde::Serialize;

/// One figure.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario (section of the table).
    pub scenario: String,
    /// What was measured: `direct`, `nginx`, `tollgate`, `tollgate + redis`…
    pub subject: String,
    /// The quantity, e.g. `p50 latency`.
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// Unit of `value` (`µs`, `req/s`, `MiB`, `ms`, `count`).
    pub unit: String,
    /// The figure it is compared with, if any, and that figure's value.
    pub baseline: Option<(String, f64)>,
    /// `value / baseline` (or `value - baseline` for added latency, see `metric`).
    pub ratio: Option<f64>,
    /// The target, in words.
    pub target: Option<String>,
    /// Whether the target holds.
    pub met: Option<bool>,
}

/// A results table being built.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Where and when it ran.
    pub machine: Machine,
    /// Run settings (`quick` or `full`).
    pub mode: String,
    /// The figures.
    pub rows: Vec<Row>,
    /// Notes printed under the table (errors seen, skipped scenarios).
    pub notes: Vec<String>,
}

impl Report {
    /// Adds a figure with no baseline.
    pub fn add(
        &mut self,
        scenario: &str,
        subject: &str,
        metric: &str,
        value: f64,
        unit: &str,
    ) -> &mut Row {
        self.rows.push(Row {
            scenario: scenario.to_owned(),
            subject: subject.to_owned(),
            metric: metric.to_owned(),
            value,
            unit: unit.to_owned(),
            baseline: None,
            ratio: None,
            target: None,
            met: None,
        });
        self.rows.last_mut().expect("just pushed")
    }

    /// The Markdown table.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# Tollgate benchmark results\n");
        let _ = writeln!(
            md,
            "Run {} ({} mode) on {}: {} ({} cores), {} MiB RAM, Linux {}; {}; {}; {}; commit {}.\n",
            m.date,
            self.mode,
            m.hostname,
            m.cpu,
            m.cores,
            m.memory_mib,
            m.kernel,
            m.rustc,
            m.nginx,
            m.redis,
            m.commit
        );
        let _ = writeln!(
            md,
            "Load generator, mock upstream, nginx, Redis and the gateway share these cores. \
             Ratios compare figures taken in this same run; see bench/README.md.\n"
        );
        let mut scenario = "";
        for r in &self.rows {
            if r.scenario != scenario {
                scenario = &r.scenario;
                let _ = writeln!(md, "\n## {scenario}\n");
                let _ = writeln!(
                    md,
                    "| subject | figure | value | baseline | vs baseline | target | met |"
                );
                let _ = writeln!(md, "|---|---|---:|---|---:|---|:-:|");
            }
            let baseline = r
                .baseline
                .as_ref()
                .map(|(name, v)| format!("{name}: {}", fmt_value(*v, &r.unit)))
                .unwrap_or_default();
            let ratio = r.ratio.map(|x| format!("{x:.2}×")).unwrap_or_default();
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.subject,
                r.metric,
                fmt_value(r.value, &r.unit),
                baseline,
                ratio,
                r.target.as_deref().unwrap_or(""),
                met
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(md, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md
    }

    /// Writes `results.md` and `results.json` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join("results.md"), self.markdown())?;
        fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(self)? + "\n",
        )?;
        Ok(())
    }
}

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "req/s" => format!("{v:.0} {unit}"),
        "µs" | "count" => format!("{v:.0} {unit}"),
        _ => format!("{v:.1} {unit}"),
    }
}

/// The machine a run used.
#[derive(Debug, Default, Serialize)]
pub struct Machine {
    /// UTC time of the run.
    pub date: String,
    /// Host name.
    pub hostname: String,
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cores: usize,
    /// Total memory.
    pub memory_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// `rustc --version`.
    pub rustc: String,
    /// `nginx -v`.
    pub nginx: String,
    /// `redis-server --version`.
    pub redis: String,
    /// `git rev-parse --short HEAD` (with `-dirty` when the tree has changes).
    pub commit: String,
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if s.is_empty() {
                s = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            }
            s
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

impl Machine {
    /// Describes this machine.
    pub fn probe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_mib = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let nginx = crate::procs::which("nginx")
            .map(|p| output(&p.display().to_string(), &["-v"]))
            .unwrap_or_else(|| "nginx missing".to_owned());
        let dirty = !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Self {
            date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            hostname: output("hostname", &[]),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib,
            kernel: output("uname", &["-r"]),
            rustc: output("rustc", &["--version"]),
            nginx: nginx.replace("nginx version: ", ""),
            redis: output("redis-server", &["--version"])
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            commit: format!(
                "{}{}",
                output("git", &["rev-parse", "--short", "HEAD"]),
                if dirty { "-dirty" } else { "" }
            ),
        }
    }
}
