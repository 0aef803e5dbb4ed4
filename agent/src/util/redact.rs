//! Secrets in what the user typed. Showing a URL safely is [`storage::redact_url`], the
//! one redaction rule for this crate and the storage library (re-exported here): no
//! userinfo, query or fragment. This module adds the checks that decide whether to warn
//! about, or refuse, a secret given on the command line.

pub use storage::redact_url;

/// Whether a connection string holds a password: a URL's userinfo
/// (`postgres://u:pw@h`, `redis://:pw@h`) or a libpq keyword (`password=…`).
pub fn has_password(text: &str) -> bool {
    if let Some(u) = url::Url::parse(text).ok().filter(|u| !u.cannot_be_a_base()) {
        return u.password().is_some();
    }
    let lower = text.to_ascii_lowercase();
    lower.match_indices("password").any(|(at, _)| {
        let before = lower[..at].chars().next_back();
        let after = lower[at + "password".len()..].trim_start();
        before.is_none_or(|c| c.is_whitespace()) && after.starts_with('=')
    })
}

/// Warns when a password was given in `--source` on the command line (rather than in
/// `env_var`, a file or the server's own mechanisms): every local user sees it in `ps`.
pub fn warn_password_on_command_line(source: &str, env_var: &str, instead: &str) {
    let from_env = std::env::var(env_var).is_ok_and(|v| v == source);
    if !from_env && has_password(source) {
        tracing::warn!(
            "the password in --source is visible to every local user in the process list; use {instead} instead"
        );
    }
}

/// Whether `text` is a URL with a user name or password in it.
pub fn has_userinfo(text: &str) -> bool {
    match url::Url::parse(text).ok().filter(|u| !u.cannot_be_a_base()) {
        Some(u) => !u.username().is_empty() || u.password().is_some(),
        // `user:password@host` parses as scheme `user` with an opaque path.
        None if !text.contains("://") => text
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default()
            .contains('@'),
        // Unparsable: look for an '@' in the authority part.
        None => text
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or_default())
            .is_some_and(|authority| authority.contains('@')),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn passwords_and_queries_never_shown() {
        // The rule itself is tested in storage; this is the re-export the agent uses.
        assert_eq!(redact_url("redis://u:pw@h:1"), "redis://h:1");
        assert_eq!(
            redact_url("s3://bucket/p?endpoint=http://x&ca_bundle=/a"),
            "s3://bucket/p"
        );
        assert!(!redact_url("s3://KEY:SE CRET@buck et/p").contains("KEY"));
    }

    #[test]
    fn password_detection() {
        for yes in [
            "postgres://u:pw@h/db",
            "redis://:pw@h:6379",
            "host=h password=pw",
            "password = pw host=h",
        ] {
            assert!(has_password(yes), "{yes}");
        }
        for no in [
            "postgres://u@h/db",
            "redis://h",
            "host=h user=u passfile=/x",
            "host=h application_name=mypassword",
            "",
        ] {
            assert!(!has_password(no), "{no}");
        }
    }

    #[test]
    fn userinfo_detection() {
        assert!(has_userinfo("s3://KEY:SECRET@bucket/p"));
        assert!(has_userinfo("s3://KEY@bucket/p"));
        assert!(has_userinfo("s3://KEY:SE CRET@buck et/p"));
        assert!(!has_userinfo("s3://bucket/p?endpoint=http://a@b"));
        assert!(!has_userinfo("file:///srv/a@b"));
        assert!(!has_userinfo("/srv/repo"));
        assert!(has_userinfo("KEY:SECRET@bucket/p"));
    }
}
