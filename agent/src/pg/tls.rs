//! TLS for PostgreSQL connections with rustls, following libpq's `sslmode` semantics
//! (libpq docs, "SSL Support", table "SSL Mode Descriptions"): `prefer`/`require` encrypt
//! without authenticating the server, `verify-ca` checks the chain, `verify-full` also the
//! host name. `sslrootcert=system` uses the operating system's trust store.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::conninfo::{ConnInfo, SslMode};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    if path.as_os_str() == "system" {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            roots.add(cert).ok();
        }
        if roots.is_empty() {
            bail!("sslrootcert=system: no usable certificates in the system trust store");
        }
        return Ok(roots);
    }
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading root certificate file {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing root certificate file {}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "root certificate file {} contains no certificate",
            path.display()
        );
    }
    for cert in certs {
        roots
            .add(cert)
            .with_context(|| format!("adding a certificate from {}", path.display()))?;
    }
    Ok(roots)
}

/// Builds the rustls client configuration for `info`, or `None` when TLS is disabled.
pub fn client_config(info: &ConnInfo) -> Result<Option<Arc<rustls::ClientConfig>>> {
    let mode = match (info.sslmode, &info.sslrootcert) {
        (SslMode::Disable, _) => return Ok(None),
        // libpq: `require` with a root certificate behaves like `verify-ca`.
        (SslMode::Require, Some(p)) if p.exists() || p.as_os_str() == "system" => SslMode::VerifyCa,
        (m, _) => m,
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let root_path = info.sslrootcert.as_deref().with_context(|| {
                format!("sslmode={} needs a root certificate: set sslrootcert (a PEM file, or \"system\") or put one at ~/.postgresql/root.crt", if mode == SslMode::VerifyFull { "verify-full" } else { "verify-ca" })
            })?;
            let roots = Arc::new(load_roots(root_path)?);
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .context("building certificate verifier")?;
            if mode == SslMode::VerifyFull {
                inner
            } else {
                Arc::new(ChainOnly { inner })
            }
        }
        _ => Arc::new(NoVerify(provider())),
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&info.sslcert, &info.sslkey) {
        (Some(cert), Some(key)) if cert.exists() => {
            let certs = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading client certificate {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing client certificate {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading client key {}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .context("client certificate and key do not match")?
        }
        (Some(cert), None) if cert.exists() => {
            bail!("sslcert {} given without sslkey", cert.display())
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

/// The name to present (SNI) and verify; IP addresses are accepted as such.
pub fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .with_context(|| format!("{host:?} is not a valid TLS server name"))
}

/// `sslmode=prefer|require`: encryption without authentication, as in libpq. Signatures are
/// still checked so the handshake itself is sound.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
