//! Secrets read from files (`--password-file`, `*_FILE` variables), so that no password
//! appears in a process listing or in `/proc/<pid>/environ` of a wrapper script.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Largest secret file read (a password or key, not a document).
const MAX_LEN: u64 = 64 * 1024;

/// The secret in `path`: the file's text without one trailing line break. Errors name the
/// file, never its content. An empty secret is refused (an unset mount, most likely).
pub fn read_secret_file(path: &Path, what: &str) -> Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading the {what} file {}", path.display()))?
        .len();
    if len > MAX_LEN {
        bail!(
            "the {what} file {} has {len} bytes: expected one line",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} file {}", path.display()))?;
    let secret = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if secret.is_empty() {
        bail!("the {what} file {} is empty", path.display());
    }
    if secret.contains('\n') {
        bail!(
            "the {what} file {} has several lines: expected the secret alone",
            path.display()
        );
    }
    Ok(secret.to_owned())
}

/// The content of the file named by the variable `{name}_FILE`, for a secret whose plain
/// variable `name` its consumer (e.g. object_store for `AWS_SECRET_ACCESS_KEY`) reads by
/// itself. Both set is refused (which one wins would be a guess); `Ok(None)` when
/// `{name}_FILE` is not set.
pub fn secret_from_file_var(name: &str) -> Result<Option<String>> {
    let file_var = format!("{name}_FILE");
    let direct = std::env::var_os(name).filter(|v| !v.is_empty());
    let file = std::env::var_os(&file_var).filter(|v| !v.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => bail!("both {name} and {file_var} are set: keep one"),
        (Some(_), None) => Ok(None),
        (None, Some(f)) => read_secret_file(Path::new(&f), &file_var).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_line_without_its_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        for (content, want) in [
            ("s3cret\n", "s3cret"),
            ("s3cret", "s3cret"),
            ("a b\r\n", "a b"),
        ] {
            std::fs::write(&f, content).unwrap();
            assert_eq!(read_secret_file(&f, "password").unwrap(), want);
        }
        for bad in ["", "\n", "alpha\nbravo\n"] {
            std::fs::write(&f, bad).unwrap();
            let e = format!("{:#}", read_secret_file(&f, "password").unwrap_err());
            assert!(!e.contains("alpha") && !e.contains("bravo"), "{e}");
        }
        let e = format!(
            "{:#}",
            read_secret_file(&dir.path().join("missing"), "password").unwrap_err()
        );
        assert!(e.contains("password file") && e.contains("missing"), "{e}");
    }
}
