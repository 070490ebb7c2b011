//! Downloads from the Hugging Face Hub into a cache folder of the Hub's layout
//! (`models--owner--name/{blobs,snapshots/<sha>,refs/main}`), through `hf-hub`'s blocking API.
//!
//! A file already in the cache is not fetched again (no request at all); an interrupted download
//! resumes from its `.part` file. `HF_ENDPOINT` points at another Hub (a mirror, or a test server).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

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
            fetched: Mutex::new(Vec::new()),
        })
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

    /// The files of `repo` at `main`.
    pub fn list(&self, repo: &str) -> Result<Listing, HubError> {
        let r = self.api.repo(Repo::new(repo.to_string(), RepoType::Model));
        let info = self.retrying(repo, None, || r.info())?;
        let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        files.sort();
        Ok(Listing {
            sha: info.sha,
            files,
        })
    }

    /// The local path of `file` of `repo` (at `main`): from the cache when complete there, else
    /// downloaded (resuming a partial download).
    pub fn get(&self, repo: &str, file: &str) -> Result<PathBuf, HubError> {
        let model = Repo::new(repo.to_string(), RepoType::Model);
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        if let Some(path) = self.cache.repo(model.clone()).get(file) {
            let bytes = size(&path);
            tracing::debug!(repo, file, bytes, "already downloaded");
            self.record(repo, file, &path, bytes, false);
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
        self.record(repo, file, &path, bytes, true);
        Ok(path)
    }

    fn record(&self, repo: &str, file: &str, path: &Path, bytes: u64, downloaded: bool) {
        if let Ok(mut v) = self.fetched.lock() {
            v.push(Fetched {
                repo: repo.into(),
                file: file.into(),
                path: path.to_path_buf(),
                bytes,
                downloaded,
            });
        }
    }

    /// Every file handed out so far, in order.
    pub fn fetched(&self) -> Vec<Fetched> {
        self.fetched.lock().map(|v| v.clone()).unwrap_or_default()
    }
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
