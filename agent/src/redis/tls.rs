//! TLS to a `rediss://` master with rustls: the server's chain is checked against
//! `--tls-ca` (PEM) or the system trust store, and its name against the URL's host (an IP
//! address must be in the certificate's subjectAltName). Redis requires a client
//! certificate unless `tls-auth-clients no`: give `--tls-cert` and `--tls-key`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;

/// Certificates for `rediss://`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA bundle (PEM) to trust instead of the system store.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    pub key: Option<PathBuf>,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The rustls client configuration for these files.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match &files.ca {
        Some(ca) => {
            for cert in certs(ca)? {
                roots.add(cert).with_context(|| {
                    format!("a CA certificate in {} is not usable", ca.display())
                })?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                roots.add(cert).ok();
            }
            if roots.is_empty() {
                bail!("no system CA certificates found; pass --tls-ca");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(roots);
    let config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading the private key {}", key.display()))?;
            builder
                .with_client_auth_cert(certs(cert)?, key)
                .context("the client certificate and key do not match")?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    Ok(Arc::new(config))
}

/// The name the server's certificate must carry.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_owned())
        .with_context(|| format!("{host:?} is not a valid TLS server name"))
}
