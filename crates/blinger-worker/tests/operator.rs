//! The operator commands end to end: the built `blinger-worker` binary against a real RabbitMQ,
//! each test on its own exchange and queues (from the shared harness).

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blinger_worker::store::{Delivered, Store, now_ms};
use lapin::BasicProperties;
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use serde_json::{Value, json};
use test_support::*;

/// A long-string header value, as the worker writes them.
use blinger_worker::broker::string_value as ls;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_blinger-worker");

/// Set by the broker itself on every delivery from a quorum queue (0 on the first), so it is
/// on every message a test takes; a replay cannot and need not remove it.
const BROKER_DELIVERY_COUNT: &str = "x-delivery-count";

/// Runs the binary with this env's broker and names (and nothing else from the environment).
async fn cli(env: &TestEnv, args: &[&str], stdin: Option<Vec<u8>>) -> Output {
    cli_with(env, &[], args, stdin).await
}

async fn cli_with(
    env: &TestEnv,
    vars: &[(&str, &str)],
    args: &[&str],
    stdin: Option<Vec<u8>>,
) -> Output {
    let mut cmd = env.command(BIN);
    cmd.envs(vars.iter().copied()).args(args);
    output(cmd, stdin).await
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn lines(o: &Output) -> Vec<String> {
    stdout(o).lines().map(str::to_owned).collect()
}

/// A message taken off a queue, for assertions.
#[derive(Debug)]
struct Taken {
    routing_key: String,
    body: Value,
    headers: BTreeMap<String, AMQPValue>,
    props: BasicProperties,
}

/// Takes every message now in `queue`, in order (consuming them).
async fn take_all(env: &TestEnv, queue: &str) -> Vec<Taken> {
    let mut out = Vec::new();
    while let Some(msg) = env
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        let d = msg.delivery;
        out.push(Taken {
            routing_key: d.routing_key.as_str().to_owned(),
            body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
            headers: d
                .properties
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            props: d.properties,
        });
    }
    out
}

fn ids_of(taken: &[Taken]) -> Vec<String> {
    taken
        .iter()
        .map(|t| t.body["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A dead letter as the worker leaves it: original body and properties plus its headers.
struct Seed {
    kind: &'static str,
    reason: Option<&'static str>,
    status: Option<i32>,
    age: Duration,
    /// An `x-death` entry as the broker writes it when it dead-letters a message itself.
    broker_reason: Option<&'static str>,
}

impl Seed {
    fn worker(kind: &'static str, reason: &'static str) -> Seed {
        Seed {
            kind,
            reason: Some(reason),
            status: None,
            age: Duration::from_secs(60),
            broker_reason: None,
        }
    }
}

fn job_body(kind: &str, id: &str) -> Value {
    let mut job = json!({"kind": kind, "id": id, "conversation_id": "conv-1"});
    match kind {
        "send-text" => job["text"] = json!("Hello"),
        "send-file" => job["file_url"] = json!("https://cdn.example.com/a.png"),
        "assign-agent" => job["agent_id"] = json!("agent-7"),
        _ => {}
    }
    job
}

/// Puts dead letters straight into the DLQ, in order; returns their ids.
async fn seed_dlq(env: &TestEnv, seeds: &[Seed]) -> Vec<String> {
    env.declare().await;
    let mut ids = Vec::new();
    for seed in seeds {
        let id = Uuid::new_v4().to_string();
        let mut h = FieldTable::default();
        h.insert(
            "traceparent".into(),
            ls("00-4bf92f3577b34da6-00f067aa0ba902b7-01"),
        );
        if let Some(reason) = seed.reason {
            h.insert("x-blinger-reason".into(), ls(reason));
            h.insert(
                "x-blinger-error".into(),
                ls(&format!("{reason}: detail\nline two")),
            );
            h.insert("x-blinger-attempts".into(), AMQPValue::LongLongInt(3));
            h.insert("x-blinger-retries".into(), AMQPValue::LongLongInt(2));
            h.insert(
                "x-blinger-first-seen".into(),
                AMQPValue::LongLongInt(now_ms() as i64),
            );
        }
        if let Some(status) = seed.status {
            h.insert("x-blinger-status".into(), AMQPValue::LongInt(status));
        }
        if let Some(reason) = seed.broker_reason {
            let mut entry = FieldTable::default();
            entry.insert("reason".into(), ls(reason));
            entry.insert("queue".into(), ls(&env.names.queue));
            entry.insert("exchange".into(), ls(&env.names.exchange));
            entry.insert(
                "routing-keys".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![ls(seed.kind)])),
            );
            entry.insert("count".into(), AMQPValue::LongLongInt(1));
            h.insert(
                "x-death".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(entry)])),
            );
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(now_secs() - seed.age.as_secs())
            .with_headers(h);
        let body = job_body(seed.kind, &id).to_string();
        env.publish_to_queue(&env.names.dead, body.as_bytes(), props)
            .await;
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_one_job_from_flags() {
    let env = TestEnv::new("op-pub1").await;
    let id = Uuid::new_v4().to_string();
    let out = cli(
        &env,
        &[
            "publish",
            "--kind",
            "send-text",
            "--conversation-id",
            "e1d247c8-5cd8-4f93-b9d7-15fd3259ac22",
            "--text",
            "Hello",
            "--id",
            &id,
            "--expires-at",
            "2099-01-01T00:00:00Z",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out), [id.as_str()]);

    // Without --id a fresh v4 id is made and printed.
    let out = cli(
        &env,
        &[
            "publish",
            "--kind",
            "request-review",
            "--conversation-id",
            "c2",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let generated = Uuid::parse_str(lines(&out)[0].as_str()).expect("a uuid is printed");
    assert_eq!(generated.get_version_num(), 4);

    let queued = take_all(&env, &env.names.queue).await;
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[0].routing_key, "send-text");
    assert_eq!(
        queued[0].body,
        json!({"kind":"send-text","id":id,"conversation_id":"e1d247c8-5cd8-4f93-b9d7-15fd3259ac22","text":"Hello","expires_at":"2099-01-01T00:00:00Z"})
    );
    let props = &queued[0].props;
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    assert_eq!(*props.delivery_mode(), Some(2), "persistent");
    let ts = props.timestamp().expect("timestamped");
    assert!(now_secs().abs_diff(ts) < 60);
    assert_eq!(queued[1].routing_key, "request-review");
    assert_eq!(queued[1].body["id"], generated.to_string());

    // An invalid job is refused before anything is published, with the decoder's reason.
    let out = cli(
        &env,
        &[
            "publish",
            "--kind",
            "send-file",
            "--conversation-id",
            "c",
            "--file-url",
            "ftp://example.com/a",
        ],
        None,
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("file_url") && err.contains("http or https"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(stdout(&out).is_empty());
    assert_eq!(env.jobs_waiting().await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_many_from_stdin_skips_invalid_lines() {
    let env = TestEnv::new("op-pubn").await;
    let mut input = String::new();
    let mut expected = Vec::new();
    for i in 0..1500 {
        let id = Uuid::new_v4().to_string();
        if i == 2 {
            input.push_str("{\"kind\":\"send-text\",\"id\":\"not-a-uuid\",\"conversation_id\":\"c\",\"text\":\"x\"}\n");
            input.push('\n'); // blank lines are skipped silently
        }
        if i == 700 {
            input.push_str("not json at all\r\n");
        }
        input.push_str(&job_body("send-text", &id).to_string());
        input.push_str(if i % 2 == 0 { "\n" } else { "\r\n" });
        expected.push(id);
    }
    let out = cli(
        &env,
        &["publish", "--stdin", "--window", "100"],
        Some(input.into_bytes()),
    )
    .await;
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "invalid lines make the exit non-zero"
    );
    assert_eq!(lines(&out), expected, "every valid id, in input order");
    assert!(
        err.contains("line 3: field `id` is invalid"),
        "reason with line number: {err}"
    );
    assert!(err.contains("line 703: body is not valid JSON"), "{err}");
    assert!(
        err.contains("2 invalid line(s) skipped; 1500 job(s) published"),
        "{err}"
    );
    let queued = take_all(&env, &env.names.queue).await;
    assert_eq!(ids_of(&queued), expected, "published in order");

    // --strict stops at the first invalid line; what came before stays published.
    let first = Uuid::new_v4().to_string();
    let input = format!(
        "{}\n{{\"kind\":\"send-sms\"}}\n{}\n",
        job_body("request-review", &first),
        job_body("request-review", &Uuid::new_v4().to_string()),
    );
    let out = cli(
        &env,
        &["publish", "-", "--strict"],
        Some(input.into_bytes()),
    )
    .await;
    assert!(!out.status.success());
    assert_eq!(lines(&out), [first.as_str()]);
    let err = stderr(&out);
    assert!(err.contains("line 2: unknown kind \"send-sms\""), "{err}");
    assert!(err.contains("--strict"), "{err}");
    assert_eq!(ids_of(&take_all(&env, &env.names.queue).await), [first]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_show_do_not_consume() {
    let env = TestEnv::new("op-list").await;
    let ids = seed_dlq(
        &env,
        &[
            Seed::worker("send-text", "invalid"),
            Seed {
                status: Some(422),
                age: Duration::from_secs(3 * 3600),
                ..Seed::worker("send-file", "rejected")
            },
            Seed {
                kind: "assign-agent",
                reason: None,
                status: None,
                age: Duration::from_secs(120),
                broker_reason: Some("delivery_limit"),
            },
        ],
    )
    .await;

    let out = cli(&env, &["dlq", "list"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 4, "{text}");
    for column in ["ID", "KIND", "REASON", "ATTEMPTS", "STATUS", "AGE", "ERROR"] {
        assert!(rows[0].contains(column), "{text}");
    }
    assert!(rows[1].starts_with(&ids[0]) && rows[1].contains("invalid"));
    assert!(rows[2].contains("rejected") && rows[2].contains("422") && rows[2].contains("3h"));
    assert!(
        rows[3].contains("delivery_limit"),
        "broker reason from x-death: {text}"
    );
    assert!(
        rows[1].contains("invalid: detail line two"),
        "error flattened to one row: {text}"
    );

    // Listing again sees the same messages in the same order: nothing was consumed.
    let out = cli(&env, &["dlq", "list", "--json"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
    let listed_ids: Vec<&str> = listed.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(listed_ids, ids);
    assert_eq!(listed[1]["reason"], "rejected");
    assert_eq!(listed[1]["status"], 422);
    assert_eq!(listed[1]["attempts"], 3);
    assert_eq!(listed[1]["kind"], "send-file");
    assert!(listed[1]["age_seconds"].as_u64().unwrap() >= 3 * 3600);
    assert_eq!(listed[2]["reason"], "delivery_limit");
    assert_eq!(listed[2]["attempts"], Value::Null);

    let out = cli(&env, &["dlq", "list", "--limit", "1", "--json"], None).await;
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1);
    assert!(stderr(&out).contains("1 of 3"), "{}", stderr(&out));

    let out = cli(&env, &["dlq", "show", &ids[1]], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "reason:         rejected",
        "last status:    422",
        "x-blinger-error: rejected: detail\n      line two",
        "traceparent: 00-4bf92f3577b34da6",
        "content_type: application/json",
        "\"file_url\": \"https://cdn.example.com/a.png\"",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    let out = cli(&env, &["dlq", "show", &ids[2], "--json"], None).await;
    let shown: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(shown["headers"]["x-death"][0]["reason"], "delivery_limit");
    assert_eq!(shown["body"]["agent_id"], "agent-7");
    assert_eq!(shown["replay_routing_key"], "assign-agent");

    let missing = Uuid::new_v4().to_string();
    let out = cli(&env, &["dlq", "show", &missing], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no dead-lettered message with id"));

    // After all that reading the queue is intact, in order.
    assert_eq!(ids_of(&take_all(&env, &env.names.dead).await), ids);
    env.cleanup().await;
}

/// The ids in the DLQ, in order, as `dlq list` shows them (which also proves it keeps order).
async fn dlq_ids(env: &TestEnv) -> Vec<String> {
    let out = cli(env, &["dlq", "list", "--json", "--limit", "1000"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON array");
    listed
        .iter()
        .map(|d| d["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn pick(ids: &[String], which: &[usize]) -> Vec<String> {
    which.iter().map(|&i| ids[i].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_moves_only_the_selection_after_confirm() {
    let env = TestEnv::new("op-replay").await;
    let ids = seed_dlq(
        &env,
        &[
            Seed::worker("send-file", "invalid"),  // 0: never selected
            Seed::worker("send-text", "rejected"), // 1
            Seed::worker("send-file", "retries-exhausted"), // 2
            Seed::worker("assign-agent", "rejected"), // 3: never selected
            Seed::worker("send-text", "expired"),  // 4
            Seed::worker("send-text", "retries-exhausted"), // 5
            Seed {
                age: Duration::from_secs(5 * 3600),
                ..Seed::worker("request-review", "rejected") // 6
            },
            Seed::worker("assign-agent", "invalid"), // 7: never selected
        ],
    )
    .await;

    // No selection: refused, nothing touched.
    let out = cli(&env, &["dlq", "replay"], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--all"), "{}", stderr(&out));

    // Dry run: shows the selection, changes nothing.
    let out = cli(
        &env,
        &[
            "dlq",
            "replay",
            "--reason",
            "retries-exhausted",
            "--dry-run",
            "--json",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let would: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let would: Vec<&str> = would.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(would, [ids[2].as_str(), ids[5].as_str()]);
    assert!(stderr(&out).contains("dry run"));
    assert_eq!(env.jobs_waiting().await, 0);
    assert_eq!(dlq_ids(&env).await, ids, "dry run changed nothing");

    // The real thing.
    let out = cli(
        &env,
        &["dlq", "replay", "--reason", "retries-exhausted"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&ids[2]) && stdout(&out).contains(&ids[5]),
        "replay shows both: stdout {:?} stderr {:?}",
        stdout(&out),
        stderr(&out)
    );
    let replayed = take_all(&env, &env.names.queue).await;
    assert_eq!(ids_of(&replayed), pick(&ids, &[2, 5]), "in DLQ order");
    assert_eq!(replayed[0].routing_key, "send-file");
    assert_eq!(replayed[1].routing_key, "send-text");
    for r in &replayed {
        let names: Vec<&str> = r
            .headers
            .keys()
            .map(String::as_str)
            .filter(|h| *h != BROKER_DELIVERY_COUNT)
            .collect();
        assert_eq!(names, ["traceparent"], "bookkeeping headers dropped");
        assert_eq!(*r.props.delivery_mode(), Some(2));
        assert_eq!(
            r.props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
    }
    assert_eq!(
        replayed[0].body,
        job_body("send-file", &ids[2]),
        "same body"
    );
    assert_eq!(
        dlq_ids(&env).await,
        pick(&ids, &[0, 1, 3, 4, 6, 7]),
        "the rest stays, in order"
    );

    // Filters combine; --limit caps, and stopping early keeps the order too.
    let out = cli(
        &env,
        &["dlq", "replay", "--kind", "send-text", "--limit", "1"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        ids_of(&take_all(&env, &env.names.queue).await),
        pick(&ids, &[1])
    );
    assert_eq!(dlq_ids(&env).await, pick(&ids, &[0, 3, 4, 6, 7]));

    let out = cli(&env, &["dlq", "replay", "--older-than", "2h"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        ids_of(&take_all(&env, &env.names.queue).await),
        pick(&ids, &[6])
    );

    let out = cli(
        &env,
        &[
            "dlq",
            "replay",
            "--id",
            &ids[4].to_uppercase(),
            "--id",
            &ids[3],
            "--reason",
            "expired",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        ids_of(&take_all(&env, &env.names.queue).await),
        pick(&ids, &[4])
    );
    assert_eq!(dlq_ids(&env).await, pick(&ids, &[0, 3, 7]));

    // A republish the broker does not confirm as routed leaves the dead letter where it is:
    // here the target exchange exists but nothing is bound to it.
    let unbound = format!("{}.unbound", env.names.exchange);
    env.channel
        .exchange_declare(
            unbound.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let out = cli(
        &env,
        &["dlq", "replay", "--all", "--exchange", &unbound],
        None,
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("3 message(s) could not be replayed") && err.contains("routed"),
        "{err}"
    );
    assert_eq!(dlq_ids(&env).await, pick(&ids, &[0, 3, 7]), "nothing lost");
    let _ = env
        .channel
        .exchange_delete(unbound.as_str().into(), Default::default())
        .await;

    assert_eq!(
        ids_of(&take_all(&env, &env.names.dead).await),
        pick(&ids, &[0, 3, 7])
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_dlq_stops_early_and_keeps_order() {
    let mut env = TestEnv::new("op-classic").await;
    env.base_args = vec!["--queue-type".into(), "classic".into()];
    let classic = [("BLINGER_WORKER_QUEUE_TYPE", "classic")];
    let ids = seed_dlq(
        &env,
        &[
            Seed::worker("send-text", "rejected"),
            Seed::worker("send-file", "invalid"),
            Seed::worker("send-text", "rejected"),
            Seed::worker("send-text", "invalid"),
        ],
    )
    .await;
    let out = cli_with(
        &env,
        &classic,
        &["dlq", "list", "--limit", "1", "--json"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1);
    let out = cli_with(
        &env,
        &classic,
        &["dlq", "replay", "--reason", "rejected", "--limit", "1"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("replayed 1 of 1 message(s) looked at"),
        "stopped at the limit: {}",
        stderr(&out)
    );
    assert_eq!(
        ids_of(&take_all(&env, &env.names.queue).await),
        pick(&ids, &[0])
    );
    let out = cli_with(
        &env,
        &classic,
        &["dlq", "replay", "--reason", "invalid", "--limit", "1"],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        ids_of(&take_all(&env, &env.names.queue).await),
        pick(&ids, &[1])
    );
    assert_eq!(
        ids_of(&take_all(&env, &env.names.dead).await),
        pick(&ids, &[2, 3])
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_what_the_real_worker_dead_lettered_and_replay_all_returns_it() {
    let env = TestEnv::new("op-real").await;
    let worker = env.start_worker(&[]).await;
    let bad = Uuid::new_v4().to_string();
    env.publish(&json!({"kind":"send-text","id":bad,"conversation_id":"c","text":"   "}))
        .await;
    let dead_queue = env.names.dead.clone();
    let mut seen = false;
    for _ in 0..200 {
        if env.queue_len(&dead_queue).await == 1 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the worker dead-lettered the blank text");
    worker.stop().await;

    let out = cli(&env, &["dlq", "list", "--json"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], bad);
    assert_eq!(listed[0]["reason"], "invalid");
    assert_eq!(listed[0]["kind"], "send-text");
    assert!(
        listed[0]["error"].as_str().unwrap().contains("text"),
        "{listed:?}"
    );

    let out = cli(&env, &["dlq", "replay", "--all"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let replayed = take_all(&env, &env.names.queue).await;
    assert_eq!(ids_of(&replayed), [bad]);
    assert!(
        replayed[0]
            .headers
            .keys()
            .all(|k| !k.starts_with("x-") || k == BROKER_DELIVERY_COUNT),
        "{:?}",
        replayed[0].headers.keys()
    );
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_purge_asks_and_refuses_without_a_terminal() {
    let env = TestEnv::new("op-purge").await;
    seed_dlq(
        &env,
        &[
            Seed::worker("send-text", "invalid"),
            Seed::worker("send-text", "rejected"),
        ],
    )
    .await;
    // stdin is not a terminal here and there is no --yes: nobody to ask, so no purge.
    let out = cli(&env, &["dlq", "purge"], None).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("without --yes"), "{err}");
    assert!(err.contains("not a terminal"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(env.queue_len(&env.names.dead).await, 2);

    let out = cli(&env, &["dlq", "purge", "--yes"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("purged 2"), "{}", stderr(&out));
    assert_eq!(env.queue_len(&env.names.dead).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_errors_are_one_line_and_hide_the_password() {
    let env = TestEnv::new("op-err").await;
    let out = tokio::task::spawn_blocking(|| {
        Command::new(BIN)
            .env_clear()
            .args([
                "dlq",
                "list",
                "--amqp-url",
                "amqp://ops:s3cret-pw@127.0.0.1:1/%2f",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(!err.contains("s3cret-pw"), "{err}");
    assert!(err.contains("AMQP_URL") && err.contains("***"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // A DLQ that does not exist is named, with the setting.
    let out = cli(
        &env,
        &["dlq", "list", "--dead-letter-queue", "t.op-err.nope"],
        None,
    )
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("t.op-err.nope does not exist")
            && err.contains("BLINGER_WORKER_DEAD_LETTER_QUEUE"),
        "{err}"
    );
    env.cleanup().await;
}

fn delivered(at_ms: u64, blinger_id: &str) -> Delivered {
    Delivered {
        delivered_at_ms: at_ms,
        kind: "send-text".into(),
        blinger_id: Some(blinger_id.into()),
        blinger_status: Some("delivered".into()),
        attempts: 2,
        digest: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_get_stats_prune() {
    let env = TestEnv::new("op-store").await;
    let day = 24 * 3600 * 1000;
    let fresh = Uuid::new_v4();
    let old = Uuid::new_v4();
    let store = Store::open(env.data_dir.path()).unwrap();
    store
        .record(&fresh, &delivered(now_ms() - day, "m-fresh"))
        .await
        .unwrap();
    store
        .record(&old, &delivered(now_ms() - 10 * day, "m-old"))
        .await
        .unwrap();

    // While the store is open (as by a running worker) the commands say why they cannot run.
    let out = cli(&env, &["store", "stats"], None).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("locked") && err.contains("worker running"),
        "{err}"
    );
    store.close().await.unwrap();

    let out = cli(&env, &["store", "get", &fresh.to_string()], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let record: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(record["id"], fresh.to_string());
    assert_eq!(record["blinger_id"], "m-fresh");
    assert_eq!(record["blinger_status"], "delivered");
    assert_eq!(record["attempts"], 2);
    assert_eq!(record["kind"], "send-text");
    assert!(record["delivered_at"].as_str().unwrap().ends_with('Z'));

    let unknown = Uuid::new_v4().to_string();
    let out = cli(&env, &["store", "get", &unknown], None).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not delivered"), "{}", stderr(&out));
    let out = cli(&env, &["store", "get", "not-a-uuid"], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a UUID"));

    let out = cli(&env, &["store", "stats", "--json"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["records"], 2);
    assert!(stats["size_on_disk_bytes"].as_u64().unwrap() > 0);
    let out = cli(&env, &["store", "stats"], None).await;
    assert!(
        stdout(&out).contains("records:       2"),
        "{}",
        stdout(&out)
    );

    // Default: the retention, 7 days.
    let out = cli(&env, &["store", "prune"], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("pruned 1 record(s) older than 7days"),
        "{}",
        stdout(&out)
    );
    let out = cli(&env, &["store", "get", &old.to_string()], None).await;
    assert_eq!(out.status.code(), Some(1));
    let out = cli(&env, &["store", "prune", "--older-than", "12h"], None).await;
    assert!(stdout(&out).contains("pruned 1"), "{}", stdout(&out));
    let out = cli(&env, &["store", "stats", "--json"], None).await;
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["records"], 0);

    // A data dir that holds no store is reported, not created.
    let out = cli(
        &env,
        &["store", "stats", "--data-dir", "/nonexistent/blinger"],
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no store at /nonexistent/blinger"));
    assert!(!std::path::Path::new("/nonexistent/blinger").exists());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_help_with_an_example() {
    for args in [
        &["publish", "--help"][..],
        &["dlq", "--help"],
        &["dlq", "list", "--help"],
        &["dlq", "show", "--help"],
        &["dlq", "replay", "--help"],
        &["dlq", "purge", "--help"],
        &["store", "--help"],
        &["store", "get", "--help"],
        &["store", "stats", "--help"],
        &["store", "prune", "--help"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example") && help.contains("blinger-worker "),
            "{args:?}:\n{help}"
        );
        assert!(
            !help.contains("guest:guest"),
            "no default credentials shown"
        );
    }
}
