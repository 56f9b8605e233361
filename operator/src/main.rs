//! `tollgate-operator`: the control plane (`run`), and offline commands (`render`, `crds`).
#![forbid(unsafe_code)]

use tollgate_operator::{
    render,
    settings::{LogFormat, RunSettings},
};

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
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the controller: watch Providers, RoutePolicies and ApiKeys, write the gateway
    /// configuration (ConfigMap and Secrets), issue and rotate keys, report status.
    Run(Box<RunSettings>),
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
        /// Print the ConfigMap and Secrets the operator would apply, as YAML. Secret data
        /// is redacted unless --show-secrets is given.
        #[arg(long, conflicts_with = "output")]
        objects: bool,
        /// With --objects: print Secret data (upstream credentials) in full.
        #[arg(long, requires = "objects")]
        show_secrets: bool,
        /// With --objects: namespace of the generated objects.
        #[arg(long, default_value = "default", requires = "objects")]
        namespace: String,
        /// With --objects: name prefix of the generated objects.
        #[arg(long, default_value = "tollgate-gateway", requires = "objects")]
        prefix: String,
        /// Accept Provider baseUrls on link-local and cloud metadata addresses, as `run
        /// --allow-link-local-upstreams` does.
        #[arg(long)]
        allow_link_local_upstreams: bool,
    },
    /// Print the CustomResourceDefinitions (YAML) for `kubectl apply -f -`.
    Crds,
}

fn run(settings: RunSettings) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Reconciles are traced over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let provider = {
        let _guard = runtime.enter();
        tollgate_api::telemetry::provider("tollgate-operator")?
    };
    init_logging(settings.log_format, provider.as_ref());
    let code = match runtime.block_on(tollgate_operator::run::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(provider) = provider {
        runtime.block_on(tollgate_api::telemetry::shutdown(provider));
    }
    Ok(code)
}

fn init_logging(format: LogFormat, provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    use std::io::IsTerminal;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    tollgate_api::telemetry::init(json, provider, "tollgate_operator");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(settings) => run(*settings),
        Command::Render {
            path,
            output,
            json,
            objects,
            show_secrets,
            namespace,
            prefix,
            allow_link_local_upstreams,
        } => {
            let objects = objects.then_some(render::ObjectsOutput {
                show_secrets,
                naming: tollgate_operator::desired::Naming {
                    namespace,
                    prefix,
                    max_key_shards: tollgate_api::parts::MAX_KEY_SHARDS,
                    max_routing_shards: tollgate_api::parts::MAX_KEY_SHARDS,
                },
            });
            let options = tollgate_api::compile::CompileOptions {
                allow_link_local_upstreams,
            };
            render::run(&path, output.as_deref(), json, objects.as_ref(), options)
        }
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
