//! The lock file of a models directory, `DIR/<variant>.lock`: for every repository
//! `fetch-models` took files from, the commit it took them at and the sha256 of each file.
//!
//! `fetch-models --write-lock` records it from what it fetched; every later `fetch-models` on
//! that directory pins each repository to its recorded commit and verifies every file against
//! its recorded sha256 ([`super::hub::Pin`]). The project ships no lock: the sha256 of the
//! upstream files can only be known by downloading them, so the first download of a directory
//! is the one that is trusted, and it is recorded.
//!
//! ```json
//! {
//!   "variant": "q5_k_m",
//!   "repos": {
//!     "YarvixPA/FLUX.1-Fill-dev-gguf": {
//!       "revision": "<40-hex commit>",
//!       "files": { "flux1-fill-dev-Q5_K_S.gguf": "<64-hex sha256>" }
//!     }
//!   }
//! }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::hub::{Fetched, Pin, sha256_file, snapshot_dir};

/// A models directory's lock file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub variant: String,
    pub repos: BTreeMap<String, LockedRepo>,
}

/// One repository of a [`Lock`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedRepo {
    /// The commit the files were taken at.
    pub revision: String,
    /// sha256 (lowercase hex) by file name.
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a lock file: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{repo}/{file}: {msg}")]
    Record {
        repo: String,
        file: String,
        msg: String,
    },
}

/// `DIR/<variant>.lock`.
pub fn lock_path(models: &Path, variant: &str) -> PathBuf {
    models.join(format!("{variant}.lock"))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Lock {
    /// The lock at `path`; None when there is none.
    pub fn read(path: &Path) -> Result<Option<Lock>, LockError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LockError::Read {
                    path: path.into(),
                    source,
                });
            }
        };
        let parse = |msg: String| LockError::Parse {
            path: path.into(),
            msg,
        };
        let lock: Lock = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
        for (repo, r) in &lock.repos {
            if r.revision.is_empty() || r.revision.contains(['/', '\\', '.']) {
                return Err(parse(format!("{repo}: revision {:?}", r.revision)));
            }
            for (file, sha) in &r.files {
                if !is_hex(sha, 64) {
                    return Err(parse(format!(
                        "{repo}/{file}: {sha:?} is not a sha256 (64 lowercase hex digits)"
                    )));
                }
            }
        }
        Ok(Some(lock))
    }

    /// Writes the lock (a temporary file, then a rename).
    pub fn write(&self, path: &Path) -> Result<(), LockError> {
        let err = |source| LockError::Write {
            path: path.into(),
            source,
        };
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        text.push('\n');
        let tmp = path.with_extension("lock.tmp");
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// The lock of what a run fetched: each file's commit (the snapshot folder it is in) and
    /// sha256 (read back from disk).
    pub fn record(variant: &str, fetched: &[Fetched]) -> Result<Lock, LockError> {
        let mut repos: BTreeMap<String, LockedRepo> = BTreeMap::new();
        for f in fetched {
            let record = |msg: String| LockError::Record {
                repo: f.repo.clone(),
                file: f.file.clone(),
                msg,
            };
            let revision = snapshot_dir(&f.path, &f.file)
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .ok_or_else(|| record("not in a snapshot folder".into()))?;
            let sha = sha256_file(&f.path).map_err(|e| record(e.to_string()))?;
            let repo = repos.entry(f.repo.clone()).or_default();
            if !repo.revision.is_empty() && repo.revision != revision {
                return Err(record(format!(
                    "fetched at two commits ({} and {revision})",
                    repo.revision
                )));
            }
            repo.revision = revision;
            repo.files.insert(f.file.clone(), sha);
        }
        Ok(Lock {
            variant: variant.to_string(),
            repos,
        })
    }

    /// The pins of every repository (verified: sha256 known).
    pub fn pins(&self) -> Vec<(String, Pin)> {
        self.repos
            .iter()
            .map(|(repo, r)| {
                (
                    repo.clone(),
                    Pin {
                        revision: r.revision.clone(),
                        sha256: Some(r.files.clone()),
                    },
                )
            })
            .collect()
    }

    /// Files of all repositories.
    pub fn file_count(&self) -> usize {
        self.repos.values().map(|r| r.files.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_read_and_refuse_bad_locks() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("hub/models--a--b/snapshots/abc123");
        std::fs::create_dir_all(snap.join("vae")).unwrap();
        std::fs::write(snap.join("vae/config.json"), b"{}").unwrap();
        std::fs::write(snap.join("x.gguf"), b"").unwrap();
        let fetched = |file: &str| Fetched {
            repo: "a/b".into(),
            file: file.into(),
            path: snap.join(file),
            bytes: 0,
            downloaded: true,
            verified: false,
        };
        let lock = Lock::record("q8_0", &[fetched("vae/config.json"), fetched("x.gguf")]).unwrap();
        let r = &lock.repos["a/b"];
        assert_eq!(r.revision, "abc123");
        // sha256 of `{}` and of nothing, as `sha256sum` prints them.
        assert_eq!(
            r.files["vae/config.json"],
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(
            r.files["x.gguf"],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let path = lock_path(dir.path(), "q8_0");
        assert_eq!(Lock::read(&path).unwrap(), None);
        lock.write(&path).unwrap();
        assert_eq!(Lock::read(&path).unwrap(), Some(lock.clone()));
        assert_eq!(lock.file_count(), 2);

        let mut bad = lock.clone();
        bad.repos
            .get_mut("a/b")
            .unwrap()
            .files
            .insert("y".into(), "ABC".into());
        bad.write(&path).unwrap();
        let e = Lock::read(&path).unwrap_err().to_string();
        assert!(e.contains("is not a sha256"), "{e}");
        let mut bad = lock.clone();
        bad.repos.get_mut("a/b").unwrap().revision = "../main".into();
        bad.write(&path).unwrap();
        assert!(Lock::read(&path).is_err());
        std::fs::write(&path, "{\"variant\": 1}").unwrap();
        assert!(Lock::read(&path).is_err());
    }
}
