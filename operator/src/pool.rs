//! The InpaintPool controller: the worker Deployment, its replicas, and the pool status.
//!
//! One reconcile (every `pollIntervalSeconds`, on pool or Deployment changes, and whenever a
//! job is enqueued or the queue reports a claim or an end):
//! 1. read the Deployment `<pool>-worker`, the queue depth and which workers are busy;
//! 2. decide the replicas ([`autoscaler::decide`]);
//! 3. mark the worker pods: busy ones get a high `controller.kubernetes.io/pod-deletion-cost`
//!    and `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"` (and
//!    `karpenter.sh/do-not-disrupt: "true"`), idle ones a low cost and `safe-to-evict: "true"`,
//!    so a scale-down removes idle pods first and node autoscalers leave busy GPUs alone; this
//!    happens before the replicas go down, as the ReplicaSet controller reads the cost then;
//! 4. apply the Deployment (server-side apply, replicas included: the operator is the only
//!    writer of `replicas`);
//! 5. write the pool status when it changed.
//!
//! When the queue cannot be read, the replicas stay where they are (never scale on missing data).
//!
//! A pool whose workers would mount a `hostPath` gets no workers unless the operator runs with
//! `--allow-host-path-models` ([`refusal`]): its Ready condition is `False` with reason
//! `HostPathNotAllowed`, a Warning Event says why, and a Deployment it already has is scaled to
//! zero.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as K8sEvent, EventType};
use kube::{Resource, ResourceExt};
use pawfect_api::conditions::{self, ConditionStatus, reasons};
use pawfect_api::{InpaintPool, InpaintPoolStatus, QueueDepth};
use serde_json::json;
use tracing::{info, warn};

use crate::autoscaler::{self, Decision, History, Observation, Policy, Reason};
use crate::deployment::{self, label_selector};
use crate::metrics::PoolSample;
use crate::{Context, Error, FIELD_MANAGER, Result, queue_pool};

/// Pod annotation the ReplicaSet controller reads to pick pods to remove (lowest first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Cluster Autoscaler: whether it may evict the pod to remove its node.
pub const SAFE_TO_EVICT: &str = "cluster-autoscaler.kubernetes.io/safe-to-evict";
/// Karpenter: voluntary disruption of the pod's node is blocked while `"true"`.
pub const DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";
/// Deletion cost of a worker processing a job.
pub const BUSY_COST: &str = "1000";
/// Deletion cost of an idle worker.
pub const IDLE_COST: &str = "0";

/// Pool condition reason: the pool's model volume is a `hostPath` and the operator does not run
/// with `--allow-host-path-models`.
pub const HOST_PATH_NOT_ALLOWED: &str = "HostPathNotAllowed";

/// Why the operator will not run a pool's workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Condition and Event reason.
    pub reason: &'static str,
    pub message: String,
}

/// Whether the operator refuses to run this pool's workers, and why (pure). A `hostPath` model
/// volume mounts a directory of whichever node the worker lands on: only with
/// `--allow-host-path-models`.
pub fn refusal(pool: &InpaintPool, allow_host_path_models: bool) -> Option<Refusal> {
    let path = pool
        .spec
        .worker
        .model_volume
        .as_ref()
        .and_then(|v| v.host_path.as_deref())?;
    (!allow_host_path_models).then(|| Refusal {
        reason: HOST_PATH_NOT_ALLOWED,
        message: format!(
            "spec.worker.modelVolume.hostPath ({path}) mounts a directory of the node: the \
             operator runs without --allow-host-path-models, so this pool gets no workers; use \
             modelVolume.claimName (a PersistentVolumeClaim), or ask the cluster admin to allow \
             hostPath model volumes"
        ),
    })
}

/// The status of a refused pool (pure): Ready `False` with the refusal, no workers wanted.
pub fn refused_status(
    pool: &InpaintPool,
    r: &Refusal,
    observed: u32,
    ready: u32,
    now: Timestamp,
) -> InpaintPoolStatus {
    let mut s = pool.status.clone().unwrap_or_default();
    let g = pool.metadata.generation;
    s.observed_generation = g;
    s.replicas = observed;
    s.ready_replicas = ready;
    s.desired_replicas = 0;
    s.busy_workers = 0;
    s.set_condition(
        conditions::READY,
        ConditionStatus::False,
        r.reason,
        r.message.clone(),
        g,
        Time(now),
    );
    s.set_condition(
        conditions::SCALING,
        ConditionStatus::False,
        r.reason,
        "no workers: the pool is refused".to_string(),
        g,
        Time(now),
    );
    s
}

/// Scales an existing Deployment of a refused pool to zero, writes its status and, when the
/// refusal is new, publishes a Warning Event on the pool.
async fn refuse(
    pool: &InpaintPool,
    ctx: &Context,
    existing: Option<&Deployment>,
    r: &Refusal,
    now: Timestamp,
) -> Result<Action> {
    let ns = namespace(pool)?;
    let name = pool.name_any();
    warn!(pool = %name, namespace = %ns, reason = r.reason, "{}", r.message);
    let dstatus = existing.and_then(|d| d.status.as_ref());
    if existing.is_some_and(|d| d.spec.replicas != Some(0)) {
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        let mut deploy = deployment::build(pool, &ctx.worker, 0);
        if let Some(f) = ctx.worker_log_format {
            deployment::with_log_format(&mut deploy, f);
        }
        deployments
            .patch(
                &pool.deployment_name(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&deploy),
            )
            .await?;
    }
    let was_refused = pool
        .status
        .as_ref()
        .and_then(|s| s.condition(conditions::READY))
        .is_some_and(|c| c.status == "False" && c.reason == r.reason);
    let new = refused_status(
        pool,
        r,
        to_u32(dstatus.and_then(|s| s.replicas)),
        to_u32(dstatus.and_then(|s| s.ready_replicas)),
        now,
    );
    write_status(pool, ctx, &ns, &name, new).await?;
    if !was_refused {
        let event = K8sEvent {
            type_: EventType::Warning,
            reason: r.reason.into(),
            note: Some(r.message.clone()),
            action: "Refuse".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &pool.object_ref(&())).await {
            warn!(pool = %name, %e, "cannot publish the refusal event");
        }
    }
    // The flag only changes with a restart, which reconciles every pool again; a changed pool
    // is a change.
    Ok(Action::await_change())
}

/// The annotations a worker pod should carry.
pub fn pod_annotations(busy: bool) -> [(&'static str, &'static str); 3] {
    if busy {
        [
            (DELETION_COST, BUSY_COST),
            (SAFE_TO_EVICT, "false"),
            (DO_NOT_DISRUPT, "true"),
        ]
    } else {
        [
            (DELETION_COST, IDLE_COST),
            (SAFE_TO_EVICT, "true"),
            (DO_NOT_DISRUPT, "false"),
        ]
    }
}

fn needs_marking(pod: &Pod, busy: bool) -> bool {
    let a = pod.annotations();
    pod_annotations(busy)
        .iter()
        .any(|(k, v)| a.get(*k).map(String::as_str) != Some(*v))
}

/// Writes `new` as the pool's status (server-side apply of the status subresource) if it differs
/// from the current one.
async fn write_status(
    pool: &InpaintPool,
    ctx: &Context,
    ns: &str,
    name: &str,
    new: InpaintPoolStatus,
) -> Result<()> {
    if pool.status.as_ref() == Some(&new) {
        return Ok(());
    }
    let pools: Api<InpaintPool> = Api::namespaced(ctx.client.clone(), ns);
    let patch = json!({
        "apiVersion": InpaintPool::api_version(&()),
        "kind": InpaintPool::kind(&()),
        "status": new,
    });
    pools
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    Ok(())
}

fn namespace(pool: &InpaintPool) -> Result<String> {
    pool.namespace().ok_or(Error::MissingField {
        kind: "InpaintPool",
        field: "metadata.namespace",
    })
}

fn to_u32(v: Option<i32>) -> u32 {
    v.and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
}

/// Reconciles one InpaintPool (entry point of the controller).
pub async fn reconcile(pool: Arc<InpaintPool>, ctx: Arc<Context>) -> Result<Action> {
    ctx.pool_backlog
        .start(&kube::runtime::reflector::ObjectRef::from_obj(&*pool));
    let _timer = ctx.metrics.reconcile("pool");
    let now = Timestamp::now();
    let ns = namespace(&pool)?;
    let name = pool.name_any();
    let qpool = queue_pool(&ns, &name);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let deploy_name = pool.deployment_name();

    let existing = deployments.get_opt(&deploy_name).await?;
    if let Some(r) = refusal(&pool, ctx.allow_host_path_models) {
        return refuse(&pool, &ctx, existing.as_ref(), &r, now).await;
    }
    let current = existing
        .as_ref()
        .map_or(0, |d| to_u32(Some(d.spec.replicas.unwrap_or(1))));
    let dstatus = existing.as_ref().and_then(|d| d.status.as_ref());
    let observed = to_u32(dstatus.and_then(|s| s.replicas));
    let ready = to_u32(dstatus.and_then(|s| s.ready_replicas));

    let queue = async {
        let depth = ctx.queue.depth(&qpool).await?;
        let busy = ctx.queue.busy_workers(&qpool).await?;
        Ok::<_, pawfect_queue::QueueError>((depth, busy))
    }
    .await;

    let pods: Vec<Pod> = if existing.is_some() {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        api.list(&ListParams::default().labels(&label_selector(&name)))
            .await?
            .items
    } else {
        Vec::new()
    };

    let policy = Policy::from_spec(&pool.spec);
    let (decision, depth, busy_names, queue_error) = match queue {
        Ok((depth, busy)) => {
            let busy_names: BTreeSet<String> = busy.into_iter().map(|b| b.worker).collect();
            let busy_pods: Vec<&Pod> = pods
                .iter()
                .filter(|p| busy_names.contains(&p.name_any()))
                .collect();
            let busy_not_ready = busy_pods.iter().filter(|p| !pod_ready(p)).count();
            let obs = Observation {
                waiting: depth.waiting,
                running: depth.running,
                busy_workers: u32::try_from(busy_pods.len()).unwrap_or(u32::MAX),
                busy_not_ready: u32::try_from(busy_not_ready).unwrap_or(u32::MAX),
                current_replicas: current,
            };
            let decision = {
                let mut all = ctx
                    .scale_history
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                forget_deleted_pools(&mut all, &ctx.metrics, now);
                let (history, seen) = all
                    .entry(qpool.clone())
                    .or_insert_with(|| (History::seeded(now, current), now));
                *seen = now;
                autoscaler::decide(&policy, &obs, history, now)
            };
            (decision, Some(depth), Some(busy_names), None)
        }
        Err(e) => {
            warn!(pool = %name, namespace = %ns, %e, "cannot read the queue: replicas unchanged");
            // A new pool starts at its minimum; an existing one keeps its replicas.
            let keep = if existing.is_some() {
                current
            } else {
                policy.min_replicas
            };
            let d = Decision {
                desired: keep,
                recommended: keep,
                reason: Reason::Steady,
            };
            (d, None, None, Some(e))
        }
    };
    let desired = decision.desired;

    if let Some(busy_names) = &busy_names {
        mark_pods(&ctx, &ns, &pods, busy_names).await?;
    }

    // The pool's own Redis user (before the Deployment, which reads its Secret).
    let credentials = if ctx.pool_redis_users {
        Some(crate::pool_user::ensure(&pool, &ctx, existing.as_ref()).await?)
    } else {
        None
    };
    let mut deploy = deployment::build(&pool, &ctx.worker, desired);
    if let Some(f) = ctx.worker_log_format {
        deployment::with_log_format(&mut deploy, f);
    }
    if let Some(c) = &credentials {
        deployment::with_pool_user(
            &mut deploy,
            &c.secret,
            crate::pool_user::PASSWORD_KEY,
            &c.username,
            (crate::pool_user::CREDENTIALS_ANNOTATION, &c.version),
        );
    }
    deployments
        .patch(
            &deploy_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&deploy),
        )
        .await?;
    if desired != current {
        info!(pool = %name, namespace = %ns, from = current, to = desired, ?decision, "scaled");
    }

    let busy_count = busy_names.as_ref().map_or(0, |b| {
        pods.iter().filter(|p| b.contains(&p.name_any())).count()
    });
    let sample = PoolSample {
        waiting: depth.map_or(0, |d| d.waiting),
        running: depth.map_or(0, |d| d.running),
        desired,
        current,
        ready,
        busy: u32::try_from(busy_count).unwrap_or(u32::MAX),
    };
    ctx.metrics.pool(&ns, &name, sample);

    let new = pool_status(
        &pool,
        &PoolObservation {
            observed,
            ready,
            current,
            desired,
            busy: sample.busy,
            depth,
            queue_error: queue_error.as_ref().map(ToString::to_string),
        },
        now,
    );
    write_status(&pool, &ctx, &ns, &name, new).await?;
    if let Some(e) = queue_error {
        return Err(Error::Queue(e));
    }
    let poll = Duration::from_secs(pool.spec.poll_interval_seconds.max(1));
    let next = match decision.reason {
        Reason::ScaleDownDelayed { until } => {
            let wait = Duration::try_from(until.duration_since(now)).unwrap_or(Duration::ZERO);
            poll.min(wait + Duration::from_millis(50))
        }
        _ => poll,
    };
    Ok(Action::requeue(next))
}

/// Every pool is reconciled at least every `pollIntervalSeconds` (at most an hour): one not
/// seen for two hours was deleted. Its history and metric series go.
fn forget_deleted_pools(
    all: &mut std::collections::HashMap<String, (History, Timestamp)>,
    metrics: &crate::metrics::Metrics,
    now: Timestamp,
) {
    let cutoff = now - jiff::SignedDuration::from_hours(2);
    all.retain(|key, (_, seen)| {
        let keep = *seen > cutoff;
        if !keep && let Some((ns, pool)) = crate::split_queue_pool(key) {
            metrics.pool_removed(ns, pool);
        }
        keep
    });
}

/// Whether the pod's Ready condition is True (what the ReplicaSet controller ranks by).
fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Puts the busy/idle annotations on the pods that lack them.
async fn mark_pods(
    ctx: &Context,
    ns: &str,
    pods: &[Pod],
    busy_names: &BTreeSet<String>,
) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.name_any();
        let busy = busy_names.contains(&name);
        if !needs_marking(pod, busy) {
            continue;
        }
        let annotations: serde_json::Map<String, serde_json::Value> = pod_annotations(busy)
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        let patch = json!({"metadata": {"annotations": annotations}});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // Gone in the meantime.
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What one pool reconcile saw and decided.
#[derive(Clone, Debug, Default)]
pub struct PoolObservation {
    /// Pods of the Deployment (its `status.replicas`).
    pub observed: u32,
    pub ready: u32,
    /// `spec.replicas` before this reconcile.
    pub current: u32,
    pub desired: u32,
    pub busy: u32,
    /// Queue depth, when the queue could be read.
    pub depth: Option<QueueDepth>,
    pub queue_error: Option<String>,
}

/// The pool status for what a reconcile saw (pure).
pub fn pool_status(pool: &InpaintPool, o: &PoolObservation, now: Timestamp) -> InpaintPoolStatus {
    let mut s = pool.status.clone().unwrap_or_default();
    let g = pool.metadata.generation;
    let t = Time(now);
    s.observed_generation = g;
    s.replicas = o.observed;
    s.ready_replicas = o.ready;
    s.desired_replicas = o.desired;
    s.busy_workers = o.busy;
    if let Some(d) = o.depth {
        s.queue = d;
    }
    if o.desired != o.current {
        s.last_scale_time = Some(t.clone());
    }
    match &o.queue_error {
        None => s.set_condition(
            conditions::READY,
            ConditionStatus::True,
            reasons::DEPLOYMENT_APPLIED,
            format!(
                "Deployment {} applied; replicas follow the queue",
                pool.deployment_name()
            ),
            g,
            t.clone(),
        ),
        Some(e) => s.set_condition(
            conditions::READY,
            ConditionStatus::False,
            reasons::QUEUE_UNAVAILABLE,
            format!("cannot read the queue, replicas kept at {}: {e}", o.desired),
            g,
            t.clone(),
        ),
    }
    if o.ready < o.desired {
        s.set_condition(
            conditions::SCALING,
            ConditionStatus::True,
            reasons::WAITING_FOR_CAPACITY,
            format!("{} of {} workers ready", o.ready, o.desired),
            g,
            t,
        );
    } else {
        s.set_condition(
            conditions::SCALING,
            ConditionStatus::False,
            reasons::AT_DESIRED_REPLICAS,
            format!("{} workers ready", o.ready),
            g,
            t,
        );
    }
    s
}

/// Retry policy after a failed reconcile.
pub fn error_policy(pool: Arc<InpaintPool>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(pool = %pool.name_any(), namespace = ?pool.namespace(), %error, "pool reconcile failed");
    ctx.metrics.reconcile_failed("pool", error.metric_label());
    Action::requeue(ctx.settings.error_retry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pawfect_api::conditions::{READY, SCALING, is_true};

    fn pool() -> InpaintPool {
        let mut p = InpaintPool::new(
            "t4",
            serde_json::from_value(json!({"maxReplicas": 4, "worker": {"image": "w:1"}})).unwrap(),
        );
        p.metadata.namespace = Some("media".into());
        p.metadata.generation = Some(2);
        p
    }

    #[test]
    fn status_reports_scaling_and_queue() {
        let p = pool();
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let o = PoolObservation {
            observed: 1,
            ready: 1,
            current: 1,
            desired: 3,
            busy: 1,
            depth: Some(QueueDepth {
                waiting: 2,
                running: 1,
            }),
            queue_error: None,
        };
        let s = pool_status(&p, &o, now);
        assert_eq!(s.desired_replicas, 3);
        assert_eq!(s.queue.waiting, 2);
        assert_eq!(s.last_scale_time, Some(Time(now)));
        assert_eq!(s.observed_generation, Some(2));
        assert!(is_true(&s.conditions, READY));
        let c = s.condition(SCALING).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", reasons::WAITING_FOR_CAPACITY)
        );

        // Queue down: Ready false, depth kept from before, no scale time change.
        let p2 = InpaintPool {
            status: Some(s.clone()),
            ..p
        };
        let later = now + jiff::SignedDuration::from_secs(10);
        let s2 = pool_status(
            &p2,
            &PoolObservation {
                observed: 3,
                ready: 3,
                current: 3,
                desired: 3,
                busy: 0,
                depth: None,
                queue_error: Some("connection refused".into()),
            },
            later,
        );
        assert_eq!(s2.queue.waiting, 2);
        assert_eq!(s2.last_scale_time, Some(Time(now)));
        let r = s2.condition(READY).unwrap();
        assert_eq!(
            (r.status.as_str(), r.reason.as_str()),
            ("False", reasons::QUEUE_UNAVAILABLE)
        );
        assert!(!is_true(&s2.conditions, SCALING));
    }

    #[test]
    fn host_path_pools_need_the_flag() {
        let with = |volume: serde_json::Value| {
            InpaintPool::new(
                "t4",
                serde_json::from_value(json!({"worker": {"image": "w:1", "modelVolume": volume}}))
                    .unwrap(),
            )
        };
        let no_volume = pool();
        let claim = with(json!({"claimName": "models"}));
        let host = with(json!({"hostPath": "/srv/models"}));
        // (pool, --allow-host-path-models, refused)
        let cases = [
            (&no_volume, false, false),
            (&no_volume, true, false),
            (&claim, false, false),
            (&claim, true, false),
            (&host, false, true),
            (&host, true, false),
        ];
        for (i, (p, allow, refused)) in cases.into_iter().enumerate() {
            let r = refusal(p, allow);
            assert_eq!(r.is_some(), refused, "case {i}: {r:?}");
            if let Some(r) = r {
                assert_eq!(r.reason, HOST_PATH_NOT_ALLOWED);
                assert!(r.message.contains("/srv/models"), "{}", r.message);
                assert!(
                    r.message.contains("--allow-host-path-models"),
                    "{}",
                    r.message
                );
            }
        }

        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let r = refusal(&host, false).unwrap();
        let s = refused_status(&host, &r, 2, 1, now);
        let ready = s.condition(READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", HOST_PATH_NOT_ALLOWED)
        );
        assert_eq!(ready.message, r.message);
        assert_eq!(
            (s.desired_replicas, s.replicas, s.ready_replicas),
            (0, 2, 1)
        );
        assert!(!is_true(&s.conditions, SCALING));
    }

    #[test]
    fn deleted_pools_are_forgotten() {
        let m = crate::metrics::Metrics::default();
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        m.pool("media", "old", PoolSample::default());
        let mut all = std::collections::HashMap::from([
            (
                "media/old".to_string(),
                (
                    History::default(),
                    now - jiff::SignedDuration::from_hours(3),
                ),
            ),
            (
                "media/t4".to_string(),
                (
                    History::default(),
                    now - jiff::SignedDuration::from_secs(30),
                ),
            ),
        ]);
        forget_deleted_pools(&mut all, &m, now);
        assert_eq!(all.keys().collect::<Vec<_>>(), vec!["media/t4"]);
        assert!(!m.encode().unwrap().contains("pool=\"old\""));
    }

    #[test]
    fn only_a_ready_condition_that_is_true_makes_a_pod_ready() {
        let pod = |conditions: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "w"},
                "status": {"conditions": conditions}
            }))
            .unwrap()
        };
        assert!(pod_ready(&pod(
            serde_json::json!([{"type": "Ready", "status": "True"}])
        )));
        assert!(!pod_ready(&pod(
            serde_json::json!([{"type": "Ready", "status": "False"}])
        )));
        assert!(!pod_ready(&pod(
            serde_json::json!([{"type": "ContainersReady", "status": "True"}])
        )));
        assert!(!pod_ready(&Pod::default()));
    }

    #[test]
    fn busy_pods_are_protected() {
        let mut pod = Pod::default();
        assert!(needs_marking(&pod, true));
        pod.metadata.annotations = Some(
            pod_annotations(true)
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        assert!(!needs_marking(&pod, true));
        assert!(needs_marking(&pod, false));
        assert_eq!(
            pod.annotations().get(SAFE_TO_EVICT).map(String::as_str),
            Some("false")
        );
    }
}
