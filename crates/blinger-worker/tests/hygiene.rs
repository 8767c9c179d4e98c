//! Secrets and output hygiene of the operator commands (issue 10, item 5), through the real
//! binary against the real RabbitMQ: a malformed `AMQP_URL` never shows its password, and what a
//! publisher put in a message never reaches the operator's terminal as control characters.

use std::process::{Command, Output, Stdio};

use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use serde_json::{Value, json};
use test_support::*;

/// A long-string header value, as the worker writes them.
use blinger_worker::broker::string_value as ls;

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
    cli_env(env, &[], args).await
}

/// Publishes one message straight into the dead-letter queue, confirmed.
async fn dead_letter(env: &TestEnv, body: &[u8], props: BasicProperties) {
    env.publish_to_queue(&env.names.dead, body, props).await;
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
    assert_eq!(listed[0]["reason"], HOSTILE, "{listed:#}");
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

/// A job body with this id, padded to about `pad` bytes with an array of zeros (slow to parse:
/// a reader that parses bodies falls behind a broker that sends as fast as it may).
fn padded_job(id: &str, pad: usize) -> Vec<u8> {
    json!({"kind": "send-text", "id": id, "conversation_id": "c-1", "text": "x", "pad": vec![0; pad / 2]})
        .to_string()
        .into_bytes()
}

/// Seeds `n` dead letters; returns their ids in queue order.
async fn seed(env: &TestEnv, n: usize, pad: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = uuid::Uuid::new_v4().to_string();
        let mut h = FieldTable::default();
        h.insert(
            "x-blinger-reason".into(),
            ls(if i % 3 == 0 { "rejected" } else { "invalid" }),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(h);
        dead_letter(env, &padded_job(&id, pad), props).await;
        ids.push(id);
    }
    ids
}

/// The ids in the DLQ, in order, taken off it (consuming them).
async fn take_ids(env: &TestEnv) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(msg) = env
        .channel
        .basic_get(
            env.names.dead.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let body: Value = serde_json::from_slice(&msg.delivery.data).unwrap_or(Value::Null);
        ids.push(body["id"].as_str().unwrap_or("").to_owned());
    }
    ids
}

async fn cli_env(env: &TestEnv, vars: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = env.command(BIN);
    cmd.envs(vars.iter().copied()).args(args);
    output(cmd, None).await
}

fn listed_ids(out: &Output) -> Vec<String> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON array");
    listed
        .iter()
        .map(|d| d["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The scans read the queue a few messages at a time (here 5: 13 messages make three segments
/// of consumers), and still leave it in its order, however often it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_reads_a_few_at_a_time_and_keeps_the_order() {
    let env = TestEnv::new("hyg-seg").await;
    env.declare().await;
    let ids = seed(&env, 13, 10).await;
    let small = [("BLINGER_WORKER_DLQ_READ_AHEAD", "5")];
    for _ in 0..3 {
        let out = cli_env(&env, &small, &["dlq", "list", "--json", "--limit", "1000"]).await;
        assert_eq!(listed_ids(&out), ids);
    }
    let out = cli_env(&env, &small, &["dlq", "list", "--json", "--limit", "2"]).await;
    assert_eq!(listed_ids(&out), ids[..2]);
    let out = cli_env(&env, &small, &["dlq", "show", &ids[11]]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ids[11]));
    // A replay from the middle of two segments leaves the others where they were.
    let out = cli_env(
        &env,
        &small,
        &["dlq", "replay", "--id", &ids[3], "--id", &ids[8]],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rest = ids.clone();
    rest.retain(|id| id != &ids[3] && id != &ids[8]);
    let out = cli_env(&env, &small, &["dlq", "list", "--json", "--limit", "1000"]).await;
    assert_eq!(listed_ids(&out), rest);
    assert_eq!(take_ids(&env).await, rest);
    env.cleanup().await;
}

/// `purge` deletes what it showed and asked about, not what arrived while the question was
/// open; "no" deletes nothing and keeps the order. Run on a pseudo-terminal (util-linux
/// `script`), as an operator would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_purge_deletes_only_what_it_asked_about() {
    use std::io::{BufRead, BufReader, Write};
    let env = TestEnv::new("hyg-purge").await;
    env.declare().await;
    let asked = seed(&env, 7, 10).await;

    let purge = |answer: &'static str| {
        let mut cmd = Command::new("script");
        cmd.args(["-qefc", &format!("{BIN} dlq purge"), "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AMQP_URL", &env.broker.url)
            .env("BLINGER_WORKER_DEAD_LETTER_QUEUE", &env.names.dead)
            .env("BLINGER_WORKER_DLQ_READ_AHEAD", "3")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        (cmd, answer)
    };
    // Answers the question once it is on the screen, after `meanwhile` ran.
    async fn answer_after(
        (mut cmd, answer): (Command, &'static str),
        meanwhile: impl std::future::Future<Output = ()>,
    ) -> (String, bool) {
        let mut child = cmd.spawn().expect("script runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reader = std::thread::spawn(move || {
            let mut screen = String::new();
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).split(b' ') {
                let Ok(word) = line else { break };
                screen.push_str(&String::from_utf8_lossy(&word));
                screen.push(' ');
                if screen.contains("[y/N]")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
            screen
        });
        tokio::time::timeout(std::time::Duration::from_secs(30), rx)
            .await
            .expect("the question within 30 s")
            .expect("the question");
        meanwhile.await;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(answer.as_bytes()).unwrap();
        stdin.flush().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        drop(stdin);
        (reader.join().unwrap(), status.success())
    }

    // "no": nothing deleted, order kept.
    let (screen, ok) = answer_after(purge("n\n"), async {}).await;
    assert!(!ok, "{screen}");
    assert!(
        screen.contains("7 message(s): invalid 4, rejected 3"),
        "{screen}"
    );
    assert!(screen.contains("purge cancelled"), "{screen}");
    let out = cli_env(&env, &[], &["dlq", "list", "--json", "--limit", "1000"]).await;
    assert_eq!(listed_ids(&out), asked);

    // "yes", with two more dead letters arriving while the question is open.
    let mut late = Vec::new();
    let (screen, ok) = answer_after(purge("y\n"), async {
        late = seed(&env, 2, 10).await;
    })
    .await;
    assert!(ok, "{screen}");
    assert!(screen.contains("Delete these 7"), "{screen}");
    assert!(screen.contains("purged 7 message(s)"), "{screen}");
    assert_eq!(take_ids(&env).await, late);
    env.cleanup().await;
}

/// Runs the command, sampling its peak resident memory (VmHWM) until it exits.
async fn peak_rss(env: &TestEnv, vars: &[(&str, &str)], args: &[&str]) -> (Output, u64) {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("AMQP_URL", &env.broker.url)
        .env("BLINGER_WORKER_DEAD_LETTER_QUEUE", &env.names.dead)
        .envs(vars.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || {
        let child = cmd.spawn().expect("the binary runs");
        let status = format!("/proc/{}/status", child.id());
        let sampler = std::thread::spawn(move || {
            let mut peak = 0u64;
            while let Ok(text) = std::fs::read_to_string(&status) {
                if let Some(kib) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                {
                    peak = peak.max(kib);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        });
        let output = child.wait_with_output().expect("the binary finishes");
        (output, sampler.join().unwrap())
    })
    .await
    .unwrap()
}

/// `list` and `show` never hold the queue in memory: 128 dead letters of 512 KiB each (64 MiB)
/// are read with a few of them resident, not the queue. (The old reader let the broker send the
/// whole queue at once and peaked at baseline + 60 MiB and more.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_show_hold_a_few_messages_not_the_queue() {
    let env = TestEnv::new("hyg-mem").await;
    env.declare().await;
    let ids = seed(&env, 128, 512 * 1024).await;
    let (_, baseline) =
        peak_rss(&env, &[], &["dlq", "list", "--dead-letter-queue", "t.nope"]).await;
    for args in [
        vec!["dlq", "show", "554f11c1-ec1e-4fdb-9953-bfad33013f58"],
        vec!["dlq", "list", "--json"],
    ] {
        let (out, peak) = peak_rss(&env, &[("BLINGER_WORKER_DLQ_READ_AHEAD", "4")], &args).await;
        eprintln!("{args:?}: peak {peak} KiB, baseline {baseline} KiB");
        if args[1] == "list" {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            peak < baseline + 32 * 1024,
            "{args:?} peaked at {peak} KiB (the queue is 64 MiB; baseline {baseline} KiB)"
        );
    }
    assert_eq!(take_ids(&env).await, ids);
    env.cleanup().await;
}

/// `publish` reports an invalid line with its reason, which may quote the line: no control
/// character of it reaches the terminal (the decoder quotes values Debug-style; a guard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_escapes_what_an_invalid_line_quotes() {
    let env = TestEnv::new("hyg-pub").await;
    let hostile =
        json!({"kind": HOSTILE, "id": uuid::Uuid::new_v4().to_string(), "conversation_id": "c"});
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("AMQP_URL", &env.broker.url)
        .env("BLINGER_WORKER_EXCHANGE", &env.names.exchange)
        .env("BLINGER_WORKER_QUEUE", &env.names.queue)
        .env("BLINGER_WORKER_DEAD_LETTER_QUEUE", &env.names.dead)
        .env("BLINGER_WORKER_RETRY_DELAYS", "1s,2s")
        .args(["publish", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{hostile}").unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1"), "{stderr}");
    assert_clean("publish stderr", &stderr);
    assert_clean("publish stdout", &String::from_utf8_lossy(&out.stdout));
    env.cleanup().await;
}
