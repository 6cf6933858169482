//! Property tests of the RESP frame layer: encode -> parse round trips, any split of a valid
//! stream parses the same, and random bytes never panic nor allocate beyond what the caps allow.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use tynamo::resp::frame::{self, Frame, Limits, Protocol};

/// Counts the bytes this thread has live, and their peak, so a test can bound what the parser
/// allocates while it runs (per thread: the test harness runs other tests in parallel).
struct CountingAlloc;

thread_local! {
    static LIVE_BYTES: Cell<usize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE_BYTES.try_with(|live| {
        let now = live.get() + size;
        live.set(now);
        let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn note_free(size: usize) {
    let _ = LIVE_BYTES.try_with(|live| live.set(live.get().saturating_sub(size)));
}

// SAFETY: every method forwards to the system allocator with the same layout; the counters are
// const-initialised thread locals holding plain integers (no allocation, no re-entrance).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: the caller upholds GlobalAlloc's contract for `layout`.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: `ptr` was allocated by `System` with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: as for dealloc and alloc.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// Peak bytes allocated (above the level at entry) while `f` runs on this thread.
fn peak_allocated_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE_BYTES.with(|l| l.get());
    PEAK_BYTES.with(|p| p.set(base));
    let out = f();
    let peak = PEAK_BYTES.with(|p| p.get());
    (out, peak.saturating_sub(base))
}

fn line_text() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(
        any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
        0..40,
    )
    .prop_map(Bytes::from)
}

fn nonempty_line() -> impl Strategy<Value = Bytes> {
    "[0-9a-z.+-]{1,30}".prop_map(|s| Bytes::from(s.into_bytes()))
}

fn any_bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn frame_strategy() -> impl Strategy<Value = Frame> {
    let leaf = prop_oneof![
        line_text().prop_map(Frame::Simple),
        line_text().prop_map(Frame::Error),
        any::<i64>().prop_map(Frame::Integer),
        any_bytes().prop_map(Frame::Bulk),
        Just(Frame::Null),
        any::<bool>().prop_map(Frame::Boolean),
        nonempty_line().prop_map(Frame::Double),
        nonempty_line().prop_map(Frame::BigNumber),
        any_bytes().prop_map(Frame::BulkError),
        any_bytes().prop_map(|b| {
            let mut v = b"txt:".to_vec();
            v.extend_from_slice(&b);
            Frame::Verbatim(Bytes::from(v))
        }),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Frame::Array),
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Frame::Set),
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Frame::Push),
            proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Frame::Map),
        ]
    })
}

fn args_strategy() -> impl Strategy<Value = Vec<Bytes>> {
    proptest::collection::vec(any_bytes(), 1..8)
}

/// Feeds `stream` to the frame decoder in pieces cut at `cuts`, collecting every frame.
fn decode_in_pieces(stream: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    for p in points {
        buf.extend_from_slice(&stream[fed..p]);
        fed = p;
        while let Some(f) = frame::decode(&mut buf, &Limits::DEFAULT).expect("valid stream") {
            out.push(f);
        }
    }
    assert!(buf.is_empty(), "bytes left over: {buf:?}");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_round_trips(f in frame_strategy()) {
        let mut out = BytesMut::new();
        f.encode(&mut out, Protocol::Resp3);
        let len = out.len();
        prop_assert_eq!(frame::check(&out, &Limits::DEFAULT), Ok(Some(len)));
        let back = frame::decode(&mut out, &Limits::DEFAULT).unwrap();
        prop_assert_eq!(back, Some(f));
        prop_assert!(out.is_empty());
    }

    #[test]
    fn every_prefix_of_a_frame_is_incomplete(f in frame_strategy()) {
        let mut out = BytesMut::new();
        f.encode(&mut out, Protocol::Resp3);
        for cut in 0..out.len() {
            prop_assert_eq!(frame::check(&out[..cut], &Limits::DEFAULT), Ok(None), "cut {}", cut);
        }
    }

    #[test]
    fn split_points_do_not_change_the_frames(
        frames in proptest::collection::vec(frame_strategy(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut stream = BytesMut::new();
        for f in &frames {
            f.encode(&mut stream, Protocol::Resp3);
        }
        prop_assert_eq!(decode_in_pieces(&stream, &cuts), frames);
    }

    #[test]
    fn requests_round_trip_at_any_split(
        requests in proptest::collection::vec(args_strategy(), 1..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let mut stream = BytesMut::new();
        for args in &requests {
            let refs: Vec<&[u8]> = args.iter().map(|a| a.as_ref()).collect();
            frame::put_request(&mut stream, &refs);
        }
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort_unstable();
        let (mut buf, mut fed, mut got, mut args) = (BytesMut::new(), 0, Vec::new(), Vec::new());
        for p in points {
            buf.extend_from_slice(&stream[fed..p]);
            fed = p;
            while frame::decode_request(&mut buf, &Limits::DEFAULT, &mut args).unwrap() {
                got.push(args.clone());
            }
        }
        prop_assert_eq!(got, requests);
    }

    #[test]
    fn random_bytes_never_panic_nor_allocate_beyond_the_input(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let input_len = bytes.len();
        let limits = Limits { bulk_bytes_max: 1 << 20, array_len_max: 1 << 16, depth_max: 8, inline_bytes_max: 256 };
        let (_, peak) = peak_allocated_during(|| {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut frames = 0;
            // Stop at the first error, as a connection would; bound the loop by the input size.
            while frames <= input_len {
                match frame::decode(&mut buf, &limits) {
                    Ok(Some(_)) => frames += 1,
                    Ok(None) | Err(_) => break,
                }
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let mut args = Vec::new();
            let mut requests = 0;
            while requests <= input_len {
                match frame::decode_request(&mut buf, &limits, &mut args) {
                    Ok(true) => requests += 1,
                    Ok(false) | Err(_) => break,
                }
            }
        });
        // Two copies of the input plus, at worst, one Frame (48 bytes) or one Bytes handle
        // (32 bytes) per 3 input bytes, plus Vec growth slack.
        let bound = 2 * input_len + 64 * input_len + 4096;
        prop_assert!(peak <= bound, "peak {} bytes for {} input bytes", peak, input_len);
    }

    #[test]
    fn corrupted_frames_are_errors_or_frames_never_panics(
        f in frame_strategy(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut out = BytesMut::new();
        f.encode(&mut out, Protocol::Resp3);
        for (at, byte) in flips {
            let len = out.len();
            out[at % len] = byte;
        }
        let input_len = out.len();
        let limits = Limits { depth_max: 3, ..Limits::DEFAULT };
        let (_, peak) = peak_allocated_during(|| {
            while let Ok(Some(_)) = frame::decode(&mut out, &limits) {}
        });
        prop_assert!(peak <= 64 * input_len + 4096, "peak {} for {} bytes", peak, input_len);
    }

    #[test]
    fn huge_declared_lengths_are_refused_without_allocating(
        kind in prop::sample::select(vec![b'$', b'*', b'%', b'~', b'!', b'=']),
        declared in 1_000_000u64..u64::MAX,
    ) {
        let limits = Limits { bulk_bytes_max: 1000, array_len_max: 1000, depth_max: 8, inline_bytes_max: 256 };
        let mut wire = vec![kind];
        wire.extend_from_slice(declared.to_string().as_bytes());
        wire.extend_from_slice(b"\r\n");
        let (result, peak) = peak_allocated_during(|| frame::check(&wire, &limits));
        prop_assert!(result.is_err(), "{:?} accepted", String::from_utf8_lossy(&wire));
        prop_assert_eq!(peak, 0);
        if kind == b'*' {
            // Any other first byte makes the request an inline command, which is legal.
            let mut buf = BytesMut::from(&wire[..]);
            let mut args = Vec::new();
            let result = frame::decode_request(&mut buf, &limits, &mut args);
            prop_assert!(result.is_err());
        }
    }
}

#[test]
fn a_million_element_claim_waits_only_for_bytes_actually_sent() {
    // A peer that declares a big (but allowed) array and then stalls costs us only what it sent.
    let mut wire = b"*1000000\r\n".to_vec();
    for _ in 0..10 {
        wire.extend_from_slice(b"$1\r\nx\r\n");
    }
    let (result, peak) = peak_allocated_during(|| frame::check(&wire, &Limits::DEFAULT));
    assert_eq!(result, Ok(None));
    assert_eq!(peak, 0);
}
