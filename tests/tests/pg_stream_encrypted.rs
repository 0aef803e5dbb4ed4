//! `postgres stream` into an encrypted repository (age X25519 from SYNCBRIDGE_RECIPIENTS),
//! and `wal-fetch` reading it back with SYNCBRIDGE_IDENTITY; without the identity it must
//! stop recovery (> 125), never claim the file is missing.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::time::Duration;

use pg_support::{agent, repo, text, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

/// A cluster streaming into a `file://` repository encrypted to a new identity.
struct EncryptedStream {
    pg: PgCluster,
    dir: tempfile::TempDir,
    id_file: std::path::PathBuf,
    recipient: String,
    url: String,
    streamer: AgentProcess,
}

impl EncryptedStream {
    fn start(version: PgVersion) -> EncryptedStream {
        let pg = PgCluster::builder(version).wal_keep_size_mb(512).start();
        let dir = tempfile::tempdir().unwrap();
        let id = storage::keys::generate_identity();
        let id_file = dir.path().join("identity.txt");
        std::fs::write(&id_file, storage::keys::identity_to_string(&id)).unwrap();
        let recipient = id.to_public().to_string();
        let url = format!("file://{}", dir.path().join("repo").display());
        let src = pg.replication_url();
        let env = vec![("SYNCBRIDGE_RECIPIENTS".to_string(), recipient.clone())];
        let streamer = AgentProcess::spawn_env(
            &[
                "postgres",
                "stream",
                "--source",
                &src,
                "--repo",
                &url,
                "--max-lag",
                "200ms",
            ],
            dir.path().join("agent.log"),
            &env,
        );
        EncryptedStream {
            pg,
            dir,
            id_file,
            recipient,
            url,
            streamer,
        }
    }
}

#[test]
fn encrypted_stream_and_wal_fetch() {
    let EncryptedStream {
        pg,
        dir,
        id_file,
        url,
        mut streamer,
        ..
    } = EncryptedStream::start(PgVersion::V17);
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");
    pg.sql_blocking("INSERT INTO t SELECT g, repeat('e', 200) FROM generate_series(1, 40000) g");
    let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .contains(&seg)),
        "{}",
        streamer.log_text()
    );
    assert!(streamer.terminate().success(), "{}", streamer.log_text());

    let target = dir.path().join("out");
    let out = agent()
        .args([
            "postgres",
            "wal-fetch",
            "--repo",
            &url,
            "--prefetch",
            "0",
            &seg,
        ])
        .arg(&target)
        .env("SYNCBRIDGE_IDENTITY", &id_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::read(&target).unwrap() == std::fs::read(pg.pg_wal_dir().join(&seg)).unwrap());

    let out = agent()
        .args([
            "postgres",
            "wal-fetch",
            "--repo",
            &url,
            "--prefetch",
            "0",
            &seg,
        ])
        .arg(dir.path().join("out2"))
        .output()
        .unwrap();
    assert!(out.status.code().unwrap() > 125, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("identity"),
        "{}",
        text(&out)
    );
}

/// Issue 11, case 5: in an encrypted repository, an object replaced by a plaintext one (by
/// someone who can write to the bucket but holds no key) is refused by `repo check`,
/// `wal-fetch` and `restore`, each naming the object.
#[test]
fn plaintext_object_in_encrypted_repository_is_refused_everywhere() {
    let EncryptedStream {
        pg,
        dir,
        id_file,
        recipient,
        url,
        mut streamer,
    } = EncryptedStream::start(PgVersion::V15);
    let src = pg.replication_url();
    pg.sql_blocking("CREATE TABLE t(id int, pad text)");
    pg.sql_blocking("INSERT INTO t SELECT g, repeat('e', 200) FROM generate_series(1, 20000) g");
    let out = agent()
        .args([
            "postgres",
            "backup",
            "--source",
            &src,
            "--repo",
            &url,
            "--wal-timeout-secs",
            "120",
        ])
        .env("SYNCBRIDGE_RECIPIENTS", &recipient)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(
        wait_until(Duration::from_secs(60), || repo::listing(&url)
            .0
            .contains(&seg)),
        "{}",
        streamer.log_text()
    );
    assert!(streamer.terminate().success(), "{}", streamer.log_text());

    // The intruder: no identity, no recipient; writes well-formed plaintext objects.
    let intruder = storage::Repository::open(&url, storage::RepoOptions::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wal_key =
        storage::layout::wal_segment(&storage::layout::WalSegmentName::parse(&seg).unwrap());
    let wal = std::fs::read(pg.pg_wal_dir().join(&seg)).unwrap();
    let inject = |key: &storage::RepoKey, kind: storage::ContentKind| {
        rt.block_on(intruder.put(key, kind, wal.clone().into(), storage::PutMode::Overwrite))
            .unwrap();
    };
    let chunk_key = rt.block_on(async {
        let keys = intruder
            .list(&storage::layout::base_backups_prefix())
            .await
            .unwrap();
        keys.iter()
            .map(|m| m.key.clone())
            .find(|k| {
                matches!(
                    storage::layout::parse_base_backup_key(k),
                    Some(storage::layout::BaseBackupObject::Chunk { .. })
                )
            })
            .expect("the backup has a data chunk")
    });
    let id_arg = id_file.to_str().unwrap();

    // A base backup chunk replaced: restore refuses it, naming it.
    inject(&chunk_key, storage::ContentKind::BaseBackupData);
    let target = dir.path().join("restored");
    let out = agent()
        .args(["restore", "--repo", &url, "--target"])
        .arg(&target)
        .env("SYNCBRIDGE_IDENTITY", &id_file)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains(chunk_key.as_str()) && all.contains("not encrypted"),
        "{all}"
    );

    // A WAL segment replaced: wal-fetch refuses it, naming it, and writes nothing.
    inject(&wal_key, storage::ContentKind::WalSegment);
    let out = agent()
        .args([
            "postgres",
            "wal-fetch",
            "--repo",
            &url,
            "--prefetch",
            "0",
            &seg,
        ])
        .arg(dir.path().join("fetched"))
        .env("SYNCBRIDGE_IDENTITY", &id_file)
        .output()
        .unwrap();
    assert!(out.status.code().unwrap() > 125, "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&seg) && stderr.contains("not encrypted"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("fetched").exists());

    // repo check names both, with or without the identity.
    for extra in [vec![], vec!["--identity", id_arg]] {
        let mut args = vec!["repo", "check", "--repo", url.as_str()];
        args.extend_from_slice(&extra);
        let out = agent().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        for key in [&wal_key, &chunk_key] {
            assert!(
                stdout.lines().any(|l| l.starts_with("FAILED")
                    && l.contains(key.as_str())
                    && l.contains("not encrypted")),
                "{key}: {stdout}"
            );
        }
    }
}
