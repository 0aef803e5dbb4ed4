//! age X25519 keys for client-side encryption. The sidecar that writes backups holds only
//! recipients (public keys), so a compromised sidecar cannot read old backups; restore
//! and `repo cat` take an identity file (the format `age-keygen` writes).

use std::path::Path;
use std::str::FromStr;

pub use age::x25519::{Identity, Recipient};

use crate::error::{Result, StorageError};

/// Parses one `age1…` recipient.
pub fn parse_recipient(text: &str) -> Result<Recipient> {
    Recipient::from_str(text.trim()).map_err(|e| StorageError::Config {
        what: format!("age recipient {:?}", text.trim()),
        reason: e.to_string(),
    })
}

/// Reads recipients from a file: one `age1…` per line, `#` comments and blank lines ignored.
pub fn read_recipients_file(path: &Path) -> Result<Vec<Recipient>> {
    let text = read(path, "recipients file")?;
    let list = lines(&text)
        .map(parse_recipient)
        .collect::<Result<Vec<_>>>()?;
    if list.is_empty() {
        return Err(StorageError::Config {
            what: format!("recipients file {}", path.display()),
            reason: "no recipients found".into(),
        });
    }
    Ok(list)
}

/// Reads identities (`AGE-SECRET-KEY-1…` lines) from an identity file.
pub fn read_identity_file(path: &Path) -> Result<Vec<Identity>> {
    let text = read(path, "identity file")?;
    let list = lines(&text)
        .map(|l| {
            Identity::from_str(l).map_err(|e| StorageError::Config {
                what: format!("identity file {}", path.display()),
                reason: format!("not an age X25519 identity: {e}"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if list.is_empty() {
        return Err(StorageError::Config {
            what: format!("identity file {}", path.display()),
            reason: "no AGE-SECRET-KEY-1 lines found".into(),
        });
    }
    Ok(list)
}

/// A new random identity (for tests and `repo init --generate-identity`-style tooling).
pub fn generate_identity() -> Identity {
    Identity::generate()
}

/// The identity in the `AGE-SECRET-KEY-1…` form an identity file holds (secret!).
pub fn identity_to_string(id: &Identity) -> String {
    use age::secrecy::ExposeSecret;
    id.to_string().expose_secret().to_string()
}

/// The short fingerprint of a recipient, as recorded in headers and the marker.
pub fn recipient_fingerprint(r: &Recipient) -> String {
    crate::frame::short_fingerprint(&crate::frame::fingerprint(r))
}

fn read(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| StorageError::Config {
        what: format!("{what} {}", path.display()),
        reason: e.to_string(),
    })
}

fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}
