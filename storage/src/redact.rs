//! The one place a URL is made safe to show. Every message, log line or `Debug` output of
//! this crate and of the agent that names a repository or a source URL goes through
//! [`redact_url`] (the agent re-exports it from `util::redact`), so there is one rule to
//! review: no userinfo (user name or password, e.g. an S3 access key and secret put in
//! `s3://KEY:SECRET@bucket/p`), no query (`?aws_secret_access_key=…`, options rather than
//! identity), no fragment.

/// `text` as it may be shown: a URL without its userinfo, query and fragment. A URL without
/// userinfo is kept verbatim up to its query (no normalisation, so paths show as given).
///
/// Text that does not parse as a URL is cut more widely, since its parts are ambiguous: a
/// password may hold `/`, `?` or `#`, so everything between `://` and the last `@` goes;
/// text without `://` that has an `@` before its first `/` (`user:password@host`) is not
/// shown at all.
pub fn redact_url(text: &str) -> String {
    let cut = |s: &str| s.split(['?', '#']).next().unwrap_or_default().to_owned();
    let Some((scheme, rest)) = text.split_once("://") else {
        let head = text.split(['/', '?', '#']).next().unwrap_or_default();
        return if head.contains('@') {
            "(a value containing '@', not shown)".into()
        } else {
            cut(text)
        };
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match url::Url::parse(text).ok().filter(|u| !u.cannot_be_a_base()) {
        Some(mut u) if !u.username().is_empty() || u.password().is_some() => {
            // Both only fail for URLs that cannot have credentials, which then have none.
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Some(_) if !authority.contains('@') => cut(text),
        // Unparsable, or a scheme whose parser dropped an `@` it did not take for
        // userinfo (`file://u:pw@host/x`): everything up to the last '@' goes.
        _ => match rest.rfind('@') {
            Some(at) => format!("{scheme}://{}", cut(&rest[at + 1..])),
            None => cut(text),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn no_userinfo_query_or_fragment_is_ever_shown() {
        for (given, shown) in [
            ("s3://K:S@b/p?q=1#f", "s3://b/p"),
            ("redis://u:pw@h:1", "redis://h:1"),
            ("redis://:pw@h:6379/0", "redis://h:6379/0"),
            (
                "postgres://replicator@db:5432/postgres",
                "postgres://db:5432/postgres",
            ),
            (
                "s3://bucket/p?endpoint=http://x&ca_bundle=/a",
                "s3://bucket/p",
            ),
            ("s3://b/p@x", "s3://b/p@x"),
            ("file:///srv/repo", "file:///srv/repo"),
            ("file:///srv/a b", "file:///srv/a b"),
            ("/srv/repo", "/srv/repo"),
            ("memory://", "memory://"),
            // Unparsable: a space in the host, a '/' or '?' in the password.
            ("s3://KEY:SE CRET@buck et/p", "s3://buck et/p"),
            ("s3://KEY:pa/ss@b/p", "s3://b/p"),
            ("s3://KEY:pa?ss@b/p", "s3://b/p"),
            ("s3://KEY:TOPSECRET@/p", "s3:///p"),
            ("file://u:TOPSECRET@host/x", "file://host/x"),
            ("KEY:SECRET@bucket", "(a value containing '@', not shown)"),
        ] {
            let r = redact_url(given);
            assert_eq!(r, shown, "{given}");
            for secret in ["KEY", "SECRET", "SE CRET", "pw", "pa", "ss@", "K:"] {
                assert!(!r.contains(secret) || given == shown, "{given} -> {r}");
            }
        }
    }
}
