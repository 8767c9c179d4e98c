//! What must hold for any message body, shared by the fuzz target (`fuzz_targets/decode.rs`)
//! and the plain test over the committed corpus (`crates/blinger-worker/tests/fuzz_corpus.rs`).
//!
//! - `job::decode` never panics, whatever the bytes and the size limit;
//! - a rejected body has a precise, bounded reason (it becomes `x-blinger-error`);
//! - an accepted job respects the contract: body within the limit, a non-nil id, a conversation
//!   id of 1 to 256 bytes without control characters and not `.`/`..`, non-blank text and agent
//!   id, an absolute http(s) file URL with a host;
//! - the request built for it calls exactly `{base}/conversation/<one segment>/<endpoint>` on the
//!   configured host, the segment decoding back to the conversation id, with no query or
//!   fragment;
//! - re-encoding the job in the contract's shape decodes to the same job.

use std::sync::OnceLock;
use std::time::Duration;

use blinger_worker::blinger::Client;
use blinger_worker::config::Secret;
use blinger_worker::contract::job::{self, Action, Job};

const LIMIT: usize = 256 * 1024;
const BASE: &str = "https://widget.blinger.io/api/external/v1";

fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        Client::new(
            &url::Url::parse(BASE).unwrap(),
            &Secret::new("fuzz-token"),
            Duration::from_secs(1),
        )
        .expect("client")
    })
}

pub fn check(data: &[u8]) {
    for limit in [LIMIT, 64] {
        match job::decode(data, limit) {
            Ok(job) => {
                assert!(data.len() <= limit);
                valid(&job);
            }
            Err(invalid) => {
                let reason = invalid.to_string();
                assert!(!reason.is_empty());
                assert!(
                    reason.len() < 1024,
                    "unbounded reason: {} bytes",
                    reason.len()
                );
            }
        }
    }
}

fn valid(job: &Job) {
    assert!(!job.id.is_nil());
    let c = &job.conversation_id;
    assert!(!c.is_empty() && c.len() <= job::MAX_CONVERSATION_ID_BYTES);
    assert!(!c.chars().any(char::is_control));
    assert!(c != "." && c != "..");
    match &job.action {
        Action::SendText { text } => assert!(!text.trim().is_empty()),
        Action::AssignAgent { agent_id } => assert!(!agent_id.trim().is_empty()),
        Action::SendFile { file_url } => {
            assert!(matches!(file_url.scheme(), "http" | "https"));
            assert!(file_url.host_str().is_some_and(|h| !h.is_empty()));
        }
        Action::RequestReview => {}
    }

    let request = client().request(job);
    let url = &request.url;
    assert_eq!(url.scheme(), "https");
    assert_eq!(url.host_str(), Some("widget.blinger.io"));
    assert_eq!(url.port(), None);
    assert_eq!(url.query(), None);
    assert_eq!(url.fragment(), None);
    let segments: Vec<&str> = url.path_segments().expect("a base URL").collect();
    assert_eq!(segments.len(), 6, "{url}");
    assert_eq!(&segments[..4], &["api", "external", "v1", "conversation"]);
    assert_eq!(segments[5], job.kind().endpoint());
    let decoded = percent_encoding::percent_decode_str(segments[4])
        .decode_utf8()
        .expect("UTF-8 segment");
    assert_eq!(&decoded, c);

    // The contract's shape of the same job decodes to the same job.
    let mut v = serde_json::json!({
        "kind": job.kind().as_str(),
        "id": job.id.to_string(),
        "conversation_id": c,
    });
    match &job.action {
        Action::SendText { text } => v["text"] = text.as_str().into(),
        Action::SendFile { file_url } => v["file_url"] = file_url.as_str().into(),
        Action::RequestReview => {}
        Action::AssignAgent { agent_id } => v["agent_id"] = agent_id.as_str().into(),
    }
    if let Some(at) = job.expires_at {
        v["expires_at"] = at.format(&time_rfc3339()).expect("formats").into();
    }
    let again = job::decode(v.to_string().as_bytes(), usize::MAX).expect("re-encoded job decodes");
    assert_eq!(&again, job);
}

fn time_rfc3339() -> time::format_description::well_known::Rfc3339 {
    time::format_description::well_known::Rfc3339
}
