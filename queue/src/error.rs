//! Errors of the queue.

/// Everything that can go wrong talking the queue protocol.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis could not be reached or answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A pool name, uid, worker name or prefix that cannot be used in a key.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    /// The first connection failed. For `rediss://` the message says which CA was trusted:
    /// an unknown issuer is the usual cause (a private CA not given as the CA file).
    #[error("cannot connect to Redis at {url}{hint}: {source}")]
    Connect {
        /// The URL without its password.
        url: String,
        hint: String,
        #[source]
        source: redis::RedisError,
    },
    /// The CA file could not be read or holds no certificate.
    #[error("Redis CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    /// A configuration value out of range.
    #[error("invalid queue config: {0}")]
    Config(String),
    /// Redis answered with something the protocol does not expect (a bug or a foreign writer).
    #[error("unexpected reply to {op}: {detail}")]
    Protocol { op: &'static str, detail: String },
    /// A JSON document in Redis (spec, timings, event payload) could not be read or written.
    #[error("json of {what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl QueueError {
    pub(crate) fn protocol(op: &'static str, detail: impl Into<String>) -> Self {
        QueueError::Protocol {
            op,
            detail: detail.into(),
        }
    }

    /// True when the error is about reaching Redis (connection refused, dropped, timed out,
    /// or logging in: a pool's user is set up again by the operator after Redis lost it): the
    /// call may succeed when retried later.
    pub fn is_transient(&self) -> bool {
        match self {
            QueueError::Redis(e) | QueueError::Connect { source: e, .. } => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    // A pool's user is gone while Redis restarted without an ACL file, until the
                    // operator's next reconcile of the pool sets it up again.
                    || e.kind() == redis::ErrorKind::AuthenticationFailed
                    || matches!(
                        e.code(),
                        Some("LOADING" | "TRYAGAIN" | "BUSY" | "MASTERDOWN" | "NOAUTH" | "WRONGPASS")
                    )
            }
            _ => false,
        }
    }

    /// True when Redis says a consumer group or stream is missing (e.g. its data was lost).
    pub(crate) fn is_nogroup(&self) -> bool {
        matches!(self, QueueError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;
