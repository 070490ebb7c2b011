//! A throwaway `redis-server` for tests (feature `test-util`).
//!
//! ```no_run
//! # fn main() -> Result<(), pawfect_queue::testing::TestServerError> {
//! use pawfect_queue::testing::RedisServer;
//! let mut redis = RedisServer::start()?; // free loopback port, temp dir
//! let url = redis.url();                 // redis://127.0.0.1:PORT/
//! redis.kill()?;                         // crash it (or stop() for a clean shutdown)
//! redis.restart()?;                      // same port and dir (AOF data survives)
//! # Ok(()) }
//! ```
//!
//! The binary is `$REDIS_SERVER` or `redis-server` on the `PATH`. The server is killed when the
//! value is dropped (also on a panicking test).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a test server could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TestServerError {
    #[error(
        "redis-server not found ({0}): install it (e.g. `apt-get install redis-server`) or set REDIS_SERVER to its path"
    )]
    NotFound(String),
    #[error("redis-server did not answer PING within {timeout:?}: {log}")]
    NotReady { timeout: Duration, log: String },
    #[error("redis-server exited at start ({status}): {log}")]
    Exited { status: String, log: String },
    #[error("test redis-server: {0}")]
    Io(#[from] std::io::Error),
}

/// How often the append-only file is fsynced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AofFsync {
    /// `appendfsync always`: every write is on disk before its reply, so a killed server loses
    /// nothing it acknowledged.
    #[default]
    Always,
    /// `appendfsync everysec`: up to a second of writes may be lost in a crash.
    EverySec,
}

/// Options of a [`RedisServer`].
#[derive(Clone, Debug, Default)]
pub struct RedisServerOptions {
    /// Turn on the append-only file.
    pub aof: bool,
    /// Its fsync policy (default `always`).
    pub aof_fsync: AofFsync,
    /// The binary; default `$REDIS_SERVER` or `redis-server`.
    pub binary: Option<PathBuf>,
    /// How long to wait for PING to answer; default 20 s.
    pub ready_timeout: Option<Duration>,
}

/// A `redis-server` on a loopback port with its data in a temporary directory.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    opts: RedisServerOptions,
}

impl RedisServer {
    /// Starts a server without persistence.
    pub fn start() -> Result<Self, TestServerError> {
        Self::start_with(RedisServerOptions::default())
    }

    /// Starts a server with AOF and `appendfsync always`.
    pub fn start_aof() -> Result<Self, TestServerError> {
        Self::start_with(RedisServerOptions {
            aof: true,
            ..Default::default()
        })
    }

    pub fn start_with(opts: RedisServerOptions) -> Result<Self, TestServerError> {
        let mut last_err = None;
        // A port picked free may be taken before redis binds it: try a few.
        for _ in 0..5 {
            let mut s = RedisServer {
                child: None,
                port: free_port()?,
                dir: tempfile::Builder::new()
                    .prefix("pawfect-redis-")
                    .tempdir()?,
                opts: opts.clone(),
            };
            match s.spawn() {
                Ok(()) => return Ok(s),
                Err(e @ TestServerError::NotFound(_)) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            TestServerError::Io(std::io::Error::other("could not start redis-server"))
        }))
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (AOF, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Clean shutdown (SIGTERM: redis flushes the AOF and exits).
    pub fn stop(&mut self) -> Result<(), TestServerError> {
        if let Some(mut c) = self.child.take() {
            // SIGTERM through `kill`, the portable way without a libc dependency.
            let status = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                c.kill()?;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    c.kill()?;
                    c.wait()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Crash: SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) -> Result<(), TestServerError> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same port with the same directory (stopping it first
    /// if it runs).
    pub fn restart(&mut self) -> Result<(), TestServerError> {
        self.stop()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The port may linger for a moment after the old process died.
                Err(TestServerError::Exited { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn binary(&self) -> PathBuf {
        self.opts
            .binary
            .clone()
            .or_else(|| std::env::var_os("REDIS_SERVER").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("redis-server"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    fn spawn(&mut self) -> Result<(), TestServerError> {
        let bin = self.binary();
        let mut cmd = Command::new(&bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--daemonize")
            .arg("no")
            .arg("--save")
            .arg("")
            .arg("--maxmemory-policy")
            .arg("noeviction");
        if self.opts.aof {
            let fsync = match self.opts.aof_fsync {
                AofFsync::Always => "always",
                AofFsync::EverySec => "everysec",
            };
            cmd.arg("--appendonly")
                .arg("yes")
                .arg("--appendfsync")
                .arg(fsync);
        } else {
            cmd.arg("--appendonly").arg("no");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TestServerError::NotFound(bin.display().to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        let timeout = self.opts.ready_timeout.unwrap_or(Duration::from_secs(20));
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(status) = child.try_wait()? {
                return Err(TestServerError::Exited {
                    status: status.to_string(),
                    log: self.log_tail(),
                });
            }
            if ping(addr) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TestServerError::NotReady {
                    timeout,
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn free_port() -> Result<u16, std::io::Error> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// True when a PING on a fresh connection gets `+PONG` (not `-LOADING` while the AOF loads).
fn ping(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].starts_with(b"+PONG"),
        Err(_) => false,
    }
}
