//! Telemetry: the Prometheus metrics (names and labels are a public interface that dashboards and
//! alerts rely on), the health flags behind `/readyz`, and log setup.
//!
//! Labels stay low-cardinality: `kind` (the four kinds or `unknown`), `reason` (the four
//! dead-letter reasons), `endpoint` (the four endpoints) and `status` (HTTP code, `timeout` or
//! `error`). No id ever becomes a label.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::config::LogFormat;
use crate::contract::job::Kind;
use crate::contract::reason::DeadReason;

pub fn kind_label(kind: Option<Kind>) -> &'static str {
    kind.map_or("unknown", Kind::as_str)
}

/// `status` values of `blinger_worker_api_requests_total` created at zero at start. Other
/// statuses appear when first seen.
const EXPECTED_STATUSES: [&str; 14] = [
    "200", "400", "401", "403", "404", "408", "422", "429", "500", "502", "503", "504", "timeout",
    "error",
];

pub struct Metrics {
    registry: Registry,
    pub jobs_received: IntCounterVec,
    pub jobs_delivered: IntCounterVec,
    pub jobs_duplicate: IntCounterVec,
    pub jobs_retried: IntCounterVec,
    pub jobs_deferred: IntCounterVec,
    pub jobs_dead_lettered: IntCounterVec,
    pub api_requests: IntCounterVec,
    pub api_request_duration: HistogramVec,
    pub delivery_latency: HistogramVec,
    pub jobs_in_flight: IntGauge,
    pub rate_limited: IntCounter,
    pub amqp_connected: IntGauge,
    pub paused: IntGauge,
    pub store_flush_duration: Histogram,
    pub receipts_failed: IntCounter,
    pub router_routed: IntCounter,
    pub router_unrouted: IntCounter,
    pub log_records_applied: IntCounter,
    pub log_records_rejected: IntCounter,
    pub log_publish_failed: IntCounter,
    pub log_caught_up: IntGauge,
    pub partition_fence: Histogram,
    pub rate_share: Gauge,
    pub replicas: IntGauge,
    pub members_rejected: IntCounter,
    pub peer_throttles: IntCounter,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("metric definition");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let request_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let latency_buckets = vec![
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
            3600.0,
        ];
        let metrics = Metrics {
            jobs_received: counter(
                "blinger_worker_jobs_received_total",
                "Messages taken from the work queue.",
                &["kind"],
            ),
            jobs_delivered: counter(
                "blinger_worker_jobs_delivered_total",
                "Jobs accepted by Blinger and durably recorded.",
                &["kind"],
            ),
            jobs_duplicate: counter(
                "blinger_worker_jobs_duplicate_total",
                "Jobs already recorded as delivered, acked without calling Blinger.",
                &["kind"],
            ),
            jobs_retried: counter(
                "blinger_worker_jobs_retried_total",
                "Retries of jobs after a transient failure (in-process or via a delay tier).",
                &["kind"],
            ),
            jobs_deferred: counter(
                "blinger_worker_jobs_deferred_total",
                "Jobs sent round the shortest delay tier unsent because their conversation (or the \
                 keyless kinds) held its share of the prefetch.",
                &["kind"],
            ),
            jobs_dead_lettered: counter(
                "blinger_worker_jobs_dead_lettered_total",
                "Jobs moved to the dead-letter queue, by reason.",
                &["kind", "reason"],
            ),
            api_requests: counter(
                "blinger_worker_api_requests_total",
                "Calls to Blinger by endpoint and HTTP status (timeout or error without an answer).",
                &["endpoint", "status"],
            ),
            api_request_duration: histogram(
                "blinger_worker_api_request_duration_seconds",
                "Duration of calls to Blinger.",
                &["endpoint"],
                request_buckets,
            ),
            delivery_latency: histogram(
                "blinger_worker_delivery_latency_seconds",
                "From publish (AMQP timestamp, else first receipt) to recorded delivery.",
                &["kind"],
                latency_buckets,
            ),
            jobs_in_flight: gauge("blinger_worker_jobs_in_flight", "Jobs being processed now."),
            rate_limited: {
                let c = IntCounter::new(
                    "blinger_worker_rate_limited_total",
                    "429 answers from Blinger (each pauses all calls for its Retry-After).",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            amqp_connected: gauge(
                "blinger_worker_amqp_connected",
                "1 while the worker has an open channel to RabbitMQ.",
            ),
            paused: gauge(
                "blinger_worker_paused",
                "1 while the worker is paused because Blinger answered 401/403.",
            ),
            store_flush_duration: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "blinger_worker_store_commit_seconds",
                        "Time a delivery waits for its record to be durable (group commit).",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                    ]),
                )
                .expect("metric definition");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            receipts_failed: {
                let c = IntCounter::new(
                    "blinger_worker_receipts_failed_total",
                    "Delivery receipts that could not be published (the jobs were acked anyway).",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            router_routed: {
                let c = IntCounter::new(
                    "blinger_worker_router_routed_total",
                    "Messages the router copied into their partition queue (partitioned mode).",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            router_unrouted: {
                let c = IntCounter::new(
                    "blinger_worker_router_unrouted_total",
                    "Messages the router took back from the unrouted queue: each was routed while \
                     its partition queue was missing (someone deleted it), and is routed again.",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            log_records_applied: {
                let c = IntCounter::new(
                    "blinger_worker_log_records_applied_total",
                    "Delivered records of other senders (or of an earlier life of this data directory) read from the delivered-records log into the store (partitioned mode).",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            log_records_rejected: {
                let c = IntCounter::new(
                    "blinger_worker_log_records_rejected_total",
                    "Messages of the delivered-records log not applied: no valid seal (forged, or another trail key) or unreadable.",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            log_publish_failed: {
                let c = IntCounter::new(
                    "blinger_worker_log_publish_failed_total",
                    "Delivered records the log did not confirm (partitioned mode); each holds its job, unacked, until a retry is confirmed.",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            log_caught_up: gauge(
                "blinger_worker_log_caught_up",
                "0 while a partitioned worker reads the delivered-records log up to its end, before \
                 it consumes any partition; 1 otherwise.",
            ),
            partition_fence: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "blinger_worker_partition_fence_seconds",
                        "Time from a partition's first delivery in a session (the broker made this \
                         replica its consumer) until its jobs may go to Blinger: the read-back of \
                         the delivered-records log (partitioned mode).",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                )
                .expect("metric definition");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            rate_share: {
                let g = Gauge::new(
                    "blinger_worker_rate_share",
                    "This replica's fraction of BLINGER_WORKER_RATE_LIMIT and _BURST: 1 for a \
                     single-queue worker; in partitioned mode 1 / the replicas counted live, or 0 \
                     while it joins, is cut off from the broker or stops.",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            replicas: gauge(
                "blinger_worker_replicas",
                "Replicas this one counts live from their heartbeats, itself included (1 for a \
                 single-queue worker, 0 between sessions).",
            ),
            members_rejected: {
                let c = IntCounter::new(
                    "blinger_worker_members_rejected_total",
                    "Messages on the replicas' exchange {queue}.members ignored: no valid seal \
                     (forged, or another trail key) or unreadable.",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            peer_throttles: {
                let c = IntCounter::new(
                    "blinger_worker_peer_throttles_total",
                    "429 pauses another replica passed on, applied to this replica's bucket.",
                )
                .expect("metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            registry,
        };
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = metrics.registry.register(Box::new(ProcessMetrics(process)));
        }
        // Known label values start at zero, so rate() and absent() behave from the first scrape.
        for kind in Kind::ALL.map(Some).into_iter().chain([None]) {
            let kind = kind_label(kind);
            metrics.jobs_received.with_label_values(&[kind]);
            metrics.jobs_delivered.with_label_values(&[kind]);
            metrics.jobs_duplicate.with_label_values(&[kind]);
            metrics.jobs_retried.with_label_values(&[kind]);
            metrics.jobs_deferred.with_label_values(&[kind]);
            for reason in DeadReason::ALL {
                metrics
                    .jobs_dead_lettered
                    .with_label_values(&[kind, reason.as_str()]);
            }
        }
        for kind in Kind::ALL {
            metrics.delivery_latency.with_label_values(&[kind.as_str()]);
            metrics
                .api_request_duration
                .with_label_values(&[kind.endpoint()]);
            // The answers worth alerting on: without a zero sample first, rate() never counts
            // the first failure of a kind (a series that appears at 1 has no increase).
            for status in EXPECTED_STATUSES {
                metrics
                    .api_requests
                    .with_label_values(&[kind.endpoint(), status]);
            }
        }
        Arc::new(metrics)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails on valid metrics");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// The flags `/readyz` reads. Each setter keeps its gauge in step.
pub struct Health {
    metrics: Arc<Metrics>,
    amqp: AtomicBool,
    store: AtomicBool,
    paused: AtomicBool,
    /// The delivered-records log confirms what is published to it (partitioned mode).
    log_writable: AtomicBool,
    /// Partitioned mode: this session has read the log to its end.
    log_caught_up: AtomicBool,
    /// Since when the worker is paused with jobs waiting and none probing (see `pause`).
    unprobed_since: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// How long the worker may stay paused with jobs waiting and no probe before `/healthz` fails, so
/// that Kubernetes restarts it. The pause state machine never leaves it so for more than an
/// instant; this is the net under it.
pub const UNPROBED_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

impl Health {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Health> {
        metrics.log_caught_up.set(1);
        Arc::new(Health {
            metrics,
            amqp: AtomicBool::new(false),
            store: AtomicBool::new(true),
            paused: AtomicBool::new(false),
            log_writable: AtomicBool::new(true),
            log_caught_up: AtomicBool::new(true),
            unprobed_since: std::sync::Mutex::new(None),
        })
    }

    pub fn set_unprobed_since(&self, since: Option<tokio::time::Instant>) {
        *self.unprobed_since.lock().expect("health lock") = since;
    }

    /// Why the worker is not alive (stuck: restart it), or `None` when it is.
    pub fn not_live_reason(&self, now: tokio::time::Instant) -> Option<&'static str> {
        let since = (*self.unprobed_since.lock().expect("health lock"))?;
        (now.saturating_duration_since(since) > UNPROBED_LIMIT)
            .then_some("paused on 401/403 with jobs waiting and none probing")
    }

    pub fn set_amqp_connected(&self, up: bool) {
        self.amqp.store(up, Ordering::SeqCst);
        self.metrics.amqp_connected.set(up as i64);
    }

    pub fn set_store_ok(&self, ok: bool) {
        self.store.store(ok, Ordering::SeqCst);
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.metrics.paused.set(paused as i64);
    }

    pub fn set_log_writable(&self, ok: bool) {
        self.log_writable.store(ok, Ordering::SeqCst);
    }

    pub fn set_log_caught_up(&self, caught_up: bool) {
        self.log_caught_up.store(caught_up, Ordering::SeqCst);
        self.metrics.log_caught_up.set(caught_up as i64);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Why the worker is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.amqp.load(Ordering::SeqCst) {
            Some("not connected to RabbitMQ")
        } else if !self.store.load(Ordering::SeqCst) {
            Some("store not writable")
        } else if !self.log_caught_up.load(Ordering::SeqCst) {
            Some("catching up the delivered-records log")
        } else if !self.log_writable.load(Ordering::SeqCst) {
            Some("the delivered-records log does not confirm records")
        } else if self.paused.load(Ordering::SeqCst) {
            Some("paused: Blinger refused the API token (401/403)")
        } else {
            None
        }
    }
}

/// Installs the global tracing subscriber. Call once, at the edge.
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("BLINGER_WORKER_LOG_LEVEL {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the logger: {e}"))
}

/// The process metrics of prometheus' collector, except that `process_cpu_seconds_total` is
/// exact: the collector keeps it as an integer counter of whole seconds, which turns rate() into
/// a square wave at the low CPU use of a worker (0 or 1/interval cores, never the real figure).
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl prometheus::core::Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        if let Some(seconds) = cpu_seconds() {
            for family in families
                .iter_mut()
                .filter(|f| f.name() == "process_cpu_seconds_total")
            {
                for metric in family.mut_metric() {
                    let mut counter = prometheus::proto::Counter::default();
                    counter.set_value(seconds);
                    metric.set_counter(counter);
                }
            }
        }
        families
    }
}

/// User plus system CPU time of this process, in seconds, from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Field 2, the command name, is in parentheses and may contain spaces: count from after it.
    // What follows starts at field 3; utime and stime are fields 14 and 15, in clock ticks.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bug this guards against: the CPU counter moved in whole seconds only.
    #[cfg(target_os = "linux")]
    #[test]
    fn process_cpu_seconds_are_exact() {
        let m = Metrics::new();
        // Burn 50 ms of this process's CPU time, well under a second (measured in CPU time, not
        // wall time: on a loaded machine 30 ms of wall time could be less than one clock tick
        // of CPU, and the value read 0).
        let cpu = || {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid clock id and a pointer to a timespec we own.
            unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
            std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        };
        let start = cpu();
        let mut x = 0u64;
        while cpu() - start < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("process_cpu_seconds_total "))
            .expect("process_cpu_seconds_total exported");
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        // Whole seconds would read 0 here (this process has used far less than a second).
        assert!(value > 0.0 && value.fract() != 0.0, "{line}");
    }

    #[test]
    fn exposes_the_public_metric_names() {
        let m = Metrics::new();
        m.jobs_dead_lettered
            .with_label_values(&["send-text", DeadReason::Invalid.as_str()])
            .inc();
        m.api_requests
            .with_label_values(&["request-review", "200"])
            .inc();
        m.api_request_duration
            .with_label_values(&["request-review"])
            .observe(0.1);
        m.delivery_latency
            .with_label_values(&["send-text"])
            .observe(1.0);
        let text = m.render();
        for name in [
            "blinger_worker_jobs_received_total",
            "blinger_worker_jobs_delivered_total",
            "blinger_worker_jobs_duplicate_total",
            "blinger_worker_jobs_retried_total",
            "blinger_worker_jobs_deferred_total",
            "blinger_worker_jobs_dead_lettered_total",
            "blinger_worker_api_requests_total",
            "blinger_worker_api_request_duration_seconds_bucket",
            "blinger_worker_delivery_latency_seconds_bucket",
            "blinger_worker_jobs_in_flight",
            "blinger_worker_rate_limited_total",
            "blinger_worker_amqp_connected",
            "blinger_worker_paused",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }

    #[test]
    fn readiness_follows_the_flags() {
        let h = Health::new(Metrics::new());
        assert!(h.not_ready_reason().is_some());
        h.set_amqp_connected(true);
        assert_eq!(h.not_ready_reason(), None);
        h.set_paused(true);
        assert!(h.not_ready_reason().unwrap().contains("401"));
    }
}
