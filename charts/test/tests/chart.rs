//! The Helm chart `charts/pawfect-inpaint`, checked offline with real `helm` (install it with
//! `.ci/setup-tools.sh`):
//! - `helm lint --strict` and `helm template` pass for the default values and every
//!   `ci/*-values.yaml`;
//! - values that break `values.schema.json` (or contradict each other) fail the render;
//! - the chart's CRDs are the generated `crds/*.yaml`;
//! - the rendered objects carry what the operator, Redis, the model Job and the RBAC rules need
//!   (the RBAC rules grant exactly the API calls the operator makes).
//!
//! What the API server makes of the chart — every object accepted, the default pool valid
//! against the CRD, install, upgrade, uninstall — is `tests/install.rs`, against a real
//! kube-apiserver.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use pawfect_chart_tests::{
    ApiCalls, Manifest, NAMESPACE, Permission, ValueSet, api_call_table, chart_dir,
    committed_crd_files, read_yaml, role_permissions, workspace_root,
};
use serde_json::Value;

/// Every value set the chart is checked with: defaults and each `ci/<name>-values.yaml`. (The
/// render does not depend on the cluster's APIs, so a first install renders the same.)
fn value_sets() -> Vec<ValueSet> {
    let mut sets = vec![ValueSet::defaults()];
    sets.extend(CI_SETS.iter().map(|n| ValueSet::ci(n)));
    sets
}

const CI_SETS: [&str; 4] = [
    "external-redis",
    "no-crds",
    "metrics-netpol",
    "ha-namespaced",
];

/// Whether a manifest is a Helm hook (`helm test`'s objects): not part of the release itself.
fn is_hook(m: &Manifest) -> bool {
    m.value["metadata"]["annotations"]["helm.sh/hook"].is_string()
}

/// The release's objects (what `helm install` creates), without the hooks.
fn render(v: &ValueSet) -> Vec<Manifest> {
    render_all(v).into_iter().filter(|m| !is_hook(m)).collect()
}

/// The hooks only.
fn render_hooks(v: &ValueSet) -> Vec<Manifest> {
    render_all(v).into_iter().filter(is_hook).collect()
}

fn render_all(v: &ValueSet) -> Vec<Manifest> {
    v.manifests()
        .unwrap_or_else(|e| panic!("value set {}: {e}", v.name))
}

/// The default pool's manifest, from the ConfigMap the operator applies it from.
fn default_pool(ms: &[Manifest]) -> Option<Value> {
    let cm = ms
        .iter()
        .find(|m| m.kind() == "ConfigMap" && m.name().ends_with("-default-pool"))?;
    let text = cm.value["data"]["pool.json"]
        .as_str()
        .unwrap_or_else(|| panic!("{} has no pool.json", cm.name()));
    Some(serde_json::from_str(text).unwrap_or_else(|e| panic!("pool.json: {e}\n{text}")))
}

fn of_kind<'a>(ms: &'a [Manifest], kind: &str) -> Vec<&'a Manifest> {
    ms.iter().filter(|m| m.kind() == kind).collect()
}

fn one<'a>(ms: &'a [Manifest], kind: &str, name_part: &str) -> &'a Manifest {
    let found: Vec<&Manifest> = ms
        .iter()
        .filter(|m| {
            m.kind() == kind
                && (m.name() == name_part || m.name().ends_with(&format!("-{name_part}")))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} named *{name_part}*, found {:?}",
        found.iter().map(|m| m.name()).collect::<Vec<_>>()
    );
    found[0]
}

/// The only manifest of `kind`.
fn only<'a>(ms: &'a [Manifest], kind: &str) -> &'a Manifest {
    let found = of_kind(ms, kind);
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

fn kinds(ms: &[Manifest]) -> BTreeMap<String, usize> {
    let mut k = BTreeMap::new();
    for m in ms {
        *k.entry(m.kind().to_string()).or_insert(0) += 1;
    }
    k
}

fn container<'a>(workload: &'a Manifest, name: &str) -> &'a Value {
    workload.value["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("{} has no container {name}", workload.name()))
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn env_secret(c: &Value, var: &str) -> Option<(String, String)> {
    let e = c["env"].as_array()?.iter().find(|e| e["name"] == var)?;
    let r = &e["valueFrom"]["secretKeyRef"];
    Some((
        r["name"].as_str()?.to_string(),
        r["key"].as_str()?.to_string(),
    ))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn every_ci_values_file_is_tested() {
    let mut files: Vec<String> = std::fs::read_dir(chart_dir().join("ci"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    files.sort();
    let mut expected: Vec<String> = CI_SETS.iter().map(|n| format!("{n}-values.yaml")).collect();
    expected.sort();
    assert_eq!(files, expected);
}

#[test]
fn helm_lint_strict_passes() {
    for v in value_sets() {
        let out = v
            .lint()
            .unwrap_or_else(|e| panic!("helm lint --strict, value set {}: {e}", v.name));
        assert!(out.contains("0 chart(s) failed"), "{}: {out}", v.name);
    }
}

#[test]
fn namespaced_resources_carry_the_release_namespace_and_labels() {
    let cluster_scoped: BTreeSet<&str> = [
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    .into();
    for v in value_sets() {
        for m in render_all(&v) {
            let meta = &m.value["metadata"];
            if cluster_scoped.contains(m.kind()) {
                assert!(meta.get("namespace").is_none(), "{}: {}", v.name, m.source);
            } else {
                let ns = meta["namespace"].as_str().unwrap_or("");
                assert!(!ns.is_empty(), "{}: {} has no namespace", v.name, m.source);
            }
            if m.kind() != "CustomResourceDefinition" {
                assert_eq!(
                    meta["labels"]["app.kubernetes.io/instance"],
                    pawfect_chart_tests::RELEASE,
                    "{}: {}",
                    v.name,
                    m.source
                );
            }
        }
    }
}

#[test]
fn default_values_render_the_whole_system() {
    let ms = render(&ValueSet::defaults());
    let expected: BTreeMap<String, usize> = [
        // The operator's, and job-editor, viewer, pool-admin for people.
        ("ClusterRole", 4),
        ("ClusterRoleBinding", 1),
        // Redis' configuration and the default pool's manifest.
        ("ConfigMap", 2),
        ("CustomResourceDefinition", 2),
        ("Deployment", 1),
        ("Job", 1),
        ("PersistentVolumeClaim", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Secret", 1),
        ("Service", 3),
        ("ServiceAccount", 1),
        ("StatefulSet", 1),
        ("ValidatingAdmissionPolicy", 1),
        ("ValidatingAdmissionPolicyBinding", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kinds(&ms), expected);
    // `helm test`: the check pod, its ServiceAccount and its Role.
    let hooks = kinds(&render_hooks(&ValueSet::defaults()));
    let expected_hooks: BTreeMap<String, usize> = [
        ("Pod", 1),
        ("Role", 1),
        ("RoleBinding", 1),
        ("ServiceAccount", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(hooks, expected_hooks);

    // No object of an API the release itself brings (helm maps every object before creating
    // any): the default pool is a manifest in a ConfigMap, applied by the operator.
    assert!(of_kind(&ms, "InpaintPool").is_empty());
    let pool = default_pool(&ms).expect("the default pool's ConfigMap");
    assert_eq!(pool["apiVersion"], "inpaint.pawfect.dev/v1alpha1");
    assert_eq!(pool["kind"], "InpaintPool");
    assert_eq!(pool["metadata"]["name"], "default");
    assert_eq!(pool["metadata"]["namespace"], NAMESPACE);
    // Numbers stay numbers through the template's YAML → JSON.
    assert_eq!(pool["spec"]["maxReplicas"], 4);
    assert_eq!(pool["spec"]["minReplicas"], 0);
    // No storage policy by default (the workers then refuse every object-store URI); the
    // values' prefixes and createOnly reach the pool as its spec.worker.storage.
    assert!(pool["spec"]["worker"].get("storage").is_none(), "{pool}");
    let with_storage = default_pool(&render(
        &ValueSet::defaults()
            .set("pool.worker.storage.allowedPrefixes={s3://photos/in/,gs://results}")
            .set("pool.worker.storage.createOnly=true"),
    ))
    .unwrap();
    assert_eq!(
        with_storage["spec"]["worker"]["storage"],
        serde_json::json!({"allowedPrefixes": ["s3://photos/in/", "gs://results"], "createOnly": true})
    );

    // A changed pool restarts the operator (which applies it); an unrelated change does not.
    let checksum = |ms: &[Manifest]| {
        one(ms, "Deployment", "operator").value["spec"]["template"]["metadata"]["annotations"]
            ["checksum/default-pool"]
            .clone()
    };
    let before = checksum(&ms);
    assert!(before.is_string());
    assert_ne!(
        checksum(&render(&ValueSet::defaults().set("pool.maxReplicas=2"))),
        before
    );
    assert_eq!(
        checksum(&render(
            &ValueSet::defaults().set("operator.logLevel=debug")
        )),
        before
    );
}

#[test]
fn optional_parts_follow_their_values() {
    let ext = render(&ValueSet::ci("external-redis"));
    for kind in ["StatefulSet", "PersistentVolumeClaim", "Job", "Secret"] {
        assert!(
            of_kind(&ext, kind).is_empty(),
            "external-redis renders a {kind}"
        );
    }
    let configmaps: Vec<&str> = of_kind(&ext, "ConfigMap")
        .iter()
        .map(|m| m.name())
        .collect();
    assert_eq!(
        configmaps,
        ["pawfect-inpaint-default-pool"],
        "external-redis"
    );
    let no_crds = render(&ValueSet::ci("no-crds"));
    assert!(
        default_pool(&no_crds).is_none(),
        "no-crds renders the default pool"
    );
    for kind in [
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
        "Job",
    ] {
        assert!(
            of_kind(&no_crds, kind).is_empty(),
            "no-crds renders a {kind}"
        );
    }
    let op = one(&no_crds, "Deployment", "operator");
    assert_eq!(
        op.value["spec"]["template"]["spec"]["serviceAccountName"],
        "pawfect-operator"
    );
    let defaults = render(&ValueSet::defaults());
    for kind in [
        "NetworkPolicy",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
    ] {
        assert!(
            of_kind(&defaults, kind).is_empty(),
            "defaults render a {kind}"
        );
    }
}

#[test]
fn metrics_and_network_policies_select_the_right_pods() {
    let ms = render(&ValueSet::ci("metrics-netpol"));
    let service = one(&ms, "Service", "operator");
    let deploy = one(&ms, "Deployment", "operator");
    let redis = one(&ms, "StatefulSet", "redis");
    let pod_labels = &deploy.value["spec"]["template"]["metadata"]["labels"];

    let sm = one(&ms, "ServiceMonitor", "operator");
    assert_eq!(sm.value["metadata"]["labels"]["release"], "prometheus");
    assert!(labels_match(
        &sm.value["spec"]["selector"]["matchLabels"],
        &service.value["metadata"]["labels"]
    ));
    let port = &sm.value["spec"]["endpoints"][0]["port"];
    assert!(
        service.value["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| &p["name"] == port),
        "ServiceMonitor port {port} is not a Service port"
    );
    assert!(labels_match(&service.value["spec"]["selector"], pod_labels));

    let pm = one(&ms, "PodMonitor", "workers");
    assert_eq!(
        pm.value["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "pawfect-worker"
    );

    let nps = of_kind(&ms, "NetworkPolicy");
    assert_eq!(nps.len(), 3);
    let op_np = one(&ms, "NetworkPolicy", "operator");
    assert!(labels_match(
        &op_np.value["spec"]["podSelector"]["matchLabels"],
        pod_labels
    ));
    let egress = op_np.value["spec"]["egress"].to_string();
    assert!(egress.contains("10.0.0.1/32") && egress.contains("6443") && egress.contains("53"));
    let redis_np = one(&ms, "NetworkPolicy", "redis");
    assert!(labels_match(
        &redis_np.value["spec"]["podSelector"]["matchLabels"],
        &redis.value["spec"]["template"]["metadata"]["labels"]
    ));
    let from = redis_np.value["spec"]["ingress"][0]["from"].to_string();
    assert!(
        from.contains("pawfect-worker") && from.contains("\"operator\""),
        "{from}"
    );
    let workers_np = one(&ms, "NetworkPolicy", "workers");
    assert_eq!(
        workers_np.value["spec"]["podSelector"]["matchLabels"]["inpaint.pawfect.dev/pool"],
        "default"
    );
    assert!(
        workers_np.value["spec"]["ingress"][0]["from"]
            .to_string()
            .contains("monitoring")
    );
}

/// `--set` values that break values.schema.json, and what the error names.
const SCHEMA_VIOLATIONS: [(&str, &str); 17] = [
    ("operator.image.digest=latest", "/operator/image/digest"),
    ("redis.image.digest=sha256:abc", "/redis/image/digest"),
    (
        "networkPolicy.workers.clusterCIDRs[0]=10.0.0.0",
        "/networkPolicy/workers/clusterCIDRs/0",
    ),
    (
        "metrics.prometheusRule.failedJobsRatio=2",
        "/metrics/prometheusRule/failedJobsRatio",
    ),
    ("tests.timeoutSeconds=0", "/tests/timeoutSeconds"),
    ("redis.appendfsync=sometimes", "/redis/appendfsync"),
    ("operator.replicaCount=2", "replicaCount"),
    ("pool.worker.modelVariant=q3_k", "/pool/worker/modelVariant"),
    ("operator.logFormat=xml", "/operator/logFormat"),
    ("pool.maxReplicas=0", "/pool/maxReplicas"),
    ("externalRedis.url=http://redis:6379", "/externalRedis/url"),
    (
        "networkPolicy.apiServerPorts[0]=70000",
        "/networkPolicy/apiServerPorts/0",
    ),
    (
        "pool.worker.resources.limits.memory=lots",
        "/pool/worker/resources/limits/memory",
    ),
    ("pool.name=Default_Pool", "/pool/name"),
    ("crds.install=yes", "/crds/install"),
    ("redis.maxmemory=half", "/redis/maxmemory"),
    (
        "pool.worker.terminationGracePeriodSeconds=5",
        "/pool/worker/terminationGracePeriodSeconds",
    ),
];

#[test]
fn values_violating_the_schema_fail_the_render() {
    for (set, path) in SCHEMA_VIOLATIONS {
        let v = ValueSet::defaults().set(set);
        let err = v.render().expect_err(set);
        assert!(
            err.contains("don't meet the specifications of the schema") && err.contains(path),
            "--set {set}: expected a schema error at {path}, got:\n{err}"
        );
        assert!(v.lint().is_err(), "helm lint accepts --set {set}");
    }
}

#[test]
fn contradicting_values_fail_the_render_with_a_reason() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["operator.podDisruptionBudget.enabled=true"],
            "operator.podDisruptionBudget needs operator.replicas > 1",
        ),
        (
            &[
                "operator.podDisruptionBudget.enabled=true",
                "operator.replicas=2",
                "operator.podDisruptionBudget.minAvailable=2",
            ],
            "minAvailable must be less than operator.replicas",
        ),
        (&["redis.enabled=false"], "externalRedis.url is required"),
        (
            &["externalRedis.url=redis://elsewhere:6379/0"],
            "either redis.enabled",
        ),
        (
            &["pool.minReplicas=5", "pool.maxReplicas=2"],
            "pool.minReplicas must not exceed pool.maxReplicas",
        ),
        (
            &["models.persistence.enabled=false"],
            "needs a model volume",
        ),
        (&["operator.watchNamespace=media"], "does not watch"),
    ];
    for (sets, reason) in cases {
        let mut v = ValueSet::defaults();
        for s in sets {
            v = v.set(s);
        }
        let err = v.render().expect_err(&sets.join(","));
        assert!(
            err.contains(reason),
            "{sets:?}: expected {reason:?}, got:\n{err}"
        );
    }
}

/// Walks values.yaml next to values.schema.json: every value must be declared with a type (or a
/// reference), and objects must not accept unknown keys unless they are free-form maps.
#[test]
fn the_schema_covers_every_value() {
    let values = read_yaml(&chart_dir().join("values.yaml")).unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap(),
    )
    .unwrap();
    let definitions = schema["definitions"].clone();
    let resolve = |s: &Value| -> Value {
        let mut s = s.clone();
        for _ in 0..4 {
            let r = s
                .get("$ref")
                .or_else(|| s.get("allOf").and_then(|a| a[0].get("$ref")))
                .and_then(Value::as_str)
                .map(str::to_string);
            match r {
                Some(r) => {
                    let name = r.trim_start_matches("#/definitions/");
                    s = definitions[name].clone();
                }
                None => break,
            }
        }
        s
    };
    fn walk(
        path: &str,
        value: &Value,
        schema: &Value,
        resolve: &dyn Fn(&Value) -> Value,
        leaves: &mut usize,
    ) {
        let s = resolve(schema);
        assert!(
            s.get("type").is_some() || s.get("oneOf").is_some() || s.get("enum").is_some(),
            "{path} has no type in values.schema.json"
        );
        if let Value::Object(map) = value {
            let declared = s["properties"].as_object();
            let free_form = s.get("additionalProperties").is_some_and(Value::is_object)
                || (declared.is_none() && s.get("additionalProperties").is_none());
            if declared.is_some() {
                assert_eq!(
                    s["additionalProperties"],
                    Value::Bool(false),
                    "{path} accepts unknown keys"
                );
            }
            for (k, v) in map {
                let child = match declared.and_then(|d| d.get(k)) {
                    Some(c) => c.clone(),
                    None if free_form => {
                        let ap = s["additionalProperties"].clone();
                        if ap.is_object() {
                            ap
                        } else {
                            Value::Object(Default::default())
                        }
                    }
                    None => panic!("{path}.{k} is not in values.schema.json"),
                };
                if child.as_object().is_some_and(|o| o.is_empty()) {
                    // A free-form object (e.g. a core/v1 type) – described by its parent.
                    continue;
                }
                walk(&format!("{path}.{k}"), v, &child, resolve, leaves);
            }
        } else {
            *leaves += 1;
        }
    }
    let mut leaves = 0;
    walk("", &values, &schema, &resolve, &mut leaves);
    assert!(leaves > 80, "only {leaves} values walked");
}

#[test]
fn chart_crds_equal_the_generated_crds() {
    let generated = committed_crd_files().unwrap();
    assert_eq!(generated.len(), 2, "{generated:?}");
    let templates = chart_dir().join("templates/crds");
    let mut in_chart: Vec<String> = std::fs::read_dir(&templates)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
        .collect();
    in_chart.sort();
    let names: Vec<String> = generated
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    assert_eq!(in_chart, names, "run scripts/sync-chart-crds.sh");
    for f in &generated {
        let name = f.file_name().unwrap();
        let crd = std::fs::read_to_string(f).unwrap();
        let template = std::fs::read_to_string(templates.join(name)).unwrap();
        let body = template
            .strip_prefix("{{- if .Values.crds.install }}\n")
            .and_then(|t| t.strip_suffix("{{- end }}\n"));
        assert!(
            body == Some(crd.as_str()),
            "templates/crds/{} differs from crds/{0}: run scripts/sync-chart-crds.sh",
            name.to_string_lossy()
        );
        assert!(
            !crd.contains("{{"),
            "{} has template delimiters",
            f.display()
        );
    }

    // And helm renders them unchanged.
    let rendered: Vec<Value> = of_kind(&render(&ValueSet::defaults()), "CustomResourceDefinition")
        .into_iter()
        .map(|m| m.value.clone())
        .collect();
    let committed: Vec<Value> = generated.iter().map(|f| read_yaml(f).unwrap()).collect();
    assert_eq!(rendered, committed);
}

// ---- RBAC ------------------------------------------------------------------------------------

const CHART_TABLE_HEADING: &str = "## Permissions";
const OPERATOR_TABLE_HEADING: &str = "## Kubernetes API calls (RBAC)";

/// The operator's API calls: the chart README's table, which must equal the operator's own
/// (operator/README.md) wherever that exists.
fn operator_api_calls() -> ApiCalls {
    let chart_readme = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let chart = api_call_table(&chart_readme, CHART_TABLE_HEADING)
        .unwrap_or_else(|e| panic!("charts/pawfect-inpaint/README.md: {e}"));
    let operator_readme: PathBuf = workspace_root().join("operator/README.md");
    if let Ok(text) = std::fs::read_to_string(&operator_readme) {
        let operator = api_call_table(&text, OPERATOR_TABLE_HEADING)
            .unwrap_or_else(|e| panic!("{}: {e}", operator_readme.display()));
        assert_eq!(
            chart, operator,
            "operator/README.md lists other API calls than the chart README: update \
             templates/rbac.yaml and the chart README's table to match the operator"
        );
    } else {
        eprintln!(
            "note: {} is missing; checking RBAC against the chart README's table only",
            operator_readme.display()
        );
    }
    chart
}

/// Asserts that a role grants exactly `expected`, naming what is missing and what is extra.
fn assert_grants(role: &Manifest, expected: &BTreeSet<Permission>) {
    let granted = role_permissions(&role.value)
        .unwrap_or_else(|e| panic!("{} {}: {e}", role.kind(), role.name()));
    let extra: Vec<_> = granted.difference(expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{} {} differs from the operator's API calls: granted but never called {extra:?}; \
         called but not granted {missing:?}",
        role.kind(),
        role.name()
    );
}

fn role_named<'a>(ms: &'a [Manifest], kind: &str, name_part: &str) -> &'a Manifest {
    one(ms, kind, name_part)
}

fn check_binding(ms: &[Manifest], binding_kind: &str, role: &Manifest) {
    let binding = ms
        .iter()
        .find(|m| {
            m.kind() == binding_kind && m.value["roleRef"]["name"] == role.value["metadata"]["name"]
        })
        .unwrap_or_else(|| panic!("no {binding_kind} for {}", role.name()));
    assert_eq!(binding.value["roleRef"]["kind"], role.kind());
    assert_eq!(
        binding.value["metadata"]["namespace"],
        role.value["metadata"]["namespace"]
    );
    let sa = one(ms, "ServiceAccount", "operator");
    let deploy = one(ms, "Deployment", "operator");
    assert_eq!(
        deploy.value["spec"]["template"]["spec"]["serviceAccountName"],
        sa.value["metadata"]["name"]
    );
    let subjects = binding.value["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["name"], sa.value["metadata"]["name"]);
    assert_eq!(subjects[0]["namespace"], NAMESPACE);
}

#[test]
fn rbac_grants_exactly_the_operator_api_calls() {
    let ApiCalls {
        always,
        leader,
        default_pool,
    } = operator_api_calls();
    assert!(always.len() >= 10 && !leader.is_empty() && !default_pool.is_empty());

    // One replica, all namespaces: a ClusterRole, no Lease permissions.
    let ms = render(&ValueSet::defaults());
    let cr = role_named(&ms, "ClusterRole", "operator");
    assert_grants(cr, &always);
    check_binding(&ms, "ClusterRoleBinding", cr);
    // The default pool's Role, in the release namespace, the only Role; patching the pool and
    // reading the ConfigMap are limited to their names.
    let roles = of_kind(&ms, "Role");
    assert_eq!(
        roles.len(),
        1,
        "{:?}",
        roles.iter().map(|r| r.name()).collect::<Vec<_>>()
    );
    let dp = role_named(&ms, "Role", "default-pool");
    assert_eq!(dp.value["metadata"]["namespace"], NAMESPACE);
    assert_grants(dp, &default_pool);
    check_binding(&ms, "RoleBinding", dp);
    let configmap = one(&ms, "ConfigMap", "default-pool").name().to_string();
    for rule in dp.value["rules"].as_array().unwrap() {
        let verbs = rule["verbs"].to_string();
        if rule["resources"] == serde_json::json!(["configmaps"]) {
            assert_eq!(rule["resourceNames"], serde_json::json!([configmap]));
        }
        if rule["resources"] == serde_json::json!(["inpaintpools"]) && verbs.contains("patch") {
            assert_eq!(rule["resourceNames"], serde_json::json!(["default"]));
        }
    }
    let op = container(one(&ms, "Deployment", "operator"), "operator");
    assert!(
        args(op).contains(&format!("--default-pool-configmap={configmap}")),
        "{:?}",
        args(op)
    );
    // Without the pool, neither the Role nor the flag.
    let ms = render(&ValueSet::defaults().set("pool.create=false"));
    assert!(of_kind(&ms, "Role").is_empty());
    let op = container(one(&ms, "Deployment", "operator"), "operator");
    assert!(
        !args(op)
            .iter()
            .any(|a| a.starts_with("--default-pool-configmap"))
    );
    let op = container(one(&ms, "Deployment", "operator"), "operator");
    assert!(!args(op).iter().any(|a| a == "--leader-election"));

    // Two replicas in one namespace: a Role there, and the Lease Role.
    let ms = render(&ValueSet::ci("ha-namespaced"));
    // (The people's roles stay ClusterRoles: they aggregate into edit and view.)
    assert!(
        !of_kind(&ms, "ClusterRole")
            .iter()
            .any(|r| r.name().ends_with("-operator"))
    );
    let role = role_named(&ms, "Role", "operator");
    assert_eq!(role.value["metadata"]["namespace"], "pawfect");
    assert_grants(role, &always);
    check_binding(&ms, "RoleBinding", role);
    let lease = role_named(&ms, "Role", "leader-election");
    assert_grants(lease, &leader);
    check_binding(&ms, "RoleBinding", lease);
    // Reading and renewing are limited to the release's Lease, which the operator is told to use
    // (a Lease per release: two releases in one namespace elect their leaders apart).
    for rule in lease.value["rules"].as_array().unwrap() {
        let verbs = rule["verbs"].to_string();
        if verbs.contains("get") || verbs.contains("patch") {
            assert_eq!(
                rule["resourceNames"],
                serde_json::json!(["pawfect-inpaint-operator"])
            );
        }
    }
    let op = container(one(&ms, "Deployment", "operator"), "operator");
    let a = args(op);
    assert!(a.iter().any(|a| a == "--leader-election"), "{a:?}");
    assert!(
        a.iter()
            .any(|a| a == "--lease-name=pawfect-inpaint-operator"),
        "{a:?}"
    );
    assert!(a.iter().any(|a| a == "--lease-namespace=pawfect"), "{a:?}");
    assert!(a.iter().any(|a| a == "--namespace=pawfect"), "{a:?}");
    let other = render(
        &ValueSet::defaults()
            .set("operator.leaderElection.enabled=true")
            .set("fullnameOverride=team-b"),
    );
    let a = args(container(one(&other, "Deployment", "operator"), "operator"));
    assert!(
        a.iter().any(|a| a == "--lease-name=team-b-operator"),
        "{a:?}"
    );

    // Leader election with one replica, on request.
    let ms = render(&ValueSet::defaults().set("operator.leaderElection.enabled=true"));
    let lease = role_named(&ms, "Role", "leader-election");
    assert_grants(lease, &leader);

    // rbac.create=false: none at all.
    let ms = render(&ValueSet::ci("no-crds"));
    for kind in ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"] {
        assert!(of_kind(&ms, kind).is_empty());
    }
}

// ---- Operator, Redis, models -------------------------------------------------------------------

#[test]
fn operator_runs_with_the_contracted_flags() {
    let ms = render(&ValueSet::defaults());
    let deploy = one(&ms, "Deployment", "operator");
    let op = container(deploy, "operator");
    let redis_svc = one(&ms, "Service", "redis");
    let a = args(op);
    assert_eq!(a[0], "run");
    let url = format!(
        "--redis-url=redis://{}.{NAMESPACE}.svc:6379/0",
        redis_svc.name()
    );
    for expected in [
        url.as_str(),
        "--queue-prefix=pawfect",
        "--http-addr=0.0.0.0:8080",
        "--log-level=info",
        "--log-format=json",
    ] {
        assert!(
            a.iter().any(|x| x == expected),
            "missing {expected} in {a:?}"
        );
    }
    assert!(!a.iter().any(|x| x.starts_with("--namespace")));
    // The operator and the workers get the password from the same Secret the Redis uses.
    let secret = one(&ms, "Secret", "redis");
    let redis = container(one(&ms, "StatefulSet", "redis"), "redis");
    let pair = (secret.name().to_string(), "redis-password".to_string());
    assert_eq!(env_secret(op, "PAWFECT_REDIS_PASSWORD"), Some(pair.clone()));
    assert_eq!(env_secret(redis, "REDIS_PASSWORD"), Some(pair.clone()));
    assert!(a.contains(&format!("--worker-redis-secret={}", pair.0)));
    assert!(a.contains(&"--worker-redis-secret-key=redis-password".to_string()));
    assert_eq!(op["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(op["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(op["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        deploy.value["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );

    // External Redis: its URL, and the password from the given Secret.
    let ms = render(&ValueSet::ci("external-redis"));
    let op = container(one(&ms, "Deployment", "operator"), "operator");
    let a = args(op);
    assert!(a.contains(&"--redis-url=rediss://redis.example.internal:6380/0".to_string()));
    assert!(a.contains(&"--queue-prefix=pawfect-prod".to_string()));
    assert!(a.contains(&"--worker-redis-secret=managed-redis".to_string()));
    assert!(a.contains(&"--worker-redis-secret-key=password".to_string()));
    assert_eq!(
        env_secret(op, "PAWFECT_REDIS_PASSWORD"),
        Some(("managed-redis".into(), "password".into()))
    );
    assert!(!a.iter().any(|x| x.contains("redis-ca")), "no CA: {a:?}");

    // Its private CA, from a Secret or a ConfigMap: the operator and the `helm test` pod mount
    // it and trust it, and the operator mounts the same-named object into the workers.
    for (set, source, flag) in [
        (
            "externalRedis.ca.secret=redis-tls",
            serde_json::json!({"secret": {"secretName": "redis-tls",
                "items": [{"key": "tls-ca.pem", "path": "ca.crt"}]}}),
            "--worker-redis-ca-secret=redis-tls",
        ),
        (
            "externalRedis.ca.configMap=redis-ca",
            serde_json::json!({"configMap": {"name": "redis-ca",
                "items": [{"key": "tls-ca.pem", "path": "ca.crt"}]}}),
            "--worker-redis-ca-configmap=redis-ca",
        ),
    ] {
        let v = ValueSet::ci("external-redis")
            .set(set)
            .set("externalRedis.ca.key=tls-ca.pem");
        let mut want = source.clone();
        want["name"] = "redis-ca".into();
        let mount = serde_json::json!({"name": "redis-ca", "mountPath": "/etc/pawfect/redis-ca",
            "readOnly": true});
        let ms = render(&v);
        let deploy = one(&ms, "Deployment", "operator");
        let op = container(deploy, "operator");
        let a = args(op);
        for expected in [
            "--redis-ca-file=/etc/pawfect/redis-ca/ca.crt",
            flag,
            "--worker-redis-ca-key=tls-ca.pem",
        ] {
            assert!(
                a.iter().any(|x| x == expected),
                "{set}: {expected} in {a:?}"
            );
        }
        assert_eq!(
            deploy.value["spec"]["template"]["spec"]["volumes"][0], want,
            "{set}"
        );
        assert_eq!(op["volumeMounts"][0], mount, "{set}");
        let hooks = render_hooks(&v);
        let check = one(&hooks, "Pod", "test");
        let c = &check.value["spec"]["containers"][0];
        assert!(
            args(c)
                .iter()
                .any(|x| x == "--redis-ca-file=/etc/pawfect/redis-ca/ca.crt"),
            "{set}: {c}"
        );
        assert_eq!(check.value["spec"]["volumes"][0], want, "{set}");
        assert_eq!(c["volumeMounts"][0], mount, "{set}");
    }
    for (sets, reason) in [
        (
            &["externalRedis.ca.secret=a", "externalRedis.ca.configMap=b"][..],
            "not both",
        ),
        (
            &[
                "externalRedis.url=redis://plain:6379/0",
                "externalRedis.ca.secret=a",
            ][..],
            "is for a rediss://",
        ),
    ] {
        let mut v = ValueSet::ci("external-redis");
        for s in sets {
            v = v.set(s);
        }
        let err = v.render().expect_err(&sets.join(","));
        assert!(err.contains(reason), "{sets:?}: {err}");
    }
}

fn redis_conf(ms: &[Manifest]) -> String {
    one(ms, "ConfigMap", "redis").value["data"]["redis.conf"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn redis_is_a_durable_queue() {
    let ms = render(&ValueSet::defaults());
    let conf = redis_conf(&ms);
    for line in [
        "appendonly yes",
        "appendfsync everysec",
        "maxmemory-policy noeviction",
        "include /run/redis/auth.conf",
    ] {
        assert!(
            conf.lines().any(|l| l == line),
            "redis.conf lacks {line:?}:\n{conf}"
        );
    }
    assert!(!conf.contains("maxmemory "), "{conf}");
    let sts = one(&ms, "StatefulSet", "redis");
    let c = container(sts, "redis");
    assert!(
        c["image"]
            .as_str()
            .unwrap()
            .starts_with("docker.io/library/redis:7")
    );
    assert!(c["args"][0].as_str().unwrap().contains("requirepass"));
    assert_eq!(
        sts.value["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "data" && m["mountPath"] == "/data")
    );
    // The password never sits in the pod spec or the ConfigMap.
    let secret = one(&ms, "Secret", "redis");
    let b64 = secret.value["data"]["redis-password"].as_str().unwrap();
    assert!(b64.len() >= 40, "a generated password of 32 characters");
    assert!(!sts.value.to_string().contains(b64));

    let ms = render(&ValueSet::ci("metrics-netpol"));
    let conf = redis_conf(&ms);
    assert!(conf.lines().any(|l| l == "appendfsync always"), "{conf}");
    assert!(conf.lines().any(|l| l == "maxmemory 2gb"), "{conf}");

    // A given password is used as is; a given Secret replaces the chart's.
    let ms = render(&ValueSet::ci("ha-namespaced"));
    assert_eq!(
        one(&ms, "Secret", "redis").value["data"]["redis-password"],
        "bm90LWEtcmVhbC1wYXNzd29yZA==" // not-a-real-password
    );
    assert_eq!(
        one(&ms, "StatefulSet", "redis").value["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
        "gp3"
    );
    let ms = render(
        &ValueSet::defaults()
            .set("redis.auth.existingSecret=queue-auth")
            .set("redis.auth.existingSecretPasswordKey=pw"),
    );
    assert!(of_kind(&ms, "Secret").is_empty());
    let redis = container(one(&ms, "StatefulSet", "redis"), "redis");
    assert_eq!(
        env_secret(redis, "REDIS_PASSWORD"),
        Some(("queue-auth".into(), "pw".into()))
    );
    let op = container(one(&ms, "Deployment", "operator"), "operator");
    assert!(args(op).contains(&"--worker-redis-secret=queue-auth".to_string()));
}

#[test]
fn the_model_download_job_fills_the_pool_volume() {
    let ms = render(&ValueSet::defaults());
    let job = only(&ms, "Job");
    let c = container(job, "fetch-models");
    assert_eq!(c["command"], serde_json::json!(["pawfect-worker"]));
    assert_eq!(
        args(c),
        [
            "fetch-models",
            "--models",
            "/models",
            "--variant",
            "q5_k_m",
            "--lock-if-missing"
        ]
    );
    let pool = default_pool(&ms).unwrap();
    assert_eq!(c["image"], pool["spec"]["worker"]["image"]);
    let claim =
        &job.value["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"];
    assert_eq!(claim, &pool["spec"]["worker"]["modelVolume"]["claimName"]);
    assert_eq!(
        job.value["spec"]["template"]["spec"]["securityContext"]["runAsUser"],
        65532
    );
    assert!(env_secret(c, "HF_TOKEN").is_none());

    // A token Secret reaches the Job as HF_TOKEN.
    let ms = render(&ValueSet::ci("metrics-netpol"));
    let c = container(only(&ms, "Job"), "fetch-models");
    assert_eq!(
        env_secret(c, "HF_TOKEN"),
        Some(("hf-token".into(), "HF_TOKEN".into()))
    );
    let ms = render(&ValueSet::defaults().set("models.download.hfToken.value=hf_x"));
    let secret = one(&ms, "Secret", "hf-token");
    let c = container(only(&ms, "Job"), "fetch-models");
    assert_eq!(
        env_secret(c, "HF_TOKEN"),
        Some((secret.name().to_string(), "HF_TOKEN".into()))
    );

    // The Job's name follows what it downloads: a new variant runs a new download, an
    // unrelated change keeps the finished Job.
    let name = |v: ValueSet| only(&render(&v), "Job").name().to_string();
    let base = name(ValueSet::defaults());
    assert_eq!(base, name(ValueSet::defaults().set("pool.maxReplicas=8")));
    assert_ne!(
        base,
        name(ValueSet::defaults().set("pool.worker.modelVariant=q8_0"))
    );
    assert_ne!(
        base,
        name(ValueSet::defaults().set("pool.worker.image.tag=0.2.0"))
    );
    assert!(base.len() <= 63);
    let ms = render(&ValueSet::defaults().set("models.download.variant=q4_0"));
    let c = container(only(&ms, "Job"), "fetch-models");
    assert_eq!(args(c)[4], "q4_0");
}

#[test]
fn notes_tell_how_to_submit_and_watch_a_job() {
    let notes = |v: &ValueSet| v.install_notes().unwrap_or_else(|e| panic!("{e}"));
    let first = notes(&ValueSet::defaults());
    assert!(first.contains("kubectl -n pawfect get ij -w"), "{first}");
    assert!(first.contains("kind: InpaintJob"), "{first}");
    assert!(first.contains("wait --for=condition=Complete"), "{first}");
    assert!(first.contains("no Hugging Face token"), "{first}");
    // helm install --dry-run has no cluster, as on a first install: the pool is there all the same
    // (the operator applies it from its ConfigMap).
    assert!(first.contains("get ipool default -w"), "{first}");
    assert!(
        first.contains("from ConfigMap pawfect-inpaint-default-pool"),
        "{first}"
    );
    let without = notes(&ValueSet::defaults().set("pool.create=false"));
    assert!(!without.contains("ipool"), "{without}");
}

// ---- Images ------------------------------------------------------------------------------------

#[test]
fn dockerfiles_build_with_the_release_script() {
    let root = workspace_root();
    let script = std::fs::read_to_string(root.join("scripts/build-release-binaries.sh")).unwrap();
    for (dockerfile, what, binary) in [
        ("operator/Dockerfile", "operator", "pawfect-operator"),
        ("worker/Dockerfile", "worker", "pawfect-worker"),
    ] {
        let text = std::fs::read_to_string(root.join(dockerfile)).unwrap();
        assert!(
            text.lines().any(|l| l.starts_with("RUN ")
                && l.contains("scripts/build-release-binaries.sh")
                && l.trim_end().ends_with(what)),
            "{dockerfile} must build with scripts/build-release-binaries.sh {what}"
        );
        assert!(
            text.contains(&format!("/out/{binary} ")),
            "{dockerfile} copies {binary}"
        );
        assert!(
            text.contains("USER 65532:65532"),
            "{dockerfile} runs as non-root"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.trim_start().starts_with("HEALTHCHECK")),
            "{dockerfile}: probes are the pod's"
        );
        assert!(
            script.contains(&format!("-p {binary} --bin {binary}")),
            "the script builds {binary}"
        );
    }
    let worker = std::fs::read_to_string(root.join("worker/Dockerfile")).unwrap();
    assert!(worker.contains("ARG CUDA_VERSION=13.0"), "CUDA 13.0 base");
    assert!(
        worker.contains("ARG CUDA_COMPUTE_CAP=75"),
        "built for the T4"
    );
    assert!(
        worker.contains("-runtime-"),
        "runtime image for the final stage"
    );
    assert!(script.contains("--features cuda"));
    let operator = std::fs::read_to_string(root.join("operator/Dockerfile")).unwrap();
    assert!(operator.contains("distroless/static"));
    assert!(script.contains("unknown-linux-musl"));
}

// ---- Roles for people, the operator's pod-patch policy ------------------------------------------

fn rule_set(role: &Manifest) -> BTreeSet<Permission> {
    role_permissions(&role.value).unwrap_or_else(|e| panic!("{}: {e}", role.name()))
}

fn perms(group: &str, resources: &[&str], verbs: &[&str]) -> BTreeSet<Permission> {
    let mut out = BTreeSet::new();
    for r in resources {
        for v in verbs {
            out.insert((group.to_string(), r.to_string(), v.to_string()));
        }
    }
    out
}

#[test]
fn people_get_jobs_through_edit_and_pools_only_from_an_admin() {
    let ms = render(&ValueSet::defaults());
    let label = |m: &Manifest, k: &str| {
        m.value["metadata"]["labels"][k]
            .as_str()
            .map(str::to_string)
    };
    let group = "inpaint.pawfect.dev";

    let editor = one(&ms, "ClusterRole", "job-editor");
    assert_eq!(editor.name(), "pawfect-inpaint-job-editor");
    assert_eq!(
        label(editor, "rbac.authorization.k8s.io/aggregate-to-edit").as_deref(),
        Some("true")
    );
    assert_eq!(
        label(editor, "rbac.authorization.k8s.io/aggregate-to-admin").as_deref(),
        Some("true")
    );
    assert_eq!(
        rule_set(editor),
        perms(
            group,
            &["inpaintjobs"],
            &[
                "create", "update", "patch", "delete", "get", "list", "watch"
            ]
        )
    );

    let viewer = one(&ms, "ClusterRole", "viewer");
    assert_eq!(
        label(viewer, "rbac.authorization.k8s.io/aggregate-to-view").as_deref(),
        Some("true")
    );
    assert_eq!(
        rule_set(viewer),
        perms(
            group,
            &["inpaintjobs", "inpaintpools"],
            &["get", "list", "watch"]
        )
    );

    // Writing pools: only the pool-admin role, which nothing aggregates.
    let admin = one(&ms, "ClusterRole", "pool-admin");
    assert!(
        !admin.value["metadata"]["labels"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.contains("aggregate-to")),
        "{}",
        admin.value["metadata"]["labels"]
    );
    assert!(rule_set(admin).contains(&(group.into(), "inpaintpools".into(), "create".into())));
    for role in [editor, viewer] {
        for (g, r, v) in rule_set(role) {
            assert!(
                !r.starts_with("inpaintpools") || ["get", "list", "watch"].contains(&v.as_str()),
                "{} grants {g}/{r} {v}",
                role.name()
            );
            assert!(
                !r.contains('/'),
                "{} grants a subresource: {r}",
                role.name()
            );
        }
    }
    // Off with rbac.userRoles=false or rbac.create=false.
    for set in ["rbac.userRoles=false", "rbac.create=false"] {
        let ms = render(&ValueSet::defaults().set(set));
        for part in ["job-editor", "viewer", "pool-admin"] {
            assert!(
                !ms.iter()
                    .any(|m| m.kind() == "ClusterRole" && m.name().ends_with(part)),
                "{set}: {part}"
            );
        }
    }
}

/// The double-quoted strings of a CEL expression.
fn quoted(expr: &str) -> BTreeSet<String> {
    expr.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_pod_patch_policy_binds_the_operator_to_its_three_annotations() {
    use pawfect_operator::pool::pod_annotations;
    let ms = render(&ValueSet::defaults());
    let vap = only(&ms, "ValidatingAdmissionPolicy");
    let binding = only(&ms, "ValidatingAdmissionPolicyBinding");
    assert_eq!(
        binding.value["spec"]["policyName"],
        vap.value["metadata"]["name"]
    );
    assert_eq!(
        binding.value["spec"]["validationActions"],
        serde_json::json!(["Deny"])
    );
    assert!(binding.value["spec"].get("matchResources").is_none());
    let spec = &vap.value["spec"];
    assert_eq!(spec["failurePolicy"], "Fail");
    assert_eq!(
        spec["matchConstraints"]["resourceRules"],
        serde_json::json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods"]}])
    );
    // Only the operator's ServiceAccount.
    let sa = one(&ms, "ServiceAccount", "operator").name().to_string();
    let conditions = spec["matchConditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1);
    assert_eq!(
        quoted(conditions[0]["expression"].as_str().unwrap()),
        BTreeSet::from([format!("system:serviceaccount:{NAMESPACE}:{sa}")])
    );
    // The annotations it may change are exactly the ones the operator sets (operator/src/pool.rs).
    let allowed = spec["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "allowed")
        .expect("variable allowed");
    let from_code: BTreeSet<String> = pod_annotations(true)
        .iter()
        .chain(pod_annotations(false).iter())
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(quoted(allowed["expression"].as_str().unwrap()), from_code);
    // "Pods it manages": the label the operator puts on its worker pods.
    let pool: pawfect_api::InpaintPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "inpaint.pawfect.dev/v1alpha1", "kind": "InpaintPool",
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "spec": {"worker": {"image": "w:1"}}
    }))
    .unwrap();
    let conn = pawfect_operator::deployment::WorkerConnection {
        redis_url: "redis://r".into(),
        password_secret: None,
        ca: None,
        queue_prefix: "pawfect".into(),
    };
    let deploy =
        serde_json::to_value(pawfect_operator::deployment::build(&pool, &conn, 1)).unwrap();
    let managed_by =
        deploy["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/managed-by"]
            .as_str()
            .unwrap()
            .to_string();
    let validations = spec["validations"].as_array().unwrap();
    let first = validations[0]["expression"].as_str().unwrap();
    assert!(
        quoted(first).contains(&managed_by) && first.contains("app.kubernetes.io/managed-by"),
        "{first}"
    );
    for v in validations {
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the operator may")),
            "{v}"
        );
    }

    // Watching one namespace: bound to that namespace only.
    let ms = render(&ValueSet::ci("ha-namespaced"));
    let binding = only(&ms, "ValidatingAdmissionPolicyBinding");
    assert_eq!(
        binding.value["spec"]["matchResources"]["namespaceSelector"]["matchLabels"],
        serde_json::json!({"kubernetes.io/metadata.name": "pawfect"})
    );
    for set in ["rbac.podPatchPolicy=false", "rbac.create=false"] {
        let ms = render(&ValueSet::defaults().set(set));
        assert!(
            of_kind(&ms, "ValidatingAdmissionPolicy").is_empty(),
            "{set}"
        );
        assert!(
            of_kind(&ms, "ValidatingAdmissionPolicyBinding").is_empty(),
            "{set}"
        );
    }
}

#[test]
fn host_path_models_need_the_explicit_value() {
    let flag = "--allow-host-path-models";
    let a = args(container(
        one(&render(&ValueSet::defaults()), "Deployment", "operator"),
        "operator",
    ));
    assert!(!a.iter().any(|x| x == flag), "{a:?}");
    let ms = render(&ValueSet::defaults().set("operator.allowHostPathModels=true"));
    let a = args(container(one(&ms, "Deployment", "operator"), "operator"));
    assert!(a.iter().any(|x| x == flag), "{a:?}");
    // The flag the chart passes is one the operator knows.
    let mut argv = vec!["pawfect-operator".to_string()];
    argv.extend(a);
    let cli = <pawfect_operator::run::Cli as clap::Parser>::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let pawfect_operator::run::Command::Run(run) = cli.command else {
        panic!("not run: {argv:?}")
    };
    assert!(run.allow_host_path_models);
}

// ---- Images, Redis password, PDB -----------------------------------------------------------------

#[test]
fn every_image_can_be_pinned_by_digest() {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let v = ValueSet::defaults()
        .set(&format!("operator.image.digest={}", d('a')))
        .set(&format!("pool.worker.image.digest={}", d('b')))
        .set(&format!("redis.image.digest={}", d('c')));
    let ms = render_all(&v);
    let op = container(one(&ms, "Deployment", "operator"), "operator");
    assert_eq!(
        op["image"],
        format!("ghcr.io/pawfect-inpaint/operator:0.1.0@{}", d('a'))
    );
    let pool = default_pool(&ms).unwrap();
    let worker = format!("ghcr.io/pawfect-inpaint/worker:0.1.0@{}", d('b'));
    assert_eq!(pool["spec"]["worker"]["image"], worker);
    assert_eq!(container(only(&ms, "Job"), "fetch-models")["image"], worker);
    assert_eq!(
        container(one(&ms, "StatefulSet", "redis"), "redis")["image"],
        format!("docker.io/library/redis:7.4.6@{}", d('c'))
    );
    let test_pod = ms.iter().find(|m| m.kind() == "Pod").unwrap();
    assert_eq!(
        test_pod.value["spec"]["containers"][0]["image"],
        op["image"]
    );

    // Without digests: tags, and Redis at a patch version.
    let ms = render(&ValueSet::defaults());
    let redis = container(one(&ms, "StatefulSet", "redis"), "redis")["image"]
        .as_str()
        .unwrap()
        .to_string();
    let tag = redis.rsplit_once(':').unwrap().1;
    let parts: Vec<&str> = tag.split('.').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
        "Redis is not pinned to a patch version: {redis}"
    );
    assert!(!redis.contains('@'));
}

fn secret_checksum(m: &Manifest) -> Option<String> {
    m.value["spec"]["template"]["metadata"]["annotations"]["checksum/redis-secret"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn a_changed_redis_password_restarts_redis_and_the_operator() {
    let sums = |v: ValueSet| {
        let ms = render(&v);
        (
            secret_checksum(one(&ms, "Deployment", "operator")),
            secret_checksum(one(&ms, "StatefulSet", "redis")),
        )
    };
    let a = sums(ValueSet::defaults().set("redis.auth.password=first-long-password"));
    assert!(a.0.is_some());
    assert_eq!(a.0, a.1, "operator and Redis see different passwords");
    assert_eq!(
        a,
        sums(ValueSet::defaults().set("redis.auth.password=first-long-password"))
    );
    let b = sums(ValueSet::defaults().set("redis.auth.password=second-long-password"));
    assert_ne!(a.0, b.0);
    // A generated password: the checksum is of the one in the rendered Secret.
    let ms = render(&ValueSet::defaults());
    let op = secret_checksum(one(&ms, "Deployment", "operator"));
    assert!(op.is_some());
    assert_eq!(op, secret_checksum(one(&ms, "StatefulSet", "redis")));
    // The annotation is not the password.
    let secret = one(&ms, "Secret", "redis").value["data"]["redis-password"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!op.unwrap().contains(&secret));
    // A Secret the chart does not make: no checksum (the chart does not know its content).
    assert_eq!(
        sums(ValueSet::defaults().set("redis.auth.existingSecret=mine")),
        (None, None)
    );
    let ms = render(&ValueSet::ci("external-redis"));
    assert_eq!(secret_checksum(one(&ms, "Deployment", "operator")), None);
}

#[test]
fn the_operator_pdb_keeps_a_standby() {
    let ms = render(&ValueSet::ci("ha-namespaced"));
    let pdb = only(&ms, "PodDisruptionBudget");
    assert_eq!(pdb.value["spec"]["minAvailable"], 1);
    let deploy = one(&ms, "Deployment", "operator");
    assert!(labels_match(
        &pdb.value["spec"]["selector"]["matchLabels"],
        &deploy.value["spec"]["template"]["metadata"]["labels"]
    ));
    assert_eq!(deploy.value["spec"]["replicas"], 2);
}

// ---- Worker egress -----------------------------------------------------------------------------

#[test]
fn worker_egress_denies_the_metadata_server_and_the_cluster() {
    let ms = render(&ValueSet::ci("metrics-netpol"));
    let np = one(&ms, "NetworkPolicy", "workers");
    assert_eq!(
        np.value["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    let egress = np.value["spec"]["egress"].as_array().unwrap();
    let redis = one(&ms, "StatefulSet", "redis");
    let mut saw_redis = false;
    let mut saw_internet = false;
    for rule in egress {
        let ports: Vec<Value> = rule["ports"].as_array().cloned().unwrap_or_default();
        match rule.get("to") {
            // A rule open to any address: DNS only.
            None => assert!(
                !ports.is_empty() && ports.iter().all(|p| p["port"] == 53),
                "egress open to any address: {rule}"
            ),
            Some(to) => {
                for peer in to.as_array().unwrap() {
                    if let Some(block) = peer.get("ipBlock") {
                        saw_internet = true;
                        let except: Vec<&str> = block["except"]
                            .as_array()
                            .map(|e| e.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        let wanted: &[&str] = if block["cidr"] == "0.0.0.0/0" {
                            &["169.254.169.254/32", "10.96.0.0/12", "10.244.0.0/16"]
                        } else {
                            assert_eq!(block["cidr"], "::/0");
                            &["fd00:ec2::254/128"]
                        };
                        assert_eq!(except, wanted, "{block}");
                        assert!(rule.get("ports").is_none());
                    } else if labels_match(
                        &peer["podSelector"]["matchLabels"],
                        &redis.value["spec"]["template"]["metadata"]["labels"],
                    ) {
                        saw_redis = true;
                        assert_eq!(ports.len(), 1);
                        assert_eq!(ports[0]["port"], "redis");
                    } else {
                        assert_eq!(
                            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                            "minio",
                            "unexpected peer {peer}"
                        );
                    }
                }
            }
        }
    }
    assert!(saw_redis && saw_internet, "{}", np.value["spec"]["egress"]);
    assert!(
        container(redis, "redis")["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "redis"),
        "the policy names a port Redis does not have"
    );

    // Defaults: the metadata addresses and the private ranges.
    let ms = render(&ValueSet::defaults().set("networkPolicy.enabled=true"));
    let np = one(&ms, "NetworkPolicy", "workers");
    let text = np.value["spec"]["egress"].to_string();
    for cidr in [
        "169.254.169.254/32",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    ] {
        assert!(text.contains(cidr), "{cidr} not denied: {text}");
    }
    // External Redis: its port, at any address.
    let ms = render(&ValueSet::ci("external-redis").set("networkPolicy.enabled=true"));
    let np = one(&ms, "NetworkPolicy", "workers");
    assert!(
        np.value["spec"]["egress"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.get("to").is_none() && r["ports"][0]["port"] == 6380),
        "{}",
        np.value["spec"]["egress"]
    );
}

// ---- helm test ---------------------------------------------------------------------------------

#[test]
fn helm_test_checks_redis_with_the_secret_and_the_pool() {
    let all = render_all(&ValueSet::defaults());
    let ms: Vec<Manifest> = all.iter().filter(|m| !is_hook(m)).cloned().collect();
    let hooks: Vec<Manifest> = all.iter().filter(|m| is_hook(m)).cloned().collect();
    let pod = only(&hooks, "Pod");
    let ann = &pod.value["metadata"]["annotations"];
    assert_eq!(ann["helm.sh/hook"], "test");
    assert!(
        ann["helm.sh/hook-delete-policy"]
            .as_str()
            .unwrap()
            .contains("hook-succeeded")
    );
    let spec = &pod.value["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    let c = &spec["containers"][0];
    let op = container(one(&ms, "Deployment", "operator"), "operator");
    assert_eq!(c["image"], op["image"]);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    // The same Redis and the same Secret as the operator and the workers.
    let redis_url = args(op)
        .into_iter()
        .find(|a| a.starts_with("--redis-url="))
        .unwrap();
    let a = args(c);
    assert_eq!(a[0], "check");
    assert!(a.contains(&redis_url), "{a:?}");
    assert!(a.contains(&format!("--pool={NAMESPACE}/default")), "{a:?}");
    assert_eq!(
        env_secret(c, "PAWFECT_REDIS_PASSWORD"),
        env_secret(op, "PAWFECT_REDIS_PASSWORD")
    );
    // What the pod runs is a command the operator binary parses as such.
    let mut argv = vec!["pawfect-operator".to_string()];
    argv.extend(a.clone());
    let cli = <pawfect_operator::run::Cli as clap::Parser>::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let pawfect_operator::run::Command::Check(check) = cli.command else {
        panic!("not check: {argv:?}")
    };
    assert_eq!(check.pool.as_deref(), Some("pawfect/default"));
    assert_eq!(check.timeout, std::time::Duration::from_secs(120));
    // Its ServiceAccount reads that one pool, nothing else.
    let sa = only(&hooks, "ServiceAccount");
    assert_eq!(spec["serviceAccountName"], sa.value["metadata"]["name"]);
    let role = only(&hooks, "Role");
    assert_eq!(
        rule_set(role),
        perms("inpaint.pawfect.dev", &["inpaintpools"], &["get"])
    );
    assert_eq!(
        role.value["rules"][0]["resourceNames"],
        serde_json::json!(["default"])
    );
    let rb = only(&hooks, "RoleBinding");
    assert_eq!(rb.value["roleRef"]["name"], role.value["metadata"]["name"]);
    assert_eq!(
        rb.value["subjects"][0]["name"],
        sa.value["metadata"]["name"]
    );
    // The hook objects come before the pod.
    for m in [sa, role, rb] {
        let w: i64 = m.value["metadata"]["annotations"]["helm.sh/hook-weight"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(w < 0, "{}", m.name());
    }
    // With the NetworkPolicies, Redis admits the test pod.
    let ms = render(&ValueSet::ci("metrics-netpol"));
    let redis_np = one(&ms, "NetworkPolicy", "redis");
    let pod_labels = &pod.value["metadata"]["labels"];
    assert!(
        redis_np.value["spec"]["ingress"][0]["from"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.get("namespaceSelector").is_none()
                && labels_match(&p["podSelector"]["matchLabels"], pod_labels)),
        "{}",
        redis_np.value["spec"]["ingress"]
    );

    // No pool: Redis only, no ServiceAccount token; external Redis: its Secret.
    let hooks = render_hooks(&ValueSet::ci("external-redis").set("pool.create=false"));
    assert_eq!(kinds(&hooks).keys().collect::<Vec<_>>(), ["Pod"]);
    let pod = only(&hooks, "Pod");
    let c = &pod.value["spec"]["containers"][0];
    assert!(!args(c).iter().any(|a| a.starts_with("--pool")));
    assert_eq!(pod.value["spec"]["automountServiceAccountToken"], false);
    assert_eq!(
        env_secret(c, "PAWFECT_REDIS_PASSWORD"),
        Some(("managed-redis".into(), "password".into()))
    );
    assert!(render_hooks(&ValueSet::defaults().set("tests.enabled=false")).is_empty());
}

// ---- Alerts and dashboard ----------------------------------------------------------------------

/// What a registry exports: every sample name, with the label names its samples carry.
type Exported = BTreeMap<String, BTreeSet<String>>;

/// Parses OpenMetrics text: sample lines give names and labels; `# TYPE` lines give the names
/// of families that have no sample yet (counters as `<name>_total`, histograms as `_bucket`,
/// `_sum`, `_count`).
fn exported(text: &str) -> Exported {
    let mut out = Exported::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_string()],
            };
            for n in names {
                out.entry(n).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            let labels = out.entry(name.to_string()).or_default();
            if let Some(body) = line[end..]
                .strip_prefix('{')
                .and_then(|b| b.split_once('}'))
            {
                for pair in body.0.split(',') {
                    if let Some((k, _)) = pair.split_once('=') {
                        labels.insert(k.trim().to_string());
                    }
                }
            }
        }
    }
    out
}

/// The operator's and the worker's registries, each family with samples, encoded.
fn exported_metrics() -> Exported {
    let op = pawfect_operator::metrics::Metrics::default();
    op.pool(
        "media",
        "t4",
        pawfect_operator::metrics::PoolSample {
            waiting: 1,
            running: 1,
            desired: 2,
            current: 1,
            ready: 1,
            busy: 1,
        },
    );
    op.job_finished("media", "t4", "Failed", "AttemptsExhausted", Some(3.0));
    drop(op.reconcile("pool"));
    op.reconcile_failed("pool", "queue");
    op.queue_event("claimed");
    op.reconcile_queue_depth("job", 3);
    op.reconcile_queue_wait("job", 0.25);
    let w = pawfect_worker::serve::Metrics::new();
    w.job_finished("failed", "OutOfMemory");
    w.observe_timings(&pawfect_api::StageTimings {
        fetch: Some(10),
        denoise: Some(2000),
        total: Some(2500),
        ..Default::default()
    });
    w.queue_wait_seconds.observe(0.5);
    w.set_gpu_memory(1, 2);
    let mut all = exported(&op.encode().unwrap());
    all.extend(exported(&w.encode().unwrap()));
    assert!(all.len() > 20, "{all:?}");
    all
}

/// Labels Prometheus adds to every scraped series (the target's), which the binaries do not
/// export themselves: PodMonitor/ServiceMonitor targets carry these, and the chart's queries of
/// worker series select by the pod's namespace and name.
const TARGET_LABELS: [&str; 6] = [
    "namespace",
    "pod",
    "container",
    "job",
    "instance",
    "service",
];

/// Every metric a PromQL expression reads, with the label names its selectors use: identifiers
/// followed by `{`, `[` or ` ` that start with `pawfect_`, and any other identifier directly
/// followed by a selector `{` (a metric of someone else's).
fn promql_metrics(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    while i < bytes.len() {
        if bytes[i] == b'"' {
            // Skip a string literal (label values, legend formats).
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let name = &expr[start..i];
            let selector = bytes.get(i) == Some(&b'{');
            if name.starts_with("pawfect_") || selector {
                let mut labels = BTreeSet::new();
                if selector {
                    let close = expr[i..].find('}').map_or(expr.len(), |j| i + j);
                    let body = &expr[i + 1..close];
                    let mut rest = body;
                    // label op "value", ...
                    while let Some(q) = rest.find('"') {
                        let lhs = &rest[..q];
                        let label = lhs
                            .trim_end_matches(['=', '!', '~', ' '])
                            .trim_start_matches([',', ' ']);
                        if !label.is_empty() {
                            labels.insert(label.to_string());
                        }
                        let after = &rest[q + 1..];
                        let end = after.find('"').map_or(after.len(), |e| e + 1);
                        rest = &after[end.min(after.len())..];
                    }
                    i = close;
                }
                out.push((name.to_string(), labels));
            }
            continue;
        }
        i += 1;
    }
    out
}

fn check_expr(what: &str, expr: &str, exported: &Exported) -> usize {
    let used = promql_metrics(expr);
    assert!(!used.is_empty(), "{what}: no pawfect metric in {expr}");
    for (name, labels) in &used {
        let Some(has) = exported.get(name) else {
            panic!("{what}: {name} is not exported by the operator or the worker ({expr})");
        };
        for l in labels {
            assert!(
                has.contains(l) || TARGET_LABELS.contains(&l.as_str()),
                "{what}: {name} has no label {l} (it has {has:?})"
            );
        }
    }
    used.len()
}

#[test]
fn the_metric_parser_finds_names_and_labels() {
    let used = promql_metrics(
        r#"sum by (pool) (rate(pawfect_operator_jobs_finished_total{phase="Failed", reason!~"a,b"}[5m])) / up{job="x"} > 0 unless pawfect_worker_ready"#,
    );
    let names: Vec<&str> = used.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "pawfect_operator_jobs_finished_total",
            "up",
            "pawfect_worker_ready"
        ]
    );
    assert_eq!(
        used[0].1,
        BTreeSet::from(["phase".to_string(), "reason".to_string()])
    );
    assert_eq!(used[1].1, BTreeSet::from(["job".to_string()]));
    let e = exported(
        "# TYPE a counter\n# TYPE h histogram\n# TYPE g gauge\ng{x=\"1\",y=\"2\"} 3\n# EOF\n",
    );
    assert_eq!(
        e.keys().collect::<Vec<_>>(),
        ["a_total", "g", "h_bucket", "h_count", "h_sum"]
    );
    assert_eq!(e["g"], BTreeSet::from(["x".to_string(), "y".to_string()]));
}

/// The alert names of the rendered PrometheusRule, with their expressions.
fn alerts(rule: &Manifest) -> Vec<(String, String, Value)> {
    rule.value["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
                r.clone(),
            )
        })
        .collect()
}

#[test]
fn alerts_use_exported_metrics_and_each_has_a_runbook() {
    let metrics = exported_metrics();
    let ms = render(&ValueSet::ci("metrics-netpol"));
    let rule = only(&ms, "PrometheusRule");
    assert_eq!(rule.value["metadata"]["labels"]["release"], "prometheus");
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let section: String = readme
        .lines()
        .skip_while(|l| *l != "## Alerts")
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !section.is_empty(),
        "the chart README has no Alerts section"
    );
    let all = alerts(rule);
    let names: BTreeSet<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
    for wanted in [
        "PawfectQueueWaitingWithoutWorkers",
        "PawfectJobsFailing",
        "PawfectDeadLetters",
        "PawfectReconcileErrors",
        "PawfectWorkersNotReady",
    ] {
        assert!(names.contains(wanted), "no alert {wanted}: {names:?}");
    }
    for (name, expr, r) in &all {
        check_expr(name, expr, &metrics);
        assert!(
            section.contains(&format!("\n### {name}\n")),
            "no runbook section ### {name} in the chart README's Alerts"
        );
        let url = r["annotations"]["runbook_url"].as_str().unwrap();
        assert!(
            url.ends_with(&format!("README.md#{}", name.to_lowercase())),
            "{url}"
        );
        assert!(r["labels"]["severity"].is_string(), "{name}");
        assert_eq!(r["labels"]["team"], "ml-platform", "{name}");
        assert!(r["annotations"]["summary"].is_string(), "{name}");
    }
    // Every runbook is for an alert that exists.
    for heading in section.lines().filter_map(|l| l.strip_prefix("### ")) {
        assert!(names.contains(heading), "runbook {heading} has no alert");
    }
    // The 15-minute wait of the issue, and the configured failure share.
    let wait = all
        .iter()
        .find(|(n, _, _)| n == "PawfectQueueWaitingWithoutWorkers")
        .unwrap();
    assert_eq!(wait.2["for"], "15m");
    let ms =
        render(&ValueSet::ci("metrics-netpol").set("metrics.prometheusRule.failedJobsRatio=1"));
    let failing = alerts(only(&ms, "PrometheusRule"))
        .into_iter()
        .find(|(n, _, _)| n == "PawfectJobsFailing")
        .unwrap();
    // (`--set` makes 0.5 a string; 1 stays a number.)
    assert!(failing.1.trim_end().ends_with("> 1"), "{}", failing.1);
    // The operator's ServiceMonitor keeps its `namespace` label (the rules select by it).
    let sm = one(
        &render(&ValueSet::ci("metrics-netpol")),
        "ServiceMonitor",
        "operator",
    )
    .value
    .clone();
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);
}

#[test]
fn the_dashboard_shows_what_the_binaries_export() {
    let metrics = exported_metrics();
    let ms = render(&ValueSet::ci("metrics-netpol"));
    let cm = one(&ms, "ConfigMap", "dashboard");
    assert_eq!(cm.value["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        cm.value["metadata"]["annotations"]["grafana_folder"],
        "Pawfect"
    );
    let text = cm.value["data"]["pawfect-inpaint.json"].as_str().unwrap();
    let on_disk =
        std::fs::read_to_string(chart_dir().join("dashboards/pawfect-inpaint.json")).unwrap();
    assert_eq!(text, on_disk);
    let dash: Value = serde_json::from_str(text).unwrap();
    assert_eq!(dash["uid"], "pawfect-inpaint");
    let mut titles = Vec::new();
    let mut used = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap().to_string();
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            check_expr(&title, expr, &metrics);
            used.extend(promql_metrics(expr).into_iter().map(|(n, _)| n));
        }
        titles.push(title);
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(m, _)| m)
                .unwrap_or(q);
            check_expr(v["name"].as_str().unwrap(), inner, &metrics);
        }
    }
    // What the dashboard must show: queue vs replicas, stage times, GPU memory, job outcomes.
    for name in [
        "pawfect_operator_queue_jobs",
        "pawfect_operator_pool_replicas",
        "pawfect_worker_stage_seconds_bucket",
        "pawfect_worker_gpu_memory_bytes",
        "pawfect_operator_jobs_finished_total",
        "pawfect_worker_jobs_total",
    ] {
        assert!(
            used.contains(name),
            "the dashboard does not show {name}: {used:?}"
        );
    }
    assert!(
        of_kind(&render(&ValueSet::defaults()), "ConfigMap")
            .iter()
            .all(|m| !m.name().ends_with("-dashboard"))
    );
}
