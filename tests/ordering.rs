//! Per-conversation order under concurrency, with injected latency and failures (including
//! jobs parked in a delay tier, which the rest of their conversation must not overtake).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::*;

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
            "1s,2s",
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
    env.cleanup().await;
}
