//! `postgres stream` into an encrypted repository (age X25519 from SYNCBRIDGE_RECIPIENTS),
//! and `wal-fetch` reading it back with SYNCBRIDGE_IDENTITY; without the identity it must
//! stop recovery (> 125), never claim the file is missing.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::time::Duration;

use pg_support::{agent, repo, text, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

#[test]
fn encrypted_stream_and_wal_fetch() {
    let pg = PgCluster::builder(PgVersion::V17)
        .wal_keep_size_mb(512)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let id = storage::keys::generate_identity();
    let id_file = dir.path().join("identity.txt");
    std::fs::write(&id_file, storage::keys::identity_to_string(&id)).unwrap();
    let recipient = id.to_public().to_string();
    let url = format!("file://{}", dir.path().join("repo").display());
    let src = pg.replication_url();
    let env = vec![("SYNCBRIDGE_RECIPIENTS".to_string(), recipient.clone())];
    let mut streamer = AgentProcess::spawn_env(
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
