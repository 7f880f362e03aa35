//! The committed inputs of a fuzz target, for the tests that replay them without a fuzzing
//! build (`#[path]`-included by `gatekeep-agent/tests/fuzz_corpus.rs` and
//! `gatekeep-server/tests/fuzz_corpus.rs`).

use std::{fs, path::PathBuf};

/// Every input file of `target`: its seeds (`fuzz/corpus/<target>/`) and the inputs that
/// once crashed it (`fuzz/regressions/<target>/`), sorted by path.
pub fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut found = Vec::new();
    for dir in [
        fuzz.join("corpus").join(target),
        fuzz.join("regressions").join(target),
    ] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            found.push((path, bytes));
        }
    }
    found.sort();
    found
}
