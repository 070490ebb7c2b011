//! Fill prompt for the masked area: `"{surface}, seamless continuation, no objects"`.
//!
//! The surface comes from a Florence-2 caption of the crop around the mask, or from scene labels
//! (e.g. SAM3's) without captioning. Only words from fixed surface and modifier vocabularies can
//! reach the prompt, so the dog, the leash, people and other objects named in a caption never do.
//! When nothing usable is found the prompt falls back to a neutral surface and says why.

use pawfect_api::PromptOrigin;

/// What every prompt ends with.
pub const PROMPT_SUFFIX: &str = "seamless continuation, no objects";
/// Surface used when neither the caption nor the labels name one.
pub const NEUTRAL_SURFACE: &str = "matching background texture";
/// At most this many distinct surfaces go into one prompt.
const MAX_SURFACES: usize = 2;
/// At most this many modifiers are kept before a surface noun.
const MAX_MODIFIERS: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurfacePrompt {
    /// The full prompt for the fill model.
    pub prompt: String,
    /// The surface phrase, when one was found.
    pub surface: Option<String>,
    /// `Caption`, `SceneLabels`, or `Fallback` when no surface was found.
    pub source: PromptOrigin,
    /// Why a fallback was used (or what was ignored), for job status and logs.
    pub note: Option<String>,
}

/// Nouns that name a surface a leash can lie across.
const SURFACES: &[&str] = &[
    "grass",
    "lawn",
    "turf",
    "meadow",
    "field",
    "moss",
    "clover",
    "weeds",
    "hay",
    "straw",
    "concrete",
    "cement",
    "asphalt",
    "tarmac",
    "pavement",
    "sidewalk",
    "driveway",
    "road",
    "street",
    "path",
    "pathway",
    "trail",
    "walkway",
    "footpath",
    "floor",
    "flooring",
    "floorboards",
    "hardwood",
    "parquet",
    "laminate",
    "linoleum",
    "vinyl",
    "carpet",
    "rug",
    "tiles",
    "tile",
    "sand",
    "beach",
    "dune",
    "gravel",
    "pebbles",
    "stones",
    "rocks",
    "dirt",
    "soil",
    "earth",
    "mud",
    "ground",
    "leaves",
    "foliage",
    "mulch",
    "bark",
    "snow",
    "ice",
    "brick",
    "bricks",
    "cobblestone",
    "cobblestones",
    "stone",
    "marble",
    "granite",
    "slate",
    "wood",
    "planks",
    "boards",
    "deck",
    "decking",
    "patio",
    "porch",
    "terrace",
    "water",
    "lake",
    "pond",
    "river",
    "puddle",
    "sea",
    "ocean",
    "wall",
    "bedding",
    "blanket",
    "sheet",
    "sheets",
    "couch",
    "sofa",
    "bed",
    "cushion",
    "mat",
    "boardwalk",
    "pier",
    "dock",
    "court",
    "track",
];

/// Surface nouns too generic to beat a specific one.
const GENERIC: &[&str] = &[
    "ground", "floor", "flooring", "field", "road", "street", "path", "pathway", "wall", "earth",
];

/// Words that may precede a surface noun in the prompt: colours, textures, materials, states.
const MODIFIERS: &[&str] = &[
    "green",
    "brown",
    "gray",
    "grey",
    "white",
    "black",
    "red",
    "blue",
    "yellow",
    "orange",
    "beige",
    "tan",
    "golden",
    "pink",
    "purple",
    "dark",
    "light",
    "pale",
    "bright",
    "lush",
    "short",
    "long",
    "tall",
    "thick",
    "thin",
    "dry",
    "dead",
    "wet",
    "damp",
    "muddy",
    "sandy",
    "dusty",
    "rocky",
    "grassy",
    "leafy",
    "snowy",
    "icy",
    "frozen",
    "fresh",
    "freshly",
    "cut",
    "mowed",
    "mown",
    "trimmed",
    "patchy",
    "overgrown",
    "wild",
    "fallen",
    "autumn",
    "fall",
    "paved",
    "tiled",
    "wooden",
    "hardwood",
    "polished",
    "shiny",
    "glossy",
    "smooth",
    "rough",
    "cracked",
    "worn",
    "weathered",
    "old",
    "new",
    "clean",
    "dirty",
    "soft",
    "fluffy",
    "plush",
    "shaggy",
    "woven",
    "striped",
    "checkered",
    "patterned",
    "ceramic",
    "marble",
    "stone",
    "brick",
    "concrete",
    "cement",
    "asphalt",
    "gravel",
    "dirt",
    "sand",
    "wood",
    "oak",
    "pine",
    "terracotta",
    "cobblestone",
    "mossy",
    "calm",
    "shallow",
    "clear",
    "murky",
    "sunlit",
    "shaded",
    "shady",
    "textured",
    "speckled",
    "multicolored",
    "colorful",
    "beige-colored",
    "off-white",
    "hexagonal",
    "square",
    "large",
    "small",
    "crushed",
    "loose",
    "packed",
    "compacted",
    "sun-dappled",
    "pine-needle",
];

/// A surface noun directly followed by one of these names an object, not a surface
/// ("water bowl", "grass seed bag", "snow boots").
const OBJECT_HEADS: &[&str] = &[
    "bowl",
    "bottle",
    "dish",
    "toy",
    "toys",
    "can",
    "hose",
    "fountain",
    "glass",
    "cup",
    "jug",
    "ball",
    "bag",
    "bucket",
    "castle",
    "boots",
    "boot",
    "shoes",
    "lamp",
    "plant",
    "pot",
    "sprinkler",
    "heater",
    "mower",
    "sign",
    "pole",
    "post",
];

fn is(list: &[&str], w: &str) -> bool {
    list.contains(&w)
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '\''))
        .map(|w| w.trim_matches(|c| c == '-' || c == '\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// One surface found in a text.
struct Found {
    phrase: String,
    generic: bool,
    head: String,
}

/// Scans `text` for surface phrases: modifiers (possibly joined by "and") followed by one or more
/// surface nouns, e.g. "short green grass", "gray concrete sidewalk", "black and white tiles".
fn find_surfaces(text: &str) -> Vec<Found> {
    let w = words(text);
    let mut found: Vec<Found> = Vec::new();
    let mut i = 0;
    while i < w.len() {
        if !is(SURFACES, &w[i]) {
            i += 1;
            continue;
        }
        // extend over a compound of surface nouns ("concrete sidewalk", "dirt road")
        let mut end = i + 1;
        while end < w.len() && is(SURFACES, &w[end]) {
            end += 1;
        }
        if end < w.len() && is(OBJECT_HEADS, &w[end]) {
            i = end + 1;
            continue;
        }
        // modifiers immediately before, allowing "x and y" between two modifiers
        let mut start = i;
        let mut taken = 0;
        while start > 0 && taken < MAX_MODIFIERS {
            let prev = &w[start - 1];
            if is(MODIFIERS, prev) {
                start -= 1;
                taken += 1;
            } else if prev == "and" && start >= 2 && is(MODIFIERS, &w[start - 2]) && taken > 0 {
                start -= 2;
                taken += 1;
            } else {
                break;
            }
        }
        let phrase = w[start..end].join(" ");
        let head = w[end - 1].clone();
        let generic = w[i..end].iter().all(|n| is(GENERIC, n));
        if !found
            .iter()
            .any(|f| f.phrase == phrase || f.head == head && f.phrase.ends_with(&phrase))
        {
            found.push(Found {
                phrase,
                generic,
                head,
            });
        }
        i = end;
    }
    found
}

/// Picks up to two surfaces in order of appearance, specific ones only when there are any ("fresh
/// snow on the ground" → "fresh snow"); a phrase overlapping an already chosen one is skipped.
fn choose(found: Vec<Found>) -> Option<String> {
    let (specific, generic): (Vec<_>, Vec<_>) = found.into_iter().partition(|f| !f.generic);
    let pool = if specific.is_empty() {
        generic
    } else {
        specific
    };
    let mut chosen: Vec<String> = Vec::new();
    for f in pool {
        if chosen.len() == MAX_SURFACES {
            break;
        }
        if chosen
            .iter()
            .any(|c| c.contains(&f.phrase) || f.phrase.contains(c.as_str()))
        {
            continue;
        }
        chosen.push(f.phrase);
    }
    if chosen.is_empty() {
        None
    } else {
        Some(chosen.join(" and "))
    }
}

fn prompt_for(surface: &str) -> String {
    format!("{surface}, {PROMPT_SUFFIX}")
}

impl SurfacePrompt {
    /// The neutral prompt, for when no caption or labels are available.
    pub fn neutral() -> Self {
        Self {
            prompt: prompt_for(NEUTRAL_SURFACE),
            surface: None,
            source: PromptOrigin::Fallback,
            note: None,
        }
    }

    /// The neutral prompt with the reason it was used (e.g. captioning failed).
    pub fn neutral_because(reason: impl Into<String>) -> Self {
        Self {
            note: Some(reason.into()),
            ..Self::neutral()
        }
    }

    fn fallback(note: String) -> Self {
        Self::neutral_because(note)
    }

    /// Builds the prompt from a caption of the area around the mask.
    pub fn from_caption(caption: &str) -> Self {
        let caption = caption.trim();
        if caption.is_empty() {
            return Self::fallback("empty caption; neutral prompt".into());
        }
        match choose(find_surfaces(caption)) {
            Some(surface) => Self {
                prompt: prompt_for(&surface),
                surface: Some(surface),
                source: PromptOrigin::Caption,
                note: None,
            },
            None => Self::fallback(format!(
                "caption names no known surface ({caption:?}); neutral prompt"
            )),
        }
    }

    /// Builds the prompt from scene labels (e.g. from a segmentation model), keeping only the
    /// labels that name surfaces.
    pub fn from_labels(labels: &[String]) -> Self {
        let mut found = Vec::new();
        let mut ignored = Vec::new();
        for label in labels {
            let f = find_surfaces(label);
            if f.is_empty() {
                if !label.trim().is_empty() {
                    ignored.push(label.trim().to_string());
                }
            } else {
                found.extend(f);
            }
        }
        match choose(found) {
            Some(surface) => Self {
                prompt: prompt_for(&surface),
                surface: Some(surface),
                source: PromptOrigin::SceneLabels,
                note: if ignored.is_empty() {
                    None
                } else {
                    Some(format!(
                        "ignored non-surface labels: {}",
                        ignored.join(", ")
                    ))
                },
            },
            None if labels.is_empty() => Self::fallback("no scene labels; neutral prompt".into()),
            None => Self::fallback(format!(
                "no scene label names a surface ({}); neutral prompt",
                ignored.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words that must never reach a prompt.
    const FORBIDDEN: &[&str] = &[
        "dog", "dogs", "puppy", "leash", "lead", "collar", "harness", "person", "people", "man",
        "woman", "child", "boy", "girl", "hand", "owner", "cat", "car", "bench", "tree", "trees",
        "fence", "toy", "ball", "bowl", "shoes", "image", "shows", "leg", "legs", "sky",
        "building",
    ];

    fn surface_of(caption: &str) -> Option<String> {
        SurfacePrompt::from_caption(caption).surface
    }

    #[test]
    fn captions_to_surfaces() {
        let table: &[(&str, Option<&str>)] = &[
            (
                "The image shows a brown dog standing on green grass in a park.",
                Some("green grass"),
            ),
            (
                "A brown dog on a leash is walking on a concrete sidewalk next to a person.",
                Some("concrete sidewalk"),
            ),
            (
                "The image shows a small white puppy lying on a wooden floor in a living room.",
                Some("wooden floor"),
            ),
            (
                "A black and white dog is sitting on a red carpet with a blue leash attached to its collar.",
                Some("red carpet"),
            ),
            (
                "The dog is running across a sandy beach with the ocean in the background.",
                Some("sandy beach and ocean"),
            ),
            (
                "A golden retriever walks on gray asphalt with fallen leaves around it.",
                Some("gray asphalt and fallen leaves"),
            ),
            (
                "The image shows a cat sitting on black and white tiles in a kitchen.",
                Some("black and white tiles"),
            ),
            (
                "A man is holding the leash of a dog on a gravel path surrounded by trees.",
                Some("gravel path"),
            ),
            (
                "There is fresh white snow on the ground and the dog is wearing a red harness.",
                Some("fresh white snow"),
            ),
            (
                "A dog lies on a brick patio next to a wooden bench.",
                Some("brick patio"),
            ),
            (
                "The puppy is playing in the dirt near a water bowl.",
                Some("dirt"),
            ),
            (
                "A dog drinks from a water bowl on the kitchen floor.",
                Some("floor"),
            ),
            ("The image shows a close up of a dog's face.", None),
            ("A woman and her dog pose for a picture.", None),
            ("", None),
            (
                "A dog walks on the ground next to short dry grass.",
                Some("short dry grass"),
            ),
            (
                "The dog is standing on lush green lawn, its leash trailing behind.",
                Some("lush green lawn"),
            ),
            (
                "A person walks a dog on a leash across wet cobblestones.",
                Some("wet cobblestones"),
            ),
        ];
        for (caption, want) in table {
            assert_eq!(surface_of(caption).as_deref(), *want, "caption: {caption}");
        }
    }

    #[test]
    fn prompts_have_the_fixed_format_and_no_objects() {
        let captions = [
            "A brown dog on a red leash held by a man walks on a gray concrete sidewalk next to green grass.",
            "The image shows a dog with a leash, a child and a woman standing on a wooden deck near a fence.",
            "A person in blue shoes walks a puppy on a dirt trail with trees on both sides.",
            "Two dogs play with a ball on sandy beach while people watch.",
        ];
        for c in captions {
            let p = SurfacePrompt::from_caption(c);
            assert_eq!(p.source, PromptOrigin::Caption, "{c}");
            assert!(
                p.prompt.ends_with(", seamless continuation, no objects"),
                "{}",
                p.prompt
            );
            let surface = p.surface.clone().unwrap();
            assert_eq!(
                p.prompt,
                format!("{surface}, seamless continuation, no objects")
            );
            for w in words(&surface) {
                assert!(
                    !FORBIDDEN.contains(&w.as_str()),
                    "{w:?} leaked from {c:?} into {:?}",
                    p.prompt
                );
                assert!(
                    w == "and" || SURFACES.contains(&w.as_str()) || MODIFIERS.contains(&w.as_str()),
                    "{w}"
                );
            }
        }
    }

    #[test]
    fn unhelpful_captions_fall_back_and_say_so() {
        for c in [
            "",
            "   ",
            "A dog.",
            "The image shows a dog on a leash held by a person.",
            "<loc_5><loc_9>",
        ] {
            let p = SurfacePrompt::from_caption(c);
            assert_eq!(p.source, PromptOrigin::Fallback, "{c:?}");
            assert_eq!(p.prompt, SurfacePrompt::neutral().prompt);
            assert!(p.note.is_some(), "{c:?}");
            assert_eq!(p.surface, None);
        }
        assert_eq!(
            SurfacePrompt::neutral().prompt,
            "matching background texture, seamless continuation, no objects"
        );
        let p = SurfacePrompt::neutral_because("captioning failed: out of memory");
        assert_eq!(p.source, PromptOrigin::Fallback);
        assert_eq!(p.note.as_deref(), Some("captioning failed: out of memory"));
    }

    #[test]
    fn scene_labels_build_the_prompt() {
        let labels: Vec<String> = ["dog", "leash", "person", "grass", "sidewalk"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = SurfacePrompt::from_labels(&labels);
        assert_eq!(p.source, PromptOrigin::SceneLabels);
        assert_eq!(
            p.prompt,
            "grass and sidewalk, seamless continuation, no objects"
        );
        assert!(p.note.as_deref().unwrap().contains("dog"));
        let p = SurfacePrompt::from_labels(&["wooden floor".to_string()]);
        assert_eq!(p.prompt, "wooden floor, seamless continuation, no objects");
        assert_eq!(p.note, None);
        let p = SurfacePrompt::from_labels(&["dog".to_string(), "leash".to_string()]);
        assert_eq!(p.source, PromptOrigin::Fallback);
        assert!(p.note.unwrap().contains("dog, leash"));
        let p = SurfacePrompt::from_labels(&[]);
        assert_eq!(p.source, PromptOrigin::Fallback);
    }
}
