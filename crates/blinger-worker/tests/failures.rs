//! Failure handling end to end: transient errors, 429, permanent rejections, bad input, expiry,
//! exhausted retries and a refused token.

use std::time::Duration;

use serde_json::json;
use test_support::*;

const T: Duration = Duration::from_secs(30);

fn ids_of(env: &TestEnv, id: &str) -> Vec<blinger_sandbox::RecordedRequest> {
    env.sandbox
        .requests()
        .into_iter()
        .filter(|r| r.uuid.as_deref() == Some(id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_until_success() {
    let env = TestEnv::new("transient").await;
    env.sandbox.update(|c| c.status_override = Some(503));
    let worker = env.start_worker(&[]).await;
    let job = text_job("c-transient", "eventually");
    let id = job["id"].as_str().unwrap().to_owned();
    env.publish(&job).await;
    assert!(eventually(T, || ids_of(&env, &id).len() >= 2).await);
    env.sandbox.update(|c| c.status_override = None);
    assert!(eventually(T, || worker.delivered("send-text") == 1).await);
    let reqs = ids_of(&env, &id);
    assert!(reqs.len() >= 3, "{reqs:?}");
    assert!(reqs[..reqs.len() - 1].iter().all(|r| r.status == 503));
    assert_eq!(reqs.last().unwrap().status, 200);
    assert!(
        worker
            .metrics
            .jobs_retried
            .with_label_values(&["send-text"])
            .get()
            >= 2
    );
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_holds_back_every_request() {
    let env = TestEnv::new("ratelimited").await;
    env.sandbox.update(|c| {
        c.status_override = Some(429);
        c.retry_after_secs = 2;
    });
    let worker = env.start_worker(&[]).await;
    let first = text_job("c-429-a", "first");
    env.publish(&first).await;
    assert!(eventually(T, || env.sandbox.requests().len() == 1).await);
    env.sandbox.update(|c| c.status_override = None);
    // Another conversation's job, published right after the 429, must wait too.
    env.publish(&text_job("c-429-b", "second")).await;
    assert!(eventually(T, || worker.delivered("send-text") == 2).await);
    let reqs = env.sandbox.requests();
    assert_eq!(reqs.len(), 3, "{reqs:#?}");
    let at = |i: usize| {
        time::OffsetDateTime::parse(&reqs[i].ts, &time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let gap = at(1) - at(0);
    assert!(
        gap >= time::Duration::milliseconds(1900),
        "next call after {gap}"
    );
    assert_eq!(worker.metrics.rate_limited.get(), 1);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_rejections_are_dead_lettered_at_once() {
    let env = TestEnv::new("rejected").await;
    let worker = env.start_worker(&[]).await;
    for status in [400u16, 404, 409, 410, 422] {
        env.sandbox.update(|c| c.status_override = Some(status));
        let job = text_job(&format!("c-{status}"), "never");
        env.publish(&job).await;
        let dead = env.dead_letters(1, T).await;
        assert_eq!(dead.len(), 1, "status {status}");
        let d = &dead[0];
        assert_eq!(d.header("x-blinger-reason"), "rejected");
        assert_eq!(d.header("x-blinger-status"), status.to_string());
        assert_eq!(
            d.header("x-blinger-attempts"),
            "1",
            "no retry of a {status}"
        );
        assert!(d.header("x-blinger-error").contains(&status.to_string()));
        assert_eq!(d.body, job.to_string().into_bytes(), "original body kept");
        assert_eq!(d.content_type.as_deref(), Some("application/json"));
        assert!(d.timestamp.is_some(), "original properties kept");
    }
    // A 2xx answer whose body says 404 is a failure with that status.
    env.sandbox.update(|c| {
        c.status_override = None;
        c.body_status_override = Some(404);
    });
    env.publish(&text_job("c-body404", "x")).await;
    let dead = env.dead_letters(1, T).await;
    assert_eq!(dead[0].header("x-blinger-reason"), "rejected");
    assert_eq!(dead[0].header("x-blinger-status"), "404");
    // The counter moves after the receipt is confirmed, which can be after the copy is seen.
    assert!(eventually(T, || worker.dead("send-text", "rejected") == 6).await);
    assert_eq!(worker.delivered_total(), 0);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_as_invalid_and_never_stalls_the_worker() {
    let env = TestEnv::new("invalid").await;
    let worker = env.start_worker(&[]).await;
    let id = uuid::Uuid::new_v4().to_string();
    let huge =
        json!({"kind":"send-text","id":id,"conversation_id":"c","text":"x".repeat(300 * 1024)})
            .to_string();
    let deep = format!("{{\"kind\":{}{}}}", "[".repeat(5000), "]".repeat(5000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"hello".to_vec(), "not valid JSON"),
        ("not UTF-8", b"{\"kind\":\"send-text\xff\"}".to_vec(), "not valid UTF-8"),
        ("array", b"[1,2]".to_vec(), "must be a JSON object"),
        ("unknown kind", br#"{"kind":"send-sms"}"#.to_vec(), "unknown kind"),
        ("missing id", br#"{"kind":"send-text","conversation_id":"c","text":"a"}"#.to_vec(), "missing field `id`"),
        ("mistyped", format!(r#"{{"kind":"send-text","id":"{id}","conversation_id":5,"text":"a"}}"#).into_bytes(), "field `conversation_id` must be a string"),
        ("bad uuid", br#"{"kind":"send-text","id":"1234","conversation_id":"c","text":"a"}"#.to_vec(), "field `id` is invalid"),
        ("empty text", format!(r#"{{"kind":"send-text","id":"{id}","conversation_id":"c","text":""}}"#).into_bytes(), "field `text` is invalid"),
        ("relative url", format!(r#"{{"kind":"send-file","id":"{id}","conversation_id":"c","file_url":"/a.png"}}"#).into_bytes(), "field `file_url` is invalid"),
        ("ftp url", format!(r#"{{"kind":"send-file","id":"{id}","conversation_id":"c","file_url":"ftp://h/a"}}"#).into_bytes(), "scheme must be http or https"),
        ("no agent", format!(r#"{{"kind":"assign-agent","id":"{id}","conversation_id":"c"}}"#).into_bytes(), "missing field `agent_id`"),
        ("huge", huge.into_bytes(), "over the 262144-byte limit"),
        ("deep", deep.into_bytes(), "recursion limit"),
        ("bad expiry", format!(r#"{{"kind":"request-review","id":"{id}","conversation_id":"c","expires_at":"soon"}}"#).into_bytes(), "field `expires_at` is invalid"),
    ];
    for (_, body, _) in &cases {
        env.publish_raw("send-text", body).await;
    }
    let good = text_job("c-good", "after the garbage");
    env.publish(&good).await;
    let dead = env.dead_letters(cases.len(), T).await;
    assert_eq!(dead.len(), cases.len());
    for (name, body, expected) in &cases {
        let d = dead
            .iter()
            .find(|d| &d.body == body)
            .unwrap_or_else(|| panic!("{name}: not in the dead-letter queue"));
        assert_eq!(d.header("x-blinger-reason"), "invalid", "{name}");
        assert!(
            d.header("x-blinger-error").contains(expected),
            "{name}: {:?} lacks {expected:?}",
            d.header("x-blinger-error")
        );
        assert_eq!(d.header("x-blinger-attempts"), "0", "{name}");
    }
    assert!(eventually(T, || worker.delivered("send-text") == 1).await);
    assert_eq!(
        env.sandbox.requests().len(),
        1,
        "no invalid job reached Blinger"
    );
    // The counter moves after the receipt is confirmed, which can be after the copy is seen.
    assert!(eventually(T, || worker.dead("unknown", "invalid") == 6).await);
    assert_eq!(worker.get("/readyz").await.0, 200);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_job_is_dead_lettered_not_sent_late() {
    let env = TestEnv::new("expired").await;
    let worker = env.start_worker(&[]).await;
    let mut job = text_job("c-exp", "too late");
    job["expires_at"] = json!("2020-01-01T00:00:00Z");
    env.publish(&job).await;
    let mut fresh = text_job("c-exp", "in time");
    fresh["expires_at"] = json!("2999-01-01T00:00:00+01:00");
    env.publish(&fresh).await;
    let dead = env.dead_letters(1, T).await;
    assert_eq!(dead[0].header("x-blinger-reason"), "expired");
    assert!(eventually(T, || worker.delivered("send-text") == 1).await);
    assert_eq!(env.sandbox.requests().len(), 1);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_after_the_last_delay_tier() {
    let env = TestEnv::new("exhausted").await;
    env.sandbox.update(|c| c.status_override = Some(503));
    let worker = env
        .start_worker(&["--retry-delays", "1s", "--max-in-process-attempts", "2"])
        .await;
    let job = text_job("c-exhausted", "never accepted");
    let id = job["id"].as_str().unwrap().to_owned();
    env.publish(&job).await;
    let dead = env.dead_letters(1, T).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.header("x-blinger-reason"), "retries-exhausted");
    assert_eq!(d.header("x-blinger-status"), "503");
    // Two calls, parked once in the 1s tier, two more calls.
    assert_eq!(d.header("x-blinger-attempts"), "4");
    assert_eq!(d.header("x-blinger-retries"), "1");
    assert_eq!(d.body, job.to_string().into_bytes());
    assert_eq!(ids_of(&env, &id).len(), 4);
    // The counter moves after the receipt is confirmed, which can be after the copy is seen.
    assert!(eventually(T, || worker.dead("send-text", "retries-exhausted") == 1).await);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_pauses_without_dead_lettering_and_resumes() {
    let env = TestEnv::new("paused").await;
    let token_file = env.data_dir.path().join("token");
    std::fs::write(&token_file, "wrong-token\n").unwrap();
    let token_flag = format!("--api-token-file={}", token_file.display());
    // Another token flag would conflict: the harness adds --api-token only when none is given.
    let worker = env.start_worker(&[&token_flag]).await;
    let jobs: Vec<_> = (0..5)
        .map(|i| text_job(&format!("c-pause-{i}"), "held"))
        .collect();
    for job in &jobs {
        env.publish(job).await;
    }
    assert!(eventually(T, || worker.health.is_paused()).await);
    assert_eq!(worker.metrics.paused.get(), 1);
    let (status, body) = worker.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("401"), "{body}");
    // Probing: a few 401s, nothing else, nothing dead-lettered, nothing delivered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reqs = env.sandbox.requests();
    assert!(reqs.iter().all(|r| r.status == 401), "{reqs:#?}");
    assert!(reqs.len() < 15, "probing is gentle, got {}", reqs.len());
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    // The secret is rotated: the worker picks it up by itself.
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    assert!(eventually(T, || worker.delivered("send-text") == 5).await);
    assert_eq!(worker.metrics.paused.get(), 0);
    assert_eq!(worker.get("/readyz").await.0, 200);
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    worker.stop().await;
    env.cleanup().await;
}
