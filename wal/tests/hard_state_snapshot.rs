//! Hard-state and snapshot files: torn writes and a crash between rename and directory fsync.
mod common;

use common::run;
use tynamo_wal::{HardState, HardStateFile, SnapshotMeta, SnapshotStore};

const LIMIT: u64 = 1 << 20;

#[test]
fn hard_state_survives_reopen_and_torn_slot_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let p2 = path.clone();
    run(move || async move {
        let (mut f, hs) = HardStateFile::open(&path).await.unwrap();
        assert_eq!(hs, None);
        for t in 1..=5u64 {
            f.save(&HardState {
                term: t,
                vote: t % 3,
                commit: t * 10,
            })
            .await
            .unwrap();
        }
        f.close().await.unwrap();
        let (f, hs) = HardStateFile::open(&path).await.unwrap();
        assert_eq!(
            hs,
            Some(HardState {
                term: 5,
                vote: 2,
                commit: 50
            })
        );
        f.close().await.unwrap();
    });
    // Generation 5 is in slot 1; tear a write of generation 6 into slot 0 at every byte.
    let file = p2.join("hardstate");
    let pristine = std::fs::read(&file).unwrap();
    for cut in 0..48usize {
        let mut img = pristine.clone();
        // A torn slot: garbage from `cut` on in slot 0 (bytes differ from what was there).
        for b in &mut img[cut..48] {
            *b ^= 0x5a;
        }
        std::fs::write(&file, &img).unwrap();
        let path = p2.clone();
        run(move || async move {
            let (f, hs) = HardStateFile::open(&path).await.unwrap();
            assert_eq!(
                hs,
                Some(HardState {
                    term: 5,
                    vote: 2,
                    commit: 50
                }),
                "cut {cut}"
            );
            f.close().await.unwrap();
        });
    }
}

#[test]
fn snapshot_crash_between_rename_and_dir_fsync_leaves_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let old = SnapshotMeta {
        index: 100,
        term: 2,
    };
    let new = SnapshotMeta {
        index: 200,
        term: 3,
    };
    let old_data = vec![7u8; 10_000];
    let new_data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let (od, nd) = (old_data.clone(), new_data.clone());
    let p = path.clone();
    run(move || async move {
        let (store, snap, _) = SnapshotStore::open(&p, LIMIT).await.unwrap();
        assert_eq!(snap, None);
        store.save(old, &od).await.unwrap();
        store.save(new, &nd).await.unwrap();
        let (_, snap, report) = SnapshotStore::open(&p, LIMIT).await.unwrap();
        let snap = snap.unwrap();
        assert_eq!((snap.meta, snap.data), (new, nd));
        assert!(report.damaged.is_empty());
    });
    let new_file = path.join(format!("snap-{:020}-{:020}.snap", 200, 3));
    let new_bytes = std::fs::read(&new_file).unwrap();

    // Crash before the rename reached the disk: only the temporary name exists.
    let tmp = path.join(format!("snap-{:020}-{:020}.snap.tmp", 200, 3));
    std::fs::rename(&new_file, &tmp).unwrap();
    let check = |want: SnapshotMeta, want_data: Vec<u8>, partial: usize| {
        let p = path.clone();
        run(move || async move {
            let (_, snap, report) = SnapshotStore::open(&p, LIMIT).await.unwrap();
            let snap = snap.expect("old or new snapshot, never neither");
            assert_eq!(snap.meta, want);
            assert_eq!(snap.data, want_data);
            assert_eq!(report.partial_removed, partial);
        });
    };
    check(old, old_data.clone(), 1);
    assert!(!tmp.exists(), "partial snapshot cleaned");

    // Torn temporary file at many cuts: still the old snapshot.
    for cut in (0..new_bytes.len()).step_by(997) {
        std::fs::write(&tmp, &new_bytes[..cut]).unwrap();
        check(old, old_data.clone(), 1);
    }

    // The rename reached the disk: the new one wins.
    std::fs::write(&new_file, &new_bytes).unwrap();
    check(new, new_data.clone(), 0);

    // A damaged final-named snapshot is skipped (and reported), the older one is used.
    let mut bad = new_bytes.clone();
    bad[4096 + 123] ^= 1;
    std::fs::write(&new_file, &bad).unwrap();
    let p = path.clone();
    run(move || async move {
        let (_, snap, report) = SnapshotStore::open(&p, LIMIT).await.unwrap();
        assert_eq!(snap.unwrap().meta, old);
        assert_eq!(report.damaged.len(), 1);
    });
}
