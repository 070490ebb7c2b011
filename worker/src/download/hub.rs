//! Downloads from the Hugging Face Hub into a cache folder of the Hub's layout
//! (`models--owner--name/{blobs,snapshots/<sha>,refs/main}`), through `hf-hub`'s blocking API.
//!
//! A file already in the cache is not fetched again (no request at all); an interrupted download
//! resumes from its `.part` file. `HF_ENDPOINT` points at another Hub (a mirror, or a test server).
//!
//! A repository may be **pinned** ([`Pin`]): its files then come from that revision, and when
//! the pin knows their sha256 (a lock file, see [`super::lock`]) every file is verified: a
//! download streams into a temporary file next to the cache's blobs while it is hashed, and is
//! renamed into the cache only when the hash matches (else it is removed and the run fails
//! naming the file); a file already in the cache is hashed again before it is used.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// 401/403: gated (licence not accepted) or private, or no/wrong token.
    #[error(
        "{repo}{}: HTTP {status}: the repository is gated — accept its licence at {endpoint}/{repo} \
         while logged in, then set HF_TOKEN to a read token of that account{}",
        file_part(.file),
        token_note(.had_token)
    )]
    Gated {
        repo: String,
        file: Option<String>,
        status: u16,
        endpoint: String,
        had_token: bool,
    },
    #[error("{repo}/{file}: not found (HTTP 404 from {endpoint})")]
    NotFound {
        repo: String,
        file: String,
        endpoint: String,
    },
    #[error("{repo}{}: {msg}", file_part(.file))]
    Failed {
        repo: String,
        file: Option<String>,
        msg: String,
    },
    /// The file's sha256 is not the pinned one; nothing of it was kept.
    #[error(
        "{repo}/{file} at revision {revision}: sha256 mismatch: the lock file has {expected}, \
         the file is {actual}; it was not kept (the lock file is wrong, or what the Hub serves \
         is not the file that was locked)"
    )]
    Checksum {
        repo: String,
        file: String,
        revision: String,
        expected: String,
        actual: String,
    },
    /// The repository is pinned with checksums, but not for this file.
    #[error(
        "{repo}/{file}: not in the lock file, so it can't be verified: record the lock again \
         with `fetch-models --write-lock`"
    )]
    NotPinned { repo: String, file: String },
}

fn file_part(file: &Option<String>) -> String {
    file.as_deref().map(|f| format!("/{f}")).unwrap_or_default()
}

fn token_note(had_token: &bool) -> &'static str {
    if *had_token {
        " (HF_TOKEN is set: is it that account's, and was the licence accepted?)"
    } else {
        " (HF_TOKEN is not set)"
    }
}

/// How to reach the Hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub token: Option<String>,
    pub endpoint: String,
    /// Extra attempts after a transient failure (network, 5xx, 429), with backoff.
    pub retries: usize,
    /// indicatif progress bars (else one log line when a file starts and one when it ends).
    pub progress_bars: bool,
}

impl HubOptions {
    /// `HF_TOKEN`, `HF_ENDPOINT` (default the public Hub), 3 retries, progress bars when stderr
    /// is a terminal.
    pub fn from_env() -> Self {
        HubOptions {
            token: std::env::var("HF_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.trim().is_empty())
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            retries: 3,
            progress_bars: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

/// Without progress bars: one log line when a download starts, with the file's size.
struct LogStart {
    repo: String,
    file: String,
    logged: bool,
}

impl LogStart {
    fn new(repo: &str, file: &str) -> Self {
        LogStart {
            repo: repo.into(),
            file: file.into(),
            logged: false,
        }
    }
}

impl hf_hub::api::Progress for LogStart {
    fn init(&mut self, size: usize, _filename: &str) {
        if !self.logged {
            self.logged = true;
            tracing::info!(
                repo = %self.repo,
                file = %self.file,
                bytes = size,
                size = %human_bytes(size as u64),
                "downloading"
            );
        }
    }
    fn update(&mut self, _size: usize) {}
    fn finish(&mut self) {}
}

/// A file the [`Hub`] handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub repo: String,
    pub file: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// false: it was already in the cache.
    pub downloaded: bool,
    /// Its sha256 matched the pin.
    pub verified: bool,
}

/// What a repository's files are fetched at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// A commit sha (any revision the Hub resolves works; a sha cannot move).
    pub revision: String,
    /// sha256 (lowercase hex) of each file, when known (a lock file). None: nothing is
    /// verified (a `--revision` override).
    pub sha256: Option<BTreeMap<String, String>>,
}

/// The sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A repository's file list at a commit.
#[derive(Debug, Clone)]
pub struct Listing {
    pub sha: String,
    pub files: Vec<String>,
}

/// A Hub client writing into one cache folder.
pub struct Hub {
    api: Api,
    cache: Cache,
    options: HubOptions,
    pins: HashMap<String, Pin>,
    fetched: Mutex<Vec<Fetched>>,
}

enum Class {
    Status(u16),
    Transient,
    Fatal(String),
}

fn classify(e: &ApiError) -> Class {
    match e {
        ApiError::RequestError(b) => match b.as_ref() {
            ureq::Error::Status(code, _) if *code == 429 || *code >= 500 => Class::Transient,
            ureq::Error::Status(code, _) => Class::Status(*code),
            ureq::Error::Transport(_) => Class::Transient,
        },
        ApiError::IoError(_) | ApiError::TooManyRetries(_) | ApiError::LockAcquisition(_) => {
            Class::Transient
        }
        other => Class::Fatal(other.to_string()),
    }
}

impl Hub {
    /// A client caching into `cache_dir` (created if needed).
    pub fn new(cache_dir: &Path, options: HubOptions) -> Result<Self, HubError> {
        let failed = |msg: String| HubError::Failed {
            repo: options.endpoint.clone(),
            file: None,
            msg,
        };
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| failed(format!("creating {}: {e}", cache_dir.display())))?;
        let cache = Cache::new(cache_dir.to_path_buf());
        let api = ApiBuilder::from_cache(cache.clone())
            .with_endpoint(options.endpoint.clone())
            .with_token(options.token.clone())
            .with_retries(options.retries)
            .with_progress(options.progress_bars)
            .build()
            .map_err(|e| failed(e.to_string()))?;
        Ok(Hub {
            api,
            cache,
            options,
            pins: HashMap::new(),
            fetched: Mutex::new(Vec::new()),
        })
    }

    /// Fetches `repo` at `pin` from now on.
    pub fn pin(&mut self, repo: &str, pin: Pin) {
        self.pins.insert(repo.to_string(), pin);
    }

    /// The pin of `repo`, if any.
    pub fn pin_of(&self, repo: &str) -> Option<&Pin> {
        self.pins.get(repo)
    }

    fn model(&self, repo: &str) -> Repo {
        match self.pins.get(repo) {
            Some(p) => Repo::with_revision(repo.to_string(), RepoType::Model, p.revision.clone()),
            None => Repo::new(repo.to_string(), RepoType::Model),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.options.endpoint
    }

    fn error(&self, repo: &str, file: Option<&str>, e: &ApiError) -> Option<HubError> {
        match classify(e) {
            Class::Status(401 | 403) => Some(HubError::Gated {
                repo: repo.into(),
                file: file.map(String::from),
                status: match e {
                    ApiError::RequestError(b) => match b.as_ref() {
                        ureq::Error::Status(c, _) => *c,
                        _ => 401,
                    },
                    _ => 401,
                },
                endpoint: self.options.endpoint.clone(),
                had_token: self.options.token.is_some(),
            }),
            Class::Status(404) => Some(HubError::NotFound {
                repo: repo.into(),
                file: file.unwrap_or("").into(),
                endpoint: self.options.endpoint.clone(),
            }),
            Class::Status(code) => Some(HubError::Failed {
                repo: repo.into(),
                file: file.map(String::from),
                msg: format!("HTTP {code}: {e}"),
            }),
            Class::Fatal(msg) => Some(HubError::Failed {
                repo: repo.into(),
                file: file.map(String::from),
                msg,
            }),
            Class::Transient => None,
        }
    }

    /// Runs `f` with retries on transient failures.
    fn retrying<T>(
        &self,
        repo: &str,
        file: Option<&str>,
        mut f: impl FnMut() -> Result<T, ApiError>,
    ) -> Result<T, HubError> {
        let mut attempt = 0;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) => {
                    if let Some(fatal) = self.error(repo, file, &e) {
                        return Err(fatal);
                    }
                    if attempt >= self.options.retries {
                        return Err(HubError::Failed {
                            repo: repo.into(),
                            file: file.map(String::from),
                            msg: format!("{e} (after {} attempts)", attempt + 1),
                        });
                    }
                    let wait = Duration::from_secs(1 << attempt.min(5));
                    tracing::warn!(repo, file = file.unwrap_or(""), error = %e, retry_in_s = wait.as_secs(), "Hub request failed; retrying");
                    std::thread::sleep(wait);
                    attempt += 1;
                }
            }
        }
    }

    /// The files of `repo` at `main` (or at its pin).
    pub fn list(&self, repo: &str) -> Result<Listing, HubError> {
        let r = self.api.repo(self.model(repo));
        let info = self.retrying(repo, None, || r.info())?;
        let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        files.sort();
        Ok(Listing {
            sha: info.sha,
            files,
        })
    }

    /// The local path of `file` of `repo` (at `main`, or at its pin): from the cache when
    /// complete there, else downloaded (resuming a partial download; a pinned file with a
    /// known sha256 is downloaded whole and verified, see the module docs).
    pub fn get(&self, repo: &str, file: &str) -> Result<PathBuf, HubError> {
        let model = self.model(repo);
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let pin = self.pins.get(repo);
        let expected = match pin.and_then(|p| p.sha256.as_ref()) {
            Some(files) => Some(files.get(file).ok_or_else(|| HubError::NotPinned {
                repo: repo.into(),
                file: file.into(),
            })?),
            None => None,
        };
        if let Some(path) = self.cache.repo(model.clone()).get(file) {
            let bytes = size(&path);
            if let (Some(want), Some(pin)) = (expected, pin) {
                let got = sha256_file(&path).map_err(|e| HubError::Failed {
                    repo: repo.into(),
                    file: Some(file.into()),
                    msg: format!("hashing {}: {e}", path.display()),
                })?;
                if &got != want {
                    // Out of the cache, so that the next run downloads it again.
                    if let Ok(blob) = std::fs::canonicalize(&path) {
                        let _ = std::fs::remove_file(blob);
                    }
                    let _ = std::fs::remove_file(&path);
                    return Err(HubError::Checksum {
                        repo: repo.into(),
                        file: file.into(),
                        revision: pin.revision.clone(),
                        expected: want.clone(),
                        actual: got,
                    });
                }
            }
            tracing::debug!(repo, file, bytes, "already downloaded");
            self.record(repo, file, &path, bytes, false, expected.is_some());
            return Ok(path);
        }
        if let (Some(want), Some(pin)) = (expected, pin) {
            let path = self.download_verified(repo, &pin.revision, file, want)?;
            let bytes = size(&path);
            tracing::info!(repo, file, bytes, size = %human_bytes(bytes), sha256 = %want, "downloaded and verified");
            self.record(repo, file, &path, bytes, true, true);
            return Ok(path);
        }
        let r = self.api.repo(model);
        let path = self.retrying(repo, Some(file), || {
            if self.options.progress_bars {
                r.download(file)
            } else {
                r.download_with_progress(file, LogStart::new(repo, file))
            }
        })?;
        let bytes = size(&path);
        tracing::info!(repo, file, bytes, size = %human_bytes(bytes), "downloaded");
        self.record(repo, file, &path, bytes, true, false);
        Ok(path)
    }

    /// Downloads `file` of `repo` at `revision` into a temporary file next to the cache's
    /// blobs, hashing it on the way; renames it into the cache (blob, snapshot link, ref)
    /// only when its sha256 is `want`, and removes it otherwise.
    fn download_verified(
        &self,
        repo: &str,
        revision: &str,
        file: &str,
        want: &str,
    ) -> Result<PathBuf, HubError> {
        let failed = |msg: String| HubError::Failed {
            repo: repo.into(),
            file: Some(file.into()),
            msg,
        };
        let model = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
        let folder = self.cache.path().join(model.folder_name());
        let blobs = folder.join("blobs");
        std::fs::create_dir_all(&blobs)
            .map_err(|e| failed(format!("creating {}: {e}", blobs.display())))?;
        let url = format!("{}/{repo}/resolve/{revision}/{file}", self.options.endpoint);
        let tmp = blobs.join(format!(
            ".{want}.{}.verifying",
            uuid::Uuid::new_v4().simple()
        ));
        let streamed = self.retrying(repo, Some(file), || self.stream(repo, file, &url, &tmp));
        let actual = match streamed {
            Ok(actual) => actual,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if actual != want {
            let _ = std::fs::remove_file(&tmp);
            return Err(HubError::Checksum {
                repo: repo.into(),
                file: file.into(),
                revision: revision.into(),
                expected: want.into(),
                actual,
            });
        }
        let blob = blobs.join(want);
        let snapshot = folder.join("snapshots").join(revision).join(file);
        let placed = (|| -> std::io::Result<()> {
            std::fs::rename(&tmp, &blob)?;
            if let Some(dir) = snapshot.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // snapshots/<rev>/<file> -> ../../blobs/<sha256> (one more `..` per folder of file).
            let mut target = PathBuf::new();
            for _ in 0..Path::new(file).components().count() + 1 {
                target.push("..");
            }
            target.push("blobs");
            target.push(want);
            let _ = std::fs::remove_file(&snapshot);
            symlink_file(&target, &snapshot)?;
            self.cache.repo(model.clone()).create_ref(revision)
        })();
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(failed(format!(
                "placing the verified file in the cache: {e}"
            )));
        }
        Ok(snapshot)
    }

    /// One GET of `url` into `tmp` (truncated first); the sha256 of what was written.
    fn stream(&self, repo: &str, file: &str, url: &str, tmp: &Path) -> Result<String, ApiError> {
        let mut req = ureq::get(url);
        if let Some(t) = &self.options.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.call().map_err(Box::new)?;
        let size = resp
            .header("Content-Length")
            .and_then(|v| v.parse::<u64>().ok());
        tracing::info!(repo, file, bytes = size, "downloading (verified)");
        let mut reader = resp.into_reader();
        let mut out = std::fs::File::create(tmp)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
        out.sync_all()?;
        Ok(hex(&h.finalize()))
    }

    fn record(
        &self,
        repo: &str,
        file: &str,
        path: &Path,
        bytes: u64,
        downloaded: bool,
        verified: bool,
    ) {
        if let Ok(mut v) = self.fetched.lock() {
            v.push(Fetched {
                repo: repo.into(),
                file: file.into(),
                path: path.to_path_buf(),
                bytes,
                downloaded,
                verified,
            });
        }
    }

    /// Every file handed out so far, in order.
    pub fn fetched(&self) -> Vec<Fetched> {
        self.fetched.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

#[cfg(unix)]
fn symlink_file(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink_file(target: &Path, link: &Path) -> std::io::Result<()> {
    // No symbolic links: a copy of the blob.
    let blob = link.parent().map(|d| d.join(target)).unwrap_or_default();
    std::fs::copy(blob, link).map(|_| ())
}

/// The snapshot folder holding `path`, the local path of repository file `file`.
pub fn snapshot_dir(path: &Path, file: &str) -> Option<PathBuf> {
    let depth = Path::new(file).components().count();
    let mut p = path;
    for _ in 0..depth {
        p = p.parent()?;
    }
    Some(p.to_path_buf())
}

/// `1.5 GiB`, `300 KiB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_of_nested_files() {
        let p = Path::new("/m/hub/models--a--b/snapshots/abc/vae/config.json");
        assert_eq!(
            snapshot_dir(p, "vae/config.json").as_deref(),
            Some(Path::new("/m/hub/models--a--b/snapshots/abc"))
        );
        assert_eq!(
            snapshot_dir(Path::new("/s/x.gguf"), "x.gguf").as_deref(),
            Some(Path::new("/s"))
        );
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8_400_000_000), "7.8 GiB");
    }

    #[test]
    fn gated_error_says_what_to_do() {
        let e = HubError::Gated {
            repo: "black-forest-labs/FLUX.1-Fill-dev".into(),
            file: Some("model_index.json".into()),
            status: 401,
            endpoint: DEFAULT_ENDPOINT.into(),
            had_token: false,
        };
        let m = e.to_string();
        for s in [
            "https://huggingface.co/black-forest-labs/FLUX.1-Fill-dev",
            "licence",
            "HF_TOKEN is not set",
            "401",
        ] {
            assert!(m.contains(s), "{s} not in {m}");
        }
    }
}
