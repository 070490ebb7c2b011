//! `pawfect-worker caption` on the tiny Florence-2 fixture prints the ids transformers generated.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixtures() -> PathBuf {
    let root = std::env::var_os("PAWFECT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    root.join("florence2")
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn caption(models: &Path, extra: &[&str]) -> std::process::Output {
    let fx = fixtures();
    Command::new(env!("CARGO_BIN_EXE_pawfect-worker"))
        .arg("caption")
        .arg("--models")
        .arg(models)
        .arg("--image")
        .arg(fx.join("caption.png"))
        .args(["--device", "cpu"])
        .args(extra)
        .output()
        .unwrap()
}

fn caption_json(models: &Path, extra: &[&str]) -> Value {
    let out = caption(models, &[&["--json"], extra].concat());
    assert!(
        out.status.success(),
        "caption failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn florence2_parity_cli_ids_match_transformers() {
    let exp = expected();
    let max_new = exp["max_new_tokens"].to_string();
    let native = fixtures().join("native");
    for (mode, beams) in [("greedy", "1"), ("beam3", "3")] {
        for task in ["<DETAILED_CAPTION>", "<CAPTION>"] {
            let out = caption_json(
                &native,
                &[
                    "--beams",
                    beams,
                    "--max-new-tokens",
                    &max_new,
                    "--task",
                    task,
                ],
            );
            let want = &exp["tasks"][task][mode];
            assert_eq!(ids(&out["ids"]), ids(&want["ids"]), "{task} {mode}");
            assert_eq!(out["caption"], want["caption"], "{task} {mode}");
            // a random model's caption names no surface: the prompt falls back and says so
            assert_eq!(out["source"], "fallback");
            assert!(out["note"].is_string());
        }
    }
    // Original layout, generation defaults (beam 3) from its config.json.
    let out = caption_json(
        &fixtures().join("original"),
        &["--max-new-tokens", &max_new],
    );
    assert_eq!(ids(&out["ids"]), ids(&exp["original"]["beam3"]));
}

#[test]
fn florence2_parity_cli_text_output_and_models_root() {
    let exp = expected();
    // A models root holding Florence-2-base/ works like the folder itself.
    let root = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        fixtures().join("native"),
        root.path().join("Florence-2-base"),
    )
    .unwrap();
    let out = caption(
        root.path(),
        &[
            "--print-ids",
            "--beams",
            "1",
            "--max-new-tokens",
            &exp["max_new_tokens"].to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ids: "))
        .expect("ids line");
    let got: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(
        got,
        ids(&exp["tasks"]["<DETAILED_CAPTION>"]["greedy"]["ids"])
    );
    assert!(
        stdout.contains("prompt: matching background texture, seamless continuation, no objects"),
        "{stdout}"
    );
}

#[test]
fn florence2_cli_reports_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("native/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let out = caption(dir.path(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer.json") && err.contains("model.safetensors"),
        "{err}"
    );
    let out = caption(&dir.path().join("absent"), &[]);
    assert!(!out.status.success());
    let out = caption(&fixtures().join("native"), &["--task", "<OD>"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown task"));
}
