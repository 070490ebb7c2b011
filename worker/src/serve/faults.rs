//! Fault injection for end-to-end tests of a real worker process: `PAWFECT_TEST_FAULTS`.
//!
//! A comma-separated list of `KIND@TEXT`: a job whose prompt contains `TEXT` runs the real model
//! until its first denoising step has finished, then stops it and fails the way the model would:
//!
//! - `model-error@TEXT`: a model error mid-denoise (`ModelError`);
//! - `oom@TEXT`: a CUDA out-of-memory error (`OutOfMemory`).
//!
//! Unset (always, outside tests), the inpainter is used as is. The worker logs a warning at
//! start-up when faults are configured.

use std::sync::Arc;

use image::{GrayImage, RgbImage};

use crate::pipeline::{InpaintError, InpaintParams, Inpainted, Inpainter, Step};

/// The environment variable.
pub const ENV: &str = super::TEST_FAULTS_ENV;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    ModelError,
    OutOfMemory,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// Prompt substring that triggers it.
    pub trigger: String,
}

/// Parses `model-error@TEXT,oom@TEXT`.
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
                other => return Err(format!("{ENV}: unknown fault {other:?} (model-error, oom)")),
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
        let Some(fault) = self.faults.iter().find(|f| prompt.contains(&f.trigger)) else {
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
                })
            }
            other => other,
        }
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
        assert!(parse("explode@x").is_err());
        assert!(parse("oom@").is_err());
        assert!(parse("oom").is_err());
        assert_eq!(parse(""), Ok(vec![]));
    }
}
