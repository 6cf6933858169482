//! Copying records into a staging buffer.
//!
//! Records are checksummed from their sources first, four at a time
//! (`crc32c::update_lanes`), then copied in with ordinary stores ([`write_record`], or
//! [`write_record_words`] when the header is at hand as words in registers).
//!
//! Why ordinary stores: earlier versions wrote records with streaming (non-temporal) stores,
//! 8-byte `movnti` for every record and, for payloads of 4 KiB or more, a one-pass copy and
//! checksum with 32-byte streaming stores. In the append loop the staging buffer is not in
//! this core's cache when a batch is encoded (the device read it since its last use), and
//! streaming stores skip the read for ownership: staging 256 x 1 KiB took 51 us instead of
//! 61 us, and the one-pass copy saved 16 x 16 KiB about 7 us of CPU. But what counts is the
//! whole append, and since a batch of 192 KiB or more goes out in two slices (`log.rs`,
//! `PIPELINE_MIN_BYTES`), ordinary stores win: in the WAL benchmark (2026-12-07, quiet
//! machine, alternating A/B rounds against the raw loop of the same run) 1 KiB x 256 ran at
//! 1.16-1.20M appends/s instead of 1.08-1.16M (four rounds), 16 KiB x 16 at 70.7-78.7k
//! instead of 65.9-73.4k (four rounds, against the one-pass streaming copy), and 128 B x 256,
//! 1 KiB x 16, 16 KiB x 1 and 16 KiB x 256 did not change. That the device finishes a write
//! sooner when its bytes are still in this core's cache is our reading, not something we
//! measured directly.

/// Writes `header`, then `payload`, then zeros to the end of `dst`. `dst` must be at least
/// `header.len() + payload.len()` long.
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

/// [`write_record`] with the header given as four little-endian words (from
/// `RecordHeader::words_without_crc`), stored straight from registers.
#[inline(always)]
pub fn write_record_words(dst: &mut [u8], header: [u64; 4], payload: &[u8]) {
    let used = 32 + payload.len();
    assert!(
        dst.len() >= used,
        "record of {used} bytes does not fit {} bytes",
        dst.len()
    );
    for (d, w) in dst[..32].chunks_exact_mut(8).zip(header) {
        d.copy_from_slice(&w.to_le_bytes());
    }
    dst[32..used].copy_from_slice(payload);
    dst[used..].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_header_payload_and_zeros_at_every_length() {
        let header: Vec<u8> = (0..32u8).map(|i| i ^ 0x5A).collect();
        let payload: Vec<u8> = (0..600u32).map(|i| (i * 7 + 1) as u8).collect();
        // A 4096-aligned buffer, as the staging buffers are, and misaligned views of it.
        let mut backing = vec![0u64; 1024];
        for len in [0usize, 1, 7, 8, 9, 100, 128, 599] {
            for (at, extra) in [(0usize, 0usize), (8, 8), (16, 64), (3, 5)] {
                let size = (32 + len + extra).div_ceil(8) * 8;
                let bytes: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(&mut backing[..]);
                bytes.fill(0xEE);
                if at % 2 == 0 {
                    write_record(&mut bytes[at..at + size], &header, &payload[..len]);
                } else {
                    let mut words = [0u64; 4];
                    for (w, h) in words.iter_mut().zip(header.chunks_exact(8)) {
                        *w = u64::from_le_bytes(h.try_into().unwrap_or_default());
                    }
                    write_record_words(&mut bytes[at..at + size], words, &payload[..len]);
                }
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
}
