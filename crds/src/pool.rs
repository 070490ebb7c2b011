//! `InpaintPool`: a GPU worker pool (a Deployment the operator owns) and its scaling policy.
// Each `printcolumn(...)` repeats keys such as `type_`, which clippy reads as duplicates.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::conditions::{self, ConditionStatus};

/// Seconds between queue-depth polls.
pub const DEFAULT_POLL_INTERVAL_SECONDS: u64 = 10;
/// Seconds demand must stay lower before the pool shrinks (to zero included).
pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: u64 = 300;
/// Grace period a worker gets on SIGTERM to finish its job (a 20-step 1024² job on a T4 takes minutes).
pub const DEFAULT_TERMINATION_GRACE_SECONDS: i64 = 900;
/// Where the model volume is mounted in the worker.
pub const DEFAULT_MODEL_MOUNT_PATH: &str = "/models";

/// Workers, their scaling bounds and their pod template.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "inpaint.pawfect.dev",
    version = "v1alpha1",
    kind = "InpaintPool",
    plural = "inpaintpools",
    namespaced,
    status = "InpaintPoolStatus",
    shortname = "ipool",
    category = "pawfect",
    derive = "PartialEq",
    doc = "An InpaintPool is a GPU worker Deployment the operator scales on its queue depth.",
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Waiting",
        type_ = "integer",
        json_path = ".status.queue.waiting"
    ),
    printcolumn(
        name = "Running",
        type_ = "integer",
        json_path = ".status.queue.running"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct InpaintPoolSpec {
    /// Workers kept running when the queue is empty (0 = scale to zero).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: u32,
    /// Upper bound on workers (GPUs).
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: u32,
    /// Jobs (waiting + running) one worker is sized for. Workers run one job at a time,
    /// so values above 1 trade latency for fewer GPUs.
    #[serde(default = "default_jobs_per_replica")]
    #[schemars(range(min = 1, max = 1000))]
    pub jobs_per_replica: u32,
    /// Seconds between queue-depth polls (the operator also wakes on queue events).
    #[serde(default = "default_poll_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub poll_interval_seconds: u64,
    /// Seconds demand must stay lower before workers are removed.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: u64,
    /// The worker pod template.
    pub worker: WorkerTemplate,
}

fn default_max_replicas() -> u32 {
    1
}
fn default_jobs_per_replica() -> u32 {
    1
}
fn default_poll_interval() -> u64 {
    DEFAULT_POLL_INTERVAL_SECONDS
}
fn default_scale_down_delay() -> u64 {
    DEFAULT_SCALE_DOWN_DELAY_SECONDS
}

/// How each worker pod is built.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTemplate {
    /// Worker image (built with `--features cuda`, `CUDA_COMPUTE_CAP=75` for T4).
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(Always|IfNotPresent|Never)$"))]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Container resources. `nvidia.com/gpu: 1` is added to the limits when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels, e.g. `cloud.google.com/gke-accelerator: nvidia-tesla-t4`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations, e.g. `nvidia.com/gpu` Exists NoSchedule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Where the weights are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_volume: Option<ModelVolume>,
    /// FLUX transformer weights to load.
    #[serde(default)]
    pub model_variant: ModelVariant,
    /// Extra arguments appended to `pawfect-worker serve`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Seconds a worker may take to finish its job after SIGTERM.
    #[serde(default = "default_termination_grace")]
    #[schemars(range(min = 30, max = 86400))]
    pub termination_grace_period_seconds: i64,
    /// Pod priority class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Which object-store locations (s3, gs, az) jobs of this pool may read and write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<WorkerStorage>,
}

/// Longest allowed object-store prefix, characters (S3 keys are at most 1024 bytes, plus the
/// scheme and bucket).
pub const STORAGE_PREFIX_LEN_MAX: u32 = 1100;
/// Most allowed object-store prefixes of one pool.
pub const STORAGE_PREFIXES_MAX: u32 = 64;

/// Where a pool's workers may read inputs from and write results to, in object stores.
/// `file://` locations follow the worker's `--allow-root` and `http(s)://` inputs its address
/// policy; neither is affected by this.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStorage {
    /// Object-store URI prefixes jobs may name (`s3://photos/uploads/`, `gs://bucket`,
    /// `az://container/prefix/`): a job's `image`, `mask` and `output` must each lie below one
    /// of them (same scheme and bucket, key below the prefix at a `/` boundary). Empty or
    /// absent: every `s3://`, `gs://` and `az://` URI is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = STORAGE_PREFIXES_MAX),
        inner(
            length(min = 6, max = STORAGE_PREFIX_LEN_MAX),
            regex(pattern = r"^(s3|s3a|gs|az|abfs|abfss|azure)://[^/?#]+(/[^?#]*)?$")
        )
    )]
    pub allowed_prefixes: Vec<String>,
    /// Never replace an existing object: a job whose output already exists fails
    /// (`OutputExists`) and the object stays as it was.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub create_only: bool,
}

fn default_termination_grace() -> i64 {
    DEFAULT_TERMINATION_GRACE_SECONDS
}

/// The model volume: a PersistentVolumeClaim (or a host path on single-node setups).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.claimName) != has(self.hostPath)").message("set exactly one of claimName and hostPath"))]
pub struct ModelVolume {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// Mount path in the worker (passed as `--models`).
    #[serde(default = "default_mount_path")]
    pub mount_path: String,
    /// Sub-directory of the volume to mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

fn default_mount_path() -> String {
    DEFAULT_MODEL_MOUNT_PATH.to_string()
}

/// FLUX.1-Fill-dev transformer weights: GGUF quantisations or the bf16 original.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ModelVariant {
    #[serde(rename = "q4_0")]
    Q4_0,
    #[serde(rename = "q4_k_m")]
    Q4KM,
    #[default]
    #[serde(rename = "q5_k_m")]
    Q5KM,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "bf16")]
    Bf16,
}

impl ModelVariant {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelVariant::Q4_0 => "q4_0",
            ModelVariant::Q4KM => "q4_k_m",
            ModelVariant::Q5KM => "q5_k_m",
            ModelVariant::Q8_0 => "q8_0",
            ModelVariant::Bf16 => "bf16",
        }
    }
}

/// Queue depth of the pool.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QueueDepth {
    /// Jobs no worker has claimed yet.
    pub waiting: u64,
    /// Jobs claimed and not finished.
    pub running: u64,
}

/// Observed state of a pool. Written only by the operator.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InpaintPoolStatus {
    /// Replicas of the worker Deployment.
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub ready_replicas: u32,
    /// What the autoscaler wants.
    #[serde(default)]
    pub desired_replicas: u32,
    /// Workers processing a job.
    #[serde(default)]
    pub busy_workers: u32,
    #[serde(default)]
    pub queue: QueueDepth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl InpaintPoolStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        conditions::find(&self.conditions, type_)
    }
    pub fn set_condition(
        &mut self,
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: impl Into<String>,
        observed_generation: Option<i64>,
        now: Time,
    ) {
        conditions::set(
            &mut self.conditions,
            type_,
            status,
            reason,
            message.into(),
            observed_generation,
            now,
        );
    }
}

impl InpaintPool {
    /// Name of the Deployment the operator owns for this pool.
    pub fn deployment_name(&self) -> String {
        deployment_name(&kube::ResourceExt::name_any(self))
    }
}

/// `<pool>-worker`.
pub fn deployment_name(pool: &str) -> String {
    format!("{pool}-worker")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in() {
        let s: InpaintPoolSpec = serde_json::from_value(serde_json::json!({
            "worker": {"image": "ghcr.io/pawfect/worker:0.1"}
        }))
        .expect("minimal pool parses");
        assert_eq!(s.min_replicas, 0);
        assert_eq!(s.max_replicas, 1);
        assert_eq!(s.jobs_per_replica, 1);
        assert_eq!(s.poll_interval_seconds, 10);
        assert_eq!(s.scale_down_delay_seconds, 300);
        assert_eq!(s.worker.model_variant, ModelVariant::Q5KM);
        assert_eq!(s.worker.termination_grace_period_seconds, 900);
    }

    #[test]
    fn model_variants_round_trip() {
        for v in [
            ModelVariant::Q4_0,
            ModelVariant::Q4KM,
            ModelVariant::Q5KM,
            ModelVariant::Q8_0,
            ModelVariant::Bf16,
        ] {
            let j = serde_json::to_value(v).expect("serialises");
            assert_eq!(j, serde_json::Value::from(v.as_str()));
            assert_eq!(serde_json::from_value::<ModelVariant>(j).ok(), Some(v));
        }
    }

    #[test]
    fn deployment_is_named_after_the_pool() {
        assert_eq!(deployment_name("t4"), "t4-worker");
    }
}
