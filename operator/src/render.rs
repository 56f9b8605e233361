//! `tollgate-operator render`: compile manifests offline.

use std::{path::Path, process::ExitCode};

use anyhow::Context;
use tollgate_api::{
    compile::{DEFAULT_NAMESPACE, SecretStore, compile},
    diagnostics::Severity,
    manifests, parts,
};

pub fn run(path: &Path, output: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    let loaded = match manifests::load_path(path) {
        Ok(l) => l,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            anyhow::bail!("{} manifest error(s); nothing compiled", errors.len());
        }
    };
    for (file, kind) in &loaded.skipped {
        eprintln!(
            "note: {}: skipped a {kind} (not a Tollgate object or Secret)",
            file.display()
        );
    }
    let secrets = SecretStore::new(&loaded.secrets, DEFAULT_NAMESPACE);
    let out = compile(&loaded.resources, &secrets, jiff::Timestamp::now());

    for d in &out.diagnostics {
        if json {
            println!("{}", serde_json::to_string(d)?);
        } else {
            eprintln!("{d}");
        }
    }
    let split = parts::split(&out.config).context("splitting the configuration")?;
    match output {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for part in &split.parts {
                let file = dir.join(&part.file);
                write_part(&file, &part.bytes, part.store == parts::Store::Secret)
                    .with_context(|| format!("writing {}", file.display()))?;
            }
        }
        None if !json => {
            let c = &out.config;
            println!(
                "config {}: {} provider(s), {} route(s), {} key entr(ies)",
                &split.config_hash[..16],
                c.routing.providers.len(),
                c.routing.routes.len(),
                c.keys.keys.len()
            );
            for part in &split.parts {
                println!(
                    "  {:<18} {:?} {:>8} bytes",
                    part.file,
                    part.store,
                    part.bytes.len()
                );
            }
        }
        None => {}
    }
    let errors = out
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Writes a part; Secret-bound parts are readable by the owner only.
fn write_part(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        // The mode applies only when the file is created, so never reuse an old one.
        let _ = std::fs::remove_file(path);
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}
