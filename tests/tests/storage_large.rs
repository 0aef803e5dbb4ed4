//! A 1 GiB object streams up and back through the pipeline with the writer's peak RSS
//! under 128 MiB, against SeaweedFS and a file:// repository.
//!
//! Peak RSS (`VmHWM` in /proc/self/status) is per process, so each measurement runs in a
//! child: this test binary re-runs itself with `--ignored --exact child_stream_1gib`,
//! the child streams the object and prints its numbers, and the parent asserts on them.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Instant;

use bytes::Bytes;
use storage::format::{ContentHash, FORMAT_VERSION};
use storage::{ContentKind, PutMode, RepoKey, RepoOptions, Repository};
use syncbridge_tests::s3::{S3Server, TempRepo};

const SIZE: usize = 1 << 30;
const CHUNK: usize = 1 << 20;
const RSS_LIMIT_KB: u64 = 128 * 1024;

fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The same 1 GiB on every call: 1 MiB chunks, a quarter random bytes (so the store
/// really moves ~300 MiB), never repeating exactly.
struct Source {
    block: Vec<u8>,
    produced: usize,
}

impl Source {
    fn new() -> Self {
        let mut block = vec![0u8; 2 * CHUNK];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (i, b) in block.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if i % 4 == 0 {
                x as u8
            } else {
                (i / 64 % 7) as u8
            };
        }
        Source { block, produced: 0 }
    }

    fn next(&mut self) -> Option<Bytes> {
        if self.produced >= SIZE {
            return None;
        }
        let rot = (self.produced / CHUNK * 4099) % CHUNK;
        let mut chunk = self.block[rot..rot + CHUNK].to_vec();
        chunk[..8].copy_from_slice(&(self.produced as u64).to_le_bytes());
        self.produced += CHUNK;
        Some(Bytes::from(chunk))
    }
}

/// Runs in the child process (see module docs); ignored in a normal run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by stream_1gib_* in a child process to measure its own peak RSS"]
async fn child_stream_1gib() {
    let url = std::env::var("SB_LARGE_URL").unwrap();
    // Default sizes and concurrency (what bounds memory); zstd level 1 to keep the test's
    // CPU time down on shared machines.
    let mut opts = RepoOptions {
        compression_level: Some(1),
        ..RepoOptions::default()
    };
    if let Ok(cfg) = std::env::var("SB_LARGE_STORE_CONFIG") {
        for kv in cfg.split(',') {
            let (k, v) = kv.split_once('=').unwrap();
            opts.store_config.push((k.into(), v.into()));
        }
    }
    let repo = Repository::open(&url, opts).unwrap();
    let key = RepoKey::parse("large/1gib").unwrap();
    let start_hwm = vm_hwm_kb();

    let t = Instant::now();
    let mut src = Source::new();
    // The content hash new plaintext objects use (XXH3-128 in format version 4).
    let mut hasher = ContentHash::of_object(FORMAT_VERSION, false).hasher();
    let mut w = repo
        .writer(&key, ContentKind::Other, PutMode::CreateNew)
        .await
        .unwrap();
    while let Some(chunk) = src.next() {
        hasher.update(&chunk);
        w.write(chunk).await.unwrap();
    }
    let info = w.finish().await.unwrap();
    let write_secs = t.elapsed().as_secs_f64();
    let want = hasher.finalize();
    assert!(info.matches_content_digest(&want, SIZE as u64));
    assert_eq!(info.original_len, SIZE as u64);
    let writer_hwm = vm_hwm_kb();

    let t = Instant::now();
    let mut r = repo.reader(&key).await.unwrap();
    let mut hasher = ContentHash::of_object(FORMAT_VERSION, false).hasher();
    let mut n = 0usize;
    while let Some(c) = r.next_chunk().await.unwrap() {
        n += c.len();
        hasher.update(&c);
    }
    let read_secs = t.elapsed().as_secs_f64();
    assert_eq!(n, SIZE);
    let got = hasher.finalize();
    assert_eq!(got, want);
    println!(
        "RESULT start_hwm_kb={start_hwm} writer_hwm_kb={writer_hwm} final_hwm_kb={} stored_bytes={} write_secs={write_secs:.1} read_secs={read_secs:.1}",
        vm_hwm_kb(),
        info.stored_len
    );
}

fn run_child(url: &str, envs: Vec<(String, String)>) -> (u64, u64, String) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_stream_1gib",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SB_LARGE_URL", url)
        .envs(envs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| l.find("RESULT ").map(|i| l[i..].to_string()))
        .unwrap_or_else(|| panic!("child printed no RESULT line:\n{stdout}\n{stderr}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("writer_hwm_kb"), field("final_hwm_kb"), line)
}

#[test]
fn stream_1gib_file_repo_bounded_rss() {
    let repo = TempRepo::new();
    let (writer_hwm, final_hwm, line) = run_child(&repo.url(), Vec::new());
    eprintln!("file://: {line}");
    assert!(
        writer_hwm < RSS_LIMIT_KB,
        "writer peak RSS {writer_hwm} kB >= 128 MiB: {line}"
    );
    assert!(
        final_hwm < RSS_LIMIT_KB,
        "reader peak RSS {final_hwm} kB >= 128 MiB: {line}"
    );
    // No leftovers besides the object itself.
    let names: Vec<_> = std::fs::read_dir(repo.path().join("large"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["1gib".to_string()]);
}

#[test]
fn stream_1gib_seaweedfs_bounded_rss() {
    let s3 = S3Server::start();
    let cfg = format!(
        "aws_access_key_id={},aws_secret_access_key={},aws_region={},aws_endpoint={},aws_allow_http=true",
        s3.access_key(),
        s3.secret_key(),
        s3.region(),
        s3.endpoint()
    );
    let (writer_hwm, final_hwm, line) = run_child(
        &s3.repo_url("big"),
        vec![("SB_LARGE_STORE_CONFIG".into(), cfg)],
    );
    eprintln!("SeaweedFS: {line}");
    assert!(
        writer_hwm < RSS_LIMIT_KB,
        "writer peak RSS {writer_hwm} kB >= 128 MiB: {line}"
    );
    assert!(
        final_hwm < RSS_LIMIT_KB,
        "reader peak RSS {final_hwm} kB >= 128 MiB: {line}"
    );
}
