//! When a replicated command was executed by the master, as tightly as the agent can know.
//!
//! The replication stream carries no times, so the time index records, for each offset, a
//! moment by which the master had certainly executed the command ending there. The arrival
//! time on the replica link is one such bound, and a tight one while the agent reads as fast
//! as the master writes. It is late when reading waits: while the upload queue is full (a
//! slow store and no spool), or when a new generation's connection re-reads the commands
//! that followed its snapshot, seconds after the old connection read the same offsets. A
//! late time would make a restore to a moment just after a write leave it out, succeeding
//! with less than the repository holds.
//!
//! Two more bounds are kept as [`ExecBounds`], sequences of "by time `ms`, the master had
//! executed everything up to offset `m`":
//!
//! - [`OffsetProbe`]: `INFO replication` on a connection of its own every [`PROBE_EVERY`];
//!   `master_repl_offset` (in `src/replication.c`, fed when a command is propagated, before
//!   its client is answered) at the moment the reply arrived is such a pair. It goes on while
//!   the stream's reading waits.
//! - The old connection's arrival times while a new generation is taken: both connections
//!   carry the same replication id and offsets.
//!
//! A command's index time is the least of its bounds. Every bound is at or after the real
//! execution, so a restore to T never includes a write made after T, and leaves out at most
//! the writes of the last [`PROBE_EVERY`] before T when reading was late.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wire::redis::resp::Reply;

use super::link::MasterLink;
use super::source::RedisSource;

/// How often the master's offset is sampled: the precision of a command's time while
/// reading is delayed.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);

/// "By `ms`, the master had executed up to offset `m`", in offset order.
#[derive(Default, Debug)]
pub struct ExecBounds {
    entries: VecDeque<(u64, i64)>,
    overflowed: bool,
}

impl ExecBounds {
    /// 16 bytes each: 16 MiB at most (a read delay of about 17 minutes with a distinct
    /// bound every millisecond); past it, later offsets keep their arrival times.
    pub const MAX_ENTRIES: usize = 1 << 20;

    /// Adds a bound. An offset not past the last adds nothing (the earlier time is
    /// tighter); a time not past the last raises that entry's offset.
    pub fn record(&mut self, m: u64, ms: i64) {
        let full = self.entries.len() >= Self::MAX_ENTRIES;
        match self.entries.back_mut() {
            Some(last) if m <= last.0 => {}
            Some(last) if ms <= last.1 => last.0 = m,
            _ if full => self.overflowed = true,
            _ => self.entries.push_back((m, ms)),
        }
    }

    /// Drops the bounds of offsets at or before `offset` (already indexed); `None` when
    /// nothing is left.
    pub fn after(mut self, offset: u64) -> Option<Self> {
        while self.entries.front().is_some_and(|e| e.0 <= offset) {
            self.entries.pop_front();
        }
        if self.overflowed {
            tracing::warn!(
                "more than {} execution-time bounds were kept: later commands are indexed when they are read",
                Self::MAX_ENTRIES
            );
        }
        (!self.entries.is_empty()).then_some(self)
    }

    /// The bound for the command ending at `end`, forgetting those before it (offsets only
    /// grow).
    pub fn take(&mut self, end: u64) -> Option<i64> {
        while self.entries.front().is_some_and(|e| e.0 < end) {
            self.entries.pop_front();
        }
        self.entries.front().map(|e| e.1)
    }

    /// The bound of the next command after `end`, without consuming: a time index may not
    /// claim "nothing more by then" past it.
    pub fn peek_after(&self, end: u64) -> Option<i64> {
        self.entries.iter().find(|e| e.0 > end).map(|e| e.1)
    }
}

/// Samples from the probe connection, for one replication id.
#[derive(Default)]
struct Samples {
    replid: String,
    bounds: ExecBounds,
}

/// What the probe task hands to the stream: samples not yet taken, and a counter of
/// samples published so the stream reads one atomic per command and locks only when a new
/// sample is there (ten times a second), not once per replicated command.
#[derive(Default)]
struct Shared {
    samples: Mutex<Samples>,
    published: AtomicU64,
}

/// `INFO replication` every [`PROBE_EVERY`] on a connection of its own, as a task.
pub struct OffsetProbe {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl OffsetProbe {
    /// Starts probing `source`; `clock` gives the index's time (never going back).
    pub fn start(source: RedisSource, clock: fn() -> i64) -> OffsetProbe {
        let shared = Arc::new(Shared::default());
        let published = shared.clone();
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                match probe_loop(&source, &published, clock).await {
                    Ok(()) => return,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 {
                            tracing::warn!("offset probe: {e:#}; command times follow their arrival until it answers again");
                        } else {
                            tracing::debug!("offset probe: {e:#}");
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        OffsetProbe { shared, task }
    }

    /// Moves the samples published since the last call into `into` (the caller's own
    /// copy, consulted without a lock).
    fn take_new(&self, seen: &mut u64, into: &mut Samples) {
        if self.shared.published.load(Ordering::Acquire) == *seen {
            return;
        }
        let Ok(mut s) = self.shared.samples.lock() else {
            return;
        };
        *seen = self.shared.published.load(Ordering::Acquire);
        if s.replid != into.replid {
            *into = Samples {
                replid: s.replid.clone(),
                bounds: ExecBounds::default(),
            };
        }
        for (m, ms) in s.bounds.entries.drain(..) {
            into.bounds.record(m, ms);
        }
    }
}

impl Drop for OffsetProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn probe_loop(
    source: &RedisSource,
    shared: &Shared,
    clock: fn() -> i64,
) -> anyhow::Result<()> {
    let mut link = MasterLink::connect(source).await?;
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let reply = link.query(&[b"INFO", b"replication"]).await?;
        let ms = clock();
        let text = match reply {
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
            Reply::Error(e) => anyhow::bail!("{} refused INFO replication: {e}", link.endpoint()),
            other => anyhow::bail!("{} answered INFO with {other:?}", link.endpoint()),
        };
        let Some((replid, offset)) = replication_position(&text) else {
            anyhow::bail!(
                "{}: INFO replication has no master_replid/master_repl_offset",
                link.endpoint()
            );
        };
        let Ok(mut s) = shared.samples.lock() else {
            return Ok(());
        };
        if s.replid != replid {
            *s = Samples {
                replid,
                bounds: ExecBounds::default(),
            };
        }
        s.bounds.record(offset, ms);
        shared.published.fetch_add(1, Ordering::Release);
    }
}

/// `master_replid` and `master_repl_offset` of an `INFO replication` text.
fn replication_position(info: &str) -> Option<(String, u64)> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
    };
    let replid = field("master_replid")?.to_owned();
    let offset = field("master_repl_offset")?.parse().ok()?;
    Some((replid, offset))
}

/// The index time of each command of one stream: the least of its arrival, the probe's
/// bound and the bound borrowed from the previous connection, never going back.
pub struct CommandTimes {
    clock: fn() -> i64,
    probe: Option<OffsetProbe>,
    /// The probe's samples taken so far and not yet used, and how many it had published.
    probed: Samples,
    probe_seen: u64,
    borrowed: Option<ExecBounds>,
    /// No time before this: the generation's snapshot time, then the last time given.
    floor: i64,
}

impl CommandTimes {
    pub fn new(clock: fn() -> i64, probe: Option<OffsetProbe>, floor: i64) -> Self {
        Self {
            clock,
            probe,
            probed: Samples::default(),
            probe_seen: 0,
            borrowed: None,
            floor,
        }
    }

    /// A new generation took over at its snapshot time `snapshot_ms`; `borrowed` holds the
    /// previous connection's arrival times of the offsets after its snapshot. Its index
    /// starts again from the snapshot's time: the commands re-read on the new connection
    /// were executed before the old one's last times.
    pub fn switched(&mut self, borrowed: Option<ExecBounds>, snapshot_ms: i64) {
        self.borrowed = borrowed;
        self.floor = snapshot_ms;
    }

    /// The time of the command of history `replid` ending at `end`, read now.
    pub fn command(&mut self, replid: &str, end: u64) -> i64 {
        let mut ms = (self.clock)();
        if let Some(t) = self.probed(replid).and_then(|b| b.take(end)) {
            ms = ms.min(t);
        }
        if let Some(b) = self.borrowed.as_mut() {
            match b.take(end) {
                Some(t) => ms = ms.min(t),
                None => self.borrowed = None,
            }
        }
        self.floor = self.floor.max(ms);
        self.floor
    }

    /// The probe's bounds for history `replid`, with what it published since last asked.
    fn probed(&mut self, replid: &str) -> Option<&mut ExecBounds> {
        let probe = self.probe.as_ref()?;
        probe.take_new(&mut self.probe_seen, &mut self.probed);
        (self.probed.replid == replid).then_some(&mut self.probed.bounds)
    }

    /// The time up to which the stream is known to have held nothing after `end`: now, but
    /// not past a bound of a later command (which may not have been read yet).
    pub fn sealed(&mut self, replid: &str, end: u64) -> i64 {
        let mut ms = (self.clock)();
        if let Some(t) = self.probed(replid).and_then(|b| b.peek_after(end)) {
            ms = ms.min(t);
        }
        if let Some(t) = self.borrowed.as_ref().and_then(|b| b.peek_after(end)) {
            ms = ms.min(t);
        }
        self.floor = self.floor.max(ms);
        self.floor
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bounds_give_each_command_the_first_time_its_offset_was_reached() {
        let mut b = ExecBounds::default();
        for (m, ms) in [
            (110, 1000),
            (120, 1000),
            (120, 1003),
            (130, 1005),
            (150, 1020),
        ] {
            b.record(m, ms);
        }
        // 120 was reached by 1000; a later sample at the same offset adds nothing.
        assert_eq!(b.entries.len(), 3);
        let mut b = b.after(110).unwrap();
        assert_eq!(b.peek_after(120), Some(1005));
        assert_eq!(b.take(115), Some(1000));
        assert_eq!(b.take(130), Some(1005));
        assert_eq!(b.take(140), Some(1020));
        assert_eq!(b.peek_after(150), None);
        assert_eq!(b.take(160), None);
        assert!(b.entries.is_empty());
        let mut none = ExecBounds::default();
        none.record(110, 1000);
        assert!(none.after(110).is_none());
    }

    #[test]
    fn command_times_take_the_least_bound_and_never_go_back() {
        fn clock() -> i64 {
            5000
        }
        let mut old = ExecBounds::default();
        for (m, ms) in [(100, 1000), (130, 1010), (160, 1030)] {
            old.record(m, ms);
        }
        // The old connection's index went on to 1040 before the switch.
        let mut t = CommandTimes::new(clock, None, 1040);
        t.switched(old.after(100), 1005);
        // Re-read commands get the old connection's times, not before the snapshot's.
        assert_eq!(t.command("r", 130), 1010);
        // Nothing after 130 could be claimed past 1030, when 160 had been reached.
        assert_eq!(t.sealed("r", 130), 1030);
        assert_eq!(t.command("r", 160), 1030);
        // Past what the old connection read: the arrival time.
        assert_eq!(t.command("r", 170), 5000);
        let mut t = CommandTimes::new(clock, None, 0);
        let mut early = ExecBounds::default();
        early.record(110, 900);
        t.switched(early.after(100), 1005);
        assert_eq!(t.command("r", 110), 1005);
    }

    #[tokio::test]
    async fn probe_samples_reach_command_times_once_published() {
        fn clock() -> i64 {
            5000
        }
        let shared = Arc::new(Shared::default());
        let publish = |replid: &str, m: u64, ms: i64| {
            let mut s = shared.samples.lock().unwrap();
            if s.replid != replid {
                *s = Samples {
                    replid: replid.to_owned(),
                    bounds: ExecBounds::default(),
                };
            }
            s.bounds.record(m, ms);
            shared.published.fetch_add(1, Ordering::Release);
        };
        let probe = OffsetProbe {
            shared: shared.clone(),
            task: tokio::spawn(async {}),
        };
        let mut t = CommandTimes::new(clock, Some(probe), 0);
        publish("r", 200, 4000);
        publish("r", 300, 4100);
        assert_eq!(t.command("r", 150), 4000);
        assert_eq!(t.command("r", 250), 4100);
        assert_eq!(t.sealed("r", 250), 4100);
        // Taken by the stream, not left with the probe.
        assert!(shared.samples.lock().unwrap().bounds.entries.is_empty());
        publish("r", 400, 4200);
        assert_eq!(t.command("r", 350), 4200);
        // Another history's samples are not this one's: the arrival time.
        assert_eq!(t.command("x", 450), 5000);
        assert!(shared.samples.lock().unwrap().bounds.entries.is_empty());
    }

    #[test]
    fn bounds_are_capped() {
        let mut b = ExecBounds::default();
        for i in 0..(ExecBounds::MAX_ENTRIES as u64 + 10) {
            b.record(i + 1, i as i64);
        }
        assert_eq!(b.entries.len(), ExecBounds::MAX_ENTRIES);
        assert!(b.overflowed);
    }

    #[test]
    fn replication_position_is_read_from_info() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:1\r\nmaster_failover_state:no-failover\r\nmaster_replid:8d2f0c1e\r\nmaster_replid2:0000\r\nmaster_repl_offset:4711\r\nsecond_repl_offset:-1\r\n";
        assert_eq!(
            replication_position(info),
            Some(("8d2f0c1e".to_owned(), 4711))
        );
        assert_eq!(replication_position("role:master\r\n"), None);
    }
}
