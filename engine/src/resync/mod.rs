//! Resynchronization by comparison: when change tracking cannot be trusted (reverse replication
//! after a failover, a replica seeded from a copy), both sides hash their disk in blocks of
//! [`HASH_BLOCK`] bytes with a seed the comparing side chose, compare, and only the differing
//! blocks are shipped.
//!
//! This module owns the block hashes: computing them from a [`crate::image::BlockImage`] (one
//! read of the allocated ranges, hashing spread over the cores), comparing two sets, the group
//! digests and root of the two-level comparison, and their wire encoding. It never ships blocks
//! and never touches a socket: the network code moves the encoded hashes and the blocks.
//! Formats and reasons: `docs/formats/resync.md`.
//!
//! The comparison, for equal disks, costs one root; otherwise one group digest per
//! [`GROUP_BLOCKS`] blocks, then block hashes only for the groups that differ:
//!
//! ```text
//! ours.digest() == theirs_root                      -> done, nothing differs
//! ours.differing_groups(&their_group_digests, ..)   -> block ranges worth asking about
//! ours.piece(range)?.differing(&BlockHashes::decode(their_bytes)?)  -> byte ranges to ship
//! ```

mod compute;
pub mod exchange;
mod hash;
mod hashes;
mod verification;
mod wire;

#[cfg(test)]
mod tests;

pub use hash::random_seed;
pub use hashes::BlockHashes;
pub use verification::Verification;
pub(crate) use verification::bytes_in;

/// Bytes per hashed block: small enough that one changed byte ships little, large enough that
/// the hashes of a disk stay small (16 bytes per 64 KiB, 256 KiB per GiB).
pub const HASH_BLOCK: u64 = 64 * 1024;

/// Blocks per group digest in the two-level comparison: 64 MiB of disk per group.
pub const GROUP_BLOCKS: u64 = 1024;

/// Number of hashed blocks in a disk of `virtual_size` bytes (the last one may be short).
pub(crate) fn disk_blocks(virtual_size: u64) -> u64 {
    virtual_size.div_ceil(HASH_BLOCK)
}

/// The bytes of a disk of `virtual_size` that `blocks` cover, the last block clipped to the end.
fn block_bytes(virtual_size: u64, blocks: &std::ops::Range<u64>) -> std::ops::Range<u64> {
    let start = blocks.start.saturating_mul(HASH_BLOCK).min(virtual_size);
    start
        ..blocks
            .end
            .saturating_mul(HASH_BLOCK)
            .clamp(start, virtual_size)
}
