//! The storage container decoder (storage/FORMAT.md: header, frames, trailer, age
//! envelope), driven through the public `Repository` API over an in-memory store, the way
//! every command reads an object: `get` (whole object), `reader` (streamed, verified
//! chunks), `info` (header and trailer only) and `verify`.
//!
//! The first input byte chooses the mode. Raw mode stores the rest as the object, as is.
//! Structured mode writes a valid object (plain or age-encrypted, compressed or not,
//! many small frames) from the rest, then applies up to 8 byte edits and an optional
//! truncation taken from the input, so the decoder is reached past its checksums.
//! Anything is allowed except a panic, a hang or unbounded allocation; an object that
//! reads back must be exactly what was written unless it was edited.
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
    store: Arc<InMemory>,
    /// Writes plain objects; reads with the identity.
    plain: Repository,
    /// Writes encrypted objects; reads with the identity.
    encrypted: Repository,
    /// Plain, zstd off.
    raw: Repository,
}

const KEY: &str = "postgres/wal/00000001/000000010000000000000001";

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store = Arc::new(InMemory::new());
        let id = storage::keys::generate_identity();
        let opts = |recipients: bool, zstd: bool| RepoOptions {
            frame_size: 64,
            workers: 1,
            compression_level: zstd.then_some(1),
            recipients: if recipients {
                vec![id.to_public()]
            } else {
                Vec::new()
            },
            identities: vec![id.clone()],
            // Nothing here is transient: one attempt, no backoff sleeps.
            retry: RetryPolicy {
                max_attempts: 1,
                initial_backoff: Duration::ZERO,
                max_backoff: Duration::ZERO,
                max_elapsed: Duration::from_secs(1),
            },
            ..RepoOptions::default()
        };
        let open = |o| Repository::from_store(store.clone(), "", "fuzz", o).expect("repo");
        let (plain, encrypted, raw) = (
            open(opts(false, true)),
            open(opts(true, true)),
            open(opts(false, false)),
        );
        // A marker, as in a real repository (readers may compare objects with it).
        rt.block_on(plain.init_marker(&RepoMarker::new(RepoKind::Postgres)))
            .expect("marker");
        World {
            rt,
            store,
            plain,
            encrypted,
            raw,
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
        let reader = match (mode >> 2) % 3 {
            0 => &w.plain,
            1 => &w.encrypted,
            _ => &w.raw,
        };
        if mode & 1 == 0 {
            w.store
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
        let writer = if mode & 2 != 0 { &w.encrypted } else { &w.plain };
        writer
            .put(
                &key,
                ContentKind::WalSegment,
                Bytes::copy_from_slice(payload),
                PutMode::Overwrite,
            )
            .await
            .expect("a valid object is written");
        let mut stored = w
            .store
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
        w.store
            .put(&path, Bytes::from(stored).into())
            .await
            .expect("put");
        let how = mode >> 4;
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
