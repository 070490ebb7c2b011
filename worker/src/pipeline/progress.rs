//! What a running job reports: the stage it is in (the names that progress events, metrics and
//! `status.progress.stage` use), the step within `denoise`, and the [`Observer`] that receives
//! them and tells the stages whether the job was cancelled.

/// The pipeline stages, as reported in progress events and timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Fetch,
    Mask,
    Crop,
    Caption,
    Encode,
    Denoise,
    Decode,
    Stitch,
    Store,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Fetch,
        Stage::Mask,
        Stage::Crop,
        Stage::Caption,
        Stage::Encode,
        Stage::Denoise,
        Stage::Decode,
        Stage::Stitch,
        Stage::Store,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Mask => "mask",
            Stage::Crop => "crop",
            Stage::Caption => "caption",
            Stage::Encode => "encode",
            Stage::Denoise => "denoise",
            Stage::Decode => "decode",
            Stage::Stitch => "stitch",
            Stage::Store => "store",
        }
    }
}

/// Where a job is: a stage, and within `denoise` the step (counted over all crops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub step: Option<u32>,
    pub total: Option<u32>,
}

impl Progress {
    pub fn stage(stage: Stage) -> Self {
        Progress {
            stage,
            step: None,
            total: None,
        }
    }
}

/// Receives a job's progress and tells whether it was cancelled. Called from the thread that
/// runs the job; `cancelled` is polled between stages and after every denoising step.
pub trait Observer: Send {
    fn progress(&mut self, progress: Progress);
    fn cancelled(&self) -> bool;
}

/// An [`Observer`] that ignores progress and never cancels.
pub struct NoObserver;

impl Observer for NoObserver {
    fn progress(&mut self, _: Progress) {}
    fn cancelled(&self) -> bool {
        false
    }
}
