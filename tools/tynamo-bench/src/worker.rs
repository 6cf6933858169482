//! The load itself: one glommio executor per thread, one task per connection, each task sending
//! pipelined batches and recording each reply's latency.
//!
//! Closed loop: a connection sends `pipeline` requests, waits for all replies, repeats; latency is
//! reply time minus send time. Open loop (`--rate`): each connection owns a slice of the rate and
//! request i is *due* at `start + phase + i * interval`; whatever is due is sent (up to
//! `pipeline` at once) and latency is measured from the due time, not the send time, so a server
//! stall is charged to every request that should have been sent during it (coordinated-omission
//! correction, as wrk2).
//!
//! Hot path per request: a few RNG draws, a key formatted into a reused buffer, the request
//! encoded into the reused batch, one `Instant::now()` at the reply, one histogram record. No
//! allocation (replies are slices of the connection's read buffer).

use crate::report::{new_histogram, Measured};
use crate::verify::{self, Ledger};
use crate::workload::{format_key, Choice, Dist, KeyChooser, OpKind, Rmw, ValueSize, Workload};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use tynamo::client::{Batch, ClientError, ClientOptions, ClusterClient};
use tynamo::resp::frame::{self, Frame};

/// Requests per batch while filling the key space (`--load`) and in the final scan.
const FILL_BATCH: usize = 256;
/// Pause after a batch failed as a whole, so that a target refusing everything (e.g. a cluster
/// with unowned slots) is not hammered in a tight loop; the client already backed off inside.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How often each thread publishes its recent latencies for the progress line.
const PROGRESS_PERIOD: Duration = Duration::from_millis(500);

/// Where the load goes.
#[derive(Debug, Clone)]
pub enum Target {
    Single(SocketAddr),
    Cluster(Vec<SocketAddr>),
}

/// When the run ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    After(Duration),
    Requests(u64),
}

/// Everything a thread needs to know, shared read-only.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: Target,
    pub threads: usize,
    pub connections: usize,
    pub pipeline: usize,
    pub stop: Stop,
    pub rate: Option<f64>,
    pub workload: Workload,
    pub rmw: Rmw,
    pub keys: u64,
    /// Most keys workload D may insert beyond `keys`.
    pub inserts_max: u64,
    pub dist: Dist,
    pub value_size: ValueSize,
    pub load: bool,
    pub stale: bool,
    pub verify: bool,
    pub key_prefix: Vec<u8>,
    pub counter_prefix: Vec<u8>,
    pub seed: u64,
    pub client: ClientOptions,
    pub progress: bool,
}

/// Cross-thread state (atomics and a few locks touched once per period, never per request).
pub struct Shared {
    requests_left: AtomicI64,
    inserted: AtomicU64,
    pub ops_done: AtomicU64,
    pub errors: AtomicU64,
    pub progress_us: Mutex<Histogram<u64>>,
    stop: AtomicBool,
    fatal: Mutex<Option<String>>,
    ready: Barrier,
}

impl Shared {
    pub fn new(cfg: &Config) -> Shared {
        let requests = match cfg.stop {
            Stop::Requests(n) => i64::try_from(n).unwrap_or(i64::MAX),
            Stop::After(_) => i64::MAX,
        };
        Shared {
            requests_left: AtomicI64::new(requests),
            inserted: AtomicU64::new(0),
            ops_done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            progress_us: Mutex::new(new_histogram()),
            stop: AtomicBool::new(false),
            fatal: Mutex::new(None),
            ready: Barrier::new(cfg.threads),
        }
    }

    /// Records the first fatal error (unreachable target, garbage) and stops every thread.
    pub fn fail(&self, why: String) {
        if let Ok(mut f) = self.fatal.lock() {
            f.get_or_insert(why);
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().ok().and_then(|f| f.clone())
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// What one thread measured.
pub struct ThreadResult {
    pub measured: Measured,
    pub elapsed: Duration,
    pub mismatches: u64,
    pub samples: Vec<String>,
    pub keys_scanned: u64,
}

/// Per-request bookkeeping, parallel to the batch.
#[derive(Clone, Copy)]
struct Meta {
    op: OpKind,
    key: u64,
    /// SET: the version written. GET: the floor when sent (verify).
    version: u64,
    due: Instant,
}

struct ThreadState {
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    measured: RefCell<Measured>,
    recent_us: RefCell<Histogram<u64>>,
    ledger: Option<RefCell<Ledger>>,
    /// Bytes values are cut from when not verifying.
    pattern: Vec<u8>,
}

/// Connection attempts when TynamoDB refuses the client's random session id (below).
const SESSION_ID_ATTEMPTS_MAX: usize = 64;
/// Pause between connection attempts while no seed leads its group (64 x 100 ms bounds it).
const ELECTION_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
/// TynamoDB's answer to `TYNAMO.SESSION <id>` with an id above i64::MAX.
const SESSION_ID_REFUSED: &str = "ERR value is not an integer or out of range";

async fn connect(cfg: &Config, stale: bool) -> Result<ClusterClient, ClientError> {
    let options = ClientOptions {
        read_only: stale,
        ..cfg.client.clone()
    };
    // Workaround: the client draws its session id from all of u64, while the server parses it
    // as an i64 and refuses half of them (the client opens the session on its first connection,
    // so the refusal surfaces here, on no other request). A new client draws a new id: after
    // 64 attempts the odds that every id was refused are 2^-64.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let connected = match &cfg.target {
            Target::Single(addr) => ClusterClient::connect_single(*addr, options.clone()).await,
            Target::Cluster(seeds) => ClusterClient::connect_cluster(seeds, options.clone()).await,
        };
        match connected {
            Err(e)
                if attempts < SESSION_ID_ATTEMPTS_MAX
                    && e.to_string().contains(SESSION_ID_REFUSED) => {}
            // Workaround: a core that does not lead its group answers the session command with
            // -MOVED or -TRYAGAIN, which the client takes as a refusal of that seed; during an
            // election every seed refuses. Wait (bounded) for a leader instead of failing.
            Err(e)
                if attempts < SESSION_ID_ATTEMPTS_MAX && {
                    let text = e.to_string();
                    text.contains("MOVED ") || text.contains("TRYAGAIN ")
                } =>
            {
                glommio::timer::sleep(ELECTION_WAIT).await;
            }
            other => return other,
        }
    }
}

/// Runs thread `t`'s share of the connections; call inside this thread's executor.
pub async fn run_thread(t: usize, cfg: Arc<Config>, shared: Arc<Shared>) -> ThreadResult {
    let ledger_keys = cfg.keys + cfg.inserts_max;
    let mut pattern_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5eed);
    let pattern = (0..cfg.value_size.max)
        .map(|_| pattern_rng.gen_range(b'a'..=b'z'))
        .collect();
    let state = Rc::new(ThreadState {
        ledger: cfg.verify.then(|| RefCell::new(Ledger::new(ledger_keys))),
        measured: RefCell::new(Measured::new()),
        recent_us: RefCell::new(new_histogram()),
        pattern,
        cfg: cfg.clone(),
        shared: shared.clone(),
    });
    let mine: Vec<usize> = (0..cfg.connections)
        .filter(|c| c % cfg.threads == t)
        .collect();

    // Connect everything first: an unreachable or garbage-speaking target fails fast.
    let mut clients = Vec::with_capacity(mine.len());
    for &c in &mine {
        if shared.stopped() {
            break;
        }
        match connect(&cfg, cfg.stale).await {
            Ok(client) => clients.push((c, client)),
            Err(e) => shared.fail(format!("connection {c}: {e}")),
        }
    }
    if cfg.load && !shared.stopped() {
        let tasks: Vec<_> = clients
            .drain(..)
            .map(|(c, client)| glommio::spawn_local(fill(state.clone(), c, client)))
            .collect();
        for task in tasks {
            match task.await {
                Ok(pair) => clients.push(pair),
                Err(e) => shared.fail(e),
            }
        }
    }
    // Every thread reaches this exactly once, failed or not, so none waits forever.
    shared.ready.wait();

    let start = Instant::now();
    let mut elapsed = Duration::ZERO;
    if !shared.stopped() {
        let progress = cfg
            .progress
            .then(|| glommio::spawn_local(publish_progress(state.clone())));
        let tasks: Vec<_> = clients
            .drain(..)
            .map(|(c, client)| glommio::spawn_local(drive(state.clone(), c, client, start)))
            .collect();
        for task in tasks {
            task.await;
        }
        elapsed = start.elapsed();
        if let Some(p) = progress {
            p.cancel().await;
        }
    }
    let mut keys_scanned = 0;
    if cfg.verify && shared.fatal().is_none() {
        match final_scan(&state).await {
            Ok(n) => keys_scanned = n,
            Err(e) => shared.fail(format!("final scan: {e}")),
        }
    }
    let (mismatches, samples) = match &state.ledger {
        Some(l) => {
            let l = l.borrow();
            (l.mismatches, l.samples.clone())
        }
        None => (0, Vec::new()),
    };
    let measured = std::mem::take(&mut *state.measured.borrow_mut());
    ThreadResult {
        measured,
        elapsed,
        mismatches,
        samples,
        keys_scanned,
    }
}

/// The connection that owns (is the only writer of) `key` in verify mode.
fn owned_key(key: u64, c: usize, connections: usize, keys: u64) -> u64 {
    let n = connections as u64;
    let k = key - key % n + c as u64;
    if k >= keys {
        k - n
    } else {
        k
    }
}

/// `--load`: connection `c` writes every key it owns once (version 1 when verifying).
async fn fill(
    state: Rc<ThreadState>,
    c: usize,
    mut client: ClusterClient,
) -> Result<(usize, ClusterClient), String> {
    let cfg = &state.cfg;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ (c as u64).wrapping_mul(0x9e37_79b9));
    let mut batch = Batch::new();
    let mut key_buf = Vec::with_capacity(64);
    let mut metas: Vec<(u64, u64)> = Vec::with_capacity(FILL_BATCH);
    let mut key = c as u64;
    while key < cfg.keys {
        batch.clear();
        metas.clear();
        while key < cfg.keys && batch.len() < FILL_BATCH {
            format_key(&mut key_buf, &cfg.key_prefix, key);
            let size = cfg.value_size.pick(&mut rng);
            let version = state
                .ledger
                .as_ref()
                .map(|l| l.borrow_mut().issue(key))
                .unwrap_or(0);
            batch.push_with(Some(&key_buf), true, 3, |out| {
                frame::put_bulk(out, b"SET");
                frame::put_bulk(out, &key_buf);
                if version > 0 {
                    verify::put_value(out, key, version, size);
                } else {
                    frame::put_bulk(out, &state.pattern[..size]);
                }
            });
            metas.push((key, version));
            key += cfg.connections as u64;
        }
        client
            .execute(&mut batch)
            .await
            .map_err(|e| format!("--load, connection {c}: {e}"))?;
        for (i, &(k, version)) in metas.iter().enumerate() {
            match batch.reply(i) {
                Frame::Simple(s) if &s[..] == b"OK" => {
                    if let Some(l) = &state.ledger {
                        l.borrow_mut().acked(k, version);
                    }
                }
                other => return Err(format!("--load: SET of key {k} answered {other}")),
            }
        }
    }
    Ok((c, client))
}

/// Copies this thread's recent latencies into the shared progress histogram now and then.
async fn publish_progress(state: Rc<ThreadState>) {
    loop {
        glommio::timer::sleep(PROGRESS_PERIOD).await;
        let mut recent = state.recent_us.borrow_mut();
        if let Ok(mut shared) = state.shared.progress_us.lock() {
            let _ = shared.add(&*recent);
        }
        recent.reset();
    }
}

/// The load loop of connection `c` until the stop condition.
async fn drive(state: Rc<ThreadState>, c: usize, mut client: ClusterClient, start: Instant) {
    let cfg = &state.cfg;
    let shared = &state.shared;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1 + c as u64));
    let chooser = KeyChooser::new(cfg.dist, cfg.keys);
    let mut batch = Batch::new();
    let mut metas: Vec<Meta> = Vec::with_capacity(cfg.pipeline);
    let mut key_buf = Vec::with_capacity(64);
    // Open loop: this connection's share of the rate, phase-shifted so connections interleave.
    let interval = cfg
        .rate
        .map(|r| Duration::from_secs_f64(cfg.connections as f64 / r));
    let phase = interval
        .map(|i| i.mul_f64(c as f64 / cfg.connections as f64))
        .unwrap_or_default();
    let mut next_due: u64 = 0;
    let deadline = match cfg.stop {
        Stop::After(d) => Some(start + d),
        Stop::Requests(_) => None,
    };
    loop {
        if shared.stopped() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        // How many to send now, and when each was due.
        let mut count = cfg.pipeline;
        let mut first_due = Instant::now();
        if let Some(interval) = interval {
            first_due = start + phase + interval.mul_f64(next_due as f64);
            let now = Instant::now();
            if first_due > now {
                glommio::timer::sleep(first_due - now).await;
            }
            let now = Instant::now();
            let behind =
                now.saturating_duration_since(first_due).as_secs_f64() / interval.as_secs_f64();
            count = (behind as usize + 1).min(cfg.pipeline);
        }
        if let Stop::Requests(_) = cfg.stop {
            let left = shared
                .requests_left
                .fetch_sub(count as i64, Ordering::Relaxed);
            if left <= 0 {
                break;
            }
            count = count.min(left as usize);
        }
        batch.clear();
        metas.clear();
        for i in 0..count {
            let due = match interval {
                Some(iv) => first_due + iv.mul_f64(i as f64),
                None => first_due,
            };
            let meta = next_op(&state, c, &chooser, &mut rng, &mut key_buf, &mut batch, due);
            metas.push(meta);
        }
        next_due += count as u64;
        if interval.is_none() {
            // Closed loop: latency runs from the actual send.
            let sent = Instant::now();
            metas.iter_mut().for_each(|m| m.due = sent);
        }
        match client.execute(&mut batch).await {
            Ok(()) => account(&state, &batch, &metas),
            Err(e) => {
                if matches!(e, ClientError::Protocol { .. }) {
                    shared.fail(format!("connection {c}: {e}"));
                    break;
                }
                let kind = client_error_kind(&e);
                {
                    let mut m = state.measured.borrow_mut();
                    for _ in 0..count {
                        m.error(kind);
                    }
                }
                let before = shared.errors.fetch_add(count as u64, Ordering::Relaxed);
                // The first few errors in full: counts by kind say how many, not why.
                if before < ERRORS_PRINTED_MAX {
                    eprintln!("tynamo-bench: connection {c}: {e}");
                }
                glommio::timer::sleep(ERROR_PAUSE).await;
            }
        }
    }
}

/// Errors printed in full to stderr (the rest are only counted by kind).
const ERRORS_PRINTED_MAX: u64 = 5;

fn client_error_kind(e: &ClientError) -> &'static str {
    match e {
        ClientError::Connect { .. } | ClientError::ConnectTimeout { .. } => "client:connect",
        ClientError::Timeout { .. } => "client:timeout",
        ClientError::Closed { .. } | ClientError::Io { .. } => "client:connection-lost",
        ClientError::RetriesExhausted { .. } => "client:retries-exhausted",
        _ => "client:other",
    }
}

/// Chooses and encodes the next operation into `batch`.
fn next_op(
    state: &ThreadState,
    c: usize,
    chooser: &KeyChooser,
    rng: &mut ChaCha8Rng,
    key_buf: &mut Vec<u8>,
    batch: &mut Batch,
    due: Instant,
) -> Meta {
    let cfg = &state.cfg;
    let shared = &state.shared;
    let existing = cfg.keys + shared.inserted.load(Ordering::Relaxed).min(cfg.inserts_max);
    let mut choice = cfg.workload.choose(rng.gen_range(0..100));
    let mut insert_key = None;
    if choice == Choice::Insert {
        let n = shared.inserted.fetch_add(1, Ordering::Relaxed);
        if n < cfg.inserts_max {
            insert_key = Some(cfg.keys + n);
        } else {
            // The insert budget is spent: keep the mix's write share as updates.
            choice = Choice::Update;
        }
    }
    let ledger = state.ledger.as_ref();
    match choice {
        Choice::Read => {
            let key = chooser.next(rng, existing);
            format_key(key_buf, &cfg.key_prefix, key);
            batch.push(Some(key_buf), false, &[b"GET", key_buf]);
            let floor = ledger.map(|l| l.borrow().floor(key)).unwrap_or(0);
            Meta {
                op: OpKind::Get,
                key,
                version: floor,
                due,
            }
        }
        Choice::Update | Choice::Insert => {
            let mut key = insert_key.unwrap_or_else(|| chooser.next(rng, cfg.keys));
            if ledger.is_some() && insert_key.is_none() {
                key = owned_key(key, c, cfg.connections, cfg.keys);
            }
            format_key(key_buf, &cfg.key_prefix, key);
            let size = cfg.value_size.pick(rng);
            let version = ledger.map(|l| l.borrow_mut().issue(key)).unwrap_or(0);
            batch.push_with(Some(key_buf), true, 3, |out| {
                frame::put_bulk(out, b"SET");
                frame::put_bulk(out, key_buf);
                if version > 0 {
                    verify::put_value(out, key, version, size);
                } else {
                    frame::put_bulk(out, &state.pattern[..size]);
                }
            });
            Meta {
                op: OpKind::Set,
                key,
                version,
                due,
            }
        }
        Choice::Rmw => {
            let mut key = chooser.next(rng, cfg.keys);
            match cfg.rmw {
                Rmw::Incr => {
                    if let Some(l) = ledger {
                        key = owned_key(key, c, cfg.connections, cfg.keys);
                        l.borrow_mut().issue_incr(key);
                    }
                    format_key(key_buf, &cfg.counter_prefix, key);
                    batch.push(Some(key_buf), true, &[b"INCR", key_buf]);
                    Meta {
                        op: OpKind::Incr,
                        key,
                        version: 0,
                        due,
                    }
                }
                Rmw::Append => {
                    // A short suffix: appending whole values to hot keys would grow them without bound.
                    let size = cfg.value_size.pick(rng).clamp(1, 16);
                    format_key(key_buf, &cfg.key_prefix, key);
                    batch.push(
                        Some(key_buf),
                        true,
                        &[b"APPEND", key_buf, &state.pattern[..size]],
                    );
                    Meta {
                        op: OpKind::Append,
                        key,
                        version: 0,
                        due,
                    }
                }
            }
        }
    }
}

/// Records latencies and checks replies of a finished batch.
fn account(state: &ThreadState, batch: &Batch, metas: &[Meta]) {
    let mut measured = state.measured.borrow_mut();
    let mut recent = state.recent_us.borrow_mut();
    let mut ledger = state.ledger.as_ref().map(|l| l.borrow_mut());
    let mut errors = 0u64;
    for (i, meta) in metas.iter().enumerate() {
        let reply = batch.reply(i);
        if let Some(message) = reply.as_error() {
            let word = message.split(|&b| b == b' ').next().unwrap_or_default();
            measured.error(std::str::from_utf8(word).unwrap_or("ERR"));
            errors += 1;
            continue;
        }
        let at = batch.replied_at(i).unwrap_or_else(Instant::now);
        let latency_us =
            u64::try_from(at.saturating_duration_since(meta.due).as_micros()).unwrap_or(u64::MAX);
        measured.record(meta.op, latency_us);
        if state.cfg.progress {
            recent.saturating_record(latency_us.max(1));
        }
        match meta.op {
            OpKind::Get => {
                if *reply == Frame::Null {
                    measured.misses += 1;
                }
                if let Some(l) = ledger.as_mut() {
                    // Stale reads may legitimately go back in time; only their shape is checked.
                    let floor = if state.cfg.stale { 0 } else { meta.version };
                    l.check_read(meta.key, floor, reply);
                }
            }
            OpKind::Set => match (reply, ledger.as_mut()) {
                (Frame::Simple(s), Some(l)) if &s[..] == b"OK" => l.acked(meta.key, meta.version),
                (Frame::Simple(s), None) if &s[..] == b"OK" => {}
                (other, Some(l)) => l.mismatch(format!("SET key {} answered {other}", meta.key)),
                (_, None) => measured.error("unexpected-reply"),
            },
            OpKind::Incr => {
                if let Some(l) = ledger.as_mut() {
                    l.check_incr(meta.key, reply);
                } else if !matches!(reply, Frame::Integer(_)) {
                    measured.error("unexpected-reply");
                }
            }
            OpKind::Append => {
                if !matches!(reply, Frame::Integer(_)) {
                    measured.error("unexpected-reply");
                }
            }
        }
    }
    state
        .shared
        .ops_done
        .fetch_add(metas.len() as u64, Ordering::Relaxed);
    if errors > 0 {
        state.shared.errors.fetch_add(errors, Ordering::Relaxed);
    }
}

/// Re-reads every key this thread saw written (linearizable reads, a fresh client): each must
/// hold at least the newest version known. Returns how many keys were read.
async fn final_scan(state: &ThreadState) -> Result<u64, ClientError> {
    let cfg = &state.cfg;
    let Some(ledger) = state.ledger.as_ref() else {
        return Ok(0);
    };
    let mut client = connect(cfg, false).await?;
    let keys: Vec<u64> = ledger.borrow().written_keys().collect();
    let counters: Vec<u64> = ledger.borrow().counted_keys().collect();
    let mut batch = Batch::new();
    let mut key_buf = Vec::with_capacity(64);
    for (list, prefix, counter) in [
        (&keys, &cfg.key_prefix, false),
        (&counters, &cfg.counter_prefix, true),
    ] {
        for chunk in list.chunks(FILL_BATCH) {
            batch.clear();
            for &k in chunk {
                format_key(&mut key_buf, prefix, k);
                batch.push(Some(&key_buf), false, &[b"GET", &key_buf]);
            }
            client.execute(&mut batch).await?;
            let mut l = ledger.borrow_mut();
            for (i, &k) in chunk.iter().enumerate() {
                if counter {
                    l.check_final_counter(k, batch.reply(i));
                } else {
                    l.check_final(k, batch.reply(i));
                }
            }
        }
    }
    Ok((keys.len() + counters.len()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_keys_belong_to_their_connection_and_stay_in_range() {
        for keys in [10u64, 11, 100] {
            for c in 0..4 {
                for k in 0..keys {
                    let o = owned_key(k, c, 4, keys);
                    assert!(o < keys, "key {k} -> {o} of {keys}");
                    assert_eq!(o % 4, c as u64);
                }
            }
        }
    }
}
