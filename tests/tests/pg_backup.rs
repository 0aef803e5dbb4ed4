//! `postgres backup` and `restore` of a base backup against real PostgreSQL: both
//! BASE_BACKUP syntaxes (14 and 15+), a tablespace, files split across objects; the restored
//! directory passes `pg_verifybackup` against the server's own manifest, starts, and holds
//! every row committed before the backup ended.
#![allow(clippy::unwrap_used)]

mod pg_pitr_support;
mod pg_support;

use pg_pitr_support::{start_restored, Env, RestoreDirs};
use pg_support::text;
use syncbridge_tests::pg::PgVersion;

fn backup_and_restore(version: PgVersion) {
    let env = Env::simple(version);
    let ts = syncbridge_tests::process::server_temp_dir("sb-ts-");
    env.pg.sql_blocking(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts.path().display()
    ));
    env.pg.sql_blocking(
        "CREATE TABLE big(id int primary key, pad text);
         INSERT INTO big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 60000) g;
         CREATE TABLE elsewhere(id int, note text) TABLESPACE extra;
         INSERT INTO elsewhere SELECT g, 'ts-' || g FROM generate_series(1, 3000) g;",
    );
    // 1 MiB objects: the ~30 MiB table is split across many.
    let out = env.backup(&["--chunk-mib", "1"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains("(complete)"), "{}", text(&out));
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("backup:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let base = env.repo_path().join("postgres/base").join(&id);
    assert!(base.join("backup.json").is_file());
    assert!(base.join("backup_manifest").is_file());
    let objects = std::fs::read_dir(base.join("data")).unwrap().count();
    assert!(objects >= 20, "{version}: only {objects} data objects");

    // Committed after the backup: a restore of the latest point has it too.
    env.pg
        .sql_blocking("INSERT INTO big VALUES (1000001, 'after the backup')");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);

    let dirs = RestoreDirs::new();
    let map = format!("{}={}", ts.path().display(), dirs.tablespace().display());
    let out = env.restore(&dirs.data(), &["--tablespace-map", &map]);
    assert!(out.status.success(), "restore failed:\n{}", text(&out));
    let data = dirs.data();
    assert!(data.join("global/pg_control").is_file());
    assert!(!data.join("syncbridge-restore.in-progress").exists());
    assert!(data.join("recovery.signal").is_file());
    let auto = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("postgres wal-fetch --repo"), "{auto}");
    assert!(
        auto.contains("recovery_target_action = 'promote'"),
        "{auto}"
    );
    assert!(
        auto.contains("recovery_target_timeline = 'latest'"),
        "{auto}"
    );
    let links: Vec<_> = std::fs::read_dir(data.join("pg_tblspc"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(links.len(), 1, "{links:?}\n{}", text(&out));
    assert_eq!(
        std::fs::read_link(
            data.join("pg_tblspc").join(
                env.pg
                    .query_one_blocking("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'")
            )
        )
        .unwrap(),
        dirs.tablespace()
    );

    // PostgreSQL's own checker: every file of the server's manifest, size and checksum.
    // Only the 15 client programs are installed, and 17+ write manifest version 2 which
    // they cannot read.
    if version.major() <= 16 {
        let verify = std::process::Command::new(env.pg.client_binary("pg_verifybackup"))
            .args(["-n", "-i", "postgresql.auto.conf", "-i", "recovery.signal"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{version}: pg_verifybackup rejects the restore:\n{}",
            text(&verify)
        );
    }

    let restored = start_restored(version, &data);
    assert_eq!(
        restored.query_one_blocking("SELECT count(*) FROM big"),
        "60001"
    );
    assert_eq!(
        restored.query_one_blocking("SELECT count(*) FROM elsewhere"),
        "3000"
    );
    assert_eq!(
        restored.query_one_blocking("SELECT pad FROM big WHERE id = 1000001"),
        "after the backup"
    );
}

#[test]
fn pg17_backup_and_restore_with_tablespace() {
    backup_and_restore(PgVersion::V17);
}

#[test]
fn pg14_backup_and_restore_with_tablespace() {
    backup_and_restore(PgVersion::V14);
}

/// `restore --start`: the agent starts the restored cluster itself, waits for recovery to
/// end and reports where it stopped and how long it took.
#[test]
fn pg16_restore_with_start_reports_the_restored_point() {
    use syncbridge_tests::pg::{SUPERUSER, SUPERUSER_PASSWORD};
    let version = PgVersion::V16;
    let env = Env::simple(version);
    env.pg
        .sql_blocking("CREATE TABLE t(id int); INSERT INTO t SELECT generate_series(1, 1000)");
    env.backup(&[]);
    env.pg.sql_blocking("INSERT INTO t VALUES (1001)");
    let lsn = env.pg.query_one_blocking("SELECT pg_current_wal_lsn()");
    env.wait_archived(&lsn);
    let dirs = RestoreDirs::new();
    let port = syncbridge_tests::process::free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        dirs.parent.path().display()
    );
    let bin = env.pg.bin_dir().display().to_string();
    let out = env.restore(&dirs.data(), &["--start", &bin, "--start-options", &opts]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    // Whatever happened, stop the server it may have started.
    let mut stop = std::process::Command::new(env.pg.bin_dir().join("pg_ctl"));
    stop.arg("-D")
        .arg(dirs.data())
        .args(["-m", "immediate", "stop"]);
    syncbridge_tests::process::run_as_server_user(&mut stop);
    let check = syncbridge_tests::pg::block_on(async {
        let conn = format!(
            "host=127.0.0.1 port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres"
        );
        match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                let row = client
                    .query_one(
                        "SELECT count(*)::text, pg_is_in_recovery()::text FROM t",
                        &[],
                    )
                    .await
                    .unwrap();
                Some((row.get::<_, String>(0), row.get::<_, String>(1)))
            }
            Err(_) => None,
        }
    });
    let _ = stop.output();
    assert!(
        out.status.success(),
        "restore --start failed:\n{}",
        text(&out)
    );
    assert!(stdout.contains("redo done at"), "{stdout}");
    assert!(stdout.contains("durations:"), "{stdout}");
    assert_eq!(
        check,
        Some(("1001".to_string(), "false".to_string())),
        "{stdout}"
    );
}

/// The same through SeaweedFS (S3): backup with the stream on S3, restore from it, and
/// `pg_verifybackup` accepts every file of the server's manifest.
#[test]
fn pg16_backup_and_restore_through_seaweedfs() {
    use syncbridge_tests::S3Server;
    let version = PgVersion::V16;
    let pg = syncbridge_tests::PgCluster::builder(version)
        .wal_keep_size_mb(1024)
        .start();
    let s3 = S3Server::start();
    let repo = s3.repo_url("pg16");
    let work = tempfile::tempdir().unwrap();
    let mut stream = pg_support::agent();
    stream
        .args([
            "postgres",
            "stream",
            "--source",
            &pg.replication_url(),
            "--repo",
            &repo,
            "--max-lag",
            "200ms",
        ])
        .envs(s3.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.path().join("stream.log")).unwrap());
    let mut stream = stream.spawn().unwrap();
    pg.sql_blocking(
        "CREATE TABLE big(id int, pad text); INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 50000) g",
    );
    let out = pg_support::agent()
        .args([
            "postgres",
            "backup",
            "--source",
            &pg.replication_url(),
            "--repo",
            &repo,
            "--chunk-mib",
            "2",
            "--wal-timeout-secs",
            "120",
        ])
        .envs(s3.env())
        .output()
        .unwrap();
    let _ = stream.kill();
    let _ = stream.wait();
    assert!(
        out.status.success(),
        "backup to S3 failed:\n{}\nstream:\n{}",
        text(&out),
        std::fs::read_to_string(work.path().join("stream.log")).unwrap_or_default()
    );
    let target = work.path().join("data");
    let out = pg_support::agent()
        .args(["restore", "--repo", &repo, "--target"])
        .arg(&target)
        .envs(s3.env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restore from S3 failed:\n{}",
        text(&out)
    );
    let verify = std::process::Command::new(pg.client_binary("pg_verifybackup"))
        .args(["-n", "-i", "postgresql.auto.conf", "-i", "recovery.signal"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "pg_verifybackup rejects the restore from S3:\n{}",
        text(&verify)
    );
    let auto = std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains(&format!("--repo {repo} ")) || auto.contains(&format!("--repo ''{repo}''")),
        "{auto}"
    );
    assert!(
        !auto.contains(s3.secret_key()),
        "credentials leaked into {auto}"
    );
}
