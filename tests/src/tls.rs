//! Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1 and
//! `localhost`, and a client certificate, made with the `openssl` command line tool
//! (Debian's, always present here).
//!
//! A real CA and a separate leaf, not one self-signed certificate: rustls (webpki) refuses
//! a CA certificate presented as a server's own, and so would a careful client.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Paths of a CA certificate and the server and client keys and certificates it signed.
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The CA certificate (PEM): what a client trusts.
    pub ca: PathBuf,
    /// The server certificate (PEM), valid for IP 127.0.0.1 and DNS localhost.
    pub server_cert: PathBuf,
    /// The server's private key (PEM, unencrypted).
    pub server_key: PathBuf,
    /// A client certificate (PEM, CN=client), for servers that demand one.
    pub client_cert: PathBuf,
    /// The client's private key (PEM, unencrypted).
    pub client_key: PathBuf,
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

/// Makes `ca.crt`, `server.crt`/`server.key` and `client.crt`/`client.key` in `dir`
/// (valid for two days).
pub fn make_test_certs(dir: &Path) -> TestCerts {
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
    for (who, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=client")] {
        let (key, csr, crt) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
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
                &key,
                "-out",
                &csr,
                "-subj",
                subject,
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                "san.cnf",
            ],
        );
    }
    TestCerts {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}
