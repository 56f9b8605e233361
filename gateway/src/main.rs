//! `tollgate-gateway`: see `--help`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tollgate_gateway::{
    settings::{LogFormat, Settings},
    telemetry,
};

/// mimalloc: fewer instructions per allocation than glibc's malloc and no arena lock
/// contention between worker threads (bench/README.md has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let settings = Settings::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The trace exporter binds to the runtime.
    let tracing_provider = {
        let _guard = runtime.enter();
        match telemetry::provider("tollgate-gateway") {
            Ok(p) => p,
            Err(e) => {
                eprintln!("tollgate-gateway: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    };
    init_logging(settings.log_format, tracing_provider.as_ref());
    if tracing_provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    let code = match runtime.block_on(tollgate_gateway::server::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(provider) = tracing_provider {
        runtime.block_on(telemetry::shutdown(provider));
    }
    code
}

fn init_logging(format: LogFormat, provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    use std::io::IsTerminal;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    tollgate_api::telemetry::init(json, provider, "tollgate_gateway");
}
