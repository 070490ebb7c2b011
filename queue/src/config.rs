//! Queue configuration shared by the operator and the workers.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::QueueError;
use crate::keys::{DEFAULT_PREFIX, Keys};

/// How to reach Redis and the timing of the protocol. Operator and workers must agree on
/// `prefix`; `lease` only matters to the workers (it is the idle time after which any worker
/// may take over an entry), `finished_ttl` and the stream lengths to whoever finishes jobs.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// A redis-rs URL: `redis://[user][:password@]host[:port][/db]`, `rediss://…` for TLS
    /// (rustls), `redis+unix:///path` for a socket.
    pub url: String,
    /// PEM file of the CA(s) that signed the server's certificate, for `rediss://` URLs: when
    /// set, only these are trusted; when unset, the public web roots (webpki-roots).
    pub ca_file: Option<PathBuf>,
    /// Prefix of every key (default `pawfect`).
    pub prefix: String,
    /// An entry whose worker has not heartbeated for this long is taken over by another
    /// worker (XAUTOCLAIM min-idle). Default 60 s.
    pub lease: Duration,
    /// How often a worker heartbeats its claim; default (None) is a quarter of the lease.
    pub heartbeat_interval: Option<Duration>,
    /// Longest single blocking read of a waiting worker; between reads it reclaims expired
    /// entries and refreshes its registry entry. Capped at half the lease. Default 5 s.
    pub block_interval: Duration,
    /// How long the hash of a finished job stays readable (default 24 h).
    pub finished_ttl: Duration,
    /// Approximate cap of the events stream (XADD MAXLEN ~). Default 100 000.
    pub events_maxlen: u64,
    /// Approximate cap of each dead-letter stream. Default 10 000.
    pub dead_maxlen: u64,
    /// Response timeout of ordinary (non-blocking) commands. Default 5 s.
    pub response_timeout: Duration,
    /// Connect timeout. Default 5 s.
    pub connect_timeout: Duration,
    /// Unacknowledged events idle this long are delivered again to the events reader
    /// (also those of a previous operator pod with another consumer name). Default 60 s.
    pub events_redeliver_after: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            url: "redis://127.0.0.1:6379/".to_string(),
            ca_file: None,
            prefix: DEFAULT_PREFIX.to_string(),
            lease: Duration::from_secs(60),
            heartbeat_interval: None,
            block_interval: Duration::from_secs(5),
            finished_ttl: Duration::from_secs(24 * 3600),
            events_maxlen: 100_000,
            dead_maxlen: 10_000,
            response_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            events_redeliver_after: Duration::from_secs(60),
        }
    }
}

impl QueueConfig {
    /// Defaults with this URL.
    pub fn new(url: impl Into<String>) -> Self {
        QueueConfig {
            url: url.into(),
            ..Default::default()
        }
    }

    /// The heartbeat period a worker uses.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval.unwrap_or(self.lease / 4)
    }

    /// The longest single blocking read of a worker.
    pub fn effective_block(&self) -> Duration {
        self.block_interval
            .min(self.lease / 2)
            .max(Duration::from_millis(1))
    }

    /// Checks the values against each other.
    pub fn validate(&self) -> Result<(), QueueError> {
        Keys::new(&self.prefix)?;
        if self.lease < Duration::from_millis(10) {
            return Err(QueueError::Config(format!(
                "lease {:?} is too short (at least 10 ms)",
                self.lease
            )));
        }
        let hb = self.heartbeat_interval();
        if hb.is_zero() || hb >= self.lease {
            return Err(QueueError::Config(format!(
                "heartbeat interval {hb:?} must be positive and shorter than the lease {:?}",
                self.lease
            )));
        }
        if self.block_interval.is_zero() {
            return Err(QueueError::Config("block interval must be positive".into()));
        }
        if self.events_maxlen == 0 || self.dead_maxlen == 0 {
            return Err(QueueError::Config(
                "events_maxlen and dead_maxlen must be positive".into(),
            ));
        }
        if self.response_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(QueueError::Config("timeouts must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = QueueConfig::default();
        c.validate().unwrap();
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(15));
        assert_eq!(c.effective_block(), Duration::from_secs(5));
    }

    #[test]
    fn heartbeat_must_be_shorter_than_lease() {
        let c = QueueConfig {
            heartbeat_interval: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("heartbeat"));
        let c = QueueConfig {
            lease: Duration::from_millis(400),
            ..Default::default()
        };
        c.validate().unwrap();
        assert_eq!(c.effective_block(), Duration::from_millis(200));
    }
}
