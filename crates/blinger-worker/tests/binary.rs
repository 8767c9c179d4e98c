//! The real `blinger-worker` binary: start-up errors are one clear line, SIGTERM exits 0 after
//! finishing work, and secrets never reach the output (debug logs included).

use std::process::{Command, Stdio};
use std::time::Duration;

use test_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_blinger-worker");

fn worker_command(env: &TestEnv) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", &env.broker.url)
        .env("BLINGER_WORKER_EXCHANGE", &env.names.exchange)
        .env("BLINGER_WORKER_QUEUE", &env.names.queue)
        .env("BLINGER_WORKER_DEAD_LETTER_QUEUE", &env.names.dead)
        .env("BLINGER_WORKER_RETRY_DELAYS", "1s,2s")
        .env("BLINGER_API_URL", env.sandbox.base_url())
        .env("BLINGER_WORKER_DATA_DIR", env.data_dir.path())
        .env("BLINGER_WORKER_METRICS_ADDR", "127.0.0.1:0")
        .envs(env.names.partitions_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn one_line_error(output: &std::process::Output) -> String {
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_is_one_clear_line() {
    let env = TestEnv::new("notoken").await;
    let output = worker_command(&env).output().unwrap();
    let line = one_line_error(&output);
    assert!(line.contains("BLINGER_API_TOKEN"), "{line}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_one_clear_line_without_the_password() {
    let env = TestEnv::new("nobroker").await;
    let output = worker_command(&env)
        .env("AMQP_URL", "amqp://svc:Pa55-w0rd-XYZ@127.0.0.1:1/%2f")
        .env("BLINGER_API_TOKEN", "tok-very-secret-123")
        .output()
        .unwrap();
    let line = one_line_error(&output);
    assert!(line.contains("AMQP_URL"), "{line}");
    assert_eq!(
        line.matches("onnection refused").count(),
        1,
        "cause said once: {line}"
    );
    assert!(!line.contains("Pa55-w0rd-XYZ"), "{line}");
    assert!(!line.contains("tok-very-secret-123"), "{line}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_never_shows_secret_values() {
    let output = Command::new(BIN)
        .args(["run", "--help"])
        .env("BLINGER_API_TOKEN", "tok-very-secret-123")
        .env("AMQP_URL", "amqp://svc:Pa55-w0rd-XYZ@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("BLINGER_WORKER_CONCURRENCY"));
    assert!(!help.contains("tok-very-secret-123"));
    assert!(!help.contains("Pa55-w0rd-XYZ"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_work_exits_zero_and_logs_no_secret() {
    let env = TestEnv::new("sigterm").await;
    env.sandbox.update(|c| c.latency_ms = 200);
    env.declare().await;
    for i in 0..40 {
        env.publish(&text_job(&format!("c-{}", i % 10), &i.to_string()))
            .await;
    }
    let mut child = worker_command(&env)
        .env("BLINGER_API_TOKEN", TOKEN)
        .env("BLINGER_WORKER_LOG_LEVEL", "debug")
        .env("BLINGER_WORKER_LOG_FORMAT", "json")
        .env("BLINGER_WORKER_CONCURRENCY", "4")
        .spawn()
        .unwrap();
    // Read the logs while the worker runs: a full pipe would block its logging, and the worker
    // with it (debug logs fill 64 KiB in a second or two).
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    assert!(
        env.sandbox
            .wait_for(|r| r.len() >= 4, Duration::from_secs(20))
            .await
    );
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let logs = logs.join().unwrap();
    assert!(status.success(), "exit {status:?}\n{logs}");
    // Every line is JSON.
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
    assert!(logs.contains("shutdown signal received"), "{logs}");
    assert!(!logs.contains(TOKEN), "the token leaked into the logs");
    // Nothing lost: what was not delivered is back in the queue.
    let accepted = env
        .sandbox
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .count();
    let queued = env.jobs_waiting().await as usize;
    assert_eq!(accepted + queued, 40);
    env.cleanup().await;
}

/// Malformed `AMQP_URL`s whose password the URL parser would otherwise echo back (in the path of
/// a URL without `//`, after a stray `@`, `/` or `#`): the password is in none of them.
const MALFORMED_URLS: [(&str, &str); 6] = [
    ("amqp:svc:Pa55-w0rd-XYZ@127.0.0.1", "Pa55-w0rd-XYZ"),
    (
        "amqp://svc:Pa55-w0rd-XYZ@127.0.0.1:notaport",
        "Pa55-w0rd-XYZ",
    ),
    ("amqp://svc:Pa55@w0rd-XYZ@127.0.0.1:1", "w0rd-XYZ"),
    ("amqp://svc:1234/Pa55-w0rd-XYZ@127.0.0.1", "Pa55-w0rd-XYZ"),
    ("amqp://svc:12#Pa55-w0rd-XYZ@127.0.0.1", "Pa55-w0rd-XYZ"),
    ("amqp:/svc:Pa55-w0rd-XYZ@127.0.0.1", "Pa55-w0rd-XYZ"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_amqp_url_is_one_line_without_the_password() {
    for (url, password) in MALFORMED_URLS {
        let data_dir = tempfile::tempdir().unwrap();
        let output = tokio::task::spawn_blocking({
            let data_dir = data_dir.path().to_owned();
            move || {
                Command::new(BIN)
                    .arg("run")
                    .env_clear()
                    .env("AMQP_URL", url)
                    .env("BLINGER_API_TOKEN", "tok-very-secret-123")
                    .env("BLINGER_API_URL", "http://127.0.0.1:1")
                    .env("BLINGER_WORKER_DATA_DIR", &data_dir)
                    .env("BLINGER_WORKER_METRICS_ADDR", "127.0.0.1:0")
                    .env("BLINGER_WORKER_LOG_LEVEL", "debug")
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!all.contains(password), "{url}: {all}");
        assert!(!output.status.success(), "{url}: {all}");
        // Debug logs around it (sled's threads may still log after it); one start error line.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("blinger-worker: "))
            .collect();
        assert_eq!(errors.len(), 1, "{url}: {all}");
        assert!(errors[0].contains("AMQP_URL"), "{url}: {}", errors[0]);
    }
}

/// A child process that is killed if the test fails before it stops it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// GET on a fresh connection; the status line, or None when nothing came within `within`.
async fn get_status(addr: &str, path: &str, within: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.ok()?;
        String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .map(str::to_owned)
    };
    tokio::time::timeout(within, ask).await.ok().flatten()
}

/// Hundreds of idle connections to the ops port cost the worker a bounded number of sockets
/// (they wait in the kernel's backlog past the limit), a trickling request head is cut off, and
/// once the clients are gone the port answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_clients_cannot_exhaust_the_ops_port() {
    let env = TestEnv::new("opsport").await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = KillOnDrop(Some(
        worker_command(&env)
            .env("BLINGER_API_TOKEN", TOKEN)
            .env("BLINGER_WORKER_METRICS_ADDR", &addr)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let pid = child.0.as_ref().unwrap().id();
    let mut up = false;
    for _ in 0..100 {
        if get_status(&addr, "/healthz", Duration::from_secs(1))
            .await
            .is_some_and(|s| s.contains("200"))
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the worker's ops port answers");
    let baseline = open_fds(pid);

    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = open_fds(pid);
    assert!(
        held <= baseline + 64 + 4,
        "300 idle connections took {} sockets of the worker",
        held.saturating_sub(baseline)
    );
    drop(idle);

    // A request head that never ends is cut off after the header-read timeout (5 s).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(15), slow.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a trickling request head kept its connection"
        );
    }
    let status = get_status(&addr, "/healthz", Duration::from_secs(15)).await;
    assert!(
        status.as_deref().is_some_and(|s| s.contains("200")),
        "{status:?}"
    );

    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut worker = child.0.take().unwrap();
    let _ = tokio::task::spawn_blocking(move || worker.wait()).await;
    env.cleanup().await;
}
