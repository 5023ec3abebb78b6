//! The one hash function of a comparison: XXH3-128 seeded with the comparison's seed. XXH3 runs
//! at memory speed, so hashing never limits the read of a disk; the seed keeps a guest, which
//! chooses the disk's bytes, from crafting two blocks that collide.

use crate::{Error, Result};
use ring::rand::{SecureRandom, SystemRandom};
use twox_hash::XxHash3_128;

/// The hash of one block (or of any byte string) under `seed`.
pub(super) fn block_hash(seed: u64, data: &[u8]) -> u128 {
    XxHash3_128::oneshot_with_seed(seed, data)
}

/// A hash over `prefix` followed by `hashes` in little-endian order: the group digests and the
/// root are hashes of hash lists.
pub(super) fn list_digest(seed: u64, prefix: &[u8], hashes: &[u128]) -> u128 {
    let mut bytes = Vec::with_capacity(prefix.len() + size_of_val(hashes));
    bytes.extend_from_slice(prefix);
    for hash in hashes {
        bytes.extend_from_slice(&hash.to_le_bytes());
    }
    block_hash(seed, &bytes)
}

/// A seed for a new comparison, from the operating system's secure random source: the guest
/// must not be able to guess it.
pub fn random_seed() -> Result<u64> {
    let mut bytes = [0u8; 8];
    SystemRandom::new().fill(&mut bytes).map_err(|_| {
        let source = std::io::Error::other("no random bytes for a resynchronization seed");
        Error::file("system random source", "read", source)
    })?;
    Ok(u64::from_le_bytes(bytes))
}
