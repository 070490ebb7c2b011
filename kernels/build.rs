//! Compiles `cuda/*.cu` to PTX with nvcc when the `cuda` feature is on.
//!
//! One target per build, as for candle-kernels: `CUDA_COMPUTE_CAP` (e.g. `75` for the T4, `90`
//! for the H100; a suffix such as `90a` is accepted and ignored) or, failing that, the first GPU
//! reported by `nvidia-smi`. The PTX is for the virtual architecture `compute_<cap>`, so a
//! `75` build also runs (JIT-compiled by the driver) on newer GPUs. nvcc comes from `NVCC`,
//! `$CUDA_HOME/bin`, `$CUDA_PATH/bin` or `PATH`; `NVCC_CCBIN` picks the host compiler.
//! Nothing is downloaded.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 2] = ["attention", "elementwise"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    for var in [
        "CUDA_COMPUTE_CAP",
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "NVCC_CCBIN",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(e) = build() {
        panic!("pawfect-kernels: {e}");
    }
}

fn build() -> Result<(), String> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let cap = compute_cap()?;
    let nvcc = nvcc();
    for src in SOURCES {
        let input = format!("cuda/{src}.cu");
        let ptx = out.join(format!("{src}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&input);
        if let Ok(ccbin) = env::var("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run {} ({e}); set NVCC or CUDA_HOME", nvcc.display()))?;
        if !status.success() {
            return Err(format!("nvcc failed on {input} for compute_{cap}"));
        }
    }
    std::fs::write(
        out.join("build_cap.rs"),
        format!("/// Compute capability the CUDA kernels were compiled for.\npub const BUILD_COMPUTE_CAP: u32 = {cap};\n"),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

fn compute_cap() -> Result<u32, String> {
    let raw = match env::var("CUDA_COMPUTE_CAP") {
        Ok(v) => v,
        Err(_) => {
            let out = Command::new("nvidia-smi")
                .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
                .output()
                .map_err(|e| format!("CUDA_COMPUTE_CAP is not set and nvidia-smi failed ({e})"))?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            text.lines().next().unwrap_or("").replace('.', "")
        }
    };
    let digits: String = raw
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let cap: u32 = digits.parse().map_err(|_| {
        format!("cannot read a compute capability from {raw:?} (expected e.g. 75 or 90)")
    })?;
    if cap < 75 {
        return Err(format!(
            "compute capability {cap} is below 75 (Turing), which these kernels need"
        ));
    }
    Ok(cap)
}

fn nvcc() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}
