//! `make demo`: the agent end to end on the embedded default (a `file://` repository), against
//! throwaway PostgreSQL and Redis servers from `.deps/`. It prints every step and every check,
//! and exits non-zero when a check fails. It grows as capabilities land.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use syncbridge_tests::pg::{PgCluster, PgVersion};
use syncbridge_tests::redis::{RedisFlavor, RedisServer};

fn agent_binary() -> PathBuf {
    let root = syncbridge_tests::paths::repo_root();
    let bin = std::env::var_os("SYNCBRIDGE_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/debug/syncbridge-agent"));
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p syncbridge-agent`",
        bin.display()
    );
    bin
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn agent(bin: &Path, args: &[&str]) -> String {
    println!("    $ syncbridge-agent {}", args.join(" "));
    let out = Command::new(bin).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        panic!(
            "syncbridge-agent {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

fn main() -> ExitCode {
    let bin = agent_binary();
    let demo_dir = syncbridge_tests::paths::repo_root().join("demo-out");
    let _ = std::fs::remove_dir_all(&demo_dir);
    std::fs::create_dir_all(&demo_dir).unwrap();

    step("starting a throwaway PostgreSQL 15 and Redis 7 on 127.0.0.1");
    let pg = PgCluster::start(PgVersion::V15);
    let redis = RedisServer::start(RedisFlavor::Redis7);
    println!(
        "    PostgreSQL on port {}, Redis on port {}",
        pg.port(),
        redis.port()
    );

    step("generating load");
    pg.sql_blocking("CREATE TABLE markers (id bigint PRIMARY KEY, committed_at timestamptz NOT NULL DEFAULT clock_timestamp())");
    for i in 0..100 {
        pg.sql_blocking(&format!("INSERT INTO markers (id) VALUES ({i})"));
        redis.cmd(&["SET", &format!("marker:{i}"), "1"]);
    }
    let rows = pg.query_one_blocking("SELECT count(*) FROM markers");
    println!(
        "    PostgreSQL: {rows} marker rows; Redis: {:?} keys",
        redis.cmd(&["DBSIZE"]).as_int()
    );

    step("the agent");
    print!("    {}", agent(&bin, &["version"]));

    step("still to come in this demo as the capabilities land");
    println!(
        "    - postgres stream / backup into file://{}/repo",
        demo_dir.display()
    );
    println!("    - redis stream into the same kind of repository");
    println!("    - restore --to-time T for both, with the markers checked");
    ExitCode::SUCCESS
}
