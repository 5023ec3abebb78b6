//! Hashing a disk: one pass over its allocated ranges, reading overlapped with hashing.
//!
//! A reader thread reads pieces of up to [`PIECE`] bytes (aligned to pieces of the disk, so to
//! blocks) and hands them to hasher threads, one per core; the calling thread gathers the hashes.
//! Buffers go round a bounded pool, so memory stays at `hashers + 2` pieces (at most 8, 32 MiB)
//! whatever the disk's size. Blocks outside the allocated ranges are never read: they read as
//! zeros, so they get the zero block's hash, computed once.

use super::hash::block_hash;
use super::{BlockHashes, HASH_BLOCK, block_bytes, disk_blocks};
use crate::image::BlockImage;
use crate::units::MIB;
use crate::{Error, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, PoisonError};

/// Bytes read at a time.
const PIECE: u64 = 4 * MIB;
const PIECE_BLOCKS: u64 = PIECE / HASH_BLOCK;
/// Piece buffers at most: one being read, one ready for the next read, the others being hashed.
/// XXH3 on one core hashes several times faster than a disk (or the page cache) reads, so more
/// would sit idle; and each buffer's first use costs page faults (about 1.5 ms per 4 MiB here).
const MAX_BUFFERS: usize = 8;
/// How far ahead of the reader the image is asked to read ahead, so that reads of a disk that is
/// not in the page cache overlap instead of waiting one at a time.
const READ_AHEAD: u64 = 8 * PIECE;

/// Read bytes on their way to a hasher.
struct Piece {
    first_block: u64,
    buffer: Vec<u8>,
    length: usize,
}

/// A piece's hashes on their way back.
struct HashedPiece {
    first_block: u64,
    hashes: Vec<u128>,
    bytes: u64,
}

impl BlockHashes {
    /// Hashes every block of `image` under `seed`. `progress` is called, on the calling thread,
    /// with the bytes of the disk covered so far.
    pub fn compute(
        image: &dyn BlockImage,
        seed: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<BlockHashes> {
        let blocks = 0..disk_blocks(image.virtual_size());
        Self::compute_blocks(image, seed, blocks, progress)
    }

    /// Hashes the blocks `blocks` (indexes from the start of the disk) of `image` under `seed`,
    /// to answer for a part of the disk. `progress` is called with the bytes of that part covered
    /// so far; unallocated ranges count as covered from the start, since they need no reading.
    pub(crate) fn compute_blocks(
        image: &dyn BlockImage,
        seed: u64,
        blocks: Range<u64>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<BlockHashes> {
        let virtual_size = image.virtual_size();
        if blocks.start > blocks.end || blocks.end > disk_blocks(virtual_size) {
            return Err(Error::InvalidArgument {
                what: "block range",
                reason: format!(
                    "blocks {blocks:?} are not inside a disk of {} blocks",
                    disk_blocks(virtual_size)
                ),
            });
        }
        let mut hashes = zero_hashes(seed, virtual_size, blocks.clone());
        let to_read = allocated_blocks(&image.allocated_ranges()?, blocks.clone());
        let bytes_of = |range: &Range<u64>| {
            let bytes = block_bytes(virtual_size, range);
            bytes.end - bytes.start
        };
        let read_bytes: u64 = to_read.iter().map(bytes_of).sum();
        let mut covered = bytes_of(&blocks) - read_bytes;
        progress(covered);
        if !to_read.is_empty() {
            hash_allocated(image, seed, &to_read, &mut |piece| {
                let start = (piece.first_block - blocks.start) as usize;
                hashes[start..start + piece.hashes.len()].copy_from_slice(&piece.hashes);
                covered += piece.bytes;
                progress(covered);
            })?;
        }
        Ok(BlockHashes::from_parts(
            virtual_size,
            seed,
            blocks.start,
            hashes,
        ))
    }
}

/// The hashes of `blocks` as if every one read as zeros: the zero block's hash, computed once,
/// and the short last block's hash over its real length.
fn zero_hashes(seed: u64, virtual_size: u64, blocks: Range<u64>) -> Vec<u128> {
    let zeros = vec![0u8; HASH_BLOCK as usize];
    let mut hashes = vec![block_hash(seed, &zeros); (blocks.end - blocks.start) as usize];
    let last_length = virtual_size % HASH_BLOCK;
    if last_length != 0
        && blocks.end == disk_blocks(virtual_size)
        && let Some(last) = hashes.last_mut()
    {
        *last = block_hash(seed, &zeros[..last_length as usize]);
    }
    hashes
}

/// The blocks of `blocks` that meet an allocated byte range, as merged block ranges: a block
/// only partly allocated is read whole (its unallocated bytes read as zeros).
fn allocated_blocks(allocated: &[Range<u64>], blocks: Range<u64>) -> Vec<Range<u64>> {
    let mut merged: Vec<Range<u64>> = Vec::new();
    for range in allocated.iter().filter(|range| range.start < range.end) {
        let start = (range.start / HASH_BLOCK).max(blocks.start);
        let end = range.end.div_ceil(HASH_BLOCK).min(blocks.end);
        if start >= end {
            continue;
        }
        match merged.last_mut() {
            Some(last) if last.end >= start => last.end = last.end.max(end),
            _ => merged.push(start..end),
        }
    }
    merged
}

/// Reads and hashes the blocks `to_read`, handing each hashed piece to `gather` on this thread.
fn hash_allocated(
    image: &dyn BlockImage,
    seed: u64,
    to_read: &[Range<u64>],
    gather: &mut dyn FnMut(HashedPiece),
) -> Result<()> {
    // One hasher per core, but never more than there are buffers to hash.
    let hashers = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(MAX_BUFFERS - 2);
    let buffers = hashers + 2;
    let (free_sender, free) = sync_channel::<Vec<u8>>(buffers);
    let (work_sender, work) = sync_channel::<Piece>(buffers);
    let (done_sender, done) = sync_channel::<Result<HashedPiece>>(buffers);
    let work = Mutex::new(work);
    let stop = AtomicBool::new(false);
    let mut failure = None;
    std::thread::scope(|scope| {
        let reader_done = done_sender.clone();
        let stop = &stop;
        scope.spawn(move || {
            read_stage(
                image,
                to_read,
                buffers,
                free,
                work_sender,
                reader_done,
                stop,
            )
        });
        for _ in 0..hashers {
            let (free, done, work) = (free_sender.clone(), done_sender.clone(), &work);
            scope.spawn(move || hash_stage(seed, work, free, done));
        }
        // Only the stages hold senders now, so the loop ends when they all have finished.
        drop((free_sender, done_sender));
        // Keep gathering after a failure: the stages stop soon, and none waits on a full channel.
        for result in done {
            match result {
                Ok(piece) => gather(piece),
                Err(error) => {
                    stop.store(true, Ordering::Relaxed);
                    failure.get_or_insert(error);
                }
            }
        }
    });
    failure.map_or(Ok(()), Err)
}

/// Reads `to_read` piece by piece into pooled buffers and hands the pieces to the hashers.
fn read_stage(
    image: &dyn BlockImage,
    to_read: &[Range<u64>],
    buffers: usize,
    free: Receiver<Vec<u8>>,
    work: SyncSender<Piece>,
    done: SyncSender<Result<HashedPiece>>,
    stop: &AtomicBool,
) {
    let virtual_size = image.virtual_size();
    let mut allocated_buffers = 0;
    // The end of what the image was told will be needed.
    let mut hinted = 0;
    for range in to_read {
        let range_end = block_bytes(virtual_size, range).end;
        let mut block = range.start;
        while block < range.end {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let offset = block * HASH_BLOCK;
            let piece_end = ((block / PIECE_BLOCKS + 1) * PIECE_BLOCKS).min(range.end);
            let length = (block_bytes(virtual_size, &(block..piece_end)).end - offset) as usize;
            let wanted = (offset + READ_AHEAD).min(range_end);
            if wanted > hinted.max(offset) {
                let from = hinted.max(offset);
                image.will_need(from, wanted - from);
                hinted = wanted;
            }
            // Buffers are made only as needed, so a small range does not cost the whole pool.
            let buffer = match free.try_recv() {
                Ok(buffer) => buffer,
                Err(_) if allocated_buffers < buffers => {
                    allocated_buffers += 1;
                    vec![0u8; PIECE as usize]
                }
                Err(_) => match free.recv() {
                    Ok(buffer) => buffer,
                    Err(_) => return,
                },
            };
            let mut piece = Piece {
                first_block: block,
                buffer,
                length,
            };
            if let Err(error) = image.read_at(&mut piece.buffer[..length], offset) {
                let _ = done.send(Err(error));
                return;
            }
            if work.send(piece).is_err() {
                return;
            }
            block = piece_end;
        }
    }
}

/// Hashes pieces until the reader has finished, returning each buffer to the pool.
fn hash_stage(
    seed: u64,
    work: &Mutex<Receiver<Piece>>,
    free: SyncSender<Vec<u8>>,
    done: SyncSender<Result<HashedPiece>>,
) {
    loop {
        // A panicking hasher cannot leave the receiver inconsistent, so a poisoned lock is usable.
        let received = work.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(piece) = received else { return };
        let bytes = &piece.buffer[..piece.length];
        let hashes = bytes
            .chunks(HASH_BLOCK as usize)
            .map(|block| block_hash(seed, block))
            .collect();
        let hashed = HashedPiece {
            first_block: piece.first_block,
            hashes,
            bytes: piece.length as u64,
        };
        // The pool holds every buffer there is, so this never waits; after a failure the reader
        // may be gone, and the buffer is simply dropped.
        let _ = free.send(piece.buffer);
        if done.send(Ok(hashed)).is_err() {
            return;
        }
    }
}
