//! In-process tests of the sandbox over real HTTP (reqwest), one server per test.

use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use blinger_api::{Conversation, Envelope, Message};

const TOKEN: &str = "test-token";
const CONV: &str = "e1d247c8-5cd8-4f93-b9d7-15fd3259ac22";

async fn start(config: SandboxConfig) -> Sandbox {
    Sandbox::start("127.0.0.1:0".parse().unwrap(), config, None)
        .await
        .expect("sandbox starts")
}

async fn sandbox() -> Sandbox {
    start(SandboxConfig::with_token(TOKEN)).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// POSTs `body` (if any) as JSON to `{base}/conversation/{raw_id}/{action}`; `raw_id` is put in
/// the URL as is (already encoded).
async fn post(
    sb: &Sandbox,
    token: &str,
    raw_id: &str,
    action: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let url = format!("{}/conversation/{raw_id}/{action}", sb.base_url());
    let mut req = client().post(url).header("Authorization", token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn text_body(uuid: &str, text: &str) -> Value {
    json!({ "uuid": uuid, "text": text })
}

#[tokio::test]
async fn sandbox_send_text_with_right_token_is_delivered_and_recorded_exactly() {
    let sb = sandbox().await;
    let uuid = "554f11c1-ec1e-4fdb-9953-bfad33013f58";
    let (status, headers, body) = post(
        &sb,
        TOKEN,
        CONV,
        "send-text-message",
        Some(text_body(uuid, "Hello")),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    let env: Envelope<Message> = serde_json::from_value(body).unwrap();
    assert_eq!(env.status, 200);
    let msg = env.data.unwrap();
    assert!(uuid::Uuid::parse_str(&msg.id).is_ok());
    assert_ne!(msg.id, uuid, "Blinger chooses its own message id");
    assert_eq!(msg.status.as_deref(), Some("delivered"));
    assert_eq!(msg.kind.as_deref(), Some("text"));
    assert_eq!(msg.body.as_deref(), Some("Hello"));
    assert!(msg.end_user.is_some());

    let recs = sb.requests();
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(r.seq, 1);
    assert_eq!(r.method, "POST");
    assert_eq!(
        r.path,
        format!("/api/external/v1/conversation/{CONV}/send-text-message")
    );
    assert_eq!(r.query, None);
    assert_eq!(r.endpoint, Endpoint::SendTextMessage);
    assert_eq!(r.conversation_id.as_deref(), Some(CONV));
    assert!(r.authorization_ok);
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(r.body, text_body(uuid, "Hello"));
    assert_eq!(r.uuid.as_deref(), Some(uuid));
    assert_eq!(r.status, 200);
    assert_eq!(r.outcome, Outcome::Ok);
    assert_eq!(r.message_id.as_deref(), Some(msg.id.as_str()));
    assert!(r.ts.ends_with('Z') && r.ts.len() == "2024-01-01T00:00:00.000Z".len());

    let stats = sb.stats();
    assert_eq!(stats.total, 1);
    assert_eq!(stats.delivered, 1);
    assert_eq!(stats.unique_uuids, 1);
    assert_eq!(stats.by_endpoint["send-text-message"], 1);
    assert_eq!(stats.by_status[&200], 1);
    assert_eq!(stats.max_rate_per_sec, 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn sandbox_every_endpoint_answers_the_documented_shape() {
    let sb = sandbox().await;
    let file_uuid = uuid::Uuid::new_v4().to_string();
    let (status, _, body) = post(
        &sb,
        TOKEN,
        CONV,
        "send-file-message",
        Some(json!({ "uuid": file_uuid, "file": "https://example.com/a/cat.png?x=1" })),
    )
    .await;
    assert_eq!(status, 200);
    let msg = serde_json::from_value::<Envelope<Message>>(body)
        .unwrap()
        .data
        .unwrap();
    assert_eq!(msg.kind.as_deref(), Some("file"));
    let file = msg.file.unwrap();
    assert_eq!(file.kind.as_deref(), Some("image"));
    let info = file.info.unwrap();
    assert_eq!(info.ext.as_deref(), Some("png"));
    assert_eq!(info.mime_type.as_deref(), Some("image/png"));
    assert!(file.url.contains_key("default") && file.url.contains_key("120x120"));

    let (status, _, body) = post(&sb, TOKEN, CONV, "request-review", None).await;
    assert_eq!(status, 200);
    let msg = serde_json::from_value::<Envelope<Message>>(body)
        .unwrap()
        .data
        .unwrap();
    assert_eq!(msg.kind.as_deref(), Some("review"));
    assert!(msg.review.unwrap().agent.is_some());
    assert!(msg.bot.is_some());

    let agent = "c671d030-584e-4422-8710-9215c04b6a64";
    let (status, _, body) = post(
        &sb,
        TOKEN,
        CONV,
        "assign-agent",
        Some(json!({ "agentId": agent })),
    )
    .await;
    assert_eq!(status, 200);
    let conv = serde_json::from_value::<Envelope<Conversation>>(body)
        .unwrap()
        .data
        .unwrap();
    assert_eq!(conv.id, CONV);
    assert_eq!(conv.assigned_agent.unwrap().id, agent);

    let recs = sb.requests();
    let endpoints: Vec<_> = recs.iter().map(|r| r.endpoint).collect();
    assert_eq!(
        endpoints,
        [
            Endpoint::SendFileMessage,
            Endpoint::RequestReview,
            Endpoint::AssignAgent
        ]
    );
    assert_eq!(recs[1].body, Value::Null);
    assert_eq!(recs[1].body_bytes, 0);
    assert_eq!(recs[1].content_type, None);
    assert_eq!(recs[2].agent_id.as_deref(), Some(agent));
    sb.shutdown().await;
}

#[tokio::test]
async fn sandbox_wrong_or_missing_token_is_401_and_recorded_without_the_token() {
    let sb = sandbox().await;
    let uuid = uuid::Uuid::new_v4().to_string();
    let (status, _, body) = post(
        &sb,
        "wrong-token",
        CONV,
        "send-text-message",
        Some(text_body(&uuid, "hi")),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body, json!({ "status": 401, "data": null }));
    // A prefix of the token, or the token with a scheme, is not the token.
    let (status, _, _) = post(
        &sb,
        &format!("Bearer {TOKEN}"),
        CONV,
        "request-review",
        None,
    )
    .await;
    assert_eq!(status, 401);
    let resp = client()
        .post(format!(
            "{}/conversation/{CONV}/request-review",
            sb.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    let recs = sb.requests();
    assert_eq!(recs.len(), 3);
    assert!(
        recs.iter()
            .all(|r| !r.authorization_ok && r.outcome == Outcome::Unauthorized)
    );
    let json = serde_json::to_string(&recs).unwrap();
    assert!(!json.contains("wrong-token") && !json.contains(TOKEN));
    let stats = sb.stats();
    assert_eq!(stats.unauthorized, 3);
    assert_eq!(stats.unique_uuids, 0, "a refused message is not delivered");
    sb.shutdown().await;
}

#[tokio::test]
async fn sandbox_duplicate_uuid_returns_the_same_message_and_is_counted() {
    let sb = sandbox().await;
    let uuid = uuid::Uuid::new_v4().to_string();
    let first = post(
        &sb,
        TOKEN,
        CONV,
        "send-text-message",
        Some(text_body(&uuid, "once")),
    )
    .await;
    let second = post(
        &sb,
        TOKEN,
        CONV,
        "send-text-message",
        Some(text_body(&uuid, "once")),
    )
    .await;
    assert_eq!((first.0, second.0), (200, 200));
    assert_eq!(first.2["data"]["id"], second.2["data"]["id"]);
    assert_eq!(first.2, second.2, "the first message is answered again");
    let other = post(
        &sb,
        TOKEN,
        CONV,
        "send-text-message",
        Some(text_body(&uuid::Uuid::new_v4().to_string(), "other")),
    )
    .await;
    assert_ne!(other.2["data"]["id"], first.2["data"]["id"]);

    let outcomes: Vec<_> = sb.requests().iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, [Outcome::Ok, Outcome::Duplicate, Outcome::Ok]);
    let stats = sb.stats();
    assert_eq!(stats.duplicates, 1);
    assert_eq!(stats.unique_uuids, 2);
    assert_eq!(stats.delivered, 2);
    sb.shutdown().await;
}

#[tokio::test]
async fn sandbox_injected_failures_are_not_deliveries() {
    let mut config = SandboxConfig::with_token(TOKEN);
    config.error_rate = 1.0;
    let sb = start(config).await;
    let uuid = uuid::Uuid::new_v4().to_string();
    let (status, _, body) = post(
        &sb,
        TOKEN,
        CONV,
        "send-text-message",
        Some(text_body(&uuid, "x")),
    )
    .await;
    assert!([500, 502, 503].contains(&status), "got {status}");
    assert_eq!(body, json!({ "status": status, "data": null }));
    sb.update(|c| c.error_rate = 0.0);
    let (status, _, _) = post(
        &sb,
        TOKEN,
        CONV,
        "send-text-message",
        Some(text_body(&uuid, "x")),
    )
    .await;
    assert_eq!(status, 200);
    let outcomes: Vec<_> = sb.requests().iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, [Outcome::InjectedError, Outcome::Ok]);
    let stats = sb.stats();
    assert_eq!(stats.duplicates, 0);
    assert_eq!(stats.injected.errors, 1);

    // A 2xx with a failing envelope status is not a delivery either.
    sb.update(|c| c.body_status_override = Some(500));
    let fresh = uuid::Uuid::new_v4().to_string();
    let (status, _, body) = post(
        &sb,
        TOKEN,
        CONV,
        "send-text-message",
        Some(text_body(&fresh, "y")),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({ "status": 500, "data": null }));
    assert_eq!(sb.stats().unique_uuids, 1);

    // down: 503 at once, even without a token.
    sb.update(|c| {
        c.body_status_override = None;
        c.down = true;
    });
    let (status, _, _) = post(&sb, "nope", CONV, "request-review", None).await;
    assert_eq!(status, 503);

    sb.update(|c| {
        c.down = false;
        c.status_override = Some(422);
    });
    let (status, _, body) = post(&sb, TOKEN, CONV, "request-review", None).await;
    assert_eq!(status, 422);
    assert_eq!(body["status"], 422);
    assert_eq!(sb.stats().injected.errors, 4);
    sb.shutdown().await;
}

#[tokio::test]
async fn sandbox_injected_429_carries_retry_after() {
    let mut config = SandboxConfig::with_token(TOKEN);
    config.rate_429 = 1.0;
    config.retry_after_secs = 7;
    let sb = start(config).await;
    let (status, headers, body) = post(&sb, TOKEN, CONV, "request-review", None).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(body, json!({ "status": 429, "data": null }));
    let r = &sb.requests()[0];
    assert_eq!((r.status, r.outcome), (429, Outcome::Injected429));
    assert_eq!(sb.stats().injected.rate_limited, 1);

    sb.set_config(SandboxConfig {
        status_override: Some(429),
        ..SandboxConfig::with_token(TOKEN)
    });
    let (status, headers, _) = post(&sb, TOKEN, CONV, "request-review", None).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "1");
    sb.shutdown().await;
}

#[tokio::test]
async fn sandbox_records_path_injection_raw_and_never_routes_it_elsewhere() {
    let sb = sandbox().await;
    // An id encoded as one segment reaches the endpoint it was sent to, decoded.
    let raw = "..%2F..%2Fassign-agent%3Fx%3D1%23";
    let uuid = uuid::Uuid::new_v4().to_string();
    let (status, _, _) = post(
        &sb,
        TOKEN,
        raw,
        "send-text-message",
        Some(text_body(&uuid, "hi")),
    )
    .await;
    assert_eq!(status, 200);
    let r = sb.requests().pop().unwrap();
    assert_eq!(
        r.path,
        format!("/api/external/v1/conversation/{raw}/send-text-message")
    );
    assert_eq!(r.endpoint, Endpoint::SendTextMessage);
    assert_eq!(
        r.conversation_id.as_deref(),
        Some("../../assign-agent?x=1#")
    );

    // An id that was not encoded becomes extra segments or a query: never another endpoint.
    let url = format!("{}/conversation/a/b/send-text-message?q=1", sb.base_url());
    let resp = client()
        .post(url)
        .header("Authorization", TOKEN)
        .json(&text_body(&uuid, "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let r = sb.requests().pop().unwrap();
    assert_eq!(
        r.path,
        "/api/external/v1/conversation/a/b/send-text-message"
    );
    assert_eq!(r.query.as_deref(), Some("q=1"));
    assert_eq!(
        (r.endpoint, r.outcome),
        (Endpoint::Other, Outcome::NotFound)
    );
    assert_eq!(r.conversation_id, None);

    // A raw request line the client libraries would normalise is recorded exactly as sent.
    let raw_path = "/api/external/v1/conversation/x/../../../_sandbox/reset";
    let answer = raw_http(sb.addr(), &format!("POST {raw_path} HTTP/1.1")).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let r = sb.requests().pop().unwrap();
    assert_eq!(r.path, raw_path);
    assert_eq!(r.outcome, Outcome::NotFound);
    assert_eq!(sb.stats().not_found, 2);
    sb.shutdown().await;
}

/// Sends one request line by hand (no normalisation by a client library) and returns the answer.
async fn raw_http(addr: std::net::SocketAddr, request_line: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{request_line}\r\nHost: {addr}\r\nAuthorization: {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

#[tokio::test]
async fn sandbox_malformed_requests_are_rejected_and_recorded() {
    let sb = sandbox().await;
    let url = format!("{}/conversation/{CONV}/send-text-message", sb.base_url());
    let uuid = uuid::Uuid::new_v4().to_string();
    // No content type.
    let resp = client()
        .post(&url)
        .header("Authorization", TOKEN)
        .body(text_body(&uuid, "x").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    // Not JSON.
    let resp = client()
        .post(&url)
        .header("Authorization", TOKEN)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], 400);
    // Missing field, bad uuid, empty text, bad file URL.
    for (action, body) in [
        ("send-text-message", json!({ "uuid": uuid })),
        ("send-text-message", json!({ "uuid": "nope", "text": "x" })),
        ("send-text-message", json!({ "uuid": uuid, "text": "" })),
        (
            "send-file-message",
            json!({ "uuid": uuid, "file": "/etc/passwd" }),
        ),
        ("assign-agent", json!({ "agent": "x" })),
    ] {
        let (status, _, answer) = post(&sb, TOKEN, CONV, action, Some(body)).await;
        assert_eq!(status, 422, "{action}");
        assert_eq!(answer["status"], 422);
    }
    let stats = sb.stats();
    assert_eq!(stats.bad_requests, 7);
    assert_eq!(stats.unique_uuids, 0);
    let first = &sb.requests()[0];
    assert_eq!(first.content_type, None);
    assert_eq!(first.body, text_body(&uuid, "x"));
    sb.shutdown().await;
}

#[tokio::test]
async fn sandbox_control_endpoints_and_record_file() {
    let dir = std::env::temp_dir().join(format!("sandbox-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("requests.jsonl");
    let sb = Sandbox::start(
        "127.0.0.1:0".parse().unwrap(),
        SandboxConfig::with_token(TOKEN),
        Some(file.clone()),
    )
    .await
    .unwrap();
    let root = sb.root_url();
    let c = client();

    let patched: SandboxConfig = c
        .patch(format!("{root}/_sandbox/config"))
        .json(&json!({ "latency_ms": 5, "seed": 42 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (patched.latency_ms, patched.seed, patched.token.as_str()),
        (5, Some(42), TOKEN)
    );
    assert_eq!(sb.config(), patched);
    let bad = c
        .put(format!("{root}/_sandbox/config"))
        .json(&json!({ "error_rate": 2.0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);

    for i in 0..3 {
        let uuid = uuid::Uuid::new_v4().to_string();
        post(
            &sb,
            TOKEN,
            CONV,
            "send-text-message",
            Some(text_body(&uuid, &format!("m{i}"))),
        )
        .await;
    }
    assert!(sb.wait_for(|r| r.len() == 3, Duration::from_secs(2)).await);
    assert!(sb.requests().iter().all(|r| r.latency_ms >= 5));
    let since: Vec<RecordedRequest> = c
        .get(format!("{root}/_sandbox/requests?since=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(since.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3]);
    let stats: Stats = c
        .get(format!("{root}/_sandbox/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats.total, 3);
    assert_eq!(stats.per_second.iter().sum::<u64>(), 3);
    assert!(stats.max_rate_per_sec >= 1);

    let reset = c
        .post(format!("{root}/_sandbox/reset"))
        .send()
        .await
        .unwrap();
    assert!(reset.status().is_success());
    assert_eq!(sb.stats().total, 0);
    assert!(sb.requests().is_empty());

    // The file keeps every line, flushed by shutdown at the latest.
    sb.shutdown().await;
    let lines: Vec<RecordedRequest> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2].body["text"], "m2");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sandbox_injected_timeout_is_recorded_at_once_and_shutdown_is_prompt() {
    let mut config = SandboxConfig::with_token(TOKEN);
    config.timeout_rate = 1.0;
    config.timeout_secs = 60;
    let sb = start(config).await;
    let url = format!("{}/conversation/{CONV}/request-review", sb.base_url());
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(url)
        .header("Authorization", TOKEN)
        .send()
        .await;
    assert!(resp.unwrap_err().is_timeout());
    assert!(
        sb.wait_for(
            |r| r.iter().any(|r| r.outcome == Outcome::InjectedTimeout),
            Duration::from_secs(2)
        )
        .await
    );
    assert_eq!(sb.stats().injected.timeouts, 1);
    let started = std::time::Instant::now();
    sb.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn sandbox_rate_window_counts_per_second_buckets() {
    use std::time::Instant;
    let mut w = record::RateWindow::new();
    let t0 = Instant::now();
    for _ in 0..5 {
        w.note(t0);
    }
    w.note(t0 + Duration::from_millis(999));
    w.note(t0 + Duration::from_millis(1_500));
    w.note(t0 + Duration::from_secs(700));
    let snap = w.snapshot(t0 + Duration::from_secs(700));
    let stats = record::Journal::new(None).stats(snap, 0);
    assert_eq!(stats.max_rate_per_sec, 6);
    assert_eq!(stats.per_second.len(), 600);
    assert_eq!(stats.per_second_start, 101);
    assert_eq!(
        stats.per_second.iter().sum::<u64>(),
        1,
        "older buckets left the window"
    );
    assert_eq!(*stats.per_second.last().unwrap(), 1);
}

#[test]
fn sandbox_config_defaults_and_partial_json() {
    let c: SandboxConfig = serde_json::from_str(r#"{"error_rate":0.25}"#).unwrap();
    assert_eq!(c.token, DEFAULT_TOKEN);
    assert_eq!(c.retry_after_secs, 1);
    assert_eq!(c.timeout_secs, 30);
    assert_eq!(c.error_rate, 0.25);
    assert!(serde_json::from_str::<SandboxConfig>(r#"{"eror_rate":0.25}"#).is_err());
    assert!(
        SandboxConfig {
            rate_429: -0.1,
            ..SandboxConfig::default()
        }
        .validate()
        .is_err()
    );
}
