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
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
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

/// Stand-ins for the Prometheus Operator's CRDs (any spec accepted), so that the ServiceMonitor
/// and PodMonitor of `metrics-netpol` have an API to go to. Their schema is the Prometheus
/// Operator's business, not checked here.
fn prometheus_operator_stub_crds() -> Vec<Value> {
    ["ServiceMonitor", "PodMonitor"]
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

fn rendered_kinds(v: &ValueSet, namespace: &str) -> Vec<String> {
    let rendered = v.render_in(namespace).unwrap_or_else(|e| panic!("{e}"));
    let mut k: Vec<String> = split_manifests(&rendered)
        .unwrap()
        .iter()
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
