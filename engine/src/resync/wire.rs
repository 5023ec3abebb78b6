//! The wire encoding of block hashes (`docs/formats/resync.md`): a 48-byte header, then one
//! little-endian u128 per block. Decoding trusts nothing: every length is checked against the
//! bytes given before anything is allocated, so a hostile peer can neither make it allocate
//! beyond its own message's size nor make it panic.

use super::{BlockHashes, HASH_BLOCK, disk_blocks};
use crate::{Error, Result};
use std::ops::Range;

const MAGIC: &[u8; 8] = b"BRHASHES";
const FORMAT_VERSION: u16 = 1;
const HEADER_LENGTH: usize = 48;
const HASH_LENGTH: usize = size_of::<u128>();

impl BlockHashes {
    /// The hashes of `blocks` with a header saying whose they are. Blocks outside the set are
    /// left out; the header says which blocks came.
    pub(crate) fn encode(&self, blocks: Range<u64>) -> Vec<u8> {
        let covered = self.blocks();
        let start = blocks.start.clamp(covered.start, covered.end);
        let end = blocks.end.clamp(start, covered.end);
        let hashes =
            &self.hashes()[(start - covered.start) as usize..(end - covered.start) as usize];
        let mut bytes = Vec::with_capacity(HEADER_LENGTH + hashes.len() * HASH_LENGTH);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(HEADER_LENGTH as u16).to_le_bytes());
        // Block sizes above 4 GiB cannot be made: the hashed block size is a constant.
        bytes.extend_from_slice(&(self.block_size() as u32).to_le_bytes());
        for field in [self.virtual_size(), self.seed(), start, end - start] {
            bytes.extend_from_slice(&field.to_le_bytes());
        }
        for hash in hashes {
            bytes.extend_from_slice(&hash.to_le_bytes());
        }
        bytes
    }

    /// Rebuilds the set (or piece of a set) that [`BlockHashes::encode`] wrote. Pieces of one
    /// disk join with [`BlockHashes::merge`].
    pub(crate) fn decode(bytes: &[u8]) -> Result<BlockHashes> {
        let refuse = |reason: String| Error::InvalidArgument {
            what: "block hash message",
            reason,
        };
        if bytes.len() < HEADER_LENGTH {
            return Err(refuse(format!(
                "{} bytes are shorter than the {HEADER_LENGTH}-byte header",
                bytes.len()
            )));
        }
        let (header, body) = bytes.split_at(HEADER_LENGTH);
        if &header[..8] != MAGIC {
            return Err(refuse("not block hashes (bad magic)".to_owned()));
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != FORMAT_VERSION {
            return Err(refuse(format!(
                "block hash format version {version} is not supported \
                 (this blockrep reads version {FORMAT_VERSION})"
            )));
        }
        let header_length = u16::from_le_bytes([header[10], header[11]]);
        if usize::from(header_length) != HEADER_LENGTH {
            return Err(refuse(format!(
                "header length {header_length}, expected {HEADER_LENGTH}"
            )));
        }
        let field = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let block_size = u64::from(u32::from_le_bytes([
            header[12], header[13], header[14], header[15],
        ]));
        let (virtual_size, seed, first_block, count) = (field(16), field(24), field(32), field(40));
        if block_size != HASH_BLOCK {
            return Err(refuse(format!(
                "block size {block_size} is not supported (expected {HASH_BLOCK})"
            )));
        }
        let fits_disk = first_block
            .checked_add(count)
            .is_some_and(|end| end <= disk_blocks(virtual_size));
        if !fits_disk {
            return Err(refuse(format!(
                "{count} blocks from block {first_block} reach past a disk of {virtual_size} bytes"
            )));
        }
        let expected = usize::try_from(count)
            .ok()
            .and_then(|count| count.checked_mul(HASH_LENGTH));
        if expected != Some(body.len()) {
            return Err(refuse(format!(
                "{count} block hashes announced but {} bytes of hashes given",
                body.len()
            )));
        }
        let hashes = body
            .chunks_exact(HASH_LENGTH)
            .map(|hash| {
                let mut word = [0u8; HASH_LENGTH];
                word.copy_from_slice(hash);
                u128::from_le_bytes(word)
            })
            .collect();
        Ok(BlockHashes::from_parts(
            virtual_size,
            seed,
            first_block,
            hashes,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BlockHashes {
        let virtual_size = 5 * HASH_BLOCK + 100;
        BlockHashes::from_parts(virtual_size, 7, 0, (1..=6).map(|n| n * 1000).collect())
    }

    #[test]
    fn encoding_then_decoding_gives_the_same_hashes() {
        let hashes = sample();
        assert_eq!(BlockHashes::decode(&hashes.encode(0..6)).unwrap(), hashes);
        let piece = BlockHashes::decode(&hashes.encode(2..4)).unwrap();
        assert_eq!(piece, hashes.piece(2..4).unwrap());
    }

    #[test]
    fn blocks_outside_the_set_are_left_out_of_the_encoding() {
        let hashes = sample();
        let piece = BlockHashes::decode(&hashes.encode(4..100)).unwrap();
        assert_eq!(piece.blocks(), 4..6);
    }

    #[test]
    fn decoding_refuses_truncated_and_oversized_messages() {
        let bytes = sample().encode(0..6);
        for length in [0, 10, HEADER_LENGTH - 1, HEADER_LENGTH, bytes.len() - 1] {
            assert!(
                BlockHashes::decode(&bytes[..length]).is_err(),
                "{length} bytes accepted"
            );
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; HASH_LENGTH]);
        assert!(BlockHashes::decode(&longer).is_err());
    }

    #[test]
    fn decoding_refuses_a_count_that_would_allocate_without_bound() {
        for count in [u64::MAX, u64::MAX / 16 + 1, 1 << 40] {
            let mut bytes = sample().encode(0..6);
            bytes[40..48].copy_from_slice(&count.to_le_bytes());
            assert!(BlockHashes::decode(&bytes).is_err(), "count {count}");
            // Even when the disk is large enough to hold that many blocks.
            bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
            assert!(BlockHashes::decode(&bytes).is_err(), "count {count}");
        }
    }

    #[test]
    fn decoding_refuses_blocks_past_the_disk_and_foreign_headers() {
        let bytes = sample().encode(0..6);
        let mut past_end = bytes.clone();
        past_end[32..40].copy_from_slice(&1u64.to_le_bytes());
        assert!(BlockHashes::decode(&past_end).is_err());
        let mut overflow = bytes.clone();
        overflow[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(BlockHashes::decode(&overflow).is_err());
        let changes: [(usize, u8); 4] = [(0, b'X'), (8, 2), (10, 47), (13, 0x20)];
        for (at, value) in changes {
            let mut damaged = bytes.clone();
            damaged[at] = value;
            let error = BlockHashes::decode(&damaged).unwrap_err();
            assert!(
                matches!(error, Error::InvalidArgument { .. }),
                "byte {at}: {error}"
            );
        }
    }
}
