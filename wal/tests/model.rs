//! Model-based property test: random append / truncate / compact / reopen sequences against an
//! in-memory `Vec` model must give the same reads.
mod common;

use common::{run, small_opts, Owned};
use proptest::prelude::*;
use tynamo_wal::{Wal, WalOptions};

#[derive(Debug, Clone)]
enum Op {
    /// Append `sizes.len()` entries (one batch), bumping the term by `term_bump`.
    Append {
        sizes: Vec<usize>,
        term_bump: u64,
    },
    /// Truncate the last `back` entries (clamped to the log).
    Truncate {
        back: u64,
    },
    /// Compact up to `first + ahead` (may pass the end of the log).
    Compact {
        ahead: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    op_with(12)
}

/// Batches of up to `batch_max` entries; large batches take the direct-write path of the
/// staging buffer (writes above 128 KiB), small ones the copy-out path.
fn op_with(batch_max: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (proptest::collection::vec(prop_oneof![0usize..64, 64usize..3000, 3000usize..8192], 1..batch_max), 0u64..2)
            .prop_map(|(sizes, term_bump)| Op::Append { sizes, term_bump }),
        2 => (0u64..40).prop_map(|back| Op::Truncate { back }),
        1 => (0u64..80).prop_map(|ahead| Op::Compact { ahead }),
        1 => Just(Op::Reopen),
    ]
}

struct Model {
    first_index: u64,
    entries: Vec<Owned>,
    term: u64,
}

impl Model {
    fn last_index(&self) -> u64 {
        self.first_index + self.entries.len() as u64 - 1
    }
}

async fn check(wal: &Wal, m: &Model, step: usize) {
    assert_eq!(wal.first_index(), m.first_index, "step {step}: first_index");
    assert_eq!(wal.last_index(), m.last_index(), "step {step}: last_index");
    for e in &m.entries {
        assert_eq!(
            wal.term(e.index),
            Some(e.term),
            "step {step}: term({})",
            e.index
        );
    }
    assert_eq!(wal.term(m.last_index() + 1), None);
    if !m.entries.is_empty() {
        let got = wal
            .entries(m.first_index, m.last_index() + 1, u64::MAX)
            .await
            .unwrap();
        assert_eq!(got.len(), m.entries.len(), "step {step}: entries count");
        for (g, w) in got.iter().zip(&m.entries) {
            assert_eq!(
                (g.index, g.term, g.kind),
                (w.index, w.term, w.kind),
                "step {step}"
            );
            assert_eq!(
                &g.payload[..],
                &w.payload[..],
                "step {step}: payload {}",
                w.index
            );
        }
        // A byte limit returns a non-empty prefix within the limit.
        let limit = 4000;
        let got = wal
            .entries(m.first_index, m.last_index() + 1, limit)
            .await
            .unwrap();
        assert!(!got.is_empty());
        let total: usize = got.iter().map(|e| e.payload.len()).sum();
        assert!(
            got.len() == 1 || total as u64 <= limit,
            "step {step}: limit"
        );
    }
}

fn run_ops(ops: Vec<Op>, opts: WalOptions) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let mut wal = Wal::open(&path, opts.clone()).await.unwrap();
        let mut m = Model {
            first_index: 1,
            entries: Vec::new(),
            term: 1,
        };
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Append { sizes, term_bump } => {
                    m.term += term_bump;
                    let start = m.last_index() + 1;
                    let batch: Vec<Owned> = sizes
                        .iter()
                        .enumerate()
                        .map(|(k, &len)| Owned::new(start + k as u64, m.term, len))
                        .collect();
                    let refs: Vec<_> = batch.iter().map(|e| e.as_ref()).collect();
                    let r = wal.append(&refs).await.unwrap();
                    assert_eq!(r, start..=start + sizes.len() as u64 - 1);
                    assert!(wal.durable_index() >= *r.end());
                    m.entries.extend(batch);
                }
                Op::Truncate { back } => {
                    let back = back.min(m.entries.len() as u64);
                    let from = m.last_index() + 1 - back;
                    wal.truncate_suffix(from).await.unwrap();
                    m.entries.truncate((from - m.first_index) as usize);
                }
                Op::Compact { ahead } => {
                    let upto = m.first_index + ahead;
                    wal.compact_prefix(upto).await.unwrap();
                    if upto >= m.last_index() {
                        assert_eq!(wal.first_index(), upto + 1, "step {step}");
                        m.entries.clear();
                        m.first_index = upto + 1;
                    } else {
                        let f = wal.first_index();
                        assert!(
                            f >= m.first_index && f <= upto + 1,
                            "step {step}: first {f}"
                        );
                        m.entries.drain(..(f - m.first_index) as usize);
                        m.first_index = f;
                    }
                }
                Op::Reopen => {
                    wal.close().await.unwrap();
                    wal = Wal::open(&path, opts.clone()).await.unwrap();
                    let report = wal.recovery_report();
                    assert_eq!(report.dropped_bytes, 0, "step {step}: {report:?}");
                    assert_eq!(report.torn_at, None);
                }
            }
            check(&wal, &m, step).await;
        }
        wal.close().await.unwrap();
        let wal = Wal::open(&path, opts).await.unwrap();
        check(&wal, &m, usize::MAX).await;
        wal.close().await.unwrap();
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run_ops(ops, small_opts());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model_with_large_batches(ops in proptest::collection::vec(op_with(120), 1..16)) {
        let opts = WalOptions {
            segment_bytes: 1 << 20,
            staged_bytes_max: 4 << 20,
            ..small_opts()
        };
        run_ops(ops, opts);
    }
}

#[test]
fn truncate_into_older_segment_then_append_and_reopen() {
    // Deterministic scenario that crosses segments in both directions.
    let mut ops = Vec::new();
    for _ in 0..12 {
        ops.push(Op::Append {
            sizes: vec![2500, 2500, 100],
            term_bump: 0,
        });
    }
    ops.push(Op::Truncate { back: 30 });
    ops.push(Op::Append {
        sizes: vec![10; 5],
        term_bump: 1,
    });
    ops.push(Op::Reopen);
    ops.push(Op::Compact { ahead: 3 });
    ops.push(Op::Reopen);
    ops.push(Op::Compact { ahead: 200 });
    ops.push(Op::Reopen);
    ops.push(Op::Append {
        sizes: vec![10; 3],
        term_bump: 1,
    });
    ops.push(Op::Reopen);
    run_ops(ops, small_opts());
}
