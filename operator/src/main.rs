//! `tollgate-operator`: the control plane. The in-cluster controller arrives with issue #5;
//! today it offers the offline commands.
#![forbid(unsafe_code)]

use tollgate_operator::render;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Tollgate operator: compiles Provider, RoutePolicy and ApiKey resources into the
/// configuration gateways serve.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compile manifests offline (no cluster) and print diagnostics and the resulting
    /// configuration parts. Exits 1 when any object has an error.
    Render {
        /// A YAML file or a directory of them (Tollgate objects and the Secrets they use).
        #[arg(short = 'f', long = "filename", value_name = "PATH")]
        path: PathBuf,
        /// Write the configuration files (manifest.json, routing.json, …) into this
        /// directory instead of printing a summary. Credentials are written too: keep the
        /// directory private.
        #[arg(short, long, value_name = "DIR")]
        output: Option<PathBuf>,
        /// Print diagnostics as JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the CustomResourceDefinitions (YAML) for `kubectl apply -f -`.
    Crds,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Render { path, output, json } => render::run(&path, output.as_deref(), json),
        Command::Crds => {
            for (_, crd) in tollgate_api::crd::all() {
                print!("---\n{}", tollgate_api::crd::to_yaml(&crd));
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate-operator: {e:#}");
            ExitCode::from(2)
        }
    }
}
