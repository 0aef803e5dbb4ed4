//! An encrypted Redis repository: `repo keygen` makes the identity, `redis snapshot` writes
//! with only the recipient (as a sidecar would), no stored object shows the data in clear,
//! and `restore` refuses without the identity and restores exactly with it.
#![allow(clippy::unwrap_used)]

mod redis_support;

use redis_support::{dump, dump_port, load_dataset, run_agent, server_bin, text, RestoredServer};
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

/// Every regular file under `dir`, recursively.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn encrypted_snapshot_needs_the_identity_to_restore() {
    let server = RedisServer::start(RedisFlavor::Redis7);
    load_dataset(&server);
    let secret = "plaintext-that-must-not-be-stored-in-clear";
    server.cmd(&["SET", "secret", secret]);
    let before = dump(&server);

    let tmp = tempfile::tempdir().unwrap();
    let id_file = tmp.path().join("identity.txt");
    let out = run_agent(&["repo", "keygen", "--out", id_file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let recipient = stdout
        .lines()
        .find_map(|l| l.strip_prefix("recipient: "))
        .unwrap()
        .trim()
        .to_string();
    assert!(recipient.starts_with("age1"), "{stdout}");
    let again = run_agent(&["repo", "keygen", "--out", id_file.to_str().unwrap()], &[]);
    assert!(!again.status.success(), "keygen overwrote an identity");

    let repo_dir = tmp.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let sidecar_env = vec![("SYNCBRIDGE_RECIPIENTS".to_string(), recipient)];
    let out = run_agent(
        &[
            "redis",
            "snapshot",
            "--source",
            &server.url(),
            "--repo",
            &repo,
        ],
        &sidecar_env,
    );
    assert!(out.status.success(), "{}", text(&out));

    for f in files(&repo_dir) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds the value in clear",
            f.display()
        );
    }

    let target = tmp.path().join("restore-without");
    let out = run_agent(
        &[
            "restore",
            "--repo",
            &repo,
            "--target",
            target.to_str().unwrap(),
        ],
        &sidecar_env,
    );
    assert!(!out.status.success(), "restored without the identity");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("identity"),
        "the refusal does not mention the identity:\n{}",
        text(&out)
    );

    let restore_env = vec![(
        "SYNCBRIDGE_IDENTITY".to_string(),
        id_file.display().to_string(),
    )];
    let target = tmp.path().join("restore-with");
    let bin = server_bin(RedisFlavor::Redis7);
    let out = run_agent(
        &[
            "redis",
            "restore",
            "--repo",
            &repo,
            "--target",
            target.to_str().unwrap(),
            "--start",
            &bin,
        ],
        &restore_env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let restored = RestoredServer::from_output(&out);
    assert_eq!(dump_port(restored.port, None), before);
}
