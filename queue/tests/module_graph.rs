//! The crate's module graph goes one way: keys, types and scripts at the bottom, then the
//! queue handle and the worker API, then the events reader (see `LAYERS`). A module may use
//! only modules of a lower layer, by their module path (`crate::types::…`), never through the
//! crate root's re-exports (`crate::Queue`), which would hide the edge. Test modules
//! (`#[cfg(test)] mod tests`) may use anything.

use std::collections::BTreeMap;
use std::path::Path;

/// Every module of `queue/src` (but `lib.rs`, the root) and its layer; a module may only use
/// modules of a strictly lower layer. A new module must be placed here.
const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("scripts", 0),
    ("keys", 1),
    ("reply", 1),
    ("config", 2),
    ("types", 2),
    ("queue", 3),
    ("acl", 4),
    ("worker", 4),
    ("events", 5),
    ("testing", 6),
];

/// The non-test part of a source file: everything before `#[cfg(test)]` + `mod tests`.
fn non_test_part(src: &str) -> String {
    let mut out = String::new();
    let mut lines = src.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The first path segment of every `crate::…` path in the code (comments skipped),
/// `use crate::{a::X, b}` giving `a` and `b`.
fn crate_paths(src: &str) -> Vec<String> {
    let code: String = src
        .lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        // Skip identifiers that merely end in `crate` (`pawfect_crate::`).
        let glued = rest[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[i + "crate::".len()..];
        if glued {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = matching_brace(group);
            for item in split_top_level(&group[..end]) {
                let seg = first_segment(item.trim());
                if !seg.is_empty() {
                    out.push(seg);
                }
            }
            rest = &group[end..];
        } else {
            out.push(first_segment(rest));
        }
    }
    out
}

fn matching_brace(s: &str) -> usize {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    s.len()
}

fn split_top_level(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn first_segment(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The violations of one module's source against `LAYERS`.
fn violations(module: &str, src: &str) -> Vec<String> {
    let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let Some(&own) = layers.get(module) else {
        return vec![format!("module {module} has no layer in LAYERS")];
    };
    let mut out = Vec::new();
    for target in crate_paths(&non_test_part(src)) {
        match layers.get(target.as_str()) {
            None => out.push(format!(
                "{module} uses crate::{target}: name the module the item lives in, not the crate root"
            )),
            Some(&t) if t >= own => out.push(format!(
                "{module} (layer {own}) uses crate::{target} (layer {t}): imports must point down"
            )),
            Some(_) => {}
        }
    }
    out
}

#[test]
fn every_import_points_down() {
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&src_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let module = path.file_stem().unwrap().to_str().unwrap().to_string();
        assert!(
            !path.with_extension("").is_dir(),
            "{module}/ has submodules: extend this test to walk them"
        );
        if module == "lib" {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        all.extend(violations(&module, &src));
        seen.push(module);
    }
    for (module, _) in LAYERS {
        assert!(
            seen.iter().any(|s| s == module),
            "LAYERS names {module}, which is not in src/"
        );
    }
    assert!(all.is_empty(), "module graph:\n{}", all.join("\n"));
}

/// The checker itself finds what it must (else the test above proves nothing).
#[test]
fn the_checker_sees_upward_and_root_imports() {
    let src = "//! docs naming [`Queue`](crate::Queue)\n\
        use crate::error::Result;\n\
        use crate::{\n    keys::field,\n    events::{EventsReader, to_json},\n};\n\
        fn f() { let _ = crate::worker::X; let _ = crate::Queue::new(); }\n\
        #[cfg(test)]\nmod tests {\n    use crate::testing::RedisServer;\n}\n";
    let v = violations("queue", src);
    assert_eq!(v.len(), 3, "{v:#?}");
    assert!(v[0].contains("crate::events"), "{v:#?}");
    assert!(v[1].contains("crate::worker"), "{v:#?}");
    assert!(v[2].contains("crate root"), "{v:#?}");
    assert!(violations("events", "use crate::queue::Queue;\n").is_empty());
    assert_eq!(violations("nowhere", "").len(), 1);
}
