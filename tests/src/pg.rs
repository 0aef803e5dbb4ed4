//! Throwaway PostgreSQL clusters (14–18) on 127.0.0.1.
//!
//! A cluster is `initdb`'d into a temp dir with what a streaming-backup agent needs:
//! `wal_level = replica`, spare WAL senders and replication slots, a `replicator` role with
//! `REPLICATION` and a SCRAM password, and a `pg_hba.conf` that allows both normal and
//! replication connections over TCP with `scram-sha-256`
//! (<https://www.postgresql.org/docs/current/auth-pg-hba-conf.html>). Local (Unix socket)
//! connections are `trust`, for tools run as the server user.
//!
//! `postgres` is run directly (not through `pg_ctl`, which `setsid()`s the postmaster away from
//! us) in its own process group; when the tests run as root it runs as the unprivileged
//! [`TEST_USER`](crate::process::TEST_USER).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::paths::{dep_dir, require_executable, RUN_MAKE_DEPS};
use crate::process::{
    chown_to_server_user, descendants, free_port, log_tail, run_as_server_user, server_temp_dir,
    wait_ready, wait_until_gone, ServerProcess,
};

/// Superuser created by `initdb -U`.
pub const SUPERUSER: &str = "postgres";
/// The superuser's password (TCP connections need it; it survives into restored clusters).
pub const SUPERUSER_PASSWORD: &str = "sb-super-pw";
/// The role the agent streams WAL and base backups with.
pub const REPLICATION_USER: &str = "replicator";
/// The replication role's SCRAM password.
pub const REPLICATION_PASSWORD: &str = "sb-repl-pw";
/// Database every conninfo points at.
pub const DATABASE: &str = "postgres";

/// A supported PostgreSQL major version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PgVersion {
    /// PostgreSQL 14.
    V14,
    /// PostgreSQL 15.
    V15,
    /// PostgreSQL 16.
    V16,
    /// PostgreSQL 17.
    V17,
    /// PostgreSQL 18.
    V18,
}

impl PgVersion {
    /// Every supported version, oldest first: the version matrix.
    pub fn all() -> &'static [PgVersion] {
        &[
            PgVersion::V14,
            PgVersion::V15,
            PgVersion::V16,
            PgVersion::V17,
            PgVersion::V18,
        ]
    }

    /// The version tests run on when they do not depend on the server version.
    pub fn default_single() -> PgVersion {
        PgVersion::V17
    }

    /// The versions a matrix test should cover: `SB_PG_VERSIONS` (e.g. `14,18` or `all`),
    /// defaulting to [`PgVersion::all`]. An unknown value panics rather than silently testing
    /// less.
    pub fn from_env() -> Vec<PgVersion> {
        match std::env::var("SB_PG_VERSIONS") {
            Ok(list) if !list.trim().is_empty() && list.trim() != "all" => list
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("SB_PG_VERSIONS={list}: {e}"))
                })
                .collect(),
            _ => PgVersion::all().to_vec(),
        }
    }

    /// The major version number (14..=18).
    pub fn major(self) -> u32 {
        match self {
            PgVersion::V14 => 14,
            PgVersion::V15 => 15,
            PgVersion::V16 => 16,
            PgVersion::V17 => 17,
            PgVersion::V18 => 18,
        }
    }

    /// The version for a major number, if supported.
    pub fn from_major(major: u32) -> Option<PgVersion> {
        PgVersion::all()
            .iter()
            .copied()
            .find(|v| v.major() == major)
    }

    /// The directory with this version's `initdb`, `postgres` and `pg_ctl` (from
    /// `.deps/paths.env`); panics with `run make deps` when missing.
    pub fn bin_dir(self) -> PathBuf {
        let dir = dep_dir(&format!("SB_PG{}_BIN", self.major()));
        for tool in ["initdb", "postgres", "pg_ctl"] {
            require_executable(&dir.join(tool), &format!("PostgreSQL {}", self.major()));
        }
        dir
    }
}

impl fmt::Display for PgVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgreSQL {}", self.major())
    }
}

impl FromStr for PgVersion {
    type Err = String;

    /// Accepts `14`, `pg14`, `PG14`, `v14`, `V14`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s
            .trim()
            .trim_start_matches(|c: char| c.is_ascii_alphabetic());
        digits
            .parse::<u32>()
            .ok()
            .and_then(PgVersion::from_major)
            .ok_or_else(|| format!("unsupported PostgreSQL version {s:?} (expected 14..18)"))
    }
}

/// Options for a cluster before it starts.
#[derive(Debug, Clone)]
pub struct PgClusterBuilder {
    version: PgVersion,
    wal_keep_size_mb: u32,
    fsync: bool,
    extra_conf: Vec<String>,
    existing_data_dir: Option<PathBuf>,
    start_timeout: Duration,
}

impl PgClusterBuilder {
    /// `wal_keep_size` in MiB (default 128): how much WAL the server keeps for a replica that
    /// has no slot. Tests of "the agent fell behind" lower it.
    pub fn wal_keep_size_mb(mut self, mb: u32) -> Self {
        self.wal_keep_size_mb = mb;
        self
    }

    /// Turns `fsync` on (default off: the tests crash processes, not machines, so the page
    /// cache keeps every write and start-up is much faster).
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// Appends one `postgresql.conf` line, e.g. `"archive_mode = on"`. Later lines win.
    pub fn extra_conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }

    /// Starts an existing (e.g. restored) data directory instead of running `initdb`.
    ///
    /// The directory is chowned to the server user and set to mode 0700; it is *not* removed
    /// on drop (its owner, the test, removes it). `extra_conf` lines are appended to its
    /// `postgresql.conf`; port, socket directory and `listen_addresses` are given on the
    /// command line so settings copied from the original cluster never clash.
    pub fn existing_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.existing_data_dir = Some(dir.into());
        self
    }

    /// How long start-up (including crash or archive recovery) may take; default 120 s.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Creates (or adopts) the data directory and starts the server; panics on failure with
    /// the server log.
    pub fn start(self) -> PgCluster {
        PgCluster::launch(self)
    }
}

/// A running (or stopped) throwaway PostgreSQL cluster; stopped and removed on drop.
#[derive(Debug)]
pub struct PgCluster {
    version: PgVersion,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    start_timeout: Duration,
    process: Option<ServerProcess>,
    // Declared last: dropped after `process`, so the server is gone before its files.
    dir: crate::process::ServerTempDir,
}

impl PgCluster {
    /// Starts a fresh cluster of `version` with the default options.
    pub fn start(version: PgVersion) -> PgCluster {
        PgCluster::builder(version).start()
    }

    /// A builder for a cluster of `version`.
    pub fn builder(version: PgVersion) -> PgClusterBuilder {
        PgClusterBuilder {
            version,
            wal_keep_size_mb: 128,
            fsync: false,
            extra_conf: Vec::new(),
            existing_data_dir: None,
            start_timeout: Duration::from_secs(120),
        }
    }

    /// Starts an existing (e.g. restored) data directory; see
    /// [`PgClusterBuilder::existing_data_dir`].
    pub fn start_from_data_dir(version: PgVersion, data_dir: impl Into<PathBuf>) -> PgCluster {
        PgCluster::builder(version)
            .existing_data_dir(data_dir)
            .start()
    }

    fn launch(opts: PgClusterBuilder) -> PgCluster {
        let version = opts.version;
        let bin_dir = version.bin_dir();
        let dir = server_temp_dir(&format!("sb-pg{}-", version.major()));
        std::fs::create_dir(dir.path().join("sock"))
            .unwrap_or_else(|e| panic!("mkdir sock in {}: {e}", dir.path().display()));
        chown_to_server_user(&dir.path().join("sock"));

        let fresh = opts.existing_data_dir.is_none();
        let data_dir = match &opts.existing_data_dir {
            Some(existing) => {
                adopt_data_dir(existing);
                existing.clone()
            }
            None => {
                let data = dir.path().join("data");
                initdb(version, &bin_dir, dir.path(), &data);
                write_conf(&data, &opts);
                data
            }
        };
        if !fresh && !opts.extra_conf.is_empty() {
            append_conf(&data_dir, &opts.extra_conf.join("\n"));
        }

        let mut cluster = PgCluster {
            version,
            bin_dir,
            data_dir,
            port: 0,
            start_timeout: opts.start_timeout,
            process: None,
            dir,
        };
        // A port can be taken between choosing and binding it: retry on a new one.
        let mut last_error = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => {
                    last_error.clear();
                    break;
                }
                Err(e) if is_bind_error(&e) => last_error = e,
                Err(e) => panic!("{version} did not start: {e}"),
            }
        }
        if !last_error.is_empty() {
            panic!("{version} could not bind a port after 5 tries: {last_error}");
        }
        if fresh {
            cluster.query_blocking(&format!(
                "CREATE ROLE {REPLICATION_USER} WITH LOGIN REPLICATION PASSWORD '{REPLICATION_PASSWORD}'; \
                 GRANT pg_monitor TO {REPLICATION_USER};"
            ));
        }
        cluster
    }

    /// Spawns the postmaster and waits until it accepts connections.
    fn try_start(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .current_dir(self.dir.path())
            .env("LC_ALL", "C");
        run_as_server_user(&mut cmd);
        let mut process = ServerProcess::spawn(
            &format!("{} postmaster", self.version),
            cmd,
            &self.log_path(),
        );
        let pid_file = self.data_dir.join("postmaster.pid");
        let pid = process.pid();
        let started = wait_ready(&mut process, self.start_timeout, || {
            // After a kill -9 the old postmaster.pid (saying "ready") is still there until the
            // new postmaster replaces it: only a file naming our pid counts.
            postmaster_status(&pid_file).is_some_and(|(owner, status)| {
                owner == pid && (status == "ready" || status == "standby")
            })
        });
        match started {
            Ok(()) => {
                self.process = Some(process);
                Ok(())
            }
            Err(e) => {
                process.kill_tree();
                Err(e)
            }
        }
    }

    /// The server's major version.
    pub fn version(&self) -> PgVersion {
        self.version
    }

    /// The TCP port on 127.0.0.1 (kept across [`stop`](Self::stop)/[`start_again`](Self::start_again)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server binaries' directory (`initdb`, `postgres`, `pg_ctl`; see
    /// [`client_binary`](Self::client_binary) for `psql` and friends).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `PGDATA/pg_wal`, where the server writes WAL segments.
    pub fn pg_wal_dir(&self) -> PathBuf {
        self.data_dir.join("pg_wal")
    }

    /// The Unix socket directory (connections there are `trust`).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The temp dir holding the socket dir, the log and (for fresh clusters) the data dir.
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log (stdout and stderr of the postmaster).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The last few KiB of the server log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    /// The postmaster's pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ServerProcess::pid)
    }

    /// True while the postmaster runs.
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(p) => p.exited().is_none(),
            None => false,
        }
    }

    /// `postgres://postgres:PW@127.0.0.1:PORT/postgres`: the superuser, for setup and load.
    pub fn superuser_url(&self) -> String {
        format!(
            "postgres://{SUPERUSER}:{SUPERUSER_PASSWORD}@127.0.0.1:{}/{DATABASE}",
            self.port
        )
    }

    /// `postgres://replicator:PW@127.0.0.1:PORT/postgres`: what the agent is configured with.
    /// Without `replication=`; the replication client adds it.
    pub fn replication_url(&self) -> String {
        format!(
            "postgres://{REPLICATION_USER}:{REPLICATION_PASSWORD}@127.0.0.1:{}/{DATABASE}",
            self.port
        )
    }

    /// Key/value conninfo for the superuser (`host=127.0.0.1 port=.. user=postgres ...`).
    pub fn superuser_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname={DATABASE}",
            self.port
        )
    }

    /// Key/value conninfo for the replication role, without `replication=`.
    pub fn replication_conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={REPLICATION_USER} password={REPLICATION_PASSWORD} dbname={DATABASE}",
            self.port
        )
    }

    /// Connects as the superuser over TCP; the connection task is spawned on the current
    /// tokio runtime.
    pub async fn try_connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.superuser_conninfo(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            // The connection ends when the client is dropped or the server goes away.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// [`try_connect`](Self::try_connect), panicking with the server log on failure.
    pub async fn connect(&self) -> tokio_postgres::Client {
        match self.try_connect().await {
            Ok(client) => client,
            Err(e) => panic!(
                "cannot connect to {} on port {}: {}\nlog:\n{}",
                self.version,
                self.port,
                error_chain(&e),
                self.log_tail()
            ),
        }
    }

    /// Runs `query` (one or more statements, simple query protocol) as the superuser and
    /// returns every row as text columns (`None` for NULL).
    pub async fn sql(&self, query: &str) -> Vec<Vec<Option<String>>> {
        let client = self.connect().await;
        let messages = client.simple_query(query).await.unwrap_or_else(|e| {
            panic!(
                "{} query {query:?} failed: {}",
                self.version,
                error_chain(&e)
            )
        });
        messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_string))
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    }

    /// The first column of the single row `query` returns; panics on zero or several rows or
    /// on NULL.
    pub async fn query_one(&self, query: &str) -> String {
        single_value(query, self.sql(query).await)
    }

    /// [`sql`](Self::sql) for synchronous code (also safe to call inside a tokio runtime: it
    /// runs on its own thread and runtime).
    pub fn sql_blocking(&self, query: &str) -> Vec<Vec<Option<String>>> {
        block_on(self.sql(query))
    }

    /// [`query_one`](Self::query_one) for synchronous code.
    pub fn query_one_blocking(&self, query: &str) -> String {
        block_on(self.query_one(query))
    }

    fn query_blocking(&self, query: &str) {
        self.sql_blocking(query);
    }

    /// True while the server is in recovery (a standby, or replaying archived WAL).
    pub fn is_in_recovery(&self) -> bool {
        self.query_one_blocking("SELECT pg_is_in_recovery()") == "t"
    }

    /// Waits until recovery has ended and the server accepts writes (after a PITR restore
    /// reaches its target and promotes, or after `pg_promote()`); panics with the log tail
    /// after `timeout`.
    pub fn wait_recovery_end(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.is_in_recovery() {
            if std::time::Instant::now() >= deadline {
                panic!(
                    "{} on port {} still in recovery after {timeout:?}; log:\n{}",
                    self.version,
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Path of a client program (`psql`, `pgbench`, `pg_basebackup`, `pg_receivewal`, ...).
    ///
    /// The embedded 14/16/17/18 packages only carry the server, so this looks in the cluster's
    /// own bin dir first, then in the other versions' (newest first). Note that
    /// `pg_basebackup`/`pg_receivewal` refuse servers newer than themselves.
    pub fn client_binary(&self, program: &str) -> PathBuf {
        let own = self.bin_dir.join(program);
        if own.is_file() {
            return own;
        }
        for v in PgVersion::all().iter().rev() {
            let key = format!("SB_PG{}_BIN", v.major());
            if let Some(value) = crate::paths::try_dep_value(&key) {
                let candidate = Path::new(&value).join(program);
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
        panic!(
            "no PostgreSQL client program {program:?} in any SB_PG*_BIN directory: {RUN_MAKE_DEPS}"
        )
    }

    /// A [`Command`] for a client program (see [`client_binary`](Self::client_binary)) run as
    /// the server user, with `PGHOST`, `PGPORT`, `PGUSER` (superuser), `PGPASSWORD` and
    /// `PGDATABASE` pointing at this cluster over TCP and the cwd in the cluster's temp dir.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.client_binary(program));
        cmd.current_dir(self.dir.path())
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", SUPERUSER)
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .env("PGDATABASE", DATABASE)
            .env("HOME", self.dir.path())
            .env("PSQLRC", "/dev/null")
            .env("LC_ALL", "C");
        run_as_server_user(&mut cmd);
        cmd
    }

    /// Runs a client program with `args` (see [`command`](Self::command)) and returns its
    /// stdout; panics with stderr if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if !out.status.success() {
            panic!(
                "{program} {args:?} against {} failed with {}:\n{}",
                self.version,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Fast shutdown (SIGINT: disconnect clients, shutdown checkpoint) and wait; a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Signal::SIGINT, Duration::from_secs(60));
        }
    }

    /// Immediate shutdown (SIGQUIT): no checkpoint, crash recovery on the next start.
    pub fn stop_immediate(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Signal::SIGQUIT, Duration::from_secs(10));
        }
    }

    /// SIGKILLs the postmaster, like a crash, then waits for its backends to notice and exit
    /// (they watch for postmaster death) so that [`start_again`](Self::start_again) can run crash recovery.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            let children = descendants(p.pid());
            p.signal(Signal::SIGKILL);
            p.wait_exit(Duration::from_secs(10));
            let left = wait_until_gone(&children, Duration::from_secs(10));
            for pid in left {
                crate::process::signal_pid(pid, Signal::SIGKILL);
            }
            p.kill_tree();
        }
    }

    /// Starts the stopped server again on the same port (after [`stop`](Self::stop) or
    /// [`kill9`](Self::kill9)); panics if it is still running or does not come up.
    pub fn start_again(&mut self) {
        if self.is_running() {
            panic!("{} on port {} is already running", self.version, self.port);
        }
        self.process = None;
        // The old postmaster may hold the port for a moment after exiting; PostgreSQL sets
        // SO_REUSEADDR, so a short retry loop is enough.
        let mut last = String::new();
        for _ in 0..10 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) if is_bind_error(&e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => panic!("{} did not restart: {e}", self.version),
            }
        }
        panic!(
            "{} could not bind port {} again: {last}",
            self.version, self.port
        );
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again).
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Immediate shutdown is enough for a throwaway cluster; ServerProcess escalates to
        // SIGKILL of the whole tree if it does not exit in time.
        if let Some(mut p) = self.process.take() {
            p.stop(Signal::SIGQUIT, Duration::from_secs(5));
        }
    }
}

/// Runs a future to completion on a fresh current-thread runtime on its own thread, so that
/// blocking helpers work from plain `#[test]`s and from inside `#[tokio::test]` alike.
pub fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"))
                .block_on(future)
        });
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `error: cause: cause...`, because tokio-postgres' Display hides the cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn single_value(query: &str, rows: Vec<Vec<Option<String>>>) -> String {
    match rows.as_slice() {
        [row] => match row.first() {
            Some(Some(v)) => v.clone(),
            Some(None) => panic!("query {query:?} returned NULL"),
            None => panic!("query {query:?} returned a row without columns"),
        },
        _ => panic!("query {query:?} returned {} rows, expected 1", rows.len()),
    }
}

fn is_bind_error(log: &str) -> bool {
    log.contains("could not bind")
        || log.contains("Address already in use")
        || log.contains("could not create any TCP/IP sockets")
}

/// The postmaster pid (line 1) and the status word (line 8: `starting`, `ready`, `standby`,
/// `stopping`) from `postmaster.pid`; see `LOCK_FILE_LINE_*` and `PM_STATUS_*` in
/// `src/include/utils/pidfile.h`.
fn postmaster_status(pid_file: &Path) -> Option<(u32, String)> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let status = lines.nth(6)?.trim().to_string();
    Some((pid, status))
}

fn initdb(version: PgVersion, bin_dir: &Path, temp: &Path, data: &Path) {
    let pwfile = temp.join("pwfile");
    std::fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n"))
        .unwrap_or_else(|e| panic!("write {}: {e}", pwfile.display()));
    chown_to_server_user(&pwfile);
    let mut cmd = Command::new(bin_dir.join("initdb"));
    cmd.arg("-D")
        .arg(data)
        .args(["-U", SUPERUSER, "--pwfile"])
        .arg(&pwfile)
        .args([
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(temp)
        .env("LC_ALL", "C");
    run_as_server_user(&mut cmd);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run initdb for {version}: {e}: {RUN_MAKE_DEPS}"));
    let _ = std::fs::remove_file(&pwfile);
    if !out.status.success() {
        panic!(
            "initdb for {version} failed with {}:\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn write_conf(data: &Path, opts: &PgClusterBuilder) {
    let mut conf = format!(
        "\n# syncbridge test harness\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         wal_keep_size = '{}MB'\n\
         password_encryption = 'scram-sha-256'\n\
         fsync = {}\n\
         max_connections = 50\n\
         shared_buffers = '32MB'\n\
         logging_collector = off\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n",
        opts.wal_keep_size_mb,
        if opts.fsync { "on" } else { "off" },
    );
    for line in &opts.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    append_conf(data, &conf);
    let hba = "# syncbridge test harness: trust over the socket, SCRAM over TCP\n\
               local all all trust\n\
               local replication all trust\n\
               host all all 127.0.0.1/32 scram-sha-256\n\
               host replication all 127.0.0.1/32 scram-sha-256\n";
    let hba_path = data.join("pg_hba.conf");
    std::fs::write(&hba_path, hba).unwrap_or_else(|e| panic!("write {}: {e}", hba_path.display()));
}

fn append_conf(data: &Path, text: &str) {
    use std::io::Write;
    let path = data.join("postgresql.conf");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    writeln!(file, "\n{text}").unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// Makes a restored data dir startable: owned by the server user, mode 0700 (PostgreSQL
/// refuses group/world-accessible data directories, `checkDataDir` in miscinit.c).
fn adopt_data_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if !dir.join("PG_VERSION").is_file() {
        panic!(
            "{} is not a PostgreSQL data directory (no PG_VERSION)",
            dir.display()
        );
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod 0700 {}: {e}", dir.display()));
    chown_to_server_user(dir);
    // The server user must be able to reach the directory through its parents.
    let mut parent = dir.parent();
    while let Some(p) = parent {
        if let Ok(meta) = std::fs::metadata(p) {
            if meta.permissions().mode() & 0o001 == 0 {
                chown_to_server_user_shallow(p);
            }
        }
        parent = p.parent();
    }
}

/// Gives one directory (not its contents) to the server user when it is otherwise
/// unreachable (e.g. a 0700 `tempfile` dir holding a restored PGDATA).
fn chown_to_server_user_shallow(dir: &Path) {
    if let Some((uid, gid)) = crate::process::server_user() {
        if dir.starts_with(std::env::temp_dir()) && dir != std::env::temp_dir() {
            let _ = std::os::unix::fs::chown(dir, Some(uid.as_raw()), Some(gid.as_raw()));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn versions_parse_in_every_spelling() {
        for s in ["14", "pg14", "PG14", "v14", "V14"] {
            assert_eq!(s.parse::<PgVersion>().unwrap(), PgVersion::V14);
        }
        assert_eq!("18".parse::<PgVersion>().unwrap().major(), 18);
        assert!("13".parse::<PgVersion>().is_err());
        assert!("pg".parse::<PgVersion>().is_err());
        assert_eq!(PgVersion::all().len(), 5);
    }

    #[test]
    fn postmaster_status_reads_line_eight() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("postmaster.pid");
        std::fs::write(&f, "123\n/d\n1\n5432\n/s\n127.0.0.1\n  1  2\nready   \n").unwrap();
        assert_eq!(postmaster_status(&f), Some((123, "ready".to_string())));
        std::fs::write(&f, "123\n/d\n").unwrap();
        assert_eq!(postmaster_status(&f), None);
    }
}
