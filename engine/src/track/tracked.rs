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
use super::journal::{Journal, Recovered};
use crate::image::BlockImage;
use crate::io::Storage;
use crate::{Error, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

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
    /// Makes tracking survive restarts and crashes, when present.
    journal: Option<Journal<Box<dyn Storage>>>,
    /// Cut generations not yet acknowledged, kept for a clean shutdown to persist.
    unacknowledged: Mutex<Vec<(u64, DirtyBitmap)>>,
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
        Self::resume(image, granularity, 1, None, None)
    }

    /// Tracks `image` with `journal`, continuing from what opening (or creating) it recovered.
    /// The journal's granularity is the disk's.
    pub fn with_journal(
        image: I,
        journal: Journal<Box<dyn Storage>>,
        recovered: Recovered,
    ) -> Result<Self> {
        let identity = journal.identity();
        if identity.virtual_size != image.virtual_size() {
            return Err(Error::TrackingLost {
                name: "journal".into(),
                reason: format!(
                    "journal is for {} bytes, the image has {}",
                    identity.virtual_size,
                    image.virtual_size()
                ),
            });
        }
        Self::resume(
            image,
            identity.granularity,
            recovered.next_generation,
            Some(recovered.dirty),
            Some(journal),
        )
    }

    fn resume(
        image: I,
        granularity: u64,
        generation: u64,
        marked: Option<DirtyBitmap>,
        journal: Option<Journal<Box<dyn Storage>>>,
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
            journal,
            unacknowledged: Mutex::new(Vec::new()),
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

    /// Stops tracking without a clean shutdown of the journal (as a crash would).
    pub fn into_inner(self) -> I {
        unpoisoned(self.image.into_inner())
    }

    /// Records that the replica holds every generation up to `generation`: their changes no
    /// longer need to survive a crash.
    pub fn acknowledge(&self, generation: u64) -> Result<()> {
        unpoisoned(self.unacknowledged.lock()).retain(|(cut, _)| *cut > generation);
        match &self.journal {
            Some(journal) => journal.acknowledge(generation),
            None => Ok(()),
        }
    }

    /// Clean shutdown: flushes the image and stores every change not yet acknowledged in the
    /// journal, so the next open continues where this one stopped.
    pub fn close(self) -> Result<I> {
        let mut image = unpoisoned(self.image.into_inner());
        image.flush()?;
        let current = unpoisoned(self.current.into_inner());
        if let Some(journal) = self.journal {
            for (_, bitmap) in unpoisoned(self.unacknowledged.into_inner()) {
                current.bitmap.merge(&bitmap);
            }
            journal.close(&current.bitmap, current.number)?;
        }
        Ok(image)
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
        let copy = || {
            DirtyBitmap::from_bytes(frozen.bitmap.blocks(), &frozen.bitmap.to_bytes())
                .unwrap_or_else(|| DirtyBitmap::new(frozen.bitmap.blocks()))
        };
        let bitmap = copy();
        if self.journal.is_some() {
            unpoisoned(self.unacknowledged.lock()).push((generation, copy()));
        }
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
        // The region is durably marked before the write can reach the disk.
        let marked = match &self.journal {
            Some(journal) => journal.mark(offset, length, generation.number),
            None => Ok(()),
        };
        let result = marked.and_then(|()| change(&mut *unpoisoned(self.image.write())));
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
