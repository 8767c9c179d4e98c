//! `blinger-worker dlq`: look into the dead-letter queue and repair it without writing scripts.
//!
//! Reading never consumes: messages are received *without* ack on a dedicated channel and
//! handed back at the end (nacked with requeue, in order, see [`Scan`]; or by the channel or
//! connection closing, if the command fails or dies), so `list` and `show` leave the queue as
//! they found it, in the same order. With quorum
//! queues the broker counts each hand-back as a delivery (`x-delivery-count`); that is harmless
//! only as long as the dead-letter queue's delivery limit is out of reach: the topology declares
//! it with `x-delivery-limit` 2147483647, since RabbitMQ 4.0 would otherwise impose 20 (a
//! queue declared by an earlier version keeps its arguments: see docs/deploy.md for the policy).
//!
//! Order needs care with quorum queues: a handed-back message joins the *end* of the queue's
//! backlog of earlier hand-backs, so giving back only the head of a queue that was listed before
//! would move the head behind the rest. The commands therefore hold every message the queue had
//! at the start before handing anything back, so the whole backlog goes back, in order
//! (`list --limit` still reads to the end, it only shows less). Held is not in memory: the broker
//! holds them; the command reads them a few hundred at a time (see [`Scan`]). Classic queues put a handed-back
//! message back where it was, so there the commands stop as soon as they have what they need.
//!
//! `replay` guarantees, for each selected message:
//! - it is republished to the exchange (routing key = its kind) with the same body and
//!   properties, minus the worker's `x-blinger-*` bookkeeping and the broker's `x-death` trail,
//!   so the worker treats it as a fresh job (attempts reset);
//! - its dead-letter copy is acked only after the broker confirmed the republish: a crash in
//!   between leaves a duplicate (the job in both queues), never a loss, and the worker's store
//!   turns a duplicate of a delivered job into a no-op; before the channel closes, the acks are
//!   made to take effect (see `ack_barrier`), so a finished replay leaves no such copies;
//! - messages that are not selected stay in the dead-letter queue, in their order;
//! - it terminates: it looks at no more messages than the queue held when it started, so a
//!   message dead-lettered again during the replay is not picked up a second time;
//! - after a republish fails (refused, or routed nowhere) it stops, and acks nothing more: with
//!   confirms pipelined, a later confirm can no longer be trusted to speak for its own message.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer, ExchangeKind};
use serde::Serialize;
use serde_json::Value;

use super::{ConfirmError, Link, clip, escape_json, escape_text, human_age, progress, table};
use crate::broker::confirms::{ConfirmWindow, Settled};
use crate::broker::topology::{self, is_not_found};
use crate::broker::{self, AmqpError};
use crate::config::{AmqpSettings, QueueType, parse_duration};
use crate::contract::annotation::Annotation;

/// Inspect, replay or purge the dead-letter queue.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  blinger-worker dlq list
  blinger-worker dlq show 554f11c1-ec1e-4fdb-9953-bfad33013f58
  blinger-worker dlq replay --reason retries-exhausted --dry-run
  blinger-worker dlq purge --yes")]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered jobs (oldest first) without removing them.
    #[command(after_help = "\
Examples:
  blinger-worker dlq list
  blinger-worker dlq list --limit 1000 --json | jq -r '.[] | select(.reason == \"rejected\") | .id'

REASON is x-blinger-reason (invalid, rejected, retries-exhausted, expired), or the broker's own
reason (e.g. delivery_limit) when RabbitMQ dead-lettered the message itself.")]
    List(ListArgs),
    /// Show one dead-lettered job with all its headers and its body.
    #[command(after_help = "\
Example:
  blinger-worker dlq show 554f11c1-ec1e-4fdb-9953-bfad33013f58")]
    Show(ShowArgs),
    /// Republish selected dead-lettered jobs to the exchange, attempts reset.
    #[command(after_help = "\
Examples:
  blinger-worker dlq replay --reason retries-exhausted --dry-run
  blinger-worker dlq replay --reason retries-exhausted
  blinger-worker dlq replay --kind send-file --older-than 2h --limit 500
  blinger-worker dlq replay --id 554f11c1-ec1e-4fdb-9953-bfad33013f58 --id 0c7d4b0e-3c55-4c1e-9a43-8f0f5d1a2b3c
  blinger-worker dlq replay --all

Filters of different kinds must all match; a repeated filter matches any of its values. A
replayed message leaves the dead-letter queue only after RabbitMQ confirmed its republish;
the others stay where they are, in order.")]
    Replay(ReplayArgs),
    /// Delete every message in the dead-letter queue.
    #[command(after_help = "\
Examples:
  blinger-worker dlq purge          # asks for confirmation on the terminal
  blinger-worker dlq purge --yes    # scripts: no question asked")]
    Purge(PurgeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub amqp: AmqpSettings,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show at most this many messages, from the head of the queue.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub amqp: AmqpSettings,
    /// Job id (the `id` field of the body, or the AMQP message-id).
    pub id: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub amqp: AmqpSettings,
    /// Only messages dead-lettered for this reason (repeatable).
    #[arg(long)]
    pub reason: Vec<String>,
    /// Only jobs of this kind (repeatable).
    #[arg(long)]
    pub kind: Vec<String>,
    /// Only the job with this id (repeatable).
    #[arg(long)]
    pub id: Vec<String>,
    /// Only messages at least this old (e.g. 30m, 2h, 7d), from their publish time.
    #[arg(long, value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Every message (required when no filter is given).
    #[arg(long, conflicts_with_all = ["reason", "kind", "id", "older_than"])]
    pub all: bool,
    /// Replay at most this many messages.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the replayed messages as a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Republishes awaiting their broker confirm at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub window: u32,
}

#[derive(Debug, Clone, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub amqp: AmqpSettings,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Url(#[from] crate::config::AmqpUrlError),
    #[error(
        "queue {queue} does not exist (BLINGER_WORKER_DEAD_LETTER_QUEUE); has the worker or `publish` run against this broker?"
    )]
    NoQueue { queue: String },
    #[error(
        "exchange {exchange} does not exist (BLINGER_WORKER_EXCHANGE); start the worker once to declare the topology"
    )]
    NoExchange { exchange: String },
    #[error(
        "choose what to replay: --reason, --kind, --id, --older-than, or --all for every message"
    )]
    NoSelection,
    #[error(
        "refusing to purge {count} message(s) from {queue} without --yes: standard input is not a terminal to ask on"
    )]
    NeedsYes { queue: String, count: u32 },
    #[error("purge cancelled: nothing was removed")]
    Cancelled,
    #[error("no dead-lettered message with id {id} in {queue}")]
    NotFound { id: String, queue: String },
    #[error(
        "{failed} message(s) could not be replayed and stay in {queue} ({error}); {replayed} replayed"
    )]
    ReplayIncomplete {
        failed: usize,
        replayed: usize,
        queue: String,
        error: ConfirmError,
    },
    #[error("writing output: {0}")]
    Output(std::io::Error),
    #[error("reading the answer from the terminal: {0}")]
    Prompt(std::io::Error),
}

/// One dead-lettered message, as on-call needs to see it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetter {
    /// The job id from the body, else the AMQP message-id.
    pub id: Option<String>,
    /// The `kind` field of the body.
    pub kind: Option<String>,
    pub conversation_id: Option<String>,
    /// `x-blinger-reason`, else the broker's dead-letter reason (e.g. `delivery_limit`).
    pub reason: Option<String>,
    /// `x-blinger-attempts`: HTTP calls made for the job.
    pub attempts: Option<u64>,
    /// `x-blinger-status`: the last HTTP status from Blinger.
    pub status: Option<u64>,
    /// `x-blinger-error`: what went wrong.
    pub error: Option<String>,
    /// When the job was published (AMQP timestamp), else first seen by the worker.
    pub published_at: Option<String>,
    pub age_seconds: Option<u64>,
    /// The routing key a replay uses.
    pub replay_routing_key: String,
    /// Body size in bytes.
    pub size: usize,
}

impl DeadLetter {
    pub fn from_delivery(delivery: &Delivery, now: SystemTime) -> DeadLetter {
        let props = &delivery.properties;
        let body: Option<Value> = serde_json::from_slice(&delivery.data).ok();
        let field = |name: &str| {
            body.as_ref()
                .and_then(|b| b.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let id = field("id").or_else(|| props.message_id().as_ref().map(|m| m.to_string()));
        let kind = field("kind");
        let note = Annotation::read(props);
        let reason = note
            .reason
            .or_else(|| broker::header_string(props, "x-last-death-reason"))
            .or_else(|| broker_reason(props));
        let published_ms = broker::timestamp_ms(props).or(note.first_seen_ms);
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let published_at = published_ms.and_then(crate::contract::rfc3339_ms);
        DeadLetter {
            replay_routing_key: replay_routing_key(kind.as_deref(), delivery),
            id,
            kind,
            conversation_id: field("conversation_id"),
            reason,
            attempts: note.attempts,
            status: note.status.map(u64::from),
            error: note.error,
            published_at,
            age_seconds: published_ms.map(|ms| now_ms.saturating_sub(ms) / 1000),
            size: delivery.data.len(),
        }
    }

    fn row(&self) -> Vec<String> {
        let dash = || "-".to_owned();
        vec![
            self.id.as_deref().map(|s| clip(s, 36)).unwrap_or_else(dash),
            self.kind
                .as_deref()
                .map(|s| clip(s, 20))
                .unwrap_or_else(dash),
            self.reason
                .as_deref()
                .map(|s| clip(s, 30))
                .unwrap_or_else(dash),
            self.attempts.map(|a| a.to_string()).unwrap_or_else(dash),
            self.status.map(|s| s.to_string()).unwrap_or_else(dash),
            self.age_seconds
                .map(|s| human_age(Duration::from_secs(s)))
                .unwrap_or_else(dash),
            self.error
                .as_deref()
                .map(|e| clip(e, 60))
                .unwrap_or_else(dash),
        ]
    }
}

const COLUMNS: [&str; 7] = ["ID", "KIND", "REASON", "ATTEMPTS", "STATUS", "AGE", "ERROR"];

/// The reason in the broker's most recent `x-death` entry (they are kept newest first).
fn broker_reason(props: &BasicProperties) -> Option<String> {
    x_death(props)
        .first()
        .and_then(|entry| table_string(entry, "reason"))
}

fn x_death(props: &BasicProperties) -> Vec<&FieldTable> {
    let Some(AMQPValue::FieldArray(entries)) = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death"))
    else {
        return Vec::new();
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|e| match e {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        })
        .collect()
}

fn table_string(table: &FieldTable, key: &str) -> Option<String> {
    match table.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The routing key of a replay: the job's kind from the body; for a body without a usable kind
/// (an invalid job), the routing key it was first published with, as the broker recorded it in
/// `x-death` or as delivered, when that was a publish to a named exchange (the worker moves
/// messages through the default exchange, whose routing keys are queue names, not kinds).
fn replay_routing_key(kind: Option<&str>, delivery: &Delivery) -> String {
    if let Some(kind) = kind.filter(|k| !k.is_empty() && k.len() <= 255) {
        return kind.to_owned();
    }
    let from_death = x_death(&delivery.properties)
        .into_iter()
        .rev()
        .filter(|entry| table_string(entry, "exchange").is_some_and(|x| !x.is_empty()))
        .find_map(|entry| match entry.inner().get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().iter().find_map(|k| match k {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            }),
            _ => None,
        });
    from_death
        .or_else(|| {
            (!delivery.exchange.as_str().is_empty())
                .then(|| delivery.routing_key.as_str().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The dead letter's properties as a fresh publish: the allowlist of every republish
/// ([`broker::outgoing`]), which drops the worker's and the broker's bookkeeping (`x-blinger-*`,
/// `x-death`, ...) so the job starts over, and never carries `CC`/`BCC`, `expiration` or
/// `user_id`.
pub fn replay_properties(props: &BasicProperties) -> BasicProperties {
    broker::outgoing::outgoing(props, [], broker::outgoing::DEFAULT_HEADER_BUDGET)
}

/// What a replay selects.
struct Selection<'a> {
    args: &'a ReplayArgs,
}

impl Selection<'_> {
    fn matches(&self, dead: &DeadLetter) -> bool {
        let a = self.args;
        if a.all {
            return true;
        }
        let any = |wanted: &[String], got: Option<&str>| {
            wanted.is_empty() || got.is_some_and(|g| wanted.iter().any(|w| w == g))
        };
        let id_matches = a.id.is_empty()
            || dead
                .id
                .as_deref()
                .is_some_and(|got| a.id.iter().any(|w| w.eq_ignore_ascii_case(got)));
        any(&a.reason, dead.reason.as_deref())
            && any(&a.kind, dead.kind.as_deref())
            && id_matches
            && a.older_than.is_none_or(|min| {
                dead.age_seconds
                    .is_some_and(|age| Duration::from_secs(age) >= min)
            })
    }
}

/// How long a scan waits for the next message before it concludes that someone else took the
/// rest (the count at the start was only a snapshot).
const IDLE: Duration = Duration::from_secs(3);

/// Messages a scan lets the broker send ahead of the one being looked at: what bounds its memory
/// (at most this many deliveries are buffered, whatever the queue holds).
/// `BLINGER_WORKER_DLQ_READ_AHEAD` overrides it (tests use tiny windows to cross many of them).
const READ_AHEAD: u32 = 256;

fn read_ahead() -> u32 {
    std::env::var("BLINGER_WORKER_DLQ_READ_AHEAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| (1..=u32::from(u16::MAX)).contains(&n))
        .unwrap_or(READ_AHEAD)
}

/// Walks the queue with consumers that never ack on their own, never further than the messages
/// the queue held at the start. Consumers rather than `basic.get`: on a quorum queue every get is
/// a replicated command, which caps a scan at a few hundred messages a second; a consumer's
/// deliveries stream.
///
/// Memory stays bounded however long the queue is. A consumer may have at most
/// [`READ_AHEAD`] unacked messages, and the scan holds every message it looked at unacked (see
/// the module docs); so it reads the queue in *segments*: one consumer takes [`READ_AHEAD`]
/// messages, is cancelled (its messages stay held: cancelling hands nothing back), and the next
/// consumer takes the next ones. Only one segment's deliveries are ever buffered; what the scan
/// keeps of each message is up to its caller.
///
/// Hand-back: closing the channel returns every held message, but RabbitMQ returns the messages of
/// several consumers in no defined order. [`Scan::hand_back`] therefore returns them segment by
/// segment, in order, with one `basic.nack(multiple, requeue)` per segment; classic queues put
/// each message back at its place anyway.
struct Scan {
    channel: Channel,
    queue: String,
    window: u32,
    consumer: Option<Consumer>,
    /// Deliveries taken from the current consumer.
    in_segment: u32,
    /// The first and last delivery tag of each segment, in order (a channel numbers its
    /// deliveries one after the other, so a segment's tags are that whole range).
    segments: Vec<(u64, u64)>,
    left: u32,
    /// Whether every message must be held before any is handed back (quorum queues; see the
    /// module docs): then [`Scan::may_stop`] is false until the end.
    hold_all: bool,
}

impl Scan {
    /// Starts a scan of the `total` messages ready on `channel` (it holds each message it
    /// returns, unacked, until [`Scan::hand_back`] or the channel's end).
    async fn start(
        channel: &Channel,
        settings: &AmqpSettings,
        total: u32,
    ) -> Result<Scan, DlqError> {
        Ok(Scan {
            channel: channel.clone(),
            queue: settings.dead_letter_queue.clone(),
            window: read_ahead(),
            consumer: None,
            in_segment: 0,
            segments: Vec::new(),
            left: total,
            hold_all: settings.queue_type == QueueType::Quorum,
        })
    }

    /// Whether stopping now keeps the queue's order.
    fn may_stop(&self) -> bool {
        !self.hold_all || self.left == 0
    }

    /// Cancels the current consumer; the messages it delivered stay held.
    async fn end_segment(&mut self) -> Result<(), DlqError> {
        if let Some(consumer) = self.consumer.take() {
            self.channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
                .map_err(AmqpError::Channel)?;
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<Option<Delivery>, DlqError> {
        if self.left == 0 {
            self.end_segment().await?;
            return Ok(None);
        }
        if self.consumer.is_none() || self.in_segment >= self.window {
            self.end_segment().await?;
            // Applies to the consumers started after it: this one may hold at most this many.
            let prefetch = self.window.min(self.left);
            self.channel
                .basic_qos(
                    u16::try_from(prefetch).unwrap_or(u16::MAX),
                    BasicQosOptions::default(),
                )
                .await
                .map_err(AmqpError::Channel)?;
            let consumer = self
                .channel
                .basic_consume(
                    self.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(AmqpError::Channel)?;
            self.consumer = Some(consumer);
            self.in_segment = 0;
        }
        let Some(consumer) = self.consumer.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                self.left -= 1;
                let tag = delivery.delivery_tag;
                match self.segments.last_mut() {
                    Some((_, last)) if self.in_segment > 0 => *last = tag,
                    _ => self.segments.push((tag, tag)),
                }
                self.in_segment += 1;
                Ok(Some(delivery))
            }
            Ok(Some(Err(e))) => Err(AmqpError::Channel(e).into()),
            // Cancelled by the broker (queue deleted), or nothing more is coming.
            Ok(None) | Err(_) => {
                self.left = 0;
                self.end_segment().await?;
                Ok(None)
            }
        }
    }

    /// Hands every held message back to the queue, in the queue's order (see the type's docs),
    /// except those acked since (`acked`: their delivery tags). On a quorum queue the broker
    /// applies the returns a little later: this waits (up to 2 s) until they are ready again, so
    /// a command run right after this one sees the whole queue.
    async fn hand_back(&mut self, acked: &BTreeSet<u64>) -> Result<(), DlqError> {
        self.end_segment().await?;
        let mut returned = 0u32;
        for (first, last) in std::mem::take(&mut self.segments) {
            // `multiple` covers every outstanding tag up to this one; it must itself be
            // outstanding (RabbitMQ refuses an acked tag).
            let Some(tag) = (first..=last).rev().find(|tag| !acked.contains(tag)) else {
                continue;
            };
            returned += u32::try_from((first..=last).filter(|t| !acked.contains(t)).count())
                .unwrap_or(u32::MAX);
            self.channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(AmqpError::Channel)?;
        }
        if returned > 0 && self.hold_all {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while ready_count(&self.channel, &self.queue).await? < returned
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    /// The last delivery tag taken, if any.
    fn last_tag(&self) -> Option<u64> {
        self.segments.last().map(|&(_, last)| last)
    }
}

/// Messages ready in the dead-letter queue; a clear error when it does not exist.
async fn ready_count(channel: &Channel, queue: &str) -> Result<u32, DlqError> {
    topology::ready_count(channel, queue)
        .await
        .map_err(AmqpError::Channel)?
        .ok_or_else(|| DlqError::NoQueue {
            queue: queue.to_owned(),
        })
}

fn write_out(text: &str) -> Result<(), DlqError> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(DlqError::Output)
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing our own plain structs cannot fail; fall back to null rather than panic.
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into());
    // Message content ends up in these strings: no terminal control gets through, even escaped
    // only the JSON way a terminal ignores.
    let mut text = escape_json(&text).into_owned();
    text.push('\n');
    text
}

pub async fn run(args: &DlqArgs) -> Result<(), DlqError> {
    match &args.command {
        DlqCommand::List(a) => list(a).await,
        DlqCommand::Show(a) => show(a).await,
        DlqCommand::Replay(a) => replay(a).await.map(|_| ()),
        DlqCommand::Purge(a) => purge(a).await,
    }
}

/// Runs `body` with a fresh link and always closes it, which hands every fetched but unacked
/// message back to the queue.
async fn with_link<T>(
    amqp: &AmqpSettings,
    name: &str,
    body: impl AsyncFnOnce(&Link) -> Result<T, DlqError>,
) -> Result<T, DlqError> {
    let link = Link::open::<DlqError>(amqp, name, false).await?;
    let result = body(&link).await;
    link.close().await;
    result
}

pub async fn list(args: &ListArgs) -> Result<(), DlqError> {
    let queue = args.amqp.dead_letter_queue.as_str();
    let (dead, total) = with_link(&args.amqp, "blinger-worker dlq list", async |link| {
        let total = ready_count(&link.channel, queue).await?;
        let mut scan = Scan::start(&link.channel, &args.amqp, total).await?;
        let bar = progress(Some(u64::from(total)), "reading");
        let now = SystemTime::now();
        let limit = args.limit as usize;
        let mut dead = Vec::new();
        while dead.len() < limit || !scan.may_stop() {
            let Some(delivery) = scan.next().await? else {
                break;
            };
            bar.inc(1);
            if dead.len() < limit {
                dead.push(DeadLetter::from_delivery(&delivery, now));
            }
        }
        scan.hand_back(&BTreeSet::new()).await?;
        bar.finish_and_clear();
        Ok((dead, total))
    })
    .await?;
    if args.json {
        write_out(&to_json(&dead))?;
    } else if !dead.is_empty() {
        let rows: Vec<Vec<String>> = dead.iter().map(DeadLetter::row).collect();
        write_out(&table(&COLUMNS, &rows))?;
    }
    let shown = dead.len();
    if (shown as u64) < u64::from(total) {
        eprintln!("{shown} of {total} dead-lettered message(s) in {queue} shown (--limit)");
    } else {
        eprintln!("{total} dead-lettered message(s) in {queue}");
    }
    Ok(())
}

/// Everything about one message, for `show`.
#[derive(Debug, Serialize)]
struct Detail {
    #[serde(flatten)]
    summary: DeadLetter,
    exchange: String,
    routing_key: String,
    properties: BTreeMap<String, Value>,
    headers: BTreeMap<String, Value>,
    /// The body as JSON when it is JSON, else as (lossy) text.
    body: Value,
}

impl Detail {
    fn from_delivery(delivery: &Delivery, now: SystemTime) -> Detail {
        let props = &delivery.properties;
        let mut properties = BTreeMap::new();
        let mut put = |name: &str, value: Option<Value>| {
            if let Some(value) = value {
                properties.insert(name.to_owned(), value);
            }
        };
        let s = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().into());
        put("content_type", s(props.content_type()));
        put("content_encoding", s(props.content_encoding()));
        put("delivery_mode", props.delivery_mode().map(Value::from));
        put("priority", props.priority().map(Value::from));
        put("correlation_id", s(props.correlation_id()));
        put("reply_to", s(props.reply_to()));
        put("expiration", s(props.expiration()));
        put("message_id", s(props.message_id()));
        put("timestamp", props.timestamp().map(Value::from));
        put("type", s(props.kind()));
        put("user_id", s(props.user_id()));
        put("app_id", s(props.app_id()));
        let headers = props
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), amqp_json(v)))
                    .collect()
            })
            .unwrap_or_default();
        let body = serde_json::from_slice(&delivery.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&delivery.data).into()));
        Detail {
            summary: DeadLetter::from_delivery(delivery, now),
            exchange: delivery.exchange.as_str().to_owned(),
            routing_key: delivery.routing_key.as_str().to_owned(),
            properties,
            headers,
            body,
        }
    }

    /// The text form. Every value from the message is escaped ([`escape_text`]); a line break
    /// inside a property or header value continues on an indented line, so no value can pass
    /// for a line of its own.
    fn text(&self) -> String {
        let d = &self.summary;
        let opt = |v: &Option<String>| v.as_deref().map(field).unwrap_or_else(|| "-".into());
        let num = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        let mut out = String::new();
        let mut line = |label: &str, value: String| {
            out.push_str(&format!("{label:<16}{value}\n"));
        };
        line("id:", opt(&d.id));
        line("kind:", opt(&d.kind));
        line("conversation:", opt(&d.conversation_id));
        line("reason:", opt(&d.reason));
        line("attempts:", num(d.attempts));
        line("last status:", num(d.status));
        line("error:", opt(&d.error));
        let age = d
            .age_seconds
            .map(|s| format!(" ({} ago)", human_age(Duration::from_secs(s))))
            .unwrap_or_default();
        line("published:", format!("{}{age}", opt(&d.published_at)));
        line("replays to:", field(&d.replay_routing_key));
        line("size:", format!("{} bytes", d.size));
        out.push_str("properties:\n");
        for (k, v) in &self.properties {
            out.push_str(&format!("  {}: {}\n", field(k), field(&compact(v))));
        }
        out.push_str("headers:\n");
        for (k, v) in &self.headers {
            out.push_str(&format!("  {}: {}\n", field(k), field(&compact(v))));
        }
        out.push_str("body:\n");
        match &self.body {
            Value::String(raw) if serde_json::from_slice::<Value>(raw.as_bytes()).is_err() => {
                out.push_str(&escape_text(raw, true));
            }
            json => out.push_str(&escape_json(
                &serde_json::to_string_pretty(json).unwrap_or_default(),
            )),
        }
        out.push('\n');
        out
    }
}

/// One value of `show`'s text: escaped, a line break continuing on an indented line.
fn field(s: &str) -> String {
    escape_text(s, true)
        .replace('\t', "\\u{9}")
        .replace('\n', "\n      ")
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A header value as JSON, for display. Byte arrays become hex.
fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => {
            Value::from(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), amqp_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => Value::from(
            b.as_slice()
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

pub async fn show(args: &ShowArgs) -> Result<(), DlqError> {
    let queue = args.amqp.dead_letter_queue.as_str();
    let found = with_link(&args.amqp, "blinger-worker dlq show", async |link| {
        let total = ready_count(&link.channel, queue).await?;
        let bar = progress(Some(u64::from(total)), "scanning");
        let mut scan = Scan::start(&link.channel, &args.amqp, total).await?;
        let now = SystemTime::now();
        let mut found = Vec::new();
        while let Some(delivery) = scan.next().await? {
            bar.inc(1);
            // The cheap summary first; the full detail only of a match.
            if DeadLetter::from_delivery(&delivery, now)
                .id
                .as_deref()
                .is_some_and(|id| id.eq_ignore_ascii_case(&args.id))
            {
                found.push(Detail::from_delivery(&delivery, now));
            }
        }
        scan.hand_back(&BTreeSet::new()).await?;
        bar.finish_and_clear();
        Ok(found)
    })
    .await?;
    if found.is_empty() {
        return Err(DlqError::NotFound {
            id: args.id.clone(),
            queue: queue.to_owned(),
        });
    }
    if args.json {
        // One message is the common case: print it as one object, several as an array.
        match found.as_slice() {
            [one] => write_out(&to_json(one))?,
            many => write_out(&to_json(&many))?,
        }
    } else {
        let texts: Vec<String> = found.iter().map(Detail::text).collect();
        write_out(&texts.join("\n"))?;
        if found.len() > 1 {
            eprintln!("{} messages in {queue} carry id {}", found.len(), args.id);
        }
    }
    Ok(())
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Messages looked at.
    pub scanned: usize,
    /// Replayed (or, with --dry-run, that would be).
    pub replayed: Vec<DeadLetter>,
    /// Selected but not replayed: the broker refused the republish; still in the queue.
    pub failed: usize,
}

pub async fn replay(args: &ReplayArgs) -> Result<ReplaySummary, DlqError> {
    let selection = Selection { args };
    if !args.all
        && args.reason.is_empty()
        && args.kind.is_empty()
        && args.id.is_empty()
        && args.older_than.is_none()
    {
        return Err(DlqError::NoSelection);
    }
    let queue = args.amqp.dead_letter_queue.as_str();
    let exchange = args.amqp.exchange.as_str();
    let mut first_error = None;
    let summary = with_link(&args.amqp, "blinger-worker dlq replay", async |link| {
        // Republishes go on their own confirm-mode channel; fetching and acking stay on the
        // link's channel, whose closing hands back whatever was not replayed.
        let publish = link
            .connection
            .create_channel()
            .await
            .map_err(AmqpError::Channel)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(AmqpError::Channel)?;
        check_exchange(&publish, exchange).await?;
        let total = ready_count(&link.channel, queue).await?;
        let bar = progress(
            Some(u64::from(total)),
            if args.dry_run {
                "scanning"
            } else {
                "replaying"
            },
        );
        let mut scan = Scan::start(&link.channel, &args.amqp, total).await?;
        let now = SystemTime::now();
        let limit = args.limit.map_or(usize::MAX, |l| l as usize);
        let mut summary = ReplaySummary::default();
        let mut selected = 0usize;
        // Each republish's delivery tag and the copy it replays.
        let mut in_flight = ConfirmWindow::new(args.window as usize);
        let mut acked = BTreeSet::new();
        // Past the limit, or after a failed republish, read on only as far as keeping the order
        // requires.
        let selecting = |selected: usize, first_error: &Option<ConfirmError>| {
            selected < limit && first_error.is_none()
        };
        while selecting(selected, &first_error) || !scan.may_stop() {
            let Some(delivery) = scan.next().await? else {
                break;
            };
            summary.scanned += 1;
            bar.inc(1);
            if !selecting(selected, &first_error) {
                continue;
            }
            let dead = DeadLetter::from_delivery(&delivery, now);
            if !selection.matches(&dead) {
                // Left unacked: handed back, in order, when the channel closes.
                continue;
            }
            selected += 1;
            if args.dry_run {
                summary.replayed.push(dead);
                continue;
            }
            let confirm = publish
                .basic_publish(
                    exchange.into(),
                    dead.replay_routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &delivery.data,
                    replay_properties(&delivery.properties),
                )
                .await
                .map_err(AmqpError::Channel)?;
            in_flight.push((delivery.delivery_tag, dead), confirm);
            while in_flight.is_full() {
                settle(&link.channel, &mut in_flight, &mut summary, &mut acked).await?;
            }
            first_error = in_flight.first_refusal();
        }
        while !in_flight.is_empty() {
            settle(&link.channel, &mut in_flight, &mut summary, &mut acked).await?;
        }
        first_error = in_flight.first_refusal();
        if summary.replayed.len() + summary.failed > 0 {
            ack_barrier(&link.channel, queue, scan.hold_all).await?;
        }
        scan.hand_back(&acked).await?;
        let _ = publish.close(200, "done".into()).await;
        bar.finish_and_clear();
        Ok(summary)
    })
    .await?;

    if args.json {
        write_out(&to_json(&summary.replayed))?;
    } else if !summary.replayed.is_empty() {
        let rows: Vec<Vec<String>> = summary.replayed.iter().map(DeadLetter::row).collect();
        write_out(&table(&COLUMNS, &rows))?;
    }
    let verb = if args.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    eprintln!(
        "{verb} {} of {} message(s) looked at in {queue}{}",
        summary.replayed.len(),
        summary.scanned,
        if args.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    if let Some(error) = first_error {
        return Err(DlqError::ReplayIncomplete {
            failed: summary.failed,
            replayed: summary.replayed.len(),
            queue: queue.to_owned(),
            error,
        });
    }
    Ok(summary)
}

/// Waits for the oldest republish's confirm; acks its dead-letter copy only when it is known to
/// be queued.
async fn settle(
    channel: &Channel,
    in_flight: &mut ConfirmWindow<(u64, DeadLetter)>,
    summary: &mut ReplaySummary,
    acked: &mut BTreeSet<u64>,
) -> Result<(), DlqError> {
    let name = |dead: &DeadLetter| {
        dead.id
            .as_deref()
            .map_or("(no id)".into(), |id| clip(id, 64))
    };
    match in_flight
        .settle_oldest()
        .await
        .map_err(AmqpError::Channel)?
    {
        None => {}
        Some(Settled::Confirmed((tag, dead))) => {
            channel
                .basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(AmqpError::Channel)?;
            acked.insert(tag);
            summary.replayed.push(dead);
        }
        Some(Settled::Refused((_, dead), error)) => {
            // Not acked: the copy stays in the dead-letter queue.
            summary.failed += 1;
            eprintln!("{}: not replayed: {error}", name(&dead));
        }
        Some(Settled::AfterRefusal((_, dead), earlier)) => {
            // Keep the copy: a possible duplicate, never a loss.
            summary.failed += 1;
            eprintln!(
                "{}: not replayed: left in the queue after an earlier failure ({earlier})",
                name(&dead)
            );
        }
    }
    Ok(())
}

/// Waits until the broker has taken in every ack sent on `channel`, before it is closed.
///
/// Acks have no reply in AMQP. On a quorum queue the broker applies them asynchronously, and a
/// channel closed right behind its last acks was seen to get some of those messages handed back
/// anyway (duplicates of replayed jobs left in the dead-letter queue; never losses). A `basic.get`
/// is a synchronous queue command ordered after the acks of the same channel, so its answer
/// proves they are applied. It is only used when the queue has nothing ready (the usual case: the
/// scan holds every message), since a message it took would be handed back ahead of older ones;
/// otherwise a short pause gives the broker the time it normally needs. Classic queues apply acks
/// in order before a channel's end, so they need nothing.
async fn ack_barrier(channel: &Channel, queue: &str, quorum: bool) -> Result<(), DlqError> {
    if !quorum {
        return Ok(());
    }
    if ready_count(channel, queue).await? == 0 {
        // Should a message have arrived since, it stays unacked and goes back with the others.
        let _held = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(AmqpError::Channel)?;
    } else {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

async fn check_exchange(channel: &Channel, exchange: &str) -> Result<(), DlqError> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            if is_not_found(&e) {
                DlqError::NoExchange {
                    exchange: exchange.to_owned(),
                }
            } else {
                AmqpError::Channel(e).into()
            }
        })
}

/// Deletes the messages the queue holds when the command starts, and only those.
///
/// It first takes every message then ready (held unacked, as `list` does: nothing is removed
/// yet), tells what they are, asks, and only then acks exactly those deliveries. A message that
/// arrives meanwhile is not among them and stays. On "no" they are handed back, in order. (A
/// `queue.purge` would delete whatever the queue holds at the moment of the answer.)
pub async fn purge(args: &PurgeArgs) -> Result<(), DlqError> {
    let queue = args.amqp.dead_letter_queue.as_str();
    let purged = with_link(&args.amqp, "blinger-worker dlq purge", async |link| {
        let count = ready_count(&link.channel, queue).await?;
        if count == 0 {
            return Ok(0);
        }
        if !args.yes && !std::io::stdin().is_terminal() {
            return Err(DlqError::NeedsYes {
                queue: queue.to_owned(),
                count,
            });
        }
        let bar = progress(Some(u64::from(count)), "reading");
        let mut scan = Scan::start(&link.channel, &args.amqp, count).await?;
        let now = SystemTime::now();
        let mut held = PurgeSummary::default();
        while let Some(delivery) = scan.next().await? {
            bar.inc(1);
            held.add(&DeadLetter::from_delivery(&delivery, now));
        }
        bar.finish_and_clear();
        let Some(last) = scan.last_tag() else {
            return Ok(0);
        };
        if !args.yes
            && let Err(e) = confirm_on_terminal(queue, &held).await
        {
            scan.hand_back(&BTreeSet::new()).await?;
            return Err(e);
        }
        // Exactly the deliveries held: every tag up to the last one taken.
        link.channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .map_err(AmqpError::Channel)?;
        ack_barrier(&link.channel, queue, scan.hold_all).await?;
        Ok(held.count)
    })
    .await?;
    eprintln!("purged {purged} message(s) from {queue}");
    Ok(())
}

/// What a purge is about to delete, as the question shows it.
#[derive(Debug, Default)]
struct PurgeSummary {
    count: u32,
    /// Messages per reason, the first [`PurgeSummary::REASONS`] reasons seen; the rest under
    /// `other` (reasons come from headers: their number is not bounded by anything else).
    reasons: BTreeMap<String, u32>,
    other: u32,
    oldest_seconds: Option<u64>,
}

impl PurgeSummary {
    const REASONS: usize = 8;

    fn add(&mut self, dead: &DeadLetter) {
        self.count += 1;
        let reason = dead
            .reason
            .as_deref()
            .map_or_else(|| "-".to_owned(), |r| clip(r, 30));
        if let Some(n) = self.reasons.get_mut(&reason) {
            *n += 1;
        } else if self.reasons.len() < Self::REASONS {
            self.reasons.insert(reason, 1);
        } else {
            self.other += 1;
        }
        self.oldest_seconds = self.oldest_seconds.max(dead.age_seconds);
    }

    /// E.g. `12 message(s): invalid 10, rejected 2; the oldest 3h old`.
    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        if self.other > 0 {
            parts.push(format!("other {}", self.other));
        }
        let oldest = self
            .oldest_seconds
            .map(|s| format!("; the oldest {} old", human_age(Duration::from_secs(s))))
            .unwrap_or_default();
        format!("{} message(s): {}{oldest}", self.count, parts.join(", "))
    }
}

/// Asks `[y/N]` on the terminal. Without a terminal there is nobody to ask: refuse.
async fn confirm_on_terminal(queue: &str, held: &PurgeSummary) -> Result<(), DlqError> {
    if !std::io::stdin().is_terminal() {
        return Err(DlqError::NeedsYes {
            queue: queue.to_owned(),
            count: held.count,
        });
    }
    let question = format!(
        "{queue} holds {}.\nDelete these {} dead-lettered message(s)? Messages arriving from now on are \
         not touched. This cannot be undone. [y/N] ",
        held.describe(),
        held.count
    );
    let answer = tokio::task::spawn_blocking(move || {
        eprint!("{question}");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        Ok::<_, std::io::Error>(answer)
    })
    .await
    .map_err(|e| DlqError::Prompt(std::io::Error::other(e)))?
    .map_err(DlqError::Prompt)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(DlqError::Cancelled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::headers;
    use lapin::types::{FieldArray, LongString};

    fn ls(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
    }

    fn delivery(body: &str, props: BasicProperties) -> Delivery {
        let mut d = Delivery::mock(
            1,
            "".into(),
            "blinger.outbound.dead".into(),
            false,
            body.as_bytes().to_vec(),
        );
        d.properties = props;
        d
    }

    fn death(reason: &str, exchange: &str, key: &str) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("reason".into(), ls(reason));
        t.insert("exchange".into(), ls(exchange));
        t.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![ls(key)])),
        );
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn reads_worker_headers_first_then_the_broker_trail() {
        let mut h = FieldTable::default();
        h.insert(headers::REASON.into(), ls("rejected"));
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(3));
        h.insert(headers::STATUS.into(), AMQPValue::LongInt(422));
        h.insert(headers::ERROR.into(), ls("unprocessable"));
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let d = delivery(
            r#"{"kind":"send-text","id":"554f11c1-ec1e-4fdb-9953-bfad33013f58","conversation_id":"c"}"#,
            BasicProperties::default()
                .with_headers(h)
                .with_timestamp(1_000_000 - 90),
        );
        let dead = DeadLetter::from_delivery(&d, now);
        assert_eq!(dead.reason.as_deref(), Some("rejected"));
        assert_eq!(dead.attempts, Some(3));
        assert_eq!(dead.status, Some(422));
        assert_eq!(dead.age_seconds, Some(90));
        assert_eq!(dead.kind.as_deref(), Some("send-text"));
        assert_eq!(dead.replay_routing_key, "send-text");

        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                death("delivery_limit", "blinger.outbound", "send-file"),
                death("expired", "", "blinger.outbound.retry.5s"),
            ])),
        );
        let d = delivery("not json", BasicProperties::default().with_headers(h));
        let dead = DeadLetter::from_delivery(&d, now);
        assert_eq!(dead.reason.as_deref(), Some("delivery_limit"));
        assert_eq!(dead.kind, None);
        assert_eq!(dead.age_seconds, None);
        assert_eq!(dead.replay_routing_key, "send-file");
    }

    /// Publishers that write the AMQP timestamp in milliseconds (many clients do) get the same
    /// reading as in the worker's latency: the job's age is shown and `--older-than` matches.
    #[test]
    fn a_timestamp_in_milliseconds_is_read_as_the_worker_reads_it() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let body = r#"{"kind":"send-text","id":"554f11c1-ec1e-4fdb-9953-bfad33013f58","conversation_id":"c"}"#;
        for published in [1_700_000_000 - 90, (1_700_000_000 - 90) * 1000] {
            let d = delivery(body, BasicProperties::default().with_timestamp(published));
            let dead = DeadLetter::from_delivery(&d, now);
            assert_eq!(dead.age_seconds, Some(90), "timestamp {published}");
            assert_eq!(
                dead.published_at.as_deref(),
                Some("2023-11-14T22:11:50Z"),
                "timestamp {published}"
            );
        }
    }

    #[test]
    fn replay_drops_only_bookkeeping_headers() {
        let mut h = FieldTable::default();
        for name in [
            headers::REASON,
            headers::ATTEMPTS,
            headers::RETRIES,
            headers::FIRST_SEEN,
            "x-death",
            "x-first-death-reason",
            "x-last-death-queue",
            "x-delivery-count",
        ] {
            h.insert(name.into(), ls("x"));
        }
        h.insert("traceparent".into(), ls("00-abc"));
        let props = BasicProperties::default()
            .with_headers(h)
            .with_content_type("application/json".into())
            .with_timestamp(7);
        let replayed = replay_properties(&props);
        let names: Vec<&str> = replayed
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(names, ["traceparent"]);
        assert_eq!(*replayed.timestamp(), Some(7));
        assert_eq!(*replayed.delivery_mode(), Some(2));
        assert_eq!(
            replayed.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
    }

    #[test]
    fn selection_combines_filters() {
        let dead = DeadLetter {
            id: Some("554f11c1-ec1e-4fdb-9953-bfad33013f58".into()),
            kind: Some("send-text".into()),
            conversation_id: None,
            reason: Some("rejected".into()),
            attempts: None,
            status: None,
            error: None,
            published_at: None,
            age_seconds: Some(3600),
            replay_routing_key: "send-text".into(),
            size: 1,
        };
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ReplayArgs,
        }
        let base = <Cli as clap::Parser>::parse_from(["replay"]).args;
        let sel = |f: &dyn Fn(&mut ReplayArgs)| {
            let mut a = base.clone();
            f(&mut a);
            Selection { args: &a }.matches(&dead)
        };
        assert!(sel(&|a| a.all = true));
        assert!(sel(
            &|a| a.reason = vec!["expired".into(), "rejected".into()]
        ));
        assert!(!sel(&|a| a.reason = vec!["expired".into()]));
        assert!(sel(&|a| {
            a.reason = vec!["rejected".into()];
            a.kind = vec!["send-text".into()];
        }));
        assert!(!sel(&|a| {
            a.reason = vec!["rejected".into()];
            a.kind = vec!["send-file".into()];
        }));
        assert!(sel(
            &|a| a.id = vec!["554F11C1-EC1E-4FDB-9953-BFAD33013F58".into()]
        ));
        assert!(sel(&|a| a.older_than = Some(Duration::from_secs(1800))));
        assert!(!sel(&|a| a.older_than = Some(Duration::from_secs(7200))));
    }
}
