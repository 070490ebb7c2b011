//! Credentials out of what is logged and shown: [`redact_uri`] takes a URI, or any text with
//! URIs in it (an error message), and replaces what may carry a secret — the query string
//! (pre-signed URLs put their signature there), the fragment, and a `user:password@` in the
//! authority — with [`REDACTED`]. The worker applies it to every URI it logs and to every
//! failure message it reports; the operator applies it again to what it writes into a job's
//! status and Events, since the queue is also written by other versions and by hand.

/// What stands in place of a removed secret.
pub const REDACTED: &str = "REDACTED";

/// `text` with the query, the fragment and the userinfo of every `scheme://` URI in it
/// replaced by [`REDACTED`]; everything else (scheme, host, path, the text around) is kept.
///
/// ```
/// use pawfect_api::redact_uri;
/// assert_eq!(
///     redact_uri("https://u:p@b.s3.amazonaws.com/dog.jpg?X-Amz-Signature=abc"),
///     "https://REDACTED@b.s3.amazonaws.com/dog.jpg?REDACTED"
/// );
/// assert_eq!(redact_uri("s3://b/dog.jpg"), "s3://b/dog.jpg");
/// ```
pub fn redact_uri(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        // The scheme: the letters, digits, `+`, `-` and `.` right before `://`, starting with a
        // letter (RFC 3986 §3.1). Without one, `://` is plain text.
        let head = &rest[..at];
        let scheme_start = head
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map(|(i, _)| i);
        let scheme_start = scheme_start.and_then(|i| {
            // Skip leading non-letters (`1.s3://` is not a scheme starting at `1`).
            head[i..]
                .char_indices()
                .find(|(_, c)| c.is_ascii_alphabetic())
                .map(|(j, _)| i + j)
        });
        let Some(start) = scheme_start else {
            out.push_str(&rest[..at + 3]);
            rest = &rest[at + 3..];
            continue;
        };
        out.push_str(&rest[..start]);
        // The URI runs to the first character no URI holds unescaped (whitespace, quotes,
        // angle brackets, backslash); trailing punctuation of the sentence stays outside it.
        let after = &rest[at + 3..];
        let len = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | '\\'))
            .unwrap_or(after.len());
        let mut end = at + 3 + len;
        while end > at + 3 && rest[..end].ends_with([':', ',', '.', ';', ')', ']', '}']) {
            end -= 1;
        }
        out.push_str(&redact_one(&rest[start..at + 3], &rest[at + 3..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// `scheme` is `s3://`; `body` what follows, up to the end of the URI.
fn redact_one(scheme: &str, body: &str) -> String {
    let mut out = String::from(scheme);
    let authority_end = body.find(['/', '?', '#']).unwrap_or(body.len());
    let (authority, tail) = body.split_at(authority_end);
    match authority.rfind('@') {
        Some(i) => {
            out.push_str(REDACTED);
            out.push_str(&authority[i..]);
        }
        None => out.push_str(authority),
    }
    let (before_fragment, fragment) = match tail.find('#') {
        Some(i) => (&tail[..i], Some(&tail[i + 1..])),
        None => (tail, None),
    };
    let (path, query) = match before_fragment.find('?') {
        Some(i) => (&before_fragment[..i], Some(&before_fragment[i + 1..])),
        None => (before_fragment, None),
    };
    out.push_str(path);
    if query.is_some() {
        out.push('?');
        out.push_str(REDACTED);
    }
    if fragment.is_some() {
        out.push('#');
        out.push_str(REDACTED);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_lose_their_secrets_and_keep_the_rest() {
        for (given, want) in [
            // Nothing secret: unchanged.
            ("s3://bucket/pets/dog.jpg", "s3://bucket/pets/dog.jpg"),
            ("file:///data/in/dog.png", "file:///data/in/dog.png"),
            ("gs://b", "gs://b"),
            // A pre-signed URL: the signature is in the query.
            (
                "https://b.s3.amazonaws.com/dog.jpg?X-Amz-Credential=AKIA%2F&X-Amz-Signature=deadbeef",
                "https://b.s3.amazonaws.com/dog.jpg?REDACTED",
            ),
            ("https://h/x.png?", "https://h/x.png?REDACTED"),
            // Azure SAS tokens ride in the query too; a fragment may carry a token.
            (
                "az://c/x.png?sv=2024&sig=abc#frag",
                "az://c/x.png?REDACTED#REDACTED",
            ),
            ("https://h/x.png#access_token=t", "https://h/x.png#REDACTED"),
            // userinfo: user and password both go, the host stays.
            (
                "https://user:hunter2@images.example.com/a.png",
                "https://REDACTED@images.example.com/a.png",
            ),
            ("redis://:pw@redis:6379/0", "redis://REDACTED@redis:6379/0"),
            // An @ in the path is not userinfo.
            ("https://h/users/@me.png", "https://h/users/@me.png"),
            // A ? or # inside the authority ends it (no path).
            ("https://u:p@h?sig=1", "https://REDACTED@h?REDACTED"),
        ] {
            assert_eq!(redact_uri(given), want, "{given}");
        }
    }

    #[test]
    fn uris_inside_messages_are_redacted_and_the_message_kept() {
        for (given, want) in [
            (
                "photo: https://h/dog.jpg?X-Amz-Signature=abc: HTTP status 403",
                "photo: https://h/dog.jpg?REDACTED: HTTP status 403",
            ),
            (
                "invalid URI \"s3://b/x?sig=1\": names a bucket",
                "invalid URI \"s3://b/x?REDACTED\": names a bucket",
            ),
            (
                "mask: https://u:p@h/m.png?t=1 and (https://h/n.png?t=2).",
                "mask: https://REDACTED@h/m.png?REDACTED and (https://h/n.png?REDACTED).",
            ),
            // A comma is part of a query: the second URI goes with the first one's query.
            (
                "tried http://a/x?s=1,https://b/y?s=2; gave up",
                "tried http://a/x?REDACTED; gave up",
            ),
            (
                "tried http://a/x?s=1, https://b/y?s=2; gave up",
                "tried http://a/x?REDACTED, https://b/y?REDACTED; gave up",
            ),
            // No URI: unchanged, `://` alone included.
            ("the mask is empty", "the mask is empty"),
            ("odd :// text ? here", "odd :// text ? here"),
            ("", ""),
        ] {
            assert_eq!(redact_uri(given), want, "{given}");
        }
    }

    #[test]
    fn redaction_is_idempotent_and_leaves_no_secret_behind() {
        let secret = "s3cr3t-signature";
        for given in [
            format!("https://h/x?sig={secret}"),
            format!("https://user:{secret}@h/x"),
            format!("failed: https://h/x#{secret} then gs://b/k?{secret}"),
            format!("ünïcode https://ü:{secret}@hôst/ä?{secret}"),
        ] {
            let once = redact_uri(&given);
            assert!(!once.contains(secret), "{given} → {once}");
            assert_eq!(redact_uri(&once), once, "{given}");
        }
    }
}
