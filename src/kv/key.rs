//! How the state machine stores a key: short keys inline, longer ones on the heap.
//!
//! Why: the data of a shard is a `BTreeMap`, and a lookup compares the wanted key with about
//! log2(n) stored keys. Stored as `Bytes`, every comparison followed a pointer to the key's
//! bytes, somewhere else in memory: a cache miss per comparison, and the largest single item
//! of a follower's CPU profile under write load (the map insert and its `memcmp`, ~13% of a
//! follower). A key of up to [`INLINE_BYTES_MAX`] bytes (most keys: Redis benchmarks, YCSB and
//! typical application keys are 10-20 bytes) now sits in the map node itself, next to the keys
//! it is compared with. A longer key costs one allocation, as before.
//!
//! A `Key` orders, compares and hashes exactly as the byte slice it holds, and borrows as
//! `[u8]`, so the map is searched with a plain `&[u8]`.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

/// Longest key stored inline: the inline form is as large as the heap form's 16-byte
/// pointer and length plus the 8 it shares with the tag and length, 24 bytes in all.
pub(crate) const INLINE_BYTES_MAX: usize = 22;

#[derive(Clone)]
pub(crate) enum Key {
    Inline {
        len: u8,
        bytes: [u8; INLINE_BYTES_MAX],
    },
    Heap(Box<[u8]>),
}

const _: () = assert!(std::mem::size_of::<Key>() <= 24);
const _: () = assert!(INLINE_BYTES_MAX <= u8::MAX as usize);

impl Key {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(bytes) => bytes,
        }
    }
}

impl From<&[u8]> for Key {
    fn from(key: &[u8]) -> Key {
        if key.len() <= INLINE_BYTES_MAX {
            let mut bytes = [0u8; INLINE_BYTES_MAX];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(key.into())
        }
    }
}

impl std::ops::Deref for Key {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&bytes::Bytes::copy_from_slice(self.as_slice()), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_keys_are_inline_and_long_ones_on_the_heap() {
        assert!(matches!(Key::from(&b""[..]), Key::Inline { len: 0, .. }));
        assert!(matches!(
            Key::from(&[7u8; INLINE_BYTES_MAX][..]),
            Key::Inline { len: 22, .. }
        ));
        assert!(matches!(
            Key::from(&[7u8; INLINE_BYTES_MAX + 1][..]),
            Key::Heap(_)
        ));
    }

    proptest! {
        /// Order and equality are the byte slices', across the inline/heap boundary, so a map
        /// of keys iterates (and snapshots) in the order a map of `Bytes` did.
        #[test]
        fn keys_order_and_compare_as_their_bytes(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            b in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let (ka, kb) = (Key::from(&a[..]), Key::from(&b[..]));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
            prop_assert_eq!(&ka[..], &a[..]);
            let mut map = std::collections::BTreeMap::new();
            map.insert(ka.clone(), 1);
            prop_assert_eq!(map.get(&a[..]), Some(&1));
        }
    }
}
