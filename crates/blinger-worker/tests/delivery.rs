//! Delivery end to end: real RabbitMQ, the sandbox Blinger, the worker in-process.

use std::time::Duration;

use blinger_worker::store::{Delivered, now_ms};
use serde_json::json;
use test_support::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_is_delivered_with_exact_path_headers_and_body() {
    let env = TestEnv::new("kinds").await;
    let worker = env.start_worker(&[]).await;
    let conv = "e1d247c8-5cd8-4f93-b9d7-15fd3259ac22";
    let ids: Vec<String> = (0..4).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    env.publish(&json!({"kind":"send-text","id":ids[0],"conversation_id":conv,"text":"Hello"}))
        .await;
    env.publish(&json!({"kind":"send-file","id":ids[1],"conversation_id":conv,"file_url":"https://cdn.example.com/a.png"}))
        .await;
    env.publish(&json!({"kind":"request-review","id":ids[2],"conversation_id":conv}))
        .await;
    env.publish(&json!({"kind":"assign-agent","id":ids[3],"conversation_id":conv,"agent_id":"c671d030-584e-4422-8710-9215c04b6a64","unknown":"ignored"}))
        .await;
    assert!(
        eventually(T, || worker.delivered_total() == 4).await,
        "4 delivered"
    );

    let reqs = env.sandbox.requests();
    assert_eq!(reqs.len(), 4, "{reqs:#?}");
    let base = "/api/external/v1/conversation/e1d247c8-5cd8-4f93-b9d7-15fd3259ac22";
    // One conversation: sent in the order published.
    assert_eq!(reqs[0].path, format!("{base}/send-text-message"));
    assert_eq!(reqs[0].body, json!({"uuid": ids[0], "text": "Hello"}));
    assert_eq!(reqs[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(reqs[1].path, format!("{base}/send-file-message"));
    assert_eq!(
        reqs[1].body,
        json!({"uuid": ids[1], "file": "https://cdn.example.com/a.png"})
    );
    assert_eq!(reqs[2].path, format!("{base}/request-review"));
    assert_eq!(reqs[2].body_bytes, 0);
    assert_eq!(reqs[2].content_type, None);
    assert_eq!(reqs[3].path, format!("{base}/assign-agent"));
    assert_eq!(
        reqs[3].body,
        json!({"agentId": "c671d030-584e-4422-8710-9215c04b6a64"})
    );
    for r in &reqs {
        assert!(r.authorization_ok, "Authorization carried exactly");
        assert_eq!(r.method, "POST");
        assert_eq!(r.status, 200);
    }
    // Every record is durable with Blinger's id, and the queue is empty.
    assert!(eventually(T, || worker.metrics.jobs_in_flight.get() == 0).await);
    let (status, metrics) = worker.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("blinger_worker_jobs_delivered_total{kind=\"assign-agent\"} 1"));
    assert!(metrics.contains(
        "blinger_worker_api_requests_total{endpoint=\"send-text-message\",status=\"200\"} 1"
    ));
    assert_eq!(worker.get("/readyz").await.0, 200);
    assert_eq!(worker.get("/healthz").await.0, 200);
    // The running worker answers for its store (operators cannot open it while it runs).
    let (status, record) = worker.get(&format!("/store/{}", ids[0])).await;
    assert_eq!(status, 200);
    assert!(
        record.contains(reqs[0].message_id.as_deref().unwrap()),
        "{record}"
    );
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(worker.get(&format!("/store/{unknown}")).await.0, 404);
    worker.stop().await;
    let store = env.open_store().await;
    let text = store.get(&ids[0].parse().unwrap()).unwrap().unwrap();
    assert_eq!(text.blinger_id.as_deref(), reqs[0].message_id.as_deref());
    assert_eq!(text.blinger_status.as_deref(), Some("delivered"));
    drop(store);
    assert_eq!(env.jobs_waiting().await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_twice_is_sent_once() {
    let env = TestEnv::new("twice").await;
    let worker = env.start_worker(&[]).await;
    let job = text_job("c-twice", "once only");
    env.publish(&job).await;
    env.publish(&job).await;
    assert!(
        eventually(T, || {
            worker.delivered("send-text") == 1
                && worker
                    .metrics
                    .jobs_duplicate
                    .with_label_values(&["send-text"])
                    .get()
                    == 1
        })
        .await
    );
    // Later, the same job again: still a duplicate.
    env.publish(&job).await;
    assert!(
        eventually(T, || worker
            .metrics
            .jobs_duplicate
            .with_label_values(&["send-text"])
            .get()
            == 2)
        .await
    );
    assert_eq!(env.sandbox.requests().len(), 1);
    worker.stop().await;
    env.cleanup().await;
}

/// The crash window between Blinger's answer and the ack leaves a durable record and an
/// unacked message. The redelivery must be acked without calling Blinger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_answer_and_ack_does_not_send_twice() {
    let env = TestEnv::new("crashwin").await;
    let job = text_job("c-crash", "recorded before the crash");
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    {
        let store = env.open_store().await;
        store
            .record(
                &id,
                &Delivered {
                    delivered_at_ms: now_ms(),
                    kind: "send-text".into(),
                    blinger_id: Some("m-before-crash".into()),
                    blinger_status: Some("delivered".into()),
                    attempts: 1,
                    digest: None,
                },
            )
            .await
            .unwrap();
    }
    env.declare().await;
    env.publish(&job).await;
    let worker = env.start_worker(&[]).await;
    assert!(
        eventually(T, || worker
            .metrics
            .jobs_duplicate
            .with_label_values(&["send-text"])
            .get()
            == 1)
        .await
    );
    assert!(
        env.sandbox.requests().is_empty(),
        "Blinger not called again"
    );
    assert_eq!(worker.delivered("send-text"), 0);
    worker.stop().await;
    assert_eq!(env.jobs_waiting().await, 0, "acked");
    env.cleanup().await;
}

/// The same window for real: the broker connection dies while Blinger is answering, so the ack
/// cannot happen; the redelivered job must not be sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_lost_with_the_connection_does_not_send_twice() {
    let mut env = TestEnv::new("acklost").await;
    let proxy = TcpProxy::start(amqp_socket(&env.broker.url)).await;
    env.base_args = vec!["--amqp-url".into(), via(&env.broker.url, proxy.addr)];
    env.sandbox.update(|c| c.latency_ms = 1500);
    let worker = env.start_worker(&[]).await;
    let job = text_job("c-acklost", "answer races the connection");
    env.publish(&job).await;
    // The request is in flight at Blinger: cut the broker connection under it. (A partitioned
    // worker calls only once it has a share of the rate limit, about 1.5 s after it connects.)
    assert!(eventually(T, || worker.metrics.jobs_in_flight.get() == 1).await);
    assert!(eventually(T, || worker.metrics.rate_share.get() > 0.0).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    assert!(
        eventually(T, || worker
            .metrics
            .jobs_duplicate
            .with_label_values(&["send-text"])
            .get()
            == 1)
        .await,
        "the redelivery is recognised"
    );
    assert_eq!(worker.delivered("send-text"), 1);
    assert_eq!(env.sandbox.requests().len(), 1, "sent once");
    worker.stop().await;
    assert_eq!(env.jobs_waiting().await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_tell_publishers_what_happened() {
    let env = TestEnv::new("receipts").await;
    let receipts = env.receipts_queue().await;
    let worker = env.start_worker(&[]).await;
    let good = text_job("c-receipts", "hello");
    env.publish(&good).await;
    assert!(eventually(T, || worker.delivered("send-text") == 1).await);
    env.sandbox.update(|c| c.status_override = Some(404));
    let bad = json!({"kind":"request-review","id":uuid::Uuid::new_v4().to_string(),"conversation_id":"c-receipts"});
    env.publish(&bad).await;
    env.publish_raw("send-text", b"not json").await;
    let got = env.take_json(&receipts, 3, T).await;
    assert_eq!(got.len(), 3, "{got:#?}");
    let (key, delivered) = &got[0];
    assert_eq!(key, "delivered.send-text");
    assert_eq!(delivered["id"], good["id"]);
    assert_eq!(delivered["outcome"], "delivered");
    assert_eq!(delivered["conversation_id"], "c-receipts");
    assert_eq!(delivered["http_status"], 200);
    assert_eq!(delivered["blinger_status"], "delivered");
    assert_eq!(delivered["attempts"], 1);
    assert_eq!(
        delivered["blinger_message_id"].as_str(),
        env.sandbox.requests()[0].message_id.as_deref()
    );
    assert!(delivered["reason"].is_null());
    let rejected = got
        .iter()
        .find(|(k, _)| k == "dead.request-review")
        .unwrap();
    assert_eq!(rejected.1["reason"], "rejected");
    assert_eq!(rejected.1["http_status"], 404);
    let invalid = got.iter().find(|(k, _)| k == "dead.unknown").unwrap();
    assert_eq!(invalid.1["reason"], "invalid");
    assert!(invalid.1["id"].is_null());
    worker.stop().await;

    // Off by a setting.
    let worker = env.start_worker(&["--receipts", "false"]).await;
    env.sandbox.update(|c| c.status_override = None);
    env.publish(&text_job("c-receipts", "quiet")).await;
    assert!(eventually(T, || worker.delivered("send-text") == 1).await);
    assert!(
        env.take_json(&receipts, 1, Duration::from_millis(500))
            .await
            .is_empty()
    );
    worker.stop().await;
    env.cleanup().await;
}

/// The running worker holds the store's lock; `blinger-worker store get` asks it instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_get_works_while_the_worker_runs() {
    let env = TestEnv::new("storeget").await;
    let worker = env.start_worker(&[]).await;
    let job = text_job("c-storeget", "look me up");
    env.publish(&job).await;
    assert!(eventually(T, || worker.delivered("send-text") == 1).await);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_blinger-worker"))
        .args(["store", "get", job["id"].as_str().unwrap()])
        .env("BLINGER_WORKER_DATA_DIR", env.data_dir.path())
        .env(
            "BLINGER_WORKER_METRICS_ADDR",
            worker.metrics_addr.to_string(),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let message_id = env.sandbox.requests()[0].message_id.clone().unwrap();
    assert!(stdout.contains(&message_id), "{stdout}");
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_blinger-worker"))
        .args(["store", "get", &uuid::Uuid::new_v4().to_string()])
        .env("BLINGER_WORKER_DATA_DIR", env.data_dir.path())
        .env(
            "BLINGER_WORKER_METRICS_ADDR",
            worker.metrics_addr.to_string(),
        )
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    worker.stop().await;
    env.cleanup().await;
}
