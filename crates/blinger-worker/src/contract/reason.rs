//! Why a job was dead-lettered: a contract value. It is the `x-blinger-reason` header of a dead
//! letter, the `reason` field of a receipt and the `reason` label of
//! `blinger_worker_jobs_dead_lettered_total`; dashboards, alerts and publishers match on the
//! strings, so a reason is added, never renamed.

/// Why a job was dead-lettered: the `x-blinger-reason` header and the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    Invalid,
    Rejected,
    RetriesExhausted,
    Expired,
    /// The job's id was already delivered as a different job (another kind, conversation or
    /// payload): the publisher reused an id.
    Conflict,
}

impl DeadReason {
    pub const ALL: [DeadReason; 5] = [
        DeadReason::Invalid,
        DeadReason::Rejected,
        DeadReason::RetriesExhausted,
        DeadReason::Expired,
        DeadReason::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Invalid => "invalid",
            DeadReason::Rejected => "rejected",
            DeadReason::RetriesExhausted => "retries-exhausted",
            DeadReason::Expired => "expired",
            DeadReason::Conflict => "conflict",
        }
    }
}
