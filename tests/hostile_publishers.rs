//! Messages from a careless or hostile publisher: everything here is something RabbitMQ accepts,
//! set in the properties and headers rather than the body. Each test publishes the hostile
//! message among normal jobs and checks that the normal jobs are delivered exactly once and in
//! order, that the hostile one is settled exactly once (a dead letter that stays, with its
//! reason, or a delivery), that no copy lands in any other queue, and that the worker's
//! connection is never lost over it (no redelivery: every message is received exactly once).

mod common;

use std::time::Duration;

use common::*;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;

fn ls(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn job_props(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

async fn publish_on(channel: &Channel, exchange: &str, key: &str, body: &[u8], p: BasicProperties) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            p,
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack(), "broker nacked");
}

async fn publish_with(env: &TestEnv, key: &str, body: &[u8], p: BasicProperties) {
    publish_on(&env.channel, &env.names.exchange, key, body, p).await;
}

/// The normal jobs around a hostile one: `n` texts of one conversation, before and after.
async fn normal_jobs(env: &TestEnv, conversation: &str, range: std::ops::Range<u32>) {
    for i in range {
        env.publish(&text_job(conversation, &i.to_string())).await;
    }
}

/// Texts accepted by the sandbox for `conversation`, in arrival order.
fn accepted_texts(env: &TestEnv, conversation: &str) -> Vec<String> {
    env.sandbox
        .requests()
        .into_iter()
        .filter(|r| r.status == 200 && r.conversation_id.as_deref() == Some(conversation))
        .map(|r| r.body["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn received_total(worker: &RunningWorker) -> u64 {
    [
        "send-text",
        "send-file",
        "request-review",
        "assign-agent",
        "unknown",
    ]
    .iter()
    .map(|k| worker.metrics.jobs_received.with_label_values(&[k]).get())
    .sum()
}

/// The checks every test ends with: the normal jobs of `conversation` delivered once each, in
/// order; the dead-letter queue holding exactly `dead` messages that stay there (read twice, a
/// few seconds apart); every message received exactly once (so the connection never dropped).
async fn settled(
    env: &TestEnv,
    worker: &RunningWorker,
    conversation: &str,
    normal: u32,
    published: u64,
    dead: u32,
) {
    let delivered = || accepted_texts(env, conversation).len() as u32;
    assert!(
        eventually(Duration::from_secs(30), || delivered() >= normal).await,
        "normal jobs delivered: {} of {normal}",
        delivered()
    );
    let expected: Vec<String> = (0..normal).map(|i| i.to_string()).collect();
    assert_eq!(
        accepted_texts(env, conversation),
        expected,
        "once each, in order"
    );
    assert!(
        eventually(Duration::from_secs(10), || env_dead(env) >= dead).await,
        "dead letters"
    );
    // A loop or an expiry shows within seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.queue_len(&env.names.dead).await,
        dead,
        "dead letters stay"
    );
    assert_eq!(accepted_texts(env, conversation).len() as u32, normal);
    assert_eq!(
        received_total(worker),
        published,
        "every message received exactly once (no redelivery, no reconnect)"
    );
    assert!(worker.health.not_ready_reason().is_none(), "worker ready");
}

/// Messages in the dead-letter queue now (blocking call made sync for `eventually`).
fn env_dead(env: &TestEnv) -> u32 {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(env.queue_len(&env.names.dead)))
}

async fn declare_side_queue(env: &TestEnv, name: &str) {
    env.channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("side queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_and_bcc_never_route_a_republish() {
    let env = TestEnv::new("hcc").await;
    env.declare().await;
    let side_cc = format!("{}.side-cc", env.names.queue);
    let side_bcc = format!("{}.side-bcc", env.names.queue);
    declare_side_queue(&env, &side_cc).await;
    declare_side_queue(&env, &side_bcc).await;
    let worker = env.start_worker(&[]).await;

    normal_jobs(&env, "c-cc", 0..3).await;
    let mut h = FieldTable::default();
    h.insert(
        "CC".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![ls(&env.names.queue), ls(&side_cc)])),
    );
    h.insert(
        "BCC".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![ls(&side_bcc)])),
    );
    publish_with(&env, "send-text", b"not a job", job_props(h)).await;
    normal_jobs(&env, "c-cc", 3..6).await;

    settled(&env, &worker, "c-cc", 6, 7, 1).await;
    assert_eq!(env.queue_len(&side_cc).await, 0, "copy in the CC queue");
    assert_eq!(env.queue_len(&side_bcc).await, 0, "copy in the BCC queue");
    let dl = env.dead_letters(1, Duration::from_secs(5)).await;
    assert_eq!(dl[0].header("x-blinger-reason"), "invalid");
    assert!(!dl[0].headers.contains_key("CC") && !dl[0].headers.contains_key("BCC"));
    worker.stop().await;
    for q in [&side_cc, &side_bcc] {
        let _ = env
            .channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_outlives_the_publishers_ttl() {
    let env = TestEnv::new("httl").await;
    let worker = env.start_worker(&[]).await;
    normal_jobs(&env, "c-ttl", 0..2).await;
    let p = job_props(FieldTable::default()).with_expiration("1500".into());
    publish_with(&env, "send-text", b"{\"kind\":\"send-text\"}", p).await;
    normal_jobs(&env, "c-ttl", 2..4).await;
    // `settled` reads the dead-letter queue more than 3 s after the dead letter was written.
    settled(&env, &worker, "c-ttl", 4, 5, 1).await;
    let dl = env.dead_letters(1, Duration::from_secs(5)).await;
    assert_eq!(dl[0].header("x-blinger-reason"), "invalid");
    assert_eq!(dl[0].header("x-blinger-original-expiration"), "1500");
    worker.stop().await;
    env.cleanup().await;
}

/// A publisher allowed to set another user's `user_id` (RabbitMQ's `impersonator` tag): the
/// worker's republish must not carry it, or the broker refuses it and closes the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_user_id_costs_nothing() {
    let url = std::env::var("AMQP_IMPERSONATOR_URL").unwrap_or_else(|_| {
        panic!(
            "this test needs a RabbitMQ user with the `impersonator` tag: set \
             AMQP_IMPERSONATOR_URL (scripts/test.sh creates one: see scripts/lib.sh \
             ensure_impersonator)"
        )
    });
    let env = TestEnv::new("huser").await;
    env.declare().await;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("impersonator connects");
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let worker = env.start_worker(&["--max-in-process-attempts", "1"]).await;
    normal_jobs(&env, "c-user", 0..2).await;
    assert!(
        eventually(Duration::from_secs(10), || accepted_texts(&env, "c-user")
            .len()
            == 2)
        .await
    );
    let p = job_props(FieldTable::default()).with_user_id("someone-else".into());
    publish_on(&channel, &env.names.exchange, "send-text", b"[]", p.clone()).await;
    // And a valid job that fails once and is parked: the park is a republish too.
    env.sandbox.update(|c| c.status_override = Some(503));
    let parked = text_job("c-user-parked", "parked");
    publish_on(
        &channel,
        &env.names.exchange,
        "send-text",
        parked.to_string().as_bytes(),
        p,
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || worker
            .metrics
            .jobs_retried
            .with_label_values(&["send-text"])
            .get()
            >= 1)
        .await
    );
    env.sandbox.update(|c| c.status_override = None);
    assert!(
        eventually(Duration::from_secs(15), || accepted_texts(
            &env,
            "c-user-parked"
        )
        .len()
            == 1)
        .await,
        "the parked job comes back and is delivered once"
    );
    normal_jobs(&env, "c-user", 2..4).await;
    // Received: 4 normal jobs, the invalid one, the parked one twice (before and after its tier).
    settled(&env, &worker, "c-user", 4, 7, 1).await;
    let dl = env.dead_letters(1, Duration::from_secs(5)).await;
    assert_eq!(dl[0].header("x-blinger-reason"), "invalid");
    assert_eq!(dl[0].header("x-blinger-original-user-id"), "someone-else");
    worker.stop().await;
    let _ = conn.close(200, "bye".into()).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_larger_than_a_small_frame_cost_nothing() {
    let env = TestEnv::new("hframe").await;
    let worker = env.start_worker(&[]).await;
    normal_jobs(&env, "c-frame", 0..2).await;
    // A valid job with a 20 KiB header: delivered once.
    let mut h = FieldTable::default();
    h.insert("padding".into(), ls(&"p".repeat(20 * 1024)));
    let big = text_job("c-frame-big", "big headers");
    publish_with(&env, "send-text", big.to_string().as_bytes(), job_props(h)).await;
    // An invalid one with a 100 KiB header: its dead letter must still fit a frame.
    let mut h = FieldTable::default();
    h.insert("padding".into(), ls(&"q".repeat(100 * 1024)));
    h.insert("trace-id".into(), ls("kept"));
    publish_with(&env, "send-text", b"nope", job_props(h)).await;
    normal_jobs(&env, "c-frame", 2..4).await;
    settled(&env, &worker, "c-frame", 4, 6, 1).await;
    assert_eq!(accepted_texts(&env, "c-frame-big"), ["big headers"]);
    let dl = env.dead_letters(1, Duration::from_secs(5)).await;
    assert_eq!(dl[0].header("x-blinger-reason"), "invalid");
    assert_eq!(dl[0].header("trace-id"), "kept");
    assert!(!dl[0].headers.contains_key("padding"));
    assert_eq!(dl[0].header("x-blinger-original-headers-dropped"), "1");
    worker.stop().await;
    env.cleanup().await;
}

/// `x-blinger-attempts` at the integer limit: the worker's count must not overflow (a panic
/// would orphan the conversation's lane, and the jobs behind it would never be sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_attempts_at_the_integer_limit_are_ignored() {
    let env = TestEnv::new("hatt").await;
    let receipts = env.receipts_queue().await;
    let worker = env.start_worker(&[]).await;
    normal_jobs(&env, "c-att", 0..2).await;
    let mut h = FieldTable::default();
    h.insert("x-blinger-attempts".into(), ls(&u64::MAX.to_string()));
    let forged = json!({
        "kind": "send-text",
        "id": uuid::Uuid::new_v4().to_string(),
        "conversation_id": "c-att",
        "text": "2",
    });
    publish_with(
        &env,
        "send-text",
        forged.to_string().as_bytes(),
        job_props(h),
    )
    .await;
    normal_jobs(&env, "c-att", 3..5).await;
    assert!(
        eventually(Duration::from_secs(30), || accepted_texts(&env, "c-att")
            .len()
            == 5)
        .await,
        "delivered: {:?}",
        accepted_texts(&env, "c-att")
    );
    assert_eq!(accepted_texts(&env, "c-att"), ["0", "1", "2", "3", "4"]);
    let got = env.take_json(&receipts, 5, Duration::from_secs(10)).await;
    let forged_receipt = got
        .iter()
        .find(|(_, r)| r["id"] == forged["id"])
        .expect("receipt of the forged job");
    assert_eq!(forged_receipt.1["attempts"], 1, "its own count, from 0");
    assert_eq!(received_total(&worker), 5);
    worker.stop().await;
    env.cleanup().await;
}

/// A forged `x-blinger-retries` must not skip the retry round: a job that fails once is parked,
/// not dead-lettered as if it had been through every tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_retries_do_not_skip_the_retry_round() {
    let env = TestEnv::new("hretry").await;
    env.sandbox.update(|c| c.status_override = Some(503));
    let worker = env
        .start_worker(&["--max-in-process-attempts", "1", "--retry-delays", "1s,2s"])
        .await;
    let mut h = FieldTable::default();
    h.insert("x-blinger-retries".into(), AMQPValue::LongLongInt(99));
    let job = text_job("c-retry", "0");
    publish_with(&env, "send-text", job.to_string().as_bytes(), job_props(h)).await;
    assert!(
        eventually(Duration::from_secs(10), || worker
            .metrics
            .jobs_retried
            .with_label_values(&["send-text"])
            .get()
            >= 1
            || env_dead(&env) > 0)
        .await
    );
    env.sandbox.update(|c| c.status_override = None);
    assert!(
        eventually(Duration::from_secs(15), || accepted_texts(&env, "c-retry")
            .len()
            == 1)
        .await,
        "parked, back from its tier and delivered (dead letters: {})",
        env_dead(&env)
    );
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    worker.stop().await;
    env.cleanup().await;
}

/// A forged `x-blinger-chain` older than every real member must not let a job overtake an older
/// job of its conversation that is out in a delay tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_chain_does_not_overtake() {
    let env = TestEnv::new("hchain").await;
    env.sandbox.update(|c| c.status_override = Some(503));
    let worker = env
        .start_worker(&["--max-in-process-attempts", "1", "--retry-delays", "2s,4s"])
        .await;
    env.publish(&text_job("c-chain", "first")).await;
    assert!(
        eventually(Duration::from_secs(10), || worker
            .metrics
            .jobs_retried
            .with_label_values(&["send-text"])
            .get()
            >= 1)
        .await,
        "the first job is parked"
    );
    env.sandbox.update(|c| c.status_override = None);
    let mut h = FieldTable::default();
    h.insert("x-blinger-chain".into(), AMQPValue::LongLongInt(1));
    let second = text_job("c-chain", "second");
    publish_with(
        &env,
        "send-text",
        second.to_string().as_bytes(),
        job_props(h),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(20), || accepted_texts(&env, "c-chain")
            .len()
            == 2)
        .await,
        "delivered: {:?}",
        accepted_texts(&env, "c-chain")
    );
    assert_eq!(accepted_texts(&env, "c-chain"), ["first", "second"]);
    worker.stop().await;
    env.cleanup().await;
}

/// Forged `x-blinger-reason` / `x-blinger-status` on a message the worker dead-letters: the dead
/// letter carries the worker's reason and nothing of the forgery, so `dlq replay --reason` is
/// not steered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reason_and_status_do_not_reach_the_dead_letter() {
    let env = TestEnv::new("hreason").await;
    let worker = env.start_worker(&[]).await;
    let mut h = FieldTable::default();
    h.insert("x-blinger-reason".into(), ls("retries-exhausted"));
    h.insert("x-blinger-status".into(), AMQPValue::LongInt(503));
    h.insert("x-blinger-first-seen".into(), AMQPValue::LongLongInt(1));
    publish_with(&env, "send-text", b"{}", job_props(h)).await;
    let dl = env.dead_letters(1, Duration::from_secs(10)).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].header("x-blinger-reason"), "invalid");
    assert!(!dl[0].headers.contains_key("x-blinger-status"));
    assert!(!dl[0].headers.contains_key("x-blinger-first-seen"));
    worker.stop().await;
    env.cleanup().await;
}

/// One id, two different jobs: the second is dead-lettered `conflict` with a `dead-lettered`
/// receipt, never acked as delivered with the first one's Blinger id; a true redelivery of the
/// first stays a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_id_with_another_payload_is_a_conflict() {
    let env = TestEnv::new("hconflict").await;
    let receipts = env.receipts_queue().await;
    let worker = env.start_worker(&[]).await;
    let first = text_job("c-conflict", "the real message");
    env.publish(&first).await;
    assert!(
        eventually(Duration::from_secs(10), || worker.delivered("send-text")
            == 1)
        .await
    );
    let mut other = first.clone();
    other["text"] = json!("another message under the same id");
    env.publish(&other).await;
    let dl = env.dead_letters(1, Duration::from_secs(10)).await;
    assert_eq!(dl.len(), 1, "the other job is dead-lettered");
    assert_eq!(dl[0].header("x-blinger-reason"), "conflict");
    env.publish(&first).await;
    let got = env.take_json(&receipts, 3, Duration::from_secs(10)).await;
    let outcomes: Vec<(String, String)> = got
        .iter()
        .map(|(_, r)| {
            (
                r["outcome"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("delivered".to_owned(), String::new()),
            ("dead-lettered".to_owned(), "conflict".to_owned()),
            ("delivered".to_owned(), String::new()),
        ]
    );
    assert_eq!(got[1].1["blinger_message_id"], serde_json::Value::Null);
    assert_eq!(accepted_texts(&env, "c-conflict"), ["the real message"]);
    worker.stop().await;
    env.cleanup().await;
}
