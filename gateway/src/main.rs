//! `tollgate-gateway`: see `--help`.
// One exception, `return_freed_memory` (an allocator option set before any thread starts).
#![deny(unsafe_code)]

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

/// `mi_option_arena_purge_mult` in the option enum of mimalloc v3 (what the pinned
/// libmimalloc-sys builds; it names only the first options, so a test checks this one's
/// default).
const MI_OPTION_ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;

/// Makes mimalloc give memory back to the OS as soon as whole arena blocks are free,
/// instead of a second later *and only if the allocator is called again*: after a burst of large
/// bodies an idle gateway would otherwise keep its peak resident size for good. Small
/// allocations keep mimalloc's short delay, so the request path makes no extra system
/// calls. `MIMALLOC_ARENA_PURGE_MULT` in the environment still wins.
#[allow(unsafe_code)]
fn return_freed_memory() {
    if std::env::var_os("MIMALLOC_ARENA_PURGE_MULT").is_none() {
        // SAFETY: mimalloc documents option setters as not thread-safe; this runs first
        // in `main`, before the runtime or any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_PURGE_MULT, 0) };
    }
}

fn main() -> ExitCode {
    return_freed_memory();
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

#[cfg(test)]
mod tests {
    #[test]
    #[allow(unsafe_code)]
    fn the_arena_purge_option_index_is_the_one_mimalloc_defaults_to_one() {
        // SAFETY: reads an option; no setter runs in this test binary.
        let value = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_ARENA_PURGE_MULT) };
        assert_eq!(
            value, 1,
            "mimalloc's option enum changed: fix MI_OPTION_ARENA_PURGE_MULT"
        );
        // Its neighbours, to tell it from another option defaulting to 1.
        // SAFETY: as above.
        let (delay, decommits) = unsafe {
            (
                libmimalloc_sys::mi_option_get(15),
                libmimalloc_sys::mi_option_get(5),
            )
        };
        assert_eq!(
            (delay, decommits),
            (1000, 1),
            "purge_delay, purge_decommits"
        );
    }
}
