//! `tollgate-operator render`: compile manifests offline.

use std::{path::Path, process::ExitCode};

use anyhow::Context;
use tollgate_api::{
    compile::{CompileOptions, DEFAULT_NAMESPACE, SecretStore, compile_with},
    diagnostics::Severity,
    manifests, parts,
};

/// `--objects`: print the objects to apply instead of a summary.
#[derive(Debug, Clone)]
pub struct ObjectsOutput {
    /// Print Secret data in full.
    pub show_secrets: bool,
    /// Names of the generated objects.
    pub naming: crate::desired::Naming,
}

/// Renders `path`; see `tollgate-operator render --help`.
pub fn run(
    path: &Path,
    output: Option<&Path>,
    json: bool,
    objects: Option<&ObjectsOutput>,
    options: CompileOptions,
) -> anyhow::Result<ExitCode> {
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
    let out = compile_with(&loaded.resources, &secrets, jiff::Timestamp::now(), options);

    for d in &out.diagnostics {
        if json {
            println!("{}", serde_json::to_string(d)?);
        } else {
            eprintln!("{d}");
        }
    }
    let split = parts::split(&out.config).context("splitting the configuration")?;
    if let Some(o) = objects {
        print_objects(&split, o)?;
    }
    match output {
        _ if objects.is_some() => {}
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

/// Prints the objects as a YAML stream, Secret data redacted unless asked.
fn print_objects(split: &parts::SplitConfig, o: &ObjectsOutput) -> anyhow::Result<()> {
    use crate::desired::{DesiredObject, desired_objects};
    for object in desired_objects(split, &o.naming)? {
        let mut value = match &object {
            DesiredObject::ConfigMap(c) => serde_json::to_value(c)?,
            DesiredObject::Secret(s) => serde_json::to_value(s)?,
        };
        if !o.show_secrets
            && let Some(data) = value.get_mut("data").and_then(|d| d.as_object_mut())
            && matches!(object, DesiredObject::Secret(_))
        {
            for v in data.values_mut() {
                let len = v.as_str().map_or(0, str::len);
                *v = serde_json::Value::String(format!(
                    "<redacted: {len} base64 characters; --show-secrets prints them>"
                ));
            }
        }
        print!("---\n{}", serde_yaml::to_string(&value)?);
    }
    Ok(())
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
