//! The Redis queue protocol of Pawfect Inpaint, used by the operator (enqueue, cancel, depth,
//! events, resync) and by the workers (claim, heartbeat, progress, complete, fail, hand back).
//!
//! Redis ≥ 7.0, a single instance (with replicas if wanted; not Redis Cluster: scripts follow
//! the job hash to its stream entry). Run it with `maxmemory-policy noeviction` and AOF.
//!
//! # Keys
//!
//! Every key is named in [`keys`] (prefix `{p}` configurable, default `pawfect`). Every key of a
//! pool lies under `{p}:p:{pool}:`, so a Redis ACL user per pool ([`acl`]) reaches one pool's
//! jobs only:
//!
//! - `{p}:p:{pool}:jobs` and `…:jobs:high`: one stream per pool and priority, consumer
//!   group `workers`, consumer name = worker (pod) name. An entry is
//!   `uid, namespace, name, attempt, spec` (spec = the `InpaintJobSpec` as JSON).
//! - `{p}:p:{pool}:job:{uid}`: the job hash: `state`, identity, `priority`, `attempt`/`max_attempts`,
//!   `worker`, the `stream` and `entry` id of its current entry, progress (`stage`, `step`,
//!   `total_steps`), result (`timings` JSON, `work` JSON (the per-stage work counts; absent
//!   from workers that do not count), `caption`, `prompt`, `prompt_source`, `output`),
//!   `reason`/`message`, the `cancel` flag and `enqueued_at`/`claimed_at`/`heartbeat_at`/
//!   `finished_at` (ms, Redis clock). It expires `finished_ttl` (24 h) after the job finished.
//! - `{p}:p:{pool}:events`: what happened to the pool's jobs (claimed, progress, succeeded,
//!   failed, retrying, cancelled), read by the operator through group `operator` over all
//!   pools ([`EventsReader`]); capped with MAXLEN ~.
//! - `{p}:p:{pool}:dead`: jobs that used up their attempts, with the reason ([`DeadLetter`]).
//! - `{p}:p:{pool}:workers`: worker registry, name → `{"seen": ms, "job": uid|null}`.
//! - `{p}:p:{pool}:server`: the Redis server's `run_id` and when a claim of the pool first saw
//!   it (`since`, ms).
//! - `{p}:pools`: set of pool names (the operator's only; the events reader reads it).
//!
//! # States
//!
//! ```text
//!            enqueue            claim (attempt+1)
//!   (none) ─────────► queued ───────────────────► running ──complete──► succeeded
//!                       ▲  ▲                      │  │  │
//!                       │  └── fail (retryable, ──┘  │  └─fail (permanent / no attempts left)─► failed
//!                       │      attempts left) or     │   reclaim with no attempts left ───────► failed (dead-letter)
//!                       │      hand back             └─cancelled (after a cancel request) ────► cancelled
//!                       └─ cancel while queued ───────────────────────────────────────────────► cancelled
//! ```
//!
//! Every change that touches more than one key is one Lua script, so it is atomic; all of
//! them are idempotent or fenced (a call from a worker that no longer holds the job changes
//! nothing). Delivery is at least once; completion is first-result-wins and idempotent.
//!
//! # Lifecycle of a job
//!
//! 1. **Enqueue** ([`Queue::enqueue`]): if the uid has a hash already, nothing happens and the
//!    existing state is returned (a reconcile retry never queues twice). Else XADD to the
//!    priority's stream and write the hash (`queued`, attempt 0).
//! 2. **Claim** ([`WorkerSession::claim`]): per stream, high before normal, a worker first
//!    takes entries idle longer than the lease (XAUTOCLAIM: their worker stopped heart-
//!    beating), then new entries (XREADGROUP `>`), inside one script; only when nothing is
//!    there it blocks (XREADGROUP BLOCK on both streams) on **its own connection**, whose
//!    response timeout exceeds the block (redis-rs 1.x defaults to 500 ms, which breaks
//!    blocking reads). The claim bookkeeping (same script, or one right after the blocking
//!    read) adds one to `attempt`, sets `running`, `worker`, `claimed_at`, marks the worker
//!    busy in the registry and sends `claimed`. An entry it should not run is acked and
//!    deleted instead: orphaned (no hash) or stale (the hash points at another entry), a job
//!    with a cancel request (→ `cancelled`), one whose attempts are used up (→ dead-letter),
//!    or a hash not in a claimable state (no state, or one this version does not know: →
//!    `failed`, `InvalidInput`). A claimed job the worker cannot read (unknown priority,
//!    `max_attempts` not a number, a spec that is no `InpaintJobSpec` or outside the CRD's
//!    limits, `pawfect_api::check_limits`) is failed at once as `InvalidInput` with the reason,
//!    and the claim goes on to the next entry. A blocking read may deliver one entry per stream; the second is handed back at once (a
//!    fresh entry at the end of its stream, attempt unchanged). A session's first claim also
//!    takes back entries still pending under its own name (a worker restarted in the same pod).
//! 3. **Heartbeat** ([`Claim::start_heartbeat`], every lease/4): XCLAIM of its own entry with
//!    JUSTID (resets the idle time without counting a delivery) and a registry refresh, only if
//!    the hash still says this worker holds this entry, so a heartbeating job is never taken
//!    over and a worker that lost its job cannot take it back. The answer also carries the
//!    cancel flag. The lease (XAUTOCLAIM min-idle) is [`QueueConfig::lease`], default 60 s.
//! 4. **Progress** ([`Claim::progress`]): stage/step into the hash, a `progress` event.
//! 5. **End**, one of:
//!    - [`Claim::complete`]: `succeeded` with the result, a `succeeded` event. Accepted from any
//!      worker that ran the job while it is unfinished; if it is already finished (a reclaim
//!      raced), the stale entry is acked and the call answers [`Outcome::AlreadyFinished`]
//!      without a second event.
//!    - [`Claim::fail`]: retryable with attempts left → a fresh entry (attempt kept, the next
//!      claim adds one), state `queued`, `retrying` event; retryable without attempts left →
//!      `failed` with reason `AttemptsExhausted`, the entry copied to the dead-letter stream
//!      with the last reason, `failed` event; permanent → `failed` with its reason.
//!    - [`Claim::cancelled`]: after a cancel request, `cancelled` and a `cancelled` event.
//!    - [`Claim::hand_back`] (SIGTERM): a fresh entry, state `queued`, `retrying` event with
//!      reason `HandedBack`; the attempt is given back (a scale-down never uses attempts up).
//! 6. **Reclaim**: an entry idle past the lease (worker dead, or stalled without heartbeat) is
//!    taken by the next claiming worker: attempt + 1 and `claimed` again, or, when that would
//!    exceed `max_attempts`, dead-lettered: reason `AttemptsExhausted`, last reason
//!    `WorkerLost`, state `failed`, a `failed` event. Idle times survive a restart of Redis,
//!    so after one (a new `run_id`) nothing is reclaimed until a lease has passed since a claim
//!    first saw the new server: a worker that was alive through the outage heartbeats or
//!    reports its result in that time (it retries reports until Redis answers), and a job that
//!    finished during the outage is neither run again nor charged an attempt.
//! 7. **Cancel** ([`Queue::cancel`]): a waiting job's entry is acked and deleted at once
//!    (`cancelled` + event); a running job gets its `cancel` flag, which the worker sees in its
//!    heartbeat, progress or [`Claim::is_cancelled`] between denoise steps.
//! 8. **Shutdown** of a worker: [`Claim::hand_back`] its job, then [`WorkerSession::leave`],
//!    which hands back whatever is still pending under its name (also an entry a dropped
//!    `claim()` future had already received) and removes it from the registry and the groups.
//! 9. **Cleanup**: finished hashes expire after `finished_ttl`; [`Queue::forget`] drops one at
//!    once; [`Queue::prune_workers`] drops dead workers from the registry and the groups.
//!
//! Every finished entry is XACK'ed **and** XDEL'ed in the same script.
//!
//! # Why depth does not use the group lag
//!
//! Since finished, cancelled and handed-back entries are deleted, a pool's streams hold
//! exactly the waiting and running jobs: `XLEN` = waiting + running, and the group's pending
//! count (XPENDING) = running (delivered, not yet finished; including jobs of a dead worker
//! until they are reclaimed). [`Queue::depth`] reads both in one script: `waiting = XLEN −
//! pending`. `XINFO GROUPS … lag` is not used: an XDEL inside the not-yet-delivered range
//! (cancelling a waiting job) makes Redis report the lag as NULL, which would blind the
//! autoscaler exactly when it matters.
//!
//! # Decisions beyond DESIGN.md
//!
//! - Attempts are counted in the job hash, not from the stream's delivery counter (which
//!   XCLAIM heartbeats and hand-backs would distort).
//! - A hand-back of a **claimed** job gives its attempt back (the next claim gets the same
//!   number): shutting a worker down, e.g. on scale-down, must never use up a job's attempts.
//!   An entry handed back before it was claimed (a blocking read that got two) keeps its
//!   attempt as it is.
//! - Only jobs that ran out of attempts go to the dead-letter stream; a non-retryable failure
//!   (e.g. `InvalidInput`) just fails with its reason.
//! - Completion is first-result-wins: a worker that lost its lease after it had stored its
//!   output may still complete the job; the worker that took over then sees its claim
//!   [`Standing::Lost`]. The output itself is fenced: a worker puts it in place only while
//!   [`Claim::holds`] says its attempt still holds the job, so an attempt that lost the job
//!   before storing never replaces another's output. Fail, cancelled, hand-back and progress from a worker that no
//!   longer holds the job change nothing ([`Outcome::Lost`]).
//! - A cancelled waiting job's entry is XACK'ed as well as XDEL'ed: a blocking read may have
//!   delivered it a moment before, and depth counts pending entries.
//! - A blocking read on both streams gets at most one entry per stream; Redis 7.0 serves a
//!   woken reader from the stream that woke it only, so an idle worker takes the first job to
//!   arrive, whatever its priority (priority orders jobs that wait together).
//!
//! # Modules
//!
//! The module graph goes one way (checked by `tests/module_graph.rs`): `error`, `scripts`,
//! `keys`, `reply`, `config` and `types` at the bottom; [`Queue`] (`queue.rs`) on them; the
//! worker API ([`WorkerSession`], [`Claim`]: `worker.rs`) on the queue; the events reader
//! (`events.rs`) on top. [`Queue::worker`] and [`Queue::events`] are defined next to what they
//! return, so the queue handle never imports upwards.
//!
//! # Use
//!
//! Operator: [`Queue::connect`], [`Queue::enqueue`], [`Queue::cancel`], [`Queue::depth`],
//! [`Queue::busy_workers`], [`Queue::get_job`] (resync), [`Queue::events`] →
//! [`EventsReader::next`] / [`EventsReader::ack`]. Worker: [`Queue::worker`] →
//! [`WorkerSession::claim`] → [`Claim`] (`start_heartbeat`, `progress`, `complete` | `fail` |
//! `cancelled` | `hand_back`) → [`WorkerSession::leave`] on shutdown.
//! Tests: feature `test-util` gives [`testing::RedisServer`].

pub mod acl;
pub mod config;
pub mod error;
pub mod events;
pub mod keys;
mod queue;
mod reply;
mod scripts;
pub mod types;
mod worker;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use config::QueueConfig;
pub use error::{QueueError, Result};
pub use events::{Event, EventKind, EventPayload, EventsReader};
pub use keys::Keys;
pub use queue::Queue;
pub use types::{
    BusyWorker, CancelOutcome, DeadLetter, Enqueued, ErrorInfo, Failure, JobRecord, JobRef,
    JobResult, JobState, Outcome, Progress, Standing, WorkerInfo,
};
pub use worker::{Claim, Heartbeat, WorkerSession};

/// Reasons the queue itself writes (besides those of `pawfect_api::conditions::reasons`).
pub mod reasons {
    /// A worker gave its job back while shutting down (`retrying` event).
    pub const HANDED_BACK: &str = "HandedBack";
    /// The last attempt's worker stopped heartbeating (dead letters' `last_reason`).
    pub const WORKER_LOST: &str = "WorkerLost";
    pub use pawfect_api::conditions::reasons::{ATTEMPTS_EXHAUSTED, CANCELLED};
}

#[cfg(test)]
mod tests {
    /// Handles are moved into tasks and blocking threads by the operator and the workers.
    #[test]
    fn handles_are_send_and_sync() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::Queue>();
        send_sync::<crate::Claim>();
        send_sync::<crate::Heartbeat>();
        send::<crate::WorkerSession>();
        send::<crate::EventsReader>();
        send_sync::<crate::QueueError>();
    }
}
