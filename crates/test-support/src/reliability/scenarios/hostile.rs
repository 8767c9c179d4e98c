//! Scenario 5, Hostile input: thousands of malformed, huge, non-UTF-8, deeply nested and wrong-typed
//! bodies interleaved with valid jobs, and on bad bodies and valid jobs alike hostile properties
//! and headers (`CC`/`BCC` naming the work queue and another queue, a short `expiration`, forged
//! `x-blinger-*` headers, headers of 20 and 100 KiB, `priority`, `reply_to`). The worker must stay
//! up and never lose its connection (every message received exactly once), dead-letter each bad
//! body once with reason `invalid` (original body kept, the dead letter staying), deliver each
//! valid job once and in order, and copy nothing into any other queue.
//!
//! (The decoder's fuzz target is `crates/blinger-worker/fuzz/fuzz_targets/decode.rs`; its corpus also runs as a plain
//! test in `crates/blinger-worker/tests/fuzz_corpus.rs`.)

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{Expect, Progress, conclude, finish};
use crate::reliability::Ctx;
use crate::reliability::harness::{Msg, World, metric_sum, secs};
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

/// The publisher's `expiration` on bad bodies: short, so that a dead letter that kept it would
/// vanish while the scenario watches, and long enough that the broker never expires one before
/// the worker takes it. At 2 s, 4 to 25 of the ~170 such messages expired in the queue on a
/// loaded 2-core machine (RabbitMQ 4.0.5, beside other scenarios or two busy loops), and the
/// broker dead-lettered them itself (reason `expired`, not received by the worker); the queue is
/// consumed within about 2.5 s even then.
const BAD_TTL: Duration = Duration::from_secs(10);

/// The worker's default body limit.
const LIMIT: usize = 256 * 1024;

/// Number of kinds of bad body [`bad_body`] makes.
pub const CATEGORIES: usize = 40;

/// Bad body number `i` (category `i % CATEGORIES`), made distinct by `i`.
pub fn bad_body(i: usize, rng: &mut StdRng) -> (String, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let conv = format!("hostile-{i}");
    let job = |extra: serde_json::Value| {
        let mut v = json!({"kind": "send-text", "id": id, "conversation_id": conv, "text": "hi"});
        for (k, val) in extra.as_object().unwrap() {
            if val.is_null() && k.starts_with('-') {
                v.as_object_mut().unwrap().remove(&k[1..]);
            } else {
                v[k] = val.clone();
            }
        }
        v.to_string().into_bytes()
    };
    let category = i % CATEGORIES;
    let body: Vec<u8> = match category {
        // Not JSON.
        0 => format!("not json {i}").into_bytes(),
        1 => format!("{{\"kind\":\"send-text\",\"id\":\"{id}\"").into_bytes(),
        2 => format!("}}{{ {i}").into_bytes(),
        3 => (0..rng.random_range(1..200))
            .map(|_| rng.random_range(0x20u8..0x7f))
            .chain(format!(" {i}").into_bytes())
            .collect(),
        4 => Vec::new(),
        5 => format!("   \n\t {i}").into_bytes(),
        // Not UTF-8.
        6 => {
            let mut b = job(json!({}));
            let at = b.len() / 2;
            b.insert(at, 0xff);
            b
        }
        7 => [&[0xc3u8, 0x28][..], format!("{i}").as_bytes()].concat(),
        8 => (0..rng.random_range(1..300))
            .map(|_| rng.random::<u8>() | 0x80)
            .collect(),
        // Huge (over the limit); a few of them, they are big.
        9 => {
            if i % (CATEGORIES * 5) == 9 {
                job(json!({"text": "x".repeat(LIMIT + i % 1000)}))
            } else {
                job(json!({"text": {"nested": "x".repeat(10)}}))
            }
        }
        // Deeply nested.
        10 => format!("{}{i}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
        11 => {
            let mut s = String::from("{\"kind\":\"send-text\",\"extra\":");
            s.push_str(&"{\"a\":".repeat(1000));
            s.push('1');
            s.push_str(&"}".repeat(1000));
            s.push_str(&format!(",\"id\":\"{id}\"}}"));
            s.into_bytes()
        }
        12 => format!("{{\"kind\":{}\"send-text\"{}}}", "[".repeat(300), "]".repeat(300))
            .into_bytes(),
        // Not an object.
        13 => format!("[\"send-text\",\"{id}\",\"{conv}\",\"hi\"]").into_bytes(),
        14 => format!("{i}").into_bytes(),
        15 => format!("\"{id}\"").into_bytes(),
        16 => b"null".to_vec(),
        17 => b"true".to_vec(),
        // Wrong types.
        18 => job(json!({"id": i})),
        19 => job(json!({"conversation_id": i})),
        20 => job(json!({"conversation_id": null})),
        21 => job(json!({"text": [i]})),
        22 => job(json!({"kind": i})),
        23 => job(json!({"kind": "assign-agent", "agent_id": true})),
        24 => job(json!({"kind": "send-file", "file_url": {"href": "https://x.example/f"}})),
        25 => job(json!({"expires_at": i})),
        // Invalid values.
        26 => job(json!({"id": format!("not-a-uuid-{i}")})),
        27 => job(json!({"id": "00000000-0000-0000-0000-000000000000", "text": format!("{i}")})),
        28 => job(json!({"text": " \t\n "})),
        29 => job(json!({"kind": "send-file", "file_url": format!("ftp://files.example/{i}")})),
        30 => job(json!({"kind": "send-file", "file_url": format!("/relative/{i}.png")})),
        31 => job(json!({"conversation_id": ".."})),
        32 => job(json!({"conversation_id": format!("bell\u{7}{i}")})),
        33 => job(json!({"conversation_id": format!("{}{i}", "c".repeat(257))})),
        34 => job(json!({"kind": format!("send-fax-{i}")})),
        35 => job(json!({"-text": null})),
        36 => job(json!({"kind": "assign-agent", "agent_id": ""})),
        37 => job(json!({"expires_at": format!("tomorrow {i}")})),
        38 => format!(
            "{{\"kind\":\"send-text\",\"id\":\"{id}\",\"id\":\"{id}\",\"conversation_id\":\"{conv}\",\"text\":\"hi\"}}"
        )
        .into_bytes(),
        _ => [&[0xef, 0xbb, 0xbf][..], &job(json!({}))[..]].concat(),
    };
    let routing_key = match i % 3 {
        0 => "send-text".to_owned(),
        1 => format!("garbage.{i}"),
        _ => "assign-agent".to_owned(),
    };
    (routing_key, body)
}

/// Number of kinds of hostile properties [`hostile_properties`] makes (one of them: none).
pub const PROPERTY_KINDS: usize = 8;

/// Hostile properties number `i`, or `None` (the defaults). `work_queue` and `side_queue` are
/// what `CC`/`BCC` name; `valid` jobs get a TTL long enough not to expire while queued.
pub fn hostile_properties(
    i: usize,
    work_queue: &str,
    side_queue: &str,
    valid: bool,
) -> Option<BasicProperties> {
    let ls = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut h = FieldTable::default();
    let mut p = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    match i % PROPERTY_KINDS {
        0 => {
            let to = |qs: &[&str]| {
                AMQPValue::FieldArray(FieldArray::from(
                    qs.iter().map(|q| ls(q)).collect::<Vec<_>>(),
                ))
            };
            h.insert("CC".into(), to(&[work_queue, side_queue]));
            h.insert("BCC".into(), to(&[side_queue]));
        }
        1 => {
            let ttl = if valid { 600_000 } else { BAD_TTL.as_millis() };
            p = p.with_expiration(ttl.to_string().into());
        }
        2 => {
            h.insert("x-blinger-retries".into(), AMQPValue::LongLongInt(99));
            h.insert("x-blinger-attempts".into(), ls(&u64::MAX.to_string()));
            h.insert("x-blinger-chain".into(), AMQPValue::LongLongInt(1));
            h.insert("x-blinger-reason".into(), ls("rejected"));
            h.insert("x-blinger-status".into(), AMQPValue::LongInt(503));
            h.insert("x-blinger-trail".into(), ls(&"0".repeat(32)));
        }
        3 => {
            h.insert("padding".into(), ls(&"p".repeat(20 * 1024)));
        }
        // 100 KiB of headers: a few of them, they are big.
        4 if i % (PROPERTY_KINDS * 10) == 4 => {
            h.insert("padding".into(), ls(&"q".repeat(100 * 1024)));
        }
        5 => {
            p = p
                .with_priority(9)
                .with_reply_to("replies.hostile".into())
                .with_type("hostile".into());
        }
        _ => return None,
    }
    Some(p.with_headers(h))
}

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let bad_n = ctx.pick(1_000, 5_000);
    let valid_n = ctx.pick(300, 2_000);
    let mut f = Figures::new("5 hostile input", ctx);
    f.setup = format!(
        "{bad_n} bad bodies ({CATEGORIES} kinds: not JSON, not UTF-8, over 256 KiB, nested \
         5000 deep, not objects, wrong types, invalid values) shuffled among {valid_n} valid jobs; \
         on both, {} kinds of hostile properties (CC/BCC to the work queue and another queue, \
         expiration, forged x-blinger-* headers, 20 and 100 KiB headers, priority/reply-to)",
        PROPERTY_KINDS - 2
    );
    let mut world = World::new(ctx, "hostile", "1s,2s,4s").await;
    let side_queue = format!("{}.side", world.names.queue);
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0xBAD);
    let mut bad: Vec<Msg> = Vec::new();
    for i in 0..bad_n {
        let (routing_key, body) = bad_body(i, &mut rng);
        assert!(
            blinger_worker::contract::job::decode(&body, LIMIT).is_err(),
            "generator bug: bad body {i} decodes"
        );
        bad.push(Msg {
            routing_key,
            body,
            properties: hostile_properties(i / 3, &world.names.queue, &side_queue, false),
        });
    }
    let plan = Plan::mixed(valid_n, 50, "conv-", ctx.seed);
    // Bad bodies in random order, merged at random places with the valid jobs, which keep their
    // order (per-conversation order is checked).
    let mut shuffled_bad = bad.clone();
    shuffled_bad.shuffle(&mut rng);
    let mut valid = plan.messages();
    for (i, m) in valid.iter_mut().enumerate() {
        m.properties = hostile_properties(i / 2, &world.names.queue, &side_queue, true);
    }
    let mut all: Vec<Msg> = Vec::with_capacity(bad_n + valid_n);
    let (mut b, mut v) = (
        shuffled_bad.into_iter().peekable(),
        valid.into_iter().peekable(),
    );
    while b.peek().is_some() || v.peek().is_some() {
        let left_b = b.len();
        let left_v = v.len();
        if rng.random_range(0..left_b + left_v) < left_b {
            all.extend(b.next());
        } else {
            all.extend(v.next());
        }
    }

    world.declare().await;
    world.declare_queue(&side_queue).await;
    let mut worker = world.start_worker(&[("BLINGER_WORKER_RATE_LIMIT", "1000")]);
    let pid = worker.pid;
    worker.wait_ready(Duration::from_secs(60)).await;
    world.publish(&all).await;
    let expect = Expect::of(&plan, &HashSet::new());
    let mut progress = Progress::default();
    let delivered_in = progress
        .wait_all(
            &world.sandbox,
            &expect,
            Duration::from_secs(ctx.pick(120, 600)),
        )
        .await;
    // The bad ones are dead-lettered without calling Blinger: wait for the metric to count them.
    let mut invalid_metric = 0.0;
    for _ in 0..600 {
        invalid_metric = worker
            .metric(
                "blinger_worker_jobs_dead_lettered_total",
                &[("reason", "invalid")],
            )
            .await
            .unwrap_or(0.0);
        if invalid_metric as usize >= bad_n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A dead letter that kept the publisher's expiration is gone after it; a republish loop
    // shows as a growing DLQ.
    tokio::time::sleep(BAD_TTL + Duration::from_secs(1)).await;
    let alive = worker.alive();
    let healthz = worker.get_text("/healthz").await;
    let metrics = worker.metrics().await.unwrap_or_default();
    let side_copies = world.ready(&side_queue).await.unwrap_or(0);
    let received = metric_sum(&metrics, "blinger_worker_jobs_received_total", &[]);
    let (exit, _) = worker.stop(Duration::from_secs(60)).await;
    let out = conclude(&world, &plan, &[]).await;
    let a = &out.analysis;

    // Every bad body must be in the DLQ exactly once, unchanged, with reason `invalid`.
    let mut expected: HashMap<&[u8], usize> = HashMap::new();
    for m in &bad {
        *expected.entry(m.body.as_slice()).or_default() += 1;
    }
    let mut found: HashMap<&[u8], usize> = HashMap::new();
    let mut wrong_reason = 0;
    let mut no_error_text = 0;
    let mut unknown_in_dlq = 0;
    for d in &out.dead {
        if expected.contains_key(d.body.as_slice()) {
            *found.entry(d.body.as_slice()).or_default() += 1;
            if d.header("x-blinger-reason") != "invalid" {
                wrong_reason += 1;
            }
            if d.header("x-blinger-error").is_empty() {
                no_error_text += 1;
            }
        } else {
            unknown_in_dlq += 1;
        }
    }
    let missing = expected
        .iter()
        .filter(|(b, n)| found.get(*b).copied().unwrap_or(0) < **n)
        .count();
    let twice = expected
        .iter()
        .filter(|(b, n)| found.get(*b).copied().unwrap_or(0) > **n)
        .count();
    let rss = metric_sum(&metrics, "process_resident_memory_bytes", &[]);

    f.published = (bad_n + valid_n) as u64;
    f.delivered = a.delivered as u64;
    f.lost = (a.lost.len() + missing) as u64;
    f.duplicated = format!(
        "{}; {twice} bad bodies dead-lettered twice",
        a.duplicates_text()
    );
    let matched: usize = expected
        .iter()
        .map(|(b, n)| found.get(*b).copied().unwrap_or(0).min(*n))
        .sum();
    f.dead_lettered = format!(
        "{} ({matched} of the {bad_n} bad bodies, {} of them with reason invalid; valid jobs: {})",
        out.dead.len(),
        matched - wrong_reason.min(matched),
        a.dead_lettered
    );
    f.order = format!("{} violations", a.order_violations);
    f.recovery = format!(
        "no restart (same pid {pid}, alive: {alive}); valid jobs all delivered in {}",
        delivered_in.map_or("(timeout)".into(), secs)
    );
    f.detail("kinds of bad body", CATEGORIES);
    f.detail("metric dead_lettered{reason=invalid}", invalid_metric);
    f.detail(
        "received{kind=unknown}",
        metric_sum(
            &metrics,
            "blinger_worker_jobs_received_total",
            &[("kind", "unknown")],
        ),
    );
    f.detail(
        "resident memory after",
        format!("{:.1} MiB", rss / 1048576.0),
    );
    f.detail(
        "valid kinds",
        plan.kinds_text(),
    );

    f.check(
        "worker stayed up",
        alive && healthz.is_some(),
        format!("alive {alive}"),
    );
    f.check(
        "each bad body dead-lettered, unchanged",
        missing == 0 && unknown_in_dlq == 0,
        format!("{missing} missing, {unknown_in_dlq} unknown bodies in the DLQ"),
    );
    let twice_examples: Vec<String> = expected
        .iter()
        .filter(|(b, n)| found.get(*b).copied().unwrap_or(0) > **n)
        .take(3)
        .map(|(b, n)| {
            format!(
                "{:?} expected {n} found {}",
                String::from_utf8_lossy(&b[..b.len().min(80)]),
                found[*b]
            )
        })
        .collect();
    f.check(
        "each bad body dead-lettered once",
        twice == 0,
        format!("{twice} {twice_examples:?}"),
    );
    f.check(
        "reason `invalid` with an x-blinger-error",
        wrong_reason == 0 && no_error_text == 0,
        format!("{wrong_reason} other reasons, {no_error_text} without error text"),
    );
    f.check(
        "each valid job delivered once",
        a.delivered == valid_n && a.lost.is_empty() && a.uuid_resends == 0 && a.second_calls == 0,
        format!("{} of {valid_n}; {}", a.delivered, a.duplicates_text()),
    );
    f.check(
        "no valid job dead-lettered",
        a.dead_lettered == 0,
        a.dead_lettered,
    );
    f.check_drained(out.backlog);
    f.check(
        "no copy in any other queue (CC/BCC)",
        side_copies == 0,
        side_copies,
    );
    f.check(
        "every message received once (no lost connection, no redelivery)",
        received as usize == bad_n + valid_n,
        format!("{received} received of {} published", bad_n + valid_n),
    );
    f.check_exits("exit 0", &[exit]);
    world.delete_queue(&side_queue).await;
    finish(world, f, started).await
}
