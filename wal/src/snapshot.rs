//! Snapshot files: written under a temporary name, fdatasync, rename, directory fsync.
//!
//! A snapshot is visible under its final name only once its bytes are durable, and the rename
//! is durable once the directory is fsynced. A crash before the directory fsync leaves either
//! the temporary or the final name; the older snapshot is removed only after that fsync, so
//! a crash anywhere leaves the old or the new snapshot, never neither. On open, temporary files
//! (partial writes) are removed and the newest snapshot that passes its checks is loaded.

use std::path::{Path, PathBuf};

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{io_err, Error, Result};
use crate::io::{open_rw, probe_device_once, sync_data, sync_dir, write_all};

const MAGIC: u32 = u32::from_le_bytes(*b"TSNP");
const VERSION: u32 = 1;
/// The data starts after a header block of this size (DMA aligned).
pub const SNAPSHOT_HEADER_BYTES: usize = 4096;
const HEADER_USED_BYTES: usize = 40;
const HEADER_CRC_COVERED: usize = 36;
const TMP_SUFFIX: &str = ".snap.tmp";
const SUFFIX: &str = ".snap";
/// Snapshots kept after a save: the new one and one fallback.
const SNAPSHOTS_RETAINED: usize = 2;
/// Data is written in DMA chunks of this size.
const WRITE_CHUNK_BYTES: usize = 1 << 20;

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_USED_BYTES);

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Header {
    magic: U32,
    version: U32,
    index: U64,
    term: U64,
    data_len: U64,
    /// CRC32 of the data.
    data_crc: U32,
    /// CRC32 of bytes 0..36.
    header_crc: U32,
}

/// Index and term of the last entry a snapshot covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
}

/// A loaded snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// What `open` found besides the snapshot it loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Temporary files of interrupted saves, removed.
    pub partial_removed: usize,
    /// Final-named snapshots that failed their checks (left in place, skipped).
    pub damaged: Vec<PathBuf>,
}

/// The snapshot directory of one group.
pub struct SnapshotStore {
    dir: PathBuf,
    data_bytes_max: u64,
}

fn file_name(meta: SnapshotMeta) -> String {
    format!("snap-{:020}-{:020}{SUFFIX}", meta.index, meta.term)
}

fn parse_name(name: &str) -> Option<SnapshotMeta> {
    let stem = name.strip_prefix("snap-")?.strip_suffix(SUFFIX)?;
    let (i, t) = stem.split_once('-')?;
    if i.len() != 20 || t.len() != 20 {
        return None;
    }
    Some(SnapshotMeta {
        index: i.parse().ok()?,
        term: t.parse().ok()?,
    })
}

/// Checks a snapshot file's bytes against the metadata in its name. Pure; never panics.
pub fn decode(
    bytes: &[u8],
    expect: SnapshotMeta,
    data_bytes_max: u64,
) -> std::result::Result<Vec<u8>, String> {
    let (h, _) =
        Header::read_from_prefix(bytes).map_err(|_| "shorter than a header".to_string())?;
    if h.magic.get() != MAGIC || h.version.get() != VERSION {
        return Err("bad magic or version".into());
    }
    if crc32fast::hash(&h.as_bytes()[..HEADER_CRC_COVERED]) != h.header_crc.get() {
        return Err("header crc mismatch".into());
    }
    if h.index.get() != expect.index || h.term.get() != expect.term {
        return Err("header does not match the file name".into());
    }
    let len = h.data_len.get();
    if len > data_bytes_max {
        return Err(format!(
            "data length {len} above the limit {data_bytes_max}"
        ));
    }
    let data = usize::try_from(len)
        .ok()
        .and_then(|l| bytes.get(SNAPSHOT_HEADER_BYTES..SNAPSHOT_HEADER_BYTES.checked_add(l)?))
        .ok_or_else(|| format!("data of {len} bytes is cut short"))?;
    if crc32fast::hash(data) != h.data_crc.get() {
        return Err("data crc mismatch".into());
    }
    Ok(data.to_vec())
}

impl SnapshotStore {
    /// Opens `dir`, removes partial snapshots and loads the newest valid one.
    pub async fn open(
        dir: impl AsRef<Path>,
        data_bytes_max: u64,
    ) -> Result<(SnapshotStore, Option<Snapshot>, SnapshotReport)> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err("create dir", &dir, None))?;
        probe_device_once(&dir).await?;
        let mut report = SnapshotReport::default();
        let mut metas = Vec::new();
        for ent in std::fs::read_dir(&dir).map_err(io_err("list dir", &dir, None))? {
            let ent = ent.map_err(io_err("list dir", &dir, None))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.ends_with(TMP_SUFFIX) {
                let p = dir.join(&name);
                std::fs::remove_file(&p).map_err(io_err("remove", &p, None))?;
                report.partial_removed += 1;
            } else if let Some(m) = parse_name(&name) {
                metas.push(m);
            }
        }
        if report.partial_removed > 0 {
            sync_dir(&dir).await?;
        }
        let store = SnapshotStore {
            dir,
            data_bytes_max,
        };
        metas.sort_unstable_by(|a, b| b.cmp(a));
        for m in metas {
            let p = store.dir.join(file_name(m));
            let bytes = std::fs::read(&p).map_err(io_err("read", &p, None))?;
            match decode(&bytes, m, data_bytes_max) {
                Ok(data) => return Ok((store, Some(Snapshot { meta: m, data }), report)),
                Err(_) => report.damaged.push(p),
            }
        }
        Ok((store, None, report))
    }

    /// Durably stores a snapshot: temporary file, fdatasync, rename, directory fsync; then
    /// removes all but the newest `SNAPSHOTS_RETAINED` snapshots.
    pub async fn save(&self, meta: SnapshotMeta, data: &[u8]) -> Result<()> {
        if data.len() as u64 > self.data_bytes_max {
            return Err(Error::InvalidArgument(format!(
                "snapshot of {} bytes above the limit {}",
                data.len(),
                self.data_bytes_max
            )));
        }
        let name = file_name(meta);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let fin = self.dir.join(&name);
        let file = open_rw(&tmp, true).await?;
        let mut header = Header {
            magic: U32::new(MAGIC),
            version: U32::new(VERSION),
            index: U64::new(meta.index),
            term: U64::new(meta.term),
            data_len: U64::new(data.len() as u64),
            data_crc: U32::new(crc32fast::hash(data)),
            header_crc: U32::new(0),
        };
        header.header_crc = U32::new(crc32fast::hash(&header.as_bytes()[..HEADER_CRC_COVERED]));
        let align = file.alignment() as usize;
        let total = SNAPSHOT_HEADER_BYTES + data.len();
        let total_aligned = total.div_ceil(align) * align;
        file.pre_allocate(total_aligned as u64, false)
            .await
            .map_err(io_err("fallocate", &tmp, Some(0)))?;
        // Stream header + data in aligned chunks; the last one is zero padded.
        let mut pos = 0usize;
        while pos < total_aligned {
            let n = (total_aligned - pos).min(WRITE_CHUNK_BYTES);
            let mut buf = glommio::allocate_dma_buffer(n);
            let dst = buf.as_bytes_mut();
            dst.fill(0);
            if pos < HEADER_USED_BYTES {
                let m = (HEADER_USED_BYTES - pos).min(n);
                dst[..m].copy_from_slice(&header.as_bytes()[pos..pos + m]);
            }
            let data_from = pos.max(SNAPSHOT_HEADER_BYTES);
            let data_to = (pos + n).min(total);
            if data_from < data_to {
                let src = &data[data_from - SNAPSHOT_HEADER_BYTES..data_to - SNAPSHOT_HEADER_BYTES];
                dst[data_from - pos..data_to - pos].copy_from_slice(src);
            }
            write_all(&file, &tmp, buf, pos as u64).await?;
            pos += n;
        }
        // Exact length, so a reader never sees padding as data.
        file.truncate(total as u64)
            .await
            .map_err(io_err("truncate", &tmp, Some(total as u64)))?;
        sync_data(&file, &tmp).await?;
        file.close().await.map_err(io_err("close", &tmp, None))?;
        glommio::io::rename(&tmp, &fin)
            .await
            .map_err(io_err("rename", &tmp, None))?;
        sync_dir(&self.dir).await?;
        self.remove_older_than_retained().await
    }

    async fn remove_older_than_retained(&self) -> Result<()> {
        let mut metas = Vec::new();
        for ent in std::fs::read_dir(&self.dir).map_err(io_err("list dir", &self.dir, None))? {
            let ent = ent.map_err(io_err("list dir", &self.dir, None))?;
            if let Some(m) = parse_name(&ent.file_name().to_string_lossy()) {
                metas.push(m);
            }
        }
        metas.sort_unstable_by(|a, b| b.cmp(a));
        let mut removed = false;
        for m in metas.into_iter().skip(SNAPSHOTS_RETAINED) {
            let p = self.dir.join(file_name(m));
            glommio::io::remove(&p)
                .await
                .map_err(io_err("remove", &p, None))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir).await?;
        }
        Ok(())
    }

    /// Path a snapshot with `meta` has once saved (for tests and tools).
    pub fn path_of(&self, meta: SnapshotMeta) -> PathBuf {
        self.dir.join(file_name(meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let m = SnapshotMeta { index: 12, term: 3 };
        assert_eq!(parse_name(&file_name(m)), Some(m));
        assert_eq!(parse_name("snap-1-2.snap"), None);
        assert_eq!(parse_name("x.snap"), None);
    }
}
