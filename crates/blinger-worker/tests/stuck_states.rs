//! Failure paths that used to end in a state the worker never left, or in one conversation
//! stopping all the others (issue 11), against the real RabbitMQ and the sandbox.

use std::time::Duration;

use serde_json::json;
use test_support::*;

fn expiring_job(conversation: &str, text: &str, in_secs: i64) -> serde_json::Value {
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(in_secs);
    let mut job = text_job(conversation, text);
    job["expires_at"] = json!(
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    job
}

fn accepted(env: &TestEnv) -> usize {
    env.sandbox
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .count()
}

/// The job that probes a pause leaves (here: its `expires_at` passes): another waiting job must
/// take the probe over, so the worker resumes once the token is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probing_job_leaving_does_not_stall_the_others() {
    let env = TestEnv::new("probeleave").await;
    let token_file = env.data_dir.path().join("token");
    std::fs::write(&token_file, "wrong-token\n").unwrap();
    let token_flag = format!("--api-token-file={}", token_file.display());
    let worker = env.start_worker(&[&token_flag]).await;
    env.publish(&expiring_job("c-probe", "the probe", 3)).await;
    assert!(eventually(Duration::from_secs(10), || worker.health.is_paused()).await);
    for i in 0..20 {
        env.publish(&text_job(&format!("c-wait-{i}"), "waiting"))
            .await;
    }
    // The probing job expires and is dead-lettered; then the secret is fixed.
    let dl = env.dead_letters(1, Duration::from_secs(15)).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].header("x-blinger-reason"), "expired");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // Probes back off to 60 s at most; 20 jobs are through within a probe round or two.
    assert!(
        eventually(Duration::from_secs(60), || worker.delivered("send-text")
            == 20)
        .await,
        "delivered {} of 20",
        worker.delivered("send-text")
    );
    assert!(!worker.health.is_paused());
    assert_eq!(worker.get("/healthz").await.0, 200);
    worker.stop().await;
    env.cleanup().await;
}

/// One conversation that Blinger always answers 403 (it belongs to another account) among 60
/// jobs to healthy conversations: the healthy ones are delivered, the forbidden one is
/// dead-lettered `rejected` with status 403, and the worker does not stay paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forbidden_conversation_does_not_stop_the_others() {
    let env = TestEnv::new("forbidden").await;
    env.sandbox
        .update(|c| c.forbidden_conversations = vec!["c-forbidden".into()]);
    let worker = env.start_worker(&["--concurrency", "4"]).await;
    env.publish(&text_job("c-forbidden", "not yours")).await;
    for i in 0..60 {
        env.publish(&text_job(&format!("c-ok-{}", i % 20), "fine"))
            .await;
    }
    assert!(
        eventually(Duration::from_secs(60), || worker.delivered("send-text")
            == 60)
        .await,
        "delivered {} of 60",
        worker.delivered("send-text")
    );
    let dl = env.dead_letters(1, Duration::from_secs(30)).await;
    assert_eq!(dl.len(), 1, "the forbidden job is dead-lettered");
    assert_eq!(dl[0].header("x-blinger-reason"), "rejected");
    assert_eq!(dl[0].header("x-blinger-status"), "403");
    assert!(eventually(Duration::from_secs(5), || !worker.health.is_paused()).await);
    worker.stop().await;
    env.cleanup().await;
}

/// 401 on every job is the token, not the jobs: nothing is dead-lettered for it, however long
/// it lasts and however the probes go round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_dead_letters_nothing_while_probes_go_round() {
    let env = TestEnv::new("allrefused").await;
    env.sandbox.update(|c| c.status_override = Some(403));
    let worker = env.start_worker(&[]).await;
    for i in 0..5 {
        env.publish(&text_job(&format!("c-all-{i}"), "held")).await;
    }
    assert!(eventually(Duration::from_secs(10), || worker.health.is_paused()).await);
    // Probes at 1, 2, 4 s: three different jobs refused, each for the same reason.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    assert!(worker.health.is_paused());
    env.sandbox.update(|c| c.status_override = None);
    assert!(
        eventually(Duration::from_secs(30), || worker.delivered("send-text")
            == 5)
        .await
    );
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    worker.stop().await;
    env.cleanup().await;
}

/// The probe gets an answer that is not 401/403 (here 503): the pause ends, and the probing job
/// goes on with its own retry round (it is parked in a delay tier) instead of probing forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_gets_another_answer_steps_down() {
    let env = TestEnv::new("stepdown").await;
    let token_file = env.data_dir.path().join("token");
    std::fs::write(&token_file, "wrong-token\n").unwrap();
    let token_flag = format!("--api-token-file={}", token_file.display());
    let worker = env
        .start_worker(&[&token_flag, "--max-in-process-attempts", "2"])
        .await;
    env.publish(&text_job("c-step", "probe")).await;
    assert!(eventually(Duration::from_secs(10), || worker.health.is_paused()).await);
    env.sandbox.update(|c| c.status_override = Some(503));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || worker.retried("send-text") >= 1).await,
        "the job was not parked: still probing"
    );
    assert!(!worker.health.is_paused());
    env.sandbox.update(|c| c.status_override = None);
    assert!(
        eventually(Duration::from_secs(20), || worker.delivered("send-text")
            == 1)
        .await
    );
    worker.stop().await;
    env.cleanup().await;
}

/// A job delivered, then redelivered after its `expires_at` passed (a crash before the ack): a
/// duplicate with a `delivered` receipt, not a second, contradictory `expired` dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_job_coming_back_after_its_expiry_is_a_duplicate() {
    let env = TestEnv::new("expdup").await;
    let receipts = env.receipts_queue().await;
    let job = expiring_job("c-expdup", "once", 2);
    let worker = env.start_worker(&[]).await;
    env.publish(&job).await;
    assert!(
        eventually(Duration::from_secs(10), || worker.delivered("send-text")
            == 1)
        .await
    );
    worker.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The same message again, past its expiry.
    env.publish(&job).await;
    let worker = env.start_worker(&[]).await;
    let got = env.take_json(&receipts, 2, Duration::from_secs(10)).await;
    let outcomes: Vec<&str> = got
        .iter()
        .map(|(_, r)| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["delivered", "delivered"]);
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    assert_eq!(accepted(&env), 1);
    worker.stop().await;
    env.cleanup().await;
}

/// A keyless job waiting for a concurrency slot held its keyless permit while every slot was
/// held by jobs waiting out a pause; when the probe passed to a keyless job, that job waited
/// for the permit forever: paused after the token was fixed, with `/healthz` 200 (found by the
/// reliability suite's probe-expiry scenario at 100 conversations over 64 slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_probe_is_not_starved_of_its_permit_by_a_lane_waiting_for_a_slot() {
    let env = TestEnv::new("keylessprobe").await;
    let token_file = env.data_dir.path().join("token");
    std::fs::write(&token_file, "wrong-token\n").unwrap();
    let token_flag = format!("--api-token-file={}", token_file.display());
    let worker = env.start_worker(&[&token_flag, "--concurrency", "2"]).await;
    let review = |c: &str| {
        json!({
            "kind": "request-review",
            "id": uuid::Uuid::new_v4().to_string(),
            "conversation_id": c,
        })
    };
    // P probes and expires; K1 holds the other slot at the gate; T1, T2 and then K2 (with the
    // keyless permit K1 let go of) wait for a slot.
    env.publish(&expiring_job("c-p", "the probe", 3)).await;
    assert!(eventually(Duration::from_secs(10), || worker.health.is_paused()).await);
    env.publish(&review("c-k1")).await;
    for t in ["c-t1", "c-t2"] {
        env.publish(&text_job(t, "waiting")).await;
    }
    env.publish(&review("c-k2")).await;
    let dl = env.dead_letters(1, Duration::from_secs(15)).await;
    assert_eq!(dl[0].header("x-blinger-reason"), "expired");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    assert!(
        eventually(Duration::from_secs(90), || {
            worker.delivered("send-text") == 2 && worker.delivered("request-review") == 2
        })
        .await,
        "delivered {} texts, {} reviews; paused: {}",
        worker.delivered("send-text"),
        worker.delivered("request-review"),
        worker.health.is_paused()
    );
    worker.stop().await;
    env.cleanup().await;
}
