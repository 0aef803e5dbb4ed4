//! SCRAM channel binding data: `tls-server-end-point` (RFC 5929 §4.1), the only channel
//! binding type PostgreSQL implements (`src/backend/libpq/auth-scram.c`,
//! `be_tls_get_certificate_hash`). It is the hash of the server's certificate, with the
//! hash function of the certificate's own signature algorithm (SHA-256 when that is MD5
//! or SHA-1). Both sides compute it; a man in the middle that presents another
//! certificate produces a different hash and the SCRAM exchange fails.

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// One DER element: (tag, contents, the bytes after it). None for malformed input.
fn der_element(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The DER-encoded OID of the certificate's `signatureAlgorithm` (the second element of
/// the outer `Certificate` SEQUENCE).
fn signature_algorithm_oid(cert_der: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (tag, cert, _) = der_element(cert_der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, _tbs, rest) = der_element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, alg, _) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, oid, _) = der_element(alg)?;
    (tag == OID).then_some(oid)
}

/// The `tls-server-end-point` binding data for a server certificate, or None when its
/// signature algorithm names no single hash (RSASSA-PSS, Ed25519, unknown), as libpq.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let oid = signature_algorithm_oid(cert_der)?;
    let hash = match oid.split_last()? {
        (&last, head) if head == RSA => match last {
            // md5WithRSA, sha1WithRSA: SHA-256 as RFC 5929 says.
            0x04 | 0x05 | 0x0b => 256,
            0x0c => 384,
            0x0d => 512,
            0x0e => 224,
            _ => return None,
        },
        _ if oid == ECDSA_SHA1 => 256,
        (&last, head) if head == ECDSA_SHA2 => match last {
            0x01 => 224,
            0x02 => 256,
            0x03 => 384,
            0x04 => 512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match hash {
        224 => Sha224::digest(cert_der).to_vec(),
        256 => Sha256::digest(cert_der).to_vec(),
        384 => Sha384::digest(cert_der).to_vec(),
        _ => Sha512::digest(cert_der).to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate-shaped DER value: SEQUENCE { SEQUENCE {INTEGER 1}, SEQUENCE {OID},
    /// BIT STRING }.
    fn cert_with(oid: &[u8]) -> Vec<u8> {
        let mut alg = vec![0x06, oid.len() as u8];
        alg.extend_from_slice(oid);
        let mut body = vec![0x30, 0x03, 0x02, 0x01, 0x01, 0x30, alg.len() as u8];
        body.extend_from_slice(&alg);
        body.extend_from_slice(&[0x03, 0x02, 0x00, 0xff]);
        let mut out = vec![0x30, body.len() as u8];
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn hash_follows_the_signature_algorithm() {
        let rsa_sha256 = cert_with(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b]);
        assert_eq!(
            tls_server_end_point(&rsa_sha256),
            Some(Sha256::digest(&rsa_sha256).to_vec())
        );
        let rsa_sha1 = cert_with(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05]);
        assert_eq!(
            tls_server_end_point(&rsa_sha1),
            Some(Sha256::digest(&rsa_sha1).to_vec())
        );
        let ecdsa_sha384 = cert_with(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]);
        assert_eq!(
            tls_server_end_point(&ecdsa_sha384),
            Some(Sha384::digest(&ecdsa_sha384).to_vec())
        );
        let rsa_sha512 = cert_with(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]);
        assert_eq!(tls_server_end_point(&rsa_sha512).map(|h| h.len()), Some(64));
    }

    #[test]
    fn no_single_hash_or_garbage_gives_none() {
        // RSASSA-PSS and Ed25519 carry no hash in the OID.
        let pss = cert_with(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a]);
        assert_eq!(tls_server_end_point(&pss), None);
        let ed25519 = cert_with(&[0x2b, 0x65, 0x70]);
        assert_eq!(tls_server_end_point(&ed25519), None);
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x31, 0x00],
        ] {
            assert_eq!(tls_server_end_point(bad), None);
        }
        let mut truncated = cert_with(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]);
        truncated.truncate(9);
        assert_eq!(tls_server_end_point(&truncated), None);
    }
}
