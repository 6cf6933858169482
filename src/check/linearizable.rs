//! Linearizability checking of key-value histories: Wing & Gong's search with Lowe's memoisation,
//! as Porcupine implements it, split per key.
//!
//! P-compositionality: a history of single-key operations is linearizable iff each key's
//! sub-history is (linearizability is local, Herlihy & Wing), so every key is checked alone and
//! the exponential part only ever sees one key's concurrency.
//!
//! Per key, the operations become a doubly linked list of call and return events sorted by time
//! (calls before returns at equal times, so touching intervals count as concurrent, as in
//! Porcupine). The search walks the list: at a call it tries to linearize that operation now
//! (the model accepts its result from the current state), "lifts" its call and return out of the
//! list and restarts from the head; at a return whose call was not linearized yet, no order of
//! what remains can work, so it backtracks: pops the last linearized operation, restores the
//! state, "unlifts" it, and tries the next candidate. The memo cache holds every (set of
//! linearized operations, state) pair seen: reaching one again cannot succeed where it failed.
//!
//! Status handling: `fail` operations are dropped (definitely not applied). `timeout` writes
//! get a return time of +infinity (possibly applied, at any time after their call: the search
//! may linearize them anywhere later or leave them out: the search succeeds once every
//! operation with a finite return is linearized). `timeout` reads are dropped (they change
//! nothing and their result is unknown).
//!
//! Reductions on top of Porcupine, each sound (argued where it is implemented) and each tested
//! against histories that are linearizable by construction:
//! - a read that sees the current state is taken without branching (partial-order reduction);
//! - a timed-out put or append whose value no read contains is dropped before the search;
//! - a new state is refused when it contradicts a pending read: appends only extend a value,
//!   so a read sees the current value or that of a put or delete that can still come before
//!   it, followed by appends; if none of those can lead to what it returned, the state is a
//!   dead end (this keeps concurrent appends from being tried in all their orders, and catches
//!   a wrong order of concurrent writes at once instead of at a distant return);
//! - the memo cache treats timed-out writes as optional: a configuration is pruned when one
//!   with the same finite operations and state, and a subset of its timed-out ones, was seen.
//!
//! Cost sketch (2-core CI machine, test profile, measured on random linearizable histories
//! of puts, appends, deletes and gets with 5% timeouts and failures, all on one key): 4000
//! operations from 8 clients take 20-35k steps (~0.1 s); 4000 from 10 clients 0.15-0.7M steps
//! (0.1-0.7 s); 3600 from 12 clients 0.5-1.8M steps (1-2 s); 16 clients exceed 3M steps. Appends
//! and gets only take about one step per operation. A step costs a bitset clone, an Fx hash
//! of it and a walk of at most 64 pending events; states carry an incrementally updated
//! fingerprint, so long values are not rehashed. Past the step budget the verdict is
//! `Unknown`, so workloads should spread clients over keys. Memory: at most one cache entry per step, of
//! about n/8 bytes plus the value (values are shared `Bytes`), bounded by
//! `memo_bytes_max_per_key` (512 MiB by default; a 4000-operation key reaches it after ~0.8M
//! entries).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::history::{JsonBytes, OpKind, Record, Status};

/// Limits and options of a check.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Search steps allowed per key before the key's verdict is Unknown.
    pub steps_max_per_key: u64,
    /// Memory the memo cache of one key may use (estimated) before its verdict is Unknown.
    pub memo_bytes_max_per_key: usize,
    /// Wall-clock budget for the whole check; None = only the step limit.
    pub time_budget: Option<Duration>,
    /// Treat a missing key and an empty value as equal (Porcupine's and Jepsen's KV models
    /// return "" for a missing key; ours distinguishes them).
    pub missing_equals_empty: bool,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            steps_max_per_key: 2_000_000,
            memo_bytes_max_per_key: 512 << 20,
            time_budget: Some(Duration::from_secs(60)),
            missing_equals_empty: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// The history is not linearizable: `ops` are the operations of the failing key with the
    /// fewest operations (sorted by invoke time), the smallest counterexample to look at.
    NotLinearizable {
        key: JsonBytes,
        ops: Vec<Record>,
    },
    /// No key failed, but the search ran out of budget on these keys.
    Unknown {
        keys: Vec<JsonBytes>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub verdict: Verdict,
    pub keys_checked: usize,
    /// Operations considered (after dropping `fail` operations and timed-out reads).
    pub ops_checked: usize,
    pub steps: u64,
}

#[derive(Debug, Clone)]
enum Input {
    Put(Bytes),
    Append(Bytes),
    Delete,
    Get(Option<Bytes>),
}

#[derive(Debug, Clone)]
struct KeyOp {
    call: u64,
    /// u64::MAX for a timed-out operation (it returns "at infinity").
    ret: u64,
    /// Possibly applied, possibly not: need not be linearized. An explicit flag, not `ret ==
    /// u64::MAX`, so a completed operation stamped u64::MAX stays mandatory.
    timed_out: bool,
    input: Input,
    record: usize,
}

/// The value of the key in the sequential model, with a fingerprint for the memo cache.
///
/// The cache hashes every new state; hashing the whole value made long append chains cost
/// O(length) per search step (most of the time, measured). The fingerprint is a polynomial
/// hash that an append extends in O(appended bytes); equality still compares the values, so
/// a fingerprint collision costs a comparison, never a wrong verdict.
#[derive(Debug, Clone)]
struct State {
    value: Option<Bytes>,
    fingerprint: u64,
}

impl PartialEq for State {
    fn eq(&self, other: &State) -> bool {
        self.fingerprint == other.fingerprint && self.value == other.value
    }
}

impl Eq for State {}

impl std::hash::Hash for State {
    fn hash<H: std::hash::Hasher>(&self, hasher: &mut H) {
        hasher.write_u64(self.fingerprint);
    }
}

impl State {
    const MISSING: State = State {
        value: None,
        fingerprint: 0,
    };

    fn present(value: Bytes) -> State {
        let fingerprint = rolling_hash(&value);
        State {
            value: Some(value),
            fingerprint,
        }
    }
}

/// The sequential model of one key: a value or missing.
fn step(state: &State, input: &Input, missing_equals_empty: bool) -> Option<State> {
    match input {
        Input::Put(value) => Some(State::present(value.clone())),
        Input::Append(value) => Some(match &state.value {
            None => State::present(value.clone()),
            Some(old) => {
                let mut joined = BytesMut::with_capacity(old.len() + value.len());
                joined.extend_from_slice(old);
                joined.extend_from_slice(value);
                // rolling_hash(old ++ value) = rolling_hash(old) * BASE^len(value) + rolling_hash(value)
                let shift = value
                    .iter()
                    .fold(state.fingerprint, |h, _| h.wrapping_mul(HASH_BASE));
                State {
                    value: Some(joined.freeze()),
                    fingerprint: shift.wrapping_add(rolling_hash(value)),
                }
            }
        }),
        Input::Delete => Some(State::MISSING),
        Input::Get(seen) => {
            let equal = if missing_equals_empty {
                state.value.as_deref().unwrap_or_default() == seen.as_deref().unwrap_or_default()
            } else {
                state.value == *seen
            };
            equal.then(|| state.clone())
        }
    }
}

enum KeyVerdict {
    Ok,
    Illegal,
    Unknown,
}

/// Checks a whole history.
pub fn check_history(records: &[Record], config: &CheckConfig) -> CheckReport {
    let deadline = config.time_budget.map(|b| Instant::now() + b);
    let mut by_key: BTreeMap<&JsonBytes, Vec<KeyOp>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        if r.status == Status::Fail {
            continue;
        }
        // A completed record without a complete time (not validated) is treated as timed out:
        // its return time is unknown.
        let timed_out = r.status == Status::Timeout || r.complete.is_none();
        let value = || r.value.as_ref().map(|v| v.0.clone()).unwrap_or_default();
        let input = match r.op {
            OpKind::Put => Input::Put(value()),
            OpKind::Append => Input::Append(value()),
            OpKind::Delete => Input::Delete,
            OpKind::Get if timed_out => continue,
            OpKind::Get => Input::Get(r.result.as_ref().map(|v| v.0.clone())),
        };
        let ret = match (timed_out, r.complete) {
            (false, Some(complete)) => complete.max(r.invoke),
            _ => u64::MAX,
        };
        by_key.entry(&r.key).or_default().push(KeyOp {
            call: r.invoke,
            ret,
            timed_out,
            input,
            record: i,
        });
    }
    for ops in by_key.values_mut() {
        drop_unobserved_timeouts(ops);
    }
    let keys_checked = by_key.len();
    let ops_checked = by_key.values().map(Vec::len).sum();
    // Smallest keys first: the first failing key is then the smallest counterexample.
    let mut keys: Vec<(&JsonBytes, Vec<KeyOp>)> = by_key.into_iter().collect();
    keys.sort_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| a.0.cmp(b.0)));
    let mut steps_total = 0u64;
    let mut unknown = Vec::new();
    for (key, ops) in keys {
        let (verdict, steps) = check_key(&ops, config, deadline);
        steps_total += steps;
        match verdict {
            KeyVerdict::Ok => {}
            KeyVerdict::Unknown => unknown.push(key.clone()),
            KeyVerdict::Illegal => {
                let mut failing: Vec<Record> =
                    ops.iter().map(|op| records[op.record].clone()).collect();
                failing.sort_by_key(|r| (r.invoke, r.complete.unwrap_or(u64::MAX)));
                return CheckReport {
                    verdict: Verdict::NotLinearizable {
                        key: key.clone(),
                        ops: failing,
                    },
                    keys_checked,
                    ops_checked,
                    steps: steps_total,
                };
            }
        }
    }
    let verdict = if unknown.is_empty() {
        Verdict::Linearizable
    } else {
        Verdict::Unknown { keys: unknown }
    };
    CheckReport {
        verdict,
        keys_checked,
        ops_checked,
        steps: steps_total,
    }
}

/// Distinct value lengths handled by [`drop_unobserved_timeouts`]; values of further lengths are
/// kept (conservative) so the pre-pass stays linear in the history size.
const UNOBSERVED_LENGTHS_MAX: usize = 64;

/// Removes timed-out puts and appends whose value no completed read contains.
///
/// Why this is sound: if such a write W had taken effect at some point of a linearization, every
/// state from W up to the next put or delete contains W's value as a substring (appends only
/// extend the value), so no read was linearized in that span; removing W changes only states
/// nobody read, and the states after the next overwrite are unchanged. So the history is
/// linearizable with W iff it is without it. A timed-out write is the search's worst case (it
/// never returns, so it is a candidate at every step), and with unique values most are never
/// read: dropping them keeps the search near-linear. Empty values are kept (always "contained").
fn drop_unobserved_timeouts(ops: &mut Vec<KeyOp>) {
    let is_candidate = |op: &KeyOp| {
        op.timed_out && matches!(&op.input, Input::Put(v) | Input::Append(v) if !v.is_empty())
    };
    if !ops.iter().any(is_candidate) {
        return;
    }
    let mut results: Vec<&[u8]> = ops
        .iter()
        .filter_map(|op| match &op.input {
            Input::Get(Some(seen)) => Some(&seen[..]),
            _ => None,
        })
        .collect();
    results.sort_unstable();
    results.dedup();
    // A result that is a prefix of another adds no substrings; in sorted order a prefix sits
    // right before the strings it starts (appends make most results prefixes of later ones).
    let results: Vec<&[u8]> = (0..results.len())
        .filter(|&i| {
            results
                .get(i + 1)
                .map_or(true, |next| !next.starts_with(results[i]))
        })
        .map(|i| results[i])
        .collect();
    let mut by_length: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let (true, Input::Put(v) | Input::Append(v)) = (is_candidate(op), &op.input) {
            by_length.entry(v.len()).or_default().push(i);
        }
    }
    let mut observed = vec![false; ops.len()];
    for (length_index, (&length, candidates)) in by_length.iter().enumerate() {
        if length_index >= UNOBSERVED_LENGTHS_MAX {
            for &i in candidates {
                observed[i] = true;
            }
            continue;
        }
        let value_of = |i: usize| match &ops[i].input {
            Input::Put(v) | Input::Append(v) => &v[..],
            _ => unreachable!("candidates are puts and appends"),
        };
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        for &i in candidates {
            by_hash
                .entry(rolling_hash(value_of(i)))
                .or_default()
                .push(i);
        }
        // Rabin-Karp over every read result: one pass per distinct length.
        let base_pow = (1..length).fold(1u64, |p, _| p.wrapping_mul(HASH_BASE));
        for result in &results {
            if result.len() < length {
                continue;
            }
            let mut hash = rolling_hash(&result[..length]);
            let mut start = 0;
            loop {
                if let Some(hits) = by_hash.get(&hash) {
                    let window = &result[start..start + length];
                    for &i in hits {
                        if value_of(i) == window {
                            observed[i] = true;
                        }
                    }
                }
                if start + length == result.len() {
                    break;
                }
                let out = u64::from(result[start]);
                let incoming = u64::from(result[start + length]);
                hash = hash
                    .wrapping_sub(out.wrapping_mul(base_pow))
                    .wrapping_mul(HASH_BASE)
                    .wrapping_add(incoming);
                start += 1;
            }
        }
    }
    let mut i = 0;
    ops.retain(|op| {
        let keep = !is_candidate(op) || observed[i];
        i += 1;
        keep
    });
}

const HASH_BASE: u64 = 1_000_003;

fn rolling_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |h, &b| {
        h.wrapping_mul(HASH_BASE).wrapping_add(u64::from(b))
    })
}

const NIL: u32 = u32::MAX;

/// The Firefox/rustc hash: a multiply and rotate per word. The memo cache hashes a bitset of
/// the linearized operations at every search step; SipHash took a quarter of the search time.
/// Keys come from the history being checked, so flooding resistance is not needed here.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Hash table slot, vectors' headers and the state handle of one memo entry, roughly.
const MEMO_ENTRY_OVERHEAD_BYTES: usize = 96;

/// Pending reads whose results are checked against a new state at each search step.
const PENDING_READS_CHECKED_MAX: usize = 8;
/// Pending puts and deletes, and pending appends, tracked for that check; reads behind more
/// are not checked.
const PENDING_WRITES_TRACKED_MAX: usize = 32;
/// Pending events walked for that check.
const PENDING_NODES_WALKED_MAX: usize = 64;

/// The event list: nodes 0..2n are events in time order, node 2n is the head sentinel.
struct Events {
    next: Vec<u32>,
    prev: Vec<u32>,
    /// For a call node, its return node; NIL for a return node.
    matching: Vec<u32>,
    /// The operation of each node.
    op: Vec<u32>,
    head: u32,
}

impl Events {
    fn new(ops: &[KeyOp]) -> Events {
        let n = ops.len();
        // (time, 0 = call / 1 = return, op): calls first at equal times.
        // Kind 0 = call, 1 = return, 2 = timed-out return: calls first at equal times, and
        // timed-out returns after every real one (they are "at infinity").
        let mut order: Vec<(u64, u8, u32)> = Vec::with_capacity(2 * n);
        for (i, op) in ops.iter().enumerate() {
            order.push((op.call, 0, i as u32));
            order.push((op.ret, if op.timed_out { 2 } else { 1 }, i as u32));
        }
        order.sort_unstable();
        let nodes = 2 * n;
        let head = nodes as u32;
        let mut events = Events {
            next: vec![NIL; nodes + 1],
            prev: vec![NIL; nodes + 1],
            matching: vec![NIL; nodes + 1],
            op: vec![NIL; nodes + 1],
            head,
        };
        let mut call_node = vec![NIL; n];
        for (node, &(_, kind, op)) in order.iter().enumerate() {
            let node = node as u32;
            events.op[node as usize] = op;
            if kind == 0 {
                call_node[op as usize] = node;
            } else {
                let call = call_node[op as usize];
                debug_assert_ne!(call, NIL, "a return sorted before its call");
                events.matching[call as usize] = node;
            }
        }
        let mut last = head;
        for node in 0..nodes as u32 {
            events.next[last as usize] = node;
            events.prev[node as usize] = last;
            last = node;
        }
        events
    }

    /// Removes a call and its return from the list.
    fn lift(&mut self, call: u32) {
        let (c, r) = (call as usize, self.matching[call as usize] as usize);
        self.next[self.prev[c] as usize] = self.next[c];
        if self.next[c] != NIL {
            self.prev[self.next[c] as usize] = self.prev[c];
        }
        self.next[self.prev[r] as usize] = self.next[r];
        if self.next[r] != NIL {
            self.prev[self.next[r] as usize] = self.prev[r];
        }
    }

    /// Puts back what `lift` removed; the nodes kept their own links.
    fn unlift(&mut self, call: u32) {
        let (c, r) = (call as usize, self.matching[call as usize] as usize);
        self.next[self.prev[r] as usize] = r as u32;
        if self.next[r] != NIL {
            self.prev[self.next[r] as usize] = r as u32;
        }
        self.next[self.prev[c] as usize] = c as u32;
        if self.next[c] != NIL {
            self.prev[self.next[c] as usize] = c as u32;
        }
    }
}

/// Bitset over one class of operations (finite or timed-out).
fn set_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1u64 << (i % 64);
}

fn clear_bit(bits: &mut [u64], i: usize) {
    bits[i / 64] &= !(1u64 << (i % 64));
}

fn is_subset(small: &[u64], big: &[u64]) -> bool {
    small.iter().zip(big).all(|(s, b)| s & !b == 0)
}

fn check_key(ops: &[KeyOp], config: &CheckConfig, deadline: Option<Instant>) -> (KeyVerdict, u64) {
    if ops.is_empty() {
        return (KeyVerdict::Ok, 0);
    }
    let mut search = Search::new(ops, config.missing_equals_empty);
    let mut steps = 0u64;
    // Set after every lift: the next step first looks for a read it may take without branching.
    let mut restart = true;
    let mut entry = NIL;
    while search.pending_finite > 0 {
        steps += 1;
        if steps > config.steps_max_per_key || search.memo_bytes > config.memo_bytes_max_per_key {
            return (KeyVerdict::Unknown, steps);
        }
        if steps % 4096 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
            return (KeyVerdict::Unknown, steps);
        }
        if restart {
            restart = false;
            if let Some(read) = search.satisfiable_read() {
                if search.try_linearize(read, true) {
                    restart = true;
                } else {
                    match search.backtrack() {
                        Some(next) => entry = next,
                        None => return (KeyVerdict::Illegal, steps),
                    }
                }
                continue;
            }
            entry = search.events.next[search.events.head as usize];
        }
        // With a finite operation pending, its return is in the list, so a scan always stops at
        // a return before the end of the list; the end is handled like a return all the same.
        debug_assert_ne!(entry, NIL);
        let e = entry as usize;
        if entry != NIL && search.events.matching[e] != NIL {
            // A call: try to linearize its operation here.
            if search.try_linearize(entry, false) {
                restart = true;
            } else {
                entry = search.events.next[e];
            }
        } else {
            // A return whose operation is not linearized: no candidate left here.
            match search.backtrack() {
                Some(next) => entry = next,
                None => return (KeyVerdict::Illegal, steps),
            }
        }
    }
    (KeyVerdict::Ok, steps)
}

/// (linearized finite operations, state) -> sets of linearized timed-out operations.
type MemoCache = HashMap<(Vec<u64>, State), Vec<Vec<u64>>, BuildHasherDefault<FxHasher>>;

/// The state of the depth-first search over one key's operations.
struct Search<'a> {
    ops: &'a [KeyOp],
    missing_equals_empty: bool,
    events: Events,
    /// Each operation's index within its class (finite or timed-out).
    class_index: Vec<usize>,
    finite_set: Vec<u64>,
    timed_out_set: Vec<u64>,
    pending_finite: usize,
    /// Memo: (linearized finite ops, state) -> the sets of linearized timed-out ops seen with
    /// it. A configuration is hopeless if one seen before had the same finite set and state
    /// and a subset of its timed-out ops: a timed-out write not yet applied may always be left
    /// out (applied after everything), so fewer applied timed-out ops means as many futures.
    cache: MemoCache,
    /// The linearized calls, the state before each, and whether it was forced (no branching).
    calls: Vec<(u32, State, bool)>,
    state: State,
    /// Estimated memory held by `cache`.
    memo_bytes: usize,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [KeyOp], missing_equals_empty: bool) -> Search<'a> {
        let mut class_index = Vec::with_capacity(ops.len());
        let (mut finite_count, mut timed_out_count) = (0usize, 0usize);
        for op in ops {
            if op.timed_out {
                class_index.push(timed_out_count);
                timed_out_count += 1;
            } else {
                class_index.push(finite_count);
                finite_count += 1;
            }
        }
        Search {
            ops,
            missing_equals_empty,
            events: Events::new(ops),
            class_index,
            finite_set: vec![0u64; finite_count.div_ceil(64)],
            timed_out_set: vec![0u64; timed_out_count.div_ceil(64)],
            pending_finite: finite_count,
            cache: HashMap::default(),
            calls: Vec::new(),
            state: State::MISSING,
            memo_bytes: 0,
        }
    }

    fn timed_out(&self, op: usize) -> bool {
        self.ops[op].timed_out
    }

    /// A read that may be linearized now and sees the current state.
    ///
    /// Taking it first loses nothing (partial-order reduction): a read changes no state, and
    /// every operation that returned before its call is already linearized (it is before the
    /// first return in the list), so in any valid completion of this configuration the read can
    /// be moved to the front. So it is taken without trying alternatives, and if that fails the
    /// whole configuration fails. Without this, a wrong order of concurrent writes is found
    /// only at a distant return, after a search of everything in between.
    fn satisfiable_read(&self) -> Option<u32> {
        let mut node = self.events.next[self.events.head as usize];
        while node != NIL && self.events.matching[node as usize] != NIL {
            let op = self.events.op[node as usize] as usize;
            if let Input::Get(_) = &self.ops[op].input {
                if step(&self.state, &self.ops[op].input, self.missing_equals_empty).is_some() {
                    return Some(node);
                }
            }
            node = self.events.next[node as usize];
        }
        None
    }

    /// Whether moving to `new_state` (by linearizing call node `call`) makes some pending read
    /// impossible.
    ///
    /// A read not yet linearized comes after every operation linearized from here on, and
    /// only operations with a call before its return can come between. Appends only extend a
    /// value; so the value the read sees is the current one, or the value of a put or delete
    /// linearized in between, followed by appends: a prefix of what it read, or, from missing,
    /// missing or something starting with a pending append's value (a present value never
    /// becomes missing by appends). If no such path leads to what the read returned, this state
    /// is a dead end. Without this, concurrent appends are tried in all their orders (k! for k
    /// of them) before a read far ahead reveals the one that happened, and wrong orders of
    /// concurrent writes survive until a read's return.
    fn contradicts_pending_reads(&self, new_state: &State, call: u32) -> bool {
        // One walk over the pending events in time order, collecting reads and the writes that
        // could precede them. Bounded: a step costs O(window), not O(history).
        let mut resets = [(0u64, None::<&Bytes>); PENDING_WRITES_TRACKED_MAX];
        let mut resets_len = 0;
        let mut appends = [(0u64, None::<&Bytes>); PENDING_WRITES_TRACKED_MAX];
        let mut appends_len = 0;
        let mut writes_overflow_call = u64::MAX;
        let mut reads = [0u32; PENDING_READS_CHECKED_MAX];
        let mut reads_len = 0;
        let mut horizon = 0u64;
        let mut walked_until = u64::MAX;
        let mut node = self.events.next[self.events.head as usize];
        let mut nodes_walked = 0;
        while node != NIL {
            let n = node as usize;
            let op_index = self.events.op[n];
            let op = &self.ops[op_index as usize];
            let is_call = self.events.matching[n] != NIL;
            let time = if is_call { op.call } else { op.ret };
            if (reads_len == reads.len() && time > horizon)
                || nodes_walked == PENDING_NODES_WALKED_MAX
            {
                walked_until = time;
                break;
            }
            nodes_walked += 1;
            if is_call && node != call {
                match &op.input {
                    Input::Put(_) | Input::Delete if resets_len == resets.len() => {
                        writes_overflow_call = writes_overflow_call.min(op.call);
                    }
                    Input::Put(value) => {
                        resets[resets_len] = (op.call, Some(value));
                        resets_len += 1;
                    }
                    Input::Delete => {
                        resets[resets_len] = (op.call, None);
                        resets_len += 1;
                    }
                    Input::Append(_) if appends_len == appends.len() => {
                        writes_overflow_call = writes_overflow_call.min(op.call);
                    }
                    Input::Append(value) => {
                        appends[appends_len] = (op.call, Some(value));
                        appends_len += 1;
                    }
                    Input::Get(_) if reads_len < reads.len() => {
                        reads[reads_len] = op_index;
                        reads_len += 1;
                        horizon = horizon.max(op.ret);
                    }
                    Input::Get(_) => {}
                }
            }
            node = self.events.next[n];
        }
        // `from` (None = missing) followed only by appends that may come before `before`: can a
        // read see `seen`?
        let reachable = |from: Option<&Bytes>, seen: &Option<Bytes>, before: u64| match (from, seen)
        {
            (_, None) => from.map_or(true, |f| self.missing_equals_empty && f.is_empty()),
            (Some(from), Some(seen)) => seen.starts_with(from),
            (None, Some(seen)) => {
                (self.missing_equals_empty && seen.is_empty())
                    || appends[..appends_len].iter().any(|&(append_call, value)| {
                        append_call < before && value.is_some_and(|v| seen.starts_with(v))
                    })
            }
        };
        reads[..reads_len].iter().any(|&read| {
            let read = &self.ops[read as usize];
            let Input::Get(seen) = &read.input else {
                return false;
            };
            // Only if the walk saw, and kept, every write with a call before the read's return.
            if read.ret > walked_until || writes_overflow_call < read.ret {
                return false;
            }
            if reachable(new_state.value.as_ref(), seen, read.ret) {
                return false;
            }
            !resets[..resets_len].iter().any(|&(reset_call, value)| {
                reset_call < read.ret && reachable(value, seen, read.ret)
            })
        })
    }

    /// Linearizes the operation of call node `call` next, if the model accepts it and the
    /// resulting configuration was not seen before.
    fn try_linearize(&mut self, call: u32, forced: bool) -> bool {
        let op = self.events.op[call as usize] as usize;
        let Some(new_state) = step(&self.state, &self.ops[op].input, self.missing_equals_empty)
        else {
            return false;
        };
        let is_read = matches!(self.ops[op].input, Input::Get(_));
        if !is_read && self.contradicts_pending_reads(&new_state, call) {
            return false;
        }
        let (mut new_finite, mut new_timed_out) =
            (self.finite_set.clone(), self.timed_out_set.clone());
        let bit = self.class_index[op];
        if self.timed_out(op) {
            set_bit(&mut new_timed_out, bit);
        } else {
            set_bit(&mut new_finite, bit);
        }
        let seen = self
            .cache
            .entry((new_finite, new_state.clone()))
            .or_default();
        if seen.iter().any(|x| is_subset(x, &new_timed_out)) {
            return false;
        }
        seen.retain(|x| !is_subset(&new_timed_out, x));
        self.memo_bytes +=
            (self.finite_set.len() + new_timed_out.len()) * 8 + MEMO_ENTRY_OVERHEAD_BYTES;
        seen.push(new_timed_out);
        let previous = std::mem::replace(&mut self.state, new_state);
        self.calls.push((call, previous, forced));
        if self.timed_out(op) {
            set_bit(&mut self.timed_out_set, bit);
        } else {
            set_bit(&mut self.finite_set, bit);
            self.pending_finite -= 1;
        }
        self.events.lift(call);
        true
    }

    /// Undoes linearized operations up to and including the last one chosen by branching, and
    /// returns where the scan for its alternatives resumes; None when nothing is left to undo
    /// (the history is not linearizable).
    fn backtrack(&mut self) -> Option<u32> {
        loop {
            let (call, previous, forced) = self.calls.pop()?;
            let op = self.events.op[call as usize] as usize;
            self.state = previous;
            let bit = self.class_index[op];
            if self.timed_out(op) {
                clear_bit(&mut self.timed_out_set, bit);
            } else {
                clear_bit(&mut self.finite_set, bit);
                self.pending_finite += 1;
            }
            self.events.unlift(call);
            if !forced {
                return Some(self.events.next[call as usize]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_appended_state_has_the_fingerprint_of_its_value() {
        let mut state = State::MISSING;
        for part in ["ab", "", "c", "defg"] {
            state = step(&state, &Input::Append(Bytes::from(part)), false).unwrap();
        }
        let direct = State::present(Bytes::from("abcdefg"));
        assert_eq!(state.fingerprint, direct.fingerprint);
        assert_eq!(state, direct);
        // Equal fingerprints alone do not make states equal.
        let forged = State {
            value: Some(Bytes::from("other")),
            fingerprint: direct.fingerprint,
        };
        assert_ne!(forged, direct);
    }

    #[test]
    fn unobserved_timed_out_writes_are_dropped_and_observed_ones_kept() {
        let op = |input, ret| KeyOp {
            call: 0,
            ret,
            timed_out: ret == u64::MAX,
            input,
            record: 0,
        };
        let mut ops = vec![
            op(Input::Append(Bytes::from("seen")), u64::MAX),
            op(Input::Put(Bytes::from("unseen")), u64::MAX),
            op(Input::Put(Bytes::from("")), u64::MAX),
            op(Input::Put(Bytes::from("finite")), 5),
            op(Input::Get(Some(Bytes::from("x-seen-y"))), 9),
            op(Input::Get(Some(Bytes::from("x-se"))), 9),
        ];
        drop_unobserved_timeouts(&mut ops);
        let kept: Vec<String> = ops
            .iter()
            .map(|op| match &op.input {
                Input::Put(v) | Input::Append(v) => String::from_utf8(v.to_vec()).unwrap(),
                Input::Get(_) => "get".into(),
                Input::Delete => "delete".into(),
            })
            .collect();
        assert_eq!(kept, ["seen", "", "finite", "get", "get"]);
    }
}
