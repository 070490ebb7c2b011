//! `pawfect-worker fetch-models`: fill a models directory from the Hugging Face Hub, or check it.
//!
//! ```text
//! HF_TOKEN=hf_... pawfect-worker fetch-models --models DIR [--variant q5_k_m]
//!     [--gguf-repo YarvixPA/FLUX.1-Fill-dev-gguf] [--t5 gguf|full]
//!     [--t5-gguf-repo city96/t5-v1_1-xxl-encoder-gguf] [--no-florence] [--retries 3]
//!     [--write-lock | --lock-if-missing] [--revision REPO=COMMIT]...
//! pawfect-worker fetch-models --models DIR --variant q5_k_m --check
//! env: PAWFECT_MODELS, PAWFECT_MODEL_VARIANT, HF_TOKEN, HF_ENDPOINT
//! ```
//!
//! See [`crate::download::plan`] for the layout it makes; `serve --models DIR` with the same
//! variant loads it. A run ends with the checks of `--check` and a summary.
//!
//! With `DIR/<variant>.lock` ([`crate::download::lock`]) every repository is fetched at its
//! locked commit and every file verified against its locked sha256; `--write-lock` records
//! that file from what a run fetched; `--revision REPO=COMMIT` fetches one repository at
//! another commit, whose files are then not verified (the summary says so).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;
use pawfect_models::weights::ModelVariant;

use super::serve::parse_variant;
use crate::download::hub::{Hub, HubOptions, Pin, human_bytes};
use crate::download::lock::{Lock, lock_path};
use crate::download::plan::{
    DEFAULT_GGUF_REPO, DEFAULT_T5_GGUF_REPO, FetchOutcome, FetchPlan, T5Source, fetch_models,
};
use pawfect_models::weights::check::{CheckOptions, CheckReport, check_models};

#[derive(Debug, Clone, Args)]
pub struct FetchArgs {
    /// Models directory (the volume `serve --models` reads). Downloads go to DIR/hub.
    #[arg(long, env = "PAWFECT_MODELS")]
    pub models: PathBuf,
    /// Which transformer weights: q4_0, q4_k_m, q5_k_m, q8_0 (GGUF) or bf16 (diffusers).
    #[arg(long, env = "PAWFECT_MODEL_VARIANT", default_value = "q5_k_m", value_parser = parse_variant)]
    pub variant: ModelVariant,
    /// Hub repository of FLUX.1-Fill-dev GGUF files.
    #[arg(long, default_value = DEFAULT_GGUF_REPO)]
    pub gguf_repo: String,
    /// T5-XXL encoder: `gguf` (default for quantized variants) or `full` (the diffusers
    /// text_encoder_2, default for bf16).
    #[arg(long, value_enum)]
    pub t5: Option<T5Source>,
    /// Hub repository of T5-XXL encoder GGUF files.
    #[arg(long, default_value = DEFAULT_T5_GGUF_REPO)]
    pub t5_gguf_repo: String,
    /// Leave Florence-2 out (workers then run with --no-caption).
    #[arg(long)]
    pub no_florence: bool,
    /// Download nothing: check that DIR is complete for the variant and list what is there.
    #[arg(long)]
    pub check: bool,
    /// Attempts after a transient network failure, per file.
    #[arg(long, default_value_t = 3)]
    pub retries: usize,
    /// Record DIR/<variant>.lock from this run: every repository's commit and every file's
    /// sha256 (replacing a lock that is there; its pins are not used for this run).
    #[arg(long)]
    pub write_lock: bool,
    /// Record DIR/<variant>.lock only when DIR has none; else verify against it (the chart's
    /// download Job: its first run records, every later run verifies).
    #[arg(long, conflicts_with = "write_lock")]
    pub lock_if_missing: bool,
    /// Fetch one repository at this commit instead of the lock's (or `main`), e.g.
    /// `YarvixPA/FLUX.1-Fill-dev-gguf=<sha>`; repeatable. Its files are not verified.
    #[arg(long = "revision", value_name = "REPO=COMMIT", value_parser = parse_revision)]
    pub revisions: Vec<(String, String)>,
}

fn parse_revision(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((repo, rev))
            if repo.contains('/') && !rev.is_empty() && !rev.contains(['/', '\\', '.', ' ']) =>
        {
            Ok((repo.to_string(), rev.to_string()))
        }
        _ => Err(format!(
            "{s:?}: expected REPO=COMMIT, e.g. YarvixPA/FLUX.1-Fill-dev-gguf=0123abc…"
        )),
    }
}

/// How the files of a run were checked, for the summary.
fn print_verification(a: &FetchArgs, lock: Option<&Lock>, writing: bool, o: &FetchOutcome) {
    let path = lock_path(&a.models, a.variant.as_str());
    let verified = o.fetched.iter().filter(|f| f.verified).count();
    if let Some(lock) = lock {
        println!(
            "verified: {verified} files (sha256) against {} ({} files of {} repositories)",
            path.display(),
            lock.file_count(),
            lock.repos.len()
        );
    }
    for (repo, rev) in &a.revisions {
        println!(
            "not verified: {repo} at {rev} (--revision: no sha256 is known for its files; \
             `--write-lock` records them)"
        );
    }
    if lock.is_none() && !writing {
        println!(
            "not verified: no {} — nothing was checked against known sha256s; \
             `fetch-models --write-lock` records the commit and sha256 of every file, and \
             later runs verify against them",
            path.display()
        );
    }
}

fn shown(models: &Path, p: &Path) -> String {
    p.strip_prefix(models).unwrap_or(p).display().to_string()
}

fn print_report(models: &Path, variant: ModelVariant, r: &CheckReport) {
    println!(
        "models: {} (variant {})",
        models.display(),
        variant.as_str()
    );
    for f in &r.files {
        println!(
            "  {:<11} {:>10}  {}{}",
            f.role,
            human_bytes(f.bytes),
            shown(models, &f.path),
            if f.detail.is_empty() {
                String::new()
            } else {
                format!("  [{}]", f.detail)
            }
        );
    }
    println!(
        "total: {} files, {}",
        r.files.len(),
        human_bytes(r.total_bytes())
    );
    for c in &r.choices {
        if c.is_fallback() {
            println!("fallback: {}", c.describe());
        }
    }
}

fn print_fetched(o: &FetchOutcome) {
    let new: Vec<_> = o.fetched.iter().filter(|f| f.downloaded).collect();
    let bytes: u64 = new.iter().map(|f| f.bytes).sum();
    println!(
        "downloaded this run: {} files, {} ({} already there)",
        new.len(),
        human_bytes(bytes),
        o.fetched.len() - new.len()
    );
    for c in o.transformer.iter().chain(o.t5.iter()) {
        if c.is_fallback() {
            println!("fallback taken: {}", c.describe());
        }
    }
    for l in &o.links {
        println!("link: {} -> {}", l.path.display(), l.target.display());
    }
    for w in &o.warnings {
        println!("warning: {w}");
    }
}

pub fn run(a: &FetchArgs) -> Result<()> {
    let check = CheckOptions {
        variant: a.variant,
        florence: !a.no_florence,
    };
    if !a.check {
        let plan = FetchPlan {
            variant: a.variant,
            gguf_repo: a.gguf_repo.clone(),
            t5: a.t5.unwrap_or(T5Source::default_for(a.variant)),
            t5_gguf_repo: a.t5_gguf_repo.clone(),
            florence: !a.no_florence,
        };
        let mut options = HubOptions::from_env();
        options.retries = a.retries;
        let mut hub = Hub::new(&a.models.join("hub"), options)?;
        let path = lock_path(&a.models, a.variant.as_str());
        let writing = a.write_lock || (a.lock_if_missing && !path.exists());
        let lock = if writing { None } else { Lock::read(&path)? };
        if let Some(lock) = &lock {
            if lock.variant != a.variant.as_str() {
                bail!(
                    "{} is the lock of variant {}, not {}",
                    path.display(),
                    lock.variant,
                    a.variant.as_str()
                );
            }
            for (repo, pin) in lock.pins() {
                hub.pin(&repo, pin);
            }
        }
        for (repo, rev) in &a.revisions {
            hub.pin(
                repo,
                Pin {
                    revision: rev.clone(),
                    sha256: None,
                },
            );
        }
        let outcome = fetch_models(&a.models, &plan, &hub)?;
        print_fetched(&outcome);
        print_verification(a, lock.as_ref(), writing, &outcome);
        if writing {
            let lock = Lock::record(a.variant.as_str(), &outcome.fetched)?;
            lock.write(&path)?;
            println!(
                "lock written: {} ({} files of {} repositories, each with its commit and sha256); \
                 later runs fetch these commits and verify every file",
                path.display(),
                lock.file_count(),
                lock.repos.len()
            );
        }
    }
    let report = check_models(&a.models, &check);
    print_report(&a.models, a.variant, &report);
    if !report.is_complete() {
        for p in &report.problems {
            eprintln!("problem: {p}");
        }
        bail!(
            "{} is not complete for variant {} ({} problems above){}",
            a.models.display(),
            a.variant.as_str(),
            report.problems.len(),
            if a.check {
                "; `pawfect-worker fetch-models` without --check downloads what is missing"
            } else {
                ""
            }
        );
    }
    println!(
        "complete: `pawfect-worker serve --models {}` with PAWFECT_MODEL_VARIANT={} finds everything",
        a.models.display(),
        a.variant.as_str()
    );
    Ok(())
}
