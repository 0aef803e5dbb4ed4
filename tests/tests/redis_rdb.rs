//! The streaming RDB validator against the files real Redis 7 and Valkey 9 write with `SAVE`,
//! for a dataset with every type in compact and full encodings.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use syncbridge_tests::redis::{RedisFlavor, RedisServer, RespConnection, RespValue};
use wire::redis::rdb::{validate, RdbError, RdbMagic, RdbValidator, ValueKind};

/// Sends every command pipelined and insists none failed.
fn pipeline(conn: &mut RespConnection, cmds: &[Vec<String>]) {
    for c in cmds {
        conn.send(c).unwrap();
    }
    for c in cmds {
        let reply = conn.read_reply().unwrap();
        assert!(!matches!(reply, RespValue::Error(_)), "{c:?} -> {reply}");
    }
}

fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// Writes a dataset covering every value type, each in its compact and its full encoding,
/// keys with TTLs, several databases and a function library.
pub fn load_dataset(server: &RedisServer) {
    let mut conn = server.connect();
    let mut c: Vec<Vec<String>> = Vec::new();
    for db in ["0", "3"] {
        c.push(cmd(&["SELECT", db]));
        // strings: raw, integer-encoded, LZF-compressible, incompressible, large
        c.push(cmd(&["SET", "str:short", "hello"]));
        c.push(cmd(&["SET", "str:int", "123456"]));
        c.push(cmd(&["SET", "str:neg", "-42"]));
        c.push(cmd(&["SET", "str:lzf", &"abc".repeat(2000)]));
        let noisy: String = (0..3000u32)
            .map(|i| char::from(b'!' + ((i * 7919 + i / 3) % 90) as u8))
            .collect();
        c.push(cmd(&["SET", "str:noisy", &noisy]));
        c.push(cmd(&["SET", "str:big", &"x".repeat(1 << 20)]));
        c.push(cmd(&["SET", "ttl:ex", "v", "EX", "3600"]));
        c.push(cmd(&["SET", "ttl:px", "v", "PX", "7200000"]));
        // lists: listpack and multi-node quicklist
        c.push(cmd(&["RPUSH", "list:small", "a", "b", "1", "2"]));
        let mut big = vec!["RPUSH".to_owned(), "list:big".to_owned()];
        big.extend((0..5000).map(|i| format!("element-{i}")));
        c.push(big);
        // sets: intset, listpack (Redis 7.2+/Valkey), hashtable
        c.push(cmd(&["SADD", "set:ints", "1", "2", "3", "-100", "65536"]));
        c.push(cmd(&["SADD", "set:small", "apple", "banana"]));
        let mut big = vec!["SADD".to_owned(), "set:big".to_owned()];
        big.extend((0..1000).map(|i| format!("member-{i}")));
        c.push(big);
        // sorted sets: listpack and skiplist
        c.push(cmd(&["ZADD", "zset:small", "1", "one", "2.5", "two"]));
        let mut big = vec!["ZADD".to_owned(), "zset:big".to_owned()];
        for i in 0..500 {
            big.push(format!("{}", f64::from(i) * 1.5));
            big.push(format!("zmember-{i}"));
        }
        c.push(big);
        // hashes: listpack and hashtable
        c.push(cmd(&["HSET", "hash:small", "f1", "v1", "f2", "2"]));
        let mut big = vec!["HSET".to_owned(), "hash:big".to_owned()];
        for i in 0..1000 {
            big.push(format!("field-{i}"));
            big.push(format!("value-{i}"));
        }
        c.push(big);
        c.push(cmd(&["HSET", "hash:longvalue", "f", &"y".repeat(200)]));
        // streams with consumer groups and pending entries
        for i in 0..300 {
            c.push(cmd(&[
                "XADD",
                "stream:s",
                "*",
                "n",
                &i.to_string(),
                "payload",
                "data",
            ]));
        }
        c.push(cmd(&["XGROUP", "CREATE", "stream:s", "g1", "0"]));
        c.push(cmd(&["XGROUP", "CREATE", "stream:s", "g2", "$"]));
        c.push(cmd(&[
            "XREADGROUP",
            "GROUP",
            "g1",
            "alice",
            "COUNT",
            "10",
            "STREAMS",
            "stream:s",
            ">",
        ]));
        c.push(cmd(&[
            "XREADGROUP",
            "GROUP",
            "g1",
            "bob",
            "COUNT",
            "5",
            "STREAMS",
            "stream:s",
            ">",
        ]));
        c.push(cmd(&["XADD", "stream:empty-group", "*", "a", "1"]));
        c.push(cmd(&["XDEL", "stream:empty-group", "0-1"]));
    }
    c.push(cmd(&["SELECT", "9"]));
    c.push(cmd(&["SET", "lonely", "key"]));
    c.push(cmd(&[
        "FUNCTION",
        "LOAD",
        "#!lua name=sblib\nredis.register_function('sbfunc', function(keys, args) return 1 end)",
    ]));
    pipeline(&mut conn, &c);
    if server.flavor() == RedisFlavor::Valkey9 {
        // Hash field TTLs (Valkey 9): written as RDB_TYPE_HASH_2.
        pipeline(
            &mut conn,
            &[
                cmd(&["SELECT", "0"]),
                cmd(&["HSET", "hash:fieldttl", "f1", "v1", "f2", "v2"]),
                cmd(&["HEXPIRE", "hash:fieldttl", "3600", "FIELDS", "1", "f1"]),
            ],
        );
    }
}

/// `INFO keyspace` as db -> (keys, expires).
fn keyspace(server: &RedisServer) -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    for (k, v) in server.info("keyspace") {
        let Some(db) = k.strip_prefix("db") else {
            continue;
        };
        let field = |name: &str| -> u64 {
            v.split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .unwrap()
                .parse()
                .unwrap()
        };
        out.insert(db.parse().unwrap(), (field("keys"), field("expires")));
    }
    out
}

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
