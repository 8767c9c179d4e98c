//! The sandbox's switches: what it answers, how slowly, and how often it misbehaves.
//!
//! One struct serves three audiences with the same shape: Rust tests (`Sandbox::set_config` /
//! `Sandbox::update`), the control endpoint (`GET`/`PUT`/`PATCH /_sandbox/config`) and the
//! binary's flags. Every field has a default, so a partial JSON object is a valid config.

use serde::{Deserialize, Serialize};

/// The token the sandbox accepts when none is configured.
pub const DEFAULT_TOKEN: &str = "sandbox-token";

/// Switches of the sandbox. Changing them takes effect for the next request that arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// The exact `Authorization` header value that is accepted; anything else answers 401.
    pub token: String,
    /// Fixed delay added before every API answer (except when `down`).
    pub latency_ms: u64,
    /// Uniform extra delay `0..=latency_jitter_ms` on top of `latency_ms`.
    pub latency_jitter_ms: u64,
    /// Probability (0..=1) of answering 500, 502 or 503 (chosen at random) to a valid request.
    pub error_rate: f64,
    /// Probability (0..=1) of answering 429 with `Retry-After: retry_after_secs`.
    pub rate_429: f64,
    /// Value of the `Retry-After` header on 429 answers, in seconds.
    pub retry_after_secs: u64,
    /// Probability (0..=1) of stalling `timeout_secs` before answering 504, so the client times
    /// out first.
    pub timeout_rate: f64,
    /// How long a stalled request stalls.
    pub timeout_secs: u64,
    /// Every API request answers 503 at once, before authentication: Blinger is down.
    pub down: bool,
    /// Answer this HTTP status (with `{"status": N, "data": null}`) to every valid, authorised
    /// request. A 2xx value is answered with the normal body under that status; 429 carries
    /// `Retry-After`.
    pub status_override: Option<u16>,
    /// Answer HTTP 200 but with this envelope `status` (and `data: null` unless it is 2xx), to
    /// check that the client treats a 2xx whose body status is not 2xx as a failure.
    pub body_status_override: Option<u16>,
    /// Conversations whose valid, authorised requests are answered 403 (the token is fine, the
    /// conversation belongs to another account), after the random injections.
    pub forbidden_conversations: Vec<String>,
    /// Seed of the random choices (jitter, injected failures); `None` seeds from the OS.
    pub seed: Option<u64>,
    /// How many requests are kept in memory (oldest dropped first); the JSONL file keeps all.
    pub max_records: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            token: DEFAULT_TOKEN.to_owned(),
            latency_ms: 0,
            latency_jitter_ms: 0,
            error_rate: 0.0,
            rate_429: 0.0,
            retry_after_secs: 1,
            timeout_rate: 0.0,
            timeout_secs: 30,
            down: false,
            status_override: None,
            body_status_override: None,
            forbidden_conversations: Vec::new(),
            seed: None,
            max_records: 1_000_000,
        }
    }
}

impl SandboxConfig {
    /// A default config accepting `token`.
    pub fn with_token(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
            ..Self::default()
        }
    }

    /// Checks the ranges that serde cannot: rates are probabilities, statuses are HTTP statuses.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_rate", self.error_rate),
            ("rate_429", self.rate_429),
            ("timeout_rate", self.timeout_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be within 0..=1, got {rate}"));
            }
        }
        for (name, status) in [
            ("status_override", self.status_override),
            ("body_status_override", self.body_status_override),
        ] {
            if let Some(s) = status
                && !(100..=599).contains(&s)
            {
                return Err(format!("{name} must be an HTTP status 100..=599, got {s}"));
            }
        }
        Ok(())
    }
}
