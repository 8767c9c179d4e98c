//! Delivery receipts: after a job is delivered or dead-lettered, a small JSON event goes to the
//! topic exchange `blinger.outbound.events` (routing key `delivered.<kind>` or `dead.<kind>`), so
//! publishing services learn the outcome without polling.
//!
//! Receipts are at-least-once and never at the delivery's expense: a receipt is published, with
//! a confirm, before the job is acked, so a crash re-emits it with the redelivery (a redelivered
//! job that the store already knows re-emits its `delivered` receipt); a receipt that cannot be
//! published is logged and counted, and the job is acked all the same.

use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Delivered,
    DeadLettered,
}

/// The receipt event, as documented in `schemas/receipt.schema.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Receipt {
    /// The job's id; `null` only for a message too broken to carry one.
    pub id: Option<String>,
    /// The kind, or `unknown`.
    pub kind: String,
    pub conversation_id: Option<String>,
    pub outcome: Outcome,
    /// The dead-letter reason, for `dead-lettered`.
    pub reason: Option<&'static str>,
    pub blinger_message_id: Option<String>,
    pub blinger_status: Option<String>,
    pub http_status: Option<u16>,
    pub attempts: u64,
    pub received_at: String,
    pub finished_at: String,
}

impl Receipt {
    pub fn routing_key(&self) -> String {
        match self.outcome {
            Outcome::Delivered => format!("delivered.{}", self.kind),
            Outcome::DeadLettered => format!("dead.{}", self.kind),
        }
    }
}

/// RFC 3339 in UTC with milliseconds, from unix milliseconds.
pub fn timestamp(unix_ms: u64) -> String {
    super::rfc3339_ms(unix_ms).unwrap_or_default()
}

/// The message of a receipt: routing key, JSON body and properties. The pipeline publishes it
/// (not mandatory: receipts nobody is bound to are fine) and waits for the confirm.
pub fn message(receipt: &Receipt) -> (String, Vec<u8>, lapin::BasicProperties) {
    let body = serde_json::to_vec(receipt).expect("receipts serialise");
    let properties = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64);
    (receipt.routing_key(), body, properties)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_routing_keys() {
        let r = Receipt {
            id: Some("554f11c1-ec1e-4fdb-9953-bfad33013f58".into()),
            kind: "send-text".into(),
            conversation_id: Some("c1".into()),
            outcome: Outcome::DeadLettered,
            reason: Some("rejected"),
            blinger_message_id: None,
            blinger_status: None,
            http_status: Some(404),
            attempts: 1,
            received_at: timestamp(1_700_000_000_123),
            finished_at: timestamp(1_700_000_001_000),
        };
        assert_eq!(r.routing_key(), "dead.send-text");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["outcome"], "dead-lettered");
        assert_eq!(v["received_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["http_status"], 404);
        assert!(v["blinger_message_id"].is_null());
    }
}
