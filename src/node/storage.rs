//! The durable state of one group replica: WAL, hard state and snapshots, and the adapter between
//! them and the Raft core (`InitialState` on start, persisting a `Ready`'s write).
//!
//! Directory of a group: `<data>/group-<g>/{wal,hardstate,snap}` (one subdirectory each, so the
//! three file sets never see each other's names).
//!
//! Snapshot file data = `u32 conf_len` + encoded `ConfState` + the KV snapshot stream. The
//! membership must travel with the snapshot: once the log is compacted past the configuration
//! entry, the snapshot is the only place it is written.
//!
//! Durability rules applied here (from the Ready contract):
//! - entries, then the hard state, in that order, so a durable commit index never points past
//!   the durable log;
//! - term and vote changes are saved (fsync) before the write completes; a change of the commit
//!   index alone is saved at most every [`COMMIT_SAVE_INTERVAL_MS`]: the commit index needs no
//!   durability for safety (a restarted replica re-learns it from the leader, and a new leader
//!   re-commits through its no-op), and an fsync of the hard state file per batch would double
//!   the fsyncs of the write path;
//! - a snapshot from the leader replaces the whole log: it is saved first (rename + directory
//!   fsync), then the log is cut so it restarts right after the snapshot.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use tynamo_wal::{EntryRef, HardStateFile, SnapshotStore, Wal, WalOptions};

use crate::raft::{
    decode_conf, encode_conf, ConfState, Entry, EntryKind, HardState, InitialState, NodeId,
    Snapshot, SnapshotMeta,
};

/// How often a hard state whose only change is the commit index is saved.
pub const COMMIT_SAVE_INTERVAL_MS: u64 = 200;
/// Bytes read from the WAL per call while recovering.
const RECOVERY_READ_BYTES: u64 = 16 << 20;
/// Largest snapshot file accepted.
pub const SNAPSHOT_BYTES_MAX: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("group {group}: {source}")]
    Wal {
        group: u64,
        #[source]
        source: tynamo_wal::Error,
    },
    #[error("group {group}: snapshot {index} in {dir}: {why}")]
    Snapshot {
        group: u64,
        dir: PathBuf,
        index: u64,
        why: String,
    },
    #[error("group {group}: log in {dir} is not contiguous with the snapshot at {snapshot_index} (first index {first_index})")]
    Gap {
        group: u64,
        dir: PathBuf,
        snapshot_index: u64,
        first_index: u64,
    },
}

fn kind_to_wal(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::Normal => 0,
        EntryKind::Noop => 1,
        EntryKind::Conf => 2,
    }
}

fn kind_from_wal(kind: u8) -> Option<EntryKind> {
    match kind {
        0 => Some(EntryKind::Normal),
        1 => Some(EntryKind::Noop),
        2 => Some(EntryKind::Conf),
        _ => None,
    }
}

/// Snapshot file data: conf prefix + KV stream.
pub fn encode_snapshot_file(conf: &ConfState, kv_data: &[u8]) -> Vec<u8> {
    let conf = encode_conf(conf);
    let mut out = Vec::with_capacity(4 + conf.len() + kv_data.len());
    out.extend_from_slice(&(conf.len() as u32).to_le_bytes());
    out.extend_from_slice(&conf);
    out.extend_from_slice(kv_data);
    out
}

/// Splits snapshot file data into (membership, KV stream).
pub fn decode_snapshot_file(data: &[u8]) -> Result<(ConfState, Bytes), String> {
    let len_bytes: [u8; 4] = data
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or("shorter than its membership length")?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let conf_bytes = data
        .get(4..4 + len)
        .ok_or("membership cut short".to_string())?;
    let conf = decode_conf(conf_bytes).ok_or("membership does not decode".to_string())?;
    Ok((conf, Bytes::copy_from_slice(&data[4 + len..])))
}

/// What a group replica starts from: the Raft state, whose snapshot (if any) carries the
/// state machine's bytes for the caller to restore (`Machine::restored`).
pub struct Recovered {
    pub initial: InitialState,
}

impl Recovered {
    /// The state machine's snapshot bytes, with their index.
    pub fn machine_snapshot(&self) -> Option<(u64, &Bytes)> {
        self.initial
            .snapshot
            .as_ref()
            .map(|s| (s.meta.index, &s.data))
    }
}

/// The files of one group replica, owned by its core.
pub struct GroupStorage {
    pub group: u64,
    pub wal: Rc<Wal>,
    hard_state: HardStateFile,
    pub snapshots: Rc<SnapshotStore>,
    snap_dir: PathBuf,
    saved_hs: HardState,
    saved_at: Instant,
}

impl GroupStorage {
    /// Opens (creating on first start) the group's files and recovers the replica. A brand new
    /// replica is bootstrapped with `voters` and that state is made durable before returning.
    pub async fn open(
        group: u64,
        dir: &Path,
        wal_opts: WalOptions,
        voters: &[NodeId],
    ) -> Result<(GroupStorage, Recovered), StorageError> {
        let werr = |source| StorageError::Wal { group, source };
        let snap_dir = dir.join("snap");
        let (snapshots, snapshot, _report) = SnapshotStore::open(&snap_dir, SNAPSHOT_BYTES_MAX)
            .await
            .map_err(werr)?;
        let (hard_state, hs) = HardStateFile::open(dir.join("hardstate"))
            .await
            .map_err(werr)?;
        let wal = Wal::open(dir.join("wal"), wal_opts).await.map_err(werr)?;
        let mut storage = GroupStorage {
            group,
            wal: Rc::new(wal),
            hard_state,
            snapshots: Rc::new(snapshots),
            snap_dir: snap_dir.clone(),
            saved_hs: HardState::default(),
            saved_at: Instant::now(),
        };
        let fresh = snapshot.is_none() && hs.is_none() && storage.wal.last_index() == 0;
        if fresh {
            let initial = InitialState::bootstrap(voters);
            let refs: Vec<EntryRef<'_>> = initial
                .entries
                .iter()
                .map(|e| EntryRef {
                    index: e.index,
                    term: e.term,
                    kind: kind_to_wal(e.kind),
                    payload: &e.data,
                })
                .collect();
            storage.wal.append(&refs).await.map_err(werr)?;
            storage.save_hard_state(initial.hard_state).await?;
            return Ok((storage, Recovered { initial }));
        }
        let raft_snapshot = match snapshot {
            Some(s) => {
                let bad = |why: String| StorageError::Snapshot {
                    group,
                    dir: snap_dir.clone(),
                    index: s.meta.index,
                    why,
                };
                let (conf, kv_data) = decode_snapshot_file(&s.data).map_err(bad)?;
                Some(Snapshot {
                    meta: SnapshotMeta {
                        index: s.meta.index,
                        term: s.meta.term,
                        conf,
                    },
                    data: kv_data,
                })
            }
            None => None,
        };
        let snap_index = raft_snapshot.as_ref().map_or(0, |s| s.meta.index);
        if let Some(s) = &raft_snapshot {
            storage.finish_interrupted_install(&s.meta).await?;
        }
        let first = storage.wal.first_index();
        let last = storage.wal.last_index();
        if last > snap_index && first > snap_index + 1 {
            return Err(StorageError::Gap {
                group,
                dir: dir.to_path_buf(),
                snapshot_index: snap_index,
                first_index: first,
            });
        }
        let mut entries = Vec::new();
        let mut at = first.max(snap_index + 1);
        while at <= last {
            let batch = storage
                .wal
                .entries(at, last + 1, RECOVERY_READ_BYTES)
                .await
                .map_err(werr)?;
            if batch.is_empty() {
                break;
            }
            for e in batch {
                let kind = kind_from_wal(e.kind).ok_or_else(|| StorageError::Snapshot {
                    group,
                    dir: dir.to_path_buf(),
                    index: e.index,
                    why: format!("log entry {} has unknown kind {}", e.index, e.kind),
                })?;
                at = e.index + 1;
                entries.push(Entry {
                    index: e.index,
                    term: e.term,
                    kind,
                    data: e.payload,
                });
            }
        }
        let mut hard_state = hs
            .map(|h| HardState {
                term: h.term,
                vote: h.vote,
                commit: h.commit,
            })
            .unwrap_or_default();
        let last_index = snap_index + entries.len() as u64;
        // A commit above the durable log cannot be trusted to describe this log.
        hard_state.commit = hard_state.commit.min(last_index);
        if let Some(s) = &raft_snapshot {
            hard_state.term = hard_state.term.max(s.meta.term);
        }
        storage.saved_hs = hard_state;
        let initial = InitialState {
            hard_state,
            snapshot: raft_snapshot,
            entries,
            conf: ConfState::default(),
        };
        Ok((storage, Recovered { initial }))
    }

    /// A crash between saving a leader's snapshot and cutting the log leaves a log that ends
    /// before the snapshot, or one whose entry at the snapshot index has another term (a stale
    /// suffix that the snapshot replaced). Either way the log after the snapshot is not this
    /// replica's: finish the install by dropping it.
    async fn finish_interrupted_install(&self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        let (first, last) = (self.wal.first_index(), self.wal.last_index());
        let diverged = first <= meta.index && self.wal.term(meta.index) != Some(meta.term);
        if last >= meta.index && !diverged {
            return Ok(());
        }
        let werr = |source| StorageError::Wal {
            group: self.group,
            source,
        };
        if last >= first && last > meta.index {
            self.wal
                .truncate_suffix(first.max(meta.index + 1))
                .await
                .map_err(werr)?;
        }
        self.wal.compact_prefix(meta.index).await.map_err(werr)?;
        Ok(())
    }

    async fn save_hard_state(&mut self, hs: HardState) -> Result<(), StorageError> {
        self.hard_state
            .save(&tynamo_wal::HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit,
            })
            .await
            .map_err(|source| StorageError::Wal {
                group: self.group,
                source,
            })?;
        self.saved_hs = hs;
        self.saved_at = Instant::now();
        Ok(())
    }

    /// Saves the hard state when term or vote changed, or when only the commit index moved and
    /// the last save is older than [`COMMIT_SAVE_INTERVAL_MS`].
    pub async fn maybe_save_hard_state(&mut self, hs: HardState) -> Result<(), StorageError> {
        let must = hs.term != self.saved_hs.term || hs.vote != self.saved_hs.vote;
        let lazy = hs.commit != self.saved_hs.commit
            && self.saved_at.elapsed().as_millis() as u64 >= COMMIT_SAVE_INTERVAL_MS;
        if must || lazy {
            self.save_hard_state(hs).await?;
        }
        Ok(())
    }

    /// Makes `entries` durable: cuts the stored log where they start if it already holds
    /// entries from there (a conflicting suffix), then appends them with one group commit.
    pub async fn write_entries(&self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let werr = |source| StorageError::Wal {
            group: self.group,
            source,
        };
        if first.index <= self.wal.last_index() {
            self.wal.truncate_suffix(first.index).await.map_err(werr)?;
        }
        let refs: Vec<EntryRef<'_>> = entries
            .iter()
            .map(|e| EntryRef {
                index: e.index,
                term: e.term,
                kind: kind_to_wal(e.kind),
                payload: &e.data,
            })
            .collect();
        self.wal.append(&refs).await.map_err(werr)?;
        if self.wal.spare_wanted() {
            // The next segment file is zeroed in the background now, not on the append path
            // at the roll, where it held up the group's appends (64 MiB of zeros + fdatasync:
            // 50 ms on this machine's disk). A failure here only means the roll makes the
            // file itself, as before.
            let (wal, group) = (self.wal.clone(), self.group);
            glommio::spawn_local(async move {
                if let Err(e) = wal.prepare_spares().await {
                    eprintln!("tynamo: group {group}: preparing a spare WAL segment: {e}");
                }
            })
            .detach();
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader: saves it, then drops the whole log so that
    /// it restarts right after the snapshot.
    pub async fn install_snapshot(&self, snap: &Snapshot) -> Result<(), StorageError> {
        self.save_snapshot(&snap.meta, &snap.data).await?;
        let werr = |source| StorageError::Wal {
            group: self.group,
            source,
        };
        let (first, last) = (self.wal.first_index(), self.wal.last_index());
        if last >= first && last > snap.meta.index {
            self.wal
                .truncate_suffix(first.max(snap.meta.index + 1))
                .await
                .map_err(werr)?;
        }
        self.wal
            .compact_prefix(snap.meta.index)
            .await
            .map_err(werr)?;
        if self.wal.last_index() != snap.meta.index {
            return Err(StorageError::Gap {
                group: self.group,
                dir: self.wal.dir().to_path_buf(),
                snapshot_index: snap.meta.index,
                first_index: self.wal.first_index(),
            });
        }
        Ok(())
    }

    /// Durably saves a snapshot file (membership + KV stream).
    pub async fn save_snapshot(
        &self,
        meta: &SnapshotMeta,
        kv_data: &[u8],
    ) -> Result<(), StorageError> {
        let data = encode_snapshot_file(&meta.conf, kv_data);
        self.snapshots
            .save(
                tynamo_wal::SnapshotMeta {
                    index: meta.index,
                    term: meta.term,
                },
                &data,
            )
            .await
            .map_err(|source| StorageError::Wal {
                group: self.group,
                source,
            })
    }

    pub fn snapshot_dir(&self) -> &Path {
        &self.snap_dir
    }
}

/// Saves a locally taken snapshot (the caller compacts the log afterwards). Runs beside the
/// persister: snapshot files and the WAL are separate, and the WAL serialises its own
/// structural operations.
pub async fn save_local_snapshot(
    group: u64,
    snapshots: &SnapshotStore,
    meta: &SnapshotMeta,
    kv_data: &[u8],
) -> Result<(), StorageError> {
    let data = encode_snapshot_file(&meta.conf, kv_data);
    let werr = |source| StorageError::Wal { group, source };
    snapshots
        .save(
            tynamo_wal::SnapshotMeta {
                index: meta.index,
                term: meta.term,
            },
            &data,
        )
        .await
        .map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv;

    #[test]
    fn snapshot_file_round_trips_and_rejects_garbage() {
        let conf = ConfState::new(vec![1, 2, 3], vec![]);
        let data = encode_snapshot_file(&conf, b"kvstream");
        let (c, kv) = decode_snapshot_file(&data).unwrap();
        assert_eq!(c, conf);
        assert_eq!(&kv[..], b"kvstream");
        assert!(decode_snapshot_file(&[1, 0]).is_err());
        assert!(decode_snapshot_file(&[200, 0, 0, 0, 1]).is_err());
    }

    fn run<G, F>(f: G)
    where
        G: FnOnce() -> F + Send + 'static,
        F: std::future::Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    fn small_wal() -> WalOptions {
        WalOptions {
            segment_bytes: 1 << 20,
            entry_bytes_max: 64 << 10,
            staged_bytes_max: 1 << 20,
            spare_segments_max: 1,
        }
    }

    fn entry(index: u64, term: u64, data: &'static [u8]) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn fresh_start_bootstraps_then_restart_recovers_entries_hard_state_and_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        run(move || async move {
            let kvc = kv::Config::default();
            let (mut st, rec) = GroupStorage::open(0, &dir, small_wal(), &[1, 2, 3])
                .await
                .unwrap();
            assert_eq!(rec.initial.entries.len(), 1, "bootstrap conf entry");
            st.write_entries(&[entry(2, 2, b"a"), entry(3, 2, b"b"), entry(4, 2, b"c")])
                .await
                .unwrap();
            // A conflicting suffix from a new leader replaces 4.
            st.write_entries(&[entry(4, 3, b"d")]).await.unwrap();
            st.maybe_save_hard_state(HardState {
                term: 3,
                vote: 2,
                commit: 4,
            })
            .await
            .unwrap();
            drop(st);
            let (st, rec) = GroupStorage::open(0, &dir, small_wal(), &[1, 2, 3])
                .await
                .unwrap();
            let got: Vec<(u64, u64)> = rec
                .initial
                .entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect();
            assert_eq!(got, vec![(1, 1), (2, 2), (3, 2), (4, 3)]);
            assert_eq!(&rec.initial.entries[3].data[..], b"d");
            assert_eq!(rec.initial.hard_state.term, 3);
            assert_eq!(rec.initial.hard_state.vote, 2);
            // A snapshot from the leader at 10 drops the whole log.
            let kvsm = kv::StateMachine::new(kvc.clone(), [0u16, 1]);
            let stream: Vec<u8> = kvsm
                .snapshot_writer(4096)
                .flat_map(|c| c.to_vec())
                .collect();
            let snap = Snapshot {
                meta: SnapshotMeta {
                    index: 10,
                    term: 4,
                    conf: ConfState::new(vec![1, 2, 3], vec![]),
                },
                data: Bytes::from(stream),
            };
            // A crash right after saving the snapshot file, before the log was cut: the log
            // still ends at 4 (< 10). Recovery finishes the install.
            st.save_snapshot(&snap.meta, &snap.data).await.unwrap();
            drop(st);
            let (st, rec) = GroupStorage::open(0, &dir, small_wal(), &[1, 2, 3])
                .await
                .unwrap();
            assert!(
                rec.initial.entries.is_empty(),
                "the old log is not after the snapshot"
            );
            assert_eq!(st.wal.last_index(), 10);
            st.install_snapshot(&snap).await.unwrap();
            st.write_entries(&[entry(11, 4, b"e")]).await.unwrap();
            drop(st);
            let (_st, rec) = GroupStorage::open(0, &dir, small_wal(), &[1, 2, 3])
                .await
                .unwrap();
            let (index, data) = rec.machine_snapshot().unwrap();
            assert_eq!(index, 10);
            let restored = kv::restore(kvc, [data.clone()]).unwrap();
            assert_eq!(restored.state_hash(), kvsm.state_hash());
            let s = rec.initial.snapshot.unwrap();
            assert_eq!((s.meta.index, s.meta.term), (10, 4));
            assert_eq!(s.meta.conf.voters, vec![1, 2, 3]);
            let got: Vec<u64> = rec.initial.entries.iter().map(|e| e.index).collect();
            assert_eq!(got, vec![11]);
        });
    }
}
