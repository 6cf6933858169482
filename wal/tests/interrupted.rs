//! Crashes in the middle of `compact_prefix` and of a `truncate_suffix` into an older segment:
//! the segments the operation had already retired are put back (as a crash before their
//! removal would have left them), and recovery must finish the operation.
mod common;

use std::path::Path;

use common::{run, small_opts, Owned};
use tynamo_wal::{Wal, WalOptions};

fn opts() -> WalOptions {
    WalOptions {
        spare_segments_max: 16,
        ..small_opts()
    }
}

/// Renames every spare file back to the segment name its header records, as if the
/// operation that retired them had crashed before doing so.
fn restore_spares(dir: &Path) -> usize {
    let mut restored = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("spare-") {
            let bytes = std::fs::read(&p).unwrap();
            let seq = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            if &bytes[0..4] == b"TWSG" {
                std::fs::rename(&p, dir.join(format!("{seq:010}.wal"))).unwrap();
                restored += 1;
            }
        }
    }
    restored
}

fn build(dir: &Path, n: u64) -> Vec<Owned> {
    let entries: Vec<Owned> = (1..=n).map(|i| Owned::new(i, 1, 3000)).collect();
    let path = dir.to_path_buf();
    run(move || async move {
        let wal = Wal::open(&path, opts()).await.unwrap();
        for i in 1..=n {
            wal.append(&[Owned::new(i, 1, 3000).as_ref()])
                .await
                .unwrap();
        }
        wal.close().await.unwrap();
    });
    entries
}

#[test]
fn interrupted_compaction_past_the_end_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), 60);
    let path = dir.path().to_path_buf();
    run(move || async move {
        let wal = Wal::open(&path, opts()).await.unwrap();
        wal.compact_prefix(75).await.unwrap();
        assert_eq!(wal.first_index(), 76);
        wal.close().await.unwrap();
    });
    let restored = restore_spares(dir.path());
    assert!(restored >= 3, "restored {restored}");
    let path = dir.path().to_path_buf();
    run(move || async move {
        let wal = Wal::open(&path, opts()).await.unwrap();
        assert_eq!(wal.first_index(), 76);
        assert_eq!(wal.last_index(), 75);
        assert_eq!(wal.recovery_report().compacted_segments, restored);
        let e = Owned::new(76, 2, 10);
        wal.append(&[e.as_ref()]).await.unwrap();
        wal.close().await.unwrap();
        let wal = Wal::open(&path, opts()).await.unwrap();
        assert_eq!((wal.first_index(), wal.last_index()), (76, 76));
        assert_eq!(wal.recovery_report().compacted_segments, 0);
        wal.close().await.unwrap();
    });
}

#[test]
fn interrupted_truncation_into_an_older_segment_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let entries = build(dir.path(), 60);
    let path = dir.path().to_path_buf();
    // Index 5 lives in the first segment: the cut seals the tail, starts a new segment at 5
    // and retires every segment after the first.
    run(move || async move {
        let wal = Wal::open(&path, opts()).await.unwrap();
        wal.truncate_suffix(5).await.unwrap();
        assert_eq!(wal.last_index(), 4);
        wal.close().await.unwrap();
    });
    let restored = restore_spares(dir.path());
    assert!(restored >= 2, "restored {restored}");
    let path = dir.path().to_path_buf();
    let want: Vec<Vec<u8>> = entries[..4].iter().map(|e| e.payload.clone()).collect();
    run(move || async move {
        let wal = Wal::open(&path, opts()).await.unwrap();
        assert_eq!(wal.last_index(), 4);
        assert_eq!(wal.recovery_report().superseded_segments, restored);
        let got = wal.entries(1, 5, u64::MAX).await.unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(&g.payload[..], &w[..]);
        }
        let e = Owned::new(5, 2, 10);
        wal.append(&[e.as_ref()]).await.unwrap();
        wal.close().await.unwrap();
        let wal = Wal::open(&path, opts()).await.unwrap();
        assert_eq!(wal.last_index(), 5);
        assert_eq!(wal.term(5), Some(2));
        wal.close().await.unwrap();
    });
}
