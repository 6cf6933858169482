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
