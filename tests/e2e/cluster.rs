//! What the end-to-end tests install before their first job: the CRDs, the chart's RBAC as
//! `helm template` renders it for two operator replicas, and the real operator binary run as the
//! chart's ServiceAccount with the chart's own container args (Redis, HTTP port and queue prefix
//! swapped for the test's).

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use pawfect_chart_tests::{ValueSet, committed_crd_files, split_manifests};
use pawfect_control_plane::{ControlPlane, apply, apply_crds};
use pawfect_queue::{Queue, QueueConfig};
use serde_json::json;

use crate::operator::Replica;

/// Where the chart (and so the operator, its Lease and its RBAC) is installed.
pub const SYSTEM_NS: &str = "pawfect-system";
pub const RELEASE: &str = "pawfect-inpaint";
/// Field manager of what the tests apply.
pub const MANAGER: &str = "pawfect-e2e";

/// The chart's RBAC (ServiceAccount, roles, bindings) as `helm template` renders it for two
/// operator replicas, applied to the server; and the operator container's args.
pub async fn install_chart_rbac(client: &Client) -> Vec<String> {
    let rendered = ValueSet::defaults()
        .set("operator.replicas=2")
        // The pool's models are a hostPath (the fixture directory): the platform team's opt-in.
        .set("operator.allowHostPathModels=true")
        .set("crds.install=false")
        .render_in(SYSTEM_NS)
        .unwrap_or_else(|e| panic!("helm template: {e}"));
    let manifests = split_manifests(&rendered).unwrap();
    let mut args = None;
    for m in &manifests {
        match m.kind() {
            "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding" => {
                apply(client, Some(SYSTEM_NS), &m.value, MANAGER)
                    .await
                    .unwrap_or_else(|e| panic!("{} {}: {e}", m.kind(), m.name()));
            }
            "Deployment" if m.name() == format!("{RELEASE}-operator") => {
                let c = m.value["spec"]["template"]["spec"]["containers"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["name"] == "operator"))
                    .expect("the operator container");
                args = Some(
                    c["args"]
                        .as_array()
                        .expect("operator args")
                        .iter()
                        .map(|a| a.as_str().expect("string arg").to_string())
                        .collect::<Vec<_>>(),
                );
            }
            _ => {}
        }
    }
    args.expect("the chart renders the operator Deployment")
}

/// The chart's operator args for a replica run out of cluster: this test's Redis (no password)
/// and a loopback HTTP port; without the default pool (its ConfigMap is not installed here) and
/// the Redis password Secret (this Redis has none).
pub fn operator_args(chart_args: &[String], redis_url: &str, prefix: &str) -> Vec<String> {
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let args: Vec<String> = chart_args
        .iter()
        .filter(|a| {
            !a.starts_with("--default-pool-configmap=") && !a.starts_with("--worker-redis-secret")
        })
        .map(|a| {
            if a.starts_with("--redis-url=") {
                format!("--redis-url={redis_url}")
            } else if a.starts_with("--http-addr=") {
                format!("--http-addr={http}")
            } else if a.starts_with("--log-level=") {
                "--log-level=info,pawfect_operator=debug".into()
            } else if a.starts_with("--queue-prefix=") {
                format!("--queue-prefix={prefix}")
            } else {
                a.clone()
            }
        })
        .collect();
    assert!(
        args.iter().any(|a| a == "--leader-election"),
        "two replicas elect a leader: {args:?}"
    );
    args
}

/// Installs the CRDs, the system namespace and the chart's RBAC, then starts the operator
/// binary `bin` as two replicas (`operator-a` first, so it leads) on `redis_url`.
pub async fn start_operators(
    cp: &ControlPlane,
    client: &Client,
    bin: &Path,
    redis_url: &str,
    prefix: &str,
    logs: &Path,
) -> Vec<Replica> {
    apply_crds(client, &committed_crd_files().unwrap())
        .await
        .unwrap();
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": SYSTEM_NS}})).unwrap(),
        )
        .await
        .unwrap();
    let chart_args = install_chart_rbac(client).await;
    let sa = format!("{RELEASE}-operator");
    let kubeconfig = cp.service_account_kubeconfig(client, SYSTEM_NS, &sa).await;
    let mut operators = Vec::new();
    for identity in ["operator-a", "operator-b"] {
        operators.push(Replica::start(
            bin,
            operator_args(&chart_args, redis_url, prefix),
            &kubeconfig,
            SYSTEM_NS,
            identity,
            logs,
        ));
        // A head start: the first one leads.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    operators
}

/// Names of the control plane's (fake) nodes, which the kubelet binds pods to.
pub async fn node_names(client: &Client) -> Vec<String> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect()
}

/// A queue client on `redis_url` under `prefix`.
pub async fn queue(redis_url: &str, prefix: &str) -> Queue {
    Queue::connect(QueueConfig {
        prefix: prefix.into(),
        ..QueueConfig::new(redis_url)
    })
    .await
    .unwrap()
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
