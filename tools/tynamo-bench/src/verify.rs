//! `--verify`: values that say which write they came from, and the checks made on them.
//!
//! Every SET writes `<key index>:<version>:` padded with `.` to the value size. Each key has one
//! writer, the connection that owns it (key index mod connections), which numbers its writes to
//! that key 1, 2, 3...; one writer per key makes "newer" a total order without a clock.
//!
//! Checks (linearizability implies each of them):
//! - a read returns a well-formed value of the key asked for, or nil;
//! - a read never returns a version older than the newest one this thread knew, when the read
//!   was sent, to be acknowledged or already read (the "floor", kept per thread: each thread runs
//!   its connections on one executor, so "known before the send" is program order);
//! - at the end, every key reads at least its floor: every acknowledged write is present;
//! - for INCR counters (workload F), the final value is at least the acknowledged count and at
//!   most the number of INCRs sent: a retried INCR applied twice is caught.

use bytes::{BufMut, BytesMut};
use tynamo::resp::frame::{format_i64, Frame};

/// Most keys `--verify` tracks (two u64 per key per thread).
pub const VERIFY_KEYS_MAX: u64 = 16 * 1024 * 1024;
/// Mismatch descriptions kept for the report.
const SAMPLES_MAX: usize = 10;

/// Appends the bulk string of the value for (`key`, `version`), `size` bytes long (longer when
/// the header alone needs more).
pub fn put_value(out: &mut BytesMut, key: u64, version: u64, size: usize) {
    let (mut k, mut v) = ([0u8; 20], [0u8; 20]);
    let k = format_i64(key as i64, &mut k);
    let v = format_i64(version as i64, &mut v);
    let header = k.len() + v.len() + 2;
    let len = size.max(header);
    out.put_u8(b'$');
    let mut n = [0u8; 20];
    out.put_slice(format_i64(len as i64, &mut n));
    out.put_slice(b"\r\n");
    out.put_slice(k);
    out.put_u8(b':');
    out.put_slice(v);
    out.put_u8(b':');
    out.put_bytes(b'.', len - header);
    out.put_slice(b"\r\n");
}

/// (key, version) of a value written by [`put_value`].
pub fn parse_value(value: &[u8]) -> Option<(u64, u64)> {
    let mut parts = value.splitn(3, |&b| b == b':');
    let num = |p: &[u8]| std::str::from_utf8(p).ok()?.parse::<u64>().ok();
    let key = num(parts.next()?)?;
    let version = num(parts.next()?)?;
    let pad = parts.next()?;
    pad.iter().all(|&b| b == b'.').then_some((key, version))
}

/// The per-thread record of what is known to be written.
pub struct Ledger {
    floor: Vec<u64>,
    issued: Vec<u64>,
    counter_floor: Vec<u64>,
    counter_issued: Vec<u64>,
    pub mismatches: u64,
    pub samples: Vec<String>,
}

impl Ledger {
    pub fn new(keys: u64) -> Ledger {
        assert!(keys <= VERIFY_KEYS_MAX);
        let n = keys as usize;
        Ledger {
            floor: vec![0; n],
            issued: vec![0; n],
            counter_floor: vec![0; n],
            counter_issued: vec![0; n],
            mismatches: 0,
            samples: Vec::new(),
        }
    }

    pub fn floor(&self, key: u64) -> u64 {
        self.floor[key as usize]
    }

    /// The next version of `key` (called by its owner only).
    pub fn issue(&mut self, key: u64) -> u64 {
        let v = &mut self.issued[key as usize];
        *v += 1;
        *v
    }

    pub fn issue_incr(&mut self, key: u64) {
        self.counter_issued[key as usize] += 1;
    }

    pub fn mismatch(&mut self, what: String) {
        self.mismatches += 1;
        if self.samples.len() < SAMPLES_MAX {
            self.samples.push(what);
        }
    }

    /// A write of `version` to `key` was acknowledged.
    pub fn acked(&mut self, key: u64, version: u64) {
        let f = &mut self.floor[key as usize];
        *f = (*f).max(version);
    }

    /// Checks a GET reply of `key` sent when its floor was `floor_at_send`.
    pub fn check_read(&mut self, key: u64, floor_at_send: u64, reply: &Frame) {
        let version = match reply {
            Frame::Null => 0,
            Frame::Bulk(value) => match parse_value(value) {
                Some((k, v)) if k == key => v,
                Some((k, _)) => {
                    return self.mismatch(format!("GET key {key} returned the value of key {k}"));
                }
                None => {
                    let shown = String::from_utf8_lossy(&value[..value.len().min(40)]).into_owned();
                    return self.mismatch(format!(
                        "GET key {key} returned a value not written by us: {shown:?}"
                    ));
                }
            },
            other => return self.mismatch(format!("GET key {key} got {other}")),
        };
        if version < floor_at_send {
            self.mismatch(format!(
                "stale read: GET key {key} returned version {version}, but version {floor_at_send} was acknowledged before the read was sent"
            ));
        }
        self.acked(key, version);
    }

    /// Checks an INCR reply of counter `key`.
    pub fn check_incr(&mut self, key: u64, reply: &Frame) {
        match reply {
            Frame::Integer(n) if *n >= 0 && (*n as u64) <= self.counter_issued[key as usize] => {
                let f = &mut self.counter_floor[key as usize];
                *f = (*f).max(*n as u64);
            }
            other => {
                let issued = self.counter_issued[key as usize];
                self.mismatch(format!(
                    "INCR counter {key} returned {other} after {issued} INCRs were sent"
                ))
            }
        }
    }

    /// Keys worth re-reading in the final scan.
    pub fn written_keys(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.floor.len())
            .filter(|&k| self.floor[k] > 0)
            .map(|k| k as u64)
    }

    pub fn counted_keys(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.counter_issued.len())
            .filter(|&k| self.counter_issued[k] > 0)
            .map(|k| k as u64)
    }

    /// Final scan of a counter: at least what was acknowledged, at most what was sent.
    pub fn check_final_counter(&mut self, key: u64, reply: &Frame) {
        let (floor, issued) = (
            self.counter_floor[key as usize],
            self.counter_issued[key as usize],
        );
        let value = match reply {
            Frame::Null => Some(0),
            Frame::Bulk(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse::<u64>().ok()),
            _ => None,
        };
        match value {
            Some(v) if v >= floor && v <= issued => {}
            _ => self.mismatch(format!(
                "final scan: counter {key} reads {reply}, expected between {floor} (acknowledged) and {issued} (sent)"
            )),
        }
    }

    /// Final scan of a key: the newest acknowledged (or observed) version must still be there.
    pub fn check_final(&mut self, key: u64, reply: &Frame) {
        let floor = self.floor(key);
        let before = self.mismatches;
        self.check_read(key, floor, reply);
        if self.mismatches > before {
            if let Some(last) = self.samples.last_mut() {
                last.insert_str(0, "final scan: ");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn value_frame(key: u64, version: u64, size: usize) -> Frame {
        let mut out = BytesMut::new();
        put_value(&mut out, key, version, size);
        let mut buf = out;
        tynamo::resp::frame::decode(&mut buf, &tynamo::resp::Limits::DEFAULT)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn values_round_trip_at_the_requested_size() {
        let f = value_frame(42, 7, 100);
        let Frame::Bulk(b) = &f else { panic!("{f:?}") };
        assert_eq!(b.len(), 100);
        assert_eq!(parse_value(b), Some((42, 7)));
        // Too small a size still carries the header.
        let Frame::Bulk(b) = value_frame(123456, 99, 1) else {
            panic!()
        };
        assert_eq!(&b[..], b"123456:99:");
        assert_eq!(parse_value(b"1:2:..x"), None);
        assert_eq!(parse_value(b"garbage"), None);
    }

    #[test]
    fn stale_and_foreign_reads_are_mismatches() {
        let mut ledger = Ledger::new(10);
        ledger.acked(3, 5);
        ledger.check_read(3, ledger.floor(3), &value_frame(3, 5, 10));
        ledger.check_read(3, ledger.floor(3), &value_frame(3, 6, 10));
        assert_eq!(ledger.mismatches, 0);
        assert_eq!(ledger.floor(3), 6);
        ledger.check_read(3, ledger.floor(3), &value_frame(3, 4, 10));
        ledger.check_read(3, 0, &value_frame(4, 9, 10));
        ledger.check_read(3, 1, &Frame::Null);
        ledger.check_read(3, 0, &Frame::Bulk(Bytes::from_static(b"hello")));
        assert_eq!(ledger.mismatches, 4, "{:?}", ledger.samples);
        assert!(ledger.samples[0].starts_with("stale read"));
    }

    #[test]
    fn double_applied_incr_is_caught() {
        let mut ledger = Ledger::new(4);
        ledger.issue_incr(1);
        ledger.check_incr(1, &Frame::Integer(1));
        assert_eq!(ledger.mismatches, 0);
        ledger.check_final_counter(1, &Frame::Bulk(Bytes::from_static(b"2")));
        assert_eq!(ledger.mismatches, 1);
        ledger.check_final_counter(1, &Frame::Bulk(Bytes::from_static(b"1")));
        assert_eq!(ledger.mismatches, 1);
    }
}
