//! The committed CRDs equal the Rust types, and the real API server (kube-apiserver v1.37 from
//! `scripts/local-k8s.sh`, see `pawfect-control-plane`) accepts them as structural schemas,
//! accepts every example, applies the schema defaults, runs the CEL rules and rejects each bad
//! manifest with a message that names the field.
//!
//! Manifests are sent as `kubectl apply --server-side` sends them: server-side apply with strict
//! field validation (an unknown field is an error, not a warning). Each test works in a namespace
//! of its own.

use std::path::{Path, PathBuf};

use kube::Client;
use kube::api::{Patch, PatchParams};
use pawfect_control_plane::{ControlPlane, api_message, apply, apply_crds, create, dynamic_api};
use serde_json::{Value, json};

const MANAGER: &str = "pawfect-crd-tests";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds/ is below the root")
        .to_path_buf()
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn crd_files() -> Vec<PathBuf> {
    yaml_files(&workspace_root().join("crds"))
}

/// An admin client of this process's control plane with the committed CRDs applied, and a fresh
/// namespace.
async fn cluster(prefix: &str) -> (Client, String) {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    apply_crds(&client, &crd_files())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ns = cp.namespace(&client, prefix).await;
    (client, ns)
}

#[test]
fn committed_crds_equal_the_types() {
    for (name, generated) in pawfect_api::crd_documents().expect("CRDs serialise") {
        let path = workspace_root().join("crds").join(name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} is out of date: run `cargo run -p pawfect-api --bin crdgen -- --out-dir crds`",
            path.display()
        );
    }
}

#[tokio::test]
async fn the_api_server_establishes_the_crds_with_their_names() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let (client, _) = cluster("crds").await;
    let api = kube::Api::<CustomResourceDefinition>::all(client);
    let job = api
        .get("inpaintjobs.inpaint.pawfect.dev")
        .await
        .expect("InpaintJob CRD");
    let names = job
        .status
        .as_ref()
        .unwrap()
        .accepted_names
        .clone()
        .expect("accepted names");
    assert_eq!(names.kind, "InpaintJob");
    assert_eq!(names.short_names.as_deref(), Some(&["ij".to_string()][..]));
    assert_eq!(
        names.categories.as_deref(),
        Some(&["pawfect".to_string()][..])
    );
    let pool = api
        .get("inpaintpools.inpaint.pawfect.dev")
        .await
        .expect("InpaintPool CRD");
    assert_eq!(
        pool.status
            .as_ref()
            .unwrap()
            .accepted_names
            .as_ref()
            .map(|n| n.kind.as_str()),
        Some("InpaintPool")
    );
    // apply_crds has already failed on a NonStructuralSchema condition; a schema the server had
    // to prune would show up as a difference to what was applied.
    for (crd, file) in [
        (job, "inpaintjobs.inpaint.pawfect.dev.yaml"),
        (pool, "inpaintpools.inpaint.pawfect.dev.yaml"),
    ] {
        let stored = numbers_as_f64(serde_json::to_value(&crd.spec.versions[0].schema).unwrap());
        let committed = read_yaml(&workspace_root().join("crds").join(file));
        // The server stores `default: 30.0` as `30`: compare numbers by value.
        assert_eq!(
            stored,
            numbers_as_f64(committed["spec"]["versions"][0]["schema"].clone()),
            "{file}"
        );
    }
}

fn numbers_as_f64(v: Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(a) => Value::Array(a.into_iter().map(numbers_as_f64).collect()),
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, numbers_as_f64(v))).collect())
        }
        other => other,
    }
}

#[tokio::test]
async fn examples_are_accepted_and_read_back_as_the_types() {
    let (client, ns) = cluster("examples").await;
    let root = workspace_root().join("examples");
    let files: Vec<PathBuf> = ["jobs", "pools"]
        .iter()
        .flat_map(|d| yaml_files(&root.join(d)))
        .collect();
    assert!(
        files.len() >= 3,
        "expected the job and pool examples, found {files:?}"
    );
    for f in files {
        let stored = apply(&client, Some(&ns), &read_yaml(&f), MANAGER)
            .await
            .unwrap_or_else(|e| panic!("{} is rejected: {}", f.display(), api_message(&e)));
        // What the server stored (defaults applied) deserialises into the operator's types.
        match stored["kind"].as_str() {
            Some("InpaintJob") => {
                serde_json::from_value::<pawfect_api::InpaintJob>(stored.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}\n{stored}", f.display()));
            }
            Some("InpaintPool") => {
                serde_json::from_value::<pawfect_api::InpaintPool>(stored.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}\n{stored}", f.display()));
            }
            other => panic!("{}: unexpected kind {other:?}", f.display()),
        }
    }
}

#[tokio::test]
async fn invalid_manifests_are_rejected_by_the_api_server_naming_the_field() {
    let (client, ns) = cluster("invalid").await;
    let files = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid"));
    assert!(files.len() >= 6);
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        // The API server's own words (the unknown field: `unknown field "spec.strenght"` from
        // a strict POST, `.spec.strenght: field not declared in schema` from server-side apply).
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect:` line", f.display()));
        let manifest = read_yaml(&f);
        // `kubectl create` / client-side `kubectl apply`: a strict POST.
        match create(&client, Some(&ns), &manifest, MANAGER).await {
            Ok(_) => panic!("{} was accepted by the API server", f.display()),
            Err(kube::Error::Api(s)) => {
                println!("{}: {} {}: {}", f.display(), s.code, s.reason, s.message);
                // 422 Invalid (schema, CEL) or 400 BadRequest (strict decoding: unknown field).
                assert!(
                    s.code == 422 || s.code == 400,
                    "{}: expected 422 or 400, got {} {}: {}",
                    f.display(),
                    s.code,
                    s.reason,
                    s.message
                );
                assert!(
                    s.message.contains(expect),
                    "{}: the API server's message should mention {expect:?}, got: {}",
                    f.display(),
                    s.message
                );
            }
            Err(e) => panic!("{}: not an API error: {e}", f.display()),
        }
        // `kubectl apply --server-side` and Helm 4: server-side apply, strict. The server
        // refuses an unknown field here with a 500 ("failed to create typed patch object"), not
        // a 400: only the message is checked.
        match apply(&client, Some(&ns), &manifest, MANAGER).await {
            Ok(_) => panic!("{} was accepted by server-side apply", f.display()),
            Err(e) => {
                let message = api_message(&e);
                println!("{} (server-side apply): {message}", f.display());
                assert!(
                    matches!(e, kube::Error::Api(_)) && message.contains(expect),
                    "{}: server-side apply should be refused naming {expect:?}, got: {message}",
                    f.display()
                );
            }
        }
    }
}

#[tokio::test]
async fn job_spec_is_immutable_but_status_and_metadata_may_change() {
    let (client, ns) = cluster("immutable").await;
    let manifest = read_yaml(&workspace_root().join("examples/jobs/minimal.yaml"));
    apply(&client, Some(&ns), &manifest, MANAGER)
        .await
        .expect("created");
    let (api, name, _) = dynamic_api(&client, Some(&ns), &manifest).await.unwrap();
    let merge = PatchParams::default();

    // Labels change through the main resource.
    api.patch(
        &name,
        &merge,
        &Patch::Merge(json!({"metadata": {"labels": {"team": "studio"}}})),
    )
    .await
    .unwrap_or_else(|e| panic!("relabel: {}", api_message(&e)));
    // Status changes through the status subresource only: the main resource ignores it...
    let ignored = api
        .patch(
            &name,
            &merge,
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .expect("a status in a main-resource patch is dropped, not refused");
    assert!(ignored.data.get("status").is_none(), "{:?}", ignored.data);
    // ...and /status takes it.
    let with_status = api
        .patch_status(
            &name,
            &merge,
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap_or_else(|e| panic!("status: {}", api_message(&e)));
    assert_eq!(with_status.data["status"]["phase"], "Running");

    // The spec may not change (CEL transition rule self == oldSelf).
    let err = api
        .patch(&name, &merge, &Patch::Merge(json!({"spec": {"steps": 30}})))
        .await
        .expect_err("spec change must be refused");
    let message = api_message(&err);
    assert!(message.contains("spec is immutable"), "{message}");
    // Nor through the status subresource, which ignores spec changes instead.
    let after = api
        .patch_status(&name, &merge, &Patch::Merge(json!({"spec": {"steps": 30}})))
        .await
        .expect("a spec in a status patch is dropped");
    assert_eq!(after.data["spec"]["steps"], 20);
}

#[tokio::test]
async fn the_api_server_applies_the_schema_defaults() {
    let (client, ns) = cluster("defaults").await;
    let manifest = read_yaml(&workspace_root().join("examples/jobs/minimal.yaml"));
    let stored = apply(&client, Some(&ns), &manifest, MANAGER)
        .await
        .expect("created");
    let spec = &stored["spec"];
    assert_eq!(spec["steps"], 20);
    // The default is 30.0 in the schema; JSON has no float/int distinction and the server
    // returns `30`.
    assert_eq!(spec["guidanceScale"].as_f64(), Some(30.0), "{spec}");
    assert_eq!(spec["pool"], "default");
    assert_eq!(spec["priority"], "normal");
    assert_eq!(spec["maxAttempts"], 3);
    assert_eq!(spec["timeoutSeconds"], 600);
}

#[tokio::test]
async fn the_api_server_prints_the_job_columns() {
    let (client, ns) = cluster("columns").await;
    let manifest = read_yaml(&workspace_root().join("examples/jobs/minimal.yaml"));
    apply(&client, Some(&ns), &manifest, MANAGER)
        .await
        .expect("created");
    // What `kubectl get ij` shows: the server's Table rendering of the printer columns.
    let request = http::Request::get(format!(
        "/apis/inpaint.pawfect.dev/v1alpha1/namespaces/{ns}/inpaintjobs"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .unwrap();
    let table: Value = client.request(request).await.expect("a Table");
    let names: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columnDefinitions")
        .iter()
        .filter(|c| c["priority"].as_i64().unwrap_or(0) == 0)
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["Name", "Phase", "Progress", "Worker", "Duration", "Age"]
    );
    assert_eq!(table["rows"][0]["cells"][0], "biscuit-no-leash");
}

/// The committed schema and `check_limits` (what a worker runs at claim) are one definition:
/// for every bound of the spec in the schema, a value at the bound passes both the API-server
/// server and `check_limits`, and one just past it fails both (or cannot even be read into
/// the spec type, which the worker treats the same way: `InvalidInput`).
#[tokio::test]
async fn schema_bounds_and_check_limits_agree() {
    let (client, ns) = cluster("limits").await;
    let base = read_yaml(&workspace_root().join("examples/jobs/minimal.yaml"));
    let crd = crd_files()
        .iter()
        .map(|f| read_yaml(f))
        .find(|c| c["spec"]["names"]["kind"] == "InpaintJob")
        .expect("the committed InpaintJob CRD");
    let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    // What the real API server makes of a manifest (a strict POST, as `kubectl create`).
    let mut n = 0;
    let mut validate = async |m: &Value| -> Result<(), String> {
        n += 1;
        let mut m = m.clone();
        m["metadata"]["name"] = Value::from(format!("limits-{n}"));
        create(&client, Some(&ns), &m, MANAGER)
            .await
            .map(|_| ())
            .map_err(|e| api_message(&e))
    };
    let props = schema["properties"]["spec"]["properties"]
        .as_object()
        .expect("spec properties");
    // What the spec type and check_limits make of a manifest: Ok, or why not.
    let worker_view = |m: &Value| -> Result<(), String> {
        let spec: pawfect_api::InpaintJobSpec =
            serde_json::from_value(m["spec"].clone()).map_err(|e| e.to_string())?;
        pawfect_api::check_limits(&spec).map_err(|e| e.to_string())
    };
    // A nested field (`cache.threshold`) is set inside its object, the object's other
    // required fields left out (it has none yet; a new one fails the test loudly).
    let with = |field: &str, v: Value| {
        let mut m = base.clone();
        let mut at = &mut m["spec"];
        for part in field.split('.') {
            at = &mut at[part];
        }
        *at = v;
        m
    };
    // Every leaf of the spec, objects walked into: (`cache.threshold`, its schema).
    let mut leaves: Vec<(String, &Value)> = Vec::new();
    let mut stack: Vec<(String, &Value)> = props.iter().map(|(k, v)| (k.clone(), v)).collect();
    while let Some((path, p)) = stack.pop() {
        match p["properties"].as_object() {
            Some(inner) => stack.extend(inner.iter().map(|(k, v)| (format!("{path}.{k}"), v))),
            None => leaves.push((path, p)),
        }
    }
    let mut checked = Vec::new();
    for (field, p) in leaves {
        let field = field.as_str();
        let integer = p["type"] == "integer";
        for (key, past) in [("minimum", -1.0), ("maximum", 1.0)] {
            let Some(bound) = p[key].as_f64() else {
                continue;
            };
            let (at, beyond) = if integer {
                let b = bound as i128;
                (
                    Value::from(b as i64),
                    Value::from((b + past as i128) as i64),
                )
            } else {
                (Value::from(bound), Value::from(bound + past))
            };
            let at_m = with(field, at.clone());
            assert_eq!(validate(&at_m).await, Ok(()), "{field} = {at}: schema");
            assert_eq!(worker_view(&at_m), Ok(()), "{field} = {at}: worker");
            let beyond_m = with(field, beyond.clone());
            assert!(
                validate(&beyond_m).await.is_err(),
                "{field} = {beyond}: schema accepts"
            );
            let err =
                worker_view(&beyond_m).expect_err(&format!("{field} = {beyond}: worker accepts"));
            assert!(
                err.contains(field) || err.contains("invalid value"),
                "{field}: {err}"
            );
            checked.push(format!("{field}.{key}"));
        }
        for (key, past) in [("minLength", -1i64), ("maxLength", 1)] {
            let Some(bound) = p[key].as_i64() else {
                continue;
            };
            let s = |n: i64| Value::from("a".repeat(n.max(0) as usize));
            let at_m = with(field, s(bound.max(1)));
            assert_eq!(validate(&at_m).await, Ok(()), "{field} at {key}: schema");
            assert_eq!(worker_view(&at_m), Ok(()), "{field} at {key}: worker");
            let beyond_m = with(field, s(bound + past));
            assert!(
                validate(&beyond_m).await.is_err(),
                "{field} past {key}: schema accepts"
            );
            let err =
                worker_view(&beyond_m).expect_err(&format!("{field} past {key}: worker accepts"));
            assert!(err.contains(field), "{field}: {err}");
            checked.push(format!("{field}.{key}"));
        }
        // Lists: the number of items, and the length of each item.
        if let Some(bound) = p["maxItems"].as_i64() {
            let list = |n: i64| Value::from(vec!["grass"; n.max(0) as usize]);
            let at_m = with(field, list(bound));
            assert_eq!(validate(&at_m).await, Ok(()), "{field} at maxItems: schema");
            assert_eq!(worker_view(&at_m), Ok(()), "{field} at maxItems: worker");
            let beyond_m = with(field, list(bound + 1));
            assert!(
                validate(&beyond_m).await.is_err(),
                "{field} past maxItems: schema accepts"
            );
            let err = worker_view(&beyond_m)
                .expect_err(&format!("{field} past maxItems: worker accepts"));
            assert!(err.contains(field), "{field}: {err}");
            checked.push(format!("{field}.maxItems"));
        }
        if let Some(bound) = p["items"]["maxLength"].as_i64() {
            // One long item among short ones.
            let list = |n: i64| json!(["grass", "a".repeat(n.max(0) as usize)]);
            let at_m = with(field, list(bound));
            assert_eq!(
                validate(&at_m).await,
                Ok(()),
                "{field} items at maxLength: schema"
            );
            assert_eq!(
                worker_view(&at_m),
                Ok(()),
                "{field} items at maxLength: worker"
            );
            let beyond_m = with(field, list(bound + 1));
            assert!(
                validate(&beyond_m).await.is_err(),
                "{field} item past maxLength: schema accepts"
            );
            let err = worker_view(&beyond_m)
                .expect_err(&format!("{field} item past maxLength: worker accepts"));
            assert!(err.contains(field), "{field}: {err}");
            checked.push(format!("{field}.items.maxLength"));
        }
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "cache.threshold.maximum",
            "cache.threshold.minimum",
            "guidanceScale.maximum",
            "guidanceScale.minimum",
            "image.minLength",
            "mask.minLength",
            "maxAttempts.maximum",
            "maxAttempts.minimum",
            "output.minLength",
            "pool.maxLength",
            "pool.minLength",
            "prompt.maxLength",
            "sceneLabels.items.maxLength",
            "sceneLabels.maxItems",
            "seed.maximum",
            "seed.minimum",
            "steps.maximum",
            "steps.minimum",
            "timeoutSeconds.maximum",
            "timeoutSeconds.minimum",
            "ttlSecondsAfterFinished.minimum",
        ],
        "a bound was added to or dropped from the schema: check check_limits and this list"
    );
}
