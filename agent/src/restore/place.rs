//! Where a base backup may be laid down, decided before anything is written: every path,
//! link and mode of `backup.json` is checked here, in one pure step, so a hostile or
//! damaged manifest is refused before the first directory is created or, with `--force`,
//! the first file deleted.
//!
//! The rules, and why:
//! * Entries are relative paths without `..`; the only links are the tablespace links
//!   `pg_tblspc/<oid>` (PostgreSQL's `src/backend/backup/basebackup.c` sends exactly those),
//!   which restore makes itself, pointing at the place chosen below; nothing is written
//!   through them from the data directory's archive.
//! * A tablespace location must be absolute (PostgreSQL's `CREATE TABLESPACE` only accepts
//!   absolute ones) and is used only when the operator said so: mapped with
//!   `--tablespace-map OLD=NEW`, or confirmed with `--tablespaces-in-place`.
//! * Modes: never setuid, setgid or sticky; files at most 0600 and directories at most 0700,
//!   or 0640/0750 when the backup had group access. PostgreSQL creates every file and
//!   directory with `pg_file_create_mode`/`pg_dir_create_mode`, derived from the data
//!   directory's mode (`src/common/file_perm.c`); `base.tar` carries no entry for the data
//!   directory itself, so group access is read from its `global` directory: 0750
//!   (`PG_DIR_MODE_GROUP`, the only group mode PostgreSQL uses) means group access.
//! * A destination is never `/`, never contains the `file://` repository and never lies
//!   inside it (compared after resolving symlinks).

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::pg::backup_manifest::{BackupManifest, EntryKind};

/// Files restore itself puts in the data directory; no backup entry may take their names.
const RESERVED: [&str; 2] = [super::pg::IN_PROGRESS, super::unpack::PG_CONTROL_TEMP];

/// Permission bits of restored files and directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    /// Whether the backup's data directory allowed group read access.
    pub group_access: bool,
}

impl Modes {
    /// The most a file may get.
    pub fn file_cap(self) -> u32 {
        if self.group_access {
            0o640
        } else {
            0o600
        }
    }

    /// The most a directory (the data directory and tablespace roots too) may get.
    pub fn dir_cap(self) -> u32 {
        if self.group_access {
            0o750
        } else {
            0o700
        }
    }

    /// The mode a restored entry gets: what the backup recorded within the cap, always
    /// readable and writable by the owner (and searchable, for directories).
    pub fn for_entry(self, kind: EntryKind, recorded: u32) -> u32 {
        match kind {
            EntryKind::Dir => (recorded & self.dir_cap()) | 0o700,
            _ => (recorded & self.file_cap()) | 0o600,
        }
    }
}

/// Where one tablespace goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespacePlace {
    /// Its OID (the name of its link under `pg_tblspc`).
    pub oid: u32,
    /// The location recorded in the backup.
    pub recorded: String,
    /// Where it will be restored.
    pub dest: PathBuf,
    /// Whether `--tablespace-map` moved it.
    pub mapped: bool,
}

/// The checked layout of a restore.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The data directory.
    pub target: PathBuf,
    /// For each archive of the backup, in the manifest's order: `None` for the data
    /// directory, else its index in `tablespaces`.
    pub archives: Vec<Option<usize>>,
    /// The tablespaces, in the manifest's order.
    pub tablespaces: Vec<TablespacePlace>,
    /// Modes to apply.
    pub modes: Modes,
}

impl Placement {
    /// The root directory of each archive, in the manifest's order.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.archives
            .iter()
            .map(|a| match a {
                None => self.target.clone(),
                Some(i) => self.tablespaces[*i].dest.clone(),
            })
            .collect()
    }
}

/// Parses `--tablespace-map OLD=NEW` items (both absolute).
pub fn parse_tablespace_map(items: &[String]) -> Result<Vec<(String, PathBuf)>> {
    items
        .iter()
        .map(|i| {
            let (old, new) = i
                .split_once('=')
                .with_context(|| format!("--tablespace-map {i:?}: expected OLD=NEW"))?;
            if !old.starts_with('/') {
                bail!("--tablespace-map {i:?}: the old location must be absolute, as in the backup");
            }
            let new = PathBuf::from(new);
            if !new.is_absolute() || has_dot_dot(&new) {
                bail!("--tablespace-map {i:?}: the new location must be an absolute path without '..'");
            }
            Ok((normalize_location(old), new))
        })
        .collect()
}

/// A recorded location without trailing slashes (`/` stays `/`).
fn normalize_location(loc: &str) -> String {
    let t = loc.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.to_string()
    }
}

fn has_dot_dot(p: &Path) -> bool {
    p.components().any(|c| matches!(c, Component::ParentDir))
}

/// Whether a backup entry's path is a plain relative path (no `/` start, no `.`, `..` or
/// empty component).
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Checks the whole manifest and decides where everything goes. Pure: reads nothing, writes
/// nothing. `target` is the resolved data directory; `in_place` is `--tablespaces-in-place`.
pub fn plan(
    m: &BackupManifest,
    target: &Path,
    map: &[(String, PathBuf)],
    in_place: bool,
) -> Result<Placement> {
    let bases: Vec<usize> = m
        .tablespaces
        .iter()
        .enumerate()
        .filter(|(_, t)| t.oid.is_none())
        .map(|(i, _)| i)
        .collect();
    let [base] = bases[..] else {
        bail!(
            "backup {} does not have exactly one data directory archive",
            m.id
        );
    };

    let mut archives = Vec::with_capacity(m.tablespaces.len());
    let mut places = Vec::new();
    let mut unconfirmed = Vec::new();
    let mut used = vec![false; map.len()];
    for t in &m.tablespaces {
        let (Some(oid), loc) = (t.oid, &t.location) else {
            archives.push(None);
            continue;
        };
        let Some(loc) = loc else {
            bail!("tablespace {oid} has no location in the backup");
        };
        if places.iter().any(|p: &TablespacePlace| p.oid == oid) {
            bail!("tablespace {oid} appears twice in the backup");
        }
        if !loc.starts_with('/') || has_dot_dot(Path::new(loc)) {
            bail!(
                "tablespace {oid} has the location {loc:?} in the backup, which is not an absolute path: refusing to restore it (PostgreSQL only creates tablespaces at absolute paths, so the backup is damaged or was tampered with)"
            );
        }
        let key = normalize_location(loc);
        let (dest, mapped) = match map.iter().position(|(o, _)| *o == key) {
            Some(i) => {
                used[i] = true;
                (map[i].1.clone(), true)
            }
            None => {
                if !in_place {
                    unconfirmed.push(format!("{oid} at {loc}"));
                }
                (PathBuf::from(&key), false)
            }
        };
        archives.push(Some(places.len()));
        places.push(TablespacePlace {
            oid,
            recorded: loc.clone(),
            dest,
            mapped,
        });
    }
    if !unconfirmed.is_empty() {
        bail!(
            "the backup has tablespaces outside the data directory ({}): give each a new place with --tablespace-map OLD=NEW, or pass --tablespaces-in-place to restore them where the backup says",
            unconfirmed.join(", ")
        );
    }
    if let Some(i) = used.iter().position(|u| !u) {
        let known: Vec<&str> = places.iter().map(|p| p.recorded.as_str()).collect();
        bail!(
            "--tablespace-map {}=…: the backup has no tablespace there (it has: {})",
            map[i].0,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    // Tablespace places never overlap the data directory or each other.
    for (i, p) in places.iter().enumerate() {
        if p.dest.starts_with(target) || target.starts_with(&p.dest) {
            bail!(
                "tablespace {} would be restored to {}, which overlaps the target {}; map it elsewhere with --tablespace-map {}=NEW",
                p.oid,
                p.dest.display(),
                target.display(),
                p.recorded
            );
        }
        for q in &places[i + 1..] {
            if p.dest.starts_with(&q.dest) || q.dest.starts_with(&p.dest) {
                bail!(
                    "tablespaces {} and {} would be restored to overlapping places ({} and {})",
                    p.oid,
                    q.oid,
                    p.dest.display(),
                    q.dest.display()
                );
            }
        }
    }

    let linked: Vec<String> = places
        .iter()
        .map(|p| format!("pg_tblspc/{}", p.oid))
        .collect();
    for e in &m.entries {
        let archive = e.archive as usize;
        if archive >= m.tablespaces.len() {
            bail!("backup entry {:?} names archive {}", e.path, e.archive);
        }
        if !safe_relative(&e.path) {
            bail!("backup entry {:?} is not a safe relative path", e.path);
        }
        if archive == base {
            if RESERVED.contains(&e.path.as_str()) {
                bail!(
                    "backup entry {:?} has a name restore reserves for itself",
                    e.path
                );
            }
            // Nothing may be written through a tablespace link.
            if linked.iter().any(|l| e.path.starts_with(&format!("{l}/"))) {
                bail!(
                    "backup entry {:?} lies inside a tablespace link of the data directory",
                    e.path
                );
            }
            let is_link = linked.contains(&e.path);
            match e.kind {
                EntryKind::Symlink if !is_link => bail!(
                    "unexpected symlink {:?} in the backup: only tablespace links (pg_tblspc/<oid>) are restored",
                    e.path
                ),
                EntryKind::File | EntryKind::Dir if is_link => bail!(
                    "backup entry {:?} takes the place of tablespace {}'s link",
                    e.path,
                    e.path.trim_start_matches("pg_tblspc/")
                ),
                _ => {}
            }
        } else if e.kind == EntryKind::Symlink {
            bail!(
                "unexpected symlink {:?} in tablespace archive {}",
                e.path,
                m.tablespaces[archive].archive
            );
        }
    }
    for c in &m.chunks {
        for p in &c.pieces {
            let e = m
                .entries
                .get(p.entry as usize)
                .with_context(|| format!("data object {} names entry {}", c.seq, p.entry))?;
            if e.kind != EntryKind::File
                || p.offset.checked_add(p.len).is_none_or(|end| end > e.size)
            {
                bail!(
                    "data object {} holds bytes {}+{} of {:?}, which is not a file of that size",
                    c.seq,
                    p.offset,
                    p.len,
                    e.path
                );
            }
        }
    }

    check_coverage(m)?;

    let group_access = m.entries.iter().any(|e| {
        e.archive as usize == base
            && e.kind == EntryKind::Dir
            && e.path == "global"
            && e.mode & 0o777 == 0o750
    });
    Ok(Placement {
        target: target.to_path_buf(),
        archives,
        tablespaces: places,
        modes: Modes { group_access },
    })
}

/// Every file's bytes come from the data objects exactly once, from 0 to its size: a
/// manifest that would leave a file short, or write a byte twice, is refused here rather
/// than after `--force` emptied the target (the writer re-checks what it wrote anyway).
fn check_coverage(m: &BackupManifest) -> Result<()> {
    let mut pieces: Vec<(u32, u64, u64)> = m
        .chunks
        .iter()
        .flat_map(|c| c.pieces.iter().map(|p| (p.entry, p.offset, p.len)))
        .collect();
    pieces.sort_unstable();
    let mut next = pieces.iter().peekable();
    for (i, e) in m.entries.iter().enumerate() {
        if e.kind != EntryKind::File {
            continue;
        }
        let mut at = 0u64;
        while let Some((_, offset, len)) = next.next_if(|p| p.0 as usize == i) {
            if *offset != at {
                bail!(
                    "backup entry {:?}: the data objects hold bytes from {offset} where {at} is next ({}): the backup's record is damaged",
                    e.path,
                    if *offset < at { "written twice" } else { "a hole" }
                );
            }
            at += len;
        }
        if at != e.size {
            bail!(
                "backup entry {:?} has {} bytes, but the data objects hold {at} of them: the backup's record is damaged",
                e.path,
                e.size
            );
        }
    }
    Ok(())
}

/// Resolves each tablespace destination's symlinks and checks it
/// against the target and the repository as [`check_destination`] does. Reads the file
/// system, writes nothing.
pub fn resolve_tablespaces(
    placement: &mut Placement,
    target: &Path,
    repository: Option<&Path>,
) -> Result<()> {
    let mut resolved = Vec::new();
    for t in &mut placement.tablespaces {
        let dest = resolve(&t.dest)?;
        let what = format!("the place of tablespace {}", t.oid);
        check_destination(&dest, repository, &what)?;
        if dest.starts_with(target) || target.starts_with(&dest) {
            bail!(
                "{what}, {}, overlaps the target {}: map it elsewhere with --tablespace-map {}=NEW",
                dest.display(),
                target.display(),
                t.recorded
            );
        }
        if let Some(other) = resolved
            .iter()
            .find(|(_, d): &&(u32, PathBuf)| d.starts_with(&dest) || dest.starts_with(d))
        {
            bail!(
                "tablespaces {} and {} would be restored to overlapping places ({} and {})",
                other.0,
                t.oid,
                other.1.display(),
                dest.display()
            );
        }
        resolved.push((t.oid, dest.clone()));
        t.dest = dest;
    }
    Ok(())
}

/// Makes `p` absolute and resolves the symlinks of the part of it that exists (the rest,
/// not yet created, is appended as given). Refuses `..` in the part that does not exist.
pub fn resolve(p: &Path) -> Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(p)
    };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(c) => {
                let mut out = c;
                for part in rest.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    bail!("resolving {}: {e}", abs.display());
                };
                rest.push(name.to_os_string());
                existing = parent;
            }
            Err(e) => return Err(e).with_context(|| format!("resolving {}", abs.display())),
        }
    }
}

/// Refuses a destination (resolved, see [`resolve`]) that is `/`, contains the repository
/// or lies inside it. `what` names it in the message.
pub fn check_destination(dest: &Path, repository: Option<&Path>, what: &str) -> Result<()> {
    if dest.parent().is_none() {
        bail!(
            "{what} is {}: refusing to restore into the root directory",
            dest.display()
        );
    }
    if let Some(repo) = repository {
        let repo = resolve(repo)?;
        if repo.starts_with(dest) {
            bail!(
                "{what} {} contains the repository {}: restoring there would destroy the backups; choose another directory",
                dest.display(),
                repo.display()
            );
        }
        if dest.starts_with(&repo) {
            bail!(
                "{what} {} lies inside the repository {}: choose a directory outside it",
                dest.display(),
                repo.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pg::backup_manifest::{BackupEntry, DataChunk, Piece, Tablespace};

    fn entry(archive: u32, path: &str, kind: EntryKind, mode: u32) -> BackupEntry {
        BackupEntry {
            archive,
            path: path.into(),
            kind,
            mode,
            mtime: 0,
            size: if kind == EntryKind::File { 10 } else { 0 },
            crc32c: 0,
            link: None,
        }
    }

    fn manifest(ts: Option<&str>) -> BackupManifest {
        let mut tablespaces = vec![Tablespace {
            archive: "base.tar".into(),
            oid: None,
            location: None,
        }];
        let mut entries = vec![
            entry(0, "global", EntryKind::Dir, 0o700),
            entry(0, "PG_VERSION", EntryKind::File, 0o600),
        ];
        if let Some(loc) = ts {
            tablespaces.push(Tablespace {
                archive: "16385.tar".into(),
                oid: Some(16385),
                location: Some(loc.into()),
            });
            entries.push(entry(0, "pg_tblspc/16385", EntryKind::Symlink, 0o777));
            entries.push(entry(1, "PG_15_1", EntryKind::Dir, 0o700));
        }
        BackupManifest {
            version: 1,
            id: "20261201T000000Z".into(),
            label: String::new(),
            system_identifier: "1".into(),
            server_version: "15".into(),
            server_major: 15,
            timeline: 1,
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            stop_timeline: 1,
            start_time: String::new(),
            stop_time: String::new(),
            wal_archived_time: String::new(),
            wal_segment_size: 16 << 20,
            total_bytes: 10,
            stored_bytes: 10,
            tablespaces,
            entries,
            chunks: vec![DataChunk {
                seq: 0,
                bytes: 10,
                stored_bytes: 10,
                sha256: String::new(),
                pieces: vec![Piece {
                    entry: 1,
                    offset: 0,
                    len: 10,
                }],
            }],
            server_manifest_sha256: String::new(),
        }
    }

    fn err(r: Result<Placement>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn modes_are_capped() {
        let m = Modes {
            group_access: false,
        };
        assert_eq!(m.for_entry(EntryKind::File, 0o4777), 0o600);
        assert_eq!(m.for_entry(EntryKind::File, 0o2644), 0o600);
        assert_eq!(m.for_entry(EntryKind::Dir, 0o1777), 0o700);
        assert_eq!(m.for_entry(EntryKind::File, 0o400), 0o600);
        let g = Modes { group_access: true };
        assert_eq!(g.for_entry(EntryKind::File, 0o4777), 0o640);
        assert_eq!(g.for_entry(EntryKind::File, 0o600), 0o600);
        assert_eq!(g.for_entry(EntryKind::Dir, 0o2777), 0o750);
    }

    #[test]
    fn group_access_comes_from_global() {
        let t = Path::new("/restore/data");
        assert!(
            !plan(&manifest(None), t, &[], false)
                .unwrap()
                .modes
                .group_access
        );
        let mut m = manifest(None);
        m.entries[0].mode = 0o750;
        assert!(plan(&m, t, &[], false).unwrap().modes.group_access);
        m.entries[0].mode = 0o1777;
        assert!(!plan(&m, t, &[], false).unwrap().modes.group_access);
    }

    #[test]
    fn tablespaces_need_a_map_or_confirmation() {
        let t = Path::new("/restore/data");
        let m = manifest(Some("/srv/ts"));
        assert!(err(plan(&m, t, &[], false)).contains("--tablespace-map"));
        let p = plan(&m, t, &[], true).unwrap();
        assert_eq!(p.roots()[1], PathBuf::from("/srv/ts"));
        assert!(!p.tablespaces[0].mapped);
        let map = parse_tablespace_map(&["/srv/ts/=/restore/ts".into()]).unwrap();
        let p = plan(&m, t, &map, false).unwrap();
        assert_eq!(p.roots()[1], PathBuf::from("/restore/ts"));
        assert!(p.tablespaces[0].mapped);
        // A map for a location the backup does not have.
        let map = parse_tablespace_map(&["/elsewhere=/restore/ts".into()]).unwrap();
        assert!(err(plan(&m, t, &map, true)).contains("no tablespace there"));
        // Inside the target, or containing it.
        let map = parse_tablespace_map(&["/srv/ts=/restore/data/ts".into()]).unwrap();
        assert!(err(plan(&m, t, &map, false)).contains("overlaps"));
        let map = parse_tablespace_map(&["/srv/ts=/restore".into()]).unwrap();
        assert!(err(plan(&m, t, &map, false)).contains("overlaps"));
        assert!(parse_tablespace_map(&["/srv/ts=rel".into()]).is_err());
        assert!(parse_tablespace_map(&["/srv/ts=/a/../b".into()]).is_err());
    }

    #[test]
    fn relative_locations_are_always_refused() {
        let t = Path::new("/restore/data");
        for loc in ["some/where", "../up", "/srv/../etc"] {
            let m = manifest(Some(loc));
            assert!(
                err(plan(&m, t, &[], true)).contains("not an absolute path"),
                "{loc}"
            );
        }
    }

    #[test]
    fn hostile_entries_are_refused() {
        let t = Path::new("/restore/data");
        let cases: Vec<(BackupEntry, &str)> = vec![
            (entry(0, "../x", EntryKind::File, 0o600), "safe relative"),
            (entry(0, "/etc/x", EntryKind::File, 0o600), "safe relative"),
            (entry(0, "a//b", EntryKind::File, 0o600), "safe relative"),
            (
                entry(0, "evil", EntryKind::Symlink, 0o777),
                "unexpected symlink",
            ),
            (
                entry(0, "pg_tblspc/16385/x", EntryKind::File, 0o600),
                "inside a tablespace link",
            ),
            (
                entry(1, "l", EntryKind::Symlink, 0o777),
                "unexpected symlink",
            ),
            (
                entry(0, "syncbridge-restore.in-progress", EntryKind::File, 0o600),
                "reserves",
            ),
            (entry(5, "x", EntryKind::File, 0o600), "names archive"),
        ];
        for (e, want) in cases {
            let mut m = manifest(Some("/srv/ts"));
            m.entries.push(e.clone());
            let got = err(plan(&m, t, &[], true));
            assert!(got.contains(want), "{e:?}: {got}");
        }
        let mut m = manifest(None);
        m.chunks[0].pieces[0].len = 11;
        assert!(err(plan(&m, t, &[], false)).contains("not a file of that size"));
        let mut m = manifest(None);
        m.chunks[0].pieces[0].entry = 0;
        assert!(err(plan(&m, t, &[], false)).contains("not a file"));
    }

    /// A file the data objects do not fill exactly (short, a hole, bytes twice, an absurd
    /// size) is refused by the plan, before `--force` deletes anything.
    #[test]
    fn files_must_be_covered_exactly() {
        let t = Path::new("/restore/data");
        let piece = |offset, len| Piece {
            entry: 1,
            offset,
            len,
        };
        let cases: Vec<(u64, Vec<Piece>, &str)> = vec![
            (10, vec![piece(0, 5)], "hold 5 of them"),
            (10, vec![piece(0, 4), piece(5, 5)], "a hole"),
            (10, vec![piece(0, 6), piece(4, 6)], "written twice"),
            (10, vec![piece(0, 10), piece(0, 10)], "written twice"),
            (10, vec![], "hold 0 of them"),
            (u64::MAX, vec![piece(0, 10)], "hold 10 of them"),
        ];
        for (size, pieces, want) in cases {
            let mut m = manifest(None);
            m.entries[1].size = size;
            m.chunks[0].pieces = pieces.clone();
            let got = err(plan(&m, t, &[], false));
            assert!(got.contains(want), "{size} {pieces:?}: {got}");
        }
        // Pieces of one file spread over objects, in any order, are fine.
        let mut m = manifest(None);
        m.chunks[0].pieces = vec![piece(6, 4)];
        let mut second = m.chunks[0].clone();
        second.seq = 1;
        second.pieces = vec![piece(0, 6)];
        m.chunks.push(second);
        plan(&m, t, &[], false).unwrap();
    }

    #[test]
    fn destinations() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        let d = resolve(dir.path()).unwrap();
        assert!(check_destination(Path::new("/"), None, "--target").is_err());
        assert!(check_destination(&d, Some(&repo), "--target")
            .unwrap_err()
            .to_string()
            .contains("contains the repository"));
        let inside = resolve(&repo.join("x/y")).unwrap();
        assert!(check_destination(&inside, Some(&repo), "--target")
            .unwrap_err()
            .to_string()
            .contains("inside the repository"));
        // Through a symlink.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&repo, &link).unwrap();
        let via = resolve(&link.join("new")).unwrap();
        assert!(check_destination(&via, Some(&repo), "--target").is_err());
        assert!(check_destination(&d.join("other"), Some(&repo), "--target").is_ok());
    }
}
