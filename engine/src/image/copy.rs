//! Copying one virtual disk into another, skipping what reads as zeros, so that converting a
//! sparse disk keeps it sparse. The copy is a two-stage pipeline: a reader thread reads chunks
//! and finds the all-zero ones while the calling thread writes the previous chunks, so reading,
//! checking and writing overlap instead of taking turns. Memory is bounded by a fixed number of
//! chunk buffers, whatever the disk's size.

use super::{BlockImage, is_zero};
use crate::{Error, Result};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Bytes moved at a time; chunk boundaries are multiples of this, so they line up with VHDX
/// blocks of this size or larger.
const CHUNK: u64 = 4 << 20;
/// Chunk buffers in the pipeline: enough to keep both stages busy, few enough to bound memory.
const BUFFERS: usize = 4;
/// How far ahead of the reader the source is asked to read ahead, so that reads of a source
/// that is not in the page cache overlap instead of waiting on the disk one at a time.
const READ_AHEAD: u64 = 8 * CHUNK;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStatistics {
    /// Bytes read from the source (its allocated ranges).
    pub bytes_read: u64,
    /// Bytes written to the destination (the non-zero chunks).
    pub bytes_written: u64,
}

/// A chunk read by the reader stage.
struct Chunk {
    offset: u64,
    buffer: Vec<u8>,
    length: usize,
    zero: bool,
}

/// Copies every byte of `source` into `destination`, which must have the same virtual size.
///
/// When `destination_is_zeroed` (a freshly created image), all-zero chunks are skipped so they
/// stay unallocated; otherwise they are zeroed in the destination. `progress` is called with the
/// number of virtual-disk bytes dealt with so far. The destination is flushed at the end.
pub fn copy_image(
    source: &dyn BlockImage,
    destination: &mut dyn BlockImage,
    destination_is_zeroed: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<CopyStatistics> {
    let virtual_size = source.virtual_size();
    if destination.virtual_size() != virtual_size {
        return Err(Error::InvalidArgument {
            what: "copy",
            reason: format!(
                "source has {virtual_size} bytes but destination has {}",
                destination.virtual_size()
            ),
        });
    }
    let ranges = source.allocated_ranges()?;
    let (full_sender, full) = sync_channel::<Result<Chunk>>(BUFFERS);
    let (free_sender, free) = sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        // Cannot fail: the channel has room for every buffer.
        let _ = free_sender.send(vec![0u8; CHUNK as usize]);
    }
    std::thread::scope(|scope| {
        scope.spawn(move || read_stage(source, &ranges, free, full_sender));
        let statistics = write_stage(
            destination,
            virtual_size,
            destination_is_zeroed,
            &full,
            &free_sender,
            progress,
        );
        // Dropping the receiving ends stops a reader still waiting to hand over a chunk.
        drop(full);
        drop(free_sender);
        statistics
    })
}

/// Reads every allocated chunk in order, marks the all-zero ones, and hands them on.
fn read_stage(
    source: &dyn BlockImage,
    ranges: &[std::ops::Range<u64>],
    free: Receiver<Vec<u8>>,
    full: SyncSender<Result<Chunk>>,
) {
    // The end of what the source was told will be needed.
    let mut hinted = 0;
    for range in ranges {
        let mut position = range.start;
        while position < range.end {
            let wanted = (position + READ_AHEAD).min(range.end);
            if wanted > hinted.max(position) {
                let from = hinted.max(position);
                source.will_need(from, wanted - from);
                hinted = wanted;
            }
            let Ok(mut buffer) = free.recv() else { return };
            let chunk_end = ((position / CHUNK + 1) * CHUNK).min(range.end);
            let length = (chunk_end - position) as usize;
            let chunk = source
                .read_at(&mut buffer[..length], position)
                .map(|()| Chunk {
                    offset: position,
                    zero: is_zero(&buffer[..length]),
                    buffer,
                    length,
                });
            let failed = chunk.is_err();
            if full.send(chunk).is_err() || failed {
                return;
            }
            position = chunk_end;
        }
    }
}

/// Writes the chunks the reader hands over, zeroing the gaps when the destination needs it.
fn write_stage(
    destination: &mut dyn BlockImage,
    virtual_size: u64,
    destination_is_zeroed: bool,
    full: &Receiver<Result<Chunk>>,
    free: &SyncSender<Vec<u8>>,
    progress: &mut dyn FnMut(u64),
) -> Result<CopyStatistics> {
    let mut statistics = CopyStatistics::default();
    let mut done = 0;
    // The reader closes the channel when it has read everything.
    while let Ok(chunk) = full.recv() {
        let chunk = chunk?;
        if !destination_is_zeroed && chunk.offset > done {
            destination.zero_range(done, chunk.offset - done)?;
        }
        let data = &chunk.buffer[..chunk.length];
        statistics.bytes_read += chunk.length as u64;
        if !chunk.zero {
            destination.write_at(data, chunk.offset)?;
            statistics.bytes_written += chunk.length as u64;
        } else if !destination_is_zeroed {
            destination.zero_range(chunk.offset, chunk.length as u64)?;
        }
        done = chunk.offset + chunk.length as u64;
        progress(done);
        // The reader may have finished and gone; then the buffer is simply dropped.
        let _ = free.send(chunk.buffer);
    }
    if !destination_is_zeroed && done < virtual_size {
        destination.zero_range(done, virtual_size - done)?;
    }
    progress(virtual_size);
    destination.flush()?;
    Ok(statistics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Access, RawImage};
    use crate::io::MemoryStorage;

    fn raw(bytes: Vec<u8>) -> RawImage<MemoryStorage> {
        RawImage::open(MemoryStorage::from_bytes(bytes), "raw", Access::ReadWrite).unwrap()
    }

    #[test]
    fn a_copy_over_old_content_zeroes_what_the_source_does_not_hold() {
        let size = 3 * CHUNK as usize + 12345;
        let mut source_bytes = vec![0u8; size];
        source_bytes[CHUNK as usize + 7] = 1;
        source_bytes[size - 1] = 2;
        let source = raw(source_bytes.clone());
        let mut destination = raw(vec![0xEE; size]);
        let statistics = copy_image(&source, &mut destination, false, &mut |_| {}).unwrap();
        let mut copied = vec![0u8; size];
        destination.read_at(&mut copied, 0).unwrap();
        assert!(copied == source_bytes);
        assert_eq!(statistics.bytes_written, CHUNK + 12345);
    }

    #[test]
    fn a_read_error_stops_the_copy_with_that_error() {
        struct Failing;
        impl BlockImage for Failing {
            fn virtual_size(&self) -> u64 {
                64 << 20
            }
            fn read_at(&self, _: &mut [u8], offset: u64) -> Result<()> {
                Err(Error::corrupt("failing", format!("unreadable at {offset}")))
            }
            fn write_at(&mut self, _: &[u8], _: u64) -> Result<()> {
                unreachable!()
            }
            fn zero_range(&mut self, _: u64, _: u64) -> Result<()> {
                unreachable!()
            }
            fn flush(&mut self) -> Result<()> {
                Ok(())
            }
            fn allocated_ranges(&self) -> Result<Vec<std::ops::Range<u64>>> {
                Ok(std::iter::once(0..(64 << 20)).collect())
            }
        }
        let mut destination = raw(vec![0; 64 << 20]);
        let error = copy_image(&Failing, &mut destination, true, &mut |_| {}).unwrap_err();
        assert!(error.to_string().contains("unreadable at 0"), "{error}");
    }
}
