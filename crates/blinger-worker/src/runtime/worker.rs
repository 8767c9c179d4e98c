//! The worker's lifecycle: start (validate settings, open the store, reach the broker), consume
//! across reconnects, and shut down gracefully.
//!
//! - Start fails with one clear line naming the setting: no token, an unreadable token file, a
//!   data directory that cannot be opened, a metrics port in use, a broker that cannot be reached.
//! - Once running, a lost broker connection is retried forever with capped backoff; the topology
//!   is re-declared and consumption resumes. Jobs of the lost session are not acked; the broker
//!   redelivers them and the store turns those already accepted by Blinger into duplicates.
//! - Shutdown: stop consuming, let the jobs already received finish within the grace period,
//!   hand back what remains (closing the channel returns unacked messages), flush the store.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::blinger::Client;
use crate::blinger::client::ClientError;
use crate::broker::log::Tailer;
use crate::broker::members::Members;
use crate::broker::outbox::SessionOutbox;
use crate::broker::router::Router;
use crate::broker::{AmqpError, Session, Topology};
use crate::config::{ConfigError, RunSettings, Secret, TokenSource, redact_url};
use crate::contract::trail::{TrailKey, TrailKeyError};
use crate::engine::dispatch::Dispatcher;
use crate::engine::ownership::{Admit, Gates};
use crate::engine::pipeline::{Parts, Pipeline, SessionLink};
use crate::engine::ratelimit::Limiter;
use crate::engine::retry::{Backoff, RetryPolicy};
use crate::runtime::telemetry::{Health, Metrics};
use crate::store::{Store, StoreError};

/// Why the worker could not start. Each message names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("BLINGER_WORKER_DATA_DIR: {0}")]
    Store(#[from] StoreError),
    #[error("BLINGER_API_TOKEN: {0}")]
    Client(#[from] ClientError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("{0}")]
    MetricsPort(std::io::Error),
    #[error("BLINGER_WORKER_TRAIL_KEY: {0}")]
    TrailKey(#[from] TrailKeyError),
}

/// Longest wait for the acks of finished jobs to go out at shutdown, and again for the session
/// to close (a broker that stopped answering).
const ACKS_AND_CLOSE: Duration = Duration::from_secs(5);

pub struct Worker {
    settings: RunSettings,
    pipeline: Arc<Pipeline>,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    listener: TcpListener,
    first_session: Session,
    stopping: CancellationToken,
}

/// What [`Worker::start`] opened after the store.
struct Opened {
    trail_key: TrailKey,
    client: Client,
    listener: TcpListener,
    topology: Topology,
    first_session: Session,
}

impl Worker {
    /// Validates the settings and opens everything, or says which setting is wrong.
    pub async fn start(settings: RunSettings) -> Result<Worker, StartError> {
        settings.validate()?;
        let token_source = TokenSource::from_settings(&settings)?;
        let token = token_source.load()?;
        let metrics = Metrics::new();
        let health = Health::new(metrics.clone());
        std::fs::create_dir_all(&settings.data_dir)
            .map_err(|e| StoreError::opening(&settings.data_dir, e))?;
        let store = Store::open(&settings.data_dir)?;
        // A start refused after this point (a broker layout that does not match, a busy metrics
        // port) releases the store's lock before it returns: the process may go on (a test, an
        // operator command) and open the same directory at once.
        let opened = match Self::reach_the_world(&settings, &store, &token).await {
            Ok(opened) => opened,
            Err(refused) => {
                let _ = store.close().await;
                return Err(refused);
            }
        };
        let Opened {
            trail_key,
            client,
            listener,
            topology,
            first_session,
        } = opened;
        let stopping = CancellationToken::new();
        let (rate, burst) = (
            NonZeroU32::new(settings.rate_limit).expect("validated by clap"),
            NonZeroU32::new(settings.rate_burst).expect("validated by clap"),
        );
        // Partitioned mode: the replicas share the limit, and a share is given only by the
        // membership of a session (`broker::members`).
        let limiter = Arc::new(if settings.amqp.partitions > 0 {
            Limiter::shared(rate, burst)
        } else {
            metrics.rate_share.set(1.0);
            metrics.replicas.set(1);
            Limiter::new(rate, burst)
        });
        let policy = RetryPolicy::new(
            settings.max_in_process_attempts,
            settings.amqp.retry_delays.0.clone(),
        );
        let pipeline = Arc::new(Pipeline::new(Parts {
            client,
            token: token_source,
            store,
            limiter,
            policy,
            topology,
            metrics: metrics.clone(),
            health: health.clone(),
            stopping: stopping.clone(),
            trail_key,
            receipts: settings
                .receipts
                .then(|| settings.amqp.receipts_exchange.clone()),
            keyless_concurrency: Some(settings.keyless_concurrency as usize),
        }));
        // Each partition consumer shares its own prefetch (see `dispatch`).
        let shared = if settings.amqp.partitions > 0 {
            settings.partition_prefetch()
        } else {
            settings.prefetch
        };
        let dispatcher = Dispatcher::with_slow_start(
            pipeline.clone(),
            settings.concurrency as usize,
            settings.max_body_bytes,
            crate::engine::fair::FairShare::new(shared, settings.fair_share),
        );
        Ok(Worker {
            settings,
            pipeline,
            dispatcher,
            metrics,
            health,
            listener,
            first_session,
            stopping,
        })
    }

    /// Everything `start` opens once the store is open: each can refuse the start.
    async fn reach_the_world(
        settings: &RunSettings,
        store: &Store,
        token: &Secret,
    ) -> Result<Opened, StartError> {
        let trail_key = TrailKey::load(settings.trail_key.as_ref(), &settings.data_dir)?;
        store.check_writable().await?;
        let client = Client::new(&settings.api_url, token, settings.request_timeout)?;
        let listener = crate::runtime::ops_http::bind(settings.metrics_addr)
            .await
            .map_err(StartError::MetricsPort)?;
        let topology = Topology::new(&settings.amqp);
        let first_session = Session::open(
            &settings.amqp,
            &topology,
            settings.prefetch,
            settings.partition_prefetch(),
            &connection_name(),
        )
        .await?;
        Ok(Opened {
            trail_key,
            client,
            listener,
            topology,
            first_session,
        })
    }

    /// The bound metrics address (useful when the setting asked for port 0).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `shutdown` fires, then shuts down gracefully.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Worker {
            settings,
            pipeline,
            dispatcher,
            metrics,
            health,
            listener,
            first_session,
            stopping,
        } = self;
        let ops_stop = CancellationToken::new();
        let ops = tokio::spawn(crate::runtime::ops_http::serve(
            listener,
            metrics.clone(),
            health.clone(),
            pipeline.store().clone(),
            ops_stop.clone(),
        ));
        let pruner = tokio::spawn(prune_forever(
            pipeline.store().clone(),
            settings.amqp.retention,
            shutdown.clone(),
        ));

        info!(
            amqp = %redact_url(settings.amqp.url.expose()),
            api = %settings.api_url,
            queue = %settings.amqp.queue,
            concurrency = settings.concurrency,
            prefetch = settings.prefetch,
            rate_limit = settings.rate_limit,
            "blinger-worker running"
        );

        let mut next_session = Some(first_session);
        let mut reconnect = Reconnect::default();
        let mut drained = false;
        loop {
            let session = match next_session.take() {
                Some(session) => session,
                None => {
                    let topology = pipeline.topology();
                    let name = connection_name();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        opened = Session::open(&settings.amqp, topology, settings.prefetch, settings.partition_prefetch(), &name) => match opened {
                            Ok(session) => {
                                info!("reconnected to RabbitMQ");
                                session
                            }
                            Err(e) => {
                                let delay = reconnect.next_delay();
                                warn!(error = %e, retry_in = ?delay, "RabbitMQ unavailable");
                                tokio::select! {
                                    _ = shutdown.cancelled() => break,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                                continue;
                            }
                        }
                    }
                }
            };
            let started = tokio::time::Instant::now();
            // The session's consumers, kept until its channels are closed: dropping the last
            // handle of a consumer sends `basic.cancel` (see `consume`).
            let mut consumers = Vec::new();
            let ended = consume(
                &settings,
                &session,
                &pipeline,
                &dispatcher,
                &metrics,
                &health,
                &shutdown,
                &mut consumers,
            )
            .await;
            match ended {
                Ended::Lost(reason) => {
                    health.set_amqp_connected(false);
                    reconnect.session_ended(started.elapsed());
                    let delay = reconnect.next_delay();
                    warn!(%reason, retry_in = ?delay, "lost RabbitMQ; reconnecting (unacked jobs will be redelivered)");
                    session.close().await;
                    drop(consumers);
                    // Also after a session that failed at once (basic.consume refused): never a
                    // connection storm against the broker.
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Ended::Shutdown {
                    alive,
                    outboxes,
                    members,
                } => {
                    drain(&settings, &pipeline, &dispatcher, &stopping).await;
                    // No call starts any more: the share goes to the other replicas now.
                    if let Some(members) = members {
                        members.leave().await;
                    }
                    drained = true;
                    // Finished jobs must be acked before the channels close, or the broker
                    // redelivers them.
                    let flushes = futures_util::future::join_all(
                        outboxes.iter().map(|outbox| outbox.acks.flush(true)),
                    );
                    match tokio::time::timeout(ACKS_AND_CLOSE, flushes).await {
                        Ok(flushed) => {
                            if let Some(e) = flushed.into_iter().find_map(Result::err) {
                                warn!(error = %e, "acks lost at shutdown; those jobs come back as duplicates")
                            }
                        }
                        Err(_) => warn!(
                            "acks not confirmed sent at shutdown; those jobs may come back as duplicates"
                        ),
                    }
                    alive.cancel();
                    session.close().await;
                    drop(consumers);
                    health.set_amqp_connected(false);
                    break;
                }
            }
        }
        // Shutdown before or between sessions also lands here.
        stopping.cancel();
        pipeline.abort();
        // Shutdown between sessions: a job mid-call gets its answer (bounded by the request
        // timeout). After `drain` that wait is over; anything still running is abandoned unacked,
        // and the broker redelivers it.
        let last_calls = if drained {
            Duration::from_secs(1)
        } else {
            settings.request_timeout + Duration::from_secs(1)
        };
        if tokio::time::timeout(last_calls, dispatcher.drained())
            .await
            .is_err()
        {
            warn!("jobs still running at exit; the broker will redeliver them");
        }
        pruner.abort();
        let _ = pruner.await;
        ops_stop.cancel();
        let _ = ops.await;
        let store = pipeline.store().clone();
        drop(dispatcher);
        drop(pipeline);
        if let Err(e) = store.close().await {
            error!(error = %e, "flushing the store at shutdown");
        }
        info!("stopped");
        Ok(())
    }
}

enum Ended {
    Lost(String),
    Shutdown {
        alive: CancellationToken,
        outboxes: Vec<Arc<SessionOutbox>>,
        /// Partitioned mode: the session's membership, left once the last calls are over.
        members: Option<Members>,
    },
}

/// One consuming channel of a session: the work queue, or one partition queue.
struct Source {
    queue: String,
    tag: String,
    outbox: Arc<SessionOutbox>,
    link: Arc<SessionLink>,
}

/// The consuming channels of `session`, with a link each, all ending with `alive`.
fn sources(
    settings: &RunSettings,
    session: &Session,
    topology: &Topology,
    alive: &CancellationToken,
) -> Vec<Source> {
    let channels: Vec<(String, lapin::Channel)> = match &topology.partitioned {
        None => vec![(settings.amqp.queue.clone(), session.consume.clone())],
        Some(partitioned) => partitioned
            .queues
            .iter()
            .cloned()
            .zip(session.partitions.iter().cloned())
            .collect(),
    };
    let header_budget =
        crate::broker::outgoing::header_budget(session.connection.configuration().frame_max());
    channels
        .into_iter()
        .enumerate()
        .map(|(group, (queue, channel))| {
            let outbox = Arc::new(SessionOutbox::new(
                channel,
                session.publish.clone(),
                session.republisher.clone(),
            ));
            let link = Arc::new(SessionLink {
                outbox: outbox.clone(),
                alive: alive.clone(),
                header_budget,
                group: group as u16,
            });
            let acker = outbox.clone();
            let until = alive.clone();
            tokio::spawn(async move { acker.acks.run(until).await });
            Source {
                queue,
                tag: format!("blinger-worker-{}", uuid::Uuid::new_v4().simple()),
                outbox,
                link,
            }
        })
        .collect()
}

/// Consumes one session until it is lost or shutdown is requested: the work queue, or in
/// partitioned mode every partition queue plus the router. Every consumer it starts is also put
/// into `kept`, for the caller to drop only after the session's channels are closed.
///
/// Why: a partition queue has a single active consumer, and `basic.cancel` of the active one
/// (which lapin sends when the last handle of a consumer is dropped) activates the next consumer
/// at once, while this one still holds jobs of the partition; the next one would then send later
/// jobs before those handed back here. Closing the channel instead returns every job this
/// consumer holds first, in order, and only then activates the next one.
#[allow(clippy::too_many_arguments)]
async fn consume(
    settings: &RunSettings,
    session: &Session,
    pipeline: &Pipeline,
    dispatcher: &Arc<Dispatcher>,
    metrics: &Arc<Metrics>,
    health: &Health,
    shutdown: &CancellationToken,
    kept: &mut Vec<lapin::Consumer>,
) -> Ended {
    let alive = CancellationToken::new();
    let topology = pipeline.topology();
    let mut members: Option<Members> = None;
    // Partitioned mode: the delivered-records log is read to its end before any partition is
    // consumed, so that no job another replica delivered is sent again from here.
    let mut tailer = match &topology.partitioned {
        None => None,
        Some(partitioned) => {
            health.set_amqp_connected(true);
            health.set_log_caught_up(false);
            let started = Tailer::start(
                &session.connection,
                &partitioned.log,
                pipeline.store().clone(),
                pipeline.trail_key().clone(),
                metrics.clone(),
                alive.clone(),
            )
            .await;
            let mut tailer = match started {
                Ok(tailer) => tailer,
                Err(e) => {
                    alive.cancel();
                    return Ended::Lost(format!("reading the delivered-records log: {e}"));
                }
            };
            // The membership listens while the log is read: a share is ready by the time the
            // first partition is.
            let joined = Members::start(
                &session.connection,
                &partitioned.members,
                pipeline.trail_key().clone(),
                pipeline.limiter().clone(),
                metrics.clone(),
                alive.clone(),
            )
            .await;
            match joined {
                Ok(joined) => members = Some(joined),
                Err(e) => {
                    alive.cancel();
                    return Ended::Lost(format!("joining the replicas' heartbeats: {e}"));
                }
            }
            let began = tokio::time::Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    alive.cancel();
                    return Ended::Shutdown { alive, outboxes: Vec::new(), members: None };
                }
                caught_up = tailer.caught_up() => if let Err(e) = caught_up {
                    alive.cancel();
                    return Ended::Lost(format!("reading the delivered-records log: {e}"));
                }
            }
            health.set_log_caught_up(true);
            info!(took = ?began.elapsed(), "read the delivered-records log up to its end");
            Some(tailer)
        }
    };
    let sources = sources(settings, session, topology, &alive);
    let mut consumers = Vec::with_capacity(sources.len());
    for (i, source) in sources.iter().enumerate() {
        match source
            .outbox
            .consume
            .basic_consume(
                source.queue.as_str().into(),
                source.tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(consumer) => {
                kept.push(consumer.clone());
                consumers.push(consumer.map(move |d| (i, d)));
            }
            Err(e) => {
                alive.cancel();
                return Ended::Lost(format!("basic.consume of {} failed: {e}", source.queue));
            }
        }
    }
    let mut router = match &topology.partitioned {
        None => None,
        Some(_) => match Router::start(
            &session.connection,
            topology,
            settings.max_body_bytes,
            metrics.clone(),
            alive.clone(),
        )
        .await
        {
            Ok(router) => Some(router),
            Err(e) => {
                alive.cancel();
                return Ended::Lost(format!("starting the router: {e}"));
            }
        },
    };
    let mut deliveries = futures_util::stream::select_all(consumers);
    // Partitioned mode: a partition's first delivery waits for a read-back of the log (see
    // `engine::ownership`). A gate holds all of its channel's deliveries, unregistered, so no
    // `multiple` ack of that channel can cover a held tag.
    let barrier = tailer.as_ref().map(Tailer::barrier);
    let mut gates = Gates::new(sources.len(), barrier.is_some());
    let mut barriers = FuturesUnordered::new();
    let outboxes = || sources.iter().map(|s| s.outbox.clone()).collect();
    health.set_amqp_connected(true);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let ended = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // The router first: nothing more reaches the partitions.
                if let Some(router) = router.take() {
                    router.stop().await;
                }
                if topology.partitioned.is_none() {
                    for source in &sources {
                        let _ = source
                            .outbox
                            .consume
                            .basic_cancel(source.tag.as_str().into(), BasicCancelOptions::default())
                            .await;
                    }
                    // Deliveries already sent before the cancel still arrive: take them too, so
                    // the grace period applies to everything this worker holds.
                    while let Ok(Some((i, Ok(delivery)))) =
                        tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await
                    {
                        dispatcher.submit(delivery, &sources[i].link);
                    }
                }
                // Partitioned mode: no `basic.cancel` (see above). The consumers stay until the
                // channels close after the drain; what they receive meanwhile is not taken and
                // goes back with the close, in order, before the next replica gets the partition.
                break Ended::Shutdown {
                    alive: alive.clone(),
                    outboxes: outboxes(),
                    members: members.take(),
                };
            }
            delivery = deliveries.next() => match delivery {
                Some((i, Ok(delivery))) => match gates.deliver(i, delivery) {
                    Admit::Submit(delivery) => dispatcher.submit(delivery, &sources[i].link),
                    Admit::Held => {}
                    Admit::Activated => {
                        // This replica is the partition's consumer now: its part of the rate
                        // limit grows once the other replicas have heard of it.
                        if let Some(members) = &members {
                            members.hold(i as u16);
                        }
                        let barrier = barrier.clone().expect("gates are guarded only with a log");
                        let began = tokio::time::Instant::now();
                        barriers.push(async move { (i, barrier.pass().await, began) });
                    }
                },
                Some((_, Err(e))) => break Ended::Lost(e.to_string()),
                None => break Ended::Lost("consumer closed".into()),
            },
            Some((i, passed, began)) = barriers.next(), if !barriers.is_empty() => match passed {
                Ok(()) => {
                    metrics.partition_fence.observe(began.elapsed().as_secs_f64());
                    debug!(queue = %sources[i].queue, took = ?began.elapsed(), "partition taken: the log is read back");
                    for delivery in gates.passed(i) {
                        dispatcher.submit(delivery, &sources[i].link);
                    }
                }
                Err(e) => break Ended::Lost(format!(
                    "reading the delivered-records log back for {}: {e}",
                    sources[i].queue
                )),
            },
            failed = async { router.as_mut().expect("guarded").failed().await }, if router.is_some() => {
                break Ended::Lost(failed.to_string());
            }
            failed = async { tailer.as_mut().expect("guarded").failed().await }, if tailer.is_some() => {
                break Ended::Lost(failed.to_string());
            }
            failed = async { members.as_mut().expect("guarded").failed().await }, if members.is_some() => {
                break Ended::Lost(failed.to_string());
            }
            _ = check.tick() => {
                if !session.publish.status().connected()
                    || !session.republisher.connected()
                    || !session.connection.status().connected()
                    || sources.iter().any(|s| !s.outbox.consume.status().connected())
                {
                    break Ended::Lost("channel closed".into());
                }
            }
        }
    };
    if matches!(ended, Ended::Lost(_)) {
        alive.cancel();
    }
    ended
}

/// Lets received jobs finish within the grace period, then hands back the rest.
async fn drain(
    settings: &RunSettings,
    pipeline: &Pipeline,
    dispatcher: &Dispatcher,
    stopping: &CancellationToken,
) {
    stopping.cancel();
    let pending = dispatcher.pending();
    info!(pending, grace = ?settings.shutdown_grace, "consumption stopped; finishing received jobs");
    if tokio::time::timeout(settings.shutdown_grace, dispatcher.drained())
        .await
        .is_err()
    {
        let left = dispatcher.pending();
        warn!(
            left,
            "shutdown grace over; handing the remaining jobs back to the broker"
        );
        pipeline.abort();
        // Jobs mid-call get their answer (bounded by the request timeout), and are recorded and
        // acked while the session is still open; the others are handed back at once.
        let last_calls = settings.request_timeout + Duration::from_secs(1);
        let _ = tokio::time::timeout(last_calls, dispatcher.drained()).await;
    }
}

/// First wait before reconnecting.
const RECONNECT_FIRST: Duration = Duration::from_millis(500);
/// A session that consumed this long was healthy: the next loss starts the backoff over.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// The reconnect backoff: 0.5 s doubling to [`RECONNECT_CAP`], across failed connects and
/// sessions lost soon after they opened; it starts over only after a session that consumed for
/// [`HEALTHY_SESSION`]. (Resetting at every successful open let a broker that accepts the
/// connection but refuses `basic.consume` be hammered without a pause.)
#[derive(Debug)]
struct Reconnect {
    backoff: Backoff,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            backoff: Backoff::new(RECONNECT_FIRST, RECONNECT_CAP),
        }
    }
}

impl Reconnect {
    /// The wait before the next attempt; the one after it is longer.
    fn next_delay(&mut self) -> Duration {
        self.backoff.next_wait()
    }

    /// A session ended after consuming for `lasted`.
    fn session_ended(&mut self, lasted: Duration) {
        if lasted >= HEALTHY_SESSION {
            self.backoff.reset();
        }
    }
}

/// Longest wait between two connection attempts. Short: the worker is back within seconds of
/// the broker (a 30 s cap measured up to 16 s of extra downtime after a 16 s broker restart in
/// docs/reliability.md), and a few connection attempts a second are nothing to a broker.
const RECONNECT_CAP: Duration = Duration::from_secs(5);

async fn prune_forever(store: Store, retention: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.prune(retention)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => info!(removed, "pruned old delivered records"),
            Ok(Err(e)) => warn!(error = %e, "pruning the store"),
            Err(e) => warn!(error = %e, "pruning task failed"),
        }
    }
}

fn connection_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("blinger-worker@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_over_only_after_a_healthy_session() {
        let mut r = Reconnect::default();
        let ms = |r: &mut Reconnect| r.next_delay().as_millis();
        assert_eq!([ms(&mut r), ms(&mut r), ms(&mut r)], [500, 1000, 2000]);
        // A session that opened but was lost at once (basic.consume refused): no reset.
        r.session_ended(Duration::from_millis(5));
        assert_eq!([ms(&mut r), ms(&mut r), ms(&mut r)], [4000, 5000, 5000]);
        // One that consumed for a while: the next loss is retried soon again.
        r.session_ended(HEALTHY_SESSION);
        assert_eq!(ms(&mut r), 500);
    }
}
