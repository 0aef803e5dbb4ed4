//! Shared helpers for the Redis/Valkey integration tests: a dataset with every type, the
//! keyspace, a canonical dump of a server's data, and running the agent binary.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use syncbridge_tests::redis::{RedisFlavor, RedisServer, RespConnection, RespValue};

/// Sends every command pipelined and insists none failed.
pub fn pipeline(conn: &mut RespConnection, cmds: &[Vec<String>]) {
    for c in cmds {
        conn.send(c).unwrap();
    }
    for c in cmds {
        let reply = conn.read_reply().unwrap();
        assert!(!matches!(reply, RespValue::Error(_)), "{c:?} -> {reply}");
    }
}

pub fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// Writes a dataset covering every value type, each in its compact and its full encoding,
/// keys with TTLs, several databases and a function library.
pub fn load_dataset(server: &RedisServer) {
    let mut conn = server.connect();
    let mut c: Vec<Vec<String>> = Vec::new();
    for db in ["0", "3"] {
        c.push(cmd(&["SELECT", db]));
        // strings: raw, integer-encoded, LZF-compressible, incompressible, large
        c.push(cmd(&["SET", "str:short", "hello"]));
        c.push(cmd(&["SET", "str:int", "123456"]));
        c.push(cmd(&["SET", "str:neg", "-42"]));
        c.push(cmd(&["SET", "str:lzf", &"abc".repeat(2000)]));
        let noisy: String = (0..3000u32)
            .map(|i| char::from(b'!' + ((i * 7919 + i / 3) % 90) as u8))
            .collect();
        c.push(cmd(&["SET", "str:noisy", &noisy]));
        c.push(cmd(&["SET", "str:big", &"x".repeat(1 << 20)]));
        c.push(cmd(&["SET", "ttl:ex", "v", "EX", "3600"]));
        c.push(cmd(&["SET", "ttl:px", "v", "PX", "7200000"]));
        // lists: listpack and multi-node quicklist
        c.push(cmd(&["RPUSH", "list:small", "a", "b", "1", "2"]));
        let mut big = vec!["RPUSH".to_owned(), "list:big".to_owned()];
        big.extend((0..5000).map(|i| format!("element-{i}")));
        c.push(big);
        // sets: intset, listpack (Redis 7.2+/Valkey), hashtable
        c.push(cmd(&["SADD", "set:ints", "1", "2", "3", "-100", "65536"]));
        c.push(cmd(&["SADD", "set:small", "apple", "banana"]));
        let mut big = vec!["SADD".to_owned(), "set:big".to_owned()];
        big.extend((0..1000).map(|i| format!("member-{i}")));
        c.push(big);
        // sorted sets: listpack and skiplist
        c.push(cmd(&["ZADD", "zset:small", "1", "one", "2.5", "two"]));
        let mut big = vec!["ZADD".to_owned(), "zset:big".to_owned()];
        for i in 0..500 {
            big.push(format!("{}", f64::from(i) * 1.5));
            big.push(format!("zmember-{i}"));
        }
        c.push(big);
        // hashes: listpack and hashtable
        c.push(cmd(&["HSET", "hash:small", "f1", "v1", "f2", "2"]));
        let mut big = vec!["HSET".to_owned(), "hash:big".to_owned()];
        for i in 0..1000 {
            big.push(format!("field-{i}"));
            big.push(format!("value-{i}"));
        }
        c.push(big);
        c.push(cmd(&["HSET", "hash:longvalue", "f", &"y".repeat(200)]));
        // streams with consumer groups and pending entries
        for i in 0..300 {
            c.push(cmd(&[
                "XADD",
                "stream:s",
                "*",
                "n",
                &i.to_string(),
                "payload",
                "data",
            ]));
        }
        c.push(cmd(&["XGROUP", "CREATE", "stream:s", "g1", "0"]));
        c.push(cmd(&["XGROUP", "CREATE", "stream:s", "g2", "$"]));
        c.push(cmd(&[
            "XREADGROUP",
            "GROUP",
            "g1",
            "alice",
            "COUNT",
            "10",
            "STREAMS",
            "stream:s",
            ">",
        ]));
        c.push(cmd(&[
            "XREADGROUP",
            "GROUP",
            "g1",
            "bob",
            "COUNT",
            "5",
            "STREAMS",
            "stream:s",
            ">",
        ]));
        c.push(cmd(&["XADD", "stream:empty-group", "*", "a", "1"]));
        c.push(cmd(&["XDEL", "stream:empty-group", "0-1"]));
    }
    c.push(cmd(&["SELECT", "9"]));
    c.push(cmd(&["SET", "lonely", "key"]));
    c.push(cmd(&[
        "FUNCTION",
        "LOAD",
        "#!lua name=sblib\nredis.register_function('sbfunc', function(keys, args) return 1 end)",
    ]));
    pipeline(&mut conn, &c);
    if server.flavor() == RedisFlavor::Valkey9 {
        // Hash field TTLs (Valkey 9): written as RDB_TYPE_HASH_2.
        pipeline(
            &mut conn,
            &[
                cmd(&["SELECT", "0"]),
                cmd(&["HSET", "hash:fieldttl", "f1", "v1", "f2", "v2"]),
                cmd(&["HEXPIRE", "hash:fieldttl", "3600", "FIELDS", "1", "f1"]),
            ],
        );
    }
}

/// `INFO keyspace` as db -> (keys, expires).
pub fn keyspace(server: &RedisServer) -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    for (k, v) in server.info("keyspace") {
        let Some(db) = k.strip_prefix("db") else {
            continue;
        };
        let field = |name: &str| -> u64 {
            v.split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .unwrap()
                .parse()
                .unwrap()
        };
        out.insert(db.parse().unwrap(), (field("keys"), field("expires")));
    }
    out
}

/// How `got` differs from `expected` (two dumps of [`dump_port`]'s shape), for a failure
/// message: the keys missing, extra and with another value (at most 20 of each), or `None`
/// when they are equal.
pub fn dump_difference(
    expected: &BTreeMap<String, String>,
    got: &BTreeMap<String, String>,
) -> Option<String> {
    if expected == got {
        return None;
    }
    fn first<'a>(keys: impl Iterator<Item = &'a String>) -> String {
        let keys: Vec<&String> = keys.collect();
        let shown: Vec<&&String> = keys.iter().take(20).collect();
        match keys.len() {
            n if n > 20 => format!("{n} keys, first {shown:?}"),
            _ => format!("{shown:?}"),
        }
    }
    let missing = first(expected.keys().filter(|k| !got.contains_key(*k)));
    let extra = first(got.keys().filter(|k| !expected.contains_key(*k)));
    let differ = first(
        got.iter()
            .filter(|(k, v)| expected.get(*k).is_some_and(|e| e != *v))
            .map(|(k, _)| k),
    );
    Some(format!(
        "missing {missing}, extra {extra}, different {differ}"
    ))
}

/// A canonical text dump of every key in databases 0..16: type and full content, sorted.
/// Two servers with equal dumps hold the same data.
pub fn dump_port(port: u16, password: Option<&str>) -> BTreeMap<String, String> {
    let mut conn = RespConnection::connect(port).unwrap();
    if let Some(pw) = password {
        assert!(conn.cmd(&["AUTH", pw]).unwrap().is_ok());
    }
    let mut out = BTreeMap::new();
    for db in 0..16 {
        assert!(conn.cmd(&["SELECT", &db.to_string()]).unwrap().is_ok());
        let RespValue::Array(keys) = conn.cmd(&["KEYS", "*"]).unwrap() else {
            panic!("KEYS")
        };
        for k in keys {
            let key = k.as_str().unwrap().to_owned();
            let ty = conn
                .cmd(&["TYPE", &key])
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned();
            let value = match ty.as_str() {
                "string" => conn.cmd(&["GET", &key]).unwrap(),
                "list" => conn.cmd(&["LRANGE", &key, "0", "-1"]).unwrap(),
                "hash" => sorted(conn.cmd(&["HGETALL", &key]).unwrap(), 2),
                "set" => sorted(conn.cmd(&["SMEMBERS", &key]).unwrap(), 1),
                "zset" => conn
                    .cmd(&["ZRANGE", &key, "0", "-1", "WITHSCORES"])
                    .unwrap(),
                "stream" => conn.cmd(&["XRANGE", &key, "-", "+"]).unwrap(),
                other => panic!("unexpected type {other} of {key}"),
            };
            let ttl = conn.cmd(&["PTTL", &key]).unwrap().as_int().unwrap();
            let has_ttl = if ttl >= 0 { " ttl" } else { "" };
            out.insert(format!("{db}/{key}"), format!("{ty}{has_ttl} {value}"));
        }
    }
    out
}

fn sorted(v: RespValue, group: usize) -> RespValue {
    let RespValue::Array(items) = v else { return v };
    let mut groups: Vec<Vec<RespValue>> = items.chunks(group).map(<[RespValue]>::to_vec).collect();
    groups.sort_by_key(|g| g.iter().map(ToString::to_string).collect::<Vec<_>>());
    RespValue::Array(groups.into_iter().flatten().collect())
}

/// [`dump_port`] of a harness server.
pub fn dump(server: &RedisServer) -> BTreeMap<String, String> {
    dump_port(server.port(), server.password())
}

/// The `syncbridge-agent` binary next to the test executable's `deps/` directory (built by
/// the workspace test run or `cargo build -p syncbridge-agent`).
pub fn agent_bin() -> PathBuf {
    syncbridge_tests::agent::binary()
}

/// The agent with no SYNCBRIDGE_/REDISCLI_/AWS_ variables leaking in.
pub fn agent() -> Command {
    syncbridge_tests::agent::command(&["SYNCBRIDGE_", "REDISCLI_", "AWS_"])
}

/// Runs the agent to completion.
pub fn run_agent(args: &[&str], env: &[(String, String)]) -> Output {
    agent()
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .unwrap()
}

/// stdout + stderr, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running `redis stream`, SIGKILLed on drop.
pub struct StreamingAgent {
    child: std::process::Child,
    log: PathBuf,
}

impl StreamingAgent {
    /// Starts `redis stream` logging to `log` (appended).
    pub fn start(
        source: &str,
        repo: &str,
        max_lag: &str,
        env: &[(String, String)],
        log: PathBuf,
    ) -> StreamingAgent {
        Self::start_with(source, repo, &["--max-lag", max_lag], env, log)
    }

    /// Starts `redis stream` with extra arguments.
    pub fn start_with(
        source: &str,
        repo: &str,
        extra: &[&str],
        env: &[(String, String)],
        log: PathBuf,
    ) -> StreamingAgent {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = agent()
            .args(["redis", "stream", "--source", source, "--repo", repo])
            .args(extra)
            .envs(env.iter().cloned())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        StreamingAgent { child, log }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop on SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        self.wait_for_log_count(needle, 1, timeout);
    }

    /// Waits until the log contains `needle` at least `n` times.
    pub fn wait_for_log_count(&mut self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_text().matches(needle).count() < n {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the agent log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StreamingAgent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A server the agent started with `restore --start`; shut down on drop.
pub struct RestoredServer {
    /// Its port.
    pub port: u16,
}

impl RestoredServer {
    /// The server `restore --start` reports, if it started one.
    pub fn try_from_output(out: &Output) -> Option<RestoredServer> {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let port = stdout
            .lines()
            .find_map(|l| l.split("running on 127.0.0.1:").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())?;
        Some(RestoredServer { port })
    }

    /// Parses the port from the agent's `restore --start` output.
    pub fn from_output(out: &Output) -> RestoredServer {
        Self::try_from_output(out)
            .unwrap_or_else(|| panic!("no port in restore output:\n{}", text(out)))
    }
}

impl Drop for RestoredServer {
    fn drop(&mut self) {
        if let Ok(mut c) = RespConnection::connect(self.port) {
            let _ = c.send(&["SHUTDOWN", "NOSAVE"]);
            let _ = c.read_reply();
        }
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Server binary for a flavor.
pub fn server_bin(flavor: RedisFlavor) -> String {
    flavor.server_binary().display().to_string()
}
