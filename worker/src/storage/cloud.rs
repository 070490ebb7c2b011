//! `s3://`, `gs://` and `az://` through object_store, one client per bucket (or container),
//! configured from the environment the way the vendors' SDKs are (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`; instance and workload identities included).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, RetryConfig, UpdateVersion,
};
use url::Url;

use super::{StorageConfig, StorageError, WriteFence, temp_name};

#[derive(Default)]
pub(super) struct CloudStores {
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl CloudStores {
    pub(super) fn resolve(
        &self,
        uri: &str,
        url: &Url,
        config: &StorageConfig,
    ) -> Result<(Arc<dyn ObjectStore>, ObjectPath), StorageError> {
        let invalid = |reason: String| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no bucket".into()));
        }
        let path = ObjectPath::from_url_path(url.path()).map_err(|e| invalid(e.to_string()))?;
        if path.filename().is_none() {
            return Err(invalid("names a bucket, not an object".into()));
        }
        let base = &url[..url::Position::BeforePath];
        let mut stores = self
            .stores
            .lock()
            .map_err(|_| invalid("object store cache poisoned".into()))?;
        if let Some(store) = stores.get(base) {
            return Ok((store.clone(), path));
        }
        // These options replace the ones the builders read from the environment: keep the
        // one that matters there, plain http to a configured endpoint (MinIO, an emulator).
        let allow_http = |var: &str| {
            std::env::var(var).is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
        };
        let options = |allow: bool| {
            ClientOptions::new()
                .with_timeout(config.object_store_timeout)
                .with_connect_timeout(config.connect_timeout)
                .with_allow_http(allow)
        };
        let retry = RetryConfig {
            max_retries: config.object_store_retries,
            retry_timeout: config.object_store_timeout,
            ..RetryConfig::default()
        };
        let built: Result<Arc<dyn ObjectStore>, object_store::Error> = match url.scheme() {
            "s3" | "s3a" => AmazonS3Builder::from_env()
                .with_url(base)
                .with_client_options(options(allow_http("AWS_ALLOW_HTTP")))
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            "gs" => GoogleCloudStorageBuilder::from_env()
                .with_url(base)
                .with_client_options(options(false))
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            _ => MicrosoftAzureBuilder::from_env()
                .with_url(base)
                .with_client_options(options(allow_http("AZURE_ALLOW_HTTP")))
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
        };
        let store = built.map_err(|e| StorageError::Backend {
            uri: uri.to_string(),
            reason: format!("object store client: {e}"),
        })?;
        stores.insert(base.to_string(), store.clone());
        Ok((store, path))
    }
}

fn map_err(uri: &str, e: object_store::Error) -> StorageError {
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound {
            uri: uri.to_string(),
        },
        object_store::Error::PermissionDenied { source, .. }
        | object_store::Error::Unauthenticated { source, .. } => StorageError::AccessDenied {
            uri: uri.to_string(),
            reason: source.to_string(),
        },
        e => StorageError::Backend {
            uri: uri.to_string(),
            reason: e.to_string(),
        },
    }
}

pub(super) async fn read(
    uri: &str,
    store: &dyn ObjectStore,
    path: &ObjectPath,
    max_bytes: u64,
) -> Result<Bytes, StorageError> {
    let got = store.get(path).await.map_err(|e| map_err(uri, e))?;
    if got.meta.size > max_bytes {
        return Err(StorageError::TooLarge {
            uri: uri.to_string(),
            limit: max_bytes,
        });
    }
    got.bytes().await.map_err(|e| map_err(uri, e))
}

/// `no_overwrite`'s early check: Err(Exists) when the object is there.
pub(super) async fn check_absent(
    uri: &str,
    store: &dyn ObjectStore,
    path: &ObjectPath,
) -> Result<(), StorageError> {
    match store.head(path).await {
        Ok(_) => Err(StorageError::Exists {
            uri: uri.to_string(),
        }),
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(map_err(uri, e)),
    }
}

/// A put that only creates (`no_overwrite`): the store refuses it when the object exists.
async fn create(
    uri: &str,
    store: &dyn ObjectStore,
    path: &ObjectPath,
    data: Bytes,
) -> Result<(), StorageError> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    match store.put_opts(path, data.into(), opts).await {
        Ok(_) => Ok(()),
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => Err(StorageError::Exists {
            uri: uri.to_string(),
        }),
        Err(e) => Err(StorageError::NotWritable {
            uri: uri.to_string(),
            reason: e.to_string(),
        }),
    }
}

pub(super) async fn write_atomic(
    uri: &str,
    store: &dyn ObjectStore,
    path: &ObjectPath,
    data: Bytes,
    no_overwrite: bool,
) -> Result<(), StorageError> {
    // An object-store put is atomic by itself; the create needs no temporary object.
    if no_overwrite {
        return create(uri, store, path, data).await;
    }
    let not_writable = |e: object_store::Error| match map_err(uri, e) {
        StorageError::Backend { reason, .. } | StorageError::AccessDenied { reason, .. } => {
            StorageError::NotWritable {
                uri: uri.to_string(),
                reason,
            }
        }
        other => other,
    };
    let name = path.filename().unwrap_or("object");
    let parts: Vec<_> = path.parts().collect();
    let dir: ObjectPath = parts[..parts.len().saturating_sub(1)]
        .iter()
        .cloned()
        .collect();
    let tmp = dir.clone().join(temp_name(name));
    store.put(&tmp, data.into()).await.map_err(not_writable)?;
    if let Err(e) = store.rename(&tmp, path).await {
        let _ = store.delete(&tmp).await;
        return Err(not_writable(e));
    }
    Ok(())
}

/// A fenced write: read the object's version, check the fence, then a conditional put on that
/// version (create when there was none). A put refused because someone wrote in between starts
/// over, so the fence is always checked after the version the put is conditional on was read.
/// With `no_overwrite` only the create is tried: an object already there (or one that another
/// writer created in between) is [`StorageError::Exists`].
pub(super) async fn write_conditional(
    uri: &str,
    store: &dyn ObjectStore,
    path: &ObjectPath,
    data: Bytes,
    fence: &dyn WriteFence,
    no_overwrite: bool,
) -> Result<(), StorageError> {
    if no_overwrite {
        check_absent(uri, store, path).await?;
        fence.check().await.map_err(|reason| StorageError::Fenced {
            uri: uri.to_string(),
            reason,
        })?;
        return create(uri, store, path, data).await;
    }
    let fenced = |reason: String| StorageError::Fenced {
        uri: uri.to_string(),
        reason,
    };
    let not_writable = |e: object_store::Error| StorageError::NotWritable {
        uri: uri.to_string(),
        reason: e.to_string(),
    };
    // Each retry means another writer won a race for this object; a few are plenty.
    for _ in 0..4 {
        let mode = match store.head(path).await {
            Ok(meta) => PutMode::Update(UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            }),
            Err(object_store::Error::NotFound { .. }) => PutMode::Create,
            Err(e) => return Err(map_err(uri, e)),
        };
        fence.check().await.map_err(fenced)?;
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match store.put_opts(path, data.clone().into(), opts).await {
            Ok(_) => return Ok(()),
            Err(
                object_store::Error::Precondition { .. }
                | object_store::Error::AlreadyExists { .. },
            ) => continue,
            Err(e) => return Err(not_writable(e)),
        }
    }
    Err(fenced(
        "the object kept changing under concurrent writers".into(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use object_store::memory::InMemory;

    use super::*;

    /// A fence that answers from a script of verdicts, and on its first call may write the
    /// object itself, as another writer racing in between would.
    struct Scripted {
        store: Arc<InMemory>,
        path: ObjectPath,
        intrude: bool,
        verdicts: Vec<bool>,
        calls: AtomicUsize,
    }

    impl WriteFence for Scripted {
        fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if self.intrude && n == 0 {
                    self.store
                        .put(&self.path, Bytes::from_static(b"other").into())
                        .await
                        .unwrap();
                }
                match self.verdicts.get(n) {
                    Some(true) => Ok(()),
                    _ => Err("lost the job".into()),
                }
            })
        }
    }

    async fn content(store: &InMemory, path: &ObjectPath) -> Option<Bytes> {
        match store.get(path).await {
            Ok(g) => Some(g.bytes().await.unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn fence(store: &Arc<InMemory>, path: &ObjectPath, intrude: bool, v: &[bool]) -> Scripted {
        Scripted {
            store: store.clone(),
            path: path.clone(),
            intrude,
            verdicts: v.to_vec(),
            calls: AtomicUsize::new(0),
        }
    }

    /// object_store's in-memory store implements `PutMode::Create` and `PutMode::Update` with
    /// the same semantics as S3, GCS and Azure.
    #[tokio::test]
    async fn conditional_writes_follow_the_fence() {
        let store = Arc::new(InMemory::new());
        let path = ObjectPath::from("out/result.png");
        let mine = Bytes::from_static(b"mine");

        // Absent: created while the fence allows it.
        let f = fence(&store, &path, false, &[true]);
        write_conditional("mem://out", &*store, &path, mine.clone(), &f, false)
            .await
            .unwrap();
        assert_eq!(content(&store, &path).await, Some(mine.clone()));

        // Refused: the object stays as it is.
        store
            .put(&path, Bytes::from_static(b"old").into())
            .await
            .unwrap();
        let f = fence(&store, &path, false, &[false]);
        let err = write_conditional("mem://out", &*store, &path, mine.clone(), &f, false)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Fenced { .. }), "{err}");
        assert_eq!(content(&store, &path).await.as_deref(), Some(&b"old"[..]));

        // Another writer between the version read and the put: the put is refused, and the
        // fence is asked again before the next try; refused then, the other write stays.
        let f = fence(&store, &path, true, &[true, false]);
        let err = write_conditional("mem://out", &*store, &path, mine.clone(), &f, false)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Fenced { .. }), "{err}");
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
        assert_eq!(content(&store, &path).await.as_deref(), Some(&b"other"[..]));

        // Allowed again, the second try writes over the version it read.
        let f = fence(&store, &path, true, &[true, true]);
        write_conditional("mem://out", &*store, &path, mine.clone(), &f, false)
            .await
            .unwrap();
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
        assert_eq!(content(&store, &path).await, Some(mine));
    }

    /// Create-only storage on the in-memory store: the first write lands, every later one
    /// (fenced or not, or one racing in between the check and the put) is refused and the
    /// first object stays.
    #[tokio::test]
    async fn create_only_writes_never_replace_an_object() {
        let store = Arc::new(InMemory::new());
        let path = ObjectPath::from("out/result.png");
        let first = Bytes::from_static(b"first");
        let uri = "mem://out/result.png";

        check_absent(uri, &*store, &path).await.unwrap();
        let f = fence(&store, &path, false, &[true]);
        write_conditional(uri, &*store, &path, first.clone(), &f, true)
            .await
            .unwrap();
        assert_eq!(content(&store, &path).await, Some(first.clone()));

        let err = check_absent(uri, &*store, &path).await.unwrap_err();
        assert!(matches!(err, StorageError::Exists { .. }), "{err}");
        let f = fence(&store, &path, false, &[true]);
        let err = write_conditional(uri, &*store, &path, Bytes::from_static(b"second"), &f, true)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Exists { .. }), "{err}");
        assert_eq!(
            f.calls.load(Ordering::SeqCst),
            0,
            "refused before the fence"
        );
        let err = write_atomic(uri, &*store, &path, Bytes::from_static(b"third"), true)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Exists { .. }), "{err}");
        assert_eq!(content(&store, &path).await, Some(first.clone()));

        // Another writer creates the object between the check and the put: the create fails.
        let racy = ObjectPath::from("out/racy.png");
        let f = fence(&store, &racy, true, &[true]);
        let err = write_conditional(uri, &*store, &racy, first.clone(), &f, true)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Exists { .. }), "{err}");
        assert_eq!(content(&store, &racy).await.as_deref(), Some(&b"other"[..]));

        // Without create-only the same unfenced write replaces the object.
        write_atomic(uri, &*store, &path, Bytes::from_static(b"third"), false)
            .await
            .unwrap();
        assert_eq!(content(&store, &path).await.as_deref(), Some(&b"third"[..]));
    }
}
