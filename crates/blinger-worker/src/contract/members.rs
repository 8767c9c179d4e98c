//! What the replicas of a partitioned deployment say to each other on `{queue}.members`, a fanout
//! exchange every replica reads (docs/scale-out.md 4.8): heartbeats, from which each replica
//! works out its share of the rate limit ([`crate::engine::membership`]), and throttles, so that
//! a 429 one replica got slows all of them. Pure encoding and decoding; the I/O is
//! [`crate::broker::members`].
//!
//! Every message is sealed under the trail key (header `x-blinger-seal`, HMAC-SHA256 over the
//! body, first 128 bits): anyone else allowed to publish there could otherwise make the replicas
//! wait for a member that does not exist, or close every bucket. Decoding is total and bounded:
//! every message is a [`Said`] or one named [`Unusable`].

use std::time::Duration;

use hmac::Mac;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::contract::trail::TrailKey;
use crate::engine::membership::{Heartbeat, MAX_MEMBERS};
use crate::engine::partition::MAX_PARTITIONS;

/// Header of the seal.
pub const SEAL: &str = "x-blinger-seal";
/// Bytes of the HMAC kept in the seal.
const SEAL_BYTES: usize = 16;
/// Largest message: a heartbeat listing [`MAX_MEMBERS`] replicas and 256 partitions is about
/// 4 KiB.
pub const MAX_BYTES: usize = 8 * 1024;
/// Longest throttle passed on: a `Retry-After` longer than this is Blinger's own business; the
/// replica that got it still honours it in full.
pub const MAX_THROTTLE: Duration = Duration::from_secs(600);

/// One message, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Said {
    Heartbeat(Heartbeat),
    /// A replica got a 429: close every bucket for this long from the moment it is read.
    Throttle {
        from: Uuid,
        pause: Duration,
    },
}

/// Why a message is ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("the message's seal does not verify (forged, or another trail key)")]
    Unsealed,
    #[error("the message cannot be read: {0}")]
    Unreadable(&'static str),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u8,
    from: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    counts: Option<Vec<(Uuid, u64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holds: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    leaving: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    throttle_ms: Option<u64>,
}

fn seal(key: &TrailKey, body: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    let mut mac = key.mac(b"blinger-worker/members/v1\0");
    mac.update(body);
    mac
}

/// The body and properties of `said`, sealed under `key`.
pub fn encode(said: &Said, key: &TrailKey) -> (Vec<u8>, BasicProperties) {
    let wire = match said {
        Said::Heartbeat(hb) => Wire {
            v: 1,
            from: hb.from,
            seq: Some(hb.seq),
            counts: Some(hb.counts.clone()),
            holds: Some(hb.holds.clone()),
            leaving: hb.leaving,
            throttle_ms: None,
        },
        Said::Throttle { from, pause } => Wire {
            v: 1,
            from: *from,
            seq: None,
            counts: None,
            holds: None,
            leaving: false,
            throttle_ms: Some(u64::try_from(pause.min(&MAX_THROTTLE).as_millis()).unwrap_or(0)),
        },
    };
    let body = serde_json::to_vec(&wire).expect("plain data");
    let tag = seal(key, &body).finalize().into_bytes();
    let mut headers = FieldTable::default();
    headers.insert(
        SEAL.into(),
        AMQPValue::LongString(LongString::from(
            hex::encode(&tag[..SEAL_BYTES]).into_bytes(),
        )),
    );
    // Transient: a heartbeat is worth nothing a second later.
    (body, BasicProperties::default().with_headers(headers))
}

/// Decodes one message of `{queue}.members`.
pub fn decode(properties: &BasicProperties, body: &[u8], key: &TrailKey) -> Result<Said, Unusable> {
    let sealed = properties
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get(SEAL) {
            Some(AMQPValue::LongString(s)) => hex::decode(s.as_bytes()).ok(),
            _ => None,
        })
        .filter(|tag| tag.len() == SEAL_BYTES)
        .is_some_and(|tag| seal(key, body).verify_truncated_left(&tag).is_ok());
    if !sealed {
        return Err(Unusable::Unsealed);
    }
    if body.len() > MAX_BYTES {
        return Err(Unusable::Unreadable("too large"));
    }
    let wire: Wire = serde_json::from_slice(body)
        .map_err(|_| Unusable::Unreadable("not JSON of this version"))?;
    if wire.v != 1 {
        return Err(Unusable::Unreadable("another version"));
    }
    match (wire.seq, wire.counts, wire.holds, wire.throttle_ms) {
        (Some(seq), Some(counts), Some(mut holds), None) => {
            if counts.len() > MAX_MEMBERS {
                return Err(Unusable::Unreadable("too many members"));
            }
            holds.sort_unstable();
            holds.dedup();
            if holds.last().is_some_and(|p| *p >= MAX_PARTITIONS) {
                return Err(Unusable::Unreadable("a partition out of range"));
            }
            Ok(Said::Heartbeat(Heartbeat {
                from: wire.from,
                seq,
                counts,
                holds,
                leaving: wire.leaving,
            }))
        }
        (None, None, None, Some(ms)) if !wire.leaving => Ok(Said::Throttle {
            from: wire.from,
            pause: Duration::from_millis(ms).min(MAX_THROTTLE),
        }),
        _ => Err(Unusable::Unreadable("neither a heartbeat nor a throttle")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> TrailKey {
        TrailKey::for_tests(seed)
    }

    fn heartbeat() -> Said {
        Said::Heartbeat(Heartbeat {
            from: Uuid::from_u128(7),
            seq: 42,
            counts: vec![(Uuid::from_u128(7), 42), (Uuid::from_u128(9), 3)],
            holds: vec![0, 5, 11],
            leaving: false,
        })
    }

    #[test]
    fn what_is_said_comes_back_whole() {
        let throttle = Said::Throttle {
            from: Uuid::from_u128(3),
            pause: Duration::from_millis(1500),
        };
        for said in [heartbeat(), throttle] {
            let (body, props) = encode(&said, &key(1));
            assert_eq!(decode(&props, &body, &key(1)), Ok(said));
        }
        // A throttle longer than the cap is passed on capped.
        let long = Said::Throttle {
            from: Uuid::from_u128(3),
            pause: Duration::from_secs(86_400),
        };
        let (body, props) = encode(&long, &key(1));
        assert_eq!(
            decode(&props, &body, &key(1)),
            Ok(Said::Throttle {
                from: Uuid::from_u128(3),
                pause: MAX_THROTTLE
            })
        );
    }

    #[test]
    fn forged_altered_or_foreign_messages_are_ignored() {
        let (body, props) = encode(&heartbeat(), &key(1));
        assert_eq!(decode(&props, &body, &key(2)), Err(Unusable::Unsealed));
        let mut altered = body.clone();
        let at = altered.iter().position(|b| *b == b'4').unwrap();
        altered[at] = b'5';
        assert_eq!(decode(&props, &altered, &key(1)), Err(Unusable::Unsealed));
        assert_eq!(
            decode(&BasicProperties::default(), &body, &key(1)),
            Err(Unusable::Unsealed)
        );
    }

    #[test]
    fn sealed_but_unreadable_messages_are_named() {
        let sealed = |body: &[u8]| {
            let tag = seal(&key(1), body).finalize().into_bytes();
            let mut headers = FieldTable::default();
            headers.insert(
                SEAL.into(),
                AMQPValue::LongString(hex::encode(&tag[..SEAL_BYTES]).into_bytes().into()),
            );
            BasicProperties::default().with_headers(headers)
        };
        let from = Uuid::from_u128(1);
        let too_many: Vec<(Uuid, u64)> = (0..=MAX_MEMBERS as u128)
            .map(|i| (Uuid::from_u128(i), 1))
            .collect();
        for (body, why) in [
            (
                serde_json::json!({"v": 1, "from": from, "seq": 1, "counts": too_many, "holds": []}),
                "too many members",
            ),
            (
                serde_json::json!({"v": 1, "from": from, "seq": 1, "counts": [], "holds": [3, 256]}),
                "a partition out of range",
            ),
            (
                serde_json::json!({"v": 2, "from": from, "seq": 1, "counts": [], "holds": []}),
                "another version",
            ),
            (
                serde_json::json!({"v": 1, "from": from, "seq": 1, "counts": [], "holds": [], "throttle_ms": 5}),
                "neither a heartbeat nor a throttle",
            ),
            (
                serde_json::json!({"v": 1, "from": from, "seq": 1, "counts": []}),
                "neither a heartbeat nor a throttle",
            ),
            (
                serde_json::json!({"v": 1, "from": from, "seq": 1}),
                "neither a heartbeat nor a throttle",
            ),
            (
                serde_json::json!({"v": 1, "from": from, "seq": 1, "counts": [], "extra": 1}),
                "not JSON of this version",
            ),
        ] {
            let body = serde_json::to_vec(&body).unwrap();
            assert_eq!(
                decode(&sealed(&body), &body, &key(1)),
                Err(Unusable::Unreadable(why))
            );
        }
    }

    proptest! {
        #[test]
        fn decoding_is_total(body in prop::collection::vec(any::<u8>(), 0..600), seal_it: bool) {
            let props = if seal_it {
                let tag = seal(&key(1), &body).finalize().into_bytes();
                let mut headers = FieldTable::default();
                headers.insert(
                    SEAL.into(),
                    AMQPValue::LongString(hex::encode(&tag[..SEAL_BYTES]).into_bytes().into()),
                );
                BasicProperties::default().with_headers(headers)
            } else {
                BasicProperties::default()
            };
            match decode(&props, &body, &key(1)) {
                Ok(Said::Heartbeat(hb)) => prop_assert!(
                    hb.counts.len() <= MAX_MEMBERS
                        && hb.holds.iter().all(|p| *p < MAX_PARTITIONS)
                ),
                Ok(Said::Throttle { pause, .. }) => prop_assert!(pause <= MAX_THROTTLE),
                Err(Unusable::Unsealed) => prop_assert!(!seal_it),
                Err(Unusable::Unreadable(_)) => prop_assert!(seal_it),
            }
        }
    }
}
