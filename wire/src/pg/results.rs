//! Result sets of simple queries, collected sans-IO under one byte cap.
//!
//! A simple query (protocol docs, "Message Flow: Simple Query") answers with, per
//! statement, `RowDescription` ('T'), `DataRow`s ('D') and `CommandComplete` ('C'), or
//! `EmptyQueryResponse` ('I'); message formats in "Message Formats" and
//! `src/backend/access/common/printtup.c`. Replication commands answer the same way, and
//! `BASE_BACKUP` interleaves such result sets with CopyOut streams. The connection feeds
//! every one of these frames to one [`ResultCollector`], which owns the cap on what a
//! server can make us buffer, whatever the command.

use bytes::Bytes;

use super::PgWireError;

/// The default cap on the bytes of all result sets of one query (replication command
/// results are tiny; this only bounds a hostile or confused server).
pub const DEFAULT_MAX_RESULT_BYTES: usize = 256 * 1024 * 1024;

/// One result set of a simple query, values in text format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows; `None` is SQL NULL.
    pub rows: Vec<Vec<Option<Bytes>>>,
    /// The CommandComplete tag.
    pub tag: String,
}

impl QueryResult {
    /// A row as the borrowed slice the [`super::commands`] decoders take.
    pub fn row(&self, idx: usize) -> Option<Vec<Option<&[u8]>>> {
        self.rows
            .get(idx)
            .map(|r| r.iter().map(|v| v.as_deref()).collect())
    }

    /// The single text value of a one-row, one-column result (e.g. `SHOW`).
    pub fn single_text(&self) -> Result<String, PgWireError> {
        let v = self
            .rows
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_ref())
            .ok_or_else(|| PgWireError::BadRow {
                command: "query",
                reason: "expected one value, got none".into(),
            })?;
        Ok(String::from_utf8_lossy(v).into_owned())
    }
}

/// Collects the result sets of one query from the frames the connection receives.
#[derive(Debug)]
pub struct ResultCollector {
    results: Vec<QueryResult>,
    current: Option<QueryResult>,
    bytes: usize,
    max_bytes: usize,
}

impl ResultCollector {
    /// A collector that refuses more than `max_bytes` of message bodies in total.
    pub fn new(max_bytes: usize) -> ResultCollector {
        ResultCollector {
            results: Vec::new(),
            current: None,
            bytes: 0,
            max_bytes,
        }
    }

    /// Whether a backend message with this type byte belongs to a result set (and must be
    /// given to [`feed`](Self::feed)).
    pub fn takes(tag: u8) -> bool {
        matches!(tag, b'T' | b'D' | b'C' | b'I')
    }

    /// Takes one message: its type byte and its body (after the length).
    pub fn feed(&mut self, tag: u8, body: Bytes) -> Result<(), PgWireError> {
        self.bytes = self.bytes.saturating_add(body.len());
        if self.bytes > self.max_bytes {
            return Err(PgWireError::TooLarge {
                what: "query result",
                announced: self.bytes as u64,
                limit: self.max_bytes as u64,
            });
        }
        match tag {
            b'T' => {
                self.current = Some(QueryResult {
                    columns: parse_row_description(&body)?,
                    ..QueryResult::default()
                });
            }
            b'D' => {
                let r = self.current.as_mut().ok_or(PgWireError::BadRow {
                    command: "query",
                    reason: "DataRow without RowDescription".into(),
                })?;
                let row = parse_data_row(&body)?;
                if row.len() != r.columns.len() {
                    return Err(PgWireError::BadRow {
                        command: "query",
                        reason: format!(
                            "DataRow of {} values for {} columns",
                            row.len(),
                            r.columns.len()
                        ),
                    });
                }
                r.rows.push(row);
            }
            b'C' => {
                let mut r = self.current.take().unwrap_or_default();
                r.tag = cstring(&body, 0, "CommandComplete")?.0;
                self.results.push(r);
            }
            b'I' => {}
            other => {
                return Err(PgWireError::UnknownMessage {
                    context: "query result",
                    tag: other as char,
                })
            }
        }
        Ok(())
    }

    /// The complete result sets so far (a set without its CommandComplete is left out).
    pub fn finish(self) -> Vec<QueryResult> {
        self.results
    }
}

fn need(message: &'static str, body: &[u8], at: usize, n: usize) -> Result<(), PgWireError> {
    if body.len() < at.saturating_add(n) {
        return Err(PgWireError::Truncated {
            message,
            needed: at.saturating_add(n),
            have: body.len(),
        });
    }
    Ok(())
}

fn int16(message: &'static str, body: &[u8], at: usize) -> Result<i16, PgWireError> {
    need(message, body, at, 2)?;
    Ok(i16::from_be_bytes([body[at], body[at + 1]]))
}

/// A NUL-terminated UTF-8 string at `at`, and the offset after its NUL.
fn cstring(body: &[u8], at: usize, message: &'static str) -> Result<(String, usize), PgWireError> {
    let rest = body.get(at..).unwrap_or_default();
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(PgWireError::BadString {
            message,
            reason: "string without NUL terminator",
        })?;
    let s = std::str::from_utf8(&rest[..nul]).map_err(|_| PgWireError::BadString {
        message,
        reason: "string is not UTF-8",
    })?;
    Ok((s.to_owned(), at + nul + 1))
}

/// `Int16 count`, then per field: `String name, Int32 table, Int16 column, Int32 type,
/// Int16 size, Int32 modifier, Int16 format`.
fn parse_row_description(body: &[u8]) -> Result<Vec<String>, PgWireError> {
    const M: &str = "RowDescription";
    let count = int16(M, body, 0)?;
    let count = usize::try_from(count).map_err(|_| PgWireError::BadRow {
        command: "query",
        reason: format!("RowDescription of {count} columns"),
    })?;
    let mut at = 2;
    // Each field takes at least 19 bytes, so `count` cannot make us reserve much.
    let mut columns = Vec::with_capacity(count.min(body.len() / 19));
    for _ in 0..count {
        let (name, next) = cstring(body, at, M)?;
        need(M, body, next, 18)?;
        columns.push(name);
        at = next + 18;
    }
    if at != body.len() {
        return Err(PgWireError::TrailingBytes {
            message: M,
            extra: body.len() - at,
        });
    }
    Ok(columns)
}

/// `Int16 count`, then per value `Int32 length` (-1: NULL) and that many bytes.
fn parse_data_row(body: &Bytes) -> Result<Vec<Option<Bytes>>, PgWireError> {
    const M: &str = "DataRow";
    let count = int16(M, body, 0)?;
    let count = usize::try_from(count).map_err(|_| PgWireError::BadRow {
        command: "query",
        reason: format!("DataRow of {count} values"),
    })?;
    let mut at = 2;
    let mut row = Vec::with_capacity(count.min(body.len() / 4));
    for _ in 0..count {
        need(M, body, at, 4)?;
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len == -1 {
            row.push(None);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| PgWireError::BadRow {
            command: "query",
            reason: format!("DataRow value of length {len}"),
        })?;
        need(M, body, at, len)?;
        row.push(Some(body.slice(at..at + len)));
        at += len;
    }
    if at != body.len() {
        return Err(PgWireError::TrailingBytes {
            message: M,
            extra: body.len() - at,
        });
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row_description(names: &[&str]) -> Bytes {
        let mut b = (names.len() as i16).to_be_bytes().to_vec();
        for n in names {
            b.extend_from_slice(n.as_bytes());
            b.push(0);
            b.extend_from_slice(&[0; 18]);
        }
        Bytes::from(b)
    }

    fn data_row(values: &[Option<&[u8]>]) -> Bytes {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        Bytes::from(b)
    }

    #[test]
    fn collects_result_sets_with_nulls_and_tags() {
        let mut c = ResultCollector::new(DEFAULT_MAX_RESULT_BYTES);
        c.feed(b'T', row_description(&["systemid", "timeline"]))
            .unwrap();
        c.feed(b'D', data_row(&[Some(b"7300"), None])).unwrap();
        c.feed(b'C', Bytes::from_static(b"IDENTIFY_SYSTEM\0"))
            .unwrap();
        c.feed(b'I', Bytes::new()).unwrap();
        c.feed(b'C', Bytes::from_static(b"SET\0")).unwrap();
        let r = c.finish();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].columns, ["systemid", "timeline"]);
        assert_eq!(r[0].row(0).unwrap(), vec![Some(&b"7300"[..]), None]);
        assert_eq!(r[0].tag, "IDENTIFY_SYSTEM");
        assert_eq!(r[0].single_text().unwrap(), "7300");
        assert_eq!((r[1].tag.as_str(), r[1].rows.len()), ("SET", 0));
        assert!(r[1].single_text().is_err());
    }

    #[test]
    fn the_cap_covers_every_message_of_every_result_set() {
        let mut c = ResultCollector::new(100);
        c.feed(b'T', row_description(&["a"])).unwrap();
        let mut fed = 0;
        let err = loop {
            match c.feed(b'D', data_row(&[Some(&[7u8; 10][..])])) {
                Ok(()) => fed += 1,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, PgWireError::TooLarge { limit: 100, .. }),
            "{err}"
        );
        assert!(fed < 7, "{fed} rows of 16 bytes under a 100-byte cap");
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut c = ResultCollector::new(1 << 20);
        assert!(c.feed(b'D', data_row(&[None])).is_err(), "row first");
        c.feed(b'T', row_description(&["a"])).unwrap();
        for bad in [
            &b""[..],
            &[0, 1][..],
            &[0, 1, 0, 0, 0, 9, b'x'][..],
            &[0, 1, 0x80, 0, 0, 0][..],
            &[0, 1, 0xff, 0xff, 0xff, 0xff, 0][..],
            &[0xff, 0xff][..],
        ] {
            assert!(
                c.feed(b'D', Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(c.feed(b'D', data_row(&[None, None])).is_err(), "2 values");
        assert!(c.feed(b'T', Bytes::from_static(&[0, 1, b'a'])).is_err());
        assert!(c.feed(b'T', Bytes::from_static(&[0, 1, b'a', 0])).is_err());
        assert!(c.feed(b'C', Bytes::from_static(b"no nul")).is_err());
        assert!(c.feed(b'Z', Bytes::from_static(b"I")).is_err());
    }
}
