//! Support for the Helm chart tests: finds `helm`, renders `charts/pawfect-inpaint` offline
//! (`tests/chart.rs`), runs `helm install`/`upgrade`/`uninstall` against the real API server of
//! `pawfect-control-plane` (`tests/install.rs`), splits helm's output into manifests, and reads
//! the tables of Kubernetes API calls that the RBAC rules must match.
//!
//! `helm` comes from `.ci/setup-tools.sh`. It is looked up in this order: `PAWFECT_HELM`, `PATH`,
//! then the cache directory the script installs into (`$PAWFECT_TOOLS_DIR`, default
//! `${XDG_CACHE_HOME:-$HOME/.cache}/pawfect-inpaint/tools/bin`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use pawfect_control_plane::ControlPlane;
use serde_json::Value;

/// Kubernetes version the offline renders (`helm template`, `helm lint`) are made for.
pub const KUBE_VERSION: &str = "1.33.0";
/// Namespace of the test release.
pub const NAMESPACE: &str = "pawfect";
/// Name of the test release.
pub const RELEASE: &str = "pawfect-inpaint";

/// The repository root.
pub fn workspace_root() -> PathBuf {
    // charts/test -> charts -> root
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// `charts/pawfect-inpaint`.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("charts/pawfect-inpaint")
}

/// The directory `.ci/setup-tools.sh` installs into.
pub fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PAWFECT_TOOLS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("pawfect-inpaint/tools")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds a tool: `$env_var`, then `PATH`, then the tools cache directory.
pub fn find_tool(env_var: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "{env_var}={} does not exist: point it at the `{name}` binary, or unset it and \
                 run `.ci/setup-tools.sh`",
                p.display()
            ))
        };
    }
    if let Some(p) = on_path(name) {
        return Ok(p);
    }
    let cached = tools_dir().join("bin").join(name);
    if cached.is_file() {
        return Ok(cached);
    }
    Err(format!(
        "`{name}` not found (looked at ${env_var}, PATH and {}). The chart tests need helm: run \
         `.ci/setup-tools.sh` (it downloads helm into that directory), or set {env_var} to the \
         binary.",
        cached.display()
    ))
}

/// The `helm` binary, or a panic that says how to install it.
pub fn helm() -> PathBuf {
    find_tool("PAWFECT_HELM", "helm").unwrap_or_else(|e| panic!("{e}"))
}

/// Output of a command, or its stderr (and stdout) as the error.
fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("cannot write to {shown}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{shown} failed: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{shown} exited with {}:\n{stderr}{stdout}",
            out.status
        ))
    }
}

/// A set of values the chart is rendered with: value files (relative to the chart) and `--set`s.
#[derive(Clone, Debug, Default)]
pub struct ValueSet {
    pub name: &'static str,
    pub files: Vec<PathBuf>,
    pub sets: Vec<String>,
}

impl ValueSet {
    pub fn defaults() -> Self {
        ValueSet {
            name: "default",
            ..Default::default()
        }
    }

    /// One of the chart's `ci/<name>-values.yaml` files.
    pub fn ci(name: &'static str) -> Self {
        ValueSet {
            name,
            files: vec![chart_dir().join("ci").join(format!("{name}-values.yaml"))],
            ..Default::default()
        }
    }

    pub fn set(mut self, s: &str) -> Self {
        self.sets.push(s.to_string());
        self
    }

    fn value_args(&self, cmd: &mut Command) {
        for f in &self.files {
            cmd.arg("--values").arg(f);
        }
        for s in &self.sets {
            cmd.arg("--set").arg(s);
        }
    }

    /// `helm template` output.
    pub fn render(&self) -> Result<String, String> {
        self.render_in(NAMESPACE)
    }

    /// `helm template` output for another release namespace.
    pub fn render_in(&self, namespace: &str) -> Result<String, String> {
        let mut cmd = Command::new(helm());
        cmd.arg("template").arg(RELEASE).arg(chart_dir()).args([
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
        ]);
        self.value_args(&mut cmd);
        run(&mut cmd, None)
    }

    /// `helm lint --strict` output.
    pub fn lint(&self) -> Result<String, String> {
        let mut cmd = Command::new(helm());
        cmd.args(["lint", "--strict"]).arg(chart_dir()).args([
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
        ]);
        self.value_args(&mut cmd);
        run(&mut cmd, None)
    }

    /// NOTES.txt as `helm install --dry-run=client` prints it (no cluster is contacted).
    pub fn install_notes(&self) -> Result<String, String> {
        let mut cmd = Command::new(helm());
        cmd.arg("install")
            .arg(RELEASE)
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE, "--dry-run=client"])
            .env("KUBECONFIG", "/dev/null");
        self.value_args(&mut cmd);
        let out = run(&mut cmd, None)?;
        out.split_once("\nNOTES:\n")
            .map(|(_, notes)| notes.to_string())
            .ok_or_else(|| format!("no NOTES in:\n{out}"))
    }

    /// The rendered manifests.
    pub fn manifests(&self) -> Result<Vec<Manifest>, String> {
        split_manifests(&self.render()?)
    }

    /// `helm <verb> <release> <chart> --namespace <namespace> <values> <extra>` against the
    /// control plane (`verb`: `install`, `upgrade`, ...). No `--api-versions`: helm asks the
    /// server what it serves. Returns helm's output (stdout, then stderr: the server's warnings).
    pub fn helm_on(
        &self,
        cp: &ControlPlane,
        verb: &str,
        release: &str,
        namespace: &str,
        extra: &[&str],
    ) -> Result<String, String> {
        self.helm_on_chart(cp, verb, release, namespace, &chart_dir(), extra)
    }

    /// [`Self::helm_on`] for another copy of the chart (e.g. a changed CRD).
    pub fn helm_on_chart(
        &self,
        cp: &ControlPlane,
        verb: &str,
        release: &str,
        namespace: &str,
        chart: &Path,
        extra: &[&str],
    ) -> Result<String, String> {
        let mut cmd = cp.command(helm());
        cmd.arg(verb)
            .arg(release)
            .arg(chart)
            .args(["--namespace", namespace])
            .args(extra);
        self.value_args(&mut cmd);
        run_all(&mut cmd)
    }
}

/// `helm <args>` against the control plane; stdout then stderr.
pub fn helm_cluster(cp: &ControlPlane, args: &[&str]) -> Result<String, String> {
    run_all(cp.command(helm()).args(args))
}

/// Like `run`, but the output is stdout followed by stderr (helm prints the API server's warnings
/// on stderr).
fn run_all(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{shown} exited with {}:\n{text}", out.status))
    }
}

/// One rendered manifest and the template it came from.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub source: String,
    pub value: Value,
}

impl Manifest {
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// Splits `helm template` output into manifests (documents without content are dropped).
pub fn split_manifests(rendered: &str) -> Result<Vec<Manifest>, String> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in rendered.lines().chain(std::iter::once("---")) {
        if line == "---" {
            if !current.trim().is_empty() {
                docs.push(std::mem::take(&mut current));
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    let mut out = Vec::new();
    for doc in docs {
        let source = doc
            .lines()
            .find_map(|l| l.strip_prefix("# Source: "))
            .unwrap_or("?")
            .to_string();
        let value: Value =
            serde_saphyr::from_str(&doc).map_err(|e| format!("{source}: not YAML: {e}\n{doc}"))?;
        if value.is_null() {
            continue;
        }
        if !value.is_object() {
            return Err(format!("{source}: not a manifest: {doc}"));
        }
        out.push(Manifest { source, value });
    }
    Ok(out)
}

/// Parses a YAML file.
pub fn read_yaml(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The committed CRD files, `crds/*.yaml`, by file name.
pub fn committed_crd_files() -> Result<Vec<PathBuf>, String> {
    let dir = workspace_root().join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// One permission: API group, resource, verb.
pub type Permission = (String, String, String);

/// The Kubernetes API calls listed in a Markdown table under the heading that starts with
/// `heading`: columns API group, resource, verbs (each in backticks), then a description.
/// Rows whose description mentions `--leader-election` or `--default-pool-configmap` go into the
/// set of that flag's Role.
pub fn api_call_table(markdown: &str, heading: &str) -> Result<ApiCalls, String> {
    let mut lines = markdown.lines().skip_while(|l| !l.starts_with(heading));
    if lines.next().is_none() {
        return Err(format!("no section {heading:?}"));
    }
    let mut calls = ApiCalls::default();
    let mut rows = 0;
    for line in lines.take_while(|l| !l.starts_with("## ")) {
        let line = line.trim();
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 4 {
            return Err(format!("table row with fewer than 4 cells: {line}"));
        }
        let ticks = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|s| {
                    if s == "\"\"" {
                        String::new()
                    } else {
                        s.to_string()
                    }
                })
                .collect()
        };
        let group = ticks(cells[0]);
        let resource = ticks(cells[1]);
        let verbs = ticks(cells[2]);
        if group.is_empty() && resource.is_empty() {
            // The header or the separator row.
            continue;
        }
        let (Some(group), Some(resource)) = (group.first(), resource.first()) else {
            return Err(format!(
                "row without a backticked group and resource: {line}"
            ));
        };
        if verbs.is_empty() {
            return Err(format!("row without verbs: {line}"));
        }
        rows += 1;
        let target = if cells[3].contains("--leader-election") {
            &mut calls.leader
        } else if cells[3].contains("--default-pool-configmap") {
            &mut calls.default_pool
        } else {
            &mut calls.always
        };
        for v in verbs {
            target.insert((group.clone(), resource.clone(), v));
        }
    }
    if rows == 0 {
        return Err(format!("no table rows under {heading:?}"));
    }
    Ok(calls)
}

/// The operator's API calls by the Role that grants them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApiCalls {
    /// The main ClusterRole (or Role with `--namespace`).
    pub always: BTreeSet<Permission>,
    /// The Lease Role (`--leader-election`).
    pub leader: BTreeSet<Permission>,
    /// The default pool's Role (`--default-pool-configmap`).
    pub default_pool: BTreeSet<Permission>,
}

/// The permissions an RBAC Role/ClusterRole grants (resourceNames ignored). Wildcards and
/// non-resource URLs are refused: the operator's rules are all explicit.
pub fn role_permissions(role: &Value) -> Result<BTreeSet<Permission>, String> {
    let mut out = BTreeSet::new();
    let rules = role["rules"].as_array().ok_or("role without rules")?;
    let strings = |v: &Value, what: &str| -> Result<Vec<String>, String> {
        v.as_array()
            .ok_or(format!("rule without {what}: {v}"))?
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or(format!("{what} entry is not a string: {s}"))
            })
            .collect()
    };
    for rule in rules {
        if rule.get("nonResourceURLs").is_some() {
            return Err(format!("rule with nonResourceURLs: {rule}"));
        }
        for g in strings(&rule["apiGroups"], "apiGroups")? {
            for r in strings(&rule["resources"], "resources")? {
                for v in strings(&rule["verbs"], "verbs")? {
                    if g == "*" || r == "*" || v == "*" {
                        return Err(format!("wildcard in rule {rule}"));
                    }
                    out.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    Ok(out)
}
