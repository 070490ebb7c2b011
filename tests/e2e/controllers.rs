//! The controller runtime, played by hand over the fake API server: the operator's own
//! `job::reconcile` / `pool::reconcile` (and their `error_policy`) run when kube's `Controller`
//! would run them —
//!
//! - an object's resourceVersion changed (a watch event; the operator's own writes count, as
//!   they do on a real watch: that is how a finalizer added by one reconcile leads to the next);
//! - a trigger arrived: the queue events reader (`pawfect_operator::events::run`, the real one,
//!   through its `Triggers`) or `Context::wake_pool` after an enqueue;
//! - a Deployment owned by a pool changed (the pool controller `owns` Deployments);
//! - a requeue came due. kube's `Action` does not expose its delay, so every requeue comes back
//!   after [`REQUEUE`]; the test's settings (resyncs, retry, `pollIntervalSeconds`) all ask for
//!   one second anyway.
//!
//! Reconciles run one at a time; every reconcile error is recorded (the test expects none).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use pawfect_api::{InpaintJob, InpaintPool};
use pawfect_operator::{Context, job, pool};
use serde_json::Value;
use tokio::time::Instant;

use crate::fake_api::{FakeApi, Res};

/// Delay of every requeue.
pub const REQUEUE: Duration = Duration::from_secs(1);
/// How often the runtime looks for work.
const TICK: Duration = Duration::from_millis(50);

type Key = (String, String);

#[derive(Default)]
struct Tracked {
    /// resourceVersion the last reconcile started from.
    seen_rv: Option<String>,
    /// When a requeue comes due.
    due: Option<Instant>,
}

/// Counts and errors of the reconciles so far.
#[derive(Clone, Default)]
pub struct Record {
    inner: Arc<Mutex<RecordInner>>,
}

#[derive(Default)]
struct RecordInner {
    job_reconciles: u64,
    pool_reconciles: u64,
    errors: Vec<String>,
}

impl Record {
    pub fn errors(&self) -> Vec<String> {
        self.inner.lock().unwrap().errors.clone()
    }
    pub fn counts(&self) -> (u64, u64) {
        let r = self.inner.lock().unwrap();
        (r.job_reconciles, r.pool_reconciles)
    }
}

fn key_of(obj: &Value) -> Key {
    (
        obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        obj["metadata"]["name"].as_str().unwrap_or("").to_string(),
    )
}

fn rv_of(obj: &Value) -> Option<String> {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string)
}

/// Whether an object is due for a reconcile now; marks it seen.
fn due(t: &mut Tracked, rv: Option<String>, triggered: bool, now: Instant) -> bool {
    let changed = t.seen_rv != rv;
    let requeued = t.due.is_some_and(|d| d <= now);
    if changed || triggered || requeued {
        t.seen_rv = rv;
        t.due = None;
        true
    } else {
        false
    }
}

fn after(action: &Action, now: Instant) -> Option<Instant> {
    if *action == Action::await_change() {
        None
    } else {
        Some(now + REQUEUE)
    }
}

/// Runs the two controllers until `stop` turns true.
pub async fn run(
    api: FakeApi,
    ctx: Arc<Context>,
    mut job_triggers: UnboundedReceiver<ObjectRef<InpaintJob>>,
    mut pool_triggers: UnboundedReceiver<ObjectRef<InpaintPool>>,
    record: Record,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut jobs: HashMap<Key, Tracked> = HashMap::new();
    let mut pools: HashMap<Key, Tracked> = HashMap::new();
    let mut owned_rv: HashMap<Key, Option<String>> = HashMap::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let mut job_woken: HashSet<Key> = HashSet::new();
        while let Ok(r) = job_triggers.try_recv() {
            job_woken.insert((r.namespace.clone().unwrap_or_default(), r.name.clone()));
        }
        let mut pool_woken: HashSet<Key> = HashSet::new();
        while let Ok(r) = pool_triggers.try_recv() {
            pool_woken.insert((r.namespace.clone().unwrap_or_default(), r.name.clone()));
        }
        // `owns(Deployment)`: a change of a pool's Deployment wakes the pool.
        for d in api.list(Res::Deployments) {
            let k = key_of(&d);
            let rv = rv_of(&d);
            if owned_rv.get(&k) != Some(&rv) {
                owned_rv.insert(k.clone(), rv);
                for o in d["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if o["kind"] == "InpaintPool" {
                        let owner = o["name"].as_str().unwrap_or("").to_string();
                        pool_woken.insert((k.0.clone(), owner));
                    }
                }
            }
        }

        let now = Instant::now();
        let all_jobs = api.list(Res::Jobs);
        jobs.retain(|k, _| all_jobs.iter().any(|j| key_of(j) == *k));
        for obj in all_jobs {
            let k = key_of(&obj);
            let t = jobs.entry(k.clone()).or_default();
            if !due(t, rv_of(&obj), job_woken.contains(&k), now) {
                continue;
            }
            let j: InpaintJob = serde_json::from_value(obj).expect("stored jobs are valid");
            let j = Arc::new(j);
            let res = job::reconcile(j.clone(), ctx.clone()).await;
            let action = match res {
                Ok(a) => a,
                Err(e) => {
                    record
                        .inner
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("job {}/{}: {e:?}", k.0, k.1));
                    job::error_policy(j, &e, ctx.clone())
                }
            };
            record.inner.lock().unwrap().job_reconciles += 1;
            if let Some(t) = jobs.get_mut(&k) {
                t.due = after(&action, Instant::now());
            }
        }

        let all_pools = api.list(Res::Pools);
        pools.retain(|k, _| all_pools.iter().any(|p| key_of(p) == *k));
        for obj in all_pools {
            let k = key_of(&obj);
            let t = pools.entry(k.clone()).or_default();
            if !due(t, rv_of(&obj), pool_woken.contains(&k), now) {
                continue;
            }
            let p: InpaintPool = serde_json::from_value(obj).expect("stored pools are valid");
            let p = Arc::new(p);
            let action = match pool::reconcile(p.clone(), ctx.clone()).await {
                Ok(a) => a,
                Err(e) => {
                    record
                        .inner
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("pool {}/{}: {e:?}", k.0, k.1));
                    pool::error_policy(p, &e, ctx.clone())
                }
            };
            record.inner.lock().unwrap().pool_reconciles += 1;
            if let Some(t) = pools.get_mut(&k) {
                t.due = after(&action, Instant::now());
            }
        }

        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => {}
        }
    }
}
