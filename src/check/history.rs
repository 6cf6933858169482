//! The history format: one JSON object per line, one line per client operation.
//!
//! ```json
//! {"client":3,"op":"append","key":"k1","value":"x","invoke":100,"complete":180,"result":null,"status":"ok"}
//! {"client":4,"op":"get","key":"k1","value":null,"invoke":120,"complete":200,"result":"x","status":"ok"}
//! {"client":5,"op":"put","key":{"hex":"00ff"},"value":"v","invoke":130,"complete":null,"result":null,"status":"timeout"}
//! ```
//!
//! - `client`: a number or a string identifying the client (informational; the checker does not
//!   need it because a client's operations never overlap in time).
//! - `op`: `put` | `append` | `get` | `delete`.
//! - `key`, `value`, `result`: byte strings, losslessly: a JSON string holds the bytes when they
//!   are valid UTF-8; otherwise an object `{"hex": "<lowercase hex>"}`. Readers accept either
//!   form for any bytes. `value` is null for get and delete. For get, `result` is the value read
//!   or null when the key is missing (missing and empty are different values); for writes it is
//!   ignored.
//! - `invoke`, `complete`: integer times in any unit, from one clock (the simulator's). Only
//!   their order matters. `complete` may be null or absent when the status is `timeout`.
//! - `status`: `ok` (completed with `result`), `fail` (definitely not applied: the checker drops
//!   it), `timeout` (unknown: may have been applied, at any time after `invoke`).

use std::fmt;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest accepted line of a history file (a record holds at most a key and two values).
pub const LINE_BYTES_MAX: usize = 64 << 20;

/// Bytes with the lossless JSON representation described in the module comment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct JsonBytes(pub Bytes);

impl JsonBytes {
    pub fn new(bytes: impl Into<Bytes>) -> JsonBytes {
        JsonBytes(bytes.into())
    }
}

impl fmt::Debug for JsonBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "hex:{}", to_hex(&self.0)),
        }
    }
}

impl From<&str> for JsonBytes {
    fn from(s: &str) -> JsonBytes {
        JsonBytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    s.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

impl Serialize for JsonBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(s) => serializer.serialize_str(s),
            Err(_) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("hex", &to_hex(&self.0))?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for JsonBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<JsonBytes, D::Error> {
        struct BytesVisitor;
        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = JsonBytes;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an object {\"hex\": \"...\"}")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<JsonBytes, E> {
                Ok(JsonBytes(Bytes::copy_from_slice(s.as_bytes())))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonBytes, A::Error> {
                let mut bytes = None;
                while let Some(field) = map.next_key::<String>()? {
                    if field != "hex" || bytes.is_some() {
                        return Err(de::Error::custom(format!("unexpected field {field:?}")));
                    }
                    let hex: String = map.next_value()?;
                    let decoded = from_hex(&hex)
                        .ok_or_else(|| de::Error::custom(format!("bad hex string {hex:?}")))?;
                    bytes = Some(decoded);
                }
                bytes
                    .map(|b| JsonBytes(Bytes::from(b)))
                    .ok_or_else(|| de::Error::missing_field("hex"))
            }
        }
        deserializer.deserialize_any(BytesVisitor)
    }
}

/// Who issued an operation: other tools name clients by number or by string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClientId {
    Number(u64),
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Put,
    Append,
    Get,
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Completed; `result` is the answer.
    Ok,
    /// Definitely not applied.
    Fail,
    /// Unknown: possibly applied, at any time after invoke.
    Timeout,
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub client: ClientId,
    pub op: OpKind,
    pub key: JsonBytes,
    #[serde(default)]
    pub value: Option<JsonBytes>,
    pub invoke: u64,
    #[serde(default)]
    pub complete: Option<u64>,
    #[serde(default)]
    pub result: Option<JsonBytes>,
    pub status: Status,
}

impl Record {
    /// Checks what the format requires beyond parsing.
    pub fn validate(&self) -> Result<(), String> {
        match self.op {
            OpKind::Put | OpKind::Append if self.value.is_none() => {
                return Err(format!("{:?} without a value", self.op))
            }
            _ => {}
        }
        if self.status != Status::Timeout {
            match self.complete {
                None => return Err(format!("status {:?} without a complete time", self.status)),
                Some(complete) if complete < self.invoke => {
                    return Err(format!(
                        "complete time {complete} before invoke time {}",
                        self.invoke
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, Error)]
pub enum HistoryError {
    #[error("history line {line}: {message}")]
    Parse { line: u64, message: String },
    #[error("history line {line}: longer than {LINE_BYTES_MAX} bytes")]
    LineTooLong { line: u64 },
    #[error("history I/O at line {line}: {source}")]
    Io {
        line: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<HistoryError>,
    },
    #[error("{}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a whole history (JSON lines; blank lines are skipped), validating every record.
pub fn read_history(reader: impl BufRead) -> Result<Vec<Record>, HistoryError> {
    let mut reader = reader;
    let mut records = Vec::new();
    let mut buf = Vec::new();
    let mut line: u64 = 0;
    loop {
        line += 1;
        buf.clear();
        let limit = LINE_BYTES_MAX as u64 + 1;
        let read = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(|source| HistoryError::Io { line, source })?;
        if read == 0 {
            return Ok(records);
        }
        if buf.len() > LINE_BYTES_MAX {
            return Err(HistoryError::LineTooLong { line });
        }
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let record: Record = serde_json::from_slice(&buf).map_err(|e| HistoryError::Parse {
            line,
            message: e.to_string(),
        })?;
        record
            .validate()
            .map_err(|message| HistoryError::Parse { line, message })?;
        records.push(record);
    }
}

/// Builds a history as operations are invoked and complete (for a workload driver): every
/// operation still pending at [`finish`](Recorder::finish) is recorded as timed out.
#[derive(Debug, Default)]
pub struct Recorder {
    pending: std::collections::BTreeMap<u64, Record>,
    next_id: u64,
    records: Vec<Record>,
}

/// Names one pending operation of a [`Recorder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(u64);

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// An operation starts at `time`. `value` is the value of a put or append.
    pub fn invoke(
        &mut self,
        client: ClientId,
        op: OpKind,
        key: impl Into<Bytes>,
        value: Option<Bytes>,
        time: u64,
    ) -> OpId {
        let id = OpId(self.next_id);
        self.next_id += 1;
        let record = Record {
            client,
            op,
            key: JsonBytes(key.into()),
            value: value.map(JsonBytes),
            invoke: time,
            complete: None,
            result: None,
            status: Status::Timeout,
        };
        self.pending.insert(id.0, record);
        id
    }

    /// The operation completed at `time`; `result` is what a get returned (None: missing).
    /// Returns false if `id` is not pending (already completed or failed).
    pub fn complete(&mut self, id: OpId, time: u64, result: Option<Bytes>) -> bool {
        self.end(id, time, result, Status::Ok)
    }

    /// The operation definitely did not take effect (e.g. refused before being proposed).
    pub fn fail(&mut self, id: OpId, time: u64) -> bool {
        self.end(id, time, None, Status::Fail)
    }

    fn end(&mut self, id: OpId, time: u64, result: Option<Bytes>, status: Status) -> bool {
        let Some(mut record) = self.pending.remove(&id.0) else {
            return false;
        };
        record.complete = Some(time.max(record.invoke));
        record.result = result.map(JsonBytes);
        record.status = status;
        self.records.push(record);
        true
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// The history, in invoke order; operations still pending are timed out.
    pub fn finish(mut self) -> Vec<Record> {
        self.records.extend(self.pending.into_values());
        self.records.sort_by_key(|r| r.invoke);
        self.records
    }
}

/// Reads a history file.
pub fn read_history_file(path: &Path) -> Result<Vec<Record>, HistoryError> {
    let file = std::fs::File::open(path).map_err(|source| HistoryError::File {
        path: path.to_path_buf(),
        source: Box::new(HistoryError::Io { line: 0, source }),
    })?;
    read_history(std::io::BufReader::new(file)).map_err(|e| HistoryError::File {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// Reads every `*.jsonl` file of a directory (the simulator's `--history-out DIR`, e.g. one
/// file per client or per run), in file name order, as one history. The files must share one
/// clock.
pub fn read_history_dir(dir: &Path) -> Result<Vec<Record>, HistoryError> {
    let dir_error = |source| HistoryError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let path = entry.map_err(dir_error)?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "jsonl") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut records = Vec::new();
    for path in paths {
        records.extend(read_history_file(&path)?);
    }
    Ok(records)
}

/// Writes records as JSON lines, one per `write` call; flush (or drop the inner writer) at the
/// end.
pub struct HistoryWriter<W: Write> {
    inner: W,
}

impl<W: Write> HistoryWriter<W> {
    pub fn new(inner: W) -> Self {
        HistoryWriter { inner }
    }

    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.inner, record)?;
        self.inner.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Writes a whole history.
pub fn write_history(writer: impl Write, records: &[Record]) -> std::io::Result<()> {
    let mut w = HistoryWriter::new(writer);
    for record in records {
        w.write(record)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_as_string_or_hex() {
        for bytes in [&b"plain"[..], b"", &[0xff, 0x00, 0x10], "é".as_bytes()] {
            let j = JsonBytes(Bytes::copy_from_slice(bytes));
            let text = serde_json::to_string(&j).unwrap();
            let back: JsonBytes = serde_json::from_str(&text).unwrap();
            assert_eq!(back, j, "{text}");
        }
        assert_eq!(
            serde_json::to_string(&JsonBytes::new(vec![0xffu8, 0x01])).unwrap(),
            r#"{"hex":"ff01"}"#
        );
        // Any bytes may also be written as hex.
        let j: JsonBytes = serde_json::from_str(r#"{"hex":"6869"}"#).unwrap();
        assert_eq!(j, JsonBytes::from("hi"));
        assert!(serde_json::from_str::<JsonBytes>(r#"{"hex":"6"}"#).is_err());
        assert!(serde_json::from_str::<JsonBytes>(r#"{"b64":"aGk="}"#).is_err());
    }

    #[test]
    fn history_round_trips_and_reports_the_bad_line() {
        let text = r#"{"client":1,"op":"put","key":"k","value":"v","invoke":1,"complete":2,"result":null,"status":"ok"}

{"client":"c2","op":"get","key":"k","invoke":3,"complete":4,"result":"v","status":"ok"}
{"client":3,"op":"append","key":{"hex":"ff"},"value":"x","invoke":5,"status":"timeout"}
"#;
        let records = read_history(text.as_bytes()).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[1].client, ClientId::Name("c2".into()));
        assert_eq!(records[2].complete, None);
        let mut out = Vec::new();
        write_history(&mut out, &records).unwrap();
        assert_eq!(read_history(&out[..]).unwrap(), records);

        let bad = "{\"client\":1,\"op\":\"get\",\"key\":\"k\",\"invoke\":1,\"complete\":2,\"status\":\"ok\"}\n{\"client\":1,\"op\":\"frob\"}\n";
        match read_history(bad.as_bytes()) {
            Err(HistoryError::Parse { line: 2, .. }) => {}
            other => panic!("expected a parse error on line 2, got {other:?}"),
        }
        let backwards =
            r#"{"client":1,"op":"get","key":"k","invoke":5,"complete":2,"status":"ok"}"#;
        assert!(read_history(backwards.as_bytes()).is_err());
    }

    #[test]
    fn a_directory_of_histories_reads_as_one_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let line = |client: u64, t: u64| {
            format!(
                r#"{{"client":{client},"op":"put","key":"k","value":"v","invoke":{t},"complete":{},"status":"ok"}}"#,
                t + 1
            ) + "\n"
        };
        std::fs::write(dir.path().join("b.jsonl"), line(2, 10)).unwrap();
        std::fs::write(dir.path().join("a.jsonl"), line(1, 0) + &line(1, 5)).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a history").unwrap();
        let records = read_history_dir(dir.path()).unwrap();
        let invokes: Vec<u64> = records.iter().map(|r| r.invoke).collect();
        assert_eq!(invokes, vec![0, 5, 10]);
        std::fs::write(dir.path().join("c.jsonl"), "{oops\n").unwrap();
        let error = read_history_dir(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("c.jsonl") && error.contains("line 1"),
            "{error}"
        );
    }

    #[test]
    fn the_recorder_times_out_what_never_completed() {
        let mut recorder = Recorder::new();
        let put = recorder.invoke(
            ClientId::Number(1),
            OpKind::Put,
            "k",
            Some(Bytes::from("v")),
            10,
        );
        let get = recorder.invoke(ClientId::Number(2), OpKind::Get, "k", None, 5);
        let _lost = recorder.invoke(
            ClientId::Number(3),
            OpKind::Append,
            "k",
            Some(Bytes::from("x")),
            7,
        );
        let refused = recorder.invoke(ClientId::Number(4), OpKind::Delete, "k", None, 8);
        assert!(recorder.complete(put, 12, None));
        assert!(recorder.complete(get, 13, Some(Bytes::from("v"))));
        assert!(!recorder.complete(get, 14, None), "completed twice");
        assert!(recorder.fail(refused, 9));
        assert_eq!(recorder.pending_count(), 1);
        let records = recorder.finish();
        let summary: Vec<(u64, Status)> = records.iter().map(|r| (r.invoke, r.status)).collect();
        assert_eq!(
            summary,
            [
                (5, Status::Ok),
                (7, Status::Timeout),
                (8, Status::Fail),
                (10, Status::Ok)
            ]
        );
        assert_eq!(records[0].result, Some(JsonBytes::from("v")));
        assert_eq!(records[1].complete, None);

        for r in &records {
            r.validate().unwrap();
        }
    }
}
