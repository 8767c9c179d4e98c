//! Secrets and output hygiene of the operator commands (issue 10, item 5), through the real
//! binary: a malformed `AMQP_URL` never shows its password.

mod common;

use std::process::Command;

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
