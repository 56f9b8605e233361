//! The module graph of each crate has no cycles: a module's `use crate::…` and
//! `crate::…` paths (and, inside a directory module, `super::…` paths to its siblings)
//! never lead back to it. Cycles are how a codebase stops having owners; this keeps the
//! layering of docs/architecture.md true as code moves.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use tollgate_tests::repo_root;

/// A module's path in its crate (`["limits", "redis"]`), from its file.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its `#[cfg(test)] mod tests { … }`.
fn code(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment of each item a `use crate::{…}` or `use super::{…}` list names,
/// and of each `crate::x` / `super::x` path.
fn referenced(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices(prefix) {
        let rest = &code[at + prefix.len()..];
        if let Some(list) = rest.strip_prefix('{') {
            // Top-level items of the braced list.
            let (mut depth, mut item) = (0, String::new());
            for c in list.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.insert(ident(item.trim()));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| {
        !m.is_empty() && m != "self" && m.chars().next().is_some_and(|c| c.is_ascii_lowercase())
    });
    out
}

/// Edges between the modules of the crate whose sources are in `src`: top-level modules,
/// and the submodules of each directory module among themselves.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let tops: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(src, f))
        .filter(|m| !m.is_empty())
        .map(|m| m[0].clone())
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let Some(top) = module.first() else { continue };
        if matches!(top.as_str(), "lib" | "main") || module.iter().any(|m| m == "tests") {
            continue;
        }
        let code = code(&std::fs::read_to_string(file).unwrap());
        for target in referenced(&code, "crate::") {
            if tops.contains(&target) && target != *top {
                edges.entry(top.clone()).or_default().insert(target);
            }
        }
        // Siblings inside a directory module (`limits/redis` → `limits/store`).
        if module.len() == 2 {
            let node = module.join("/");
            for sibling in referenced(&code, "super::") {
                let sibling_file = src.join(top).join(format!("{sibling}.rs"));
                if sibling != module[1] && sibling_file.exists() {
                    edges
                        .entry(node.clone())
                        .or_default()
                        .insert(format!("{top}/{sibling}"));
                }
            }
        }
    }
    edges
}

/// A cycle in `edges`, if there is one, as the modules along it.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, edges, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|start| visit(start, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    for krate in [
        "gateway",
        "operator",
        "crds",
        "tests/kube-emulator",
        "tests/kit",
    ] {
        let src = repo_root().join(krate).join("src");
        let edges = graph(&src);
        assert!(
            !edges.is_empty() || krate.starts_with("tests/"),
            "{krate}: no modules found"
        );
        if let Some(found) = cycle(&edges) {
            panic!(
                "{krate}: the modules {} import each other in a cycle",
                found.join(" → ")
            );
        }
    }
}

#[test]
fn a_cycle_is_found() {
    let edges = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(cycle(&edges).unwrap(), ["a", "b", "c", "a"]);
    let code = "use crate::{metrics::Metrics, snapshot::{Key, Snapshot}};\nlet x = crate::relay::sse_response(b);\nuse super::{Ask, redis::{RedisLimits}};";
    assert_eq!(
        referenced(code, "crate::"),
        BTreeSet::from(["metrics".into(), "snapshot".into(), "relay".into()])
    );
    assert_eq!(
        referenced(code, "super::"),
        BTreeSet::from(["redis".into()])
    );
}
