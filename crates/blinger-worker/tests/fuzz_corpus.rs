//! The decoder's fuzz check without a fuzzer: every file of the committed corpus
//! (`crates/blinger-worker/fuzz/corpus/decode`), then seeded random mutations of them, through `crates/blinger-worker/fuzz/check.rs` (the
//! same invariants the cargo-fuzz target `crates/blinger-worker/fuzz/fuzz_targets/decode.rs` checks). Runs on stable,
//! in CI; the real fuzzing needs nightly: `cargo +nightly fuzz run decode`.

#[path = "../fuzz/check.rs"]
mod check;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_holds_the_invariants() {
    let files = corpus();
    assert!(files.len() >= 100, "corpus has {} files", files.len());
    let mut valid = 0;
    for (name, data) in &files {
        let result = std::panic::catch_unwind(|| check::check(data));
        assert!(result.is_ok(), "corpus file {name} breaks an invariant");
        if blinger_worker::contract::job::decode(data, 256 * 1024).is_ok() {
            valid += 1;
        }
    }
    // The corpus covers both sides.
    assert!(valid >= 10, "{valid} valid jobs in the corpus");
    assert!(files.len() - valid >= 50, "{} invalid", files.len() - valid);
}

/// libFuzzer-style mutations (bit flips, byte sets, insertions, deletions, splices, interesting
/// bytes) of the corpus, seeded so a failure reproduces.
#[test]
fn mutations_of_the_corpus_hold_the_invariants() {
    let files = corpus();
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED);
    let mut rng = StdRng::seed_from_u64(seed);
    let interesting: &[&[u8]] = &[
        b"\"",
        b"\\",
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b"null",
        b"\\u0000",
        b"\xff",
        b"\xc3",
        b"..",
        b"/",
        b"%2e",
        b"%",
        b"?",
        b"#",
        b"-",
        b"0",
        b"e9",
        b"\"kind\"",
        b"\"id\"",
        b"\"conversation_id\"",
        b"\"send-file\"",
        b"\"assign-agent\"",
        b"\"request-review\"",
    ];
    let rounds = 20_000;
    for round in 0..rounds {
        let (_, base) = &files[rng.random_range(0..files.len())];
        let mut data = base.clone();
        for _ in 0..rng.random_range(1..=4) {
            let len = data.len();
            match rng.random_range(0..6) {
                0 if len > 0 => {
                    let i = rng.random_range(0..len);
                    data[i] ^= 1 << rng.random_range(0..8);
                }
                1 if len > 0 => {
                    let i = rng.random_range(0..len);
                    data[i] = rng.random();
                }
                2 => {
                    let i = rng.random_range(0..=len);
                    let piece = interesting[rng.random_range(0..interesting.len())];
                    data.splice(i..i, piece.iter().copied());
                }
                3 if len > 0 => {
                    let i = rng.random_range(0..len);
                    let j = rng.random_range(i..=len.min(i + 16));
                    data.drain(i..j);
                }
                4 => {
                    let (_, other) = &files[rng.random_range(0..files.len())];
                    if !other.is_empty() {
                        let a = rng.random_range(0..other.len());
                        let b = rng.random_range(a..=other.len());
                        let i = rng.random_range(0..=len);
                        data.splice(i..i, other[a..b].iter().copied());
                    }
                }
                _ => {
                    let i = rng.random_range(0..=len);
                    data.truncate(i);
                }
            }
        }
        let result = std::panic::catch_unwind(|| check::check(&data));
        assert!(
            result.is_ok(),
            "mutation round {round} (FUZZ_SEED={seed}) breaks an invariant: {:?}",
            String::from_utf8_lossy(&data)
        );
    }
}
