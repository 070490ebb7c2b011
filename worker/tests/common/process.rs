//! A `pawfect-worker serve` process of a test: its port, its log, readiness.

use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Child;

/// A worker process, killed when dropped (spawn it with `kill_on_drop`).
pub struct Worker {
    pub child: Child,
    /// Its `--http-addr` port on 127.0.0.1.
    pub http: u16,
    /// Its stderr.
    pub log: PathBuf,
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:`port`: status and body, or None when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    ))
}

impl Worker {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `/readyz` to answer 200; panics with the log if the process exits or is not
    /// ready after 600 polls 50 ms apart.
    pub async fn wait_ready(&mut self) {
        for _ in 0..600 {
            if let Some((200, _)) = http_get(self.http, "/readyz").await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("worker exited with {status}:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("worker never ready:\n{}", self.log_text());
    }
}
