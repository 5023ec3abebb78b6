//! `TrackedDisk`: a `BlockImage` wrapper that records every change.
//!
//! Cuts never make writers wait for more than the swap of a pointer. Each generation counts the
//! writers inside it; a writer joins the current generation (under a read lock held only for
//! that), writes, marks the generation's bitmap, and leaves. `cut` swaps in a new generation
//! (under the write lock, so no writer can join the old one afterwards) and then waits, outside
//! any lock, for the old generation's writers to leave. A write therefore lands in exactly one
//! generation, and the frozen bitmap is complete when `cut` returns.
//!
//! The mark comes after the write: a delta cut before the mark is made does not need the
//! write (the next generation has it), and one cut after it reads the image after the write.

use super::DirtyBitmap;
use crate::image::BlockImage;
use crate::{Error, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Tracking granularity unless a disk sets its own.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

#[derive(Debug)]
struct Generation {
    number: u64,
    bitmap: DirtyBitmap,
    writers: AtomicUsize,
}

/// The blocks changed in one generation, frozen by a cut.
#[derive(Debug)]
pub struct Cut {
    pub generation: u64,
    pub granularity: u64,
    pub virtual_size: u64,
    pub bitmap: DirtyBitmap,
}

impl Cut {
    /// The changed byte ranges, in order, clipped to the disk.
    pub fn extents(&self) -> Vec<Range<u64>> {
        self.bitmap
            .runs()
            .into_iter()
            .map(|run| {
                run.start * self.granularity..(run.end * self.granularity).min(self.virtual_size)
            })
            .collect()
    }

    /// Bytes covered by the changed blocks.
    pub fn changed_bytes(&self) -> u64 {
        self.extents()
            .iter()
            .map(|range| range.end - range.start)
            .sum()
    }
}

/// A disk whose changes are tracked, generation by generation.
#[derive(Debug)]
pub struct TrackedDisk<I: BlockImage> {
    image: RwLock<I>,
    granularity: u64,
    virtual_size: u64,
    current: RwLock<Arc<Generation>>,
}

fn unpoisoned<T>(result: std::sync::LockResult<T>) -> T {
    // A writer that panicked left at most a partly written block, which its bitmap still
    // covers: the state behind the lock stays usable.
    result.unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<I: BlockImage> TrackedDisk<I> {
    /// Starts tracking `image` at generation 1 with nothing marked. `granularity` is the size
    /// of a tracked block: a power of two from 4 KiB to 64 MiB.
    pub fn new(image: I, granularity: u64) -> Result<Self> {
        Self::resume(image, granularity, 1, None)
    }

    /// Resumes tracking at `generation`, with `marked` (from a journal) already dirty.
    pub(crate) fn resume(
        image: I,
        granularity: u64,
        generation: u64,
        marked: Option<DirtyBitmap>,
    ) -> Result<Self> {
        if !granularity.is_power_of_two() || !(4096..=64 << 20).contains(&granularity) {
            return Err(Error::InvalidArgument {
                what: "tracking granularity",
                reason: format!("{granularity} is not a power of two from 4 KiB to 64 MiB"),
            });
        }
        let virtual_size = image.virtual_size();
        let blocks = virtual_size.div_ceil(granularity);
        let bitmap = match marked {
            Some(bitmap) if bitmap.blocks() == blocks => bitmap,
            _ => DirtyBitmap::new(blocks),
        };
        Ok(TrackedDisk {
            image: RwLock::new(image),
            granularity,
            virtual_size,
            current: RwLock::new(Arc::new(Generation {
                number: generation,
                bitmap,
                writers: AtomicUsize::new(0),
            })),
        })
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// The number of the generation that writes go to now.
    pub fn generation(&self) -> u64 {
        unpoisoned(self.current.read()).number
    }

    /// Shared access to the image, for reading changed blocks.
    pub fn image(&self) -> RwLockReadGuard<'_, I> {
        unpoisoned(self.image.read())
    }

    pub fn into_inner(self) -> I {
        unpoisoned(self.image.into_inner())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image().read_at(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.tracked(offset, buf.len() as u64, |image| {
            image.write_at(buf, offset)
        })
    }

    pub fn zero_range(&self, offset: u64, length: u64) -> Result<()> {
        self.tracked(offset, length, |image| image.zero_range(offset, length))
    }

    pub fn flush(&self) -> Result<()> {
        unpoisoned(self.image.write()).flush()
    }

    /// Freezes the current generation and opens the next. Returns once every write that joined
    /// the frozen generation has marked it.
    pub fn cut(&self) -> Cut {
        let frozen = {
            let mut current = unpoisoned(self.current.write());
            let next = Arc::new(Generation {
                number: current.number + 1,
                bitmap: DirtyBitmap::new(current.bitmap.blocks()),
                writers: AtomicUsize::new(0),
            });
            std::mem::replace(&mut *current, next)
        };
        while frozen.writers.load(Ordering::Acquire) != 0 {
            std::thread::yield_now();
        }
        let generation = frozen.number;
        // Every writer has left, so this is the only reference (or close to it: a writer may
        // still be dropping its clone); copying the bits out avoids waiting for that.
        let bitmap = DirtyBitmap::from_bytes(frozen.bitmap.blocks(), &frozen.bitmap.to_bytes())
            .unwrap_or_else(|| DirtyBitmap::new(frozen.bitmap.blocks()));
        Cut {
            generation,
            granularity: self.granularity,
            virtual_size: self.virtual_size,
            bitmap,
        }
    }

    /// Runs `change` on the image inside the current generation and marks what it touched.
    fn tracked(
        &self,
        offset: u64,
        length: u64,
        change: impl FnOnce(&mut I) -> Result<()>,
    ) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let generation = {
            let current = unpoisoned(self.current.read());
            current.writers.fetch_add(1, Ordering::AcqRel);
            Arc::clone(&current)
        };
        let result = change(&mut *unpoisoned(self.image.write()));
        // Marked even when the change failed: part of it may have reached the image.
        let first = offset / self.granularity;
        let last = (offset + length - 1) / self.granularity;
        generation.bitmap.mark(first, last);
        generation.writers.fetch_sub(1, Ordering::Release);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Access, RawImage};
    use crate::io::MemoryStorage;

    fn disk(size: usize) -> TrackedDisk<RawImage<MemoryStorage>> {
        let image = RawImage::open(
            MemoryStorage::from_bytes(vec![0; size]),
            "disk",
            Access::ReadWrite,
        )
        .unwrap();
        TrackedDisk::new(image, 4096).unwrap()
    }

    #[test]
    fn a_block_written_many_times_is_marked_once() {
        let disk = disk(1 << 20);
        for _ in 0..1000 {
            disk.write_at(&[1; 10], 4096 * 3 + 5).unwrap();
        }
        disk.zero_range(4096 * 9 - 1, 2).unwrap();
        let cut = disk.cut();
        assert_eq!(cut.generation, 1);
        assert_eq!(cut.extents(), vec![4096 * 3..4096 * 4, 4096 * 8..4096 * 10]);
        assert_eq!(disk.generation(), 2);
        assert!(disk.cut().extents().is_empty());
    }

    #[test]
    fn the_last_block_of_an_odd_sized_disk_is_clipped() {
        let disk = disk(3 * 4096 + 512);
        disk.write_at(&[1; 512], 3 * 4096).unwrap();
        assert_eq!(disk.cut().extents(), vec![3 * 4096..3 * 4096 + 512]);
    }

    #[test]
    fn granularities_outside_the_range_are_refused() {
        let image = RawImage::open(
            MemoryStorage::from_bytes(vec![0; 4096]),
            "d",
            Access::ReadWrite,
        )
        .unwrap();
        assert!(TrackedDisk::new(image, 3000).is_err());
    }
}
