//! Small I/O helpers over glommio DMA files: full writes, zeroed preallocation, directory fsync.
//! Every error names the file and, where there is one, the offset.

use std::path::Path;
use std::rc::Rc;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions};

use crate::error::{io_err, Error, Result};

/// Zeroing writes go out in chunks of this size: large enough to stream, small enough to keep
/// the DMA buffer modest.
pub const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Upper bound on retries after short writes of one buffer; a device that keeps writing short
/// is broken, not slow.
const SHORT_WRITES_MAX: usize = 64;

/// Opens (or creates) `path` for DMA reads and writes.
pub async fn open_rw(path: &Path, create: bool) -> Result<DmaFile> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .dma_open(path)
        .await
        .map_err(io_err("open", path, None))
}

/// Writes all of `buf` at `offset`. `buf.len()` and `offset` must be aligned for the file.
/// `write_at` may write short (e.g. at ENOSPC); the remainder is retried a bounded number of
/// times, and a write that makes no progress is an error.
pub async fn write_all(file: &DmaFile, path: &Path, buf: DmaBuffer, offset: u64) -> Result<()> {
    write_all_rc(file, path, Rc::new(buf), offset).await
}

/// [`write_all`] for a shared buffer (so readers can still see it while it is in flight),
/// handed to the kernel as soon as this future is first polled, not at the executor's next
/// reactor turn: the caller may go on encoding while the device writes.
pub async fn write_all_rc(
    file: &DmaFile,
    path: &Path,
    buf: Rc<DmaBuffer>,
    offset: u64,
) -> Result<()> {
    let align = file.alignment();
    debug_assert_eq!(offset % align, 0);
    debug_assert_eq!(buf.len() as u64 % align, 0);
    let total = buf.len();
    let mut done = file
        .write_rc_at_rushed(buf.clone(), offset)
        .await
        .map_err(io_err("write", path, Some(offset)))?;
    let mut retries = 0;
    while done < total {
        retries += 1;
        let pos = offset + done as u64;
        if done == 0 || retries > SHORT_WRITES_MAX || (done as u64) % align != 0 {
            return Err(short_write(path, pos, done, total));
        }
        // Rare path: copy the unwritten rest into a fresh aligned buffer.
        let mut rest = glommio::allocate_dma_buffer(total - done);
        rest.as_bytes_mut()
            .copy_from_slice(&buf.as_bytes()[done..total]);
        let n = file
            .write_at(rest, pos)
            .await
            .map_err(io_err("write", path, Some(pos)))?;
        if n == 0 {
            return Err(short_write(path, pos, done, total));
        }
        done += n;
    }
    Ok(())
}

fn short_write(path: &Path, pos: u64, done: usize, total: usize) -> Error {
    Error::Io {
        op: "write",
        path: path.to_path_buf(),
        offset: Some(pos),
        source: std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("short write: {done} of {total} bytes"),
        ),
    }
}

/// Writes `len` bytes of zeros at `offset` (both aligned), then nothing else: callers sync.
pub async fn write_zeros(file: &DmaFile, path: &Path, offset: u64, len: u64) -> Result<()> {
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = ((end - pos) as usize).min(ZERO_CHUNK_BYTES);
        let mut buf = glommio::allocate_dma_buffer(n);
        buf.as_bytes_mut().fill(0);
        write_all(file, path, buf, pos).await?;
        pos += n as u64;
    }
    Ok(())
}

/// fdatasync that maps a failure to the fatal [`Error::SyncFailed`].
pub async fn sync_data(file: &DmaFile, path: &Path) -> Result<()> {
    file.fdatasync().await.map_err(|e| Error::SyncFailed {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// fsync of a directory: makes creations, renames and removals in it durable.
pub async fn sync_dir(dir: &Path) -> Result<()> {
    let d = glommio::io::Directory::open(dir)
        .await
        .map_err(io_err("open dir", dir, None))?;
    d.sync().await.map_err(|e| Error::SyncFailed {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    d.close().await.map_err(io_err("close dir", dir, None))
}

/// Creates `path` with `size_bytes` preallocated and written with zeros, then fdatasyncs it.
/// Writing the zeros (not only fallocate) turns unwritten extents into written ones, so later
/// appends do not pay a journal commit each (NOTES.md).
pub async fn create_zeroed(path: &Path, size_bytes: u64) -> Result<DmaFile> {
    let file = open_rw(path, true).await?;
    file.pre_allocate(size_bytes, false)
        .await
        .map_err(io_err("fallocate", path, Some(0)))?;
    write_zeros(&file, path, 0, size_bytes).await?;
    sync_data(&file, path).await?;
    Ok(file)
}

/// Closes a shared file if this is the last handle; otherwise the other handles keep it open.
pub async fn close_rc(file: Rc<DmaFile>, path: &Path) -> Result<()> {
    match Rc::try_unwrap(file) {
        Ok(f) => f.close().await.map_err(io_err("close", path, None)),
        Err(_) => Ok(()),
    }
}

thread_local! {
    /// Devices (st_dev) whose io_uring poll support glommio has probed on this thread. glommio
    /// keeps its verdict per thread (one executor per thread), so the probe is per thread too.
    static PROBED_DEVICES: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// glommio 0.9 decides once per device and executor thread whether DMA I/O may use the polled ring, by
/// reading the first `alignment` bytes of the first DMA file opened there. If that file is
/// empty the read succeeds at EOF without touching the device, the device is wrongly marked
/// pollable, and every later DMA read fails with EOPNOTSUPP (seen on this machine's virtio
/// disk). So before the first DMA open on a device we open a file that has data in it.
pub async fn probe_device_once(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir)
        .map_err(io_err("stat", dir, None))?
        .dev();
    if PROBED_DEVICES.with(|p| p.borrow().contains(&dev)) {
        return Ok(());
    }
    let path = dir.join(".iopoll-probe");
    std::fs::write(&path, [0u8; 4096]).map_err(io_err("write", &path, Some(0)))?;
    let file = glommio::io::DmaFile::open(&path)
        .await
        .map_err(io_err("open", &path, None))?;
    file.close().await.map_err(io_err("close", &path, None))?;
    std::fs::remove_file(&path).map_err(io_err("remove", &path, None))?;
    PROBED_DEVICES.with(|p| p.borrow_mut().push(dev));
    Ok(())
}
