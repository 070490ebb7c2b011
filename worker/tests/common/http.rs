//! A tiny HTTP/1.1 server for tests: fixed routes, optional delay, a gate that holds the
//! response until opened, bodies with or without Content-Length, redirects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Clone)]
pub struct Route {
    pub status: u16,
    pub body: Vec<u8>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Send `Content-Length` (else the body ends when the connection closes).
    pub content_length: bool,
    /// Hold the answer until this turns true.
    pub gate: Option<watch::Receiver<bool>>,
    /// Sent as the `Location` header.
    pub location: Option<String>,
}

impl Route {
    pub fn ok(body: Vec<u8>) -> Self {
        Route {
            status: 200,
            body,
            delay: Duration::ZERO,
            content_length: true,
            gate: None,
            location: None,
        }
    }
    /// A 302 to `location`.
    pub fn redirect(location: &str) -> Self {
        Route {
            status: 302,
            location: Some(location.to_string()),
            ..Route::ok(Vec::new())
        }
    }
    pub fn status(status: u16) -> Self {
        Route {
            status,
            body: b"error".to_vec(),
            ..Route::ok(Vec::new())
        }
    }
}

#[derive(Clone, Default)]
pub struct Server {
    routes: Arc<Mutex<HashMap<String, Route>>>,
    hits: Arc<Mutex<HashMap<String, u32>>>,
    pub addr: Option<SocketAddr>,
}

impl Server {
    /// Starts serving on 127.0.0.1 (on the current tokio runtime).
    pub async fn start() -> Server {
        Server::start_on("127.0.0.1").await
    }

    /// Starts serving on `ip` (a loopback address: 127.0.0.2 is a second host for tests).
    pub async fn start_on(ip: &str) -> Server {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let s = Server {
            addr: Some(listener.local_addr().unwrap()),
            ..Default::default()
        };
        let routes = s.routes.clone();
        let hits = s.hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let routes = routes.clone();
                let hits = hits.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    *hits.lock().unwrap().entry(target.clone()).or_default() += 1;
                    let route = routes.lock().unwrap().get(&target).cloned();
                    let route = route.unwrap_or_else(|| Route::status(404));
                    if let Some(mut gate) = route.gate.clone() {
                        let _ = gate.wait_for(|open| *open).await;
                    }
                    tokio::time::sleep(route.delay).await;
                    let mut resp = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", route.status);
                    if let Some(location) = &route.location {
                        resp.push_str(&format!("Location: {location}\r\n"));
                    }
                    if route.content_length {
                        resp.push_str(&format!("Content-Length: {}\r\n", route.body.len()));
                    }
                    resp.push_str("\r\n");
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.write_all(&route.body).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        s
    }

    pub fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.to_string(), route);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr.unwrap(), path)
    }

    /// Requests seen for `path` (with its query).
    pub fn hits(&self, path: &str) -> u32 {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Every request target seen so far (path with query), sorted.
    pub fn targets(&self) -> Vec<String> {
        let mut t: Vec<String> = self.hits.lock().unwrap().keys().cloned().collect();
        t.sort();
        t
    }
}
