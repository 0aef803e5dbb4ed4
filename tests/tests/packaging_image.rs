//! The OCI image built by `make image` (packaging/Containerfile), run with
//! `buildah run --isolation chroot` on the host network against the harness's servers:
//! `version`, a real `postgres check` and a real `redis snapshot`, as uid 65532, with no
//! shell and nothing in the image but the binary, its libraries, the CA bundle and the
//! passwd/group/nsswitch files.
//!
//! The image needs a release build (about 12 minutes on the 2-core CI machine), so this
//! test is `#[ignore]`d: `make test` reports it as skipped, and `make image-test` builds
//! the image and runs it (`--run-ignored only`). Run without the image, it fails saying
//! `make image`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use syncbridge_tests::paths::{dep_value, repo_root, RUN_MAKE_DEPS};
use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// buildah with the storage `make image` used (packaging/image/buildah.sh).
fn buildah() -> Command {
    let bin = PathBuf::from(dep_value("SB_BUILDAH"));
    assert!(bin.is_file(), "buildah is not installed: {RUN_MAKE_DEPS}");
    let root = repo_root();
    let storage = std::env::var_os("SB_BUILDAH_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".buildah/storage"));
    let runroot = std::env::var_os("SB_BUILDAH_RUNROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".buildah/run"));
    let mut cmd = Command::new(bin);
    cmd.arg("--root")
        .arg(storage)
        .arg("--runroot")
        .arg(runroot)
        .args(["--storage-driver", "vfs"]);
    cmd
}

fn image() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let name = std::env::var("IMAGE").unwrap_or_else(|_| "localhost/syncbridge-agent".into());
    format!("{name}:{version}")
}

/// A working container of the image, removed on drop.
struct Container(String);

impl Container {
    fn new() -> Container {
        let out = buildah()
            .args(["from", "--pull-never"])
            .arg(image())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "no image {}: build it with `make image` (or run `make image-test`): {}",
            image(),
            text(&out)
        );
        Container(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }

    /// `buildah run --isolation chroot --network host` of `argv`, with `volume` (host
    /// directory) bound at /work and `env`.
    fn run(&self, volume: Option<&Path>, env: &[(&str, &str)], argv: &[&str]) -> Output {
        let mut cmd = buildah();
        cmd.args(["run", "--isolation", "chroot", "--network", "host"]);
        if let Some(v) = volume {
            cmd.arg("-v").arg(format!("{}:/work", v.display()));
        }
        for (k, v) in env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        cmd.arg(&self.0).arg("--").args(argv);
        cmd.output().unwrap()
    }

    fn inspect(&self, format: &str) -> String {
        let out = buildah()
            .args(["inspect", "--format", format])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = buildah().arg("rm").arg(&self.0).output();
    }
}

/// Every file of the image (paths from its root), read from the container's mount.
fn image_files(c: &Container) -> Vec<String> {
    let out = buildah().arg("mount").arg(&c.0).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mnt = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let mut files = Vec::new();
    let mut stack = vec![mnt.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path().strip_prefix(&mnt).unwrap().display().to_string());
            }
        }
    }
    let _ = buildah().arg("umount").arg(&c.0).output();
    files.sort();
    files
}

#[test]
#[ignore = "needs the release image: make image-test"]
fn image_runs_version_postgres_check_and_redis_snapshot_as_65532_without_a_shell() {
    let c = Container::new();

    // OCI configuration: entrypoint, user, labels.
    assert_eq!(c.inspect("{{.OCIv1.Config.User}}"), "65532:65532");
    assert_eq!(
        c.inspect("{{.OCIv1.Config.Entrypoint}}"),
        "[/usr/bin/syncbridge-agent]"
    );
    for label in [
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.source",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.created",
    ] {
        let value = c.inspect(&format!("{{{{index .OCIv1.Config.Labels \"{label}\"}}}}"));
        assert!(!value.is_empty() && value != "<no value>", "{label}");
    }
    assert_eq!(
        c.inspect("{{index .OCIv1.Config.Labels \"org.opencontainers.image.version\"}}"),
        env!("CARGO_PKG_VERSION")
    );

    // Nothing but the binary, its libraries, the CA bundle and three /etc files.
    let files = image_files(&c);
    for f in &files {
        let allowed = f == "usr/bin/syncbridge-agent"
            || f == "etc/ssl/certs/ca-certificates.crt"
            || f == "etc/passwd"
            || f == "etc/group"
            || f == "etc/nsswitch.conf"
            || f.starts_with("lib/x86_64-linux-gnu/")
            || f.starts_with("lib64/ld-linux");
        assert!(
            allowed,
            "unexpected file in the image: {f} (all: {files:?})"
        );
    }
    assert!(files.len() <= 10, "{files:?}");
    let no_shell = c.run(None, &[], &["/bin/sh", "-c", "true"]);
    assert!(
        !no_shell.status.success(),
        "a shell ran: {}",
        text(&no_shell)
    );

    // version
    let out = c.run(None, &[], &["/usr/bin/syncbridge-agent", "version"]);
    assert!(out.status.success(), "{}", text(&out));
    let version = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        version.starts_with(&format!("syncbridge-agent {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );

    // postgres check against a harness PostgreSQL, the password in the environment.
    let pg = PgCluster::start(PgVersion::V15);
    let source = format!(
        "postgres://replicator@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    let password = pg_password(&pg);
    let out = c.run(
        None,
        &[("PGPASSWORD", &password)],
        &[
            "/usr/bin/syncbridge-agent",
            "postgres",
            "check",
            "--source",
            &source,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let want = pg.query_one_blocking("SELECT system_identifier FROM pg_control_system()");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("system_identifier: {want}")),
        "{}",
        text(&out)
    );

    // redis snapshot against a harness Redis, into a file:// repository on a bound host
    // directory: the files it writes belong to uid 65532.
    let redis = RedisServer::start(RedisFlavor::Redis7);
    redis.cmd(&["SET", "image-test", "value"]);
    let work = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = c.run(
        Some(work.path()),
        &[],
        &[
            "/usr/bin/syncbridge-agent",
            "redis",
            "snapshot",
            "--source",
            &format!("redis://127.0.0.1:{}", redis.port()),
            "--repo",
            "file:///work/repo",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("db0:") && stdout.contains("keys=1"),
        "{stdout}"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(work.path().join("repo")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (65532, 65532),
        "the repository's owner"
    );
    let mut owners = Vec::new();
    let mut stack = vec![work.path().join("repo")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            owners.push(m.uid());
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    assert!(
        owners.len() > 2 && owners.iter().all(|&u| u == 65532),
        "{owners:?}"
    );

    let size = buildah()
        .args(["images", "--format", "{{.Size}}"])
        .arg(image())
        .output()
        .unwrap();
    println!(
        "image {} ({}): {} files, no shell, uid 65532",
        image(),
        String::from_utf8_lossy(&size.stdout).trim(),
        files.len()
    );
}

/// The replication role's password, from the harness's own URL.
fn pg_password(pg: &PgCluster) -> String {
    let url = pg.replication_url();
    let rest = url.strip_prefix("postgres://replicator:").unwrap();
    rest.split('@').next().unwrap().to_owned()
}
