//! The streaming RDB validator against the files real Redis 7 and Valkey 9 write with `SAVE`,
//! for a dataset with every type in compact and full encodings.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::collections::BTreeMap;

use redis_support::{keyspace, load_dataset};
use syncbridge_tests::redis::{RedisFlavor, RedisServer};
use wire::redis::rdb::{validate, RdbError, RdbMagic, RdbValidator, ValueKind};

fn saved_rdb(server: &RedisServer) -> Vec<u8> {
    assert!(server.cmd(&["SAVE"]).is_ok());
    std::fs::read(server.dir().join("dump.rdb")).unwrap()
}

fn check_flavor(flavor: RedisFlavor) {
    let server = RedisServer::start(flavor);
    load_dataset(&server);
    let file = saved_rdb(&server);
    let report = validate(&file).unwrap_or_else(|e| panic!("{flavor}: {e}"));

    match flavor {
        RedisFlavor::Redis7 => {
            assert_eq!(report.format.magic, RdbMagic::Redis);
            assert!(
                (10..=11).contains(&report.format.version),
                "{}",
                report.format
            );
        }
        RedisFlavor::Valkey9 => {
            assert_eq!(report.format.magic, RdbMagic::Valkey);
            assert!(report.format.version >= 80, "{}", report.format);
            assert_eq!(
                report.keys_per_encoding.get("hash_2"),
                Some(&1),
                "{report:?}"
            );
        }
    }
    // Counts match the server's own keyspace, per database.
    let ks = keyspace(&server);
    let from_rdb: BTreeMap<u64, (u64, u64)> = report
        .keys_per_db
        .iter()
        .map(|(db, n)| {
            (
                *db,
                (*n, report.expires_per_db.get(db).copied().unwrap_or(0)),
            )
        })
        .collect();
    assert_eq!(from_rdb, ks, "{flavor}");
    assert_eq!(report.functions, 1);
    for kind in [
        ValueKind::String,
        ValueKind::List,
        ValueKind::Set,
        ValueKind::SortedSet,
        ValueKind::Hash,
        ValueKind::Stream,
    ] {
        assert!(
            report.keys_per_kind.get(&kind).copied().unwrap_or(0) > 0,
            "{flavor}: no {kind}"
        );
    }
    // Both the compact and the full encoding of each type were seen.
    for enc in [
        "list_quicklist_2",
        "set_intset",
        "set",
        "zset_listpack",
        "zset_2",
        "hash_listpack",
        "hash",
    ] {
        assert!(
            report.keys_per_encoding.contains_key(enc),
            "{flavor}: no {enc} in {:?}",
            report.keys_per_encoding
        );
    }
    assert!(report.checksum.is_some());
    assert_eq!(report.unchecked_blobs, 0);

    // Fed in uneven pieces, the validator reports the same.
    let mut v = RdbValidator::new();
    let mut at = 0usize;
    let mut step = 1usize;
    while at < file.len() {
        let end = (at + step).min(file.len());
        v.feed(&file[at..end]).unwrap();
        at = end;
        step = step * 7 % 65_521 + 1;
    }
    assert_eq!(v.finish().unwrap(), report);

    // Damage is caught and located.
    let stride = (file.len() / 150).max(1);
    for pos in (0..file.len())
        .step_by(stride)
        .chain([file.len() - 1, file.len() - 9])
    {
        let mut bad = file.clone();
        bad[pos] ^= 0x20;
        let err = validate(&bad).expect_err(&format!("{flavor}: flip at {pos} accepted"));
        let msg = err.to_string();
        assert!(msg.contains("offset"), "{flavor}: {msg}");
    }
    for cut in (0..file.len()).step_by(stride) {
        assert_eq!(
            validate(&file[..cut]).unwrap_err(),
            RdbError::Truncated { offset: cut as u64 },
            "{flavor}: cut at {cut}"
        );
    }
}

#[test]
fn redis7_rdb_with_every_type_validates_and_damage_is_located() {
    check_flavor(RedisFlavor::Redis7);
}

#[test]
fn valkey9_rdb_with_every_type_validates_and_damage_is_located() {
    check_flavor(RedisFlavor::Valkey9);
}

#[test]
fn rdb_without_checksum_or_compression_validates() {
    for &flavor in RedisFlavor::all() {
        let server = RedisServer::builder(flavor)
            .args(["--rdbchecksum", "no", "--rdbcompression", "no"])
            .start();
        load_dataset(&server);
        let report = validate(&saved_rdb(&server)).unwrap_or_else(|e| panic!("{flavor}: {e}"));
        assert_eq!(report.checksum, None, "{flavor}");
        let total: u64 = keyspace(&server).values().map(|(k, _)| k).sum();
        assert_eq!(report.total_keys(), total, "{flavor}");
    }
}

#[test]
fn rdb_with_lfu_and_lru_metadata_validates() {
    // FREQ (LFU) and IDLE (LRU) opcodes precede every key under these policies.
    for &flavor in RedisFlavor::all() {
        for policy in ["allkeys-lfu", "allkeys-lru"] {
            let server = RedisServer::builder(flavor)
                .args(["--maxmemory-policy", policy, "--maxmemory", "1gb"])
                .start();
            load_dataset(&server);
            let file = saved_rdb(&server);
            let report = validate(&file).unwrap_or_else(|e| panic!("{flavor} {policy}: {e}"));
            let total: u64 = keyspace(&server).values().map(|(k, _)| k).sum();
            assert_eq!(report.total_keys(), total, "{flavor} {policy}");
            let opcode = if policy.ends_with("lfu") {
                249u8
            } else {
                248u8
            };
            assert!(
                file.contains(&opcode),
                "{flavor} {policy}: no opcode {opcode}"
            );
        }
    }
}
