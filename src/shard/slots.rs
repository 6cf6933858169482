//! Key -> hash slot, exactly as Redis Cluster computes it, so that every Redis cluster client
//! (redis-cli -c, redis-benchmark --cluster) routes a key to the same slot we do.
//!
//! slot = CRC16-XMODEM(hash tag or key) mod 16384, where the hash tag is the bytes between the
//! first `{` and the next `}` after it, when that span is non-empty.

/// Number of hash slots in the key space (Redis Cluster).
pub const SLOT_COUNT: u16 = 16384;

/// CRC16-XMODEM (poly 0x1021, init 0), the checksum Redis Cluster uses for key slots.
///
/// Table-driven: one lookup per byte, on the client hot path.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc = (crc << 8) ^ CRC16_TABLE[(((crc >> 8) as u8) ^ b) as usize];
    }
    crc
}

const CRC16_TABLE: [u16; 256] = build_crc16_table();

const fn build_crc16_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// The part of the key that is hashed: the non-empty `{tag}` if there is one, else the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The hash slot (0..16384) of a key.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOT_COUNT
}

/// The shard of a slot when `shard_count` shards split the slots into equal contiguous ranges
/// (the first `SLOT_COUNT % shard_count` shards get one slot more). Contiguous ranges keep
/// `CLUSTER SLOTS` short: one row per shard.
pub fn slot_shard(slot: u16, shard_count: u16) -> u16 {
    debug_assert!(shard_count > 0 && shard_count <= SLOT_COUNT);
    debug_assert!(slot < SLOT_COUNT);
    let range = shard_slot_range_table(shard_count);
    // Invert shard_slots(): shards 0..extra have size base+1, the rest size base.
    let (base, extra) = (range.0, range.1);
    let big = u32::from(extra) * (u32::from(base) + 1);
    let slot = u32::from(slot);
    let shard = if slot < big {
        slot / (u32::from(base) + 1)
    } else {
        u32::from(extra) + (slot - big) / u32::from(base)
    };
    shard as u16
}

fn shard_slot_range_table(shard_count: u16) -> (u16, u16) {
    (SLOT_COUNT / shard_count, SLOT_COUNT % shard_count)
}

/// The slots `[start, end]` (inclusive, as CLUSTER SLOTS prints them) of a shard.
pub fn shard_slots(shard: u16, shard_count: u16) -> (u16, u16) {
    debug_assert!(shard < shard_count);
    let (base, extra) = shard_slot_range_table(shard_count);
    let start = shard * base + shard.min(extra);
    let len = base + u16::from(shard < extra);
    (start, start + len - 1)
}

/// The shard of a key.
pub fn key_shard(key: &[u8], shard_count: u16) -> u16 {
    slot_shard(key_slot(key), shard_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_redis_reference_vector() {
        // The reference value from the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn key_slots_match_redis_cluster() {
        // Values printed by `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn hash_tags_route_keys_together() {
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
        // An empty tag hashes the whole key.
        assert_eq!(hash_tag(b"foo{}{bar}"), b"foo{}{bar}");
        // Only the first {...} counts.
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar");
        // An unclosed brace hashes the whole key.
        assert_eq!(hash_tag(b"foo{bar"), b"foo{bar");
    }

    #[test]
    fn shard_ranges_partition_all_slots() {
        for shard_count in [1u16, 2, 3, 7, 64, 1000, 16384] {
            let mut next = 0u32;
            for shard in 0..shard_count {
                let (start, end) = shard_slots(shard, shard_count);
                assert_eq!(u32::from(start), next, "shard {shard} of {shard_count}");
                assert!(end >= start);
                for slot in [start, end] {
                    assert_eq!(
                        slot_shard(slot, shard_count),
                        shard,
                        "slot {slot} of {shard_count}"
                    );
                }
                next = u32::from(end) + 1;
            }
            assert_eq!(next, u32::from(SLOT_COUNT));
        }
    }

    #[test]
    fn every_slot_maps_to_the_shard_whose_range_holds_it() {
        for shard_count in [3u16, 64] {
            for slot in 0..SLOT_COUNT {
                let shard = slot_shard(slot, shard_count);
                let (start, end) = shard_slots(shard, shard_count);
                assert!(start <= slot && slot <= end);
            }
        }
    }
}
