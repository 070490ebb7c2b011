//! `http(s)://` reads: one GET with a connect and a whole-request time limit and a body limit
//! (checked against `Content-Length` first, then while the body streams in).
//!
//! Where a read may connect is decided by [`super::netguard`]: the URL (scheme, literal host)
//! is checked before the request and on every redirect hop, and names resolve to allowed
//! addresses only. A refusal says "address not allowed" and nothing of what the target
//! answered, and is never retried.
//!
//! object_store's HTTP store is not used for these: it drops the query string, which pre-signed
//! URLs need; its reqwest client is reused.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use url::Url;

use super::StorageError;
use super::netguard::{self, GuardedResolver, HttpPolicy, Refused};

pub(super) struct HttpReader {
    client: reqwest::Client,
    policy: Arc<HttpPolicy>,
}

impl HttpReader {
    pub(super) fn new(
        timeout: Duration,
        connect_timeout: Duration,
        policy: HttpPolicy,
    ) -> Result<Self, StorageError> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(connect_timeout)
            .redirect(netguard::redirect_policy(policy.clone()))
            .dns_resolver(GuardedResolver::new(policy.clone()))
            // A proxy would connect on the worker's behalf, past the address checks.
            .no_proxy()
            .user_agent(concat!("pawfect-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StorageError::Backend {
                uri: "http client".into(),
                reason: e.to_string(),
            })?;
        Ok(HttpReader { client, policy })
    }

    pub(super) async fn get(
        &self,
        uri: &str,
        url: Url,
        max_bytes: u64,
    ) -> Result<Bytes, StorageError> {
        let refused = |r: Refused| match r {
            Refused::Scheme => StorageError::SchemeNotAllowed {
                uri: uri.to_string(),
            },
            Refused::Address => StorageError::AddressNotAllowed {
                uri: uri.to_string(),
            },
        };
        self.policy.check_url(&url).map_err(refused)?;
        let unreachable = |e: reqwest::Error| match netguard::refusal(&e) {
            Some(r) => refused(r),
            None => StorageError::Unreachable {
                uri: uri.to_string(),
                reason: describe(&e),
            },
        };
        let mut resp = self.client.get(url).send().await.map_err(unreachable)?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Err(StorageError::NotFound {
                uri: uri.to_string(),
            });
        }
        if !status.is_success() {
            return Err(StorageError::HttpStatus {
                uri: uri.to_string(),
                status: status.as_u16(),
            });
        }
        let too_large = || StorageError::TooLarge {
            uri: uri.to_string(),
            limit: max_bytes,
        };
        if resp.content_length().is_some_and(|n| n > max_bytes) {
            return Err(too_large());
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            if (body.len() + chunk.len()) as u64 > max_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

/// reqwest's top-level message ("error sending request") hides the cause: walk the chain.
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
