//! Cluster topology replies and stored slot maps (`wire::redis::cluster`): `CLUSTER NODES`
//! text, `CLUSTER SHARDS` RESP2 replies and the serialised slot map, chosen by the first byte.
//! Must never panic; whatever parses must hold its invariants.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire::redis::cluster::{
    key_hash_slot, ClusterTopology, SlotMapRecord, MAX_SLOT, SLOT_COUNT,
};
use wire::redis::resp::decode_reply;

fn check(topo: &ClusterTopology) {
    for s in &topo.shards {
        assert!(s.slots.slots().all(|slot| slot <= MAX_SLOT));
    }
    match topo.slot_map() {
        Ok(map) => {
            // Every slot a shard claims maps to that shard's master.
            for s in &topo.shards {
                for r in s.slots.ranges() {
                    assert_eq!(map.owner(r.start()), Some(s.master.id.as_str()));
                    assert_eq!(map.owner(r.end()), Some(s.master.id.as_str()));
                }
            }
            // And the map survives its own serialisation.
            let rec = SlotMapRecord {
                effective_unix_ms: 1,
                map,
            };
            let text = rec.encode();
            let back = SlotMapRecord::decode(text.as_bytes()).expect("encoded map decodes");
            assert_eq!(back, rec);
        }
        Err(e) => assert!(!e.overlaps.is_empty()),
    }
    let _ = topo.check_coverage();
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    assert!(key_hash_slot(rest) < SLOT_COUNT);
    match mode % 3 {
        0 => {
            if let Ok(topo) = ClusterTopology::from_cluster_nodes(&String::from_utf8_lossy(rest)) {
                check(&topo);
            }
        }
        1 => {
            if let Ok(Some(reply)) = decode_reply(&mut BytesMut::from(rest)) {
                if let Ok(topo) = ClusterTopology::from_cluster_shards(&reply) {
                    check(&topo);
                }
            }
        }
        _ => {
            if let Ok(rec) = SlotMapRecord::decode(rest) {
                // Only the canonical form is accepted, so it re-encodes to the same bytes.
                assert_eq!(rec.encode().as_bytes(), rest);
                let _ = rec.map.check_complete();
            }
        }
    }
});
