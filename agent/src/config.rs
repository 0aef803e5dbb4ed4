//! `syncbridge-agent run --config FILE`: the TOML file that describes every job of a sidecar
//! (`packaging/agent.toml` is the complete commented example).
//!
//! Three layers, the later winning: the file, then `SYNCBRIDGE_<SECTION>_<KEY>` environment
//! variables (`SYNCBRIDGE_POSTGRES_MAX_LAG=2s`, `SYNCBRIDGE_POSTGRES_RETENTION_KEEP_FULL=7`),
//! then `--set section.key=value` on the command line. Every key any layer names must be a
//! key of the schema: an unknown one is an error naming it (with its line, in the file).
//! Values are checked before any job starts: durations, schedules, URLs, and that every
//! secret file can be read. Secrets are only ever read from files (`password_file`), never
//! required inline, and never printed.
//!
//! The file is parsed by the `toml` crate and mapped with serde; `serde_path_to_error` gives
//! the dotted path of a bad value. Only the layering is ours.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};

/// Every key of the schema, as `section.key` paths; the environment overrides are derived
/// from it (`postgres.max_lag` is `SYNCBRIDGE_POSTGRES_MAX_LAG`). A unit test checks that it
/// and the structs below agree.
pub const KEYS: &[&str] = &[
    "repository.url",
    "repository.identity_file",
    "repository.recipients",
    "repository.recipients_file",
    "repository.ca_bundle",
    "postgres.source",
    "postgres.password_file",
    "postgres.repository",
    "postgres.slot",
    "postgres.application_name",
    "postgres.synchronous",
    "postgres.max_lag",
    "postgres.status_interval",
    "postgres.max_inflight",
    "postgres.compression_level",
    "postgres.compression",
    "postgres.on_standby",
    "postgres.backup_every",
    "postgres.retention.keep_full",
    "postgres.retention.keep_within",
    "redis.source",
    "redis.password_file",
    "redis.repository",
    "redis.tls_ca",
    "redis.tls_cert",
    "redis.tls_key",
    "redis.max_lag",
    "redis.snapshot_every",
    "redis.spool",
    "redis.spool_limit_mib",
    "redis.on_replica",
    "redis.cluster",
    "redis.cluster_seeds",
    "redis.cluster_shard_only",
    "redis.retention.keep_full",
    "redis.retention.keep_within",
    "verify.every",
    "verify.max_age",
    "http.listen",
    "http.ready_max_lag",
    "agent.stop_timeout",
    "agent.log_format",
    "agent.memory_budget_mib",
];

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The default repository of every job.
    pub repository: Option<RepositoryConfig>,
    /// The PostgreSQL stream and its scheduled backups.
    pub postgres: Option<PostgresConfig>,
    /// The Redis stream.
    pub redis: Option<RedisConfig>,
    /// Scheduled verification of each repository.
    pub verify: Option<VerifyConfig>,
    /// Health and metrics.
    pub http: Option<HttpConfig>,
    /// The process itself.
    #[serde(default)]
    pub agent: AgentConfig,
}

/// `[repository]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// `file:///dir`, `s3://bucket/prefix`, … (credentials from the store's environment).
    pub url: String,
    /// age identity files, to read an encrypted repository (verify).
    #[serde(default)]
    pub identity_file: Vec<PathBuf>,
    /// age recipients new objects are encrypted to.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// A file of age recipients, one per line.
    pub recipients_file: Option<PathBuf>,
    /// Extra CA certificates for an HTTPS object store.
    pub ca_bundle: Option<PathBuf>,
}

/// A retention policy (`expire` after each backup, or each new Redis generation).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep the newest N backups (Redis: generations).
    pub keep_full: Option<u64>,
    /// Keep every moment of this window restorable.
    #[serde(default, deserialize_with = "opt_duration")]
    pub keep_within: Option<Duration>,
}

/// `[postgres]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq URL or keyword string, without a password.
    pub source: String,
    /// A file holding the password alone (a mounted Secret).
    pub password_file: Option<PathBuf>,
    /// This section's repository URL, instead of `[repository] url`.
    pub repository: Option<String>,
    /// Physical replication slot.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// `application_name` (what `synchronous_standby_names` lists).
    #[serde(default = "default_slot")]
    pub application_name: String,
    /// Acknowledge commits only once stored.
    #[serde(default)]
    pub synchronous: bool,
    /// Longest time new WAL waits before it is stored.
    #[serde(default = "one_second", deserialize_with = "duration")]
    pub max_lag: Duration,
    /// Longest time between status updates to the server.
    #[serde(default = "ten_seconds", deserialize_with = "duration")]
    pub status_interval: Duration,
    /// Uploads in flight before reading pauses.
    #[serde(default = "three")]
    pub max_inflight: usize,
    /// zstd level of WAL objects.
    #[serde(default = "one_level")]
    pub compression_level: i32,
    /// `zstd` (at `compression_level`) or `lz4`.
    #[serde(default)]
    pub compression: crate::pg::stream::WalCompression,
    /// When the source is a standby: `wait` for its promotion, or `stream` from it.
    #[serde(default)]
    pub on_standby: crate::pg::stream::StandbyPolicy,
    /// Base backups on a schedule: a duration (`24h`) or a cron expression
    /// (`0 2 * * *`, UTC).
    #[serde(default, deserialize_with = "opt_schedule")]
    pub backup_every: Option<Schedule>,
    /// Expire after each backup.
    pub retention: Option<RetentionConfig>,
}

/// `[redis]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user@]host[:port]` or `rediss://`, without a password.
    pub source: String,
    /// A file holding the password alone.
    pub password_file: Option<PathBuf>,
    /// This section's repository URL, instead of `[repository] url`.
    pub repository: Option<String>,
    /// rediss://: CA bundle.
    pub tls_ca: Option<PathBuf>,
    /// rediss://: client certificate.
    pub tls_cert: Option<PathBuf>,
    /// rediss://: client key.
    pub tls_key: Option<PathBuf>,
    /// Longest time a command waits before it is stored.
    #[serde(default = "one_second", deserialize_with = "duration")]
    pub max_lag: Duration,
    /// A new snapshot generation this often (`off` for never).
    #[serde(default = "fifteen_minutes", deserialize_with = "duration_or_off")]
    pub snapshot_every: Duration,
    /// Directory where chunks wait while the store is slow.
    pub spool: Option<PathBuf>,
    /// Largest spool, MiB.
    #[serde(default = "spool_limit")]
    pub spool_limit_mib: u64,
    /// Expire after each new generation.
    pub retention: Option<RetentionConfig>,
    /// When the source is a replica: `stream` from it, `wait` for its promotion, or
    /// `follow` to its master.
    #[serde(default)]
    pub on_replica: crate::redis::stream::ReplicaPolicy,
    /// `true`: the source is a node of a Redis Cluster / Valkey Cluster, stream every shard
    /// in this process; `false`: a single server (a cluster node is then refused unless
    /// `cluster_shard_only`); unset: as the source says (`INFO cluster`).
    pub cluster: Option<bool>,
    /// Further cluster nodes (`host:port`) to read the topology from when `source` does
    /// not answer; naming any says the source is a cluster node.
    #[serde(default)]
    pub cluster_seeds: Vec<String>,
    /// The source is a Redis Cluster node: stream its shard alone (one sidecar per shard,
    /// each with a repository of its own) instead of the whole cluster.
    #[serde(default)]
    pub cluster_shard_only: bool,
}

/// `[verify]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// How often (a duration or a cron expression).
    #[serde(deserialize_with = "schedule")]
    pub every: Schedule,
    /// Newest WAL or chunk older than this is a failure (stale).
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_age: Option<Duration>,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address for `/healthz`, `/readyz` and `/metrics`.
    pub listen: SocketAddr,
    /// A stream whose lag is above this is not ready.
    #[serde(default = "thirty_seconds", deserialize_with = "duration")]
    pub ready_max_lag: Duration,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// After SIGTERM, how long the jobs have to store what they hold (keep it under the
    /// pod's `terminationGracePeriodSeconds`, 30 s by default).
    #[serde(default = "twenty_seconds", deserialize_with = "duration")]
    pub stop_timeout: Duration,
    /// `text` or `json` (the command line's `--log-format` wins).
    pub log_format: Option<String>,
    /// MiB of received data the streams may hold in memory together (see
    /// [`crate::run::MemoryShares`]); what does not fit waits on the server's side.
    #[serde(default = "memory_budget")]
    pub memory_budget_mib: u64,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            stop_timeout: twenty_seconds(),
            log_format: None,
            memory_budget_mib: memory_budget(),
        }
    }
}

/// When a scheduled job runs.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// This long after the previous run began (the first run at start).
    Every(Duration),
    /// At the times of a cron expression, in UTC.
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// Parses `24h`-style durations and five- or six-field cron expressions.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        if let Ok(d) = crate::util::duration::parse_duration(text) {
            return Ok(Schedule::Every(d));
        }
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(text)
            .map(|c| Schedule::Cron(Box::new(c)))
            .map_err(|e| {
                format!("{text:?} is neither a duration (24h, 30m) nor a cron expression (0 2 * * *): {e}")
            })
    }

    /// How long from `now` until the next run, given when the previous one began.
    pub fn next_delay(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        previous: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Duration {
        match self {
            Schedule::Every(d) => match previous {
                None => Duration::ZERO,
                Some(p) => {
                    let since = (now - p).to_std().unwrap_or_default();
                    d.saturating_sub(since)
                }
            },
            Schedule::Cron(c) => c
                .find_next_occurrence(&now, false)
                .ok()
                .and_then(|t| (t - now).to_std().ok())
                .unwrap_or(Duration::from_secs(3600)),
        }
    }
}

fn default_slot() -> String {
    "syncbridge".into()
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn twenty_seconds() -> Duration {
    Duration::from_secs(20)
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn fifteen_minutes() -> Duration {
    Duration::from_secs(15 * 60)
}
fn three() -> usize {
    3
}
fn one_level() -> i32 {
    1
}
fn spool_limit() -> u64 {
    1024
}
fn memory_budget() -> u64 {
    64
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    crate::util::duration::parse_duration(&text).map_err(serde::de::Error::custom)
}

fn duration_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    crate::util::duration::parse_duration_or_off(&text).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn schedule<'de, D: Deserializer<'de>>(d: D) -> Result<Schedule, D::Error> {
    let text = String::deserialize(d)?;
    Schedule::parse(&text).map_err(serde::de::Error::custom)
}

fn opt_schedule<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Schedule>, D::Error> {
    schedule(d).map(Some)
}

/// The environment variable that overrides `key` (`postgres.max_lag` →
/// `SYNCBRIDGE_POSTGRES_MAX_LAG`).
pub fn env_name(key: &str) -> String {
    format!("SYNCBRIDGE_{}", key.replace('.', "_").to_uppercase())
}

/// A value given as text (environment, `--set`): TOML when it is a TOML value (`true`, `7`,
/// `"x"`, `["a", "b"]`), otherwise the text as a string (`2s`, `s3://b/p`).
fn value_of(text: &str) -> toml::Value {
    let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {text}"));
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(v) => v,
        None => toml::Value::String(text.to_owned()),
    }
}

/// Sets `path` (dotted) in `table`, creating sections as needed.
fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<()> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().context("empty key")?;
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("{path}: {p} is not a section"),
        };
    }
    t.insert(last.to_owned(), value);
    Ok(())
}

/// Reads `path`, then applies the environment (`env`, usually `std::env::vars()`) and the
/// command line's `--set key=value` (`sets`), and checks the result: every error names the
/// key (and its line in the file) or the file.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration {}", path.display()))?;
    let shown = path.display().to_string();
    // The file alone first, so an error in it names its line.
    let de = toml::Deserializer::new(&text);
    serde_path_to_error::deserialize::<_, Config>(de)
        .map_err(|e| anyhow::anyhow!("{shown}: {}: {}", e.path(), e.inner()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{shown} is not valid TOML"))?;
    for (name, value) in env {
        if let Some(key) = KEYS.iter().find(|k| env_name(k) == name) {
            set_path(&mut table, key, value_of(&value))
                .with_context(|| format!("applying {name}"))?;
        }
    }
    for s in sets {
        let Some((key, value)) = s.split_once('=') else {
            bail!("--set {s:?}: expected section.key=value");
        };
        let key = key.trim();
        if !KEYS.contains(&key) {
            bail!("--set {key}: unknown key (keys: {})", KEYS.join(", "));
        }
        set_path(&mut table, key, value_of(value.trim()))?;
    }
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            anyhow::anyhow!(
                "{}: {} (from the environment or --set)",
                e.path(),
                e.inner()
            )
        })?;
    config.check()?;
    Ok(config)
}

impl Config {
    /// What serde cannot check: at least one job, a repository for each, readable secret
    /// files, sane numbers.
    fn check(&self) -> Result<()> {
        if self.postgres.is_none() && self.redis.is_none() {
            bail!("the configuration has neither [postgres] nor [redis]: nothing to run");
        }
        if self.agent.memory_budget_mib < 16 {
            bail!(
                "agent.memory_budget_mib = {} is too small: a stream needs at least 16 MiB (one WAL segment)",
                self.agent.memory_budget_mib
            );
        }
        if let Some(pg) = &self.postgres {
            self.repository_url(pg.repository.as_deref())
                .context("[postgres]")?;
            if let Some(f) = &pg.password_file {
                crate::util::secret_file::read_secret_file(f, "postgres.password_file")?;
            }
            if pg.max_inflight == 0 {
                bail!("postgres.max_inflight must be at least 1");
            }
            crate::pg::conninfo::ConnInfo::parse(&pg.source).context("postgres.source")?;
            if crate::util::redact::has_password(&pg.source) {
                bail!("postgres.source holds a password: put it in a file and name it as postgres.password_file");
            }
        }
        if let Some(r) = &self.redis {
            self.repository_url(r.repository.as_deref())
                .context("[redis]")?;
            if let Some(f) = &r.password_file {
                crate::util::secret_file::read_secret_file(f, "redis.password_file")?;
            }
            if crate::util::redact::has_password(&r.source) {
                bail!("redis.source holds a password: put it in a file and name it as redis.password_file");
            }
            if r.cluster_shard_only && r.cluster == Some(true) {
                bail!("redis.cluster = true (stream every shard) and redis.cluster_shard_only = true (stream the source's shard alone) contradict each other: set one");
            }
            if !r.cluster_seeds.is_empty() && (r.cluster == Some(false) || r.cluster_shard_only) {
                bail!("redis.cluster_seeds is for a whole-cluster stream: it cannot go with redis.cluster = false or redis.cluster_shard_only = true");
            }
            for seed in &r.cluster_seeds {
                let (host, port) = seed
                    .rsplit_once(':')
                    .with_context(|| format!("redis.cluster_seeds: {seed:?} is not host:port"))?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    bail!("redis.cluster_seeds: {seed:?} is not host:port");
                }
            }
        }
        if let Some(agent_format) = &self.agent.log_format {
            if !matches!(agent_format.as_str(), "text" | "json") {
                bail!("agent.log_format: {agent_format:?} is neither text nor json");
            }
        }
        for r in [
            self.postgres.as_ref().and_then(|p| p.retention),
            self.redis.as_ref().and_then(|r| r.retention),
        ]
        .into_iter()
        .flatten()
        {
            if r.keep_full == Some(0) {
                bail!("retention.keep_full must be at least 1");
            }
            if r.keep_full.is_none() && r.keep_within.is_none() {
                bail!("a retention needs keep_full and/or keep_within");
            }
        }
        Ok(())
    }

    /// The repository of a section: its own URL, else `[repository] url`.
    pub fn repository_url(&self, own: Option<&str>) -> Result<String> {
        match (own, &self.repository) {
            (Some(u), _) => Ok(u.to_owned()),
            (None, Some(r)) => Ok(r.url.clone()),
            (None, None) => {
                bail!("no repository: set repository.url, or repository in the section")
            }
        }
    }

    /// The repository options of a section, as the command line's `--repo` and friends.
    pub fn repo_args(&self, own: Option<&str>) -> Result<crate::cli::RepoArgs> {
        let r = self.repository.clone();
        Ok(crate::cli::RepoArgs {
            repo: self.repository_url(own)?,
            identities: r
                .as_ref()
                .map(|r| r.identity_file.clone())
                .unwrap_or_default(),
            recipients: r.as_ref().map(|r| r.recipients.clone()).unwrap_or_default(),
            recipients_file: r.as_ref().and_then(|r| r.recipients_file.clone()),
            ca_bundle: r.and_then(|r| r.ca_bundle),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    const MINIMAL: &str = "[repository]\nurl = \"file:///tmp/r\"\n\n[postgres]\nsource = \"postgres://replicator@127.0.0.1:5432/postgres\"\n";

    /// The documented example (packaging/agent.toml), without its secret files.
    fn example() -> String {
        include_str!("../../packaging/agent.toml")
            .lines()
            .filter(|l| !l.starts_with("password_file"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Dotted paths of every key set in a TOML table.
    fn keys_of(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => keys_of(inner, &path, out),
                _ => out.push(path),
            }
        }
    }

    #[test]
    fn the_example_sets_every_key_and_every_key_can_be_overridden() {
        let (_d, p) = write(&example());
        load(&p, Vec::new(), &[]).unwrap();
        let table: toml::Table =
            toml::from_str(include_str!("../../packaging/agent.toml")).unwrap();
        let mut set = Vec::new();
        keys_of(&table, "", &mut set);
        for k in &set {
            assert!(
                KEYS.contains(&k.as_str()),
                "{k} is set in the example but not in KEYS"
            );
        }
        // Commented-out keys of the example are documented too.
        let text = include_str!("../../packaging/agent.toml");
        for key in KEYS {
            let name = key.rsplit('.').next().unwrap();
            assert!(
                text.contains(&format!("{name} =")) || text.contains(&format!("{name} = ")),
                "{key} is not documented in packaging/agent.toml"
            );
        }
        for key in KEYS {
            let value = match *key {
                k if k.ends_with("keep_full") || k.ends_with("max_inflight") => "3",
                k if k.ends_with("_mib") => "32",
                k if k.ends_with("compression_level") => "1",
                k if k.ends_with(".compression") => "lz4",
                k if k.ends_with("on_standby") => "stream",
                k if k.ends_with("on_replica") => "follow",
                k if k.ends_with("synchronous")
                    || k.ends_with("cluster_shard_only")
                    || k.ends_with(".cluster") =>
                {
                    "true"
                }
                k if k.ends_with("cluster_seeds") => "[\"127.0.0.1:7001\"]",
                "http.listen" => "127.0.0.1:9187",
                "agent.log_format" => "json",
                k if k.ends_with("identity_file") || k.ends_with("recipients") => "[]",
                k if k.ends_with("every")
                    || k.ends_with("lag")
                    || k.ends_with("age")
                    || k.ends_with("within")
                    || k.ends_with("interval")
                    || k.ends_with("timeout") =>
                {
                    "2h"
                }
                k if k.starts_with("redis.") && k.ends_with("source") => "redis://127.0.0.1:6379",
                k if k.ends_with("source") => "postgres://u@h/d",
                k if k.ends_with("password_file") => continue,
                _ => "file:///tmp/x",
            };
            let env = vec![(env_name(key), value.to_string())];
            let r = load(&p, env, &[]);
            assert!(r.is_ok(), "{key}: {:#}", r.unwrap_err());
            let r = load(&p, Vec::new(), &[format!("{key}={value}")]);
            assert!(r.is_ok(), "--set {key}: {:#}", r.unwrap_err());
        }
    }

    #[test]
    fn cluster_keys_that_contradict_each_other_are_refused() {
        let base =
            "[repository]\nurl = \"file:///tmp/x\"\n[redis]\nsource = \"redis://127.0.0.1:7000\"\n";
        let (_d, p) = write(&format!(
            "{base}cluster = true\ncluster_seeds = [\"127.0.0.1:7001\", \"h:7002\"]\n"
        ));
        let c = load(&p, Vec::new(), &[]).unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.cluster, Some(true));
        assert_eq!(r.cluster_seeds.len(), 2);
        let (_d, p) = write(base);
        assert_eq!(
            load(&p, Vec::new(), &[]).unwrap().redis.unwrap().cluster,
            None
        );
        for (extra, needle) in [
            ("cluster = true\ncluster_shard_only = true\n", "contradict"),
            (
                "cluster = false\ncluster_seeds = [\"h:1\"]\n",
                "cluster_seeds",
            ),
            (
                "cluster_shard_only = true\ncluster_seeds = [\"h:1\"]\n",
                "cluster_seeds",
            ),
            ("cluster_seeds = [\"nohost\"]\n", "not host:port"),
            ("cluster_seeds = [\"h:port\"]\n", "not host:port"),
            ("cluster = \"yes\"\n", "redis.cluster"),
        ] {
            let (_d, p) = write(&format!("{base}{extra}"));
            let e = format!("{:#}", load(&p, Vec::new(), &[]).unwrap_err());
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_keys_bad_durations_and_missing_files_are_named() {
        let (_d, p) = write(&format!("{MINIMAL}max_lagg = \"1s\"\n"));
        let e = format!("{:#}", load(&p, Vec::new(), &[]).unwrap_err());
        assert!(e.contains("max_lagg") && e.contains("line 6"), "{e}");

        let (_d, p) = write(&format!("{MINIMAL}max_lag = \"soon\"\n"));
        let e = format!("{:#}", load(&p, Vec::new(), &[]).unwrap_err());
        assert!(e.contains("postgres.max_lag") && e.contains("soon"), "{e}");

        let (_d, p) = write(&format!(
            "{MINIMAL}password_file = \"/nonexistent/pg-password\"\n"
        ));
        let e = format!("{:#}", load(&p, Vec::new(), &[]).unwrap_err());
        assert!(e.contains("/nonexistent/pg-password"), "{e}");

        let (_d, p) = write(MINIMAL);
        let e = format!(
            "{:#}",
            load(&p, vec![(env_name("postgres.max_lag"), "x".into())], &[]).unwrap_err()
        );
        assert!(e.contains("postgres.max_lag"), "{e}");
        let e = format!(
            "{:#}",
            load(&p, Vec::new(), &["postgres.nope=1".into()]).unwrap_err()
        );
        assert!(e.contains("postgres.nope"), "{e}");
    }

    #[test]
    fn the_command_line_wins_over_the_environment_which_wins_over_the_file() {
        let (_d, p) = write(&format!("{MINIMAL}max_lag = \"3s\"\n"));
        let c = load(&p, Vec::new(), &[]).unwrap();
        assert_eq!(c.postgres.unwrap().max_lag, Duration::from_secs(3));
        let env = vec![(env_name("postgres.max_lag"), "4s".to_string())];
        let c = load(&p, env.clone(), &[]).unwrap();
        assert_eq!(c.postgres.unwrap().max_lag, Duration::from_secs(4));
        let c = load(&p, env, &["postgres.max_lag=5s".into()]).unwrap();
        assert_eq!(c.postgres.unwrap().max_lag, Duration::from_secs(5));
        let env = vec![(env_name("postgres.retention.keep_full"), "7".to_string())];
        let c = load(&p, env, &[]).unwrap();
        assert_eq!(c.postgres.unwrap().retention.unwrap().keep_full, Some(7));
    }

    #[test]
    fn schedules_take_durations_and_cron_expressions() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T01:30:00Z")
            .unwrap()
            .to_utc();
        let every = Schedule::parse("24h").unwrap();
        assert_eq!(every.next_delay(now, None), Duration::ZERO);
        let prev = now - chrono::Duration::hours(23);
        assert_eq!(every.next_delay(now, Some(prev)), Duration::from_secs(3600));
        let cron = Schedule::parse("0 2 * * *").unwrap();
        assert_eq!(cron.next_delay(now, None), Duration::from_secs(1800));
        assert!(Schedule::parse("every tuesday").is_err());
    }
}
