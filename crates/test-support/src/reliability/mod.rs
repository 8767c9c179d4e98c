//! The reliability suite: the real `blinger-worker` binary, a real RabbitMQ and the sandbox
//! Blinger, driven through faults (issue 3), each scenario measuring its own figures.
//!
//! Shared by two front ends:
//! - `crates/blinger-worker/tests/reliability.rs`: the SHORT profile of every scenario, one test each, in CI
//!   (`cargo nextest run --test reliability`), against the debug binary;
//! - `crates/blinger-worker/examples/reliability.rs`: the FULL profile, run by
//!   `cargo run --release --example reliability -- --profile full --out docs/reliability.md`,
//!   against the release binary; it writes the figures table of `docs/reliability.md`.
//!
//! Layout:
//! - [`harness`]: one scenario's world (queues on a broker, the sandbox, a data directory, a
//!   publisher) and the worker as a child process (start, `kill -9`, SIGTERM, `/readyz`,
//!   `/metrics`);
//! - [`broker`]: a private RabbitMQ node, for the scenarios that stop the broker or add users
//!   (the shared broker is never touched);
//! - [`jobs`]: job plans (all four kinds over many conversations, each job attributable from the
//!   sandbox's records) and the analysis of what the sandbox received: delivered, lost,
//!   duplicated, order kept or not, attributed to worker instances (kills);
//! - [`report`]: figures, checks and the markdown table;
//! - [`scenarios`]: the ten scenarios of issue 3 and the three of issue 11.
//!
//! Figures are measured, never asserted: a scenario returns its figures and a list of checks
//! (the promises of README's "Delivery guarantees"); the test fails when a check fails, the full
//! runner reports it.

pub mod broker;
pub mod harness;
pub mod jobs;
pub mod report;
pub mod scenarios;

use std::path::PathBuf;

/// How big and long each scenario is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// CI: every scenario in well under a minute.
    Short,
    /// The published figures: the sizes of issue 3.
    Full,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Short => "short",
            Profile::Full => "full",
        }
    }
}

/// What every scenario needs to know.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub profile: Profile,
    /// The `blinger-worker` binary under test.
    pub bin: PathBuf,
    /// Where worker logs and scenario artefacts go (kept after the run for inspection).
    pub out_dir: PathBuf,
    /// Seed of every random choice of the run (kill moments, job plans, sandbox dice).
    pub seed: u64,
}

impl Ctx {
    pub fn new(profile: Profile, bin: PathBuf, out_dir: PathBuf, seed: u64) -> Ctx {
        std::fs::create_dir_all(&out_dir).expect("output directory");
        Ctx {
            profile,
            bin,
            out_dir,
            seed,
        }
    }

    /// `short` in the short profile, `full` in the full one.
    pub fn pick<T>(&self, short: T, full: T) -> T {
        match self.profile {
            Profile::Short => short,
            Profile::Full => full,
        }
    }

    pub fn is_full(&self) -> bool {
        self.profile == Profile::Full
    }
}
