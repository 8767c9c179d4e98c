//! The reliability suite, SHORT profile: every scenario of issues 3 and 11 against the real binary, the
//! real RabbitMQ and the sandbox Blinger, each a test. The scenarios and their figures live in
//! `crates/test-support/src/reliability/`; the FULL profile runs them at the sizes with
//! `cargo run --release --example reliability -- --profile full --out docs/reliability.md`.
//!
//! Each test prints its figures (run with `--no-capture` to see them) and saves them under
//! `target/reliability/short/`; it fails when one of its checks (a promise of README's
//! "Delivery guarantees") does not hold.

use test_support::reliability as suite;

use std::path::PathBuf;

use suite::{Ctx, Profile};

fn ctx() -> Ctx {
    let target = test_support::target_dir();
    let seed = std::env::var("RELIABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("RELIABILITY_SEED={seed}");
    Ctx::new(
        Profile::Short,
        PathBuf::from(env!("CARGO_BIN_EXE_blinger-worker")),
        target.join("reliability"),
        seed,
    )
}

/// One test per scenario, from the suite's one list of them.
macro_rules! tests {
    ($($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let ctx = ctx();
                let figures = suite::scenarios::$name::run(&ctx).await;
                figures.save(&ctx);
                figures.assert_ok();
            }
        )*
    };
}

test_support::for_each_scenario!(tests);
