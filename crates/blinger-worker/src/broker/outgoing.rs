//! What the worker republishes: properties built from an allowlist, never copied whole.
//!
//! A consumed message's properties and headers are the publisher's input, exactly like its body,
//! and the worker republishes messages under its own identity (delay tiers, the dead-letter queue,
//! `dlq replay`). Copied blindly, a publisher's properties would steer that republish:
//! - `CC` / `BCC` headers are extra routing keys, and through the default exchange a routing key is
//!   any queue name: one message could be copied into every queue of the vhost, and into the work
//!   queue again at every dead-lettering (a loop without end);
//! - `expiration` would make a dead letter vanish from the dead-letter queue;
//! - `user_id` of another user makes the broker refuse the republish and close the channel;
//! - `x-blinger-*` headers would pass a forged trail (retries, chain, reason) off as the worker's;
//! - headers near the frame size would make the republish larger than a frame.
//!
//! So [`outgoing`] keeps only what describes the job and cannot change where a message goes or how
//! long it lives; what an operator may want to know of the rest is kept under
//! `x-blinger-original-*`. Guarantees (proptest below): the result never has `CC`/`BCC` (in any
//! case), `user_id`, `expiration`, `priority` or a header of the worker's namespace other than the
//! worker's own; it is persistent; the publisher's headers it copies take at most the budget given.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Prefix of every header the worker writes itself.
pub const WORKER_PREFIX: &str = "x-blinger-";

/// Headers the worker sets to keep what it stripped from a publisher's message.
pub mod original {
    /// The publisher's `expiration` (per-message TTL), which the republish does not carry.
    pub const EXPIRATION: &str = "x-blinger-original-expiration";
    /// The publisher's `user_id`, which the broker checks against the worker's own user.
    pub const USER_ID: &str = "x-blinger-original-user-id";
    /// The publisher's `reply_to`.
    pub const REPLY_TO: &str = "x-blinger-original-reply-to";
    /// How many of the publisher's headers were not copied (over the size budget, or invalid).
    pub const HEADERS_DROPPED: &str = "x-blinger-original-headers-dropped";
}

/// Most bytes of a publisher's headers copied onto a republish. RabbitMQ's default `frame_max` is
/// 128 KiB and a message's properties must fit one frame: the worker's own headers (a few KiB at
/// most) always fit beside this.
pub const DEFAULT_HEADER_BUDGET: usize = 16 * 1024;

/// The budget for a connection whose negotiated `frame_max` is `frame_max`: the default, less on
/// a broker set to smaller frames, so that the properties of a republish always fit one frame.
pub fn header_budget(frame_max: u32) -> usize {
    DEFAULT_HEADER_BUDGET.min((frame_max as usize).saturating_sub(DEFAULT_HEADER_BUDGET))
}

/// Deepest nesting of tables and arrays in a header value that is copied; a deeper one is
/// dropped (its size is not even measured: the measure would recurse as deep as the publisher).
const MAX_DEPTH: usize = 16;

/// Whether the publisher's header `name` may be copied onto a republish.
fn is_copyable(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower == "cc"
        || lower == "bcc"
        || lower.starts_with(WORKER_PREFIX)
        // The broker's own bookkeeping: it describes the original's past, not the republish's.
        || lower == "x-death"
        || lower.starts_with("x-first-death-")
        || lower.starts_with("x-last-death-")
        || lower == "x-delivery-count"
        || lower == "x-received-from")
}

/// The properties of a republish of a message with `original` properties: the allowlisted
/// properties, the publisher's copyable headers within `header_budget` bytes (encoded size, in
/// name order, so the choice is the same at every republish), `x-blinger-original-*` for what was
/// stripped, then `own` (the worker's headers), persistent.
pub fn outgoing(
    original: &BasicProperties,
    own: impl IntoIterator<Item = (&'static str, AMQPValue)>,
    header_budget: usize,
) -> BasicProperties {
    let mut table = FieldTable::default();
    let mut dropped = 0u64;
    let mut used = 0usize;
    if let Some(headers) = original.headers() {
        // FieldTable is ordered by name.
        for (name, value) in headers.inner() {
            if !is_copyable(name.as_str()) {
                continue;
            }
            let size = encoded_len(value, 0).map(|v| 1 + name.as_str().len() + v);
            match size {
                Some(size) if used + size <= header_budget => {
                    used += size;
                    table.insert(name.clone(), value.clone());
                }
                _ => dropped += 1,
            }
        }
    }
    let mut keep = |name: &'static str, value: &Option<ShortString>| {
        if let Some(value) = value {
            table.insert(name.into(), short_as_long(value));
        }
    };
    keep(original::EXPIRATION, original.expiration());
    keep(original::USER_ID, original.user_id());
    keep(original::REPLY_TO, original.reply_to());
    if dropped > 0 {
        table.insert(
            original::HEADERS_DROPPED.into(),
            AMQPValue::LongLongInt(dropped as i64),
        );
    }
    for (name, value) in own {
        table.insert(name.into(), value);
    }

    let mut out = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(v) = original.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

/// The properties of the router's copy of a message into its partition queue (partitioned
/// mode): the message as the publisher (or a delay tier) sent it, less what would change where
/// it goes or in what order it is taken.
///
/// Unlike [`outgoing`], the worker's sealed `x-blinger-*` headers are kept byte for byte (a tier
/// return's seal must still verify; a forged one still fails), and so is `expiration`. Dropped:
/// `CC`/`BCC` (any case; on the partitions' direct exchange they would copy the job into other
/// partitions), `priority` (a quorum queue on RabbitMQ 4.x takes high-priority messages first,
/// so a publisher's priority would reorder a conversation), `user_id` (the broker checked it
/// against the publisher's user; under the worker's it would be refused and close the router's
/// channel), the broker's own `x-death`-family headers, and headers nested deeper than the
/// worker copies anywhere. Nothing is added, so the copy's header frame is never larger than the
/// one the broker accepted.
pub fn routed(original: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default().with_delivery_mode(2);
    if let Some(headers) = original.headers() {
        let mut table = FieldTable::default();
        for (name, value) in headers.inner() {
            let lower = name.as_str().to_ascii_lowercase();
            let keep = (lower.starts_with(WORKER_PREFIX) || is_copyable(name.as_str()))
                && encoded_len(value, 0).is_some();
            if keep {
                table.insert(name.clone(), value.clone());
            }
        }
        out = out.with_headers(table);
    }
    if let Some(v) = original.expiration() {
        out = out.with_expiration(v.clone());
    }
    if let Some(v) = original.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    if let Some(v) = original.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = original.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = original.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        out = out.with_app_id(v.clone());
    }
    out
}

fn short_as_long(s: &ShortString) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_str().as_bytes().to_vec()))
}

/// The AMQP 0-9-1 encoded size of a field value, without its type tag; `None` if nested deeper
/// than [`MAX_DEPTH`].
fn encoded_len(value: &AMQPValue, depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    Some(match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::Void => 0,
        AMQPValue::FieldArray(items) => {
            let mut len = 4;
            for item in items.as_slice() {
                len += 1 + encoded_len(item, depth + 1)?;
            }
            len
        }
        AMQPValue::FieldTable(table) => {
            let mut len = 4;
            for (name, item) in table.inner() {
                len += 1 + name.as_str().len() + 1 + encoded_len(item, depth + 1)?;
            }
            len
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;
    use proptest::prelude::*;

    fn ls(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
    }

    /// The encoded size of a whole header table.
    fn headers_len(properties: &BasicProperties) -> usize {
        properties
            .headers()
            .as_ref()
            .map(|t| encoded_len(&AMQPValue::FieldTable(t.clone()), 0).unwrap_or(usize::MAX))
            .unwrap_or(0)
    }

    #[test]
    fn the_routed_copy_keeps_the_trail_and_drops_what_steers_it() {
        let mut deep = AMQPValue::LongString(LongString::from("leaf"));
        for _ in 0..=MAX_DEPTH + 1 {
            deep = AMQPValue::FieldArray(FieldArray::from(vec![deep]));
        }
        let mut h = hostile().headers().clone().unwrap();
        h.insert("deep".into(), deep);
        h.insert("x-first-death-queue".into(), ls("q"));
        let original = hostile()
            .with_headers(h)
            .with_expiration("60000".into())
            .with_priority(9)
            .with_user_id("publisher".into())
            .with_reply_to("r".into())
            .with_delivery_mode(1);
        let copy = routed(&original);
        let names: Vec<_> = copy
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect();
        assert_eq!(names, ["X-Blinger-Chain", "trace-id", "x-blinger-retries"]);
        let headers = copy.headers().as_ref().unwrap().inner();
        assert_eq!(
            headers.get("x-blinger-retries"),
            Some(&AMQPValue::LongLongInt(99))
        );
        assert_eq!(
            copy.expiration().as_ref().map(|e| e.as_str()),
            Some("60000")
        );
        assert_eq!(copy.reply_to().as_ref().map(|e| e.as_str()), Some("r"));
        assert_eq!(*copy.priority(), None);
        assert_eq!(*copy.user_id(), None);
        assert_eq!(*copy.delivery_mode(), Some(2));
        assert_eq!(copy.content_type(), original.content_type());
        assert_eq!(copy.message_id(), original.message_id());
        assert_eq!(routed(&copy), copy, "a second hop changes nothing");
    }

    fn hostile() -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(
            "CC".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![ls("blinger.outbound"), ls("x")])),
        );
        h.insert("bcc".into(), ls("anything"));
        h.insert("x-blinger-retries".into(), AMQPValue::LongLongInt(99));
        h.insert("X-Blinger-Chain".into(), AMQPValue::LongLongInt(1));
        h.insert("x-death".into(), ls("forged"));
        h.insert("trace-id".into(), ls("abc"));
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_timestamp(1_700_000_000)
            .with_expiration("2000".into())
            .with_user_id("someone-else".into())
            .with_priority(9)
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_delivery_mode(1)
            .with_headers(h)
    }

    fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
        p.headers().as_ref()?.inner().get(name)
    }

    #[test]
    fn keeps_the_job_and_strips_what_steers_the_republish() {
        let out = outgoing(&hostile(), [("x-blinger-reason", ls("invalid"))], 16 * 1024);
        assert_eq!(*out.delivery_mode(), Some(2));
        assert_eq!(
            out.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(out.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(out.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(*out.timestamp(), Some(1_700_000_000));
        assert!(out.expiration().is_none());
        assert!(out.user_id().is_none());
        assert!(out.priority().is_none());
        assert!(out.reply_to().is_none());
        for gone in [
            "CC",
            "bcc",
            "x-blinger-retries",
            "X-Blinger-Chain",
            "x-death",
        ] {
            assert!(header(&out, gone).is_none(), "{gone} copied");
        }
        assert_eq!(header(&out, "trace-id"), Some(&ls("abc")));
        assert_eq!(header(&out, "x-blinger-reason"), Some(&ls("invalid")));
        assert_eq!(header(&out, original::EXPIRATION), Some(&ls("2000")));
        assert_eq!(header(&out, original::USER_ID), Some(&ls("someone-else")));
        assert_eq!(
            header(&out, original::REPLY_TO),
            Some(&ls("amq.rabbitmq.reply-to"))
        );
        assert!(header(&out, original::HEADERS_DROPPED).is_none());
    }

    #[test]
    fn headers_over_the_budget_are_dropped_and_counted() {
        let mut h = FieldTable::default();
        h.insert("a-small".into(), ls("x"));
        h.insert("b-huge".into(), ls(&"y".repeat(20_000)));
        h.insert("c-small".into(), ls("z"));
        let original = BasicProperties::default().with_headers(h);
        let out = outgoing(&original, [], 1024);
        assert_eq!(header(&out, "a-small"), Some(&ls("x")));
        assert!(header(&out, "b-huge").is_none());
        assert_eq!(header(&out, "c-small"), Some(&ls("z")));
        assert_eq!(
            header(&out, original::HEADERS_DROPPED),
            Some(&AMQPValue::LongLongInt(1))
        );
        assert!(headers_len(&out) < 1024);
    }

    #[test]
    fn a_deeply_nested_header_is_dropped_without_recursing_into_it() {
        let mut value = ls("leaf");
        for _ in 0..100 {
            value = AMQPValue::FieldArray(FieldArray::from(vec![value]));
        }
        let mut h = FieldTable::default();
        h.insert("deep".into(), value);
        let out = outgoing(&BasicProperties::default().with_headers(h), [], 1 << 20);
        assert!(header(&out, "deep").is_none());
        assert_eq!(
            header(&out, original::HEADERS_DROPPED),
            Some(&AMQPValue::LongLongInt(1))
        );
    }

    fn arb_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("CC".to_owned()),
            Just("cC".to_owned()),
            Just("BCC".to_owned()),
            Just("x-blinger-chain".to_owned()),
            Just("X-BLINGER-REASON".to_owned()),
            Just("x-death".to_owned()),
            "[a-zA-Z-]{1,12}",
        ]
    }

    proptest! {
        /// Whatever the publisher set, the republish carries no routing or lifetime override, no
        /// worker header but the worker's own, and at most the budget of the publisher's headers.
        #[test]
        fn nothing_a_publisher_sets_steers_a_republish(
            headers in proptest::collection::vec((arb_name(), 0usize..3000), 0..20),
            budget in 0usize..8000,
            expiration in proptest::option::of("[0-9]{1,6}"),
            user in proptest::option::of("[a-z]{1,8}"),
        ) {
            let mut h = FieldTable::default();
            for (name, len) in &headers {
                h.insert(name.as_str().into(), ls(&"v".repeat(*len)));
            }
            let mut original = BasicProperties::default().with_headers(h).with_priority(3);
            if let Some(e) = &expiration { original = original.with_expiration(e.as_str().into()); }
            if let Some(u) = &user { original = original.with_user_id(u.as_str().into()); }
            let out = outgoing(&original, [("x-blinger-attempts", AMQPValue::LongLongInt(1))], budget);
            prop_assert!(out.expiration().is_none());
            prop_assert!(out.user_id().is_none());
            prop_assert!(out.priority().is_none());
            prop_assert_eq!(*out.delivery_mode(), Some(2));
            let table = out.headers().clone().unwrap_or_default();
            let mut copied = 0;
            for (name, value) in table.inner() {
                let lower = name.as_str().to_ascii_lowercase();
                prop_assert!(lower != "cc" && lower != "bcc" && lower != "x-death");
                if lower.starts_with(WORKER_PREFIX) {
                    prop_assert!(
                        name.as_str() == "x-blinger-attempts" || name.as_str().starts_with("x-blinger-original-"),
                        "foreign worker header {}", name
                    );
                } else {
                    copied += 1 + name.as_str().len() + encoded_len(value, 0).unwrap();
                }
            }
            prop_assert!(copied <= budget);
        }
    }
}
