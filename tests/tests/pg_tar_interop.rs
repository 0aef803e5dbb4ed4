//! `wire::pg::tar::TarReader` against real archives: GNU tar in its gnu, pax and ustar
//! formats (long names, long link targets, large-ish files), and `pg_basebackup -Ft` output
//! checked against the server's own `backup_manifest`, each fed in small uneven pieces.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use bytes::BytesMut;
use syncbridge_tests::pg::{PgCluster, PgVersion};
use wire::pg::tar::{TarEntryType, TarEvent, TarReader};

/// Reads a whole archive in pieces of 1, 7, 512, 4093, … bytes; returns path → (type, data,
/// link target).
fn read(archive: &[u8]) -> BTreeMap<String, (TarEntryType, Vec<u8>, Option<String>)> {
    let mut reader = TarReader::new();
    let mut buf = BytesMut::new();
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    let sizes = [1usize, 7, 512, 4093, 65536, 3];
    let mut pos = 0;
    let mut i = 0;
    while pos < archive.len() {
        let n = sizes[i % sizes.len()].min(archive.len() - pos);
        buf.extend_from_slice(&archive[pos..pos + n]);
        pos += n;
        i += 1;
        while let Some(ev) = reader.next_event(&mut buf).unwrap() {
            match ev {
                TarEvent::Entry(e) => {
                    current = Some(e.path.clone());
                    out.insert(e.path, (e.entry_type, Vec::new(), e.link_target));
                }
                TarEvent::Data(d) => out
                    .get_mut(current.as_ref().unwrap())
                    .unwrap()
                    .1
                    .extend_from_slice(&d),
                TarEvent::EntryEnd => current = None,
                TarEvent::End => {}
            }
        }
    }
    reader.finish().unwrap();
    out
}

fn tree(dir: &Path) {
    let long_dir = dir.join("d".repeat(120)).join("e".repeat(90));
    std::fs::create_dir_all(&long_dir).unwrap();
    std::fs::write(
        long_dir.join("file-with-a-long-name.dat"),
        vec![7u8; 70_000],
    )
    .unwrap();
    // 80 + 60 + 40 bytes: too long for ustar's name field, fits its prefix + name split.
    let split_dir = dir.join("p".repeat(80)).join("q".repeat(60));
    std::fs::create_dir_all(&split_dir).unwrap();
    std::fs::write(split_dir.join("r".repeat(40)), b"split").unwrap();
    std::fs::write(dir.join("short"), b"hello").unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink(format!("/srv/{}", "t".repeat(150)), dir.join("longlink")).unwrap();
}

#[test]
fn gnu_tar_gnu_pax_and_ustar_formats() {
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    for format in ["gnu", "pax", "ustar"] {
        let out = Command::new("tar")
            .args(["-c", &format!("--format={format}"), "-C"])
            .arg(src.path())
            .arg(".")
            .output()
            .unwrap();
        if format == "ustar" {
            // ustar cannot hold a 150-byte link target: GNU tar says so and skips it.
            assert!(!out.stdout.is_empty());
        } else {
            assert!(
                out.status.success(),
                "{format}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let entries = read(&out.stdout);
        let split = format!("{}/{}/{}", "p".repeat(80), "q".repeat(60), "r".repeat(40));
        assert_eq!(entries[&split].1, b"split", "{format}");
        assert_eq!(entries["short"].1, b"hello", "{format}");
        assert!(entries["empty"].1.is_empty(), "{format}");
        if format == "ustar" {
            continue;
        }
        let long = format!(
            "{}/{}/file-with-a-long-name.dat",
            "d".repeat(120),
            "e".repeat(90)
        );
        let (t, data, _) = &entries[&long];
        assert_eq!(*t, TarEntryType::File, "{format}");
        assert_eq!(data, &vec![7u8; 70_000], "{format}");
        assert_eq!(entries["short"].1, b"hello", "{format}");
        assert!(entries["empty"].1.is_empty(), "{format}");
        if format != "ustar" {
            let (t, _, link) = &entries["longlink"];
            assert_eq!(*t, TarEntryType::Symlink);
            assert_eq!(
                link.as_deref(),
                Some(format!("/srv/{}", "t".repeat(150)).as_str()),
                "{format}"
            );
        }
    }
}

#[test]
fn pg_basebackup_tar_matches_its_manifest() {
    let pg = PgCluster::start(PgVersion::V15);
    pg.sql_blocking(
        "CREATE TABLE t AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 50000) g",
    );
    let out_dir = pg.temp_dir().join("tarbackup");
    pg.run(
        "pg_basebackup",
        &[
            "-D",
            out_dir.to_str().unwrap(),
            "-Ft",
            "-X",
            "none",
            "-c",
            "fast",
        ],
    );
    let archive = std::fs::read(out_dir.join("base.tar")).unwrap();
    let entries = read(&archive);
    let manifest = std::fs::read_to_string(out_dir.join("backup_manifest")).unwrap();
    let mut checked = 0;
    // Each manifest line `{ "Path": "...", "Size": N, ... }` names a file in the archive.
    for line in manifest.lines().filter(|l| l.contains("\"Path\"")) {
        let path = line
            .split("\"Path\": \"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let size: usize = line
            .split("\"Size\": ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let (t, data, _) = entries
            .get(path)
            .unwrap_or_else(|| panic!("{path} not in base.tar"));
        assert_eq!(*t, TarEntryType::File, "{path}");
        assert_eq!(data.len(), size, "{path}");
        checked += 1;
    }
    assert!(checked > 500, "only {checked} files checked");
    assert!(entries.contains_key("PG_VERSION"));
    eprintln!(
        "pg_basebackup -Ft: {checked} files match backup_manifest sizes, {} entries",
        entries.len()
    );
}
