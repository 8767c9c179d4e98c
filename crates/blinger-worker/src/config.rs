//! Settings: every one a command-line flag with an environment variable (the names are public).
//!
//! Secrets (the Blinger token, the AMQP URL's password) are wrapped in [`Secret`] as soon as they
//! are read, whose `Debug` and `Display` never show the value, so no log line, error or panic
//! message built from settings can carry them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to the value: call sites are few and easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Why `AMQP_URL` cannot be used. No variant carries any part of the URL: in a malformed URL the
/// password may be anywhere (in the path of `amqp:user:pw@host`, in the port or path after a `/`,
/// `?` or `#` in the password), so nothing of it is ever repeated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmqpUrlError {
    /// url's messages are fixed texts ("invalid port number", "empty host"): none quotes input.
    #[error("AMQP_URL is not a URL ({0}); expected amqp://user:password@host:port/vhost")]
    Parse(url::ParseError),
    #[error("AMQP_URL has no host: expected amqp://user:password@host:port/vhost")]
    NoHost,
    #[error("AMQP_URL must start with amqp:// or amqps://")]
    Scheme,
    #[error(
        "AMQP_URL has an '@' after its host: percent-encode '@', '/', '?' and '#' in the user \
         name, password and vhost (%40, %2F, %3F, %23)"
    )]
    StrayAt,
    #[error(
        "AMQP_URL is not a valid AMQP URI: check the percent-encoding and that frame_max, \
         channel_max, heartbeat and connection_timeout are numbers"
    )]
    Invalid,
    /// One URL of a comma-separated list is wrong.
    #[error("{problem} (entry {position} of the {count} in the comma-separated list)")]
    Entry {
        position: usize,
        count: usize,
        problem: Box<AmqpUrlError>,
    },
}

/// `url` parsed the way the AMQP client parses it, checked for the mistakes that would move a
/// password out of the user-info part (where redaction looks for it).
fn checked_url(url: &str) -> Result<url::Url, AmqpUrlError> {
    let parsed = url::Url::parse(url).map_err(AmqpUrlError::Parse)?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return Err(AmqpUrlError::Scheme);
    }
    if parsed.cannot_be_a_base() || parsed.host_str().is_none_or(str::is_empty) {
        return Err(AmqpUrlError::NoHost);
    }
    // The parser splits the user info at the *last* '@' before the host, so an '@' in the path,
    // query or fragment means the authority ended early: a '/', '?' or '#' in the password put
    // the rest of it (and the real host) there.
    let stray = |part: Option<&str>| part.is_some_and(|p| p.contains('@'));
    if stray(Some(parsed.path())) || stray(parsed.query()) || stray(parsed.fragment()) {
        return Err(AmqpUrlError::StrayAt);
    }
    Ok(parsed)
}

/// `AMQP_URL` split into its URLs. Several, separated by commas, name the nodes of one cluster,
/// tried in turn (`broker::connect`). The text is split only at a comma followed by `amqp://` or
/// `amqps://`, so a comma inside a password survives; white space around each URL is ignored.
pub fn split_amqp_urls(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (at, _) in text.match_indices(',') {
        let rest = text[at + 1..].trim_start();
        if rest.starts_with("amqp://") || rest.starts_with("amqps://") {
            out.push(text[start..at].trim());
            start = at + 1;
        }
    }
    out.push(text[start..].trim());
    out
}

/// `AMQP_URL` as the AMQP client's URIs, one per listed node, or why it cannot be (never quoting
/// it; in a list, the error says which entry). The worker and the operator commands check the
/// URL with this before connecting; connecting with the result (`lapin::Connection::connect_uri`)
/// never reparses the text, so no parse error can echo it. The result's `Debug` shows the
/// password: never log it.
pub fn amqp_uris(url: &Secret) -> Result<Vec<lapin::uri::AMQPUri>, AmqpUrlError> {
    let urls = split_amqp_urls(url.expose());
    let count = urls.len();
    urls.into_iter()
        .enumerate()
        .map(|(i, one)| {
            one_uri(one).map_err(|problem| match count {
                1 => problem,
                _ => AmqpUrlError::Entry {
                    position: i + 1,
                    count,
                    problem: Box::new(problem),
                },
            })
        })
        .collect()
}

fn one_uri(url: &str) -> Result<lapin::uri::AMQPUri, AmqpUrlError> {
    checked_url(url)?;
    // The client's own parser has further checks (percent-encoding, numeric query parameters);
    // its error texts may quote the URL, so they are dropped.
    url.parse::<lapin::uri::AMQPUri>()
        .map_err(|_| AmqpUrlError::Invalid)
}

/// The AMQP URL (or each URL of a list) with its password masked, for logs and error messages.
/// A URL that is malformed (see [`AmqpUrlError`]) is not shown at all: its password could be
/// anywhere in it.
pub fn redact_url(url: &str) -> String {
    split_amqp_urls(url)
        .into_iter()
        .map(|one| match checked_url(one) {
            Ok(mut parsed) => {
                if parsed.password().is_some() {
                    let _ = parsed.set_password(Some("***"));
                }
                parsed.set_fragment(None);
                parsed.to_string()
            }
            Err(_) => "[unparseable URL]".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the broker is and what the topology is called: shared by every command that talks to it.
#[derive(Debug, Clone, Args)]
pub struct AmqpSettings {
    /// RabbitMQ URL (amqp:// or amqps://), or the URLs of a cluster's nodes separated by
    /// commas, tried in turn. The password is never logged.
    #[arg(
        long = "amqp-url",
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub url: Secret,

    /// Topic exchange publishers send jobs to.
    #[arg(
        long,
        env = "BLINGER_WORKER_EXCHANGE",
        default_value = "blinger.outbound"
    )]
    pub exchange: String,

    /// Work queue, bound to the exchange with `#`.
    #[arg(long, env = "BLINGER_WORKER_QUEUE", default_value = "blinger.outbound")]
    pub queue: String,

    /// Dead-letter queue for jobs that can never be delivered.
    #[arg(
        long,
        env = "BLINGER_WORKER_DEAD_LETTER_QUEUE",
        default_value = "blinger.outbound.dead"
    )]
    pub dead_letter_queue: String,

    /// Queue type of the work, retry and dead-letter queues.
    #[arg(
        long,
        env = "BLINGER_WORKER_QUEUE_TYPE",
        value_enum,
        default_value = "quorum"
    )]
    pub queue_type: QueueType,

    /// Topic exchange of delivery receipts (`delivered.<kind>`, `dead.<kind>`).
    #[arg(
        long,
        env = "BLINGER_WORKER_RECEIPTS_EXCHANGE",
        default_value = "blinger.outbound.events"
    )]
    pub receipts_exchange: String,

    /// Broker-side delivery limit of the quorum work queue: a safety net that parks a message
    /// which keeps crashing the worker. Unused with classic queues.
    #[arg(long, env = "BLINGER_WORKER_DELIVERY_LIMIT", default_value_t = 20)]
    pub delivery_limit: u32,

    /// Delay tiers of the durable retry queues, one queue per tier, in order of attempts.
    #[arg(
        long,
        env = "BLINGER_WORKER_RETRY_DELAYS",
        default_value = "5s,30s,2m,10m,30m",
        value_parser = parse_delays
    )]
    pub retry_delays: Delays,

    /// Partition queues (docs/scale-out.md). 0: one work queue, as before. P > 0: the jobs go
    /// through a router into P partition queues by conversation (`{queue}.p.00`…), each taken by
    /// one consumer at a time. Fixed at install: the worker refuses to start with a count other
    /// than the one the topology was declared with (docs/deploy.md, "Partitions").
    #[arg(long, env = "BLINGER_WORKER_PARTITIONS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=crate::engine::partition::MAX_PARTITIONS as i64))]
    pub partitions: u16,

    /// Delivered records older than this are pruned. In partitioned mode also the age limit of
    /// the delivered-records log (`{queue}.log`), set when the log is first declared.
    #[arg(long, env = "BLINGER_WORKER_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,
}

/// A non-empty list of delays, parsed from `5s,30s,2m`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delays(pub Vec<Duration>);

fn parse_delays(s: &str) -> Result<Delays, String> {
    let delays = s
        .split(',')
        .map(|part| parse_duration(part.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if delays.is_empty() || delays.iter().any(|d| d.as_millis() == 0) {
        return Err("need at least one delay, each above zero".into());
    }
    Ok(Delays(delays))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s or 5m: {e}"))
}

/// Everything `blinger-worker run` needs.
#[derive(Debug, Clone, Args)]
pub struct RunSettings {
    #[command(flatten)]
    pub amqp: AmqpSettings,

    /// Base URL of the Blinger external API.
    #[arg(
        long,
        env = "BLINGER_API_URL",
        default_value = "https://widget.blinger.io/api/external/v1"
    )]
    pub api_url: url::Url,

    /// Blinger API token, sent as the Authorization header exactly as given.
    #[arg(
        long,
        env = "BLINGER_API_TOKEN",
        hide_env_values = true,
        conflicts_with = "api_token_file"
    )]
    pub api_token: Option<Secret>,

    /// File holding the Blinger API token (surrounding whitespace is trimmed). Re-read while the
    /// worker is paused on 401/403, so a rotated secret is picked up without a restart.
    #[arg(long, env = "BLINGER_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,

    /// Directory of the embedded store (delivered records).
    #[arg(long, env = "BLINGER_WORKER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(
        long,
        env = "BLINGER_WORKER_METRICS_ADDR",
        default_value = "0.0.0.0:9464"
    )]
    pub metrics_addr: SocketAddr,

    /// Jobs processed at once (different conversations; one conversation is sequential).
    #[arg(long, env = "BLINGER_WORKER_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// request-review and assign-agent calls outstanding at once, each from its call until its
    /// delivered record is durable. Those calls carry no idempotency key, so a crash (kill -9,
    /// OOM, node loss) repeats every one outstanding: 1 means at most one repeat per crash.
    /// Their throughput is then about one per Blinger round trip; raise it to trade that bound
    /// for throughput.
    #[arg(long, env = "BLINGER_WORKER_KEYLESS_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub keyless_concurrency: u32,

    /// Unacknowledged messages the broker may hand this worker at once.
    #[arg(long, env = "BLINGER_WORKER_PREFETCH", default_value_t = 200,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Unacknowledged messages per partition queue when BLINGER_WORKER_PARTITIONS > 0 (the fair
    /// share then applies within each partition). Unset or 0: PREFETCH / PARTITIONS rounded up, at
    /// least 16 (0 lets the chart pass the setting without repeating that rule).
    #[arg(long, env = "BLINGER_WORKER_PARTITION_PREFETCH",
          value_parser = clap::value_parser!(u16))]
    pub partition_prefetch: Option<u16>,

    /// Fair share of the prefetch (see README "Delivery guarantees"): once the worker holds
    /// prefetch minus this many deliveries, a new job of a conversation holding this many (or of
    /// a keyless kind while those hold this many) is deferred round a delay tier, so the other
    /// conversations keep flowing. Default 50 (a quarter of the default prefetch); 0 turns it
    /// off; at most prefetch / 2.
    #[arg(long, env = "BLINGER_WORKER_FAIR_SHARE", default_value_t = 50)]
    pub fair_share: u16,

    /// Cap on calls to Blinger, requests per second (all kinds together).
    #[arg(long, env = "BLINGER_WORKER_RATE_LIMIT", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit: u32,

    /// Requests that may go out at once after a quiet period.
    #[arg(long, env = "BLINGER_WORKER_RATE_BURST", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: u32,

    /// Log format.
    #[arg(
        long,
        env = "BLINGER_WORKER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `blinger_worker=debug`).
    #[arg(long, env = "BLINGER_WORKER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// HTTP attempts made in-process before a job is parked in a delay tier.
    #[arg(long, env = "BLINGER_WORKER_MAX_IN_PROCESS_ATTEMPTS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_in_process_attempts: u32,

    /// Timeout of one call to Blinger.
    #[arg(long, env = "BLINGER_WORKER_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// On SIGTERM, time given to jobs in flight before the rest is handed back to the broker.
    #[arg(long, env = "BLINGER_WORKER_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Publish a receipt event for every delivered or dead-lettered job.
    #[arg(long, env = "BLINGER_WORKER_RECEIPTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub receipts: bool,

    /// Message bodies larger than this are dead-lettered as invalid.
    #[arg(long, env = "BLINGER_WORKER_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Key that seals the worker's trail headers on jobs in the delay tiers (at least 16
    /// characters), so a publisher cannot forge them (see `trail`). Replicas consuming the same
    /// queues must share it. Unset: a random key kept in the data directory (`trail.key`).
    #[arg(long, env = "BLINGER_WORKER_TRAIL_KEY", hide_env_values = true)]
    pub trail_key: Option<Secret>,
}

/// Smallest default prefetch of a partition consumer: enough for a fair share of 8.
pub const MIN_PARTITION_PREFETCH: u16 = 16;

/// Where the token comes from. A file is re-read on demand, a literal never changes.
#[derive(Debug, Clone)]
pub enum TokenSource {
    Literal(Secret),
    File(PathBuf),
}

/// A setting that makes the worker unable to start; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no Blinger API token: set BLINGER_API_TOKEN or BLINGER_API_TOKEN_FILE")]
    MissingToken,
    #[error("BLINGER_API_TOKEN_FILE {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("BLINGER_API_TOKEN_FILE {path} is empty")]
    EmptyTokenFile { path: String },
    #[error("BLINGER_API_TOKEN is empty")]
    EmptyToken,
    #[error("BLINGER_API_URL must be an http(s) URL")]
    ApiUrl,
    #[error(transparent)]
    AmqpUrl(#[from] AmqpUrlError),
}

impl TokenSource {
    pub fn from_settings(settings: &RunSettings) -> Result<Self, ConfigError> {
        match (&settings.api_token, &settings.api_token_file) {
            (Some(token), _) if token.expose().trim().is_empty() => Err(ConfigError::EmptyToken),
            (Some(token), _) => Ok(TokenSource::Literal(token.clone())),
            (None, Some(path)) => Ok(TokenSource::File(path.clone())),
            (None, None) => Err(ConfigError::MissingToken),
        }
    }

    pub fn load(&self) -> Result<Secret, ConfigError> {
        match self {
            TokenSource::Literal(token) => Ok(token.clone()),
            TokenSource::File(path) => {
                let raw =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::TokenFile {
                        path: path.display().to_string(),
                        source,
                    })?;
                let token = raw.trim();
                if token.is_empty() {
                    return Err(ConfigError::EmptyTokenFile {
                        path: path.display().to_string(),
                    });
                }
                Ok(Secret::new(token))
            }
        }
    }
}

impl RunSettings {
    /// The prefetch of each partition consumer (partitioned mode).
    pub fn partition_prefetch(&self) -> u16 {
        self.partition_prefetch
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                let partitions = self.amqp.partitions.max(1);
                self.prefetch
                    .div_ceil(partitions)
                    .max(MIN_PARTITION_PREFETCH)
            })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.api_url.scheme(), "http" | "https") || self.api_url.cannot_be_a_base() {
            return Err(ConfigError::ApiUrl);
        }
        amqp_uris(&self.amqp.url)?;
        TokenSource::from_settings(self)?.load()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_settings(args: &[&str]) -> RunSettings {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunSettings,
        }
        let argv = [
            "blinger-worker",
            "--amqp-url",
            "amqp://localhost",
            "--api-token",
            "t",
        ];
        <Cli as clap::Parser>::try_parse_from(argv.iter().chain(args))
            .expect("valid settings")
            .run
    }

    #[test]
    fn the_partition_prefetch_is_derived_unless_given() {
        let derived = |args: &[&str]| run_settings(args).partition_prefetch();
        // PREFETCH / P rounded up, never below 16; 0 is "derive" (the chart's way to pass it).
        assert_eq!(derived(&["--prefetch", "200", "--partitions", "16"]), 16);
        assert_eq!(derived(&["--prefetch", "1000", "--partitions", "16"]), 63);
        assert_eq!(
            derived(&[
                "--prefetch",
                "1000",
                "--partitions",
                "16",
                "--partition-prefetch",
                "0"
            ]),
            63
        );
        assert_eq!(derived(&["--prefetch", "200", "--partitions", "0"]), 200);
        assert_eq!(
            derived(&["--partitions", "16", "--partition-prefetch", "40"]),
            40
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
    }

    #[test]
    fn redacts_amqp_password() {
        let r = redact_url("amqp://user:s3cret@rabbit:5672/%2f");
        assert!(!r.contains("s3cret"), "{r}");
        assert!(r.contains("user"));
        assert_eq!(redact_url("not a url"), "[unparseable URL]");
    }

    /// URLs that are malformed in ways that put the password where a parser does not look for
    /// one (the path of a URL without `//`, after a `/`, `?` or `#` in the password), and that
    /// password: redaction never shows it.
    const MALFORMED: [(&str, &str); 8] = [
        ("amqp:user:Pa55w0rd@host", "Pa55w0rd"),
        ("amqp:/user:Pa55w0rd@host", "Pa55w0rd"),
        ("amqp:///user:Pa55w0rd@host", "Pa55w0rd"),
        ("amqp://user:Pa55w0rd@host:notaport", "Pa55w0rd"),
        ("amqp://user:Pa55@w0rd@host", "w0rd"),
        ("amqp://user:1234/Pa55w0rd@host", "Pa55w0rd"),
        ("amqp://user:12?Pa55w0rd@host", "Pa55w0rd"),
        ("amqp://user:12#Pa55w0rd@host", "Pa55w0rd"),
    ];

    #[test]
    fn a_comma_separated_list_names_several_nodes() {
        assert_eq!(
            split_amqp_urls("amqp://u:p@a/%2f, amqps://u:p@b:5671/%2f ,amqp://c"),
            ["amqp://u:p@a/%2f", "amqps://u:p@b:5671/%2f", "amqp://c"]
        );
        // A comma inside a password is not a separator.
        assert_eq!(
            split_amqp_urls("amqp://u:pa,ss@a/%2f"),
            ["amqp://u:pa,ss@a/%2f"]
        );
        assert_eq!(
            amqp_uris(&Secret::new("amqp://u:pa,ss@a/%2f"))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            redact_url("amqp://u:one@a:5672/%2f,amqp://u:two@b:5672/%2f"),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f"
        );
        // A bad entry is named by its place, and quoted nowhere.
        let err = amqp_uris(&Secret::new("amqp://u:p@a/%2f,amqp://u:s3cret@/x")).unwrap_err();
        assert_eq!(
            err,
            AmqpUrlError::Entry {
                position: 2,
                count: 2,
                problem: Box::new(AmqpUrlError::Parse(url::ParseError::EmptyHost))
            }
        );
        assert!(!err.to_string().contains("s3cret"));
        assert!(err.to_string().contains("entry 2 of the 2"), "{err}");
    }

    #[test]
    fn redaction_of_a_malformed_url_never_shows_the_password() {
        for (url, password) in MALFORMED {
            let shown = redact_url(url);
            assert!(!shown.contains(password), "{url} shown as {shown}");
            if let Err(e) = amqp_uris(&Secret::new(url)) {
                let text = format!("{e} {e:?}");
                assert!(!text.contains(password), "{url}: {text}");
                assert!(text.contains("AMQP_URL"), "{text}");
            }
        }
        // Only the one with an '@' in its password is a usable URL.
        let usable: Vec<&str> = MALFORMED
            .iter()
            .map(|(url, _)| *url)
            .filter(|url| amqp_uris(&Secret::new(*url)).is_ok())
            .collect();
        assert_eq!(usable, ["amqp://user:Pa55@w0rd@host"]);
    }

    #[test]
    fn amqp_uris_reads_what_the_client_reads() {
        let uri = amqp_uris(&Secret::new("amqps://u:p%2Fw@rabbit:5671/%2f?heartbeat=5")).unwrap()
            [0]
        .clone();
        assert_eq!(uri.authority.userinfo.password, "p/w");
        assert_eq!(uri.authority.host, "rabbit");
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.query.heartbeat, Some(5));
        let err = |url: &str| amqp_uris(&Secret::new(url)).unwrap_err();
        assert_eq!(err("http://u:p@rabbit"), AmqpUrlError::Scheme);
        assert_eq!(err("amqp:u:p@rabbit"), AmqpUrlError::NoHost);
        assert_eq!(err("amqp://u:1/p@rabbit"), AmqpUrlError::StrayAt);
        assert_eq!(
            err("amqp://u:p@rabbit?heartbeat=soon"),
            AmqpUrlError::Invalid
        );
        assert_eq!(
            err("amqp://u:p@rabbit:port"),
            AmqpUrlError::Parse(url::ParseError::InvalidPort)
        );
        assert_eq!(
            redact_url("amqp://u:p@rabbit:5672/%2f#frag"),
            "amqp://u:***@rabbit:5672/%2f"
        );
    }

    #[test]
    fn parses_delay_tiers() {
        assert_eq!(
            parse_delays("5s, 2m").unwrap(),
            Delays(vec![Duration::from_secs(5), Duration::from_secs(120)])
        );
        assert!(parse_delays("").is_err());
        assert!(parse_delays("0s").is_err());
        assert!(parse_delays("5 parsecs").is_err());
    }

    #[test]
    fn token_file_is_trimmed_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let source = TokenSource::File(path.clone());
        assert_eq!(source.load().unwrap().expose(), "first");
        std::fs::write(&path, "second").unwrap();
        assert_eq!(source.load().unwrap().expose(), "second");
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            source.load(),
            Err(ConfigError::EmptyTokenFile { .. })
        ));
    }
}
