//! The sandbox's memory of what it was asked: one [`RecordedRequest`] per API request, counters
//! kept up to date as requests are recorded (so [`Stats`] costs the same after 100 requests as
//! after 100 000), the per-second arrival counts used to check the client's rate limit, and the
//! optional JSONL file.
//!
//! The JSONL file is written by a dedicated thread fed through a channel: a request only pays
//! for serialising its line, never for a `write(2)` or an `fsync`. The thread flushes at most
//! 100 ms after a line arrives, and on shutdown.

use std::collections::{BTreeMap, VecDeque};
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Which API endpoint a request addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
    SendTextMessage,
    SendFileMessage,
    RequestReview,
    AssignAgent,
    /// Any other path or method (answered 404).
    Other,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] = [
        Endpoint::SendTextMessage,
        Endpoint::SendFileMessage,
        Endpoint::RequestReview,
        Endpoint::AssignAgent,
        Endpoint::Other,
    ];

    /// The path segment after the conversation id (`"other"` for [`Endpoint::Other`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::SendTextMessage => "send-text-message",
            Endpoint::SendFileMessage => "send-file-message",
            Endpoint::RequestReview => "request-review",
            Endpoint::AssignAgent => "assign-agent",
            Endpoint::Other => "other",
        }
    }

    /// The endpoint named by the last path segment, if it is one of the four.
    pub fn from_action(action: &str) -> Option<Endpoint> {
        Endpoint::ALL
            .into_iter()
            .find(|e| *e != Endpoint::Other && e.as_str() == action)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How the sandbox answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Accepted: a new message (or assignment / review request) was created.
    #[serde(rename = "ok")]
    Ok,
    /// Accepted, but the message uuid had been delivered before: the first message is returned.
    #[serde(rename = "duplicate")]
    Duplicate,
    /// Wrong or missing `Authorization`.
    #[serde(rename = "unauthorized")]
    Unauthorized,
    /// Malformed request: content type, JSON, or fields (400, 413 or 422).
    #[serde(rename = "bad-request")]
    BadRequest,
    /// A failure the sandbox was told to produce: `error_rate`, `down`, `status_override`,
    /// `body_status_override`.
    #[serde(rename = "injected-error")]
    InjectedError,
    /// A 429 the sandbox was told to produce (`rate_429`, or `status_override: 429`).
    #[serde(rename = "injected-429")]
    Injected429,
    /// A stall the sandbox was told to produce (`timeout_rate`).
    #[serde(rename = "injected-timeout")]
    InjectedTimeout,
    /// Not one of the four endpoints (or not `POST`).
    #[serde(rename = "not-found")]
    NotFound,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Ok,
        Outcome::Duplicate,
        Outcome::Unauthorized,
        Outcome::BadRequest,
        Outcome::InjectedError,
        Outcome::Injected429,
        Outcome::InjectedTimeout,
        Outcome::NotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Duplicate => "duplicate",
            Outcome::Unauthorized => "unauthorized",
            Outcome::BadRequest => "bad-request",
            Outcome::InjectedError => "injected-error",
            Outcome::Injected429 => "injected-429",
            Outcome::InjectedTimeout => "injected-timeout",
            Outcome::NotFound => "not-found",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One request as the sandbox received and answered it. The `Authorization` value itself is never
/// kept, only whether it matched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// When the request arrived (RFC 3339, UTC, milliseconds).
    pub ts: String,
    /// Order of recording, from 1, never reused (not even after a reset). Requests are recorded
    /// when answered, except injected timeouts, which are recorded when the stall begins.
    pub seq: u64,
    pub method: String,
    /// The path exactly as received, still percent-encoded.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    pub endpoint: Endpoint,
    /// The conversation id segment, percent-decoded (lossily, if not UTF-8); `None` when the path
    /// is not an API path.
    pub conversation_id: Option<String>,
    pub authorization_ok: bool,
    pub content_type: Option<String>,
    /// The body parsed as JSON, or `null` when empty or not JSON.
    pub body: serde_json::Value,
    /// Size of the body in bytes (tells an empty body from a non-JSON one).
    pub body_bytes: usize,
    /// `uuid` of the body, if it has a string one.
    pub uuid: Option<String>,
    /// `agentId` of the body, if it has a string one.
    pub agent_id: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    pub outcome: Outcome,
    /// The Blinger message id answered (send-text, send-file, request-review), if any.
    pub message_id: Option<String>,
    /// Time from arrival to recording.
    pub latency_ms: u64,
}

/// Counts of injected failures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InjectedStats {
    pub errors: u64,
    pub rate_limited: u64,
    pub timeouts: u64,
}

/// Totals since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// API requests recorded (control endpoints are not counted).
    pub total: u64,
    pub by_endpoint: BTreeMap<String, u64>,
    pub by_status: BTreeMap<u16, u64>,
    pub by_outcome: BTreeMap<String, u64>,
    /// Requests with outcome `ok`.
    pub delivered: u64,
    /// Accepted send-text/send-file requests whose uuid had been accepted before.
    pub duplicates: u64,
    /// Distinct message uuids accepted.
    pub unique_uuids: u64,
    pub unauthorized: u64,
    pub bad_requests: u64,
    pub not_found: u64,
    pub injected: InjectedStats,
    /// The largest number of requests that arrived within one 1-second bucket (buckets aligned to
    /// the first request's arrival).
    pub max_rate_per_sec: u64,
    /// Arrivals per 1-second bucket for the last (up to) 600 buckets, oldest first, up to the
    /// bucket of the moment the stats were taken.
    pub per_second: Vec<u64>,
    /// Index of the bucket of `per_second[0]`, in seconds since the first request.
    pub per_second_start: u64,
    pub first_request_at: Option<String>,
    pub last_request_at: Option<String>,
}

/// Formats a time as RFC 3339 in UTC with exactly three fractional digits.
pub(crate) fn rfc3339_ms(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Number of 1-second buckets kept for `Stats::per_second`.
const WINDOW: usize = 600;

/// Arrivals per second in a ring of [`WINDOW`] buckets: O(1) per request (amortised: a gap of
/// idle seconds is cleared once, at most [`WINDOW`] slots).
pub(crate) struct RateWindow {
    origin: Option<Instant>,
    ring: Box<[u64; WINDOW]>,
    last_bucket: u64,
    max: u64,
}

impl RateWindow {
    pub(crate) fn new() -> Self {
        Self {
            origin: None,
            ring: Box::new([0; WINDOW]),
            last_bucket: 0,
            max: 0,
        }
    }

    pub(crate) fn note(&mut self, at: Instant) {
        let origin = *self.origin.get_or_insert(at);
        let bucket = at.saturating_duration_since(origin).as_secs();
        if bucket > self.last_bucket {
            let gap = (bucket - self.last_bucket).min(WINDOW as u64);
            for i in 1..=gap {
                self.ring[((self.last_bucket + i) % WINDOW as u64) as usize] = 0;
            }
            self.last_bucket = bucket;
        } else if self.last_bucket - bucket >= WINDOW as u64 {
            // Older than the ring (cannot really happen: arrivals are noted as they happen).
            return;
        }
        let slot = &mut self.ring[(bucket % WINDOW as u64) as usize];
        *slot += 1;
        self.max = self.max.max(*slot);
    }

    /// `(per_second, start_bucket, max)` as of `now`.
    pub(crate) fn snapshot(&self, now: Instant) -> RateSnapshot {
        let Some(origin) = self.origin else {
            return RateSnapshot::default();
        };
        let current = now
            .saturating_duration_since(origin)
            .as_secs()
            .max(self.last_bucket);
        let start = current.saturating_sub(WINDOW as u64 - 1);
        let counts = (start..=current)
            .map(|b| {
                if b > self.last_bucket || self.last_bucket - b >= WINDOW as u64 {
                    0
                } else {
                    self.ring[(b % WINDOW as u64) as usize]
                }
            })
            .collect();
        RateSnapshot {
            per_second: counts,
            start,
            max: self.max,
        }
    }
}

/// A copy of the [`RateWindow`]'s state, taken so that stats never hold two locks at once.
#[derive(Default)]
pub(crate) struct RateSnapshot {
    per_second: Vec<u64>,
    start: u64,
    max: u64,
}

/// Messages to the JSONL writer thread.
pub(crate) enum WriterMsg {
    Line(String),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Starts the thread that appends JSONL lines to `path`; it ends (after a flush) when every sender
/// is dropped.
pub(crate) fn spawn_writer(path: &Path) -> std::io::Result<mpsc::Sender<WriterMsg>> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let (tx, rx) = mpsc::channel::<WriterMsg>();
    std::thread::Builder::new()
        .name("sandbox-record".into())
        .spawn(move || {
            let mut out = BufWriter::with_capacity(256 * 1024, file);
            let mut dirty_since: Option<Instant> = None;
            let flush_every = Duration::from_millis(100);
            loop {
                let msg = match dirty_since {
                    // Nothing buffered: sleep until there is.
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(since) => rx.recv_timeout(flush_every.saturating_sub(since.elapsed())),
                };
                match msg {
                    Ok(WriterMsg::Line(line)) => {
                        if let Err(e) = out.write_all(line.as_bytes()) {
                            tracing::error!(error = %e, "sandbox: cannot write the record file");
                        }
                        dirty_since.get_or_insert_with(Instant::now);
                    }
                    Ok(WriterMsg::Flush(ack)) => {
                        flush(&mut out);
                        dirty_since = None;
                        let _ = ack.send(());
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        flush(&mut out);
                        return;
                    }
                }
                if dirty_since.is_some_and(|s| s.elapsed() >= flush_every) {
                    flush(&mut out);
                    dirty_since = None;
                }
            }
        })?;
    Ok(tx)
}

fn flush(out: &mut BufWriter<std::fs::File>) {
    if let Err(e) = out.flush() {
        tracing::error!(error = %e, "sandbox: cannot flush the record file");
    }
}

/// Recorded requests and the counters derived from them. Lives behind one mutex: recording is a
/// push and a few increments.
pub(crate) struct Journal {
    next_seq: u64,
    records: VecDeque<RecordedRequest>,
    total: u64,
    by_endpoint: [u64; 5],
    by_outcome: [u64; 8],
    by_status: BTreeMap<u16, u64>,
    first_ts: Option<String>,
    last_ts: Option<String>,
    writer: Option<mpsc::Sender<WriterMsg>>,
}

impl Journal {
    pub(crate) fn new(writer: Option<mpsc::Sender<WriterMsg>>) -> Self {
        Self {
            next_seq: 1,
            records: VecDeque::new(),
            total: 0,
            by_endpoint: [0; 5],
            by_outcome: [0; 8],
            by_status: BTreeMap::new(),
            first_ts: None,
            last_ts: None,
            writer,
        }
    }

    /// Assigns `rec.seq`, counts it, appends it (to the file too) and returns the seq.
    pub(crate) fn record(&mut self, mut rec: RecordedRequest, max_records: usize) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        rec.seq = seq;
        self.total += 1;
        self.by_endpoint[rec.endpoint.index()] += 1;
        self.by_outcome[rec.outcome.index()] += 1;
        *self.by_status.entry(rec.status).or_default() += 1;
        if self.first_ts.is_none() {
            self.first_ts = Some(rec.ts.clone());
        }
        self.last_ts = Some(rec.ts.clone());
        if let Some(writer) = &self.writer {
            // Serialised under the lock so that the file is in `seq` order.
            match serde_json::to_string(&rec) {
                Ok(mut line) => {
                    line.push('\n');
                    let _ = writer.send(WriterMsg::Line(line));
                }
                Err(e) => tracing::error!(error = %e, "sandbox: cannot serialise a record"),
            }
        }
        while self.records.len() >= max_records.max(1) {
            self.records.pop_front();
        }
        self.records.push_back(rec);
        seq
    }

    /// Forgets records and counters; `seq` keeps counting so that `?since=` pollers never miss.
    pub(crate) fn reset(&mut self) {
        let writer = self.writer.take();
        let next_seq = self.next_seq;
        *self = Journal::new(writer);
        self.next_seq = next_seq;
    }

    pub(crate) fn records(&mut self) -> &[RecordedRequest] {
        self.records.make_contiguous()
    }

    /// Records with `seq > since`, at most `limit`.
    pub(crate) fn since(&self, since: u64, limit: usize) -> Vec<RecordedRequest> {
        let start = self.records.partition_point(|r| r.seq <= since);
        self.records.range(start..).take(limit).cloned().collect()
    }

    pub(crate) fn writer(&self) -> Option<mpsc::Sender<WriterMsg>> {
        self.writer.clone()
    }

    pub(crate) fn stats(&self, rate: RateSnapshot, unique_uuids: u64) -> Stats {
        let outcome = |o: Outcome| self.by_outcome[o.index()];
        Stats {
            total: self.total,
            by_endpoint: Endpoint::ALL
                .iter()
                .map(|e| (e.as_str().to_owned(), self.by_endpoint[e.index()]))
                .collect(),
            by_status: self.by_status.clone(),
            by_outcome: Outcome::ALL
                .iter()
                .map(|o| (o.as_str().to_owned(), self.by_outcome[o.index()]))
                .collect(),
            delivered: outcome(Outcome::Ok),
            duplicates: outcome(Outcome::Duplicate),
            unique_uuids,
            unauthorized: outcome(Outcome::Unauthorized),
            bad_requests: outcome(Outcome::BadRequest),
            not_found: outcome(Outcome::NotFound),
            injected: InjectedStats {
                errors: outcome(Outcome::InjectedError),
                rate_limited: outcome(Outcome::Injected429),
                timeouts: outcome(Outcome::InjectedTimeout),
            },
            max_rate_per_sec: rate.max,
            per_second: rate.per_second,
            per_second_start: rate.start,
            first_request_at: self.first_ts.clone(),
            last_request_at: self.last_ts.clone(),
        }
    }
}
