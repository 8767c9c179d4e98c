//! `blinger-worker publish`: puts jobs on the exchange exactly as a well-behaved publisher would.
//!
//! Guarantees:
//! - nothing invalid is published: every job goes through [`job::decode`], the worker's own
//!   decoder, first; an invalid one is reported with the decoder's reason and skipped (or stops
//!   the run with `--strict`);
//! - an id is printed on stdout only once the broker has confirmed its job (persistent message,
//!   publisher confirm, `mandatory` so an unroutable publish is an error, not a silent drop), in
//!   input order, so the output is the list of jobs that are safely queued;
//! - confirms are pipelined (a window of messages in flight), so 100k jobs do not cost 100k round
//!   trips;
//! - the topology is declared first, so publishing to a fresh broker works and a job is never
//!   dropped for want of a queue;
//! - should the broker still refuse a job, the run stops there and prints no later id: with
//!   confirms pipelined, a later confirm no longer proves its own job was queued.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use indicatif::ProgressBar;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use uuid::Uuid;

use super::{ConfirmError, Link, progress};
use crate::broker::confirms::{ConfirmWindow, Settled};
use crate::broker::{AmqpError, Topology, topology};
use crate::config::AmqpSettings;
use crate::contract::job::{self, InvalidJob, Kind, Problem};

/// Publish jobs to the exchange, validated by the worker's own decoder first.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  blinger-worker publish --kind send-text --conversation-id e1d247c8-5cd8-4f93-b9d7-15fd3259ac22 --text 'Hello'
  blinger-worker publish --kind assign-agent --conversation-id C --agent-id c671d030 --id 554f11c1-ec1e-4fdb-9953-bfad33013f58
  blinger-worker publish --stdin < jobs.jsonl        # one JSON job per line; prints each id once confirmed
  cat jobs.jsonl | blinger-worker publish - --strict  # stop at the first invalid line

Every job is checked with the worker's decoder before it is published; an invalid line is reported
on stderr as `line N: <reason>` and skipped, and the command then exits non-zero.")]
pub struct PublishArgs {
    #[command(flatten)]
    pub amqp: AmqpSettings,

    /// Kind of the job (also the routing key).
    #[arg(long, value_enum, required_unless_present_any = ["stdin", "dash"])]
    pub kind: Option<Kind>,

    /// Conversation the job belongs to.
    #[arg(long, required_unless_present_any = ["stdin", "dash"])]
    pub conversation_id: Option<String>,

    /// Message text (send-text).
    #[arg(long)]
    pub text: Option<String>,

    /// Absolute http(s) URL of the file (send-file).
    #[arg(long)]
    pub file_url: Option<String>,

    /// Agent to assign (assign-agent).
    #[arg(long)]
    pub agent_id: Option<String>,

    /// Idempotency key of the job; a new random UUID when omitted. Re-publishing with the same
    /// id is safe: the worker sends it once.
    #[arg(long)]
    pub id: Option<String>,

    /// RFC 3339 time after which the job is dead-lettered as `expired` instead of sent late.
    #[arg(long)]
    pub expires_at: Option<String>,

    /// Read many jobs from standard input, one JSON object per line (JSON Lines).
    #[arg(long, conflicts_with_all = JOB_FLAGS)]
    pub stdin: bool,

    /// `-`: same as --stdin.
    #[arg(value_name = "-", value_parser = ["-"], conflicts_with_all = JOB_FLAGS)]
    pub dash: Option<String>,

    /// Stop at the first invalid line instead of skipping it (jobs before it stay published).
    #[arg(long)]
    pub strict: bool,

    /// Publishes awaiting their broker confirm at once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub window: u32,

    /// Largest body accepted, as configured on the worker.
    #[arg(long, env = "BLINGER_WORKER_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,
}

const JOB_FLAGS: [&str; 7] = [
    "kind",
    "conversation_id",
    "text",
    "file_url",
    "agent_id",
    "id",
    "expires_at",
];

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Url(#[from] crate::config::AmqpUrlError),
    #[error("{0}")]
    Usage(String),
    #[error("invalid job, not published: {0}")]
    Invalid(InvalidJob),
    #[error("job {id} was not published: {error}")]
    NotConfirmed { id: Uuid, error: ConfirmError },
    #[error("{}", incomplete(*invalid, *failed, *published))]
    Incomplete {
        invalid: usize,
        failed: usize,
        published: usize,
    },
    #[error("stopped at invalid line {line} (--strict); {published} job(s) published before it")]
    Strict { line: usize, published: usize },
    #[error("reading standard input: {0}")]
    Stdin(std::io::Error),
    #[error("writing to standard output: {0}")]
    Stdout(std::io::Error),
}

fn incomplete(invalid: usize, failed: usize, published: usize) -> String {
    let mut parts = Vec::new();
    if invalid > 0 {
        parts.push(format!("{invalid} invalid line(s) skipped"));
    }
    if failed > 0 {
        parts.push(format!(
            "{failed} job(s) not confirmed as queued by RabbitMQ"
        ));
    }
    format!("{}; {published} job(s) published", parts.join(", "))
}

/// What a run did; printed by nobody (the ids are the output), returned for callers and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub published: usize,
    pub invalid: usize,
    pub failed: usize,
}

/// Runs the command: jobs from flags or from stdin.
pub async fn run(args: &PublishArgs) -> Result<Summary, PublishError> {
    let from_stdin = args.stdin || args.dash.is_some();
    // Validate a flag job before touching the broker: a typo costs no connection.
    let single = if from_stdin {
        None
    } else {
        Some(job_from_flags(args)?)
    };

    let link = Link::open::<PublishError>(&args.amqp, "blinger-worker publish", true).await?;
    let result = async {
        topology::declare_upgrading(
            &link.connection,
            &link.channel,
            &args.amqp,
            &Topology::new(&args.amqp),
        )
        .await
        .map_err(AmqpError::Declare)?;
        let mut out = Publisher::new(&link.channel, &args.amqp.exchange, args.window as usize);
        match single {
            Some((id, kind, body)) => {
                out.publish(id, kind, body, None).await?;
                out.drain().await?;
                match out.summary.failed {
                    0 => Ok(out.summary),
                    _ => Err(out
                        .first_failure
                        .take()
                        .map(|(id, error)| PublishError::NotConfirmed { id, error })
                        .unwrap_or(PublishError::Incomplete {
                            invalid: 0,
                            failed: 1,
                            published: 0,
                        })),
                }
            }
            None => {
                let stdin = tokio::io::BufReader::with_capacity(64 * 1024, tokio::io::stdin());
                publish_lines(stdin, args, &mut out).await
            }
        }
    }
    .await;
    link.close().await;
    result
}

/// Builds and validates the one job described by the flags.
fn job_from_flags(args: &PublishArgs) -> Result<(Uuid, Kind, Vec<u8>), PublishError> {
    let kind = args
        .kind
        .ok_or_else(|| PublishError::Usage("--kind is required (or use --stdin)".into()))?;
    let misplaced = [
        ("--text", args.text.is_some(), Kind::SendText),
        ("--file-url", args.file_url.is_some(), Kind::SendFile),
        ("--agent-id", args.agent_id.is_some(), Kind::AssignAgent),
    ]
    .into_iter()
    .find(|(_, given, belongs)| *given && *belongs != kind);
    if let Some((flag, _, belongs)) = misplaced {
        return Err(PublishError::Usage(format!(
            "{flag} belongs to --kind {belongs}, not --kind {kind}"
        )));
    }

    let mut body = Map::new();
    body.insert("kind".into(), kind.as_str().into());
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    body.insert("id".into(), id.into());
    if let Some(conversation) = &args.conversation_id {
        body.insert("conversation_id".into(), conversation.clone().into());
    }
    for (field, value) in [
        ("text", &args.text),
        ("file_url", &args.file_url),
        ("agent_id", &args.agent_id),
        ("expires_at", &args.expires_at),
    ] {
        if let Some(value) = value {
            body.insert(field.into(), value.clone().into());
        }
    }
    let body = Value::Object(body).to_string().into_bytes();
    let job = job::decode(&body, args.max_body_bytes).map_err(PublishError::Invalid)?;
    Ok((job.id, job.kind(), body))
}

/// Reads JSON Lines, validates and publishes each; reports invalid lines on stderr.
async fn publish_lines<R: AsyncBufRead + Unpin>(
    mut input: R,
    args: &PublishArgs,
    out: &mut Publisher<'_>,
) -> Result<Summary, PublishError> {
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    let mut invalid = 0usize;
    // A line may carry a little whitespace around a body of the maximum size.
    let cap = args.max_body_bytes.saturating_add(64);
    while let Some(line) = read_line(&mut input, cap, &mut buf)
        .await
        .map_err(PublishError::Stdin)?
    {
        line_no += 1;
        let decoded = match line {
            Line::TooLong(size) => Err(InvalidJob {
                kind: None,
                problem: Problem::TooLarge {
                    size,
                    limit: args.max_body_bytes,
                },
            }),
            Line::Complete => {
                let body = buf.trim_ascii();
                if body.is_empty() {
                    continue;
                }
                job::decode(body, args.max_body_bytes).map(|job| (job, body.to_vec()))
            }
        };
        if out.first_failure.is_some() {
            // Nothing more is published once the broker refused a job (see settle_oldest).
            break;
        }
        match decoded {
            Ok((job, body)) => out.publish(job.id, job.kind(), body, Some(line_no)).await?,
            Err(e) => {
                invalid += 1;
                out.bar.suspend(|| eprintln!("line {line_no}: {e}"));
                if args.strict {
                    out.drain().await?;
                    return Err(PublishError::Strict {
                        line: line_no,
                        published: out.summary.published,
                    });
                }
            }
        }
    }
    out.drain().await?;
    out.summary.invalid = invalid;
    if invalid > 0 || out.summary.failed > 0 {
        return Err(PublishError::Incomplete {
            invalid,
            failed: out.summary.failed,
            published: out.summary.published,
        });
    }
    Ok(out.summary.clone())
}

enum Line {
    /// The line is in the buffer, without its line break.
    Complete,
    /// The line was longer than the cap and was skipped; its size in bytes.
    TooLong(usize),
}

/// Reads one line into `buf`, never holding more than `cap` bytes of it: an oversized line is
/// skipped as it streams by, so a stray huge line cannot exhaust memory.
async fn read_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
    cap: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Line>> {
    buf.clear();
    let mut size = 0usize;
    let mut any = false;
    loop {
        let available = input.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (any, size > cap) {
                (false, _) => None,
                (true, true) => Some(Line::TooLong(size)),
                (true, false) => Some(Line::Complete),
            });
        }
        any = true;
        let (chunk, used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (&available[..at], at + 1, true),
            None => (available, available.len(), false),
        };
        size += chunk.len();
        if size <= cap {
            buf.extend_from_slice(chunk);
        } else {
            buf.clear();
        }
        input.consume(used);
        if done {
            return Ok(Some(if size > cap {
                Line::TooLong(size)
            } else {
                Line::Complete
            }));
        }
    }
}

/// Publishes with up to `window` confirms outstanding and settles them in order, printing each
/// confirmed id.
struct Publisher<'a> {
    channel: &'a Channel,
    exchange: &'a str,
    /// Each publish's job id and input line.
    confirms: ConfirmWindow<(Uuid, Option<usize>)>,
    summary: Summary,
    first_failure: Option<(Uuid, ConfirmError)>,
    bar: ProgressBar,
}

impl<'a> Publisher<'a> {
    fn new(channel: &'a Channel, exchange: &'a str, window: usize) -> Self {
        Publisher {
            channel,
            exchange,
            confirms: ConfirmWindow::new(window),
            summary: Summary::default(),
            first_failure: None,
            bar: progress(None, "published"),
        }
    }

    async fn publish(
        &mut self,
        id: Uuid,
        kind: Kind,
        body: Vec<u8>,
        line: Option<usize>,
    ) -> Result<(), PublishError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(now)
            .with_message_id(id.to_string().into());
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.into(),
                kind.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .map_err(AmqpError::Channel)?;
        self.confirms.push((id, line), confirm);
        while self.confirms.is_full() {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    async fn drain(&mut self) -> Result<(), PublishError> {
        while !self.confirms.is_empty() {
            self.settle_oldest().await?;
        }
        self.bar.finish_and_clear();
        Ok(())
    }

    async fn settle_oldest(&mut self) -> Result<(), PublishError> {
        let place = |(id, line): (Uuid, Option<usize>)| {
            line.map(|n| format!("line {n} ({id})"))
                .unwrap_or_else(|| id.to_string())
        };
        match self
            .confirms
            .settle_oldest()
            .await
            .map_err(AmqpError::Channel)?
        {
            None => {}
            Some(Settled::Confirmed((id, _))) => {
                self.summary.published += 1;
                self.bar.inc(1);
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "{id}").map_err(PublishError::Stdout)?;
            }
            Some(Settled::Refused(job, error)) => {
                self.summary.failed += 1;
                self.bar
                    .suspend(|| eprintln!("{}: not published: {error}", place(job)));
                self.first_failure = Some((job.0, error));
            }
            Some(Settled::AfterRefusal(job, _)) => {
                self.summary.failed += 1;
                self.bar.suspend(|| {
                    eprintln!(
                        "{}: not known to be queued after an earlier failure; publishing it again is safe",
                        place(job)
                    )
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PublishArgs,
    }

    fn args(extra: &[&str]) -> Result<PublishArgs, clap::Error> {
        let mut argv = vec!["publish"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn builds_and_validates_a_flag_job() {
        let a = args(&[
            "--kind",
            "send-text",
            "--conversation-id",
            "c1",
            "--text",
            "hi",
            "--id",
            "554f11c1-ec1e-4fdb-9953-bfad33013f58",
        ])
        .unwrap();
        let (id, kind, body) = job_from_flags(&a).unwrap();
        assert_eq!(id.to_string(), "554f11c1-ec1e-4fdb-9953-bfad33013f58");
        assert_eq!(kind, Kind::SendText);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["text"], "hi");
        assert_eq!(v["conversation_id"], "c1");
    }

    #[test]
    fn refuses_invalid_or_misplaced_flags() {
        let a = args(&["--kind", "send-text", "--conversation-id", "c1"]).unwrap();
        assert!(
            matches!(job_from_flags(&a), Err(PublishError::Invalid(e)) if e.to_string() == "missing field `text`")
        );
        let a = args(&[
            "--kind",
            "request-review",
            "--conversation-id",
            "c1",
            "--text",
            "x",
        ])
        .unwrap();
        assert!(matches!(job_from_flags(&a), Err(PublishError::Usage(m)) if m.contains("--text")));
        let a = args(&[
            "--kind",
            "request-review",
            "--conversation-id",
            "c1",
            "--id",
            "nope",
        ])
        .unwrap();
        assert!(matches!(job_from_flags(&a), Err(PublishError::Invalid(_))));
        assert!(args(&["--kind", "send-sms", "--conversation-id", "c"]).is_err());
        assert!(args(&["--stdin", "--kind", "send-text"]).is_err());
        assert!(args(&["-"]).is_ok());
        assert!(args(&[]).is_err());
    }

    #[tokio::test]
    async fn reads_lines_and_skips_oversized_ones() {
        let input = b"{\"a\":1}\r\n\n0123456789abcdef\nlast".to_vec();
        let mut reader = tokio::io::BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        while let Some(line) = read_line(&mut reader, 10, &mut buf).await.unwrap() {
            seen.push(match line {
                Line::Complete => String::from_utf8(buf.clone()).unwrap(),
                Line::TooLong(n) => format!("too long: {n}"),
            });
        }
        assert_eq!(seen, ["{\"a\":1}\r", "", "too long: 16", "last"]);
    }
}
