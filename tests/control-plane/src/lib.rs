//! A real Kubernetes control plane for the tests: `scripts/local-k8s.sh up` (etcd,
//! kube-apiserver with RBAC, kube-controller-manager, two fake T4 nodes; see that script) in a
//! fresh directory, and kube clients for it. There is one way to start it — the script — whether
//! by hand or from here.
//!
//! [`ControlPlane::shared`] starts one per test process on first use; every test of the process
//! uses it (isolated by namespaces, see [`ControlPlane::namespace`]). It is stopped and its data
//! removed when the process exits: the script's watcher runs `down` once this process is gone,
//! also after a crash or a Ctrl-C. A test that cannot start the control plane fails (a panic
//! with the script's message); it is never skipped.
//!
//! The binaries are built from `tests/k8s` by the script (cached; `.ci/run` builds them before
//! the tests). Needs Go: see the README's "Tests" section.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/control-plane is two levels below the root")
        .to_path_buf()
}

/// `scripts/local-k8s.sh`.
pub fn script() -> PathBuf {
    workspace_root().join("scripts/local-k8s.sh")
}

/// A running control plane started by `scripts/local-k8s.sh up`.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    /// The kubectl of the same Kubernetes release (built with the control plane).
    kubectl: PathBuf,
    server: String,
    /// Stopped on drop (not the shared one: statics are never dropped, the watcher stops it).
    stop_on_drop: bool,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

impl ControlPlane {
    /// The control plane of this test process, started on first use. Panics (the test fails)
    /// when it cannot be started, with the script's message; later callers get the same panic.
    pub fn shared() -> &'static ControlPlane {
        match SHARED.get_or_init(|| {
            Self::start_in(new_dir()).map(|mut c| {
                c.stop_on_drop = false;
                c
            })
        }) {
            Ok(c) => c,
            Err(e) => panic!("cannot start the Kubernetes control plane: {e}"),
        }
    }

    /// A control plane of its own (for a test that stops or breaks it); stopped when dropped.
    pub fn start() -> Result<ControlPlane, String> {
        Self::start_in(new_dir())
    }

    fn start_in(dir: PathBuf) -> Result<ControlPlane, String> {
        // Its stderr (progress, the first build, errors) goes to the terminal as it comes, past
        // the test harness's capture, and into the error.
        let mut child = Command::new("bash")
            .arg(script())
            .arg("up")
            .arg(&dir)
            .env("PAWFECT_K8S_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
        let pipe = child.stderr.take().expect("piped stderr");
        let tee = std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = writeln!(std::io::stderr(), "{line}");
                seen.push_str(&line);
                seen.push('\n');
            }
            seen
        });
        let status = child
            .wait()
            .map_err(|e| format!("{} up: {e}", script().display()))?;
        let stderr = tee.join().unwrap_or_default();
        if !status.success() {
            return Err(format!(
                "`{} up {}` exited with {status}:\n{stderr}",
                script().display(),
                dir.display(),
            ));
        }
        let env = std::fs::read_to_string(dir.join("env"))
            .map_err(|e| format!("{}/env: {e}", dir.display()))?;
        let server = env
            .lines()
            .find_map(|l| l.strip_prefix("PAWFECT_K8S_SERVER="))
            .ok_or_else(|| format!("{}/env has no PAWFECT_K8S_SERVER", dir.display()))?
            .to_string();
        let bin = env
            .lines()
            .find_map(|l| l.strip_prefix("PAWFECT_K8S_BIN="))
            .ok_or_else(|| format!("{}/env has no PAWFECT_K8S_BIN", dir.display()))?;
        Ok(ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            kubectl: Path::new(bin).join("kubectl"),
            dir,
            server,
            stop_on_drop: true,
        })
    }

    /// The admin kubeconfig (user `pawfect-admin`, group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Where its state and logs (`etcd.log`, `kube-apiserver.log`, `kube-controller-manager.log`)
    /// are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An admin client. Make one per test (per tokio runtime): a client's connections belong to
    /// the runtime it was made on.
    pub async fn client(&self) -> Client {
        self.client_for(&self.kubeconfig).await
    }

    /// A client from another kubeconfig of this cluster (e.g. [`Self::service_account_kubeconfig`]).
    pub async fn client_for(&self, kubeconfig: &Path) -> Client {
        // kube's rustls needs a crypto provider; ring is the one this workspace builds.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = Kubeconfig::read_from(kubeconfig)
            .unwrap_or_else(|e| panic!("{}: {e}", kubeconfig.display()));
        let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", kubeconfig.display()));
        config.read_timeout = Some(Duration::from_secs(60));
        Client::try_from(config).expect("kube client")
    }

    /// A command (e.g. `helm`) with `KUBECONFIG` set to the admin kubeconfig.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// `kubectl` of the same release, as the admin (`KUBECONFIG` set).
    pub fn kubectl(&self) -> Command {
        self.command(&self.kubectl)
    }

    /// Runs `kubectl ARGS` as the admin; its stdout, or an error with its stderr.
    pub fn kubectl_run(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .kubectl()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.kubectl.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`kubectl {}` exited with {}: {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `scripts/local-k8s.sh restart`: SIGKILLs `component` (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`) and starts it again with the same flags and data, returning once
    /// the API server is ready again. Blocking: in async code, call it from `spawn_blocking` or
    /// `block_in_place`.
    pub fn restart(&self, component: &str) -> Result<(), String> {
        run_script("restart", &self.dir, &[component])
    }

    /// Creates a namespace `<prefix>-<n>` unique to this process and returns its name.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> String {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name},
        }))
        .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        name
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name` with a token the API
    /// server issues (TokenRequest, valid for an hour): what an in-cluster pod of that account
    /// gets, so that RBAC is the chart's, not the admin's.
    pub async fn service_account_kubeconfig(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> PathBuf {
        use k8s_openapi::api::authentication::v1::TokenRequest;
        use k8s_openapi::api::core::v1::ServiceAccount;
        let request: TokenRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }))
        .expect("token request");
        let token = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("token for ServiceAccount {namespace}/{name}: {e}"))
            .status
            .expect("TokenRequest status")
            .token;
        let admin: serde_json::Value = serde_saphyr::from_str(
            &std::fs::read_to_string(&self.kubeconfig).expect("admin kubeconfig"),
        )
        .expect("admin kubeconfig is YAML");
        let ca = admin["clusters"][0]["cluster"]["certificate-authority-data"]
            .as_str()
            .expect("CA in the admin kubeconfig");
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "local", "context": {
                "cluster": "local", "user": user, "namespace": namespace}}],
            "current-context": "local",
        });
        let path = self.dir.join(format!("sa-{namespace}-{name}.kubeconfig"));
        std::fs::write(&path, kubeconfig.to_string()).expect("write kubeconfig");
        path
    }

    /// The last `lines` lines of a component's log (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`), for failure messages.
    pub fn log_tail(&self, component: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{component}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `scripts/local-k8s.sh down`.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop_on_drop = false;
        down(&self.dir)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.stop_on_drop
            && let Err(e) = down(&self.dir)
        {
            eprintln!("{e}");
        }
    }
}

fn down(dir: &Path) -> Result<(), String> {
    run_script("down", dir, &[])
}

/// `scripts/local-k8s.sh COMMAND DIR ARGS...`, its stderr in the error.
fn run_script(command: &str, dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("bash")
        .arg(script())
        .arg(command)
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{} {command} {} {}` failed: {}",
            script().display(),
            dir.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn new_dir() -> PathBuf {
    std::env::temp_dir().join(format!(
        "pawfect-k8s-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Applies CustomResourceDefinitions (server-side apply, forced, strict field validation) and
/// waits until the API server has accepted their names and established them. Fails on a CRD the
/// server marks `NonStructuralSchema`, or one that is not established within 30 s.
pub async fn apply_crds(client: &Client, files: &[PathBuf]) -> Result<(), String> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let pp = PatchParams::apply("pawfect-tests")
        .force()
        .validation_strict();
    let mut names = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let crd: serde_json::Value =
            serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        let name = crd["metadata"]["name"]
            .as_str()
            .ok_or_else(|| format!("{}: no metadata.name", f.display()))?
            .to_string();
        api.patch(&name, &pp, &Patch::Apply(&crd))
            .await
            .map_err(|e| format!("the API server rejects {}: {e}", f.display()))?;
        names.push(name);
    }
    for name in names {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let crd = api
                .get(&name)
                .await
                .map_err(|e| format!("get CRD {name}: {e}"))?;
            let conditions = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let is = |t: &str| {
                conditions
                    .iter()
                    .any(|c| c.type_ == t && c.status == "True")
            };
            if is("NonStructuralSchema") {
                return Err(format!(
                    "CRD {name} has a non-structural schema: {conditions:?}"
                ));
            }
            if is("Established") && is("NamesAccepted") {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "CRD {name} not established after 30 s: {conditions:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Server-side applies one manifest of any kind (discovered from the server) with strict field
/// validation, as `kubectl apply --server-side` does, into `namespace` when the kind is
/// namespaced (the manifest's own namespace is replaced). Returns the object the server stored
/// (defaults applied) or the server's error. A kind the server does not serve yet (a CRD just
/// established) is retried for 10 s.
pub async fn apply(
    client: &Client,
    namespace: Option<&str>,
    manifest: &serde_json::Value,
    field_manager: &str,
) -> Result<serde_json::Value, kube::Error> {
    apply_with(
        client,
        namespace,
        manifest,
        &kube::api::PatchParams::apply(field_manager).validation_strict(),
    )
    .await
}

/// Creates one manifest of any kind as `kubectl create` (and a client-side `kubectl apply` of a
/// new object) does: a POST with strict field validation (`?fieldValidation=Strict`). Namespaced
/// like [`apply`]. Returns the stored object or the server's error.
pub async fn create(
    client: &Client,
    namespace: Option<&str>,
    manifest: &serde_json::Value,
    field_manager: &str,
) -> Result<serde_json::Value, kube::Error> {
    let (api, _, manifest) = dynamic_api(client, namespace, manifest).await?;
    let request = http::Request::post(format!(
        "{}?fieldValidation=Strict&fieldManager={field_manager}",
        api.resource_url()
    ))
    .header("Content-Type", "application/json")
    .body(serde_json::to_vec(&manifest).expect("JSON"))
    .expect("request");
    client.request(request).await
}

/// [`apply`] with other patch parameters (e.g. `dry_run`, `force`).
pub async fn apply_with(
    client: &Client,
    namespace: Option<&str>,
    manifest: &serde_json::Value,
    pp: &kube::api::PatchParams,
) -> Result<serde_json::Value, kube::Error> {
    let (api, name, manifest) = dynamic_api(client, namespace, manifest).await?;
    let obj = api
        .patch(&name, pp, &kube::api::Patch::Apply(&manifest))
        .await?;
    Ok(serde_json::to_value(obj).expect("a DynamicObject serialises"))
}

/// The dynamic API of a manifest's kind (namespaced into `namespace` when the kind is), the
/// object's name and the manifest with that namespace.
pub async fn dynamic_api(
    client: &Client,
    namespace: Option<&str>,
    manifest: &serde_json::Value,
) -> Result<(Api<kube::api::DynamicObject>, String, serde_json::Value), kube::Error> {
    use kube::api::{DynamicObject, GroupVersionKind};
    use kube::discovery::{Scope, pinned_kind};
    let bad = |what: &str| {
        kube::Error::Discovery(kube::error::DiscoveryError::MissingResource(format!(
            "manifest without {what}: {manifest}"
        )))
    };
    let api_version = manifest["apiVersion"]
        .as_str()
        .ok_or_else(|| bad("apiVersion"))?;
    let kind = manifest["kind"].as_str().ok_or_else(|| bad("kind"))?;
    let name = manifest["metadata"]["name"]
        .as_str()
        .ok_or_else(|| bad("metadata.name"))?
        .to_string();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (resource, caps) = loop {
        match pinned_kind(client, &gvk).await {
            Ok(found) => break found,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e),
        }
    };
    let mut manifest = manifest.clone();
    let api = match (caps.scope, namespace) {
        (Scope::Namespaced, Some(ns)) => {
            manifest["metadata"]["namespace"] = ns.into();
            Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource)
        }
        (Scope::Namespaced, None) => {
            let ns = manifest["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default");
            Api::<DynamicObject>::namespaced_with(client.clone(), ns, &resource)
        }
        (Scope::Cluster, _) => Api::<DynamicObject>::all_with(client.clone(), &resource),
    };
    Ok((api, name, manifest))
}

/// The message of an API error (`Status.message`), or the error as text.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => other.to_string(),
    }
}
