//! `blinger-sandbox`: the sandbox Blinger API as a standalone server, for the demo, the benchmarks
//! and manual poking. Every switch of [`SandboxConfig`] is a flag; they can also be changed while
//! it runs with `PUT`/`PATCH /_sandbox/config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use blinger_sandbox::{DEFAULT_TOKEN, Sandbox, SandboxConfig};
use clap::Parser;

/// A sandbox Blinger API server that records every request.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "A sandbox Blinger API: the four endpoints, Authorization checked, every request \
             recorded (/_sandbox/stats, /_sandbox/requests, --record FILE), failures injectable",
    long_about = None
)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "BLINGER_SANDBOX_ADDR",
        default_value = "127.0.0.1:8080",
        hide_env_values = true
    )]
    addr: SocketAddr,
    /// The exact Authorization header value accepted.
    #[arg(long, env = "BLINGER_SANDBOX_TOKEN", default_value = DEFAULT_TOKEN, hide_env_values = true)]
    token: String,
    /// Append every request as one JSON line to this file.
    #[arg(
        long,
        env = "BLINGER_SANDBOX_RECORD",
        value_name = "FILE",
        hide_env_values = true
    )]
    record: Option<PathBuf>,
    /// Fixed delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Uniform random extra delay 0..=N ms.
    #[arg(long, default_value_t = 0)]
    latency_jitter_ms: u64,
    /// Probability (0..=1) of answering 500/502/503.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    error_rate: f64,
    /// Probability (0..=1) of answering 429 with Retry-After.
    #[arg(long = "rate-429", default_value_t = 0.0, value_parser = parse_rate)]
    rate_429: f64,
    /// Retry-After value of 429 answers, in seconds.
    #[arg(long, default_value_t = 1)]
    retry_after_secs: u64,
    /// Probability (0..=1) of stalling --timeout-secs before answering 504.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    timeout_rate: f64,
    /// How long a stalled request stalls, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Answer 503 to every API request.
    #[arg(long)]
    down: bool,
    /// Answer this HTTP status to every valid API request.
    #[arg(long, value_parser = clap::value_parser!(u16).range(100..=599))]
    status_override: Option<u16>,
    /// Answer HTTP 200 with this envelope status.
    #[arg(long, value_parser = clap::value_parser!(u16).range(100..=599))]
    body_status_override: Option<u16>,
    /// Answer 403 to the requests for this conversation (repeat for more).
    #[arg(long = "forbidden-conversation")]
    forbidden_conversations: Vec<String>,
    /// Seed of the random choices, for reproducible runs.
    #[arg(long)]
    seed: Option<u64>,
    /// Requests kept in memory for /_sandbox/requests (the record file keeps all).
    #[arg(long, default_value_t = SandboxConfig::default().max_records)]
    max_records: usize,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("must be within 0..=1, got {rate}"))
    }
}

impl Args {
    fn config(&self) -> SandboxConfig {
        SandboxConfig {
            token: self.token.clone(),
            latency_ms: self.latency_ms,
            latency_jitter_ms: self.latency_jitter_ms,
            error_rate: self.error_rate,
            rate_429: self.rate_429,
            retry_after_secs: self.retry_after_secs,
            timeout_rate: self.timeout_rate,
            timeout_secs: self.timeout_secs,
            down: self.down,
            status_override: self.status_override,
            body_status_override: self.body_status_override,
            forbidden_conversations: self.forbidden_conversations.clone(),
            seed: self.seed,
            max_records: self.max_records,
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let sandbox = match Sandbox::start(args.addr, args.config(), args.record.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("blinger-sandbox: cannot start on {}: {e}", args.addr);
            return std::process::ExitCode::FAILURE;
        }
    };
    tracing::info!(
        control = %format!("{}/_sandbox/stats", sandbox.root_url()),
        record = ?args.record,
        "blinger sandbox listening on {}",
        sandbox.base_url()
    );
    stop_signal().await;
    tracing::info!("blinger sandbox stopping");
    sandbox.shutdown().await;
    std::process::ExitCode::SUCCESS
}
