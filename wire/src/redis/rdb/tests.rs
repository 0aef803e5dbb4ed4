#![allow(clippy::unwrap_used)]

use super::encodings::tests::listpack;
use super::lzf::tests::compress_for_test;
use super::*;
use proptest::prelude::*;

/// Writes RDB files the way rdb.c does, for tests.
struct W(Vec<u8>);

impl W {
    fn new(magic: &[u8; 9]) -> Self {
        Self(magic.to_vec())
    }
    fn byte(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn len(&mut self, n: u64) -> &mut Self {
        if n < 64 {
            self.byte(n as u8)
        } else if n < 16384 {
            self.raw(&[0x40 | (n >> 8) as u8, n as u8])
        } else if n <= u64::from(u32::MAX) {
            self.byte(0x80).raw(&(n as u32).to_be_bytes())
        } else {
            self.byte(0x81).raw(&n.to_be_bytes())
        }
    }
    fn s(&mut self, s: &[u8]) -> &mut Self {
        self.len(s.len() as u64).raw(s)
    }
    fn int16(&mut self, v: i16) -> &mut Self {
        self.byte(0xC1).raw(&v.to_le_bytes())
    }
    fn lzf(&mut self, s: &[u8]) -> &mut Self {
        let c = compress_for_test(s);
        self.byte(0xC3)
            .len(c.len() as u64)
            .len(s.len() as u64)
            .raw(&c)
    }
    fn finish(&mut self, checksum: bool) -> Vec<u8> {
        self.byte(0xFF);
        let crc = if checksum { CRC64.checksum(&self.0) } else { 0 };
        self.raw(&crc.to_le_bytes());
        self.0.clone()
    }
}

fn intset(values: &[i16]) -> Vec<u8> {
    let mut s = 2u32.to_le_bytes().to_vec();
    s.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        s.extend_from_slice(&v.to_le_bytes());
    }
    s
}

/// A file touching every opcode and most encodings.
fn sample(magic: &[u8; 9], checksum: bool) -> Vec<u8> {
    let mut w = W::new(magic);
    w.byte(250).s(b"redis-ver").s(b"7.0.15");
    w.byte(250).s(b"redis-bits").byte(0xC0).byte(64);
    w.byte(245)
        .s(b"#!lua name=mylib\nredis.register_function('f', function() return 1 end)");
    w.byte(247)
        .len(0x1234_5678)
        .len(2)
        .len(1)
        .len(2)
        .len(7)
        .len(5)
        .s(b"aux payload")
        .len(0);
    w.byte(254).len(0).byte(251).len(9).len(1);
    w.byte(0).s(b"plain").s(b"value");
    w.byte(0).s(b"number").int16(-1234);
    w.byte(0).s(b"compressed").lzf(&[b'a'; 200]);
    w.byte(252)
        .raw(&1_900_000_000_000u64.to_le_bytes())
        .byte(248)
        .len(5)
        .byte(0)
        .s(b"ttl")
        .s(b"x");
    // quicklist 2: one packed node, one plain node
    w.byte(18)
        .s(b"list")
        .len(2)
        .len(2)
        .s(&listpack(&[b"a", b"b", b"c"]))
        .len(1)
        .s(&[b'P'; 100]);
    w.byte(11).s(b"intset").s(&intset(&[-3, 1, 700]));
    w.byte(20).s(b"setlp").s(&listpack(&[b"m1", b"m2"]));
    w.byte(5)
        .s(b"zset")
        .len(2)
        .s(b"one")
        .raw(&1f64.to_le_bytes())
        .s(b"two")
        .raw(&2f64.to_le_bytes());
    w.byte(17)
        .s(b"zsetlp")
        .lzf(&listpack(&[&b"member-aaaaaaaaaaaaaaaaaaaaaaa"[..], b"1"]));
    w.byte(4).s(b"hash").len(1).s(b"f").s(b"v");
    w.byte(16)
        .s(b"hashlp")
        .s(&listpack(&[b"f", b"v", b"g", b"w"]));
    // stream v3: one node, length, last id, first id, max deleted, added, one group
    w.byte(21)
        .s(b"stream")
        .len(1)
        .s(&[0u8; 16])
        .s(&listpack(&[b"1", b"0", b"f"]));
    w.len(1).len(5).len(0).len(5).len(0).len(0).len(0).len(1);
    w.len(1).s(b"group").len(5).len(0).len(1);
    w.len(1).raw(&[1u8; 16]).raw(&7u64.to_le_bytes()).len(1);
    w.len(1)
        .s(b"consumer")
        .raw(&8u64.to_le_bytes())
        .raw(&9u64.to_le_bytes())
        .len(1)
        .raw(&[1u8; 16]);
    // module value: id, then an unsigned, a float, a double, a string, EOF
    w.byte(7)
        .s(b"module")
        .len(0xABCDE)
        .len(2)
        .len(42)
        .len(3)
        .raw(&[0; 4])
        .len(4)
        .raw(&[0; 8]);
    w.len(5).s(b"m").len(0);
    w.byte(254)
        .len(2)
        .byte(249)
        .byte(3)
        .byte(0)
        .s(b"db2")
        .s(b"v");
    w.finish(checksum)
}

fn feed_in_pieces(bytes: &[u8], cuts: &[usize]) -> Result<RdbReport, RdbError> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut v = RdbValidator::new();
    let mut fed = 0;
    for p in points {
        v.feed(&bytes[fed..p])?;
        fed = p;
    }
    v.finish()
}

#[test]
fn sample_reports_every_key() {
    let file = sample(b"REDIS0011", true);
    let r = validate(&file).unwrap();
    assert_eq!(
        r.format,
        RdbFormat {
            magic: RdbMagic::Redis,
            version: 11
        }
    );
    assert_eq!(r.keys_per_db, BTreeMap::from([(0, 13), (2, 1)]));
    assert_eq!(r.expires_per_db, BTreeMap::from([(0, 1)]));
    assert_eq!(r.keys_per_kind[&ValueKind::String], 5);
    assert_eq!(r.keys_per_kind[&ValueKind::List], 1);
    assert_eq!(r.keys_per_kind[&ValueKind::Set], 2);
    assert_eq!(r.keys_per_kind[&ValueKind::SortedSet], 2);
    assert_eq!(r.keys_per_kind[&ValueKind::Hash], 2);
    assert_eq!(r.keys_per_kind[&ValueKind::Stream], 1);
    assert_eq!(r.keys_per_kind[&ValueKind::Module], 1);
    assert_eq!(r.keys_per_encoding["set_intset"], 1);
    assert_eq!(r.aux["redis-ver"], "7.0.15");
    assert_eq!(r.aux["redis-bits"], "64");
    assert_eq!((r.functions, r.module_aux, r.unchecked_blobs), (1, 1, 0));
    assert_eq!((r.lru_entries, r.lfu_entries), (1, 1));
    assert_eq!(r.size, file.len() as u64);
    assert!(r.checksum.is_some());
    assert_eq!(r.total_keys(), 14);
}

#[test]
fn every_two_piece_split_gives_the_same_report() {
    let file = sample(b"REDIS0011", true);
    let whole = validate(&file).unwrap();
    for cut in 0..=file.len() {
        assert_eq!(
            feed_in_pieces(&file, &[cut]).unwrap(),
            whole,
            "cut at {cut}"
        );
    }
}

#[test]
fn every_truncation_names_its_offset() {
    let file = sample(b"REDIS0011", true);
    for cut in 0..file.len() {
        assert_eq!(
            feed_in_pieces(&file[..cut], &[]).unwrap_err(),
            RdbError::Truncated { offset: cut as u64 },
            "cut at {cut}"
        );
    }
}

#[test]
fn every_flipped_byte_is_rejected() {
    let file = sample(b"REDIS0011", true);
    for at in 0..file.len() {
        for bit in [0x01u8, 0x80] {
            let mut bad = file.clone();
            bad[at] ^= bit;
            assert!(validate(&bad).is_err(), "flip {bit:#x} at {at} accepted");
        }
    }
    // Without a checksum, flips must still never panic.
    let file = sample(b"REDIS0011", false);
    for at in 0..file.len() {
        let mut bad = file.clone();
        bad[at] ^= 0x55;
        let _ = validate(&bad);
    }
}

#[test]
fn checksum_mismatch_and_disabled_checksum() {
    let mut file = sample(b"REDIS0011", true);
    let n = file.len();
    file[n - 1] ^= 1;
    let err = validate(&file).unwrap_err();
    assert!(
        matches!(err, RdbError::ChecksumMismatch { offset, .. } if offset == n as u64 - 8),
        "{err}"
    );
    let file = sample(b"REDIS0011", false);
    assert_eq!(validate(&file).unwrap().checksum, None);
}

#[test]
fn versions_and_magic_decide_type_meanings() {
    assert_eq!(
        validate(b"REDIS0013").unwrap_err(),
        RdbError::UnsupportedVersion {
            version: 13,
            offset: 5
        }
    );
    assert_eq!(
        validate(b"REDIS0008").unwrap_err(),
        RdbError::UnsupportedVersion {
            version: 8,
            offset: 5
        }
    );
    assert!(matches!(
        validate(b"RUBBISH00"),
        Err(RdbError::BadMagic { .. })
    ));
    // Valkey's HASH_2 (type 22): field, value, ms expiry.
    let mut w = W::new(b"VALKEY080");
    w.byte(254)
        .len(0)
        .byte(22)
        .s(b"h")
        .len(2)
        .s(b"f1")
        .s(b"v1")
        .raw(&5i64.to_le_bytes());
    w.s(b"f2").s(b"v2").raw(&(-1i64).to_le_bytes());
    let r = validate(&w.finish(true)).unwrap();
    assert_eq!(r.keys_per_encoding["hash_2"], 1);
    // The same bytes are not a Redis 11 file.
    let mut w = W::new(b"REDIS0011");
    w.byte(254).len(0).byte(22).s(b"h");
    assert_eq!(
        validate(&w.finish(true)).unwrap_err(),
        RdbError::UnsupportedType {
            rdb_type: 22,
            offset: 11
        }
    );
    // Redis 12 (7.4): type 25 is a listpack of triples after a min-expire.
    let mut w = W::new(b"REDIS0012");
    w.byte(25)
        .s(b"h")
        .raw(&[0; 8])
        .s(&listpack(&[b"f", b"v", b"0"]));
    w.byte(244).len(1).len(2).len(3);
    assert_eq!(
        validate(&w.finish(true)).unwrap().keys_per_encoding["hash_listpack_ex"],
        1
    );
    // SLOT_INFO is unknown to Redis 11; FUNCTION_PRE_GA and module pre-GA are refused.
    let mut w = W::new(b"REDIS0011");
    w.byte(244);
    assert_eq!(
        validate(&w.finish(true)).unwrap_err(),
        RdbError::UnsupportedOpcode {
            opcode: 244,
            offset: 9
        }
    );
    let mut w = W::new(b"REDIS0011");
    w.byte(246);
    assert_eq!(
        validate(&w.finish(true)).unwrap_err(),
        RdbError::UnsupportedOpcode {
            opcode: 246,
            offset: 9
        }
    );
    let mut w = W::new(b"REDIS0011");
    w.byte(6);
    assert_eq!(
        validate(&w.finish(true)).unwrap_err(),
        RdbError::UnsupportedType {
            rdb_type: 6,
            offset: 9
        }
    );
}

#[test]
fn corrupt_blobs_name_their_offset() {
    let mut w = W::new(b"REDIS0011");
    let mut lp = listpack(&[b"f", b"v"]);
    lp[6] = 0xF7; // invalid encoding byte
    w.byte(16).s(b"h").s(&lp);
    let err = validate(&w.finish(true)).unwrap_err();
    assert!(
        matches!(&err, RdbError::Corrupt { offset: 12, reason } if reason.contains("listpack")),
        "{err}"
    );
    let mut w = W::new(b"REDIS0011");
    w.byte(16).s(b"h").s(&listpack(&[b"f"]));
    assert!(matches!(
        validate(&w.finish(true)),
        Err(RdbError::Corrupt { .. })
    ));
    let mut w = W::new(b"REDIS0011");
    w.byte(18).s(b"l").len(1).len(3).s(b"x");
    assert!(matches!(
        validate(&w.finish(true)),
        Err(RdbError::Corrupt { .. })
    ));
}

#[test]
fn large_values_are_skipped_in_bounded_memory() {
    let big = vec![7u8; 10 << 20];
    let mut w = W::new(b"REDIS0011");
    w.byte(0).s(b"big").s(&big);
    w.byte(0).s(b"bigz").lzf(&big);
    // A listpack over the cap is skipped too, and counted.
    w.byte(20)
        .s(b"bigset")
        .s(&listpack(&vec![&b"m"[..]; 40000]));
    let file = w.finish(true);
    let mut v = RdbValidator::with_blob_cap(64 << 10);
    let mut peak = 0;
    for chunk in file.chunks(16 << 10) {
        v.feed(chunk).unwrap();
        peak = peak.max(v.buf.len());
    }
    let r = v.finish().unwrap();
    assert!(peak < 80 << 10, "buffered {peak} bytes");
    assert_eq!((r.total_keys(), r.unchecked_blobs), (3, 1));
}

proptest! {
    #[test]
    fn any_pieces_give_the_same_report(cuts in proptest::collection::vec(any::<usize>(), 0..12)) {
        let file = sample(b"REDIS0011", true);
        prop_assert_eq!(feed_in_pieces(&file, &cuts).unwrap(), validate(&file).unwrap());
    }

    #[test]
    fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut file = b"REDIS0011".to_vec();
        file.extend_from_slice(&tail);
        let _ = validate(&file);
    }
}
