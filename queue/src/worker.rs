//! The worker side: [`WorkerSession`] claims jobs, [`Claim`] reports on one.

use std::fmt;
use std::time::Duration;

use pawfect_api::{InpaintJobSpec, Priority};
use redis::aio::MultiplexedConnection;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{QueueError, Result};
use crate::keys::{WORKERS_GROUP, field, validate_name};
use crate::queue::Queue;
use crate::reply::{self, ScriptReply};
use crate::scripts;
use crate::types::{
    Failure, JobRef, JobResult, JobState, Outcome, Progress, Standing, parse_priority, to_json,
};

/// One worker of one pool. Claims one job at a time; its name must be unique in the pool
/// (the pod name): entries pending under this name are taken back as soon as a session with
/// the same name starts claiming (a restarted worker resumes its lost job as a new attempt).
pub struct WorkerSession {
    queue: Queue,
    pool: String,
    name: String,
    high: String,
    normal: String,
    events: String,
    dead: String,
    registry: String,
    blocking: Option<MultiplexedConnection>,
    own_checked: bool,
}

impl fmt::Debug for WorkerSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerSession")
            .field("pool", &self.pool)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// An entry delivered by the blocking read.
struct Delivered {
    stream_index: u8,
    id: String,
    uid: Option<String>,
}

impl Queue {
    /// A worker session in `pool` under a unique worker name (the pod name).
    pub async fn worker(&self, pool: &str, worker: &str) -> Result<WorkerSession> {
        WorkerSession::new(self.clone(), pool, worker).await
    }
}

impl WorkerSession {
    pub(crate) async fn new(queue: Queue, pool: &str, name: &str) -> Result<Self> {
        validate_name("pool", pool)?;
        validate_name("worker name", name)?;
        let k = queue.keys();
        let s = WorkerSession {
            high: k.jobs_high(pool),
            normal: k.jobs(pool),
            events: k.events(pool),
            dead: k.dead(pool),
            registry: k.workers(pool),
            queue,
            pool: pool.to_string(),
            name: name.to_string(),
            blocking: None,
            own_checked: false,
        };
        s.queue.ensure_streams(pool).await?;
        Ok(s)
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Claims the next job: high priority before normal; entries whose worker stopped
    /// heartbeating for the lease are taken over (attempt + 1; dead-lettered once attempts
    /// are used up). Waits up to `wait` for a job; None if none came.
    ///
    /// Dropping the future (e.g. in a `select!` with a shutdown signal) is safe: an entry it had
    /// already received stays pending under this worker until [`leave`](Self::leave), a new
    /// session with the same name, or the lease hands it to someone else (the attempt is only
    /// counted when the claim is recorded).
    pub async fn claim(&mut self, wait: Duration) -> Result<Option<Claim>> {
        let deadline = Instant::now() + wait;
        loop {
            let claimed = match self.try_claim().await {
                Err(e) if e.is_nogroup() => {
                    self.queue.ensure_streams(&self.pool).await?;
                    self.try_claim().await?
                }
                r => r?,
            };
            if let Some(c) = claimed {
                return Ok(Some(c));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let block = (deadline - now).min(self.queue.config().effective_block());
            let delivered = match self.blocking_read(block).await {
                Err(e) if e.is_nogroup() => {
                    self.queue.ensure_streams(&self.pool).await?;
                    self.blocking_read(block).await?
                }
                r => r?,
            };
            let mut got: Option<Claim> = None;
            for d in delivered {
                if got.is_none() {
                    got = self.claim_delivered(&d).await?;
                } else {
                    self.release(&d).await?;
                }
            }
            if got.is_some() {
                return Ok(got);
            }
        }
    }

    fn claim_ctx_keys<'a>(
        &self,
        inv: &'a mut redis::ScriptInvocation<'static>,
    ) -> &'a mut redis::ScriptInvocation<'static> {
        inv.key(&self.high)
            .key(&self.normal)
            .key(&self.events)
            .key(&self.dead)
            .key(&self.registry)
            .key(self.queue.keys().server(&self.pool));
        let cfg = self.queue.config();
        inv.arg(self.queue.keys().job_prefix(&self.pool))
            .arg(&self.name)
            .arg(cfg.events_maxlen)
            .arg(cfg.dead_maxlen)
            .arg(cfg.finished_ttl.as_millis() as u64)
    }

    async fn try_claim(&mut self) -> Result<Option<Claim>> {
        loop {
            let mut inv = scripts::CLAIM.prepare_invoke();
            self.claim_ctx_keys(&mut inv)
                .arg(self.queue.config().lease.as_millis() as u64)
                .arg(if self.own_checked { "0" } else { "1" });
            let r = self.queue.invoke("claim", &inv).await?;
            self.own_checked = true;
            match self.to_claim(r).await? {
                ClaimStep::Got(c) => return Ok(Some(*c)),
                ClaimStep::None => return Ok(None),
                ClaimStep::Skipped => continue,
            }
        }
    }

    async fn blocking_read(&mut self, block: Duration) -> Result<Vec<Delivered>> {
        if self.blocking.is_none() {
            let max = self.queue.config().effective_block();
            self.blocking = Some(self.queue.blocking_connection(max).await?);
        }
        let Some(conn) = self.blocking.as_mut() else {
            return Err(QueueError::protocol("claim", "no blocking connection"));
        };
        let r: redis::RedisResult<redis::Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(WORKERS_GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.high)
            .arg(&self.normal)
            .arg(">")
            .arg(">")
            .query_async(conn)
            .await;
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                // A broken or timed-out connection is replaced on the next read.
                if !matches!(e.code(), Some("NOGROUP")) {
                    self.blocking = None;
                }
                return Err(e.into());
            }
        };
        let mut out = Vec::new();
        for (key, entries) in reply::read_reply("XREADGROUP jobs", v)? {
            let stream_index = if key == self.high {
                1
            } else if key == self.normal {
                2
            } else {
                return Err(QueueError::protocol(
                    "XREADGROUP jobs",
                    format!("unknown stream {key}"),
                ));
            };
            for (id, fields) in entries {
                let uid = fields.and_then(|mut f| f.remove(crate::keys::entry_field::UID));
                out.push(Delivered {
                    stream_index,
                    id,
                    uid,
                });
            }
        }
        out.sort_by_key(|d| d.stream_index);
        Ok(out)
    }

    async fn claim_delivered(&mut self, d: &Delivered) -> Result<Option<Claim>> {
        let mut inv = scripts::CLAIM_DELIVERED.prepare_invoke();
        self.claim_ctx_keys(&mut inv)
            .arg(d.stream_index)
            .arg(&d.id)
            .arg(d.uid.as_deref().unwrap_or(""));
        let r = self.queue.invoke("claim delivered", &inv).await?;
        match self.to_claim(r).await? {
            ClaimStep::Got(c) => Ok(Some(*c)),
            ClaimStep::None | ClaimStep::Skipped => Ok(None),
        }
    }

    async fn release(&mut self, d: &Delivered) -> Result<()> {
        let stream = if d.stream_index == 1 {
            &self.high
        } else {
            &self.normal
        };
        let r = self
            .queue
            .invoke(
                "release",
                scripts::RELEASE
                    .key(stream)
                    .key(
                        self.queue
                            .keys()
                            .job(&self.pool, d.uid.as_deref().unwrap_or("")),
                    )
                    .arg("")
                    .arg(&self.name)
                    .arg(&d.id)
                    .arg(d.uid.as_deref().unwrap_or("")),
            )
            .await?;
        match r.status() {
            "released" | "dropped" | "skipped" | "none" => Ok(()),
            _ => Err(r.unexpected()),
        }
    }

    async fn to_claim(&self, r: ScriptReply) -> Result<ClaimStep> {
        match r.status() {
            "none" => return Ok(ClaimStep::None),
            "claimed" => {}
            _ => return Err(r.unexpected()),
        }
        // Uid, stream and entry are what the fail script needs; the script always sends them.
        let (Ok(uid), Ok(stream), Ok(entry_id)) = (r.get(1), r.get(2), r.get(3)) else {
            return Err(r.unexpected());
        };
        let attempt = r.get(4).ok().and_then(|a| a.parse::<u32>().ok());
        let holder = Holder {
            queue: self.queue.clone(),
            job: JobRef::new(uid, r.get(6).unwrap_or(""), r.get(7).unwrap_or("")),
            pool: self.pool.clone(),
            attempt: attempt.unwrap_or(0),
            worker: self.name.clone(),
            stream: stream.to_string(),
            entry_id: entry_id.to_string(),
        };
        match read_claim(&r, attempt) {
            Ok(c) => Ok(ClaimStep::Got(Box::new(Claim {
                h: holder,
                priority: c.priority,
                max_attempts: c.max_attempts,
                spec: c.spec,
                reclaimed_from: Some(c.prev).filter(|p| !p.is_empty()),
            }))),
            Err(why) => {
                // A job this worker cannot read or must not run will not get better with
                // retries: it fails now, instead of being reclaimed once per lease.
                tracing::warn!(uid = %holder.job.uid, reason = %why, "job cannot be run");
                holder
                    .fail(&Failure::permanent(
                        pawfect_api::conditions::reasons::INVALID_INPUT,
                        why,
                    ))
                    .await?;
                Ok(ClaimStep::Skipped)
            }
        }
    }

    /// Leaves the pool (shutdown): every entry still pending under this worker's name is
    /// handed back, like [`Claim::hand_back`] (a job being run elsewhere in this process and
    /// completed later is still accepted: first result wins), then the worker is removed from
    /// the registry and the consumer groups. Returns how many claimed jobs went back.
    pub async fn leave(self) -> Result<u64> {
        let cfg = self.queue.config();
        let n: u64 = scripts::LEAVE
            .key(&self.registry)
            .key(&self.high)
            .key(&self.normal)
            .key(&self.events)
            .arg(&self.name)
            .arg(self.queue.keys().job_prefix(&self.pool))
            .arg(cfg.events_maxlen)
            .arg(cfg.finished_ttl.as_millis() as u64)
            .arg("worker left the pool")
            .invoke_async(&mut self.queue.conn())
            .await?;
        Ok(n)
    }
}

/// The job-derived part of a claim reply, once checked.
struct ClaimParts {
    priority: Priority,
    max_attempts: u32,
    spec: InpaintJobSpec,
    prev: String,
}

/// Reads and checks what the claim reply says about the job (written by the operator, by
/// other versions or by hand): every field this worker needs must be readable, every enum value
/// known and the spec within the CRD's limits. Err: why not, for an `InvalidInput` failure.
fn read_claim(r: &ScriptReply, attempt: Option<u32>) -> Result<ClaimParts, String> {
    let item = |i: usize, what: &str| {
        r.get(i)
            .map_err(|_| format!("the claim reply has no {what} (element {i})"))
    };
    if attempt.is_none() {
        return Err(format!(
            "the job's attempt {:?} is not a number",
            item(4, "attempt")?
        ));
    }
    let max = item(5, "max_attempts")?;
    let max_attempts: u32 = max
        .parse()
        .map_err(|_| format!("the job's max_attempts {max:?} is not a number"))?;
    let prio = item(8, "priority")?;
    let priority = parse_priority(prio).map_err(|_| {
        format!("the job's priority {prio:?} is not one this worker knows (high, normal)")
    })?;
    let spec: InpaintJobSpec = serde_json::from_str(item(9, "spec")?)
        .map_err(|e| format!("the queued spec is not a valid InpaintJobSpec: {e}"))?;
    pawfect_api::check_limits(&spec)
        .map_err(|e| format!("the queued spec is outside the InpaintJob limits: {e}"))?;
    let prev = item(10, "previous worker")?.to_string();
    Ok(ClaimParts {
        priority,
        max_attempts,
        spec,
        prev,
    })
}

enum ClaimStep {
    Got(Box<Claim>),
    None,
    Skipped,
}

/// What identifies a claim to the scripts.
#[derive(Clone)]
struct Holder {
    queue: Queue,
    job: JobRef,
    pool: String,
    attempt: u32,
    worker: String,
    stream: String,
    entry_id: String,
}

impl Holder {
    fn terminal(&self, script: &'static redis::Script) -> redis::ScriptInvocation<'static> {
        let k = self.queue.keys();
        let cfg = self.queue.config();
        let mut inv = script.prepare_invoke();
        inv.key(k.job(&self.pool, &self.job.uid))
            .key(&self.stream)
            .key(k.events(&self.pool))
            .key(k.dead(&self.pool))
            .key(k.workers(&self.pool))
            .arg(&self.job.uid)
            .arg(&self.worker)
            .arg(&self.entry_id)
            .arg(cfg.events_maxlen)
            .arg(cfg.dead_maxlen)
            .arg(cfg.finished_ttl.as_millis() as u64)
            .arg(self.attempt);
        inv
    }

    async fn fail(&self, failure: &Failure) -> Result<Outcome> {
        let mut inv = self.terminal(&scripts::FAIL);
        inv.arg(&failure.reason)
            .arg(&failure.message)
            .arg(if failure.retryable { "1" } else { "0" });
        let r = self.queue.invoke("fail", &inv).await?;
        outcome(&r)
    }
}

fn outcome(r: &ScriptReply) -> Result<Outcome> {
    Ok(match r.status() {
        "done" => Outcome::Finished(JobState::Succeeded),
        "set" => Outcome::Finished(r.get(1)?.parse()?),
        "requeued" => Outcome::Requeued {
            attempt: r.get(1)?.parse().map_err(|_| r.unexpected())?,
        },
        "dead" => Outcome::DeadLettered,
        "finished" => Outcome::AlreadyFinished(r.get(1)?.parse()?),
        "lost" => Outcome::Lost,
        "notfound" => Outcome::NotFound,
        _ => return Err(r.unexpected()),
    })
}

fn standing_from(r: &ScriptReply) -> Result<Standing> {
    match r.status() {
        "ok" => Ok(Standing::Active),
        "cancel" => Ok(Standing::CancelRequested),
        "lost" => Ok(Standing::Lost),
        _ => Err(r.unexpected()),
    }
}

/// A job this worker holds. Keep it alive with [`start_heartbeat`](Self::start_heartbeat)
/// (or call [`heartbeat`](Self::heartbeat) well within the lease), report
/// [`progress`](Self::progress), and end it with one of [`complete`](Self::complete),
/// [`fail`](Self::fail), [`cancelled`](Self::cancelled) or [`hand_back`](Self::hand_back).
/// Each is idempotent and may be retried after a transient error.
#[derive(Clone)]
pub struct Claim {
    h: Holder,
    priority: Priority,
    max_attempts: u32,
    spec: InpaintJobSpec,
    reclaimed_from: Option<String>,
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("job", &self.h.job)
            .field("pool", &self.h.pool)
            .field("attempt", &self.h.attempt)
            .field("max_attempts", &self.max_attempts)
            .field("worker", &self.h.worker)
            .field("entry_id", &self.h.entry_id)
            .finish_non_exhaustive()
    }
}

impl Claim {
    pub fn uid(&self) -> &str {
        &self.h.job.uid
    }

    /// Uid, namespace and name of the InpaintJob.
    pub fn job(&self) -> &JobRef {
        &self.h.job
    }

    /// The job's spec.
    pub fn spec(&self) -> &InpaintJobSpec {
        &self.spec
    }

    pub fn pool(&self) -> &str {
        &self.h.pool
    }

    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// This attempt (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.h.attempt
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The worker that held the job before, when this claim took it over after a missed
    /// lease (or resumed it after a restart under the same name).
    pub fn reclaimed_from(&self) -> Option<&str> {
        self.reclaimed_from.as_deref()
    }

    pub fn worker(&self) -> &str {
        &self.h.worker
    }

    /// Id of the stream entry this claim holds.
    pub fn entry_id(&self) -> &str {
        &self.h.entry_id
    }

    /// Key of the stream the entry is in.
    pub fn stream(&self) -> &str {
        &self.h.stream
    }

    /// Renews the lease (XCLAIM of the own entry with JUSTID: no delivery counted) and the
    /// registry entry. Also tells whether a cancel was requested or the claim was lost.
    pub async fn heartbeat(&self) -> Result<Standing> {
        let h = &self.h;
        let k = h.queue.keys();
        let r = h
            .queue
            .invoke(
                "heartbeat",
                scripts::HEARTBEAT
                    .key(k.job(&h.pool, &h.job.uid))
                    .key(&h.stream)
                    .key(k.workers(&h.pool))
                    .arg(&h.job.uid)
                    .arg(&h.worker)
                    .arg(&h.entry_id),
            )
            .await?;
        standing_from(&r)
    }

    /// Records progress in the job hash and sends a `progress` event.
    pub async fn progress(&self, progress: &Progress) -> Result<Standing> {
        let h = &self.h;
        let k = h.queue.keys();
        let payload = to_json("progress", progress)?;
        let opt = |n: Option<u32>| n.map(|n| n.to_string()).unwrap_or_default();
        let r = h
            .queue
            .invoke(
                "progress",
                scripts::PROGRESS
                    .key(k.job(&h.pool, &h.job.uid))
                    .key(k.events(&h.pool))
                    .arg(&h.job.uid)
                    .arg(&h.worker)
                    .arg(&h.entry_id)
                    .arg(&progress.stage)
                    .arg(opt(progress.step))
                    .arg(opt(progress.total_steps))
                    .arg(payload)
                    .arg(h.queue.config().events_maxlen),
            )
            .await?;
        standing_from(&r)
    }

    /// Reads whether this claim is still valid, without renewing anything.
    pub async fn standing(&self) -> Result<Standing> {
        let hold = self.read_hold().await?;
        Ok(if !hold.owned {
            Standing::Lost
        } else if hold.cancel.as_deref() == Some("1") {
            Standing::CancelRequested
        } else {
            Standing::Active
        })
    }

    /// Whether this attempt still holds the job: it runs under this worker, entry and attempt
    /// number. The attempt is the fencing token of the job's output: a later claim of the same
    /// entry (a reclaim, or a restarted worker under the same name) has a higher one. Ask it
    /// right before putting the output in place; a cancel request does not end the hold.
    pub async fn holds(&self) -> Result<bool> {
        let hold = self.read_hold().await?;
        Ok(hold.owned && hold.attempt.and_then(|a| a.parse::<u32>().ok()) == Some(self.h.attempt))
    }

    /// One read of the job hash for [`standing`](Self::standing) and [`holds`](Self::holds).
    async fn read_hold(&self) -> Result<Hold> {
        let h = &self.h;
        type Fields = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let (state, worker, entry, cancel, attempt): Fields = redis::cmd("HMGET")
            .arg(h.queue.keys().job(&h.pool, &h.job.uid))
            .arg(field::STATE)
            .arg(field::WORKER)
            .arg(field::ENTRY)
            .arg(field::CANCEL)
            .arg(field::ATTEMPT)
            .query_async(&mut h.queue.conn())
            .await?;
        Ok(Hold {
            owned: state.as_deref() == Some(JobState::Running.as_str())
                && worker.as_deref() == Some(h.worker.as_str())
                && entry.as_deref() == Some(h.entry_id.as_str()),
            cancel,
            attempt,
        })
    }

    /// True when a cancel was requested (check between denoise steps, then call
    /// [`cancelled`](Self::cancelled)). [`standing`](Self::standing) also tells a lost claim.
    pub async fn is_cancelled(&self) -> Result<bool> {
        Ok(self.standing().await? == Standing::CancelRequested)
    }

    /// The result is stored: the job succeeded. Accepted even when another worker took the job
    /// over meanwhile (the first result wins); on a finished job only this entry is acked
    /// ([`Outcome::AlreadyFinished`], no second `succeeded` event).
    pub async fn complete(&self, result: &JobResult) -> Result<Outcome> {
        let timings = to_json("timings", &result.timings)?;
        let work = match &result.work {
            Some(w) => to_json("work", w)?,
            None => String::new(),
        };
        let payload = to_json("result", result)?;
        let mut inv = self.h.terminal(&scripts::COMPLETE);
        inv.arg(&result.output)
            .arg(result.caption.as_deref().unwrap_or(""))
            .arg(result.prompt.as_deref().unwrap_or(""))
            .arg(result.prompt_source.as_deref().unwrap_or(""))
            .arg(timings)
            .arg(payload)
            .arg(work);
        let r = self.h.queue.invoke("complete", &inv).await?;
        outcome(&r)
    }

    /// The attempt failed. Retryable with attempts left → queued again ([`Outcome::Requeued`],
    /// `retrying` event); retryable without → failed with `AttemptsExhausted` and dead-lettered
    /// ([`Outcome::DeadLettered`]); not retryable → failed with the given reason. A job with a
    /// pending cancel ends cancelled instead.
    pub async fn fail(&self, failure: &Failure) -> Result<Outcome> {
        self.h.fail(failure).await
    }

    /// The worker stopped because of a cancel: the job is cancelled (`cancelled` event).
    pub async fn cancelled(&self, message: &str) -> Result<Outcome> {
        let mut inv = self.h.terminal(&scripts::CANCELLED);
        inv.arg(message);
        let r = self.h.queue.invoke("cancelled", &inv).await?;
        outcome(&r)
    }

    /// Gives the job back unfinished (the worker is shutting down): a fresh entry at the end of
    /// the same stream, and this attempt does not count (the next claim gets the same attempt
    /// number). Sends a `retrying` event with this reason (use `HandedBack`).
    pub async fn hand_back(&self, reason: &str, message: &str) -> Result<Outcome> {
        let mut inv = self.h.terminal(&scripts::HAND_BACK);
        inv.arg(reason).arg(message);
        let r = self.h.queue.invoke("hand back", &inv).await?;
        outcome(&r)
    }

    /// Heartbeats in a background task every `heartbeat_interval` until the claim is lost or
    /// the returned handle is dropped. The handle tells the latest [`Standing`].
    pub fn start_heartbeat(&self) -> Heartbeat {
        let (tx, rx) = watch::channel(Standing::Active);
        let claim = self.clone();
        let every = self.h.queue.config().heartbeat_interval();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match claim.heartbeat().await {
                    Ok(s) => {
                        tx.send_if_modified(|cur| {
                            let changed = *cur != s;
                            *cur = s;
                            changed
                        });
                        if s == Standing::Lost {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(uid = %claim.uid(), error = %e, "heartbeat failed");
                    }
                }
            }
        });
        Heartbeat { rx, task }
    }
}

/// A background heartbeat of one claim; stops when dropped.
pub struct Heartbeat {
    rx: watch::Receiver<Standing>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heartbeat")
            .field("standing", &*self.rx.borrow())
            .finish()
    }
}

impl Heartbeat {
    /// The standing the last heartbeat saw (no Redis call: cheap enough for every step).
    pub fn standing(&self) -> Standing {
        *self.rx.borrow()
    }

    /// A receiver of the standing, e.g. to move into a blocking pipeline thread.
    pub fn subscribe(&self) -> watch::Receiver<Standing> {
        self.rx.clone()
    }

    /// Waits until the standing is no longer [`Standing::Active`].
    pub async fn stopped(&mut self) -> Standing {
        match self.rx.wait_for(|s| *s != Standing::Active).await {
            Ok(s) => *s,
            // The task ended without a change: only after a lost claim.
            Err(_) => Standing::Lost,
        }
    }

    /// Stops heartbeating.
    pub fn stop(self) {}
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Outcome {
    /// True when the job is now finished (by this call or before).
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            Outcome::Finished(_) | Outcome::DeadLettered | Outcome::AlreadyFinished(_)
        )
    }
}

/// What the job hash says of a claim: whether it still runs under this worker and entry, its
/// cancel flag and its attempt number.
struct Hold {
    owned: bool,
    cancel: Option<String>,
    attempt: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pawfect_api::QueueDepth;

    use crate::testing::RedisServer;
    use crate::{JobRef, Queue, QueueConfig, scripts};

    fn spec(priority: &str) -> String {
        serde_json::json!({
            "image": "file:///i.png", "mask": "file:///m.png", "output": "file:///o.png",
            "pool": "p", "priority": priority,
        })
        .to_string()
    }

    async fn enqueue_in_one_transaction(q: &Queue, url: &str, jobs: &[(&str, &str)]) {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        scripts::ENQUEUE.load_async(&mut conn).await.unwrap();
        let k = q.keys();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let invs: Vec<_> = jobs
            .iter()
            .map(|(uid, prio)| {
                let mut inv = scripts::ENQUEUE.prepare_invoke();
                inv.key(k.job("p", uid))
                    .key(if *prio == "high" {
                        k.jobs_high("p")
                    } else {
                        k.jobs("p")
                    })
                    .key(k.pools())
                    .arg(*uid)
                    .arg("ns")
                    .arg(*uid)
                    .arg("p")
                    .arg(*prio)
                    .arg(3)
                    .arg(spec(prio));
                inv
            })
            .collect();
        for inv in &invs {
            pipe.invoke_script(inv);
        }
        let _: redis::Value = pipe.query_async(&mut conn).await.unwrap();
    }

    /// Jobs landing in both streams at once while a worker blocks: whichever entries the
    /// blocking read returns (Redis 7.0 serves one stream per wake-up, later versions may
    /// serve both, and then the second is handed back), each job is claimed once, attempt 1.
    #[tokio::test]
    async fn both_streams_filled_while_blocked() {
        let redis = RedisServer::start().unwrap();
        let q = Queue::connect(QueueConfig::new(redis.url())).await.unwrap();
        let mut session = q.worker("p", "w").await.unwrap();
        let waiter = tokio::spawn(async move {
            let c = session.claim(Duration::from_secs(10)).await.unwrap();
            (session, c)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        enqueue_in_one_transaction(&q, &redis.url(), &[("n", "normal"), ("h", "high")]).await;

        let (mut session, first) = waiter.await.unwrap();
        let first = first.expect("a claim");
        assert_eq!(first.attempt(), 1);
        assert_eq!(
            q.depth("p").await.unwrap(),
            QueueDepth {
                waiting: 1,
                running: 1
            }
        );
        let second = session
            .claim(Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.attempt(), 1);
        let mut uids = [first.uid().to_string(), second.uid().to_string()];
        uids.sort();
        assert_eq!(uids, ["h".to_string(), "n".to_string()]);
        assert_eq!(
            q.depth("p").await.unwrap(),
            QueueDepth {
                waiting: 0,
                running: 2
            }
        );
    }

    /// An entry a blocking read delivered but the worker will not run goes back to the end of
    /// its stream, unclaimed, attempt unchanged.
    #[tokio::test]
    async fn release_hands_an_unclaimed_delivery_back() {
        let redis = RedisServer::start().unwrap();
        let q = Queue::connect(QueueConfig::new(redis.url())).await.unwrap();
        let mut session = q.worker("p", "w").await.unwrap();
        enqueue_in_one_transaction(&q, &redis.url(), &[("n", "normal")]).await;
        let before = q
            .get_job("p", "n")
            .await
            .unwrap()
            .unwrap()
            .entry_id
            .unwrap();

        // Deliver it to `w` without claim bookkeeping, as a blocking read does.
        let mut d = session
            .blocking_read(Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(d.len(), 1);
        let d = d.remove(0);
        assert_eq!(
            (d.stream_index, d.id.as_str(), d.uid.as_deref()),
            (2, before.as_str(), Some("n"))
        );
        assert_eq!(
            q.depth("p").await.unwrap(),
            QueueDepth {
                waiting: 0,
                running: 1
            }
        );
        session.release(&d).await.unwrap();
        assert_eq!(
            q.depth("p").await.unwrap(),
            QueueDepth {
                waiting: 1,
                running: 0
            }
        );
        let rec = q.get_job("p", "n").await.unwrap().unwrap();
        assert_ne!(rec.entry_id.as_deref(), Some(before.as_str()));
        assert_eq!(
            (rec.attempt, rec.worker, rec.state),
            (0, None, crate::JobState::Queued)
        );
        // Releasing twice changes nothing.
        session.release(&d).await.unwrap();
        assert_eq!(
            q.depth("p").await.unwrap(),
            QueueDepth {
                waiting: 1,
                running: 0
            }
        );

        let c = session
            .claim(Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((c.uid(), c.attempt()), ("n", 1));
        assert_eq!(c.job(), &JobRef::new("n", "ns", "n"));
    }
}
