//! The `cargo fuzz` targets (`fuzz/`) without libFuzzer: every target over every seed in
//! `fuzz/seeds/<target>/`, then over deterministic pseudo-random mutations of them, so the
//! properties they assert hold in every test run and each crash found by fuzzing stays
//! fixed (its input is kept as a seed).

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    time::{Duration, Instant},
};

use tollgate_gateway::fuzzing;

/// Mutations tried per target (fewer when the time budget runs out first).
const MUTATIONS: usize = 3000;
/// Time budget per target for the mutations.
const BUDGET: Duration = Duration::from_millis(1500);

/// Fragments that tend to matter to JSON, SSE and YAML parsers.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"18446744073709551615",
    b"\n\n",
    b"\r\n",
    b"\r",
    b"data: ",
    b"event: ",
    b"[DONE]",
    b"---\n",
    b"&a ",
    b"*a",
    b"\xff",
    b"\xc3",
    b"tg_",
];

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// One mutation of `input`, libFuzzer-style: flip, insert, delete, duplicate, splice.
fn mutate(rng: &mut fastrand::Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(..=out.len());
        match rng.u8(..6) {
            0 if !out.is_empty() => {
                let i = rng.usize(..out.len());
                out[i] ^= 1 << rng.u8(..8);
            }
            1 => out.insert(at, rng.u8(..)),
            2 => {
                let end = (at + rng.usize(..16)).min(out.len());
                out.drain(at..end);
            }
            3 => {
                let end = (at + rng.usize(..32)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            4 if !other.is_empty() => {
                let from = rng.usize(..other.len());
                let end = (from + rng.usize(..64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => {
                let token = TOKENS[rng.usize(..TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
        }
    }
    out
}

fn run(target: &str, f: fn(&[u8])) {
    let seeds = seeds(target);
    let check = |what: &str, input: &[u8]| {
        if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
            panic!(
                "fuzz target `{target}` failed on {what}; input: {:?}",
                String::from_utf8_lossy(input)
            );
        }
    };
    for (name, input) in &seeds {
        check(&format!("seed {name}"), input);
    }
    let mut rng = fastrand::Rng::with_seed(0x7011_6a7e);
    let started = Instant::now();
    let mut tried = 0;
    while tried < MUTATIONS && started.elapsed() < BUDGET {
        let (name, input) = &seeds[tried % seeds.len()];
        let other = &seeds[rng.usize(..seeds.len())].1;
        let mutated = mutate(&mut rng, input, other);
        check(&format!("mutation {tried} of seed {name}"), &mutated);
        tried += 1;
    }
    eprintln!("{target}: {} seeds, {tried} mutations", seeds.len());
}

#[test]
fn request_parsing_survives_its_seeds_and_their_mutations() {
    run("request", fuzzing::request);
}

#[test]
fn sse_parsing_survives_its_seeds_and_their_mutations() {
    run("sse", fuzzing::sse);
}

#[test]
fn translation_survives_its_seeds_and_their_mutations() {
    run("translate", fuzzing::translate);
}

#[test]
fn api_key_checks_survive_their_seeds_and_mutations() {
    run("api_key", fuzzing::api_key);
}

#[test]
fn compile_survives_its_seeds_and_their_mutations() {
    run("compile", fuzzing::compile);
}
