//! A private RabbitMQ node for the scenarios that stop the broker or create users.
//!
//! Other tests and people share the machine's RabbitMQ: it is never stopped, restarted or given
//! users. Instead this starts a second node of the same Debian `rabbitmq-server` installation
//! under its own name, ports and directories (as the `rabbitmq` user, sharing its Erlang cookie so
//! `rabbitmqctl -n NODE` reaches it), and stops and restarts only that node. Its data directory
//! survives restarts, so durable queues and persistent messages do too: a real broker restart.
//!
//! With `RELIABILITY_RABBITMQ_ROOT` set to the RabbitMQ 4 root of `scripts/lib.sh`
//! (`ensure_rabbitmq4`: a Debian 13 root with its `rabbitmq-server`), the node is started from
//! that root under `chroot` instead, so the scenarios test the broker version of the run
//! (`scripts/test.sh` sets it for the RabbitMQ 4 pass). Its directory is then under the root's
//! `/tmp`, and `rabbitmqctl` is the root's.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::harness::free_port;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// The root the node runs from (`RELIABILITY_RABBITMQ_ROOT`), or `None` for the host's package.
fn chroot() -> Option<PathBuf> {
    std::env::var_os("RELIABILITY_RABBITMQ_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `path` (absolute, as the node sees it) on the host.
fn host_path(path: &str) -> PathBuf {
    match chroot() {
        Some(root) => root.join(path.trim_start_matches('/')),
        None => PathBuf::from(path),
    }
}

/// `rabbitmqctl` of the node's installation: the host's, or the root's through `chroot`.
fn rabbitmqctl() -> Command {
    match chroot() {
        Some(root) => {
            let mut c = Command::new("chroot");
            c.arg(root)
                .args(["env", "HOME=/var/lib/rabbitmq", "rabbitmqctl"]);
            c
        }
        None => Command::new("rabbitmqctl"),
    }
}

pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

fn is_root() -> bool {
    // The effective user through `id`: no libc dependency for one check.
    let uid = Command::new("id").arg("-u").output().ok();
    let me = uid.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    me.as_deref() == Some("0")
}

fn rabbitmq_ids() -> (u32, u32) {
    if chroot().is_some() {
        // The root's own user database.
        let passwd = std::fs::read_to_string(host_path("/etc/passwd")).expect("the root's passwd");
        let fields: Vec<&str> = passwd
            .lines()
            .find(|l| l.starts_with("rabbitmq:"))
            .expect("the rabbitmq user exists in the root")
            .split(':')
            .collect();
        return (fields[2].parse().unwrap(), fields[3].parse().unwrap());
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "rabbitmq"])
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the rabbitmq user exists (Debian package rabbitmq-server)")
    };
    (id("-u"), id("-g"))
}

impl PrivateBroker {
    /// Whether a private node can be started here: the Debian package and root.
    pub fn available() -> Result<(), String> {
        if !host_path(SERVER).exists() {
            return Err(format!(
                "{} not found: this scenario starts a private RabbitMQ node and needs the \
                 Debian package rabbitmq-server (scripts/test.sh installs it), or the RabbitMQ 4 \
                 root of RELIABILITY_RABBITMQ_ROOT (scripts/lib.sh ensure_rabbitmq4)",
                host_path(SERVER).display()
            ));
        }
        if !is_root() {
            return Err("starting a private RabbitMQ node needs root (runuser -u rabbitmq)".into());
        }
        Ok(())
    }

    /// Starts a fresh node and waits until it is up.
    pub async fn start(tag: &str) -> PrivateBroker {
        if let Err(e) = Self::available() {
            panic!("{e}");
        }
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        // Under /tmp as the node sees it (the host's temp dir, or the root's /tmp).
        let dir = match chroot() {
            Some(_) => host_path(&format!("/tmp/blrel-{tag}-{suffix}")),
            None => std::env::temp_dir().join(format!("blrel-{tag}-{suffix}")),
        };
        std::fs::create_dir_all(dir.join("mnesia")).unwrap();
        std::fs::create_dir_all(dir.join("log")).unwrap();
        let port = free_port();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let (uid, gid) = rabbitmq_ids();
        for entry in walk(&dir) {
            std::os::unix::fs::chown(&entry, Some(uid), Some(gid)).unwrap();
        }
        let mut broker = PrivateBroker {
            node: format!("blrel-{suffix}@localhost"),
            port,
            dist_port: free_port(),
            dir,
            child: None,
            starts: 0,
        };
        broker.start_again().await;
        broker
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        self.url_for("guest", "guest")
    }

    pub fn url_for(&self, user: &str, password: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n NODE args...`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        rabbitmqctl()
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .expect("rabbitmqctl runs")
    }

    /// Starts the node (again) and waits until it accepts connections; returns the time it took.
    pub async fn start_again(&mut self) -> Duration {
        let started = Instant::now();
        self.starts += 1;
        let out = std::fs::File::create(self.dir.join(format!("server-{}.out", self.starts)))
            .expect("server log");
        let err = out.try_clone().unwrap();
        // The directory as the node sees it.
        let node_dir = match chroot() {
            Some(root) => PathBuf::from("/").join(self.dir.strip_prefix(&root).unwrap()),
            None => self.dir.clone(),
        };
        let d = |p: &str| node_dir.join(p).display().to_string();
        let mut command = match chroot() {
            Some(root) => {
                let mut c = Command::new("chroot");
                c.arg(root).arg("runuser");
                c
            }
            None => Command::new("runuser"),
        };
        let child = command
            .args(["-u", "rabbitmq", "--", "env"])
            .arg("HOME=/var/lib/rabbitmq")
            .arg(format!("RABBITMQ_NODENAME={}", self.node))
            .arg(format!("RABBITMQ_NODE_PORT={}", self.port))
            .arg(format!("RABBITMQ_DIST_PORT={}", self.dist_port))
            .arg(format!("RABBITMQ_MNESIA_BASE={}", d("mnesia")))
            .arg(format!("RABBITMQ_LOG_BASE={}", d("log")))
            .arg(format!("RABBITMQ_CONFIG_FILE={}", d("rabbitmq.conf")))
            .arg(format!(
                "RABBITMQ_ENABLED_PLUGINS_FILE={}",
                d("enabled_plugins")
            ))
            .arg(format!("RABBITMQ_PID_FILE={}", d("pid")))
            .arg(SERVER)
            .current_dir(host_path("/var/lib/rabbitmq"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("rabbitmq-server starts");
        self.child = Some(child);
        let node = self.node.clone();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let node = node.clone();
            let ok = tokio::task::spawn_blocking(move || {
                rabbitmqctl()
                    .args(["-n", &node, "-q", "await_startup", "--timeout", "30"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            })
            .await
            .unwrap();
            if ok {
                return started.elapsed();
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "private RabbitMQ node exited at start ({status}); see {}",
                    self.dir.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "private RabbitMQ node did not start in 120 s; see {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Stops the node (`rabbitmqctl stop`: a clean broker shutdown) and waits for its process.
    pub async fn stop(&mut self) -> Duration {
        let started = Instant::now();
        let node = self.node.clone();
        let _ = tokio::task::spawn_blocking(move || {
            rabbitmqctl()
                .args(["-n", &node, "-q", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        })
        .await;
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        started.elapsed()
    }

    /// Adds a user with full permissions on `/`.
    pub fn add_user(&self, user: &str, password: &str) {
        let out = self.ctl(&["-q", "add_user", user, password]);
        assert!(out.status.success(), "add_user: {out:?}");
        let out = self.ctl(&["-q", "set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
        assert!(out.status.success(), "set_permissions: {out:?}");
    }

    /// The node's own log files and console output, concatenated (for secret greps).
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for entry in walk(&self.dir) {
            let name = entry.display().to_string();
            if entry.is_file() && (name.ends_with(".log") || name.ends_with(".out")) {
                all.push_str(&String::from_utf8_lossy(
                    &std::fs::read(&entry).unwrap_or_default(),
                ));
            }
        }
        all
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = rabbitmqctl()
                .args(["-n", &self.node, "-q", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
