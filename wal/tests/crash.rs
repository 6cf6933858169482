//! Crash tests: cut the last segment at every byte of its last records, flip single bits in
//! headers and payloads, and check that reopening recovers exactly the intact records, reports
//! damage to acknowledged records as corruption, and never panics.
#![allow(clippy::needless_range_loop)] // k is a record number used for more than indexing
mod common;

use std::path::{Path, PathBuf};

use common::{run, small_opts, Owned};
use tynamo_wal::format::{scan_segment, RECORD_HEADER_BYTES};
use tynamo_wal::{Error, Wal};

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".wal") && !n.starts_with("spare-")
        })
        .collect();
    v.sort();
    v
}

/// Appends one entry per `append` call (each durable before the next) and closes.
fn build(dir: &Path, sizes: &[usize]) -> Vec<Owned> {
    let entries: Vec<Owned> = sizes
        .iter()
        .enumerate()
        .map(|(k, &len)| Owned::new(k as u64 + 1, 1 + k as u64 / 4, len))
        .collect();
    let path = dir.to_path_buf();
    let sizes = sizes.to_vec();
    run(move || async move {
        let wal = Wal::open(&path, small_opts()).await.unwrap();
        for (k, &len) in sizes.iter().enumerate() {
            let e = Owned::new(k as u64 + 1, 1 + k as u64 / 4, len);
            wal.append(&[e.as_ref()]).await.unwrap();
        }
        wal.close().await.unwrap();
    });
    entries
}

/// (offset, end of payload) of every record in a segment image.
fn record_spans(bytes: &[u8], seq: u32, first_index: u64) -> Vec<(u64, u64)> {
    let scan = scan_segment(bytes, Path::new("x"), seq, first_index, true, 1 << 20).unwrap();
    scan.records
        .iter()
        .map(|r| {
            (
                r.offset,
                r.offset + RECORD_HEADER_BYTES as u64 + u64::from(r.payload_len),
            )
        })
        .collect()
}

/// Opens the log and checks it holds exactly `want` (and returns the open result's report).
async fn reopen_check(dir: &Path, want: &[Owned]) -> Result<tynamo_wal::RecoveryReport, Error> {
    let wal = Wal::open(dir, small_opts()).await?;
    assert_eq!(wal.last_index(), want.len() as u64, "recovered count");
    if !want.is_empty() {
        let got = wal
            .entries(1, want.len() as u64 + 1, u64::MAX)
            .await
            .unwrap();
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.index, g.term, g.kind), (w.index, w.term, w.kind));
            assert_eq!(&g.payload[..], &w.payload[..], "payload of {}", w.index);
        }
    }
    let report = wal.recovery_report().clone();
    wal.close().await.unwrap();
    Ok(report)
}

/// [`reopen_check`] on an executor of its own.
fn reopen_expect(dir: &Path, want: &[Owned]) -> Result<tynamo_wal::RecoveryReport, Error> {
    let path = dir.to_path_buf();
    let want = want.to_vec();
    let (tx, rx) = std::sync::mpsc::channel();
    run(move || async move {
        tx.send(reopen_check(&path, &want).await).unwrap();
    });
    rx.recv().unwrap()
}

const SIZES: [usize; 10] = [100, 37, 0, 250, 8, 64, 300, 5, 120, 77];

#[test]
fn cut_at_every_byte_of_the_last_records_recovers_the_intact_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let entries = build(dir.path(), &SIZES);
    let seg = segments(dir.path());
    assert_eq!(seg.len(), 1);
    let pristine = std::fs::read(&seg[0]).unwrap();
    let spans = record_spans(&pristine, 1, 1);
    assert_eq!(spans.len(), SIZES.len());
    let from = spans[SIZES.len() - 3].0;
    let to = spans[SIZES.len() - 1].1 + 8;
    // One executor for every cut: thousands of executor start-ups (io_uring rings, a blocking
    // thread each) made this test take tens of minutes on a loaded 2-CPU machine.
    let (path, seg0) = (dir.path().to_path_buf(), seg[0].clone());
    let (all, image, at) = (entries.clone(), pristine.clone(), spans.clone());
    run(move || async move {
        let (pristine, spans) = (image, at);
        for cut in from..=to {
            let mut img = pristine.clone();
            img[cut as usize..].fill(0);
            std::fs::write(&seg0, &img).unwrap();
            let intact = spans.iter().filter(|(_, end)| *end <= cut).count();
            let report = reopen_check(&path, &all[..intact])
                .await
                .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            if let Some((start, end)) = spans.iter().find(|(s, e)| *s + 16 <= cut && cut < *e) {
                assert!(report.dropped_bytes > 0, "cut {cut}: {report:?}");
                assert!(
                    report.dropped_bytes <= end - start + 8,
                    "cut {cut}: {report:?}"
                );
                assert_eq!(
                    report.torn_at.as_ref().map(|t| t.1),
                    Some(*start),
                    "cut {cut}"
                );
            }
            if cut % 13 == 0 {
                // The log continues cleanly after the torn tail.
                let next = Owned::new(intact as u64 + 1, 9, 33);
                let wal = Wal::open(&path, small_opts()).await.unwrap();
                wal.append(&[next.as_ref()]).await.unwrap();
                wal.close().await.unwrap();
                let mut want: Vec<Owned> = all[..intact].to_vec();
                want.push(next);
                let report = reopen_check(&path, &want).await.unwrap();
                assert_eq!(report.dropped_bytes, 0);
            }
        }
    });
    // A file cut short (not only zeroed) behaves the same.
    let cut = spans[SIZES.len() - 1].0 + 20;
    std::fs::write(&seg[0], &pristine[..cut as usize]).unwrap();
    reopen_expect(dir.path(), &entries[..SIZES.len() - 1]).unwrap();
}

/// Verdict the recovery scan must reach for a bit flipped inside record `k` of `n`.
fn flip_verdict(
    k: usize,
    n: usize,
    r: &Result<tynamo_wal::format::SegmentScan, Error>,
    spans: &[(u64, u64)],
) {
    if k == n - 1 {
        let s = r.as_ref().expect("a damaged last record is a torn tail");
        assert_eq!(s.records.len(), n - 1);
        assert_eq!(s.torn.map(|t| t.offset), Some(spans[k].0));
    } else {
        match r {
            Err(Error::Corruption { offset, .. }) => assert_eq!(*offset, spans[k].0),
            other => panic!("flip in record {k} of {n}: expected corruption, got {other:?}"),
        }
    }
}

#[test]
fn every_single_bit_flip_in_the_last_records_is_classified() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), &SIZES);
    let seg = segments(dir.path());
    let pristine = std::fs::read(&seg[0]).unwrap();
    let spans = record_spans(&pristine, 1, 1);
    let n = spans.len();
    for k in n - 3..n {
        let (start, end) = spans[k];
        for bit in start * 8..end * 8 {
            let mut img = pristine.clone();
            img[(bit / 8) as usize] ^= 1 << (bit % 8);
            let r = scan_segment(&img, &seg[0], 1, 1, true, 1 << 20);
            flip_verdict(k, n, &r, &spans);
        }
    }
}

#[test]
fn bit_flips_through_reopen_recover_or_report_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let entries = build(dir.path(), &SIZES);
    let seg = segments(dir.path());
    let pristine = std::fs::read(&seg[0]).unwrap();
    let spans = record_spans(&pristine, 1, 1);
    let n = spans.len();
    for k in n - 3..n {
        let (start, end) = spans[k];
        // Every header bit is covered by the pure test above; here a sample through the disk.
        for bit in (start * 8..end * 8).step_by(29) {
            let mut img = pristine.clone();
            img[(bit / 8) as usize] ^= 1 << (bit % 8);
            std::fs::write(&seg[0], &img).unwrap();
            let r = reopen_expect(dir.path(), &entries[..n - 1]);
            if k == n - 1 {
                let report = r.unwrap_or_else(|e| panic!("bit {bit}: {e}"));
                assert_eq!(report.torn_at.map(|t| t.1), Some(start));
            } else {
                match r {
                    Err(Error::Corruption { offset, path, .. }) => {
                        assert_eq!(offset, start);
                        assert_eq!(path, seg[0]);
                    }
                    other => panic!("bit {bit}: expected corruption, got {other:?}"),
                }
            }
        }
    }
}

#[test]
fn corrupt_record_mid_segment_is_reported_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let sizes: Vec<usize> = (0..20).map(|k| 10 + k * 3).collect();
    let entries = build(dir.path(), &sizes);
    let seg = segments(dir.path());
    let pristine = std::fs::read(&seg[0]).unwrap();
    let spans = record_spans(&pristine, 1, 1);
    let mut img = pristine.clone();
    img[(spans[5].0 + RECORD_HEADER_BYTES as u64 + 2) as usize] ^= 0x40;
    std::fs::write(&seg[0], &img).unwrap();
    match reopen_expect(dir.path(), &entries) {
        Err(Error::Corruption { path, offset, .. }) => {
            assert_eq!(path, seg[0]);
            assert_eq!(offset, spans[5].0);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    // Reporting must not have modified the file: the bytes after the damage are still there.
    assert_eq!(std::fs::read(&seg[0]).unwrap(), img);
}

#[test]
fn torn_batch_with_later_blocks_written_is_a_torn_tail() {
    // Batch B was one write, never synced: its first record lost, later ones landed. They
    // carry B's start as not yet durable, so recovery drops the whole batch.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let wal = Wal::open(&path, small_opts()).await.unwrap();
        let a: Vec<Owned> = (1..=5).map(|i| Owned::new(i, 1, 50)).collect();
        wal.append(&a.iter().map(|e| e.as_ref()).collect::<Vec<_>>())
            .await
            .unwrap();
        let b: Vec<Owned> = (6..=10).map(|i| Owned::new(i, 1, 700)).collect();
        wal.append(&b.iter().map(|e| e.as_ref()).collect::<Vec<_>>())
            .await
            .unwrap();
        wal.close().await.unwrap();
    });
    let seg = segments(dir.path());
    let mut img = std::fs::read(&seg[0]).unwrap();
    let spans = record_spans(&img, 1, 1);
    img[spans[5].0 as usize..spans[5].1 as usize].fill(0);
    std::fs::write(&seg[0], &img).unwrap();
    let want: Vec<Owned> = (1..=5).map(|i| Owned::new(i, 1, 50)).collect();
    let report = reopen_expect(dir.path(), &want).unwrap();
    assert_eq!(report.torn_at.as_ref().map(|t| t.1), Some(spans[5].0));
    assert!(
        report.dropped_bytes >= spans[9].1 - spans[6].0,
        "{report:?}"
    );
}

#[test]
fn damage_in_a_sealed_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB segments: 50 records of 3000 bytes span three segments.
    let sizes = vec![3000usize; 50];
    let entries = build(dir.path(), &sizes);
    let seg = segments(dir.path());
    assert!(seg.len() >= 3, "{seg:?}");
    let pristine = std::fs::read(&seg[0]).unwrap();
    let scan = scan_segment(&pristine, &seg[0], 1, 1, false, 1 << 20).unwrap();
    assert!(scan.sealed);
    let last = *scan.records.last().unwrap();
    // The last record of the first segment, and the seal itself.
    for at in [last.offset + 50, scan.end_offset - 30] {
        let mut img = pristine.clone();
        img[at as usize] ^= 1;
        std::fs::write(&seg[0], &img).unwrap();
        match reopen_expect(dir.path(), &entries) {
            Err(Error::Corruption { path, .. }) => assert_eq!(path, seg[0]),
            other => panic!("offset {at}: expected corruption, got {other:?}"),
        }
    }
    // A damaged segment header.
    let mut img = pristine.clone();
    img[20] ^= 1;
    std::fs::write(&seg[0], &img).unwrap();
    assert!(matches!(
        reopen_expect(dir.path(), &entries),
        Err(Error::Corruption { offset: 0, .. })
    ));
    std::fs::write(&seg[0], &pristine).unwrap();
    reopen_expect(dir.path(), &entries).unwrap();
}

mod garbage {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random bytes anywhere after the segment header: the scan never panics, and what it
        /// accepts is a prefix of what was written.
        #[test]
        fn scan_never_panics_and_accepts_only_a_prefix(
            writes in proptest::collection::vec((4096usize..8192, proptest::collection::vec(any::<u8>(), 1..64)), 1..8),
            is_last in any::<bool>(),
        ) {
            let mut img = vec![0u8; 16384];
            let mut off = 4096u64;
            let mut written = Vec::new();
            for i in 1..=20u64 {
                let e = Owned::new(i, 1, (i as usize * 11) % 90);
                let h = tynamo_wal::format::RecordHeader::new(1, 1, i, 1, e.kind, 4096, &e.payload);
                use zerocopy::IntoBytes;
                let o = off as usize;
                img[o..o + RECORD_HEADER_BYTES].copy_from_slice(h.as_bytes());
                img[o + RECORD_HEADER_BYTES..o + RECORD_HEADER_BYTES + e.payload.len()].copy_from_slice(&e.payload);
                off += tynamo_wal::format::RecordHeader::record_bytes(e.payload.len()) as u64;
                written.push(e);
            }
            for (at, bytes) in &writes {
                let end = (*at + bytes.len()).min(img.len());
                img[*at..end].copy_from_slice(&bytes[..end - at]);
            }
            if let Ok(scan) = scan_segment(&img, Path::new("x"), 1, 1, is_last, 1 << 20) {
                for (r, w) in scan.records.iter().zip(&written) {
                    prop_assert_eq!(r.index, w.index);
                    let p = (r.offset as usize) + RECORD_HEADER_BYTES;
                    prop_assert_eq!(&img[p..p + r.payload_len as usize], &w.payload[..]);
                }
            }
        }
    }
}

mod open_garbage {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::IntoBytes;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Arbitrary bytes as a segment file (with or without a valid header): `Wal::open`
        /// returns a value, never panics, and whatever it accepts reads back.
        #[test]
        fn open_never_panics_on_any_segment_bytes(
            body in proptest::collection::vec(any::<u8>(), 0..12288),
            valid_header in any::<bool>(),
            records in 0u64..6,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut img = body.clone();
            if valid_header {
                img.resize(img.len().max(4096), 0);
                let h = tynamo_wal::format::SegmentHeader::new(1, 1);
                img[..h.as_bytes().len()].copy_from_slice(h.as_bytes());
                img[h.as_bytes().len()..4096].fill(0);
                // A few genuine records after the header, then the random bytes.
                let mut off = 4096usize;
                for i in 1..=records {
                    let e = Owned::new(i, 1, 20);
                    let rh = tynamo_wal::format::RecordHeader::new(1, 1, i, 1, e.kind, 4096, &e.payload);
                    let end = off + tynamo_wal::format::RecordHeader::record_bytes(20);
                    img.resize(img.len().max(end), 0);
                    img[off..off + RECORD_HEADER_BYTES].copy_from_slice(rh.as_bytes());
                    img[off + RECORD_HEADER_BYTES..off + RECORD_HEADER_BYTES + 20].copy_from_slice(&e.payload);
                    img[off + RECORD_HEADER_BYTES + 20..end].fill(0);
                    off = end;
                }
            }
            std::fs::write(dir.path().join("0000000001.wal"), &img).unwrap();
            let path = dir.path().to_path_buf();
            run(move || async move {
                match Wal::open(&path, small_opts()).await {
                    Ok(wal) => {
                        let (first, last) = (wal.first_index(), wal.last_index());
                        if valid_header {
                            // The genuine records survive; random bytes after them are a torn
                            // tail (a random record with a matching CRC is not a concern).
                            assert_eq!((first, last), (1, records));
                        }
                        if last >= first {
                            let got = wal.entries(first, last + 1, u64::MAX).await.unwrap();
                            assert_eq!(got.len() as u64, last + 1 - first);
                        }
                        wal.close().await.unwrap();
                    }
                    Err(Error::Corruption { .. }) if !valid_header => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            });
        }
    }
}

/// A batch large enough to be written in slices while it is encoded (several writes, one
/// fdatasync): if the crash lost its first slice while later ones landed, recovery drops the
/// whole batch as a torn tail; damage to the synced batch before it is still corruption.
#[test]
fn pipelined_batch_with_its_first_slice_lost_is_a_torn_tail_and_earlier_damage_is_corruption() {
    let opts = tynamo_wal::WalOptions {
        segment_bytes: 4 << 20,
        entry_bytes_max: 8 << 10,
        staged_bytes_max: 4 << 20,
        spare_segments_max: 1,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let o = opts.clone();
    run(move || async move {
        let wal = Wal::open(&path, o).await.unwrap();
        let a: Vec<Owned> = (1..=5).map(|i| Owned::new(i, 1, 50)).collect();
        wal.append(&a.iter().map(|e| e.as_ref()).collect::<Vec<_>>())
            .await
            .unwrap();
        let b: Vec<Owned> = (6..=165).map(|i| Owned::new(i, 2, 4000)).collect();
        let before = wal.stats().writes;
        wal.append(&b.iter().map(|e| e.as_ref()).collect::<Vec<_>>())
            .await
            .unwrap();
        assert!(
            wal.stats().writes - before >= 2,
            "the batch went out in slices"
        );
        wal.close().await.unwrap();
    });
    let seg = segments(dir.path());
    let pristine = std::fs::read(&seg[0]).unwrap();
    let spans = record_spans(&pristine, 1, 1);
    assert_eq!(spans.len(), 165);
    let want: Vec<Owned> = (1..=5).map(|i| Owned::new(i, 1, 50)).collect();
    let reopen = |img: &[u8]| {
        std::fs::write(&seg[0], img).unwrap();
        let path = dir.path().to_path_buf();
        let o = opts.clone();
        let want: Vec<(u64, Vec<u8>)> = want.iter().map(|e| (e.index, e.payload.clone())).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        run(move || async move {
            let r = match Wal::open(&path, o).await {
                Ok(wal) => {
                    assert_eq!(wal.last_index(), 5);
                    let got = wal.entries(1, 6, u64::MAX).await.unwrap();
                    for (g, w) in got.iter().zip(&want) {
                        assert_eq!((g.index, &g.payload[..]), (w.0, &w.1[..]));
                    }
                    let report = wal.recovery_report().clone();
                    wal.close().await.unwrap();
                    Ok(report)
                }
                Err(e) => Err(e),
            };
            tx.send(r).unwrap();
        });
        rx.recv().unwrap()
    };
    // The first slice lost (its first record zeroed), the later slices on disk.
    let mut img = pristine.clone();
    img[spans[5].0 as usize..spans[5].1 as usize].fill(0);
    let report = reopen(&img).unwrap_or_else(|e| panic!("torn first slice: {e}"));
    assert_eq!(report.torn_at.as_ref().map(|t| t.1), Some(spans[5].0));
    assert!(
        report.dropped_bytes >= spans[164].1 - spans[6].0,
        "{report:?}"
    );
    // Damage to the synced batch before it: the slices were written after it was durable.
    let mut img = pristine.clone();
    img[spans[4].0 as usize + RECORD_HEADER_BYTES + 3] ^= 0x10;
    match reopen(&img) {
        Err(Error::Corruption { offset, .. }) => assert_eq!(offset, spans[4].0),
        other => panic!("expected corruption, got {other:?}"),
    }
}
