//! The RDB value layouts as small programs, one per RDB type (`rdbLoadObject` in rdb.c).
//!
//! A program is a flat list of [`Op`]s run by the validator's interpreter; `Repeat` runs its
//! body as many times as the length read just before it. Expressing layouts as data keeps
//! the streaming state tiny (a stack of program counters) and makes every layout readable
//! next to the Redis source it mirrors.

use super::encodings::Shape;

/// What a string's bytes must contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blob {
    /// Opaque bytes (keys, plain values): skipped by length.
    Any,
    /// A listpack of the given shape.
    Listpack(Shape),
    /// A ziplist of the given shape.
    Ziplist(Shape),
    /// An intset.
    Intset,
    /// A zipmap.
    Zipmap,
    /// A stream node key: a raw 16-byte stream ID.
    StreamId,
    /// A quicklist-2 node: plain bytes or a listpack, depending on the container read before.
    QuicklistNode,
    /// An AUX field name or value, kept for the report when short.
    Aux,
}

/// One step of a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// A length-encoded integer (`rdbLoadLen`); becomes the count for a following `Repeat`.
    Len,
    /// A string (`rdbGenericLoadStringObject`): raw, integer-encoded or LZF.
    Str(Blob),
    /// Fixed-size bytes: a binary double, a millisecond time, a raw stream ID.
    Raw(u8),
    /// The pre-RDB-8 textual double of `RDB_TYPE_ZSET` (`rdbLoadDoubleValue`).
    OldDouble,
    /// Runs the body as many times as the last `Len`.
    Repeat(&'static [Op]),
    /// Module serialized values: opcodes until `RDB_MODULE_OPCODE_EOF`.
    ModuleValues,
    /// MODULE_AUX's `when_opcode`, which must be `RDB_MODULE_OPCODE_UINT`.
    WhenOpcode,
}

use Blob::*;
use Op::*;

pub(crate) const KEY: &[Op] = &[Str(Any)];
pub(crate) const AUX: &[Op] = &[Str(Aux), Str(Aux)];
pub(crate) const ONE_LEN: &[Op] = &[Len];
pub(crate) const TWO_LENS: &[Op] = &[Len, Len];
pub(crate) const THREE_LENS: &[Op] = &[Len, Len, Len];
pub(crate) const SECONDS: &[Op] = &[Raw(4)];
pub(crate) const MILLIS: &[Op] = &[Raw(8)];
pub(crate) const ONE_BYTE: &[Op] = &[Raw(1)];
pub(crate) const FUNCTION: &[Op] = &[Str(Any)];
pub(crate) const MODULE_AUX: &[Op] = &[Len, WhenOpcode, Len, ModuleValues];

const STRING: &[Op] = &[Str(Any)];
const LIST_OR_SET: &[Op] = &[Len, Repeat(&[Str(Any)])];
const ZSET: &[Op] = &[Len, Repeat(&[Str(Any), OldDouble])];
const ZSET_2: &[Op] = &[Len, Repeat(&[Str(Any), Raw(8)])];
const HASH: &[Op] = &[Len, Repeat(&[Str(Any), Str(Any)])];
const MODULE_2: &[Op] = &[Len, ModuleValues];
const HASH_ZIPMAP: &[Op] = &[Str(Zipmap)];
const LIST_ZIPLIST: &[Op] = &[Str(Ziplist(Shape::Single))];
const SET_INTSET: &[Op] = &[Str(Intset)];
const PAIRS_ZIPLIST: &[Op] = &[Str(Ziplist(Shape::Pairs))];
const LIST_QUICKLIST: &[Op] = &[Len, Repeat(&[Str(Ziplist(Shape::Single))])];
const PAIRS_LISTPACK: &[Op] = &[Str(Listpack(Shape::Pairs))];
const LIST_QUICKLIST_2: &[Op] = &[Len, Repeat(&[Len, Str(QuicklistNode)])];
const SET_LISTPACK: &[Op] = &[Str(Listpack(Shape::Single))];
/// Redis 7.4 RC hash with field TTLs: per field an absolute TTL, then field and value.
const HASH_METADATA_PRE_GA: &[Op] = &[Len, Repeat(&[Len, Str(Any), Str(Any)])];
/// Redis 7.4 hash with field TTLs: min expire, then per field a relative TTL, field, value.
const HASH_METADATA: &[Op] = &[Raw(8), Len, Repeat(&[Len, Str(Any), Str(Any)])];
const HASH_LISTPACK_EX_PRE_GA: &[Op] = &[Str(Listpack(Shape::Triples))];
const HASH_LISTPACK_EX: &[Op] = &[Raw(8), Str(Listpack(Shape::Triples))];
/// Valkey 9 `RDB_TYPE_HASH_2`: field, value, expire time in ms (-1 for none).
const VALKEY_HASH_2: &[Op] = &[Len, Repeat(&[Str(Any), Str(Any), Raw(8)])];

const STREAM_NODE: &[Op] = &[Str(StreamId), Str(Listpack(Shape::Single))];
/// Global PEL entry: raw ID, delivery time, delivery count.
const STREAM_PEL: &[Op] = &[Raw(16), Raw(8), Len];
const STREAM_CONSUMER_PEL: &[Op] = &[Raw(16)];
const STREAM_CONSUMER_1: &[Op] = &[Str(Any), Raw(8), Len, Repeat(STREAM_CONSUMER_PEL)];
const STREAM_CONSUMER_3: &[Op] = &[Str(Any), Raw(8), Raw(8), Len, Repeat(STREAM_CONSUMER_PEL)];
const STREAM_GROUP_1: &[Op] = &[
    Str(Any),
    Len,
    Len,
    Len,
    Repeat(STREAM_PEL),
    Len,
    Repeat(STREAM_CONSUMER_1),
];
const STREAM_GROUP_2: &[Op] = &[
    Str(Any),
    Len,
    Len,
    Len,
    Len,
    Repeat(STREAM_PEL),
    Len,
    Repeat(STREAM_CONSUMER_1),
];
const STREAM_GROUP_3: &[Op] = &[
    Str(Any),
    Len,
    Len,
    Len,
    Len,
    Repeat(STREAM_PEL),
    Len,
    Repeat(STREAM_CONSUMER_3),
];
/// Nodes, length, last ID, groups.
const STREAM_1: &[Op] = &[
    Len,
    Repeat(STREAM_NODE),
    Len,
    Len,
    Len,
    Len,
    Repeat(STREAM_GROUP_1),
];
/// Nodes, length, last ID, first ID, max deleted ID, entries added, groups.
const STREAM_2: &[Op] = &[
    Len,
    Repeat(STREAM_NODE),
    Len,
    Len,
    Len,
    Len,
    Len,
    Len,
    Len,
    Len,
    Len,
    Repeat(STREAM_GROUP_2),
];
const STREAM_3: &[Op] = &[
    Len,
    Repeat(STREAM_NODE),
    Len,
    Len,
    Len,
    Len,
    Len,
    Len,
    Len,
    Len,
    Len,
    Repeat(STREAM_GROUP_3),
];

/// The logical data type a key holds, for the per-type counts in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ValueKind {
    /// `SET`/`GET` strings.
    String,
    /// Lists.
    List,
    /// Sets.
    Set,
    /// Sorted sets.
    SortedSet,
    /// Hashes (with or without field TTLs).
    Hash,
    /// Streams.
    Stream,
    /// Module data types.
    Module,
}

impl ValueKind {
    /// The name `TYPE` returns for such a key.
    pub fn as_str(self) -> &'static str {
        match self {
            ValueKind::String => "string",
            ValueKind::List => "list",
            ValueKind::Set => "set",
            ValueKind::SortedSet => "zset",
            ValueKind::Hash => "hash",
            ValueKind::Stream => "stream",
            ValueKind::Module => "module",
        }
    }
}

impl std::fmt::Display for ValueKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value type known to a given RDB format: its layout, logical kind and Redis name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TypeInfo {
    pub program: &'static [Op],
    pub kind: ValueKind,
    pub name: &'static str,
}

const fn info(program: &'static [Op], kind: ValueKind, name: &'static str) -> Option<TypeInfo> {
    Some(TypeInfo {
        program,
        kind,
        name,
    })
}

/// Types common to Redis and Valkey, with the RDB version that introduced each.
pub(crate) fn common_type(code: u8) -> Option<(u32, TypeInfo)> {
    use ValueKind as K;
    let (since, t) = match code {
        0 => (1, info(STRING, K::String, "string")),
        1 => (1, info(LIST_OR_SET, K::List, "list")),
        2 => (1, info(LIST_OR_SET, K::Set, "set")),
        3 => (1, info(ZSET, K::SortedSet, "zset")),
        4 => (1, info(HASH, K::Hash, "hash")),
        5 => (8, info(ZSET_2, K::SortedSet, "zset_2")),
        7 => (8, info(MODULE_2, K::Module, "module_2")),
        9 => (2, info(HASH_ZIPMAP, K::Hash, "hash_zipmap")),
        10 => (2, info(LIST_ZIPLIST, K::List, "list_ziplist")),
        11 => (2, info(SET_INTSET, K::Set, "set_intset")),
        12 => (2, info(PAIRS_ZIPLIST, K::SortedSet, "zset_ziplist")),
        13 => (2, info(PAIRS_ZIPLIST, K::Hash, "hash_ziplist")),
        14 => (7, info(LIST_QUICKLIST, K::List, "list_quicklist")),
        15 => (9, info(STREAM_1, K::Stream, "stream_listpacks")),
        16 => (10, info(PAIRS_LISTPACK, K::Hash, "hash_listpack")),
        17 => (10, info(PAIRS_LISTPACK, K::SortedSet, "zset_listpack")),
        18 => (10, info(LIST_QUICKLIST_2, K::List, "list_quicklist_2")),
        19 => (10, info(STREAM_2, K::Stream, "stream_listpacks_2")),
        20 => (11, info(SET_LISTPACK, K::Set, "set_listpack")),
        21 => (11, info(STREAM_3, K::Stream, "stream_listpacks_3")),
        _ => (0, None),
    };
    t.map(|t| (since, t))
}

/// Types Redis added after the fork (RDB 12, Redis 7.4): hash field expiration.
pub(crate) fn redis_only_type(code: u8) -> Option<TypeInfo> {
    use ValueKind as K;
    match code {
        22 => info(HASH_METADATA_PRE_GA, K::Hash, "hash_metadata_pre_ga"),
        23 => info(HASH_LISTPACK_EX_PRE_GA, K::Hash, "hash_listpack_ex_pre_ga"),
        24 => info(HASH_METADATA, K::Hash, "hash_metadata"),
        25 => info(HASH_LISTPACK_EX, K::Hash, "hash_listpack_ex"),
        _ => None,
    }
}

/// Types Valkey added after the fork (RDB 80, Valkey 9.0).
pub(crate) fn valkey_only_type(code: u8) -> Option<TypeInfo> {
    match code {
        22 => info(VALKEY_HASH_2, ValueKind::Hash, "hash_2"),
        _ => None,
    }
}
