//! The chart's default InpaintPool, applied by the operator.
//!
//! Helm maps every manifest of a release to an API before it creates any object, so an
//! InpaintPool rendered in the same release as the CRDs that define it fails a first `helm
//! install`. The chart therefore ships the pool as a manifest inside a ConfigMap (key
//! [`MANIFEST_KEY`], JSON), and the operator (`--default-pool-configmap NAME`, in its own
//! namespace) applies it once it leads:
//!
//! - server-side apply under its own field manager ([`FIELD_MANAGER`]), so fields that others
//!   own on the pool are left alone and a `kubectl edit` of a field the manifest sets is put back
//!   on the next apply;
//! - owned by the ConfigMap (an owner reference, not a controller one), so `helm uninstall`,
//!   which deletes the ConfigMap, lets the garbage collector remove the pool and then the worker
//!   Deployment the pool owns; no GPU stays allocated;
//! - `helm upgrade` changes the ConfigMap and, through a checksum annotation on the operator's
//!   pod template, restarts the operator, which applies the new manifest.
//!
//! A manifest the API server refuses (a value the chart schema let through but the CRD does not)
//! is logged and reported as a Warning Event on the ConfigMap; the operator keeps running the
//! other pools.

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use pawfect_api::InpaintPool;

/// Field manager of the default pool's apply (apart from the reconcilers' `pawfect-operator`).
pub const FIELD_MANAGER: &str = "pawfect-operator-default-pool";
/// Key of the pool manifest in the ConfigMap.
pub const MANIFEST_KEY: &str = "pool.json";

/// Why the default pool could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum DefaultPoolError {
    #[error("ConfigMap {namespace}/{name} with the default pool does not exist")]
    Missing { namespace: String, name: String },
    #[error("ConfigMap {namespace}/{name} has no key {MANIFEST_KEY}")]
    NoManifest { namespace: String, name: String },
    #[error("ConfigMap {namespace}/{name}: {MANIFEST_KEY} is not an InpaintPool manifest: {msg}")]
    Invalid {
        namespace: String,
        name: String,
        msg: String,
    },
    #[error("the API server refused the default pool {namespace}/{name}: {msg}")]
    Rejected {
        namespace: String,
        name: String,
        msg: String,
    },
    #[error("cannot read ConfigMap {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The pool to apply, from the ConfigMap that carries its manifest: the manifest's name, labels
/// and spec, in the ConfigMap's namespace, owned by the ConfigMap. Pure.
pub fn desired(cm: &ConfigMap) -> Result<InpaintPool, DefaultPoolError> {
    let namespace = cm.namespace().unwrap_or_default();
    let name = cm.name_any();
    let invalid = |msg: String| DefaultPoolError::Invalid {
        namespace: namespace.clone(),
        name: name.clone(),
        msg,
    };
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(MANIFEST_KEY))
        .ok_or_else(|| DefaultPoolError::NoManifest {
            namespace: namespace.clone(),
            name: name.clone(),
        })?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let want_api = InpaintPool::api_version(&());
    let want_kind = InpaintPool::kind(&());
    if value["apiVersion"] != *want_api || value["kind"] != *want_kind {
        return Err(invalid(format!(
            "apiVersion/kind are {}/{}, expected {want_api}/{want_kind}",
            value["apiVersion"], value["kind"]
        )));
    }
    let manifest: InpaintPool =
        serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
    let pool_name = manifest
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("metadata.name is missing".into()))?;
    if let Some(ns) = manifest.metadata.namespace.as_deref()
        && ns != namespace
    {
        return Err(invalid(format!(
            "metadata.namespace is {ns}, the ConfigMap's is {namespace}: the default pool lives \
             beside the operator"
        )));
    }
    let uid = cm
        .uid()
        .ok_or_else(|| invalid("the ConfigMap has no uid (not read from the API server)".into()))?;
    let mut pool = InpaintPool::new(&pool_name, manifest.spec);
    pool.metadata.namespace = Some(namespace.clone());
    pool.metadata.labels = manifest.metadata.labels;
    pool.metadata.annotations = manifest.metadata.annotations;
    pool.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name,
        uid,
        // Not the pool's controller (the pool controls its Deployment; nothing controls it), and
        // no blockOwnerDeletion: that needs the right to set finalizers on ConfigMaps.
        controller: None,
        block_owner_deletion: None,
    }]);
    Ok(pool)
}

/// Reads ConfigMap `namespace/name` and applies the pool it carries.
pub async fn apply(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<InpaintPool, DefaultPoolError> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = match cms.get_opt(name).await {
        Ok(Some(cm)) => cm,
        Ok(None) => {
            return Err(DefaultPoolError::Missing {
                namespace: namespace.into(),
                name: name.into(),
            });
        }
        Err(source) => {
            return Err(DefaultPoolError::Read {
                namespace: namespace.into(),
                name: name.into(),
                source,
            });
        }
    };
    let pool = desired(&cm)?;
    let pools: Api<InpaintPool> = Api::namespaced(client.clone(), namespace);
    let pool_name = pool.name_any();
    pools
        .patch(
            &pool_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&pool),
        )
        .await
        .map_err(|e| DefaultPoolError::Rejected {
            namespace: namespace.into(),
            name: pool_name,
            msg: match e {
                kube::Error::Api(s) => s.message,
                e => e.to_string(),
            },
        })
}

/// The ConfigMap, for an Event about it.
pub fn config_map_ref(namespace: &str, name: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("ConfigMap".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cm(manifest: serde_json::Value) -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": "pi-default-pool", "namespace": "pawfect", "uid": "u-1"},
            "data": {MANIFEST_KEY: manifest.to_string()}
        }))
        .unwrap()
    }

    fn manifest() -> serde_json::Value {
        json!({
            "apiVersion": "inpaint.pawfect.dev/v1alpha1",
            "kind": "InpaintPool",
            "metadata": {"name": "default", "namespace": "pawfect",
                         "labels": {"app.kubernetes.io/instance": "pi"}},
            "spec": {"maxReplicas": 4, "worker": {"image": "w:1"}}
        })
    }

    #[test]
    fn the_manifest_becomes_a_pool_owned_by_its_config_map() {
        let p = desired(&cm(manifest())).unwrap();
        assert_eq!(p.name_any(), "default");
        assert_eq!(p.namespace().as_deref(), Some("pawfect"));
        assert_eq!(p.spec.max_replicas, 4);
        assert_eq!(p.labels()["app.kubernetes.io/instance"], "pi");
        let owner = &p.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("ConfigMap", "pi-default-pool", "u-1")
        );
        assert_eq!(owner.controller, None);
        // The apply body names the kind (server-side apply needs apiVersion and kind).
        let body = serde_json::to_value(&p).unwrap();
        assert_eq!(body["kind"], "InpaintPool");
        assert!(body.get("status").is_none_or(|s| s.is_null()));
    }

    #[test]
    fn a_namespace_less_manifest_takes_the_config_maps() {
        let mut m = manifest();
        m["metadata"].as_object_mut().unwrap().remove("namespace");
        assert_eq!(
            desired(&cm(m)).unwrap().namespace().as_deref(),
            Some("pawfect")
        );
    }

    #[test]
    fn bad_manifests_fail_with_the_reason() {
        let cases = [
            (json!("not an object"), "apiVersion/kind"),
            (
                {
                    let mut m = manifest();
                    m["kind"] = json!("InpaintJob");
                    m
                },
                "apiVersion/kind",
            ),
            (
                {
                    let mut m = manifest();
                    m["metadata"]["namespace"] = json!("other");
                    m
                },
                "metadata.namespace is other",
            ),
            (
                {
                    let mut m = manifest();
                    m["metadata"].as_object_mut().unwrap().remove("name");
                    m
                },
                "metadata.name",
            ),
            (
                {
                    let mut m = manifest();
                    m["spec"]["maxReplicas"] = json!("four");
                    m
                },
                "invalid type",
            ),
        ];
        for (m, want) in cases {
            let e = desired(&cm(m.clone())).unwrap_err().to_string();
            assert!(e.contains(want), "{m}: {e}");
        }
        let mut empty = cm(manifest());
        empty.data = None;
        assert!(matches!(
            desired(&empty),
            Err(DefaultPoolError::NoManifest { .. })
        ));
        let mut not_json = cm(manifest());
        not_json
            .data
            .as_mut()
            .unwrap()
            .insert(MANIFEST_KEY.into(), "{".into());
        assert!(
            desired(&not_json)
                .unwrap_err()
                .to_string()
                .contains("not JSON")
        );
    }
}
