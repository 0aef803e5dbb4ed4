//! Process plumbing shared by every server: free ports, process groups, the unprivileged user.
//!
//! Every server is spawned in its own process group (`setpgid(0, 0)` through
//! [`CommandExt::process_group`]) so the harness can kill it together with anything it forked.
//! PostgreSQL's children call `setsid()` (see `InitPostmasterChild` in
//! `src/backend/utils/init/miscinit.c`), so they leave that group: the harness therefore also
//! collects every descendant from `/proc` before killing, and kills those too.
//!
//! Drop handles panics. For a test process that dies without unwinding (SIGKILL, a nextest
//! timeout, Ctrl-C) each server also gets a watchdog: a tiny `sh` loop in its own process group
//! that polls the test process once a second and SIGKILLs the server's group when the test
//! process is gone. (PostgreSQL backends then exit on their own: they watch for postmaster
//! death.)

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{Gid, Pid, Uid, User};

/// Name of the unprivileged account PostgreSQL runs as when the tests run as root.
pub const TEST_USER: &str = "syncbridge-test";

/// A port on 127.0.0.1 that was free a moment ago.
///
/// The kernel picks it (bind to port 0), so parallel test processes rarely collide; the same
/// process never gets the same port twice. Servers still retry on a new port when their bind
/// fails, because another process may grab the port between this call and the server's bind.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<BTreeSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(BTreeSet::new()));
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr of a bound listener: {e}"))
            .port();
        drop(listener);
        let mut set = handed_out.lock().unwrap_or_else(|p| p.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    panic!("could not find a free port on 127.0.0.1 after 1000 tries")
}

/// `n` distinct free ports (see [`free_port`]).
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| free_port()).collect()
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_is_open(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The account to run servers as: `None` when we are not root (then run as ourselves).
///
/// PostgreSQL refuses to start as root (`postmaster.c`: "root execution of the PostgreSQL server
/// is not permitted"), and CI runs the tests as root. The account is created once with `useradd
/// --system --no-create-home`; a concurrent test process creating it at the same time is fine.
pub fn server_user() -> Option<(Uid, Gid)> {
    static USER: OnceLock<Option<(Uid, Gid)>> = OnceLock::new();
    *USER.get_or_init(|| {
        if !Uid::effective().is_root() {
            return None;
        }
        if let Some(user) = lookup_user(TEST_USER) {
            return Some(user);
        }
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ])
            .output();
        match lookup_user(TEST_USER) {
            Some(user) => Some(user),
            None => panic!(
                "running as root and the unprivileged user {TEST_USER} does not exist; \
                 `useradd {TEST_USER}` failed: {out:?}"
            ),
        }
    })
}

fn lookup_user(name: &str) -> Option<(Uid, Gid)> {
    User::from_name(name).ok().flatten().map(|u| (u.uid, u.gid))
}

/// Makes `cmd` run as the unprivileged server user when we are root (no-op otherwise).
pub fn run_as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid.as_raw()).gid(gid.as_raw());
    }
    cmd
}

/// Gives `path` and everything below it to the server user (no-op when not root).
///
/// Symlinks are changed themselves, never followed, so a restored data directory cannot make us
/// chown something outside it.
pub fn chown_to_server_user(path: &Path) {
    let Some((uid, gid)) = server_user() else {
        return;
    };
    chown_tree(path, uid.as_raw(), gid.as_raw());
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {} to {uid}:{gid}: {e}", path.display()));
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(path).unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()));
            chown_tree(&entry.path(), uid, gid);
        }
    }
}

/// A temporary directory the server user may use, removed on drop.
///
/// Created under the system temp dir (`/tmp`, world-traversable) so the unprivileged user can
/// reach it.
pub fn server_temp_dir(prefix: &str) -> ServerTempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
    chown_to_server_user(dir.path());
    ServerTempDir(dir)
}

/// A [`tempfile::TempDir`] whose removal retries: a server that is still exiting (a
/// postmaster after a FATAL, its last log lines) can create a file while the tree is being
/// removed, `rmdir` then fails with "not empty", and `TempDir` ignores that. Every such
/// leak kept a restored cluster (100+ MB) in `/tmp` for good, and a long-lived CI disk
/// filled up with them.
#[derive(Debug)]
pub struct ServerTempDir(tempfile::TempDir);

impl std::ops::Deref for ServerTempDir {
    type Target = tempfile::TempDir;

    fn deref(&self) -> &tempfile::TempDir {
        &self.0
    }
}

impl Drop for ServerTempDir {
    fn drop(&mut self) {
        let path = self.0.path();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::remove_dir_all(path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("warning: could not remove {}: {e}", path.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// Every live descendant of `pid` (children, grandchildren, ...), found through `/proc`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = proc_stat(p).map(|s| s.ppid) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                out.push(k);
                stack.push(k);
            }
        }
    }
    out
}

/// The fields of `/proc/<pid>/stat` the harness needs.
#[derive(Debug, Clone, Copy)]
pub struct ProcStat {
    /// Process state letter (`R`, `S`, `Z` for a zombie, ...).
    pub state: char,
    /// Parent pid.
    pub ppid: u32,
}

/// Reads `/proc/<pid>/stat`; `None` when the process does not exist.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcStat { state, ppid })
}

/// True while `pid` exists and is not a zombie (a zombie has exited; only its parent's
/// bookkeeping is left).
pub fn process_is_alive(pid: u32) -> bool {
    match proc_stat(pid) {
        Some(stat) => stat.state != 'Z' && stat.state != 'X',
        None => false,
    }
}

/// Waits until none of `pids` is alive; returns the ones still alive after `timeout`.
pub fn wait_until_gone(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|&p| process_is_alive(p))
            .collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn to_pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Sends `signal` to one process, ignoring "no such process".
pub fn signal_pid(pid: u32, signal: Signal) {
    let _ = kill(to_pid(pid), signal);
}

/// A server process in its own process group, logging to a file, killed (with its whole tree)
/// on drop.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    watchdog: Option<Child>,
    name: String,
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `cmd` in a new process group with stdin closed and stdout+stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> ServerProcess {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open log {}: {e}", log.display()));
        let err = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log handle {}: {e}", log.display()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let watchdog = spawn_watchdog(child.id());
        ServerProcess {
            child,
            watchdog,
            name: name.to_string(),
            log: log.to_path_buf(),
        }
    }

    /// The pid of the process we spawned (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file its stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last few kilobytes of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// `Some(status)` once the process has exited (reaps it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit; true if it did within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` to the process only (not its group).
    pub fn signal(&self, signal: Signal) {
        signal_pid(self.pid(), signal);
    }

    /// SIGKILLs the process, its process group and every descendant, and reaps it.
    ///
    /// This is both the crash simulation and the last-resort cleanup.
    pub fn kill_tree(&mut self) {
        let pid = self.pid();
        let tree = descendants(pid);
        let _ = killpg(to_pid(pid), Signal::SIGKILL);
        signal_pid(pid, Signal::SIGKILL);
        for &p in &tree {
            signal_pid(p, Signal::SIGKILL);
        }
        let _ = self.child.wait();
        self.stop_watchdog();
        let left = wait_until_gone(&tree, Duration::from_secs(10));
        if !left.is_empty() {
            eprintln!(
                "harness: {} descendants still alive after SIGKILL: {left:?}",
                self.name
            );
        }
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut dog) = self.watchdog.take() {
            let _ = killpg(to_pid(dog.id()), Signal::SIGKILL);
            let _ = dog.kill();
            let _ = dog.wait();
        }
    }

    /// Asks the process to stop with `signal`, waits up to `grace`, then kills the whole tree.
    ///
    /// Descendants are collected before signalling so none can escape by being re-parented.
    pub fn stop(&mut self, signal: Signal, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let tree = descendants(self.pid());
        self.signal(signal);
        let clean = self.wait_exit(grace);
        let left = wait_until_gone(&tree, if clean { grace } else { Duration::ZERO });
        if !clean || !left.is_empty() {
            self.kill_tree();
            for p in left {
                signal_pid(p, Signal::SIGKILL);
            }
        }
        self.stop_watchdog();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill_tree();
        }
        self.stop_watchdog();
    }
}

/// Starts the watchdog for `server_pid` (see the module docs); `None` if `sh` cannot start,
/// which only loses the safety net for non-unwinding deaths.
fn spawn_watchdog(server_pid: u32) -> Option<Child> {
    Command::new("sh")
        .args([
            "-c",
            "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; \
             kill -s KILL -- \"-$2\" 2>/dev/null; kill -s KILL \"$2\" 2>/dev/null",
            "sb-harness-watchdog",
        ])
        .arg(std::process::id().to_string())
        .arg(server_pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()
}

/// The last 4 KiB of a log file (lossy UTF-8), or a note that it cannot be read.
pub fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(4096);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Polls `ready` every 20 ms until it returns true, the server dies, or `timeout` passes.
///
/// Returns `Err` with a reason and the log tail so a start-up retry can decide what to do.
pub fn wait_ready(
    server: &mut ServerProcess,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = server.exited() {
            return Err(format!(
                "{} exited during start-up with {status}; log {}:\n{}",
                server.name,
                server.log.display(),
                server.log_tail()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} not ready after {timeout:?}; log {}:\n{}",
                server.name,
                server.log.display(),
                server.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes in the regular files under `dir` (symlinks not followed; unreadable entries
/// skipped): what a tool stored there, for benchmarks.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter_map(|e| Some((e.path(), e.path().symlink_metadata().ok()?)))
        .map(|(p, m)| if m.is_dir() { dir_size(&p) } else { m.len() })
        .sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn free_ports_are_distinct_in_one_process() {
        let ports = free_ports(50);
        let set: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(set.len(), 50);
    }

    #[test]
    fn proc_stat_reads_our_own_process() {
        let me = std::process::id();
        let stat = proc_stat(me).unwrap();
        assert!(process_is_alive(me));
        assert_eq!(stat.ppid, nix::unistd::getppid().as_raw() as u32);
    }

    #[test]
    fn kill_tree_kills_a_grandchild_that_left_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut cmd = Command::new("sh");
        // The grandchild starts its own session, like a PostgreSQL backend does.
        cmd.args(["-c", "setsid sleep 300 & sleep 300"]);
        let mut server = ServerProcess::spawn("sh", cmd, &log);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut tree = descendants(server.pid());
        while tree.len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            tree = descendants(server.pid());
        }
        assert!(tree.len() >= 2, "expected sleep children, got {tree:?}");
        server.kill_tree();
        assert!(wait_until_gone(&tree, Duration::from_secs(5)).is_empty());
        assert!(!process_is_alive(server.pid()));
    }
}
