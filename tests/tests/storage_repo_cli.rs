//! `syncbridge-agent repo init|ls|cat|check` on file:// and SeaweedFS repositories,
//! including an encrypted repository and a damaged object.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use bytes::Bytes;
use storage::keys::{generate_identity, identity_to_string};
use storage::{layout, ContentKind, PutMode, RepoOptions, Repository};
use syncbridge_tests::s3::{S3Server, TempRepo};

fn agent_bin() -> PathBuf {
    syncbridge_tests::agent::binary()
}

fn agent(args: &[&str], envs: &[(String, String)]) -> Output {
    let mut cmd = Command::new(agent_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("SYNCBRIDGE_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(envs.iter().map(|(k, v)| (k, v)));
    cmd.args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn repo_cli_on_encrypted_file_repository() {
    let repo_dir = TempRepo::new();
    let url = repo_dir.url();
    let id = generate_identity();
    let recipient = id.to_public().to_string();
    let id_file = repo_dir.path().join(".identity");
    std::fs::write(
        &id_file,
        format!("# test key\n{}\n", identity_to_string(&id)),
    )
    .unwrap();
    let id_arg = id_file.to_str().unwrap();

    let out = agent(
        &[
            "repo",
            "init",
            "--repo",
            &url,
            "--kind",
            "postgres",
            "--recipient",
            &recipient,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("age-x25519"),
        "{}",
        text(&out)
    );

    // Objects written by the library with the same recipient.
    let repo = Repository::open(
        &url,
        RepoOptions {
            recipients: vec![id.to_public()],
            ..RepoOptions::default()
        },
    )
    .unwrap();
    let seg = layout::WalSegmentName::parse("000000010000000000000002").unwrap();
    let key = layout::wal_segment(&seg);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 200) as u8).collect();
    repo.put(
        &key,
        ContentKind::WalSegment,
        Bytes::from(data.clone()),
        PutMode::CreateNew,
    )
    .await
    .unwrap();
    let other =
        layout::wal_segment(&layout::WalSegmentName::parse("000000010000000000000003").unwrap());
    repo.put(
        &other,
        ContentKind::WalSegment,
        Bytes::from_static(b"tiny"),
        PutMode::CreateNew,
    )
    .await
    .unwrap();

    let out = agent(&["repo", "ls", "--repo", &url, "-l", "postgres/wal"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let ls = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(ls.lines().count(), 2, "{ls}");
    assert!(
        ls.contains(key.as_str()) && ls.contains("wal-segment") && ls.contains("3000000"),
        "{ls}"
    );

    // cat needs the identity, says so, and then yields the exact bytes.
    let out = agent(&["repo", "cat", "--repo", &url, key.as_str()], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--identity"),
        "{}",
        text(&out)
    );
    let out = agent(
        &[
            "repo",
            "cat",
            "--repo",
            &url,
            "--identity",
            id_arg,
            key.as_str(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(out.stdout == data, "cat output differs");

    // check: all good, then damage one object.
    let out = agent(
        &["repo", "check", "--repo", &url, "--identity", id_arg],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).matches("OK ").count(),
        3,
        "{}",
        text(&out)
    );

    let path = repo_dir.path().join(key.as_str());
    let mut stored = std::fs::read(&path).unwrap();
    let mid = stored.len() / 2;
    stored[mid] ^= 0x20;
    std::fs::write(&path, stored).unwrap();
    let out = agent(
        &[
            "repo",
            "check",
            "--repo",
            &url,
            "--identity",
            id_arg,
            "postgres/wal",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let failed: Vec<_> = stdout.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{stdout}");
    assert!(
        failed[0].contains(key.as_str()) && failed[0].contains("crc32c"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("OK      {}", other.as_str())),
        "{stdout}"
    );
    // Without identity the damage is still found (stored bytes are checked).
    let out = agent(&["repo", "check", "--repo", &url, key.as_str()], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = agent(
        &[
            "repo",
            "cat",
            "--repo",
            &url,
            "--identity",
            id_arg,
            key.as_str(),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(key.as_str()),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn repo_cli_on_seaweedfs() {
    let s3 = S3Server::start();
    let url = s3.repo_url("clitest");
    let env = s3.env();
    let out = agent(
        &[
            "repo",
            "init",
            "--repo",
            &url,
            "--kind",
            "redis",
            "--replication-id",
            "abc",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = agent(&["repo", "ls", "--repo", &url], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("syncbridge-repo"),
        "{}",
        text(&out)
    );
    let out = agent(&["repo", "cat", "--repo", &url, "syncbridge-repo"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let marker: serde_json_like::Marker = serde_json_like::parse(&out.stdout);
    assert_eq!(marker.kind, "redis");
    assert_eq!(marker.replication_id.as_deref(), Some("abc"));
    let out = agent(&["repo", "check", "--repo", &url], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = agent(
        &["repo", "cat", "--repo", &url, "redis/gen/none/snapshot.rdb"],
        &env,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        text(&out)
    );
}

/// Live TLS: SeaweedFS serving HTTPS with a certificate from a private CA. With the CA in
/// `AWS_CA_BUNDLE` (or `?ca_bundle=`) the repository works end to end; without it the
/// certificate is refused and the error says so.
#[tokio::test]
async fn repo_cli_on_seaweedfs_over_https_with_private_ca() {
    let s3 = S3Server::start_with_https();
    let url = s3.repo_url("tlstest");
    let env = s3.https_env();
    assert!(
        env.iter()
            .any(|(k, v)| k == "AWS_ENDPOINT_URL" && v.starts_with("https://")),
        "{env:?}"
    );
    let out = agent(
        &[
            "repo",
            "init",
            "--repo",
            &url,
            "--kind",
            "redis",
            "--replication-id",
            "tls",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = agent(&["repo", "check", "--repo", &url], &env);
    assert!(out.status.success(), "{}", text(&out));

    // The same CA given as a URL option instead of the environment.
    let ca = s3.ca_cert().unwrap().display().to_string();
    let no_bundle: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| k != "AWS_CA_BUNDLE")
        .cloned()
        .collect();
    let with_query = format!("{url}?ca_bundle={ca}");
    let out = agent(
        &["repo", "cat", "--repo", &with_query, "syncbridge-repo"],
        &no_bundle,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        serde_json_like::parse(&out.stdout)
            .replication_id
            .as_deref(),
        Some("tls")
    );

    // Without the private CA the server's certificate is not trusted.
    let mut untrusted = no_bundle.clone();
    untrusted.push((
        "AWS_CA_BUNDLE".into(),
        "/etc/ssl/certs/ca-certificates.crt".into(),
    ));
    let out = agent(
        &["repo", "cat", "--repo", &url, "syncbridge-repo"],
        &untrusted,
    );
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate is not trusted") && err.contains("AWS_CA_BUNDLE"),
        "the error should say the TLS certificate was refused and how to fix it: {}",
        text(&out)
    );
    // Permanent: not retried for minutes as if the network were down.
    assert!(
        err.contains("permanent") && !err.contains("after 5 attempts"),
        "{}",
        text(&out)
    );
}

/// Just enough JSON reading for the marker (the tests crate has no serde_json).
mod serde_json_like {
    pub struct Marker {
        pub kind: String,
        pub replication_id: Option<String>,
    }

    fn field(text: &str, name: &str) -> Option<String> {
        let at = text.find(&format!("\"{name}\""))?;
        let rest = &text[at + name.len() + 2..];
        let start = rest.find('"')? + 1;
        let end = start + rest[start..].find('"')?;
        Some(rest[start..end].to_string())
    }

    pub fn parse(bytes: &[u8]) -> Marker {
        let text = String::from_utf8_lossy(bytes);
        Marker {
            kind: field(&text, "kind").unwrap(),
            replication_id: field(&text, "replication_id"),
        }
    }
}

/// Issue 11, cases 1, 2 and 5 at the repository level: `repo check` fails on two swapped
/// objects, on an object copied from another repository, and (encrypted repository) on a
/// plaintext object put there by someone without the key; `repo cat` refuses each, naming
/// the object and what it is instead.
#[tokio::test]
async fn repo_check_refuses_swapped_foreign_and_plaintext_objects() {
    let seg = |n: &str| layout::wal_segment(&layout::WalSegmentName::parse(n).unwrap());
    let (a, b) = (
        seg("000000010000000000000006"),
        seg("000000010000000000000007"),
    );
    let put = |repo: Repository, key: storage::RepoKey, fill: u8| async move {
        repo.put(
            &key,
            ContentKind::WalSegment,
            Bytes::from(vec![fill; 70_000]),
            PutMode::CreateNew,
        )
        .await
        .unwrap();
    };
    let check = |url: &str, extra: &[&str]| {
        let mut args = vec!["repo", "check", "--repo", url];
        args.extend_from_slice(extra);
        agent(&args, &[])
    };

    // Swapped: each object is intact, but under the other's key.
    let dir = TempRepo::new();
    let url = dir.url();
    let out = agent(&["repo", "init", "--repo", &url, "--kind", "postgres"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let repo = Repository::open(&url, RepoOptions::default()).unwrap();
    put(repo.clone(), a.clone(), 6).await;
    put(repo.clone(), b.clone(), 7).await;
    assert!(check(&url, &[]).status.success());
    let (pa, pb) = (dir.path().join(a.as_str()), dir.path().join(b.as_str()));
    let (ba, bb) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
    std::fs::write(&pa, &bb).unwrap();
    std::fs::write(&pb, &ba).unwrap();
    let out = check(&url, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let failed: Vec<_> = stdout.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 2, "{stdout}");
    assert!(
        failed
            .iter()
            .any(|l| l.contains(a.as_str()) && l.contains(&format!("written for {b}"))),
        "{stdout}"
    );
    let out = agent(&["repo", "cat", "--repo", &url, a.as_str()], &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        out.stdout.is_empty(),
        "no byte of the wrong object is served"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("written for {b}")),
        "{}",
        text(&out)
    );

    // Foreign: a valid object of another repository under this repository's key.
    let other_dir = TempRepo::new();
    let other_url = other_dir.url();
    let out = agent(
        &["repo", "init", "--repo", &other_url, "--kind", "postgres"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let other = Repository::open(&other_url, RepoOptions::default()).unwrap();
    let c = seg("000000010000000000000008");
    put(other.clone(), c.clone(), 8).await;
    let pc = dir.path().join(c.as_str());
    std::fs::copy(other_dir.path().join(c.as_str()), &pc).unwrap();
    let out = check(&url, &[c.as_str()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stdout.contains("FAILED") && stdout.contains("copied from another repository"),
        "{stdout}"
    );

    // Plaintext in an encrypted repository: refused with or without the identity.
    let enc_dir = TempRepo::new();
    let enc_url = enc_dir.url();
    let id = generate_identity();
    let id_file = enc_dir.path().join(".identity");
    std::fs::write(&id_file, identity_to_string(&id)).unwrap();
    let recipient = id.to_public().to_string();
    let out = agent(
        &[
            "repo",
            "init",
            "--repo",
            &enc_url,
            "--kind",
            "postgres",
            "--recipient",
            &recipient,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let intruder = Repository::open(&enc_url, RepoOptions::default()).unwrap();
    put(intruder, a.clone(), 66).await;
    for extra in [vec![], vec!["--identity", id_file.to_str().unwrap()]] {
        let out = check(&enc_url, &extra);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            stdout.contains(a.as_str()) && stdout.contains("not encrypted, but the repository is"),
            "{stdout}"
        );
    }
}
