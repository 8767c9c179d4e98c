//! The worker's note on a copy it parks or dead-letters: the public `x-blinger-*` headers that
//! on-call reads (`blinger-worker dlq`) and the README documents. One type writes them (the
//! pipeline) and reads them back (`dlq`), so writer and reader cannot drift apart. The sealed
//! bookkeeping a parked job carries on (attempts, retries, chain, first seen, the seal) is
//! [`super::trail`]'s; a dead letter repeats the counters here, unsealed, for people to read.
//!
//! Encodings (contract): reason and error as long strings, status as a 32-bit integer, attempts,
//! retries and first-seen as 64-bit integers. Reading is lenient: any integer type, or digits
//! in a string, as an older worker or a hand-made message may carry.

use lapin::BasicProperties;
use lapin::types::AMQPValue;

use super::reason::DeadReason;
use crate::broker::{self, headers};

/// Longest `x-blinger-error` text, in characters; longer text is cut and ends with `…`.
pub const MAX_ERROR_CHARS: usize = 1000;

/// The `x-blinger-*` headers of a parked or dead-lettered copy. Absent fields are not written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotation {
    /// `x-blinger-reason`: why it was dead-lettered ([`DeadReason`]'s text; dead letters only).
    pub reason: Option<String>,
    /// `x-blinger-error`: what went wrong, at most [`MAX_ERROR_CHARS`].
    pub error: Option<String>,
    /// `x-blinger-status`: the last HTTP status from Blinger.
    pub status: Option<u16>,
    /// `x-blinger-attempts`: HTTP calls made for the job.
    pub attempts: Option<u64>,
    /// `x-blinger-retries`: times it was parked in a delay tier.
    pub retries: Option<u64>,
    /// `x-blinger-first-seen`: unix milliseconds of the worker's first receipt.
    pub first_seen_ms: Option<u64>,
}

impl Annotation {
    /// A dead letter's note. Retries are written only when there were some.
    pub fn dead_letter(
        reason: DeadReason,
        error: &str,
        status: Option<u16>,
        attempts: u64,
        retries: u64,
        first_seen_ms: Option<u64>,
    ) -> Annotation {
        Annotation {
            reason: Some(reason.as_str().to_owned()),
            error: Some(clip_error(error)),
            status,
            attempts: Some(attempts),
            retries: (retries > 0).then_some(retries),
            first_seen_ms,
        }
    }

    /// A parked job's note on its last failure (its counters travel in the sealed trail).
    pub fn failure(error: &str, status: Option<u16>) -> Annotation {
        Annotation {
            error: Some(clip_error(error)),
            status,
            ..Annotation::default()
        }
    }

    /// The headers to write, in a fixed order.
    pub fn headers(&self) -> Vec<(&'static str, AMQPValue)> {
        let int = |v: u64| AMQPValue::LongLongInt(i64::try_from(v).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        if let Some(reason) = &self.reason {
            out.push((headers::REASON, broker::string_value(reason)));
        }
        if let Some(error) = &self.error {
            out.push((headers::ERROR, broker::string_value(error)));
        }
        if let Some(attempts) = self.attempts {
            out.push((headers::ATTEMPTS, int(attempts)));
        }
        if let Some(status) = self.status {
            out.push((headers::STATUS, AMQPValue::LongInt(status.into())));
        }
        if let Some(retries) = self.retries {
            out.push((headers::RETRIES, int(retries)));
        }
        if let Some(first_seen) = self.first_seen_ms {
            out.push((headers::FIRST_SEEN, int(first_seen)));
        }
        out
    }

    /// The note as a message carries it (what `dlq` shows). A status outside 0..=65535 is
    /// treated as absent.
    pub fn read(properties: &BasicProperties) -> Annotation {
        let int = |name| broker::header_u64(properties, name);
        Annotation {
            reason: broker::header_string(properties, headers::REASON),
            error: broker::header_string(properties, headers::ERROR),
            status: int(headers::STATUS).and_then(|s| u16::try_from(s).ok()),
            attempts: int(headers::ATTEMPTS),
            retries: int(headers::RETRIES),
            first_seen_ms: int(headers::FIRST_SEEN),
        }
    }
}

/// `error` cut to [`MAX_ERROR_CHARS`] characters, marked with `…` when cut.
pub fn clip_error(error: &str) -> String {
    match error.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => format!("{}…", &error[..cut]),
        None => error.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;
    use proptest::prelude::*;

    fn carried(a: &Annotation) -> BasicProperties {
        let mut table = FieldTable::default();
        for (k, v) in a.headers() {
            table.insert(k.into(), v);
        }
        BasicProperties::default().with_headers(table)
    }

    #[test]
    fn a_dead_letter_writes_what_the_readme_lists() {
        let a = Annotation::dead_letter(
            DeadReason::Rejected,
            "HTTP 403",
            Some(403),
            2,
            0,
            Some(1_700_000_000_000),
        );
        let names: Vec<&str> = a.headers().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                headers::REASON,
                headers::ERROR,
                headers::ATTEMPTS,
                headers::STATUS,
                headers::FIRST_SEEN
            ]
        );
        assert_eq!(a.reason.as_deref(), Some("rejected"));
    }

    #[test]
    fn long_errors_are_cut_on_a_character() {
        let long = "é".repeat(MAX_ERROR_CHARS + 5);
        let cut = clip_error(&long);
        assert_eq!(cut.chars().count(), MAX_ERROR_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(clip_error("short"), "short");
    }

    proptest! {
        /// What the pipeline writes, `dlq` reads back unchanged.
        #[test]
        fn what_is_written_reads_back(
            reason in proptest::sample::select(DeadReason::ALL.to_vec()),
            error in ".{0,40}",
            status in proptest::option::of(any::<u16>()),
            attempts in 0u64..=i64::MAX as u64,
            retries in 0u64..1_000_000,
            first_seen in proptest::option::of(0u64..=i64::MAX as u64),
        ) {
            let a = Annotation::dead_letter(reason, &error, status, attempts, retries, first_seen);
            prop_assert_eq!(Annotation::read(&carried(&a)), a);
            let p = Annotation::failure(&error, status);
            prop_assert_eq!(Annotation::read(&carried(&p)), p);
        }
    }
}
