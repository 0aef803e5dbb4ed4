//! Storage pipeline throughput (issue 3): zstd levels 1 and 3 with SHA-256 and CRC32C.
//!
//! For each level, three measurements on the same 64 MiB of WAL-like data, same run:
//! * `back_to_back`: SHA-256, zstd and CRC32C called one after another on each 1 MiB
//!   frame in one thread: the single-core upper bound for this work;
//! * `pipeline_1w`: `ObjectWriter` with one worker into a store that discards what it is
//!   sent (the upload itself is not what is measured here; the 1 GiB tests cover it);
//! * `pipeline_2w`: the same with two workers.
//!
//! * `back_to_back/2threads_ceiling`: the same work split over two threads with no
//!   coordination at all (two halves, two hashes): what this machine's two cores can give,
//!   so the 2-worker ratio can be read against the machine (shared or hyper-threaded
//!   vCPUs rarely give 2×).
//!
//! Goals: pipeline_1w ≥ 90% of back_to_back; pipeline_2w ≥ 1.7× pipeline_1w. The ratios
//! are printed at the end (from criterion's estimates).
//!
//! Run: `cargo bench -p storage --bench storage_pipeline` (or `make bench`).
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use sha2::{Digest, Sha256};
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository};

const SIZE: usize = 64 << 20;
const FRAME: usize = 1 << 20;

/// Roughly WAL-like: records with headers, counters, and text/numeric payloads; compresses
/// about 3-4x with zstd -3.
fn wal_like(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut n = 0u64;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        n += 1;
        out.extend_from_slice(&(n * 8192).to_le_bytes());
        out.extend_from_slice(&(x as u32).to_le_bytes());
        out.extend_from_slice(b"INSERT INTO pgbench_history VALUES (");
        out.extend_from_slice(
            format!("{}, {}, {}, {})", x % 100_000, x % 10, x % 1000, n).as_bytes(),
        );
        out.extend_from_slice(&[0u8; 24]);
        let rnd = (x >> 32) as usize % 48;
        for i in 0..rnd {
            out.push((x >> (i % 56)) as u8);
        }
    }
    out.truncate(len);
    out
}

/// A store that accepts and drops everything: the sink of the pipeline measurement.
#[derive(Debug)]
struct Discard;

impl std::fmt::Display for Discard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Discard")
    }
}

#[derive(Debug)]
struct DiscardUpload;

#[async_trait]
impl MultipartUpload for DiscardUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        drop(data);
        Box::pin(async { Ok(()) })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        Ok(PutResult {
            e_tag: None,
            version: None,
        })
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        Ok(())
    }
}

fn unsupported() -> object_store::Error {
    object_store::Error::NotImplemented
}

#[async_trait]
impl ObjectStore for Discard {
    async fn put_opts(
        &self,
        _location: &Path,
        _payload: PutPayload,
        _opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        Ok(PutResult {
            e_tag: None,
            version: None,
        })
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Ok(Box::new(DiscardUpload))
    }

    async fn get_opts(
        &self,
        location: &Path,
        _options: GetOptions,
    ) -> object_store::Result<GetResult> {
        // Nothing is ever stored: the repository marker is absent too (a new repository).
        Err(object_store::Error::NotFound {
            path: location.to_string(),
            source: "discarded".into(),
        })
    }

    async fn delete(&self, _location: &Path) -> object_store::Result<()> {
        Ok(())
    }

    fn list(&self, _prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        Box::pin(futures::stream::empty())
    }

    async fn list_with_delimiter(
        &self,
        _prefix: Option<&Path>,
    ) -> object_store::Result<ListResult> {
        // An existing, empty bucket.
        Ok(ListResult {
            common_prefixes: Vec::new(),
            objects: Vec::new(),
        })
    }

    async fn copy(&self, _from: &Path, _to: &Path) -> object_store::Result<()> {
        Err(unsupported())
    }

    async fn copy_if_not_exists(&self, _from: &Path, _to: &Path) -> object_store::Result<()> {
        Err(unsupported())
    }
}

fn back_to_back(data: &[u8], level: i32) -> u64 {
    let mut sha = Sha256::new();
    let mut compressor = zstd::bulk::Compressor::new(level).unwrap();
    let mut crc = 0u32;
    let mut stored = 0u64;
    for frame in data.chunks(FRAME) {
        sha.update(frame);
        let c = compressor.compress(frame).unwrap();
        crc = crc32c::crc32c_append(crc, &c);
        stored += c.len() as u64;
    }
    std::hint::black_box((sha.finalize(), crc));
    stored
}

fn pipeline(rt: &tokio::runtime::Runtime, repo: &Repository, data: &Bytes) -> u64 {
    rt.block_on(async {
        let key = RepoKey::parse("bench/object").unwrap();
        let mut w = repo
            .writer(&key, ContentKind::Other, PutMode::Overwrite)
            .await
            .unwrap();
        // Feed in 256 KiB pieces, as a stream would.
        let mut pos = 0;
        while pos < data.len() {
            let n = (256 << 10).min(data.len() - pos);
            w.write(data.slice(pos..pos + n)).await.unwrap();
            pos += n;
        }
        w.finish().await.unwrap().stored_len
    })
}

fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("criterion")
}

fn mean_ns(dir: &std::path::Path, group: &str, id: &str) -> Option<f64> {
    let path = dir.join(group).join(id).join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let dir = output_dir();
    let mut c = Criterion::default()
        .output_directory(&dir)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .configure_from_args();
    let data = Bytes::from(wal_like(SIZE));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for level in [1, 3] {
        let group_name = format!("storage_pipeline_zstd{level}");
        let mut g = c.benchmark_group(&group_name);
        g.throughput(Throughput::Bytes(SIZE as u64));
        let ratio = SIZE as f64 / back_to_back(&data, level) as f64;
        eprintln!("zstd -{level}: compression ratio {ratio:.2}");
        g.bench_function(BenchmarkId::new("back_to_back", "1thread"), |b| {
            b.iter(|| back_to_back(&data, level))
        });
        g.bench_function(BenchmarkId::new("back_to_back", "2threads_ceiling"), |b| {
            b.iter(|| {
                let (x, y) = data.split_at(SIZE / 2);
                std::thread::scope(|s| {
                    let h = s.spawn(|| back_to_back(x, level));
                    let a = back_to_back(y, level);
                    a + h.join().unwrap()
                })
            })
        });
        for workers in [1usize, 2] {
            let repo = Repository::from_store(
                Arc::new(Discard),
                "",
                "discard://",
                RepoOptions {
                    compression_level: Some(level),
                    workers,
                    ..RepoOptions::default()
                },
            )
            .unwrap();
            g.bench_function(BenchmarkId::new("pipeline", format!("{workers}w")), |b| {
                b.iter(|| pipeline(&rt, &repo, &data))
            });
        }
        g.finish();
    }
    c.final_summary();

    println!("\nstorage pipeline ratios (same run, same 64 MiB):");
    for level in [1, 3] {
        let group = format!("storage_pipeline_zstd{level}");
        let base = mean_ns(&dir, &group, "back_to_back/1thread");
        let one = mean_ns(&dir, &group, "pipeline/1w");
        let two = mean_ns(&dir, &group, "pipeline/2w");
        let ceiling = mean_ns(&dir, &group, "back_to_back/2threads_ceiling");
        if let (Some(base), Some(one), Some(two), Some(ceiling)) = (base, one, two, ceiling) {
            let mibs = |ns: f64| SIZE as f64 / (1 << 20) as f64 / (ns / 1e9);
            println!(
                "  zstd -{level}: back-to-back {:.0} MiB/s, pipeline 1 worker {:.0} MiB/s ({:.0}% of back-to-back, goal >= 90%), 2 workers {:.0} MiB/s ({:.2}x one worker, goal >= 1.7x); machine ceiling for 2 threads {:.2}x",
                mibs(base),
                mibs(one),
                100.0 * base / one,
                mibs(two),
                one / two,
                base / ceiling
            );
        }
    }
}
