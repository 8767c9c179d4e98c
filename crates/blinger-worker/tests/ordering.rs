//! Per-conversation order under concurrency, with injected latency and failures (including
//! jobs parked in a delay tier, which the rest of their conversation must not overtake).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use test_support::*;

/// A job is dead-lettered only if all of its calls fail: 2 in-process attempts in each of 6
/// rounds (the first delivery and 5 delay tiers) is 12 calls, so at a 25 % error rate a run of
/// 300 jobs dead-letters one with probability 300 × 0.25¹² ≈ 1.8 × 10⁻⁵ (with 2 tiers, as this
/// test had, it was 300 × 0.25⁶ ≈ 7 %: it failed on a fresh clone). One job in 16 still goes
/// through a tier (two failed calls in a row), about 19 a run.
const DELAYS: &str = "1s,2s,3s,4s,5s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_conversation_is_sent_in_publish_order() {
    let env = TestEnv::new("order").await;
    env.sandbox.update(|c| {
        c.latency_ms = 2;
        c.latency_jitter_ms = 15;
        c.error_rate = 0.25;
        c.seed = Some(7);
    });
    let worker = env
        .start_worker(&[
            "--concurrency",
            "8",
            "--max-in-process-attempts",
            "2",
            "--retry-delays",
            DELAYS,
        ])
        .await;
    let conversations = 30;
    let per_conversation = 10;
    // Interleaved across conversations, as a busy publisher would.
    for i in 0..per_conversation {
        for c in 0..conversations {
            env.publish(&text_job(&format!("conv-{c}"), &i.to_string()))
                .await;
        }
    }
    let total = (conversations * per_conversation) as u64;
    assert!(
        eventually(Duration::from_secs(120), || worker.delivered("send-text")
            == total)
        .await,
        "delivered {} of {total}",
        worker.delivered("send-text")
    );
    let accepted: Vec<_> = env
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.status == 200)
        .collect();
    assert_eq!(accepted.len() as u64, total, "each job accepted once");
    let unique: HashSet<_> = accepted.iter().map(|r| r.uuid.clone()).collect();
    assert_eq!(unique.len() as u64, total);
    let mut by_conversation: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for r in &accepted {
        by_conversation
            .entry(r.conversation_id.clone().unwrap())
            .or_default()
            .push(r.body["text"].as_str().unwrap().parse().unwrap());
    }
    for (conversation, texts) in &by_conversation {
        let expected: Vec<u32> = (0..per_conversation as u32).collect();
        assert_eq!(texts, &expected, "{conversation} out of order");
    }
    let retried = worker
        .metrics
        .jobs_retried
        .with_label_values(&["send-text"])
        .get();
    assert!(retried > 0, "failures were injected");
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    worker.stop().await;
    for d in ["3s", "4s", "5s"] {
        let tier = format!("{}.retry.{d}", env.names.queue);
        let _ = env
            .channel
            .queue_delete(tier.as_str().into(), Default::default())
            .await;
    }
    env.cleanup().await;
}

/// request-review carries no idempotency key: with the default
/// `BLINGER_WORKER_KEYLESS_CONCURRENCY` of 1 no two of its calls overlap (so a crash can repeat
/// at most one), and jobs queued for that permit take no slot from other conversations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_calls_go_one_at_a_time_without_holding_up_other_conversations() {
    let env = TestEnv::new("keyless").await;
    env.sandbox.update(|c| c.latency_ms = 300);
    let worker = env.start_worker(&["--concurrency", "4"]).await;
    let reviews = 16;
    let texts = 12;
    // The reviews first, so that they would fill every slot if waiting for the permit took one.
    for c in 0..reviews {
        env.publish(&serde_json::json!({
            "kind": "request-review",
            "id": uuid::Uuid::new_v4().to_string(),
            "conversation_id": format!("review-{c}"),
        }))
        .await;
    }
    for c in 0..texts {
        env.publish(&text_job(&format!("text-{c}"), "hi")).await;
    }
    assert!(
        eventually(Duration::from_secs(60), || {
            worker.delivered("request-review") == reviews && worker.delivered("send-text") == texts
        })
        .await,
        "delivered {} reviews, {} texts",
        worker.delivered("request-review"),
        worker.delivered("send-text")
    );
    let mut records = env.sandbox.requests();
    records.sort_by_key(|r| r.seq);
    let arrival_ms = |ts: &str| {
        let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339");
        (t.unix_timestamp_nanos() / 1_000_000) as u64
    };
    let mut calls: Vec<(u64, u64)> = records
        .iter()
        .filter(|r| r.endpoint == blinger_sandbox::Endpoint::RequestReview)
        .map(|r| {
            let at = arrival_ms(&r.ts);
            (at, at + r.latency_ms)
        })
        .collect();
    calls.sort_unstable();
    for pair in calls.windows(2) {
        // Millisecond timestamps: allow one of rounding each side.
        assert!(
            pair[1].0 + 2 >= pair[0].1,
            "two request-review calls overlapped: {pair:?}"
        );
    }
    // Every text was answered before the 10th review was: the reviews queued for the permit
    // did not keep the texts' conversations from their slots.
    let order: Vec<_> = records.iter().map(|r| r.endpoint).collect();
    let last_text = order
        .iter()
        .rposition(|e| *e == blinger_sandbox::Endpoint::SendTextMessage)
        .expect("texts recorded");
    let reviews_before = order[..last_text]
        .iter()
        .filter(|e| **e == blinger_sandbox::Endpoint::RequestReview)
        .count();
    assert!(
        reviews_before < 10,
        "{reviews_before} reviews were answered before the last text"
    );
    worker.stop().await;
    env.cleanup().await;
}
