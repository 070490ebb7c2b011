//! `file://` locations, confined to configured roots.
//!
//! A path is allowed when its canonical form (symlinks resolved, `..` removed) lies below the
//! canonical form of one of the roots. For a write target that does not exist yet, the deepest
//! existing ancestor is canonicalised and the rest must be plain names. The bytes go through
//! object_store's `LocalFileSystem` (temporary file in the target directory, then a rename;
//! a fenced write checks its fence and renames under an exclusive lock of the directory).

use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use url::Url;

use super::{StorageError, WriteFence, temp_name};

/// The canonical roots `file://` URIs may point into.
#[derive(Clone, Debug)]
pub struct Roots {
    roots: Vec<PathBuf>,
}

impl Roots {
    /// Canonicalises every root; a root that does not exist is a configuration error.
    pub fn new(roots: &[PathBuf]) -> Result<Self, StorageError> {
        let roots = roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r).map_err(|e| StorageError::InvalidUri {
                    uri: r.display().to_string(),
                    reason: format!("storage root can't be resolved: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Roots { roots })
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.roots
    }

    fn contains(&self, canonical: &Path) -> bool {
        self.roots.iter().any(|r| canonical.starts_with(r))
    }

    fn outside(&self, uri: &str) -> StorageError {
        let roots = if self.roots.is_empty() {
            "none configured: pass --allow-root".to_string()
        } else {
            self.roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        StorageError::OutsideRoots {
            uri: uri.to_string(),
            roots,
        }
    }

    /// The canonical path of an existing object below a root.
    pub fn confine_existing(&self, uri: &str, path: &Path) -> Result<PathBuf, StorageError> {
        if self.roots.is_empty() {
            return Err(self.outside(uri));
        }
        match std::fs::canonicalize(path) {
            Ok(canonical) if self.contains(&canonical) => Ok(canonical),
            Ok(_) => Err(self.outside(uri)),
            // Not there: say "not found" only for paths that would be inside the roots.
            Err(_) if self.lexically_inside(path) => Err(StorageError::NotFound {
                uri: uri.to_string(),
            }),
            Err(_) => Err(self.outside(uri)),
        }
    }

    /// The canonical path a new object would be written to, below a root.
    pub fn confine_new(&self, uri: &str, path: &Path) -> Result<PathBuf, StorageError> {
        if self.roots.is_empty() {
            return Err(self.outside(uri));
        }
        if path.file_name().is_none() {
            return Err(StorageError::InvalidUri {
                uri: uri.to_string(),
                reason: "names a directory, not a file".into(),
            });
        }
        // Walk up to the deepest ancestor that exists; what lies below it must be plain names.
        let mut existing = path.to_path_buf();
        let mut rest: Vec<std::ffi::OsString> = Vec::new();
        loop {
            if std::fs::symlink_metadata(&existing).is_ok() {
                break;
            }
            let Some(name) = existing.file_name().map(|n| n.to_os_string()) else {
                return Err(self.outside(uri));
            };
            rest.push(name);
            if !existing.pop() {
                return Err(self.outside(uri));
            }
        }
        let canonical = std::fs::canonicalize(&existing).map_err(|_| self.outside(uri))?;
        if !self.contains(&canonical) {
            return Err(self.outside(uri));
        }
        let mut out = canonical;
        for name in rest.iter().rev() {
            let comp = Path::new(name);
            if !matches!(comp.components().next(), Some(Component::Normal(_))) {
                return Err(self.outside(uri));
            }
            out.push(name);
        }
        Ok(out)
    }

    fn lexically_inside(&self, path: &Path) -> bool {
        path.components()
            .all(|c| !matches!(c, Component::ParentDir))
            && self.roots.iter().any(|r| path.starts_with(r))
    }
}

/// `file:///a/b` → `/a/b`; only local (empty or `localhost`) hosts.
pub(super) fn url_to_path(uri: &str, url: &Url) -> Result<PathBuf, StorageError> {
    match url.host_str() {
        None | Some("") | Some("localhost") => {}
        Some(host) => {
            return Err(StorageError::InvalidUri {
                uri: uri.to_string(),
                reason: format!("file:// URIs can't name a host ({host})"),
            });
        }
    }
    url.to_file_path().map_err(|()| StorageError::InvalidUri {
        uri: uri.to_string(),
        reason: "not an absolute local path".into(),
    })
}

fn object_path(uri: &str, path: &Path) -> Result<ObjectPath, StorageError> {
    ObjectPath::from_absolute_path(path).map_err(|e| StorageError::InvalidUri {
        uri: uri.to_string(),
        reason: e.to_string(),
    })
}

pub(super) async fn read(uri: &str, path: &Path, max_bytes: u64) -> Result<Bytes, StorageError> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|_| StorageError::NotFound {
            uri: uri.to_string(),
        })?;
    if !meta.is_file() {
        return Err(StorageError::NotFound {
            uri: uri.to_string(),
        });
    }
    if meta.len() > max_bytes {
        return Err(StorageError::TooLarge {
            uri: uri.to_string(),
            limit: max_bytes,
        });
    }
    let store = LocalFileSystem::new();
    let location = object_path(uri, path)?;
    let got = store.get(&location).await.map_err(|e| match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound {
            uri: uri.to_string(),
        },
        e => StorageError::Backend {
            uri: uri.to_string(),
            reason: e.to_string(),
        },
    })?;
    if got.meta.size > max_bytes {
        return Err(StorageError::TooLarge {
            uri: uri.to_string(),
            limit: max_bytes,
        });
    }
    got.bytes().await.map_err(|e| StorageError::Backend {
        uri: uri.to_string(),
        reason: e.to_string(),
    })
}

/// The target must not be a directory, and its directory must exist (or be creatable below
/// the root) and take a file: probed by creating and removing an empty temporary file.
pub(super) async fn check_writable(uri: &str, path: &Path) -> Result<(), StorageError> {
    let not_writable = |reason: String| StorageError::NotWritable {
        uri: uri.to_string(),
        reason,
    };
    if let Ok(meta) = tokio::fs::metadata(path).await
        && meta.is_dir()
    {
        return Err(not_writable("is a directory".into()));
    }
    let (dir, name) = split(uri, path)?;
    // The deepest existing ancestor must be a directory we can create entries in.
    let mut probe_dir = dir.to_path_buf();
    loop {
        match tokio::fs::metadata(&probe_dir).await {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(not_writable(format!(
                    "{} is not a directory",
                    probe_dir.display()
                )));
            }
            Err(_) => {
                if !probe_dir.pop() {
                    return Err(not_writable("no existing parent directory".into()));
                }
            }
        }
    }
    let probe = probe_dir.join(temp_name(name));
    match tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .await
    {
        Ok(f) => {
            drop(f);
            let _ = tokio::fs::remove_file(&probe).await;
            Ok(())
        }
        Err(e) => Err(not_writable(format!(
            "can't create files in {}: {e}",
            probe_dir.display()
        ))),
    }
}

fn split<'a>(uri: &str, path: &'a Path) -> Result<(&'a Path, &'a str), StorageError> {
    let invalid = || StorageError::InvalidUri {
        uri: uri.to_string(),
        reason: "no file name".into(),
    };
    let dir = path.parent().ok_or_else(invalid)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(invalid)?;
    Ok((dir, name))
}

pub(super) async fn write_atomic(
    uri: &str,
    path: &Path,
    data: Bytes,
    fence: Option<&dyn WriteFence>,
    no_overwrite: bool,
) -> Result<(), StorageError> {
    let not_writable = |e: object_store::Error| match e {
        object_store::Error::AlreadyExists { .. } => StorageError::Exists {
            uri: uri.to_string(),
        },
        e => StorageError::NotWritable {
            uri: uri.to_string(),
            reason: e.to_string(),
        },
    };
    if let Ok(meta) = tokio::fs::metadata(path).await
        && meta.is_dir()
    {
        return Err(StorageError::NotWritable {
            uri: uri.to_string(),
            reason: "is a directory".into(),
        });
    }
    let (dir, name) = split(uri, path)?;
    let store = LocalFileSystem::new();
    let tmp = object_path(uri, &dir.join(temp_name(name)))?;
    let target = object_path(uri, path)?;
    store.put(&tmp, data.into()).await.map_err(not_writable)?;
    // Create-only: a hard link that fails when the target exists (atomic, no window).
    let publish = async || {
        if no_overwrite {
            store.rename_if_not_exists(&tmp, &target).await
        } else {
            store.rename(&tmp, &target).await
        }
        .map_err(not_writable)
    };
    let published = async {
        let Some(fence) = fence else {
            return publish().await;
        };
        let fenced = |reason: String| StorageError::Fenced {
            uri: uri.to_string(),
            reason,
        };
        // Refuse early without taking the lock; then check again under it, right before the
        // rename, which no other fenced writer of this directory can interleave with.
        fence.check().await.map_err(fenced)?;
        let _lock = lock_dir(uri, dir).await?;
        fence.check().await.map_err(fenced)?;
        publish().await
    }
    .await;
    if published.is_err() {
        let _ = store.delete(&tmp).await;
    }
    published
}

/// An exclusive `flock` of a directory, released when the returned file is dropped (also
/// when the process dies).
async fn lock_dir(uri: &str, dir: &Path) -> Result<std::fs::File, StorageError> {
    let owned = dir.to_path_buf();
    let locked = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&owned)?;
        f.lock()?;
        Ok::<_, std::io::Error>(f)
    })
    .await;
    let reason = match locked {
        Ok(Ok(f)) => return Ok(f),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    Err(StorageError::NotWritable {
        uri: uri.to_string(),
        reason: format!("can't lock {}: {reason}", dir.display()),
    })
}
