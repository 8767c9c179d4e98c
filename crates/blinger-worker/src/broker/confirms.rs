//! Publisher confirms, read one way everywhere, and a window of them settled in publish order.
//!
//! [`judge`] is the one reading of a confirm: only a plain ack means the message is queued; a
//! mandatory publish that came back is acked *with* the returned message, and that is a failure.
//!
//! [`ConfirmWindow`] is the pipelined publisher of the operator commands (`publish`,
//! `dlq replay`): up to `window` publishes in flight, settled oldest first. lapin hands a
//! `basic.return` to the next confirm it resolves, which under RabbitMQ's batched acks may
//! belong to another publish; so after the first refusal, no later ack proves that its own
//! message was routed, and the window reports those as [`Settled::AfterRefusal`] (the caller
//! keeps the source: a possible duplicate, never a loss). The worker's own republishes do not
//! need this: they go one at a time per channel ([`super::Republisher`]).

use std::collections::VecDeque;
use std::future::Future;

use lapin::{Confirmation, PublisherConfirm};

/// How the broker refused one confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("the exchange routed the message to no queue (is the topology declared?)")]
    Unroutable,
}

/// The one reading of a publisher confirm.
pub fn judge(confirmation: Confirmation) -> Result<(), ConfirmError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(ConfirmError::Unroutable),
        Confirmation::Nack(_) => Err(ConfirmError::Nacked),
    }
}

/// What became of one publish of a [`ConfirmWindow`], with what the caller attached to it.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled<T> {
    /// Queued: the broker acked it and nothing was refused before it.
    Confirmed(T),
    /// The broker refused this one.
    Refused(T, ConfirmError),
    /// Not known to be queued: an earlier publish of the window was refused (the error).
    AfterRefusal(T, ConfirmError),
}

/// Publishes in flight, settled in the order they were published. `C` is the confirm
/// (lapin's [`PublisherConfirm`]; any future of a confirmation in unit tests).
pub struct ConfirmWindow<T, C = PublisherConfirm> {
    window: usize,
    pending: VecDeque<(T, C)>,
    first_refusal: Option<ConfirmError>,
}

impl<T, C> ConfirmWindow<T, C>
where
    C: Future<Output = lapin::Result<Confirmation>>,
{
    /// A window of at most `window` outstanding confirms (at least 1).
    pub fn new(window: usize) -> Self {
        ConfirmWindow {
            window: window.max(1),
            pending: VecDeque::new(),
            first_refusal: None,
        }
    }

    /// Whether another publish must wait for [`ConfirmWindow::settle_oldest`] first.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.window
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The first refusal so far: once there is one, callers stop publishing.
    pub fn first_refusal(&self) -> Option<ConfirmError> {
        self.first_refusal
    }

    /// Adds a publish whose confirm is `confirm`.
    pub fn push(&mut self, item: T, confirm: C) {
        self.pending.push_back((item, confirm));
    }

    /// Waits for the oldest confirm; `None` when nothing is in flight. An error is the
    /// channel's (the connection or channel closed): nothing is known of what was in flight.
    pub async fn settle_oldest(&mut self) -> lapin::Result<Option<Settled<T>>> {
        let Some((item, confirm)) = self.pending.pop_front() else {
            return Ok(None);
        };
        let verdict = judge(confirm.await?);
        Ok(Some(match (self.first_refusal, verdict) {
            (Some(earlier), _) => Settled::AfterRefusal(item, earlier),
            (None, Ok(())) => Settled::Confirmed(item),
            (None, Err(error)) => {
                self.first_refusal = Some(error);
                Settled::Refused(item, error)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Ready;

    fn answer(c: Confirmation) -> Ready<lapin::Result<Confirmation>> {
        std::future::ready(Ok(c))
    }

    #[test]
    fn only_a_plain_ack_is_queued() {
        assert_eq!(judge(Confirmation::Ack(None)), Ok(()));
        assert_eq!(judge(Confirmation::NotRequested), Ok(()));
        assert_eq!(judge(Confirmation::Nack(None)), Err(ConfirmError::Nacked));
    }

    #[tokio::test]
    async fn settles_in_publish_order_and_distrusts_acks_after_a_refusal() {
        let mut w = ConfirmWindow::new(8);
        w.push(1, answer(Confirmation::Ack(None)));
        w.push(2, answer(Confirmation::Nack(None)));
        w.push(3, answer(Confirmation::Ack(None)));
        w.push(4, answer(Confirmation::Nack(None)));
        let mut got = Vec::new();
        while let Some(s) = w.settle_oldest().await.unwrap() {
            got.push(s);
        }
        assert_eq!(
            got,
            vec![
                Settled::Confirmed(1),
                Settled::Refused(2, ConfirmError::Nacked),
                Settled::AfterRefusal(3, ConfirmError::Nacked),
                Settled::AfterRefusal(4, ConfirmError::Nacked),
            ]
        );
        assert_eq!(w.first_refusal(), Some(ConfirmError::Nacked));
        assert!(w.is_empty());
    }

    #[tokio::test]
    async fn is_full_at_the_window() {
        let mut w = ConfirmWindow::new(2);
        w.push((), answer(Confirmation::Ack(None)));
        assert!(!w.is_full());
        w.push((), answer(Confirmation::Ack(None)));
        assert!(w.is_full());
        w.settle_oldest().await.unwrap();
        assert!(!w.is_full());
        assert!(ConfirmWindow::<(), Ready<_>>::new(0).window == 1);
    }
}
