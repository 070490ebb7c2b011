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
//!
//! TLS: [`TestCa::generate`] makes a private CA and a server certificate for `127.0.0.1` and
//! `localhost`; [`RedisServer::start_tls`] serves TLS only (the plaintext port is off) with
//! it, and [`RedisServer::url`] is then `rediss://127.0.0.1:PORT/`.

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

/// A private CA and a server certificate it signed, as PEM files in a temporary directory.
#[derive(Debug)]
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    /// A new CA (its own key) and a server certificate for `127.0.0.1` and `localhost`.
    pub fn generate() -> Result<Self, TestServerError> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let err = |e: rcgen::Error| TestServerError::Io(std::io::Error::other(e.to_string()));
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: two test CAs of one name would look like one CA to a verifier.
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!("pawfect test CA {}-{n}", std::process::id()),
        );
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(err)?)
            .map_err(err)?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(err)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "pawfect test redis");
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &ca).map_err(err)?;
        let dir = tempfile::Builder::new().prefix("pawfect-ca-").tempdir()?;
        std::fs::write(dir.path().join("ca.crt"), ca.pem())?;
        std::fs::write(dir.path().join("tls.crt"), cert.pem())?;
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem())?;
        Ok(TestCa { dir })
    }

    /// The CA certificate (what clients trust).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The server certificate.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    /// The server certificate's key.
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }
}

/// Certificate files of a TLS server.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl From<&TestCa> for TlsFiles {
    fn from(ca: &TestCa) -> Self {
        TlsFiles {
            cert: ca.cert_file(),
            key: ca.key_file(),
            ca: ca.ca_file(),
        }
    }
}

/// Options of a [`RedisServer`].
#[derive(Clone, Debug, Default)]
pub struct RedisServerOptions {
    /// Serve TLS only (`--tls-port`, plaintext `--port 0`), clients not asked for certificates.
    pub tls: Option<TlsFiles>,
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
    /// Starts seen in the log so far (a restart appends to the same log).
    ready_lines: usize,
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

    /// Starts a TLS-only server with the CA's server certificate.
    pub fn start_tls(ca: &TestCa) -> Result<Self, TestServerError> {
        Self::start_with(RedisServerOptions {
            tls: Some(ca.into()),
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
                ready_lines: 0,
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

    /// `redis://127.0.0.1:PORT/` (`rediss://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
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
        match &self.opts.tls {
            None => {
                cmd.arg("--port").arg(self.port.to_string());
            }
            Some(tls) => {
                cmd.args(["--port", "0", "--tls-port"])
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        cmd.arg("--bind")
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
            // A TLS port cannot be pinged in plain text: its log line says when it listens.
            let ready = match self.opts.tls {
                None => ping(addr),
                Some(_) => std::fs::read_to_string(self.log_path()).is_ok_and(|log| {
                    log.lines()
                        .filter(|l| l.contains("Ready to accept connections"))
                        .count()
                        > self.ready_lines
                }),
            };
            if ready {
                self.ready_lines += 1;
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
