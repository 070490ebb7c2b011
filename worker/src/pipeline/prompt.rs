//! Stage 4, prompt: what the model is asked to paint into the hole.
//!
//! Precedence: `spec.prompt` › `spec.sceneLabels` › a caption of the crop around the mask turned
//! into a surface prompt › a neutral prompt. Captioning never blocks a job: without a captioner,
//! or when it fails, the neutral prompt is used and the reason recorded in `note`.

use image::RgbImage;
use pawfect_api::{InpaintJobSpec, PromptOrigin, PromptSource};

/// The prompt of a job and how it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub text: String,
    pub origin: PromptOrigin,
    /// The caption, when one was made (also when it gave no usable surface).
    pub caption: Option<String>,
    /// The surface the prompt describes (e.g. `grass`), when known.
    pub surface: Option<String>,
    /// Why a fallback was taken, e.g. the captioner's error.
    pub note: Option<String>,
}

/// A prompt built by [`PromptRules`] from a caption, from labels, or the neutral one.
#[derive(Clone, Debug, PartialEq)]
pub struct RulePrompt {
    pub prompt: String,
    pub surface: Option<String>,
    /// True when nothing usable was found and this is the neutral prompt.
    pub neutral: bool,
    pub note: Option<String>,
}

/// Why a caption could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CaptionError(pub String);

/// Captions an image (the crop around the mask).
pub trait Captioner: Send + Sync {
    fn caption(&self, image: &RgbImage) -> Result<String, CaptionError>;
}

/// Turns captions and scene labels into fill prompts ("{surface}, seamless continuation, no objects").
pub trait PromptRules: Send + Sync {
    fn for_caption(&self, caption: &str) -> RulePrompt;
    fn for_labels(&self, labels: &[String]) -> RulePrompt;
    fn neutral(&self) -> RulePrompt;
}

/// Picks the prompt of `spec`. `crop` is only captioned when the spec names neither a prompt nor
/// labels; it is produced lazily so that no crop is made otherwise.
pub fn choose(
    spec: &InpaintJobSpec,
    rules: &dyn PromptRules,
    captioner: Option<&dyn Captioner>,
    crop: impl FnOnce() -> RgbImage,
) -> Prompt {
    match spec.prompt_source() {
        PromptSource::Explicit(text) => Prompt {
            text: text.to_string(),
            origin: PromptOrigin::Prompt,
            caption: None,
            surface: None,
            note: None,
        },
        PromptSource::SceneLabels(labels) => {
            let p = rules.for_labels(labels);
            let origin = if p.neutral {
                PromptOrigin::Fallback
            } else {
                PromptOrigin::SceneLabels
            };
            Prompt {
                text: p.prompt,
                origin,
                caption: None,
                surface: p.surface,
                note: p.note,
            }
        }
        PromptSource::Caption => {
            let Some(captioner) = captioner else {
                return neutral(rules, None, Some("no captioner loaded".into()));
            };
            match captioner.caption(&crop()) {
                Ok(caption) => {
                    let p = rules.for_caption(&caption);
                    Prompt {
                        text: p.prompt,
                        origin: if p.neutral {
                            PromptOrigin::Fallback
                        } else {
                            PromptOrigin::Caption
                        },
                        caption: Some(caption),
                        surface: p.surface,
                        note: p.note,
                    }
                }
                Err(e) => neutral(rules, None, Some(format!("captioning failed: {e}"))),
            }
        }
    }
}

fn neutral(rules: &dyn PromptRules, caption: Option<String>, note: Option<String>) -> Prompt {
    let p = rules.neutral();
    Prompt {
        text: p.prompt,
        origin: PromptOrigin::Fallback,
        caption,
        surface: p.surface,
        note: note.or(p.note),
    }
}
