//! WAL benchmark: durable appends per second through `tynamo_wal::Wal` against the raw device
//! limit measured in the same run, directory and filesystem.
//!
//! For each entry size (128 B, 1 KiB, 16 KiB) and batch size (1, 16, 256) it runs
//! - `raw`: a plain loop of aligned O_DIRECT writes of the batch's payload bytes (rounded up
//!   to the DMA alignment) into a preallocated, pre-written file, each followed by fdatasync.
//!   Before each write the batch's bytes are copied into the aligned buffer, off the clock and
//!   off the CPU count: like every log, the loop writes memory it has just filled;
//! - `raw_dsync`, for reference only (not in the ratio): the same, through a second descriptor
//!   opened with O_DSYNC and no fdatasync: one request per batch, whose completion means
//!   durable (the kernel flushes the device cache after the write, or uses FUA);
//! - `raw_same`, for reference only (not in the ratio): the `raw` loop rewriting one buffer
//!   that never changes. On this VM such a write completes 30-40 us sooner than a write of
//!   memory the CPU has just written (even rewritten with the same values), which no log can
//!   have: every append writes new bytes. (Measured with a bare io_uring loop outside glommio
//!   too, 256 KiB write + fdatasync: p50 147-163 us unchanged, 184-262 us freshly written.)
//! - `wal`: `Wal::append` of the batch (encode, one write, one fdatasync; a batch of 192 KiB
//!   or more is written in slices while it is encoded), each batch durable before the next
//!   one starts. Compaction runs as Raft's would after snapshots, so segments
//!   are recycled (steady state); spare segments are prepared before timing.
//!
//! It prints a table (with, per loop, the CPU time of the executor thread per batch: what a
//! loop costs besides waiting for the device, which the machine's other load disturbs far
//! less than latency), latency percentiles from an HdrHistogram, and as its last line
//! `RESULT key=value ...` with `wal_vs_raw_ratio_<size>_b<batch>` (WAL against `raw`, never
//! against `raw_dsync`) for each cell, and `wal_vs_raw_same_ratio_<size>_b<batch>` (against
//! `raw_same`, the reference of earlier versions of this benchmark) beside it.
//!
//! Run: `cargo bench --bench wal` (about 80 s). `WAL_BENCH_SECS=0.3` for a quick run,
//! `WAL_BENCH_DIR=/path` to pick the filesystem (default: `target/wal-bench`),
//! `WAL_BENCH_ONLY=128x16` to run one cell, `WAL_BENCH_SLICES=20` to alternate the loops in
//! fewer, longer slices (see `SLICES`).

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::io::{DmaFile, OpenOptions};
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use tynamo_wal::{EntryRef, Wal, WalOptions};

const SIZES: [usize; 3] = [128, 1024, 16 << 10];
const BATCHES: [usize; 3] = [1, 16, 256];
/// The raw loop writes into this file, wrapping around.
const RAW_FILE_BYTES: u64 = 256 << 20;
/// Latency histogram bounds: 1 us .. 10 s, 3 significant digits.
const LATENCY_US_MAX: u64 = 10_000_000;
/// Appends between two `compact_prefix` calls in the WAL loop.
const COMPACT_EVERY_APPENDS: u64 = 64;

struct Cell {
    size: usize,
    batch: usize,
    raw: Run,
    raw_dsync: Run,
    raw_same: Run,
    wal: Run,
}

/// Totals over the slices of one side of a cell.
struct Run {
    entries: u64,
    bytes: u64,
    /// Batches made durable.
    batches: u64,
    elapsed_s: f64,
    /// CPU time of the executor thread (user + system): what the loop costs besides waiting
    /// for the device, a figure the machine's other load disturbs less than latency.
    cpu_s: f64,
    latency_us: Histogram<u64>,
}

impl Run {
    fn new() -> Run {
        Run {
            entries: 0,
            bytes: 0,
            batches: 0,
            elapsed_s: 0.0,
            cpu_s: 0.0,
            latency_us: histogram(),
        }
    }

    fn entries_per_s(&self) -> f64 {
        self.entries as f64 / self.elapsed_s.max(1e-9)
    }

    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed_s.max(1e-9) / 1e6
    }

    fn cpu_us_per_batch(&self) -> f64 {
        self.cpu_s * 1e6 / self.batches.max(1) as f64
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer it is given, which points to one.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_THREAD)");
    // SAFETY: getrusage succeeded, so it initialised the struct (and it started zeroed).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Each cell alternates up to this many slices of each loop (10 ms each at the default 2 s
/// per loop; `WAL_BENCH_SLICES` sets the number for every cell).
///
/// Why so many: the machine is shared, and a burst of latency on the host lasts longer than
/// a 100 ms slice often enough to land on one loop only. With 20 slices, three rounds of the
/// batch-1 cells gave p99 ratios (WAL over raw) from 0.42 to 2.41 for the same code; with
/// 200, from 1.05 to 1.14 (2026-12-07). The throughput ratios move less, the same way.
const SLICES: usize = 200;
/// Fewer slices for slow batches: a slice holds at least this many batches, as the first
/// batch of a slice runs with caches the other loops have just used...
const SLICE_BATCHES_MIN: usize = 20;
/// ...but never fewer slices than this.
const SLICES_MIN: usize = 20;

fn secs_per_run() -> f64 {
    std::env::var("WAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0)
}

fn bench_dir() -> PathBuf {
    std::env::var("WAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target")
                .join("wal-bench")
        })
}

/// A benchmark step's failure: what failed, on which file, and the error.
type BenchResult<T> = Result<T, String>;

/// Maps an I/O error to "what path: error".
fn ctx<'a, E: std::fmt::Display>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(E) -> String + 'a {
    move |e| format!("{what} {}: {e}", path.display())
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("histogram bounds")
}

async fn make_raw_file(path: &Path) -> BenchResult<DmaFile> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .dma_open(path)
        .await
        .map_err(ctx("open", path))?;
    file.pre_allocate(RAW_FILE_BYTES, false)
        .await
        .map_err(ctx("fallocate", path))?;
    // Written once, like the WAL's segments: no unwritten extents in the measured loop.
    let chunk = 1 << 20;
    let mut pos = 0;
    while pos < RAW_FILE_BYTES {
        let mut buf = glommio::allocate_dma_buffer(chunk);
        buf.as_bytes_mut().fill(0);
        let n = file.write_at(buf, pos).await.map_err(ctx("zero", path))?;
        if n == 0 {
            return Err(format!(
                "zero {}: write at {pos} wrote nothing",
                path.display()
            ));
        }
        pos += n as u64;
    }
    file.fdatasync().await.map_err(ctx("fdatasync", path))?;
    Ok(file)
}

/// How a raw loop writes its batches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// Fresh bytes in the buffer before each write + fdatasync: the reference.
    Fresh,
    /// Fresh bytes, a descriptor opened with O_DSYNC, no fdatasync.
    FreshDsync,
    /// One buffer, never changed after the first write, + fdatasync.
    Same,
}

/// A raw loop: write + fdatasync per batch (without it for `FreshDsync`).
async fn run_raw(
    file: &DmaFile,
    kind: Raw,
    payload: &[u8],
    size: usize,
    batch: usize,
    secs: f64,
    run: &mut Run,
) -> BenchResult<()> {
    let align = file.alignment() as usize;
    let bytes = size * batch;
    let write_bytes = bytes.div_ceil(align) * align;
    let mut buf = glommio::allocate_dma_buffer(write_bytes);
    for (i, b) in buf.as_bytes_mut().iter_mut().enumerate() {
        *b = (i * 31 + 7) as u8;
    }
    let mut buf = Rc::new(buf);
    let run_for = Duration::from_secs_f64(secs);
    let cpu = thread_cpu_s();
    let start = Instant::now();
    // Time spent filling the buffer, taken off both the clock and the CPU count: the
    // reference is the device, not a copy loop.
    let mut fill = Duration::ZERO;
    let mut pos = RAW_POS.with(|p| p.get());
    while start.elapsed() - fill < run_for {
        if pos + write_bytes as u64 > RAW_FILE_BYTES {
            pos = 0;
        }
        if kind != Raw::Same {
            let f = Instant::now();
            if Rc::get_mut(&mut buf).is_none() {
                buf = Rc::new(glommio::allocate_dma_buffer(write_bytes));
            }
            if let Some(b) = Rc::get_mut(&mut buf) {
                // The slices the WAL loop appends, shifted per batch: new bytes every time.
                let shift = (run.batches as usize * 8) % 4096;
                for (k, dst) in b.as_bytes_mut()[..bytes].chunks_exact_mut(size).enumerate() {
                    let at = (k * 64 + shift) % (payload.len() - size);
                    dst.copy_from_slice(&payload[at..at + size]);
                }
            }
            fill += f.elapsed();
        }
        let t = Instant::now();
        let n = file
            .write_rc_at(buf.clone(), pos)
            .await
            .map_err(|e| format!("raw write at {pos}: {e}"))?;
        if n != write_bytes {
            return Err(format!("raw write at {pos}: {n} of {write_bytes} bytes"));
        }
        if kind != Raw::FreshDsync {
            file.fdatasync()
                .await
                .map_err(|e| format!("raw fdatasync: {e}"))?;
        }
        run.latency_us
            .saturating_record(t.elapsed().as_micros() as u64);
        pos += write_bytes as u64;
        run.entries += batch as u64;
        run.bytes += bytes as u64;
        run.batches += 1;
    }
    RAW_POS.with(|p| p.set(pos));
    run.elapsed_s += (start.elapsed() - fill).as_secs_f64();
    run.cpu_s += thread_cpu_s() - cpu - fill.as_secs_f64();
    Ok(())
}

thread_local! {
    /// Where the raw loop continues, so slices write fresh blocks like an append-only log.
    static RAW_POS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

async fn run_wal(
    wal: &Wal,
    payload: &[u8],
    size: usize,
    batch: usize,
    secs: f64,
    run: &mut Run,
) -> BenchResult<()> {
    let run_for = Duration::from_secs_f64(secs);
    let mut entries: Vec<EntryRef<'_>> = Vec::with_capacity(batch);
    let cpu = thread_cpu_s();
    let start = Instant::now();
    while start.elapsed() < run_for {
        entries.clear();
        let first = wal.last_index() + 1;
        for k in 0..batch {
            // Distinct slices of one buffer, as entries arriving in a receive buffer would be.
            let at = (k * 64) % (payload.len() - size);
            entries.push(EntryRef {
                index: first + k as u64,
                term: 1,
                kind: 0,
                payload: &payload[at..at + size],
            });
        }
        let t = Instant::now();
        wal.append(&entries)
            .await
            .map_err(|e| format!("wal append at {first}: {e}"))?;
        run.latency_us
            .saturating_record(t.elapsed().as_micros() as u64);
        run.entries += batch as u64;
        run.bytes += (batch * size) as u64;
        run.batches += 1;
        if wal.stats().appends % COMPACT_EVERY_APPENDS == 0 {
            // As Raft would after a snapshot: keep the log short so segments get recycled.
            wal.compact_prefix(wal.last_index().saturating_sub(1))
                .await
                .map_err(|e| format!("wal compact: {e}"))?;
        }
    }
    run.elapsed_s += start.elapsed().as_secs_f64();
    run.cpu_s += thread_cpu_s() - cpu;
    Ok(())
}

async fn bench(dir: PathBuf, secs: f64) -> BenchResult<Vec<Cell>> {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(ctx("create", &dir))?;
    let wal_dir = dir.join("wal");
    let opts = WalOptions {
        spare_segments_max: 4,
        ..WalOptions::default()
    };
    // Open the WAL first: its open makes glommio probe the device with a non-empty file.
    let wal = Wal::open(&wal_dir, opts)
        .await
        .map_err(|e| format!("open wal {}: {e}", wal_dir.display()))?;
    wal.prepare_spares()
        .await
        .map_err(|e| format!("prepare spare segments: {e}"))?;
    let raw_path = dir.join("raw.dat");
    let raw = make_raw_file(&raw_path).await?;
    let raw_dsync = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .dma_open(&raw_path)
        .await
        .map_err(ctx("open with O_DSYNC", &raw_path))?;
    let payload: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 131 + 17) as u8).collect();

    let mut cells = Vec::new();
    let only = std::env::var("WAL_BENCH_ONLY").ok();
    let slices_env: Option<usize> = std::env::var("WAL_BENCH_SLICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0);
    for &size in &SIZES {
        for &batch in &BATCHES {
            if let Some(o) = &only {
                if *o != format!("{size}x{batch}") {
                    continue;
                }
            }
            // Alternate short slices of raw and WAL so that both see the same background load
            // (the machine is shared): the ratio is then a fair comparison.
            let mut raw_run = Run::new();
            let mut raw_dsync_run = Run::new();
            let mut raw_same_run = Run::new();
            let mut wal_run = Run::new();
            // Each loop warms up once per cell, as long as one slice of the 20-slice default.
            let warm = (secs / 20.0).min(0.2);
            let p = &payload[..];
            let mut warm_raw = Run::new();
            run_raw(&raw, Raw::Fresh, p, size, batch, warm, &mut warm_raw).await?;
            // A slice holds at least `SLICE_BATCHES_MIN` batches (16 KiB x 256 takes ~2 ms a
            // batch), at most `SLICES` slices per cell.
            let batch_s = warm_raw.elapsed_s / warm_raw.batches.max(1) as f64;
            let slices = slices_env.unwrap_or_else(|| {
                let fit = (secs / (SLICE_BATCHES_MIN as f64 * batch_s)) as usize;
                fit.clamp(SLICES_MIN, SLICES)
            });
            let slice = secs / slices as f64;
            run_raw(
                &raw_dsync,
                Raw::FreshDsync,
                p,
                size,
                batch,
                warm,
                &mut Run::new(),
            )
            .await?;
            run_raw(&raw, Raw::Same, p, size, batch, warm, &mut Run::new()).await?;
            run_wal(&wal, p, size, batch, warm, &mut Run::new()).await?;
            for _ in 0..slices {
                run_raw(&raw, Raw::Fresh, p, size, batch, slice, &mut raw_run).await?;
                let dsync_run = &mut raw_dsync_run;
                run_raw(
                    &raw_dsync,
                    Raw::FreshDsync,
                    p,
                    size,
                    batch,
                    slice,
                    dsync_run,
                )
                .await?;
                run_raw(&raw, Raw::Same, p, size, batch, slice, &mut raw_same_run).await?;
                run_wal(&wal, p, size, batch, slice, &mut wal_run).await?;
            }
            let c = Cell {
                size,
                batch,
                raw: raw_run,
                raw_dsync: raw_dsync_run,
                raw_same: raw_same_run,
                wal: wal_run,
            };
            print_cell(&c);
            cells.push(c);
        }
    }
    let stats = wal.stats();
    println!(
        "wal totals: {} appends, {} rounds, {} writes, {} fdatasyncs, {:.1} MB written",
        stats.appends,
        stats.rounds,
        stats.writes,
        stats.fdatasyncs,
        stats.bytes_written as f64 / 1e6
    );
    wal.close().await.map_err(|e| format!("close wal: {e}"))?;
    raw_dsync
        .close()
        .await
        .map_err(ctx("close (O_DSYNC)", &raw_path))?;
    raw.close().await.map_err(ctx("close", &raw_path))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(cells)
}

fn size_name(size: usize) -> String {
    if size >= 1024 {
        format!("{}k", size / 1024)
    } else {
        size.to_string()
    }
}

fn print_header() {
    println!(
        "{:>6} {:>5} | {:>12} {:>9} {:>8} {:>8} | {:>12} {:>9} {:>8} {:>8} | {:>6} | {:>12} {:>8} {:>8} | {:>11} {:>8} | {:>7} {:>7}",
        "size",
        "batch",
        "raw ent/s",
        "raw MB/s",
        "raw p50",
        "raw p99",
        "wal ent/s",
        "wal MB/s",
        "wal p50",
        "wal p99",
        "ratio",
        "dsync ent/s",
        "dsync p50",
        "dsync p99",
        "same ent/s",
        "same p50",
        "raw cpu",
        "wal cpu"
    );
}

fn print_cell(c: &Cell) {
    println!(
        "{:>6} {:>5} | {:>12.0} {:>9.1} {:>6}us {:>6}us | {:>12.0} {:>9.1} {:>6}us {:>6}us | {:>6.3} | {:>12.0} {:>6}us {:>6}us | {:>11.0} {:>6}us | {:>5.0}us {:>5.0}us",
        size_name(c.size),
        c.batch,
        c.raw.entries_per_s(),
        c.raw.mb_per_s(),
        c.raw.latency_us.value_at_quantile(0.5),
        c.raw.latency_us.value_at_quantile(0.99),
        c.wal.entries_per_s(),
        c.wal.mb_per_s(),
        c.wal.latency_us.value_at_quantile(0.5),
        c.wal.latency_us.value_at_quantile(0.99),
        c.wal.entries_per_s() / c.raw.entries_per_s(),
        c.raw_dsync.entries_per_s(),
        c.raw_dsync.latency_us.value_at_quantile(0.5),
        c.raw_dsync.latency_us.value_at_quantile(0.99),
        c.raw_same.entries_per_s(),
        c.raw_same.latency_us.value_at_quantile(0.5),
        c.raw.cpu_us_per_batch(),
        c.wal.cpu_us_per_batch(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; no other arguments are used.
    let secs = secs_per_run();
    let dir = bench_dir();
    println!(
        "WAL benchmark: {secs:.1}s per run, directory {} (set WAL_BENCH_SECS / WAL_BENCH_DIR)",
        dir.display()
    );
    print_header();
    let cells = LocalExecutorBuilder::new(Placement::Unbound)
        // Buffers up to this size come from glommio's registered arena (no page pinning per
        // write), larger ones from the heap. 2 MiB puts the 4 MiB batches of both loops on the
        // heap and the smaller ones of both in the arena: with 4 MiB the raw loop's buffer
        // fits exactly and the WAL's (4 MiB + headers) does not, an unfair 15% of CPU.
        .io_memory(2 << 20)
        .name("wal-bench")
        .spawn(move || bench(dir, secs))
        .map_err(|e| format!("start the benchmark's executor: {e}"))
        .and_then(|h| {
            h.join()
                .map_err(|e| format!("the benchmark's executor: {e}"))
        })
        .and_then(|r| r);
    let cells = match cells {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wal benchmark failed: {e}");
            std::process::exit(1);
        }
    };

    println!();
    println!("latency of one append+fdatasync, batch 1 (us):");
    for c in cells.iter().filter(|c| c.batch == 1) {
        for (name, h) in [
            ("raw", &c.raw.latency_us),
            ("raw_dsync", &c.raw_dsync.latency_us),
            ("raw_same", &c.raw_same.latency_us),
            ("wal", &c.wal.latency_us),
        ] {
            println!(
                "  {:>4} {name:>9}: p50 {:>6} p90 {:>6} p99 {:>6} p99.9 {:>6} max {:>7} (n={})",
                size_name(c.size),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max(),
                h.len()
            );
        }
    }

    let mut kv = Vec::new();
    let mut ratio_min = f64::MAX;
    let mut same_ratio_min = f64::MAX;
    let mut p99_ratio_max: f64 = 0.0;
    for c in &cells {
        let key = format!("{}_b{}", c.size, c.batch);
        let ratio = c.wal.entries_per_s() / c.raw.entries_per_s();
        ratio_min = ratio_min.min(ratio);
        kv.push(format!(
            "wal_appends_per_s_{key}={:.0}",
            c.wal.entries_per_s()
        ));
        kv.push(format!(
            "raw_appends_per_s_{key}={:.0}",
            c.raw.entries_per_s()
        ));
        kv.push(format!("wal_mb_per_s_{key}={:.2}", c.wal.mb_per_s()));
        kv.push(format!("raw_mb_per_s_{key}={:.2}", c.raw.mb_per_s()));
        kv.push(format!(
            "raw_dsync_appends_per_s_{key}={:.0}",
            c.raw_dsync.entries_per_s()
        ));
        kv.push(format!(
            "raw_same_appends_per_s_{key}={:.0}",
            c.raw_same.entries_per_s()
        ));
        kv.push(format!("wal_vs_raw_ratio_{key}={ratio:.3}"));
        let ratio_same = c.wal.entries_per_s() / c.raw_same.entries_per_s();
        same_ratio_min = same_ratio_min.min(ratio_same);
        kv.push(format!("wal_vs_raw_same_ratio_{key}={ratio_same:.3}"));
        kv.push(format!(
            "wal_cpu_us_per_batch_{key}={:.1}",
            c.wal.cpu_us_per_batch()
        ));
        kv.push(format!(
            "raw_cpu_us_per_batch_{key}={:.1}",
            c.raw.cpu_us_per_batch()
        ));
        if c.batch == 1 {
            let w = c.wal.latency_us.value_at_quantile(0.99);
            let r = c.raw.latency_us.value_at_quantile(0.99);
            let pr = w as f64 / r.max(1) as f64;
            p99_ratio_max = p99_ratio_max.max(pr);
            kv.push(format!("wal_p99_us_{key}={w}"));
            kv.push(format!("raw_p99_us_{key}={r}"));
            kv.push(format!("wal_vs_raw_p99_{key}={pr:.3}"));
        }
    }
    kv.push(format!("wal_vs_raw_ratio_min={ratio_min:.3}"));
    kv.push(format!("wal_vs_raw_same_ratio_min={same_ratio_min:.3}"));
    kv.push(format!("wal_vs_raw_p99_b1_max={p99_ratio_max:.3}"));
    println!();
    println!("RESULT {}", kv.join(" "));
}
