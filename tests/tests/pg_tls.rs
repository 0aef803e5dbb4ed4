//! The replication connection over TLS against a real server with a test CA: every sslmode,
//! host-name checking, and client certificates.
#![allow(clippy::unwrap_used)]

mod pg_support;

use std::path::Path;
use std::process::Command;

use pg_support::{run_agent, text};
use syncbridge_tests::pg::{PgCluster, PgVersion, REPLICATION_PASSWORD};
use syncbridge_tests::process::chown_to_server_user;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for `localhost`, and a client certificate for `replicator`.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=syncbridge-test-ca",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\n").unwrap();
    for (name, cn) in [("server", "localhost"), ("client", "replicator")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

/// Makes a CA, server and client certificates in `certs` and turns TLS on in `pg`.
fn enable_ssl(pg: &PgCluster, certs: &Path) {
    make_certs(certs);
    for f in ["server.crt", "server.key", "ca.crt"] {
        let dest = pg.data_dir().join(f);
        std::fs::copy(certs.join(f), &dest).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_to_server_user(&dest);
    }
    pg.sql_blocking("ALTER SYSTEM SET ssl = on");
    pg.sql_blocking("ALTER SYSTEM SET ssl_cert_file = 'server.crt'");
    pg.sql_blocking("ALTER SYSTEM SET ssl_key_file = 'server.key'");
    pg.sql_blocking("ALTER SYSTEM SET ssl_ca_file = 'ca.crt'");
}

fn check(url: &str) -> std::process::Output {
    run_agent(&["postgres", "check", "--source", url])
}

#[test]
fn tls_sslmodes_hostname_and_client_certificates() {
    let pg = PgCluster::start(PgVersion::V17);
    let certs = tempfile::tempdir().unwrap();
    enable_ssl(&pg, certs.path());
    // Replication connections without TLS are rejected, so every success below was TLS.
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostnossl replication replicator 127.0.0.1/32 reject\n{old}"),
    )
    .unwrap();
    pg.sql_blocking("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let port = pg.port();
    let ca = certs.path().join("ca.crt");
    let ca = ca.display();
    let base = |host: &str, extra: &str| {
        format!("host={host} port={port} user=replicator password={REPLICATION_PASSWORD} dbname=postgres {extra}")
    };

    // require: encrypted, not authenticated.
    let out = check(&base("127.0.0.1", "sslmode=require"));
    assert!(out.status.success(), "{}", text(&out));

    // verify-full: right name passes, wrong name fails, missing CA is explained.
    let out = check(&base(
        "localhost",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    ));
    assert!(out.status.success(), "{}", text(&out));
    let out = check(&base(
        "127.0.0.1",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    ));
    assert!(
        !out.status.success(),
        "verify-full accepted a certificate for another name: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS handshake"),
        "{}",
        text(&out)
    );
    let out = check(&base("localhost", "sslmode=verify-full"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a root certificate"),
        "{}",
        text(&out)
    );

    // verify-ca: the chain is checked, the name is not.
    let out = check(&base(
        "127.0.0.1",
        &format!("sslmode=verify-ca sslrootcert={ca}"),
    ));
    assert!(out.status.success(), "{}", text(&out));
    // ... and a CA that did not sign the server certificate is refused.
    let other = tempfile::tempdir().unwrap();
    openssl(
        other.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=other-ca",
        ],
    );
    let out = check(&base(
        "127.0.0.1",
        &format!(
            "sslmode=verify-ca sslrootcert={}",
            other.path().join("ca.crt").display()
        ),
    ));
    assert!(
        !out.status.success(),
        "verify-ca accepted an unknown CA: {}",
        text(&out)
    );

    // Client certificates: the server demands one for replication connections.
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl replication replicator 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n{old}"
        ),
    )
    .unwrap();
    pg.query_one_blocking("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = check(&base("127.0.0.1", "sslmode=disable"));
    assert!(
        !out.status.success(),
        "plain connection accepted despite hostnossl reject: {}",
        text(&out)
    );
    let out = check(&base("127.0.0.1", "sslmode=require"));
    assert!(
        !out.status.success(),
        "connection without a client certificate accepted: {}",
        text(&out)
    );
    let cert = certs.path().join("client.crt");
    let key = certs.path().join("client.key");
    let out = check(&base(
        "127.0.0.1",
        &format!(
            "sslmode=require sslcert={} sslkey={}",
            cert.display(),
            key.display()
        ),
    ));
    assert!(out.status.success(), "{}", text(&out));
}

/// SCRAM channel binding (`tls-server-end-point`): used by default over TLS, demanded by
/// `channel_binding=require` (the server checks our hash of its certificate, so a success
/// proves the hash is right), turned off by `disable`; `require` refuses a connection
/// without TLS and a login that skips SCRAM.
#[test]
fn scram_channel_binding() {
    let pg = PgCluster::start(PgVersion::V17);
    let certs = tempfile::tempdir().unwrap();
    enable_ssl(&pg, certs.path());
    pg.sql_blocking("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let port = pg.port();
    let base = |extra: &str| {
        format!("host=127.0.0.1 port={port} user=replicator password={REPLICATION_PASSWORD} dbname=postgres {extra}")
    };
    let stdout = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();

    for extra in ["sslmode=require", "sslmode=require channel_binding=require"] {
        let out = check(&base(extra));
        assert!(out.status.success(), "{extra}: {}", text(&out));
        assert!(
            stdout(&out).contains("SCRAM channel binding (tls-server-end-point)"),
            "{extra}: {}",
            text(&out)
        );
    }
    let out = check(&base("sslmode=require channel_binding=disable"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("login not channel-bound"),
        "{}",
        text(&out)
    );

    let out = check(&base("sslmode=disable channel_binding=require"));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("channel_binding=require") && stderr(&out).contains("not TLS"),
        "{}",
        text(&out)
    );

    // A server that lets the role in without SCRAM cannot prove it holds the certificate.
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostssl replication replicator 127.0.0.1/32 trust\n{old}"),
    )
    .unwrap();
    pg.sql_blocking("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = check(&base("sslmode=require channel_binding=require"));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("without SCRAM channel binding"),
        "{}",
        text(&out)
    );
    let out = check(&base("sslmode=require"));
    assert!(
        out.status.success(),
        "prefer still connects: {}",
        text(&out)
    );
}

/// WAL streamed over TLS (`sslmode=require`, plain connections refused) is stored
/// byte-identical to pg_wal: the stream reads XLogData through the TLS layer straight
/// into its segment buffers, headers and WAL apart.
#[test]
fn wal_streamed_over_tls_is_byte_identical() {
    use pg_support::{repo, wait_until, AgentProcess};
    let pg = PgCluster::builder(PgVersion::V15)
        .wal_keep_size_mb(512)
        .start();
    let certs = tempfile::tempdir().unwrap();
    enable_ssl(&pg, certs.path());
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostnossl replication replicator 127.0.0.1/32 reject\n{old}"),
    )
    .unwrap();
    pg.sql_blocking("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let work = tempfile::tempdir().unwrap();
    let repo_url = format!("file://{}", work.path().join("repo").display());
    let source = format!(
        "host=127.0.0.1 port={} user=replicator password={REPLICATION_PASSWORD} dbname=postgres sslmode=require",
        pg.port()
    );
    let mut agent = AgentProcess::spawn(
        &[
            "postgres",
            "stream",
            "--source",
            &source,
            "--repo",
            &repo_url,
            "--max-lag",
            "200ms",
        ],
        work.path().join("agent.log"),
    );
    let mut last = String::new();
    for _ in 0..2 {
        pg.sql_blocking(
            "CREATE TABLE IF NOT EXISTS load(id int, pad text); INSERT INTO load SELECT g, repeat('x', 200) FROM generate_series(1, 60000) g;",
        );
        last = pg.query_one_blocking("SELECT pg_walfile_name(pg_switch_wal())");
    }
    let ok = wait_until(std::time::Duration::from_secs(120), || {
        assert!(
            agent.exited().is_none(),
            "agent exited:\n{}",
            agent.log_text()
        );
        repo::listing(&repo_url).0.iter().any(|s| *s >= last)
    });
    assert!(ok, "segment {last} never stored:\n{}", agent.log_text());
    let segs = repo::segments(&repo_url);
    assert!(segs.len() >= 2, "only {} segments", segs.len());
    for (name, data) in &segs {
        let on_server = std::fs::read(pg.pg_wal_dir().join(name)).unwrap();
        assert!(data[..] == on_server[..], "{name} differs from pg_wal");
    }
    assert!(agent.terminate().success(), "{}", agent.log_text());
}
