//! One way to say things, and no secret on a command line (issue 11, Deliver 9 and 10, the
//! case-12 "smaller ones", and `memory://` from Deliver 7): every command takes the same
//! repository options (`--repo`, `--identity`, …), refuses `memory://` and credentials in
//! the URL (without echoing them), parses durations and `--to-time` the same way, and
//! reads passwords from files. Most cases need no server; the others use one PostgreSQL 15,
//! one Redis 7 and SeaweedFS.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;
mod redis_support;

use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use storage::keys::{generate_identity, identity_to_string};
use storage::{layout, ContentKind, PutMode, RepoKey, RepoOptions, Repository};
use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::redis::{RedisFlavor, RedisServer};
use syncbridge_tests::s3::{S3Server, TempRepo};

/// The agent with no repository, PostgreSQL, Redis or store setting leaking in.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    syncbridge_tests::agent::command(&[
        "SYNCBRIDGE_",
        "AWS_",
        "PG",
        "REDISCLI_",
        "GOOGLE_",
        "AZURE_",
    ])
    .args(args)
    .envs(env.iter().copied())
    .output()
    .unwrap()
}

fn text(out: &Output) -> String {
    pg_support::text(out)
}

/// Every command that opens a repository, with what else it needs to get that far (a
/// source that is never contacted, a target, a file name).
fn every_repo_command() -> Vec<Vec<&'static str>> {
    let pg = "postgres://replicator@127.0.0.1:1/postgres";
    let redis = "redis://127.0.0.1:1";
    vec![
        vec!["postgres", "stream", "--source", pg],
        vec!["postgres", "backup", "--source", pg],
        vec![
            "postgres",
            "wal-fetch",
            "000000010000000000000001",
            "/nonexistent/x",
        ],
        vec!["redis", "snapshot", "--source", redis],
        vec!["redis", "stream", "--source", redis],
        vec!["redis", "restore", "--target", "/nonexistent/t"],
        vec!["redis", "verify"],
        vec!["repo", "init", "--kind", "postgres"],
        vec!["repo", "ls"],
        vec!["repo", "cat", "postgres/marker.json"],
        vec!["repo", "check"],
        vec!["restore", "--target", "/nonexistent/t"],
        vec!["list"],
        vec!["backup", "pin", "20261201T100000Z"],
        vec!["backup", "unpin", "20261201T100000Z"],
    ]
}

fn with_repo<'a>(cmd: &[&'a str], repo: &'a str) -> Vec<&'a str> {
    let mut v = cmd.to_vec();
    v.extend(["--repo", repo]);
    v
}

/// Deliver 7 / case 9: `--repo memory://` keeps nothing; every command refuses it before
/// touching a server, with a usage-level message (not a clap error: the arguments parsed).
#[test]
fn memory_repo_refused_by_every_command() {
    for cmd in every_repo_command() {
        for url in ["memory://", "memory:///prefix"] {
            let out = agent(&with_repo(&cmd, url), &[]);
            let code = out.status.code();
            assert!(
                code == Some(1) || (cmd[1] == "wal-fetch" && code == Some(200)),
                "{cmd:?} {url}: {}",
                text(&out)
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("memory:// keeps objects in this process only"),
                "{cmd:?}: {}",
                text(&out)
            );
        }
        // The same from the environment.
        let out = agent(&cmd, &[("SYNCBRIDGE_REPO", "memory://")]);
        assert!(!out.status.success(), "{cmd:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("memory://"),
            "{cmd:?}: {}",
            text(&out)
        );
    }
}

/// Case 9 (second part): `postgres stream --repo memory://` against a real server stops at
/// once and creates no slot, so the server never advances a slot over WAL kept nowhere.
/// Then the same stream into a `file://` repository with `--max-lag 1.5s` runs.
#[test]
fn case9_postgres_stream_memory_repo_refused_no_slot_and_fractional_max_lag_streams() {
    let pg = PgCluster::start(PgVersion::V15);
    let started = std::time::Instant::now();
    let out = agent(
        &[
            "postgres",
            "stream",
            "--source",
            &pg.replication_url(),
            "--repo",
            "memory://",
            "--slot",
            "mem_slot",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(text(&out).contains("memory://"), "{}", text(&out));
    assert_eq!(
        pg.query_one_blocking("SELECT count(*) FROM pg_replication_slots"),
        "0"
    );

    // The same command into a real repository, with a fractional --max-lag (case 12),
    // streams: WAL reaches the repository.
    let dir = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let source = pg.replication_url();
    let mut stream = pg_support::AgentProcess::spawn(
        &[
            "postgres",
            "stream",
            "--source",
            &source,
            "--repo",
            &repo,
            "--max-lag",
            "1.5s",
            "--status-interval",
            "2.5s",
        ],
        dir.path().join("stream.log"),
    );
    pg.sql_blocking("CREATE TABLE t(id int); INSERT INTO t VALUES (1); SELECT pg_switch_wal()");
    let wal = dir.path().join("repo/postgres/wal");
    let stored = pg_support::wait_until(Duration::from_secs(60), || walkdir_files(&wal) > 0);
    assert!(stored, "no WAL stored:\n{}", stream.log_text());
    assert!(stream.terminate().success(), "{}", stream.log_text());
}

/// Files under `dir`, recursively (0 if it does not exist).
fn walkdir_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                walkdir_files(&p)
            } else {
                1
            }
        })
        .sum()
}

/// Case 12: credentials in a repository URL are refused by every command, the message
/// names the environment variables to use, and neither the key nor the secret is echoed.
#[test]
fn case12_credentials_in_repo_url_refused_without_echo() {
    let key = "AKIAUNIFORMITYKEY";
    let secret = "wJalrXUtnFEMIsecretUNIFORMITY";
    let urls = [
        format!("s3://{key}:{secret}@bucket/p"),
        format!("s3://{key}:{secret}@bucket/p?endpoint=http://127.0.0.1:1"),
        format!("s3://{key}@bucket/p"),
        // Not even a valid URL: still not echoed.
        format!("s3://{key}:{secret}@buck et/p"),
    ];
    for cmd in every_repo_command() {
        for url in &urls {
            let out = agent(&with_repo(&cmd, url), &[]);
            let all = text(&out);
            assert!(!out.status.success(), "{cmd:?} {url}: {all}");
            assert!(
                !all.contains(key) && !all.contains(secret),
                "{cmd:?} echoed a credential: {all}"
            );
            assert!(
                all.contains("credentials in the repository URL are refused"),
                "{cmd:?}: {all}"
            );
            assert!(
                all.contains("AWS_ACCESS_KEY_ID") && all.contains("AWS_SECRET_ACCESS_KEY"),
                "{cmd:?}: {all}"
            );
        }
    }
    // From the environment too, and for the other stores with their own variables.
    let url = format!("s3://{key}:{secret}@bucket/p");
    let out = agent(&["repo", "ls"], &[("SYNCBRIDGE_REPO", &url)]);
    assert!(
        !out.status.success() && !text(&out).contains(secret),
        "{}",
        text(&out)
    );
    let out = agent(
        &["repo", "ls", "--repo", &format!("az://acct:{secret}@c/p")],
        &[],
    );
    assert!(
        text(&out).contains("AZURE_STORAGE_ACCOUNT_KEY"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(secret), "{}", text(&out));
}

/// Case 12 / Deliver 9: the object-store secret from a file (`AWS_SECRET_ACCESS_KEY_FILE`,
/// and the access key id likewise) against SeaweedFS; both the variable and its `_FILE`
/// set is refused, naming both and echoing neither.
#[test]
fn case12_s3_secret_from_file() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("aws-secret");
    let key_file = dir.path().join("aws-key");
    std::fs::write(&secret_file, format!("{}\n", s3.secret_key())).unwrap();
    std::fs::write(&key_file, s3.access_key()).unwrap();
    let secret_path = secret_file.to_str().unwrap().to_owned();
    let key_path = key_file.to_str().unwrap().to_owned();
    let env: Vec<(String, String)> = s3
        .env()
        .into_iter()
        .filter(|(k, _)| k != "AWS_SECRET_ACCESS_KEY" && k != "AWS_ACCESS_KEY_ID")
        .chain([
            ("AWS_SECRET_ACCESS_KEY_FILE".to_owned(), secret_path.clone()),
            ("AWS_ACCESS_KEY_ID_FILE".to_owned(), key_path),
        ])
        .collect();
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = s3.repo_url("secret-file");
    let out = agent(
        &["repo", "init", "--repo", &url, "--kind", "redis"],
        &env_ref,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = agent(&["repo", "ls", "--repo", &url], &env_ref);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("syncbridge-repo"),
        "{}",
        text(&out)
    );
    // A wrong secret in the file is refused by the store: the file really is used.
    let wrong = dir.path().join("wrong-secret");
    std::fs::write(&wrong, "not-the-secret\n").unwrap();
    let wrong_env: Vec<(&str, &str)> = env_ref
        .iter()
        .map(|&(k, v)| {
            if k == "AWS_SECRET_ACCESS_KEY_FILE" {
                (k, wrong.to_str().unwrap())
            } else {
                (k, v)
            }
        })
        .collect();
    let out = agent(&["repo", "ls", "--repo", &url], &wrong_env);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("not-the-secret"), "{}", text(&out));
    // Both forms at once: refused, secret not shown.
    let mut both = env_ref.clone();
    both.push(("AWS_SECRET_ACCESS_KEY", s3.secret_key()));
    let out = agent(&["repo", "ls", "--repo", &url], &both);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("both AWS_SECRET_ACCESS_KEY and AWS_SECRET_ACCESS_KEY_FILE are set"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(s3.secret_key()), "{}", text(&out));
}

fn kind_of(key: &RepoKey) -> ContentKind {
    if key.as_str().ends_with(".history") {
        ContentKind::TimelineHistory
    } else {
        ContentKind::Other
    }
}

/// An encrypted `file://` repository of `kind` with one object written by the library,
/// and the identity file that reads it.
fn encrypted_repo(kind: &str, key: &str, data: &[u8]) -> (TempRepo, std::path::PathBuf) {
    let repo_dir = TempRepo::new();
    let id = generate_identity();
    let id_file = repo_dir.path().join(".identity");
    std::fs::write(&id_file, identity_to_string(&id)).unwrap();
    let recipient = id.to_public().to_string();
    let out = agent(
        &[
            "repo",
            "init",
            "--repo",
            &repo_dir.url(),
            "--kind",
            kind,
            "--recipient",
            &recipient,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let repo = Repository::open(
        &repo_dir.url(),
        RepoOptions {
            recipients: vec![id.to_public()],
            ..RepoOptions::default()
        },
    )
    .unwrap();
    let key = RepoKey::parse(key).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(repo.put(
            &key,
            kind_of(&key),
            Bytes::copy_from_slice(data),
            PutMode::CreateNew,
        ))
        .unwrap();
    (repo_dir, id_file)
}

/// Case 12: storage errors tell the user to pass `--identity`, and every command that
/// reads objects accepts it (`restore`, `list`, `postgres wal-fetch`, `redis
/// restore|verify`, `repo …`); where an object is read, the identity is what makes it work.
#[test]
fn case12_identity_accepted_by_every_reader() {
    // A timeline history file: wal-fetch serves it (and checks it parses, ending before
    // timeline 2).
    let history = b"1\t0/3000000\tno recovery target specified\n";
    let key = layout::timeline_history(layout::TimelineId::new(2).unwrap());
    let key = key.as_str();
    let (repo_dir, id_file) = encrypted_repo("postgres", key, history);
    let url = repo_dir.url();
    let id = id_file.to_str().unwrap();
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("RECOVERYHISTORY");
    let dest_s = dest.to_str().unwrap();

    // Without the identity: the hint names --identity...
    let out = agent(
        &[
            "postgres",
            "wal-fetch",
            "--repo",
            &url,
            "--prefetch",
            "0",
            "00000002.history",
            dest_s,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(200), "{}", text(&out));
    assert!(text(&out).contains("--identity"), "{}", text(&out));
    let out = agent(&["repo", "cat", "--repo", &url, key], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--identity"), "{}", text(&out));
    let out = agent(&["repo", "check", "--repo", &url, key], &[]);
    assert!(text(&out).contains("pass --identity"), "{}", text(&out));

    // ...and the flag exists and works.
    let out = agent(
        &[
            "postgres",
            "wal-fetch",
            "--repo",
            &url,
            "--identity",
            id,
            "--prefetch",
            "0",
            "00000002.history",
            dest_s,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), history);
    let out = agent(&["repo", "cat", "--repo", &url, "--identity", id, key], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(out.stdout, history);
    let out = agent(&["repo", "check", "--repo", &url, "--identity", id], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("pass --identity"), "{}", text(&out));
    let out = agent(
        &["repo", "ls", "--long", "--repo", &url, "--identity", id],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = agent(&["list", "--repo", &url, "--identity", id], &[]);
    assert!(out.status.success(), "{}", text(&out));

    // restore: the flag is accepted (the repository has no base backup to restore).
    let target = work.path().join("pgdata");
    let out = agent(
        &[
            "restore",
            "--repo",
            &url,
            "--identity",
            id,
            "--target",
            target.to_str().unwrap(),
        ],
        &[],
    );
    assert_ne!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        !text(&out).contains("unexpected argument"),
        "{}",
        text(&out)
    );

    // Redis: verify and restore accept it too.
    let (redis_dir, redis_id) = encrypted_repo("redis", "redis/unrelated", b"x");
    let rid = redis_id.to_str().unwrap();
    for cmd in [
        vec!["redis", "verify"],
        vec!["redis", "restore", "--target", target.to_str().unwrap()],
    ] {
        let mut argv = cmd.clone();
        let redis_url = redis_dir.url();
        argv.extend(["--repo", &redis_url, "--identity", rid]);
        let out = agent(&argv, &[]);
        assert_ne!(out.status.code(), Some(2), "{cmd:?}: {}", text(&out));
        assert!(
            !text(&out).contains("unexpected argument"),
            "{}",
            text(&out)
        );
    }
}

/// Case 12: one duration parser. `postgres stream --max-lag 1.5s` and `redis stream
/// --max-lag 1.5s` both parse (the command then stops at the memory:// refusal, after
/// argument parsing), as do 500ms, 14d and 8w; `off` where a flag can be disabled; a
/// wrong duration is a usage error (exit 2) listing the forms.
#[test]
fn case12_one_duration_parser() {
    let pg = "postgres://replicator@127.0.0.1:1/postgres";
    let redis = "redis://127.0.0.1:1";
    let parses = |argv: &[&str]| {
        let out = agent(argv, &[]);
        assert_eq!(out.status.code(), Some(1), "{argv:?}: {}", text(&out));
        assert!(text(&out).contains("memory://"), "{argv:?}: {}", text(&out));
    };
    for lag in ["1.5s", "500ms", "2m", "1"] {
        parses(&[
            "postgres",
            "stream",
            "--source",
            pg,
            "--repo",
            "memory://",
            "--max-lag",
            lag,
        ]);
        parses(&[
            "redis",
            "stream",
            "--source",
            redis,
            "--repo",
            "memory://",
            "--max-lag",
            lag,
        ]);
    }
    parses(&[
        "postgres",
        "stream",
        "--source",
        pg,
        "--repo",
        "memory://",
        "--status-interval",
        "1.5s",
    ]);
    for every in ["14d", "8w", "off", "90m"] {
        parses(&[
            "redis",
            "stream",
            "--source",
            redis,
            "--repo",
            "memory://",
            "--snapshot-every",
            every,
        ]);
    }
    parses(&[
        "restore",
        "--repo",
        "memory://",
        "--target",
        "/nonexistent/t",
        "--start-timeout",
        "1.5m",
    ]);
    for bad in ["1.5x", "0s", "soon", "-1s"] {
        for cmd in ["postgres", "redis"] {
            let src = if cmd == "postgres" { pg } else { redis };
            let lag = format!("--max-lag={bad}");
            let out = agent(
                &[cmd, "stream", "--source", src, "--repo", "memory://", &lag],
                &[],
            );
            assert_eq!(out.status.code(), Some(2), "{cmd} {bad}: {}", text(&out));
            assert!(text(&out).contains("--max-lag"), "{}", text(&out));
        }
    }
    let out = agent(
        &[
            "postgres",
            "stream",
            "--source",
            pg,
            "--repo",
            "memory://",
            "--max-lag",
            "1.5x",
        ],
        &[],
    );
    assert!(text(&out).contains("1.5s, 500ms"), "{}", text(&out));
}

/// Case 12: one `--to-time` parser for PostgreSQL and Redis. An impossible offset is
/// refused by both before anything is written; the PostgreSQL form
/// `YYYY-MM-DD HH:MM:SS` (UTC) is accepted by both (each then stops for its own reason:
/// these repositories hold nothing to restore).
#[test]
fn case12_one_to_time_parser() {
    let repos: Vec<(TempRepo, &str)> = ["postgres", "redis"]
        .into_iter()
        .map(|kind| {
            let r = TempRepo::new();
            let out = agent(&["repo", "init", "--repo", &r.url(), "--kind", kind], &[]);
            assert!(out.status.success(), "{}", text(&out));
            (r, kind)
        })
        .collect();
    let work = tempfile::tempdir().unwrap();
    for (repo, kind) in &repos {
        let url = repo.url();
        let target = work.path().join(format!("{kind}-target"));
        let t = target.to_str().unwrap();
        let mut commands = vec![vec!["restore"]];
        if *kind == "redis" {
            commands.push(vec!["redis", "restore"]);
        }
        for cmd in commands {
            let run = |time: &str| {
                let mut argv = cmd.clone();
                argv.extend(["--repo", &url, "--target", t, "--to-time", time]);
                agent(&argv, &[])
            };
            for bad in [
                "2026-02-12T10:00:00+25:00",
                "2026-02-12 10:00:00+25:00",
                "2026-02-12 10:00:00+01:60",
                "2026-02-30 10:00:00",
            ] {
                let out = run(bad);
                assert!(
                    !out.status.success(),
                    "{kind} {cmd:?} {bad}: {}",
                    text(&out)
                );
                assert!(
                    text(&out).contains("--to-time") || text(&out).contains("not a time"),
                    "{}",
                    text(&out)
                );
                assert!(
                    !target.exists(),
                    "{kind} {cmd:?} {bad}: the target was created"
                );
            }
            let out = run("2026-02-12T10:00:00+25:00");
            assert!(
                text(&out).contains("impossible time zone offset"),
                "{}",
                text(&out)
            );
            for good in [
                "2026-02-12 10:00:00",
                "2026-02-12T10:00:00Z",
                "2026-02-12 11:00:00+01",
                "@1770890400000",
            ] {
                let out = run(good);
                let all = text(&out);
                assert!(
                    !all.contains("not a time")
                        && !all.contains("time zone")
                        && !all.contains("@<unix"),
                    "{kind} {cmd:?} {good}: {all}"
                );
            }
        }
    }
}

/// Deliver 9 and case 12 together on a real Redis 7 with `requirepass`: the password comes
/// from `--password-file` (so `ps` shows none), `redis stream --max-lag 1.5s` runs, and
/// `redis restore --to-time 'YYYY-MM-DD HH:MM:SS.fff'` (the PostgreSQL form, UTC) restores.
#[test]
fn redis_password_file_stream_and_space_separated_to_time() {
    let server = RedisServer::builder(RedisFlavor::Redis7)
        .password("pw-from-file")
        .start();
    assert!(server.cmd(&["SET", "before", "1"]).is_ok());
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "pw-from-file\n").unwrap();
    let pw_s = pw.to_str().unwrap();
    let repo = TempRepo::new();
    let source = format!("redis://127.0.0.1:{}", server.port());

    // A wrong file is an authentication error; an empty one is refused before connecting.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "nope\n").unwrap();
    let out = agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &source,
            "--password-file",
            bad.to_str().unwrap(),
            "--repo",
            &repo.url(),
        ],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("nope"), "{}", text(&out));
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let out = agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &source,
            "--password-file",
            empty.to_str().unwrap(),
            "--repo",
            &repo.url(),
        ],
        &[],
    );
    assert!(text(&out).contains("is empty"), "{}", text(&out));
    // In the URL and in a file: which one is meant is unclear, refused.
    let out = agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &format!("redis://:other@127.0.0.1:{}", server.port()),
            "--password-file",
            pw_s,
            "--repo",
            &repo.url(),
        ],
        &[],
    );
    assert!(text(&out).contains("given twice"), "{}", text(&out));

    let mut stream = redis_support::StreamingAgent::start_with(
        &source,
        &repo.url(),
        &["--max-lag", "1.5s", "--password-file", pw_s],
        &[],
        dir.path().join("stream.log"),
    );
    stream.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut c = server.connect();
    assert!(c.cmd(&["SET", "wanted", "yes"]).is_ok());
    std::thread::sleep(Duration::from_millis(200));
    let cut = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(200));
    assert!(c.cmd(&["SET", "too-late", "yes"]).is_ok());
    // --max-lag 1.5s: the commands are stored within it; wait a little more.
    std::thread::sleep(Duration::from_millis(3000));
    assert!(stream.terminate(), "{}", stream.log_text());

    let target = dir.path().join("restored");
    let when = cut.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    let out = agent(
        &[
            "redis",
            "restore",
            "--repo",
            &repo.url(),
            "--target",
            target.to_str().unwrap(),
            "--to-time",
            &when,
            "--format",
            "aof-single",
        ],
        &[],
    );
    assert!(out.status.success(), "{when}: {}", text(&out));
    let aof = std::fs::read(target.join("appendonly.aof")).unwrap();
    let contains = |needle: &str| aof.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(contains("wanted"), "the command before {when} is missing");
    assert!(!contains("too-late"), "a command after {when} was replayed");
}

/// Case 12 end to end: an encrypted repository restored with `--identity FILE` given as a
/// flag only (no SYNCBRIDGE_IDENTITY anywhere): restore reads the base backup with it and
/// writes it into `restore_command`, so the restored server's wal-fetch decrypts the WAL
/// too, and the row committed after the backup is there.
#[test]
fn restore_with_identity_flag_on_encrypted_repository() {
    use std::os::unix::fs::PermissionsExt;
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(1024)
        .start();
    let dir = syncbridge_tests::process::server_temp_dir("sb-cli-id-");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The repository is private unless shared with the server's group (what Env::new does).
    pg_pitr_support::share_repo_with_server_group(&dir.path().join("repo"));
    let id = generate_identity();
    let id_file = dir.path().join("identity.txt");
    std::fs::write(&id_file, identity_to_string(&id)).unwrap();
    // restore_command runs as the server's user (the tests may run as root).
    std::fs::set_permissions(&id_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let recipient = id.to_public().to_string();
    let enc = [("SYNCBRIDGE_RECIPIENTS".to_owned(), recipient.clone())];
    let source = pg.replication_url();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let stream = pg_support::AgentProcess::spawn_env(
        &pg_support::stream_args(&source, &repo),
        dir.path().join("stream.log"),
        &enc,
    );
    let mut env = pg_pitr_support::Env {
        pg,
        dir,
        stream: Some(stream),
    };
    env.pg
        .sql_blocking("CREATE TABLE t(id int); INSERT INTO t SELECT generate_series(1, 500)");
    let out = pg_support::agent()
        .args(["postgres", "backup", "--source", &source, "--repo", &repo])
        .args(["--wal-timeout", "2m"])
        .envs(enc.iter().cloned())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", text(&out), env.stream_log());
    env.pg.sql_blocking("INSERT INTO t VALUES (501)");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    let _ = env.stream.take();

    let dirs = pg_pitr_support::RestoreDirs::new();
    // Without the identity the restore is refused, naming the flag.
    let out = env.restore(&dirs.data(), &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--identity"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(dirs.data());
    let id_arg = id_file.to_str().unwrap();
    let out = env.restore(&dirs.data(), &["--identity", id_arg]);
    assert!(out.status.success(), "{}", text(&out));
    let auto = std::fs::read_to_string(dirs.data().join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains(&format!("--identity {id_arg}")), "{auto}");
    let restored = pg_pitr_support::start_restored(PgVersion::V15, &dirs.data());
    assert_eq!(restored.query_one_blocking("SELECT count(*) FROM t"), "501");
}

/// `--help` prints the values of environment variables behind flags; for the sources and
/// the repository (which may carry a password) it must not.
#[test]
fn help_never_shows_secrets_from_the_environment() {
    let secret = "hunter2-in-env";
    let redis = format!("redis://:{secret}@cache:6379");
    let pg = format!("host=db user=replicator password={secret}");
    let repo = format!("s3://AKIA:{secret}@bucket/p");
    for cmd in [
        vec!["redis", "stream", "--help"],
        vec!["redis", "snapshot", "--help"],
        vec!["postgres", "stream", "--help"],
        vec!["postgres", "backup", "--help"],
        vec!["postgres", "check", "--help"],
        vec!["restore", "--help"],
        vec!["repo", "ls", "--help"],
    ] {
        let out = agent(
            &cmd,
            &[
                ("SYNCBRIDGE_REDIS_SOURCE", &redis),
                ("SYNCBRIDGE_PG_SOURCE", &pg),
                ("SYNCBRIDGE_REPO", &repo),
            ],
        );
        assert!(out.status.success(), "{cmd:?}: {}", text(&out));
        assert!(!text(&out).contains(secret), "{cmd:?}: {}", text(&out));
    }
}

/// Deliver 9: a password on the command line (where `ps` shows it) draws a warning naming
/// the file-based alternative; the same source from the environment does not.
#[test]
fn password_on_the_command_line_is_warned_about() {
    let warning = "the password in --source is visible to every local user";
    let cases = [
        (
            "redis",
            "redis://:pw@127.0.0.1:1",
            "--password-file",
            "SYNCBRIDGE_REDIS_SOURCE",
        ),
        (
            "postgres",
            "postgres://replicator:pw@127.0.0.1:1/postgres",
            "PGPASSFILE",
            "SYNCBRIDGE_PG_SOURCE",
        ),
    ];
    for (cmd, source, instead, env) in cases {
        let out = agent(
            &[cmd, "stream", "--source", source, "--repo", "memory://"],
            &[],
        );
        assert!(text(&out).contains(warning), "{}", text(&out));
        assert!(text(&out).contains(instead), "{}", text(&out));
        let out = agent(&[cmd, "stream", "--repo", "memory://"], &[(env, source)]);
        assert!(!text(&out).contains(warning), "{}", text(&out));
        let quiet = source.replace(":pw@", "@");
        let out = agent(
            &[cmd, "stream", "--source", &quiet, "--repo", "memory://"],
            &[],
        );
        assert!(!text(&out).contains(warning), "{}", text(&out));
    }
}

/// `version` prints the build facts a bug report needs (issue 14, Deliver 7).
#[test]
fn version_prints_the_build_facts() {
    let out = agent(&["version"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
            .to_string()
    };
    assert!(
        stdout.starts_with(&format!("syncbridge-agent {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    let commit = field("commit:");
    // The commit the binary was built from: this checkout's, unless built outside git.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        // HEAD, or an earlier commit of this history when a commit came after the build.
        Some(head) => assert!(
            commit.len() >= 7
                && (head.starts_with(&commit)
                    || std::process::Command::new("git")
                        .args(["merge-base", "--is-ancestor", &commit, &head])
                        .status()
                        .is_ok_and(|s| s.success())),
            "commit {commit} is not a commit of this checkout's history (HEAD {head})"
        ),
        None => assert_eq!(commit, "unknown", "{stdout}"),
    }
    assert!(field("built:").ends_with('Z'), "{stdout}");
    assert!(field("compiler:").starts_with("rustc 1."), "{stdout}");
    let backends = field("repositories:");
    for scheme in ["file://", "s3://"] {
        assert!(backends.contains(scheme), "{stdout}");
    }
    assert!(field("object format:").starts_with("v4"), "{stdout}");
}

/// Runs `postgres stream` against a port nothing listens on for a moment (it keeps
/// retrying) and returns what it logged on stderr, piped.
fn retrying_stream_log(extra: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", dir.path().join("repo").display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let source = format!("postgres://replicator@127.0.0.1:{port}/postgres");
    let mut args = vec!["postgres", "stream", "--source", &source, "--repo", &repo];
    args.extend_from_slice(extra);
    let child = syncbridge_tests::agent::command(&["SYNCBRIDGE_", "AWS_", "PG"])
        .args(&args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `--log-format json` (or SYNCBRIDGE_LOG_FORMAT=json): every line is one JSON object with
/// timestamp, level, message and the job; piped text has no escape codes (issue 14,
/// Deliver 5).
#[test]
fn json_logs_parse_and_piped_text_has_no_colour() {
    for log in [
        retrying_stream_log(&["--log-format", "json"], &[]),
        retrying_stream_log(&[], &[("SYNCBRIDGE_LOG_FORMAT", "json")]),
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "expected retries and a stop:\n{log}");
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{log}"));
            assert!(
                v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{line}"
            );
            assert!(v["level"].is_string(), "{line}");
            assert!(v["message"].is_string(), "{line}");
        }
        assert!(
            lines.iter().any(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["span"]["job"] == "postgres stream"
                    && v["message"].as_str().unwrap().contains("retrying in")
            }),
            "no retry line naming the job:\n{log}"
        );
        assert!(!log.contains('\u{1b}'), "{log}");
    }
    let text_log = retrying_stream_log(&[], &[]);
    assert!(text_log.contains("retrying in"), "{text_log}");
    assert!(
        !text_log.contains('\u{1b}'),
        "escape codes in piped text:\n{text_log}"
    );
    assert!(
        serde_json::from_str::<serde_json::Value>(text_log.lines().next().unwrap()).is_err(),
        "text is the default:\n{text_log}"
    );
}
