//! Failure classification: the one place that decides what a failed delivery means.
//!
//! Every failure of a job ends up as a [`Failure`] with a [`Class`], and the pipeline acts on the
//! class alone:
//! - [`Class::Transient`]: Blinger or the network may succeed later: retry with backoff, then park
//!   in a delay tier, then dead-letter as `retries-exhausted`.
//! - [`Class::Permanent`]: the job itself is wrong for Blinger: dead-letter at once as `rejected`.
//! - [`Class::Auth`]: the worker's configuration is wrong, not the job: stop taking jobs, keep them
//!   queued, alert, probe, resume.

use std::time::Duration;

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Transient,
    Permanent,
    Auth,
}

/// One failed call to Blinger, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: Class,
    /// The HTTP (or envelope) status, where there was an answer.
    pub status: Option<u16>,
    /// What Blinger asked us to wait before the next call (`Retry-After`).
    pub retry_after: Option<Duration>,
    /// Readable detail for logs and the `x-blinger-error` header. Never holds a secret: it is built
    /// from statuses, error kinds and at most a short excerpt of Blinger's answer.
    pub detail: String,
    /// The call timed out (a transport failure with no answer).
    pub timed_out: bool,
}

impl Failure {
    /// A failure carried by an HTTP status: the answer's own, or the envelope's `status` field
    /// inside a 2xx answer.
    pub fn from_status(status: u16, retry_after: Option<Duration>, detail: String) -> Failure {
        Failure {
            class: classify_status(status),
            status: Some(status),
            retry_after,
            detail,
            timed_out: false,
        }
    }

    /// No usable answer: connection refused or reset, DNS, TLS, timeout, unreadable body. Blinger
    /// may or may not have acted; for the kinds without a uuid this is the duplicate window the
    /// README describes.
    pub fn transport(detail: String, timed_out: bool) -> Failure {
        Failure {
            class: Class::Transient,
            status: None,
            retry_after: None,
            detail,
            timed_out,
        }
    }

    /// The `status` label of `blinger_worker_api_requests_total` for this failure.
    pub fn status_label(&self) -> String {
        match (self.status, self.timed_out) {
            (Some(status), _) => status.to_string(),
            (None, true) => "timeout".into(),
            (None, false) => "error".into(),
        }
    }
}

/// The status table. 408, 425, 429 and 5xx are worth retrying; 401 and 403 mean the token is
/// wrong; any other status means this request will never succeed as it is.
pub fn classify_status(status: u16) -> Class {
    match status {
        401 | 403 => Class::Auth,
        408 | 425 | 429 | 500..=599 => Class::Transient,
        _ => Class::Permanent,
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date. Absurd values are capped at an hour so a
/// broken header cannot stall the worker for days.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(3600);
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(CAP));
    }
    if let Ok(secs) = value.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return Some(Duration::from_secs_f64(secs.min(CAP.as_secs_f64())));
    }
    let at = httpdate(value)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO).min(CAP))
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the form RFC 9110 requires senders to use.
fn httpdate(value: &str) -> Option<std::time::SystemTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let parsed = time::PrimitiveDateTime::parse(value, format).ok()?;
    Some(parsed.assume_utc().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn status_table() {
        for s in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify_status(s), Class::Transient, "{s}");
        }
        for s in [401, 403] {
            assert_eq!(classify_status(s), Class::Auth, "{s}");
        }
        for s in [300, 302, 400, 404, 405, 409, 410, 413, 422, 451] {
            assert_eq!(classify_status(s), Class::Permanent, "{s}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(0))
        );
        let before = UNIX_EPOCH + Duration::from_secs(784_111_777 - 30);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", before),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("99999999", now),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    proptest! {
        #[test]
        fn every_status_has_one_class(status in 100u16..1000) {
            let class = classify_status(status);
            prop_assert_eq!(class == Class::Auth, status == 401 || status == 403);
            if (500..600).contains(&status) {
                prop_assert_eq!(class, Class::Transient);
            }
        }

        #[test]
        fn retry_after_never_panics_and_is_capped(s in "\\PC{0,40}") {
            if let Some(d) = parse_retry_after(&s, SystemTime::now()) {
                prop_assert!(d <= Duration::from_secs(3600));
            }
        }
    }
}
