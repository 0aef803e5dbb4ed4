//! A snapshot that fails validation is never kept, and the stream takes a new one.
//!
//! A real master cannot be made to send a damaged RDB, so a small fake master speaks the
//! replica handshake: the first full sync sends a real Redis 7 RDB with one byte flipped,
//! the second the same RDB intact. The agent must refuse the first (naming the damage),
//! keep nothing of it, reconnect, and store the second as the only generation.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_support::{run_agent, text, StreamingAgent};
use syncbridge_tests::redis::{read_value, RedisFlavor, RedisServer, RespValue};

/// A real RDB with a few keys, from Redis 7's own SAVE.
fn real_rdb() -> Vec<u8> {
    let server = RedisServer::start(RedisFlavor::Redis7);
    for i in 0..200 {
        server.cmd(&["SET", &format!("key:{i}"), &"v".repeat(50)]);
    }
    server.cmd(&["RPUSH", "list", "a", "b", "c"]);
    assert!(server.cmd(&["SAVE"]).is_ok());
    std::fs::read(server.dir().join("dump.rdb")).unwrap()
}

/// Answers the handshake, then sends the damaged RDB at the first `PSYNC` of all connections
/// and the intact one after (as a sized full-sync transfer), and holds the connection
/// (reading ACKs) until the peer closes it. Connections that never ask for a sync (the
/// agent's cluster check and offset probe) get `+OK` to everything and do not count.
fn serve_full_sync(stream: TcpStream, syncs: &AtomicUsize, bad: &[u8], good: &[u8]) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    loop {
        let Ok(RespValue::Array(args)) = read_value(&mut reader) else {
            return;
        };
        let name = match args.first() {
            Some(RespValue::Bulk(b)) => String::from_utf8_lossy(b).to_uppercase(),
            _ => return,
        };
        if name == "PSYNC" {
            let payload = if syncs.fetch_add(1, Ordering::SeqCst) == 0 {
                bad
            } else {
                good
            };
            let id = "8f6e2c1d9b7a5e3c1f0d2b4a6c8e0f1a3b5d7c9e";
            let mut out = format!("+FULLRESYNC {id} 0\r\n${}\r\n", payload.len()).into_bytes();
            out.extend_from_slice(payload);
            if writer.write_all(&out).is_err() {
                return;
            }
            break;
        }
        if writer.write_all(b"+OK\r\n").is_err() {
            return;
        }
    }
    // Keep the link open like a master with no writes; the agent's ACKs are read and dropped.
    while read_value(&mut reader).is_ok() {}
}

fn generation_manifests(repo_dir: &Path) -> Vec<std::path::PathBuf> {
    let gen_dir = repo_dir.join("redis/gen");
    let Ok(entries) = std::fs::read_dir(gen_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("generation.json"))
        .filter(|p| p.exists())
        .collect()
}

#[test]
fn damaged_snapshot_is_refused_and_retaken() {
    let good = real_rdb();
    let mut bad = good.clone();
    let flip_at = good.len() / 2;
    bad[flip_at] ^= 0x5a;

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let syncs = Arc::new(AtomicUsize::new(0));
    {
        let syncs = syncs.clone();
        let good = Arc::new(good.clone());
        let bad = Arc::new(bad);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (syncs, bad, good) = (syncs.clone(), bad.clone(), good.clone());
                std::thread::spawn(move || serve_full_sync(conn, &syncs, &bad, &good));
            }
        });
    }

    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let source = format!("redis://127.0.0.1:{port}");
    let log = tmp.path().join("agent.log");
    let agent = StreamingAgent::start(&source, &repo, "1s", &[], log.clone());

    let deadline = Instant::now() + Duration::from_secs(60);
    while generation_manifests(&repo_dir).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let manifests = generation_manifests(&repo_dir);
    assert_eq!(
        manifests.len(),
        1,
        "expected exactly the re-taken generation; log:\n{log_text}"
    );
    assert!(
        syncs.load(Ordering::SeqCst) >= 2,
        "the damaged snapshot was not re-taken; log:\n{log_text}"
    );
    assert!(
        log_text.contains("nothing was kept")
            && (log_text.contains("offset") || log_text.contains("checksum")),
        "no refusal naming the damage and saying nothing was kept; log:\n{log_text}"
    );
    drop(agent);

    // The stored generation is the intact one: byte-exact and it verifies.
    let out = run_agent(&["redis", "verify", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let snapshot = manifests[0].with_file_name("snapshot.rdb");
    let out = run_agent(
        &[
            "repo",
            "cat",
            "--repo",
            &repo,
            &snapshot
                .strip_prefix(&repo_dir)
                .unwrap()
                .display()
                .to_string(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout == good,
        "the stored snapshot is not the intact RDB"
    );
}
