//! The one place a URL is made safe to print: every message that shows a repository or a
//! source URL goes through [`redact_url`].

/// `text` without its secrets, for messages and logs: a password in the userinfo becomes
/// `REDACTED`, and the query (`?endpoint=…&ca_bundle=…`, options rather than identity) is
/// dropped. Text that is not a URL keeps only what precedes a possible userinfo.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text).ok().filter(|u| !u.cannot_be_a_base()) {
        Some(mut u) => {
            if u.password().is_some() {
                // Fails only for URLs that cannot have a password, which then have none.
                let _ = u.set_password(Some("REDACTED"));
            }
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        None => {
            let text = text.split(['?', '#']).next().unwrap_or_default();
            // Not a URL: never echo anything that may be a `user:password@` part.
            match (text.find("://"), text.rfind('@')) {
                (Some(s), Some(at)) if at > s => {
                    format!("{}REDACTED{}", &text[..s + 3], &text[at..])
                }
                (None, Some(_)) => "(a value containing '@', not shown)".into(),
                _ => text.to_owned(),
            }
        }
    }
}

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
        assert_eq!(redact_url("redis://u:pw@h:1"), "redis://u:REDACTED@h:1");
        assert_eq!(
            redact_url("s3://bucket/p?endpoint=http://x&ca_bundle=/a"),
            "s3://bucket/p"
        );
        assert_eq!(redact_url("file:///srv/repo"), "file:///srv/repo");
        assert_eq!(redact_url("/srv/repo"), "/srv/repo");
        let r = redact_url("s3://KEY:SECRET@bucket/p");
        assert!(!r.contains("SECRET"), "{r}");
        // Not parsable as a URL (a space in the host).
        let r = redact_url("s3://KEY:SE CRET@buck et/p");
        assert!(!r.contains("SE CRET") && !r.contains("KEY"), "{r}");
        assert!(!redact_url("KEY:SECRET@bucket").contains("SECRET"));
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
