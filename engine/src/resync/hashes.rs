//! A set of block hashes and what can be asked of it: which blocks differ from another set, the
//! group digests and root of the two-level comparison, and cutting and joining pieces.

use super::hash::list_digest;
use super::{GROUP_BLOCKS, HASH_BLOCK, block_bytes, disk_blocks};
use crate::{Error, Result};
use std::ops::Range;

/// The hashes of consecutive blocks of one disk, under one seed.
///
/// A set covers the blocks `first_block..first_block + hashes.len()`: the whole disk when
/// computed with [`BlockHashes::compute`], a part of it when computed with
/// `compute_blocks` or decoded from a peer's piece. Block indexes are always
/// counted from the start of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    block_size: u64,
    virtual_size: u64,
    seed: u64,
    first_block: u64,
    hashes: Vec<u128>,
}

impl BlockHashes {
    /// A set from its parts; the caller has checked that the blocks lie inside the disk.
    pub(super) fn from_parts(
        virtual_size: u64,
        seed: u64,
        first_block: u64,
        hashes: Vec<u128>,
    ) -> Self {
        debug_assert!(first_block + hashes.len() as u64 <= disk_blocks(virtual_size));
        BlockHashes {
            block_size: HASH_BLOCK,
            virtual_size,
            seed,
            first_block,
            hashes,
        }
    }

    /// Bytes per block ([`HASH_BLOCK`]); the last block of the disk may be shorter.
    pub(crate) fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Size of the hashed disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The seed every hash was computed with.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// Indexes of the blocks the set covers.
    pub(crate) fn blocks(&self) -> Range<u64> {
        self.first_block..self.first_block + self.hashes.len() as u64
    }

    /// One hash per covered block, in order.
    pub(crate) fn hashes(&self) -> &[u128] {
        &self.hashes
    }

    /// The bytes of the disk that `blocks` cover (the last block clipped to the disk's end).
    fn byte_range(&self, blocks: Range<u64>) -> Range<u64> {
        block_bytes(self.virtual_size, &blocks)
    }

    /// Byte ranges of the disk whose hashes differ between the two sets, adjacent blocks merged.
    ///
    /// Refuses sets that are not of the same disk geometry, seed and blocks: their hashes would
    /// differ everywhere and say nothing.
    pub fn differing(&self, other: &BlockHashes) -> Result<Vec<Range<u64>>> {
        self.check_comparable(other)?;
        if self.blocks() != other.blocks() {
            return Err(Error::InvalidArgument {
                what: "block hash comparison",
                reason: format!(
                    "blocks {:?} cannot be compared with blocks {:?}",
                    self.blocks(),
                    other.blocks()
                ),
            });
        }
        let differing_blocks = differing_runs(&self.hashes, &other.hashes, 1);
        Ok(differing_blocks
            .into_iter()
            .map(|run| self.byte_range(self.first_block + run.start..self.first_block + run.end))
            .collect())
    }

    /// One digest per `group_blocks` consecutive blocks of the set (the last group may be
    /// shorter): the hash of the group's hash list. A `group_blocks` of 0 is taken as 1.
    pub(crate) fn group_digests(&self, group_blocks: u64) -> Vec<u128> {
        let group_length = usize::try_from(group_blocks.max(1)).unwrap_or(usize::MAX);
        self.hashes
            .chunks(group_length)
            .map(|group| list_digest(self.seed, &[], group))
            .collect()
    }

    /// The root of the comparison: a hash over the set's geometry and its group digests of
    /// [`GROUP_BLOCKS`]. Equal roots mean equal hashes of the same blocks of same-sized disks.
    pub(crate) fn digest(&self) -> u128 {
        let blocks = self.blocks();
        let mut geometry = Vec::with_capacity(32);
        for field in [self.block_size, self.virtual_size, blocks.start, blocks.end] {
            geometry.extend_from_slice(&field.to_le_bytes());
        }
        list_digest(self.seed, &geometry, &self.group_digests(GROUP_BLOCKS))
    }

    /// Block ranges of the groups whose digests differ from `theirs` (the peer's group digests
    /// of the same blocks, groups of `group_blocks`), adjacent groups merged: the blocks whose
    /// hashes are worth asking for.
    pub(crate) fn differing_groups(
        &self,
        theirs: &[u128],
        group_blocks: u64,
    ) -> Result<Vec<Range<u64>>> {
        let group_blocks = group_blocks.max(1);
        let ours = self.group_digests(group_blocks);
        if ours.len() != theirs.len() {
            return Err(Error::InvalidArgument {
                what: "group digests",
                reason: format!(
                    "{} group digests cannot be compared with our {} for blocks {:?}",
                    theirs.len(),
                    ours.len(),
                    self.blocks()
                ),
            });
        }
        let end = self.blocks().end;
        Ok(differing_runs(&ours, theirs, group_blocks)
            .into_iter()
            .map(|run| self.first_block + run.start..(self.first_block + run.end).min(end))
            .collect())
    }

    /// The hashes of `blocks`, a part of this set, as a set of their own (to compare with a
    /// peer's piece of the same blocks).
    pub(crate) fn piece(&self, blocks: Range<u64>) -> Result<BlockHashes> {
        let covered = self.blocks();
        if blocks.start > blocks.end || blocks.start < covered.start || blocks.end > covered.end {
            return Err(Error::InvalidArgument {
                what: "block range",
                reason: format!("blocks {blocks:?} are not inside the set's blocks {covered:?}"),
            });
        }
        let start = (blocks.start - covered.start) as usize;
        let end = (blocks.end - covered.start) as usize;
        Ok(BlockHashes {
            hashes: self.hashes[start..end].to_vec(),
            first_block: blocks.start,
            ..*self
        })
    }

    /// Appends `next`, the piece that follows this set, so that pieces received one by one
    /// rebuild a larger set.
    #[cfg(test)]
    pub(crate) fn merge(&mut self, next: BlockHashes) -> Result<()> {
        self.check_comparable(&next)?;
        if next.first_block != self.blocks().end {
            return Err(Error::InvalidArgument {
                what: "block hash piece",
                reason: format!(
                    "blocks {:?} do not follow blocks {:?}",
                    next.blocks(),
                    self.blocks()
                ),
            });
        }
        self.hashes.extend_from_slice(&next.hashes);
        Ok(())
    }

    /// Refuses a set of another disk geometry or seed.
    fn check_comparable(&self, other: &BlockHashes) -> Result<()> {
        let mismatch = if self.block_size != other.block_size {
            Some(format!(
                "block size {} against {}",
                self.block_size, other.block_size
            ))
        } else if self.virtual_size != other.virtual_size {
            Some(format!(
                "virtual size {} against {}",
                self.virtual_size, other.virtual_size
            ))
        } else if self.seed != other.seed {
            Some("hashes made with different seeds".to_owned())
        } else {
            None
        };
        match mismatch {
            None => Ok(()),
            Some(reason) => Err(Error::InvalidArgument {
                what: "block hash comparison",
                reason,
            }),
        }
    }
}

/// Runs of positions where `ours` and `theirs` differ, each position standing for `width`
/// units, adjacent runs merged, as ranges of units from the start of the lists.
fn differing_runs(ours: &[u128], theirs: &[u128], width: u64) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for (position, (our, their)) in ours.iter().zip(theirs).enumerate() {
        if our == their {
            continue;
        }
        let start = position as u64 * width;
        match runs.last_mut() {
            Some(run) if run.end == start => run.end = start + width,
            _ => runs.push(start..start + width),
        }
    }
    runs
}
