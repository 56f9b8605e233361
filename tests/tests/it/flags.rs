//! The settings tables in docs/ against the binaries' own `--help`: every flag a binary
//! accepts is documented, every documented flag and variable exists, and each default the
//! docs quote is the one the binary uses. The tables cannot drift from the code.

use std::{collections::BTreeMap, process::Command};

use tollgate_testkit::process::binary;
use tollgate_tests::repo_root;

/// One option as `--help` describes it.
#[derive(Debug, Default)]
struct Flag {
    env: Option<String>,
    default: Option<String>,
}

/// The long options of a `--help` text, with their variables and defaults.
fn help_flags(help: &str) -> BTreeMap<String, Flag> {
    let mut flags: BTreeMap<String, Flag> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        let option = trimmed.strip_prefix("--").or_else(|| {
            trimmed
                .get(4..)
                .filter(|_| trimmed.starts_with('-'))
                .and_then(|t| t.strip_prefix("--"))
        });
        if let Some(rest) = option {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if name == "help" || name == "version" {
                current = None;
                continue;
            }
            flags.insert(format!("--{name}"), Flag::default());
            current = Some(format!("--{name}"));
        } else if let Some(flag) = current.as_ref().and_then(|c| flags.get_mut(c)) {
            if let Some(env) = trimmed.strip_prefix("[env: ") {
                // `NAME=` or, for secrets whose values are hidden, `NAME]`.
                flag.env = env.split(['=', ']']).next().map(str::to_owned);
            } else if let Some(default) = trimmed.strip_prefix("[default: ") {
                flag.default = default.strip_suffix(']').map(str::to_owned);
            } else if let Some((_, rest)) = trimmed.split_once("(default `")
                && flag.default.is_none()
            {
                // A default the description states, for options whose absence means
                // something else to the code.
                flag.default = rest.split('`').next().map(str::to_owned);
            }
        }
    }
    flags
}

/// One row of a settings table: the flags and variables its first cell names and its
/// default cell.
#[derive(Debug)]
struct Row {
    flags: Vec<String>,
    envs: Vec<String>,
    default: String,
}

/// The rows of the table under `## Settings` in `text`.
fn doc_rows(text: &str) -> Vec<Row> {
    let Some(section) = text.split("\n## ").find(|s| s.starts_with("Settings")) else {
        return Vec::new();
    };
    let words = |cell: &str, prefix: &str| -> Vec<String> {
        cell.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .filter(|w| w.starts_with(prefix) && w.len() > prefix.len())
            .map(str::to_owned)
            .collect()
    };
    section
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            Row {
                flags: words(cells[0], "--"),
                envs: words(cells[0], "TOLLGATE_"),
                default: cells.get(1).map_or("", |c| c.trim()).to_owned(),
            }
        })
        .collect()
}

fn help_of(package: &str, args: &[&str]) -> String {
    let out = Command::new(binary(package, package))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{package} {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Everything that differs between the settings table of `doc` (its `text`) and `help`.
fn drift(doc: &str, text: &str, help: &str) -> Vec<String> {
    let flags = help_flags(help);
    let rows = doc_rows(text);
    assert!(!flags.is_empty(), "no options in the help text");
    assert!(!rows.is_empty(), "{doc} has no `## Settings` table");
    let mut problems = Vec::new();
    for name in flags.keys() {
        if !rows.iter().any(|r| r.flags.contains(name)) {
            problems.push(format!("{name} is accepted but not in {doc}"));
        }
    }
    for row in &rows {
        for name in &row.flags {
            if !flags.contains_key(name) {
                problems.push(format!("{doc} documents {name}, which is not accepted"));
            }
        }
        for env in &row.envs {
            if !row
                .flags
                .iter()
                .any(|f| flags.get(f).and_then(|f| f.env.as_ref()) == Some(env))
            {
                problems.push(format!(
                    "{doc} names {env} for {:?}, which read another variable or none",
                    row.flags
                ));
            }
        }
        // A default the docs quote literally (`2s`) must be the binary's; prose defaults
        // ("32 MiB", "none", "its own namespace") are left to the reader.
        if let [name] = row.flags.as_slice()
            && let Some(quoted) = row
                .default
                .strip_prefix('`')
                .and_then(|d| d.strip_suffix('`'))
            && !quoted.contains('`')
            && let Some(flag) = flags.get(name)
            && flag.default.as_deref() != Some(quoted)
        {
            problems.push(format!(
                "{doc} says {name} defaults to {quoted}; --help says {:?}",
                flag.default
            ));
        }
    }
    problems
}

#[test]
fn the_gateway_settings_table_matches_its_help() {
    let problems = drift(
        "docs/gateway.md",
        &read("docs/gateway.md"),
        &help_of("tollgate-gateway", &["--help"]),
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_operator_settings_table_matches_its_help() {
    let problems = drift(
        "docs/operator.md",
        &read("docs/operator.md"),
        &help_of("tollgate-operator", &["run", "--help"]),
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn drift_is_reported() {
    // The checker itself: a flag missing from the table, one the binary lacks, a wrong
    // variable and a wrong default are each found.
    let help = "Options:\n      --listen <L>\n          x\n          [env: TOLLGATE_LISTEN=]\n          [default: 0.0.0.0:8080]\n      --quiet\n          y\n      --password <P>\n          Its default is unset (default `none`)\n          [env: TOLLGATE_PASSWORD]\n  -h, --help\n          Print help\n";
    let flags = help_flags(help);
    assert_eq!(flags.len(), 3, "{flags:?}");
    assert_eq!(flags["--listen"].env.as_deref(), Some("TOLLGATE_LISTEN"));
    assert_eq!(flags["--listen"].default.as_deref(), Some("0.0.0.0:8080"));
    assert_eq!(
        flags["--password"].env.as_deref(),
        Some("TOLLGATE_PASSWORD")
    );
    assert_eq!(flags["--password"].default.as_deref(), Some("none"));
    let doc = "# X\n\n## Settings\n\n| Flag | Default | What |\n|---|---|---|\n| `--listen` / `TOLLGATE_LISTN` | `0.0.0.0:80` | x |\n| `--gone` | | y |\n| `--password` / `TOLLGATE_PASSWORD` | | z |\n\n## Next\n";
    let problems = drift("x.md", doc, help);
    let found = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert!(
        found("--quiet is accepted but not in x.md"),
        "{problems:#?}"
    );
    assert!(found("documents --gone"), "{problems:#?}");
    assert!(found("TOLLGATE_LISTN"), "{problems:#?}");
    assert!(found("defaults to 0.0.0.0:80;"), "{problems:#?}");
    assert_eq!(problems.len(), 4, "{problems:#?}");
}

fn read(doc: &str) -> String {
    std::fs::read_to_string(repo_root().join(doc)).unwrap()
}
