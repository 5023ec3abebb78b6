//! The block allocation table: one entry per payload block saying whether it is stored and where,
//! with a sector-bitmap entry after every `chunk_ratio` payload entries.

use super::format::ALIGNMENT;
use super::metadata::Metadata;
use std::ops::Range;

/// Index of a payload block of the virtual disk (virtual offset / block size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BlockIndex(pub u64);

/// Index of an entry in the BAT, where sector-bitmap entries are interleaved with payload ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct BatIndex(pub u64);

const STATE_MASK: u64 = 0b111;
const OFFSET_MASK: u64 = !(ALIGNMENT - 1);

/// The state of a payload block, with its file offset where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadState {
    NotPresent,
    Undefined,
    Zero,
    Unmapped,
    FullyPresent { file_offset: u64 },
    PartiallyPresent { file_offset: u64 },
}

impl PayloadState {
    /// Decodes a payload BAT entry; `Err` carries an unknown state value.
    pub fn decode(entry: u64) -> Result<Self, u64> {
        let file_offset = entry & OFFSET_MASK;
        Ok(match entry & STATE_MASK {
            0 => PayloadState::NotPresent,
            1 => PayloadState::Undefined,
            2 => PayloadState::Zero,
            3 => PayloadState::Unmapped,
            6 => PayloadState::FullyPresent { file_offset },
            7 => PayloadState::PartiallyPresent { file_offset },
            unknown => return Err(unknown),
        })
    }

    pub fn encode(self) -> u64 {
        match self {
            PayloadState::NotPresent => 0,
            PayloadState::Undefined => 1,
            PayloadState::Zero => 2,
            PayloadState::Unmapped => 3,
            PayloadState::FullyPresent { file_offset } => (file_offset & OFFSET_MASK) | 6,
            PayloadState::PartiallyPresent { file_offset } => (file_offset & OFFSET_MASK) | 7,
        }
    }

    /// Where the block's data is stored, if it is.
    pub fn stored_at(self) -> Option<u64> {
        match self {
            PayloadState::FullyPresent { file_offset } => Some(file_offset),
            _ => None,
        }
    }
}

/// How virtual offsets map to blocks and BAT entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub virtual_size: u64,
    pub block_size: u64,
    /// Payload blocks per sector-bitmap block.
    pub chunk_ratio: u64,
    pub block_count: u64,
}

impl Geometry {
    pub(super) fn new(metadata: &Metadata) -> Self {
        let block_size = metadata.block_size.bytes();
        Geometry {
            virtual_size: metadata.virtual_size,
            block_size,
            chunk_ratio: (1 << 23) * metadata.logical_sector_size.bytes() / block_size,
            block_count: metadata.virtual_size.div_ceil(block_size),
        }
    }

    /// Entries in the BAT of a non-differencing image.
    pub(super) fn bat_entries(&self) -> u64 {
        self.block_count + (self.block_count - 1) / self.chunk_ratio
    }

    pub(super) fn bat_index(&self, block: BlockIndex) -> BatIndex {
        BatIndex(block.0 + block.0 / self.chunk_ratio)
    }

    /// True for the entries that describe sector-bitmap blocks rather than payload.
    pub(super) fn is_sector_bitmap(&self, index: BatIndex) -> bool {
        (index.0 + 1).is_multiple_of(self.chunk_ratio + 1)
    }

    /// The virtual byte range a block covers (the last block may be short).
    pub(super) fn block_range(&self, block: BlockIndex) -> Range<u64> {
        let start = block.0 * self.block_size;
        start..(start + self.block_size).min(self.virtual_size)
    }

    /// Splits `length` bytes at virtual `offset` into per-block pieces:
    /// (block, offset inside the block, length of the piece).
    pub(super) fn pieces(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Iterator<Item = (BlockIndex, u64, u64)> {
        let block_size = self.block_size;
        let end = offset + length;
        let mut position = offset;
        std::iter::from_fn(move || {
            if position >= end {
                return None;
            }
            let block = position / block_size;
            let inside = position % block_size;
            let piece = (block_size - inside).min(end - position);
            position += piece;
            Some((BlockIndex(block), inside, piece))
        })
    }
}

/// Problems in the payload entries of a BAT: unknown states, blocks outside the file or inside
/// the structures (`reserved`), and blocks that share file space.
pub(super) fn bat_problems(
    entries: &[u64],
    geometry: &Geometry,
    has_parent: bool,
    file_size: u64,
    reserved: &[(String, Range<u64>)],
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut stored: Vec<(u64, u64, u64)> = Vec::new(); // (file offset, length, block)
    for block in 0..geometry.block_count {
        let index = geometry.bat_index(BlockIndex(block));
        let Some(&entry) = entries.get(index.0 as usize) else {
            problems.push(format!("BAT has no entry for block {block}"));
            break;
        };
        let state = match PayloadState::decode(entry) {
            Ok(state) => state,
            Err(value) => {
                problems.push(format!(
                    "block {block}: BAT entry has unknown state {value}"
                ));
                continue;
            }
        };
        let file_offset = match state {
            PayloadState::FullyPresent { file_offset } => file_offset,
            PayloadState::PartiallyPresent { file_offset } if has_parent => file_offset,
            PayloadState::PartiallyPresent { .. } => {
                problems.push(format!(
                    "block {block}: partially present, but the image has no parent"
                ));
                continue;
            }
            _ => continue,
        };
        let length = geometry.block_range(BlockIndex(block)).end - block * geometry.block_size;
        if file_offset.saturating_add(length) > file_size {
            problems.push(format!(
                "block {block}: stored at {file_offset}, past the end of the file ({file_size} bytes)"
            ));
        }
        for (name, range) in reserved {
            if file_offset < range.end && range.start < file_offset + length {
                problems.push(format!(
                    "block {block}: stored at {file_offset}, inside the {name}"
                ));
            }
        }
        stored.push((file_offset, length, block));
    }
    stored.sort_unstable();
    for pair in stored.windows(2) {
        let (first_offset, first_length, first_block) = pair[0];
        let (second_offset, _, second_block) = pair[1];
        if second_offset < first_offset + first_length {
            problems.push(format!(
                "blocks {first_block} and {second_block} overlap in the file (at {first_offset} and {second_offset})"
            ));
        }
    }
    for index in 0..entries.len() as u64 {
        if geometry.is_sector_bitmap(BatIndex(index)) {
            let state = entries[index as usize] & STATE_MASK;
            if state != 0 && state != 6 {
                problems.push(format!(
                    "BAT entry {index} (sector bitmap) has unknown state {state}"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::vhdx::metadata::{BlockSize, SectorSize};

    fn geometry(block_size: u64, virtual_size: u64, sector: SectorSize) -> Geometry {
        Geometry::new(&Metadata {
            block_size: BlockSize::new(block_size).unwrap(),
            leave_blocks_allocated: false,
            has_parent: false,
            virtual_size,
            disk_id: uuid::Uuid::nil(),
            logical_sector_size: sector,
            physical_sector_size: sector,
        })
    }

    #[test]
    fn sector_bitmap_entries_follow_every_chunk_ratio_payload_entries() {
        // 256 MiB blocks with 512-byte sectors: chunk ratio 16.
        let shape = geometry(256 << 20, 40 << 30, SectorSize::Bytes512);
        assert_eq!(shape.chunk_ratio, 16);
        assert_eq!(shape.block_count, 160);
        assert_eq!(shape.bat_index(BlockIndex(15)), BatIndex(15));
        assert_eq!(shape.bat_index(BlockIndex(16)), BatIndex(17));
        assert!(shape.is_sector_bitmap(BatIndex(16)));
        assert!(!shape.is_sector_bitmap(BatIndex(17)));
        assert_eq!(shape.bat_entries(), 160 + 159 / 16);
    }

    #[test]
    fn the_chunk_ratio_grows_with_the_logical_sector() {
        assert_eq!(
            geometry(1 << 20, 1 << 30, SectorSize::Bytes4096).chunk_ratio,
            32768
        );
        assert_eq!(
            geometry(32 << 20, 1 << 30, SectorSize::Bytes512).chunk_ratio,
            128
        );
    }

    #[test]
    fn the_last_block_of_an_odd_sized_disk_is_short() {
        let shape = geometry(1 << 20, (3 << 20) + 512, SectorSize::Bytes512);
        assert_eq!(shape.block_count, 4);
        assert_eq!(shape.block_range(BlockIndex(3)), (3 << 20)..(3 << 20) + 512);
    }

    #[test]
    fn pieces_split_at_block_boundaries() {
        let shape = geometry(1 << 20, 8 << 20, SectorSize::Bytes512);
        let pieces: Vec<_> = shape.pieces((1 << 20) - 10, (1 << 20) + 20).collect();
        assert_eq!(
            pieces,
            vec![
                (BlockIndex(0), (1 << 20) - 10, 10),
                (BlockIndex(1), 0, 1 << 20),
                (BlockIndex(2), 0, 10)
            ]
        );
    }

    #[test]
    fn payload_states_survive_encoding() {
        for state in [
            PayloadState::NotPresent,
            PayloadState::Zero,
            PayloadState::FullyPresent {
                file_offset: 9 << 20,
            },
        ] {
            assert_eq!(PayloadState::decode(state.encode()), Ok(state));
        }
        assert_eq!(PayloadState::decode(4), Err(4));
    }

    #[test]
    fn shared_and_out_of_file_blocks_are_reported() {
        let shape = geometry(1 << 20, 3 << 20, SectorSize::Bytes512);
        let present = |mib: u64| {
            PayloadState::FullyPresent {
                file_offset: mib << 20,
            }
            .encode()
        };
        let entries = [present(4), present(4), present(40)];
        let reserved = [("header area".to_string(), 0..(1 << 20))];
        let problems = bat_problems(&entries, &shape, false, 8 << 20, &reserved);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("blocks 0 and 1 overlap")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("block 2: stored at")),
            "{problems:?}"
        );
        let inside = [present(0), 0, 0];
        assert!(
            bat_problems(&inside, &shape, false, 8 << 20, &reserved)[0].contains("header area")
        );
    }
}
