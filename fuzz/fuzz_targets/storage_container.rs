//! The storage container decoder (storage/FORMAT.md: header, frames, trailer, age
//! envelope), driven through the public `Repository` API over an in-memory store, the way
//! every command reads an object: `get` (whole object), `reader` (streamed, verified
//! chunks), `info` (header and trailer only) and `verify`.
//!
//! The first input byte chooses the mode. Raw mode stores the rest as the object, as is.
//! Structured mode writes a valid object (plain or age-encrypted, compressed or not,
//! many small frames; format version 4, or 2 or 3 when bit 2 of the mode is set: all are read
//! by the same decoder, with SHA-256, BLAKE3 or XXH3-128 as the content hash; LZ4 frames instead of
//! zstd when bit 3 is set and bit 2 is not) from the rest, then
//! applies up to 8 byte edits and an optional truncation taken from the input, so the
//! decoder is reached past its checksums.
//! Anything is allowed except a panic, a hang or unbounded allocation; what reads back is
//! exactly what was written (an edit is either refused or harmless), and the same bytes
//! copied under another key are always refused (formats v2 to v4 bind the key).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;
use storage::{
    ContentKind, PutMode, RepoKey, RepoKind, RepoMarker, RepoOptions, Repository, RetryPolicy,
};

struct World {
    rt: tokio::runtime::Runtime,
    /// A plain repository (its marker says so): `plain` writes with zstd, `raw` without.
    plain_store: Arc<InMemory>,
    plain: Repository,
    raw: Repository,
    /// An encrypted repository; reads with the identity.
    enc_store: Arc<InMemory>,
    encrypted: Repository,
    /// Writers of format version 2 objects into the same two repositories.
    plain_v2: Repository,
    encrypted_v2: Repository,
    /// Writers of format version 3 (BLAKE3 for every object) into the same two.
    plain_v3: Repository,
    encrypted_v3: Repository,
    /// Writers of LZ4 frames (format version 4) into the same two repositories.
    plain_lz4: Repository,
    encrypted_lz4: Repository,
}

const KEY: &str = "postgres/wal/00000001/000000010000000000000001";
/// Another key of the same repository, to check that a copy is refused (format v2).
const OTHER_KEY: &str = "postgres/wal/00000001/000000010000000000000002";

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let id = storage::keys::generate_identity();
        let opts = |recipients: bool, zstd: bool, format_version: u16| RepoOptions {
            format_version,
            lz4: false,
            frame_size: 64,
            workers: 1,
            compression_level: zstd.then_some(1),
            recipients: if recipients {
                vec![id.to_public()]
            } else {
                Vec::new()
            },
            // Only where objects are encrypted: a reader holding an identity refuses a
            // marker that says "not encrypted" (the marker is not authenticated).
            identities: if recipients {
                vec![id.clone()]
            } else {
                Vec::new()
            },
            // Nothing here is transient: one attempt, no backoff sleeps.
            retry: RetryPolicy {
                max_attempts: 1,
                initial_backoff: Duration::ZERO,
                max_backoff: Duration::ZERO,
                max_elapsed: Duration::from_secs(1),
            },
            ..RepoOptions::default()
        };
        let open = |store: &Arc<InMemory>, o| {
            Repository::from_store(store.clone(), "", "fuzz", o).expect("repo")
        };
        let plain_store = Arc::new(InMemory::new());
        let enc_store = Arc::new(InMemory::new());
        let (plain, raw) = (
            open(&plain_store, opts(false, true, 4)),
            open(&plain_store, opts(false, false, 4)),
        );
        let encrypted = open(&enc_store, opts(true, true, 4));
        let plain_v2 = open(&plain_store, opts(false, true, 2));
        let encrypted_v2 = open(&enc_store, opts(true, true, 2));
        let plain_v3 = open(&plain_store, opts(false, true, 3));
        let encrypted_v3 = open(&enc_store, opts(true, true, 3));
        let lz4 = |recipients| RepoOptions {
            lz4: true,
            ..opts(recipients, true, 4)
        };
        let plain_lz4 = open(&plain_store, lz4(false));
        let encrypted_lz4 = open(&enc_store, lz4(true));
        // Markers, as in a real repository: readers check objects against them (the
        // repository id every v2 object is bound to, whether objects must be encrypted).
        for r in [&plain, &encrypted] {
            rt.block_on(r.init_marker(&RepoMarker::new(RepoKind::Postgres)))
                .expect("marker");
        }
        World {
            rt,
            plain_store,
            plain,
            raw,
            enc_store,
            encrypted,
            plain_v2,
            encrypted_v2,
            plain_v3,
            encrypted_v3,
            plain_lz4,
            encrypted_lz4,
        }
    })
}

async fn read_all(repo: &Repository, key: &RepoKey, how: u8) -> Option<Vec<u8>> {
    match how % 4 {
        0 => repo.get(key).await.ok().map(|b| b.to_vec()),
        1 => {
            let mut r = repo.reader(key).await.ok()?;
            let mut out = Vec::new();
            while let Some(c) = r.next_chunk().await.ok()? {
                out.extend_from_slice(&c);
            }
            Some(out)
        }
        2 => {
            let _ = repo.info(key).await;
            None
        }
        _ => {
            let _ = repo.verify(key).await;
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let key = RepoKey::parse(KEY).expect("key");
    let path = Path::from(KEY);
    w.rt.block_on(async {
        let (reader, store) = match (mode >> 2) % 3 {
            0 => (&w.plain, &w.plain_store),
            1 => (&w.encrypted, &w.enc_store),
            _ => (&w.raw, &w.plain_store),
        };
        if mode & 1 == 0 {
            store
                .put(&path, Bytes::copy_from_slice(rest).into())
                .await
                .expect("put");
            let _ = read_all(reader, &key, mode >> 4).await;
            return;
        }
        // Structured: [edits: 1][edits × (pos u16, xor u8)][truncate u16][payload].
        let Some((&n, rest)) = rest.split_first() else {
            return;
        };
        let n = (n % 9) as usize;
        if rest.len() < n * 3 + 2 {
            return;
        }
        let (edits, rest) = rest.split_at(n * 3);
        let (cut, payload) = rest.split_at(2);
        let cut = u16::from_le_bytes([cut[0], cut[1]]) as usize;
        let (writer, store) = if mode & 2 != 0 {
            (&w.encrypted, &w.enc_store)
        } else {
            (&w.plain, &w.plain_store)
        };
        // Bit 2 writes an older format version (2 or 3, by bit 3), else bit 3 LZ4 frames;
        // `writer` (version 4, zstd) reads them all.
        let put_with = match (mode & 4 != 0, mode & 8 != 0, mode & 2 != 0) {
            (true, false, true) => &w.encrypted_v2,
            (true, false, false) => &w.plain_v2,
            (true, true, true) => &w.encrypted_v3,
            (true, true, false) => &w.plain_v3,
            (false, true, true) => &w.encrypted_lz4,
            (false, true, false) => &w.plain_lz4,
            (false, false, _) => writer,
        };
        put_with
            .put(
                &key,
                ContentKind::WalSegment,
                Bytes::copy_from_slice(payload),
                PutMode::Overwrite,
            )
            .await
            .expect("a valid object is written");
        let mut stored = store
            .get(&path)
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes")
            .to_vec();
        let mut changed = false;
        for e in edits.chunks_exact(3) {
            let pos = u16::from_le_bytes([e[0], e[1]]) as usize;
            if e[2] != 0 && !stored.is_empty() {
                let pos = pos % stored.len();
                stored[pos] ^= e[2];
                changed = true;
            }
        }
        if cut != 0 && cut < stored.len() {
            stored.truncate(cut);
            changed = true;
        }
        let how = mode >> 4;
        if mode & 0x80 != 0 {
            // The same bytes under another key: a swap, refused whatever else was edited.
            let other = RepoKey::parse(OTHER_KEY).expect("key");
            store
                .put(&Path::from(OTHER_KEY), Bytes::from(stored).into())
                .await
                .expect("put");
            let got = read_all(writer, &other, how).await;
            assert!(got.is_none(), "an object copied under another key was read");
            if how % 4 == 2 || how % 4 == 3 {
                assert!(writer.verify(&other).await.is_err(), "verify accepted a copy");
            }
            return;
        }
        store
            .put(&path, Bytes::from(stored).into())
            .await
            .expect("put");
        let got = read_all(writer, &key, how).await;
        if !changed && how % 4 < 2 {
            assert_eq!(got.as_deref(), Some(payload), "an intact object reads back");
        }
        if let Some(got) = got {
            // Whatever was edited, what a reader accepts is what was written: every
            // byte is covered by a checksum (and, encrypted, by age's authentication).
            assert_eq!(got, payload, "an edited object read back as different bytes");
        }
    });
});
