mod common;

use common::{run, small_opts, Owned};
use tynamo_wal::Wal;

#[test]
fn append_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let wal = Wal::open(&path, small_opts()).await.unwrap();
        assert_eq!(wal.first_index(), 1);
        assert_eq!(wal.last_index(), 0);
        for i in 1..=500u64 {
            let e = Owned::new(i, 1 + i / 100, (i as usize * 37) % 3000);
            let r = wal.append(&[e.as_ref()]).await.unwrap();
            assert_eq!(r, i..=i);
        }
        let got = wal.entries(1, 501, u64::MAX).await.unwrap();
        assert_eq!(got.len(), 500);
        for (k, e) in got.iter().enumerate() {
            let want = Owned::new(
                k as u64 + 1,
                1 + (k as u64 + 1) / 100,
                ((k + 1) * 37) % 3000,
            );
            assert_eq!(e.index, want.index);
            assert_eq!(e.term, want.term);
            assert_eq!(e.kind, want.kind);
            assert_eq!(&e.payload[..], &want.payload[..]);
        }
        wal.close().await.unwrap();
        let wal = Wal::open(&path, small_opts()).await.unwrap();
        assert_eq!(wal.last_index(), 500);
        assert_eq!(wal.recovery_report().dropped_bytes, 0);
        let got = wal.entries(1, 501, u64::MAX).await.unwrap();
        assert_eq!(got.len(), 500);
        assert_eq!(wal.term(250), Some(3));
        wal.close().await.unwrap();
    });
}

/// A segment written by format version 2 (same layout, IEEE CRC32 records) is refused by name
/// on open: its records would otherwise all fail the CRC32C check and be dropped as a torn tail.
#[test]
fn a_version_2_segment_is_refused_not_dropped() {
    use tynamo_wal::format::SegmentHeader;
    use zerocopy::IntoBytes;
    let dir = tempfile::tempdir().unwrap();
    let mut header = SegmentHeader::new(1, 1);
    header.version.set(2);
    header.crc.set(crc32fast::hash(&header.as_bytes()[0..24]));
    let mut img = vec![0u8; 64 << 10];
    img[..header.as_bytes().len()].copy_from_slice(header.as_bytes());
    let seg = dir.path().join("0000000001.wal");
    std::fs::write(&seg, &img).unwrap();
    let path = dir.path().to_path_buf();
    common::run(move || async move {
        match tynamo_wal::Wal::open(&path, common::small_opts()).await {
            Err(tynamo_wal::Error::Corruption { offset, reason, .. }) => {
                assert_eq!(offset, 0);
                assert!(reason.contains("version 1 or 2"), "{reason}");
            }
            Ok(_) => panic!("a version 2 segment was accepted"),
            Err(e) => panic!("unexpected error: {e}"),
        }
    });
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        img,
        "the refused file is left untouched"
    );
}
