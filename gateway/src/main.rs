//! `tollgate-gateway`: see `--help`.
#![forbid(unsafe_code)]

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tollgate_gateway::{
    settings::{LogFormat, Settings},
    telemetry,
};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

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

fn init_logging(format: LogFormat, tracing_provider: Option<&SdkTracerProvider>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_filter(events_only(filter))
            .boxed()
    } else {
        fmt.with_filter(events_only(filter)).boxed()
    };
    let otel = tracing_provider.map(|p| telemetry::layer(p, "tollgate_gateway"));
    tracing_subscriber::registry().with(fmt).with(otel).init();
}

/// The log lines take events only: spans exist for traces, and with no exporter nobody
/// subscribes to them, so they cost next to nothing on the request path.
fn events_only<S>(
    filter: tracing_subscriber::EnvFilter,
) -> impl tracing_subscriber::layer::Filter<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::FilterExt;
    filter.and(tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_event()
    }))
}
