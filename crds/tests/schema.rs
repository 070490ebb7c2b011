//! The committed CRDs equal the Rust types, the examples are valid InpaintJobs/InpaintPools, and
//! bad manifests are rejected with a message that points at the field.
//!
//! Validation emulates the API server on the committed CRD: defaults are applied, the
//! openAPIV3Schema is checked with a JSON Schema validator (unknown fields rejected, as
//! `kubectl apply` does with its default strict field validation), then the CEL rules run — the
//! same validator the chart tests use (`pawfect_chart_tests::validate_custom_resource_update`).

use std::path::{Path, PathBuf};

use kube::core::cel::apply_defaults;
use serde_json::Value;

use pawfect_chart_tests::workspace_root;

fn read_yaml(path: &Path) -> Value {
    pawfect_chart_tests::read_yaml(path).unwrap_or_else(|e| panic!("{e}"))
}

/// The openAPIV3Schema of the committed CRD for `kind` (with apiVersion, kind, metadata).
fn committed_schema(kind: &str) -> Value {
    pawfect_chart_tests::crd_schema(kind).unwrap_or_else(|e| panic!("{e}"))
}

/// Validates a manifest like the API server would on create (`old = None`) or update: the
/// committed CRD's defaults, schema (unknown fields rejected) and CEL rules.
fn validate(manifest: &Value, old: Option<&Value>) -> Result<(), String> {
    pawfect_chart_tests::validate_custom_resource_update(manifest, old).map(|_| ())
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

/// The committed schema and `check_limits` (what a worker runs at claim) are one definition:
/// for every bound of the spec in the schema, a value at the bound passes both the API-server
/// emulation and `check_limits`, and one just past it fails both (or cannot even be read into
/// the spec type, which the worker treats the same way: `InvalidInput`).
#[test]
fn schema_bounds_and_check_limits_agree() {
    let base = read_yaml(&workspace_root().join("examples/jobs/minimal.yaml"));
    let schema = committed_schema("InpaintJob");
    let props = schema["properties"]["spec"]["properties"]
        .as_object()
        .expect("spec properties");
    // What the spec type and check_limits make of a manifest: Ok, or why not.
    let worker_view = |m: &Value| -> Result<(), String> {
        let spec: pawfect_api::InpaintJobSpec =
            serde_json::from_value(m["spec"].clone()).map_err(|e| e.to_string())?;
        pawfect_api::check_limits(&spec).map_err(|e| e.to_string())
    };
    let with = |field: &str, v: Value| {
        let mut m = base.clone();
        m["spec"][field] = v;
        m
    };
    let mut checked = Vec::new();
    for (field, p) in props {
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
            assert_eq!(validate(&at_m, None), Ok(()), "{field} = {at}: schema");
            assert_eq!(worker_view(&at_m), Ok(()), "{field} = {at}: worker");
            let beyond_m = with(field, beyond.clone());
            assert!(
                validate(&beyond_m, None).is_err(),
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
            assert_eq!(validate(&at_m, None), Ok(()), "{field} at {key}: schema");
            assert_eq!(worker_view(&at_m), Ok(()), "{field} at {key}: worker");
            let beyond_m = with(field, s(bound + past));
            assert!(
                validate(&beyond_m, None).is_err(),
                "{field} past {key}: schema accepts"
            );
            let err =
                worker_view(&beyond_m).expect_err(&format!("{field} past {key}: worker accepts"));
            assert!(err.contains(field), "{field}: {err}");
            checked.push(format!("{field}.{key}"));
        }
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "guidanceScale.maximum",
            "guidanceScale.minimum",
            "image.minLength",
            "mask.minLength",
            "maxAttempts.maximum",
            "maxAttempts.minimum",
            "output.minLength",
            "pool.maxLength",
            "pool.minLength",
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
