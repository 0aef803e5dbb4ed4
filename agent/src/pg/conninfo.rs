//! Where and how to connect: a libpq connection URL or keyword string plus the standard
//! `PG*` environment (libpq docs, "Connection Strings" and "Environment Variables").
//!
//! Parsed here rather than by `tokio_postgres::Config` because that rejects `sslmode`
//! `verify-ca`/`verify-full`, `sslrootcert`, `sslcert`, `sslkey` and `passfile`, all of which a
//! backup agent's users rely on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// libpq's `sslmode` values (`allow` is treated like `prefer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it, unverified.
    Prefer,
    /// TLS or fail; unverified unless a root certificate is given (then like `verify-ca`).
    Require,
    /// TLS with the chain checked against `sslrootcert`.
    VerifyCa,
    /// `verify-ca` plus the host name.
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<SslMode> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => bail!("invalid sslmode {other:?}: expected disable, prefer, require, verify-ca or verify-full"),
        })
    }
}

/// libpq's `channel_binding`: whether SCRAM must bind the login to the TLS connection
/// (SCRAM-SHA-256-PLUS, `tls-server-end-point`), which stops a man in the middle that
/// terminates TLS with a certificate the client was not set up to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind.
    Disable,
    /// Bind when the connection is TLS and the server offers it (libpq's default).
    Prefer,
    /// Bind or refuse to connect (also refuses logins without SCRAM).
    Require,
}

impl ChannelBinding {
    fn parse(v: &str) -> Result<ChannelBinding> {
        Ok(match v {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => {
                bail!("invalid channel_binding {other:?}: expected disable, prefer or require")
            }
        })
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// TCP host name or address.
    Tcp(String),
    /// Directory containing `.s.PGSQL.<port>`.
    Socket(PathBuf),
}

/// Per-server connect timeout (TCP, TLS, startup and authentication) when
/// `connect_timeout` is unset or 0, for one host as for several: a server that accepts TCP
/// and never answers must produce an error naming it, not a silent hang. (libpq waits
/// forever by default; the agent never does.)
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One more server of a multi-host source (`host=a,b,c`), tried in order after the first
/// like libpq does, so a source listing every node of a cluster finds the one to use after
/// a failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtherServer {
    /// Server location.
    pub host: Host,
    /// Port (TCP) or socket suffix.
    pub port: u16,
    /// Password for this server (the password file is looked up per host).
    pub password: Option<String>,
}

/// libpq's `target_session_attrs`: which kind of server of a multi-host source is
/// acceptable. Read from the `in_hot_standby` and `default_transaction_read_only` values
/// the server reports at startup (PostgreSQL 14+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// The first server that accepts the connection.
    Any,
    /// Not in recovery and not read-only by default.
    ReadWrite,
    /// In recovery or read-only by default.
    ReadOnly,
    /// Not in recovery.
    Primary,
    /// In recovery.
    Standby,
    /// A standby if any is reachable, else any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    fn parse(v: &str) -> Result<TargetSessionAttrs> {
        Ok(match v {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            other => bail!("invalid target_session_attrs {other:?}: expected any, read-write, read-only, primary, standby or prefer-standby"),
        })
    }

    /// The libpq spelling, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

/// A validated connection source.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Server location (the first server of a multi-host source).
    pub host: Host,
    /// Port (TCP) or socket suffix.
    pub port: u16,
    /// Further servers of a multi-host source, tried in order after the first.
    pub other_servers: Vec<OtherServer>,
    /// Which kind of server is acceptable.
    pub target_session_attrs: TargetSessionAttrs,
    /// Role to log in as.
    pub user: String,
    /// Password (from the string, `PGPASSWORD` or the password file).
    pub password: Option<String>,
    /// Database (for `replication=database` and plain SQL connections).
    pub dbname: String,
    /// Shown in `pg_stat_replication` and matched by `synchronous_standby_names`.
    pub application_name: Option<String>,
    /// TLS policy.
    pub sslmode: SslMode,
    /// CA bundle for verification.
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate.
    pub sslcert: Option<PathBuf>,
    /// Client key.
    pub sslkey: Option<PathBuf>,
    /// Connect timeout.
    pub connect_timeout: Option<Duration>,
    /// SCRAM channel binding policy.
    pub channel_binding: ChannelBinding,
}

/// Keys libpq knows that change nothing for us; accepted so existing strings keep working.
const IGNORED_KEYS: &[&str] = &[
    "replication",
    "options",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "gssencmode",
    "sslcompression",
    "sslsni",
    "sslnegotiation",
    "sslcrl",
    "sslcrldir",
    "sslpassword",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "requirepeer",
    "require_auth",
    "load_balance_hosts",
    "client_encoding",
    "fallback_application_name",
    "service",
];

impl ConnInfo {
    /// Parses `source` (URL or keyword form; empty means "environment only"), filling gaps
    /// from the process environment like libpq does.
    pub fn parse(source: &str) -> Result<ConnInfo> {
        ConnInfo::parse_with_env(source, &|k| std::env::var(k).ok())
    }

    /// [`ConnInfo::parse`] with an explicit environment (for tests).
    pub fn parse_with_env(source: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<ConnInfo> {
        let s = source.trim();
        let params = if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            parse_url(s)?
        } else {
            parse_keywords(s)?
        };
        for key in params.keys() {
            let known = matches!(
                key.as_str(),
                "host"
                    | "hostaddr"
                    | "port"
                    | "user"
                    | "password"
                    | "dbname"
                    | "application_name"
                    | "sslmode"
                    | "sslrootcert"
                    | "sslcert"
                    | "sslkey"
                    | "passfile"
                    | "connect_timeout"
                    | "channel_binding"
                    | "target_session_attrs"
            );
            if !known && !IGNORED_KEYS.contains(&key.as_str()) {
                bail!("invalid connection option {key:?}");
            }
        }
        let get = |key: &str, var: &str| {
            params
                .get(key)
                .cloned()
                .filter(|v| !v.is_empty())
                .or_else(|| env(var).filter(|v| !v.is_empty()))
        };
        let host_text = params
            .get("hostaddr")
            .cloned()
            .filter(|v| !v.is_empty())
            .or_else(|| get("host", "PGHOST"))
            .unwrap_or_else(default_host);
        let hosts: Vec<Host> = host_text
            .split(',')
            .map(|h| match h.trim() {
                "" => bail!("empty host name in {host_text:?}"),
                h if h.starts_with('/') => Ok(Host::Socket(PathBuf::from(h))),
                h => Ok(Host::Tcp(h.to_string())),
            })
            .collect::<Result<_>>()?;
        let parse_port = |p: &str| match p.trim() {
            "" => Ok(5432),
            p => p
                .parse::<u16>()
                .with_context(|| format!("invalid port {p:?}")),
        };
        let ports: Vec<u16> = match get("port", "PGPORT") {
            None => vec![5432; hosts.len()],
            Some(text) => {
                let list = text
                    .split(',')
                    .map(parse_port)
                    .collect::<Result<Vec<_>>>()?;
                match list.len() {
                    1 => vec![list[0]; hosts.len()],
                    n if n == hosts.len() => list,
                    n => bail!(
                        "{n} ports ({text}) for {} hosts ({host_text}): give one port for all or one per host",
                        hosts.len()
                    ),
                }
            }
        };
        let user = get("user", "PGUSER")
            .or_else(|| env("USER"))
            .context("no user given: set user= in the connection string or PGUSER")?;
        let dbname = get("dbname", "PGDATABASE").unwrap_or_else(|| user.clone());
        let target_session_attrs = TargetSessionAttrs::parse(
            &get("target_session_attrs", "PGTARGETSESSIONATTRS").unwrap_or_else(|| "any".into()),
        )?;
        let sslmode =
            SslMode::parse(&get("sslmode", "PGSSLMODE").unwrap_or_else(|| "prefer".into()))?;
        let channel_binding = ChannelBinding::parse(
            &get("channel_binding", "PGCHANNELBINDING").unwrap_or_else(|| "prefer".into()),
        )?;
        let connect_timeout = get("connect_timeout", "PGCONNECT_TIMEOUT")
            .map(|v| {
                v.parse::<u64>()
                    .with_context(|| format!("invalid connect_timeout {v:?}"))
            })
            .transpose()?
            .filter(|&s| s > 0)
            .map(|s| Duration::from_secs(s.max(2)))
            .or(Some(DEFAULT_CONNECT_TIMEOUT));
        let home = env("HOME").map(PathBuf::from);
        let pg_home_file = |name: &str| {
            home.as_ref()
                .map(|h| h.join(".postgresql").join(name))
                .filter(|p| p.exists())
        };
        let sslrootcert = get("sslrootcert", "PGSSLROOTCERT")
            .map(PathBuf::from)
            .or_else(|| pg_home_file("root.crt"));
        let sslcert = get("sslcert", "PGSSLCERT")
            .map(PathBuf::from)
            .or_else(|| pg_home_file("postgresql.crt"));
        let sslkey = get("sslkey", "PGSSLKEY")
            .map(PathBuf::from)
            .or_else(|| pg_home_file("postgresql.key"));
        let given_password = get("password", "PGPASSWORD");
        let passfile = get("passfile", "PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".pgpass")));
        let password_for = |host: &Host, port: u16| -> Result<Option<String>> {
            if given_password.is_some() {
                return Ok(given_password.clone());
            }
            let Some(file) = &passfile else {
                return Ok(None);
            };
            let host_key = match host {
                Host::Tcp(h) => h.clone(),
                Host::Socket(_) => "localhost".to_string(),
            };
            lookup_passfile(file, &host_key, port, &dbname, &user)
        };
        let mut servers = Vec::with_capacity(hosts.len());
        for (host, port) in hosts.into_iter().zip(ports) {
            let password = password_for(&host, port)?;
            servers.push(OtherServer {
                host,
                port,
                password,
            });
        }
        let first = servers.remove(0);
        Ok(ConnInfo {
            host: first.host,
            port: first.port,
            other_servers: servers,
            target_session_attrs,
            user,
            password: first.password,
            dbname,
            application_name: get("application_name", "PGAPPNAME"),
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            connect_timeout,
            channel_binding,
        })
    }

    /// Every server of the source in the order to try them, each as a single-server
    /// source. Each has a connect timeout ([`DEFAULT_CONNECT_TIMEOUT`] unless
    /// `connect_timeout` is set): a host that vanished without a trace (no RST) must not
    /// hold up the next one for the kernel's two-minute TCP timeout.
    pub fn servers(&self) -> Vec<ConnInfo> {
        let first = ConnInfo {
            other_servers: Vec::new(),
            connect_timeout: self.connect_timeout.or(Some(DEFAULT_CONNECT_TIMEOUT)),
            ..self.clone()
        };
        let mut out = vec![first.clone()];
        for o in &self.other_servers {
            out.push(ConnInfo {
                host: o.host.clone(),
                port: o.port,
                password: o.password.clone(),
                ..first.clone()
            });
        }
        out
    }

    /// `host:port` or the socket path, for messages (the first server of a multi-host
    /// source).
    pub fn describe(&self) -> String {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{}", self.port),
            Host::Tcp(h) => format!("{h}:{}", self.port),
            Host::Socket(d) => d
                .join(format!(".s.PGSQL.{}", self.port))
                .display()
                .to_string(),
        }
    }
}

fn default_host() -> String {
    for dir in ["/var/run/postgresql", "/tmp"] {
        if Path::new(dir).join(".s.PGSQL.5432").exists() {
            return dir.to_string();
        }
    }
    "localhost".to_string()
}

/// Finds a password in a `.pgpass`-format file (`host:port:db:user:password`, `*` matches
/// anything, `\:` and `\\` escape). Like libpq, a replication connection matches the database
/// `replication`, so both names are tried.
fn lookup_passfile(
    file: &Path,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("reading password file {}", file.display()))
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(file) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %file.display(), "password file has group or world access; ignoring it (chmod 0600)");
                return Ok(None);
            }
        }
    }
    let port = port.to_string();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_passfile_line(line);
        if fields.len() < 5 {
            continue;
        }
        let m = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if m(&fields[0], host)
            && m(&fields[1], &port)
            && (m(&fields[2], dbname) || m(&fields[2], "replication"))
            && m(&fields[3], user)
        {
            return Ok(Some(fields[4..].join(":")));
        }
    }
    Ok(None)
}

fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    if let Some(last) = fields.last_mut() {
                        last.push(n);
                    }
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(last) = fields.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    fields
}

fn parse_keywords(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            bail!("missing \"=\" after {key:?} in connection string");
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.push(
                        chars
                            .next()
                            .context("connection string ends after a backslash")?,
                    ),
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                bail!("unterminated quoted value for {key:?} in connection string");
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.push(
                        chars
                            .next()
                            .context("connection string ends after a backslash")?,
                    );
                } else {
                    value.push(c);
                }
            }
        }
        out.insert(key, value);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .context("truncated %-escape in connection URL")?;
            out.push(
                u8::from_str_radix(hex, 16)
                    .with_context(|| format!("invalid %-escape %{hex} in connection URL"))?,
            );
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("connection URL is not UTF-8 after %-decoding")
}

fn parse_url(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let rest = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
    let (rest, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            let (user, pw) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.insert("user".into(), percent_decode(user)?);
            }
            if let Some(pw) = pw {
                out.insert("password".into(), percent_decode(pw)?);
            }
            hp
        }
        None => authority,
    };
    if !hostport.is_empty() {
        // `host1:port1,host2,[::1]:port3`: one host list and one port list, as libpq.
        let (mut hosts, mut ports) = (Vec::new(), Vec::new());
        for entry in hostport.split(',') {
            let (host, port) = if let Some(v6) = entry.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .context("unterminated [IPv6] host in connection URL")?;
                (h.to_string(), after.strip_prefix(':').unwrap_or_default())
            } else {
                match entry.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), p),
                    None => (entry.to_string(), ""),
                }
            };
            hosts.push(percent_decode(&host)?);
            ports.push(port.to_string());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            out.insert("host".into(), hosts.join(","));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            out.insert("port".into(), ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.insert("dbname".into(), percent_decode(db)?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .with_context(|| format!("connection URL parameter {pair:?} has no value"))?;
            out.insert(percent_decode(k)?, percent_decode(v)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn url_form() {
        let c = ConnInfo::parse_with_env(
            "postgresql://rep%40x:p%3Aw@db.example:6543/app?sslmode=verify-full&application_name=sb&sslrootcert=/ca.pem",
            &no_env,
        )
        .unwrap();
        assert_eq!(c.host, Host::Tcp("db.example".into()));
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "rep@x");
        assert_eq!(c.password.as_deref(), Some("p:w"));
        assert_eq!(c.dbname, "app");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.application_name.as_deref(), Some("sb"));
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/ca.pem")));
        let c = ConnInfo::parse_with_env("postgres://u@[::1]:5433", &no_env).unwrap();
        assert_eq!(c.host, Host::Tcp("::1".into()));
        assert_eq!(c.describe(), "[::1]:5433");
    }

    #[test]
    fn keyword_form_and_env() {
        let env = |k: &str| match k {
            "PGPORT" => Some("7777".to_string()),
            "PGUSER" => Some("envuser".to_string()),
            "PGPASSWORD" => Some("envpw".to_string()),
            "PGSSLMODE" => Some("require".to_string()),
            "PGAPPNAME" => Some("fromenv".to_string()),
            _ => None,
        };
        let c = ConnInfo::parse_with_env("host=/run/pg dbname = 'my db' password='it''s'", &env);
        assert!(c.is_err(), "doubled quote is not libpq syntax");
        let c = ConnInfo::parse_with_env("host=/run/pg dbname = 'my db' password='it\\'s'", &env)
            .unwrap();
        assert_eq!(c.host, Host::Socket("/run/pg".into()));
        assert_eq!(c.port, 7777);
        assert_eq!(c.user, "envuser");
        assert_eq!(c.password.as_deref(), Some("it's"));
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name.as_deref(), Some("fromenv"));
        assert!(ConnInfo::parse_with_env("host=x bogus=1 user=u", &no_env)
            .unwrap_err()
            .to_string()
            .contains("bogus"));
        assert!(ConnInfo::parse_with_env("host=x sslmode=maybe user=u", &no_env).is_err());
        assert_eq!(c.channel_binding, ChannelBinding::Prefer);
        let cb = |v: &str| {
            let env = move |k: &str| (k == "PGCHANNELBINDING").then(|| v.to_string());
            ConnInfo::parse_with_env("host=x user=u", &env).map(|c| c.channel_binding)
        };
        assert_eq!(cb("require").unwrap(), ChannelBinding::Require);
        assert_eq!(cb("disable").unwrap(), ChannelBinding::Disable);
        assert!(cb("always")
            .unwrap_err()
            .to_string()
            .contains("channel_binding"));
    }

    #[test]
    fn several_hosts() {
        let c = ConnInfo::parse_with_env(
            "postgresql://u:pw@db1:5433,db2,[::1]:6000/app?target_session_attrs=read-write",
            &no_env,
        )
        .unwrap();
        let all: Vec<String> = c.servers().iter().map(ConnInfo::describe).collect();
        assert_eq!(all, ["db1:5433", "db2:5432", "[::1]:6000"]);
        assert!(c
            .servers()
            .iter()
            .all(|s| s.password.as_deref() == Some("pw")
                && s.other_servers.is_empty()
                && s.dbname == "app"));
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert!(c
            .servers()
            .iter()
            .all(|s| s.connect_timeout == Some(DEFAULT_CONNECT_TIMEOUT)));
        let timeouts = |src: &str| {
            let c = ConnInfo::parse_with_env(src, &no_env).unwrap();
            c.servers()
                .iter()
                .map(|s| s.connect_timeout)
                .collect::<Vec<_>>()
        };
        // One host gets the same default as several; 0 (libpq's "forever") too.
        let ten = Some(DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(timeouts("host=a user=u"), [ten]);
        assert_eq!(timeouts("host=a connect_timeout=0 user=u"), [ten]);
        assert_eq!(
            ConnInfo::parse_with_env("host=a user=u", &no_env)
                .unwrap()
                .connect_timeout,
            ten
        );
        let five = Some(Duration::from_secs(5));
        assert_eq!(timeouts("host=a,b connect_timeout=5 user=u"), [five, five]);

        let c = ConnInfo::parse_with_env("host=a,/run/pg port=1,2 user=u", &no_env).unwrap();
        assert_eq!(c.servers()[1].host, Host::Socket("/run/pg".into()));
        assert_eq!(c.servers()[1].port, 2);
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::Any);
        let c = ConnInfo::parse_with_env("host=a,b port=7 user=u", &no_env).unwrap();
        assert_eq!(c.servers()[1].port, 7);
        for (bad, why) in [
            ("host=a,b port=1,2,3 user=u", "3 ports"),
            ("host=a,,b user=u", "empty host"),
            (
                "host=a target_session_attrs=leader user=u",
                "target_session_attrs",
            ),
        ] {
            let err = ConnInfo::parse_with_env(bad, &no_env)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn passfile_lookup() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# c\nother:*:*:*:no\n127.0.0.1:5432:replication:rep:s\\:ecret\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let f = file.display().to_string();
        let env = move |k: &str| (k == "PGPASSFILE").then(|| f.clone());
        let c = ConnInfo::parse_with_env("host=127.0.0.1 user=rep dbname=postgres", &env).unwrap();
        assert_eq!(c.password.as_deref(), Some("s:ecret"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = ConnInfo::parse_with_env("host=127.0.0.1 user=rep dbname=postgres", &env).unwrap();
        assert_eq!(c.password, None);
    }
}
