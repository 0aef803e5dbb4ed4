//! Throwaway certificates for TLS tests: a CA and a server certificate for 127.0.0.1 and
//! `localhost`, made with the `openssl` command line tool (Debian's, always present here).
//!
//! A real CA and a separate leaf, not one self-signed certificate: rustls (webpki) refuses
//! a CA certificate presented as a server's own, and so would a careful client.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Paths of a CA certificate and a server key and certificate signed by it.
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The CA certificate (PEM): what a client trusts.
    pub ca: PathBuf,
    /// The server certificate (PEM), valid for IP 127.0.0.1 and DNS localhost.
    pub server_cert: PathBuf,
    /// The server's private key (PEM, unencrypted).
    pub server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl (needed for TLS test certificates): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `ca.crt`, `server.crt` and `server.key` in `dir` (valid for two days).
pub fn make_server_certs(dir: &Path) -> TestCerts {
    std::fs::write(
        dir.join("san.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap_or_else(|e| panic!("writing san.cnf in {}: {e}", dir.display()));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=sb-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
        ],
    );
    TestCerts {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
    }
}
