//! Which partition a conversation belongs to, forever: the hash every replica and every version
//! of the worker must agree on (docs/scale-out.md 4.3).
//!
//! In partitioned mode (`BLINGER_WORKER_PARTITIONS` = P > 0) the router sends each job to the
//! partition queue `p = jump(fnv1a64(conversation_id), P)`. All jobs of a conversation therefore
//! wait in one queue, in the order the router read them, and one consumer at a time takes that
//! queue (single active consumer): that is what keeps a conversation's order across replicas.
//!
//! The hash is the worker's own, in a few lines, with no library and no broker plugin involved
//! (the consistent-hash exchange changed its hash between RabbitMQ 3.12 and 3.13, which moves keys
//! during a rolling upgrade). FNV-1a 64 of the id's UTF-8 bytes, then Lamping and Veach's jump
//! consistent hash with its published constants. Its name, [`HASH_VERSION`], is written into the
//! topology record; the golden vectors below pin it: a change to this function is a change of
//! the on-broker layout, never a refactoring.
//!
//! Jump hash moves only 1/P′ of the keys when P grows to P′, which keeps the documented
//! repartition procedure (docs/deploy.md) short; the worker itself never changes P.

/// The name of this partition function in the topology record.
pub const HASH_VERSION: &str = "blinger-p1";

/// Most partitions a deployment may have.
pub const MAX_PARTITIONS: u16 = 256;

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// Jump consistent hash (Lamping, Veach 2014), exactly the paper's reference code: the bucket of
/// `key` among `buckets` (at least 1). IEEE 754 division is exact to the last bit on every
/// platform, so the floating-point step is as deterministic as integer arithmetic.
pub fn jump(mut key: u64, buckets: u16) -> u16 {
    let buckets = i64::from(buckets.max(1));
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u16
}

/// The partition of `conversation_id` among `partitions` (P > 0).
pub fn partition_of(conversation_id: &str, partitions: u16) -> u16 {
    jump(fnv1a64(conversation_id.as_bytes()), partitions)
}

/// The partitions, as queue-name suffixes and routing keys: `00`…`15` for P = 16, three digits
/// from P = 101, so names sort in partition order.
pub fn label(partition: u16, partitions: u16) -> String {
    let width = partitions.saturating_sub(1).to_string().len().max(2);
    format!("{partition:0width$}")
}

/// The partition a router sends a message to when it cannot read the conversation of the body
/// (not JSON, no `conversation_id` string, too large): the owner of partition 0 decodes it in
/// full and dead-letters it with the reason, exactly as in single-queue mode.
pub const UNREADABLE: u16 = 0;

/// The conversation a router reads from a body: the one field it needs, without decoding the job
/// (the partition's owner does that, once). `None` for anything the full decoding would refuse
/// for want of a conversation id, and for bodies over `max_body_bytes`.
pub fn conversation_of(body: &[u8], max_body_bytes: usize) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        conversation_id: Option<serde_json::Value>,
    }
    // As the job decoder: serde would take an array as a struct in sequence form.
    let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if body.len() > max_body_bytes || !object {
        return None;
    }
    match serde_json::from_slice::<Probe>(body)
        .ok()?
        .conversation_id?
    {
        serde_json::Value::String(id) => Some(id),
        _ => None,
    }
}

/// The partition of a message with `body`.
pub fn route(body: &[u8], max_body_bytes: usize, partitions: u16) -> u16 {
    conversation_of(body, max_body_bytes).map_or(UNREADABLE, |id| partition_of(&id, partitions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn jump_matches_the_papers_reference_vectors() {
        // The vectors every port of the reference implementation carries.
        assert_eq!(jump(1, 1), 0);
        assert_eq!(jump(42, 57), 43);
        assert_eq!(jump(0xDEAD_10CC, 1), 0);
        assert_eq!(jump(0xDEAD_10CC, 666), 361);
        assert_eq!(jump(256, 1024), 520);
    }

    /// The layout on the broker: these conversations are in these partitions for as long as
    /// [`HASH_VERSION`] is `blinger-p1`. Never edit a value; a new function is a new version.
    #[test]
    fn blinger_p1_is_pinned() {
        let golden: &[(&str, u16, u16)] = &[
            ("c", 16, 15),
            ("conversation-1", 16, 15),
            ("conversation-2", 16, 1),
            ("8f14e45f-ceea-467f-a0e6-7d8a9c0b1e2d", 16, 9),
            ("разговор", 16, 14),
            ("conversation-1", 256, 111),
            ("conversation-1", 1, 0),
        ];
        let got: Vec<_> = golden
            .iter()
            .map(|(id, p, _)| (*id, *p, partition_of(id, *p)))
            .collect();
        assert_eq!(got, golden);
    }

    #[test]
    fn labels_sort_in_partition_order() {
        assert_eq!(label(0, 16), "00");
        assert_eq!(label(15, 16), "15");
        assert_eq!(label(3, 1), "03");
        assert_eq!(label(7, 256), "007");
        assert_eq!(label(99, 100), "99");
        assert_eq!(label(100, 101), "100");
    }

    #[test]
    fn the_router_reads_only_a_string_conversation_id() {
        let body = br#"{"kind":"send-text","id":"x","conversation_id":"c","text":"t"}"#;
        assert_eq!(conversation_of(body, 1024).as_deref(), Some("c"));
        assert_eq!(route(body, 1024, 16), partition_of("c", 16));
        assert_eq!(conversation_of(body, 10), None, "over the body limit");
        assert_eq!(conversation_of(br#"{"conversation_id":7}"#, 1024), None);
        assert_eq!(conversation_of(br#"{"conversation_id":null}"#, 1024), None);
        assert_eq!(conversation_of(b"not json", 1024), None);
        assert_eq!(conversation_of(br#"["c"]"#, 1024), None);
        assert_eq!(route(b"not json", 1024, 16), UNREADABLE);
    }

    proptest! {
        /// Every id lands in a partition that exists, and in the same one every time.
        #[test]
        fn every_conversation_has_one_partition(id in ".{0,64}", p in 1u16..=MAX_PARTITIONS) {
            let at = partition_of(&id, p);
            prop_assert!(at < p);
            prop_assert_eq!(at, partition_of(&id, p));
        }

        /// Growing from P to P + 1 moves a key only into the new partition (what makes jump
        /// hash consistent).
        #[test]
        fn growing_moves_keys_only_to_the_new_partition(id in ".{0,64}", p in 1u16..MAX_PARTITIONS) {
            let (before, after) = (partition_of(&id, p), partition_of(&id, p + 1));
            prop_assert!(after == before || after == p);
        }

        /// The router's reading agrees with the job decoder's for every valid job.
        #[test]
        fn the_router_agrees_with_the_decoder(id in "[a-zA-Z0-9_-]{1,64}") {
            let body = format!(
                r#"{{"kind":"send-text","id":"8f14e45f-ceea-467f-a0e6-7d8a9c0b1e2d","conversation_id":"{id}","text":"t"}}"#
            );
            let job = crate::contract::job::decode(body.as_bytes(), 4096).unwrap();
            prop_assert_eq!(route(body.as_bytes(), 4096, 16), partition_of(&job.conversation_id, 16));
        }
    }

    #[test]
    fn keys_spread_over_the_partitions() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[usize::from(partition_of(&format!("conversation-{i}"), 16))] += 1;
        }
        // 1,000 expected per partition; a binomial deviation of 10 % is about 3 sigma.
        assert!(
            counts.iter().all(|&c| (850..=1150).contains(&c)),
            "{counts:?}"
        );
    }
}
