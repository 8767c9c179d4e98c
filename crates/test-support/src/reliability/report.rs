//! Figures, checks, and the markdown they become.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Ctx;
use super::harness::DeadLetter;
use super::jobs::Analysis;
use super::scenarios::Outcome;

/// One promise checked by a scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// What one scenario measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Figures {
    /// "1 crash", ...
    pub scenario: String,
    pub profile: String,
    /// The settings and load, in a few words.
    pub setup: String,
    pub published: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: String,
    pub dead_lettered: String,
    pub order: String,
    pub recovery: String,
    /// Further measured figures, in order.
    pub details: Vec<(String, String)>,
    pub checks: Vec<Check>,
    pub elapsed_secs: f64,
    /// The run's seed (`--seed`), to reproduce the random choices.
    #[serde(default)]
    pub seed: u64,
}

impl Figures {
    pub fn new(scenario: &str, ctx: &Ctx) -> Figures {
        Figures {
            scenario: scenario.to_owned(),
            profile: ctx.profile.as_str().to_owned(),
            seed: ctx.seed,
            duplicated: "-".into(),
            dead_lettered: "-".into(),
            order: "-".into(),
            recovery: "-".into(),
            ..Figures::default()
        }
    }

    pub fn detail(&mut self, key: &str, value: impl ToString) {
        self.details
            .push((key.to_owned(), one_line(&value.to_string())));
    }

    pub fn check(&mut self, what: &str, ok: bool, detail: impl ToString) {
        self.checks.push(Check {
            what: what.to_owned(),
            ok,
            detail: one_line(&detail.to_string()),
        });
    }

    /// The counts every run reports, from what it left behind: published, delivered, lost,
    /// duplicates, dead letters by reason, order violations. A scenario overrides what it
    /// describes differently.
    pub fn outcome(&mut self, published: usize, out: &Outcome) {
        let a = &out.analysis;
        self.published = published as u64;
        self.delivered = a.delivered as u64;
        self.lost = a.lost.len() as u64;
        self.duplicated = a.duplicates_text();
        self.dead_lettered = dead_summary(&out.dead);
        self.order = format!("{} violations", a.order_violations);
    }

    /// Nothing created twice, resent by uuid, or called a second time (keyless kinds).
    pub fn check_sent_once(&mut self, what: &str, a: &Analysis) {
        self.check(what, a.sent_once(), a.duplicates_text());
    }

    /// What a run with `kill -9`s promises of each of its `n` jobs, and the duplicates line that
    /// goes with it: none lost, every one accepted, none created twice (send-text/send-file, by
    /// uuid), at most one second call of a keyless job per kill (`BLINGER_WORKER_KEYLESS_CONCURRENCY`
    /// 1, the default).
    pub fn check_kills_kept_every_job(&mut self, n: usize, a: &Analysis) {
        self.duplicated = format!(
            "{} created twice; {} text/file resends (recognised by uuid); {} request-review/assign-agent second calls, max {} per kill",
            a.created_twice,
            a.uuid_resends,
            a.second_calls,
            a.max_second_calls_per_kill()
        );
        self.check(
            "no job lost",
            a.lost.is_empty(),
            format!("{} lost", a.lost.len()),
        );
        self.check(
            "every job accepted",
            a.delivered == n,
            format!("{} of {n}", a.delivered),
        );
        self.check(
            "no message created twice (send-text/send-file, by uuid)",
            a.created_twice == 0,
            a.created_twice,
        );
        self.check(
            "request-review/assign-agent second calls ≤ 1 per kill (BLINGER_WORKER_KEYLESS_CONCURRENCY 1, the default)",
            a.max_second_calls_per_kill() <= 1,
            format!("max {} per kill", a.max_second_calls_per_kill()),
        );
    }

    pub fn check_no_dead_letters(&mut self, dead: &[DeadLetter]) {
        self.check("nothing dead-lettered", dead.is_empty(), dead_summary(dead));
    }

    /// The work queue and every delay tier empty after the run.
    pub fn check_drained(&mut self, backlog: u32) {
        self.check("queues empty at the end", backlog == 0, backlog);
    }

    /// Every worker exit was a success (`None`: it did not exit in time).
    pub fn check_exits(&mut self, what: &str, exits: &[Option<std::process::ExitStatus>]) {
        let shown: Vec<String> = exits.iter().map(|e| format!("{e:?}")).collect();
        self.check(
            what,
            exits.iter().all(|e| e.is_some_and(|s| s.success())),
            shown.join(" "),
        );
    }

    pub fn failed(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.ok).collect()
    }

    pub fn set_elapsed(&mut self, d: Duration) {
        self.elapsed_secs = d.as_secs_f64();
    }

    /// Writes `<out>/<profile>/figures-<scenario>.json` so runs can be collected into a table.
    pub fn save(&self, ctx: &Ctx) {
        let dir = ctx.out_dir.join(ctx.profile.as_str());
        let _ = std::fs::create_dir_all(&dir);
        let name = self
            .scenario
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-");
        let _ = std::fs::write(
            dir.join(format!("figures-{name}.json")),
            serde_json::to_vec_pretty(self).unwrap(),
        );
    }

    /// Prints the figures, then fails the test if a check failed.
    pub fn assert_ok(&self) {
        eprintln!("{}", table(std::slice::from_ref(self)));
        eprintln!("{}", details(std::slice::from_ref(self)));
        let failed = self.failed();
        assert!(
            failed.is_empty(),
            "scenario {} failed: {}",
            self.scenario,
            failed
                .iter()
                .map(|c| format!("{}: {}", c.what, c.detail))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

/// Dead letters by `x-blinger-reason`, as "N reason, ...", or "0".
pub fn dead_summary(dead: &[DeadLetter]) -> String {
    if dead.is_empty() {
        return "0".into();
    }
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    for d in dead {
        let reason = match d.header("x-blinger-reason") {
            "" if d.headers.contains_key("x-death") => "broker delivery limit (x-death)",
            "" => "no reason header",
            r => r,
        };
        *by.entry(reason.to_owned()).or_default() += 1;
    }
    by.iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Without terminal colour codes and line breaks (log excerpts end up in tables and lists).
pub fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequence: ESC [ params final-byte
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(if c == '\n' || c == '\r' { ' ' } else { c });
    }
    out
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The summary table.
pub fn table(all: &[Figures]) -> String {
    let mut out = String::new();
    out.push_str(
        "| scenario | setup | published | delivered | lost | duplicated | dead-lettered | order | recovery | checks |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for f in all {
        let failed = f.failed().len();
        let checks = if failed == 0 {
            format!("{} / {} held", f.checks.len(), f.checks.len())
        } else {
            format!("**{failed} of {} FAILED**", f.checks.len())
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&f.scenario),
            cell(&f.setup),
            f.published,
            f.delivered,
            f.lost,
            cell(&f.duplicated),
            cell(&f.dead_lettered),
            cell(&f.order),
            cell(&f.recovery),
            checks
        );
    }
    out
}

/// Every scenario's further figures and checks.
pub fn details(all: &[Figures]) -> String {
    let mut out = String::new();
    for f in all {
        let _ = writeln!(
            out,
            "### {} ({:.0} s, seed {})\n",
            f.scenario, f.elapsed_secs, f.seed
        );
        for (k, v) in &f.details {
            let _ = writeln!(out, "- {k}: {v}");
        }
        for c in &f.checks {
            let mark = if c.ok { "held" } else { "**FAILED**" };
            let _ = writeln!(out, "- check, {mark}: {} ({})", c.what, c.detail);
        }
        out.push('\n');
    }
    out
}

/// The machine, as `docs/reliability.md` states it.
pub fn machine() -> Vec<(String, String)> {
    let sh = |cmd: &str| -> String {
        std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    vec![
        ("cores (nproc)".into(), sh("nproc")),
        (
            "CPU".into(),
            sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'"),
        ),
        ("RAM".into(), sh("free -h | awk '/^Mem:/ {print $2}'")),
        (
            "RabbitMQ".into(),
            sh("rabbitmqctl -q version 2>/dev/null || echo unknown"),
        ),
        ("kernel".into(), sh("uname -sr")),
        ("rustc".into(), sh("rustc --version")),
    ]
}

/// Loads every saved figure of a profile, in scenario order.
pub fn load_all(dir: &Path) -> Vec<Figures> {
    let mut all: Vec<Figures> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("figures-"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    all.sort_by_key(|f| {
        f.scenario
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(99)
    });
    all
}
