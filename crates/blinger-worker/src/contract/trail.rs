//! The worker's trail on a job: how often it was tried and parked, its place in its
//! conversation's chain, when the worker first saw it. Decoded once, typed and bounded, at the
//! edge; nothing downstream reads `x-blinger-*` headers.
//!
//! The trail travels in the headers of the worker's own republishes into the delay tiers, so it
//! comes back with the job. Headers are the publisher's input, though: a publisher could set
//! `x-blinger-retries` to skip retries, `x-blinger-chain` to overtake (or drop) a real member of
//! a conversation's chain, `x-blinger-attempts` at the integer limit. So the worker seals every
//! trail it writes with an HMAC-SHA256 over the trail and the message body, under a key only the
//! worker has, in `x-blinger-trail`; a trail whose seal does not verify is ignored whole (the
//! message is treated as fresh from a publisher).
//!
//! Why a seal rather than the broker's `x-death`: a message that comes back from a delay tier does
//! carry an `x-death` entry naming the tier, but a publisher can write `x-death` too (RabbitMQ
//! 3.10 keeps a publisher's `x-death`), so it proves nothing. A seal binds the trail to the body it
//! was written for: it cannot be forged, nor moved onto another job. Its cost is one SHA-256 of
//! the body for the messages that carry a seal, and one at each park.
//!
//! The key ([`TrailKey`]) comes from `BLINGER_WORKER_TRAIL_KEY` when set (replicas that share
//! queues must share it), else from a random key the worker creates once in its data directory.
//! A job parked under another key (the key changed, the volume was lost) comes back as fresh: it
//! starts a new retry round and rejoins its conversation's chain as a new member (it waits behind
//! the members still out, so the change costs time, never order).

use std::io::Write;
use std::path::Path;

use hmac::{Hmac, Mac};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use sha2::{Digest, Sha256};

use crate::config::Secret;

/// Headers of the trail, written by the worker only.
pub mod headers {
    pub use crate::broker::headers::{ATTEMPTS, CHAIN, FIRST_SEEN, RETRIES};
    /// The seal: hex HMAC-SHA256 (first 128 bits) of the trail and the body.
    pub const SEAL: &str = "x-blinger-trail";
}

/// Largest believable count of calls or parks; beyond it a value is treated as absent.
const MAX_COUNT: u64 = 1_000_000;
/// Unix milliseconds the worker accepts as a first-seen time: 2001 to 2286.
const FIRST_SEEN_MS: std::ops::Range<u64> = 1_000_000_000_000..10_000_000_000_000;
/// Chain sequence numbers start from the clock in microseconds; anything past i64 is not ours.
const MAX_CHAIN: u64 = i64::MAX as u64;
/// Bytes of the HMAC kept in the seal.
const SEAL_BYTES: usize = 16;

/// The worker's trail of one job. `Default` is a fresh job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trail {
    /// HTTP calls made for this job so far, across parks.
    pub attempts: u32,
    /// Times the job has been parked in a delay tier after failures.
    pub retries: u32,
    /// Its sequence in its conversation's chain, when it is a member (see `order`).
    pub chain: Option<u64>,
    /// Unix milliseconds of the worker's first receipt.
    pub first_seen_ms: Option<u64>,
}

/// What decoding found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No trail headers: a fresh message.
    None,
    /// A trail sealed by this deployment.
    Sealed,
    /// Trail headers without a valid seal (a publisher wrote them, or another key): ignored.
    Ignored,
}

/// The key the worker seals its trails with.
#[derive(Clone)]
pub struct TrailKey([u8; 32]);

impl std::fmt::Debug for TrailKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrailKey(***)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrailKeyError {
    #[error("BLINGER_WORKER_TRAIL_KEY must be at least 16 characters")]
    TooShort,
    #[error("trail key file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("trail key file {path} is not 64 hex digits (delete it to make a new one)")]
    Corrupt { path: String },
}

/// File name of the generated key in the data directory.
pub const KEY_FILE: &str = "trail.key";

impl TrailKey {
    /// A key derived from an operator's secret.
    pub fn from_secret(secret: &Secret) -> Result<TrailKey, TrailKeyError> {
        let value = secret.expose();
        if value.len() < 16 {
            return Err(TrailKeyError::TooShort);
        }
        let mut h = Sha256::new();
        h.update(b"blinger-worker/trail-key/v1\0");
        h.update(value.as_bytes());
        Ok(TrailKey(h.finalize().into()))
    }

    /// The key from the secret when given, else the data directory's key file (created with a
    /// random key at the first start).
    pub fn load(secret: Option<&Secret>, data_dir: &Path) -> Result<TrailKey, TrailKeyError> {
        match secret {
            Some(secret) => TrailKey::from_secret(secret),
            None => TrailKey::from_dir(data_dir),
        }
    }

    fn from_dir(data_dir: &Path) -> Result<TrailKey, TrailKeyError> {
        let path = data_dir.join(KEY_FILE);
        let shown = path.display().to_string();
        let file_error = |source| TrailKeyError::File {
            path: shown.clone(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_hex_key(text.trim())
                .map(TrailKey)
                .ok_or(TrailKeyError::Corrupt {
                    path: shown.clone(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::fill(&mut key);
                let tmp = data_dir.join(format!("{KEY_FILE}.tmp"));
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(&tmp).map_err(file_error)?;
                file.write_all(hex::encode(key).as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(file_error)?;
                std::fs::rename(&tmp, &path).map_err(file_error)?;
                Ok(TrailKey(key))
            }
            Err(e) => Err(file_error(e)),
        }
    }

    /// An HMAC-SHA256 under this key, started with `domain` (NUL-terminated by the caller), so
    /// that a seal made for one purpose never verifies for another.
    pub(crate) fn mac(&self, domain: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(domain);
        mac
    }

    fn seal(&self, trail: &Trail, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac(b"blinger-worker/trail/v1\0");
        mac.update(&Sha256::digest(body));
        mac.update(&u64::from(trail.attempts).to_be_bytes());
        mac.update(&u64::from(trail.retries).to_be_bytes());
        for field in [trail.chain, trail.first_seen_ms] {
            match field {
                Some(v) => {
                    mac.update(&[1]);
                    mac.update(&v.to_be_bytes());
                }
                None => mac.update(&[0]),
            }
        }
        mac
    }
}

#[cfg(test)]
impl TrailKey {
    /// A fixed key for unit tests.
    pub(crate) fn for_tests(seed: u8) -> TrailKey {
        TrailKey([seed; 32])
    }
}

fn parse_hex_key(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text).ok()?;
    bytes.try_into().ok()
}

impl Trail {
    /// The trail of a consumed message: its sealed trail, or a fresh one.
    pub fn decode(properties: &BasicProperties, body: &[u8], key: &TrailKey) -> (Trail, Found) {
        let Some(table) = properties.headers().as_ref() else {
            return (Trail::default(), Found::None);
        };
        let present = [
            headers::SEAL,
            headers::ATTEMPTS,
            headers::RETRIES,
            headers::CHAIN,
            headers::FIRST_SEEN,
        ]
        .iter()
        .any(|h| table.inner().contains_key(*h));
        if !present {
            return (Trail::default(), Found::None);
        }
        let trail = Trail {
            attempts: count(table, headers::ATTEMPTS),
            retries: count(table, headers::RETRIES),
            chain: int(table, headers::CHAIN).filter(|v| (1..=MAX_CHAIN).contains(v)),
            first_seen_ms: int(table, headers::FIRST_SEEN).filter(|v| FIRST_SEEN_MS.contains(v)),
        };
        let sealed = match table.inner().get(headers::SEAL) {
            Some(AMQPValue::LongString(s)) => hex::decode(s.as_bytes())
                .ok()
                .filter(|tag| tag.len() == SEAL_BYTES)
                .is_some_and(|tag| key.seal(&trail, body).verify_truncated_left(&tag).is_ok()),
            _ => false,
        };
        if sealed {
            (trail, Found::Sealed)
        } else {
            (Trail::default(), Found::Ignored)
        }
    }

    /// The headers that carry this trail, sealed for `body`.
    pub fn headers(&self, body: &[u8], key: &TrailKey) -> Vec<(&'static str, AMQPValue)> {
        let tag = key.seal(self, body).finalize().into_bytes();
        let mut out = vec![
            (
                headers::ATTEMPTS,
                AMQPValue::LongLongInt(i64::from(self.attempts)),
            ),
            (
                headers::RETRIES,
                AMQPValue::LongLongInt(i64::from(self.retries)),
            ),
            (
                headers::SEAL,
                AMQPValue::LongString(LongString::from(
                    hex::encode(&tag[..SEAL_BYTES]).into_bytes(),
                )),
            ),
        ];
        if let Some(chain) = self.chain {
            out.push((headers::CHAIN, AMQPValue::LongLongInt(chain as i64)));
        }
        if let Some(first_seen) = self.first_seen_ms {
            out.push((
                headers::FIRST_SEEN,
                AMQPValue::LongLongInt(first_seen as i64),
            ));
        }
        out
    }

    /// One more HTTP call.
    pub fn add_attempt(&mut self) {
        self.attempts = self.attempts.saturating_add(1).min(MAX_COUNT as u32);
    }
}

/// A count header, 0 when absent or out of range.
fn count(table: &FieldTable, name: &str) -> u32 {
    int(table, name)
        .filter(|v| *v <= MAX_COUNT)
        .map_or(0, |v| v as u32)
}

/// An integer header the worker wrote (it writes `LongLongInt`; older versions `LongInt` too).
fn int(table: &FieldTable, name: &str) -> Option<u64> {
    match table.inner().get(name)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> TrailKey {
        TrailKey::for_tests(seed)
    }

    fn props(headers: Vec<(&'static str, AMQPValue)>) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert(k.into(), v);
        }
        BasicProperties::default().with_headers(t)
    }

    fn sample() -> Trail {
        Trail {
            attempts: 7,
            retries: 2,
            chain: Some(1_764_600_000_000_000),
            first_seen_ms: Some(1_764_600_000_000),
        }
    }

    #[test]
    fn a_sealed_trail_comes_back_whole() {
        let body = br#"{"kind":"send-text"}"#;
        let p = props(sample().headers(body, &key(1)));
        assert_eq!(Trail::decode(&p, body, &key(1)), (sample(), Found::Sealed));
    }

    #[test]
    fn a_fresh_message_has_a_fresh_trail() {
        let p = props(vec![("trace-id", AMQPValue::LongLongInt(1))]);
        assert_eq!(
            Trail::decode(&p, b"{}", &key(1)),
            (Trail::default(), Found::None)
        );
        assert_eq!(
            Trail::decode(&BasicProperties::default(), b"{}", &key(1)),
            (Trail::default(), Found::None)
        );
    }

    #[test]
    fn forged_moved_or_foreign_trails_are_ignored() {
        let body = b"job-a";
        // A publisher's own headers, no seal.
        let forged = props(vec![
            (headers::RETRIES, AMQPValue::LongLongInt(5)),
            (headers::ATTEMPTS, AMQPValue::LongLongInt(i64::MAX)),
            (headers::CHAIN, AMQPValue::LongLongInt(1)),
        ]);
        assert_eq!(
            Trail::decode(&forged, body, &key(1)),
            (Trail::default(), Found::Ignored)
        );
        // A real seal copied onto another body.
        let sealed = props(sample().headers(body, &key(1)));
        assert_eq!(Trail::decode(&sealed, b"job-b", &key(1)).1, Found::Ignored);
        // A seal of another key.
        assert_eq!(Trail::decode(&sealed, body, &key(2)).1, Found::Ignored);
        // A real seal with one value changed.
        let mut h = sample().headers(body, &key(1));
        h.retain(|(k, _)| *k != headers::RETRIES);
        h.push((headers::RETRIES, AMQPValue::LongLongInt(0)));
        assert_eq!(Trail::decode(&props(h), body, &key(1)).1, Found::Ignored);
    }

    #[test]
    fn attempts_saturate() {
        let mut t = Trail {
            attempts: u32::MAX,
            ..Trail::default()
        };
        t.add_attempt();
        assert_eq!(t.attempts, MAX_COUNT as u32);
    }

    #[test]
    fn the_key_file_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = TrailKey::load(None, dir.path()).unwrap();
        let b = TrailKey::load(None, dir.path()).unwrap();
        assert_eq!(a.0, b.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key file readable by others");
        }
        std::fs::write(dir.path().join(KEY_FILE), "nope").unwrap();
        assert!(matches!(
            TrailKey::load(None, dir.path()),
            Err(TrailKeyError::Corrupt { .. })
        ));
        let secret = Secret::new("0123456789abcdef");
        let c = TrailKey::load(Some(&secret), dir.path()).unwrap();
        assert_ne!(c.0, a.0);
        assert!(matches!(
            TrailKey::from_secret(&Secret::new("short")),
            Err(TrailKeyError::TooShort)
        ));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
    }

    proptest! {
        /// Any header values a publisher can set decode without panicking, to a bounded trail,
        /// and never as sealed.
        #[test]
        fn any_headers_decode_to_a_bounded_unsealed_trail(
            attempts in any::<i64>(), retries in any::<i64>(), chain in any::<i64>(),
            seal in "[0-9a-f]{0,40}",
        ) {
            let p = props(vec![
                (headers::ATTEMPTS, AMQPValue::LongLongInt(attempts)),
                (headers::RETRIES, AMQPValue::LongLongInt(retries)),
                (headers::CHAIN, AMQPValue::LongLongInt(chain)),
                (headers::SEAL, AMQPValue::LongString(LongString::from(seal.into_bytes()))),
            ]);
            let (trail, found) = Trail::decode(&p, b"body", &key(3));
            prop_assert_eq!(found, Found::Ignored);
            prop_assert_eq!(trail, Trail::default());
        }

        /// Every trail the worker writes decodes back to itself.
        #[test]
        fn written_trails_round_trip(
            attempts in 0u32..1_000_000, retries in 0u32..1_000_000,
            chain in proptest::option::of(1u64..MAX_CHAIN),
            first_seen in proptest::option::of(FIRST_SEEN_MS),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let t = Trail { attempts, retries, chain, first_seen_ms: first_seen };
            let p = props(t.headers(&body, &key(4)));
            prop_assert_eq!(Trail::decode(&p, &body, &key(4)), (t, Found::Sealed));
        }
    }
}
