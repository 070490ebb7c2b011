//! Object storage for job inputs and results.
//!
//! One [`Storage`] per worker serves every URI scheme a job may name:
//!
//! | scheme | read | write | notes |
//! |---|---|---|---|
//! | `file://` | yes | yes | only below the configured roots (`--allow-root`); `..` and symlink escapes are refused |
//! | `s3://`, `s3a://` | yes | yes | only below the allowed prefixes (`--allow-prefix`, [`prefix`]); credentials and region from the environment as the AWS SDKs read them (`AWS_*`) |
//! | `gs://` | yes | yes | allowed prefixes as for s3; `GOOGLE_*` / service account from the environment |
//! | `az://`, `abfs://`, `azure://` | yes | yes | allowed prefixes as for s3; `AZURE_*` from the environment |
//! | `http://`, `https://` | yes | no | https only unless plain http is allowed; private, loopback, link-local and configured addresses refused ([`HttpPolicy`]); size and time limits; query strings (pre-signed URLs) are kept |
//!
//! No prefix configured: every object-store URI is refused, so a worker whose identity can
//! reach many buckets reads and writes only those its pool names.
//!
//! Before a job reads anything, [`Storage::check_job`] locates its three URIs (scheme, roots,
//! prefixes) and refuses an output that is the photo or the mask (compared parsed: the canonical
//! path for `file://`, scheme + bucket + decoded key for object stores).
//!
//! With `no_overwrite` (`--no-overwrite`) an existing output is never replaced: the write is
//! a create (`rename_if_not_exists` for `file://`, `PutMode::Create` for object stores), and
//! [`StorageError::Exists`] when the object is there.
//!
//! Writes are atomic: the bytes go to a temporary object next to the target, which is then
//! renamed into place, so a reader sees either the previous object or the whole new one.
//!
//! A job's result is written **fenced** ([`Storage::write_fenced`]): a [`WriteFence`] (the
//! worker's claim, with the attempt number as the token, and no cancel requested) is asked
//! right before the object is put in place, so an attempt that no longer holds its job (frozen
//! past its lease, reclaimed and finished elsewhere) can never replace the output of the
//! attempt that does, and a cancelled job leaves no output:
//!
//! - `file://`: the claim is checked, and the temporary file renamed over the target, under an
//!   exclusive lock (`flock`) of the target's directory that every fenced writer takes, so no
//!   writer can slip in between another's check and its rename;
//! - `s3://`, `gs://`, `az://`: the object's current version (ETag / generation) is read,
//!   the claim checked, and the object written with a conditional put (`PutMode::Create`
//!   when absent, `PutMode::Update` on that version), which the store refuses if anyone
//!   wrote the object since the version was read.

mod cloud;
mod file;
mod http;
pub mod netguard;
pub mod prefix;

use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use url::Url;

pub use file::Roots;
pub use netguard::{Cidr, HttpPolicy};
pub use prefix::ObjectPrefix;

/// Limits and roots of a [`Storage`].
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Directories `file://` URIs may point into (read and write). Empty: `file://` is refused.
    pub allow_roots: Vec<PathBuf>,
    /// Object-store locations (`s3://`, `gs://`, `az://`) jobs may read and write. Empty:
    /// object stores are refused.
    pub allow_prefixes: Vec<ObjectPrefix>,
    /// Never replace an existing output object.
    pub no_overwrite: bool,
    /// Whole-request limit for `http(s)://` reads (connect + headers + body).
    pub http_timeout: Duration,
    /// Connect limit for `http(s)://` and object-store requests.
    pub connect_timeout: Duration,
    /// Request limit for object-store (s3/gs/az) requests.
    pub object_store_timeout: Duration,
    /// Retries of object-store requests on transient errors.
    pub object_store_retries: usize,
    /// Schemes and addresses `http(s)://` reads may reach (default: https, public addresses).
    pub http_policy: HttpPolicy,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            allow_roots: Vec::new(),
            allow_prefixes: Vec::new(),
            no_overwrite: false,
            http_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            object_store_timeout: Duration::from_secs(60),
            object_store_retries: 3,
            http_policy: HttpPolicy::default(),
        }
    }
}

/// Why a read or write failed. [`StorageError::is_transient`] tells which are worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: String },
    #[error(
        "unsupported URI scheme {scheme:?} in {uri:?} (expected file, s3, gs, az, http or https)"
    )]
    UnsupportedScheme { uri: String, scheme: String },
    #[error("{uri} is outside the allowed storage roots ({roots})")]
    OutsideRoots { uri: String, roots: String },
    #[error("{uri} is outside the allowed object-store prefixes ({prefixes})")]
    OutsidePrefixes { uri: String, prefixes: String },
    /// The output names the job's photo or mask.
    #[error("{uri} is the job's {input}: the output must not overwrite an input")]
    OverwritesInput { uri: String, input: &'static str },
    /// `no_overwrite`: the output object exists already, and is left as it is.
    #[error("{uri} exists already and is not replaced (create-only storage)")]
    Exists { uri: String },
    #[error("{uri} is read-only (http(s) locations can't be written)")]
    ReadOnly { uri: String },
    #[error("{uri}: access denied: {reason}")]
    AccessDenied { uri: String, reason: String },
    #[error("{uri} not found")]
    NotFound { uri: String },
    #[error("{uri} is larger than the limit of {limit} bytes")]
    TooLarge { uri: String, limit: u64 },
    #[error("{uri} is unreachable: {reason}")]
    Unreachable { uri: String, reason: String },
    /// The address (of the URI's host or a redirect hop) is refused by the [`HttpPolicy`].
    /// Says nothing of what the address answered.
    #[error("{uri}: address not allowed")]
    AddressNotAllowed { uri: String },
    /// Plain `http://` (in the URI or a redirect hop) while the policy allows https only.
    #[error("{uri}: plain http is not allowed (https only)")]
    SchemeNotAllowed { uri: String },
    #[error("{uri}: HTTP status {status}")]
    HttpStatus { uri: String, status: u16 },
    #[error("{uri} can't be written: {reason}")]
    NotWritable { uri: String, reason: String },
    #[error("{uri}: {reason}")]
    Backend { uri: String, reason: String },
    /// The fence refused the write: the writer may no longer replace the object.
    #[error("{uri} was not written: {reason}")]
    Fenced { uri: String, reason: String },
}

/// Asked right before a fenced write puts its object in place (see the module docs).
pub trait WriteFence: Send + Sync {
    /// Ok while the writer may still replace the object; Err(why) once it may not. Called
    /// more than once per write (before and inside the publishing step).
    fn check(&self) -> futures::future::BoxFuture<'_, Result<(), String>>;
}

impl StorageError {
    /// A network or server-side failure that may pass on its own (another attempt may succeed).
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Unreachable { .. } => true,
            StorageError::HttpStatus { status, .. } => *status >= 500 || *status == 429,
            StorageError::Backend { .. } => true,
            _ => false,
        }
    }
}

/// Reads and writes job objects by URI. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    config: StorageConfig,
    roots: Roots,
    prefixes: prefix::Prefixes,
    http: http::HttpReader,
    cloud: cloud::CloudStores,
}

/// Where a URI points, once parsed and checked.
enum Location {
    File(PathBuf),
    Http(Url),
    Cloud {
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
        /// Scheme, authority and key ([`prefix::object_identity`]).
        id: Option<String>,
    },
}

/// What a location names, comparable across spellings of one object.
fn identity(at: &Location) -> Option<String> {
    match at {
        Location::File(path) => Some(format!("file://{}", path.display())),
        Location::Http(url) => Some(url.as_str().to_string()),
        Location::Cloud { id, .. } => id.clone(),
    }
}

static CRYPTO_PROVIDER: Once = Once::new();

/// TLS for object_store's HTTP client and for `https://` reads: rustls with the ring provider.
fn install_crypto_provider() {
    CRYPTO_PROVIDER.call_once(|| {
        // Err means another provider is already installed process-wide: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Storage {
    /// Canonicalises the roots (they must exist) and builds the HTTP client.
    pub fn new(config: StorageConfig) -> Result<Self, StorageError> {
        install_crypto_provider();
        let roots = Roots::new(&config.allow_roots)?;
        let http = http::HttpReader::new(
            config.http_timeout,
            config.connect_timeout,
            config.http_policy.clone(),
        )?;
        let cloud = cloud::CloudStores::default();
        let prefixes = prefix::Prefixes::new(config.allow_prefixes.clone());
        Ok(Storage {
            inner: Arc::new(Inner {
                config,
                roots,
                prefixes,
                http,
                cloud,
            }),
        })
    }

    pub fn config(&self) -> &StorageConfig {
        &self.inner.config
    }

    /// Reads a whole object, refusing more than `max_bytes`.
    pub async fn read(&self, uri: &str, max_bytes: u64) -> Result<Bytes, StorageError> {
        match self.locate(uri, Access::Read)? {
            Location::File(path) => file::read(uri, &path, max_bytes).await,
            Location::Http(url) => self.inner.http.get(uri, url, max_bytes).await,
            Location::Cloud { store, path, .. } => {
                cloud::read(uri, &*store, &path, max_bytes).await
            }
        }
    }

    /// Checks a job's locations before anything is read: the photo and the mask may be read,
    /// the output written (scheme, roots, prefixes), and the output is neither input. Err
    /// names which URI (`"photo"`, `"mask"`, `"output"`) and why.
    pub fn check_job(
        &self,
        image: &str,
        mask: &str,
        output: &str,
    ) -> Result<(), (&'static str, StorageError)> {
        let photo_at = self.locate(image, Access::Read).map_err(|e| ("photo", e))?;
        let mask_at = self.locate(mask, Access::Read).map_err(|e| ("mask", e))?;
        let out_at = self
            .locate(output, Access::Write)
            .map_err(|e| ("output", e))?;
        let out_id = identity(&out_at);
        for (input, at) in [("photo", &photo_at), ("mask", &mask_at)] {
            if out_id.is_some() && identity(at) == out_id {
                return Err((
                    "output",
                    StorageError::OverwritesInput {
                        uri: output.to_string(),
                        input,
                    },
                ));
            }
        }
        Ok(())
    }

    /// Checks, before any work is spent, that `uri` names a location this worker can write
    /// (scheme, roots, prefixes, and for `file://` an existing-or-creatable, writable
    /// directory; with `no_overwrite`, that nothing is there yet).
    pub async fn check_writable(&self, uri: &str) -> Result<(), StorageError> {
        let no_overwrite = self.inner.config.no_overwrite;
        match self.locate(uri, Access::Write)? {
            Location::File(path) => {
                if no_overwrite && tokio::fs::symlink_metadata(&path).await.is_ok() {
                    return Err(StorageError::Exists {
                        uri: uri.to_string(),
                    });
                }
                file::check_writable(uri, &path).await
            }
            Location::Http(_) => Err(StorageError::ReadOnly {
                uri: uri.to_string(),
            }),
            // Object stores have no cheap write probe; permissions show at store time.
            Location::Cloud { store, path, .. } if no_overwrite => {
                cloud::check_absent(uri, &*store, &path).await
            }
            Location::Cloud { .. } => Ok(()),
        }
    }

    /// Writes `data` atomically: temporary object next to the target, then a rename.
    pub async fn write(&self, uri: &str, data: Bytes) -> Result<(), StorageError> {
        self.write_with(uri, data, None).await
    }

    /// Writes `data` atomically, and only while `fence` allows it (see the module docs):
    /// [`StorageError::Fenced`] when it does not, and the target is left as it was.
    pub async fn write_fenced(
        &self,
        uri: &str,
        data: Bytes,
        fence: &dyn WriteFence,
    ) -> Result<(), StorageError> {
        self.write_with(uri, data, Some(fence)).await
    }

    async fn write_with(
        &self,
        uri: &str,
        data: Bytes,
        fence: Option<&dyn WriteFence>,
    ) -> Result<(), StorageError> {
        let no_overwrite = self.inner.config.no_overwrite;
        match self.locate(uri, Access::Write)? {
            Location::File(path) => file::write_atomic(uri, &path, data, fence, no_overwrite).await,
            Location::Http(_) => Err(StorageError::ReadOnly {
                uri: uri.to_string(),
            }),
            Location::Cloud { store, path, .. } => match fence {
                None => cloud::write_atomic(uri, &*store, &path, data, no_overwrite).await,
                Some(fence) => {
                    cloud::write_conditional(uri, &*store, &path, data, fence, no_overwrite).await
                }
            },
        }
    }

    fn locate(&self, uri: &str, access: Access) -> Result<Location, StorageError> {
        let url = Url::parse(uri).map_err(|e| StorageError::InvalidUri {
            uri: uri.to_string(),
            reason: e.to_string(),
        })?;
        match url.scheme() {
            "file" => {
                let path = file::url_to_path(uri, &url)?;
                let path = match access {
                    Access::Read => self.inner.roots.confine_existing(uri, &path)?,
                    Access::Write => self.inner.roots.confine_new(uri, &path)?,
                };
                Ok(Location::File(path))
            }
            "http" | "https" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(StorageError::InvalidUri {
                        uri: uri.to_string(),
                        reason: "no host".into(),
                    });
                }
                Ok(Location::Http(url))
            }
            "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure" => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(StorageError::InvalidUri {
                        uri: uri.to_string(),
                        reason: "no bucket".into(),
                    });
                }
                // Before any client is built or request made: nothing outside the prefixes is
                // ever contacted.
                if !self.inner.prefixes.allows(&url) {
                    return Err(StorageError::OutsidePrefixes {
                        uri: uri.to_string(),
                        prefixes: self.inner.prefixes.describe(),
                    });
                }
                let (store, path) = self.inner.cloud.resolve(uri, &url, &self.inner.config)?;
                Ok(Location::Cloud {
                    store,
                    path,
                    id: prefix::object_identity(&url),
                })
            }
            other => Err(StorageError::UnsupportedScheme {
                uri: uri.to_string(),
                scheme: other.to_string(),
            }),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// File name of the temporary object written next to `name` before the rename.
fn temp_name(name: &str) -> String {
    format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple())
}
