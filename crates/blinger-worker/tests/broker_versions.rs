//! What differs between the RabbitMQ versions the worker is tested against (3.10 and 4.x, see
//! README "Tested brokers"), each difference pinned by a test that runs on every broker of
//! `scripts/test.sh`:
//!
//! - 4.0 gives every quorum queue without an `x-delivery-limit` a limit of 20, and counts each
//!   hand-back of an unacked message (nack with requeue, channel or connection closed) toward it.
//!   The dead-letter queue has no dead-letter exchange, so at the limit a dead letter would be
//!   dropped: reading it 21 times with `dlq list` would lose it. The topology declares the
//!   dead-letter queue and the tiers with an explicit limit that is unlimited in practice on both
//!   versions (`-1`, 4.x's "no limit", drops a message at its first redelivery on 3.10).
//! - A dead-letter queue or tier declared by an earlier version (no limit argument) is kept: the
//!   worker and `publish` fall back to its old arguments instead of failing PRECONDITION_FAILED.
//! - The work queue's own delivery limit (the safety net) dead-letters with reason
//!   `delivery_limit` on both.
//! - 4.0 quorum queues deliver a message with `priority` above 4 first; 3.10 ignores priority.
//!
//! `BLINGER_TEST_BROKER_VERSION` (set by `scripts/test.sh`) makes the run prove which broker it
//! ran against.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Output;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use test_support::*;

/// A long-string header value, as the worker writes them.
use blinger_worker::broker::string_value as ls;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_blinger-worker");

/// More readings than 4.0's default delivery limit (20) allows.
const READINGS: usize = 25;

/// Runs the binary with this env's broker and names.
fn cli(env: &TestEnv, retry_delays: &str, args: &[&str]) -> Output {
    env.command(BIN)
        .env("BLINGER_WORKER_RETRY_DELAYS", retry_delays)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// Publishes `body` straight into `queue` (default exchange), persistent, confirmed.
async fn put(env: &TestEnv, queue: &str, body: &[u8]) {
    let confirm = env
        .channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack(), "broker nacked");
}

/// Takes the one message of `queue` and returns its `x-delivery-count` (how many times the broker
/// counted it handed back).
async fn take_delivery_count(env: &TestEnv, queue: &str) -> i64 {
    let msg = env
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .unwrap_or_else(|| panic!("{queue} is empty"));
    match msg
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned())
    {
        Some(AMQPValue::LongLongInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => n as i64,
        Some(AMQPValue::ShortShortInt(n)) => n as i64,
        Some(AMQPValue::ShortInt(n)) => n as i64,
        other => panic!("no x-delivery-count on a quorum queue message: {other:?}"),
    }
}

fn job(id: &str) -> Vec<u8> {
    serde_json::json!({"kind": "send-text", "id": id, "conversation_id": "c-1", "text": "Hi"})
        .to_string()
        .into_bytes()
}

/// The version a broker announces in connection.start (lapin does not expose it).
fn announced_version(url: &str) -> String {
    let addr = amqp_socket(url);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("cannot reach RabbitMQ at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).expect("connection.start");
        assert!(n > 0, "the broker closed before connection.start");
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= 7 {
            let size = u32::from_be_bytes(buf[3..7].try_into().unwrap()) as usize;
            if buf.len() >= 8 + size {
                break;
            }
        }
    }
    let key = b"\x07versionS";
    let at = buf
        .windows(key.len())
        .position(|w| w == key)
        .expect("server properties name a version")
        + key.len();
    let len = u32::from_be_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
    String::from_utf8_lossy(&buf[at + 4..at + 4 + len]).into_owned()
}

#[tokio::test]
async fn runs_against_the_broker_version_it_reports() {
    let broker = broker().await;
    let version = announced_version(&broker.url);
    eprintln!("RabbitMQ {version} at {}", amqp_socket(&broker.url));
    if let Ok(expected) = std::env::var("BLINGER_TEST_BROKER_VERSION") {
        assert_eq!(
            version, expected,
            "scripts/test.sh meant this run for RabbitMQ {expected}, but AMQP_URL answers as {version}"
        );
    }
}

#[tokio::test]
async fn reading_the_dead_letter_queue_never_burns_a_delivery_limit() {
    let env = TestEnv::new("dlqlimit").await;
    env.declare().await;
    let id = Uuid::new_v4().to_string();
    put(&env, &env.names.dead, &job(&id)).await;

    for reading in 1..=READINGS {
        let out = cli(&env, "1s,2s", &["dlq", "list", "--json"]);
        assert!(
            out.status.success(),
            "dlq list #{reading} failed: {}",
            text(&out.stderr)
        );
        let listed: Value = serde_json::from_slice(&out.stdout).expect("dlq list --json");
        let ids: Vec<&str> = listed
            .as_array()
            .expect("a JSON array")
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(
            ids,
            [id.as_str()],
            "reading #{reading} of the dead-letter queue lost the dead letter (a delivery limit on \
             the dead-letter queue?)"
        );
    }
    let show = cli(&env, "1s,2s", &["dlq", "show", &id]);
    assert!(show.status.success(), "dlq show: {}", text(&show.stderr));
    let count = take_delivery_count(&env, &env.names.dead).await;
    assert!(
        count >= READINGS as i64,
        "each reading is counted by the broker (x-delivery-count {count}), so the test means something"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn handing_back_a_tier_message_never_burns_a_delivery_limit() {
    let env = TestEnv::new("tierlimit").await;
    // A long tier, so the message stays put while it is read.
    let topology = env.declare_with(&["--retry-delays", "10m"]).await;
    let tier = topology.tiers[0].clone();
    put(&env, &tier, &job(&Uuid::new_v4().to_string())).await;

    for _ in 0..READINGS {
        let msg = env
            .channel
            .basic_get(tier.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
            .expect("the tier still holds the message");
        msg.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
    }
    // The last nack reaches the queue shortly after it is sent.
    let mut in_tier = 0;
    for _ in 0..100 {
        in_tier = env.queue_len(&tier).await;
        if in_tier == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(in_tier, 1, "the tier kept its message");
    assert_eq!(
        env.jobs_waiting().await,
        0,
        "nothing left the tier early for the work queue"
    );
    assert!(take_delivery_count(&env, &tier).await >= READINGS as i64);
    let _ = env
        .channel
        .queue_delete(tier.as_str().into(), QueueDeleteOptions::default())
        .await;
    env.cleanup().await;
}

/// The arguments an earlier version of the worker declared the dead-letter queue and the tiers
/// with (quorum, no `x-delivery-limit`).
async fn declare_like_before(env: &TestEnv, tiers: &[(&str, i32)]) {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let mut dead = FieldTable::default();
    dead.insert("x-queue-type".into(), ls("quorum"));
    env.channel
        .queue_declare(env.names.dead.as_str().into(), durable, dead)
        .await
        .expect("legacy dead-letter queue");
    for (suffix, ttl) in tiers {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), ls("quorum"));
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(*ttl));
        args.insert("x-dead-letter-exchange".into(), ls(""));
        args.insert("x-dead-letter-routing-key".into(), ls(&env.names.queue));
        args.insert("x-dead-letter-strategy".into(), ls("at-least-once"));
        args.insert("x-overflow".into(), ls("reject-publish"));
        env.channel
            .queue_declare(
                format!("{}.retry.{suffix}", env.names.queue)
                    .as_str()
                    .into(),
                durable,
                args,
            )
            .await
            .expect("legacy tier");
    }
}

#[tokio::test]
async fn queues_declared_by_an_earlier_version_are_kept() {
    let env = TestEnv::new("upgrade").await;
    declare_like_before(&env, &[("1s", 1000), ("2s", 2000)]).await;

    // `publish` declares the topology first.
    let out = cli(
        &env,
        "1s,2s",
        &[
            "publish",
            "--kind",
            "send-text",
            "--conversation-id",
            "c-1",
            "--text",
            "Hi",
        ],
    );
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "publish against queues of an earlier version: {stderr}"
    );
    assert!(
        stderr.contains("delivery-limit") && stderr.contains(&env.names.dead),
        "the fallback is reported with the policy to set: {stderr}"
    );

    // And the worker, which delivers the job.
    let worker = env.start_worker(&[]).await;
    assert!(
        eventually(Duration::from_secs(20), || worker.delivered("send-text")
            == 1)
        .await,
        "the worker runs on the earlier queues and delivers"
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_work_queue_delivery_limit_dead_letters_with_its_reason() {
    let env = TestEnv::new("safetynet").await;
    env.declare_with(&["--delivery-limit", "2"]).await;
    let id = Uuid::new_v4().to_string();
    env.publish_raw("send-text", &job(&id)).await;

    // A job that keeps crashing its worker: handed back every time. Limit 2 = a third hand-back
    // dead-letters it (the same on 3.10 and 4.x).
    let mut handed_back = 0;
    while handed_back < 10 {
        let Some(msg) = env
            .channel
            .basic_get(env.names.queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get")
        else {
            break;
        };
        msg.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .expect("nack");
        handed_back += 1;
    }
    assert_eq!(
        handed_back, 3,
        "limit 2 lets the job be handed back 3 times"
    );
    let dead = env.dead_letters(1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "the job went to the dead-letter queue");
    assert_eq!(
        dead[0].header("x-first-death-reason"),
        "delivery_limit",
        "the broker's reason"
    );
    assert_eq!(dead[0].header("x-first-death-queue"), env.names.queue);
    env.cleanup().await;
}

/// RabbitMQ 4.0 quorum queues have two message priorities: a message published with `priority`
/// above 4 is delivered before the normal ones waiting ahead of it. 3.10 ignores the property.
/// A publisher's priority can therefore reorder a conversation on 4.x before the worker (or the
/// router of partitioned mode) sees the jobs: README "Order" tells publishers to keep to one
/// priority, and the router's copies drop the property so nothing downstream reorders again.
#[tokio::test]
async fn a_publishers_priority_reorders_a_quorum_queue_on_4x_only() {
    let env = TestEnv::new("priority").await;
    env.declare().await;
    let version = announced_version(&env.broker.url);
    let first = Uuid::new_v4().to_string();
    let urgent = Uuid::new_v4().to_string();
    put(&env, &env.names.queue, &job(&first)).await;
    let confirm = env
        .channel
        .basic_publish(
            "".into(),
            env.names.queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &job(&urgent),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_priority(9),
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack(), "broker nacked");

    let mut taken = Vec::new();
    for _ in 0..2 {
        let msg = env
            .channel
            .basic_get(
                env.names.queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get")
            .expect("two messages");
        let body: Value = serde_json::from_slice(&msg.delivery.data).unwrap();
        taken.push(body["id"].as_str().unwrap().to_owned());
    }
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    let expected = if major >= 4 {
        vec![urgent, first]
    } else {
        vec![first, urgent]
    };
    assert_eq!(taken, expected, "order of delivery on RabbitMQ {version}");
    env.cleanup().await;
}
