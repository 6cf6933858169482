//! Client sessions: exactly-once application of retried writes.
//!
//! A client opens a session with a random, never reused 64-bit id (`OpenSession`, itself a log
//! entry), then numbers its writes 1, 2, 3, .... The session remembers, per client, the results
//! of its most recent writes (a window of `session_results_max`, so a client may pipeline that
//! many writes) and a `seq_floor`: the invariant is
//!
//! > every write of this client with `seq >= seq_floor` that was applied is in `results`.
//!
//! So for a write `(client, seq)`:
//! - `seq` in `results`: a retry of an applied write: return the remembered result, apply nothing.
//! - `seq >= seq_floor`, not in `results`: never applied: apply it and remember the result. Seqs
//!   may arrive out of order (pipelined writes retried after a leader change), which is fine: they
//!   were concurrent.
//! - `seq < seq_floor`: the result was forgotten (the window slid past it): `SequenceTooOld`. The
//!   write is not applied; whether an earlier copy was is unknown to the client.
//! - unknown client: `SessionUnknown` (expired, evicted, closed or never opened). This is why
//!   sessions are opened explicitly, as in the Raft thesis (section 6.3): a session re-created
//!   implicitly after expiry would have an empty window and apply an old retry a second time.
//!
//! Only successful writes are remembered. A write whose result is an error changed nothing, so
//! executing its retry is still "at most once" for the state and gives the client an answer.
//!
//! Expiry is by log time (the max of the leaders' timestamps in applied entries), so every
//! replica expires the same sessions at the same entry. The table is bounded by `sessions_max`:
//! opening one more evicts the least recently active session (ties broken by client id), again
//! the same on every replica. Memory: a session is ~48 bytes + 24 bytes per remembered result;
//! 100k sessions with a window of 16 is ~43 MB at worst.

use std::collections::{BTreeSet, HashMap};

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::Reader;
use super::error::{DecodeError, KvError};
use super::outcome::{Outcome, WriteResult};

/// Upper bound for `session_results_max` (also the decoder's bound on a session's entries).
pub const SESSION_RESULTS_MAX_LIMIT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Remembered {
    pub(crate) seq: u64,
    /// The shard the write touched, so a shard export carries only what its keys need.
    pub(crate) shard: u16,
    pub(crate) result: WriteResult,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    pub(crate) last_active_ms: u64,
    pub(crate) seq_floor: u64,
    /// Sorted by seq, unique, at most `session_results_max`.
    pub(crate) results: Vec<Remembered>,
}

/// What to do with a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Dedup {
    /// Not applied before: apply it.
    Apply,
    /// Already applied: answer with this, apply nothing.
    Duplicate(WriteResult),
    /// Refuse (unknown session, or a seq whose result is forgotten).
    Refuse(KvError),
}

#[derive(Debug, Clone)]
pub(crate) struct Sessions {
    by_client: HashMap<u64, Filed>,
    /// (activity time a session is filed under, client_id): expiry and eviction order,
    /// deterministic on every replica. One entry per session, filed at or before its
    /// `last_active_ms`: a write only moves `last_active_ms` (no re-filing per write), and
    /// expiry and eviction re-file an entry they find behind its session's activity. The
    /// first entry whose filed time is current is then the least recently active session
    /// (ties by id), exactly as if every write had re-filed its session.
    by_activity: BTreeSet<(u64, u64)>,
    sessions_max: usize,
    session_ttl_ms: u64,
    session_results_max: usize,
}

/// A session and the activity time `by_activity` files it under (at most its
/// `last_active_ms`).
#[derive(Debug, Clone)]
struct Filed {
    session: Session,
    filed_ms: u64,
}

/// Equal sessions, whatever times they happen to be filed under (a replica restored from a
/// snapshot files every session at its activity, the replica that took it may lag).
impl PartialEq for Sessions {
    fn eq(&self, other: &Self) -> bool {
        self.sessions_max == other.sessions_max
            && self.session_ttl_ms == other.session_ttl_ms
            && self.session_results_max == other.session_results_max
            && self.by_client.len() == other.by_client.len()
            && self.by_client.iter().all(|(id, f)| {
                other
                    .by_client
                    .get(id)
                    .is_some_and(|g| g.session == f.session)
            })
    }
}

impl Eq for Sessions {}

/// What a session says about write `seq` of `client_id`.
fn dedup(session: &Session, client_id: u64, seq: u64) -> Dedup {
    if let Ok(i) = session.results.binary_search_by_key(&seq, |r| r.seq) {
        return Dedup::Duplicate(session.results[i].result);
    }
    if seq < session.seq_floor {
        return Dedup::Refuse(KvError::SequenceTooOld {
            client_id,
            seq,
            seq_floor: session.seq_floor,
        });
    }
    Dedup::Apply
}

/// Remembers the result of applied write `seq` (its dedup said `Apply`).
fn remember(session: &mut Session, remembered: Remembered, results_max: usize) {
    match session
        .results
        .binary_search_by_key(&remembered.seq, |r| r.seq)
    {
        Ok(_) => debug_assert!(false, "seq {} applied twice", remembered.seq),
        Err(i) => session.results.insert(i, remembered),
    }
    trim_window(session, results_max);
}

impl Sessions {
    pub(crate) fn new(
        sessions_max: usize,
        session_ttl_ms: u64,
        session_results_max: usize,
    ) -> Self {
        assert!(sessions_max > 0);
        assert!(session_results_max > 0 && session_results_max <= SESSION_RESULTS_MAX_LIMIT);
        Sessions {
            by_client: HashMap::new(),
            by_activity: BTreeSet::new(),
            sessions_max,
            session_ttl_ms,
            session_results_max,
        }
    }

    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(self.by_client.len(), self.by_activity.len());
        self.by_client.len()
    }

    pub(crate) fn contains(&self, client_id: u64) -> bool {
        self.by_client.contains_key(&client_id)
    }

    /// Opens (or refreshes) a session. Evicts the least recently active one when full.
    pub(crate) fn open(&mut self, client_id: u64, now_ms: u64) {
        debug_assert_ne!(client_id, 0);
        if self.by_client.contains_key(&client_id) {
            self.touch(client_id, now_ms);
            return;
        }
        self.make_room();
        self.insert(
            client_id,
            Session {
                last_active_ms: now_ms,
                seq_floor: 0,
                results: Vec::new(),
            },
        );
    }

    pub(crate) fn close(&mut self, client_id: u64) {
        if let Some(f) = self.by_client.remove(&client_id) {
            let removed = self.by_activity.remove(&(f.filed_ms, client_id));
            debug_assert!(removed);
        }
    }

    #[cfg(test)]
    pub(crate) fn check(&self, client_id: u64, seq: u64) -> Dedup {
        match self.by_client.get(&client_id) {
            Some(f) => dedup(&f.session, client_id, seq),
            None => Dedup::Refuse(KvError::SessionUnknown { client_id }),
        }
    }

    /// Applies write `seq` of `client_id` exactly once, with one lookup of the session: a
    /// retry of an applied write gets its remembered result and `write` is not called; a new
    /// one runs `write` (which returns the shard it touched and its outcome) and its result is
    /// remembered if it succeeded. Either way the session is active at `now_ms` (log time).
    pub(crate) fn apply_write(
        &mut self,
        client_id: u64,
        seq: u64,
        now_ms: u64,
        write: impl FnOnce() -> (u16, Outcome),
    ) -> Outcome {
        let results_max = self.session_results_max;
        let Some(f) = self.by_client.get_mut(&client_id) else {
            return Outcome::Err(KvError::SessionUnknown { client_id });
        };
        let session = &mut f.session;
        match dedup(session, client_id, seq) {
            Dedup::Apply => {}
            Dedup::Duplicate(result) => {
                session.last_active_ms = session.last_active_ms.max(now_ms);
                return result.to_outcome();
            }
            Dedup::Refuse(error) => return Outcome::Err(error),
        }
        let (shard, outcome) = write();
        session.last_active_ms = session.last_active_ms.max(now_ms);
        if let Some(result) = WriteResult::from_outcome(&outcome) {
            remember(session, Remembered { seq, shard, result }, results_max);
        }
        outcome
    }

    /// Marks the session active at `now_ms` (log time, never decreasing).
    pub(crate) fn touch(&mut self, client_id: u64, now_ms: u64) {
        if let Some(f) = self.by_client.get_mut(&client_id) {
            f.session.last_active_ms = f.session.last_active_ms.max(now_ms);
        }
    }

    /// Remembers the result of an applied write. The caller checked `Dedup::Apply` first.
    #[cfg(test)]
    pub(crate) fn record(
        &mut self,
        client_id: u64,
        seq: u64,
        shard: u16,
        result: WriteResult,
        now_ms: u64,
    ) {
        self.touch(client_id, now_ms);
        let results_max = self.session_results_max;
        let Some(f) = self.by_client.get_mut(&client_id) else {
            debug_assert!(false, "record for unknown session {client_id}");
            return;
        };
        remember(
            &mut f.session,
            Remembered { seq, shard, result },
            results_max,
        );
    }

    /// Drops sessions idle for longer than the TTL at log time `now_ms`.
    pub(crate) fn expire(&mut self, now_ms: u64) {
        while let Some(&(filed_ms, client_id)) = self.by_activity.first() {
            // Every session is filed at or before its activity, so when the earliest filed
            // time is within the TTL, every session is.
            if filed_ms.saturating_add(self.session_ttl_ms) >= now_ms {
                break;
            }
            self.by_activity.pop_first();
            match self.by_client.get_mut(&client_id) {
                Some(f) if f.session.last_active_ms > filed_ms => {
                    // Active since it was filed: file it at its activity and look again.
                    f.filed_ms = f.session.last_active_ms;
                    self.by_activity.insert((f.filed_ms, client_id));
                }
                Some(_) => {
                    self.by_client.remove(&client_id);
                }
                None => debug_assert!(false, "session {client_id} filed but not held"),
            }
        }
    }

    /// Evicts least recently active sessions (ties by id) until one more fits.
    fn make_room(&mut self) {
        while self.by_client.len() >= self.sessions_max {
            let Some((filed_ms, client_id)) = self.by_activity.pop_first() else {
                break;
            };
            match self.by_client.get_mut(&client_id) {
                Some(f) if f.session.last_active_ms > filed_ms => {
                    f.filed_ms = f.session.last_active_ms;
                    self.by_activity.insert((f.filed_ms, client_id));
                }
                Some(_) => {
                    self.by_client.remove(&client_id);
                }
                None => debug_assert!(false, "session {client_id} filed but not held"),
            }
        }
    }

    fn insert(&mut self, client_id: u64, session: Session) {
        let filed_ms = session.last_active_ms;
        self.by_activity.insert((filed_ms, client_id));
        let previous = self
            .by_client
            .insert(client_id, Filed { session, filed_ms });
        debug_assert!(previous.is_none());
    }

    /// Sessions in a deterministic order (activity, then id). Sorted here, not read off
    /// `by_activity` (whose filed times may lag): snapshots taken by replicas with the same
    /// sessions must be byte for byte the same.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Session)> + '_ {
        let mut all: Vec<(u64, &Session)> = self
            .by_client
            .iter()
            .map(|(&client_id, f)| (client_id, &f.session))
            .collect();
        all.sort_unstable_by_key(|&(client_id, s)| (s.last_active_ms, client_id));
        all.into_iter()
    }

    /// The session entries a shard's new owner needs for exactly-once: every session, with its
    /// floor and its remembered writes on `shard`. A retry of a write has the same key, so
    /// writes on other shards never matter to the new owner; the floor does, even for a session
    /// with no write on `shard` left in its window: a write on `shard` may have slid out of it,
    /// and the new owner must refuse its retry rather than apply it again.
    pub(crate) fn export_for_shard(&self, shard: u16) -> Vec<(u64, Session)> {
        self.iter()
            .map(|(client_id, session)| {
                let results: Vec<Remembered> = session
                    .results
                    .iter()
                    .filter(|r| r.shard == shard)
                    .copied()
                    .collect();
                (
                    client_id,
                    Session {
                        last_active_ms: session.last_active_ms,
                        seq_floor: session.seq_floor,
                        results,
                    },
                )
            })
            .collect()
    }

    /// Installs a session from a snapshot or merges one from a shard import. Merging keeps the
    /// invariant: the higher floor wins, results are the union above it, trimmed to the window.
    pub(crate) fn merge(&mut self, client_id: u64, incoming: Session) {
        let results_max = self.session_results_max;
        let Some(local) = self.by_client.get(&client_id) else {
            self.make_room();
            let mut session = incoming;
            trim_window(&mut session, results_max);
            self.insert(client_id, session);
            return;
        };
        let mut merged = local.session.clone();
        self.close(client_id);
        merged.last_active_ms = merged.last_active_ms.max(incoming.last_active_ms);
        merged.seq_floor = merged.seq_floor.max(incoming.seq_floor);
        for r in incoming.results {
            if let Err(i) = merged.results.binary_search_by_key(&r.seq, |x| x.seq) {
                merged.results.insert(i, r);
            }
        }
        let floor = merged.seq_floor;
        merged.results.retain(|r| r.seq >= floor);
        trim_window(&mut merged, results_max);
        self.insert(client_id, merged);
    }
}

fn trim_window(session: &mut Session, results_max: usize) {
    if session.results.len() > results_max {
        let drop = session.results.len() - results_max;
        // Everything below the oldest kept seq is now unknown: raise the floor past the dropped.
        session.seq_floor = session
            .seq_floor
            .max(session.results[drop - 1].seq.saturating_add(1));
        session.results.drain(..drop);
    }
}

pub(crate) fn encode_session(out: &mut BytesMut, client_id: u64, session: &Session) {
    out.put_u64_le(client_id);
    out.put_u64_le(session.last_active_ms);
    out.put_u64_le(session.seq_floor);
    out.put_u32_le(session.results.len() as u32);
    for r in &session.results {
        out.put_u64_le(r.seq);
        out.put_u16_le(r.shard);
        match r.result {
            WriteResult::Ok => out.put_u8(1),
            WriteResult::Int(n) => {
                out.put_u8(2);
                out.put_i64_le(n);
            }
            WriteResult::Bool(b) => {
                out.put_u8(3);
                out.put_u8(u8::from(b));
            }
        }
    }
}

pub(crate) fn decode_session(r: &mut Reader<'_>) -> Result<(u64, Session), DecodeError> {
    let offset = r.offset();
    let client_id = r.u64()?;
    if client_id == 0 {
        return Err(DecodeError::BadField {
            offset,
            field: "session client id",
            value: 0,
        });
    }
    let last_active_ms = r.u64()?;
    let seq_floor = r.u64()?;
    let count_offset = r.offset();
    let count = r.u32()? as usize;
    if count > SESSION_RESULTS_MAX_LIMIT {
        return Err(DecodeError::BadCount {
            offset: count_offset,
            count: count as u64,
            count_max: SESSION_RESULTS_MAX_LIMIT as u64,
        });
    }
    let mut results = Vec::with_capacity(count);
    for _ in 0..count {
        let seq_offset = r.offset();
        let seq = r.u64()?;
        let shard = r.u16()?;
        let tag_offset = r.offset();
        let result = match r.u8()? {
            1 => WriteResult::Ok,
            2 => WriteResult::Int(r.i64()?),
            3 => WriteResult::Bool(r.bool()?),
            tag => {
                return Err(DecodeError::BadField {
                    offset: tag_offset,
                    field: "session result tag",
                    value: u64::from(tag),
                })
            }
        };
        // Sorted, unique and above the floor, or the invariant does not hold.
        let in_order = results
            .last()
            .map_or(true, |last: &Remembered| last.seq < seq);
        if !in_order || seq < seq_floor {
            return Err(DecodeError::BadField {
                offset: seq_offset,
                field: "session result seq",
                value: seq,
            });
        }
        results.push(Remembered { seq, shard, result });
    }
    Ok((
        client_id,
        Session {
            last_active_ms,
            seq_floor,
            results,
        },
    ))
}

/// Encodes one session alone (used by tests and by callers that want a standalone blob).
#[allow(dead_code)]
pub(crate) fn session_bytes(client_id: u64, session: &Session) -> Bytes {
    let mut out = BytesMut::new();
    encode_session(&mut out, client_id, session);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn duplicates_return_the_remembered_result() {
        let mut s = Sessions::new(10, 1000, 4);
        s.open(7, 0);
        assert_eq!(s.check(7, 1), Dedup::Apply);
        s.record(7, 1, 0, WriteResult::Int(5), 1);
        assert_eq!(s.check(7, 1), Dedup::Duplicate(WriteResult::Int(5)));
        // Out of order but never applied: still applies.
        s.record(7, 3, 0, WriteResult::Ok, 2);
        assert_eq!(s.check(7, 2), Dedup::Apply);
    }

    #[test]
    fn window_slides_and_raises_the_floor() {
        let mut s = Sessions::new(10, 1000, 2);
        s.open(7, 0);
        for seq in 1..=3 {
            s.record(7, seq, 0, WriteResult::Ok, seq);
        }
        assert!(matches!(
            s.check(7, 1),
            Dedup::Refuse(KvError::SequenceTooOld { seq_floor: 2, .. })
        ));
        assert_eq!(s.check(7, 2), Dedup::Duplicate(WriteResult::Ok));
        assert_eq!(s.check(7, 4), Dedup::Apply);
    }

    #[test]
    fn unknown_and_expired_sessions_are_refused() {
        let mut s = Sessions::new(10, 100, 2);
        assert!(matches!(
            s.check(1, 1),
            Dedup::Refuse(KvError::SessionUnknown { .. })
        ));
        s.open(1, 0);
        s.open(2, 50);
        s.expire(100);
        assert!(s.contains(1));
        s.expire(101);
        assert!(!s.contains(1));
        assert!(s.contains(2));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_least_recently_active_session_is_evicted_when_full() {
        let mut s = Sessions::new(2, 1000, 2);
        s.open(1, 0);
        s.open(2, 1);
        s.touch(1, 2);
        s.open(3, 3);
        assert!(s.contains(1) && s.contains(3) && !s.contains(2));
    }

    /// What the lazily filed sessions must be equivalent to: every activity re-files at once.
    struct EagerModel {
        max: usize,
        ttl_ms: u64,
        last_active: BTreeMap<u64, u64>,
    }

    impl EagerModel {
        fn order(&self) -> Vec<(u64, u64)> {
            let mut v: Vec<(u64, u64)> = self.last_active.iter().map(|(&c, &t)| (t, c)).collect();
            v.sort_unstable();
            v
        }
        fn open(&mut self, client: u64, now: u64) {
            if let Some(t) = self.last_active.get_mut(&client) {
                *t = (*t).max(now);
                return;
            }
            while self.last_active.len() >= self.max {
                let (_, oldest) = self.order()[0];
                self.last_active.remove(&oldest);
            }
            self.last_active.insert(client, now);
        }
        fn touch(&mut self, client: u64, now: u64) {
            if let Some(t) = self.last_active.get_mut(&client) {
                *t = (*t).max(now);
            }
        }
        fn expire(&mut self, now: u64) {
            let ttl = self.ttl_ms;
            self.last_active.retain(|_, t| t.saturating_add(ttl) >= now);
        }
    }

    proptest::proptest! {
        /// Opens (with eviction), writes, closes and expiry in any order: the sessions held,
        /// their activity and the snapshot order equal the eagerly re-filed model's.
        #[test]
        fn lazily_filed_sessions_expire_and_evict_like_eagerly_filed_ones(
            ops in proptest::collection::vec((0u8..4, 1u64..9, 0u64..4), 1..80),
        ) {
            let (max, ttl_ms) = (4, 6);
            let mut s = Sessions::new(max, ttl_ms, 4);
            let mut m = EagerModel { max, ttl_ms, last_active: BTreeMap::new() };
            let (mut now, mut seq) = (0u64, 0u64);
            for (kind, client, dt) in ops {
                now += dt;
                match kind {
                    0 => {
                        s.open(client, now);
                        m.open(client, now);
                    }
                    1 => {
                        seq += 1;
                        let out = s.apply_write(client, seq, now, || (0, Outcome::Ok));
                        let known = m.last_active.contains_key(&client);
                        proptest::prop_assert_eq!(out == Outcome::Ok, known);
                        m.touch(client, now);
                    }
                    2 => {
                        s.close(client);
                        m.last_active.remove(&client);
                    }
                    _ => {
                        s.expire(now);
                        m.expire(now);
                    }
                }
                let got: Vec<(u64, u64)> =
                    s.iter().map(|(c, sess)| (sess.last_active_ms, c)).collect();
                proptest::prop_assert_eq!(&got, &m.order());
                proptest::prop_assert_eq!(s.len(), m.last_active.len());
            }
        }
    }

    #[test]
    fn a_write_is_applied_once_and_its_retry_answered_from_the_session() {
        let mut s = Sessions::new(10, 1000, 4);
        s.open(7, 0);
        let mut runs = 0;
        let mut write = |n: i64| {
            runs += 1;
            (3, Outcome::Int(n))
        };
        assert_eq!(s.apply_write(7, 1, 5, || write(1)), Outcome::Int(1));
        assert_eq!(s.apply_write(7, 1, 6, || write(2)), Outcome::Int(1));
        assert_eq!(runs, 1, "the retry ran nothing");
        assert!(matches!(
            s.apply_write(8, 1, 6, || (0, Outcome::Ok)),
            Outcome::Err(KvError::SessionUnknown { client_id: 8 })
        ));
        // A failed write is not remembered: its retry runs again.
        let failed = Outcome::Err(KvError::NotAnInteger);
        assert_eq!(s.apply_write(7, 2, 7, || (0, failed.clone())), failed);
        assert_eq!(s.apply_write(7, 2, 8, || (0, Outcome::Ok)), Outcome::Ok);
        assert_eq!(s.iter().next().map(|(_, x)| x.last_active_ms), Some(8));
    }

    #[test]
    fn merge_keeps_the_invariant() {
        let mut a = Sessions::new(10, 1000, 3);
        a.open(9, 0);
        a.record(9, 5, 1, WriteResult::Ok, 1);
        let incoming = Session {
            last_active_ms: 4,
            seq_floor: 3,
            results: vec![
                Remembered {
                    seq: 3,
                    shard: 2,
                    result: WriteResult::Int(1),
                },
                Remembered {
                    seq: 4,
                    shard: 2,
                    result: WriteResult::Int(2),
                },
                Remembered {
                    seq: 6,
                    shard: 2,
                    result: WriteResult::Bool(true),
                },
            ],
        };
        a.merge(9, incoming);
        // Four results, window three: seq 3 is dropped and the floor rises to 4.
        assert!(matches!(a.check(9, 3), Dedup::Refuse(_)));
        assert_eq!(a.check(9, 4), Dedup::Duplicate(WriteResult::Int(2)));
        assert_eq!(a.check(9, 5), Dedup::Duplicate(WriteResult::Ok));
        assert_eq!(a.check(9, 6), Dedup::Duplicate(WriteResult::Bool(true)));
        assert_eq!(a.check(9, 7), Dedup::Apply);
    }

    #[test]
    fn session_encoding_round_trips_and_rejects_disorder() {
        let session = Session {
            last_active_ms: 11,
            seq_floor: 2,
            results: vec![
                Remembered {
                    seq: 2,
                    shard: 3,
                    result: WriteResult::Int(-1),
                },
                Remembered {
                    seq: 9,
                    shard: 3,
                    result: WriteResult::Bool(false),
                },
            ],
        };
        let bytes = session_bytes(5, &session);
        let mut r = Reader::new(&bytes);
        assert_eq!(decode_session(&mut r).unwrap(), (5, session.clone()));
        let mut bad = session;
        bad.results.swap(0, 1);
        let bytes = session_bytes(5, &bad);
        assert!(decode_session(&mut Reader::new(&bytes)).is_err());
    }
}
