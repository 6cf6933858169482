//! Peer transport: size-prefixed frames over TCP between the cores of different hosts.
//!
//! The transport moves opaque frames; what is inside (flatbuffers-encoded Raft messages, verified
//! before use) is the business of the layer above. One core keeps one outbound connection per remote
//! (host, core) it has traffic for, and accepts inbound connections on its own peer port.
//! Connections are one-directional: a core writes on the connections it opened and reads on the ones
//! it accepted. That keeps each connection's task simple (a writer or a reader, never both) at the
//! cost of two sockets per pair of cores that talk both ways, which is cheap.
//!
//! Wire format of a connection:
//! ```text
//! hello   : Hello (48 bytes, fixed layout, CRC-checked), sent once by the connecting side
//! frame*  : u32 little-endian length L (1..=frame_bytes_max) followed by L bytes
//! ```
//! The u32 prefix is exactly what flatbuffers' `finish_size_prefixed` writes, so an encoded message
//! is a ready-made frame.
//!
//! The hello names the cluster and the (host, core) the connection is meant for, so a misconfigured
//! host (wrong peer list, or two processes sharing a port: glommio binds with SO_REUSEPORT, so a
//! second bind of the same address does not fail) is refused loudly instead of receiving another
//! host's traffic.
//!
//! Back of the envelope: a 256 B write is under 300 B per follower on the wire; at ~100k writes/s
//! that is ~30 MB/s per follower, far from loopback or LAN bandwidth. The cost is in syscalls and
//! wake-ups, so the writer coalesces everything queued since its last write into one `write`
//! (bounded by `write_batch_bytes_max`), and the reader parses every complete frame in one read.
//!
//! Backpressure: the outbox of a connection is bounded in bytes (`outbox_bytes_max`). A frame that
//! does not fit is dropped and counted, never queued: Raft tolerates lost messages (the leader
//! retries from its progress state), whereas an unbounded queue to a slow or dead peer would grow
//! memory without bound and deliver stale messages late. While a peer is unreachable, queued frames
//! are discarded at each failed connection attempt for the same reason.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Identifies one core of one host, the endpoint of a peer connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CoreId {
    pub host: u64,
    pub core: u16,
}

impl std::fmt::Display for CoreId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host {} core {}", self.host, self.core)
    }
}

/// Limits and timings of the transport. Every queue and frame is bounded.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Identifies the cluster: a connection from another cluster is refused.
    pub cluster_id: u64,
    /// Largest frame accepted or sent (a larger length prefix closes the connection).
    pub frame_bytes_max: usize,
    /// Bytes queued per outbound connection before frames are dropped.
    pub outbox_bytes_max: usize,
    /// Most bytes handed to one `write` call.
    pub write_batch_bytes_max: usize,
    /// Bytes asked of one `read` call.
    pub read_chunk_bytes: usize,
    pub connect_timeout_ms: u64,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            cluster_id: 0,
            frame_bytes_max: 64 << 20,
            outbox_bytes_max: 64 << 20,
            write_batch_bytes_max: 1 << 20,
            read_chunk_bytes: 256 << 10,
            connect_timeout_ms: 1_000,
            reconnect_backoff_min_ms: 10,
            reconnect_backoff_max_ms: 1_000,
        }
    }
}

/// Errors of the transport, with the peer and what failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer address {addr} is already in use by another process (refusing to share it)")]
    AddressInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(String),
}

/// Why a frame stream was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {len} exceeds the maximum {max}")]
    TooLarge { len: usize, max: usize },
    #[error("zero-length frame")]
    Empty,
}

const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"TYNP");
const HELLO_VERSION: u16 = 1;

/// First bytes on every peer connection, sent by the connecting side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Hello {
    magic: u32,
    version: u16,
    from_core: u16,
    cluster_id: u64,
    from_host: u64,
    to_host: u64,
    to_core: u16,
    reserved: [u8; 10],
    /// CRC32 of all the bytes before it.
    crc: u32,
}

pub const HELLO_BYTES: usize = std::mem::size_of::<Hello>();
const _: () = assert!(HELLO_BYTES == 48);

/// Why a hello was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("bad magic {0:#x}: not a TynamoDB peer")]
    Magic(u32),
    #[error("unsupported peer protocol version {0}")]
    Version(u16),
    #[error("hello checksum mismatch")]
    Crc,
    #[error("connection from cluster {got}, this is cluster {want}")]
    Cluster { got: u64, want: u64 },
    #[error("connection meant for {meant}, this is {me}")]
    WrongTarget { meant: CoreId, me: CoreId },
}

impl Hello {
    pub fn new(cluster_id: u64, from: CoreId, to: CoreId) -> Hello {
        let mut hello = Hello {
            magic: HELLO_MAGIC,
            version: HELLO_VERSION,
            from_core: from.core,
            cluster_id,
            from_host: from.host,
            to_host: to.host,
            to_core: to.core,
            reserved: [0; 10],
            crc: 0,
        };
        hello.crc = crc32fast::hash(&hello.as_bytes()[..HELLO_BYTES - 4]);
        hello
    }

    /// Checks a received hello against this core; returns who sent it.
    pub fn check(
        bytes: &[u8; HELLO_BYTES],
        cluster_id: u64,
        me: CoreId,
    ) -> Result<CoreId, HelloError> {
        let hello = Hello::read_from_bytes(bytes).map_err(|_| HelloError::Crc)?;
        if hello.magic != HELLO_MAGIC {
            return Err(HelloError::Magic(hello.magic));
        }
        if crc32fast::hash(&bytes[..HELLO_BYTES - 4]) != hello.crc {
            return Err(HelloError::Crc);
        }
        if hello.version != HELLO_VERSION {
            return Err(HelloError::Version(hello.version));
        }
        if hello.cluster_id != cluster_id {
            return Err(HelloError::Cluster {
                got: hello.cluster_id,
                want: cluster_id,
            });
        }
        let meant = CoreId {
            host: hello.to_host,
            core: hello.to_core,
        };
        if meant != me {
            return Err(HelloError::WrongTarget { meant, me });
        }
        Ok(CoreId {
            host: hello.from_host,
            core: hello.from_core,
        })
    }
}

/// Splits complete frames off the front of a receive buffer (check, then split).
///
/// Returns `Ok(None)` when the buffer does not hold a whole frame yet: that is the normal state of
/// a stream, not an error. The returned frame excludes the length prefix and shares the buffer's
/// memory (no copy).
pub fn next_frame(buf: &mut BytesMut, frame_bytes_max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > frame_bytes_max {
        return Err(FrameError::TooLarge {
            len,
            max: frame_bytes_max,
        });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Counters of one core's transport, for INFO and tests.
#[derive(Debug, Default)]
pub struct TransportStats {
    pub frames_sent: Cell<u64>,
    pub frames_dropped_full: Cell<u64>,
    pub frames_dropped_disconnected: Cell<u64>,
    pub writes: Cell<u64>,
    pub connects: Cell<u64>,
    pub connect_failures: Cell<u64>,
    pub frames_received: Cell<u64>,
    pub connections_refused: Cell<u64>,
    pub connections_broken: Cell<u64>,
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

struct Outbox {
    /// Frames queued for the next write, each with its length prefix.
    queued: BytesMut,
    waker: Option<Waker>,
    closed: bool,
}

/// The sending end of one outbound peer connection. Cheap to clone; all clones share the outbox.
/// Dropping every clone does not stop the writer: call [`PeerSender::close`].
#[derive(Clone)]
pub struct PeerSender {
    outbox: Rc<RefCell<Outbox>>,
    config: Rc<TransportConfig>,
    stats: Rc<TransportStats>,
}

impl PeerSender {
    /// Starts the writer task for `to` at `addr` on the current executor. It connects lazily,
    /// when there is something to send.
    pub fn spawn(
        me: CoreId,
        to: CoreId,
        addr: SocketAddr,
        config: Rc<TransportConfig>,
        stats: Rc<TransportStats>,
    ) -> PeerSender {
        let outbox = Rc::new(RefCell::new(Outbox {
            queued: BytesMut::new(),
            waker: None,
            closed: false,
        }));
        let sender = PeerSender {
            outbox,
            config,
            stats,
        };
        let writer = sender.clone();
        glommio::spawn_local(async move { writer.run(me, to, addr).await }).detach();
        sender
    }

    /// Queues one frame (its payload, without the length prefix). Returns false when the frame was
    /// dropped because the outbox is full or the frame is larger than allowed.
    pub fn send(&self, payload: &[u8]) -> bool {
        self.send_parts(&[payload])
    }

    /// Queues one frame whose payload is the concatenation of `parts`, without building it first.
    pub fn send_parts(&self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut outbox = self.outbox.borrow_mut();
        if outbox.closed
            || len == 0
            || len > self.config.frame_bytes_max
            || outbox.queued.len() + 4 + len > self.config.outbox_bytes_max
        {
            bump(&self.stats.frames_dropped_full);
            return false;
        }
        outbox.queued.extend_from_slice(&(len as u32).to_le_bytes());
        for part in parts {
            outbox.queued.extend_from_slice(part);
        }
        if let Some(waker) = outbox.waker.take() {
            waker.wake();
        }
        true
    }

    /// Queues a frame that already carries its u32 length prefix (flatbuffers' size-prefixed
    /// output). Returns false when dropped; a frame whose prefix disagrees with its length is a bug.
    pub fn send_prefixed(&self, frame: &[u8]) -> bool {
        debug_assert!(frame.len() >= 4);
        debug_assert_eq!(
            u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize,
            frame.len() - 4
        );
        self.send(&frame[4..])
    }

    /// Bytes waiting to be written.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.borrow().queued.len()
    }

    /// Stops the writer after it has written what is queued (best effort).
    pub fn close(&self) {
        let mut outbox = self.outbox.borrow_mut();
        outbox.closed = true;
        if let Some(waker) = outbox.waker.take() {
            waker.wake();
        }
    }

    /// Waits until there are queued bytes (returns true) or the sender was closed with nothing
    /// left (false).
    async fn wait_for_work(&self) -> bool {
        futures_lite::future::poll_fn(|cx| {
            let mut outbox = self.outbox.borrow_mut();
            if !outbox.queued.is_empty() {
                Poll::Ready(true)
            } else if outbox.closed {
                Poll::Ready(false)
            } else {
                outbox.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn take_batch(&self, out: &mut BytesMut) {
        let mut outbox = self.outbox.borrow_mut();
        let max = self.config.write_batch_bytes_max;
        if outbox.queued.len() <= max {
            out.extend_from_slice(&outbox.queued);
            outbox.queued.clear();
            return;
        }
        // Cut at a frame boundary at or below the cap, but always take at least one whole frame.
        let mut cut = 0;
        while cut + 4 <= outbox.queued.len() {
            let q = &outbox.queued[cut..];
            let frame = 4 + u32::from_le_bytes([q[0], q[1], q[2], q[3]]) as usize;
            if cut > 0 && cut + frame > max {
                break;
            }
            cut += frame;
        }
        out.extend_from_slice(&outbox.queued[..cut]);
        outbox.queued.advance(cut);
    }

    fn discard_queued(&self) {
        let mut outbox = self.outbox.borrow_mut();
        let mut frames = 0u64;
        let mut at = 0;
        while at + 4 <= outbox.queued.len() {
            let q = &outbox.queued[at..];
            at += 4 + u32::from_le_bytes([q[0], q[1], q[2], q[3]]) as usize;
            frames += 1;
        }
        outbox.queued.clear();
        self.stats
            .frames_dropped_disconnected
            .set(self.stats.frames_dropped_disconnected.get() + frames);
    }

    async fn connect(
        &self,
        me: CoreId,
        to: CoreId,
        addr: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms.max(1));
        let mut stream = TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(std::io::Error::from)?;
        stream.set_nodelay(true).map_err(std::io::Error::from)?;
        let hello = Hello::new(self.config.cluster_id, me, to);
        stream.write_all(hello.as_bytes()).await?;
        Ok(stream)
    }

    async fn run(self, me: CoreId, to: CoreId, addr: SocketAddr) {
        let mut backoff_ms = self.config.reconnect_backoff_min_ms;
        let mut stream: Option<TcpStream> = None;
        let mut batch = BytesMut::with_capacity(self.config.write_batch_bytes_max);
        while self.wait_for_work().await {
            if stream.is_none() {
                match self.connect(me, to, addr).await {
                    Ok(s) => {
                        bump(&self.stats.connects);
                        backoff_ms = self.config.reconnect_backoff_min_ms;
                        stream = Some(s);
                    }
                    Err(_) => {
                        bump(&self.stats.connect_failures);
                        // Messages to an unreachable peer are stale by the time it is back.
                        self.discard_queued();
                        glommio::timer::sleep(Duration::from_millis(backoff_ms)).await;
                        backoff_ms = (backoff_ms * 2).min(self.config.reconnect_backoff_max_ms);
                        continue;
                    }
                }
            }
            let Some(s) = stream.as_mut() else { continue };
            batch.clear();
            self.take_batch(&mut batch);
            let frames = count_frames(&batch);
            match s.write_all(&batch).await {
                Ok(()) => {
                    bump(&self.stats.writes);
                    self.stats
                        .frames_sent
                        .set(self.stats.frames_sent.get() + frames);
                }
                Err(_) => {
                    bump(&self.stats.connections_broken);
                    self.stats
                        .frames_dropped_disconnected
                        .set(self.stats.frames_dropped_disconnected.get() + frames);
                    stream = None;
                }
            }
        }
        if let Some(mut s) = stream {
            let _ = s.close().await;
        }
    }
}

fn count_frames(buf: &[u8]) -> u64 {
    let mut frames = 0;
    let mut at = 0;
    while at + 4 <= buf.len() {
        at += 4 + u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        frames += 1;
    }
    frames
}

/// Receives the frames of one core's inbound connections.
pub trait FrameSink {
    /// One verified-length frame from `from`. The frame's bytes are a slice of the receive buffer.
    fn deliver(&self, from: CoreId, frame: Bytes);
}

/// Binds `addr` for peer traffic, refusing an address another process already listens on.
///
/// glommio sets SO_REUSEPORT on its own listeners, so a second process binding the same address
/// would silently share its connections. The listener is made by the standard library instead
/// (SO_REUSEADDR, no SO_REUSEPORT) and handed to glommio: a second bind of a listening address
/// fails, while connections of a previous run still in TIME_WAIT do not stop a restarted host
/// from binding its own port.
pub fn bind_exclusive(addr: SocketAddr) -> Result<TcpListener, TransportError> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(TransportError::AddressInUse { addr })
        }
        Err(source) => return Err(TransportError::Listen { addr, source }),
    };
    // SAFETY: the descriptor is a bound, listening TCP socket we own; ownership moves to glommio.
    Ok(unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) })
}

/// Accepts peer connections on `listener` for core `me` and hands their frames to `sink`, until the
/// executor stops. A connection that sends a bad hello or a bad frame is closed and counted; the
/// others keep running.
pub fn spawn_listener<S: FrameSink + 'static>(
    listener: TcpListener,
    me: CoreId,
    config: Rc<TransportConfig>,
    stats: Rc<TransportStats>,
    sink: Rc<S>,
) {
    glommio::spawn_local(async move {
        loop {
            let stream = match listener.accept().await {
                Ok(stream) => stream,
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning on accept.
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let (config, stats, sink) = (config.clone(), stats.clone(), sink.clone());
            glommio::spawn_local(async move {
                let ok = read_connection(stream, me, &config, &stats, &*sink).await;
                if !ok {
                    bump(&stats.connections_refused);
                }
            })
            .detach();
        }
    })
    .detach();
}

/// Reads one inbound connection to its end. Returns false when it was refused for bad input.
async fn read_connection<S: FrameSink>(
    mut stream: TcpStream,
    me: CoreId,
    config: &TransportConfig,
    stats: &TransportStats,
    sink: &S,
) -> bool {
    let mut hello = [0u8; HELLO_BYTES];
    if stream.read_exact(&mut hello).await.is_err() {
        return false;
    }
    let from = match Hello::check(&hello, config.cluster_id, me) {
        Ok(from) => from,
        Err(e) => {
            eprintln!("tynamo: refusing peer connection on {me}: {e}");
            return false;
        }
    };
    // Every frame is handed out as its own exact-size allocation, copied once out of the receive
    // chunk. Slicing frames out of a shared chunk would save that copy, but the Raft log keeps
    // entry payloads (slices of their frame) until the next snapshot, and every retained slice
    // pinned its whole 256 KiB chunk: a host grew to 6-12 GB under sustained write load and was
    // killed. One memcpy per frame (~10 GB/s) is the cheaper price; entries stay slices of
    // their frame, so decoding still copies nothing. The scratch chunk is zeroed once, not per read.
    let mut scratch = vec![0u8; config.read_chunk_bytes.max(4)];
    let mut pending = BytesMut::new();
    loop {
        let n = match stream.read(&mut scratch).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => n,
        };
        let result = if pending.is_empty() {
            deliver_frames(&scratch[..n], config.frame_bytes_max, from, stats, sink).map(
                |consumed| {
                    pending.extend_from_slice(&scratch[consumed..n]);
                },
            )
        } else {
            pending.extend_from_slice(&scratch[..n]);
            deliver_frames(&pending, config.frame_bytes_max, from, stats, sink)
                .map(|consumed| pending.advance(consumed))
        };
        if let Err(e) = result {
            eprintln!("tynamo: closing peer connection from {from} to {me}: {e}");
            return false;
        }
    }
}

/// Hands every complete frame at the front of `data` to `sink` (each copied into its own
/// allocation) and returns the bytes consumed; a partial frame at the end is left.
fn deliver_frames<S: FrameSink>(
    data: &[u8],
    frame_bytes_max: usize,
    from: CoreId,
    stats: &TransportStats,
    sink: &S,
) -> Result<usize, FrameError> {
    let mut at = 0;
    while data.len() - at >= 4 {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > frame_bytes_max {
            return Err(FrameError::TooLarge {
                len,
                max: frame_bytes_max,
            });
        }
        if data.len() - at - 4 < len {
            break;
        }
        bump(&stats.frames_received);
        sink.deliver(from, Bytes::copy_from_slice(&data[at + 4..at + 4 + len]));
        at += 4 + len;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::{LocalExecutorBuilder, Placement};

    #[test]
    fn frames_are_split_only_when_complete() {
        let mut buf = BytesMut::new();
        assert_eq!(next_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(b"ab");
        assert_eq!(next_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(b"c");
        buf.extend_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            next_frame(&mut buf, 100),
            Ok(Some(Bytes::from_static(b"abc")))
        );
        assert_eq!(next_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(b"z");
        assert_eq!(
            next_frame(&mut buf, 100),
            Ok(Some(Bytes::from_static(b"z")))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn frames_are_delivered_as_their_own_allocations_and_partial_ones_wait() {
        let sink = Collect(RefCell::new(Vec::new()));
        let stats = TransportStats::default();
        let from = CoreId { host: 1, core: 0 };
        let mut data = Vec::new();
        for payload in [&b"one"[..], b"three", b"partial-frame"] {
            data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            data.extend_from_slice(payload);
        }
        let cut = data.len() - 4; // the last frame lacks its final bytes
        let consumed = deliver_frames(&data[..cut], 100, from, &stats, &sink).unwrap();
        assert_eq!(consumed, 4 + 3 + 4 + 5);
        let got = sink.0.borrow();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[1].1[..], b"three");
        // Not a view into the receive chunk: retaining it must not pin the chunk.
        let chunk = data.as_ptr() as usize..data.as_ptr() as usize + data.len();
        assert!(!chunk.contains(&(got[1].1.as_ptr() as usize)));
        drop(got);
        assert_eq!(
            deliver_frames(&data[consumed..], 5, from, &stats, &sink),
            Err(FrameError::TooLarge { len: 13, max: 5 })
        );
    }

    #[test]
    fn oversized_and_empty_frames_are_errors() {
        let mut buf = BytesMut::from(&101u32.to_le_bytes()[..]);
        assert_eq!(
            next_frame(&mut buf, 100),
            Err(FrameError::TooLarge { len: 101, max: 100 })
        );
        let mut buf = BytesMut::from(&0u32.to_le_bytes()[..]);
        assert_eq!(next_frame(&mut buf, 100), Err(FrameError::Empty));
    }

    #[test]
    fn hello_round_trips_and_rejects_the_wrong_target() {
        let a = CoreId { host: 1, core: 0 };
        let b = CoreId { host: 2, core: 1 };
        let hello = Hello::new(7, a, b);
        let bytes: [u8; HELLO_BYTES] = hello.as_bytes().try_into().unwrap();
        assert_eq!(Hello::check(&bytes, 7, b), Ok(a));
        assert_eq!(
            Hello::check(&bytes, 8, b),
            Err(HelloError::Cluster { got: 7, want: 8 })
        );
        assert_eq!(
            Hello::check(&bytes, 7, a),
            Err(HelloError::WrongTarget { meant: b, me: a })
        );
        for bit in 0..HELLO_BYTES * 8 {
            let mut bad = bytes;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Hello::check(&bad, 7, b).is_err(), "bit {bit} flip accepted");
        }
    }

    struct Collect(RefCell<Vec<(CoreId, Bytes)>>);
    impl FrameSink for Collect {
        fn deliver(&self, from: CoreId, frame: Bytes) {
            self.0.borrow_mut().push((from, frame));
        }
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..2_000 {
            if cond() {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn run_local<F: std::future::Future<Output = ()> + 'static>(
        f: impl FnOnce() -> F + Send + 'static,
    ) {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(512 << 10)
            .spawn(move || async move { f().await })
            .expect("spawn executor")
            .join()
            .expect("executor panicked");
    }

    #[test]
    fn frames_arrive_in_order_and_coalesced() {
        run_local(|| async {
            let me = CoreId { host: 1, core: 0 };
            let peer = CoreId { host: 2, core: 0 };
            let config = Rc::new(TransportConfig {
                cluster_id: 9,
                ..TransportConfig::default()
            });
            let stats = Rc::new(TransportStats::default());
            let listener = bind_exclusive("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let sink = Rc::new(Collect(RefCell::new(Vec::new())));
            spawn_listener(listener, peer, config.clone(), stats.clone(), sink.clone());
            let sender = PeerSender::spawn(me, peer, addr, config, stats.clone());
            for i in 0..1000u32 {
                assert!(sender.send(&i.to_le_bytes()));
            }
            wait_until("1000 frames", || sink.0.borrow().len() == 1000).await;
            for (i, (from, frame)) in sink.0.borrow().iter().enumerate() {
                assert_eq!(*from, me);
                assert_eq!(&frame[..], &(i as u32).to_le_bytes());
            }
            // Queued before the writer ran once: far fewer writes than frames.
            assert!(stats.writes.get() < 100, "writes {}", stats.writes.get());
            sender.close();
        });
    }

    #[test]
    fn a_full_outbox_drops_instead_of_growing() {
        run_local(|| async {
            let config = Rc::new(TransportConfig {
                outbox_bytes_max: 100,
                ..TransportConfig::default()
            });
            let stats = Rc::new(TransportStats::default());
            // Nobody listens on this address: the writer can never drain the outbox.
            let sender = PeerSender::spawn(
                CoreId { host: 1, core: 0 },
                CoreId { host: 2, core: 0 },
                "127.0.0.1:1".parse().unwrap(),
                config,
                stats.clone(),
            );
            let mut accepted = 0;
            for _ in 0..50 {
                if sender.send(&[0u8; 20]) {
                    accepted += 1;
                }
            }
            assert_eq!(accepted, 4, "4 frames of 24 bytes fit in 100");
            assert_eq!(stats.frames_dropped_full.get(), 46);
            assert!(sender.queued_bytes() <= 100);
            sender.close();
        });
    }

    #[test]
    fn garbage_and_wrong_hellos_are_refused_and_the_listener_keeps_serving() {
        run_local(|| async {
            let me = CoreId { host: 1, core: 0 };
            let peer = CoreId { host: 2, core: 0 };
            let config = Rc::new(TransportConfig {
                cluster_id: 3,
                frame_bytes_max: 1024,
                ..TransportConfig::default()
            });
            let stats = Rc::new(TransportStats::default());
            let listener = bind_exclusive("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let sink = Rc::new(Collect(RefCell::new(Vec::new())));
            spawn_listener(listener, peer, config.clone(), stats.clone(), sink.clone());

            // Random bytes instead of a hello.
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&[0xAB; 200]).await.unwrap();
            // A valid hello for another cluster.
            let mut s2 = TcpStream::connect(addr).await.unwrap();
            s2.write_all(Hello::new(4, me, peer).as_bytes())
                .await
                .unwrap();
            // A valid hello, then an oversized frame.
            let mut s3 = TcpStream::connect(addr).await.unwrap();
            s3.write_all(Hello::new(3, me, peer).as_bytes())
                .await
                .unwrap();
            s3.write_all(&5000u32.to_le_bytes()).await.unwrap();
            wait_until("3 refusals", || stats.connections_refused.get() == 3).await;
            assert!(sink.0.borrow().is_empty());

            let sender = PeerSender::spawn(me, peer, addr, config, stats.clone());
            assert!(sender.send(b"still serving"));
            wait_until("a frame", || sink.0.borrow().len() == 1).await;
            assert_eq!(&sink.0.borrow()[0].1[..], b"still serving");
            drop((s, s2, s3));
            sender.close();
        });
    }

    #[test]
    fn a_second_bind_of_the_same_address_is_refused() {
        run_local(|| async {
            let first = bind_exclusive("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = first.local_addr().unwrap();
            match bind_exclusive(addr) {
                Err(TransportError::AddressInUse { addr: a }) => assert_eq!(a, addr),
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => panic!("second bind of {addr} succeeded"),
            }
        });
    }

    #[test]
    fn a_restarted_host_rebinds_its_port_despite_time_wait_connections() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        // The side that closes first keeps the connection in TIME_WAIT on the listening port.
        drop(server_side);
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink);
        drop(client);
        drop(listener);
        run_local(move || async move {
            let again = bind_exclusive(addr);
            assert!(again.is_ok(), "rebinding {addr}: {:?}", again.err());
        });
    }

    #[test]
    fn the_writer_reconnects_after_the_peer_restarts() {
        run_local(|| async {
            let me = CoreId { host: 1, core: 0 };
            let peer = CoreId { host: 2, core: 0 };
            let config = Rc::new(TransportConfig::default());
            let stats = Rc::new(TransportStats::default());
            // Reserve a port, then start with nobody listening on it.
            let addr = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                probe.local_addr().unwrap()
            };
            let sender = PeerSender::spawn(me, peer, addr, config.clone(), stats.clone());
            assert!(sender.send(b"lost"));
            wait_until("a failed connect", || stats.connect_failures.get() >= 1).await;
            let listener = bind_exclusive(addr).unwrap();
            let sink = Rc::new(Collect(RefCell::new(Vec::new())));
            spawn_listener(listener, peer, config, stats.clone(), sink.clone());
            // Keep sending until one gets through the reconnect backoff.
            wait_until("delivery after restart", || {
                sender.send(b"again");
                !sink.0.borrow().is_empty()
            })
            .await;
            assert_eq!(&sink.0.borrow()[0].1[..], b"again");
            sender.close();
        });
    }
}
