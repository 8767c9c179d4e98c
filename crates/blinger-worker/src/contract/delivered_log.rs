//! What partitioned mode writes to, and reads from, the delivered-records log: the stream
//! `{queue}.log` (docs/scale-out.md 4.5). Pure encoding and decoding; the I/O is
//! [`crate::broker::log`].
//!
//! A delivered record *is* the job's `delivered` receipt: the same public body, with two headers
//! added, so the log costs no publish of its own when receipts are on (the stream is bound to the
//! receipts exchange with `delivered.#`):
//! - `x-blinger-digest`: the job's digest ([`crate::contract::job::Job::digest`]), so that another
//!   job under a used id is told apart from a redelivery on every replica, not only the sender;
//! - `x-blinger-seal`: an HMAC-SHA256 (first 128 bits, hex) under the trail key over the body and
//!   the digest. Anyone allowed to publish to the receipts exchange could otherwise forge
//!   "delivered" records and make jobs vanish unsent; a record whose seal does not verify is
//!   ignored and counted, never applied.
//!
//! The log also carries markers (`x-blinger-log-marker`, no body): a worker publishes one and
//! reads the log until it finds it again, and so knows it has read everything written before.
//!
//! Decoding is total: every message of the stream is a [`Entry`] or one named [`Unusable`].

use hmac::Mac;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::contract::trail::TrailKey;
use crate::store::Delivered;

/// Headers of the log, written by the worker only.
pub mod headers {
    /// The job's digest, on a delivered record.
    pub const DIGEST: &str = "x-blinger-digest";
    /// The record's seal.
    pub const SEAL: &str = "x-blinger-seal";
    /// A catch-up marker's id.
    pub const MARKER: &str = "x-blinger-log-marker";
}

/// Bytes of the HMAC kept in the seal.
const SEAL_BYTES: usize = 16;
/// Largest record body: receipts are a few hundred bytes; anything this large is not ours.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// One message of the log, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A job Blinger accepted, as its sender recorded it.
    Delivered { id: Uuid, record: Delivered },
    /// A catch-up marker.
    Marker(Uuid),
}

/// Why a message of the log is not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// No seal, or one that does not verify under this deployment's key: forged, or written
    /// under another trail key (replicas that do not share `BLINGER_WORKER_TRAIL_KEY`).
    #[error("the record's seal does not verify (forged, or another trail key)")]
    Unsealed,
    /// Sealed, but not a delivered record this version can read.
    #[error("the record cannot be read: {0}")]
    Unreadable(&'static str),
}

/// The receipt fields a delivered record needs (the body is the public receipt).
#[derive(Deserialize)]
struct Body {
    id: Option<String>,
    kind: String,
    outcome: String,
    blinger_message_id: Option<String>,
    blinger_status: Option<String>,
    attempts: u64,
    finished_at: String,
}

fn seal(key: &TrailKey, body: &[u8], digest: Option<&str>) -> hmac::Hmac<Sha256> {
    let mut mac = key.mac(b"blinger-worker/log/v1\0");
    mac.update(&Sha256::digest(body));
    match digest {
        Some(d) => {
            mac.update(&[1]);
            mac.update(&(d.len() as u64).to_be_bytes());
            mac.update(d.as_bytes());
        }
        None => mac.update(&[0]),
    }
    mac
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The headers that make the receipt `body` a delivered record: its digest (when the record has
/// one) and the seal.
pub fn record_headers(
    body: &[u8],
    digest: Option<&str>,
    key: &TrailKey,
) -> Vec<(&'static str, AMQPValue)> {
    let tag = seal(key, body, digest).finalize().into_bytes();
    let mut out = vec![(headers::SEAL, string(&hex::encode(&tag[..SEAL_BYTES])))];
    if let Some(digest) = digest {
        out.push((headers::DIGEST, string(digest)));
    }
    out
}

/// A new catch-up marker: its id and the properties that carry it (the body is empty).
pub fn marker() -> (Uuid, BasicProperties) {
    let id = Uuid::new_v4();
    let mut table = FieldTable::default();
    table.insert(headers::MARKER.into(), string(&id.to_string()));
    (id, BasicProperties::default().with_headers(table))
}

fn text<'a>(table: &'a FieldTable, name: &str) -> Option<&'a [u8]> {
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Decodes one message of the log.
pub fn decode(
    properties: &BasicProperties,
    body: &[u8],
    key: &TrailKey,
) -> Result<Entry, Unusable> {
    let empty = FieldTable::default();
    let table = properties.headers().as_ref().unwrap_or(&empty);
    if let Some(marker) = text(table, headers::MARKER) {
        return std::str::from_utf8(marker)
            .ok()
            .and_then(|m| Uuid::parse_str(m).ok())
            .map(Entry::Marker)
            .ok_or(Unusable::Unreadable("marker id"));
    }
    let digest = match text(table, headers::DIGEST) {
        None => None,
        Some(d) => Some(
            std::str::from_utf8(d)
                .ok()
                .filter(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or(Unusable::Unsealed)?,
        ),
    };
    let sealed = text(table, headers::SEAL)
        .and_then(|s| hex::decode(s).ok())
        .filter(|tag| tag.len() == SEAL_BYTES)
        .is_some_and(|tag| seal(key, body, digest).verify_truncated_left(&tag).is_ok());
    if !sealed {
        return Err(Unusable::Unsealed);
    }
    if body.len() > MAX_RECORD_BYTES {
        return Err(Unusable::Unreadable("body too large"));
    }
    let parsed: Body =
        serde_json::from_slice(body).map_err(|_| Unusable::Unreadable("not a receipt"))?;
    if parsed.outcome != "delivered" {
        return Err(Unusable::Unreadable("not a delivered receipt"));
    }
    let id = parsed
        .id
        .as_deref()
        .and_then(|id| Uuid::parse_str(id).ok())
        .ok_or(Unusable::Unreadable("job id"))?;
    let delivered_at_ms = OffsetDateTime::parse(&parsed.finished_at, &Rfc3339)
        .ok()
        .and_then(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
        .ok_or(Unusable::Unreadable("finished_at"))?;
    Ok(Entry::Delivered {
        id,
        record: Delivered {
            delivered_at_ms,
            kind: parsed.kind,
            blinger_id: parsed.blinger_message_id,
            blinger_status: parsed.blinger_status,
            attempts: u32::try_from(parsed.attempts).unwrap_or(u32::MAX),
            digest: digest.map(str::to_owned),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::receipts::{self, Outcome, Receipt};
    use proptest::prelude::*;

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn receipt(outcome: Outcome) -> Vec<u8> {
        let r = Receipt {
            id: Some("554f11c1-ec1e-4fdb-9953-bfad33013f58".into()),
            kind: "send-text".into(),
            conversation_id: Some("c1".into()),
            outcome,
            reason: None,
            blinger_message_id: Some("m-1".into()),
            blinger_status: Some("delivered".into()),
            http_status: Some(200),
            attempts: 2,
            received_at: receipts::timestamp(1_700_000_000_000),
            finished_at: receipts::timestamp(1_700_000_001_234),
        };
        receipts::message(&r).1
    }

    fn props(headers: Vec<(&'static str, AMQPValue)>) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert(k.into(), v);
        }
        BasicProperties::default().with_headers(t)
    }

    #[test]
    fn a_sealed_receipt_is_the_jobs_record() {
        let key = TrailKey::for_tests(1);
        let body = receipt(Outcome::Delivered);
        let p = props(record_headers(&body, Some(DIGEST), &key));
        assert_eq!(
            decode(&p, &body, &key),
            Ok(Entry::Delivered {
                id: Uuid::parse_str("554f11c1-ec1e-4fdb-9953-bfad33013f58").unwrap(),
                record: Delivered {
                    delivered_at_ms: 1_700_000_001_234,
                    kind: "send-text".into(),
                    blinger_id: Some("m-1".into()),
                    blinger_status: Some("delivered".into()),
                    attempts: 2,
                    digest: Some(DIGEST.into()),
                },
            })
        );
    }

    #[test]
    fn forged_moved_or_foreign_records_are_not_applied() {
        let key = TrailKey::for_tests(1);
        let body = receipt(Outcome::Delivered);
        // A publisher's receipt, with no seal.
        assert_eq!(
            decode(&BasicProperties::default(), &body, &key),
            Err(Unusable::Unsealed)
        );
        // Sealed under another deployment's key.
        let foreign = props(record_headers(&body, Some(DIGEST), &TrailKey::for_tests(2)));
        assert_eq!(decode(&foreign, &body, &key), Err(Unusable::Unsealed));
        // A real seal moved onto another body, or another digest.
        let sealed = record_headers(&body, Some(DIGEST), &key);
        let other = receipt(Outcome::DeadLettered);
        assert_eq!(
            decode(&props(sealed.clone()), &other, &key),
            Err(Unusable::Unsealed)
        );
        let mut swapped = sealed;
        swapped[1].1 = string(&DIGEST.replace('0', "f"));
        assert_eq!(
            decode(&props(swapped), &body, &key),
            Err(Unusable::Unsealed)
        );
    }

    #[test]
    fn markers_and_what_is_not_a_delivered_record() {
        let key = TrailKey::for_tests(1);
        let (id, p) = marker();
        assert_eq!(decode(&p, b"", &key), Ok(Entry::Marker(id)));
        let dead = receipt(Outcome::DeadLettered);
        let p = props(record_headers(&dead, None, &key));
        assert_eq!(
            decode(&p, &dead, &key),
            Err(Unusable::Unreadable("not a delivered receipt"))
        );
    }

    proptest! {
        /// Decoding never panics, and nothing unsealed is ever applied, whatever the headers
        /// and body.
        #[test]
        fn decoding_is_total_and_only_sealed_records_apply(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            seal_text in "[0-9a-f]{0,40}",
            digest in proptest::option::of("[0-9a-f]{64}"),
        ) {
            let key = TrailKey::for_tests(1);
            let mut headers = vec![(headers::SEAL, string(&seal_text))];
            if let Some(d) = &digest {
                headers.push((headers::DIGEST, string(d)));
            }
            let decoded = decode(&props(headers), &body, &key);
            let applied = matches!(decoded, Ok(Entry::Delivered { .. }));
            prop_assert!(!applied, "an unsealed record was applied");
        }
    }
}
