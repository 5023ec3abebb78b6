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
//!
//! A cut can also freeze the disk's *contents* at the cut (`cut_together` with a
//! [`PreserveBlocks`]): until the cut's blocks are read with `read_snapshot`, a later write to
//! one of them first hands the block's old contents to the preserver. A delta read that way
//! is the disk at one instant, a crash-consistent recovery point, although writes never stop.

use super::DirtyBitmap;
use super::journal::{Journal, Recovered};
use crate::image::BlockImage;
use crate::io::Storage;
use crate::{Error, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// Takes the contents a block had at a cut, before a later write changes them.
pub(crate) trait PreserveBlocks: Send + Sync {
    /// `data` is what the disk held at `offset` when the cut was made.
    fn preserve(&self, offset: u64, data: &[u8]) -> Result<()>;
}

/// The contents of a cut, kept until they are read.
struct Snapshot {
    /// The frozen generation; its writers may still be marking it when the snapshot starts.
    frozen: Arc<Generation>,
    /// Blocks whose contents at the cut have been read or preserved.
    taken: DirtyBitmap,
    preserver: Arc<dyn PreserveBlocks>,
    failure: Mutex<Option<Error>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Snapshot")
            .field("generation", &self.frozen.number)
            .finish_non_exhaustive()
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
    /// The cut whose contents are being read, if one is.
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// Whether `snapshot` is set: lets writes skip its lock when no snapshot runs (nearly
    /// always). Set under the generation lock, which every writer takes before reading it.
    snapshot_active: AtomicBool,
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
    /// The journal's granularity is the disk's. The image's stamp is moved now, before any
    /// write, and recorded in the journal, so that after a crash the disk must still show it.
    pub fn with_journal(
        mut image: I,
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
        image.begin_writes()?;
        journal.record_stamp(image.content_stamp()?)?;
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
            snapshot: RwLock::new(None),
            snapshot_active: AtomicBool::new(false),
        })
    }

    pub(crate) fn granularity(&self) -> u64 {
        self.granularity
    }

    pub(crate) fn virtual_size(&self) -> u64 {
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
        self.acknowledge_delta(generation, 0)
    }

    /// The same, recording too that the replica holds delta `delta`.
    pub fn acknowledge_delta(&self, generation: u64, delta: u64) -> Result<()> {
        unpoisoned(self.unacknowledged.lock()).retain(|(cut, _)| *cut > generation);
        match &self.journal {
            Some(journal) => journal.acknowledge(generation, delta),
            None => Ok(()),
        }
    }

    /// The last delta the replica confirmed holding these changes, when a journal says.
    pub fn acknowledged_delta(&self) -> Option<u64> {
        self.journal.as_ref().map(Journal::acknowledged_delta)
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
            journal.close(&current.bitmap, current.number, image.content_stamp()?)?;
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

    /// Every range changed and not yet acknowledged by the replica: the current generation and
    /// every cut not acknowledged. A block outside these holds what the replica holds.
    pub(crate) fn pending_extents(&self) -> Vec<Range<u64>> {
        let pending = DirtyBitmap::new(unpoisoned(self.current.read()).bitmap.blocks());
        pending.merge(&unpoisoned(self.current.read()).bitmap);
        for (_, bitmap) in unpoisoned(self.unacknowledged.lock()).iter() {
            pending.merge(bitmap);
        }
        pending
            .runs()
            .into_iter()
            .map(|run| {
                run.start * self.granularity..(run.end * self.granularity).min(self.virtual_size)
            })
            .collect()
    }

    /// Counts a range as changed without writing it (a hash comparison found it differs from
    /// the replica), durably when journaled, so that the next cut ships it.
    pub(crate) fn mark_changed(&self, offset: u64, length: u64) -> Result<()> {
        self.tracked(offset, length, |_| Ok(()))
    }

    /// Freezes the current generation and opens the next. Returns once every write that joined
    /// the frozen generation has marked it.
    pub fn cut(&self) -> Cut {
        let mut current = unpoisoned(self.current.write());
        let frozen = Self::swap_generation(&mut current);
        drop(current);
        self.finish_cut(frozen)
    }

    /// Cuts every disk at one instant: no write that started after a write to any of them
    /// completed lands in an earlier generation (write order is kept across disks). With a
    /// preserver per disk, each cut's contents are also frozen until read (`read_snapshot`).
    pub(crate) fn cut_together(
        disks: &[&TrackedDisk<I>],
        preservers: Option<Vec<Arc<dyn PreserveBlocks>>>,
    ) -> Vec<Cut> {
        // Holding every disk's generation lock at once makes the swap one instant for all.
        let mut locks: Vec<_> = disks
            .iter()
            .map(|disk| unpoisoned(disk.current.write()))
            .collect();
        let frozen: Vec<_> = locks
            .iter_mut()
            .map(|current| Self::swap_generation(current))
            .collect();
        if let Some(preservers) = preservers {
            for ((disk, generation), preserver) in disks.iter().zip(&frozen).zip(preservers) {
                // Installed before any writer of the new generation can reach the image.
                disk.snapshot_active.store(true, Ordering::Relaxed);
                *unpoisoned(disk.snapshot.write()) = Some(Arc::new(Snapshot {
                    frozen: Arc::clone(generation),
                    taken: DirtyBitmap::new(generation.bitmap.blocks()),
                    preserver,
                    failure: Mutex::new(None),
                }));
            }
        }
        drop(locks);
        disks
            .iter()
            .zip(frozen)
            .map(|(disk, frozen)| disk.finish_cut(frozen))
            .collect()
    }

    /// Reads `buf.len()` bytes at `offset` as they were at the snapshot cut, for the blocks of
    /// the cut not yet taken; returns the byte ranges read (those taken earlier went to the
    /// preserver). Each block of the cut is taken once.
    pub(crate) fn read_snapshot(&self, buf: &mut [u8], offset: u64) -> Result<Vec<Range<u64>>> {
        let snapshot = unpoisoned(self.snapshot.read()).clone();
        let Some(snapshot) = snapshot else {
            self.read_at(buf, offset)?;
            return Ok(std::iter::once(offset..offset + buf.len() as u64).collect());
        };
        let image = self.image();
        let end = offset + buf.len() as u64;
        let mut read = Vec::new();
        let mut block = offset / self.granularity;
        while block * self.granularity < end {
            let start = (block * self.granularity).max(offset);
            let stop = ((block + 1) * self.granularity).min(end);
            if !snapshot.taken.is_marked(block) {
                let into = &mut buf[(start - offset) as usize..(stop - offset) as usize];
                image.read_at(into, start)?;
                if snapshot.frozen.bitmap.is_marked(block) {
                    snapshot.taken.mark(block, block);
                }
                match read.last_mut() {
                    Some(Range { end, .. }) if *end == start => *end = stop,
                    _ => read.push(start..stop),
                }
            }
            block += 1;
        }
        Ok(read)
    }

    /// Ends the snapshot: writes no longer preserve anything. Fails if preserving failed,
    /// in which case the delta read from it is not a consistent point.
    pub(crate) fn end_snapshot(&self) -> Result<()> {
        let snapshot = unpoisoned(self.snapshot.write()).take();
        self.snapshot_active.store(false, Ordering::Relaxed);
        match snapshot.and_then(|snapshot| unpoisoned(snapshot.failure.lock()).take()) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Puts a cut's blocks back into the current generation: its delta could not be
    /// prepared, so its changes must ship with the next one.
    pub(crate) fn requeue(&self, cut: &Cut) {
        unpoisoned(self.current.read()).bitmap.merge(&cut.bitmap);
    }

    fn swap_generation(current: &mut Arc<Generation>) -> Arc<Generation> {
        let next = Arc::new(Generation {
            number: current.number + 1,
            bitmap: DirtyBitmap::new(current.bitmap.blocks()),
            writers: AtomicUsize::new(0),
        });
        std::mem::replace(current, next)
    }

    fn finish_cut(&self, frozen: Arc<Generation>) -> Cut {
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
        let result = marked.and_then(|()| {
            let mut image = unpoisoned(self.image.write());
            self.preserve_before_write(&*image, generation.number, offset, length);
            change(&mut *image)
        });
        // Marked even when the change failed: part of it may have reached the image.
        let first = offset / self.granularity;
        let last = (offset + length - 1) / self.granularity;
        generation.bitmap.mark(first, last);
        generation.writers.fetch_sub(1, Ordering::Release);
        result
    }
}

impl<I: BlockImage> TrackedDisk<I> {
    /// Hands the old contents of snapshot blocks a write is about to change to the preserver.
    /// Called with the image locked for writing, so no snapshot read runs meanwhile.
    fn preserve_before_write(&self, image: &I, generation: u64, offset: u64, length: u64) {
        if !self.snapshot_active.load(Ordering::Relaxed) {
            return;
        }
        let snapshot = unpoisoned(self.snapshot.read()).clone();
        let Some(snapshot) = snapshot else {
            return;
        };
        // Writes of the frozen generation itself belong to the cut.
        if generation <= snapshot.frozen.number {
            return;
        }
        let first = offset / self.granularity;
        let last = (offset + length - 1) / self.granularity;
        let mut block_data = Vec::new();
        for block in first..=last {
            if !snapshot.frozen.bitmap.is_marked(block) || snapshot.taken.is_marked(block) {
                continue;
            }
            snapshot.taken.mark(block, block);
            let start = block * self.granularity;
            let stop = (start + self.granularity).min(self.virtual_size);
            block_data.resize((stop - start) as usize, 0);
            let outcome = image
                .read_at(&mut block_data, start)
                .and_then(|()| snapshot.preserver.preserve(start, &block_data));
            if let Err(error) = outcome {
                unpoisoned(snapshot.failure.lock()).get_or_insert(error);
            }
        }
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

    #[derive(Default)]
    struct Collect(Mutex<Vec<(u64, Vec<u8>)>>);

    impl PreserveBlocks for Collect {
        fn preserve(&self, offset: u64, data: &[u8]) -> Result<()> {
            self.0.lock().unwrap().push((offset, data.to_vec()));
            Ok(())
        }
    }

    #[test]
    fn a_snapshot_cut_reads_as_the_disk_was_at_the_cut_although_writes_go_on() {
        let disk = disk(1 << 20);
        disk.write_at(&[1; 3 * 4096], 4096).unwrap();
        disk.write_at(&[2; 100], 40 * 4096).unwrap();
        let mut at_cut = vec![0u8; 1 << 20];
        disk.read_at(&mut at_cut, 0).unwrap();
        let collect = Arc::new(Collect::default());
        let cuts = TrackedDisk::cut_together(&[&disk], Some(vec![collect.clone()]));
        // Later writes: one over a block of the cut, one over a block outside it.
        disk.write_at(&[9; 5000], 4096 + 10).unwrap();
        disk.write_at(&[9; 10], 60 * 4096).unwrap();
        let mut snapshot = vec![0u8; 1 << 20];
        let mut covered = 0;
        for extent in cuts[0].extents() {
            let buffer = &mut snapshot[extent.start as usize..extent.end as usize];
            let read = disk.read_snapshot(buffer, extent.start).unwrap();
            covered += read
                .iter()
                .map(|range| range.end - range.start)
                .sum::<u64>();
        }
        for (offset, data) in collect.0.lock().unwrap().iter() {
            snapshot[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            covered += data.len() as u64;
        }
        // Each block of the cut was taken exactly once: read, or preserved.
        assert_eq!(covered, cuts[0].changed_bytes());
        disk.end_snapshot().unwrap();
        for extent in cuts[0].extents() {
            let range = extent.start as usize..extent.end as usize;
            assert!(
                snapshot[range.clone()] == at_cut[range],
                "{extent:?} differs"
            );
        }
        // Two blocks preserved (the write spanned blocks 1 and 2), none for block 60.
        assert_eq!(collect.0.lock().unwrap().len(), 2);
        // The later writes are tracked in the next generation.
        assert_eq!(
            disk.cut().extents(),
            vec![4096..3 * 4096, 60 * 4096..61 * 4096]
        );
    }

    #[test]
    fn a_requeued_cut_ships_with_the_next_one() {
        let disk = disk(1 << 20);
        disk.write_at(&[1; 10], 0).unwrap();
        let lost = disk.cut();
        disk.write_at(&[1; 10], 8 * 4096).unwrap();
        disk.requeue(&lost);
        assert_eq!(disk.cut().extents(), vec![0..4096, 8 * 4096..9 * 4096]);
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
