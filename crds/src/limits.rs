//! The bounds of an [`InpaintJobSpec`], defined once: the CRD schema reads them (the
//! `schemars` attributes of the spec name these constants), and so does [`check_limits`],
//! which a worker runs on every claimed job. The API server enforces the schema only for
//! what goes through it; the queue is also written by other operator versions, by tools and
//! by hand, so a worker checks again before it runs anything.
//!
//! `crds/tests/schema.rs` proves the two agree: for every bound in the committed schema, a
//! spec at the bound passes both and one just past it fails both.

use std::fmt;

use crate::job::InpaintJobSpec;

/// Fewest denoising steps.
pub const STEPS_MIN: u32 = 1;
/// Most denoising steps.
pub const STEPS_MAX: u32 = 100;
/// Lowest guidance scale.
pub const GUIDANCE_SCALE_MIN: f64 = 0.0;
/// Highest guidance scale (FLUX.1-Fill-dev is run at 30).
pub const GUIDANCE_SCALE_MAX: f64 = 100.0;
/// Lowest First-Block Cache threshold (0: every step computed).
pub const CACHE_THRESHOLD_MIN: f64 = 0.0;
/// Highest First-Block Cache threshold: a relative change of 1 is as large as the residual
/// itself; at that point every step after the first is skipped on real weights, and the image is
/// the first step's prediction.
pub const CACHE_THRESHOLD_MAX: f64 = 1.0;
/// Largest seed: 2⁵³ − 1, the largest integer every JSON client (JavaScript, `kubectl`'s
/// float64 path) carries exactly, so a seed read back from a status or a log reproduces the run.
pub const SEED_MAX: u64 = (1 << 53) - 1;
/// Fewest attempts (the first included).
pub const MAX_ATTEMPTS_MIN: u32 = 1;
/// Most attempts.
pub const MAX_ATTEMPTS_MAX: u32 = 20;
/// Shortest timeout, seconds.
pub const TIMEOUT_SECONDS_MIN: u64 = 1;
/// Longest timeout, seconds (a day).
pub const TIMEOUT_SECONDS_MAX: u64 = 86_400;
/// Shortest pool name.
pub const POOL_LEN_MIN: u32 = 1;
/// Longest pool name (a Kubernetes name label).
pub const POOL_LEN_MAX: u32 = 63;
/// Shortest `image`, `mask` and `output` URI.
pub const URI_LEN_MIN: u32 = 1;
/// Longest `prompt`, characters: T5-XXL reads at most 512 tokens and its SentencePiece tokens
/// average about 4 characters of English, so 2048 characters is all of a prompt the model uses.
pub const PROMPT_LEN_MAX: u32 = 2048;
/// Most `sceneLabels`: the labels become one prompt that CLIP-L reads in 77 tokens, which 32
/// surface names (one to three tokens each) already overfill.
pub const SCENE_LABELS_MAX: u32 = 32;
/// Longest scene label, characters: a surface name of a few words ("weathered wooden deck"),
/// and 64 characters are about 16 tokens, a fifth of CLIP-L's 77.
pub const SCENE_LABEL_LEN_MAX: u32 = 64;

/// One spec field outside its bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field as the API names it (`steps`, `guidanceScale`, …).
    pub field: &'static str,
    /// The value found (strings: their length).
    pub value: String,
    /// The bound it breaks, e.g. `1 ≤ steps ≤ 100`.
    pub bound: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spec.{} = {} is outside {}",
            self.field, self.value, self.bound
        )
    }
}

/// A spec outside the CRD's bounds: every field that is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitError {
    pub violations: Vec<Violation>,
}

impl std::error::Error for LimitError {}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

/// Checks a spec against the bounds of the CRD schema (the constants of this module).
pub fn check_limits(spec: &InpaintJobSpec) -> Result<(), LimitError> {
    let mut violations = Vec::new();
    let mut range = |field: &'static str, ok: bool, value: String, min: String, max: String| {
        if !ok {
            violations.push(Violation {
                field,
                value,
                bound: format!("{min} ≤ {field} ≤ {max}"),
            });
        }
    };
    range(
        "steps",
        (STEPS_MIN..=STEPS_MAX).contains(&spec.steps),
        spec.steps.to_string(),
        STEPS_MIN.to_string(),
        STEPS_MAX.to_string(),
    );
    // NaN is outside every range (and JSON cannot carry it, but a caller's struct can).
    range(
        "guidanceScale",
        (GUIDANCE_SCALE_MIN..=GUIDANCE_SCALE_MAX).contains(&spec.guidance_scale),
        spec.guidance_scale.to_string(),
        format!("{GUIDANCE_SCALE_MIN:?}"),
        format!("{GUIDANCE_SCALE_MAX:?}"),
    );
    if let Some(cache) = &spec.cache {
        range(
            "cache.threshold",
            (CACHE_THRESHOLD_MIN..=CACHE_THRESHOLD_MAX).contains(&cache.threshold),
            cache.threshold.to_string(),
            format!("{CACHE_THRESHOLD_MIN:?}"),
            format!("{CACHE_THRESHOLD_MAX:?}"),
        );
    }
    if let Some(seed) = spec.seed {
        range(
            "seed",
            seed <= SEED_MAX,
            seed.to_string(),
            "0".into(),
            SEED_MAX.to_string(),
        );
    }
    range(
        "maxAttempts",
        (MAX_ATTEMPTS_MIN..=MAX_ATTEMPTS_MAX).contains(&spec.max_attempts),
        spec.max_attempts.to_string(),
        MAX_ATTEMPTS_MIN.to_string(),
        MAX_ATTEMPTS_MAX.to_string(),
    );
    range(
        "timeoutSeconds",
        (TIMEOUT_SECONDS_MIN..=TIMEOUT_SECONDS_MAX).contains(&spec.timeout_seconds),
        spec.timeout_seconds.to_string(),
        TIMEOUT_SECONDS_MIN.to_string(),
        TIMEOUT_SECONDS_MAX.to_string(),
    );
    let mut length = |field: &'static str, s: &str, min: u32, max: Option<u32>| {
        // JSON Schema lengths count characters (code points), not bytes.
        let n = s.chars().count() as u64;
        if n < u64::from(min) || max.is_some_and(|m| n > u64::from(m)) {
            let bound = match max {
                Some(m) => format!("{min} ≤ length ≤ {m}"),
                None => format!("length ≥ {min}"),
            };
            violations.push(Violation {
                field,
                value: format!("a string of length {n}"),
                bound,
            });
        }
    };
    length("image", &spec.image, URI_LEN_MIN, None);
    length("mask", &spec.mask, URI_LEN_MIN, None);
    length("output", &spec.output, URI_LEN_MIN, None);
    length("pool", &spec.pool, POOL_LEN_MIN, Some(POOL_LEN_MAX));
    if let Some(prompt) = &spec.prompt {
        length("prompt", prompt, 0, Some(PROMPT_LEN_MAX));
    }
    let labels = spec.scene_labels.as_deref().unwrap_or_default();
    // The first label too long stands for all of them (the message stays short).
    if let Some(long) = labels
        .iter()
        .find(|l| l.chars().count() as u64 > u64::from(SCENE_LABEL_LEN_MAX))
    {
        length("sceneLabels", long, 0, Some(SCENE_LABEL_LEN_MAX));
    }
    if labels.len() as u64 > u64::from(SCENE_LABELS_MAX) {
        violations.push(Violation {
            field: "sceneLabels",
            value: format!("a list of {} labels", labels.len()),
            bound: format!("at most {SCENE_LABELS_MAX} items"),
        });
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(LimitError { violations })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> InpaintJobSpec {
        let mut v = serde_json::json!({
            "image": "s3://b/dog.jpg", "mask": "s3://b/mask.png", "output": "s3://b/out.png"
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_are_within_the_limits() {
        assert_eq!(check_limits(&spec(serde_json::json!({}))), Ok(()));
    }

    /// The values fault injection ran to success before workers checked them.
    #[test]
    fn out_of_range_values_are_named() {
        for (extra, field) in [
            (serde_json::json!({"steps": 0}), "steps"),
            (serde_json::json!({"guidanceScale": 1e300}), "guidanceScale"),
            (serde_json::json!({"seed": u64::MAX}), "seed"),
            (serde_json::json!({"maxAttempts": 0}), "maxAttempts"),
            (
                serde_json::json!({"timeoutSeconds": 86_401}),
                "timeoutSeconds",
            ),
            (serde_json::json!({"pool": "p".repeat(64)}), "pool"),
            (serde_json::json!({"image": ""}), "image"),
            (
                serde_json::json!({"prompt": "p".repeat(PROMPT_LEN_MAX as usize + 1)}),
                "prompt",
            ),
            (
                serde_json::json!({"sceneLabels": vec!["grass"; SCENE_LABELS_MAX as usize + 1]}),
                "sceneLabels",
            ),
            (
                serde_json::json!({"sceneLabels": ["grass", "g".repeat(SCENE_LABEL_LEN_MAX as usize + 1)]}),
                "sceneLabels",
            ),
        ] {
            let err = check_limits(&spec(extra.clone())).unwrap_err();
            assert_eq!(err.violations.len(), 1, "{extra}: {err}");
            assert_eq!(err.violations[0].field, field, "{extra}: {err}");
            assert!(
                err.to_string().starts_with(&format!("spec.{field} = ")),
                "{err}"
            );
        }
        let mut s = spec(serde_json::json!({"steps": 101, "seed": SEED_MAX + 1}));
        s.guidance_scale = f64::NAN;
        let err = check_limits(&s).unwrap_err();
        let fields: Vec<_> = err.violations.iter().map(|v| v.field).collect();
        assert_eq!(fields, ["steps", "guidanceScale", "seed"], "{err}");
        assert_eq!(
            err.violations[0].to_string(),
            "spec.steps = 101 is outside 1 ≤ steps ≤ 100"
        );
    }

    #[test]
    fn bounds_are_inclusive() {
        let s = spec(serde_json::json!({
            "steps": STEPS_MAX, "guidanceScale": GUIDANCE_SCALE_MIN, "seed": SEED_MAX,
            "cache": {"threshold": CACHE_THRESHOLD_MAX},
            "maxAttempts": MAX_ATTEMPTS_MAX, "timeoutSeconds": TIMEOUT_SECONDS_MIN,
            "pool": "é".repeat(POOL_LEN_MAX as usize),
            "prompt": "é".repeat(PROMPT_LEN_MAX as usize),
            "sceneLabels": vec!["é".repeat(SCENE_LABEL_LEN_MAX as usize); SCENE_LABELS_MAX as usize],
        }));
        assert_eq!(check_limits(&s), Ok(()));
    }
}
