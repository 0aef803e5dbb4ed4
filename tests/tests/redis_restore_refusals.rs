//! `redis restore` refuses a chunk chain that does not chain exactly (issue 11, case 7):
//! two chunk objects swapped, a chunk missing (a gap) and a forked chain (an overlap) each
//! fail before anything is written, naming the chunks — the same damage `redis verify`
//! reports. A restore writes owner-only files and directories, and a target another
//! restore holds is refused at once.
#![allow(clippy::unwrap_used)]

mod redis_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redis_support::*;
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

/// A Redis 7 repository whose single generation has at least three chunks.
fn repository_with_chunks(dir: &Path) -> String {
    let server = RedisServer::start(RedisFlavor::Redis7);
    let repo = format!("file://{}", dir.join("repo").display());
    let mut agent =
        StreamingAgent::start(&server.url(), &repo, "100ms", &[], dir.join("agent.log"));
    agent.wait_for_log("snapshot stored", Duration::from_secs(60));
    let mut c = server.connect();
    for phase in 0..5 {
        let cmds: Vec<Vec<String>> = (0..50)
            .map(|i| cmd(&["SET", &format!("k{phase}:{i}"), &format!("v{i}")]))
            .collect();
        pipeline(&mut c, &cmds);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(agent.terminate(), "{}", agent.log_text());
    let out = run_agent(&["redis", "verify", "--repo", &repo], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(chunks(dir).len() >= 3, "{:?}", chunks(dir));
    repo
}

/// The chunk objects, in offset order.
fn chunks(dir: &Path) -> Vec<PathBuf> {
    let gen_dir = std::fs::read_dir(dir.join("repo/redis/gen"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut chunks: Vec<_> = std::fs::read_dir(gen_dir.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    chunks.sort();
    chunks
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().to_string()
}

fn restore(repo: &str, target: &Path) -> std::process::Output {
    let t = target.display().to_string();
    run_agent(&["redis", "restore", "--repo", repo, "--target", &t], &[])
}

/// A copy of the repository to damage.
fn copy_repo(from: &Path, to: &Path) -> String {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from.join("repo"))
        .arg(to.join("repo"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    format!("file://{}", to.join("repo").display())
}

/// Refused, naming every chunk in `names`, with no target created; `redis verify` agrees.
fn assert_refused(repo: &str, target: &Path, names: &[String], what: &str) {
    let out = restore(repo, target);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{what}: restore succeeded\n{}",
        text(&out)
    );
    for n in names {
        assert!(err.contains(n.as_str()), "{what}: {n} not named:\n{err}");
    }
    assert!(!target.exists(), "{what}: the target was created");
    let verify = run_agent(&["redis", "verify", "--repo", repo], &[]);
    assert!(!verify.status.success(), "{what}: {}", text(&verify));
    eprintln!("{what}: {err}");
}

#[test]
fn swapped_missing_and_forked_chunks_are_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    std::fs::create_dir(&good).unwrap();
    let repo = repository_with_chunks(&good);

    // The intact repository restores, with owner-only modes.
    let target = tmp.path().join("restored");
    let out = restore(&repo, &target);
    assert!(out.status.success(), "{}", text(&out));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&target), 0o700);
    assert_eq!(mode(&target.join("appendonlydir")), 0o700);
    for e in std::fs::read_dir(target.join("appendonlydir")).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }

    // Swapped: the first two chunk objects trade places.
    let swap = tmp.path().join("swap");
    std::fs::create_dir(&swap).unwrap();
    let swap_repo = copy_repo(&good, &swap);
    let c = chunks(&swap);
    let held = swap.join("held");
    std::fs::rename(&c[0], &held).unwrap();
    std::fs::rename(&c[1], &c[0]).unwrap();
    std::fs::rename(&held, &c[1]).unwrap();
    assert_refused(
        &swap_repo,
        &swap.join("target"),
        &[name(&c[0]), name(&c[1])],
        "swap",
    );

    // A gap: a chunk in the middle is missing; the next one is named.
    let gap = tmp.path().join("gap");
    std::fs::create_dir(&gap).unwrap();
    let gap_repo = copy_repo(&good, &gap);
    let c = chunks(&gap);
    std::fs::remove_file(&c[1]).unwrap();
    assert_refused(&gap_repo, &gap.join("target"), &[name(&c[2])], "gap");
    let out = restore(&gap_repo, &gap.join("target"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gap"),
        "{}",
        text(&out)
    );

    // An overlap: a second chunk starting where the second one starts but ending
    // elsewhere, as two writers forking the chain would leave.
    let fork = tmp.path().join("fork");
    std::fs::create_dir(&fork).unwrap();
    let fork_repo = copy_repo(&good, &fork);
    let c = chunks(&fork);
    let (start, end) = name(&c[1])
        .split_once('-')
        .map(|(s, e)| (s.parse::<u64>().unwrap(), e.parse::<u64>().unwrap()))
        .unwrap();
    let forked = c[1].with_file_name(format!("{start:020}-{:020}", end + 7));
    std::fs::copy(&c[1], &forked).unwrap();
    assert_refused(
        &fork_repo,
        &fork.join("target"),
        &[name(&forked), name(&c[1])],
        "overlap",
    );
    let out = restore(&fork_repo, &fork.join("target"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("overlaps"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_locked_or_unsafe_target_is_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repository_with_chunks(tmp.path());

    // Another process holds the target (as a running restore does).
    let target = tmp.path().join("busy");
    std::fs::create_dir(&target).unwrap();
    let dir = std::fs::File::open(&target).unwrap();
    let held = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let started = std::time::Instant::now();
    let out = restore(&repo, &target);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        err.contains("another restore") && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    drop(held);
    let out = restore(&repo, &target);
    assert!(out.status.success(), "{}", text(&out));

    // Inside the repository.
    let inside = tmp.path().join("repo/restored");
    let out = restore(&repo, &inside);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inside the repository"),
        "{}",
        text(&out)
    );
    assert!(!inside.exists());
}
