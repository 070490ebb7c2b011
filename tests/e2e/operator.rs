//! The operator as its pods would run it, out of cluster: the real `pawfect-operator` binary with
//! the container args of the chart's operator Deployment, authenticated with a token of the
//! chart's ServiceAccount (so the chart's RBAC is all it has), one process per replica. A replica
//! whose process exits (SIGKILL from the test, or the operator exiting when it loses its Lease) is
//! started again after a second, as the kubelet restarts a container.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One operator replica (pod name `identity`), kept running until dropped.
pub struct Replica {
    pub identity: String,
    child: Arc<Mutex<Option<Child>>>,
    stop: Arc<AtomicBool>,
    /// While set, an exited process is not started again.
    hold: Arc<AtomicBool>,
    starts: Arc<AtomicU32>,
    /// Port of `--http-addr` (metrics, probes), when the args name one.
    http_port: Option<u16>,
    log: PathBuf,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

impl Replica {
    /// Starts `bin ARGS` with `KUBECONFIG=kubeconfig`, `POD_NAME=identity`,
    /// `POD_NAMESPACE=namespace`; output appended to `log_dir/<identity>.log`.
    pub fn start(
        bin: &Path,
        args: Vec<String>,
        kubeconfig: &Path,
        namespace: &str,
        identity: &str,
        log_dir: &Path,
    ) -> Replica {
        let log = log_dir.join(format!("{identity}.log"));
        let http_port = args
            .iter()
            .find_map(|a| a.strip_prefix("--http-addr="))
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok());
        let child = Arc::new(Mutex::new(None::<Child>));
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let starts = Arc::new(AtomicU32::new(0));
        let spawn = {
            let (bin, kubeconfig, log) = (bin.to_path_buf(), kubeconfig.to_path_buf(), log.clone());
            let (namespace, identity) = (namespace.to_string(), identity.to_string());
            move || -> Child {
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("operator log file");
                Command::new(&bin)
                    .args(&args)
                    .env("KUBECONFIG", &kubeconfig)
                    .env("POD_NAMESPACE", &namespace)
                    .env("POD_NAME", &identity)
                    .env_remove("PAWFECT_REDIS_PASSWORD")
                    .env_remove("RUST_LOG")
                    .stdout(out.try_clone().expect("log file"))
                    .stderr(out)
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("start the operator binary")
            }
        };
        *child.lock().unwrap() = Some(spawn());
        starts.store(1, Ordering::SeqCst);
        let supervisor = {
            let (child, stop, hold, starts) =
                (child.clone(), stop.clone(), hold.clone(), starts.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(200));
                    let mut slot = child.lock().unwrap_or_else(|p| p.into_inner());
                    let exited = slot
                        .as_mut()
                        .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                    if exited && !stop.load(Ordering::SeqCst) && !hold.load(Ordering::SeqCst) {
                        drop(slot);
                        // The kubelet's first restart back-off is 10 s; a second is enough here.
                        std::thread::sleep(Duration::from_secs(1));
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        *child.lock().unwrap_or_else(|p| p.into_inner()) = Some(spawn());
                        starts.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        };
        Replica {
            identity: identity.to_string(),
            child,
            stop,
            hold,
            starts,
            http_port,
            log,
            supervisor: Some(supervisor),
        }
    }

    /// Port of the replica's HTTP server (`/metrics`).
    pub fn http_port(&self) -> Option<u16> {
        self.http_port
    }

    /// Process id of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.id())
    }

    /// How many times its process was started.
    pub fn starts(&self) -> u32 {
        self.starts.load(Ordering::SeqCst)
    }

    /// SIGKILLs the running process (it is started again by the supervisor).
    pub fn kill(&self) {
        if let Some(c) = self
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            let _ = c.kill();
        }
    }

    /// SIGKILLs the running process and keeps it down until [`Replica::resume`] (a node gone).
    pub fn kill_and_hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
        self.kill();
    }

    /// Lets the supervisor start the process again.
    pub fn resume(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
