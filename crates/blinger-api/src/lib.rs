//! Typed shapes of Blinger's answers, as documented in `blinger-api-docs.txt`.
//!
//! Every answer is an envelope `{"status": <code>, "data": {...}}`. The worker is lenient about
//! what it reads: every field that the documentation shows as possibly `null`, and every field
//! the worker does not need, is optional, and unknown fields are ignored, so that Blinger adding
//! a field never turns a delivered message into a failure. The sandbox server serialises the
//! same structs, so the two sides cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The envelope around every Blinger answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Blinger's own status code; a 2xx HTTP answer with a non-2xx `status` is a failure.
    pub status: u16,
    /// Absent or `null` on errors.
    #[serde(default = "Option::default")]
    pub data: Option<T>,
}

/// A conversation message: the answer of `send-text-message`, `send-file-message` and
/// `request-review`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub file: Option<File>,
    #[serde(default)]
    pub review: Option<Review>,
    #[serde(default)]
    pub bot: Option<Bot>,
    #[serde(default)]
    pub agent: Option<Agent>,
    #[serde(default)]
    pub end_user: Option<EndUser>,
    #[serde(default)]
    pub microseconds: Option<i64>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
}

/// The answer of `assign-agent`: the conversation with its newly assigned agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Conversation {
    pub id: String,
    #[serde(default)]
    pub assigned_agent: Option<Agent>,
    #[serde(default)]
    pub locked: Option<bool>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
}

/// An uploaded file, as attached to a file message or used as an avatar.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct File {
    pub id: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub meta: Option<FileMeta>,
    #[serde(default)]
    pub info: Option<FileInfo>,
    /// Renditions by size name (`"120x120"`, `"520x400"`, `"default"`).
    #[serde(default)]
    pub url: BTreeMap<String, String>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
}

/// An avatar is a file.
pub type Avatar = File;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FileMeta {
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FileInfo {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub ext: Option<String>,
    #[serde(default)]
    pub mime_type: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub id: String,
    #[serde(default)]
    pub service_user_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub avatar: Option<Avatar>,
    #[serde(default)]
    pub active: Option<bool>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EndUser {
    pub id: String,
    /// A credential of the end user's; never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket_token: Option<String>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Bot {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Review {
    pub id: String,
    #[serde(default)]
    pub agent: Option<Agent>,
    #[serde(default)]
    pub end_user: Option<EndUser>,
    #[serde(default)]
    pub mark: Option<i64>,
    #[serde(default)]
    pub confirmed: Option<bool>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub created_at: Option<i64>,
    #[serde(default)]
    pub updated_at: Option<i64>,
}

#[cfg(test)]
mod tests {
    //! The four example answers of the API documentation, verbatim, must parse; and serialising
    //! what was parsed must give the same JSON back, which proves no documented field is dropped
    //! (the sandbox answers with these structs).

    use super::*;

    const SEND_TEXT: &str = include_str!("../fixtures/send-text-message.json");
    const SEND_FILE: &str = include_str!("../fixtures/send-file-message.json");
    const REQUEST_REVIEW: &str = include_str!("../fixtures/request-review.json");
    const ASSIGN_AGENT: &str = include_str!("../fixtures/assign-agent.json");

    fn parse<T: serde::de::DeserializeOwned + Serialize>(doc: &str) -> Envelope<T> {
        let env: Envelope<T> = serde_json::from_str(doc).expect("documented example parses");
        let original: serde_json::Value = serde_json::from_str(doc).unwrap();
        assert_eq!(
            serde_json::to_value(&env).unwrap(),
            original,
            "round trip keeps every documented field"
        );
        env
    }

    fn check_agent(agent: &Agent) {
        assert_eq!(agent.id, "c671d030-584e-4422-8710-9215c04b6a64");
        assert_eq!(agent.service_user_id.as_deref(), Some("12345"));
        assert_eq!(agent.name.as_deref(), Some("Vadim Belorusov"));
        assert_eq!(agent.status.as_deref(), Some("online"));
        assert_eq!(agent.active, Some(true));
        let avatar = agent.avatar.as_ref().unwrap();
        assert_eq!(avatar.id, "76d94b6b-a45c-4d62-8010-bd2f52d8c846");
        assert_eq!(avatar.kind.as_deref(), Some("image"));
        let meta = avatar.meta.as_ref().unwrap();
        assert_eq!((meta.width, meta.height), (Some(400), Some(400)));
        let info = avatar.info.as_ref().unwrap();
        assert_eq!(info.mime_type.as_deref(), Some("image/jpeg"));
        assert_eq!(info.size, Some(5106));
        assert_eq!(avatar.url.len(), 3);
        assert!(avatar.url["default"].starts_with("http://static.widget.blinger.io/c2/b1/62/"));
        assert_eq!(avatar.created_at, Some(1562198400));
    }

    fn check_end_user(user: &EndUser) {
        assert_eq!(user.id, "3132ad01-1d3c-4d14-ad05-19ae73c07556");
        assert!(
            user.websocket_token
                .as_deref()
                .unwrap()
                .starts_with("eyJ0eXAi")
        );
        assert_eq!(user.created_at, Some(1562228238));
    }

    #[test]
    fn model_parses_documented_send_text_message_answer() {
        let env = parse::<Message>(SEND_TEXT);
        assert_eq!(env.status, 200);
        let msg = env.data.unwrap();
        assert_eq!(msg.id, "554f11c1-ec1e-4fdb-9953-bfad33013f58");
        assert_eq!(msg.status.as_deref(), Some("delivered"));
        assert_eq!(msg.kind.as_deref(), Some("text"));
        assert_eq!(msg.body.as_deref(), Some("Hello"));
        assert!(msg.file.is_none() && msg.review.is_none() && msg.bot.is_none());
        assert!(msg.agent.is_none());
        check_end_user(msg.end_user.as_ref().unwrap());
        assert_eq!(msg.microseconds, Some(1562242173465326));
        assert_eq!(
            (msg.created_at, msg.updated_at),
            (Some(1562242173), Some(1562242173))
        );
    }

    #[test]
    fn model_parses_documented_send_file_message_answer() {
        let env = parse::<Message>(SEND_FILE);
        assert_eq!(env.status, 200);
        let msg = env.data.unwrap();
        assert_eq!(msg.id, "b01f7d2f-7003-4cc2-9a95-ac20d6374358");
        assert_eq!(msg.kind.as_deref(), Some("file"));
        assert_eq!(msg.body, None);
        let file = msg.file.unwrap();
        assert_eq!(file.id, "6350e4fa-7b69-4f6b-b24e-228a05d62c21");
        assert_eq!(file.kind.as_deref(), Some("image"));
        let meta = file.meta.unwrap();
        assert_eq!((meta.width, meta.height), (Some(1920), Some(1080)));
        let info = file.info.unwrap();
        assert_eq!(info.name.as_deref(), Some("phpanbHIN"));
        assert_eq!(info.ext.as_deref(), Some("png"));
        assert_eq!(info.mime_type.as_deref(), Some("image/png"));
        assert_eq!(info.size, Some(327743));
        assert!(info.path.unwrap().ends_with(".png"));
        assert_eq!(
            file.url.keys().map(String::as_str).collect::<Vec<_>>(),
            ["120x120", "520x400", "default"]
        );
        check_end_user(msg.end_user.as_ref().unwrap());
        assert_eq!(msg.microseconds, Some(1562242573548953));
    }

    #[test]
    fn model_parses_documented_request_review_answer() {
        let env = parse::<Message>(REQUEST_REVIEW);
        assert_eq!(env.status, 200);
        let msg = env.data.unwrap();
        assert_eq!(msg.id, "b2737f3a-eaee-4271-b705-2bc9bb951ca1");
        assert_eq!(msg.kind.as_deref(), Some("review"));
        assert!(msg.end_user.is_none() && msg.agent.is_none() && msg.file.is_none());
        let review = msg.review.unwrap();
        assert_eq!(review.id, "6bc1f3b9-c972-400d-b5cd-1ca4e2d9a8fc");
        check_agent(review.agent.as_ref().unwrap());
        check_end_user(review.end_user.as_ref().unwrap());
        assert_eq!(review.mark, Some(0));
        assert_eq!(review.confirmed, Some(false));
        assert_eq!(review.text.as_deref(), Some(""));
        let bot = msg.bot.unwrap();
        assert_eq!(bot.id, "ad92f7ab-388f-4e86-a20a-4425885bfa40");
        assert_eq!(bot.name.as_deref(), Some("Blinger bot"));
    }

    #[test]
    fn model_parses_documented_assign_agent_answer() {
        let env = parse::<Conversation>(ASSIGN_AGENT);
        assert_eq!(env.status, 200);
        let conv = env.data.unwrap();
        assert_eq!(conv.id, "e1d247c8-5cd8-4f93-b9d7-15fd3259ac22");
        check_agent(conv.assigned_agent.as_ref().unwrap());
        assert_eq!(conv.locked, Some(false));
        assert_eq!(
            (conv.created_at, conv.updated_at),
            (Some(1562228238), Some(1562241579))
        );
    }

    #[test]
    fn model_error_envelope_without_data_parses() {
        let env: Envelope<Message> = serde_json::from_str(r#"{"status":401,"data":null}"#).unwrap();
        assert_eq!((env.status, env.data), (401, None));
        let env: Envelope<Message> = serde_json::from_str(r#"{"status":500}"#).unwrap();
        assert_eq!((env.status, env.data), (500, None));
    }
}
