//! What `scripts/local-k8s.sh up` promises: RBAC on, fake T4 nodes that pods can be bound to,
//! and a controller-manager that turns a Deployment into a ReplicaSet and Pods and
//! garbage-collects them.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use pawfect_control_plane::{ControlPlane, api_message};
use serde_json::json;

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test]
async fn fake_t4_nodes_are_ready_and_schedulable() {
    let client = ControlPlane::shared().client().await;
    let nodes = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(nodes.items.len() >= 2, "{} nodes", nodes.items.len());
    for n in nodes.items {
        let name = n.metadata.name.clone().unwrap();
        let labels = n.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels["cloud.google.com/gke-accelerator"], "nvidia-tesla-t4",
            "{name}"
        );
        let taints = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let keys: Vec<&str> = taints.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(
            keys,
            ["nvidia.com/gpu"],
            "{name}: only the GPU taint, not not-ready"
        );
        let status = n.status.unwrap();
        assert_eq!(status.capacity.unwrap()["nvidia.com/gpu"].0, "1");
        assert!(
            status
                .conditions
                .unwrap()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            "{name} is not Ready"
        );
    }
}

#[tokio::test]
async fn rbac_is_enforced() {
    let cp = ControlPlane::shared();
    let admin = cp.client().await;
    let ns = cp.namespace(&admin, "rbac").await;
    // A ServiceAccount with no role may not even list pods.
    let sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "nobody"}})).unwrap();
    Api::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let kubeconfig = cp.service_account_kubeconfig(&admin, &ns, "nobody").await;
    let nobody = cp.client_for(&kubeconfig).await;
    let err = Api::<Pod>::namespaced(nobody, &ns)
        .list(&ListParams::default())
        .await
        .expect_err("forbidden");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 403),
        "{}",
        api_message(&err)
    );
}

#[tokio::test]
async fn the_controller_manager_rolls_out_and_collects_a_deployment() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "rollout").await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example/web:1"}]}
            }
        }
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let replicasets = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
    eventually("a ReplicaSet with two Pods", || async {
        let rs = replicasets
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let n = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        (rs.items.len() == 1 && n == 2)
            .then_some(())
            .ok_or(format!("{} ReplicaSets, {n} Pods", rs.items.len()))
    })
    .await;
    deployments
        .delete("web", &DeleteParams::background())
        .await
        .unwrap();
    eventually("the ReplicaSet and Pods garbage-collected", || async {
        let rs = replicasets
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let n = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        (rs.items.is_empty() && n == 0)
            .then_some(())
            .ok_or(format!("{} ReplicaSets, {n} Pods left", rs.items.len()))
    })
    .await;
}

#[tokio::test]
async fn kubectl_of_the_same_release_talks_to_it() {
    let cp = ControlPlane::shared();
    let version = cp
        .kubectl_run(&["version", "-o", "json"])
        .unwrap_or_else(|e| panic!("{e}"));
    let v: serde_json::Value = serde_json::from_str(&version).expect("kubectl version -o json");
    // The client is the build of the server's release: same major.minor.
    let client = &v["clientVersion"];
    let server = &v["serverVersion"];
    assert_eq!(client["major"], "1", "{v}");
    assert_eq!(
        (&client["major"], &client["minor"]),
        (&server["major"], &server["minor"]),
        "{v}"
    );
    let nodes = cp
        .kubectl_run(&["get", "nodes", "-o", "name"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(nodes.lines().count() >= 2, "{nodes}");
    // An error is kubectl's, with its exit status.
    let err = cp
        .kubectl_run(&["get", "pod", "no-such-pod", "-n", "default"])
        .unwrap_err();
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}
