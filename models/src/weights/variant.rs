//! `PAWFECT_MODEL_VARIANT` → the GGUF files that serve it.
//!
//! One table decides which quantisation tags a variant accepts, in order of preference. The
//! fallbacks are the nearest published quant of the same bit width (no public repository has a
//! FLUX.1-Fill-dev `Q5_K_M`, several have `Q5_K_S`). Both the downloader (choosing among a
//! repository's file list) and the loader (choosing among files on disk) go through
//! [`choose_gguf`], so they agree on the file.

/// A FLUX.1-Fill-dev weight variant: a GGUF quantisation of the transformer, or the full `bf16`
/// checkpoint. The worker maps the API's `ModelVariant` (the CRD's `spec.worker.modelVariant`) onto
/// this enum at its adapter, so the models library does not depend on the Kubernetes types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ModelVariant {
    Q4_0,
    Q4KM,
    #[default]
    Q5KM,
    Q8_0,
    Bf16,
}

impl ModelVariant {
    /// Every variant, smallest first.
    pub const ALL: [ModelVariant; 5] = [
        ModelVariant::Q4_0,
        ModelVariant::Q4KM,
        ModelVariant::Q5KM,
        ModelVariant::Q8_0,
        ModelVariant::Bf16,
    ];

    /// The name used on the command line and in the CRD (`q5_k_m`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelVariant::Q4_0 => "q4_0",
            ModelVariant::Q4KM => "q4_k_m",
            ModelVariant::Q5KM => "q5_k_m",
            ModelVariant::Q8_0 => "q8_0",
            ModelVariant::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for ModelVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ModelVariant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelVariant::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = ModelVariant::ALL.iter().map(|v| v.as_str()).collect();
                format!("unknown model variant {s:?} (one of: {})", names.join(", "))
            })
    }
}

/// GGUF tags accepted for `variant`'s FLUX transformer, best first; empty for `bf16` (the
/// diffusers or BFL weights, no GGUF).
pub fn gguf_tags(variant: ModelVariant) -> &'static [&'static str] {
    match variant {
        ModelVariant::Q5KM => &["Q5_K_M", "Q5_K_S"],
        ModelVariant::Q4KM => &["Q4_K_M", "Q4_K_S"],
        ModelVariant::Q4_0 => &["Q4_0"],
        ModelVariant::Q8_0 => &["Q8_0"],
        ModelVariant::Bf16 => &[],
    }
}

/// GGUF tags accepted for the T5-XXL encoder of `variant`: the transformer's tags, then `Q8_0`
/// (published for every T5 GGUF; `bf16` also gets `Q8_0`, for when a GGUF T5 is asked for).
pub fn t5_tags(variant: ModelVariant) -> Vec<&'static str> {
    let mut tags = gguf_tags(variant).to_vec();
    if !tags.contains(&"Q8_0") {
        tags.push("Q8_0");
    }
    tags
}

/// Quantisation tags, most precise first (for picking "the largest precision" among files).
const PRECISION_ORDER: &[&str] = &[
    "F32", "BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
    "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
];

fn is_sep(c: Option<char>) -> bool {
    matches!(c, None | Some('-' | '_' | '.' | '/'))
}

/// Whether file `name` carries quantisation `tag` (case-insensitive) as a whole token: after the
/// start or `-`/`_`/`.`/`/`, and before the end or `-`/`.` (so `Q5_K` is not found in `Q5_K_M`,
/// nor `Q4_0` in `IQ4_0`).
pub fn has_tag(name: &str, tag: &str) -> bool {
    let up = name.to_ascii_uppercase();
    let tag = tag.to_ascii_uppercase();
    let mut from = 0;
    while let Some(i) = up[from..].find(&tag) {
        let start = from + i;
        let end = start + tag.len();
        let before = up[..start].chars().next_back();
        let after = up[end..].chars().next();
        if is_sep(before) && matches!(after, None | Some('-' | '.')) {
            return true;
        }
        from = start + 1;
    }
    false
}

/// The most precise known tag in `name` (`None` when it has none of them).
pub fn precision_of(name: &str) -> Option<&'static str> {
    PRECISION_ORDER.iter().copied().find(|t| has_tag(name, t))
}

fn precision_rank(name: &str) -> usize {
    precision_of(name)
        .and_then(|t| PRECISION_ORDER.iter().position(|x| *x == t))
        .unwrap_or(PRECISION_ORDER.len())
}

/// Whether `name` (a path or file name) is a FLUX.1-Fill-dev GGUF transformer.
pub fn is_fill_gguf(name: &str) -> bool {
    let base = base_name(name).to_ascii_lowercase();
    base.ends_with(".gguf") && base.contains("fill") && !is_t5_gguf(name)
}

/// Whether `name` is a T5-XXL encoder GGUF (`t5*xxl*encoder*.gguf`).
pub fn is_t5_gguf(name: &str) -> bool {
    let base = base_name(name).to_ascii_lowercase();
    let Some(rest) = base.strip_prefix("t5") else {
        return false;
    };
    let Some(i) = rest.find("xxl") else {
        return false;
    };
    let rest = &rest[i + 3..];
    match rest.find("encoder") {
        Some(j) => rest[j + 7..].ends_with(".gguf"),
        None => false,
    }
}

fn base_name(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// The chosen file and how it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufChoice {
    /// The name as given (a repository path or a file name).
    pub name: String,
    /// The tag it carries.
    pub tag: &'static str,
    /// The preferred tag; differs from `tag` when a fallback was taken.
    pub wanted: &'static str,
}

impl GgufChoice {
    pub fn is_fallback(&self) -> bool {
        self.tag != self.wanted
    }

    /// A line for logs and summaries.
    pub fn describe(&self) -> String {
        if self.is_fallback() {
            format!(
                "{} ({} instead of {}: none published)",
                self.name, self.tag, self.wanted
            )
        } else {
            self.name.clone()
        }
    }
}

/// No file carries any accepted tag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no {what} GGUF tagged {} among: {}", .wanted.join(" or "), list_or_none(.available))]
pub struct NoGgufMatch {
    pub what: &'static str,
    pub wanted: Vec<&'static str>,
    /// The candidates that were looked at (GGUF files of the right kind), sorted.
    pub available: Vec<String>,
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(", ")
    }
}

/// Which kind of GGUF to pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufKind {
    /// The FLUX.1-Fill-dev transformer (name contains `fill`).
    FluxFill,
    /// The T5-XXL encoder (`t5*xxl*encoder*.gguf`).
    T5Encoder,
}

impl GgufKind {
    fn accepts(self, name: &str) -> bool {
        match self {
            GgufKind::FluxFill => is_fill_gguf(name),
            GgufKind::T5Encoder => is_t5_gguf(name),
        }
    }
    fn what(self) -> &'static str {
        match self {
            GgufKind::FluxFill => "FLUX.1-Fill-dev",
            GgufKind::T5Encoder => "T5-XXL encoder",
        }
    }
}

/// Picks among `names` the `kind` GGUF with the first tag of `tags` that any of them carries.
/// Ties (several files with that tag) go to the shallowest path, then the shortest name, then
/// the first in byte order, so the choice never depends on listing order.
pub fn choose_gguf<S: AsRef<str>>(
    names: &[S],
    kind: GgufKind,
    tags: &[&'static str],
) -> Result<GgufChoice, NoGgufMatch> {
    let mut candidates: Vec<&str> = names
        .iter()
        .map(AsRef::as_ref)
        .filter(|n| kind.accepts(n))
        .collect();
    candidates.sort_by_key(|n| (n.matches('/').count(), n.len(), n.to_string()));
    candidates.dedup();
    for tag in tags {
        if let Some(n) = candidates.iter().find(|n| has_tag(n, tag)) {
            return Ok(GgufChoice {
                name: n.to_string(),
                tag,
                wanted: tags.first().copied().unwrap_or(tag),
            });
        }
    }
    let mut available: Vec<String> = candidates.iter().map(|s| s.to_string()).collect();
    available.sort();
    Err(NoGgufMatch {
        what: kind.what(),
        wanted: tags.to_vec(),
        available,
    })
}

/// Picks a T5 encoder GGUF on disk: the variant's tags first (when a variant is given), else the
/// most precise one (ties as in [`choose_gguf`]). `None` when there is none.
pub fn choose_t5_on_disk<S: AsRef<str>>(
    names: &[S],
    variant: Option<ModelVariant>,
) -> Option<GgufChoice> {
    if let Some(v) = variant
        && let Ok(c) = choose_gguf(names, GgufKind::T5Encoder, &t5_tags(v))
    {
        return Some(c);
    }
    let mut t5: Vec<&str> = names
        .iter()
        .map(AsRef::as_ref)
        .filter(|n| is_t5_gguf(n))
        .collect();
    t5.sort_by_key(|n| {
        (
            precision_rank(n),
            n.matches('/').count(),
            n.len(),
            n.to_string(),
        )
    });
    let best = t5.first()?;
    let tag = precision_of(best).unwrap_or("unknown");
    let wanted = variant
        .and_then(|v| t5_tags(v).first().copied())
        .unwrap_or(tag);
    Some(GgufChoice {
        name: best.to_string(),
        tag,
        wanted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const YARVIX: &[&str] = &[
        ".gitattributes",
        "README.md",
        "flux1-fill-dev-Q3_K_S.gguf",
        "flux1-fill-dev-Q4_0.gguf",
        "flux1-fill-dev-Q4_1.gguf",
        "flux1-fill-dev-Q4_K_S.gguf",
        "flux1-fill-dev-Q5_0.gguf",
        "flux1-fill-dev-Q5_1.gguf",
        "flux1-fill-dev-Q5_K_S.gguf",
        "flux1-fill-dev-Q6_K.gguf",
        "flux1-fill-dev-Q8_0.gguf",
    ];
    const SPORKY: &[&str] = &[
        "README.md",
        "flux1-fill-dev-fp16-Q4_0-GGUF.gguf",
        "flux1-fill-dev-fp16-Q5_0-GGUF.gguf",
        "flux1-fill-dev-fp16-Q8_0-GGUF.gguf",
        "flux1-fill-dev-fp16-F16-GGUF.gguf",
    ];
    const CITY96: &[&str] = &[
        "t5-v1_1-xxl-encoder-Q3_K_S.gguf",
        "t5-v1_1-xxl-encoder-Q3_K_M.gguf",
        "t5-v1_1-xxl-encoder-Q3_K_L.gguf",
        "t5-v1_1-xxl-encoder-Q4_K_S.gguf",
        "t5-v1_1-xxl-encoder-Q4_K_M.gguf",
        "t5-v1_1-xxl-encoder-Q5_K_S.gguf",
        "t5-v1_1-xxl-encoder-Q5_K_M.gguf",
        "t5-v1_1-xxl-encoder-Q6_K.gguf",
        "t5-v1_1-xxl-encoder-Q8_0.gguf",
        "t5-v1_1-xxl-encoder-f16.gguf",
        "t5-v1_1-xxl-encoder-f32.gguf",
    ];

    fn pick(names: &[&str], v: ModelVariant) -> Result<(String, &'static str, bool), NoGgufMatch> {
        choose_gguf(names, GgufKind::FluxFill, gguf_tags(v))
            .map(|c| (c.name.clone(), c.tag, c.is_fallback()))
    }

    /// (repo listing, variant, expected (file, tag, fallback taken) or no match)
    type Row<'a> = (
        &'a [&'a str],
        ModelVariant,
        Option<(&'a str, &'a str, bool)>,
    );

    #[test]
    fn transformer_choice_table() {
        use ModelVariant::*;
        let table: &[Row] = &[
            (
                YARVIX,
                Q5KM,
                Some(("flux1-fill-dev-Q5_K_S.gguf", "Q5_K_S", true)),
            ),
            (
                YARVIX,
                Q4KM,
                Some(("flux1-fill-dev-Q4_K_S.gguf", "Q4_K_S", true)),
            ),
            (
                YARVIX,
                Q4_0,
                Some(("flux1-fill-dev-Q4_0.gguf", "Q4_0", false)),
            ),
            (
                YARVIX,
                Q8_0,
                Some(("flux1-fill-dev-Q8_0.gguf", "Q8_0", false)),
            ),
            (
                SPORKY,
                Q4_0,
                Some(("flux1-fill-dev-fp16-Q4_0-GGUF.gguf", "Q4_0", false)),
            ),
            (
                SPORKY,
                Q8_0,
                Some(("flux1-fill-dev-fp16-Q8_0-GGUF.gguf", "Q8_0", false)),
            ),
            (SPORKY, Q5KM, None),
            (SPORKY, Q4KM, None),
            (
                &["flux1-fill-dev-Q5_K_M.gguf", "flux1-fill-dev-Q5_K_S.gguf"],
                Q5KM,
                Some(("flux1-fill-dev-Q5_K_M.gguf", "Q5_K_M", false)),
            ),
            // Case does not matter.
            (
                &["FLUX1-FILL-DEV-q5_k_m.GGUF"],
                Q5KM,
                Some(("FLUX1-FILL-DEV-q5_k_m.GGUF", "Q5_K_M", false)),
            ),
            // Non-Fill FLUX and T5 files are never the transformer.
            (
                &["flux1-dev-Q8_0.gguf", "t5-v1_1-xxl-encoder-Q8_0.gguf"],
                Q8_0,
                None,
            ),
            // Q5_K is not Q5_K_M / Q5_K_S; IQ4 is not Q4.
            (
                &["flux1-fill-dev-Q5_K.gguf", "flux1-fill-dev-IQ4_0.gguf"],
                Q5KM,
                None,
            ),
            (&["flux1-fill-dev-IQ4_0.gguf"], Q4_0, None),
            // Ties: shallowest, then shortest, then byte order — never listing order.
            (
                &[
                    "sub/flux1-fill-dev-Q8_0.gguf",
                    "flux1-fill-dev-fp16-Q8_0-GGUF.gguf",
                    "flux1-fill-dev-Q8_0.gguf",
                ],
                Q8_0,
                Some(("flux1-fill-dev-Q8_0.gguf", "Q8_0", false)),
            ),
            (
                &["flux1-fill-dev_Q8_0.gguf", "flux1-fill-dev-Q8_0.gguf"],
                Q8_0,
                Some(("flux1-fill-dev-Q8_0.gguf", "Q8_0", false)),
            ),
            (YARVIX, Bf16, None),
        ];
        for (names, v, want) in table {
            let got = pick(names, *v);
            match want {
                Some((n, t, fb)) => {
                    assert_eq!(got, Ok((n.to_string(), *t, *fb)), "{v:?} in {names:?}")
                }
                None => assert!(got.is_err(), "{v:?} in {names:?}: {got:?}"),
            }
        }
        let mut reversed = YARVIX.to_vec();
        reversed.reverse();
        assert_eq!(pick(&reversed, Q5KM), pick(YARVIX, Q5KM));
    }

    #[test]
    fn no_match_lists_what_the_repo_has() {
        let e = choose_gguf(SPORKY, GgufKind::FluxFill, gguf_tags(ModelVariant::Q5KM))
            .expect_err("no Q5_K");
        let msg = e.to_string();
        assert!(msg.contains("Q5_K_M or Q5_K_S"), "{msg}");
        for f in &SPORKY[1..] {
            assert!(msg.contains(f), "{f} not in {msg}");
        }
        assert!(!msg.contains("README"), "{msg}");
        let e = choose_gguf(&["README.md"], GgufKind::FluxFill, &["Q8_0"]).expect_err("empty");
        assert!(e.to_string().contains("(none)"), "{e}");
    }

    #[test]
    fn t5_tags_end_with_q8_0() {
        assert_eq!(t5_tags(ModelVariant::Q5KM), ["Q5_K_M", "Q5_K_S", "Q8_0"]);
        assert_eq!(t5_tags(ModelVariant::Q4_0), ["Q4_0", "Q8_0"]);
        assert_eq!(t5_tags(ModelVariant::Q8_0), ["Q8_0"]);
        assert_eq!(t5_tags(ModelVariant::Bf16), ["Q8_0"]);
        let c = choose_gguf(CITY96, GgufKind::T5Encoder, &t5_tags(ModelVariant::Q5KM)).unwrap();
        assert_eq!(
            (c.name.as_str(), c.is_fallback()),
            ("t5-v1_1-xxl-encoder-Q5_K_M.gguf", false)
        );
        let c = choose_gguf(CITY96, GgufKind::T5Encoder, &t5_tags(ModelVariant::Q4_0)).unwrap();
        assert_eq!(
            (c.name.as_str(), c.tag),
            ("t5-v1_1-xxl-encoder-Q8_0.gguf", "Q8_0")
        );
        assert!(c.is_fallback());
    }

    #[test]
    fn t5_on_disk_table() {
        use ModelVariant::*;
        let table: &[(&[&str], Option<ModelVariant>, Option<&str>)] = &[
            (CITY96, Some(Q5KM), Some("t5-v1_1-xxl-encoder-Q5_K_M.gguf")),
            (CITY96, Some(Q4KM), Some("t5-v1_1-xxl-encoder-Q4_K_M.gguf")),
            // No variant: the most precise.
            (CITY96, None, Some("t5-v1_1-xxl-encoder-f32.gguf")),
            // The variant's tags missing: the most precise there is.
            (
                &[
                    "t5-v1_1-xxl-encoder-Q3_K_S.gguf",
                    "t5-v1_1-xxl-encoder-Q6_K.gguf",
                ],
                Some(Q5KM),
                Some("t5-v1_1-xxl-encoder-Q6_K.gguf"),
            ),
            (
                &["t5-v1_1-xxl-encoder-Q4_0.gguf", "t5_xxl_encoder_q8_0.gguf"],
                Some(Q4_0),
                Some("t5-v1_1-xxl-encoder-Q4_0.gguf"),
            ),
            // Unknown precision ranks last; ties by name.
            (
                &["t5-xxl-encoder-b.gguf", "t5-xxl-encoder-a.gguf"],
                None,
                Some("t5-xxl-encoder-a.gguf"),
            ),
            (
                &[
                    "flux1-fill-dev-Q8_0.gguf",
                    "t5xxl_fp16.safetensors",
                    "t5-base-encoder-Q8_0.gguf",
                ],
                None,
                None,
            ),
        ];
        for (names, v, want) in table {
            let got = choose_t5_on_disk(names, *v).map(|c| c.name);
            assert_eq!(got.as_deref(), *want, "{v:?} in {names:?}");
        }
    }

    #[test]
    fn name_patterns() {
        assert!(is_t5_gguf("t5-v1_1-xxl-encoder-Q8_0.gguf"));
        assert!(is_t5_gguf("T5XXL_ENCODER.GGUF"));
        assert!(is_t5_gguf("sub/t5-xxl-encoder.gguf"));
        assert!(!is_t5_gguf("t5-v1_1-xxl-encoder-Q8_0.safetensors"));
        assert!(!is_t5_gguf("my-t5-xxl-encoder.gguf"));
        assert!(is_fill_gguf("flux1-fill-dev-Q8_0.gguf"));
        assert!(!is_fill_gguf("flux1-fill-dev-Q8_0.gguf.part"));
        assert!(has_tag("a-q4_k_s.gguf", "Q4_K_S"));
        assert!(!has_tag("a-Q4_K_S.gguf", "Q4_K"));
        assert_eq!(precision_of("t5-v1_1-xxl-encoder-f16.gguf"), Some("F16"));
        assert_eq!(
            precision_of("flux1-fill-dev-fp16-Q8_0-GGUF.gguf"),
            Some("Q8_0")
        );
    }
}
