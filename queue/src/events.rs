//! The events stream: what workers (and the queue itself) report about jobs, and the reader
//! the operator consumes it with.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

use crate::error::{QueueError, Result};
use crate::keys::OPERATOR_GROUP;
use crate::queue::Queue;
use crate::reply;
use crate::types::{ErrorInfo, JobResult, Progress, parse_opt_u32, parse_ts};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A worker claimed the job (attempt = the attempt it starts; > 1 after a retry or reclaim).
    Claimed,
    /// A worker reports where it is (payload [`Progress`]).
    Progress,
    /// The result is stored (payload [`JobResult`]).
    Succeeded,
    /// The job failed for good (payload [`ErrorInfo`]; reason `AttemptsExhausted` when dead-lettered).
    Failed,
    /// The attempt failed or was handed back, and the job is queued again (payload [`ErrorInfo`];
    /// reason `HandedBack` when a worker gave it back while shutting down).
    Retrying,
    /// The job was cancelled (payload [`ErrorInfo`] with reason `Cancelled`).
    Cancelled,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Claimed => "claimed",
            EventKind::Progress => "progress",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
            EventKind::Retrying => "retrying",
            EventKind::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = QueueError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "claimed" => EventKind::Claimed,
            "progress" => EventKind::Progress,
            "succeeded" => EventKind::Succeeded,
            "failed" => EventKind::Failed,
            "retrying" => EventKind::Retrying,
            "cancelled" => EventKind::Cancelled,
            other => {
                return Err(QueueError::protocol(
                    "event",
                    format!("unknown event type {other:?}"),
                ));
            }
        })
    }
}

/// The JSON payload of an event; which variant follows from the kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventPayload {
    /// `claimed` carries none.
    None,
    Progress(Progress),
    Result(Box<JobResult>),
    Error(ErrorInfo),
}

/// One entry of a pool's events stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Stream entry id (in the pool's stream): pass the event to [`EventsReader::ack`] once
    /// processed.
    pub id: String,
    pub kind: EventKind,
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The pool whose stream the event came from (set by the reader).
    pub pool: String,
    pub attempt: u32,
    /// Worker that caused the event (none for a cancel of a waiting job).
    pub worker: Option<String>,
    /// When it happened (Redis server clock).
    pub at: Timestamp,
    pub payload: EventPayload,
}

impl Event {
    pub(crate) fn decode(id: String, mut f: HashMap<String, String>) -> Result<Event> {
        let mut take = |k: &str| f.remove(k).unwrap_or_default();
        let kind: EventKind = take("type").parse()?;
        let payload_json = take("payload");
        let payload = decode_payload(kind, &payload_json)?;
        let ts = take("ts");
        let worker = take("worker");
        Ok(Event {
            id,
            kind,
            uid: take("uid"),
            namespace: take("namespace"),
            name: take("name"),
            pool: take("pool"),
            attempt: parse_opt_u32("attempt", Some(take("attempt")).filter(|s| !s.is_empty()))?
                .unwrap_or(0),
            worker: Some(worker).filter(|w| !w.is_empty()),
            at: parse_ts(&ts)?,
            payload,
        })
    }

    /// The progress payload, if this is a `progress` event.
    pub fn progress(&self) -> Option<&Progress> {
        match &self.payload {
            EventPayload::Progress(p) => Some(p),
            _ => None,
        }
    }

    /// The result payload, if this is a `succeeded` event.
    pub fn result(&self) -> Option<&JobResult> {
        match &self.payload {
            EventPayload::Result(r) => Some(r),
            _ => None,
        }
    }

    /// The error payload of `failed`, `retrying` and `cancelled` events.
    pub fn error(&self) -> Option<&ErrorInfo> {
        match &self.payload {
            EventPayload::Error(e) => Some(e),
            _ => None,
        }
    }
}

fn decode_payload(kind: EventKind, json: &str) -> Result<EventPayload> {
    let err = |source| QueueError::Json {
        what: "event payload",
        source,
    };
    Ok(match kind {
        EventKind::Claimed => EventPayload::None,
        EventKind::Progress => EventPayload::Progress(serde_json::from_str(json).map_err(err)?),
        EventKind::Succeeded => {
            EventPayload::Result(Box::new(serde_json::from_str(json).map_err(err)?))
        }
        EventKind::Failed | EventKind::Retrying | EventKind::Cancelled => {
            EventPayload::Error(serde_json::from_str(json).map_err(err)?)
        }
    })
}

impl Queue {
    /// A reader of every pool's events stream for the operator (consumer group `operator`).
    pub async fn events(&self, consumer: &str) -> Result<EventsReader> {
        EventsReader::new(self.clone(), consumer).await
    }
}

/// Reads the events streams of all pools (one per pool, `Keys::events`) through the consumer
/// group `operator`. The pools are those listed in `{p}:pools` (the operator lists a pool when
/// it enqueues a job or sets up the pool's user); a pool listed later is read from the next
/// call on.
///
/// A pool's stream is written by that pool's workers, who may write anything into it: an
/// event's `pool` is the pool of the stream it came from (not what the entry says), and in a
/// pool named `<namespace>/<name>` (the operator's) an entry about a job of another namespace
/// is dropped. The operator only takes events
/// as a sign that a job changed and reads the job hash of the job's own pool itself.
///
/// Delivery is at least once: call [`ack`](Self::ack) after an event is processed. Events not
/// acknowledged for `events_redeliver_after` (also those a previous operator pod read under
/// another consumer name and never acknowledged) are delivered again, and after a restart the
/// consumer's own pending events come first. Use a stable consumer name where possible.
/// Malformed entries are acknowledged and skipped with a warning. The streams are capped
/// (MAXLEN ~), so an operator that was away for long resyncs from [`Queue::get_job`].
pub struct EventsReader {
    queue: Queue,
    consumer: String,
    /// Events stream keys (and their pools) that have the operator group.
    streams: Vec<(String, String)>,
    conn: Option<(MultiplexedConnection, Duration)>,
    own_pending_done: bool,
    last_redeliver: Option<Instant>,
}

impl fmt::Debug for EventsReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventsReader")
            .field("consumer", &self.consumer)
            .field("streams", &self.streams.len())
            .finish_non_exhaustive()
    }
}

impl EventsReader {
    pub(crate) async fn new(queue: Queue, consumer: &str) -> Result<Self> {
        crate::keys::validate_name("consumer name", consumer)?;
        let mut reader = EventsReader {
            queue,
            consumer: consumer.to_string(),
            streams: Vec::new(),
            conn: None,
            own_pending_done: false,
            last_redeliver: None,
        };
        reader.refresh().await?;
        Ok(reader)
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Picks up pools listed since the last call: their streams get the operator group.
    async fn refresh(&mut self) -> Result<()> {
        let mut pools = self.queue.pools().await?;
        pools.retain(|p| crate::keys::validate_name("pool", p).is_ok());
        let mut added = false;
        for pool in pools {
            let key = self.queue.keys().events(&pool);
            if self.streams.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let r: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg(OPERATOR_GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.queue.conn())
                .await;
            match r {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
            self.streams.push((key, pool));
            added = true;
        }
        if added {
            // A new stream may hold events this consumer read before a restart.
            self.own_pending_done = false;
        }
        Ok(())
    }

    /// Up to `count` events: first this consumer's unacknowledged ones (after a restart), then
    /// events idle past the redelivery time, then new ones, waiting up to `block` for them.
    /// An empty vector means nothing arrived in time.
    pub async fn next(&mut self, count: usize, block: Duration) -> Result<Vec<Event>> {
        self.refresh().await?;
        match self.next_inner(count.max(1), block).await {
            Err(e) if e.is_nogroup() => {
                // A stream (or its group) was lost, e.g. with Redis' data: set them up again.
                self.streams.clear();
                self.refresh().await?;
                self.next_inner(count.max(1), block).await
            }
            other => other,
        }
    }

    fn pool_of(&self, key: &str) -> Option<&str> {
        self.streams
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, p)| p.as_str())
    }

    async fn next_inner(&mut self, count: usize, block: Duration) -> Result<Vec<Event>> {
        if self.streams.is_empty() {
            // No pool yet: nothing to read, wait as a blocking read would.
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        if !self.own_pending_done {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(OPERATOR_GROUP)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS");
            for (k, _) in &self.streams {
                cmd.arg(k);
            }
            for _ in &self.streams {
                cmd.arg("0");
            }
            let v: redis::Value = cmd.query_async(&mut self.queue.conn()).await?;
            let read = reply::read_reply("XREADGROUP events", v)?;
            if read.iter().all(|(_, e)| e.is_empty()) {
                self.own_pending_done = true;
            } else {
                return self.decode_read(read).await;
            }
        }
        let redeliver = self.queue.config().events_redeliver_after;
        if self
            .last_redeliver
            .is_none_or(|t| t.elapsed() >= redeliver / 2)
        {
            self.last_redeliver = Some(Instant::now());
            let mut read = Vec::new();
            for (key, _) in &self.streams {
                let v: redis::Value = redis::cmd("XAUTOCLAIM")
                    .arg(key)
                    .arg(OPERATOR_GROUP)
                    .arg(&self.consumer)
                    .arg(redeliver.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut self.queue.conn())
                    .await?;
                let mut parts = reply::array("XAUTOCLAIM events", v)?.into_iter();
                let _cursor = parts.next();
                if let Some(claimed) = parts.next() {
                    let entries = reply::entries("XAUTOCLAIM events", claimed)?;
                    if !entries.is_empty() {
                        read.push((key.clone(), entries));
                    }
                }
            }
            if !read.is_empty() {
                return self.decode_read(read).await;
            }
        }
        let block_ms = block.as_millis().max(1) as u64;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(OPERATOR_GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS");
        for (k, _) in &self.streams {
            cmd.arg(k);
        }
        for _ in &self.streams {
            cmd.arg(">");
        }
        let conn = self.blocking_conn(block).await?;
        let r: redis::RedisResult<redis::Value> = cmd.query_async(conn).await;
        let v = match r {
            Ok(v) => v,
            Err(e) => {
                self.conn = None;
                return Err(e.into());
            }
        };
        let read = reply::read_reply("XREADGROUP events", v)?;
        self.decode_read(read).await
    }

    async fn blocking_conn(&mut self, block: Duration) -> Result<&mut MultiplexedConnection> {
        if self.conn.as_ref().is_some_and(|(_, max)| *max < block) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let max = block.max(Duration::from_secs(30));
            let c = self.queue.blocking_connection(max).await?;
            self.conn = Some((c, max));
        }
        match self.conn.as_mut() {
            Some((c, _)) => Ok(c),
            None => Err(QueueError::protocol("events", "no connection")),
        }
    }

    async fn decode_read(&mut self, read: Vec<(String, Vec<reply::Entry>)>) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut junk: Vec<(String, Vec<String>)> = Vec::new();
        for (key, entries) in read {
            let Some(pool) = self.pool_of(&key).map(str::to_string) else {
                continue;
            };
            // An operator pool is `<namespace>/<name>` and holds jobs of that namespace only.
            let namespace = pool.split_once('/').map(|(ns, _)| ns.to_string());
            let mut bad = Vec::new();
            for (id, fields) in entries {
                match fields.map(|f| Event::decode(id.clone(), f)) {
                    Some(Ok(mut e)) if namespace.as_ref().is_none_or(|ns| *ns == e.namespace) => {
                        e.pool = pool.clone();
                        out.push(e);
                    }
                    Some(Ok(e)) => {
                        tracing::warn!(
                            id,
                            pool = %pool,
                            namespace = %e.namespace,
                            "skipping an event about a job outside its pool's namespace"
                        );
                        bad.push(id);
                    }
                    Some(Err(err)) => {
                        tracing::warn!(id, pool = %pool, error = %err, "skipping malformed event");
                        bad.push(id);
                    }
                    // Trimmed away while pending: nothing to process.
                    None => bad.push(id),
                }
            }
            if !bad.is_empty() {
                junk.push((key, bad));
            }
        }
        for (key, ids) in junk {
            self.ack_ids(&key, &ids).await?;
        }
        Ok(out)
    }

    async fn ack_ids(&self, key: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: i64 = redis::cmd("XACK")
            .arg(key)
            .arg(OPERATOR_GROUP)
            .arg(ids)
            .query_async(&mut self.queue.conn())
            .await?;
        Ok(())
    }

    /// Acknowledges processed events (each in its pool's stream).
    pub async fn ack(&self, events: &[Event]) -> Result<()> {
        let mut by_pool: HashMap<&str, Vec<String>> = HashMap::new();
        for e in events {
            by_pool
                .entry(e.pool.as_str())
                .or_default()
                .push(e.id.clone());
        }
        for (pool, ids) in by_pool {
            self.ack_ids(&self.queue.keys().events(pool), &ids).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn decodes_each_kind() {
        let base = [
            ("uid", "u"),
            ("namespace", "ns"),
            ("name", "n"),
            ("pool", "p"),
            ("attempt", "2"),
            ("worker", "w"),
            ("ts", "1700000000000"),
        ];
        let mk = |kind: &str, payload: &str| {
            let mut f = fields(&base);
            f.insert("type".into(), kind.into());
            f.insert("payload".into(), payload.into());
            Event::decode("1-0".into(), f)
        };
        let e = mk(
            "progress",
            r#"{"stage":"denoise","step":3,"totalSteps":20}"#,
        )
        .unwrap();
        assert_eq!(e.kind, EventKind::Progress);
        assert_eq!(e.attempt, 2);
        assert_eq!(
            e.progress(),
            Some(&Progress::new("denoise", Some(3), Some(20)))
        );
        let e = mk(
            "succeeded",
            r#"{"output":"file:///o.png","promptSource":"caption","timings":{"total":5}}"#,
        )
        .unwrap();
        let r = e.result().unwrap();
        assert_eq!(r.output, "file:///o.png");
        assert_eq!(r.prompt_source.as_deref(), Some("caption"));
        assert_eq!(r.timings.total, Some(5));
        let e = mk(
            "failed",
            r#"{"reason":"InvalidInput","message":"empty mask"}"#,
        )
        .unwrap();
        assert_eq!(e.error().unwrap().reason, "InvalidInput");
        let e = mk("claimed", "").unwrap();
        assert_eq!(e.payload, EventPayload::None);
        assert!(mk("exploded", "").is_err());
        assert!(mk("progress", "not json").is_err());
    }
}
