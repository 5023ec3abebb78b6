//! The behaviour of block hashing and comparison, as a spec.

use super::hash::block_hash;
use super::*;
use crate::image::vhdx::{BlockSize, VhdxCreateOptions};
use crate::image::{Access, BlockImage, RawImage, VhdxImage};
use crate::io::MemoryStorage;
use crate::{Error, Result};
use proptest::prelude::*;
use std::ops::Range;
use std::sync::Mutex;

const SEED: u64 = 0x5EED_0FC0_FFEE;
const BLOCK: usize = HASH_BLOCK as usize;

fn no_progress(_: u64) {}

/// Bytes that differ from block to block.
fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn raw(bytes: Vec<u8>) -> RawImage<MemoryStorage> {
    RawImage::open(MemoryStorage::from_bytes(bytes), "test", Access::ReadOnly).unwrap()
}

fn hashes_of(image: &dyn BlockImage) -> BlockHashes {
    BlockHashes::compute(image, SEED, &no_progress).unwrap()
}

/// An image that reports chosen allocated ranges, remembers what was read, and can fail a read.
struct SparseImage {
    bytes: Vec<u8>,
    allocated: Vec<Range<u64>>,
    reads: Mutex<Vec<Range<u64>>>,
    failing_offset: Option<u64>,
}

impl SparseImage {
    fn new(bytes: Vec<u8>, allocated: Vec<Range<u64>>) -> Self {
        SparseImage {
            bytes,
            allocated,
            reads: Mutex::new(Vec::new()),
            failing_offset: None,
        }
    }

    /// Allocated where a 4 KiB page holds a non-zero byte, as a sparse file would report.
    fn sparse(bytes: Vec<u8>) -> Self {
        let mut allocated: Vec<Range<u64>> = Vec::new();
        for (page, data) in bytes.chunks(4096).enumerate() {
            if data.iter().all(|&byte| byte == 0) {
                continue;
            }
            let start = page as u64 * 4096;
            let end = start + data.len() as u64;
            match allocated.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => allocated.push(start..end),
            }
        }
        Self::new(bytes, allocated)
    }

    fn bytes_read(&self) -> u64 {
        let reads = self.reads.lock().unwrap();
        reads.iter().map(|read| read.end - read.start).sum()
    }
}

impl BlockImage for SparseImage {
    fn virtual_size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let range = offset..offset + buf.len() as u64;
        if self.failing_offset.is_some_and(|at| range.contains(&at)) {
            return Err(Error::io(
                "sparse",
                "read",
                offset,
                std::io::Error::other("injected"),
            ));
        }
        buf.copy_from_slice(&self.bytes[range.start as usize..range.end as usize]);
        self.reads.lock().unwrap().push(range);
        Ok(())
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> Result<()> {
        Err(Error::ReadOnly {
            name: "sparse".to_owned(),
        })
    }
    fn zero_range(&mut self, _: u64, _: u64) -> Result<()> {
        Err(Error::ReadOnly {
            name: "sparse".to_owned(),
        })
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>> {
        Ok(self.allocated.clone())
    }
}

#[test]
fn equal_images_have_no_differences_and_equal_digests() {
    let bytes = pattern(1, 70 * BLOCK);
    let ours = hashes_of(&raw(bytes.clone()));
    let theirs = hashes_of(&raw(bytes));
    assert_eq!(ours.hashes().len(), 70);
    assert_eq!(ours.differing(&theirs).unwrap(), Vec::<Range<u64>>::new());
    assert_eq!(ours.digest(), theirs.digest());
    assert_eq!(ours.group_digests(16), theirs.group_digests(16));
    assert_eq!(
        ours.differing_groups(&theirs.group_digests(16), 16)
            .unwrap(),
        Vec::<Range<u64>>::new()
    );
}

#[test]
fn a_single_flipped_byte_is_found_and_its_64k_block_named() {
    let bytes = pattern(2, 100 * BLOCK);
    let mut flipped = bytes.clone();
    let position = 5_000_000;
    flipped[position] ^= 0x01;
    let ours = hashes_of(&raw(bytes));
    let theirs = hashes_of(&raw(flipped));
    let block = (position / BLOCK) as u64;
    let expected = block * HASH_BLOCK..(block + 1) * HASH_BLOCK;
    assert_eq!(ours.differing(&theirs).unwrap(), vec![expected]);
    assert_ne!(ours.digest(), theirs.digest());
    // The two-level comparison narrows it to the group holding the block, then to the block.
    let groups = ours
        .differing_groups(&theirs.group_digests(32), 32)
        .unwrap();
    assert_eq!(groups, vec![64..96]);
    let their_piece = BlockHashes::decode(&theirs.encode(groups[0].clone())).unwrap();
    let differing = ours.piece(64..96).unwrap().differing(&their_piece).unwrap();
    assert_eq!(differing, ours.differing(&theirs).unwrap());
}

#[test]
fn adjacent_differing_blocks_merge_into_one_range() {
    let bytes = pattern(3, 10 * BLOCK);
    let mut changed = bytes.clone();
    for position in [2 * BLOCK + 5, 3 * BLOCK, 4 * BLOCK - 1, 7 * BLOCK] {
        changed[position] ^= 0xFF;
    }
    let differing = hashes_of(&raw(bytes))
        .differing(&hashes_of(&raw(changed)))
        .unwrap();
    assert_eq!(
        differing,
        vec![
            2 * HASH_BLOCK..4 * HASH_BLOCK,
            7 * HASH_BLOCK..8 * HASH_BLOCK
        ]
    );
}

#[test]
fn a_short_last_block_is_hashed_over_its_real_bytes_and_clipped() {
    let length = 3 * BLOCK + 1000;
    let bytes = pattern(4, length);
    let mut changed = bytes.clone();
    changed[length - 1] ^= 0x80;
    let ours = hashes_of(&raw(bytes.clone()));
    assert_eq!(ours.hashes().len(), 4);
    assert_eq!(ours.hashes()[3], block_hash(SEED, &bytes[3 * BLOCK..]));
    let differing = ours.differing(&hashes_of(&raw(changed))).unwrap();
    assert_eq!(differing, vec![3 * HASH_BLOCK..length as u64]);
}

#[test]
fn unallocated_ranges_hash_as_zeros_without_being_read() {
    // Data only in block 2 (not at its start) and a short last block never written.
    let length = 6 * BLOCK + 512;
    let mut bytes = vec![0u8; length];
    bytes[2 * BLOCK + 8192..2 * BLOCK + 12288].copy_from_slice(&pattern(5, 4096));
    let sparse = SparseImage::sparse(bytes.clone());
    let written_zeros = raw(bytes);
    let sparse_hashes = hashes_of(&sparse);
    assert_eq!(sparse_hashes, hashes_of(&written_zeros));
    assert_eq!(sparse.bytes_read(), HASH_BLOCK, "only block 2 is read");
    let zero_hash = block_hash(SEED, &[0u8; BLOCK]);
    assert_eq!(sparse_hashes.hashes()[0], zero_hash);
    assert_eq!(sparse_hashes.hashes()[6], block_hash(SEED, &[0u8; 512]));
}

#[test]
fn a_written_zero_block_equals_an_unallocated_one_in_a_vhdx() {
    let size = 4 << 20;
    let mut options = VhdxCreateOptions::dynamic(size);
    options.block_size = BlockSize::new(1 << 20).unwrap();
    let mut vhdx = VhdxImage::create(MemoryStorage::new(), "sparse.vhdx", &options).unwrap();
    let data = pattern(6, 3 * BLOCK);
    vhdx.write_at(&data, (1 << 20) + HASH_BLOCK).unwrap();
    vhdx.write_at(&[0u8; BLOCK], 3 << 20).unwrap();
    let mut bytes = vec![0u8; size as usize];
    bytes[(1 << 20) + BLOCK..(1 << 20) + 4 * BLOCK].copy_from_slice(&data);
    assert!(
        vhdx.allocated_ranges().unwrap().len() < 4,
        "the VHDX is sparse"
    );
    assert_eq!(hashes_of(&vhdx), hashes_of(&raw(bytes)));
}

#[test]
fn hashes_depend_on_the_seed() {
    let image = raw(pattern(7, 2 * BLOCK));
    let first = BlockHashes::compute(&image, 1, &no_progress).unwrap();
    let second = BlockHashes::compute(&image, 2, &no_progress).unwrap();
    assert_ne!(first.hashes()[0], second.hashes()[0]);
    assert_ne!(block_hash(1, &[0; BLOCK]), block_hash(2, &[0; BLOCK]));
    assert!(first.differing(&second).is_err());
}

#[test]
fn sets_of_different_disks_are_not_compared() {
    let small = hashes_of(&raw(pattern(8, 2 * BLOCK)));
    let large = hashes_of(&raw(pattern(8, 3 * BLOCK)));
    let error = small.differing(&large).unwrap_err();
    assert!(matches!(error, Error::InvalidArgument { .. }), "{error}");
    let part = small.piece(0..1).unwrap();
    assert!(small.differing(&part).is_err(), "different blocks");
    assert!(small.differing_groups(&[1, 2, 3], 1).is_err());
}

#[test]
fn hashing_a_part_gives_that_part_of_the_whole() {
    // Several pieces, with allocated ranges that start and end inside blocks.
    let length = 200 * BLOCK + 77;
    let mut bytes = pattern(9, length);
    bytes[10 * BLOCK..130 * BLOCK + 100].fill(0);
    let image = SparseImage::sparse(bytes);
    let whole = hashes_of(&image);
    for blocks in [0..0, 3..70, 60..140, 129..201, 0..201] {
        let part = BlockHashes::compute_blocks(&image, SEED, blocks.clone(), &no_progress).unwrap();
        assert_eq!(part, whole.piece(blocks.clone()).unwrap(), "{blocks:?}");
    }
    assert!(BlockHashes::compute_blocks(&image, SEED, 0..202, &no_progress).is_err());
}

#[test]
fn pieces_merge_back_into_the_whole_set() {
    let whole = hashes_of(&raw(pattern(10, 9 * BLOCK + 1)));
    let mut rebuilt = BlockHashes::decode(&whole.encode(0..4)).unwrap();
    assert!(rebuilt.merge(whole.piece(5..10).unwrap()).is_err(), "gap");
    rebuilt
        .merge(BlockHashes::decode(&whole.encode(4..10)).unwrap())
        .unwrap();
    assert_eq!(rebuilt, whole);
}

#[test]
fn progress_rises_to_the_disk_size() {
    let length = 150 * BLOCK + 3;
    let mut bytes = pattern(11, length);
    bytes[..70 * BLOCK].fill(0);
    let image = SparseImage::sparse(bytes);
    let reports = Mutex::new(Vec::new());
    let record = |covered: u64| reports.lock().unwrap().push(covered);
    BlockHashes::compute(&image, SEED, &record).unwrap();
    let reports = reports.into_inner().unwrap();
    assert!(reports.is_sorted(), "{reports:?}");
    assert_eq!(reports.first(), Some(&(70 * HASH_BLOCK)));
    assert_eq!(reports.last(), Some(&(length as u64)));
}

#[test]
fn a_read_error_is_returned_and_nothing_hangs() {
    let whole_disk = 0..40 << 20;
    let mut image = SparseImage::new(
        pattern(12, 40 << 20),
        std::slice::from_ref(&whole_disk).to_vec(),
    );
    image.failing_offset = Some(13 << 20);
    let error = BlockHashes::compute(&image, SEED, &no_progress).unwrap_err();
    assert!(error.to_string().contains("injected"), "{error}");
}

#[test]
fn an_empty_disk_has_no_blocks() {
    let hashes = hashes_of(&raw(Vec::new()));
    assert_eq!(hashes.blocks(), 0..0);
    assert_eq!(hashes.differing(&hashes).unwrap(), Vec::<Range<u64>>::new());
    assert_eq!(hashes.group_digests(GROUP_BLOCKS), Vec::<u128>::new());
}

/// The differing byte ranges found by comparing every block byte by byte.
fn naive_differing(ours: &[u8], theirs: &[u8]) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for (index, (our, their)) in ours.chunks(BLOCK).zip(theirs.chunks(BLOCK)).enumerate() {
        if our == their {
            continue;
        }
        let start = (index * BLOCK) as u64;
        let end = start + our.len() as u64;
        match ranges.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => ranges.push(start..end),
        }
    }
    ranges
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn differing_equals_a_byte_by_byte_comparison(
        blocks in 0usize..6,
        tail in 0usize..BLOCK,
        spans in prop::collection::vec((0.0f64..1.0, 1usize..20_000, any::<u8>()), 0..6),
        edits in prop::collection::vec((0.0f64..1.0, any::<u8>()), 0..8),
        seed in any::<u64>(),
    ) {
        let length = blocks * BLOCK + tail;
        let mut ours = vec![0u8; length];
        for (at, span, value) in spans {
            let start = (at * length as f64) as usize;
            let end = (start + span).min(length);
            ours[start..end].fill(value);
        }
        let mut theirs = ours.clone();
        for (at, value) in edits {
            if length > 0 {
                theirs[((at * length as f64) as usize).min(length - 1)] = value;
            }
        }
        let expected = naive_differing(&ours, &theirs);
        // One side sparse, the other fully allocated: holes must hash like written zeros.
        let our_hashes = BlockHashes::compute(&SparseImage::sparse(ours), seed, &no_progress).unwrap();
        let their_hashes = BlockHashes::compute(&raw(theirs), seed, &no_progress).unwrap();
        prop_assert_eq!(our_hashes.differing(&their_hashes).unwrap(), expected.clone());
        prop_assert_eq!(our_hashes.digest() == their_hashes.digest(), expected.is_empty());
    }
}

/// The exchange of `engine::resync::exchange`, both sides in memory: `replica` answers as the
/// daemons do, except when `short` (it says it is done without sending the hashes asked for).
fn exchange(ours: Vec<u8>, theirs: Vec<u8>, short: bool) -> Result<Vec<Range<u64>>> {
    use crate::proto::Message;
    use crate::resync::exchange::{self, Comparison, Step};
    let (ours, theirs) = (hashes_of(&raw(ours)), hashes_of(&raw(theirs)));
    let (mut comparison, _request) = Comparison::start("vm1", SEED, 1);
    let welcome = Message::Welcome {
        version: crate::proto::PROTOCOL_VERSION,
        applied: 3,
        staged: None,
    };
    assert_eq!(comparison.received(welcome)?, Step::Wait);
    assert_eq!(comparison.hashed(vec![ours])?, Step::Wait);
    let theirs = [theirs];
    let mut step = Step::Wait;
    for message in exchange::group_digests(&theirs) {
        step = comparison.received(message)?;
    }
    let Step::Send(Message::HashRanges { ranges }) = step else {
        panic!("no hash ranges asked for: {step:?}");
    };
    let mut answers: Vec<Message> = exchange::block_hashes(&theirs, &ranges)?.collect();
    if short {
        answers.retain(|message| matches!(message, Message::HashesDone));
    }
    for message in answers {
        if let Step::Done(differing) = comparison.received(message)? {
            return Ok(differing.concat());
        }
    }
    panic!("the exchange never ended");
}

#[test]
fn the_exchange_finds_the_differing_block_and_refuses_a_replica_that_stops_short() {
    let ours = pattern(1, 4 * HASH_BLOCK as usize);
    let mut theirs = ours.clone();
    theirs[2 * HASH_BLOCK as usize + 5] ^= 1;
    assert_eq!(
        exchange(ours.clone(), theirs.clone(), false).unwrap(),
        vec![2 * HASH_BLOCK..3 * HASH_BLOCK]
    );
    let error = exchange(ours, theirs, true).unwrap_err().to_string();
    assert!(error.contains("of the"), "{error}");
}

#[test]
fn a_hash_request_that_repeats_overlaps_or_overreaches_is_refused_before_any_answer() {
    use crate::resync::exchange;
    let hashes = [hashes_of(&raw(pattern(3, 8 * HASH_BLOCK as usize)))];
    let answered = |ranges: &[(u16, Range<u64>)]| {
        exchange::block_hashes(&hashes, ranges).map(|pieces| pieces.count())
    };
    // As a primary asks: in order, apart; one piece each here, then the end.
    assert_eq!(answered(&[(0, 0..2), (0, 4..8)]).unwrap(), 3);
    for (ranges, named) in [
        (vec![(0, 0..8), (0, 0..8)], "overlapping"),
        (vec![(0, 4..8), (0, 0..2)], "out of order"),
        (vec![(0, 0..9)], "which has blocks"),
        (vec![(0, 3..3)], "which has blocks"),
        (vec![(1, 0..1)], "disk 1, which is not there"),
    ] {
        let error = answered(&ranges).unwrap_err().to_string();
        assert!(error.contains(named), "{ranges:?}: {error}");
    }
}
