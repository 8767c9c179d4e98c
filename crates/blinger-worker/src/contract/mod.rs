//! The public contract with publishers, decoded once at the edge: the job body ([`job`]), the
//! worker's own sealed `x-blinger-*` headers on a job ([`trail`]), the note it writes on parked
//! and dead-lettered copies ([`annotation`]), why it dead-letters ([`reason`]), the outcome
//! events it publishes ([`receipts`]) and, in partitioned mode, the sealed form in which a
//! `delivered` receipt is the job's record in the delivered-records log ([`delivered_log`]) and
//! what the replicas say to each other ([`members`]).
//! Other services rely on these shapes: extend them, never change them.

pub mod annotation;
pub mod delivered_log;
pub mod job;
pub mod members;
pub mod reason;
pub mod receipts;
pub mod trail;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// An instant as the contract writes it (receipts, `dlq`, `store`): RFC 3339 in UTC, with the
/// fraction of a second only when there is one. None for an instant `time` cannot represent.
pub fn rfc3339_ms(unix_ms: u64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()?
        .format(&Rfc3339)
        .ok()
}
