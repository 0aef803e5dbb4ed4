#![allow(clippy::unwrap_used)]
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::redis::resp::decode_reply;

const A: &str = "d066e353acedb0f2ee121675b65cb1789af331d9";
const B: &str = "4881bf34fcd885c57efa996d18b25e40de231099";
const C: &str = "e679e614e682ec35afd6e6da5266f8df8f48b3de";
const RA: &str = "d5985d932853a847d2e36d35f773a255f3648c7e";
const RB: &str = "54ae59749f475926ede93360f5fd520eb3be3da8";
const RC: &str = "31c1454a37f2e64e9c3f6eff9feb65d448907e58";
const SHARD_A: &str = "2dae18a86824801280a5398571a6d53f6eeaa352";

fn bulk(s: &str) -> Reply {
    Reply::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())))
}

fn node(id: &str, port: i64, role: &str, offset: i64, health: &str) -> Reply {
    Reply::Array(vec![
        bulk("id"),
        bulk(id),
        bulk("port"),
        Reply::Integer(port),
        bulk("ip"),
        bulk("127.0.0.1"),
        bulk("endpoint"),
        bulk("127.0.0.1"),
        bulk("role"),
        bulk(role),
        bulk("replication-offset"),
        Reply::Integer(offset),
        bulk("health"),
        bulk(health),
    ])
}

fn shard(slots: &[i64], nodes: Vec<Reply>, id: Option<&str>) -> Reply {
    let mut v = vec![
        bulk("slots"),
        Reply::Array(slots.iter().map(|&s| Reply::Integer(s)).collect()),
        bulk("nodes"),
        Reply::Array(nodes),
    ];
    if let Some(id) = id {
        v.push(bulk("id"));
        v.push(bulk(id));
    }
    Reply::Array(v)
}

/// Encodes a reply as RESP2 bytes, to run the same path as the agent (bytes -> Reply).
fn encode(r: &Reply, out: &mut Vec<u8>) {
    match r {
        Reply::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
        Reply::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
        Reply::Integer(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
        Reply::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
        Reply::Bulk(Some(b)) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Reply::Array(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for i in items {
                encode(i, out);
            }
        }
    }
}

fn through_bytes(r: &Reply) -> Reply {
    let mut raw = Vec::new();
    encode(r, &mut raw);
    decode_reply(&mut BytesMut::from(&raw[..]))
        .unwrap()
        .unwrap()
}

/// Three masters with one replica each, plus a master without slots, as Redis 7.0 sends it.
fn three_shards(shard_ids: bool) -> Reply {
    let sid = |s: &'static str| if shard_ids { Some(s) } else { None };
    Reply::Array(vec![
        shard(
            &[],
            vec![node(
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                7004,
                "master",
                0,
                "online",
            )],
            sid("1d6485927b5234fdfc57f019f9a090fc92ef643e"),
        ),
        shard(
            &[10923, 16383],
            vec![
                node(C, 7003, "master", 100, "online"),
                node(RC, 7006, "replica", 100, "online"),
            ],
            sid("a45237a178784ca086a4821e58ff398104f492ce"),
        ),
        shard(
            &[0, 5460],
            vec![
                node(A, 7001, "master", 100, "online"),
                node(RA, 7005, "replica", 0, "loading"),
            ],
            sid(SHARD_A),
        ),
        shard(
            &[5461, 10922],
            vec![
                node(RB, 7007, "replica", 100, "online"),
                node(B, 7002, "master", 100, "online"),
            ],
            sid("b45237a178784ca086a4821e58ff398104f492ce"),
        ),
    ])
}

const NODES: &str = "\
e679e614e682ec35afd6e6da5266f8df8f48b3de 127.0.0.1:7003@17003 master - 0 1796168631985 3 connected 10923-16383
4881bf34fcd885c57efa996d18b25e40de231099 127.0.0.1:7002@17002 master - 0 1796168631000 2 connected 5461-10922
d066e353acedb0f2ee121675b65cb1789af331d9 127.0.0.1:7001@17001 myself,master - 0 1796168628000 1 connected 0-5460
d5985d932853a847d2e36d35f773a255f3648c7e 127.0.0.1:7005@17005 slave d066e353acedb0f2ee121675b65cb1789af331d9 0 1796168629949 1 connected
54ae59749f475926ede93360f5fd520eb3be3da8 127.0.0.1:7007@17007 slave 4881bf34fcd885c57efa996d18b25e40de231099 0 1796168629949 2 connected
31c1454a37f2e64e9c3f6eff9feb65d448907e58 127.0.0.1:7006@17006,node6.example slave e679e614e682ec35afd6e6da5266f8df8f48b3de 0 1796168629949 3 connected
aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 127.0.0.1:7004@17004 master - 0 1796168632158 0 connected
";

#[test]
fn crc16_matches_the_cluster_spec_vector() {
    // Cluster spec, appendix A: "123456789" -> 0x31C3.
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(crc16(b""), 0);
}

#[test]
fn hash_tags_follow_key_hash_slot() {
    // Cluster spec, "Hash tags".
    assert_eq!(
        key_hash_slot(b"{user1000}.following"),
        key_hash_slot(b"{user1000}.followers")
    );
    assert_eq!(
        key_hash_slot(b"{user1000}.following"),
        key_hash_slot(b"user1000")
    );
    // Only the first `{` and the first `}` after it count.
    assert_eq!(key_hash_slot(b"foo{bar}{zap}"), key_hash_slot(b"bar"));
    assert_eq!(key_hash_slot(b"foo{{bar}}zap"), key_hash_slot(b"{bar"));
    // `{}` right away: the whole key is hashed.
    assert_eq!(
        key_hash_slot(b"foo{}{bar}"),
        crc16(b"foo{}{bar}") % SLOT_COUNT
    );
    // No closing brace: the whole key.
    assert_eq!(key_hash_slot(b"foo{bar"), crc16(b"foo{bar") % SLOT_COUNT);
    assert_eq!(key_hash_slot(b"{"), crc16(b"{") % SLOT_COUNT);
    assert_eq!(key_hash_slot(b"}{"), crc16(b"}{") % SLOT_COUNT);
    // `CLUSTER KEYSLOT foo` on a real server.
    assert_eq!(key_hash_slot(b"foo"), 12182);
    assert_eq!(key_hash_slot(b""), 0);
}

#[test]
fn parses_cluster_shards_from_redis_and_valkey() {
    for shard_ids in [false, true] {
        let topo =
            ClusterTopology::from_cluster_shards(&through_bytes(&three_shards(shard_ids))).unwrap();
        assert_eq!(topo.shards.len(), 4);
        // Canonical order: by lowest slot, the slot-less master last.
        let masters: Vec<&str> = topo.shards.iter().map(|s| s.master.id.as_str()).collect();
        assert_eq!(
            masters,
            [A, B, C, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
        );
        let a = &topo.shards[0];
        assert_eq!(a.slots.to_string(), "0-5460");
        assert_eq!(a.id.as_deref(), shard_ids.then_some(SHARD_A));
        assert_eq!(a.master.port, Some(7001));
        assert_eq!(a.master.replication_offset, Some(100));
        assert_eq!(a.master.address(), Some(("127.0.0.1".into(), 7001)));
        assert_eq!(a.replicas.len(), 1);
        assert_eq!(a.replicas[0].id, RA);
        assert_eq!(a.replicas[0].role, NodeRole::Replica);
        assert_eq!(a.replicas[0].health, NodeHealth::Loading);
        assert_eq!(topo.shards[1].replicas[0].id, RB);
        assert!(topo.shards[3].slots.is_empty());
        assert_eq!(topo.serving_shards().count(), 3);
        topo.check_coverage().unwrap();
        let map = topo.slot_map().unwrap();
        assert_eq!(map.owner(0), Some(A));
        assert_eq!(map.owner(5461), Some(B));
        assert_eq!(map.owner(16383), Some(C));
        assert_eq!(topo.shard_of_slot(10923), Some(2));
        assert_eq!(topo.shard_of_node(RC), Some(2));
        assert_eq!(topo.shard_of_master(RC), None);
    }
}

#[test]
fn valkey_keeps_a_failed_master_in_its_shard() {
    // After a failover Valkey lists the dead master, still flagged master, in the shard of
    // the replica that took over (grouping by shard id).
    let reply = Reply::Array(vec![shard(
        &[0, 16383],
        vec![
            node(A, 7001, "master", 100, "fail"),
            node(RA, 7005, "master", 120, "online"),
        ],
        Some(SHARD_A),
    )]);
    let topo = ClusterTopology::from_cluster_shards(&reply).unwrap();
    let s = &topo.shards[0];
    assert_eq!(s.master.id, RA);
    assert_eq!(s.other_masters.len(), 1);
    assert_eq!(s.other_masters[0].id, A);
    assert_eq!(s.other_masters[0].health, NodeHealth::Failed);
    assert!(s.replicas.is_empty());
}

#[test]
fn two_live_masters_in_one_shard_are_ambiguous() {
    // Valkey right after a forced failover: the dead master is not flagged `fail` yet.
    let reply = Reply::Array(vec![shard(
        &[0, 16383],
        vec![
            node(RA, 7005, "master", 120, "online"),
            node(A, 7001, "master", 100, "online"),
        ],
        Some(SHARD_A),
    )]);
    let e = ClusterTopology::from_cluster_shards(&reply).unwrap_err();
    assert_eq!(
        e,
        ClusterError::AmbiguousShard {
            masters: vec![A.to_owned(), RA.to_owned()]
        }
    );
    assert!(e.to_string().contains("read CLUSTER NODES"), "{e}");
}

#[test]
fn parses_cluster_nodes_and_agrees_with_cluster_shards() {
    let nodes = ClusterTopology::from_cluster_nodes(NODES).unwrap();
    let shards = ClusterTopology::from_cluster_shards(&three_shards(false)).unwrap();
    assert_eq!(nodes.slot_map().unwrap(), shards.slot_map().unwrap());
    assert_eq!(nodes.shards.len(), shards.shards.len());
    for (n, s) in nodes.shards.iter().zip(&shards.shards) {
        assert_eq!(n.master.id, s.master.id);
        assert_eq!(n.slots, s.slots);
        let ids = |v: &[NodeInfo]| v.iter().map(|x| x.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&n.replicas), ids(&s.replicas));
    }
    let c = &nodes.shards[2];
    assert_eq!(c.master.bus_port, Some(17003));
    assert_eq!(c.replicas[0].hostname.as_deref(), Some("node6.example"));
}

#[test]
fn cluster_nodes_skips_migrating_handshake_and_reads_failures() {
    let text = format!(
        "{A} 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-100 102 [101->-{B}]\n\
         {B} 127.0.0.1:7002@17002 master,fail - 0 0 2 disconnected 101 103-16383 [101-<-{A}]\n\
         bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb 127.0.0.1:7009@17009 handshake - 0 0 0 disconnected\n\
         {RA} :0@0 slave,noaddr {A} 0 0 1 disconnected\n"
    );
    let topo = ClusterTopology::from_cluster_nodes(&text).unwrap();
    assert_eq!(topo.shards.len(), 2);
    assert_eq!(topo.shards[0].slots.to_string(), "0-100,102");
    assert_eq!(topo.shards[1].slots.to_string(), "101,103-16383");
    assert_eq!(topo.shards[1].master.health, NodeHealth::Failed);
    let ra = &topo.shards[0].replicas[0];
    assert_eq!((ra.ip.as_str(), ra.port), ("", None));
    assert_eq!(ra.address(), None);
    topo.check_coverage().unwrap();
}

#[test]
fn bad_input_is_a_typed_error() {
    let nodes_cases = [
        ("short line", "abc def\n"),
        ("bad id", "xyz 127.0.0.1:1@2 master - 0 0 0 connected\n"),
        (
            "no role",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 127.0.0.1:1@2 noflags - 0 0 0 connected\n",
        ),
        (
            "bad slot",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 127.0.0.1:1@2 master - 0 0 0 connected 16384\n",
        ),
        (
            "reversed range",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 127.0.0.1:1@2 master - 0 0 0 connected 9-3\n",
        ),
        (
            "bad port",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 127.0.0.1:x@2 master - 0 0 0 connected\n",
        ),
    ];
    for (what, text) in nodes_cases {
        let e = ClusterTopology::from_cluster_nodes(text).unwrap_err();
        assert!(
            matches!(e, ClusterError::Nodes { line: 1, .. }),
            "{what}: {e}"
        );
    }
    let twice = format!("{NODES}{}", NODES.lines().next().unwrap());
    let e = ClusterTopology::from_cluster_nodes(&twice).unwrap_err();
    assert!(
        matches!(&e, ClusterError::Nodes { line: 8, reason } if reason.contains("listed twice")),
        "{e}"
    );
    let orphan = format!("{RA} 127.0.0.1:7005@17005 slave {A} 0 0 1 connected\n");
    let e = ClusterTopology::from_cluster_nodes(&orphan).unwrap_err();
    assert!(e.to_string().contains("not a master in the list"), "{e}");

    let shards_cases = [
        ("not an array", Reply::Integer(1)),
        (
            "odd pairs",
            Reply::Array(vec![Reply::Array(vec![bulk("slots")])]),
        ),
        (
            "slot out of range",
            Reply::Array(vec![shard(
                &[0, 16384],
                vec![node(A, 1, "master", 0, "online")],
                None,
            )]),
        ),
        (
            "odd slot bounds",
            Reply::Array(vec![shard(
                &[0],
                vec![node(A, 1, "master", 0, "online")],
                None,
            )]),
        ),
        (
            "no master",
            Reply::Array(vec![shard(
                &[0, 1],
                vec![node(RA, 1, "replica", 0, "online")],
                None,
            )]),
        ),
        (
            "bad role",
            Reply::Array(vec![shard(
                &[0, 1],
                vec![node(A, 1, "boss", 0, "online")],
                None,
            )]),
        ),
        (
            "bad port",
            Reply::Array(vec![shard(
                &[0, 1],
                vec![node(A, 70000, "master", 0, "online")],
                None,
            )]),
        ),
        (
            "negative offset",
            Reply::Array(vec![shard(
                &[0, 1],
                vec![node(A, 1, "master", -1, "online")],
                None,
            )]),
        ),
        (
            "bad node id",
            Reply::Array(vec![shard(
                &[0, 1],
                vec![node("zz", 1, "master", 0, "online")],
                None,
            )]),
        ),
        (
            "bad shard id",
            Reply::Array(vec![shard(
                &[0, 1],
                vec![node(A, 1, "master", 0, "online")],
                Some("x"),
            )]),
        ),
    ];
    for (what, reply) in shards_cases {
        let e = ClusterTopology::from_cluster_shards(&reply).unwrap_err();
        assert!(matches!(e, ClusterError::Shards(_)), "{what}: {e}");
    }
}

#[test]
fn coverage_names_gaps_and_overlaps() {
    let reply = Reply::Array(vec![
        shard(
            &[0, 100, 200, 16383],
            vec![node(A, 1, "master", 0, "online")],
            None,
        ),
        shard(&[50, 120], vec![node(B, 2, "master", 0, "online")], None),
    ]);
    let topo = ClusterTopology::from_cluster_shards(&reply).unwrap();
    let e = topo.check_coverage().unwrap_err();
    assert_eq!(e.gaps.to_string(), "121-199");
    assert_eq!(e.overlaps.len(), 1);
    assert_eq!(e.overlaps[0].slots.to_string(), "50-100");
    let mut both = vec![A.to_owned(), B.to_owned()];
    both.sort();
    assert_eq!(e.overlaps[0].owners, both);
    let msg = e.to_string();
    assert!(msg.contains("79 slots have no owner: 121-199"), "{msg}");
    assert!(msg.contains("50-100 by"), "{msg}");

    let gappy = SlotMap::from_ranges([(SlotRange::new(1, 16383).unwrap(), "x")]).unwrap();
    assert_eq!(gappy.check_complete().unwrap_err().gaps.to_string(), "0");
}

#[test]
fn slot_map_serialises_canonically() {
    let map = SlotMap::from_ranges([
        (SlotRange::new(5461, 10922).unwrap(), B),
        (SlotRange::new(0, 5460).unwrap(), A),
        (SlotRange::new(10923, 16383).unwrap(), C),
    ])
    .unwrap();
    let rec = SlotMapRecord {
        effective_unix_ms: 1_796_168_631_985,
        map,
    };
    let text = rec.encode();
    assert_eq!(
        text,
        format!(
            "syncbridge-slot-map 1\neffective-unix-ms 1796168631985\n\
             0-5460 {A}\n5461-10922 {B}\n10923-16383 {C}\n"
        )
    );
    assert_eq!(SlotMapRecord::decode(text.as_bytes()).unwrap(), rec);

    let refused = [
        ("no trailing newline", text.trim_end().to_owned()),
        ("CRLF", text.replace('\n', "\r\n")),
        ("wrong header", text.replace("slot-map 1", "slot-map 2")),
        ("leading zero", text.replace("5461-", "05461-")),
        ("single slot short form", text.replace("0-5460", "0")),
        (
            "unsorted",
            format!("syncbridge-slot-map 1\neffective-unix-ms 1\n10-20 {A}\n0-5 {B}\n"),
        ),
        (
            "overlap",
            format!("syncbridge-slot-map 1\neffective-unix-ms 1\n0-20 {A}\n20-25 {B}\n"),
        ),
        (
            "unmerged",
            format!("syncbridge-slot-map 1\neffective-unix-ms 1\n0-20 {A}\n21-25 {A}\n"),
        ),
        (
            "owner with a space",
            "syncbridge-slot-map 1\neffective-unix-ms 1\n0-20 a b\n".into(),
        ),
        (
            "slot too big",
            format!("syncbridge-slot-map 1\neffective-unix-ms 1\n0-16384 {A}\n"),
        ),
        ("empty", String::new()),
    ];
    for (what, bytes) in refused {
        let e = SlotMapRecord::decode(bytes.as_bytes()).unwrap_err();
        assert!(
            matches!(e, ClusterError::SlotMapFormat { .. }),
            "{what}: {e}"
        );
    }
    // A map without any slot (a cluster not set up yet) is valid too.
    let empty = SlotMapRecord {
        effective_unix_ms: 0,
        map: SlotMap::empty(),
    };
    assert_eq!(
        SlotMapRecord::decode(empty.encode().as_bytes()).unwrap(),
        empty
    );
}

#[test]
fn diff_names_moved_ranges() {
    let before = SlotMap::from_ranges([
        (SlotRange::new(0, 5460).unwrap(), A),
        (SlotRange::new(5461, 10922).unwrap(), B),
        (SlotRange::new(10923, 16383).unwrap(), C),
    ])
    .unwrap();
    let after = SlotMap::from_ranges([
        (SlotRange::new(0, 4460).unwrap(), A),
        (SlotRange::new(4461, 5460).unwrap(), B),
        (SlotRange::new(5461, 10922).unwrap(), B),
        (SlotRange::new(10923, 16383).unwrap(), RC),
    ])
    .unwrap();
    let moves = before.diff(&after);
    assert_eq!(
        moves,
        vec![
            SlotMove {
                slots: SlotRange::new(4461, 5460).unwrap(),
                from: Some(A.into()),
                to: Some(B.into()),
            },
            SlotMove {
                slots: SlotRange::new(10923, 16383).unwrap(),
                from: Some(C.into()),
                to: Some(RC.into()),
            },
        ]
    );
    assert!(after.diff(&after).is_empty());
    assert_eq!(after.slots_of(B).to_string(), "4461-10922");
    let relabeled = after
        .map_owners(|o| if o == RC { "shard-c".into() } else { o.into() })
        .unwrap();
    assert_eq!(relabeled.owner(16000), Some("shard-c"));
    assert_eq!(relabeled.owners().len(), 3);
}

#[test]
fn slot_range_parsing() {
    assert_eq!(
        "5".parse::<SlotRange>().unwrap(),
        SlotRange::single(5).unwrap()
    );
    assert_eq!("0-16383".parse::<SlotRange>().unwrap().len(), 16384);
    for bad in [
        "",
        "-",
        "1-",
        "-1",
        "+1",
        "1-2-3",
        "16384",
        "99999999999",
        " 1",
    ] {
        assert!(bad.parse::<SlotRange>().is_err(), "{bad:?}");
    }
    let set = SlotRanges::from_ranges([
        SlotRange::new(10, 20).unwrap(),
        SlotRange::new(0, 9).unwrap(),
        SlotRange::new(15, 30).unwrap(),
        SlotRange::new(40, 40).unwrap(),
    ]);
    assert_eq!(set.to_string(), "0-30,40");
    assert_eq!(set.slot_count(), 32);
    assert!(set.contains(30) && set.contains(40) && !set.contains(31) && !set.contains(41));
}

/// A random assignment: runs of random length, each owned by one of a few owners or none.
fn arb_map() -> impl Strategy<Value = SlotMap> {
    prop::collection::vec((1u16..3000, prop::option::weighted(0.9, 0u8..5)), 1..40).prop_map(
        |runs| {
            let mut claims: Vec<(SlotRange, String)> = Vec::new();
            let mut start: u32 = 0;
            for (len, owner) in runs {
                if start > u32::from(MAX_SLOT) {
                    break;
                }
                let end = (start + u32::from(len) - 1).min(u32::from(MAX_SLOT));
                if let Some(o) = owner {
                    claims.push((
                        SlotRange::new(i64::from(start), i64::from(end)).unwrap(),
                        format!("{o:040x}"),
                    ));
                }
                start = end + 1;
            }
            SlotMap::from_ranges(claims.iter().map(|(r, o)| (*r, o.as_str()))).unwrap()
        },
    )
}

proptest! {
    #[test]
    fn serialisation_round_trips(map in arb_map(), t in any::<u64>()) {
        let rec = SlotMapRecord { effective_unix_ms: t, map };
        let text = rec.encode();
        let back = SlotMapRecord::decode(text.as_bytes()).unwrap();
        prop_assert_eq!(&back, &rec);
        prop_assert_eq!(back.encode(), text);
    }

    #[test]
    fn coverage_check_finds_exactly_the_gaps(map in arb_map()) {
        let owned: usize = map.ranges().iter().map(|(r, _)| r.len()).sum();
        let gaps = map.gaps();
        prop_assert_eq!(owned + gaps.slot_count(), usize::from(SLOT_COUNT));
        for s in 0..SLOT_COUNT {
            prop_assert_eq!(gaps.contains(s), map.owner(s).is_none());
        }
        prop_assert_eq!(map.check_complete().is_ok(), gaps.is_empty());
    }

    #[test]
    fn overlapping_claims_are_named(map in arb_map(), extra_start in 0u16..16384, len in 1u16..500) {
        let end = extra_start.saturating_add(len - 1).min(MAX_SLOT);
        let extra = SlotRange::new(i64::from(extra_start), i64::from(end)).unwrap();
        let intruder = "f".repeat(40);
        let mut claims: Vec<(SlotRange, &str)> = map.ranges();
        claims.push((extra, intruder.as_str()));
        let clash: Vec<u16> = extra.slots().filter(|&s| map.owner(s).is_some()).collect();
        match SlotMap::from_ranges(claims) {
            Ok(built) => {
                prop_assert!(clash.is_empty());
                for s in extra.slots() {
                    prop_assert_eq!(built.owner(s), Some(intruder.as_str()));
                }
            }
            Err(ClusterError::Coverage(e)) => {
                let named = SlotRanges::from_ranges(e.overlaps.iter().map(|o| o.slots));
                prop_assert_eq!(named, SlotRanges::from_slots(clash));
                for o in &e.overlaps {
                    prop_assert!(o.owners.contains(&intruder));
                    prop_assert_eq!(o.owners.len(), 2);
                }
            }
            Err(other) => prop_assert!(false, "unexpected {}", other),
        }
    }

    #[test]
    fn applying_the_diff_gives_the_newer_map(a in arb_map(), b in arb_map()) {
        let mut owners: Vec<Option<String>> =
            (0..SLOT_COUNT).map(|s| a.owner(s).map(str::to_owned)).collect();
        for m in a.diff(&b) {
            for s in m.slots.slots() {
                prop_assert_eq!(owners[usize::from(s)].as_deref(), m.from.as_deref());
                owners[usize::from(s)] = m.to.clone();
            }
        }
        for s in 0..SLOT_COUNT {
            prop_assert_eq!(owners[usize::from(s)].as_deref(), b.owner(s));
        }
    }

    #[test]
    fn hash_tag_keys_share_the_tag_slot(tag in "[a-z0-9]{1,12}", a in "[^{}]{0,10}", b in "[^{}]{0,10}") {
        let ka = format!("{a}{{{tag}}}{b}");
        let kb = format!("{b}{{{tag}}}x{a}");
        prop_assert_eq!(key_hash_slot(ka.as_bytes()), key_hash_slot(tag.as_bytes()));
        prop_assert_eq!(key_hash_slot(kb.as_bytes()), key_hash_slot(tag.as_bytes()));
    }

    /// A second, independent implementation (redis-protocol's, on the `crc16` crate) agrees
    /// on keys rich in braces.
    #[test]
    fn key_slot_agrees_with_redis_protocol(key in prop::collection::vec(prop::sample::select(vec![b'{', b'}', b'a', b'b', 0u8, 0xff]), 0..16)) {
        prop_assert_eq!(key_hash_slot(&key), redis_protocol::redis_keyslot(&key));
    }

    #[test]
    fn cluster_parsers_never_panic(text in "\\PC{0,400}", bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = ClusterTopology::from_cluster_nodes(&text);
        let _ = SlotMapRecord::decode(&bytes);
        let _ = SlotMapRecord::decode(text.as_bytes());
        if let Ok(Some(reply)) = decode_reply(&mut BytesMut::from(&bytes[..])) {
            let _ = ClusterTopology::from_cluster_shards(&reply);
        }
    }
}
