//! Scenario 6, Path injection: conversation ids that try to change the path, query, fragment or host.
//! Every request the sandbox receives must be exactly
//! `/api/external/v1/conversation/<one segment>/<endpoint>` with the segment decoding to the id,
//! no query, no 404; a canary server named by some ids must never be contacted; ids over 256
//! bytes (and `.`/`..`, control characters) are dead-lettered as `invalid` instead.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blinger_sandbox::Endpoint;
use blinger_worker::contract::job::Kind;

use super::{Expect, Progress, conclude, dead_summary, finish};
use crate::reliability::Ctx;
use crate::reliability::harness::World;
use crate::reliability::jobs::Plan;
use crate::reliability::report::Figures;

/// Hostile conversation ids that are valid (so must be delivered to the right endpoint).
pub fn hostile_ids(canary: u16) -> Vec<String> {
    let mut ids: Vec<String> = [
        "../x",
        "../../../../etc/passwd",
        "a/b",
        "a/../../b",
        "%2e%2e",
        "%2E%2E%2Fadmin",
        "..%2f..%2fx",
        "%2f",
        "%",
        "%zz",
        "?q=1",
        "x?admin=true&y=2",
        "#f",
        "a#/../../b",
        "...",
        ".x",
        "x.",
        " ",
        "  leading and trailing  ",
        "+plus+",
        "semi;colon",
        "back\\slash",
        "\\..\\..\\x",
        "tab\u{a0}nbsp",
        "ünïcødé",
        "日本語の会話",
        "emoji 💥🔥",
        "\u{202e}rtl-override",
        "\u{feff}bom",
        "quote\"s'and<tags>",
        "{braces}[brackets]|pipe^caret`tick`",
        "~tilde_under-score.dot",
        "@user:pass",
        "e1d247c8-5cd8-4f93-b9d7-15fd3259ac22",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ids.push(format!("@127.0.0.1:{canary}"));
    ids.push(format!("//127.0.0.1:{canary}/x"));
    ids.push(format!("http://127.0.0.1:{canary}/"));
    ids.push(format!("..//127.0.0.1:{canary}"));
    // Long but within the limit: exactly 256 bytes, ASCII and multi-byte.
    ids.push("L".repeat(256));
    ids.push("é".repeat(128));
    ids.push(format!("{}/..", "a".repeat(253)));
    ids
}

/// Ids the contract refuses (dead-letter `invalid`).
pub fn refused_ids() -> Vec<String> {
    vec![
        "L".repeat(257),
        format!("{}é", "a".repeat(255)),
        ".".into(),
        "..".into(),
        "new\nline".into(),
        "nul\u{0}byte".into(),
        "esc\u{1b}[31m".into(),
        String::new(),
    ]
}

pub async fn run(ctx: &Ctx) -> Figures {
    let started = Instant::now();
    let mut f = Figures::new("6 path injection", ctx);
    // A canary listener: any connection to it is a request that escaped the configured host.
    let canary = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let canary_port = canary.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let canary_task = {
        let hits = hits.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = canary.accept().await {
                hits.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let ids = hostile_ids(canary_port);
    let refused = refused_ids();
    let mut plan = Plan::default();
    for id in &ids {
        for kind in Kind::ALL {
            plan.push(kind, id);
        }
    }
    let mut refused_plan = Plan::default();
    for id in &refused {
        refused_plan.push(Kind::SendText, id);
        refused_plan.push(Kind::AssignAgent, id);
    }
    f.setup = format!(
        "{} hostile conversation ids × 4 kinds (.., /, %2e%2e, ?, #, \\, @host, //host, \
         non-ASCII, bidi, 256-byte), plus {} refused ids (> 256 bytes, ., .., control chars, \
         empty) × 2 kinds",
        ids.len(),
        refused.len()
    );
    let mut world = World::new(ctx, "paths", "1s,2s").await;
    world.declare().await;
    let mut msgs = plan.messages();
    msgs.extend(refused_plan.messages());
    world.publish(&msgs).await;
    let mut worker = world.start_worker(&[("BLINGER_WORKER_RATE_LIMIT", "1000")]);
    let expect = Expect::of(&plan, &HashSet::new());
    let mut progress = Progress::default();
    let done = progress
        .wait_all(&world.sandbox, &expect, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (exit, _) = worker.stop(Duration::from_secs(30)).await;
    let records = world.sandbox.requests();
    let out = conclude(&world, &plan, &[]).await;
    let a = &out.analysis;
    canary_task.abort();

    // Every request: exact shape, decoded segment is one of the ids and matches the job.
    let prefix = "/api/external/v1/conversation/";
    let mut bad_shape = Vec::new();
    let mut seen_ids = BTreeSet::new();
    for r in &records {
        let ok = (|| {
            let rest = r.path.strip_prefix(prefix)?;
            let (segment, endpoint) = rest.split_once('/')?;
            if segment.is_empty() || endpoint.contains('/') || r.query.is_some() {
                return None;
            }
            if Endpoint::from_action(endpoint) != Some(r.endpoint) || r.endpoint == Endpoint::Other
            {
                return None;
            }
            let decoded = percent_encoding::percent_decode_str(segment)
                .decode_utf8()
                .ok()?
                .into_owned();
            if Some(&decoded) != r.conversation_id.as_ref() || !ids.contains(&decoded) {
                return None;
            }
            // The job's own conversation: text/file by uuid, assign-agent by agent id.
            let job = r
                .uuid
                .as_deref()
                .or(r.agent_id.as_deref().and_then(|a| a.strip_prefix("agent-")))
                .and_then(|u| uuid::Uuid::parse_str(u).ok())
                .and_then(|u| plan.index.get(&u));
            if let Some(&i) = job
                && plan.jobs[i].conversation != decoded
            {
                return None;
            }
            Some(decoded)
        })();
        match ok {
            Some(id) => {
                seen_ids.insert(id);
            }
            None => bad_shape.push(format!("{} {:?}", r.path, r.query)),
        }
    }
    let stats = world.sandbox.stats();
    let refused_dead: usize = out
        .dead
        .iter()
        .filter(|d| {
            d.job_id()
                .is_some_and(|id| refused_plan.index.contains_key(&id))
                && d.header("x-blinger-reason") == "invalid"
        })
        .count();

    f.outcome(plan.len() + refused_plan.len(), &out);
    f.dead_lettered = format!(
        "{} ({} refused ids, reason invalid)",
        dead_summary(&out.dead),
        refused_dead
    );
    f.order = format!("{} violations", a.order_violations);
    f.recovery = "-".into();
    f.detail("requests recorded", records.len());
    f.detail("distinct ids seen at the endpoint", seen_ids.len());
    f.detail("404 answers", stats.not_found);
    f.detail("canary connections", hits.load(Ordering::SeqCst));
    f.detail(
        "example request path",
        records
            .iter()
            .find(|r| r.conversation_id.as_deref() == Some("../x"))
            .map_or("-".into(), |r| r.path.clone()),
    );

    f.check(
        "every request on the intended endpoint path",
        bad_shape.is_empty(),
        format!(
            "{} off-path: {:?}",
            bad_shape.len(),
            bad_shape.iter().take(5).collect::<Vec<_>>()
        ),
    );
    f.check("no 404", stats.not_found == 0, stats.not_found);
    f.check(
        "no other host contacted (canary)",
        hits.load(Ordering::SeqCst) == 0,
        hits.load(Ordering::SeqCst),
    );
    f.check(
        "every hostile-but-valid id delivered, all kinds",
        done.is_some() && a.delivered == plan.len() && seen_ids.len() == ids.len(),
        format!(
            "{} of {} jobs, {} of {} ids",
            a.delivered,
            plan.len(),
            seen_ids.len(),
            ids.len()
        ),
    );
    f.check(
        "refused ids dead-lettered as invalid, never sent",
        refused_dead == refused_plan.len() && out.dead.len() == refused_plan.len(),
        format!("{refused_dead} of {}", refused_plan.len()),
    );
    f.check_exits("exit 0", &[exit]);
    finish(world, f, started).await
}
