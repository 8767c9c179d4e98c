//! Job plans and the analysis of what the sandbox received.
//!
//! Every planned job can be recognised in the sandbox's records:
//! - send-text and send-file by their `uuid` (the job id);
//! - assign-agent by its `agentId`, which the plan sets to `agent-<job id>`;
//! - request-review has no body: by the Blinger message id the sandbox answered, which the worker
//!   keeps in its store record (read after the worker exited). A request-review call that no
//!   record names is a second call (its answer was lost to a kill before it was recorded).
//!
//! Each recorded request is also attributed to the worker instance that made it: the instance
//! running when it arrived, from the moments the worker was killed or restarted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use blinger_sandbox::{Endpoint, Outcome, RecordedRequest};
use blinger_worker::contract::job::Kind;
use blinger_worker::store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;

use super::harness::Msg;

#[derive(Debug, Clone)]
pub struct PlannedJob {
    pub id: Uuid,
    pub kind: Kind,
    pub conversation: String,
    /// Position within its conversation, from 0, in publishing order.
    pub seq: u32,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub jobs: Vec<PlannedJob>,
    pub index: HashMap<Uuid, usize>,
}

/// The JSON of a job; `seq` is embedded in the payload to make records readable.
pub fn job_json(kind: Kind, id: Uuid, conversation: &str, seq: u32) -> Value {
    let mut v = json!({
        "kind": kind.as_str(),
        "id": id.to_string(),
        "conversation_id": conversation,
    });
    match kind {
        Kind::SendText => v["text"] = json!(format!("message #{seq}")),
        Kind::SendFile => {
            v["file_url"] = json!(format!("https://files.example.com/{seq}/{id}.png"))
        }
        Kind::RequestReview => {}
        Kind::AssignAgent => v["agent_id"] = json!(format!("agent-{id}")),
    }
    v
}

impl Plan {
    /// `n` jobs over `conversations` conversations named `{prefix}{i}`: kinds 40 % send-text,
    /// 20 % each of the others, conversations chosen at random.
    pub fn mixed(n: usize, conversations: usize, prefix: &str, seed: u64) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut plan = Plan::default();
        for _ in 0..n {
            let kind = match rng.random_range(0..10) {
                0..=3 => Kind::SendText,
                4 | 5 => Kind::SendFile,
                6 | 7 => Kind::RequestReview,
                _ => Kind::AssignAgent,
            };
            let conversation = format!("{prefix}{}", rng.random_range(0..conversations));
            plan.push(kind, &conversation);
        }
        plan
    }

    /// Adds one job at the end of its conversation.
    pub fn push(&mut self, kind: Kind, conversation: &str) -> Uuid {
        let seq = self
            .jobs
            .iter()
            .rev()
            .find(|j| j.conversation == conversation)
            .map_or(0, |j| j.seq + 1);
        let id = Uuid::new_v4();
        let body = job_json(kind, id, conversation, seq)
            .to_string()
            .into_bytes();
        self.index.insert(id, self.jobs.len());
        self.jobs.push(PlannedJob {
            id,
            kind,
            conversation: conversation.to_owned(),
            seq,
            body,
        });
        id
    }

    /// Adds one job at the end of its conversation that expires at `expires_at` (its JSON's
    /// `expires_at`, RFC 3339).
    pub fn push_expiring(
        &mut self,
        kind: Kind,
        conversation: &str,
        expires_at: time::OffsetDateTime,
    ) -> Uuid {
        let id = self.push(kind, conversation);
        let job = self.jobs.last_mut().expect("just pushed");
        let mut v: Value = serde_json::from_slice(&job.body).expect("planned JSON");
        v["expires_at"] = json!(
            expires_at
                .format(&time::format_description::well_known::Rfc3339)
                .expect("RFC 3339")
        );
        job.body = v.to_string().into_bytes();
        id
    }

    /// Adds a job planned elsewhere (its conversation and seq unchanged).
    pub fn push_job(&mut self, job: PlannedJob) {
        self.index.insert(job.id, self.jobs.len());
        self.jobs.push(job);
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn messages(&self) -> Vec<Msg> {
        self.jobs
            .iter()
            .map(|j| Msg {
                routing_key: j.kind.as_str().to_owned(),
                body: j.body.clone(),
                properties: None,
            })
            .collect()
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.jobs.iter().filter(|j| j.kind == kind).count()
    }

    /// "N text, N file, N review, N assign", for a scenario's details.
    pub fn kinds_text(&self) -> String {
        format!(
            "{} text, {} file, {} review, {} assign",
            self.count(Kind::SendText),
            self.count(Kind::SendFile),
            self.count(Kind::RequestReview),
            self.count(Kind::AssignAgent)
        )
    }
}

/// What happened to a plan's jobs, from the sandbox's records, the store and the DLQ.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub published: usize,
    /// Jobs accepted (HTTP 200) at least once.
    pub delivered: usize,
    /// Jobs found in the dead-letter queue.
    pub dead_lettered: usize,
    /// Jobs neither accepted nor dead-lettered.
    pub lost: Vec<Uuid>,
    /// Jobs accepted and dead-lettered both.
    pub delivered_and_dead: usize,
    /// send-text/send-file requests whose uuid had already been accepted: resends that Blinger
    /// (here the sandbox) recognised by uuid. No second message was created for them.
    pub uuid_resends: u64,
    /// uuids for which more than one message was created (must stay 0).
    pub created_twice: u64,
    /// request-review/assign-agent calls accepted beyond the first of their job: real second
    /// calls (these kinds have no idempotency key at Blinger).
    pub second_calls: u64,
    /// `second_calls` plus `uuid_resends`, by the worker instance that made the first, lost call
    /// (instance i ended with kill/restart i).
    pub repeats_by_instance: Vec<u64>,
    pub second_calls_by_instance: Vec<u64>,
    /// Accepted jobs without a delivered record in the store (acked without its record, or not
    /// yet acked).
    pub unrecorded: Vec<Uuid>,
    /// Jobs sent after a later job of their conversation (first acceptances).
    pub order_violations: u64,
    /// ... of which the overtaking job was sent by an earlier worker instance than the
    /// overtaken one's first acceptance (a kill or restart in between).
    pub order_violations_across_restart: u64,
    /// Accepted requests that match no planned job and no second call (should be 0).
    pub unattributed: u64,
    /// API requests in total, and by outcome.
    pub requests: u64,
    pub by_outcome: BTreeMap<String, u64>,
}

/// Which worker instance received (by arrival time) a request: the number of boundaries before.
fn instance_of(rec: &RecordedRequest, boundaries: &[SystemTime]) -> usize {
    let Ok(t) =
        time::OffsetDateTime::parse(&rec.ts, &time::format_description::well_known::Rfc3339)
    else {
        return 0;
    };
    let at =
        SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(t.unix_timestamp_nanos() as u64);
    boundaries.iter().filter(|b| **b <= at).count()
}

impl Analysis {
    /// `boundaries`: the moments worker instances ended (kills, restarts), in order.
    pub fn of(
        plan: &Plan,
        records: &[RecordedRequest],
        store: Option<&Store>,
        dead: &HashSet<Uuid>,
        boundaries: &[SystemTime],
    ) -> Analysis {
        let instances = boundaries.len() + 1;
        let mut a = Analysis {
            published: plan.len(),
            repeats_by_instance: vec![0; instances],
            second_calls_by_instance: vec![0; instances],
            requests: records.len() as u64,
            ..Analysis::default()
        };
        for r in records {
            *a.by_outcome
                .entry(r.outcome.as_str().to_owned())
                .or_default() += 1;
        }
        // request-review: Blinger message id -> job, from the store records.
        let mut review_ids: HashMap<String, usize> = HashMap::new();
        let mut recorded: HashSet<Uuid> = HashSet::new();
        if let Some(store) = store {
            for (i, j) in plan.jobs.iter().enumerate() {
                if let Ok(Some(rec)) = store.get(&j.id) {
                    recorded.insert(j.id);
                    if j.kind == Kind::RequestReview
                        && let Some(mid) = rec.blinger_id
                    {
                        review_ids.insert(mid, i);
                    }
                }
            }
        }
        let mut accepted_calls = vec![0u64; plan.len()];
        let mut ok_outcomes: HashMap<Uuid, u64> = HashMap::new();
        // Per conversation: highest seq accepted so far and the instance that sent it.
        let mut high: HashMap<&str, (u32, usize)> = HashMap::new();
        let mut first_seen = vec![false; plan.len()];
        for r in records.iter().filter(|r| r.status == 200) {
            let instance = instance_of(r, boundaries);
            let job = match r.endpoint {
                Endpoint::SendTextMessage | Endpoint::SendFileMessage => r
                    .uuid
                    .as_deref()
                    .and_then(|u| Uuid::parse_str(u).ok())
                    .and_then(|u| plan.index.get(&u).copied()),
                Endpoint::AssignAgent => r
                    .agent_id
                    .as_deref()
                    .and_then(|a| a.strip_prefix("agent-"))
                    .and_then(|u| Uuid::parse_str(u).ok())
                    .and_then(|u| plan.index.get(&u).copied()),
                Endpoint::RequestReview => r
                    .message_id
                    .as_ref()
                    .and_then(|m| review_ids.get(m).copied()),
                Endpoint::Other => None,
            };
            if r.outcome == Outcome::Duplicate {
                a.uuid_resends += 1;
            }
            let Some(i) = job else {
                if r.endpoint == Endpoint::RequestReview && store.is_some() {
                    // A request-review answer no record names: the call of a job whose record
                    // was never written (killed in between); the job was called again later.
                    a.second_calls += 1;
                    a.second_calls_by_instance[instance] += 1;
                    a.repeats_by_instance[instance] += 1;
                } else {
                    a.unattributed += 1;
                }
                continue;
            };
            let j = &plan.jobs[i];
            accepted_calls[i] += 1;
            if r.outcome == Outcome::Ok && j.kind.carries_uuid() {
                *ok_outcomes.entry(j.id).or_default() += 1;
            }
            if first_seen[i] {
                continue;
            }
            first_seen[i] = true;
            let entry = high.entry(j.conversation.as_str()).or_insert((0, instance));
            if j.seq < entry.0 {
                a.order_violations += 1;
                if entry.1 != instance {
                    a.order_violations_across_restart += 1;
                }
            } else {
                *entry = (j.seq, instance);
            }
        }
        // Second calls of assign-agent (and resends of text/file) are charged to the instance of
        // the call that was lost: the one before (a job lost by two instances in a row is
        // charged once to each, not twice to the first).
        let mut last_instance: HashMap<usize, usize> = HashMap::new();
        for r in records.iter().filter(|r| r.status == 200) {
            let key = match r.endpoint {
                Endpoint::AssignAgent => r
                    .agent_id
                    .as_deref()
                    .and_then(|a| a.strip_prefix("agent-"))
                    .and_then(|u| Uuid::parse_str(u).ok()),
                Endpoint::SendTextMessage | Endpoint::SendFileMessage => {
                    r.uuid.as_deref().and_then(|u| Uuid::parse_str(u).ok())
                }
                _ => None,
            };
            let Some(i) = key.and_then(|u| plan.index.get(&u).copied()) else {
                continue;
            };
            let instance = instance_of(r, boundaries);
            if let Some(lost) = last_instance.insert(i, instance) {
                a.repeats_by_instance[lost] += 1;
                if r.endpoint == Endpoint::AssignAgent {
                    a.second_calls += 1;
                    a.second_calls_by_instance[lost] += 1;
                }
            }
        }
        a.created_twice = ok_outcomes.values().filter(|&&n| n > 1).count() as u64;
        for (i, j) in plan.jobs.iter().enumerate() {
            let delivered = accepted_calls[i] > 0;
            let is_dead = dead.contains(&j.id);
            if delivered {
                a.delivered += 1;
                if store.is_some() && !recorded.contains(&j.id) {
                    a.unrecorded.push(j.id);
                }
            }
            if is_dead {
                a.dead_lettered += 1;
            }
            if delivered && is_dead {
                a.delivered_and_dead += 1;
            }
            if !delivered && !is_dead {
                // A request-review whose record is missing cannot be matched to its call: it
                // is lost unless the store says otherwise.
                a.lost.push(j.id);
            }
        }
        a
    }

    /// Largest number of repeated calls charged to one instance that ended in a kill.
    pub fn max_repeats_per_kill(&self) -> u64 {
        let n = self.repeats_by_instance.len().saturating_sub(1);
        self.repeats_by_instance[..n]
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }

    pub fn max_second_calls_per_kill(&self) -> u64 {
        let n = self.second_calls_by_instance.len().saturating_sub(1);
        self.second_calls_by_instance[..n]
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// Nothing created twice, resent by uuid, or called a second time.
    pub fn sent_once(&self) -> bool {
        self.created_twice == 0 && self.uuid_resends == 0 && self.second_calls == 0
    }

    /// One-line summary of duplicates.
    pub fn duplicates_text(&self) -> String {
        format!(
            "{} created twice; {} text/file resends recognised by uuid; {} second calls \
             (request-review/assign-agent)",
            self.created_twice, self.uuid_resends, self.second_calls
        )
    }
}
