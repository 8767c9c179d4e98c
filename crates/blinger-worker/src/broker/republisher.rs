//! Republishing with exact publisher confirms: delay tiers and the dead-letter queue.
//!
//! A republish is mandatory: a tier or dead-letter queue that is gone must make the republish
//! fail (the job is then handed back), never let the original be acked while the copy is
//! dropped. RabbitMQ answers an unroutable mandatory publish with `basic.return` and then
//! `basic.ack`, but lapin does not tie a return to its publish: it hands the oldest waiting
//! return to whichever confirm it resolves next, and RabbitMQ acks several publishes in one
//! `multiple` ack under load. On a channel with concurrent publishes, a returned park can thus
//! look confirmed (the job is acked and lost) while another publish looks unroutable
//! (crates/blinger-worker/tests/republish.rs measured it on one shared channel).
//!
//! So each republish has a channel of its own while it is in flight: a small pool of channels in
//! confirm mode, each carrying one publish at a time, so the only return a confirm can carry is
//! its own. A channel is given back only when its confirm resolved (or the channel failed), even
//! if the caller stopped waiting: the next publish on it cannot inherit an old return. Receipts
//! are not mandatory and keep their own pipelined channel (see [`crate::contract::receipts`]).

use std::sync::{Arc, Mutex};

use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Semaphore;

use super::{AmqpError, publish_confirmed};

/// Republishes in flight at once per session. A quorum queue confirms in a few milliseconds
/// (one fsync), so this pool carries thousands of parks a second, far beyond what a Blinger
/// outage asks (one park per job per retry round).
pub const CHANNELS: usize = 8;

pub struct Republisher {
    free: Arc<Mutex<Vec<Channel>>>,
    permits: Arc<Semaphore>,
    all: Vec<Channel>,
}

impl Republisher {
    /// Opens `channels` channels in confirm mode on `connection`.
    pub async fn open(connection: &Connection, channels: usize) -> Result<Self, lapin::Error> {
        let mut all = Vec::with_capacity(channels);
        for _ in 0..channels.max(1) {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            all.push(channel);
        }
        Ok(Republisher {
            free: Arc::new(Mutex::new(all.clone())),
            permits: Arc::new(Semaphore::new(all.len())),
            all,
        })
    }

    /// Publishes `body` to `queue` (default exchange, mandatory, persistent as `properties`
    /// say) and waits for its own confirm: `Ok` only if the broker routed it to the queue and
    /// confirmed it. Cancel-safe: dropping the future leaves the channel busy until its confirm
    /// resolves.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let channel = self
            .free
            .lock()
            .expect("republisher lock")
            .pop()
            .expect("a permit means a free channel");
        let free = self.free.clone();
        let queue = queue.to_owned();
        let body = body.to_vec();
        // Its own task: the channel goes back only after its confirm, whatever the caller does.
        let publishing = tokio::spawn(async move {
            let result = publish_confirmed(&channel, "", &queue, &body, properties).await;
            free.lock().expect("republisher lock").push(channel);
            drop(permit);
            result
        });
        match publishing.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(AmqpError::Abandoned),
        }
    }

    /// Whether every channel is still open (a channel error closes one: the session is lost).
    pub fn connected(&self) -> bool {
        self.all.iter().all(|c| c.status().connected())
    }

    /// Closes the channels.
    pub async fn close(&self) {
        for channel in &self.all {
            let _ = channel.close(200, "shutdown".into()).await;
        }
    }
}
