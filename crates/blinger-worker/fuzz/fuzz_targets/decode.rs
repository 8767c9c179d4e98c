//! Fuzz target: any bytes through the job decoder, then the invariants of `crates/blinger-worker/fuzz/check.rs`.
#![no_main]

#[path = "../check.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::check(data));
