//! The dispatcher: per-conversation lanes over a bounded pool of concurrent jobs.
//!
//! Messages arrive in the order the broker delivers them. Each conversation gets a lane (a FIFO
//! of its jobs) worked by one task at a time, so jobs of one conversation are sent in the order
//! they were consumed; lanes of different conversations run concurrently, at most `concurrency`
//! jobs at once (a fair semaphore, taken per job, so a busy or retrying conversation holds one
//! slot at most and never holds up the others; jobs waiting for a keyless permit, see
//! [`Pipeline::keyless`], hold no slot). Invalid messages need no order: they are
//! dead-lettered straight away.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use lapin::message::Delivery;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::job;
use crate::pipeline::{Pipeline, SessionLink, Work};
use crate::store::now_ms;
use crate::telemetry::kind_label;

pub struct Dispatcher {
    pipeline: Arc<Pipeline>,
    lanes: Mutex<HashMap<String, VecDeque<Work>>>,
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    max_body_bytes: usize,
}

impl Dispatcher {
    pub fn new(pipeline: Arc<Pipeline>, concurrency: usize, max_body_bytes: usize) -> Arc<Self> {
        Arc::new(Dispatcher {
            pipeline,
            lanes: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(concurrency)),
            tasks: TaskTracker::new(),
            max_body_bytes,
        })
    }

    /// Takes one delivery. Never blocks: the prefetch limit bounds what can be waiting.
    pub fn submit(self: &Arc<Self>, delivery: Delivery, session: &Arc<SessionLink>) {
        session.acks.received(delivery.delivery_tag);
        let job = job::decode(&delivery.data, self.max_body_bytes);
        let work = Work {
            delivery,
            session: session.clone(),
            job,
            received_ms: now_ms(),
        };
        self.pipeline
            .metrics
            .jobs_received
            .with_label_values(&[kind_label(work.kind())])
            .inc();
        let conversation = match &work.job {
            Ok(job) => job.conversation_id.clone(),
            Err(_) => {
                let this = self.clone();
                self.tasks.spawn(async move {
                    let _permit = this
                        .permits
                        .acquire()
                        .await
                        .expect("semaphore never closed");
                    Box::pin(this.pipeline.process(work, None)).await;
                });
                return;
            }
        };
        {
            let mut lanes = self.lanes.lock().expect("lanes lock");
            if let Some(lane) = lanes.get_mut(&conversation) {
                lane.push_back(work);
                return;
            }
            lanes.insert(conversation.clone(), VecDeque::from([work]));
        }
        let this = self.clone();
        self.tasks
            .spawn(async move { this.run_lane(conversation).await });
    }

    async fn run_lane(self: Arc<Self>, conversation: String) {
        loop {
            let work = {
                let mut lanes = self.lanes.lock().expect("lanes lock");
                let lane = lanes.get_mut(&conversation).expect("a running lane exists");
                match lane.pop_front() {
                    Some(work) => work,
                    None => {
                        lanes.remove(&conversation);
                        return;
                    }
                }
            };
            // A keyless job waits for its keyless permit before taking a slot, so a queue of
            // them never holds up other conversations.
            let keyless = match &work.job {
                Ok(job) if !job.kind().carries_uuid() => Some(
                    self.pipeline
                        .keyless
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("semaphore never closed"),
                ),
                _ => None,
            };
            let _permit = self
                .permits
                .acquire()
                .await
                .expect("semaphore never closed");
            // Boxed: a job's future is kilobytes (the HTTP call's state), and a lane waiting for
            // a slot should not carry one; only the jobs running at once do.
            Box::pin(self.pipeline.process(work, keyless)).await;
        }
    }

    /// Jobs held in lanes and not yet started, plus running ones.
    pub fn pending(&self) -> usize {
        self.lanes
            .lock()
            .expect("lanes lock")
            .values()
            .map(VecDeque::len)
            .sum::<usize>()
            + self.tasks.len()
    }

    /// Waits until every lane and task has finished. Call after consumption stopped.
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}
