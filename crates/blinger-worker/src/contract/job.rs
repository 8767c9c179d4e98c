//! The job contract: what publishers put on `blinger.outbound`, decoded and validated once.
//!
//! A job is a JSON object whose `kind` selects one of four Blinger calls. Decoding is total: every
//! byte string either becomes a [`Job`] that is safe to send, or an [`InvalidJob`] whose message
//! says precisely what is wrong (it becomes the `x-blinger-error` header of the dead-lettered
//! message). Nothing here panics on input, allocates without bound, or lets a field choose a URL
//! other than the intended endpoint: the conversation id is only ever used as one percent-encoded
//! path segment, and the ids that a URL parser would treat as path navigation are refused here.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use url::Url;
use uuid::Uuid;

/// Longest conversation id accepted, in bytes. Blinger ids are UUIDs; the margin is generous but
/// keeps URLs and metrics-free logs bounded.
pub const MAX_CONVERSATION_ID_BYTES: usize = 256;
/// Longest `file_url` accepted, in bytes.
pub const MAX_FILE_URL_BYTES: usize = 4096;

/// The four kinds of job, one per Blinger endpoint. The string forms are the public contract: the
/// `kind` field, the routing key, and the `kind` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    SendText,
    SendFile,
    RequestReview,
    AssignAgent,
}

/// The command line takes the contract names (`--kind send-text`) and lists them in `--help` and
/// in its error for an unknown one, from [`Kind::ALL`].
impl clap::ValueEnum for Kind {
    fn value_variants<'a>() -> &'a [Self] {
        &Kind::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::SendText,
        Kind::SendFile,
        Kind::RequestReview,
        Kind::AssignAgent,
    ];

    /// The contract name, as in the `kind` field and routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SendText => "send-text",
            Kind::SendFile => "send-file",
            Kind::RequestReview => "request-review",
            Kind::AssignAgent => "assign-agent",
        }
    }

    /// The last path segment of the Blinger endpoint, also the `endpoint` metric label.
    pub fn endpoint(self) -> &'static str {
        match self {
            Kind::SendText => "send-text-message",
            Kind::SendFile => "send-file-message",
            Kind::RequestReview => "request-review",
            Kind::AssignAgent => "assign-agent",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether Blinger can recognise a resend of this job by its `uuid`. The other kinds have no
    /// idempotency key on Blinger's side, so only the local store stands between a crash and a
    /// second call.
    pub fn carries_uuid(self) -> bool {
        matches!(self, Kind::SendText | Kind::SendFile)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the job asks Blinger to do, with the fields that kind needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SendText { text: String },
    SendFile { file_url: Url },
    RequestReview,
    AssignAgent { agent_id: String },
}

/// A valid job, ready to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The publisher's idempotency key.
    pub id: Uuid,
    pub conversation_id: String,
    pub action: Action,
    pub expires_at: Option<OffsetDateTime>,
}

impl Job {
    pub fn kind(&self) -> Kind {
        match self.action {
            Action::SendText { .. } => Kind::SendText,
            Action::SendFile { .. } => Kind::SendFile,
            Action::RequestReview => Kind::RequestReview,
            Action::AssignAgent { .. } => Kind::AssignAgent,
        }
    }

    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Hex SHA-256 of what the job asks Blinger to do: kind, conversation and payload (not the id,
    /// not `expires_at`, not the JSON's spelling). Two messages with one id and one digest are
    /// the same job; one id with two digests is a publisher reusing an id for another job.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        // Each field length-prefixed, so no two different jobs encode alike.
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        field(b"blinger-worker/job/v1");
        field(self.kind().as_str().as_bytes());
        field(self.conversation_id.as_bytes());
        match &self.action {
            Action::SendText { text } => field(text.as_bytes()),
            Action::SendFile { file_url } => field(file_url.as_str().as_bytes()),
            Action::RequestReview => {}
            Action::AssignAgent { agent_id } => field(agent_id.as_bytes()),
        }
        hex::encode(h.finalize())
    }
}

/// Why a message is not a valid job. The kind is kept when it could be read, for the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}")]
pub struct InvalidJob {
    pub kind: Option<Kind>,
    pub problem: Problem,
}

/// The precise defect. The `Display` text is what `x-blinger-error` carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("body is not valid UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body must be a JSON object: {0}")]
    NotObject(String),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` must be {expected}, got {got}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    #[error(
        "unknown kind {0:?}; expected one of send-text, send-file, request-review, assign-agent"
    )]
    UnknownKind(String),
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The wire shape: every field optional and untyped, so that each defect can be named precisely.
/// Unknown fields are ignored, duplicate known fields are refused by serde.
/// `null` is kept as `Some(Value::Null)`, so "missing" and "null" get their own messages.
#[derive(Deserialize)]
struct Wire {
    #[serde(default, deserialize_with = "present")]
    kind: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    conversation_id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    text: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    file_url: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    agent_id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Decodes and validates one message body.
pub fn decode(body: &[u8], max_bytes: usize) -> Result<Job, InvalidJob> {
    let invalid = |kind, problem| InvalidJob { kind, problem };
    if body.len() > max_bytes {
        return Err(invalid(
            None,
            Problem::TooLarge {
                size: body.len(),
                limit: max_bytes,
            },
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        invalid(
            None,
            Problem::NotUtf8 {
                offset: e.valid_up_to(),
            },
        )
    })?;
    // serde would accept a JSON array as a struct in sequence form: only objects are jobs.
    if !text.trim_start().starts_with('{') {
        let problem = match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Problem::NotObject(format!("got {}", json_type_of(text))),
            Err(e) => Problem::NotJson(e.to_string()),
        };
        return Err(invalid(None, problem));
    }
    let wire: Wire = serde_json::from_slice(body).map_err(|e| {
        let problem = match e.classify() {
            serde_json::error::Category::Data => Problem::NotObject(e.to_string()),
            _ => Problem::NotJson(e.to_string()),
        };
        invalid(None, problem)
    })?;

    let kind_name = required_str(&wire.kind, "kind").map_err(|p| invalid(None, p))?;
    let kind = Kind::parse(kind_name)
        .ok_or_else(|| invalid(None, Problem::UnknownKind(truncate(kind_name, 64))))?;
    let with_kind = |problem| invalid(Some(kind), problem);

    let id = parse_id(required_str(&wire.id, "id").map_err(with_kind)?).map_err(with_kind)?;
    let conversation_id =
        required_str(&wire.conversation_id, "conversation_id").map_err(with_kind)?;
    check_conversation_id(conversation_id).map_err(with_kind)?;

    let action = match kind {
        Kind::SendText => {
            let text = required_str(&wire.text, "text").map_err(with_kind)?;
            non_blank("text", text).map_err(with_kind)?;
            Action::SendText {
                text: text.to_owned(),
            }
        }
        Kind::SendFile => {
            let raw = required_str(&wire.file_url, "file_url").map_err(with_kind)?;
            Action::SendFile {
                file_url: parse_file_url(raw).map_err(with_kind)?,
            }
        }
        Kind::RequestReview => Action::RequestReview,
        Kind::AssignAgent => {
            let agent_id = required_str(&wire.agent_id, "agent_id").map_err(with_kind)?;
            non_blank("agent_id", agent_id).map_err(with_kind)?;
            Action::AssignAgent {
                agent_id: agent_id.to_owned(),
            }
        }
    };

    let expires_at = match &wire.expires_at {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
            with_kind(Problem::Invalid {
                field: "expires_at",
                reason: format!("not an RFC 3339 timestamp ({e})"),
            })
        })?),
        Some(other) => {
            return Err(with_kind(Problem::WrongType {
                field: "expires_at",
                expected: "an RFC 3339 timestamp string",
                got: type_name(other),
            }));
        }
    };

    Ok(Job {
        id,
        conversation_id: conversation_id.to_owned(),
        action,
        expires_at,
    })
}

fn required_str<'a>(value: &'a Option<Value>, field: &'static str) -> Result<&'a str, Problem> {
    match value {
        None => Err(Problem::Missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Problem::WrongType {
            field,
            expected: "a string",
            got: type_name(other),
        }),
    }
}

/// The JSON type of a valid non-object document, from its first character.
fn json_type_of(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn non_blank(field: &'static str, value: &str) -> Result<(), Problem> {
    if value.trim().is_empty() {
        return Err(Problem::Invalid {
            field,
            reason: "must not be empty".into(),
        });
    }
    Ok(())
}

/// Only the canonical hyphenated form is accepted, so one message has one key.
fn parse_id(raw: &str) -> Result<Uuid, Problem> {
    let bad = |reason: &str| Problem::Invalid {
        field: "id",
        reason: reason.to_owned(),
    };
    if raw.len() != 36 {
        return Err(bad(
            "must be a UUID in the hyphenated form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
        ));
    }
    let id = Uuid::try_parse(raw).map_err(|e| bad(&format!("not a UUID ({e})")))?;
    if id.is_nil() {
        return Err(bad("must not be the nil UUID"));
    }
    Ok(id)
}

fn check_conversation_id(id: &str) -> Result<(), Problem> {
    let bad = |reason: &str| {
        Err(Problem::Invalid {
            field: "conversation_id",
            reason: reason.to_owned(),
        })
    };
    if id.is_empty() {
        return bad("must not be empty");
    }
    if id.len() > MAX_CONVERSATION_ID_BYTES {
        return bad(&format!(
            "is {} bytes, over the {MAX_CONVERSATION_ID_BYTES}-byte limit",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return bad("must not contain control characters");
    }
    // A URL parser treats these segments as navigation even when percent-encoded ("%2e%2e"), so
    // they could never name a conversation and must not reach URL building.
    if id == "." || id == ".." {
        return bad("must not be a relative path segment");
    }
    Ok(())
}

fn parse_file_url(raw: &str) -> Result<Url, Problem> {
    let bad = |reason: String| Problem::Invalid {
        field: "file_url",
        reason,
    };
    if raw.len() > MAX_FILE_URL_BYTES {
        return Err(bad(format!(
            "is {} bytes, over the {MAX_FILE_URL_BYTES}-byte limit",
            raw.len()
        )));
    }
    let url = Url::parse(raw).map_err(|e| bad(format!("not an absolute http(s) URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme must be http or https, got {:?}",
            truncate(url.scheme(), 16)
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("must have a host".into()));
    }
    // The limit is on what is sent: parsing percent-encodes spaces and other characters, which
    // can make the URL up to three times longer than it was written.
    if url.as_str().len() > MAX_FILE_URL_BYTES {
        return Err(bad(format!(
            "is {} bytes once normalised (percent-encoded), over the {MAX_FILE_URL_BYTES}-byte \
             limit",
            url.as_str().len()
        )));
    }
    Ok(url)
}

/// Keeps error texts bounded when they quote input.
fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: usize = 256 * 1024;
    const ID: &str = "554f11c1-ec1e-4fdb-9953-bfad33013f58";
    const CONV: &str = "e1d247c8-5cd8-4f93-b9d7-15fd3259ac22";

    fn problem(body: &str) -> Problem {
        decode(body.as_bytes(), LIMIT).unwrap_err().problem
    }

    #[test]
    fn the_digest_is_what_is_sent_not_how_it_is_spelled() {
        let digest = |body: &str| decode(body.as_bytes(), LIMIT).unwrap().digest();
        let base = digest(&format!(
            r#"{{"kind":"send-text","id":"{ID}","conversation_id":"c","text":"Hello"}}"#
        ));
        // Same job: other field order, whitespace, an unknown field, an expiry.
        assert_eq!(
            base,
            digest(&format!(
                r#"{{ "text":"Hello", "conversation_id":"c", "x":1, "id":"{ID}", "kind":"send-text", "expires_at":"2099-01-01T00:00:00Z" }}"#
            ))
        );
        // Another job under the same id.
        for other in [
            format!(r#"{{"kind":"send-text","id":"{ID}","conversation_id":"c","text":"Hello!"}}"#),
            format!(r#"{{"kind":"send-text","id":"{ID}","conversation_id":"d","text":"Hello"}}"#),
            format!(
                r#"{{"kind":"assign-agent","id":"{ID}","conversation_id":"c","agent_id":"Hello"}}"#
            ),
            format!(r#"{{"kind":"request-review","id":"{ID}","conversation_id":"c"}}"#),
        ] {
            assert_ne!(base, digest(&other), "{other}");
        }
        // Length prefixes: moving bytes between fields changes the digest.
        assert_ne!(
            digest(&format!(
                r#"{{"kind":"send-text","id":"{ID}","conversation_id":"ab","text":"c"}}"#
            )),
            digest(&format!(
                r#"{{"kind":"send-text","id":"{ID}","conversation_id":"a","text":"bc"}}"#
            ))
        );
    }

    #[test]
    fn decodes_the_contract_example() {
        let job = decode(
            br#"{"kind":"send-text","id":"554f11c1-ec1e-4fdb-9953-bfad33013f58","conversation_id":"e1d247c8-5cd8-4f93-b9d7-15fd3259ac22","text":"Hello"}"#,
            LIMIT,
        )
        .unwrap();
        assert_eq!(job.id.to_string(), ID);
        assert_eq!(job.conversation_id, CONV);
        assert_eq!(
            job.action,
            Action::SendText {
                text: "Hello".into()
            }
        );
        assert_eq!(job.expires_at, None);
    }

    #[test]
    fn the_file_url_limit_applies_to_the_url_sent() {
        // 1,400 of `<` and `>`: 1,424 bytes as written, 4,224 once percent-encoded.
        let raw = format!("https://cdn.example.com/{}", "<>".repeat(700));
        let body = format!(
            r#"{{"kind":"send-file","id":"{ID}","conversation_id":"{CONV}","file_url":"{raw}"}}"#
        );
        match problem(&body) {
            Problem::Invalid { field, reason } => {
                assert_eq!(field, "file_url");
                assert!(reason.contains("once normalised"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decodes_every_kind_and_ignores_unknown_fields() {
        let file = format!(
            r#"{{"kind":"send-file","id":"{ID}","conversation_id":"{CONV}","file_url":"https://cdn.example.com/a.png","extra":{{"x":[1,2]}}}}"#
        );
        assert_eq!(
            decode(file.as_bytes(), LIMIT).unwrap().kind(),
            Kind::SendFile
        );
        let review =
            format!(r#"{{"kind":"request-review","id":"{ID}","conversation_id":"{CONV}"}}"#);
        assert_eq!(
            decode(review.as_bytes(), LIMIT).unwrap().action,
            Action::RequestReview
        );
        let assign = format!(
            r#"{{"kind":"assign-agent","id":"{ID}","conversation_id":"{CONV}","agent_id":"c671d030"}}"#
        );
        assert_eq!(
            decode(assign.as_bytes(), LIMIT).unwrap().action,
            Action::AssignAgent {
                agent_id: "c671d030".into()
            }
        );
    }

    #[test]
    fn parses_expires_at_with_offsets() {
        let body = format!(
            r#"{{"kind":"request-review","id":"{ID}","conversation_id":"{CONV}","expires_at":"2030-01-02T03:04:05+02:00"}}"#
        );
        let job = decode(body.as_bytes(), LIMIT).unwrap();
        let at = job.expires_at.unwrap();
        assert_eq!(at.unix_timestamp(), 1893546245);
        assert!(!job.is_expired(OffsetDateTime::from_unix_timestamp(1893546244).unwrap()));
        assert!(job.is_expired(at));
    }

    #[test]
    fn names_each_defect_precisely() {
        assert!(matches!(problem("{"), Problem::NotJson(_)));
        assert!(matches!(problem("[1]"), Problem::NotObject(_)));
        assert!(matches!(problem("\"x\""), Problem::NotObject(_)));
        assert_eq!(problem("{}"), Problem::Missing("kind"));
        assert_eq!(
            problem(r#"{"kind":"send-sms"}"#),
            Problem::UnknownKind("send-sms".into())
        );
        assert_eq!(
            problem(r#"{"kind":7}"#),
            Problem::WrongType {
                field: "kind",
                expected: "a string",
                got: "a number"
            }
        );
        assert_eq!(problem(r#"{"kind":"send-text"}"#), Problem::Missing("id"));
        let no_text = format!(r#"{{"kind":"send-text","id":"{ID}","conversation_id":"{CONV}"}}"#);
        assert_eq!(problem(&no_text), Problem::Missing("text"));
        let empty =
            format!(r#"{{"kind":"send-text","id":"{ID}","conversation_id":"{CONV}","text":"  "}}"#);
        assert!(matches!(
            problem(&empty),
            Problem::Invalid { field: "text", .. }
        ));
        let bad_id = format!(
            r#"{{"kind":"send-text","id":"not-a-uuid","conversation_id":"{CONV}","text":"a"}}"#
        );
        assert!(matches!(
            problem(&bad_id),
            Problem::Invalid { field: "id", .. }
        ));
        let nil = format!(
            r#"{{"kind":"send-text","id":"00000000-0000-0000-0000-000000000000","conversation_id":"{CONV}","text":"a"}}"#
        );
        assert!(matches!(
            problem(&nil),
            Problem::Invalid { field: "id", .. }
        ));
        let dup = format!(
            r#"{{"kind":"send-text","id":"{ID}","id":"{ID}","conversation_id":"{CONV}","text":"a"}}"#
        );
        assert!(matches!(problem(&dup), Problem::NotObject(m) if m.contains("duplicate field")));
        let null_text =
            format!(r#"{{"kind":"send-text","id":"{ID}","conversation_id":"{CONV}","text":null}}"#);
        assert_eq!(
            problem(&null_text),
            Problem::WrongType {
                field: "text",
                expected: "a string",
                got: "null"
            }
        );
    }

    #[test]
    fn keeps_the_kind_when_a_later_field_is_wrong() {
        let body = format!(r#"{{"kind":"assign-agent","id":"{ID}","conversation_id":"{CONV}"}}"#);
        let err = decode(body.as_bytes(), LIMIT).unwrap_err();
        assert_eq!(err.kind, Some(Kind::AssignAgent));
        assert_eq!(err.to_string(), "missing field `agent_id`");
    }

    #[test]
    fn refuses_file_urls_that_are_not_absolute_http() {
        for bad in [
            "/relative.png",
            "ftp://example.com/a",
            "javascript:alert(1)",
            "file:///etc/passwd",
            "http://",
            "",
        ] {
            let body = format!(
                r#"{{"kind":"send-file","id":"{ID}","conversation_id":"{CONV}","file_url":{}}}"#,
                serde_json::to_string(bad).unwrap()
            );
            assert!(
                matches!(
                    problem(&body),
                    Problem::Invalid {
                        field: "file_url",
                        ..
                    }
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn refuses_conversation_ids_that_navigate_or_carry_controls() {
        for bad in [".", "..", "", "a\nb", "a\u{0}b"] {
            let body = format!(
                r#"{{"kind":"request-review","id":"{ID}","conversation_id":{}}}"#,
                serde_json::to_string(bad).unwrap()
            );
            assert!(
                matches!(
                    problem(&body),
                    Problem::Invalid {
                        field: "conversation_id",
                        ..
                    }
                ),
                "{bad:?} accepted"
            );
        }
        let long = "x".repeat(MAX_CONVERSATION_ID_BYTES + 1);
        let body = format!(r#"{{"kind":"request-review","id":"{ID}","conversation_id":"{long}"}}"#);
        assert!(matches!(
            problem(&body),
            Problem::Invalid {
                field: "conversation_id",
                ..
            }
        ));
        // Odd but harmless ids are accepted: they are percent-encoded as one segment.
        for odd in ["../x", "a/b", "%2e%2e", "?q=1", "#f", "ünïcödé"] {
            let body = format!(
                r#"{{"kind":"request-review","id":"{ID}","conversation_id":{}}}"#,
                serde_json::to_string(odd).unwrap()
            );
            assert!(decode(body.as_bytes(), LIMIT).is_ok(), "{odd:?} refused");
        }
    }

    #[test]
    fn refuses_oversized_non_utf8_and_deeply_nested_bodies() {
        assert_eq!(
            decode(&[b' '; 11], 10).unwrap_err().problem,
            Problem::TooLarge {
                size: 11,
                limit: 10
            }
        );
        assert_eq!(
            decode(b"{\"kind\":\"\xff\"}", LIMIT).unwrap_err().problem,
            Problem::NotUtf8 { offset: 9 }
        );
        // Deep nesting in a field the worker reads hits serde_json's recursion limit...
        let deep = format!(r#"{{"kind":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(problem(&deep), Problem::NotJson(m) if m.contains("recursion")));
        // ...and in an ignored field it is skipped without recursion, so it cannot overflow.
        let deep = format!(r#"{{"x":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(problem(&deep), Problem::Missing("kind"));
    }

    #[test]
    fn rejects_bad_expiry() {
        let body = format!(
            r#"{{"kind":"request-review","id":"{ID}","conversation_id":"{CONV}","expires_at":"tomorrow"}}"#
        );
        assert!(matches!(
            problem(&body),
            Problem::Invalid {
                field: "expires_at",
                ..
            }
        ));
        let body = format!(
            r#"{{"kind":"request-review","id":"{ID}","conversation_id":"{CONV}","expires_at":5}}"#
        );
        assert!(matches!(
            problem(&body),
            Problem::WrongType {
                field: "expires_at",
                ..
            }
        ));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&body, LIMIT);
        }

        #[test]
        fn error_text_stays_bounded(kind in "\\PC{0,5000}") {
            let body = serde_json::json!({"kind": kind}).to_string();
            if let Err(e) = decode(body.as_bytes(), LIMIT) {
                prop_assert!(e.to_string().len() < 1000);
            }
        }

        #[test]
        fn valid_jobs_round_trip(
            text in "\\PC*[a-z]\\PC*",
            conv in "[^\\p{Cc}]{1,64}",
            id in any::<u128>().prop_filter("nil", |v| *v != 0),
        ) {
            prop_assume!(conv != "." && conv != "..");
            let id = Uuid::from_u128(id);
            let body = serde_json::json!({
                "kind": "send-text", "id": id.to_string(), "conversation_id": conv, "text": text,
            }).to_string();
            let job = decode(body.as_bytes(), LIMIT).unwrap();
            prop_assert_eq!(job.id, id);
            prop_assert_eq!(job.conversation_id, conv);
            prop_assert_eq!(job.action, Action::SendText { text });
        }
    }
}
