//! `syncbridge-agent repo init|ls|cat|check`: look inside a repository without the
//! servers. `cat` decrypts and decompresses one object to stdout; `check` verifies one
//! object or every object under a prefix and prints one line per object.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use storage::{RepoKey, RepoKind, RepoMarker, Repository};
use tokio::io::AsyncWriteExt;

use crate::cli::RepoArgs;

/// `repo` arguments.
#[derive(Debug, Args)]
pub struct RepoCmdArgs {
    #[command(subcommand)]
    command: RepoCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Postgres,
    Redis,
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Generate an age X25519 identity for an encrypted repository: writes the identity
    /// (secret: keep it away from the sidecar; restores take it as --identity FILE or
    /// SYNCBRIDGE_IDENTITY) to FILE with mode 0600 and prints the recipient for
    /// SYNCBRIDGE_RECIPIENTS.
    Keygen {
        /// Where to write the identity; refused if it exists.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Create the repository marker (kind, format, encryption); prints the existing one
    /// if the repository is already initialised.
    Init {
        #[command(flatten)]
        repo: RepoArgs,
        /// What the repository will hold.
        #[arg(long, value_enum)]
        kind: KindArg,
        /// PostgreSQL system identifier to record (normally recorded by `postgres stream`).
        #[arg(long)]
        system_identifier: Option<String>,
        /// Redis replication id to record (normally recorded by `redis stream`).
        #[arg(long)]
        replication_id: Option<String>,
    },
    /// List objects (the whole repository, or under PREFIX).
    Ls {
        #[command(flatten)]
        repo: RepoArgs,
        /// Key prefix, e.g. postgres/wal/00000001.
        prefix: Option<String>,
        /// Also read each object's header and trailer: kind, original size, SHA-256.
        #[arg(short, long)]
        long: bool,
    },
    /// Write one object's original bytes (decrypted, decompressed, verified) to stdout.
    /// If the object is damaged, the bytes before the damage may already be written; the
    /// command then fails naming the object and the check.
    Cat {
        #[command(flatten)]
        repo: RepoArgs,
        /// The object's key.
        key: String,
    },
    /// Verify one object, or every object under a prefix (default: everything); prints
    /// OK or FAILED per object and exits 1 if any failed.
    Check {
        #[command(flatten)]
        repo: RepoArgs,
        /// Key or prefix.
        target: Option<String>,
    },
}

/// Runs `repo …`.
pub fn run(args: RepoCmdArgs) -> anyhow::Result<ExitCode> {
    crate::cli::block_on(async move {
        match args.command {
            RepoCommand::Keygen { out } => keygen(&out),
            RepoCommand::Init {
                repo,
                kind,
                system_identifier,
                replication_id,
            } => init(&repo.open()?, kind, system_identifier, replication_id).await,
            RepoCommand::Ls { repo, prefix, long } => {
                ls(&repo.open()?, prefix.as_deref(), long).await
            }
            RepoCommand::Cat { repo, key } => cat(&repo.open()?, &key).await,
            RepoCommand::Check { repo, target } => check(&repo.open()?, target.as_deref()).await,
        }
    })
}

async fn init(
    repo: &Repository,
    kind: KindArg,
    system_identifier: Option<String>,
    replication_id: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut m = RepoMarker::new(match kind {
        KindArg::Postgres => RepoKind::Postgres,
        KindArg::Redis => RepoKind::Redis,
    });
    m.system_identifier = system_identifier;
    m.replication_id = replication_id;
    let res = repo
        .init_marker(&m)
        .await
        .with_context(|| format!("initialising {}", repo.url()))?;
    let (word, marker) = match &res {
        storage::MarkerInit::Created(m) => ("initialised", m),
        storage::MarkerInit::Existing(m) => ("already initialised", m),
    };
    println!("{} {word}:", repo.url());
    println!("{}", serde_json::to_string_pretty(marker)?);
    if let storage::MarkerInit::Existing(existing) = &res {
        if existing.kind != m.kind {
            bail!(
                "the repository holds {:?} backups, not {:?}",
                existing.kind,
                m.kind
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_key(text: &str) -> anyhow::Result<RepoKey> {
    Ok(RepoKey::parse(text)?)
}

async fn ls(repo: &Repository, prefix: Option<&str>, long: bool) -> anyhow::Result<ExitCode> {
    let prefix = parse_key(prefix.unwrap_or(""))?;
    let objects = repo
        .list(&prefix)
        .await
        .with_context(|| format!("listing {prefix} in {}", repo.url()))?;
    let mut out = std::io::stdout().lock();
    for o in &objects {
        let when = o.last_modified.format("%Y-%m-%dT%H:%M:%SZ");
        if long {
            match repo.info(&o.key).await {
                Ok(i) => writeln!(
                    out,
                    "{when}  {:>12}  {:>12}  {:<20} {}{}  {}",
                    o.size,
                    i.original_len,
                    i.kind.name(),
                    if i.encrypted { "enc " } else { "" },
                    i.sha256_hex(),
                    o.key
                )?,
                Err(e) => writeln!(out, "{when}  {:>12}  ?  {}  ({e})", o.size, o.key)?,
            }
        } else {
            writeln!(out, "{when}  {:>12}  {}", o.size, o.key)?;
        }
    }
    if objects.is_empty() {
        eprintln!("no objects under {prefix} in {}", repo.url());
    }
    Ok(ExitCode::SUCCESS)
}

async fn cat(repo: &Repository, key: &str) -> anyhow::Result<ExitCode> {
    let key = parse_key(key)?;
    let mut r = repo.reader(&key).await?;
    let mut out = tokio::io::stdout();
    while let Some(chunk) = r.next_chunk().await? {
        out.write_all(&chunk).await.context("writing to stdout")?;
    }
    out.flush().await.context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

async fn check(repo: &Repository, target: Option<&str>) -> anyhow::Result<ExitCode> {
    let target = parse_key(target.unwrap_or(""))?;
    let keys: Vec<RepoKey> = if !target.is_root() && repo.exists(&target).await? {
        vec![target.clone()]
    } else {
        repo.list(&target)
            .await
            .with_context(|| format!("listing {target} in {}", repo.url()))?
            .into_iter()
            .map(|m| m.key)
            .collect()
    };
    if keys.is_empty() {
        bail!("no objects under {target} in {}", repo.url());
    }
    let (mut ok, mut failed, mut stored_only) = (0usize, 0usize, 0usize);
    // In a PostgreSQL repository, WAL is also checked as WAL (as wal-fetch does), so a
    // well-formed object that holds another segment or another cluster's WAL is caught.
    // Encrypted WAL without an identity is checked up to its stored bytes only.
    let wal_expect = match repo.read_marker().await {
        Ok(Some(m))
            if m.kind == RepoKind::Postgres && (m.encryption.is_none() || repo.can_decrypt()) =>
        {
            Some(crate::pg::wal_fetch::WalExpect::new(&m, None, None)?)
        }
        _ => None,
    };
    for key in &keys {
        let wal = wal_expect
            .as_ref()
            .and_then(|e| storage::layout::parse_wal_key(key).map(|w| (w, e)));
        let result = match wal {
            Some((w, expect)) => check_wal_object(repo, key, &w, expect).await,
            None => repo.verify(key).await.map_err(anyhow::Error::from),
        };
        match result {
            Ok(v) => {
                ok += 1;
                let note = if v.plaintext_verified {
                    String::new()
                } else {
                    stored_only += 1;
                    "  (encrypted: stored bytes verified; pass --identity to check the SHA-256)"
                        .into()
                };
                println!(
                    "OK      {key}  {} bytes  sha256 {}{note}",
                    v.info.original_len,
                    v.info.sha256_hex()
                );
            }
            Err(e) => {
                failed += 1;
                println!("FAILED  {key}  {e:#}");
            }
        }
    }
    eprintln!(
        "{} object(s) checked: {ok} ok, {failed} failed{}",
        keys.len(),
        if stored_only > 0 {
            format!(", {stored_only} checked without decryption")
        } else {
            String::new()
        }
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Verifies a WAL object like any other and, when its content can be read (not encrypted,
/// or an identity given), checks it as WAL: a segment's length and first page header, a
/// history file's timeline.
pub(crate) async fn check_wal_object(
    repo: &Repository,
    key: &RepoKey,
    wal: &storage::layout::WalObject,
    expect: &crate::pg::wal_fetch::WalExpect,
) -> anyhow::Result<storage::VerifyReport> {
    use storage::layout::WalObject;
    let mut reader = repo.reader(key).await?;
    let mut head: Vec<u8> = Vec::new();
    let mut len = 0u64;
    let keep = match wal {
        WalObject::History(_) => usize::MAX,
        _ => wire::pg::page::LONG_PAGE_HEADER_LEN,
    };
    while let Some(chunk) = reader.next_chunk().await? {
        len += chunk.len() as u64;
        if head.len() < keep {
            let n = (keep - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..n]);
        }
    }
    let info = reader
        .info()
        .with_context(|| format!("{key}: reader ended without verifying the trailer"))?;
    match wal {
        WalObject::Segment(name) => {
            crate::pg::wal_fetch::check_segment(
                name.as_str(),
                len,
                &head,
                wire::pg::page::Extent::Complete,
                expect,
            )?;
        }
        WalObject::Partial {
            segment,
            end_offset,
        } => {
            crate::pg::wal_fetch::check_segment(
                segment.as_str(),
                len,
                &head,
                wire::pg::page::Extent::Partial(u64::from(*end_offset)),
                expect,
            )?;
        }
        WalObject::Delta { start, end, .. } => {
            // A delta's bytes are checked as WAL when its segment is assembled (wal-fetch,
            // restore); here its length must match its name, and the first delta starts
            // with the segment's long page header.
            let want = u64::from(end - start);
            if len != want {
                anyhow::bail!("{key} holds {len} bytes, but its name says {want}");
            }
            if *start == 0 {
                if let Some(segment) = wal.segment() {
                    crate::pg::wal_fetch::check_segment(
                        segment.as_str(),
                        len,
                        &head,
                        wire::pg::page::Extent::Partial(len),
                        expect,
                    )?;
                }
            }
        }
        WalObject::History(tli) => {
            crate::pg::wal_fetch::check_history_file(&head, wire::pg::TimelineId::new(tli.get())?)?;
        }
    }
    Ok(storage::VerifyReport {
        info,
        plaintext_verified: true,
    })
}

/// Writes a new identity to `out` (created exclusively, mode 0600) and prints its recipient.
fn keygen(out: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let id = storage::keys::generate_identity();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist)", out.display()))?;
    file.write_all(storage::keys::identity_to_string(&id).as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "identity:  {} (secret; readers take it as --identity FILE or SYNCBRIDGE_IDENTITY)",
        out.display()
    );
    println!("recipient: {}", id.to_public());
    println!(
        "encrypt with: export SYNCBRIDGE_RECIPIENTS={}",
        id.to_public()
    );
    Ok(ExitCode::SUCCESS)
}
