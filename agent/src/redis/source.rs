//! Where the master is: `redis://[user[:password]@]host[:port]` or `rediss://…` (TLS).
//!
//! The password may also come from a file (`--password-file`), `SYNCBRIDGE_REDIS_PASSWORD`
//! or `REDISCLI_AUTH` (as `redis-cli` reads it), so it stays out of process listings.

use anyhow::{bail, Context, Result};

use crate::util::redact::redact_url;

/// A parsed `--source`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSource {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// ACL user for `AUTH <user> <password>`; `None` uses `AUTH <password>` (the default user).
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
    /// `rediss://`.
    pub tls: bool,
    /// Certificates for TLS.
    pub tls_files: super::tls::TlsFiles,
}

impl std::fmt::Debug for RedisSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSource")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("tls_files", &self.tls_files)
            .finish()
    }
}

impl RedisSource {
    /// Parses a URL, with the password read from a file if there is one: a password given
    /// twice (file and URL) is refused; without either, the environment's is used.
    pub fn parse_with_password(text: &str, from_file: Option<String>) -> Result<RedisSource> {
        if text.is_empty() {
            bail!(
                "no source given: pass --source redis://host:port (or set SYNCBRIDGE_REDIS_SOURCE)"
            );
        }
        let url = url::Url::parse(text)
            .with_context(|| format!("invalid Redis URL {:?}", redact_url(text)))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => bail!("unsupported scheme {other:?} in --source: use redis:// or rediss://"),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .context("the Redis URL has no host")?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port().unwrap_or(6379);
        let decode = |s: &str| -> Result<String> {
            percent_decode(s).context("the Redis URL's user or password is not valid UTF-8")
        };
        let username = (!url.username().is_empty())
            .then(|| decode(url.username()))
            .transpose()?;
        let mut password = url.password().map(decode).transpose()?;
        if from_file.is_some() {
            if password.is_some() {
                bail!("the Redis password is given twice (--password-file and the URL): keep the file");
            }
            password = from_file;
        }
        if password.is_none() {
            password = std::env::var("SYNCBRIDGE_REDIS_PASSWORD")
                .or_else(|_| std::env::var("REDISCLI_AUTH"))
                .ok()
                .filter(|p| !p.is_empty());
        }
        if username.is_some() && password.is_none() {
            bail!("the Redis URL names a user but no password (give it with --password-file or SYNCBRIDGE_REDIS_PASSWORD)");
        }
        if !matches!(url.path(), "" | "/") {
            bail!("the Redis URL has a path {:?}; a replica receives every database, so leave the database out", url.path());
        }
        Ok(RedisSource {
            host,
            port,
            username,
            password,
            tls,
            tls_files: Default::default(),
        })
    }

    /// `host:port` for messages.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<RedisSource> {
        RedisSource::parse_with_password(text, None)
    }

    #[test]
    fn parses_users_passwords_and_defaults() {
        let s = parse("redis://backup:p%40ss@db.example:6380").unwrap();
        assert_eq!(s.endpoint(), "db.example:6380");
        assert_eq!(s.username.as_deref(), Some("backup"));
        assert_eq!(s.password.as_deref(), Some("p@ss"));
        assert!(!s.tls);
        let s = parse("rediss://:secret@10.0.0.1").unwrap();
        assert_eq!(
            (s.port, s.username, s.password.as_deref(), s.tls),
            (6379, None, Some("secret"), true)
        );
        assert!(parse("http://x").is_err());
        assert!(parse("redis://x/2").is_err());
        assert!(parse("").is_err());
        assert!(!format!("{:?}", parse("redis://:pw@h").unwrap()).contains("pw"));
        assert_eq!(redact_url("redis://u:pw@h:1"), "redis://h:1");
    }

    #[test]
    fn password_from_a_file() {
        let s = RedisSource::parse_with_password("redis://backup@h", Some("f".into())).unwrap();
        assert_eq!(
            (s.username.as_deref(), s.password.as_deref()),
            (Some("backup"), Some("f"))
        );
        let e =
            RedisSource::parse_with_password("redis://:hunter2@h", Some("f".into())).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
