//! The tiny fixture models, laid out as a pool's model volume holds them.

use std::path::{Path, PathBuf};

/// `tests/fixtures` of the repository (this module is also compiled into the `tests/` crate,
/// whose manifest directory is a sibling of `worker/`).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A models directory under `dir` laid out as in production: `FLUX.1-Fill-dev/`, a GGUF
/// transformer next to it, `Florence-2-base/` (symlinks to the fixtures).
pub fn models_dir(dir: &Path) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let f = fixtures().canonicalize().unwrap();
    let link = |target: PathBuf, name: &str| {
        std::os::unix::fs::symlink(target, models.join(name)).unwrap()
    };
    link(f.join("flux/pipeline"), "FLUX.1-Fill-dev");
    link(
        f.join("flux/gguf/flux1-fill-dev-Q8_0.gguf"),
        "flux1-fill-dev-Q8_0.gguf",
    );
    link(f.join("florence2/native"), "Florence-2-base");
    models
}
