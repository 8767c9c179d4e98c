//! The pipeline: what happens to one job, from its delivery to its ack.
//!
//! ```text
//! delivery ─ invalid? ──────────────────────────────────────> dead-letter `invalid`
//!          ─ already in the store? ─ same job ──────────────> ack (duplicate)
//!                                  ─ another job, same id ─> dead-letter `conflict`
//!          ─ expired? ──────────────────────────────────────> dead-letter `expired`
//!          ─ older jobs of its conversation in a delay tier? ─> follow them (see `order`)
//!          ─ rate limiter ─ Blinger ─ accepted ─ record (group commit) ─> ack
//!                                   ─ transient ─ backoff, retry ─ park in a delay tier ─ dead-letter `retries-exhausted`
//!                                   ─ permanent ─> dead-letter `rejected`
//!                                   ─ 401/403 ───> pause, probe, resume (the job is kept)
//! ```
//!
//! Guarantees: a job is acked only after Blinger accepted it and its record is durable, or after
//! its republish (delay tier, dead-letter queue) was confirmed by the broker. A job that cannot be
//! finished (connection lost, shutdown grace over) is simply not acked: the broker redelivers it,
//! and the store makes the redelivery a no-op if Blinger had already accepted it.
//!
//! Untrusted input: the delivery's properties and headers are the publisher's, like its body.
//! The worker's own trail (retries, chain, attempts) is read only from a seal the worker wrote
//! ([`crate::contract::trail`]), and every republish is built from an allowlist ([`broker::outgoing`]).
//!
//! Per-conversation order: the dispatcher runs one job per conversation at a time, and when a job
//! is parked in a delay tier the later jobs of its conversation follow it through the tiers
//! ([`crate::engine::order`]), so they are sent after it instead of overtaking it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::blinger::failure::Failure;
use crate::blinger::{Accepted, Client};
use crate::broker::outbox::Outbox;
use crate::broker::{self, Topology, outgoing};
use crate::config::TokenSource;
use crate::contract::annotation::{Annotation, clip_error};
use crate::contract::delivered_log;
use crate::contract::job::{InvalidJob, Job, Kind};
use crate::contract::reason::DeadReason;
use crate::contract::receipts::{self, Receipt};
use crate::contract::trail::{Trail, TrailKey};
use crate::engine::decide::{Facts, Step, decide};
use crate::engine::order::{Chains, Route};
use crate::engine::pause::{Pass, PauseGate, Probe};
use crate::engine::ratelimit::Limiter;
use crate::engine::retry::{Backoff, Next, RetryPolicy};
use crate::runtime::telemetry::{Health, Metrics, kind_label};
use crate::store::{Delivered, Store, now_ms};

/// The session a delivery came in on, and whether it is still open. Acks and republishes of a
/// delivery go through its own session: once that session is gone, the broker will redeliver.
pub struct SessionLink {
    /// Acks, hand-backs, republishes and receipts of this session's deliveries.
    pub outbox: Arc<dyn Outbox>,
    pub alive: CancellationToken,
    /// Most bytes of a publisher's headers a republish on this session copies
    /// ([`outgoing::header_budget`] of the negotiated frame size).
    pub header_budget: usize,
    /// The fair-share group of this link's deliveries: its partition in partitioned mode (each
    /// partition consumer has its own prefetch to share), 0 for the work queue.
    pub group: u16,
}

/// One message taken from the work queue.
pub struct Work {
    pub delivery: Delivery,
    pub session: Arc<SessionLink>,
    pub job: Result<Job, InvalidJob>,
    /// The worker's own trail, from a seal it wrote; fresh for a publisher's message.
    pub trail: Trail,
    /// Its place among its conversation's jobs ([`Pipeline::arrived`]); 0 for an invalid one.
    pub seq: u64,
    /// Unix milliseconds when this worker took the message.
    pub received_ms: u64,
}

impl Work {
    pub fn kind(&self) -> Option<Kind> {
        match &self.job {
            Ok(job) => Some(job.kind()),
            Err(invalid) => invalid.kind,
        }
    }
}

/// What a [`Pipeline`] is made of.
pub struct Parts {
    pub client: Client,
    pub token: TokenSource,
    pub store: Store,
    pub limiter: Arc<Limiter>,
    pub policy: RetryPolicy,
    pub topology: Topology,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Consumption has stopped (shutdown): jobs waiting on a backoff park at once, paused jobs
    /// are handed back.
    pub stopping: CancellationToken,
    /// Seals the trail of the jobs this worker parks.
    pub trail_key: TrailKey,
    /// The receipts exchange, when receipts are on.
    pub receipts: Option<String>,
    /// Most calls without an idempotency key at once; `None`: no limit.
    pub keyless_concurrency: Option<usize>,
}

/// Everything a job needs, shared by all jobs.
pub struct Pipeline {
    client: Client,
    token: TokenSource,
    store: Store,
    limiter: Arc<Limiter>,
    policy: RetryPolicy,
    topology: Topology,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    gate: PauseGate,
    stopping: CancellationToken,
    /// The shutdown grace is over: jobs not yet started are handed back.
    abort: CancellationToken,
    chains: Chains,
    receipts: Option<String>,
    /// Permits for calls without an idempotency key (request-review, assign-agent): what a crash
    /// can repeat. The dispatcher takes one before the job's concurrency slot (waiting for it
    /// holds no slot); the job gives it up while it waits (backoff, pause) and holds it from each
    /// call until the call failed or its delivered record is durable.
    keyless: Arc<Semaphore>,
    trail_key: TrailKey,
}

/// How a job's processing ended, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Duplicate,
    Parked,
    DeadLettered(DeadReason),
    /// Not acked: the broker will redeliver it.
    HandedBack,
}

impl Pipeline {
    /// Builds the pipeline; the chains of the last run are read from the store here.
    pub fn new(parts: Parts) -> Pipeline {
        let Parts {
            client,
            token,
            store,
            limiter,
            policy,
            topology,
            metrics,
            health,
            stopping,
            trail_key,
            receipts,
            keyless_concurrency,
        } = parts;
        Pipeline {
            chains: chains(&store, &policy),
            client,
            token,
            store,
            limiter,
            policy,
            topology,
            gate: PauseGate::new(health.clone()),
            metrics,
            health,
            stopping,
            abort: CancellationToken::new(),
            receipts,
            keyless: Arc::new(Semaphore::new(
                keyless_concurrency.unwrap_or(Semaphore::MAX_PERMITS),
            )),
            trail_key,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn trail_key(&self) -> &TrailKey {
        &self.trail_key
    }

    /// The rate limiter, whose share the membership sets in partitioned mode.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// The permits of the calls without an idempotency key (see [`Parts::keyless_concurrency`]).
    pub fn keyless(&self) -> &Arc<Semaphore> {
        &self.keyless
    }

    /// Blinger refuses the token: jobs wait at the gate.
    pub fn is_paused(&self) -> bool {
        self.gate.is_paused()
    }

    /// The shutdown grace is over: jobs not yet started are handed back, waits end.
    pub fn abort(&self) {
        self.abort.cancel();
    }

    /// Processes one message to its end. `keyless` is the job's keyless permit when it needs
    /// one and the caller took it already (see [`Pipeline::keyless`]).
    pub async fn process(&self, work: Work, keyless: Option<OwnedSemaphorePermit>) -> Outcome {
        if work.session.alive.is_cancelled() || self.abort.is_cancelled() {
            self.settle(&work, Outcome::HandedBack);
            return Outcome::HandedBack;
        }
        self.metrics.jobs_in_flight.inc();
        let outcome = self.process_inner(&work, keyless).await;
        self.metrics.jobs_in_flight.dec();
        self.settle(&work, outcome);
        outcome
    }

    /// The sequence of an arriving job (see [`crate::engine::order`]).
    pub fn arrived(&self, job: &Job, trail: &Trail) -> u64 {
        self.chains
            .arrived(&job.conversation_id, job.id, trail.chain)
    }

    /// Waits until the chains written so far are durable, before a job is sent round a tier. A
    /// store that cannot flush costs only the order across a restart: the job goes round all
    /// the same.
    async fn chains_durable(&self) {
        if let Err(e) = self.store.flush().await {
            warn!(error = %e, "chains not durable: a restart now may let jobs overtake jobs out in the delay tiers");
        }
    }

    /// The chain after a job's processing: a member that came back and left without being
    /// routed (a duplicate, expired, a conflict) is no longer out; a job handed back keeps its
    /// place until it is redelivered (when stopping, the sequence it keeps is enough: it is
    /// redelivered before anything that comes back from a tier); a job acked no longer needs
    /// its sequence kept.
    fn settle(&self, work: &Work, outcome: Outcome) {
        let Ok(job) = &work.job else { return };
        match outcome {
            Outcome::HandedBack if self.stopping.is_cancelled() => {}
            Outcome::HandedBack => self.chains.handed_back(
                &job.conversation_id,
                job.id,
                work.seq,
                tokio::time::Instant::now(),
            ),
            Outcome::Duplicate | Outcome::DeadLettered(_) => {
                self.chains.leave(&job.conversation_id, work.seq);
                self.chains.done(job.id);
            }
            Outcome::Delivered | Outcome::Parked => self.chains.done(job.id),
        }
    }

    /// Records that `work` is deferred (see [`crate::engine::fair`]) and returns its tier. Call when it
    /// arrives, before any younger job of its conversation is routed. `waiting`: jobs of its
    /// conversation in the worker, each taking about `per_job`.
    pub fn defer(&self, work: &Work, waiting: usize, per_job: Duration) -> Option<usize> {
        let job = work.job.as_ref().ok()?;
        Some(self.chains.defer(
            &job.conversation_id,
            job.id,
            work.seq,
            tokio::time::Instant::now(),
            waiting,
            per_job,
        ))
    }

    /// Sends a deferred job round `tier`, following its conversation's chain, and acks it.
    /// False if the republish did not go out: the caller gives it back to its lane (it stays
    /// in the chain, so nothing younger overtakes it).
    pub async fn park_deferred(&self, work: &Work, tier: usize) -> bool {
        let Ok(job) = &work.job else { return false };
        if work.session.alive.is_cancelled() {
            return false;
        }
        let trail = Trail {
            chain: Some(work.seq),
            first_seen_ms: Some(self.first_seen_ms(work)),
            ..work.trail
        };
        let extra = trail.headers(&work.delivery.data, &self.trail_key);
        let properties = self.outgoing(work, extra);
        let queue = &self.topology.tiers[tier];
        // Durable before the copy exists: a copy whose membership a crash lost would come back
        // after younger jobs were sent.
        self.chains_durable().await;
        if !self.republish(work, queue, properties).await {
            return false;
        }
        self.ack(work);
        self.chains.done(job.id);
        self.metrics
            .jobs_deferred
            .with_label_values(&[job.kind().as_str()])
            .inc();
        debug!(id = %job.id, queue, "deferred: its conversation holds its share of the prefetch");
        true
    }

    async fn process_inner(&self, work: &Work, keyless: Option<OwnedSemaphorePermit>) -> Outcome {
        let attempts = u64::from(work.trail.attempts);
        let job = match &work.job {
            Ok(job) => job,
            Err(invalid) => {
                return self
                    .dead_letter(
                        work,
                        DeadReason::Invalid,
                        &invalid.to_string(),
                        None,
                        attempts,
                    )
                    .await;
            }
        };
        match self.lookup(job).await {
            Some(Some(record)) => self.already_delivered(work, job, record).await,
            Some(None) if job.is_expired(time::OffsetDateTime::now_utc()) => {
                self.dead_letter(
                    work,
                    DeadReason::Expired,
                    "expires_at passed before delivery",
                    None,
                    attempts,
                )
                .await
            }
            Some(None) => {
                match self.chains.route(
                    &job.conversation_id,
                    job.id,
                    work.seq,
                    tokio::time::Instant::now(),
                ) {
                    Route::Send => self.deliver(work, job, keyless).await,
                    Route::Follow { seq, tier } => {
                        let trail = Trail {
                            chain: Some(seq),
                            first_seen_ms: Some(self.first_seen_ms(work)),
                            ..work.trail
                        };
                        self.park(work, job, tier, trail, None).await
                    }
                }
            }
            None => Outcome::HandedBack,
        }
    }

    /// A job whose id the store knows: a redelivery of the same job is acked as a duplicate
    /// (with its `delivered` receipt again); another job under a used id is dead-lettered
    /// `conflict`, never acked as delivered. Records older than the digest count as the same job.
    async fn already_delivered(&self, work: &Work, job: &Job, record: Delivered) -> Outcome {
        if record.digest.as_ref().is_some_and(|d| *d != job.digest()) {
            let detail = format!(
                "id {} was delivered at {} as a different job ({} to another conversation or \
                 with other content); this one was not sent",
                job.id,
                receipts::timestamp(record.delivered_at_ms),
                record.kind,
            );
            return self
                .dead_letter(
                    work,
                    DeadReason::Conflict,
                    &detail,
                    None,
                    u64::from(work.trail.attempts),
                )
                .await;
        }
        self.metrics
            .jobs_duplicate
            .with_label_values(&[job.kind().as_str()])
            .inc();
        debug!(id = %job.id, "already delivered; acking the duplicate");
        // Receipts are at-least-once: a crash may have lost the first one (and in partitioned
        // mode, with it the record in the log).
        if !self.delivered_receipt(work, &record, None).await {
            return Outcome::HandedBack;
        }
        self.ack(work);
        Outcome::Duplicate
    }

    /// The job's delivered record, if any; `None` if the store stayed unreadable until shutdown.
    async fn lookup(&self, job: &Job) -> Option<Option<Delivered>> {
        let mut backoff = STORE_RETRY;
        loop {
            match self.store.get(&job.id) {
                Ok(found) => {
                    self.health.set_store_ok(true);
                    return Some(found);
                }
                Err(e) => {
                    self.health.set_store_ok(false);
                    error!(error = %e, "store unreadable; holding jobs until it recovers");
                }
            }
            if !self.sleep_unless(&self.abort, backoff.next_wait()).await {
                return None;
            }
        }
    }

    async fn deliver(
        &self,
        work: &Work,
        job: &Job,
        mut keyless: Option<OwnedSemaphorePermit>,
    ) -> Outcome {
        let kind = job.kind();
        let mut trail = work.trail;
        let mut round = self.policy.round(trail.retries);
        let ticket = self.gate.ticket();
        // Held while this job probes a pause; dropped (another job takes over) however it leaves.
        let mut probe: Option<Probe<'_>> = None;
        // The call of this job's last 403 (see `PauseGate::accepted_since`).
        let mut refused_at: Option<u64> = None;
        loop {
            if probe.is_none() {
                if self.gate.is_paused() {
                    // The prober may need this permit to end the pause.
                    keyless = None;
                }
                // A job held by a pause still expires on time (and leaves the gate).
                let pass = tokio::select! {
                    biased;
                    _ = work.session.alive.cancelled() => return Outcome::HandedBack,
                    pass = self.gate.admit(ticket, &self.stopping) => pass,
                    _ = until_expiry(job) => Pass::Open,
                };
                match pass {
                    Pass::Open => {}
                    Pass::Probe(p) => probe = Some(p),
                    Pass::Stopped => return Outcome::HandedBack,
                }
            }
            if let Some(p) = &probe {
                tokio::select! {
                    biased;
                    _ = self.stopping.cancelled() => return Outcome::HandedBack,
                    _ = work.session.alive.cancelled() => return Outcome::HandedBack,
                    _ = tokio::time::sleep(p.delay()) => {}
                    _ = until_expiry(job) => {}
                }
                self.reload_token();
            }
            if job.is_expired(time::OffsetDateTime::now_utc()) {
                return self
                    .dead_letter(
                        work,
                        DeadReason::Expired,
                        "expires_at passed while retrying",
                        None,
                        trail.attempts.into(),
                    )
                    .await;
            }
            // Taken before the rate limiter, so the call goes out at the rate the limiter allows.
            if !job.kind().carries_uuid() && keyless.is_none() {
                tokio::select! {
                    biased;
                    _ = self.abort.cancelled() => return Outcome::HandedBack,
                    _ = work.session.alive.cancelled() => return Outcome::HandedBack,
                    permit = self.keyless.clone().acquire_owned() => {
                        keyless = Some(permit.expect("never closed"));
                    }
                }
            }
            tokio::select! {
                biased;
                _ = self.abort.cancelled() => return Outcome::HandedBack,
                _ = work.session.alive.cancelled() => return Outcome::HandedBack,
                _ = self.limiter.acquire() => {}
            }
            // A job whose session is gone is the broker's again: it redelivers it on the next
            // session (to another replica, once there are several), and that copy calls; a call
            // from here would only repeat it.
            if work.session.alive.is_cancelled() {
                return Outcome::HandedBack;
            }
            trail.add_attempt();
            let started = Instant::now();
            let call = self.gate.begin_call();
            let result = self.client.send(job).await;
            self.metrics
                .api_request_duration
                .with_label_values(&[kind.endpoint()])
                .observe(started.elapsed().as_secs_f64());
            let status = match &result {
                Ok(accepted) => accepted.http_status.to_string(),
                Err(failure) => failure.status_label(),
            };
            self.metrics
                .api_requests
                .with_label_values(&[kind.endpoint(), &status])
                .inc();

            let failure = match result {
                Ok(accepted) => {
                    self.gate.record_accepted(call);
                    if self.gate.resume() {
                        info!("Blinger accepts the API token again; resuming");
                    }
                    drop(probe);
                    return self
                        .record_and_ack(work, job, accepted, trail.attempts, keyless.take())
                        .await;
                }
                Err(failure) => failure,
            };
            // Not accepted: nothing to record, and a backoff must not hold the permit.
            keyless = None;
            let decision = decide(
                &failure,
                Facts {
                    probing: probe.is_some(),
                    refused_while_others_accepted: refused_at
                        .is_some_and(|at| self.gate.accepted_since(at)),
                },
            );
            if decision.token_works {
                // The probe steps down and the job goes on with its own retry round.
                if self.gate.resume() {
                    info!("Blinger accepts the API token again; resuming");
                }
                probe = None;
            }
            if decision.throttle {
                self.metrics.rate_limited.inc();
                self.limiter.throttle(failure.retry_after);
            }
            match decision.step {
                Step::DeadLetter { reason, forbidden } => {
                    drop(probe);
                    let detail = if forbidden {
                        format!(
                            "{} (403 for this job while Blinger accepted other jobs: forbidden, \
                             not a token problem)",
                            failure.detail
                        )
                    } else {
                        failure.detail.clone()
                    };
                    return self
                        .dead_letter(work, reason, &detail, failure.status, trail.attempts.into())
                        .await;
                }
                Step::Pause => {
                    if failure.status == Some(403) {
                        refused_at = Some(call);
                    }
                    if self.gate.pause() {
                        error!(
                            status = failure.status,
                            "Blinger refused the API token; pausing: jobs stay queued, \
                             /readyz is false, probing until it works (check BLINGER_API_TOKEN / \
                             BLINGER_API_TOKEN_FILE)"
                        );
                    }
                    // Refused again: another held job (another conversation) probes next.
                    if let Some(p) = probe.take() {
                        p.rotate();
                    }
                }
                Step::ProbeAgain => continue,
                Step::Retry => {
                    let tier = match round.after_failure(failure.retry_after) {
                        Next::Wait(delay) => {
                            debug!(id = %job.id, attempts = trail.attempts, ?delay, error = %failure.detail, "transient failure; retrying");
                            match self.wait_retry(work, delay).await {
                                Waited::Elapsed => {
                                    self.metrics
                                        .jobs_retried
                                        .with_label_values(&[kind.as_str()])
                                        .inc();
                                    continue;
                                }
                                // Its session is gone: the broker redelivers it (see above).
                                Waited::SessionLost => return Outcome::HandedBack,
                                // Shutting down: park now rather than hand the job back.
                                Waited::Stopping => round.park_tier(failure.retry_after),
                            }
                        }
                        Next::Park { tier } => Some(tier),
                        Next::GiveUp => None,
                    };
                    let Some(tier) = tier else {
                        return self
                            .dead_letter(
                                work,
                                DeadReason::RetriesExhausted,
                                &failure.detail,
                                failure.status,
                                trail.attempts.into(),
                            )
                            .await;
                    };
                    self.metrics
                        .jobs_retried
                        .with_label_values(&[kind.as_str()])
                        .inc();
                    self.chains.parked(
                        &job.conversation_id,
                        job.id,
                        work.seq,
                        tier,
                        tokio::time::Instant::now(),
                    );
                    let trail = Trail {
                        retries: trail.retries.saturating_add(1),
                        chain: Some(work.seq),
                        first_seen_ms: Some(self.first_seen_ms(work)),
                        ..trail
                    };
                    return self.park(work, job, tier, trail, Some(&failure)).await;
                }
            }
        }
    }

    fn reload_token(&self) {
        match self.token.load() {
            Ok(token) => {
                if let Err(e) = self.client.set_token(&token) {
                    warn!(error = %e, "cannot use the reloaded API token");
                }
            }
            Err(e) => warn!(error = %e, "cannot reload the API token"),
        }
    }

    async fn record_and_ack(
        &self,
        work: &Work,
        job: &Job,
        accepted: Accepted,
        attempts: u32,
        mut keyless: Option<OwnedSemaphorePermit>,
    ) -> Outcome {
        let record = Delivered {
            delivered_at_ms: now_ms(),
            kind: job.kind().as_str().to_owned(),
            blinger_id: accepted.blinger_id.clone(),
            blinger_status: accepted.blinger_status.clone(),
            attempts,
            digest: Some(job.digest()),
        };
        let mut backoff = STORE_RETRY;
        loop {
            let started = Instant::now();
            match self.store.record(&job.id, &record).await {
                Ok(()) => {
                    self.metrics
                        .store_flush_duration
                        .observe(started.elapsed().as_secs_f64());
                    self.health.set_store_ok(true);
                    // A crash can no longer repeat the call from this store: the next keyless
                    // one may go. In partitioned mode the replica that gets the job next (or this
                    // one, its volume lost) looks in the delivered-records log instead, so the
                    // permit is kept until the record is confirmed there (below).
                    if self.topology.partitioned.is_none() {
                        drop(keyless.take());
                    }
                    break;
                }
                Err(e) => {
                    // Blinger has the job but we cannot prove it after a crash: never ack
                    // without the record. Hold the job and retry; readiness reports the store.
                    self.health.set_store_ok(false);
                    error!(id = %job.id, error = %e, "cannot record a delivery; holding its ack until the store recovers");
                    if !self.sleep_unless(&self.abort, backoff.next_wait()).await {
                        return Outcome::HandedBack;
                    }
                }
            }
        }
        // Delivered once the record is durable, whether or not the ack reaches the broker (a
        // redelivery then counts as a duplicate).
        let kind = job.kind().as_str();
        self.metrics.jobs_delivered.with_label_values(&[kind]).inc();
        self.metrics
            .delivery_latency
            .with_label_values(&[kind])
            .observe(self.latency(work).as_secs_f64());
        if !self
            .delivered_receipt(work, &record, Some(accepted.http_status))
            .await
        {
            return Outcome::HandedBack;
        }
        drop(keyless);
        self.ack(work);
        debug!(id = %job.id, kind, attempts, "delivered");
        Outcome::Delivered
    }

    /// Republishes the job to delay tier `tier` with its sealed `trail`, and acks it. `failure`
    /// is `None` for a job that only follows older jobs of its conversation (its counters are
    /// unchanged then).
    async fn park(
        &self,
        work: &Work,
        job: &Job,
        tier: usize,
        trail: Trail,
        failure: Option<&Failure>,
    ) -> Outcome {
        let mut extra = trail.headers(&work.delivery.data, &self.trail_key);
        if let Some(failure) = failure {
            extra.extend(Annotation::failure(&failure.detail, failure.status).headers());
        }
        let queue = &self.topology.tiers[tier];
        let properties = self.outgoing(work, extra);
        // Durable before the copy exists (see `park_deferred`).
        self.chains_durable().await;
        if !self.republish(work, queue, properties).await {
            // It stays in the chain, handed back, until it is redelivered (`settle`).
            return self.hand_back(work).await;
        }
        self.ack(work);
        if failure.is_some() {
            info!(id = %job.id, queue, "parked in a delay tier");
        } else {
            debug!(id = %job.id, queue, "following older jobs of its conversation");
        }
        Outcome::Parked
    }

    /// The properties of a republish of `work`: the allowlist, and the worker's `own` headers.
    fn outgoing(&self, work: &Work, own: Vec<(&'static str, AMQPValue)>) -> lapin::BasicProperties {
        outgoing::outgoing(&work.delivery.properties, own, work.session.header_budget)
    }

    async fn dead_letter(
        &self,
        work: &Work,
        reason: DeadReason,
        error_text: &str,
        status: Option<u16>,
        attempts: u64,
    ) -> Outcome {
        let note = Annotation::dead_letter(
            reason,
            error_text,
            status,
            attempts,
            work.trail.retries.into(),
            work.trail.first_seen_ms,
        );
        let properties = self.outgoing(work, note.headers());
        let queue = self.topology.dead_letter_queue.clone();
        if !self.republish(work, &queue, properties).await {
            return self.hand_back(work).await;
        }
        self.receipt(work, receipts::Outcome::DeadLettered, Some(reason), |r| {
            r.http_status = status;
            r.attempts = attempts;
        })
        .await;
        self.ack(work);
        let kind = kind_label(work.kind());
        self.metrics
            .jobs_dead_lettered
            .with_label_values(&[kind, reason.as_str()])
            .inc();
        let id = work
            .job
            .as_ref()
            .map(|j| j.id.to_string())
            .unwrap_or_default();
        warn!(id, kind, reason = reason.as_str(), error = %clip_error(error_text), "dead-lettered");
        Outcome::DeadLettered(reason)
    }

    /// Publishes a copy of the delivery to `queue` and waits for its confirm, trying three
    /// times. False if it did not go out (the caller hands the delivery back).
    async fn republish(
        &self,
        work: &Work,
        queue: &str,
        properties: lapin::BasicProperties,
    ) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::MAX).with_factor(4);
        for attempt in 1..=3 {
            if work.session.alive.is_cancelled() {
                return false;
            }
            let published =
                work.session
                    .outbox
                    .republish(queue, &work.delivery.data, properties.clone());
            match on_session(work, published).await {
                Some(Ok(())) => return true,
                Some(Err(e)) => warn!(queue, attempt, error = %e, "republish failed"),
                None => warn!(queue, attempt, "republish not confirmed"),
            }
            if attempt < 3 && !self.sleep_unless(&self.abort, backoff.next_wait()).await {
                return false;
            }
        }
        false
    }

    /// Gives the delivery back to the broker now (nack with requeue), so it is not held until
    /// the session ends.
    async fn hand_back(&self, work: &Work) -> Outcome {
        let nack = work.session.outbox.hand_back(work.delivery.delivery_tag);
        if let Some(Err(e)) = on_session(work, nack).await {
            debug!(error = %e, "hand-back failed; the broker redelivers when the session ends");
        }
        Outcome::HandedBack
    }

    /// The `delivered` receipt of a job whose record is durable in the store, before its ack.
    ///
    /// In single-queue mode that is [`Pipeline::receipt`]: best effort. In partitioned mode the
    /// receipt is also the job's record in the delivered-records log, which is how every other
    /// replica, and this one after losing its volume, knows the job was sent
    /// ([`crate::contract::delivered_log`]): it is sealed, published even with receipts off
    /// (straight to the log then), and must be confirmed. Until it is, the job is held, unacked,
    /// and the publish retried, like a store write that fails. False when the job's session was
    /// lost or the shutdown grace ended first: the caller hands the job back.
    async fn delivered_receipt(
        &self,
        work: &Work,
        record: &Delivered,
        http_status: Option<u16>,
    ) -> bool {
        let fill = |r: &mut Receipt| {
            r.blinger_message_id = record.blinger_id.clone();
            r.blinger_status = record.blinger_status.clone();
            r.http_status = http_status;
            r.attempts = record.attempts.into();
        };
        let Some(partitioned) = &self.topology.partitioned else {
            self.receipt(work, receipts::Outcome::Delivered, None, fill)
                .await;
            return true;
        };
        let mut receipt = self.receipt_of(work, receipts::Outcome::Delivered, None);
        fill(&mut receipt);
        let (routing_key, body, properties) = receipts::message(&receipt);
        let mut headers = FieldTable::default();
        for (name, value) in
            delivered_log::record_headers(&body, record.digest.as_deref(), &self.trail_key)
        {
            headers.insert(name.into(), value);
        }
        let properties = properties.with_headers(headers);
        let (exchange, routing_key) = match &self.receipts {
            Some(exchange) => (exchange.as_str(), routing_key),
            None => ("", partitioned.log.clone()),
        };
        let mut backoff = STORE_RETRY;
        loop {
            let published = work.session.outbox.publish(
                exchange,
                &routing_key,
                body.clone(),
                properties.clone(),
            );
            let error = match on_session(work, published).await {
                Some(Ok(())) => {
                    self.health.set_log_writable(true);
                    return true;
                }
                None if work.session.alive.is_cancelled() => return false,
                None => "no confirm in time".to_owned(),
                Some(Err(e)) => e.to_string(),
            };
            self.metrics.log_publish_failed.inc();
            self.health.set_log_writable(false);
            error!(id = ?receipt.id, %error, "the delivered-records log did not take a record; holding the job's ack until it does");
            if !self.sleep_unless(&self.abort, backoff.next_wait()).await {
                return false;
            }
        }
    }

    /// The receipt of `work`, its outcome fields left for the caller.
    fn receipt_of(
        &self,
        work: &Work,
        outcome: receipts::Outcome,
        reason: Option<DeadReason>,
    ) -> Receipt {
        let job = work.job.as_ref().ok();
        Receipt {
            id: job.map(|j| j.id.to_string()),
            kind: kind_label(work.kind()).to_owned(),
            conversation_id: job.map(|j| j.conversation_id.clone()),
            outcome,
            reason: reason.map(DeadReason::as_str),
            blinger_message_id: None,
            blinger_status: None,
            http_status: None,
            attempts: 0,
            received_at: receipts::timestamp(self.first_seen_ms(work)),
            finished_at: receipts::timestamp(now_ms()),
        }
    }

    /// Publishes the job's receipt, when receipts are on. Never fails the job.
    async fn receipt(
        &self,
        work: &Work,
        outcome: receipts::Outcome,
        reason: Option<DeadReason>,
        fill: impl FnOnce(&mut Receipt),
    ) {
        let Some(exchange) = &self.receipts else {
            return;
        };
        let mut receipt = self.receipt_of(work, outcome, reason);
        fill(&mut receipt);
        let (routing_key, body, properties) = receipts::message(&receipt);
        let published = work
            .session
            .outbox
            .publish(exchange, &routing_key, body, properties);
        match on_session(work, published).await {
            // Unrouted receipts (nobody bound to the exchange) are fine.
            Some(Ok(()) | Err(broker::AmqpError::Unroutable(_))) => {}
            failed => {
                self.metrics.receipts_failed.inc();
                warn!(id = ?receipt.id, outcome = ?failed.map(|r| r.err().map(|e| e.to_string())), "receipt not published");
            }
        }
    }

    /// Hands the delivery to its session's ack batcher (sent within milliseconds). If the
    /// session is lost first, the broker redelivers and the store makes that a duplicate.
    fn ack(&self, work: &Work) {
        work.session.outbox.ack(work.delivery.delivery_tag);
    }

    fn first_seen_ms(&self, work: &Work) -> u64 {
        work.trail.first_seen_ms.unwrap_or(work.received_ms)
    }

    /// From the AMQP timestamp (seconds, or milliseconds if the publisher wrote those), else
    /// from the first receipt.
    fn latency(&self, work: &Work) -> Duration {
        let now = now_ms();
        let start_ms = broker::timestamp_ms(&work.delivery.properties)
            .unwrap_or_else(|| self.first_seen_ms(work));
        Duration::from_millis(now.saturating_sub(start_ms))
    }

    /// The backoff before the next in-process attempt, cut short by shutdown or by the loss of
    /// the job's session.
    async fn wait_retry(&self, work: &Work, delay: Duration) -> Waited {
        tokio::select! {
            biased;
            _ = self.stopping.cancelled() => Waited::Stopping,
            _ = work.session.alive.cancelled() => Waited::SessionLost,
            _ = tokio::time::sleep(delay) => Waited::Elapsed,
        }
    }

    /// Sleeps, unless `stop` fires first (returns false then).
    async fn sleep_unless(&self, stop: &CancellationToken, delay: Duration) -> bool {
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// How a retry backoff ended.
enum Waited {
    Elapsed,
    Stopping,
    SessionLost,
}

/// The chains, kept in the store across restarts.
fn chains(store: &Store, policy: &RetryPolicy) -> Chains {
    struct InStore(Store);
    impl crate::engine::order::Journal for InStore {
        fn write(&self, conversation: &str, members: &[crate::engine::order::SavedMember]) {
            self.0.write_chain(conversation, members);
        }
        fn know(&self, id: uuid::Uuid, known: Option<crate::engine::order::SavedKnown>) {
            self.0.write_known(&id, known);
        }
    }
    let restored = store
        .chains()
        .and_then(|chains| {
            Ok(crate::engine::order::Restored {
                chains,
                known: store.known()?,
            })
        })
        .unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the chains of the last run: jobs may overtake jobs out in the delay tiers");
            crate::engine::order::Restored::default()
        });
    Chains::with_journal(
        policy.tiers.clone(),
        Box::new(InStore(store.clone())),
        restored,
    )
}

/// Waits while the store cannot be read or written: 0.5 s doubling to 5 s, short so work resumes
/// soon after the disk has room again.
const STORE_RETRY: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));

/// Longest wait for the broker to answer an ack, nack or publish.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a broker operation for a delivery, unless its session dies first or the broker does not
/// answer in time. lapin does not always fail operations on a connection that died under them,
/// and a stuck ack would stall the delivery's whole conversation.
async fn on_session<T>(work: &Work, operation: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        biased;
        _ = work.session.alive.cancelled() => None,
        result = tokio::time::timeout(BROKER_TIMEOUT, operation) => result.ok(),
    }
}

/// Resolves when the job's `expires_at` passes; never for a job without one.
async fn until_expiry(job: &Job) {
    match job.expires_at {
        Some(at) => {
            let left = at - time::OffsetDateTime::now_utc();
            tokio::time::sleep(left.try_into().unwrap_or(Duration::ZERO)).await;
        }
        None => std::future::pending().await,
    }
}

/// The pipeline without a broker: each job goes through [`Pipeline::process`] with an in-memory
/// outbox, against the sandbox Blinger over HTTP and a real store. What the pipeline asks of the
/// broker is the outbox's record; the integration tests run the same paths on RabbitMQ.
#[cfg(test)]
pub(crate) mod tests {
    use std::num::NonZeroU32;

    use blinger_sandbox::{Sandbox, SandboxConfig};
    use clap::Parser;

    use super::*;
    use crate::broker::outbox::{MemoryOutbox, Sent};
    use crate::config::{AmqpSettings, Secret};
    use crate::contract::job;

    const TOKEN: &str = "unit-token";

    /// A pipeline whose broker is a [`MemoryOutbox`] and whose Blinger is the sandbox.
    pub(crate) struct World {
        pub(crate) pipeline: Arc<Pipeline>,
        pub(crate) outbox: Arc<MemoryOutbox>,
        pub(crate) session: Arc<SessionLink>,
        pub(crate) sandbox: Sandbox,
        _dir: tempfile::TempDir,
    }

    pub(crate) async fn world() -> World {
        world_with(&[], None).await
    }

    /// A world with more AMQP flags, and a cap on keyless calls at once.
    pub(crate) async fn world_with(flags: &[&str], keyless: Option<usize>) -> World {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            amqp: AmqpSettings,
        }
        let args = ["t", "--queue", "unit", "--retry-delays", "1s,5s"]
            .iter()
            .chain(flags)
            .copied();
        let settings = Cli::parse_from(args).amqp;
        let sandbox = Sandbox::start(
            "127.0.0.1:0".parse().unwrap(),
            SandboxConfig::with_token(TOKEN),
            None,
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new();
        let health = Health::new(metrics.clone());
        let pipeline = Pipeline::new(Parts {
            client: Client::new(
                &url::Url::parse(&sandbox.base_url()).unwrap(),
                &Secret::new(TOKEN),
                Duration::from_secs(5),
            )
            .unwrap(),
            token: TokenSource::Literal(Secret::new(TOKEN)),
            store: Store::open(dir.path()).unwrap(),
            limiter: Arc::new(Limiter::new(
                NonZeroU32::new(1000).unwrap(),
                NonZeroU32::new(100).unwrap(),
            )),
            policy: RetryPolicy {
                initial_interval: Duration::from_millis(1),
                max_interval: Duration::from_millis(2),
                ..RetryPolicy::new(2, settings.retry_delays.0.clone())
            },
            topology: Topology::new(&settings),
            metrics,
            health,
            stopping: CancellationToken::new(),
            trail_key: TrailKey::load(None, dir.path()).unwrap(),
            receipts: Some("unit.events".into()),
            keyless_concurrency: keyless,
        });
        let outbox = Arc::new(MemoryOutbox::default());
        let session = Arc::new(SessionLink {
            outbox: outbox.clone(),
            alive: CancellationToken::new(),
            header_budget: outgoing::DEFAULT_HEADER_BUDGET,
            group: 0,
        });
        World {
            pipeline: Arc::new(pipeline),
            outbox,
            session,
            sandbox,
            _dir: dir,
        }
    }

    impl World {
        async fn run(&self, tag: u64, body: serde_json::Value) -> Outcome {
            let data = body.to_string().into_bytes();
            let delivery = Delivery::mock(tag, "".into(), "send-text".into(), false, data);
            let job = job::decode(&delivery.data, 256 * 1024);
            let (trail, _) = Trail::decode(
                &delivery.properties,
                &delivery.data,
                self.pipeline.trail_key(),
            );
            let seq = job
                .as_ref()
                .map_or(0, |job| self.pipeline.arrived(job, &trail));
            let work = Work {
                delivery,
                session: self.session.clone(),
                job,
                trail,
                seq,
                received_ms: now_ms(),
            };
            self.pipeline.process(work, None).await
        }

        /// The republishes so far: (queue, x-blinger-reason header).
        fn republished(&self) -> Vec<(String, Option<String>)> {
            self.outbox
                .sent()
                .into_iter()
                .filter_map(|s| match s {
                    Sent::Republish {
                        queue, properties, ..
                    } => Some((queue, Annotation::read(&properties).reason)),
                    _ => None,
                })
                .collect()
        }
    }

    pub(crate) fn text(conversation: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": "send-text",
            "id": uuid::Uuid::new_v4().to_string(),
            "conversation_id": conversation,
            "text": "hi",
        })
    }

    /// Partitioned mode: the next keyless call waits until the previous one's record is
    /// confirmed in the delivered-records log, not only in the local store. The replica that
    /// gets a job after a crash looks in the log; with the permit given back at the local record
    /// (as before), a kill between the two left two keyless calls unrecorded there, and both were
    /// made again by the next replica (scenario 14: 2 second calls for one kill with
    /// `BLINGER_WORKER_KEYLESS_CONCURRENCY` 1).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_keyless_call_waits_until_the_one_before_is_recorded_in_the_log() {
        let w = Arc::new(world_with(&["--partitions", "1"], Some(1)).await);
        let keyless = |conversation: &str| {
            serde_json::json!({"kind": "request-review", "id": uuid::Uuid::new_v4().to_string(),
                               "conversation_id": conversation})
        };
        w.outbox.hold_publishes();
        let first = {
            let (w, job) = (w.clone(), keyless("c-1"));
            tokio::spawn(async move { w.run(1, job).await })
        };
        let calls = || w.sandbox.requests().len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while calls() < 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(calls(), 1, "the first call is made");
        let second = {
            let (w, job) = (w.clone(), keyless("c-2"));
            tokio::spawn(async move { w.run(2, job).await })
        };
        // The first one's record is in the local store, not yet in the log.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            calls(),
            1,
            "no second keyless call before the first is in the log"
        );
        w.outbox.release_publishes();
        assert_eq!(first.await.unwrap(), Outcome::Delivered);
        assert_eq!(second.await.unwrap(), Outcome::Delivered);
        assert_eq!(calls(), 2);
    }

    #[tokio::test]
    async fn a_delivered_job_is_recorded_receipted_then_acked_and_a_redelivery_is_not_sent() {
        let w = world().await;
        let job = text("c1");
        assert_eq!(w.run(1, job.clone()).await, Outcome::Delivered);
        let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
        assert!(w.pipeline.store().get(&id).unwrap().is_some(), "recorded");
        let sent = w.outbox.sent();
        assert!(
            matches!(&sent[..], [Sent::Publish { routing_key, .. }, Sent::Ack(1)] if routing_key == "delivered.send-text"),
            "{sent:?}"
        );
        assert_eq!(w.run(2, job).await, Outcome::Duplicate);
        assert_eq!(w.sandbox.requests().len(), 1, "sent once");
        assert_eq!(w.outbox.sent().last(), Some(&Sent::Ack(2)));
    }

    #[tokio::test]
    async fn a_permanent_rejection_is_dead_lettered_with_its_reason_then_acked() {
        let w = world().await;
        w.sandbox.update(|c| c.status_override = Some(422));
        let outcome = w.run(1, text("c1")).await;
        assert_eq!(outcome, Outcome::DeadLettered(DeadReason::Rejected));
        let dlq = w.pipeline.topology().dead_letter_queue.clone();
        assert_eq!(w.republished(), [(dlq, Some("rejected".into()))]);
        assert_eq!(w.outbox.sent().last(), Some(&Sent::Ack(1)));
        assert!(
            w.pipeline
                .store()
                .get(&uuid::Uuid::nil())
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn transient_failures_park_in_the_first_tier_and_a_refused_copy_is_handed_back() {
        let w = world().await;
        w.sandbox.update(|c| c.status_override = Some(503));
        assert_eq!(w.run(1, text("c1")).await, Outcome::Parked);
        let tier = w.pipeline.topology().tiers[0].clone();
        assert_eq!(w.republished(), [(tier.clone(), None)]);
        assert_eq!(w.outbox.sent().last(), Some(&Sent::Ack(1)));
        assert_eq!(w.sandbox.requests().len(), 2, "the round's two calls");
        // The broker does not take the copy: never acked, given back to be tried again.
        w.outbox.refuse(&tier);
        assert_eq!(w.run(2, text("c2")).await, Outcome::HandedBack);
        let sent = w.outbox.sent();
        assert_eq!(sent.last(), Some(&Sent::HandBack(2)));
        assert!(!sent.contains(&Sent::Ack(2)));
    }

    #[tokio::test]
    async fn an_invalid_body_is_dead_lettered_without_a_call() {
        let w = world().await;
        let outcome = w.run(1, serde_json::json!({"kind": "send-text"})).await;
        assert_eq!(outcome, Outcome::DeadLettered(DeadReason::Invalid));
        assert!(w.sandbox.requests().is_empty());
        assert_eq!(w.outbox.sent().last(), Some(&Sent::Ack(1)));
    }
}
