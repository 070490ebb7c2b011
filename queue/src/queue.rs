//! [`Queue`]: the handle both sides share (the operator uses it directly).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pawfect_api::{InpaintJobSpec, QueueDepth};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, RedisFuture, Value};
use serde::Deserialize;

use crate::config::QueueConfig;
use crate::error::{QueueError, Result};
use crate::keys::{Keys, validate_name};
use crate::reply::{self, ScriptReply};
use crate::scripts;
use crate::types::{
    BusyWorker, CancelOutcome, DeadLetter, Enqueued, JobRecord, JobRef, JobState, WorkerInfo,
    parse_opt_u32, parse_priority, parse_ts, to_json,
};

/// Handle to the queue: cheap to clone (one auto-reconnecting multiplexed connection inside).
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
}

struct Inner {
    config: QueueConfig,
    keys: Keys,
    client: redis::Client,
    conn: SharedConn,
}

/// The shared connection: a redis-rs `ConnectionManager`, replaced by a new one once it failed
/// to log in. The manager reconnects by itself only after I/O errors: a reconnect refused by
/// the server (a pool's user missing while Redis restarted without an ACL file, until the
/// operator sets it up again) would otherwise fail every later call with that same error, so a
/// worker could never report again.
struct SharedConn {
    manager_config: ConnectionManagerConfig,
    /// Generation (how many managers came before) and the current manager.
    current: Mutex<(u64, ConnectionManager)>,
}

impl SharedConn {
    fn get(&self, inner: &Arc<Inner>) -> Conn {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        Conn {
            inner: inner.clone(),
            generation: current.0,
            manager: current.1.clone(),
        }
    }

    /// Puts a new manager (it connects on its first call) in place of generation `failed`,
    /// unless another call did so already.
    fn replace(&self, client: &redis::Client, failed: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.0 != failed {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client.clone(), self.manager_config.clone()) {
            Ok(m) => *current = (failed + 1, m),
            Err(e) => tracing::warn!(error = %e, "cannot set up a new Redis connection"),
        }
    }
}

/// One use of the shared connection ([`Queue::conn`]): a call whose login was refused has the
/// manager replaced, so the next call logs in again.
#[derive(Clone)]
pub(crate) struct Conn {
    inner: Arc<Inner>,
    generation: u64,
    manager: ConnectionManager,
}

impl Conn {
    fn check<T>(&self, r: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &r
            && e.kind() == ErrorKind::AuthenticationFailed
        {
            self.inner.conn.replace(&self.inner.client, self.generation);
        }
        r
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.manager.send_packed_command(cmd).await;
            self.check(r)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = self.manager.send_packed_commands(cmd, offset, count).await;
            self.check(r)
        })
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: not printed.
        f.debug_struct("Queue")
            .field("prefix", &self.inner.config.prefix)
            .field("lease", &self.inner.config.lease)
            .finish_non_exhaustive()
    }
}

/// The redis-rs client of a config: with the CA file as the only trust anchor when one is
/// given (a `rediss://` URL is then required: a CA for a plain connection is a mistake).
fn client(config: &QueueConfig) -> Result<redis::Client> {
    if is_tls(&config.url) {
        // rustls needs a process-wide crypto provider: ring, as kube and object_store use. Err
        // only when one is installed already (e.g. by the worker at start-up): kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some(path) = &config.ca_file else {
        return Ok(redis::Client::open(config.url.as_str())?);
    };
    let ca_err = |reason: String| QueueError::CaFile {
        path: path.display().to_string(),
        reason,
    };
    if !is_tls(&config.url) {
        return Err(ca_err(format!(
            "given, but {} is not a rediss:// URL (TLS)",
            redacted_url(&config.url)
        )));
    }
    let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
    if !pem
        .windows(b"-----BEGIN CERTIFICATE-----".len())
        .any(|w| w == b"-----BEGIN CERTIFICATE-----")
    {
        return Err(ca_err("holds no PEM certificate".into()));
    }
    redis::Client::build_with_tls(
        config.url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(|e| ca_err(e.to_string()))
}

fn is_tls(url: &str) -> bool {
    url.starts_with("rediss://") || url.starts_with("valkeys://")
}

/// The URL with its password (if any) replaced by `***`, for messages.
pub(crate) fn redacted_url(url: &str) -> String {
    // `scheme://[user][:password@]host…`: the password sits between the first ':' after
    // "//" and the last '@' before the host.
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.find('/') {
        Some(slash) => match rest[..slash].rfind('@') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => return url.to_string(),
        },
        None => match rest.rfind('@') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => return url.to_string(),
        },
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://{auth}@{host}"),
    }
}

fn connect_error(config: &QueueConfig, source: redis::RedisError) -> QueueError {
    let hint = if !is_tls(&config.url) {
        String::new()
    } else if let Some(ca) = &config.ca_file {
        format!(" (TLS, trusting only the CA in {})", ca.display())
    } else {
        " (TLS, trusting the public web roots: a server certificate from a private CA needs \
         that CA as the Redis CA file)"
            .to_string()
    };
    QueueError::Connect {
        url: redacted_url(&config.url),
        hint,
        source,
    }
}

impl Queue {
    /// Connects to Redis (fails if it cannot be reached now; later outages are retried by
    /// the connection manager, and calls made during one fail with a transient error).
    /// `rediss://` URLs connect over TLS, trusting [`QueueConfig::ca_file`] when set.
    pub async fn connect(config: QueueConfig) -> Result<Queue> {
        config.validate()?;
        let keys = Keys::new(&config.prefix)?;
        let client = client(&config)?;
        // Reconnect attempts at least every heartbeat interval: after an outage a worker must
        // reach Redis again well within the lease the queue then leaves it (the default
        // backoff grows to seconds).
        let cm = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connect_timeout))
            .set_max_delay(config.heartbeat_interval());
        let manager = client
            .get_connection_manager_with_config(cm.clone())
            .await
            .map_err(|source| connect_error(&config, source))?;
        Ok(Queue {
            inner: Arc::new(Inner {
                config,
                keys,
                client,
                conn: SharedConn {
                    manager_config: cm,
                    current: Mutex::new((0, manager)),
                },
            }),
        })
    }

    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    pub(crate) fn conn(&self) -> Conn {
        self.inner.conn.get(&self.inner)
    }

    /// A dedicated connection for blocking reads whose response timeout exceeds `max_block`
    /// (the shared connection's timeout is far shorter than a blocking read).
    pub(crate) async fn blocking_connection(
        &self,
        max_block: Duration,
    ) -> Result<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.config.connect_timeout))
            .set_response_timeout(Some(max_block + self.inner.config.response_timeout));
        Ok(self
            .inner
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?)
    }

    pub(crate) async fn invoke(
        &self,
        op: &'static str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<ScriptReply> {
        let v: redis::Value = inv.invoke_async(&mut self.conn()).await?;
        ScriptReply::parse(op, v)
    }

    /// PING.
    pub async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Creates the pool's streams and consumer groups and lists the pool in `{p}:pools`, where
    /// the operator's events reader finds it (idempotent; enqueue lists the pool itself). The
    /// operator's call: a pool's own user may not write the list.
    pub async fn ensure_pool(&self, pool: &str) -> Result<()> {
        self.ensure_streams(pool).await?;
        let _: i64 = redis::cmd("SADD")
            .arg(self.keys().pools())
            .arg(pool)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Creates the pool's streams and consumer groups (a worker session's start: only keys of
    /// its own pool).
    pub(crate) async fn ensure_streams(&self, pool: &str) -> Result<()> {
        validate_name("pool", pool)?;
        let k = self.keys();
        let _: redis::Value = scripts::ENSURE_STREAMS
            .key(k.jobs_high(pool))
            .key(k.jobs(pool))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Puts a job into its pool's stream (`spec.pool`, `spec.priority`), unless the uid is
    /// already known: then nothing changes and the existing state is returned (a reconcile
    /// retry never queues twice). A finished job stays finished until its hash expires or is
    /// forgotten; don't enqueue jobs whose InpaintJob is already terminal.
    pub async fn enqueue(&self, job: &JobRef, spec: &InpaintJobSpec) -> Result<Enqueued> {
        validate_name("job uid", &job.uid)?;
        validate_name("pool", &spec.pool)?;
        if spec.max_attempts == 0 {
            return Err(QueueError::Config("maxAttempts must be at least 1".into()));
        }
        let spec_json = to_json("job spec", spec)?;
        let k = self.keys();
        let r = self
            .invoke(
                "enqueue",
                scripts::ENQUEUE
                    .key(k.job(&spec.pool, &job.uid))
                    .key(k.stream(&spec.pool, spec.priority))
                    .key(k.pools())
                    .arg(&job.uid)
                    .arg(&job.namespace)
                    .arg(&job.name)
                    .arg(&spec.pool)
                    .arg(spec.priority.as_str())
                    .arg(spec.max_attempts)
                    .arg(spec_json),
            )
            .await?;
        let created = match r.status() {
            "created" => true,
            "exists" => false,
            _ => return Err(r.unexpected()),
        };
        let entry = r.get(2)?;
        Ok(Enqueued {
            created,
            state: r.get(1)?.parse()?,
            entry_id: Some(entry.to_string()).filter(|e| !e.is_empty()),
        })
    }

    /// Cancels a job: a waiting one at once (entry removed, `cancelled` event), a running one
    /// by setting its cancel flag (its worker stops at the next check and confirms).
    pub async fn cancel(&self, pool: &str, uid: &str) -> Result<CancelOutcome> {
        validate_name("pool", pool)?;
        validate_name("job uid", uid)?;
        let k = self.keys();
        let cfg = self.config();
        let r = self
            .invoke(
                "cancel",
                scripts::CANCEL
                    .key(k.job(pool, uid))
                    .key(k.events(pool))
                    .key(k.jobs_high(pool))
                    .key(k.jobs(pool))
                    .arg(uid)
                    .arg(cfg.events_maxlen)
                    .arg(cfg.finished_ttl.as_millis() as u64)
                    .arg("cancelled before a worker claimed it"),
            )
            .await?;
        Ok(match r.status() {
            "cancelled" => CancelOutcome::Cancelled,
            "requested" => CancelOutcome::Requested,
            "finished" => CancelOutcome::AlreadyFinished(r.get(1)?.parse()?),
            "notfound" => CancelOutcome::NotFound,
            _ => return Err(r.unexpected()),
        })
    }

    /// Everything the queue knows about a job of a pool (None once forgotten or expired).
    pub async fn get_job(&self, pool: &str, uid: &str) -> Result<Option<JobRecord>> {
        validate_name("pool", pool)?;
        validate_name("job uid", uid)?;
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys().job(pool, uid))
            .query_async(&mut self.conn())
            .await?;
        if h.is_empty() {
            return Ok(None);
        }
        JobRecord::from_hash(uid, h).map(Some)
    }

    /// Waiting and running jobs of a pool, read atomically. Finished entries are deleted from
    /// the streams, so stream length = waiting + running and running = pending entries.
    pub async fn depth(&self, pool: &str) -> Result<QueueDepth> {
        validate_name("pool", pool)?;
        let k = self.keys();
        let v: redis::Value = scripts::DEPTH
            .key(k.jobs_high(pool))
            .key(k.jobs(pool))
            .invoke_async(&mut self.conn())
            .await?;
        let n: Vec<u64> = reply::strings("depth", v)?
            .iter()
            .map(|s| {
                s.parse::<u64>()
                    .map_err(|_| QueueError::protocol("depth", format!("not a count: {s:?}")))
            })
            .collect::<Result<_>>()?;
        let [len_h, pend_h, len_n, pend_n] = n[..] else {
            return Err(QueueError::protocol("depth", format!("reply {n:?}")));
        };
        let running = pend_h + pend_n;
        Ok(QueueDepth {
            waiting: (len_h + len_n).saturating_sub(running),
            running,
        })
    }

    /// The pool's worker registry: every worker that polled or heartbeated, when it was last
    /// seen and the job it runs. Entries of dead workers stay until [`prune_workers`](Self::prune_workers).
    pub async fn workers(&self, pool: &str) -> Result<Vec<WorkerInfo>> {
        validate_name("pool", pool)?;
        #[derive(Deserialize)]
        struct Reg {
            seen: i64,
            job: Option<String>,
        }
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.keys().workers(pool))
            .query_async(&mut self.conn())
            .await?;
        let mut out = Vec::with_capacity(h.len());
        for (name, json) in h {
            let reg: Reg = serde_json::from_str(&json).map_err(|source| QueueError::Json {
                what: "worker registry entry",
                source,
            })?;
            out.push(WorkerInfo {
                name,
                last_seen: parse_ts(&reg.seen.to_string())?,
                job: reg.job,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Which worker holds which job, from the consumer group's pending entries (alive or not).
    pub async fn busy_workers(&self, pool: &str) -> Result<Vec<BusyWorker>> {
        validate_name("pool", pool)?;
        let k = self.keys();
        let v: redis::Value = scripts::BUSY
            .key(k.jobs_high(pool))
            .key(k.jobs(pool))
            .invoke_async(&mut self.conn())
            .await?;
        let flat = reply::strings("busy workers", v)?;
        if flat.len() % 6 != 0 {
            return Err(QueueError::protocol(
                "busy workers",
                "reply is not in rows of 6",
            ));
        }
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| QueueError::protocol("busy workers", format!("not a number: {s:?}")))
        };
        flat.chunks_exact(6)
            .map(|r| {
                Ok(BusyWorker {
                    priority: if r[0] == "1" {
                        pawfect_api::Priority::High
                    } else {
                        pawfect_api::Priority::Normal
                    },
                    entry_id: r[1].clone(),
                    worker: r[2].clone(),
                    idle_ms: num(&r[3])?,
                    deliveries: num(&r[4])?,
                    uid: r[5].clone(),
                })
            })
            .collect()
    }

    /// Removes registry entries of workers not seen for `stale_after`, and consumers that
    /// hold nothing and were idle as long. Returns how many registry entries went.
    pub async fn prune_workers(&self, pool: &str, stale_after: Duration) -> Result<u64> {
        validate_name("pool", pool)?;
        let k = self.keys();
        let n: u64 = scripts::PRUNE
            .key(k.workers(pool))
            .key(k.jobs_high(pool))
            .key(k.jobs(pool))
            .arg(stale_after.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n)
    }

    /// Every pool that had a job or a worker.
    pub async fn pools(&self) -> Result<Vec<String>> {
        let mut p: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys().pools())
            .query_async(&mut self.conn())
            .await?;
        p.sort();
        Ok(p)
    }

    /// Drops everything the queue holds about a job (its hash, and its entry if it is not
    /// finished: a worker running it sees the claim as lost). Finished jobs also expire on their
    /// own after `finished_ttl`. Returns whether the job was known.
    pub async fn forget(&self, pool: &str, uid: &str) -> Result<bool> {
        validate_name("pool", pool)?;
        validate_name("job uid", uid)?;
        let k = self.keys();
        let r = self
            .invoke(
                "forget",
                scripts::FORGET
                    .key(k.job(pool, uid))
                    .key(k.jobs_high(pool))
                    .key(k.jobs(pool)),
            )
            .await?;
        match r.status() {
            "forgotten" => Ok(true),
            "notfound" => Ok(false),
            _ => Err(r.unexpected()),
        }
    }

    /// The newest `count` dead letters of a pool, newest first.
    pub async fn dead_letters(&self, pool: &str, count: usize) -> Result<Vec<DeadLetter>> {
        validate_name("pool", pool)?;
        let v: redis::Value = redis::cmd("XREVRANGE")
            .arg(self.keys().dead(pool))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        let mut out = Vec::new();
        for (id, fields) in reply::entries("dead letters", v)? {
            let Some(mut f) = fields else { continue };
            let mut take = |k: &str| f.remove(k).unwrap_or_default();
            let priority = parse_priority(&take("priority"))?;
            let attempt = parse_opt_u32("attempt", Some(take("attempt")))?.unwrap_or(0);
            let max_attempts =
                parse_opt_u32("max_attempts", Some(take("max_attempts")))?.unwrap_or(0);
            let worker = Some(take("worker")).filter(|w| !w.is_empty());
            let at = parse_ts(&take("ts"))?;
            out.push(DeadLetter {
                id,
                uid: take("uid"),
                namespace: take("namespace"),
                name: take("name"),
                priority,
                attempt,
                max_attempts,
                worker,
                reason: take("reason"),
                message: take("message"),
                last_reason: take("last_reason"),
                spec: take("spec"),
                at,
            });
        }
        Ok(out)
    }

    /// State of a job, if known (a cheaper [`get_job`](Self::get_job)).
    pub async fn job_state(&self, pool: &str, uid: &str) -> Result<Option<JobState>> {
        validate_name("pool", pool)?;
        validate_name("job uid", uid)?;
        let s: Option<String> = redis::cmd("HGET")
            .arg(self.keys().job(pool, uid))
            .arg(crate::keys::field::STATE)
            .query_async(&mut self.conn())
            .await?;
        s.map(|s| s.parse()).transpose()
    }
}

impl Queue {
    /// How many keys of the layout before pools had their own prefix are left (`{p}:jobs:*`,
    /// `{p}:job:*`, `{p}:events`, …: [`Keys::legacy_patterns`]), counting up to `limit`. The
    /// operator logs them at start: nothing reads them any more (it re-queues every unfinished
    /// InpaintJob from its resource under the new layout), so they may be deleted once the old
    /// workers are gone.
    pub async fn legacy_keys(&self, limit: usize) -> Result<usize> {
        let mut n = 0;
        for pattern in self.keys().legacy_patterns() {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut self.conn())
                    .await?;
                n += keys.len();
                if n >= limit {
                    return Ok(limit);
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::redacted_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redacted_url("rediss://pool-a:s3cr%40t@redis:6380/0"),
            "rediss://pool-a:***@redis:6380/0"
        );
        assert_eq!(
            redacted_url("redis://:pw@127.0.0.1:1/"),
            "redis://:***@127.0.0.1:1/"
        );
        assert_eq!(redacted_url("redis://redis:6379"), "redis://redis:6379");
        assert_eq!(redacted_url("redis://u@h"), "redis://u@h");
    }
}
