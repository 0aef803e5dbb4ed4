//! The command line. Sub-commands are added as capabilities land; each validates its
//! arguments into a config before anything touches a server or a repository.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use storage::{RepoOptions, Repository};

use crate::util::redact::{has_userinfo, redact_url};

/// How to reach a repository and its keys: the one definition every command that opens a
/// repository flattens, so `--repo`, `--identity`, `--recipient`… mean the same
/// everywhere. [`RepoArgs::options`] validates it before anything is opened.
#[derive(Args, Clone)]
pub struct RepoArgs {
    /// Repository URL: file:///dir, s3://bucket/prefix (credentials from the AWS_*
    /// environment, never in the URL; options such as
    /// ?endpoint=…&path_style=true&storage_class=…&ca_bundle=…), gs://bucket/prefix,
    /// az://container/prefix.
    #[arg(
        long = "repo",
        env = "SYNCBRIDGE_REPO",
        value_name = "URL",
        hide_env_values = true
    )]
    pub repo: String,
    /// age identity file (AGE-SECRET-KEY-1… lines, as written by `repo keygen` or
    /// age-keygen) to read an encrypted repository; repeat for several.
    #[arg(long = "identity", env = "SYNCBRIDGE_IDENTITY", value_name = "FILE")]
    pub identities: Vec<PathBuf>,
    /// age recipient (age1…) to encrypt new objects to; repeat (or separate with commas)
    /// for several.
    #[arg(
        long = "recipient",
        env = "SYNCBRIDGE_RECIPIENTS",
        value_delimiter = ',',
        value_name = "AGE1…"
    )]
    pub recipients: Vec<String>,
    /// File with age recipients, one per line.
    #[arg(long, env = "SYNCBRIDGE_RECIPIENTS_FILE", value_name = "FILE")]
    pub recipients_file: Option<PathBuf>,
    /// PEM bundle of extra CA certificates for an HTTPS object store.
    #[arg(long, env = "AWS_CA_BUNDLE", value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
}

impl std::fmt::Debug for RepoArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoArgs")
            .field("repo", &redact_url(&self.repo))
            .field("identities", &self.identities)
            .field("recipients", &self.recipients)
            .field("recipients_file", &self.recipients_file)
            .field("ca_bundle", &self.ca_bundle)
            .finish()
    }
}

/// Secret variables of each store that may instead name a file (`NAME_FILE`), with the
/// object_store option each one sets.
const SECRET_FILE_VARS: &[(&str, &[(&str, &str)])] = &[
    (
        "s3",
        &[
            ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
            ("AWS_SESSION_TOKEN", "aws_session_token"),
        ],
    ),
    (
        "gs",
        &[("GOOGLE_SERVICE_ACCOUNT_KEY", "google_service_account_key")],
    ),
    (
        "az",
        &[
            ("AZURE_STORAGE_ACCOUNT_KEY", "azure_storage_account_key"),
            ("AZURE_STORAGE_SAS_KEY", "azure_storage_sas_key"),
            ("AZURE_CLIENT_SECRET", "azure_client_secret"),
        ],
    ),
];

/// The store family of a URL scheme (`s3a` is S3, `abfss` is Azure…).
fn store_family(scheme: &str) -> Option<&'static str> {
    match scheme {
        "s3" | "s3a" => Some("s3"),
        "gs" => Some("gs"),
        "az" | "azure" | "abfs" | "abfss" => Some("az"),
        _ => None,
    }
}

/// Where a store's credentials go instead of the URL, for the refusal message.
fn credential_hint(family: Option<&str>) -> &'static str {
    match family {
        Some("s3") => "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_SECRET_ACCESS_KEY_FILE naming a file that holds it; AWS_SESSION_TOKEN[_FILE] for temporary credentials), or use a role (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN, or the instance profile)",
        Some("gs") => "set GOOGLE_SERVICE_ACCOUNT (a key file) or GOOGLE_SERVICE_ACCOUNT_KEY[_FILE]",
        Some("az") => "set AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY (or AZURE_STORAGE_ACCOUNT_KEY_FILE)",
        _ => "pass them through the store's environment variables",
    }
}

impl RepoArgs {
    /// The URL as it may be shown: without password or query.
    pub fn display_url(&self) -> String {
        redact_url(&self.repo)
    }

    /// Refuses what no command may open: credentials in the URL (they would show in `ps`
    /// and in every message; refused without echoing them) and `memory://`, which keeps
    /// objects in this process only (a stream would advance its slot over WAL kept
    /// nowhere). Library code and tests still open `memory://` through `storage`.
    pub fn validate(&self) -> anyhow::Result<()> {
        let url = self.repo.trim();
        if url.is_empty() {
            bail!("no repository given: pass --repo URL or set SYNCBRIDGE_REPO");
        }
        let parsed = url::Url::parse(url).ok();
        // From the text when it does not parse, so the hint still fits the store.
        let scheme = parsed
            .as_ref()
            .map(|u| u.scheme().to_owned())
            .or_else(|| url.split_once("://").map(|(s, _)| s.to_ascii_lowercase()));
        if has_userinfo(url) {
            let shown = redact_url(url);
            bail!(
                "--repo: credentials in the repository URL are refused (they would show in process listings and messages): give {shown} without them and {}",
                credential_hint(scheme.as_deref().and_then(store_family))
            );
        }
        let known = url.starts_with('/')
            || parsed.as_ref().is_some_and(|u| {
                !u.cannot_be_a_base()
                    && (u.scheme() == "file"
                        || u.scheme() == "memory"
                        || store_family(u.scheme()).is_some())
            });
        if !known {
            bail!(
                "--repo {}: not a repository URL; use file:///dir, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix",
                redact_url(url)
            );
        }
        if scheme.as_deref() == Some("memory") {
            bail!("--repo memory:// keeps objects in this process only and loses them when it exits; use file:///dir or s3://bucket/prefix");
        }
        Ok(())
    }

    /// The repository options these arguments give: validated URL, keys, CA bundle,
    /// secrets from `*_FILE` variables of the URL's store and the container format version
    /// of new objects (`SYNCBRIDGE_FORMAT_VERSION`). Other settings are defaults.
    pub fn options(&self) -> anyhow::Result<RepoOptions> {
        self.validate()?;
        let mut opts = RepoOptions {
            ca_bundle: self.ca_bundle.clone(),
            ..RepoOptions::default()
        };
        for r in self
            .recipients
            .iter()
            .map(|r| r.trim())
            .filter(|r| !r.is_empty())
        {
            opts.recipients.push(
                storage::keys::parse_recipient(r)
                    .context("reading --recipient / SYNCBRIDGE_RECIPIENTS")?,
            );
        }
        if let Some(f) = &self.recipients_file {
            opts.recipients
                .extend(storage::keys::read_recipients_file(f)?);
        }
        for f in &self.identities {
            opts.identities
                .extend(storage::keys::read_identity_file(f)?);
        }
        // Writing an older container format for older readers (storage/FORMAT.md).
        if let Ok(v) = std::env::var("SYNCBRIDGE_FORMAT_VERSION") {
            opts.format_version = v.trim().parse().with_context(|| {
                format!(
                    "SYNCBRIDGE_FORMAT_VERSION={v:?}: not a container format version (2, 3 or 4)"
                )
            })?;
        }
        let family = url::Url::parse(self.repo.trim())
            .ok()
            .and_then(|u| store_family(u.scheme()));
        for (_, vars) in SECRET_FILE_VARS.iter().filter(|(f, _)| Some(*f) == family) {
            for (var, option) in *vars {
                if let Some(secret) = crate::util::secret_file::secret_from_file_var(var)? {
                    opts.store_config.push(((*option).to_owned(), secret));
                }
            }
        }
        Ok(opts)
    }

    /// Opens the repository with [`options`](Self::options).
    pub fn open(&self) -> anyhow::Result<Repository> {
        self.open_with(self.options()?)
    }

    /// Opens the repository with `opts` (from [`options`](Self::options), adjusted).
    pub fn open_with(&self, opts: RepoOptions) -> anyhow::Result<Repository> {
        self.validate()?;
        Repository::open(self.repo.trim(), opts)
            .with_context(|| format!("opening the repository {}", self.display_url()))
    }

    /// The flags that let a child process read this repository as this one does
    /// (`--repo`, `--identity`, `--ca-bundle`), with absolute paths: restore writes them
    /// into `restore_command`, which PostgreSQL runs from the data directory.
    pub fn reader_args(&self) -> anyhow::Result<Vec<String>> {
        let absolute = |p: &PathBuf| -> anyhow::Result<String> {
            let abs =
                std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?;
            abs.into_os_string()
                .into_string()
                .map_err(|p| anyhow::anyhow!("{} is not valid UTF-8", p.to_string_lossy()))
        };
        let mut args = vec!["--repo".to_owned(), self.repo.trim().to_owned()];
        for f in &self.identities {
            args.push("--identity".into());
            args.push(absolute(f)?);
        }
        if let Some(f) = &self.ca_bundle {
            args.push("--ca-bundle".into());
            args.push(absolute(f)?);
        }
        Ok(args)
    }

    /// Puts the identity and CA bundle given as flags into the environment, for a child
    /// process of this binary (wal-fetch's prefetcher) that reads them through the same
    /// variables. Only the first identity is passed: the prefetcher is an optimisation, and
    /// what it cannot read wal-fetch fetches itself with every identity.
    pub fn export_to_env(&self) {
        if let Some(first) = self.identities.first() {
            std::env::set_var("SYNCBRIDGE_IDENTITY", first);
        }
        if let Some(f) = &self.ca_bundle {
            std::env::set_var("AWS_CA_BUNDLE", f);
        }
    }
}

/// Streaming backup agent for PostgreSQL and Redis/Valkey.
#[derive(Debug, Parser)]
#[command(name = "syncbridge-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log lines on stderr: `text` for people, `json` (one object per line: timestamp,
    /// level, target, message, the event's fields, and the job's span) for a log pipeline.
    /// No colour unless stderr is a terminal. The filter is SYNCBRIDGE_LOG (default info).
    #[arg(long, global = true, value_enum, env = "SYNCBRIDGE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up logging on stderr in `format`.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNCBRIDGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version and build facts.
    Version,
    /// PostgreSQL: stream WAL into a repository, fetch WAL for restore_command, check a source.
    Postgres(crate::pg::cli::PostgresArgs),
    /// Redis/Valkey: snapshots as a replica, RDB checks.
    Redis(crate::redis::cli::RedisArgs),
    /// Repository: init, list, cat (decrypt + decompress to stdout), check objects.
    Repo(crate::repo_cmd::RepoCmdArgs),
    /// Restore a backup from a repository: PostgreSQL to a point in time (--to-time,
    /// --to-lsn, --to-xid, or the latest archived point).
    Restore(crate::restore::RestoreArgs),
    /// List what a repository can restore: PostgreSQL base backups (LSN and time ranges,
    /// sizes) and archived WAL per timeline with any holes; Redis generations. --output
    /// json for scripts (docs/list-json.md).
    List(crate::list::ListArgs),
    /// Retention: delete base backups (and the WAL before the oldest kept one) or Redis
    /// generations a policy no longer needs. Every moment within the policy stays
    /// restorable; --dry-run prints the plan.
    Expire(crate::expire::ExpireArgs),
    /// Pin or unpin a PostgreSQL base backup or a Redis generation: a pinned one is never
    /// expired (`backup pin --repo URL ID`, `backup unpin --repo URL ID`).
    Backup(crate::pin::BackupArgs),
    /// Check that the repository is healthy and restorable now: every object's checksums,
    /// every base backup's files, WAL continuity on every timeline, each Redis generation's
    /// snapshot and chunk chain, and with --max-age that the stream is current. Exit 0
    /// healthy, 1 damaged (each object named), 2 stale. --output json for scripts
    /// (docs/verify-json.md).
    Verify(crate::verify::VerifyArgs),
    /// The sidecar: run every job a configuration file describes (PostgreSQL and Redis
    /// streams, scheduled base backups with retention, Redis retention, scheduled verify),
    /// with /healthz, /readyz and /metrics; packaging/agent.toml is the commented example.
    Run(crate::run::RunArgs),
}

/// Runs one command's future on a fresh multi-threaded runtime: every sub-command that
/// talks to a server or a repository starts here.
pub fn block_on<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(future)
}

/// [`block_on`] on a single-threaded runtime: the thread that polls `future` also waits
/// for the sockets, so a read that becomes ready resumes it directly instead of through a
/// worker thread waking this one (two thread switches per socket read). For a command
/// whose work is one task that is not `Send` (`postgres stream`); CPU-heavy work still
/// runs in parallel on the blocking pool (storage's frame workers).
pub fn block_on_current_thread<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(future)
}

/// `version`: what a bug report needs to say which build it is.
fn version_text() -> String {
    format!(
        "syncbridge-agent {}\ncommit:        {}\nbuilt:         {}\ncompiler:      {}\ntarget:        {}-{}\nrepositories:  {}\nobject format: v{} (reads v{} to v{})\n",
        env!("CARGO_PKG_VERSION"),
        env!("SYNCBRIDGE_GIT_COMMIT"),
        env!("SYNCBRIDGE_BUILD_DATE"),
        env!("SYNCBRIDGE_RUSTC"),
        std::env::consts::ARCH,
        std::env::consts::OS,
        storage::BACKENDS
            .iter()
            .map(|b| format!("{b}://"))
            .collect::<Vec<_>>()
            .join(" "),
        storage::format::FORMAT_VERSION,
        storage::format::UNBOUND_FORMAT_VERSION,
        storage::format::FORMAT_VERSION,
    )
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Run(args) = cli.command {
        // The configuration may choose the log format, so it is read first.
        let config = crate::run::load(&args);
        let from_config = config
            .as_ref()
            .ok()
            .and_then(|c| c.agent.log_format.as_deref())
            .map(|f| match f {
                "json" => LogFormat::Json,
                _ => LogFormat::Text,
            });
        init_logging(cli.log_format.or(from_config).unwrap_or(LogFormat::Text));
        return crate::run::run(args, config?);
    }
    init_logging(cli.log_format.unwrap_or(LogFormat::Text));
    match cli.command {
        Command::Version => {
            print!("{}", version_text());
            Ok(ExitCode::SUCCESS)
        }
        Command::Postgres(args) => crate::pg::cli::run(args),
        Command::Redis(args) => crate::redis::cli::run(args),
        Command::Repo(args) => crate::repo_cmd::run(args),
        Command::Restore(args) => crate::restore::run(args),
        Command::List(args) => crate::list::run(args),
        Command::Expire(args) => crate::expire::run(args),
        Command::Backup(args) => crate::pin::run(args),
        Command::Verify(args) => crate::verify::run(args),
        Command::Run(_) => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    fn repo(url: &str) -> RepoArgs {
        RepoArgs {
            repo: url.into(),
            identities: Vec::new(),
            recipients: Vec::new(),
            recipients_file: None,
            ca_bundle: None,
        }
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_echo() {
        for url in [
            "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/p",
            "s3://AKIAEXAMPLE@bucket/p",
            "s3://AKIAEXAMPLE:wJalr XUtnFEMI@buck et/p",
            "AKIAEXAMPLE:wJalrXUtnFEMI@bucket/p",
        ] {
            let e = format!("{:#}", repo(url).options().err().unwrap());
            assert!(
                !e.contains("AKIAEXAMPLE") && !e.contains("wJalr"),
                "{url}: {e}"
            );
            assert!(!format!("{:?}", repo(url)).contains("wJalr"), "{url}");
        }
        let e = format!(
            "{:#}",
            repo("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/p")
                .validate()
                .unwrap_err()
        );
        assert!(
            e.contains("AWS_ACCESS_KEY_ID") && e.contains("AWS_SECRET_ACCESS_KEY"),
            "{e}"
        );
        assert!(e.contains("s3://bucket/p"), "{e}");
        let e = format!(
            "{:#}",
            repo("az://user:pw@container/p").validate().unwrap_err()
        );
        assert!(e.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{e}");
    }

    #[test]
    fn memory_and_unknown_urls_are_refused() {
        for url in ["memory://", "memory:///x", "", "relative/dir", "ftp://h/x"] {
            assert!(repo(url).validate().is_err(), "{url:?} accepted");
        }
        for url in [
            "file:///srv/repo",
            "/srv/repo",
            "s3://bucket/p?endpoint=http://127.0.0.1:9000",
            "gs://b/p",
            "az://c/p",
        ] {
            repo(url).validate().unwrap();
        }
    }

    #[test]
    fn reader_args_are_absolute() {
        let mut r = repo("s3://b/p?region=x");
        r.identities = vec!["id.txt".into()];
        let args = r.reader_args().unwrap();
        assert_eq!(args[..3], ["--repo", "s3://b/p?region=x", "--identity"]);
        assert!(args[3].starts_with('/') && args[3].ends_with("/id.txt"));
    }

    /// Every command that reads objects takes `--identity` (storage errors tell the user
    /// to pass it), and every duration flag takes humantime's forms.
    #[test]
    fn identity_and_durations_everywhere() {
        Cli::command().debug_assert();
        let id = ["--repo", "file:///r", "--identity", "/k"];
        let commands: &[&[&str]] = &[
            &["restore", "--target", "/t"],
            &["list"],
            &["verify", "--max-age", "5m"],
            &["postgres", "wal-fetch", "f", "p"],
            &[
                "postgres",
                "stream",
                "--max-lag",
                "1.5s",
                "--status-interval",
                "8w",
            ],
            &["postgres", "backup", "--wal-timeout", "1.5m"],
            &["postgres", "backup", "--wal-timeout-secs", "3"],
            &[
                "redis",
                "restore",
                "--target",
                "/t",
                "--to-time",
                "2026-02-12 10:00:00",
            ],
            &["redis", "verify"],
            &[
                "redis",
                "stream",
                "--max-lag",
                "1.5s",
                "--snapshot-every",
                "14d",
            ],
            &["redis", "stream", "--snapshot-every", "off"],
            &["redis", "snapshot"],
            &["repo", "ls"],
            &["repo", "cat", "k"],
            &["repo", "check"],
            &["repo", "init", "--kind", "postgres"],
        ];
        for c in commands {
            let mut argv = vec!["x"];
            argv.extend_from_slice(&c[..c.len().min(2)]);
            if c[0] == "list" || c[0] == "restore" || c[0] == "verify" {
                argv.truncate(2);
                argv.extend_from_slice(&id);
                argv.extend_from_slice(&c[1..]);
            } else {
                argv.extend_from_slice(&id);
                argv.extend_from_slice(&c[2..]);
            }
            if let Err(e) = Cli::try_parse_from(&argv) {
                panic!("{argv:?}: {e}");
            }
        }
        assert!(Cli::try_parse_from([
            "x",
            "restore",
            "--repo",
            "file:///r",
            "--target",
            "/t",
            "--start-timeout",
            "1.5m"
        ])
        .is_ok());
    }
}
