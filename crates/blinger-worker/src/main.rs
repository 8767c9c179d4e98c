//! `blinger-worker`: wires the command line to the library. Errors become one line and a
//! non-zero exit.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use blinger_worker::cli::{dlq, publish, store_cmd};
use blinger_worker::config::RunSettings;
use blinger_worker::runtime::{shutdown, telemetry, worker::Worker};

// With `--features jemalloc` (docs/performance.md: ~25 % less CPU per job than glibc's malloc,
// ~25 MiB more RSS). One arena and small thread caches keep its memory down: the worker is
// I/O-bound, and few of its threads allocate much.
#[cfg(all(feature = "jemalloc", unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its options from this symbol at start (`_rjem_` is the crate's prefix).
#[cfg(all(feature = "jemalloc", unix, not(target_env = "musl")))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 63] =
    b"narenas:1,tcache_max:4096,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Delivers jobs from RabbitMQ to the Blinger chat-widget API, exactly once, in order per
/// conversation.
#[derive(Parser)]
#[command(
    name = "blinger-worker",
    version,
    about,
    after_help = "\
Examples:
  blinger-worker run                                  # the worker (settings from the environment)
  blinger-worker publish --kind send-text --conversation-id C --text Hello
  blinger-worker dlq list
  blinger-worker store get 554f11c1-ec1e-4fdb-9953-bfad33013f58

Run `blinger-worker <COMMAND> --help` for a command's flags and examples; docs/operators.md is the
on-call guide."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker.
    ///
    /// Example: BLINGER_API_TOKEN=... AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f blinger-worker run
    Run(Box<RunSettings>),
    /// Publish jobs (from flags, or JSON Lines on stdin), validated first, publisher-confirmed.
    Publish(Box<publish::PublishArgs>),
    /// Inspect, replay or purge the dead-letter queue.
    Dlq(Box<dlq::DlqArgs>),
    /// Inspect or prune the idempotency store.
    Store(store_cmd::StoreArgs),
}

fn main() -> ExitCode {
    // lapin starts its reader thread with the default stack size, which RUST_MIN_STACK sets.
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe {
            std::env::set_var(
                "RUST_MIN_STACK",
                blinger_worker::broker::DECODER_STACK_BYTES.to_string(),
            )
        };
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(blinger_worker::broker::DECODER_STACK_BYTES)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blinger-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(settings) => run(*settings).await,
            // The operator commands' errors tell their whole story in one line; their source
            // chains would only repeat it, so they cross the edge as plain messages.
            Command::Publish(args) => publish::run(&args).await.map(drop).map_err(one_line),
            Command::Dlq(args) => dlq::run(&args).await.map_err(one_line),
            Command::Store(args) => store_cmd::run(&args).await.map_err(one_line),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blinger-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn one_line(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::msg(e.to_string())
}

async fn run(settings: RunSettings) -> anyhow::Result<()> {
    telemetry::init_logging(settings.log_format, &settings.log_level)?;
    // Start errors embed their causes and name the setting: one line, nothing repeated.
    let worker = Worker::start(settings).await.map_err(one_line)?;
    let stop = shutdown::on_signals();
    worker.run(stop).await
}
