//! Writing records into a staging buffer.
//!
//! Short records (payload below [`FUSED_MIN_BYTES`]) are checksummed from their sources first,
//! four at a time (`crc32c::update_lanes`), then copied with ordinary stores
//! ([`write_record`]). Long ones are copied and checksummed in one pass with streaming
//! (non-temporal) stores ([`copy_crc_lanes`]), each header written after its payload
//! ([`write_record_streaming`]). Call [`fence`] before the buffer is handed to the device.
//!
//! Why ordinary stores for short records: an earlier version streamed every record (8-byte
//! `movnti`), because in the append loop the staging buffer is not in this core's cache when
//! a batch is encoded (the device read it since its last use): streaming stores skip the read
//! for ownership, and staging 256 x 1 KiB took 51 us instead of 61 us. Since a 256 KiB batch
//! goes out in two slices (`log.rs`, `PIPELINE_MIN_BYTES`) the second slice is encoded while
//! the device writes the first, and what counts is the whole append: with ordinary stores
//! the WAL benchmark's 1 KiB x 256 cell ran at 1.16-1.20M appends/s against 1.08-1.16M with
//! streaming stores, 0.86-0.91 of the raw loop against 0.79-0.85, in four alternating rounds
//! (2026-12-07, quiet machine); 128 B x 256, 1 KiB x 16 and 16 KiB x 16 did not change.
//! (That the device finishes a write sooner when its bytes are still in this core's cache is
//! our reading, not something measured directly.) Long records keep streaming stores: 4 MiB
//! batches do not fit the cache, and ordinary stores did no better for 16 KiB x 16.

/// Writes `header`, then `payload`, then zeros to the end of `dst` with ordinary stores.
/// `dst` must be at least `header.len() + payload.len()` long.
pub fn write_record(dst: &mut [u8], header: &[u8], payload: &[u8]) {
    let used = header.len() + payload.len();
    assert!(
        dst.len() >= used,
        "record of {used} bytes does not fit {} bytes",
        dst.len()
    );
    dst[..header.len()].copy_from_slice(header);
    dst[header.len()..used].copy_from_slice(payload);
    dst[used..].fill(0);
}

/// [`write_record`] with streaming stores (8 bytes each, `movnti`), for the headers of the
/// one-pass path: their lines are written with streaming stores too. `dst` must be at least
/// `header.len() + payload.len()` long, a multiple of 8, and `header.len()` a multiple of 8.
pub fn write_record_streaming(dst: &mut [u8], header: &[u8], payload: &[u8]) {
    let used = header.len() + payload.len();
    assert!(
        dst.len() >= used && dst.len() % 8 == 0 && header.len() % 8 == 0,
        "record of {used} bytes does not fit {} bytes",
        dst.len()
    );
    #[cfg(target_arch = "x86_64")]
    if (dst.as_ptr() as usize) % 8 == 0 {
        x86::write_record(dst, header, payload);
        return;
    }
    write_record(dst, header, payload);
}

/// Payloads at least this long are copied and checksummed in one pass
/// ([`copy_crc_lanes`]); shorter ones are checksummed from their source first, then copied
/// with [`write_record`].
///
/// Why: one pass reads the source once, keeps the CRC unit busy while the stores drain, and
/// stores 32 bytes per instruction (16 x 16 KiB in the WAL benchmark loop, 2026-12-07: the
/// CPU time until a pipelined batch's last slice is handed to the kernel went from 60-64 us
/// to 53-55 us in three A/B rounds). But it can only write a record's header after its
/// payload, when the CRC is known, and the header shares its 64-byte line with the end of
/// the previous record: that line reaches memory in two partial writes instead of one whole
/// one. With 1 KiB records (two such lines in 17) staging got slower (38.6 us per 256 KiB
/// batch instead of 36.5 us), so short records keep the two passes.
pub const FUSED_MIN_BYTES: usize = 4096;

/// One stream of [`copy_crc_lanes`]: `src` is copied to the start of `dst` (then zeros to
/// the end of `dst`, which is `src.len()` rounded up to 8) and the raw CRC32C register `crc`
/// continues over `src`.
pub struct Lane<'a> {
    pub dst: &'a mut [u8],
    pub src: &'a [u8],
    pub crc: u32,
}

/// Copies and checksums up to [`LANES`] lanes in one pass over their sources, the lanes' CRC
/// chains in lock step. Returns `false`, having done nothing, where this CPU or a lane does
/// not allow it; the caller then checksums and copies in two passes.
pub fn copy_crc_lanes(lanes: &mut [Lane<'_>]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if lanes.len() <= LANES
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("sse4.2")
        && lanes.iter().all(|l| {
            l.dst.len() == l.src.len().div_ceil(8) * 8 && (l.dst.as_ptr() as usize) % 8 == 0
        })
    {
        // SAFETY: AVX2 and SSE4.2 were detected at run time; there are at most `LANES`
        // lanes, every destination is 8-byte aligned and exactly as long as its source
        // rounded up to 8 (all checked just above).
        unsafe { x86::copy_crc_lanes(lanes) };
        return true;
    }
    let _ = lanes;
    false
}

/// Lanes of [`copy_crc_lanes`]: as many independent CRC chains as cover the instruction's
/// latency (see `crc32c.rs`).
pub const LANES: usize = crate::crc32c::LANES;

/// Orders every streaming store before later stores (`sfence`); a no-op elsewhere.
pub fn fence() {
    #[cfg(target_arch = "x86_64")]
    x86::fence();
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_crc32_u64, _mm_crc32_u8, _mm_sfence,
        _mm_stream_si64,
    };

    use super::LANES;

    /// 8 bytes little-endian from `b` (exactly 8 bytes long).
    #[inline(always)]
    fn le64(b: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    }

    /// Streams `v` to `w`, which is 8 bytes long and 8-byte aligned.
    #[inline(always)]
    fn stream(w: &mut [u8], v: u64) {
        debug_assert!(w.len() == 8 && (w.as_ptr() as usize) % 8 == 0);
        // SAFETY: `w` is an exclusive 8-byte slice (a `chunks_exact_mut(8)` item of a buffer
        // whose start the caller checked is 8-byte aligned, so `w` is aligned too); `movnti`
        // writes exactly those 8 bytes. SSE2 is part of the x86-64 baseline.
        unsafe { _mm_stream_si64(w.as_mut_ptr().cast::<i64>(), v as i64) }
    }

    /// `dst` starts 8-byte aligned (checked by the caller). The path for CPUs without AVX2.
    pub fn write_record(dst: &mut [u8], header: &[u8], payload: &[u8]) {
        let mut words = dst.chunks_exact_mut(8);
        for h in header.chunks_exact(8) {
            if let Some(w) = words.next() {
                stream(w, le64(h));
            }
        }
        let mut source = payload.chunks_exact(8);
        for s in &mut source {
            if let Some(w) = words.next() {
                stream(w, le64(s));
            }
        }
        let rest = source.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            if let Some(w) = words.next() {
                stream(w, u64::from_le_bytes(last));
            }
        }
        for w in words {
            stream(w, 0);
        }
    }

    /// A copy in progress: `left` bytes of `src` go to `dst`, whose room ends at `end`
    /// (`left` rounded up to 8 bytes past `dst`, or more: the rest is zero-filled).
    ///
    /// Invariants the methods rely on: `dst` is 8-byte aligned; `src..src + left` is
    /// readable; `dst..end` is writable and at least `left` rounded up to 8 long.
    struct Cursor {
        src: *const u8,
        dst: *mut u8,
        end: *mut u8,
        left: usize,
        crc: u64,
    }

    impl Cursor {
        /// One 8-byte word (`left >= 8`), with its CRC when `CRC`.
        #[inline(always)]
        unsafe fn word<const CRC: bool>(&mut self) {
            let w = self.src.cast::<u64>().read_unaligned();
            if CRC {
                self.crc = _mm_crc32_u64(self.crc, w);
            }
            _mm_stream_si64(self.dst.cast::<i64>(), w as i64);
            self.src = self.src.add(8);
            self.dst = self.dst.add(8);
            self.left -= 8;
        }

        /// 32 bytes (`left >= 32`, `dst` 32-byte aligned) in one streaming store, with their
        /// CRC when `CRC` (the words are read back from L1).
        #[inline(always)]
        unsafe fn block<const CRC: bool>(&mut self) {
            let v = _mm256_loadu_si256(self.src.cast::<__m256i>());
            _mm256_stream_si256(self.dst.cast::<__m256i>(), v);
            if CRC {
                let mut c = self.crc;
                for k in 0..4 {
                    c = _mm_crc32_u64(c, self.src.add(8 * k).cast::<u64>().read_unaligned());
                }
                self.crc = c;
            }
            self.src = self.src.add(32);
            self.dst = self.dst.add(32);
            self.left -= 32;
        }

        /// Words up to the next 64-byte boundary of `dst` (as far as `left` goes).
        #[inline(always)]
        unsafe fn align_to_line<const CRC: bool>(&mut self) {
            while self.left >= 8 && (self.dst as usize) % 64 != 0 {
                self.word::<CRC>();
            }
        }

        /// Whole 64-byte lines, each written by two streaming stores back to back so that
        /// it leaves the write-combining buffer whole.
        #[inline(always)]
        unsafe fn line<const CRC: bool>(&mut self) {
            self.block::<CRC>();
            self.block::<CRC>();
        }

        /// Everything after the lines: whole words, the last bytes as a zero-padded word
        /// (checksummed byte by byte), then zeros to `end`.
        #[inline(always)]
        unsafe fn finish<const CRC: bool>(&mut self) {
            while self.left >= 8 {
                self.word::<CRC>();
            }
            if self.left > 0 {
                let mut w = [0u8; 8];
                let mut c = self.crc as u32;
                for (k, b) in w.iter_mut().enumerate().take(self.left) {
                    *b = *self.src.add(k);
                    if CRC {
                        c = _mm_crc32_u8(c, *b);
                    }
                }
                self.crc = u64::from(c);
                _mm_stream_si64(self.dst.cast::<i64>(), u64::from_le_bytes(w) as i64);
                self.dst = self.dst.add(8);
                self.left = 0;
            }
            while self.dst < self.end {
                _mm_stream_si64(self.dst.cast::<i64>(), 0);
                self.dst = self.dst.add(8);
            }
        }
    }

    /// See [`super::copy_crc_lanes`]: heads to a line boundary one lane at a time, then
    /// whole lines with every lane in lock step (independent CRC chains, fixed arrays that
    /// stay in registers), then each lane's rest.
    ///
    /// SAFETY (caller): AVX2 and SSE4.2 are available; at most `LANES` lanes; every `dst` is
    /// 8-byte aligned and `src.len()` rounded up to 8 long.
    #[target_feature(enable = "avx2,sse4.2")]
    pub unsafe fn copy_crc_lanes(lanes: &mut [super::Lane<'_>]) {
        let n = lanes.len().min(LANES);
        let mut cur: [Cursor; LANES] = std::array::from_fn(|_| Cursor {
            src: std::ptr::null(),
            dst: std::ptr::null_mut(),
            end: std::ptr::null_mut(),
            left: 0,
            crc: 0,
        });
        for (c, l) in cur.iter_mut().zip(lanes.iter_mut()) {
            *c = Cursor {
                src: l.src.as_ptr(),
                dst: l.dst.as_mut_ptr(),
                end: l.dst.as_mut_ptr().add(l.dst.len()),
                left: l.src.len(),
                crc: u64::from(l.crc),
            };
            c.align_to_line::<true>();
        }
        let common = cur[..n].iter().map(|c| c.left / 64).min().unwrap_or(0);
        if n == LANES {
            let [c0, c1, c2, c3] = &mut cur;
            for _ in 0..common {
                c0.line::<true>();
                c1.line::<true>();
                c2.line::<true>();
                c3.line::<true>();
            }
        } else {
            for _ in 0..common {
                for c in cur[..n].iter_mut() {
                    c.line::<true>();
                }
            }
        }
        for (c, l) in cur[..n].iter_mut().zip(lanes.iter_mut()) {
            while c.left >= 64 {
                c.line::<true>();
            }
            c.finish::<true>();
            l.crc = c.crc as u32;
        }
    }

    pub fn fence() {
        // SAFETY: `sfence` has no preconditions (SSE is in the x86-64 baseline).
        unsafe { _mm_sfence() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_header_payload_and_zeros_at_every_length() {
        let header: Vec<u8> = (0..32u8).map(|i| i ^ 0x5A).collect();
        let payload: Vec<u8> = (0..600u32).map(|i| (i * 7 + 1) as u8).collect();
        // A 4096-aligned buffer, as the staging buffers are, and a misaligned view of it (the
        // portable path).
        let mut backing = vec![0u64; 1024];
        type Writer = fn(&mut [u8], &[u8], &[u8]);
        let writers: [Writer; 2] = [write_record, write_record_streaming];
        for (len, write) in [0usize, 1, 7, 8, 9, 100, 128, 599]
            .into_iter()
            .flat_map(|len| writers.map(|w| (len, w)))
        {
            for (at, extra) in [(0usize, 0usize), (8, 8), (16, 64), (3, 5)] {
                let size = (32 + len + extra).div_ceil(8) * 8;
                let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(&mut backing[..]);
                bytes.fill(0xEE);
                write(&mut bytes[at..at + size], &header, &payload[..len]);
                fence();
                assert_eq!(&bytes[at..at + 32], &header[..], "len {len} at {at}");
                assert_eq!(&bytes[at + 32..at + 32 + len], &payload[..len]);
                assert!(bytes[at + 32 + len..at + size].iter().all(|&b| b == 0));
                assert!(bytes[..at].iter().all(|&b| b == 0xEE), "before, len {len}");
                assert!(
                    bytes[at + size..].iter().all(|&b| b == 0xEE),
                    "after, len {len}"
                );
            }
        }
    }

    /// The fused copy against the two-pass definition: every lane count, payload lengths
    /// around the 8-byte word and the 64-byte line, destinations at every 8-byte offset of
    /// a line, lanes of different lengths; bytes around each destination stay untouched.
    #[test]
    fn copy_crc_lanes_matches_checksum_then_copy() {
        let lens = [
            0usize, 1, 7, 8, 9, 31, 56, 63, 64, 65, 127, 200, 4096, 4103, 16384, 16391,
        ];
        let source: Vec<u8> = (0..20_000u32).map(|i| (i * 131 + 17) as u8).collect();
        let mut backing = vec![0u64; 4 * 20_480 / 8 + 64];
        let mut fused_any = false;
        for round in 0..lens.len() * 3 {
            for n in 1..=LANES {
                let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(&mut backing[..]);
                bytes.fill(0xEE);
                // Lane i: a length and a destination offset (multiple of 8) of its own.
                let plan: Vec<(usize, usize, usize, u32)> = (0..n)
                    .map(|i| {
                        let len = lens[(round + i * 5) % lens.len()];
                        let at = i * 20_480 + 64 + ((round + i) % 8) * 8;
                        let from = (round * 13 + i * 7) % 64;
                        (len, at, from, 0x1234_5678 ^ (round * 4 + i) as u32)
                    })
                    .collect();
                let mut rest: &mut [u8] = bytes;
                let mut taken = 0;
                let mut lanes = Vec::new();
                for &(len, at, from, crc) in &plan {
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - taken);
                    let room = len.div_ceil(8) * 8;
                    let (dst, tail) = tail.split_at_mut(room);
                    rest = tail;
                    taken = at + room;
                    lanes.push(Lane {
                        dst,
                        src: &source[from..from + len],
                        crc,
                    });
                }
                let done = copy_crc_lanes(&mut lanes);
                let crcs: Vec<u32> = lanes.iter().map(|l| l.crc).collect();
                drop(lanes);
                fence();
                if !done {
                    // No fused path on this CPU: nothing may have been written.
                    assert!(bytes.iter().all(|&b| b == 0xEE));
                    continue;
                }
                fused_any = true;
                let bytes: &[u8] = zerocopy::IntoBytes::as_bytes(&backing[..]);
                let mut end_prev = 0;
                for (i, &(len, at, from, crc)) in plan.iter().enumerate() {
                    let src = &source[from..from + len];
                    assert_eq!(
                        crcs[i],
                        crate::crc32c::update(crc, src),
                        "crc, lane {i} of {n}, len {len}, at {at}"
                    );
                    assert_eq!(&bytes[at..at + len], src, "bytes, lane {i}, len {len}");
                    let room = len.div_ceil(8) * 8;
                    assert!(bytes[at + len..at + room].iter().all(|&b| b == 0));
                    assert!(
                        bytes[end_prev..at].iter().all(|&b| b == 0xEE),
                        "before lane {i}"
                    );
                    end_prev = at + room;
                }
                assert!(
                    bytes[end_prev..].iter().all(|&b| b == 0xEE),
                    "after the lanes"
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("sse4.2")
        {
            assert!(fused_any, "this CPU has the fused path");
        }
        let _ = fused_any;
    }

    #[test]
    fn copy_crc_lanes_refuses_a_misaligned_or_wrong_sized_destination() {
        let source = [7u8; 100];
        let mut backing = vec![0u64; 32];
        let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(&mut backing[..]);
        let mut lanes = [Lane {
            dst: &mut bytes[3..3 + 104],
            src: &source,
            crc: 0,
        }];
        assert!(!copy_crc_lanes(&mut lanes));
        let mut lanes = [Lane {
            dst: &mut bytes[8..8 + 96],
            src: &source,
            crc: 0,
        }];
        assert!(!copy_crc_lanes(&mut lanes));
        assert!(bytes.iter().all(|&b| b == 0));
    }
}
