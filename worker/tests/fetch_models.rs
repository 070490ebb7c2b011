//! `pawfect-worker fetch-models`: `--check` on a models directory assembled from the tiny
//! fixtures, and the whole download against a fake Hugging Face Hub (`HF_ENDPOINT`) serving the
//! fixtures under the real repository and file names, followed by `inpaint` on what it fetched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

const FLUX_REPO: &str = "black-forest-labs/FLUX.1-Fill-dev";
const GGUF_REPO: &str = "YarvixPA/FLUX.1-Fill-dev-gguf";
const T5_REPO: &str = "city96/t5-v1_1-xxl-encoder-gguf";
const FLORENCE_REPO: &str = "microsoft/Florence-2-base";
const TOKEN: &str = "hf_test_token";
const T5_NAME: &str = "t5-v1_1-xxl-encoder-Q5_K_M.gguf";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pawfect-worker"));
    for v in [
        "HF_TOKEN",
        "HF_ENDPOINT",
        "PAWFECT_MODELS",
        "PAWFECT_MODEL_VARIANT",
    ] {
        c.env_remove(v);
    }
    c.env("RUST_LOG", "info");
    c
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every file under `dir`, by path relative to it (`/`-separated).
fn walk(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, p);
            }
        }
    }
    out
}

/// The tiny T5 encoder of the fixture pipeline as a GGUF with llama.cpp names (the layout of
/// city96's files): 2-D weights in Q8_0 where the rows allow it, the rest F32.
fn t5_gguf_bytes() -> Vec<u8> {
    let dir = fixtures().join("flux/pipeline/text_encoder_2");
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, path) in walk(&dir) {
        if !name.ends_with(".safetensors") {
            continue;
        }
        for (k, t) in candle_core::safetensors::load(&path, &Device::Cpu).unwrap() {
            let renamed = if k == "shared.weight" {
                "token_embd.weight".to_string()
            } else if k == "encoder.embed_tokens.weight" {
                continue;
            } else if k == "encoder.final_layer_norm.weight" {
                "enc.output_norm.weight".to_string()
            } else {
                let rest = k.strip_prefix("encoder.block.").expect(&k);
                let (i, part) = rest.split_once('.').unwrap();
                let s = match part {
                    "layer.0.SelfAttention.q.weight" => "attn_q.weight",
                    "layer.0.SelfAttention.k.weight" => "attn_k.weight",
                    "layer.0.SelfAttention.v.weight" => "attn_v.weight",
                    "layer.0.SelfAttention.o.weight" => "attn_o.weight",
                    "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b.weight",
                    "layer.0.layer_norm.weight" => "attn_norm.weight",
                    "layer.1.layer_norm.weight" => "ffn_norm.weight",
                    "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate.weight",
                    "layer.1.DenseReluDense.wi_1.weight" => "ffn_up.weight",
                    "layer.1.DenseReluDense.wo.weight" => "ffn_down.weight",
                    other => panic!("unexpected T5 tensor {other}"),
                };
                format!("enc.blk.{i}.{s}")
            };
            tensors.insert(renamed, t.to_dtype(candle_core::DType::F32).unwrap());
        }
    }
    assert!(tensors.contains_key("enc.blk.0.attn_q.weight"));
    let q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let dt = if t.rank() == 2 && t.dims()[1] % 32 == 0 && !n.contains("rel_b") {
                GgmlDType::Q8_0
            } else {
                GgmlDType::F32
            };
            (n.clone(), QTensor::quantize(t, dt).unwrap())
        })
        .collect();
    let refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut cur = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut cur, &[], &refs).unwrap();
    cur.into_inner()
}

fn copy_tree(from: &Path, to: &Path, skip: impl Fn(&str) -> bool) {
    for (rel, p) in walk(from) {
        if skip(&rel) {
            continue;
        }
        let dst = to.join(&rel);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&p, &dst).unwrap();
    }
}

fn is_weight_shard(rel: &str) -> bool {
    (rel.starts_with("transformer/") || rel.starts_with("text_encoder_2/"))
        && (rel.ends_with(".safetensors") || rel.ends_with(".index.json"))
}

/// The layout fetch-models makes, as plain copies: the FLUX folder without transformer and T5
/// weights, the Q5_K fixture under a Q5_K_S name, a T5 GGUF, Florence-2.
fn assemble(dir: &Path) {
    copy_tree(
        &fixtures().join("flux/pipeline"),
        &dir.join("FLUX.1-Fill-dev"),
        is_weight_shard,
    );
    std::fs::copy(
        fixtures().join("flux/gguf/flux1-fill-dev-Q5_K.gguf"),
        dir.join("flux1-fill-dev-Q5_K_S.gguf"),
    )
    .unwrap();
    std::fs::write(dir.join(T5_NAME), t5_gguf_bytes()).unwrap();
    copy_tree(
        &fixtures().join("florence2/native"),
        &dir.join("Florence-2-base"),
        |_| false,
    );
}

fn check(dir: &Path) -> Output {
    bin()
        .args(["fetch-models", "--check", "--models"])
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn check_passes_on_a_complete_dir_and_names_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assemble(dir);
    let o = check(dir);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for s in [
        "flux1-fill-dev-Q5_K_S.gguf",
        "Q5_K_S instead of Q5_K_M",
        T5_NAME,
        "Florence-2-base/model.safetensors",
        "total:",
        "complete",
    ] {
        assert!(t.contains(s), "{s} not in {t}");
    }

    // A missing file is named.
    let vae = dir.join("FLUX.1-Fill-dev/vae/diffusion_pytorch_model.safetensors");
    let saved = std::fs::read(&vae).unwrap();
    std::fs::remove_file(&vae).unwrap();
    let o = check(dir);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("vae/diffusion_pytorch_model.safetensors"), "{t}");
    assert!(t.contains("pawfect-worker fetch-models"), "{t}");
    std::fs::write(&vae, saved).unwrap();
    assert!(check(dir).status.success());

    // A truncated GGUF is named.
    let gguf = dir.join("flux1-fill-dev-Q5_K_S.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() - 100]).unwrap();
    let o = check(dir);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("flux1-fill-dev-Q5_K_S.gguf") && t.contains("truncated"),
        "{t}"
    );
    std::fs::write(&gguf, &bytes).unwrap();

    // No T5 weights and no T5 GGUF: both ways to fix it are named.
    let t5 = dir.join(T5_NAME);
    std::fs::rename(&t5, dir.join("t5.bak")).unwrap();
    let o = check(dir);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("text_encoder_2/model.safetensors"), "{t}");
    assert!(t.contains("T5-XXL encoder GGUF"), "{t}");
    std::fs::rename(dir.join("t5.bak"), &t5).unwrap();

    // No GGUF for the variant: what is there is listed.
    let o = bin()
        .args(["fetch-models", "--check", "--variant", "q4_0", "--models"])
        .arg(dir)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("PAWFECT_MODEL_VARIANT=q4_0") && t.contains("flux1-fill-dev-Q5_K_S.gguf"),
        "{t}"
    );

    // Florence-2's tokenizer missing.
    std::fs::remove_file(dir.join("Florence-2-base/tokenizer.json")).unwrap();
    let o = check(dir);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("tokenizer.json"), "{t}");
    // ... unless Florence is not wanted.
    let o = bin()
        .args(["fetch-models", "--check", "--no-florence", "--models"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

// ---------------------------------------------------------------- fake Hub

struct FakeRepo {
    sha: String,
    gated: bool,
    files: BTreeMap<String, Arc<Vec<u8>>>,
}

#[derive(Clone, Default)]
struct FakeHub {
    repos: Arc<HashMap<String, FakeRepo>>,
    /// Every `resolve` request: (repo, file, Range header).
    requests: Arc<Mutex<Vec<(String, String, String)>>>,
    /// The revision of every `resolve` request, in the same order.
    revisions: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    fn requests(&self) -> Vec<(String, String, String)> {
        self.requests.lock().unwrap().clone()
    }
}

fn authorized(h: &HeaderMap) -> bool {
    h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

fn etag(b: &[u8]) -> String {
    // FNV-1a: a stable content id for the blob name.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}{:08x}", b.len())
}

fn gated() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "Access to model is restricted. You must have access to it and be authenticated.",
    )
        .into_response()
}

async fn info(
    State(hub): State<FakeHub>,
    UrlPath((owner, name, _rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(repo) = hub.repos.get(&format!("{owner}/{name}")) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    if repo.gated && !authorized(&headers) {
        return gated();
    }
    let siblings: Vec<_> = repo
        .files
        .keys()
        .map(|f| serde_json::json!({ "rfilename": f }))
        .collect();
    let body = serde_json::json!({ "id": format!("{owner}/{name}"), "sha": repo.sha, "siblings": siblings });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn resolve(
    State(hub): State<FakeHub>,
    UrlPath((owner, name, rev, path)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let id = format!("{owner}/{name}");
    hub.revisions.lock().unwrap().push(rev);
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    hub.requests
        .lock()
        .unwrap()
        .push((id.clone(), path.clone(), range.clone()));
    let Some(repo) = hub.repos.get(&id) else {
        return (StatusCode::NOT_FOUND, "Repository not found").into_response();
    };
    if repo.gated && !authorized(&headers) {
        return gated();
    }
    let Some(data) = repo.files.get(&path) else {
        return (
            StatusCode::NOT_FOUND,
            [("x-error-code", "EntryNotFound")],
            "Entry not found",
        )
            .into_response();
    };
    let size = data.len() as u64;
    let common = |b: axum::http::response::Builder| {
        b.header(header::ETAG, format!("\"{}\"", etag(data)))
            .header("X-Repo-Commit", repo.sha.as_str())
            .header(header::ACCEPT_RANGES, "bytes")
    };
    let Some(spec) = range.strip_prefix("bytes=") else {
        return common(Response::builder().status(StatusCode::OK))
            .body(Body::from(data.to_vec()))
            .unwrap();
    };
    let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
    let a: u64 = a.parse().unwrap_or(0);
    let b: u64 = if b.is_empty() {
        size.saturating_sub(1)
    } else {
        b.parse::<u64>().unwrap_or(0).min(size.saturating_sub(1))
    };
    if size == 0 || a > b {
        return common(Response::builder().status(StatusCode::RANGE_NOT_SATISFIABLE))
            .header(header::CONTENT_RANGE, format!("bytes */{size}"))
            .body(Body::empty())
            .unwrap();
    }
    common(Response::builder().status(StatusCode::PARTIAL_CONTENT))
        .header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{size}"))
        .body(Body::from(data[a as usize..=b as usize].to_vec()))
        .unwrap()
}

fn repo(sha: &str, gated: bool, files: Vec<(String, Vec<u8>)>) -> FakeRepo {
    FakeRepo {
        sha: sha.into(),
        gated,
        files: files.into_iter().map(|(n, b)| (n, Arc::new(b))).collect(),
    }
}

fn fake_hub() -> FakeHub {
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let flux: Vec<(String, Vec<u8>)> = walk(&fixtures().join("flux/pipeline"))
        .into_iter()
        .map(|(rel, p)| (rel, read(p)))
        .collect();
    let florence: Vec<(String, Vec<u8>)> = walk(&fixtures().join("florence2/native"))
        .into_iter()
        .map(|(rel, p)| (rel, read(p)))
        .chain([("README.md".to_string(), b"# Florence-2".to_vec())])
        .collect();
    let gguf = fixtures().join("flux/gguf");
    let mut repos = HashMap::new();
    repos.insert(
        FLUX_REPO.to_string(),
        repo("0123456789abcdef0123456789abcdef01234567", true, flux),
    );
    repos.insert(
        GGUF_REPO.to_string(),
        repo(
            "1111111111111111111111111111111111111111",
            false,
            vec![
                ("README.md".into(), b"# GGUF".to_vec()),
                // No Q5_K_M, as on the real repository: q5_k_m falls back to Q5_K_S.
                (
                    "flux1-fill-dev-Q5_K_S.gguf".into(),
                    read(gguf.join("flux1-fill-dev-Q5_K.gguf")),
                ),
                (
                    "flux1-fill-dev-Q8_0.gguf".into(),
                    read(gguf.join("flux1-fill-dev-Q8_0.gguf")),
                ),
            ],
        ),
    );
    let t5 = t5_gguf_bytes();
    repos.insert(
        T5_REPO.to_string(),
        repo(
            "2222222222222222222222222222222222222222",
            false,
            vec![
                (T5_NAME.into(), t5.clone()),
                ("t5-v1_1-xxl-encoder-Q8_0.gguf".into(), t5),
            ],
        ),
    );
    repos.insert(
        FLORENCE_REPO.to_string(),
        repo("3333333333333333333333333333333333333333", false, florence),
    );
    FakeHub {
        repos: Arc::new(repos),
        ..Default::default()
    }
}

fn fetch(dir: &Path, endpoint: &str, token: Option<&str>) -> Output {
    fetch_with(dir, endpoint, token, &[])
}

fn fetch_with(dir: &Path, endpoint: &str, token: Option<&str>, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args(["fetch-models", "--retries", "0", "--models"])
        .arg(dir)
        .args(extra)
        .env("HF_ENDPOINT", endpoint)
        // The chart's setting: the token and cache of HF_HOME are not what fetch-models uses.
        .env("HF_HOME", dir.join(".cache/huggingface"));
    if let Some(t) = token {
        c.env("HF_TOKEN", t);
    }
    c.output().unwrap()
}

/// Serves `hub` on a loopback port (on the returned runtime); its endpoint URL.
fn serve_hub(hub: &FakeHub) -> (tokio::runtime::Runtime, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/api/models/{owner}/{name}/revision/{rev}", get(info))
        .route("/{owner}/{name}/resolve/{rev}/{*path}", get(resolve))
        .with_state(hub.clone());
    rt.spawn(async move { axum::serve(listener, app).await });
    (rt, endpoint)
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The lock file: the first download records every file's commit and sha256; a later download
/// into a fresh directory fetches those commits and verifies every file; a wrong sha256 fails
/// the run naming the file and leaves no byte of it behind; `--revision` says what it did not
/// verify.
#[test]
fn locked_downloads_are_verified_and_a_mismatch_keeps_nothing() {
    let hub = fake_hub();
    let (_rt, endpoint) = serve_hub(&hub);
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = ["first", "second", "tampered"]
        .iter()
        .map(|n| tmp.path().join(n))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    const GGUF: &str = "flux1-fill-dev-Q5_K_S.gguf";

    // The first download records the lock.
    let o = fetch_with(&dirs[0], &endpoint, Some(TOKEN), &["--write-lock"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("lock written:"), "{t}");
    let lock_file = dirs[0].join("q5_k_m.lock");
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&lock_file).unwrap()).unwrap();
    let gguf = hub.repos[GGUF_REPO].files[GGUF].clone();
    assert_eq!(lock["variant"], "q5_k_m");
    assert_eq!(
        lock["repos"][GGUF_REPO]["revision"],
        hub.repos[GGUF_REPO].sha.as_str()
    );
    assert_eq!(lock["repos"][GGUF_REPO]["files"][GGUF], sha256(&gguf));
    let flux = &lock["repos"][FLUX_REPO]["files"];
    assert_eq!(
        flux["model_index.json"],
        sha256(&hub.repos[FLUX_REPO].files["model_index.json"])
    );
    let locked: usize = lock["repos"]
        .as_object()
        .unwrap()
        .values()
        .map(|r| r["files"].as_object().unwrap().len())
        .sum();
    assert!(locked >= 10, "{lock}");

    // A fresh directory with that lock: every file fetched at its locked commit, verified.
    std::fs::copy(&lock_file, dirs[1].join("q5_k_m.lock")).unwrap();
    let before = hub.revisions.lock().unwrap().len();
    let o = fetch_with(&dirs[1], &endpoint, Some(TOKEN), &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains(&format!("verified: {locked} files (sha256) against")),
        "{t}"
    );
    let shas: Vec<&str> = hub.repos.values().map(|r| r.sha.as_str()).collect();
    let revs = hub.revisions.lock().unwrap()[before..].to_vec();
    assert!(!revs.is_empty());
    assert!(revs.iter().all(|r| shas.contains(&r.as_str())), "{revs:?}");
    assert_eq!(std::fs::read(dirs[1].join(GGUF)).unwrap(), *gguf);
    // Again, from the cache: hashed again, nothing downloaded.
    let o = fetch_with(&dirs[1], &endpoint, Some(TOKEN), &[]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("downloaded this run: 0 files"), "{t}");
    assert!(t.contains(&format!("verified: {locked} files")), "{t}");

    // --revision: that repository is fetched at the commit given and said to be unverified.
    let t5_sha = hub.repos[T5_REPO].sha.clone();
    let o = fetch_with(
        &dirs[1],
        &endpoint,
        Some(TOKEN),
        &["--revision", &format!("{T5_REPO}={t5_sha}")],
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains(&format!("not verified: {T5_REPO} at {t5_sha}")),
        "{t}"
    );

    // --lock-if-missing (the chart's Job): records where there is no lock, verifies where
    // there is one.
    let auto = tmp.path().join("auto");
    std::fs::create_dir_all(&auto).unwrap();
    let o = fetch_with(&auto, &endpoint, Some(TOKEN), &["--lock-if-missing"]);
    let t = text(&o);
    assert!(o.status.success() && t.contains("lock written:"), "{t}");
    let o = fetch_with(&auto, &endpoint, Some(TOKEN), &["--lock-if-missing"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(&format!("verified: {locked} files")), "{t}");
    assert!(!t.contains("lock written:"), "{t}");

    // A lock whose sha256 of the GGUF is wrong: the run fails naming the file, the expected
    // and the actual sha256, and no copy of the file (whole or partial) is left.
    let wrong = "0".repeat(64);
    let tampered = std::fs::read_to_string(&lock_file)
        .unwrap()
        .replace(&sha256(&gguf), &wrong);
    assert_ne!(tampered, std::fs::read_to_string(&lock_file).unwrap());
    std::fs::write(dirs[2].join("q5_k_m.lock"), tampered).unwrap();
    let o = fetch_with(&dirs[2], &endpoint, Some(TOKEN), &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    for s in [GGUF, "sha256 mismatch", wrong.as_str(), &sha256(&gguf)] {
        assert!(t.contains(s), "{s} not in {t}");
    }
    assert!(
        hub.requests().iter().any(|(_, f, _)| f == GGUF),
        "the file was downloaded"
    );
    for (rel, p) in walk(&dirs[2]) {
        assert!(
            !rel.ends_with(".verifying") && !rel.ends_with(".part"),
            "{rel} left"
        );
        let b = std::fs::read(&p).unwrap();
        assert!(b != *gguf, "{rel} holds the unverified file");
    }
    assert!(std::fs::symlink_metadata(dirs[2].join(GGUF)).is_err());
}

#[test]
fn fetch_models_from_a_fake_hub_then_inpaint() {
    let hub = fake_hub();
    let (_rt, endpoint) = serve_hub(&hub);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("models");
    std::fs::create_dir_all(&dir).unwrap();

    // Without a token: the gated repository says what to do, and nothing else is fetched.
    let o = fetch(&dir, &endpoint, None);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    for s in [FLUX_REPO, "401", "licence", "HF_TOKEN"] {
        assert!(t.contains(s), "{s} not in {t}");
    }
    assert!(
        hub.requests().iter().all(|(r, _, _)| r == FLUX_REPO),
        "{:?}",
        hub.requests()
    );

    // An interrupted download of the GGUF left half of it in the cache: it resumes from there.
    let gguf = hub.repos[GGUF_REPO].files["flux1-fill-dev-Q5_K_S.gguf"].clone();
    let half = gguf.len() / 2;
    let blobs = dir.join("hub/models--YarvixPA--FLUX.1-Fill-dev-gguf/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(format!("{}.part", etag(&gguf))), &gguf[..half]).unwrap();

    // With it: everything, with relative links.
    let o = fetch(&dir, &endpoint, Some(TOKEN));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for s in [
        "fallback taken: flux1-fill-dev-Q5_K_S.gguf (Q5_K_S instead of Q5_K_M",
        "complete",
        "total:",
        // No lock file: the run says that it verified nothing.
        "not verified: no ",
    ] {
        assert!(t.contains(s), "{s} not in {t}");
    }
    for (name, target_start) in [
        (
            "FLUX.1-Fill-dev",
            "hub/models--black-forest-labs--FLUX.1-Fill-dev/snapshots/0123456789abcdef",
        ),
        (
            "flux1-fill-dev-Q5_K_S.gguf",
            "hub/models--YarvixPA--FLUX.1-Fill-dev-gguf/snapshots/1111",
        ),
        (
            T5_NAME,
            "hub/models--city96--t5-v1_1-xxl-encoder-gguf/snapshots/2222",
        ),
        (
            "Florence-2-base",
            "hub/models--microsoft--Florence-2-base/snapshots/3333",
        ),
    ] {
        let target = std::fs::read_link(dir.join(name)).expect(name);
        assert!(target.is_relative(), "{name} -> {target:?}");
        assert!(
            target.to_string_lossy().starts_with(target_start),
            "{name} -> {target:?}"
        );
    }
    // Neither the diffusers transformer nor the T5 shards were fetched (GGUFs replace them),
    // nor the Q8_0 files.
    let first = hub.requests();
    for (r, f, _) in &first {
        assert!(
            !(f.contains("Q8_0") || (r == FLUX_REPO && is_weight_shard(f))),
            "fetched {r}/{f}"
        );
    }
    assert!(
        first
            .iter()
            .any(|(_, f, range)| f == "flux1-fill-dev-Q5_K_S.gguf"
                && *range == format!("bytes={half}-")),
        "{first:?}"
    );
    assert_eq!(
        std::fs::read(dir.join("flux1-fill-dev-Q5_K_S.gguf")).unwrap(),
        *gguf
    );

    // The volume mounted elsewhere: the relative links still resolve.
    let moved = tmp.path().join("elsewhere");
    std::fs::rename(&dir, &moved).unwrap();
    let o = check(&moved);
    assert!(o.status.success(), "{}", text(&o));

    // `inpaint` finds the variant's GGUF and the T5 GGUF as `serve` would.
    let out = tmp.path().join("out.png");
    let o = bin()
        .args(["inpaint", "--device", "cpu", "--steps", "2", "--no-caption"])
        .args(["--prompt", "green grass lawn", "--model-variant", "q5_k_m"])
        .args(["--crop-min-side", "64", "--crop-max-side", "128"])
        .arg("--models")
        .arg(&moved)
        .arg("--image")
        .arg(fixtures().join("flux/image.png"))
        .arg("--mask")
        .arg(fixtures().join("flux/mask.png"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(T5_NAME), "{t}");
    assert!(t.contains("flux1-fill-dev-Q5_K_S.gguf"), "{t}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (96, 64));

    // A second run downloads nothing.
    let o = fetch(&moved, &endpoint, Some(TOKEN));
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("downloaded this run: 0 files"), "{t}");
    assert_eq!(
        hub.requests().len(),
        first.len(),
        "{:?}",
        &hub.requests()[first.len()..]
    );
}
