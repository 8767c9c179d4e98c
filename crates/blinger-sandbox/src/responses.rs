//! Answers that look like Blinger's own: built from the crate's model structs (so the sandbox and
//! the worker cannot disagree about the shape) and filled like the documented examples, with
//! fresh ids and the current time.

use std::collections::BTreeMap;

use time::OffsetDateTime;
use uuid::Uuid;

use blinger_api::{Agent, Avatar, Bot, Conversation, EndUser, File, FileInfo, FileMeta};
use blinger_api::{Message, Review};

const STATIC_HOST: &str = "http://static.widget.blinger.io";

/// The moment a message was created, as Blinger reports it (seconds and microseconds).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp {
    pub micros: i64,
}

impl Stamp {
    pub(crate) fn now() -> Self {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
        Self {
            micros: (nanos / 1_000) as i64,
        }
    }

    fn secs(self) -> i64 {
        self.micros / 1_000_000
    }
}

/// The documented example end user (the sandbox has one visitor).
fn end_user() -> EndUser {
    EndUser {
        id: "3132ad01-1d3c-4d14-ad05-19ae73c07556".to_owned(),
        websocket_token: Some(
            "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIzMTMyYWQwMS0xZDNjLTRkMTQtYWQwNS0xOWFlNzNjMDc1NTYifQ.cjKtgNraxCceKS-44SLH1SrKGsksvPgzlTX523C7lPw"
                .to_owned(),
        ),
        created_at: Some(1_562_228_238),
        updated_at: Some(1_562_228_238),
    }
}

/// Renditions of a stored file, as Blinger's static host names them.
fn renditions(path: &str, image: bool) -> BTreeMap<String, String> {
    let mut url = BTreeMap::new();
    if image {
        url.insert("120x120".to_owned(), format!("{STATIC_HOST}/120x120{path}"));
        url.insert("520x400".to_owned(), format!("{STATIC_HOST}/520x400{path}"));
    }
    url.insert("default".to_owned(), format!("{STATIC_HOST}{path}"));
    url
}

/// The storage path Blinger derives from a content hash: `/ab/cd/ef/<hash>.<ext>`.
fn storage_path(hash: &str, ext: &str) -> String {
    format!(
        "/{}/{}/{}/{hash}.{ext}",
        &hash[0..2],
        &hash[2..4],
        &hash[4..6]
    )
}

/// The documented example avatar.
fn avatar() -> Avatar {
    let path = "/c2/b1/62/be16b35869e9491a6761c013cbae7548f23b17abb225eaa82efd214264779825.jpeg"
        .to_owned();
    File {
        id: "76d94b6b-a45c-4d62-8010-bd2f52d8c846".to_owned(),
        kind: Some("image".to_owned()),
        meta: Some(FileMeta {
            width: Some(400),
            height: Some(400),
        }),
        info: Some(FileInfo {
            name: Some("5d1db8373db3a".to_owned()),
            ext: Some("jpeg".to_owned()),
            mime_type: Some("image/jpeg".to_owned()),
            size: Some(5106),
            path: Some(path.clone()),
        }),
        url: renditions(&path, true),
        created_at: Some(1_562_198_400),
        updated_at: Some(1_562_198_400),
    }
}

/// An agent like the documented one, with the given id.
pub(crate) fn agent(id: &str) -> Agent {
    Agent {
        id: id.to_owned(),
        service_user_id: Some("12345".to_owned()),
        name: Some("Vadim Belorusov".to_owned()),
        status: Some("online".to_owned()),
        avatar: Some(avatar()),
        active: Some(true),
        created_at: Some(1_562_228_791),
        updated_at: Some(1_562_228_791),
    }
}

fn message(id: Uuid, kind: &str, stamp: Stamp) -> Message {
    Message {
        id: id.to_string(),
        status: Some("delivered".to_owned()),
        kind: Some(kind.to_owned()),
        microseconds: Some(stamp.micros),
        created_at: Some(stamp.secs()),
        updated_at: Some(stamp.secs()),
        ..Message::default()
    }
}

/// The answer of `send-text-message`.
pub(crate) fn text_message(id: Uuid, text: &str, stamp: Stamp) -> Message {
    Message {
        body: Some(text.to_owned()),
        end_user: Some(end_user()),
        ..message(id, "text", stamp)
    }
}

/// The answer of `send-file-message`: the file as Blinger would store it, typed by the URL's
/// extension.
pub(crate) fn file_message(id: Uuid, file_id: Uuid, file_url: &str, stamp: Stamp) -> Message {
    let last = url::Url::parse(file_url)
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.next_back().map(str::to_owned))
        })
        .unwrap_or_default();
    let ext = last
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .filter(|e| !e.is_empty() && e.len() <= 8 && e.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "bin".to_owned());
    let (mime, image) = match ext.as_str() {
        "png" => ("image/png", true),
        "jpg" | "jpeg" => ("image/jpeg", true),
        "gif" => ("image/gif", true),
        "webp" => ("image/webp", true),
        "pdf" => ("application/pdf", false),
        "txt" => ("text/plain", false),
        _ => ("application/octet-stream", false),
    };
    // A 64-hex-digit "content hash", stable for this file id.
    let hash = format!(
        "{}{}",
        file_id.simple(),
        Uuid::from_u128(!file_id.as_u128()).simple()
    );
    let path = storage_path(&hash, &ext);
    let name: String = file_id.simple().to_string().chars().take(9).collect();
    let file = File {
        id: file_id.to_string(),
        kind: Some(if image { "image" } else { "file" }.to_owned()),
        meta: Some(if image {
            FileMeta {
                width: Some(1920),
                height: Some(1080),
            }
        } else {
            FileMeta::default()
        }),
        info: Some(FileInfo {
            name: Some(format!("php{name}")),
            ext: Some(ext.clone()),
            mime_type: Some(mime.to_owned()),
            size: Some(1_000 + (file_id.as_u128() % 1_000_000) as u64),
            path: Some(path.clone()),
        }),
        url: renditions(&path, image),
        created_at: Some(stamp.secs()),
        updated_at: Some(stamp.secs()),
    };
    Message {
        file: Some(file),
        end_user: Some(end_user()),
        ..message(id, "file", stamp)
    }
}

/// The answer of `request-review`: a review message sent by the bot on behalf of the agent.
pub(crate) fn review_message(id: Uuid, stamp: Stamp) -> Message {
    let review = Review {
        id: Uuid::new_v4().to_string(),
        agent: Some(agent("c671d030-584e-4422-8710-9215c04b6a64")),
        end_user: Some(end_user()),
        mark: Some(0),
        confirmed: Some(false),
        text: Some(String::new()),
        created_at: Some(stamp.secs()),
        updated_at: Some(stamp.secs()),
    };
    Message {
        review: Some(review),
        bot: Some(Bot {
            id: "ad92f7ab-388f-4e86-a20a-4425885bfa40".to_owned(),
            name: Some("Blinger bot".to_owned()),
            created_at: Some(1_562_228_206),
            updated_at: Some(1_562_228_206),
        }),
        ..message(id, "review", stamp)
    }
}

/// The answer of `assign-agent`: the conversation with the agent assigned.
pub(crate) fn conversation(conversation_id: &str, agent_id: &str, stamp: Stamp) -> Conversation {
    Conversation {
        id: conversation_id.to_owned(),
        assigned_agent: Some(agent(agent_id)),
        locked: Some(false),
        created_at: Some(1_562_228_238),
        updated_at: Some(stamp.secs()),
    }
}
