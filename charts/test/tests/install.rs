//! The chart against a real kube-apiserver v1.37 (+ etcd + kube-controller-manager, from
//! `scripts/local-k8s.sh` through `pawfect-control-plane`): real `helm install`, `upgrade` and
//! `uninstall`, no `--api-versions`, the server deciding what is valid.
//!
//! - every value set (defaults and each `ci/*-values.yaml`) installs: the server accepts every
//!   object of the release (strictly: helm 4 applies server-side, and any server warning fails
//!   the test) and the default InpaintPool, applied from its ConfigMap the way the operator does
//!   it, carries the chart's GPU settings;
//! - the life of one release on a cluster of its own, as the chart README tells it: one `helm
//!   install` brings the CRDs, the RBAC, Redis and the operator, and the operator (the real
//!   binary, run out of cluster with the flags of the stored Deployment and a token of the chart's
//!   ServiceAccount, so the chart's RBAC is what it gets) brings up the default pool and its worker
//!   Deployment; the generated Redis password survives upgrades; an upgrade applies a changed CRD
//!   and a changed pool; a second release in another namespace must not install the CRDs again,
//!   nor reuse the release name (the ClusterRole is named after it); uninstall keeps the CRDs, the
//!   jobs and the model PVC, and the garbage collector removes the pool, its worker Deployment
//!   and what the operator Deployment owned.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use pawfect_api::InpaintPool;
use pawfect_chart_tests::{
    Manifest, ValueSet, chart_dir, committed_crd_files, helm_cluster, split_manifests,
    workspace_root,
};
use pawfect_control_plane::{ControlPlane, api_message, apply, apply_crds, dynamic_api};
use pawfect_operator::default_pool::{self, DefaultPoolError};
use pawfect_queue::testing::RedisServer;
use serde_json::{Value, json};

const MANAGER: &str = "pawfect-chart-tests";
const CI_SETS: [&str; 4] = [
    "external-redis",
    "no-crds",
    "metrics-netpol",
    "ha-namespaced",
];

/// The server's warnings in helm's output. The CRDs draw "unrecognized format" warnings for the
/// `uint32`/`uint64` formats schemars writes (the server ignores formats it does not know); any
/// other warning (an unknown field dropped, a deprecated API) fails the test.
fn unexpected_warnings(helm_output: &str) -> Vec<&str> {
    helm_output
        .lines()
        .filter(|l| l.contains("Warning"))
        .filter(|l| {
            !l.contains("unrecognized format \\\"uint") && !l.contains("unrecognized format \"uint")
        })
        .collect()
}

/// Stand-ins for the Prometheus Operator's CRDs (any spec accepted), so that the ServiceMonitor,
/// PodMonitor and PrometheusRule of `metrics-netpol` have an API to go to. Their schema is the
/// Prometheus Operator's business, not checked here.
fn prometheus_operator_stub_crds() -> Vec<Value> {
    ["ServiceMonitor", "PodMonitor", "PrometheusRule"]
        .into_iter()
        .map(|kind| {
            let plural = format!("{}s", kind.to_lowercase());
            json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
                "spec": {
                    "group": "monitoring.coreos.com",
                    "scope": "Namespaced",
                    "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
                    "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                        "type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
                }
            })
        })
        .collect()
}

/// Every object helm recorded for the release (`helm get manifest`), read back from the server.
async fn release_objects(
    cp: &ControlPlane,
    client: &Client,
    release: &str,
    ns: &str,
) -> Vec<(Manifest, Value)> {
    let manifest = helm_cluster(cp, &["get", "manifest", release, "--namespace", ns])
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::new();
    for m in split_manifests(&manifest).unwrap() {
        let (api, name, _) = dynamic_api(client, None, &m.value)
            .await
            .unwrap_or_else(|e| {
                panic!("{release}: {} {}: {}", m.kind(), m.name(), api_message(&e))
            });
        let stored = api.get(&name).await.unwrap_or_else(|e| {
            panic!(
                "{release}: {} {name} is not on the server: {}",
                m.kind(),
                api_message(&e)
            )
        });
        out.push((m, serde_json::to_value(stored).unwrap()));
    }
    out
}

/// The kinds of the release's objects as rendered offline (hooks, which `helm install` does not
/// create, left out).
fn rendered_kinds(v: &ValueSet, namespace: &str) -> Vec<String> {
    let rendered = v.render_in(namespace).unwrap_or_else(|e| panic!("{e}"));
    let mut k: Vec<String> = split_manifests(&rendered)
        .unwrap()
        .iter()
        .filter(|m| !m.value["metadata"]["annotations"]["helm.sh/hook"].is_string())
        .map(|m| m.kind().to_string())
        .collect();
    k.sort();
    k
}

/// The chart's GPU settings in the pool the server stored (schema defaults applied).
fn check_default_pool(name: &str, ns: &str, stored: &Value) {
    let pool: pawfect_api::InpaintPool = serde_json::from_value(stored.clone())
        .unwrap_or_else(|e| panic!("{name}: the stored pool does not deserialise: {e}\n{stored}"));
    assert_eq!(pool.metadata.name.as_deref(), Some("default"));
    assert_eq!(pool.metadata.namespace.as_deref(), Some(ns));
    let w = &pool.spec.worker;
    let limits = w
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1", "{name}");
    assert!(
        w.tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")
                && t.operator.as_deref() == Some("Exists")
                && t.effect.as_deref() == Some("NoSchedule")),
        "{name}"
    );
    assert!(
        w.image.starts_with("ghcr.io/pawfect-inpaint/worker:"),
        "{name}"
    );
    let volume = w.model_volume.as_ref().unwrap();
    assert_eq!(volume.mount_path, "/models");
    assert!(volume.claim_name.is_some(), "{name}");
}

#[tokio::test]
async fn every_value_set_installs_into_the_real_api_server() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    // The CRDs as `kubectl apply -f crds/` installs them (the chart's own CRD install is the
    // lifecycle test's, on a cluster of its own: CRDs are cluster-wide).
    apply_crds(&client, &committed_crd_files().unwrap())
        .await
        .unwrap();
    for crd in prometheus_operator_stub_crds() {
        apply(&client, None, &crd, MANAGER).await.unwrap();
    }
    let mut sets = vec![ValueSet::defaults()];
    sets.extend(CI_SETS.iter().map(|n| ValueSet::ci(n)));
    for v in sets {
        let ns = cp.namespace(&client, &format!("chart-{}", v.name)).await;
        let mut v = v.set("crds.install=false");
        if v.name == "ha-namespaced" {
            v = v.set(&format!("operator.watchNamespace={ns}"));
        }
        let release = v.name;
        let out = v
            .helm_on(cp, "install", release, &ns, &[])
            .unwrap_or_else(|e| panic!("value set {}: helm install: {e}", v.name));
        assert!(
            unexpected_warnings(&out).is_empty(),
            "value set {}: the API server warned:\n{out}",
            v.name
        );
        let objects = release_objects(cp, &client, release, &ns).await;
        let mut kinds: Vec<String> = objects.iter().map(|(m, _)| m.kind().to_string()).collect();
        kinds.sort();
        // What helm installed is what the chart renders offline for a cluster that knows the CRDs.
        assert_eq!(kinds, rendered_kinds(&v, &ns), "value set {}", v.name);
        // The default pool, applied from the stored ConfigMap by the operator's own code.
        let configmap = objects
            .iter()
            .find(|(m, _)| m.kind() == "ConfigMap" && m.name().ends_with("-default-pool"));
        assert_eq!(
            configmap.is_some(),
            v.name != "no-crds",
            "value set {}",
            v.name
        );
        if let Some((m, _)) = configmap {
            let pool = default_pool::apply(&client, &ns, m.name())
                .await
                .unwrap_or_else(|e| panic!("value set {}: {e}", v.name));
            check_default_pool(v.name, &ns, &serde_json::to_value(pool).unwrap());
        }
    }
}

#[tokio::test]
async fn the_api_server_rejects_a_bad_default_pool() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    apply_crds(&client, &committed_crd_files().unwrap())
        .await
        .unwrap();
    let ns = cp.namespace(&client, "bad-pool").await;
    let release = "bad-pool";
    ValueSet::defaults()
        .set("crds.install=false")
        .helm_on(cp, "install", release, &ns, &[])
        .unwrap_or_else(|e| panic!("helm install: {e}"));
    let cm_name = format!("{release}-pawfect-inpaint-default-pool");
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let stored = configmaps.get(&cm_name).await.unwrap();
    let pool: Value = serde_json::from_str(&stored.data.as_ref().unwrap()["pool.json"]).unwrap();
    // What the chart renders is valid...
    default_pool::apply(&client, &ns, &cm_name)
        .await
        .unwrap_or_else(|e| panic!("the chart's default pool was refused: {e}"));
    // ...and a manifest the CRD refuses fails the operator's apply with the server's own message
    // (the operator logs it and reports it as a Warning Event on the ConfigMap); one that is not an
    // InpaintPool at all fails before it reaches the server.
    let cases: [(&str, Value, bool, &str); 4] = [
        (
            "min > max",
            json!({"minReplicas": 5, "maxReplicas": 2}),
            true,
            "minReplicas must not exceed maxReplicas",
        ),
        (
            "out of range",
            json!({"jobsPerReplica": 0}),
            true,
            "spec.jobsPerReplica: Invalid value: 0",
        ),
        (
            "bad scale-down delay",
            json!({"scaleDownDelaySeconds": 100000}),
            true,
            "spec.scaleDownDelaySeconds",
        ),
        (
            "unknown variant",
            json!({"worker": {"modelVariant": "q3_k"}}),
            false,
            "unknown variant `q3_k`",
        ),
    ];
    for (what, patch, by_server, expect) in cases {
        let mut bad = pool.clone();
        merge(&mut bad["spec"], &patch);
        configmaps
            .patch(
                &cm_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"pool.json": bad.to_string()}})),
            )
            .await
            .unwrap();
        let err = default_pool::apply(&client, &ns, &cm_name)
            .await
            .expect_err(what);
        let msg = err.to_string();
        assert_eq!(
            matches!(err, DefaultPoolError::Rejected { .. }),
            by_server,
            "{what}: {msg}"
        );
        assert!(
            msg.contains(expect),
            "{what}: expected {expect:?} in: {msg}"
        );
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    // Generous for a loaded two-core runner; the server answers in milliseconds.
    eventually_with(what, Duration::from_secs(60), check, String::new).await
}

/// Retries `check` until it passes or `timeout` ends; on failure panics with its last error and
/// `context()` (e.g. a log).
async fn eventually_with<F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
    context: impl Fn() -> String,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!("{what}: {e}\n{}", context())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A copy of the chart whose InpaintJob CRD has one more optional spec field, `spec.note`.
fn chart_with_a_new_crd_field(dir: &Path) -> PathBuf {
    let chart = dir.join("pawfect-inpaint");
    copy_dir(&chart_dir(), &chart);
    let crd = chart.join("templates/crds/inpaintjobs.inpaint.pawfect.dev.yaml");
    let text = std::fs::read_to_string(&crd).unwrap();
    let anchor = "              pool:\n";
    assert!(
        text.contains(anchor),
        "the InpaintJob CRD has no spec.pool property"
    );
    let changed = text.replacen(
        anchor,
        "              note:\n                description: A free-form note (upgrade test).\n                type: string\n              pool:\n",
        1,
    );
    std::fs::write(&crd, changed).unwrap();
    chart
}

async fn redis_password(client: &Client, ns: &str) -> String {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get("pawfect-inpaint-redis")
        .await
        .expect("the generated Redis Secret");
    String::from_utf8(s.data.unwrap()["redis-password"].0.clone()).unwrap()
}

/// The operator as its pod would run it: the real binary with the container args of the stored
/// operator Deployment, a token of its ServiceAccount (so the chart's RBAC is all it has), and a
/// local Redis in place of the in-cluster one (no kubelet runs pods here).
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    async fn start(cp: &ControlPlane, client: &Client, ns: &str, redis: &RedisServer) -> Self {
        let deploy = Api::<Deployment>::namespaced(client.clone(), ns)
            .get("pawfect-inpaint-operator")
            .await
            .expect("the operator Deployment");
        let pod = deploy.spec.template.spec.expect("the operator's pod spec");
        let sa = pod.service_account_name.clone().unwrap();
        let c = pod
            .containers
            .iter()
            .find(|c| c.name == "operator")
            .expect("the operator container");
        let http = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let args: Vec<String> = c
            .args
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                if a.starts_with("--redis-url=") {
                    format!("--redis-url={}", redis.url())
                } else if a.starts_with("--http-addr=") {
                    format!("--http-addr={http}")
                } else {
                    a
                }
            })
            .collect();
        let kubeconfig = cp.service_account_kubeconfig(client, ns, &sa).await;
        let log = cp
            .dir()
            .join(format!("operator-{ns}-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pawfect-operator-chart-tests"))
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", ns)
            .env("POD_NAME", "pawfect-inpaint-operator-0")
            .env_remove("PAWFECT_REDIS_PASSWORD")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the operator binary");
        Operator { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The default pool Ready (its Deployment applied), owned by the chart's ConfigMap, and its worker
/// Deployment owned by the pool; returns the stored pool.
async fn default_pool_is_up(client: &Client, ns: &str, op: &Operator) -> Value {
    let pools = Api::<InpaintPool>::namespaced(client.clone(), ns);
    let deploys = Api::<Deployment>::namespaced(client.clone(), ns);
    eventually_with(
        "the default pool Ready with its worker Deployment",
        Duration::from_secs(90),
        || async {
            let pool = pools
                .get_opt("default")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no pool yet")?;
            let ready = pool
                .status
                .as_ref()
                .and_then(|s| s.condition(pawfect_api::conditions::READY))
                .is_some_and(|c| c.status == "True");
            if !ready {
                return Err(format!("pool status {:?}", pool.status));
            }
            let owner = pool.metadata.owner_references.clone().unwrap_or_default();
            if !owner
                .iter()
                .any(|o| o.kind == "ConfigMap" && o.name == "pawfect-inpaint-default-pool")
            {
                return Err(format!("pool owners {owner:?}"));
            }
            let d = deploys
                .get_opt("default-worker")
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no worker Deployment yet")?;
            let pool_uid = pool.metadata.uid.clone();
            if !d
                .metadata
                .owner_references
                .unwrap_or_default()
                .iter()
                .any(|o| o.kind == "InpaintPool" && Some(&o.uid) == pool_uid.as_ref())
            {
                return Err("the worker Deployment is not the pool's".into());
            }
            Ok(())
        },
        || op.log(),
    )
    .await;
    serde_json::to_value(pools.get("default").await.unwrap()).unwrap()
}

/// `helm test`'s check as its pod would run it (no kubelet here): the hook objects helm stored
/// for the release (`helm get hooks`) applied, the pod's own args with the local Redis, and a token
/// of the hook's ServiceAccount, so that its Role is all it has.
async fn helm_test_check(
    cp: &ControlPlane,
    client: &Client,
    release: &str,
    ns: &str,
    redis: &RedisServer,
) {
    let hooks = helm_cluster(cp, &["get", "hooks", release, "--namespace", ns])
        .unwrap_or_else(|e| panic!("{e}"));
    let hooks = split_manifests(&hooks).unwrap();
    let pod = hooks
        .iter()
        .find(|m| m.kind() == "Pod")
        .expect("the helm test pod among the hooks");
    for m in hooks.iter().filter(|m| m.kind() != "Pod") {
        apply(client, Some(ns), &m.value, MANAGER)
            .await
            .unwrap_or_else(|e| panic!("hook {} {}: {}", m.kind(), m.name(), api_message(&e)));
    }
    // The pod itself, as the server takes it (it stays Pending: no kubelet).
    apply(client, Some(ns), &pod.value, MANAGER)
        .await
        .unwrap_or_else(|e| panic!("the helm test pod: {}", api_message(&e)));
    let sa = pod.value["spec"]["serviceAccountName"]
        .as_str()
        .expect("the test pod's ServiceAccount");
    let kubeconfig = cp.service_account_kubeconfig(client, ns, sa).await;
    let args: Vec<String> = pod.value["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            if a.starts_with("--redis-url=") {
                format!("--redis-url={}", redis.url())
            } else {
                a.to_string()
            }
        })
        .collect();
    let check = |args: &[String], password: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pawfect-operator-chart-tests"));
        cmd.args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("PAWFECT_REDIS_PASSWORD")
            .stdin(Stdio::null());
        if let Some(p) = password {
            cmd.env("PAWFECT_REDIS_PASSWORD", p);
        }
        let out = cmd.output().expect("run pawfect-operator check");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = check(&args, None);
    assert!(ok, "helm test's check failed: {args:?}\n{out}");
    assert!(out.contains(": PONG"), "{out}");
    assert!(
        out.contains(&format!("InpaintPool {ns}/default: Ready=True")),
        "{out}"
    );
    // Its account reads that one pool only.
    let other: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("--pool=") {
                format!("--pool={ns}/other")
            } else if a.starts_with("--timeout=") {
                "--timeout=1s".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let (ok, out) = check(&other, None);
    assert!(!ok && out.contains("forbidden"), "{out}");
    // A password Redis does not take fails the check (this Redis has none).
    let (ok, out) = check(&args, Some("not-the-password"));
    assert!(!ok && out.contains("Redis"), "{out}");
    // A passed test deletes its hook objects (hook-delete-policy hook-succeeded).
    for m in &hooks {
        let (api, name, _) = dynamic_api(client, Some(ns), &m.value).await.unwrap();
        api.delete(&name, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("delete hook {}: {}", m.name(), api_message(&e)));
    }
}

/// The chart runs the operator without `--allow-host-path-models`: a pool whose models come from
/// a hostPath gets no Deployment, `Ready=False/HostPathNotAllowed` and a Warning Event.
async fn host_path_pool_is_refused(client: &Client, ns: &str, op: &Operator) {
    let pool = json!({
        "apiVersion": "inpaint.pawfect.dev/v1alpha1", "kind": "InpaintPool",
        "metadata": {"name": "node-models", "namespace": ns},
        "spec": {"worker": {"image": "w:1", "modelVolume": {"hostPath": "/srv/models"}}},
    });
    apply(client, Some(ns), &pool, MANAGER)
        .await
        .unwrap_or_else(|e| panic!("{}", api_message(&e)));
    let pools = Api::<InpaintPool>::namespaced(client.clone(), ns);
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns);
    eventually_with(
        "the hostPath pool refused",
        Duration::from_secs(60),
        || async {
            let p = pools.get("node-models").await.map_err(|e| e.to_string())?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.condition(pawfect_api::conditions::READY))
                .ok_or("no Ready condition yet")?;
            if ready.status != "False" || ready.reason != "HostPathNotAllowed" {
                return Err(format!("Ready {} {}", ready.status, ready.reason));
            }
            if !(ready.message.contains("/srv/models")
                && ready.message.contains("--allow-host-path-models"))
            {
                return Err(format!("message: {}", ready.message));
            }
            let warned = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("HostPathNotAllowed")
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("node-models")
                });
            warned
                .then_some(())
                .ok_or("no Warning Event yet".to_string())
        },
        || op.log(),
    )
    .await;
    assert!(
        Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt("node-models-worker")
            .await
            .unwrap()
            .is_none(),
        "a refused pool got a worker Deployment"
    );
    pools
        .delete("node-models", &Default::default())
        .await
        .unwrap();
}

/// A kubeconfig of the admin that acts as `user` (impersonation: `as` in the kubeconfig), so
/// that only the RBAC bound to `user` applies.
fn impersonating_kubeconfig(cp: &ControlPlane, user: &str) -> PathBuf {
    let mut kc: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(cp.kubeconfig()).unwrap()).unwrap();
    for u in kc["users"].as_array_mut().unwrap() {
        u["user"]["as"] = user.into();
    }
    let path = cp
        .dir()
        .join(format!("as-{user}-{}.kubeconfig", std::process::id()));
    std::fs::write(&path, kc.to_string()).unwrap();
    path
}

/// The control plane's own controller-manager runs only the controllers the other tests need;
/// the ClusterRole aggregation controller (which fills `edit`, `view`, `admin` from the labelled
/// ClusterRoles) runs here, the same binary with the same credentials, for the test that needs it.
struct AggregationController(Child);

impl AggregationController {
    fn start(cp: &ControlPlane) -> Self {
        let env = std::fs::read_to_string(cp.dir().join("env")).unwrap();
        let bin = env
            .lines()
            .find_map(|l| l.strip_prefix("PAWFECT_K8S_BIN="))
            .expect("PAWFECT_K8S_BIN in the control plane's env");
        let pki = cp.dir().join("pki");
        let kubeconfig = pki.join("controller-manager.kubeconfig");
        let log = std::fs::File::create(
            cp.dir()
                .join(format!("aggregation-controller-{}.log", std::process::id())),
        )
        .unwrap();
        let child = Command::new(Path::new(bin).join("kube-controller-manager"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--authentication-kubeconfig")
            .arg(&kubeconfig)
            .arg("--authorization-kubeconfig")
            .arg(&kubeconfig)
            .args([
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                "0",
                "--leader-elect=false",
                "--controllers",
                "clusterrole-aggregation-controller",
                "--use-service-account-credentials",
            ])
            .arg("--service-account-private-key-file")
            .arg(pki.join("sa.key"))
            .arg("--root-ca-file")
            .arg(pki.join("ca.crt"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start kube-controller-manager (clusterrole-aggregation)");
        AggregationController(child)
    }
}

impl Drop for AggregationController {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `client` may create `manifest` (a server-side dry run: nothing is stored).
async fn may_create(client: &Client, ns: &str, manifest: &Value) -> Result<(), String> {
    let (api, _, manifest) = dynamic_api(client, Some(ns), manifest)
        .await
        .map_err(|e| api_message(&e))?;
    let obj: kube::api::DynamicObject = serde_json::from_value(manifest).unwrap();
    api.create(
        &kube::api::PostParams {
            dry_run: true,
            ..Default::default()
        },
        &obj,
    )
    .await
    .map(|_| ())
    .map_err(|e| api_message(&e))
}

fn is_forbidden(r: &Result<(), String>) -> bool {
    r.as_ref().is_err_and(|e| e.contains("forbidden"))
}

#[tokio::test]
async fn edit_may_submit_jobs_view_may_read_and_only_pool_admins_create_pools() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    apply_crds(&client, &committed_crd_files().unwrap())
        .await
        .unwrap();
    let _aggregation = AggregationController::start(cp);
    let ns = cp.namespace(&client, "roles").await;
    let release = "roles";
    ValueSet::defaults()
        .set("crds.install=false")
        .set("pool.create=false")
        .helm_on(cp, "install", release, &ns, &[])
        .unwrap_or_else(|e| panic!("helm install: {e}"));
    // The built-in roles pick the chart's rules up.
    let roles = Api::<ClusterRole>::all(client.clone());
    eventually_with(
        "edit and view aggregate the chart's roles",
        Duration::from_secs(90),
        || async {
            let has = |r: ClusterRole, verb: &str, resource: &str| {
                r.rules.unwrap_or_default().iter().any(|rule| {
                    rule.resources
                        .as_ref()
                        .is_some_and(|rs| rs.iter().any(|x| x == resource))
                        && rule.verbs.iter().any(|v| v == verb)
                        && rule
                            .api_groups
                            .as_ref()
                            .is_some_and(|g| g.iter().any(|g| g == "inpaint.pawfect.dev"))
                })
            };
            let edit = roles.get("edit").await.map_err(|e| e.to_string())?;
            let view = roles.get("view").await.map_err(|e| e.to_string())?;
            let admin = roles.get("admin").await.map_err(|e| e.to_string())?;
            (has(edit, "create", "inpaintjobs")
                && has(view, "list", "inpaintpools")
                && has(admin, "delete", "inpaintjobs"))
            .then_some(())
            .ok_or("not yet".to_string())
        },
        || cp.log_tail("kube-apiserver", 20),
    )
    .await;
    for (user, role) in [
        ("alice", "edit"),
        ("bob", "view"),
        ("carol", "roles-pawfect-inpaint-pool-admin"),
    ] {
        let rb = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": user, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        });
        apply(&client, Some(&ns), &rb, MANAGER).await.unwrap();
    }
    let as_user = |u: &'static str| async move {
        let kubeconfig = impersonating_kubeconfig(cp, u);
        cp.client_for(&kubeconfig).await
    };
    let (alice, bob, carol) = (
        as_user("alice").await,
        as_user("bob").await,
        as_user("carol").await,
    );
    let job: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(workspace_root().join("examples/jobs/minimal.yaml")).unwrap(),
    )
    .unwrap();
    let pool = json!({
        "apiVersion": "inpaint.pawfect.dev/v1alpha1", "kind": "InpaintPool",
        "metadata": {"name": "gpu"},
        "spec": {"worker": {"image": "w:1", "modelVolume": {"claimName": "models"}}},
    });
    // RoleBindings take effect at once, but the aggregated rules may reach the authorizer's
    // cache a moment after the ClusterRole changed: wait for the first grant.
    eventually("edit may create an InpaintJob", || async {
        may_create(&alice, &ns, &job).await
    })
    .await;
    assert!(
        is_forbidden(&may_create(&alice, &ns, &pool).await),
        "edit may create a pool"
    );
    assert!(
        is_forbidden(&may_create(&bob, &ns, &job).await),
        "view may create a job"
    );
    assert!(
        is_forbidden(&may_create(&bob, &ns, &pool).await),
        "view may create a pool"
    );
    may_create(&carol, &ns, &pool)
        .await
        .unwrap_or_else(|e| panic!("pool-admin may not create a pool: {e}"));
    // Reading: view (and edit) list jobs and pools; the status subresource is the operator's.
    apply(&client, Some(&ns), &job, MANAGER).await.unwrap();
    for (who, c) in [("view", &bob), ("edit", &alice)] {
        let jobs = Api::<pawfect_api::InpaintJob>::namespaced(c.clone(), &ns);
        assert_eq!(
            jobs.list(&ListParams::default())
                .await
                .unwrap_or_else(|e| panic!("{who}: {e}"))
                .items
                .len(),
            1
        );
        Api::<InpaintPool>::namespaced(c.clone(), &ns)
            .list(&ListParams::default())
            .await
            .unwrap_or_else(|e| panic!("{who} may not list pools: {e}"));
    }
    let err = Api::<pawfect_api::InpaintJob>::namespaced(alice.clone(), &ns)
        .patch_status(
            "biscuit-no-leash",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .expect_err("edit may write a job's status");
    assert!(
        api_message(&err).contains("forbidden"),
        "{}",
        api_message(&err)
    );
}

#[tokio::test]
async fn the_operator_may_patch_only_the_scale_down_annotations_of_its_pods() {
    use pawfect_operator::pool::pod_annotations;
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    apply_crds(&client, &committed_crd_files().unwrap())
        .await
        .unwrap();
    let ns = cp.namespace(&client, "pod-policy").await;
    let release = "pod-policy";
    ValueSet::defaults()
        .set("crds.install=false")
        .set("pool.create=false")
        .helm_on(cp, "install", release, &ns, &[])
        .unwrap_or_else(|e| panic!("helm install: {e}"));
    let operator = cp
        .client_for(
            &cp.service_account_kubeconfig(&client, &ns, "pod-policy-pawfect-inpaint-operator")
                .await,
        )
        .await;
    let pods_admin = Api::<Pod>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(operator, &ns);
    let pod = |name: &str, managed: bool| {
        let mut labels =
            json!({"app.kubernetes.io/name": "pawfect-worker", "inpaint.pawfect.dev/pool": "gpu"});
        if managed {
            labels["app.kubernetes.io/managed-by"] = "pawfect-operator".into();
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                         "annotations": {"team": "a"}},
            "spec": {"automountServiceAccountToken": false,
                     "containers": [{"name": "worker", "image": "w:1"}]},
        })
    };
    // The namespace's default ServiceAccount comes from the controller-manager a moment after
    // the namespace.
    for (name, managed) in [("worker", true), ("other", false)] {
        let p = pod(name, managed);
        eventually(&format!("pod {name} created"), || async {
            apply(&client, Some(&ns), &p, MANAGER)
                .await
                .map(|_| ())
                .map_err(|e| api_message(&e))
        })
        .await;
    }
    let merge = |patch: Value| {
        let pods = pods.clone();
        async move {
            pods.patch("worker", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(|e| api_message(&e))
        }
    };
    let annotations = |busy: bool| -> Value {
        let m: serde_json::Map<String, Value> = pod_annotations(busy)
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        json!({"metadata": {"annotations": m}})
    };
    // The policy reaches the API server's admission a moment after it is created: wait until
    // it refuses what it must refuse (a new value each try, so that a try the policy let through
    // leaves the next one a change).
    let tries = std::sync::atomic::AtomicU32::new(0);
    eventually("the policy refuses a label change", || async {
        let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match merge(json!({"metadata": {"labels": {"try": n.to_string()}}})).await {
            Err(e) if e.contains("the operator may not change the labels of a pod") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // What the operator does (operator/src/pool.rs mark_pods) passes, busy and idle.
    merge(annotations(true))
        .await
        .unwrap_or_else(|e| panic!("busy marking refused: {e}"));
    merge(annotations(false))
        .await
        .unwrap_or_else(|e| panic!("idle marking refused: {e}"));
    let stored = pods_admin.get("worker").await.unwrap();
    for (k, v) in pod_annotations(false) {
        assert_eq!(
            stored.annotations().get(k).map(String::as_str),
            Some(v),
            "{k}"
        );
    }
    // Anything else is refused with the policy's message.
    let refused: [(&str, Value, &str); 5] = [
        (
            "another annotation",
            json!({"metadata": {"annotations": {"team": "b"}}}),
            "may change only the pod-deletion-cost, safe-to-evict and do-not-disrupt annotations",
        ),
        (
            "removing another annotation",
            json!({"metadata": {"annotations": {"team": null}}}),
            "may change only the pod-deletion-cost",
        ),
        (
            "a new label",
            json!({"metadata": {"labels": {"inpaint.pawfect.dev/pool": "elsewhere"}}}),
            "may not change the labels",
        ),
        (
            "the spec",
            json!({"spec": {"containers": [{"name": "worker", "image": "evil:1"}]}}),
            "may not change the spec",
        ),
        (
            "the owner references",
            json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "00000000-0000-0000-0000-000000000001"}]}}),
            "may not change the owner references",
        ),
    ];
    for (what, patch, message) in refused {
        let err = merge(patch).await.expect_err(what);
        assert!(
            err.contains(message) && err.contains("ValidatingAdmissionPolicy"),
            "{what}: {err}"
        );
    }
    // A pod the operator does not manage: not even the annotations.
    let err = pods
        .patch(
            "other",
            &PatchParams::default(),
            &Patch::Merge(&annotations(true)),
        )
        .await
        .map(|_| ())
        .map_err(|e| api_message(&e))
        .expect_err("a pod the operator does not manage");
    assert!(
        err.contains("only patch the worker pods it manages"),
        "{err}"
    );
    // Nothing refused was written; other users are not held by the policy.
    let stored = pods_admin.get("worker").await.unwrap();
    assert_eq!(
        stored.annotations().get("team").map(String::as_str),
        Some("a")
    );
    assert_eq!(
        stored.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some("w:1")
    );
    pods_admin
        .patch(
            "worker",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "b"}}})),
        )
        .await
        .expect("the admin may still label the pod");
}

#[tokio::test]
async fn install_upgrade_and_uninstall_behave_as_the_chart_readme_says() {
    // CRDs are cluster-wide: this release gets a cluster of its own.
    let cp = ControlPlane::start()
        .unwrap_or_else(|e| panic!("cannot start the Kubernetes control plane: {e}"));
    let client = cp.client().await;
    let ns = "pawfect";
    let release = "pawfect-inpaint";
    let defaults = ValueSet::defaults();

    // One install brings everything: the CRDs, the RBAC, Redis, the operator and the default
    // pool's ConfigMap (Helm cannot create an InpaintPool in the release that brings its CRD).
    let out = defaults
        .helm_on(&cp, "install", release, ns, &["--create-namespace"])
        .unwrap_or_else(|e| panic!("helm install: {e}"));
    assert!(
        unexpected_warnings(&out).is_empty(),
        "the API server warned:\n{out}"
    );
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for name in [
        "inpaintjobs.inpaint.pawfect.dev",
        "inpaintpools.inpaint.pawfect.dev",
    ] {
        let crd = crds
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not established");
    }
    let password = redis_password(&client, ns).await;
    // The real controller-manager rolls the operator Deployment out: a ReplicaSet and a Pod
    // (Pending: no kubelet here).
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let operator_pods = ListParams::default().labels("app.kubernetes.io/component=operator");
    eventually("the operator Deployment's Pod", || async {
        let n = pods
            .list(&operator_pods)
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        (n == 1).then_some(()).ok_or(format!("{n} operator pods"))
    })
    .await;
    // What that Pod would run: the operator applies the default pool, whose worker Deployment it
    // then builds.
    let redis = RedisServer::start().expect("redis-server");
    let mut op = Operator::start(&cp, &client, ns, &redis).await;
    let pool = default_pool_is_up(&client, ns, &op).await;
    check_default_pool("defaults", ns, &pool);
    helm_test_check(&cp, &client, release, ns, &redis).await;
    host_path_pool_is_refused(&client, ns, &op).await;

    // An upgrade with the same values keeps the generated Redis password (looked up) and the
    // operator's pod template (no restart).
    let template = |d: Deployment| d.spec.template.metadata.and_then(|m| m.annotations);
    let operator_deploy = Api::<Deployment>::namespaced(client.clone(), ns);
    let before = template(
        operator_deploy
            .get("pawfect-inpaint-operator")
            .await
            .unwrap(),
    );
    let out = defaults
        .helm_on(&cp, "upgrade", release, ns, &[])
        .unwrap_or_else(|e| panic!("helm upgrade: {e}"));
    assert!(
        unexpected_warnings(&out).is_empty(),
        "the API server warned:\n{out}"
    );
    assert_eq!(
        redis_password(&client, ns).await,
        password,
        "the upgrade changed the Redis password"
    );
    assert_eq!(
        template(
            operator_deploy
                .get("pawfect-inpaint-operator")
                .await
                .unwrap()
        ),
        before
    );
    // A changed pool changes the operator's pod template (a rollout); the restarted operator
    // applies the new manifest.
    let smaller = defaults.clone().set("pool.maxReplicas=2");
    smaller
        .helm_on(&cp, "upgrade", release, ns, &[])
        .unwrap_or_else(|e| panic!("helm upgrade pool.maxReplicas=2: {e}"));
    assert_ne!(
        template(
            operator_deploy
                .get("pawfect-inpaint-operator")
                .await
                .unwrap()
        ),
        before,
        "a changed pool must roll the operator"
    );
    op.stop();
    let mut op = Operator::start(&cp, &client, ns, &redis).await;
    let pools = Api::<InpaintPool>::namespaced(client.clone(), ns);
    eventually_with(
        "the restarted operator applies maxReplicas 2",
        Duration::from_secs(90),
        || async {
            let p = pools.get("default").await.map_err(|e| e.to_string())?;
            (p.spec.max_replicas == 2)
                .then_some(())
                .ok_or(format!("maxReplicas {}", p.spec.max_replicas))
        },
        || op.log(),
    )
    .await;
    let defaults = smaller;

    // An upgrade applies a changed CRD (the CRDs are templates, not crds/).
    let job = workspace_root().join("examples/jobs/minimal.yaml");
    let mut job: Value = serde_saphyr::from_str(&std::fs::read_to_string(job).unwrap()).unwrap();
    job["spec"]["note"] = "hello".into();
    let err = apply(&client, Some(ns), &job, MANAGER)
        .await
        .expect_err("spec.note is not in the CRD yet");
    assert!(api_message(&err).contains("note"), "{}", api_message(&err));
    let tmp = std::env::temp_dir().join(format!("pawfect-chart-{}", std::process::id()));
    let changed = chart_with_a_new_crd_field(&tmp);
    defaults
        .helm_on_chart(&cp, "upgrade", release, ns, &changed, &[])
        .unwrap_or_else(|e| panic!("helm upgrade with a changed CRD: {e}"));
    std::fs::remove_dir_all(&tmp).ok();
    eventually(
        "an InpaintJob with spec.note accepted after the upgrade",
        || async {
            let stored = apply(&client, Some(ns), &job, MANAGER)
                .await
                .map_err(|e| api_message(&e))?;
            (stored["spec"]["note"] == "hello")
                .then_some(())
                .ok_or(format!("spec.note pruned: {stored}"))
        },
    )
    .await;

    // A second release in another namespace: with the chart's CRDs it fails on their ownership;
    // with crds.install=false but the same release name, on the ClusterRole named after it; with
    // another release name it installs.
    let other = cp.namespace(&client, "second").await;
    let err = defaults
        .helm_on(&cp, "install", release, &other, &[])
        .expect_err("a second release may not take over the CRDs");
    assert!(
        err.contains("CustomResourceDefinition") && err.contains("invalid ownership metadata"),
        "{err}"
    );
    let err = defaults
        .clone()
        .set("crds.install=false")
        .helm_on(&cp, "install", release, &other, &[])
        .expect_err("the same release name in a second namespace");
    assert!(
        err.contains("ClusterRole \"pawfect-inpaint-operator\"")
            && err.contains("invalid ownership metadata"),
        "{err}"
    );
    let out = defaults
        .clone()
        .set("crds.install=false")
        .set("operator.queuePrefix=pawfect-second")
        .helm_on(&cp, "install", "pawfect-second", &other, &[])
        .unwrap_or_else(|e| panic!("second release: {e}"));
    assert!(unexpected_warnings(&out).is_empty(), "{out}");

    // Uninstall: the CRDs, the user's InpaintJobs and the model PVC stay (resource-policy keep);
    // the chart's own objects go, among them the default pool's ConfigMap; the garbage collector
    // then removes the pool, the worker Deployment it owned, and the operator's ReplicaSet and
    // Pod. (The operator goes with its Deployment; its stand-in here is stopped first.)
    op.stop();
    helm_cluster(&cp, &["uninstall", release, "--namespace", ns]).unwrap_or_else(|e| panic!("{e}"));
    for name in [
        "inpaintjobs.inpaint.pawfect.dev",
        "inpaintpools.inpaint.pawfect.dev",
    ] {
        crds.get(name)
            .await
            .unwrap_or_else(|e| panic!("uninstall removed CRD {name}: {e}"));
    }
    let (jobs, job_name, _) = dynamic_api(&client, Some(ns), &job).await.unwrap();
    jobs.get(&job_name)
        .await
        .expect("uninstall keeps the InpaintJobs");
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get("pawfect-inpaint-models")
        .await
        .expect("uninstall keeps the model PVC");
    eventually(
        "the default pool and its worker Deployment garbage-collected",
        || async {
            let pool = pools.get_opt("default").await.map_err(|e| e.to_string())?;
            let deploys = operator_deploy
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            (pool.is_none() && deploys == 0)
                .then_some(())
                .ok_or(format!(
                    "pool left: {}, {deploys} Deployments left",
                    pool.is_some()
                ))
        },
    )
    .await;
    let replicasets = Api::<ReplicaSet>::namespaced(client.clone(), ns);
    eventually(
        "the operator's ReplicaSet and Pod garbage-collected",
        || async {
            let rs = replicasets
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            let p = pods
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            (rs == 0 && p == 0)
                .then_some(())
                .ok_or(format!("{rs} ReplicaSets, {p} Pods left"))
        },
    )
    .await;
    cp.stop().unwrap();
}
