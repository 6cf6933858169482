//! Raft hard state (term, vote, commit) in a small file with two CRC-checked slots.
//!
//! Each save writes the slot the previous save did not use (one aligned 4096-byte block, then
//! fdatasync), with a generation one higher. A torn write can only damage the slot being
//! written, so the other slot, the previous hard state, stays readable. On load the valid slot
//! with the highest generation wins.

use std::path::{Path, PathBuf};

use glommio::io::DmaFile;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{io_err, Error, Result};
use crate::io::{open_rw, probe_device_once, sync_data, sync_dir, write_all};

/// File name of the hard state in a group directory.
pub const HARD_STATE_FILE: &str = "hardstate";
/// One slot per block; 4096 is the largest DMA alignment we accept.
pub const SLOT_BYTES: u64 = 4096;
const SLOTS: u64 = 2;
const MAGIC: u32 = u32::from_le_bytes(*b"THST");
const VERSION: u32 = 1;
const SLOT_USED_BYTES: usize = 48;
const CRC_COVERED_BYTES: usize = 40;

const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_USED_BYTES);

/// The state Raft must persist before answering a vote or acknowledging entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    /// Node id voted for in `term`; 0 means none.
    pub vote: u64,
    pub commit: u64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Slot {
    magic: U32,
    version: U32,
    generation: U64,
    term: U64,
    vote: U64,
    commit: U64,
    /// CRC32 of bytes 0..40.
    crc: U32,
    reserved: U32,
}

impl Slot {
    fn new(generation: u64, hs: &HardState) -> Slot {
        let mut s = Slot {
            magic: U32::new(MAGIC),
            version: U32::new(VERSION),
            generation: U64::new(generation),
            term: U64::new(hs.term),
            vote: U64::new(hs.vote),
            commit: U64::new(hs.commit),
            crc: U32::new(0),
            reserved: U32::new(0),
        };
        s.crc = U32::new(crc32fast::hash(&s.as_bytes()[..CRC_COVERED_BYTES]));
        s
    }

    fn check(bytes: &[u8]) -> Option<Slot> {
        let (s, _) = Slot::read_from_prefix(bytes).ok()?;
        let ok = s.magic.get() == MAGIC
            && s.version.get() == VERSION
            && s.generation.get() > 0
            && s.reserved.get() == 0
            && crc32fast::hash(&s.as_bytes()[..CRC_COVERED_BYTES]) == s.crc.get();
        ok.then_some(s)
    }
}

/// What a load found in the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Never saved (both slots zero, or only a torn first save).
    Empty,
    Found {
        state: HardState,
        generation: u64,
    },
}

/// Decides what the file's bytes hold. Pure, for tests; never panics.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Loaded> {
    let slot_bytes = |i: u64| {
        let start = (i * SLOT_BYTES) as usize;
        let end = (start + SLOT_BYTES as usize).min(bytes.len());
        bytes.get(start..end).unwrap_or(&[])
    };
    let mut best: Option<Slot> = None;
    let mut damaged = 0;
    for i in 0..SLOTS {
        let b = slot_bytes(i);
        match Slot::check(b) {
            Some(s) => {
                if best.map_or(true, |x| x.generation.get() < s.generation.get()) {
                    best = Some(s);
                }
            }
            None => {
                if b.iter().any(|&x| x != 0) {
                    damaged += 1;
                }
            }
        }
    }
    match best {
        Some(s) => Ok(Loaded::Found {
            state: HardState {
                term: s.term.get(),
                vote: s.vote.get(),
                commit: s.commit.get(),
            },
            generation: s.generation.get(),
        }),
        // One save in flight can damage one slot; two damaged slots mean a saved state is
        // lost.
        None if damaged >= 2 => Err(Error::Corruption {
            path: path.to_path_buf(),
            offset: 0,
            reason: "both hard-state slots are damaged".into(),
        }),
        None => Ok(Loaded::Empty),
    }
}

/// The hard-state file of one group.
pub struct HardStateFile {
    file: DmaFile,
    path: PathBuf,
    generation: u64,
    poisoned: bool,
}

impl HardStateFile {
    /// Opens (creating if needed) `dir/hardstate` and loads the newest valid slot.
    pub async fn open(dir: impl AsRef<Path>) -> Result<(HardStateFile, Option<HardState>)> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(io_err("create dir", dir, None))?;
        probe_device_once(dir).await?;
        let path = dir.join(HARD_STATE_FILE);
        let exists = path.exists();
        let file = open_rw(&path, true).await?;
        if !exists {
            file.pre_allocate(SLOTS * SLOT_BYTES, false)
                .await
                .map_err(io_err("fallocate", &path, Some(0)))?;
            let mut buf = glommio::allocate_dma_buffer((SLOTS * SLOT_BYTES) as usize);
            buf.as_bytes_mut().fill(0);
            write_all(&file, &path, buf, 0).await?;
            sync_data(&file, &path).await?;
            sync_dir(dir).await?;
        }
        let bytes = std::fs::read(&path).map_err(io_err("read", &path, None))?;
        let (state, generation) = match decode(&bytes, &path)? {
            Loaded::Empty => (None, 0),
            Loaded::Found { state, generation } => (Some(state), generation),
        };
        Ok((
            HardStateFile {
                file,
                path,
                generation,
                poisoned: false,
            },
            state,
        ))
    }

    /// Durably saves `hs` into the slot not holding the current state. After an error the
    /// file refuses further saves: reopen it (the previous state is still in the other slot).
    pub async fn save(&mut self, hs: &HardState) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned {
                dir: self.path.clone(),
                reason: "an earlier hard-state save failed".into(),
            });
        }
        let generation = self.generation + 1;
        let offset = (generation % SLOTS) * SLOT_BYTES;
        let mut buf = glommio::allocate_dma_buffer(SLOT_BYTES as usize);
        buf.as_bytes_mut().fill(0);
        let slot = Slot::new(generation, hs);
        buf.as_bytes_mut()[..SLOT_USED_BYTES].copy_from_slice(slot.as_bytes());
        let r = async {
            write_all(&self.file, &self.path, buf, offset).await?;
            sync_data(&self.file, &self.path).await
        }
        .await;
        if r.is_err() {
            self.poisoned = true;
        }
        r?;
        self.generation = generation;
        Ok(())
    }

    /// Closes the file.
    pub async fn close(self) -> Result<()> {
        self.file
            .close()
            .await
            .map_err(io_err("close", &self.path, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(slots: &[(u64, HardState)]) -> Vec<u8> {
        let mut b = vec![0u8; (SLOTS * SLOT_BYTES) as usize];
        for (generation, hs) in slots {
            let off = ((generation % SLOTS) * SLOT_BYTES) as usize;
            b[off..off + SLOT_USED_BYTES].copy_from_slice(Slot::new(*generation, hs).as_bytes());
        }
        b
    }

    const A: HardState = HardState {
        term: 5,
        vote: 2,
        commit: 40,
    };
    const B: HardState = HardState {
        term: 6,
        vote: 3,
        commit: 41,
    };

    #[test]
    fn newest_generation_wins() {
        let b = image(&[(7, A), (8, B)]);
        assert_eq!(
            decode(&b, Path::new("h")).unwrap(),
            Loaded::Found {
                state: B,
                generation: 8
            }
        );
        assert_eq!(decode(&[0u8; 8192], Path::new("h")).unwrap(), Loaded::Empty);
        assert_eq!(decode(&[], Path::new("h")).unwrap(), Loaded::Empty);
    }

    #[test]
    fn torn_save_leaves_previous_state_at_every_cut_and_bit() {
        // Generation 8 (B) is being written over slot 0 while slot 1 holds generation 7 (A).
        let old = HardState {
            term: 4,
            vote: 1,
            commit: 39,
        };
        let before = image(&[(6, old), (7, A)]);
        let after = image(&[(7, A), (8, B)]);
        let slot0 = 0..SLOT_USED_BYTES;
        for cut in slot0 {
            // The new slot written up to `cut`, the rest still generation 6's bytes.
            let mut b = before.clone();
            b[..cut].copy_from_slice(&after[..cut]);
            let got = decode(&b, Path::new("h")).unwrap();
            // Once the CRC is in (the reserved tail is zero in both), the new slot is whole.
            let want = if cut >= CRC_COVERED_BYTES + 4 {
                Loaded::Found {
                    state: B,
                    generation: 8,
                }
            } else {
                Loaded::Found {
                    state: A,
                    generation: 7,
                }
            };
            assert_eq!(got, want, "cut {cut}");
        }
        for bit in 0..SLOT_USED_BYTES * 8 {
            let mut b = after.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let got = decode(&b, Path::new("h")).unwrap();
            assert_eq!(
                got,
                Loaded::Found {
                    state: A,
                    generation: 7
                },
                "bit {bit}"
            );
        }
    }

    #[test]
    fn both_slots_damaged_is_corruption() {
        let mut b = image(&[(7, A), (8, B)]);
        b[3] ^= 1;
        b[SLOT_BYTES as usize + 20] ^= 1;
        assert!(matches!(
            decode(&b, Path::new("h")),
            Err(Error::Corruption { .. })
        ));
    }
}
