//! `tollgate-gateway`: the data plane. Not built yet (tracked as issue #3); this binary
//! exists so the workspace, Dockerfile and chart have a target, and says so plainly.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "tollgate-gateway {}: the gateway data plane is not implemented yet (see issue #3 and README.md).\n\
         To check manifests offline today, use `tollgate-operator render -f DIR`.",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
