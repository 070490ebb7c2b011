//! The object-store allow-list (`--allow-prefix`): which `s3://`, `gs://` and `az://`
//! locations jobs may read and write.
//!
//! Prefixes and job URIs are compared parsed, never as raw strings:
//!
//! - the scheme (`s3a://` counts as `s3://`, `azure://` as `az://`);
//! - the authority (bucket, container, or `container@account` for `abfs://`), exactly: a job
//!   URI whose authority differs in any way (`s3://bucket-evil`, `s3://x@bucket`, a port) does
//!   not match;
//! - the key as the store receives it (dot segments, plain or `%2e`-encoded, resolved by the
//!   URI parser; then object_store's `Path::from_url_path`: percent-decoded, split at `/`),
//!   below the prefix's key at a segment boundary: `s3://b/uploads` matches `s3://b/uploads`
//!   and `s3://b/uploads/x.png`, never `s3://b/uploads-evil/x.png`. A key with an empty
//!   segment (`//`) or a segment that decodes to `.`, `..` or holds a `/` (`%2F`) matches
//!   nothing, whatever the store would make of it.
//!
//! No prefix configured: every object-store URI is refused.

use std::fmt;

use object_store::path::Path as ObjectPath;
use url::Url;

/// The schemes an object-store prefix may name.
pub const OBJECT_SCHEMES: [&str; 7] = ["s3", "s3a", "gs", "az", "abfs", "abfss", "azure"];

/// One scheme per store (`s3a` is `s3`, `azure` is `az`).
fn canonical_scheme(scheme: &str) -> &str {
    match scheme {
        "s3a" => "s3",
        "azure" => "az",
        other => other,
    }
}

/// The authority of `url` as written (between `://` and the path): bucket, container, or
/// `container@account`, with any userinfo and port.
fn authority(url: &Url) -> &str {
    let start = url.scheme().len() + 3;
    let end = url::Position::BeforePath;
    url[..end].get(start..).unwrap_or("")
}

/// A key's segments as the store receives them; None when the key is not a plain path
/// (empty, `.` or `..` segments, or segments object_store refuses).
fn key_segments(url: &Url) -> Option<Vec<String>> {
    let raw = url.path();
    if raw.is_empty() || raw == "/" {
        return Some(Vec::new());
    }
    let trimmed = raw.strip_prefix('/').unwrap_or(raw);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    // Every raw segment must decode to a plain name: no `//`, no `.`/`..` (also encoded).
    for seg in trimmed.split('/') {
        let decoded = percent_decode(seg)?;
        if decoded.is_empty() || decoded == "." || decoded == ".." || decoded.contains('/') {
            return None;
        }
    }
    let path = ObjectPath::from_url_path(trimmed).ok()?;
    let parts: Vec<String> = path.parts().map(|p| p.as_ref().to_string()).collect();
    Some(parts)
}

/// `%xx` decoding; None for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An allowed object-store location: scheme, authority and key prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectPrefix {
    /// As given (for messages).
    text: String,
    scheme: String,
    authority: String,
    key: Vec<String>,
}

impl fmt::Display for ObjectPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for ObjectPrefix {
    type Err = String;

    /// `s3://bucket`, `s3://bucket/`, `gs://bucket/some/prefix/`; no query, fragment,
    /// userinfo (except `abfs://container@account`), port or relative segments.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?} is not an object-store prefix: {why}");
        // The parser would resolve dot segments; a prefix must say plainly what it allows.
        let raw_path = s
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map_or("", |(_, path)| path);
        let raw_path = raw_path.strip_suffix('/').unwrap_or(raw_path);
        if !raw_path.is_empty()
            && raw_path.split('/').any(|seg| {
                percent_decode(seg).is_none_or(|d| d.is_empty() || d == "." || d == "..")
            })
        {
            return Err(bad("empty, `.` or `..` path segments"));
        }
        let url = Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        if !OBJECT_SCHEMES.contains(&url.scheme()) {
            return Err(bad(
                "the scheme must be one of s3, s3a, gs, az, abfs, abfss, azure",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("no query or fragment"));
        }
        if url.port().is_some() {
            return Err(bad("no port"));
        }
        let abfs = matches!(url.scheme(), "abfs" | "abfss");
        if !abfs && (!url.username().is_empty() || url.password().is_some()) {
            return Err(bad("no user or password"));
        }
        let authority = authority(&url);
        if authority.is_empty() {
            return Err(bad("no bucket or container"));
        }
        let key = key_segments(&url).ok_or_else(|| bad("empty, `.` or `..` path segments"))?;
        Ok(ObjectPrefix {
            text: s.to_string(),
            scheme: canonical_scheme(url.scheme()).to_string(),
            authority: authority.to_string(),
            key,
        })
    }
}

impl ObjectPrefix {
    /// Whether the object `url` names lies at or below this prefix.
    pub fn contains(&self, url: &Url) -> bool {
        if canonical_scheme(url.scheme()) != self.scheme || authority(url) != self.authority {
            return false;
        }
        if url.query().is_some() || url.fragment().is_some() {
            return false;
        }
        match key_segments(url) {
            Some(key) => key.len() >= self.key.len() && key[..self.key.len()] == self.key[..],
            None => false,
        }
    }
}

/// The configured prefixes.
#[derive(Clone, Debug, Default)]
pub struct Prefixes {
    prefixes: Vec<ObjectPrefix>,
}

impl Prefixes {
    pub fn new(prefixes: Vec<ObjectPrefix>) -> Self {
        Prefixes { prefixes }
    }

    /// Whether some prefix holds the object `url` names.
    pub fn allows(&self, url: &Url) -> bool {
        self.prefixes.iter().any(|p| p.contains(url))
    }

    /// The list for an error message.
    pub fn describe(&self) -> String {
        if self.prefixes.is_empty() {
            "none configured: the pool's spec.worker.storage.allowedPrefixes (worker flag \
             --allow-prefix) names the buckets jobs may use"
                .to_string()
        } else {
            self.prefixes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// The identity of an object-store object, for comparing two URIs: scheme, authority, key.
pub(super) fn object_identity(url: &Url) -> Option<String> {
    let key = key_segments(url)?;
    Some(format!(
        "{}://{}/{}",
        canonical_scheme(url.scheme()),
        authority(url),
        key.join("/")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ObjectPrefix {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn prefixes_match_at_segment_boundaries_of_the_same_bucket() {
        let uploads = p("s3://photos/uploads/");
        let bare = p("s3://photos/uploads");
        let bucket = p("s3://photos");
        for (u, want_uploads, want_bucket) in [
            ("s3://photos/uploads/dog.jpg", true, true),
            ("s3://photos/uploads/a/b/c.png", true, true),
            ("s3a://photos/uploads/dog.jpg", true, true),
            ("s3://photos/uploads", true, true),
            ("s3://photos/uploads-evil/dog.jpg", false, true),
            ("s3://photos/uploadsx", false, true),
            ("s3://photos/other/dog.jpg", false, true),
            ("s3://photos-evil/uploads/dog.jpg", false, false),
            ("s3://photo/uploads/dog.jpg", false, false),
            ("s3://x@photos/uploads/dog.jpg", false, false),
            ("s3://photos:9000/uploads/dog.jpg", false, false),
            ("gs://photos/uploads/dog.jpg", false, false),
            ("az://photos/uploads/dog.jpg", false, false),
            // Dot segments, plain or encoded, are resolved when the URI is parsed (WHATWG):
            // what is checked is the object the store would be asked for.
            ("s3://photos/uploads/../secret.png", false, true),
            ("s3://photos/uploads/%2e%2e/secret.png", false, true),
            ("s3://photos/uploads/%2E%2E/secret.png", false, true),
            ("s3://photos/uploads/a/../../../secret.png", false, true),
            ("s3://photos/uploads/./dog.jpg", true, true),
            // Empty segments and encoded slashes match nothing.
            ("s3://photos/uploads//dog.jpg", false, false),
            ("s3://photos//uploads/dog.jpg", false, false),
            ("s3://photos/uploads%2F..%2Fsecret.png", false, false),
            ("s3://photos/uploads/dog.jpg?versionId=1", false, false),
        ] {
            let x = url(u);
            assert_eq!(
                uploads.contains(&x),
                want_uploads,
                "s3://photos/uploads/ ∋ {u}"
            );
            assert_eq!(bare.contains(&x), want_uploads, "s3://photos/uploads ∋ {u}");
            assert_eq!(bucket.contains(&x), want_bucket, "s3://photos ∋ {u}");
        }
        // An exact object.
        let one = p("gs://b/results/one.png");
        assert!(one.contains(&url("gs://b/results/one.png")));
        assert!(!one.contains(&url("gs://b/results/one.png.bak")));
        // Percent-encoded names are compared decoded, as the store receives them.
        let spaced = p("gs://b/my%20photos/");
        assert!(spaced.contains(&url("gs://b/my%20photos/x.png")));
        assert!(!spaced.contains(&url("gs://b/my/x.png")));
        // abfs names the account in the authority.
        let lake = p("abfss://media@acct.dfs.core.windows.net/pets/");
        assert!(lake.contains(&url("abfss://media@acct.dfs.core.windows.net/pets/x.png")));
        assert!(!lake.contains(&url("abfss://other@acct.dfs.core.windows.net/pets/x.png")));
    }

    #[test]
    fn bad_prefixes_are_refused_with_the_reason() {
        for (s, why) in [
            ("https://photos.example.com/", "scheme"),
            ("file:///data", "scheme"),
            ("s3://", "bucket"),
            ("s3://b/x?sig=1", "query"),
            ("s3://b/x#f", "fragment"),
            ("s3://user:pw@b/x", "user"),
            ("s3://b:9000/x", "port"),
            ("s3://b/a/../x", "segments"),
            ("s3://b/a//x", "segments"),
            ("s3://b/%2e%2e/x", "segments"),
            ("not a uri", "not an object-store prefix"),
        ] {
            let e = s.parse::<ObjectPrefix>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn none_configured_allows_nothing_and_says_how() {
        let none = Prefixes::default();
        assert!(!none.allows(&url("s3://photos/uploads/dog.jpg")));
        assert!(none.describe().contains("allowedPrefixes"));
        let two = Prefixes::new(vec![p("s3://a/in/"), p("gs://b")]);
        assert!(two.allows(&url("gs://b/x.png")));
        assert!(two.allows(&url("s3://a/in/x.png")));
        assert!(!two.allows(&url("s3://a/out/x.png")));
        assert_eq!(two.describe(), "s3://a/in/, gs://b");
    }

    #[test]
    fn identities_compare_what_the_store_would_address() {
        let id = |s| object_identity(&url(s));
        assert_eq!(id("s3://b/x.png"), id("s3a://b/x.png"));
        assert_eq!(id("gs://b/a%20b.png"), id("gs://b/a b.png"));
        assert_ne!(id("s3://b/x.png"), id("s3://c/x.png"));
        // Dot segments are resolved by the parser: the object the store would be asked for.
        assert_eq!(id("s3://b/a/../x.png"), id("s3://b/x.png"));
        assert_eq!(id("s3://b//x.png"), None);
    }
}
