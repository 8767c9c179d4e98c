//! Secrets and output hygiene of the operator commands (issue 10, item 5), through the real
//! binary against the real RabbitMQ: a malformed `AMQP_URL` never shows its password, and what a
//! publisher put in a message never reaches the operator's terminal as control characters.

mod common;

use std::process::{Command, Output, Stdio};

use common::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_blinger-worker");

/// Malformed `AMQP_URL`s whose password a URL parser would echo back, and that password.
const MALFORMED_URLS: [(&str, &str); 6] = [
    ("amqp:ops:s3cret-pw-Q@127.0.0.1", "s3cret-pw-Q"),
    ("amqp://ops:s3cret-pw-Q@127.0.0.1:notaport", "s3cret-pw-Q"),
    ("amqp://ops:s3cret@pw-Q@127.0.0.1:1", "pw-Q"),
    ("amqp://ops:1234/s3cret-pw-Q@127.0.0.1", "s3cret-pw-Q"),
    ("amqp://ops:12#s3cret-pw-Q@127.0.0.1", "s3cret-pw-Q"),
    ("amqp:/ops:s3cret-pw-Q@127.0.0.1", "s3cret-pw-Q"),
];

async fn run_with_url(url: &'static str, args: &'static [&'static str]) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .env_clear()
            .env("AMQP_URL", url)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_never_show_the_password_of_a_malformed_url() {
    let commands: [&[&str]; 4] = [
        &["dlq", "list"],
        &["dlq", "show", "554f11c1-ec1e-4fdb-9953-bfad33013f58"],
        &["dlq", "purge", "--yes"],
        &[
            "publish",
            "--kind",
            "send-text",
            "--conversation-id",
            "c-1",
            "--text",
            "Hello",
        ],
    ];
    for (url, password) in MALFORMED_URLS {
        for args in commands {
            let out = run_with_url(url, args).await;
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{url} {args:?}: {all}");
            assert!(!all.contains(password), "{url} {args:?}: {all}");
            assert!(all.contains("AMQP_URL"), "{url} {args:?}: {all}");
            assert_eq!(all.trim().lines().count(), 1, "{url} {args:?}: {all}");
        }
    }
}

/// Runs the binary with this env's broker and names (and nothing else from the environment).
async fn cli(env: &TestEnv, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("AMQP_URL", &env.broker.url)
        .env("BLINGER_WORKER_EXCHANGE", &env.names.exchange)
        .env("BLINGER_WORKER_QUEUE", &env.names.queue)
        .env("BLINGER_WORKER_DEAD_LETTER_QUEUE", &env.names.dead)
        .env("BLINGER_WORKER_RETRY_DELAYS", "1s,2s")
        .args(args)
        .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output().expect("the binary runs"))
        .await
        .expect("cli task")
}

fn ls(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Publishes one message straight into the dead-letter queue, confirmed.
async fn dead_letter(env: &TestEnv, body: &[u8], props: BasicProperties) {
    let confirm = env
        .channel
        .basic_publish(
            "".into(),
            env.names.dead.as_str().into(),
            BasicPublishOptions::default(),
            body,
            props.with_delivery_mode(2),
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack());
}

/// Terminal controls a hostile publisher may hide in a message: CSI sequences that clear the
/// screen or set the window title, a bell, a backspace, a carriage return that overwrites the
/// line, DEL, the 8-bit CSI (U+009B) and a right-to-left override.
const HOSTILE: &str = "a\u{1b}[2J\u{1b}]0;pwned\u{7}b\u{8}c\rd\u{7f}e\u{9b}31mf\u{202e}g";

/// The characters none of the output may contain.
fn assert_clean(what: &str, text: &str) {
    for c in text.chars() {
        let bad = (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        assert!(
            !bad,
            "{what}: control character {c:?} reached the output:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_show_escape_what_a_publisher_put_in_a_message() {
    let env = TestEnv::new("hyg-esc").await;
    env.declare().await;
    let id = uuid::Uuid::new_v4().to_string();
    // A JSON body whose fields carry the controls (JSON escapes them, the parsed values hold
    // them), the same controls raw in a non-JSON body, and in header names and values, in the
    // worker's own header names (a forged reason) and in properties.
    let job = json!({"kind": "send-text", "id": id, "conversation_id": HOSTILE, "text": HOSTILE});
    let mut h = FieldTable::default();
    h.insert("x-blinger-reason".into(), ls(HOSTILE));
    h.insert("x-blinger-error".into(), ls(HOSTILE));
    h.insert(ShortString::from(format!("x-evil{HOSTILE}")), ls(HOSTILE));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_app_id(ShortString::from(HOSTILE))
        .with_headers(h.clone());
    dead_letter(&env, job.to_string().as_bytes(), props.clone()).await;
    let raw_id = uuid::Uuid::new_v4().to_string();
    dead_letter(
        &env,
        format!("not json {HOSTILE}").as_bytes(),
        props.with_message_id(ShortString::from(raw_id.clone())),
    )
    .await;

    for args in [
        vec!["dlq", "list"],
        vec!["dlq", "show", &id],
        vec!["dlq", "show", &raw_id],
    ] {
        let out = cli(&env, &args).await;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert_clean(&format!("{args:?} stdout"), &stdout);
        assert_clean(&format!("{args:?} stderr"), &stderr);
    }

    // JSON output stays valid JSON and says exactly what the message holds, escaped.
    let out = cli(&env, &["dlq", "list", "--json"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_clean("list --json", &text);
    let listed: Value = serde_json::from_str(&text).expect("list --json is JSON");
    assert_eq!(listed[0]["reason"], HOSTILE);
    assert_eq!(listed[0]["conversation_id"], HOSTILE);
    let out = cli(&env, &["dlq", "show", &id, "--json"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_clean("show --json", &text);
    let shown: Value = serde_json::from_str(&text).expect("show --json is JSON");
    assert_eq!(shown["body"]["text"], HOSTILE);
    assert_eq!(shown["headers"][format!("x-evil{HOSTILE}")], HOSTILE);
    assert_eq!(shown["properties"]["app_id"], HOSTILE);
    let out = cli(&env, &["dlq", "show", &raw_id, "--json"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_clean("show --json (raw body)", &text);
    let shown: Value = serde_json::from_str(&text).expect("show --json is JSON");
    assert_eq!(shown["body"], format!("not json {HOSTILE}"));

    // Reading consumed nothing.
    assert_eq!(env.queue_len(&env.names.dead).await, 2);
    env.cleanup().await;
}
