//! Messages from a careless or hostile publisher: everything here is something RabbitMQ accepts,
//! set in the properties and headers rather than the body. Each test publishes the hostile
//! message among normal jobs and checks that the normal jobs are delivered exactly once and in
//! order, that the hostile one is settled exactly once (a dead letter that stays, with its
//! reason, or a delivery), that no copy lands in any other queue, and that the worker's
//! connection is never lost over it (no redelivery: every message is received exactly once).

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use test_support::*;

/// A long-string header value, as the worker writes them.
use blinger_worker::broker::string_value as ls;

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
    // The worker consumes: the TTL cannot run out while the job waits in the work queue (there,
    // the broker would expire it, by the publisher's wish).
    assert!(
        eventually(Duration::from_secs(10), || accepted_texts(&env, "c-ttl")
            .len()
            == 2)
        .await
    );
    let p = job_props(FieldTable::default()).with_expiration("3000".into());
    publish_with(&env, "send-text", b"{\"kind\":\"send-text\"}", p).await;
    normal_jobs(&env, "c-ttl", 2..4).await;
    assert!(eventually(Duration::from_secs(10), || env_dead(&env) == 1).await);
    // Past the TTL; `settled` reads the dead-letter queue 3 s later again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    settled(&env, &worker, "c-ttl", 4, 5, 1).await;
    let dl = env.dead_letters(1, Duration::from_secs(5)).await;
    assert_eq!(dl[0].header("x-blinger-reason"), "invalid");
    assert_eq!(dl[0].header("x-blinger-original-expiration"), "3000");
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
    assert!(eventually(Duration::from_secs(10), || worker.retried("send-text") >= 1).await);
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
        eventually(Duration::from_secs(10), || worker.retried("send-text") >= 1
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
        eventually(Duration::from_secs(10), || worker.retried("send-text") >= 1).await,
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

/// Publishes one message with a raw AMQP 0-9-1 client, so that its header table can be what no
/// client library would encode (lapin's encoder recurses, and overflows its own stack on it):
/// `headers` is the encoded field table, as it goes on the wire.
async fn publish_raw_frames(url: &str, exchange: &str, key: &str, body: &[u8], headers: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let u = url::Url::parse(url).unwrap();
    let mut s = tokio::net::TcpStream::connect(amqp_socket(url))
        .await
        .unwrap();
    let short = |v: &mut Vec<u8>, t: &str| {
        v.push(t.len() as u8);
        v.extend_from_slice(t.as_bytes());
    };
    let long = |v: &mut Vec<u8>, t: &[u8]| {
        v.extend_from_slice(&(t.len() as u32).to_be_bytes());
        v.extend_from_slice(t);
    };
    async fn frame(s: &mut tokio::net::TcpStream, kind: u8, ch: u16, payload: &[u8]) {
        let mut f = vec![kind];
        f.extend_from_slice(&ch.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        s.write_all(&f).await.unwrap();
    }
    async fn method(s: &mut tokio::net::TcpStream, ch: u16, class: u16, m: u16, args: &[u8]) {
        let mut p = class.to_be_bytes().to_vec();
        p.extend_from_slice(&m.to_be_bytes());
        p.extend_from_slice(args);
        frame(s, 1, ch, &p).await;
    }
    /// Reads frames until a method frame of (class, method).
    async fn expect(s: &mut tokio::net::TcpStream, class: u16, m: u16) {
        loop {
            let mut head = [0u8; 7];
            s.read_exact(&mut head).await.unwrap();
            let size = u32::from_be_bytes(head[3..7].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; size + 1];
            s.read_exact(&mut payload).await.unwrap();
            if head[0] == 1 {
                let c = u16::from_be_bytes([payload[0], payload[1]]);
                let mm = u16::from_be_bytes([payload[2], payload[3]]);
                assert!(!(c == 10 && mm == 50), "connection closed by the broker");
                assert!(!(c == 20 && mm == 40), "channel closed by the broker");
                if (c, mm) == (class, m) {
                    return;
                }
            }
        }
    }
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    expect(&mut s, 10, 10).await; // connection.start
    let mut a = Vec::new();
    a.extend_from_slice(&0u32.to_be_bytes()); // client properties: empty table
    short(&mut a, "PLAIN");
    long(
        &mut a,
        format!("\0{}\0{}", u.username(), u.password().unwrap_or("")).as_bytes(),
    );
    short(&mut a, "en_US");
    method(&mut s, 0, 10, 11, &a).await;
    expect(&mut s, 10, 30).await; // connection.tune
    let mut a = 16u16.to_be_bytes().to_vec();
    a.extend_from_slice(&131_072u32.to_be_bytes());
    a.extend_from_slice(&0u16.to_be_bytes());
    method(&mut s, 0, 10, 31, &a).await;
    let vhost = percent_encoding::percent_decode_str(u.path().trim_start_matches('/'))
        .decode_utf8_lossy()
        .into_owned();
    let mut a = Vec::new();
    short(&mut a, if vhost.is_empty() { "/" } else { &vhost });
    a.extend_from_slice(&[0, 0]);
    method(&mut s, 0, 10, 40, &a).await;
    expect(&mut s, 10, 41).await;
    method(&mut s, 1, 20, 10, &[0]).await;
    expect(&mut s, 20, 11).await;
    method(&mut s, 1, 85, 10, &[0]).await; // confirm.select
    expect(&mut s, 85, 11).await;
    let mut a = 0u16.to_be_bytes().to_vec();
    short(&mut a, exchange);
    short(&mut a, key);
    a.push(0);
    method(&mut s, 1, 60, 40, &a).await;
    let mut h = 60u16.to_be_bytes().to_vec();
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&(body.len() as u64).to_be_bytes());
    // content-type, headers, delivery-mode
    h.extend_from_slice(&(0x8000u16 | 0x2000 | 0x1000).to_be_bytes());
    short(&mut h, "application/json");
    h.extend_from_slice(headers);
    h.push(2);
    frame(&mut s, 2, 1, &h).await;
    frame(&mut s, 3, 1, body).await;
    expect(&mut s, 60, 80).await; // basic.ack: the broker took it
}

/// A field table `{"deep": [[[...["leaf"]...]]]}` nested `depth` arrays deep, encoded.
fn deep_table(depth: usize) -> Vec<u8> {
    let leaf = {
        let mut v = vec![b'S'];
        v.extend_from_slice(&4u32.to_be_bytes());
        v.extend_from_slice(b"leaf");
        v
    };
    let mut value = leaf;
    for _ in 0..depth {
        let mut v = vec![b'A'];
        v.extend_from_slice(&(value.len() as u32).to_be_bytes());
        v.extend_from_slice(&value);
        value = v;
    }
    let mut entry = vec![4u8];
    entry.extend_from_slice(b"deep");
    entry.extend_from_slice(&value);
    let mut t = (entry.len() as u32).to_be_bytes().to_vec();
    t.extend_from_slice(&entry);
    t
}

/// A header nested as deep as a frame allows (RabbitMQ accepts it: its parser does not recurse
/// on a bounded stack), on a valid job and on an invalid one: the worker binary must settle both
/// without losing its connection or its process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_header_costs_nothing() {
    let env = TestEnv::new("hdeep").await;
    env.declare().await;
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_blinger-worker"))
        .arg("run")
        .env_remove("RUST_MIN_STACK")
        .env("AMQP_URL", &env.broker.url)
        .env("BLINGER_WORKER_EXCHANGE", &env.names.exchange)
        .env("BLINGER_WORKER_QUEUE", &env.names.queue)
        .env("BLINGER_WORKER_DEAD_LETTER_QUEUE", &env.names.dead)
        .env("BLINGER_WORKER_RECEIPTS_EXCHANGE", &env.names.events)
        .env("BLINGER_WORKER_RETRY_DELAYS", "1s,2s")
        .env("BLINGER_API_URL", env.sandbox.base_url())
        .env("BLINGER_API_TOKEN", TOKEN)
        .env("BLINGER_WORKER_DATA_DIR", env.data_dir.path())
        .env("BLINGER_WORKER_METRICS_ADDR", "127.0.0.1:0")
        .envs(env.names.partitions_env())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(env.data_dir.path().join("worker.log")).unwrap())
        .spawn()
        .expect("worker binary starts");
    normal_jobs(&env, "c-deep", 0..2).await;
    // 26,000 arrays: as deep as a 128 KiB frame allows.
    let headers = deep_table(26_000);
    let job = text_job("c-deep-nested", "nested headers");
    let url = env.broker.url.clone();
    publish_raw_frames(
        &url,
        &env.names.exchange,
        "send-text",
        job.to_string().as_bytes(),
        &headers,
    )
    .await;
    publish_raw_frames(
        &url,
        &env.names.exchange,
        "send-text",
        b"not a job",
        &headers,
    )
    .await;
    normal_jobs(&env, "c-deep", 2..4).await;
    let delivered =
        || accepted_texts(&env, "c-deep").len() + accepted_texts(&env, "c-deep-nested").len();
    let all = eventually(Duration::from_secs(90), || delivered() == 5).await;
    let alive = worker.try_wait().unwrap().is_none();
    let _ = worker.kill();
    let _ = worker.wait();
    let log = std::fs::read_to_string(env.data_dir.path().join("worker.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    assert!(alive, "the worker process died: {tail:?}");
    assert!(all, "delivered {} of 5: {tail:?}", delivered());
    assert_eq!(accepted_texts(&env, "c-deep"), ["0", "1", "2", "3"]);
    assert_eq!(accepted_texts(&env, "c-deep-nested"), ["nested headers"]);
    let dl = env.dead_letters(1, Duration::from_secs(10)).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].header("x-blinger-reason"), "invalid");
    assert_eq!(dl[0].header("x-blinger-original-headers-dropped"), "1");
    env.cleanup().await;
}

/// A body far over the limit (2 MiB; the broker accepts up to its `max_message_size`): dead-
/// lettered once as `invalid` with the size in its error, the connection kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_far_over_the_limit_is_dead_lettered_once() {
    let env = TestEnv::new("hbig").await;
    let worker = env.start_worker(&[]).await;
    normal_jobs(&env, "c-big", 0..2).await;
    let mut huge = text_job("c-big", "huge");
    huge["text"] = json!("x".repeat(2 * 1024 * 1024));
    env.publish(&huge).await;
    normal_jobs(&env, "c-big", 2..4).await;
    settled(&env, &worker, "c-big", 4, 5, 1).await;
    let dl = env.dead_letters(1, Duration::from_secs(5)).await;
    assert_eq!(dl[0].header("x-blinger-reason"), "invalid");
    assert!(
        dl[0]
            .header("x-blinger-error")
            .contains("over the 262144-byte limit"),
        "{}",
        dl[0].header("x-blinger-error")
    );
    assert_eq!(dl[0].body.len(), huge.to_string().len(), "body kept whole");
    worker.stop().await;
    env.cleanup().await;
}
