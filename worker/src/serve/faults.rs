//! Fault injection for end-to-end tests of a real worker process: `PAWFECT_TEST_FAULTS`.
//!
//! A comma-separated list of `KIND@TEXT`: a job whose prompt contains `TEXT` runs the real model
//! until its first denoising step has finished, then stops it and fails the way the model would:
//!
//! - `model-error@TEXT`: a model error mid-denoise (`ModelError`);
//! - `oom@TEXT`: a CUDA out-of-memory error (`OutOfMemory`).
//!
//! - `hold-load@PATH`: model loading waits until the file `PATH` exists (a worker that stays
//!   in its loading phase for as long as the test wants);
//! - `freeze-store@TEXT`: a job whose output URI contains `TEXT` stops the whole process
//!   (SIGSTOP, as a frozen node or a debugger would) once the result is written to its
//!   temporary object, right before it is put in place; SIGCONT resumes it.
//!
//! Unset (always, outside tests), the inpainter is used as is. The worker logs a warning at
//! start-up when faults are configured.

use std::sync::Arc;

use image::{GrayImage, RgbImage};

use crate::pipeline::{InpaintError, InpaintParams, Inpainted, Inpainter, PromptCacheUsage, Step};

/// The environment variable.
pub const ENV: &str = super::TEST_FAULTS_ENV;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    ModelError,
    OutOfMemory,
    HoldLoad,
    FreezeStore,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// Prompt substring that triggers it.
    pub trigger: String,
}

/// Parses `model-error@TEXT,oom@TEXT,hold-load@PATH,freeze-store@TEXT`.
pub fn parse(spec: &str) -> Result<Vec<Fault>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (kind, trigger) = item
                .split_once('@')
                .ok_or_else(|| format!("{ENV}: {item:?} is not KIND@TEXT"))?;
            let kind = match kind {
                "model-error" => FaultKind::ModelError,
                "oom" => FaultKind::OutOfMemory,
                "hold-load" => FaultKind::HoldLoad,
                "freeze-store" => FaultKind::FreezeStore,
                other => {
                    return Err(format!(
                        "{ENV}: unknown fault {other:?} (model-error, oom, hold-load, freeze-store)"
                    ));
                }
            };
            if trigger.is_empty() {
                return Err(format!("{ENV}: {item:?} has no trigger text"));
            }
            Ok(Fault {
                kind,
                trigger: trigger.to_string(),
            })
        })
        .collect()
}

/// `hold-load@PATH`: blocks (on the loader's thread) until `PATH` exists.
pub fn hold_load(faults: &[Fault]) {
    for f in faults.iter().filter(|f| f.kind == FaultKind::HoldLoad) {
        tracing::warn!(path = %f.trigger, "{ENV}: model loading waits for this file");
        while !std::path::Path::new(&f.trigger).exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Whether `freeze-store` applies to a job writing `output`.
pub fn freezes_store(faults: &[Fault], output: &str) -> bool {
    faults
        .iter()
        .any(|f| f.kind == FaultKind::FreezeStore && output.contains(&f.trigger))
}

/// Stops this process with SIGSTOP (through `kill`, without a libc dependency); returns once
/// it is continued.
pub fn freeze_self() {
    tracing::warn!("{ENV}: freezing the process (SIGSTOP) before the output is put in place");
    let pid = std::process::id().to_string();
    if let Err(e) = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
    {
        tracing::error!(error = %e, "{ENV}: could not freeze the process");
    }
}

/// Wraps an inpainter with faults (see the module docs).
pub struct FaultyInpainter {
    inner: Arc<dyn Inpainter>,
    faults: Vec<Fault>,
}

impl FaultyInpainter {
    pub fn new(inner: Arc<dyn Inpainter>, faults: Vec<Fault>) -> Self {
        FaultyInpainter { inner, faults }
    }
}

impl Inpainter for FaultyInpainter {
    fn inpaint(
        &self,
        image: &RgbImage,
        mask: &GrayImage,
        prompt: &str,
        params: &InpaintParams,
        progress: &mut dyn FnMut(Step) -> bool,
    ) -> Result<Inpainted, InpaintError> {
        let Some(fault) = self.faults.iter().find(|f| {
            matches!(f.kind, FaultKind::ModelError | FaultKind::OutOfMemory)
                && prompt.contains(&f.trigger)
        }) else {
            return self.inner.inpaint(image, mask, prompt, params, progress);
        };
        let mut stepped = None;
        let mut cancelled = false;
        let mut stop_after_first = |s: Step| {
            cancelled = !progress(s);
            stepped = Some(s.step);
            false
        };
        let result = self
            .inner
            .inpaint(image, mask, prompt, params, &mut stop_after_first);
        match result {
            Err(InpaintError::Cancelled) if !cancelled => {
                let step = stepped.unwrap_or(0);
                Err(match fault.kind {
                    FaultKind::ModelError => {
                        InpaintError::Model(format!("injected model error at step {step}"))
                    }
                    FaultKind::OutOfMemory => InpaintError::OutOfMemory(format!(
                        "injected CUDA_ERROR_OUT_OF_MEMORY at step {step}"
                    )),
                    FaultKind::HoldLoad | FaultKind::FreezeStore => {
                        unreachable!("only inpainter faults are matched above")
                    }
                })
            }
            other => other,
        }
    }

    fn prompt_cache(&self) -> Option<PromptCacheUsage> {
        self.inner.prompt_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            parse("model-error@boom, oom@too big").unwrap(),
            vec![
                Fault {
                    kind: FaultKind::ModelError,
                    trigger: "boom".into()
                },
                Fault {
                    kind: FaultKind::OutOfMemory,
                    trigger: "too big".into()
                }
            ]
        );
        assert_eq!(
            parse("hold-load@/tmp/go,freeze-store@out/x.png")
                .unwrap()
                .iter()
                .map(|f| f.kind)
                .collect::<Vec<_>>(),
            vec![FaultKind::HoldLoad, FaultKind::FreezeStore]
        );
        assert!(parse("explode@x").is_err());
        assert!(parse("oom@").is_err());
        assert!(parse("oom").is_err());
        assert_eq!(parse(""), Ok(vec![]));
    }
}
