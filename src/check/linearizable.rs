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
//! - a new state is refused when it contradicts a pending read that no put or delete can
//!   precede (appends only grow a value, so the state must be a prefix of what it read):
//!   concurrent appends are not tried in all their orders;
//! - the memo cache treats timed-out writes as optional: a configuration is pruned when one
//!   with the same finite operations and state, and a subset of its timed-out ones, was seen.
//!
//! Cost sketch (2-core CI machine, from the tests): 4000 operations on one key with 8 clients
//! (puts, appends, deletes, gets, 5% timeouts) take ~0.5M steps, ~0.3 s; appends and gets only
//! take about one step per operation even at 12 clients. Mixed writes at 10+ concurrent
//! clients on one key can need millions of steps: the step budget then gives `Unknown`, so
//! workloads should spread clients over keys. Memory: one cache entry per step of about
//! n/8 bytes plus the value (values are shared `Bytes`).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::history::{JsonBytes, OpKind, Record, Status};

/// Limits and options of a check.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Search steps allowed per key before the key's verdict is Unknown.
    pub steps_max_per_key: u64,
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
    ret: u64,
    input: Input,
    record: usize,
}

type State = Option<Bytes>;

/// The sequential model of one key: a value or missing.
fn step(state: &State, input: &Input, missing_equals_empty: bool) -> Option<State> {
    match input {
        Input::Put(value) => Some(Some(value.clone())),
        Input::Append(value) => Some(Some(match state {
            None => value.clone(),
            Some(old) => {
                let mut joined = BytesMut::with_capacity(old.len() + value.len());
                joined.extend_from_slice(old);
                joined.extend_from_slice(value);
                joined.freeze()
            }
        })),
        Input::Delete => Some(None),
        Input::Get(seen) => {
            let equal = if missing_equals_empty {
                state.as_deref().unwrap_or_default() == seen.as_deref().unwrap_or_default()
            } else {
                state == seen
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
        let timed_out = r.status == Status::Timeout;
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
            // A validated record always has a complete time unless it timed out.
            _ => u64::MAX,
        };
        by_key.entry(&r.key).or_default().push(KeyOp {
            call: r.invoke,
            ret,
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
        op.ret == u64::MAX && matches!(&op.input, Input::Put(v) | Input::Append(v) if !v.is_empty())
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

/// Pending reads whose results are checked against a new state at each search step.
const PENDING_READS_CHECKED_MAX: usize = 64;

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
        let mut order: Vec<(u64, u8, u32)> = Vec::with_capacity(2 * n);
        for (i, op) in ops.iter().enumerate() {
            order.push((op.call, 0, i as u32));
            order.push((op.ret, 1, i as u32));
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
        if steps > config.steps_max_per_key {
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
        // a return before the end of the list.
        debug_assert_ne!(entry, NIL);
        let e = entry as usize;
        if search.events.matching[e] != NIL {
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
    cache: HashMap<(Vec<u64>, State), Vec<Vec<u64>>>,
    /// The linearized calls, the state before each, and whether it was forced (no branching).
    calls: Vec<(u32, State, bool)>,
    state: State,
    /// Whether the key has any put or delete (if not, its value only grows).
    has_resets: bool,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [KeyOp], missing_equals_empty: bool) -> Search<'a> {
        let mut class_index = Vec::with_capacity(ops.len());
        let (mut finite_count, mut timed_out_count) = (0usize, 0usize);
        for op in ops {
            if op.ret == u64::MAX {
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
            cache: HashMap::new(),
            calls: Vec::new(),
            state: None,
            has_resets: ops
                .iter()
                .any(|op| matches!(op.input, Input::Put(_) | Input::Delete)),
        }
    }

    fn timed_out(&self, op: usize) -> bool {
        self.ops[op].ret == u64::MAX
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
    /// A read not yet linearized comes after every operation linearized from here on. If no
    /// put or delete can be linearized before it (none is pending with a call before the read's
    /// return), only appends can change the value until then, so the current value must be a
    /// prefix of what the read returned, and a present value can never become missing. Without
    /// this, concurrent appends are tried in all their orders (k! for k of them) before a read
    /// far ahead reveals the one that happened.
    fn contradicts_pending_reads(&self, new_state: &State, call: u32) -> bool {
        let head_next = self.events.next[self.events.head as usize];
        // The earliest call of a pending put or delete (other than the one being linearized).
        let mut reset_call_time = u64::MAX;
        if self.has_resets {
            let mut node = head_next;
            while node != NIL {
                let n = node as usize;
                if self.events.matching[n] != NIL && node != call {
                    let op = &self.ops[self.events.op[n] as usize];
                    if matches!(op.input, Input::Put(_) | Input::Delete) {
                        reset_call_time = op.call;
                        break;
                    }
                }
                node = self.events.next[n];
            }
        }
        let empty = Bytes::new();
        let current = match new_state {
            None if !self.missing_equals_empty => return false,
            None => &empty,
            Some(value) => value,
        };
        // Pending reads in time order, up to the first pending reset (a read returning before it
        // has its call before it too). Bounded, so a step costs O(window), not O(history).
        let mut node = head_next;
        let mut reads_checked = 0;
        while node != NIL && reads_checked < PENDING_READS_CHECKED_MAX {
            let n = node as usize;
            let op = &self.ops[self.events.op[n] as usize];
            let is_call = self.events.matching[n] != NIL;
            let time = if is_call { op.call } else { op.ret };
            if time >= reset_call_time {
                break;
            }
            if let (true, Input::Get(seen)) = (is_call, &op.input) {
                if op.ret < reset_call_time {
                    reads_checked += 1;
                    let possible = match seen {
                        Some(seen) => seen.starts_with(current),
                        None => self.missing_equals_empty && current.is_empty(),
                    };
                    if !possible {
                        return true;
                    }
                }
            }
            node = self.events.next[n];
        }
        false
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
