//! The replication connection against real PostgreSQL: authentication methods, connection
//! string forms, the standard environment, and clear errors for the usual mistakes.
#![allow(clippy::unwrap_used)]

mod pg_support;

use pg_support::{agent, run_agent, text};
use syncbridge_tests::pg::{PgCluster, PgVersion, REPLICATION_PASSWORD};

fn sysid(pg: &PgCluster) -> String {
    pg.query_one_blocking("SELECT system_identifier FROM pg_control_system()")
}

/// Puts `line` first in pg_hba.conf and reloads.
fn prepend_hba(pg: &PgCluster, line: &str) {
    let path = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{line}\n{old}")).unwrap();
    pg.query_one_blocking("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(300));
}

#[test]
fn check_over_scram_url_and_keywords_and_env() {
    let pg = PgCluster::start(PgVersion::V17);
    let want = sysid(&pg);

    let out = run_agent(&["postgres", "check", "--source", &pg.replication_url()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("system_identifier: {want}")),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("wal_segment_size:  16MB"), "{}", text(&out));
    assert!(stdout.contains("timeline:          1"), "{}", text(&out));

    let out = run_agent(&["postgres", "check", "--source", &pg.replication_conninfo()]);
    assert!(out.status.success(), "{}", text(&out));

    // Only the environment: PGHOST/PGPORT/PGUSER/PGPASSWORD, empty --source.
    let out = agent()
        .args(["postgres", "check"])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", "replicator")
        .env("PGPASSWORD", REPLICATION_PASSWORD)
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&want));

    // A password file instead of a password.
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!(
            "127.0.0.1:{}:*:replicator:{REPLICATION_PASSWORD}\n",
            pg.port()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = agent()
        .args([
            "postgres",
            "check",
            "--source",
            &format!("host=127.0.0.1 port={} user=replicator", pg.port()),
        ])
        .env("PGPASSFILE", &passfile)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn md5_and_cleartext_password_auth() {
    let pg = PgCluster::start(PgVersion::V15);
    pg.sql_blocking(
        "SET password_encryption = 'md5'; CREATE ROLE md5rep LOGIN REPLICATION PASSWORD 'md5-pw'; \
         RESET password_encryption; CREATE ROLE plainrep LOGIN REPLICATION PASSWORD 'plain-pw';",
    );
    prepend_hba(
        &pg,
        "host replication md5rep 127.0.0.1/32 md5\nhost replication plainrep 127.0.0.1/32 password",
    );
    for (user, pw) in [("md5rep", "md5-pw"), ("plainrep", "plain-pw")] {
        let url = format!(
            "postgres://{user}:{pw}@127.0.0.1:{}/postgres?sslmode=disable",
            pg.port()
        );
        let out = run_agent(&["postgres", "check", "--source", &url]);
        assert!(out.status.success(), "{user}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&sysid(&pg)));
    }
}

#[test]
fn clear_errors_for_wrong_password_missing_replication_and_no_password() {
    let pg = PgCluster::start(PgVersion::V17);
    let url = format!(
        "postgres://replicator:wrong@127.0.0.1:{}/postgres",
        pg.port()
    );
    let out = run_agent(&["postgres", "check", "--source", &url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wrong password for role \"replicator\""),
        "{}",
        text(&out)
    );

    pg.sql_blocking("CREATE ROLE norep LOGIN PASSWORD 'pw'");
    let url = format!("postgres://norep:pw@127.0.0.1:{}/postgres", pg.port());
    let out = run_agent(&["postgres", "check", "--source", &url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lacks the REPLICATION attribute"),
        "{}",
        text(&out)
    );

    let url = format!("postgres://replicator@127.0.0.1:{}/postgres", pg.port());
    let out = run_agent(&["postgres", "check", "--source", &url]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("none was given"),
        "{}",
        text(&out)
    );

    let out = run_agent(&[
        "postgres",
        "check",
        "--source",
        "host=127.0.0.1 sslmode=sometimes user=x",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid sslmode"),
        "{}",
        text(&out)
    );
}

#[test]
fn sslmode_require_fails_clearly_without_server_tls() {
    let pg = PgCluster::start(PgVersion::V17);
    let url = format!("{}?sslmode=require", pg.replication_url());
    let out = run_agent(&["postgres", "check", "--source", &url]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not accept TLS"),
        "{}",
        text(&out)
    );
    // prefer falls back to plain TCP
    let url = format!("{}?sslmode=prefer", pg.replication_url());
    let out = run_agent(&["postgres", "check", "--source", &url]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A multi-host source whose first host accepts TCP but never answers (a hung or
/// half-dead node): each host gets 10 s by default, then the next one is used.
#[test]
fn multi_host_source_moves_past_a_silent_host() {
    let pg = PgCluster::start(PgVersion::V17);
    // Bound and listening, never accepting: connects succeed, nothing is ever answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let src = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=replicator password={REPLICATION_PASSWORD} dbname=postgres",
        silent.local_addr().unwrap().port(),
        pg.port()
    );
    let started = std::time::Instant::now();
    let out = run_agent(&["postgres", "check", "--source", &src]);
    let waited = started.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("server:            127.0.0.1:{}", pg.port())),
        "{}",
        text(&out)
    );
    // It did wait for the silent host (so the timeout is what moved it on), and not for
    // the kernel's TCP timeout.
    assert!(
        waited >= std::time::Duration::from_secs(9) && waited < std::time::Duration::from_secs(60),
        "took {waited:?}"
    );
    drop(silent);
}

/// `postgres check` on a multi-host source lists every server with its role and cluster,
/// and fails when the list mixes clusters (a failover between them could never continue
/// the same repository).
#[test]
fn check_lists_each_server_and_refuses_mixed_clusters() {
    let a = PgCluster::start(PgVersion::V17);
    let b = PgCluster::start(PgVersion::V17);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead); // nothing listens there now: connection refused
    let src = |ports: &str| {
        format!(
            "host=127.0.0.1,127.0.0.1 port={ports} user=replicator password={REPLICATION_PASSWORD} dbname=postgres"
        )
    };

    let out = run_agent(&[
        "postgres",
        "check",
        "--source",
        &src(&format!("{dead_port},{}", a.port())),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("127.0.0.1:{dead_port}: not reachable")),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains(&format!(
            "127.0.0.1:{}: primary, system_identifier {}",
            a.port(),
            sysid(&a)
        )),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains(&format!("server:            127.0.0.1:{}", a.port())),
        "{}",
        text(&out)
    );

    let out = run_agent(&[
        "postgres",
        "check",
        "--source",
        &src(&format!("{},{}", a.port(), b.port())),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 different clusters"), "{}", text(&out));
    assert!(stdout.contains(&sysid(&b)), "{}", text(&out));
}
