//! What the benches measure about a process, read from `/proc` (Linux only): CPU time, peak
//! RSS, the load average, and a command run to completion while they are sampled. One copy
//! for every bench, so their figures mean the same thing.

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc/PID/stat`'s times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The fields after the command name in `/proc/PID/stat` (the name may hold spaces and
/// parentheses, so split after the last `)`).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    // Field 3 (state) is a letter; count it as 0 so indexes stay the man page's minus 3.
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// utime + stime of a process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)? + f.get(12)?)
}

/// CPU of a process's waited-for children (cutime + cstime, fields 16 and 17), in clock
/// ticks: e.g. Redis's forked snapshot child once Redis has reaped it.
pub fn children_cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(13)? + f.get(14)?)
}

/// Clock ticks as seconds.
pub fn ticks_to_secs(ticks: u64) -> f64 {
    ticks as f64 / TICKS_PER_SECOND
}

/// A `/proc/PID/status` field in KiB, e.g. `status_kib(pid, "VmHWM:")` (peak RSS).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A command run by [`run_measured`].
pub struct Measured {
    /// Wall time from spawn to exit.
    pub time: Duration,
    /// Peak RSS (VmHWM) in KiB, last sample before it exited.
    pub peak_kib: u64,
    /// utime + stime in seconds, last sample before it exited.
    pub cpu: f64,
    /// Its exit status and captured output.
    pub out: Output,
}

/// Runs a command to completion with stdout and stderr captured, sampling its peak RSS and
/// CPU time every 10 ms (a process's `/proc` entry is gone once it is reaped, so the last
/// sample counts).
pub fn run_measured(mut cmd: Command) -> Measured {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    let pid = child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let ticks = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, ticks, done) = (peak.clone(), ticks.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kb) = status_kib(pid, "VmHWM:") {
                    peak.fetch_max(kb, Ordering::Relaxed);
                }
                if let Some(t) = cpu_ticks(pid) {
                    ticks.fetch_max(t, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {:?}: {e}", cmd.get_program()));
    let time = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    Measured {
        time,
        peak_kib: peak.load(Ordering::Relaxed),
        cpu: ticks_to_secs(ticks.load(Ordering::Relaxed)),
        out,
    }
}

/// Panics with the command's output unless it succeeded.
pub fn check_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// The median of `v` (the upper one of an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Pipelines `SET key:<i> <len random bytes>` for every `i` of `keys` to the Redis server on
/// 127.0.0.1:`port` over one connection and waits for every `+OK`. The values are xorshift64*
/// words from `seed`: incompressible to zstd and LZF, so a snapshot is as large as the data.
pub fn load_random_sets(port: u16, keys: &[u64], len: usize, seed: u64) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to Redis on port {port}: {e}"));
    let mut reader = conn.try_clone().expect("clone the Redis connection");
    // Each reply is `+OK\r\n`.
    let want = keys.len() as u64 * 5;
    let counter = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        while got < want {
            let n = reader.read(&mut buf).expect("read Redis's replies");
            assert!(n > 0, "Redis closed the connection while loading");
            assert!(
                !buf[..n].contains(&b'-'),
                "Redis refused a SET: {}",
                String::from_utf8_lossy(&buf[..n])
            );
            got += n as u64;
        }
    });
    let mut state = seed;
    let mut batch = Vec::with_capacity(1 << 20);
    for i in keys {
        let key = format!("key:{i}");
        batch.extend_from_slice(
            format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${len}\r\n", key.len()).as_bytes(),
        );
        let mut left = len;
        while left > 0 {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            let n = left.min(8);
            batch.extend_from_slice(&word[..n]);
            left -= n;
        }
        batch.extend_from_slice(b"\r\n");
        if batch.len() >= 1 << 20 {
            conn.write_all(&batch).expect("send SETs to Redis");
            batch.clear();
        }
    }
    conn.write_all(&batch).expect("send SETs to Redis");
    counter.join().expect("the reply counter panicked");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_and_rss() {
        let me = std::process::id();
        assert!(status_kib(me, "VmHWM:").is_some_and(|k| k > 0));
        assert!(cpu_ticks(me).is_some());
        assert!(children_cpu_ticks(me).is_some());
        assert_eq!(status_kib(me, "NoSuchField:"), None);
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
    }
}
