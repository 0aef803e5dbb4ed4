//! What every object read from a repository must be, beyond intact.
//!
//! A container can be perfectly intact and still be the wrong object: a WAL segment
//! stored under its neighbour's key, the same segment name copied from another cluster's
//! bucket, or a plaintext object dropped into an encrypted repository by someone who can
//! write to the bucket but holds no key. Each would be served as good data, and PostgreSQL
//! or Redis would replay it. From format version 2 every header names the key and the
//! repository id it was written for (`format::Binding`), and the trailer's digest covers
//! both (`format::bound_digest`); this module holds what a reader expects, learnt once per
//! `Repository` from the marker, and the checks every reader applies before it hands out a
//! byte.
//!
//! Old repositories: a marker without `repository_id` was written by a version 1 build. Its
//! objects are read as they are (no binding to check), and new objects in it are bound to
//! an id derived from the marker's bytes (stable as long as the marker is not rewritten).
//! A repository whose marker has an id accepts only bound objects, so a version 1 object
//! (which an attacker can forge for a known plaintext without binding) is refused there.

use crate::error::{Result, StorageError};
use crate::format::{Binding, Header, RepoId};
use crate::layout::{self, RepoKey};

/// What a reader expects of every object except the marker itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RepoContext {
    /// The repository id objects must be bound to.
    pub repo_id: RepoId,
    /// The marker says the repository is encrypted: plaintext objects are refused.
    pub encrypted: bool,
    /// The marker carries an id: every object must be bound (format version 2 or later).
    pub bound_only: bool,
}

impl RepoContext {
    /// A repository without a marker (a new one, or a bare store in tests): objects are
    /// bound to the all-zero id and nothing else is required.
    pub fn unmarked() -> Self {
        RepoContext {
            repo_id: RepoId::default(),
            encrypted: false,
            bound_only: false,
        }
    }

    /// The binding a new object at `key` gets.
    pub fn binding_for(&self, key: &RepoKey) -> Binding {
        Binding {
            repo_id: self.repo_id,
            key: key.as_str().to_owned(),
        }
    }

    /// Refuses an intact object that is not what `key` names in this repository.
    pub fn check(&self, key: &RepoKey, header: &Header) -> Result<()> {
        check_key(key, header)?;
        match &header.binding {
            Some(b) if b.repo_id != self.repo_id => {
                return Err(wrong(
                    key,
                    format!(
                        "it belongs to repository {}, not to this repository ({}): it was copied from another repository",
                        b.repo_id, self.repo_id
                    ),
                ))
            }
            Some(_) => {}
            None if self.bound_only => {
                return Err(wrong(
                    key,
                    format!(
                        "it uses container format version {} (not bound to its key), but this repository ({}) was created with bound objects only; an old-format object here was not written by the agent",
                        header.version, self.repo_id
                    ),
                ))
            }
            None => {}
        }
        if self.encrypted && !header.encrypted {
            return Err(wrong(
                key,
                "it is not encrypted, but the repository is: anyone who can write to the bucket could have put it there".into(),
            ));
        }
        Ok(())
    }
}

/// The key check alone (for the marker, whose repository id is what it defines).
pub(crate) fn check_key(key: &RepoKey, header: &Header) -> Result<()> {
    match &header.binding {
        Some(b) if b.key != key.as_str() => Err(wrong(
            key,
            format!(
                "it was written for {}: it is another object stored under this key (swapped, copied or renamed)",
                b.key
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether `key` is the repository marker (read before any context exists).
pub(crate) fn is_marker(key: &RepoKey) -> bool {
    *key == layout::marker()
}

fn wrong(key: &RepoKey, reason: String) -> StorageError {
    StorageError::WrongObject {
        key: key.to_string(),
        reason,
    }
}
