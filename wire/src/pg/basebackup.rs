//! The typed CopyData messages of `BASE_BACKUP` on PostgreSQL 15+ (`src/backend/backup/
//! basebackup_copy.c`, `bbsink_copystream_*`): the whole backup is one CopyOut stream whose
//! payloads start with a type byte: `n` begins an archive (name, tablespace location), `d`
//! carries archive or manifest bytes, `p` reports progress, `m` begins the manifest.
//! PostgreSQL 14 and earlier instead send one untyped CopyOut stream per archive.

use bytes::{Buf, Bytes};

use super::PgWireError;

/// One CopyData payload of a PostgreSQL 15+ base backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupCopyMessage {
    /// `n`: the following `Data` belongs to this archive (`base.tar`, `16385.tar`, …).
    NewArchive {
        /// File name the server gives the archive.
        name: String,
        /// Tablespace path on the server; empty for the main data directory.
        tablespace_location: String,
    },
    /// `d`: bytes of the current archive or of the manifest.
    Data(Bytes),
    /// `p`: bytes of the current archive sent so far (for progress bars).
    Progress(u64),
    /// `m`: the following `Data` is the `backup_manifest`.
    ManifestStart,
}

impl BackupCopyMessage {
    /// Longest archive name or location we accept (PostgreSQL's `MAXPGPATH` is 1024).
    pub const MAX_STRING: usize = 4096;

    /// Parses one complete CopyData payload.
    pub fn parse(mut payload: Bytes) -> Result<BackupCopyMessage, PgWireError> {
        let Some(&tag) = payload.first() else {
            return Err(PgWireError::Truncated {
                message: "BASE_BACKUP copy",
                needed: 1,
                have: 0,
            });
        };
        payload.advance(1);
        match tag {
            b'n' => {
                let name = cstring(&mut payload, "BASE_BACKUP new archive")?;
                let tablespace_location = cstring(&mut payload, "BASE_BACKUP new archive")?;
                trailing(&payload, "BASE_BACKUP new archive")?;
                if name.is_empty() || name.contains('/') || name == ".." {
                    return Err(PgWireError::BadString {
                        message: "BASE_BACKUP new archive",
                        reason: "archive name must be a plain file name",
                    });
                }
                Ok(BackupCopyMessage::NewArchive {
                    name,
                    tablespace_location,
                })
            }
            b'd' => Ok(BackupCopyMessage::Data(payload)),
            b'p' => {
                if payload.len() < 8 {
                    return Err(PgWireError::Truncated {
                        message: "BASE_BACKUP progress",
                        needed: 9,
                        have: payload.len() + 1,
                    });
                }
                let done = payload.get_u64();
                trailing(&payload, "BASE_BACKUP progress")?;
                Ok(BackupCopyMessage::Progress(done))
            }
            b'm' => {
                trailing(&payload, "BASE_BACKUP manifest start")?;
                Ok(BackupCopyMessage::ManifestStart)
            }
            other => Err(PgWireError::UnknownMessage {
                context: "BASE_BACKUP copy",
                tag: char::from(other),
            }),
        }
    }

    /// Encodes the payload (for tests and fake servers).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            BackupCopyMessage::NewArchive {
                name,
                tablespace_location,
            } => {
                out.push(b'n');
                out.extend_from_slice(name.as_bytes());
                out.push(0);
                out.extend_from_slice(tablespace_location.as_bytes());
                out.push(0);
            }
            BackupCopyMessage::Data(d) => {
                out.push(b'd');
                out.extend_from_slice(d);
            }
            BackupCopyMessage::Progress(p) => {
                out.push(b'p');
                out.extend_from_slice(&p.to_be_bytes());
            }
            BackupCopyMessage::ManifestStart => out.push(b'm'),
        }
        out
    }
}

fn cstring(payload: &mut Bytes, message: &'static str) -> Result<String, PgWireError> {
    let window = &payload[..payload.len().min(BackupCopyMessage::MAX_STRING + 1)];
    let Some(nul) = window.iter().position(|&b| b == 0) else {
        return Err(PgWireError::BadString {
            message,
            reason: "string without NUL terminator within 4096 bytes",
        });
    };
    let s = std::str::from_utf8(&payload[..nul])
        .map_err(|_| PgWireError::BadString {
            message,
            reason: "string is not UTF-8",
        })?
        .to_string();
    payload.advance(nul + 1);
    Ok(s)
}

fn trailing(payload: &Bytes, message: &'static str) -> Result<(), PgWireError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(PgWireError::TrailingBytes {
            message,
            extra: payload.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_pg15_messages() {
        let m = BackupCopyMessage::parse(Bytes::from_static(b"nbase.tar\0\0")).unwrap();
        assert_eq!(
            m,
            BackupCopyMessage::NewArchive {
                name: "base.tar".into(),
                tablespace_location: String::new()
            }
        );
        let m = BackupCopyMessage::parse(Bytes::from_static(b"n16385.tar\0/srv/ts\0")).unwrap();
        assert!(
            matches!(m, BackupCopyMessage::NewArchive { tablespace_location, .. } if tablespace_location == "/srv/ts")
        );
        assert_eq!(
            BackupCopyMessage::parse(Bytes::from_static(b"p\0\0\0\0\0\0\x01\0")).unwrap(),
            BackupCopyMessage::Progress(256)
        );
        assert_eq!(
            BackupCopyMessage::parse(Bytes::from_static(b"m")).unwrap(),
            BackupCopyMessage::ManifestStart
        );
        assert_eq!(
            BackupCopyMessage::parse(Bytes::from_static(b"dxy")).unwrap(),
            BackupCopyMessage::Data(Bytes::from_static(b"xy"))
        );
    }

    #[test]
    fn rejects_bad_messages() {
        for bad in [
            &b""[..],
            b"nbase.tar",
            b"n../x\0\0",
            b"n\0\0",
            b"p\0\0",
            b"mx",
            b"q",
            b"nbase.tar\0\0extra",
        ] {
            assert!(
                BackupCopyMessage::parse(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn round_trips(name in "[a-z0-9]{1,12}\\.tar", loc in "(/[a-z]{1,8}){0,3}", p: u64, data in proptest::collection::vec(any::<u8>(), 0..32)) {
            for m in [
                BackupCopyMessage::NewArchive { name: name.clone(), tablespace_location: loc.clone() },
                BackupCopyMessage::Progress(p),
                BackupCopyMessage::Data(Bytes::from(data.clone())),
                BackupCopyMessage::ManifestStart,
            ] {
                prop_assert_eq!(BackupCopyMessage::parse(Bytes::from(m.encode())).unwrap(), m);
            }
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = BackupCopyMessage::parse(Bytes::from(data));
        }
    }
}
