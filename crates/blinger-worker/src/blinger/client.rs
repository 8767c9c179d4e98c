//! The Blinger HTTP client: one request per job, built strictly, answers read leniently.
//!
//! Guarantees:
//! - the conversation id is one percent-encoded path segment (only RFC 3986 unreserved characters
//!   pass unencoded), so no id can change which endpoint or host is called; redirects are not
//!   followed for the same reason;
//! - every request carries `Authorization: <token>` exactly as configured (a header value marked
//!   sensitive) and `Content-Type: application/json` where it has a body;
//! - every outcome is either [`Accepted`] or a classified [`Failure`]; a 2xx answer whose envelope
//!   `status` is not 2xx is a failure with that status.
//!
//! One `reqwest::Client` (one connection pool) lives for the whole process.

use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Serialize;
use url::Url;

use super::model::{Conversation, Envelope, Message};
use crate::blinger::failure::{Failure, parse_retry_after};
use crate::config::Secret;
use crate::contract::job::{Action, Job, Kind};

/// Everything but RFC 3986 unreserved characters is encoded, `%` and `/` included.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Longest excerpt of an error answer kept for `x-blinger-error`.
const EXCERPT_CHARS: usize = 200;

/// Blinger accepted the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Id of the created message (or of the conversation, for assign-agent), when readable.
    pub blinger_id: Option<String>,
    /// The message status Blinger reported (`delivered`), when readable.
    pub blinger_status: Option<String>,
    pub http_status: u16,
}

/// A request ready to send: the URL and the JSON body, if the endpoint takes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub url: Url,
    pub body: Option<Vec<u8>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Body<'a> {
    Text {
        uuid: String,
        text: &'a str,
    },
    File {
        uuid: String,
        file: &'a str,
    },
    Agent {
        #[serde(rename = "agentId")]
        agent_id: &'a str,
    },
}

pub struct Client {
    http: reqwest::Client,
    /// `{base}/conversation/`, with the base path's trailing slash normalised.
    prefix: String,
    authorization: RwLock<HeaderValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the Blinger API token is not a valid HTTP header value")]
    BadToken,
    #[error("building the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

impl Client {
    pub fn new(base: &Url, token: &Secret, timeout: Duration) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            // No cap below the worker's concurrency: idle connections never outnumber the calls
            // that ran at once (at most `BLINGER_WORKER_CONCURRENCY`), and a cap below it made
            // busy workers close and reopen connections (measured: 1,674 connects for 40,000
            // jobs at concurrency 512 with a cap of 256; see docs/performance.md).
            .pool_max_idle_per_host(usize::MAX)
            .user_agent(concat!("blinger-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Client {
            http,
            prefix: format!("{}/conversation/", base.as_str().trim_end_matches('/')),
            authorization: RwLock::new(header_value(token)?),
        })
    }

    /// Replaces the token (after the token file changed).
    pub fn set_token(&self, token: &Secret) -> Result<(), ClientError> {
        let value = header_value(token)?;
        *self.authorization.write().expect("token lock") = value;
        Ok(())
    }

    /// Builds the request for a job: no I/O, so benchmarks and tests can inspect it.
    pub fn request(&self, job: &Job) -> Request {
        let kind = job.kind();
        let url = format!(
            "{}{}/{}",
            self.prefix,
            utf8_percent_encode(&job.conversation_id, SEGMENT),
            kind.endpoint()
        );
        // The prefix is a valid base URL and the rest is unreserved characters and %XX escapes.
        let url = Url::parse(&url).expect("a valid base URL with an encoded segment parses");
        let uuid = || job.id.hyphenated().to_string();
        let body = match &job.action {
            Action::SendText { text } => Some(Body::Text { uuid: uuid(), text }),
            Action::SendFile { file_url } => Some(Body::File {
                uuid: uuid(),
                file: file_url.as_str(),
            }),
            Action::RequestReview => None,
            Action::AssignAgent { agent_id } => Some(Body::Agent { agent_id }),
        };
        Request {
            url,
            body: body.map(|b| serde_json::to_vec(&b).expect("serialising plain strings")),
        }
    }

    /// Sends one job to Blinger once.
    pub async fn send(&self, job: &Job) -> Result<Accepted, Failure> {
        let Request { url, body } = self.request(job);
        let authorization = self.authorization.read().expect("token lock").clone();
        let mut request = self.http.post(url).header(AUTHORIZATION, authorization);
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body);
        }
        let response = request.send().await.map_err(transport_failure)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let bytes = response.bytes().await.map_err(transport_failure)?;
        if !(200..300).contains(&status) {
            return Err(Failure::from_status(
                status,
                retry_after,
                format!("HTTP {status}: {}", excerpt(&bytes)),
            ));
        }
        read_accepted(job.kind(), status, &bytes)
    }
}

fn header_value(token: &Secret) -> Result<HeaderValue, ClientError> {
    let mut value = HeaderValue::from_str(token.expose()).map_err(|_| ClientError::BadToken)?;
    value.set_sensitive(true);
    Ok(value)
}

/// Reads a 2xx answer. The envelope must be there and say 2xx; the data is read leniently.
fn read_accepted(kind: Kind, http_status: u16, bytes: &[u8]) -> Result<Accepted, Failure> {
    #[derive(serde::Deserialize)]
    struct Status {
        status: u16,
    }
    let envelope: Status = serde_json::from_slice(bytes).map_err(|e| {
        Failure::transport(
            format!(
                "HTTP {http_status} with an unreadable answer ({e}): {}",
                excerpt(bytes)
            ),
            false,
        )
    })?;
    if !(200..300).contains(&envelope.status) {
        return Err(Failure::from_status(
            envelope.status,
            None,
            format!(
                "HTTP {http_status} but answer status {}: {}",
                envelope.status,
                excerpt(bytes)
            ),
        ));
    }
    let (blinger_id, blinger_status) = match kind {
        Kind::AssignAgent => match serde_json::from_slice::<Envelope<Conversation>>(bytes) {
            Ok(Envelope { data: Some(c), .. }) => (Some(c.id), None),
            _ => (None, None),
        },
        _ => match serde_json::from_slice::<Envelope<Message>>(bytes) {
            Ok(Envelope { data: Some(m), .. }) => (Some(m.id), m.status),
            _ => (None, None),
        },
    };
    Ok(Accepted {
        blinger_id,
        blinger_status,
        http_status,
    })
}

fn transport_failure(e: reqwest::Error) -> Failure {
    // reqwest's Display includes the URL, which holds only the base and the conversation id:
    // no secret. Keep the error chain short and readable.
    let what = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else if e.is_body() || e.is_decode() {
        "error reading the answer"
    } else {
        "transport error"
    };
    let mut detail = format!("{what}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    Failure::transport(detail, e.is_timeout())
}

/// A short, single-line, printable excerpt of an answer body.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > EXCERPT_CHARS {
        out.push('…');
    }
    if out.trim().is_empty() {
        out = "(empty body)".into();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blinger::failure::Class;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn client(base: &str) -> Client {
        Client::new(
            &Url::parse(base).unwrap(),
            &Secret::new("tok"),
            Duration::from_secs(1),
        )
        .unwrap()
    }

    fn job(conv: &str, action: Action) -> Job {
        Job {
            id: Uuid::parse_str("554f11c1-ec1e-4fdb-9953-bfad33013f58").unwrap(),
            conversation_id: conv.into(),
            action,
            expires_at: None,
        }
    }

    #[test]
    fn builds_each_endpoint_and_body() {
        let c = client("https://widget.blinger.io/api/external/v1");
        let r = c.request(&job(
            "c1",
            Action::SendText {
                text: "Hello".into(),
            },
        ));
        assert_eq!(
            r.url.as_str(),
            "https://widget.blinger.io/api/external/v1/conversation/c1/send-text-message"
        );
        assert_eq!(
            r.body.unwrap(),
            br#"{"uuid":"554f11c1-ec1e-4fdb-9953-bfad33013f58","text":"Hello"}"#
        );
        let r = c.request(&job(
            "c1",
            Action::SendFile {
                file_url: Url::parse("https://x.example/a.png").unwrap(),
            },
        ));
        assert!(r.url.path().ends_with("/conversation/c1/send-file-message"));
        assert_eq!(
            r.body.unwrap(),
            br#"{"uuid":"554f11c1-ec1e-4fdb-9953-bfad33013f58","file":"https://x.example/a.png"}"#
        );
        let r = c.request(&job("c1", Action::RequestReview));
        assert!(r.url.path().ends_with("/conversation/c1/request-review"));
        assert_eq!(r.body, None);
        let r = c.request(&job(
            "c1",
            Action::AssignAgent {
                agent_id: "a9".into(),
            },
        ));
        assert!(r.url.path().ends_with("/conversation/c1/assign-agent"));
        assert_eq!(r.body.unwrap(), br#"{"agentId":"a9"}"#);
    }

    #[test]
    fn a_trailing_slash_on_the_base_changes_nothing() {
        let a = client("http://h:1/api/v1/").request(&job("x", Action::RequestReview));
        let b = client("http://h:1/api/v1").request(&job("x", Action::RequestReview));
        assert_eq!(a, b);
    }

    #[test]
    fn hostile_ids_stay_one_segment() {
        let c = client("http://127.0.0.1:9/api/external/v1");
        for (id, encoded) in [
            ("../x", "..%2Fx"),
            ("a/b", "a%2Fb"),
            ("%2e%2e", "%252e%252e"),
            ("?q=1", "%3Fq%3D1"),
            ("#f", "%23f"),
            ("a\\b", "a%5Cb"),
            ("é", "%C3%A9"),
        ] {
            let r = c.request(&job(id, Action::RequestReview));
            assert_eq!(
                r.url.path(),
                format!("/api/external/v1/conversation/{encoded}/request-review"),
                "{id:?}"
            );
            assert_eq!(r.url.query(), None);
            assert_eq!(r.url.fragment(), None);
        }
    }

    #[test]
    fn reads_answers() {
        let ok = read_accepted(
            Kind::SendText,
            200,
            br#"{"status":200,"data":{"id":"m1","status":"delivered","extra":1}}"#,
        )
        .unwrap();
        assert_eq!(ok.blinger_id.as_deref(), Some("m1"));
        assert_eq!(ok.blinger_status.as_deref(), Some("delivered"));
        let conv = read_accepted(
            Kind::AssignAgent,
            200,
            br#"{"status":200,"data":{"id":"c9"}}"#,
        )
        .unwrap();
        assert_eq!(conv.blinger_id.as_deref(), Some("c9"));
        // Lenient about data, strict about the envelope status.
        let odd = read_accepted(Kind::SendText, 201, br#"{"status":200,"data":[1]}"#).unwrap();
        assert_eq!(odd.blinger_id, None);
        let inner =
            read_accepted(Kind::SendText, 200, br#"{"status":503,"data":null}"#).unwrap_err();
        assert_eq!((inner.class, inner.status), (Class::Transient, Some(503)));
        let inner = read_accepted(Kind::SendText, 200, br#"{"status":404}"#).unwrap_err();
        assert_eq!((inner.class, inner.status), (Class::Permanent, Some(404)));
        let garbage = read_accepted(Kind::SendText, 200, b"<html>").unwrap_err();
        assert_eq!((garbage.class, garbage.status), (Class::Transient, None));
    }

    proptest! {
        #[test]
        fn any_conversation_id_reaches_only_its_endpoint(id in "\\PC{1,80}") {
            prop_assume!(id != "." && id != "..");
            let c = client("https://widget.blinger.io/api/external/v1");
            let r = c.request(&job(&id, Action::RequestReview));
            prop_assert_eq!(r.url.host_str(), Some("widget.blinger.io"));
            prop_assert_eq!(r.url.query(), None);
            prop_assert_eq!(r.url.fragment(), None);
            let segments: Vec<&str> = r.url.path_segments().unwrap().collect();
            prop_assert_eq!(segments.len(), 6);
            prop_assert_eq!(&segments[..4], &["api", "external", "v1", "conversation"]);
            prop_assert_eq!(segments[5], "request-review");
            let decoded = percent_encoding::percent_decode_str(segments[4]).decode_utf8().unwrap();
            prop_assert_eq!(decoded, id.as_str());
        }
    }
}
