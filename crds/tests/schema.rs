//! The committed CRDs equal the Rust types, the examples are valid InpaintJobs/InpaintPools, and
//! bad manifests are rejected with a message that points at the field.
//!
//! Validation emulates the API server on the committed CRD: defaults are applied, the
//! openAPIV3Schema is checked with a JSON Schema validator (unknown fields rejected, as
//! `kubectl apply` does with its default strict field validation), then the CEL rules run.

use std::path::{Path, PathBuf};

use kube::core::cel::{Validator, apply_defaults};
use serde_json::{Map, Value};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds/ has a parent")
        .to_path_buf()
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The openAPIV3Schema of the committed CRD for `kind`.
fn committed_schema(kind: &str) -> Value {
    let file = match kind {
        "InpaintJob" => "inpaintjobs.inpaint.pawfect.dev.yaml",
        "InpaintPool" => "inpaintpools.inpaint.pawfect.dev.yaml",
        other => panic!("no CRD for kind {other}"),
    };
    let crd = read_yaml(&workspace_root().join("crds").join(file));
    let mut schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    // The API server validates these itself; they are implicit in every CRD schema.
    for (field, ty) in [
        ("apiVersion", "string"),
        ("kind", "string"),
        ("metadata", "object"),
    ] {
        schema["properties"][field] = serde_json::json!({ "type": ty });
    }
    schema
}

/// Kubernetes structural schema → JSON Schema: `nullable` becomes a `null` type and objects with
/// declared properties reject unknown ones (strict field validation).
fn to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(m) => {
            let mut out: Map<String, Value> = m
                .iter()
                .filter(|(k, _)| !k.starts_with("x-kubernetes-") && k.as_str() != "nullable")
                .map(|(k, v)| (k.clone(), to_json_schema(v)))
                .collect();
            if m.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = m.get("type")
            {
                out.insert("type".into(), serde_json::json!([t, "null"]));
            }
            let preserve =
                m.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if m.contains_key("properties") && !m.contains_key("additionalProperties") && !preserve
            {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(to_json_schema).collect()),
        other => other.clone(),
    }
}

/// Validates a manifest like the API server would on create (`old = None`) or update.
fn validate(manifest: &Value, old: Option<&Value>) -> Result<(), String> {
    let kind = manifest["kind"].as_str().ok_or("manifest has no kind")?;
    let schema = committed_schema(kind);
    let defaulted = apply_defaults(&schema, manifest);
    let validator =
        jsonschema::validator_for(&to_json_schema(&schema)).map_err(|e| e.to_string())?;
    let errors: Vec<String> = validator
        .iter_errors(&defaulted)
        .map(|e| format!("{}: {}", e.instance_path, e))
        .collect();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let old = old.map(|o| apply_defaults(&schema, o));
    Validator::new()
        .validate(&schema, &defaulted, old.as_ref())
        .map_err(|e| e.to_string())
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

#[test]
fn examples_are_valid() {
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
        let manifest = read_yaml(&f);
        if let Err(e) = validate(&manifest, None) {
            panic!("{} is rejected: {e}", f.display());
        }
        // And it deserialises into the Rust types the operator uses.
        match manifest["kind"].as_str() {
            Some("InpaintJob") => {
                serde_json::from_value::<pawfect_api::InpaintJob>(manifest.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            }
            Some("InpaintPool") => {
                serde_json::from_value::<pawfect_api::InpaintPool>(manifest.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            }
            other => panic!("{}: unexpected kind {other:?}", f.display()),
        }
    }
}

#[test]
fn invalid_manifests_are_rejected_with_a_useful_message() {
    let files = yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid"));
    assert!(files.len() >= 6);
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect:` line", f.display()));
        match validate(&read_yaml(&f), None) {
            Ok(()) => panic!("{} was accepted", f.display()),
            Err(e) => assert!(
                e.contains(expect),
                "{}: error should mention {expect:?}, got: {e}",
                f.display()
            ),
        }
    }
}

#[test]
fn job_spec_is_immutable_but_status_and_metadata_may_change() {
    let old = read_yaml(&workspace_root().join("examples/jobs/minimal.yaml"));
    let mut relabelled = old.clone();
    relabelled["metadata"]["labels"] = serde_json::json!({"team": "studio"});
    relabelled["status"] = serde_json::json!({"phase": "Running"});
    assert_eq!(validate(&relabelled, Some(&old)), Ok(()));

    let mut changed = old.clone();
    changed["spec"]["steps"] = 30.into();
    let err = validate(&changed, Some(&old)).expect_err("spec change must be refused");
    assert!(err.contains("spec is immutable"), "{err}");
}

#[test]
fn defaults_are_in_the_schema() {
    let manifest = read_yaml(&workspace_root().join("examples/jobs/minimal.yaml"));
    let schema = committed_schema("InpaintJob");
    let spec = &apply_defaults(&schema, &manifest)["spec"];
    assert_eq!(spec["steps"], 20);
    assert_eq!(spec["guidanceScale"], 30.0);
    assert_eq!(spec["pool"], "default");
    assert_eq!(spec["priority"], "normal");
    assert_eq!(spec["maxAttempts"], 3);
    assert_eq!(spec["timeoutSeconds"], 600);
}

#[test]
fn printer_columns_and_names() {
    let crd = read_yaml(&workspace_root().join("crds/inpaintjobs.inpaint.pawfect.dev.yaml"));
    let names: Vec<&str> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter(|c| c.get("priority").is_none())
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["Phase", "Progress", "Worker", "Duration", "Age"]);
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "ij");
    assert_eq!(crd["spec"]["names"]["categories"][0], "pawfect");
    assert!(crd["spec"]["versions"][0]["subresources"]["status"].is_object());
}
