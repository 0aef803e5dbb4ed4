//! End to end: a base backup taken without WAL (`pg_basebackup -X none`) recovers with
//! `restore_command = 'syncbridge-agent postgres wal-fetch …'` from the WAL the agent streamed,
//! including the rows that only exist in the newest partial segment.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use pg_support::{agent_bin, repo, wait_until, AgentProcess};
use syncbridge_tests::pg::{PgCluster, PgVersion};

fn open_up(path: &Path) {
    let meta = std::fs::metadata(path).unwrap();
    let mode = if meta.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    if meta.is_dir() {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            open_up(&e.path());
        }
    }
}

#[test]
fn recovery_through_wal_fetch_replays_everything_streamed() {
    let version = PgVersion::V15;
    let pg = PgCluster::builder(version).wal_keep_size_mb(512).start();
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("repo");
    let url = format!("file://{}", repo_dir.display());
    let src = pg.replication_url();
    let mut agent = AgentProcess::spawn(
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
    );
    pg.sql_blocking("CREATE TABLE marks(id int PRIMARY KEY, pad text)");
    pg.sql_blocking("INSERT INTO marks SELECT g, 'before' FROM generate_series(1, 1000) g");
    let backup = pg.temp_dir().join("backup");
    pg.run(
        "pg_basebackup",
        &["-D", backup.to_str().unwrap(), "-X", "none", "-c", "fast"],
    );
    // After the backup: whole segments, then a tail that only a partial holds.
    for i in 0..3 {
        pg.sql_blocking(&format!(
            "INSERT INTO marks SELECT g, repeat('a', 300) FROM generate_series({}, {}) g",
            10_000 + i * 30_000,
            10_000 + i * 30_000 + 29_999
        ));
        pg.query_one_blocking("SELECT pg_switch_wal()");
    }
    pg.sql_blocking("INSERT INTO marks VALUES (999999, 'tail')");
    let want: u64 = pg
        .query_one_blocking("SELECT count(*) FROM marks")
        .parse()
        .unwrap();
    let end = pg.query_one_blocking("SELECT pg_current_wal_lsn()::text");
    let tail_seg = pg.query_one_blocking("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let (hi, lo) = end.split_once('/').unwrap();
    let end_off = u32::try_from(u64::from_str_radix(lo, 16).unwrap() % (16 << 20)).unwrap();
    let _ = hi;
    assert!(
        wait_until(Duration::from_secs(120), || repo::listing(&url)
            .1
            .iter()
            .any(|(s, o)| *s == tail_seg && *o >= end_off)),
        "tail never became durable:\n{}",
        agent.log_text()
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());
    open_up(dir.path());
    // The server user runs restore_command: the binary must be executable by it.
    let bin = agent_bin();
    let mode = std::fs::metadata(&bin).unwrap().permissions().mode() | 0o755;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(mode)).unwrap();

    // Restore: the backup plus restore_command, nothing from pg_wal.
    let restore_command = format!(
        "{} postgres wal-fetch --repo {url} %f %p",
        agent_bin().display()
    );
    let auto = backup.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
    conf.push_str(&format!(
        "\nrestore_command = '{restore_command}'\nrecovery_target_action = 'promote'\n"
    ));
    std::fs::write(&auto, conf).unwrap();
    std::fs::write(backup.join("recovery.signal"), "").unwrap();
    let restored = PgCluster::builder(version)
        .existing_data_dir(&backup)
        .start_timeout(Duration::from_secs(180))
        .start();
    assert!(
        wait_until(Duration::from_secs(60), || restored
            .query_one_blocking("SELECT pg_is_in_recovery()")
            == "f"),
        "restored cluster did not finish recovery:\n{}",
        restored.log_tail()
    );
    let got: u64 = restored
        .query_one_blocking("SELECT count(*) FROM marks")
        .parse()
        .unwrap();
    assert_eq!(got, want, "restored rows\n{}", restored.log_tail());
    assert_eq!(
        restored.query_one_blocking("SELECT pad FROM marks WHERE id = 999999"),
        "tail"
    );
    let log = std::fs::read_to_string(restored.log_path()).unwrap();
    assert!(log.contains("restored log file"), "{log}");
}
