//! Writes (or, with `--check`, verifies) the CRD YAML files in `crds/`, and their copies
//! in the Helm chart (`charts/tollgate/files/crds/`, rendered by `templates/crds.yaml` so
//! that `helm upgrade` upgrades them).

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut check = false;
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![source.clone(), source.join("../charts/tollgate/files/crds")];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--out" => match args.next() {
                Some(d) => dirs = vec![PathBuf::from(d)],
                None => return usage("--out needs a directory"),
            },
            "-h" | "--help" => {
                println!(
                    "tollgate-crdgen [--check] [--out DIR]\n\n\
                     Writes the Provider, RoutePolicy and ApiKey CRDs generated from the Rust types\n\
                     into DIR (default: crds/ and charts/tollgate/files/crds/ of the source tree).\n\n\
                     --check    write nothing; exit 1 if a committed file differs from the types\n\
                     --out DIR  directory to write to or check"
                );
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let mut drift = false;
    for (dir, (file, crd)) in dirs
        .iter()
        .flat_map(|d| tollgate_api::crd::all().into_iter().map(move |c| (d, c)))
    {
        let path = dir.join(file);
        let want = tollgate_api::crd::to_yaml(&crd);
        if check {
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            if have != want {
                eprintln!(
                    "{}: differs from the types; run `cargo run -p tollgate-api --bin tollgate-crdgen`",
                    path.display()
                );
                drift = true;
            }
        } else if let Err(e) = std::fs::write(&path, want) {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if drift {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("tollgate-crdgen: {msg} (see --help)");
    ExitCode::from(2)
}
