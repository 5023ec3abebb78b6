//! Copying one virtual disk into another, skipping what reads as zeros, so that converting a
//! sparse disk keeps it sparse.

use super::{BlockImage, is_zero};
use crate::{Error, Result};

/// Bytes moved at a time; chunk boundaries are multiples of this, so they line up with VHDX
/// blocks of this size or larger.
const CHUNK: u64 = 4 << 20;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStatistics {
    /// Bytes read from the source (its allocated ranges).
    pub bytes_read: u64,
    /// Bytes written to the destination (the non-zero chunks).
    pub bytes_written: u64,
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
    let mut statistics = CopyStatistics::default();
    let mut buffer = vec![0u8; CHUNK as usize];
    let mut done = 0;
    for range in source.allocated_ranges()? {
        if !destination_is_zeroed && range.start > done {
            destination.zero_range(done, range.start - done)?;
        }
        let mut position = range.start;
        while position < range.end {
            let chunk_end = ((position / CHUNK + 1) * CHUNK).min(range.end);
            let data = &mut buffer[..(chunk_end - position) as usize];
            source.read_at(data, position)?;
            statistics.bytes_read += data.len() as u64;
            if !is_zero(data) {
                destination.write_at(data, position)?;
                statistics.bytes_written += data.len() as u64;
            } else if !destination_is_zeroed {
                destination.zero_range(position, data.len() as u64)?;
            }
            position = chunk_end;
            progress(position);
        }
        done = range.end;
    }
    if !destination_is_zeroed && done < virtual_size {
        destination.zero_range(done, virtual_size - done)?;
    }
    progress(virtual_size);
    destination.flush()?;
    Ok(statistics)
}
