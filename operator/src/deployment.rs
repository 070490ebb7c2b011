//! The worker Deployment of a pool, built from `InpaintPool.spec` (pure).
//!
//! The pod runs `pawfect-worker serve --models <mount> --pool <queue pool> --worker-name
//! $(POD_NAME) --http-addr 0.0.0.0:8080` as a non-root user on a read-only root filesystem
//! (with an emptyDir at `/tmp`), requests one `nvidia.com/gpu` unless the pool says otherwise,
//! probes `/healthz` (liveness) and `/readyz` (readiness: models loaded), and gets
//! `terminationGracePeriodSeconds` from the pool so a worker can finish its job on SIGTERM.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use pawfect_api::InpaintPool;
use pawfect_api::pool::DEFAULT_MODEL_MOUNT_PATH;

/// Label every worker pod of a pool carries (value: the pool name); the Deployment selects on it.
pub const POOL_LABEL: &str = "inpaint.pawfect.dev/pool";
/// Extended resource of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Port the worker serves `/healthz`, `/readyz` and `/metrics` on.
pub const WORKER_HTTP_PORT: i32 = 8080;
/// UID and GID the worker runs as when the pool does not say otherwise.
pub const WORKER_UID: i64 = 65532;
const WORKER_NAME: &str = "pawfect-worker";
const CONTAINER_NAME: &str = "worker";

/// How the workers reach Redis (from the operator's `--worker-redis-*` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConnection {
    /// `PAWFECT_REDIS_URL` of the workers (no password in it).
    pub redis_url: String,
    /// Secret holding the Redis password, injected as `PAWFECT_REDIS_PASSWORD`.
    pub password_secret: Option<SecretKeyRef>,
    /// `PAWFECT_QUEUE_PREFIX`.
    pub queue_prefix: String,
    /// The CA of the Redis server's certificate (`rediss://` with a private CA), mounted into
    /// the workers and named by `PAWFECT_REDIS_CA_FILE`.
    pub ca: Option<CaSource>,
}

/// Where the worker pods find the Redis CA: a ConfigMap or Secret of that name in the pool's
/// namespace, and the key holding the PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    ConfigMap { name: String, key: String },
    Secret { name: String, key: String },
}

/// Directory the Redis CA is mounted at in worker pods.
pub const REDIS_CA_DIR: &str = "/etc/pawfect/redis-ca";
/// The file `PAWFECT_REDIS_CA_FILE` names (the source's key is mounted under this name).
pub const REDIS_CA_FILE: &str = "ca.crt";

fn ca_volume(ca: &CaSource) -> Volume {
    let item = |key: &str| {
        Some(vec![KeyToPath {
            key: key.to_string(),
            path: REDIS_CA_FILE.to_string(),
            ..Default::default()
        }])
    };
    match ca {
        CaSource::ConfigMap { name, key } => Volume {
            name: "redis-ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.clone(),
                items: item(key),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
        CaSource::Secret { name, key } => Volume {
            name: "redis-ca".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(name.clone()),
                items: item(key),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

/// A key of a Secret in the pool's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// Labels the Deployment selects its pods with.
pub fn selector_labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            WORKER_NAME.to_string(),
        ),
        (POOL_LABEL.to_string(), pool.to_string()),
    ])
}

/// `key=value,…` form of [`selector_labels`] for list calls.
pub fn label_selector(pool: &str) -> String {
    selector_labels(pool)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(pool: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(pool);
    l.insert("app.kubernetes.io/instance".into(), pool.to_string());
    l.insert("app.kubernetes.io/component".into(), "worker".into());
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "pawfect-operator".into(),
    );
    l
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.to_string(),
            }),
            ..Default::default()
        }),
    }
}

/// Container resources: the pool's, with `nvidia.com/gpu: 1` in the limits when the pool
/// names no GPU amount (a GPU request without a limit is copied into the limits, which
/// extended resources require).
pub fn worker_resources(given: Option<&ResourceRequirements>) -> ResourceRequirements {
    let mut r = given.cloned().unwrap_or_default();
    let in_limits = r
        .limits
        .as_ref()
        .is_some_and(|l| l.contains_key(GPU_RESOURCE));
    if !in_limits {
        let amount = r
            .requests
            .as_ref()
            .and_then(|q| q.get(GPU_RESOURCE).cloned())
            .unwrap_or_else(|| Quantity("1".into()));
        r.limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.to_string(), amount);
    }
    r
}

/// How long a worker may keep running its job after SIGTERM before it hands the job back:
/// the grace period less a margin (a tenth, at least 10 s) for the hand-back itself.
pub fn drain_seconds(termination_grace_seconds: i64) -> i64 {
    let margin = (termination_grace_seconds / 10).max(10);
    (termination_grace_seconds - margin).max(1)
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// `spec.worker.storage` as worker flags: one `--allow-prefix` per allowed prefix, and
/// `--no-overwrite` for `createOnly`.
fn storage_args(storage: Option<&pawfect_api::WorkerStorage>) -> Vec<String> {
    let Some(s) = storage else {
        return Vec::new();
    };
    let mut args = Vec::new();
    for p in &s.allowed_prefixes {
        args.push("--allow-prefix".to_string());
        args.push(p.clone());
    }
    if s.create_only {
        args.push("--no-overwrite".into());
    }
    args
}

/// The pool's worker Deployment with `replicas` set (the operator is its only writer) and an
/// owner reference to the pool, so deleting the pool deletes its workers.
pub fn build(pool: &InpaintPool, conn: &WorkerConnection, replicas: u32) -> Deployment {
    let name = pool.name_any();
    let w = &pool.spec.worker;
    let mount_path = w
        .model_volume
        .as_ref()
        .map(|v| v.mount_path.clone())
        .unwrap_or_else(|| DEFAULT_MODEL_MOUNT_PATH.to_string());

    let mut args = vec![
        "serve".to_string(),
        "--models".into(),
        mount_path.clone(),
        "--pool".into(),
        crate::queue_pool(&pool.namespace().unwrap_or_default(), &name),
        "--worker-name".into(),
        "$(POD_NAME)".into(),
        "--http-addr".into(),
        format!("0.0.0.0:{WORKER_HTTP_PORT}"),
    ];
    args.extend(storage_args(w.storage.as_ref()));
    args.extend(w.args.iter().cloned());

    let mut envs = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        env("PAWFECT_REDIS_URL", conn.redis_url.clone()),
    ];
    if let Some(s) = &conn.password_secret {
        envs.push(EnvVar {
            name: "PAWFECT_REDIS_PASSWORD".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: s.name.clone(),
                    key: s.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        });
    }
    if conn.ca.is_some() {
        envs.push(env(
            "PAWFECT_REDIS_CA_FILE",
            format!("{REDIS_CA_DIR}/{REDIS_CA_FILE}"),
        ));
    }
    envs.push(env("PAWFECT_QUEUE_PREFIX", conn.queue_prefix.clone()));
    envs.push(env("PAWFECT_MODEL_VARIANT", w.model_variant.as_str()));
    envs.push(env(
        "PAWFECT_DRAIN_TIMEOUT",
        format!("{}s", drain_seconds(w.termination_grace_period_seconds)),
    ));
    // The pool's env wins over ours by name (env is a map keyed by name under server-side apply:
    // duplicates would be rejected).
    for e in &w.env {
        envs.retain(|x| x.name != e.name);
        envs.push(e.clone());
    }

    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    if let Some(ca) = &conn.ca {
        volumes.push(ca_volume(ca));
        mounts.push(VolumeMount {
            name: "redis-ca".into(),
            mount_path: REDIS_CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    if let Some(mv) = &w.model_volume {
        volumes.push(Volume {
            name: "models".into(),
            persistent_volume_claim: mv.claim_name.as_ref().map(|c| {
                PersistentVolumeClaimVolumeSource {
                    claim_name: c.clone(),
                    read_only: Some(true),
                }
            }),
            host_path: mv.host_path.as_ref().map(|p| HostPathVolumeSource {
                path: p.clone(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "models".into(),
            mount_path: mv.mount_path.clone(),
            sub_path: mv.sub_path.clone(),
            read_only: Some(true),
            ..Default::default()
        });
    }

    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(w.image.clone()),
        image_pull_policy: w.image_pull_policy.clone(),
        command: Some(vec![WORKER_NAME.into()]),
        args: Some(args),
        env: Some(envs),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: WORKER_HTTP_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(worker_resources(w.resources.as_ref())),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..probe("/healthz", 10, 6)
        }),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        node_selector: (!w.node_selector.is_empty()).then(|| w.node_selector.clone()),
        tolerations: (!w.tolerations.is_empty()).then(|| w.tolerations.clone()),
        image_pull_secrets: (!w.image_pull_secrets.is_empty())
            .then(|| w.image_pull_secrets.clone()),
        service_account_name: w.service_account_name.clone(),
        // Workers talk to Redis and object storage, never to the Kubernetes API.
        automount_service_account_token: Some(false),
        priority_class_name: w.priority_class_name.clone(),
        termination_grace_period_seconds: Some(w.termination_grace_period_seconds),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            fs_group: Some(WORKER_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    Deployment {
        metadata: ObjectMeta {
            name: Some(pool.deployment_name()),
            namespace: pool.namespace(),
            labels: Some(labels(&name)),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                match_expressions: None,
            },
            // A rollout never takes a GPU away before its replacement is ready; old workers
            // drain their job within the grace period.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            revision_history_limit: Some(3),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&name)),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        },
        status: None,
    }
}

/// Makes the workers log in as their pool's own Redis user: `PAWFECT_REDIS_USERNAME`, the
/// password from key `password_key` of Secret `secret` (instead of a shared password), and
/// `version` as the pod-template annotation `annotation` (new credentials roll the pods).
pub fn with_pool_user(
    deploy: &mut Deployment,
    secret: &str,
    password_key: &str,
    username: &str,
    (annotation, version): (&str, &str),
) {
    let template = &mut deploy.spec.template;
    template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotation.to_string(), version.to_string());
    let containers = template.spec.as_mut().map(|p| p.containers.iter_mut());
    for c in containers.into_iter().flatten() {
        if c.name != CONTAINER_NAME {
            continue;
        }
        let env = c.env.get_or_insert_with(Vec::new);
        env.retain(|e| e.name != "PAWFECT_REDIS_PASSWORD" && e.name != "PAWFECT_REDIS_USERNAME");
        // Right after the URL, as the shared password would be.
        let at = env
            .iter()
            .position(|e| e.name == "PAWFECT_REDIS_URL")
            .map_or(env.len(), |i| i + 1);
        env.insert(at, self::env("PAWFECT_REDIS_USERNAME", username));
        env.insert(
            at + 1,
            EnvVar {
                name: "PAWFECT_REDIS_PASSWORD".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.to_string(),
                        key: password_key.to_string(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
            },
        );
    }
}

/// Gives the worker container `PAWFECT_LOG_FORMAT=<format>` (the operator's own log format), unless
/// the pool's env already sets it (the pool's env wins, as in [`build`]).
pub fn with_log_format(deploy: &mut Deployment, format: &str) {
    let containers = deploy
        .spec
        .template
        .spec
        .as_mut()
        .map(|p| p.containers.iter_mut());
    for c in containers.into_iter().flatten() {
        if c.name != CONTAINER_NAME {
            continue;
        }
        let env = c.env.get_or_insert_with(Vec::new);
        if !env.iter().any(|e| e.name == "PAWFECT_LOG_FORMAT") {
            env.push(self::env("PAWFECT_LOG_FORMAT", format));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool(spec: serde_json::Value) -> InpaintPool {
        let mut p = InpaintPool::new("t4", serde_json::from_value(spec).unwrap());
        p.metadata.namespace = Some("media".into());
        p.metadata.uid = Some("pool-uid".into());
        p
    }

    fn conn(secret: bool) -> WorkerConnection {
        WorkerConnection {
            redis_url: "redis://redis.pawfect:6379".into(),
            password_secret: secret.then(|| SecretKeyRef {
                name: "redis-auth".into(),
                key: "redis-password".into(),
            }),
            queue_prefix: "pawfect".into(),
            ca: None,
        }
    }

    #[test]
    fn a_pool_user_replaces_the_shared_password() {
        let p = pool(json!({"worker": {"image": "w:1"}}));
        let mut d = build(&p, &conn(true), 1);
        with_pool_user(
            &mut d,
            "t4-redis-user",
            "password",
            "pawfect:media/t4",
            ("inpaint.pawfect.dev/redis-credentials", "uid-1"),
        );
        let v = serde_json::to_value(&d).unwrap();
        let t = &v["spec"]["template"];
        assert_eq!(
            t["metadata"]["annotations"]["inpaint.pawfect.dev/redis-credentials"],
            "uid-1"
        );
        let env = t["spec"]["containers"][0]["env"].as_array().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        let url = names
            .iter()
            .position(|n| *n == "PAWFECT_REDIS_URL")
            .unwrap();
        assert_eq!(
            names[url + 1..url + 3],
            ["PAWFECT_REDIS_USERNAME", "PAWFECT_REDIS_PASSWORD"]
        );
        assert_eq!(
            names
                .iter()
                .filter(|n| **n == "PAWFECT_REDIS_PASSWORD")
                .count(),
            1
        );
        assert_eq!(env[url + 1]["value"], "pawfect:media/t4");
        assert_eq!(
            env[url + 2]["valueFrom"]["secretKeyRef"],
            json!({"name": "t4-redis-user", "key": "password", "optional": false})
        );
    }

    #[test]
    fn a_private_redis_ca_is_mounted_and_named() {
        let p = pool(json!({"worker": {"image": "w:1"}}));
        for (ca, source) in [
            (
                CaSource::ConfigMap {
                    name: "redis-ca".into(),
                    key: "ca.pem".into(),
                },
                json!({"configMap": {"name": "redis-ca", "optional": false,
                    "items": [{"key": "ca.pem", "path": "ca.crt"}]}}),
            ),
            (
                CaSource::Secret {
                    name: "redis-tls".into(),
                    key: "ca.crt".into(),
                },
                json!({"secret": {"secretName": "redis-tls", "optional": false,
                    "items": [{"key": "ca.crt", "path": "ca.crt"}]}}),
            ),
        ] {
            let c = WorkerConnection {
                ca: Some(ca),
                ..conn(false)
            };
            let v = serde_json::to_value(build(&p, &c, 1)).unwrap();
            let pod = &v["spec"]["template"]["spec"];
            let vol = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == "redis-ca")
                .expect("CA volume");
            let mut want = source.clone();
            want["name"] = json!("redis-ca");
            assert_eq!(vol, &want);
            let c0 = &pod["containers"][0];
            assert!(
                c0["volumeMounts"].as_array().unwrap().contains(
                    &json!({"name": "redis-ca", "mountPath": REDIS_CA_DIR, "readOnly": true})
                ),
                "{c0}"
            );
            let env = c0["env"].as_array().unwrap();
            assert!(
                env.contains(&json!({"name": "PAWFECT_REDIS_CA_FILE",
                    "value": "/etc/pawfect/redis-ca/ca.crt"})),
                "{env:?}"
            );
        }
        // No CA: neither volume nor variable.
        let v = serde_json::to_value(build(&p, &conn(false), 1)).unwrap();
        let text = v.to_string();
        assert!(!text.contains("redis-ca"), "{text}");
        assert!(!text.contains("PAWFECT_REDIS_CA_FILE"), "{text}");
    }

    #[test]
    fn minimal_pool_gets_a_safe_gpu_worker() {
        let d = build(
            &pool(json!({"worker": {"image": "ghcr.io/pawfect/worker:0.1"}})),
            &conn(false),
            3,
        );
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["metadata"]["name"], "t4-worker");
        assert_eq!(v["metadata"]["namespace"], "media");
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "InpaintPool");
        assert_eq!(owner["name"], "t4");
        assert_eq!(owner["uid"], "pool-uid");
        assert_eq!(owner["controller"], true);
        assert_eq!(v["spec"]["replicas"], 3);
        assert_eq!(
            v["spec"]["selector"]["matchLabels"],
            json!({"app.kubernetes.io/name": "pawfect-worker", "inpaint.pawfect.dev/pool": "t4"})
        );
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["terminationGracePeriodSeconds"], 900);
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let c = &pod["containers"][0];
        assert_eq!(c["image"], "ghcr.io/pawfect/worker:0.1");
        assert_eq!(c["command"], json!(["pawfect-worker"]));
        assert_eq!(
            c["args"],
            json!([
                "serve",
                "--models",
                "/models",
                "--pool",
                "media/t4",
                "--worker-name",
                "$(POD_NAME)",
                "--http-addr",
                "0.0.0.0:8080"
            ])
        );
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(
            c["volumeMounts"],
            json!([{"name": "tmp", "mountPath": "/tmp"}])
        );
        let env = c["env"].as_array().unwrap();
        let get = |n: &str| env.iter().find(|e| e["name"] == n).cloned();
        assert_eq!(
            get("POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(
            get("PAWFECT_REDIS_URL").unwrap()["value"],
            "redis://redis.pawfect:6379"
        );
        assert_eq!(get("PAWFECT_QUEUE_PREFIX").unwrap()["value"], "pawfect");
        assert_eq!(get("PAWFECT_MODEL_VARIANT").unwrap()["value"], "q5_k_m");
        assert!(get("PAWFECT_REDIS_PASSWORD").is_none());
        assert_eq!(get("PAWFECT_DRAIN_TIMEOUT").unwrap()["value"], "810s");
    }

    #[test]
    fn storage_policy_becomes_worker_flags_before_the_pool_args() {
        let d = build(
            &pool(json!({
                "worker": {
                    "image": "w:1",
                    "storage": {
                        "allowedPrefixes": ["s3://photos/uploads/", "gs://results"],
                        "createOnly": true
                    },
                    "args": ["--steps-log"]
                }
            })),
            &conn(false),
            1,
        );
        let v = serde_json::to_value(&d).unwrap();
        let args = &v["spec"]["template"]["spec"]["containers"][0]["args"];
        let args: Vec<&str> = args
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            args[9..],
            [
                "--allow-prefix",
                "s3://photos/uploads/",
                "--allow-prefix",
                "gs://results",
                "--no-overwrite",
                "--steps-log"
            ]
        );
        // No storage policy: no flags (the worker then refuses every object-store URI).
        let plain = build(&pool(json!({"worker": {"image": "w:1"}})), &conn(false), 1);
        let v = serde_json::to_value(&plain).unwrap();
        let args = v["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(
            !args.contains("--allow-prefix") && !args.contains("--no-overwrite"),
            "{args}"
        );
    }

    #[test]
    fn full_pool_spec_is_honoured() {
        let d = build(
            &pool(json!({
                "minReplicas": 0, "maxReplicas": 4,
                "worker": {
                    "image": "w:1", "imagePullPolicy": "IfNotPresent",
                    "imagePullSecrets": [{"name": "ghcr"}],
                    "resources": {"requests": {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "2"}},
                    "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "env": [{"name": "RUST_LOG", "value": "debug"}, {"name": "PAWFECT_MODEL_VARIANT", "value": "q8_0"}],
                    "modelVolume": {"claimName": "flux-weights", "mountPath": "/weights", "subPath": "v1"},
                    "modelVariant": "q4_k_m",
                    "args": ["--steps-log"],
                    "serviceAccountName": "worker",
                    "terminationGracePeriodSeconds": 1800,
                    "priorityClassName": "gpu-batch"
                }
            })),
            &conn(true),
            0,
        );
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["spec"]["replicas"], 0);
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(
            pod["nodeSelector"]["cloud.google.com/gke-accelerator"],
            "nvidia-tesla-t4"
        );
        assert_eq!(pod["tolerations"][0]["key"], "nvidia.com/gpu");
        assert_eq!(pod["imagePullSecrets"][0]["name"], "ghcr");
        assert_eq!(pod["serviceAccountName"], "worker");
        assert_eq!(pod["priorityClassName"], "gpu-batch");
        assert_eq!(pod["terminationGracePeriodSeconds"], 1800);
        assert_eq!(
            pod["volumes"][1],
            json!({"name": "models", "persistentVolumeClaim": {"claimName": "flux-weights", "readOnly": true}})
        );
        let c = &pod["containers"][0];
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["args"][2], "/weights");
        assert_eq!(c["args"][9], "--steps-log");
        assert_eq!(
            c["volumeMounts"][1],
            json!({"name": "models", "mountPath": "/weights", "subPath": "v1", "readOnly": true})
        );
        // A GPU request without a limit is copied into the limits.
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "2");
        assert_eq!(c["resources"]["requests"]["cpu"], "4");
        let env = c["env"].as_array().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        let mut dedup = names.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len(), "duplicate env names: {names:?}");
        let get = |n: &str| env.iter().find(|e| e["name"] == n).cloned().unwrap();
        // The pool's env overrides the operator's.
        assert_eq!(get("PAWFECT_MODEL_VARIANT")["value"], "q8_0");
        assert_eq!(get("RUST_LOG")["value"], "debug");
        assert_eq!(
            get("PAWFECT_REDIS_PASSWORD")["valueFrom"]["secretKeyRef"],
            json!({"name": "redis-auth", "key": "redis-password", "optional": false})
        );
    }

    #[test]
    fn host_path_models_and_explicit_gpu_limit() {
        let d = build(
            &pool(json!({"worker": {
                "image": "w:1",
                "resources": {"limits": {"nvidia.com/gpu": "0"}},
                "modelVolume": {"hostPath": "/srv/models"}
            }})),
            &conn(false),
            1,
        );
        let v = serde_json::to_value(&d).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][1]["hostPath"]["path"], "/srv/models");
        let c = &pod["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "0");
        assert_eq!(c["args"][2], "/models");
    }

    #[test]
    fn workers_log_in_the_operators_format_unless_the_pool_says_otherwise() {
        let log_format = |spec: serde_json::Value| {
            let mut d = build(&pool(spec), &conn(false), 1);
            with_log_format(&mut d, "json");
            let v = serde_json::to_value(&d).unwrap();
            let env = v["spec"]["template"]["spec"]["containers"][0]["env"].clone();
            let found: Vec<serde_json::Value> = env
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "PAWFECT_LOG_FORMAT")
                .map(|e| e["value"].clone())
                .collect();
            found
        };
        assert_eq!(
            log_format(json!({"worker": {"image": "w:1"}})),
            [json!("json")]
        );
        assert_eq!(
            log_format(json!({"worker": {"image": "w:1",
                "env": [{"name": "PAWFECT_LOG_FORMAT", "value": "text"}]}})),
            [json!("text")]
        );
        // Without the call (a context with no log format), the workers keep their default.
        let d = build(&pool(json!({"worker": {"image": "w:1"}})), &conn(false), 1);
        assert!(
            !serde_json::to_string(&d)
                .unwrap()
                .contains("PAWFECT_LOG_FORMAT")
        );
    }

    #[test]
    fn drain_fits_in_the_grace_period() {
        assert_eq!(drain_seconds(900), 810);
        assert_eq!(drain_seconds(30), 20);
        assert_eq!(drain_seconds(86400), 77760);
        assert_eq!(drain_seconds(5), 1);
    }

    #[test]
    fn selector_string() {
        assert_eq!(
            label_selector("t4"),
            "app.kubernetes.io/name=pawfect-worker,inpaint.pawfect.dev/pool=t4"
        );
    }
}
