//! Per-pool Redis users (`--pool-redis-users`): each pool's workers log in as a Redis user of
//! their own that reaches only the pool's keys (`pawfect_queue::acl`), so a namespace's admin,
//! who can read the Secrets of their namespace, holds credentials for their own pool's jobs
//! only.
//!
//! On every pool reconcile (Redis without an ACL file forgets users when it restarts):
//! 1. the Secret `<pool>-redis-user` in the pool's namespace (owned by the pool, so it goes
//!    with it) holds `username` and `password`; a missing one is made with a new password from
//!    `ACL GENPASS`;
//! 2. the pool's user is applied with that password, plus, while the worker Deployment still
//!    runs pods of earlier credentials, the SHA-256 digests of the user's previous passwords
//!    (kept on the Secret as [`PREVIOUS_ANNOTATION`]), so rotating never cuts off a worker that
//!    has not been replaced yet; once the Deployment has rolled they are dropped;
//! 3. the pool is listed for the operator's events reader (`Queue::ensure_pool`);
//! 4. the Deployment gets `PAWFECT_REDIS_USERNAME`, the password through a `secretKeyRef`, and
//!    the Secret's uid as the pod-template annotation [`CREDENTIALS_ANNOTATION`], so new
//!    credentials roll the pods.
//!
//! Rotation: delete the Secret. A deleted pool's user is removed by [`sweep`], which compares
//! Redis' users with the pools that exist.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use pawfect_api::InpaintPool;
use pawfect_queue::acl::Password;
use tracing::info;

use crate::{Context, Error, FIELD_MANAGER, Result, queue_pool};

/// Key of the user name in the pool's Secret.
pub const USERNAME_KEY: &str = "username";
/// Key of the password in the pool's Secret.
pub const PASSWORD_KEY: &str = "password";
/// Annotation of the pool's Secret: comma-separated SHA-256 digests of passwords the user still
/// accepts until the Deployment has rolled.
pub const PREVIOUS_ANNOTATION: &str = "inpaint.pawfect.dev/previous-passwords-sha256";
/// Pod-template annotation of the worker Deployment: the uid of the Secret its pods read.
pub const CREDENTIALS_ANNOTATION: &str = "inpaint.pawfect.dev/redis-credentials";

/// Name of a pool's Secret.
pub fn secret_name(pool: &str) -> String {
    format!("{pool}-redis-user")
}

/// What the worker Deployment needs of the pool's user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolCredentials {
    pub secret: String,
    pub username: String,
    /// The Secret's uid: a new Secret (a new password) rolls the pods.
    pub version: String,
}

/// Whether the Deployment runs only pods of these credentials (pure): its template names the
/// Secret and the rollout is complete (observed, every replica updated).
pub fn rolled(deploy: Option<&Deployment>, version: &str) -> bool {
    let Some(d) = deploy else {
        return true;
    };
    let annotated = d
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CREDENTIALS_ANNOTATION))
        .is_some_and(|v| v == version);
    let Some(st) = d.status.as_ref() else {
        return false;
    };
    let observed = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let replicas = st.replicas.unwrap_or(0);
    annotated && observed && st.updated_replicas.unwrap_or(0) >= replicas
}

fn text(s: &Secret, key: &str) -> Option<String> {
    let b = s.data.as_ref()?.get(key)?;
    String::from_utf8(b.0.clone())
        .ok()
        .filter(|v| !v.is_empty())
}

/// Step 1–3 of the module doc for one pool; `existing` is its worker Deployment, if any.
pub async fn ensure(
    pool: &InpaintPool,
    ctx: &Context,
    existing: Option<&Deployment>,
) -> Result<PoolCredentials> {
    let ns = pool.namespace().ok_or(Error::MissingField {
        kind: "InpaintPool",
        field: "metadata.namespace",
    })?;
    let name = pool.name_any();
    let qpool = queue_pool(&ns, &name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret_name = secret_name(&name);
    let username = ctx.queue.keys().pool_user(&qpool);
    let current = secrets.get_opt(&secret_name).await?;
    let (password, previous, found) = match current.as_ref().and_then(|s| text(s, PASSWORD_KEY)) {
        Some(pw) => {
            let prev: Vec<String> = current
                .as_ref()
                .and_then(|s| s.annotations().get(PREVIOUS_ANNOTATION).cloned())
                .map(|v| {
                    v.split(',')
                        .filter(|h| !h.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            (pw, prev, current)
        }
        None => {
            // New credentials: whatever the user accepts now stays accepted until the pods
            // that may still use it are replaced.
            let previous = ctx.queue.pool_user_password_hashes(&qpool).await?;
            info!(pool = %name, namespace = %ns, "new Redis credentials for the pool");
            (ctx.queue.generate_password().await?, previous, None)
        }
    };
    let version_now = found.as_ref().and_then(|s| s.uid());
    let keep_previous =
        !previous.is_empty() && !version_now.as_deref().is_some_and(|v| rolled(existing, v));
    let previous = if keep_previous { previous } else { Vec::new() };
    let wanted_annotation = (!previous.is_empty()).then(|| previous.join(","));
    let have_annotation = found
        .as_ref()
        .and_then(|s| s.annotations().get(PREVIOUS_ANNOTATION).cloned());
    let secret = match found {
        Some(s)
            if have_annotation == wanted_annotation
                && text(&s, USERNAME_KEY).as_deref() == Some(username.as_str()) =>
        {
            s
        }
        _ => {
            let s = Secret {
                metadata: ObjectMeta {
                    name: Some(secret_name.clone()),
                    namespace: Some(ns.clone()),
                    owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
                    annotations: wanted_annotation
                        .map(|v| BTreeMap::from([(PREVIOUS_ANNOTATION.to_string(), v)])),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "pawfect-operator".to_string(),
                    )])),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                data: Some(BTreeMap::from([
                    (
                        USERNAME_KEY.to_string(),
                        ByteString(username.clone().into_bytes()),
                    ),
                    (
                        PASSWORD_KEY.to_string(),
                        ByteString(password.clone().into_bytes()),
                    ),
                ])),
                ..Default::default()
            };
            let mut body = serde_json::to_value(&s)?;
            body["apiVersion"] = "v1".into();
            body["kind"] = "Secret".into();
            secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(body),
                )
                .await?
        }
    };
    let mut passwords = vec![Password::Plain(&password)];
    passwords.extend(previous.iter().map(|h| Password::Sha256(h)));
    ctx.queue.apply_pool_user(&qpool, &passwords).await?;
    ctx.queue.ensure_pool(&qpool).await?;
    Ok(PoolCredentials {
        secret: secret_name,
        username,
        version: secret.uid().unwrap_or_default(),
    })
}

/// Deletes the Redis users of pools that no longer exist (in `namespace`, or everywhere).
/// Returns the pools whose users went.
pub async fn sweep(ctx: &Context, namespace: Option<&str>) -> Result<Vec<String>> {
    let api: Api<InpaintPool> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let pools: BTreeSet<String> = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|p| Some(queue_pool(&p.namespace()?, &p.name_any())))
        .collect();
    let mut gone = Vec::new();
    for qpool in ctx.queue.pools_with_users().await? {
        let in_scope = match namespace {
            Some(ns) => qpool.split('/').next() == Some(ns),
            None => true,
        };
        if in_scope && !pools.contains(&qpool) && ctx.queue.delete_pool_user(&qpool).await? {
            info!(pool = %qpool, "pool deleted: its Redis user removed");
            gone.push(qpool);
        }
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deploy(
        annotation: &str,
        generation: i64,
        observed: i64,
        replicas: i32,
        updated: i32,
    ) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "t4-worker", "generation": generation},
            "spec": {
                "selector": {},
                "template": {"metadata": {"annotations": {CREDENTIALS_ANNOTATION: annotation}}}
            },
            "status": {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated}
        }))
        .unwrap()
    }

    #[test]
    fn rolled_only_when_every_pod_has_the_credentials() {
        assert!(
            rolled(None, "v2"),
            "no Deployment: nothing runs the old ones"
        );
        assert!(rolled(Some(&deploy("v2", 3, 3, 2, 2)), "v2"));
        assert!(
            !rolled(Some(&deploy("v1", 3, 3, 2, 2)), "v2"),
            "template still old"
        );
        assert!(
            !rolled(Some(&deploy("v2", 4, 3, 2, 2)), "v2"),
            "not observed yet"
        );
        assert!(
            !rolled(Some(&deploy("v2", 3, 3, 3, 2)), "v2"),
            "an old pod is left"
        );
        assert!(
            rolled(Some(&deploy("v2", 3, 3, 0, 0)), "v2"),
            "scaled to zero"
        );
    }
}
