//! Store errors as `StorageError`s: which key, which operation, and whether trying again
//! can help (the only input of the retry layers, see [`super::retry`]).

use crate::error::StorageError;
use crate::layout::RepoKey;

/// Maps an object_store error, deciding whether it is transient.
pub(super) fn map_err(key: &RepoKey, op: &'static str, e: object_store::Error) -> StorageError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } if names_missing_bucket(&e) => missing_bucket(key, e),
        E::NotFound { .. } => StorageError::NotFound {
            key: key.to_string(),
        },
        E::AlreadyExists { .. } | E::Precondition { .. } if op == "put" => {
            StorageError::AlreadyExists {
                key: key.to_string(),
            }
        }
        e if names_untrusted_certificate(&e) => StorageError::Backend {
            key: key.to_string(),
            op: "connecting over TLS (the server's certificate is not trusted: give its CA \
                 with --ca-bundle, AWS_CA_BUNDLE or ?ca_bundle=)",
            retryable: false,
            attempts: 1,
            source: Box::new(e),
        },
        e => {
            let retryable = match &e {
                E::Generic { .. } | E::JoinError { .. } => generic_is_transient(&e),
                _ => false,
            };
            StorageError::Backend {
                key: key.to_string(),
                op,
                retryable,
                attempts: 1,
                source: Box::new(e),
            }
        }
    }
}

/// Whether a 404 is about the bucket/container rather than the object (S3 `NoSuchBucket`,
/// Azure `ContainerNotFound`, GCS "bucket does not exist").
fn names_missing_bucket(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("NoSuchBucket")
            || text.contains("ContainerNotFound")
            || text.contains("bucket does not exist")
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether the TLS handshake failed on the server's certificate (rustls "invalid peer
/// certificate: UnknownIssuer", a name or date mismatch): trying again cannot help.
fn names_untrusted_certificate(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains("invalid peer certificate") {
            return true;
        }
        cur = err.source();
    }
    false
}

pub(super) fn missing_bucket(key: &RepoKey, e: object_store::Error) -> StorageError {
    StorageError::Backend {
        key: key.to_string(),
        op: "finding the bucket (missing or not accessible: check the repository URL)",
        retryable: false,
        attempts: 1,
        source: Box::new(e),
    }
}

pub(super) fn not_implemented(e: &object_store::Error) -> bool {
    let text = format!("{e} {:?}", e);
    matches!(e, object_store::Error::NotImplemented)
        || text.contains("status code: 501")
        || text.contains("NotImplemented")
}

/// object_store does not expose HTTP status codes; its messages carry them
/// ("... status code: 400 Bad Request"). A 4xx other than 408/429 is the caller's fault
/// and is not retried; everything else (5xx, resets, timeouts, body errors) is transient.
fn generic_is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(" | ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    // reqwest refusing to build the request (bad URL, http:// not allowed) is permanent.
    if text.contains("builder error") || text.contains("scheme is not allowed") {
        return false;
    }
    for marker in ["status code: ", "status: "] {
        for (i, _) in text.match_indices(marker) {
            let code: String = text[i + marker.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            if let Ok(code) = code.parse::<u16>() {
                if (400..500).contains(&code) && code != 408 && code != 429 {
                    return false;
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http_status_in_messages() {
        let e =
            std::io::Error::other("Server returned non-2xx status code: 503 Service Unavailable");
        assert!(generic_is_transient(&e));
        let e = std::io::Error::other("Server returned non-2xx status code: 400 Bad Request: x");
        assert!(!generic_is_transient(&e));
        let e = std::io::Error::other("status code: 429 Too Many Requests");
        assert!(generic_is_transient(&e));
        let e = std::io::Error::other("connection reset by peer");
        assert!(generic_is_transient(&e));
    }
}
