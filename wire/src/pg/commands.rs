//! Replication commands and the rows they return (PostgreSQL docs, "Streaming Replication
//! Protocol"; `src/backend/replication/walsender.c`: `IdentifySystem`, `ReadReplicationSlot`,
//! `SendTimeLineHistory`, `StartReplication`'s end-of-timeline result;
//! `src/backend/backup/basebackup.c` `SendXlogRecPtrResult`, `SendTablespaceList`).
//!
//! Rows arrive in text format; each decoder takes the row's values as `Option<&[u8]>` (NULL
//! is `None`) and checks the column count, so a server change shows as a clear error.

use std::fmt;

use bytes::Bytes;

use super::{Lsn, PgWireError, TimelineId};

type Row<'a> = [Option<&'a [u8]>];

fn text<'a>(
    command: &'static str,
    row: &Row<'a>,
    idx: usize,
    column: &str,
) -> Result<Option<&'a str>, PgWireError> {
    match row.get(idx) {
        None => Err(PgWireError::BadRow {
            command,
            reason: format!("missing column {column}"),
        }),
        Some(None) => Ok(None),
        Some(Some(v)) => std::str::from_utf8(v)
            .map(Some)
            .map_err(|_| PgWireError::BadRow {
                command,
                reason: format!("column {column} is not UTF-8"),
            }),
    }
}

fn required<'a>(
    command: &'static str,
    row: &Row<'a>,
    idx: usize,
    column: &str,
) -> Result<&'a str, PgWireError> {
    text(command, row, idx, column)?.ok_or_else(|| PgWireError::BadRow {
        command,
        reason: format!("column {column} is NULL"),
    })
}

fn columns(command: &'static str, row: &Row<'_>, expected: usize) -> Result<(), PgWireError> {
    if row.len() != expected {
        return Err(PgWireError::BadRow {
            command,
            reason: format!("expected {expected} columns, got {}", row.len()),
        });
    }
    Ok(())
}

fn lsn(command: &'static str, value: &str, column: &str) -> Result<Lsn, PgWireError> {
    Lsn::parse(value).map_err(|_| PgWireError::BadRow {
        command,
        reason: format!("column {column} {value:?} is not an LSN"),
    })
}

fn timeline(command: &'static str, value: &str, column: &str) -> Result<TimelineId, PgWireError> {
    value
        .parse::<u64>()
        .ok()
        .and_then(|v| TimelineId::from_u64(v).ok())
        .ok_or_else(|| PgWireError::BadRow {
            command,
            reason: format!("column {column} {value:?} is not a timeline"),
        })
}

/// `IDENTIFY_SYSTEM`: which cluster this is and where its WAL ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifySystem {
    /// The cluster's unique `system_identifier`; a repository belongs to exactly one.
    pub system_id: u64,
    /// The server's current timeline.
    pub timeline: TimelineId,
    /// The current WAL flush location.
    pub xlogpos: Lsn,
    /// The database of a `replication=database` connection; `None` for physical.
    pub dbname: Option<String>,
}

impl IdentifySystem {
    const CMD: &'static str = "IDENTIFY_SYSTEM";

    /// Decodes the single result row.
    pub fn from_row(row: &Row<'_>) -> Result<IdentifySystem, PgWireError> {
        columns(Self::CMD, row, 4)?;
        let sys = required(Self::CMD, row, 0, "systemid")?;
        let system_id = sys.parse().map_err(|_| PgWireError::BadRow {
            command: Self::CMD,
            reason: format!("systemid {sys:?} is not a 64-bit number"),
        })?;
        Ok(IdentifySystem {
            system_id,
            timeline: timeline(
                Self::CMD,
                required(Self::CMD, row, 1, "timeline")?,
                "timeline",
            )?,
            xlogpos: lsn(
                Self::CMD,
                required(Self::CMD, row, 2, "xlogpos")?,
                "xlogpos",
            )?,
            dbname: text(Self::CMD, row, 3, "dbname")?.map(str::to_string),
        })
    }
}

/// `READ_REPLICATION_SLOT` (PostgreSQL 15+): a physical slot's restart position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationSlotPosition {
    /// `physical` or `logical`.
    pub slot_type: String,
    /// Oldest WAL the slot retains; `None` if it never reserved WAL.
    pub restart_lsn: Option<Lsn>,
    /// Timeline of `restart_lsn`.
    pub restart_tli: Option<TimelineId>,
}

impl ReplicationSlotPosition {
    const CMD: &'static str = "READ_REPLICATION_SLOT";

    /// Decodes the single row; `Ok(None)` when the slot does not exist (all columns NULL).
    pub fn from_row(row: &Row<'_>) -> Result<Option<ReplicationSlotPosition>, PgWireError> {
        columns(Self::CMD, row, 3)?;
        let Some(slot_type) = text(Self::CMD, row, 0, "slot_type")? else {
            return Ok(None);
        };
        let restart_lsn = text(Self::CMD, row, 1, "restart_lsn")?
            .map(|v| lsn(Self::CMD, v, "restart_lsn"))
            .transpose()?
            .filter(|l| l.is_valid());
        let restart_tli = text(Self::CMD, row, 2, "restart_tli")?
            .map(|v| timeline(Self::CMD, v, "restart_tli"))
            .transpose()?;
        Ok(Some(ReplicationSlotPosition {
            slot_type: slot_type.to_string(),
            restart_lsn,
            restart_tli,
        }))
    }
}

/// `TIMELINE_HISTORY n`: the history file of timeline n, to archive verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistoryFile {
    /// `0000000N.history`, checked against the timeline asked for.
    pub file_name: String,
    /// The raw file content (the server sends it unescaped).
    pub content: Bytes,
}

impl TimelineHistoryFile {
    const CMD: &'static str = "TIMELINE_HISTORY";

    /// Decodes the single row and checks it is the file of `asked`.
    pub fn from_row(row: &Row<'_>, asked: TimelineId) -> Result<TimelineHistoryFile, PgWireError> {
        columns(Self::CMD, row, 2)?;
        let file_name = required(Self::CMD, row, 0, "filename")?;
        if file_name != asked.history_file_name() {
            return Err(PgWireError::BadRow {
                command: Self::CMD,
                reason: format!("asked for timeline {asked}, got file {file_name:?}"),
            });
        }
        let content = row
            .get(1)
            .copied()
            .flatten()
            .ok_or_else(|| PgWireError::BadRow {
                command: Self::CMD,
                reason: "column content is NULL".into(),
            })?;
        if content.len() > super::TimelineHistory::MAX_LEN {
            return Err(PgWireError::TooLarge {
                what: "timeline history file",
                announced: content.len() as u64,
                limit: super::TimelineHistory::MAX_LEN as u64,
            });
        }
        Ok(TimelineHistoryFile {
            file_name: file_name.to_string(),
            content: Bytes::copy_from_slice(content),
        })
    }
}

/// The result set after CopyDone when the streamed timeline ended: where the next begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndOfTimeline {
    /// The timeline that follows.
    pub next_tli: TimelineId,
    /// Where it forks off the old one (may be inside a segment).
    pub next_tli_startpos: Lsn,
}

impl EndOfTimeline {
    const CMD: &'static str = "end-of-timeline";

    /// Decodes the single row `next_tli, next_tli_startpos`.
    pub fn from_row(row: &Row<'_>) -> Result<EndOfTimeline, PgWireError> {
        columns(Self::CMD, row, 2)?;
        Ok(EndOfTimeline {
            next_tli: timeline(
                Self::CMD,
                required(Self::CMD, row, 0, "next_tli")?,
                "next_tli",
            )?,
            next_tli_startpos: lsn(
                Self::CMD,
                required(Self::CMD, row, 1, "next_tli_startpos")?,
                "next_tli_startpos",
            )?,
        })
    }
}

/// `CREATE_REPLICATION_SLOT … PHYSICAL RESERVE_WAL`: the new slot's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot name echoed back.
    pub slot_name: String,
    /// Where WAL reservation starts (`None` on servers that return NULL for physical slots).
    pub consistent_point: Option<Lsn>,
}

impl CreatedSlot {
    const CMD: &'static str = "CREATE_REPLICATION_SLOT";

    /// Decodes the row `slot_name, consistent_point, snapshot_name, output_plugin`.
    pub fn from_row(row: &Row<'_>) -> Result<CreatedSlot, PgWireError> {
        columns(Self::CMD, row, 4)?;
        Ok(CreatedSlot {
            slot_name: required(Self::CMD, row, 0, "slot_name")?.to_string(),
            consistent_point: text(Self::CMD, row, 1, "consistent_point")?
                .map(|v| lsn(Self::CMD, v, "consistent_point"))
                .transpose()?,
        })
    }
}

/// A `BASE_BACKUP` start or end position row: `recptr, tli`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupPosition {
    /// Start (or stop) LSN of the backup.
    pub lsn: Lsn,
    /// Its timeline.
    pub timeline: TimelineId,
}

impl BackupPosition {
    const CMD: &'static str = "BASE_BACKUP";

    /// Decodes the row.
    pub fn from_row(row: &Row<'_>) -> Result<BackupPosition, PgWireError> {
        columns(Self::CMD, row, 2)?;
        Ok(BackupPosition {
            lsn: lsn(Self::CMD, required(Self::CMD, row, 0, "recptr")?, "recptr")?,
            timeline: timeline(Self::CMD, required(Self::CMD, row, 1, "tli")?, "tli")?,
        })
    }
}

/// One row of `BASE_BACKUP`'s tablespace list: `spcoid, spclocation, size` (NULL oid and
/// location for the main data directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceRow {
    /// Tablespace OID; `None` for the data directory.
    pub oid: Option<u32>,
    /// Path on the server; `None` for the data directory.
    pub location: Option<String>,
    /// Estimated size in KiB when `PROGRESS` was asked for.
    pub size_kb: Option<u64>,
}

impl TablespaceRow {
    const CMD: &'static str = "BASE_BACKUP tablespaces";

    /// Decodes the row.
    pub fn from_row(row: &Row<'_>) -> Result<TablespaceRow, PgWireError> {
        columns(Self::CMD, row, 3)?;
        let num = |idx, column: &str| -> Result<Option<u64>, PgWireError> {
            text(Self::CMD, row, idx, column)?
                .map(|v| {
                    v.parse::<u64>().map_err(|_| PgWireError::BadRow {
                        command: Self::CMD,
                        reason: format!("column {column} {v:?} is not a number"),
                    })
                })
                .transpose()
        };
        let oid = num(0, "spcoid")?
            .map(|v| {
                u32::try_from(v).map_err(|_| PgWireError::BadRow {
                    command: Self::CMD,
                    reason: format!("spcoid {v} is not an OID"),
                })
            })
            .transpose()?;
        Ok(TablespaceRow {
            oid,
            location: text(Self::CMD, row, 1, "spclocation")?.map(str::to_string),
            size_kb: num(2, "size")?,
        })
    }
}

/// A replication slot name as PostgreSQL accepts it (`ReplicationSlotValidateName`): 1–63
/// characters of `a-z`, `0-9`, `_`. Validated so it can be put in a command unquoted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SlotName(String);

impl SlotName {
    /// Validates a slot name.
    pub fn new(name: &str) -> Result<SlotName, PgWireError> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(SlotName(name.to_string()))
        } else {
            Err(PgWireError::InvalidFileName {
                name: name.chars().take(80).collect(),
                reason: "a replication slot name is 1-63 characters of a-z, 0-9 and _",
            })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `START_REPLICATION SLOT s PHYSICAL X/Y TIMELINE n`.
pub fn start_replication(slot: Option<&SlotName>, start: Lsn, timeline: TimelineId) -> String {
    match slot {
        Some(s) => format!("START_REPLICATION SLOT {s} PHYSICAL {start} TIMELINE {timeline}"),
        None => format!("START_REPLICATION PHYSICAL {start} TIMELINE {timeline}"),
    }
}

/// `CREATE_REPLICATION_SLOT s PHYSICAL RESERVE_WAL` (the pre-15 syntax, still accepted).
pub fn create_physical_slot(slot: &SlotName) -> String {
    format!("CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row<'a>(vals: &[Option<&'a str>]) -> Vec<Option<&'a [u8]>> {
        vals.iter().map(|v| v.map(str::as_bytes)).collect()
    }

    #[test]
    fn identify_system() {
        let r = row(&[
            Some("7301234567890123456"),
            Some("1"),
            Some("0/1A2B3C0"),
            None,
        ]);
        let id = IdentifySystem::from_row(&r).unwrap();
        assert_eq!(id.system_id, 7301234567890123456);
        assert_eq!(id.timeline.get(), 1);
        assert_eq!(id.xlogpos, Lsn(0x1A2B3C0));
        assert_eq!(id.dbname, None);
        let e =
            IdentifySystem::from_row(&row(&[Some("x"), Some("1"), Some("0/0"), None])).unwrap_err();
        assert!(e.to_string().contains("systemid"), "{e}");
        assert!(
            IdentifySystem::from_row(&row(&[Some("1"), Some("0"), Some("0/0"), None])).is_err()
        );
        assert!(IdentifySystem::from_row(&row(&[Some("1")])).is_err());
    }

    #[test]
    fn read_replication_slot() {
        assert_eq!(
            ReplicationSlotPosition::from_row(&row(&[None, None, None])).unwrap(),
            None
        );
        let p = ReplicationSlotPosition::from_row(&row(&[
            Some("physical"),
            Some("0/3000000"),
            Some("1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(p.restart_lsn, Some(Lsn(0x3000000)));
        assert_eq!(p.restart_tli.unwrap().get(), 1);
        let p = ReplicationSlotPosition::from_row(&row(&[Some("physical"), None, None]))
            .unwrap()
            .unwrap();
        assert_eq!(p.restart_lsn, None);
    }

    #[test]
    fn timeline_history_and_end_of_timeline() {
        let tli2 = TimelineId::new(2).unwrap();
        let r = vec![
            Some(&b"00000002.history"[..]),
            Some(&b"1\t0/3000000\tno recovery target specified\n"[..]),
        ];
        let f = TimelineHistoryFile::from_row(&r, tli2).unwrap();
        assert!(f.content.starts_with(b"1\t"));
        assert!(TimelineHistoryFile::from_row(&r, TimelineId::new(3).unwrap()).is_err());
        let e = EndOfTimeline::from_row(&row(&[Some("2"), Some("0/3000A0")])).unwrap();
        assert_eq!(e.next_tli, tli2);
        assert_eq!(e.next_tli_startpos, Lsn(0x3000A0));
    }

    #[test]
    fn backup_rows() {
        let p = BackupPosition::from_row(&row(&[Some("0/2000028"), Some("1")])).unwrap();
        assert_eq!(p.lsn, Lsn(0x2000028));
        let t = TablespaceRow::from_row(&row(&[None, None, Some("30000")])).unwrap();
        assert_eq!(
            t,
            TablespaceRow {
                oid: None,
                location: None,
                size_kb: Some(30000)
            }
        );
        let t = TablespaceRow::from_row(&row(&[Some("16385"), Some("/srv/ts"), None])).unwrap();
        assert_eq!(t.oid, Some(16385));
        assert!(TablespaceRow::from_row(&row(&[Some("-1"), None, None])).is_err());
        let c = CreatedSlot::from_row(&row(&[Some("syncbridge"), Some("0/1000000"), None, None]))
            .unwrap();
        assert_eq!(c.consistent_point, Some(Lsn(0x1000000)));
    }

    #[test]
    fn slot_names_and_commands() {
        let s = SlotName::new("syncbridge_1").unwrap();
        assert!(SlotName::new("Bad").is_err());
        assert!(SlotName::new("a; DROP").is_err());
        assert!(SlotName::new("").is_err());
        assert!(SlotName::new(&"a".repeat(64)).is_err());
        assert_eq!(
            start_replication(Some(&s), Lsn(0x3000000), TimelineId::FIRST),
            "START_REPLICATION SLOT syncbridge_1 PHYSICAL 0/3000000 TIMELINE 1"
        );
        assert_eq!(
            create_physical_slot(&s),
            "CREATE_REPLICATION_SLOT syncbridge_1 PHYSICAL RESERVE_WAL"
        );
    }
}
