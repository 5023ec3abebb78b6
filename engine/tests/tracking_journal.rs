//! Tracking survives clean restarts exactly and crashes as a bounded superset; a journal that
//! cannot be trusted is reported as "tracking lost", never used.

mod common;

use blockrep::Error;
use blockrep::image::{Access, BlockImage, ContentStamp, RawImage};
use blockrep::io::{MemoryStorage, Storage};
use blockrep::track::{Journal, JournalIdentity, TrackedDisk};
use common::pattern;
use proptest::prelude::*;
use std::sync::Arc;
use uuid::Uuid;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 40 * MIB + 4096;
const GRANULARITY: u64 = 64 << 10;

fn identity() -> JournalIdentity {
    JournalIdentity {
        disk_id: Uuid::from_u128(42),
        virtual_size: SIZE,
        granularity: GRANULARITY,
        region_size: 4 * MIB,
    }
}

type Disk = TrackedDisk<RawImage<Arc<MemoryStorage>>>;

fn image(storage: &Arc<MemoryStorage>) -> RawImage<Arc<MemoryStorage>> {
    RawImage::open(storage.clone(), "disk", Access::ReadWrite).unwrap()
}

fn start() -> (Arc<MemoryStorage>, Arc<MemoryStorage>, Disk) {
    let disk = Arc::new(MemoryStorage::from_bytes(vec![0; SIZE as usize]));
    let journal_storage = Arc::new(MemoryStorage::new());
    let journal = Journal::create(
        Box::new(journal_storage.clone()) as Box<dyn Storage>,
        "journal",
        identity(),
    )
    .unwrap();
    let recovered = blockrep::track::Recovered {
        dirty: blockrep::track::DirtyBitmap::new(SIZE.div_ceil(GRANULARITY)),
        next_generation: 1,
        after_crash: false,
    };
    let tracked = TrackedDisk::with_journal(image(&disk), journal, recovered).unwrap();
    (disk, journal_storage, tracked)
}

fn reopen(
    disk: &Arc<MemoryStorage>,
    journal_storage: &Arc<MemoryStorage>,
) -> Result<(Disk, bool), Error> {
    let (journal, recovered) = Journal::open(
        Box::new(journal_storage.clone()) as Box<dyn Storage>,
        "journal",
        identity(),
        &image(disk).content_stamp()?,
    )?;
    let after_crash = recovered.after_crash;
    Ok((
        TrackedDisk::with_journal(image(disk), journal, recovered)?,
        after_crash,
    ))
}

#[derive(Debug, Clone)]
enum Step {
    Write { offset: u64, length: u64 },
    Cut { acknowledge: bool },
    CleanRestart,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        6 => (0..SIZE, 1..(3 * MIB)).prop_map(|(offset, length)| Step::Write { offset, length }),
        2 => any::<bool>().prop_map(|acknowledge| Step::Cut { acknowledge }),
        1 => Just(Step::CleanRestart),
    ];
    prop::collection::vec(step, 1..30)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn after_a_crash_every_unacknowledged_write_is_still_tracked(steps in steps(), survivors in prop::collection::vec(any::<bool>(), 1..9)) {
        let (disk_storage, journal_storage, mut disk) = start();
        // Blocks written and not yet covered by an acknowledged cut.
        let blocks = SIZE.div_ceil(GRANULARITY) as usize;
        let mut owed = vec![false; blocks];
        let mut cut_pending: Vec<(u64, Vec<bool>)> = Vec::new();
        for step in &steps {
            match *step {
                Step::Write { offset, length } => {
                    let length = length.min(SIZE - offset);
                    disk.write_at(&pattern(offset, length as usize), offset).unwrap();
                    for block in offset / GRANULARITY..=(offset + length - 1) / GRANULARITY {
                        owed[block as usize] = true;
                    }
                }
                Step::Cut { acknowledge } => {
                    let cut = disk.cut();
                    // The cut's blocks are owed until acknowledged.
                    cut_pending.push((cut.generation, owed.clone()));
                    owed = vec![false; blocks];
                    if acknowledge {
                        disk.acknowledge(cut.generation).unwrap();
                        cut_pending.retain(|(generation, _)| *generation > cut.generation);
                    }
                }
                Step::CleanRestart => {
                    drop(disk.close().unwrap());
                    let (again, after_crash) = reopen(&disk_storage, &journal_storage).unwrap();
                    prop_assert!(!after_crash);
                    disk = again;
                    // Everything owed comes back in the current generation.
                    for (_, pending) in cut_pending.drain(..) {
                        for (block, owed_block) in pending.into_iter().enumerate() {
                            owed[block] |= owed_block;
                        }
                    }
                }
            }
        }
        // The machine dies: no clean close, and unflushed changes survive only in part.
        drop(disk.into_inner());
        journal_storage.crash(|index| survivors[index % survivors.len()]);
        disk_storage.crash(|index| survivors[(index + 1) % survivors.len()]);
        let (recovered, after_crash) = reopen(&disk_storage, &journal_storage).unwrap();
        prop_assert!(after_crash);
        let tracked = recovered.cut();
        for (_, pending) in &cut_pending {
            for (block, owed_block) in pending.iter().enumerate() {
                if *owed_block { owed[block] = true; }
            }
        }
        for (block, owed_block) in owed.iter().enumerate() {
            prop_assert!(!owed_block || tracked.bitmap.is_marked(block as u64), "block {} written before the crash is not tracked", block);
        }
    }
}

#[test]
fn a_clean_restart_continues_tracking_exactly() {
    let (disk_storage, journal_storage, disk) = start();
    disk.write_at(&[1; 100], 5 * MIB).unwrap();
    let first = disk.cut();
    disk.write_at(&[2; 100], 20 * MIB).unwrap();
    drop(disk.close().unwrap());
    let (disk, after_crash) = reopen(&disk_storage, &journal_storage).unwrap();
    assert!(!after_crash);
    assert!(disk.generation() > first.generation);
    // Not acknowledged, the first cut's block is owed again, next to the second write.
    let cut = disk.cut();
    assert_eq!(
        cut.extents(),
        vec![
            5 * MIB..5 * MIB + GRANULARITY,
            20 * MIB..20 * MIB + GRANULARITY
        ]
    );
}

#[test]
fn a_crash_counts_whole_marked_regions_but_not_acknowledged_ones() {
    let (disk_storage, journal_storage, disk) = start();
    disk.write_at(&[1; 10], MIB).unwrap();
    let cut = disk.cut();
    disk.acknowledge(cut.generation).unwrap();
    disk.write_at(&[2; 10], 9 * MIB).unwrap();
    drop(disk.into_inner());
    let (disk, after_crash) = reopen(&disk_storage, &journal_storage).unwrap();
    assert!(after_crash);
    // The 4 MiB region around the unacknowledged write, not the acknowledged one.
    assert_eq!(disk.cut().extents(), vec![8 * MIB..12 * MIB]);
}

fn assert_lost(result: Result<(Disk, bool), Error>, reason: &str) {
    let message = result.map(|_| ()).unwrap_err().to_string();
    assert!(
        message.contains("tracking lost: resynchronization required"),
        "{message}"
    );
    assert!(message.contains(reason), "{message}");
}

#[test]
fn a_missing_damaged_or_foreign_journal_means_tracking_lost() {
    let disk = Arc::new(MemoryStorage::from_bytes(vec![0; SIZE as usize]));
    assert_lost(reopen(&disk, &Arc::new(MemoryStorage::new())), "missing");

    let (disk, journal_storage, tracked) = start();
    drop(tracked.close().unwrap());
    let good = journal_storage.to_bytes();
    for (position, reason) in [
        (20usize, "header checksum"),
        (4096 + 3, "region page 0 checksum"),
    ] {
        let mut damaged = good.clone();
        damaged[position] ^= 0x10;
        assert_lost(
            reopen(&disk, &Arc::new(MemoryStorage::from_bytes(damaged))),
            reason,
        );
    }
    let mut bitmap_damaged = good.clone();
    let last = bitmap_damaged.len() - 1;
    bitmap_damaged[last] ^= 1;
    assert_lost(
        reopen(&disk, &Arc::new(MemoryStorage::from_bytes(bitmap_damaged))),
        "bitmap checksum",
    );

    let other = JournalIdentity {
        disk_id: Uuid::from_u128(43),
        ..identity()
    };
    let result = Journal::open(
        Box::new(MemoryStorage::from_bytes(good)) as Box<dyn Storage>,
        "journal",
        other,
        &ContentStamp::Unknown,
    );
    let message = result.map(|_| ()).unwrap_err().to_string();
    assert!(
        message.contains("tracking lost") && message.contains("another disk"),
        "{message}"
    );
}

#[test]
fn the_image_size_must_match_the_journal() {
    let (_, journal_storage, tracked) = start();
    drop(tracked.close().unwrap());
    let small = Arc::new(MemoryStorage::from_bytes(vec![0; MIB as usize]));
    let (journal, recovered) = Journal::open(
        Box::new(journal_storage) as Box<dyn Storage>,
        "journal",
        identity(),
        &ContentStamp::Unknown,
    )
    .unwrap();
    let result = TrackedDisk::with_journal(image(&small), journal, recovered);
    assert!(result.unwrap_err().to_string().contains("tracking lost"));
}

/// A store whose reads past `failing_from` fail as a failing disk's do.
struct FailingReads {
    inner: MemoryStorage,
    failing_from: u64,
}

impl Storage for FailingReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.failing_from {
            return Err(std::io::Error::other("input/output error"));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn set_len(&self, size: u64) -> std::io::Result<()> {
        self.inner.set_len(size)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
}

#[test]
fn a_journal_the_disk_fails_to_read_is_an_error_and_a_short_one_is_lost() {
    let (_, journal_storage, tracked) = start();
    drop(tracked.close().unwrap());
    let good = journal_storage.to_bytes();
    // The header, a region page, then the bitmap fail to read: an I/O error each time, not
    // lost tracking, so the journal is not thrown away for a disk that may recover.
    for failing_from in [0, 4096, good.len() as u64 - 1] {
        let failing = FailingReads {
            inner: MemoryStorage::from_bytes(good.clone()),
            failing_from,
        };
        let stored = Journal::stored_identity(&failing, "journal");
        let opened = Journal::open(failing, "journal", identity(), &ContentStamp::Unknown);
        let error = opened.map(|_| ()).unwrap_err();
        assert!(
            !matches!(error, Error::TrackingLost { .. }),
            "reads failing from {failing_from}: {error}"
        );
        assert!(error.to_string().contains("read journal"), "{error}");
        if failing_from == 0 {
            assert!(!matches!(stored, Err(Error::TrackingLost { .. })));
        }
    }
    // A journal cut short has lost its content.
    let short = good[..good.len() - 4096].to_vec();
    let error = Journal::open(
        MemoryStorage::from_bytes(short),
        "journal",
        identity(),
        &ContentStamp::Unknown,
    )
    .map(|_| ())
    .unwrap_err();
    assert!(
        matches!(&error, Error::TrackingLost { reason, .. } if reason.contains("truncated")),
        "{error}"
    );
}

fn open_with(journal: &Arc<MemoryStorage>, found: ContentStamp) -> Result<bool, Error> {
    Journal::open(
        Box::new(journal.clone()) as Box<dyn Storage>,
        "journal",
        identity(),
        &found,
    )
    .map(|(_, recovered)| recovered.after_crash)
}

fn file_stamp(inode: u64, modified: i64) -> ContentStamp {
    ContentStamp::File(blockrep::io::FileStamp {
        device: 7,
        inode,
        size: SIZE,
        modified: (modified, 5),
        changed: (modified, 5),
    })
}

/// A journal created, then closed cleanly with the disk's stamp `closed_with`.
fn closed_journal(closed_with: ContentStamp) -> Arc<MemoryStorage> {
    let journal = Arc::new(MemoryStorage::new());
    let created = Journal::create(
        Box::new(journal.clone()) as Box<dyn Storage>,
        "journal",
        identity(),
    )
    .unwrap();
    let dirty = blockrep::track::DirtyBitmap::new(SIZE.div_ceil(GRANULARITY));
    created.close(&dirty, 1, closed_with).unwrap();
    journal
}

#[test]
fn a_disk_whose_stamp_moved_while_untracked_is_not_vouched_for() {
    let closed_with = ContentStamp::DataWrite(Uuid::from_u128(1));
    let journal = closed_journal(closed_with);
    let clean = journal.to_bytes();

    // The same DataWriteGuid: nobody wrote the disk in between.
    assert!(!open_with(&journal, closed_with).unwrap());
    // Another writer stamped a new one before its first write (qemu-io does), or an older
    // copy of the disk (an older GUID) was put back.
    let journal = Arc::new(MemoryStorage::from_bytes(clean.clone()));
    let error = open_with(&journal, ContentStamp::DataWrite(Uuid::from_u128(2))).unwrap_err();
    assert!(
        matches!(&error, Error::TrackingLost { reason, .. } if reason.contains("DataWriteGuid") && reason.contains("another program")),
        "{error}"
    );
    // A raw file in its place is not the disk tracked.
    let journal = Arc::new(MemoryStorage::from_bytes(clean));
    let error = open_with(&journal, file_stamp(1, 1)).unwrap_err();
    assert!(
        matches!(&error, Error::TrackingLost { reason, .. } if reason.contains("not the one tracked")),
        "{error}"
    );
}

#[test]
fn a_raw_disk_is_compared_by_times_after_a_clean_stop_and_by_identity_after_a_crash() {
    let journal = closed_journal(file_stamp(10, 100));
    let clean = journal.to_bytes();
    // Written since (its times moved): lost, even though it is the same file.
    let written = Arc::new(MemoryStorage::from_bytes(clean.clone()));
    let error = open_with(&written, file_stamp(10, 101)).unwrap_err();
    assert!(error.to_string().contains("modified 100."), "{error}");

    // Opened again as it was: tracking goes on, and the session records the file as it is.
    let (reopened, _) = Journal::open(
        Box::new(journal.clone()) as Box<dyn Storage>,
        "journal",
        identity(),
        &file_stamp(10, 100),
    )
    .unwrap();
    reopened.record_stamp(file_stamp(10, 100)).unwrap();
    drop(reopened); // a crash: the journal stays active
    // blockrep's own writes before the crash moved the times: still vouched for...
    let crashed = journal.to_bytes();
    assert!(
        open_with(
            &Arc::new(MemoryStorage::from_bytes(crashed.clone())),
            file_stamp(10, 150)
        )
        .unwrap()
    );
    // ...but another file in its place (a restored copy has another inode) is not.
    let error = open_with(
        &Arc::new(MemoryStorage::from_bytes(crashed)),
        file_stamp(11, 100),
    )
    .unwrap_err();
    assert!(error.to_string().contains("inode 10"), "{error}");
}

#[test]
fn a_version_1_journal_cannot_vouch_for_a_disk_it_has_no_stamp_of() {
    let journal = closed_journal(ContentStamp::Unknown);
    // The header as version 1 wrote it: the same fields, version 1, no stamp.
    let mut bytes = journal.to_bytes();
    bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
    let checksum = crc32c::crc32c(&bytes[..4092]);
    bytes[4092..4096].copy_from_slice(&checksum.to_le_bytes());
    let error = open_with(
        &Arc::new(MemoryStorage::from_bytes(bytes)),
        ContentStamp::Unknown,
    )
    .unwrap_err();
    assert!(
        matches!(&error, Error::TrackingLost { reason, .. } if reason.contains("version 1")),
        "{error}"
    );
}

#[test]
fn a_crafted_journal_header_is_refused_not_divided_by() {
    let (_, journal_storage, tracked) = start();
    drop(tracked.close().unwrap());
    for (at, value, named) in [
        (40, 0u32, "granularity 0"),
        (40, 3000, "granularity 3000"),
        (44, 0, "region size 0"),
        (44, 4096, "region size 4096"),
    ] {
        let mut bytes = journal_storage.to_bytes();
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let checksum = crc32c::crc32c(&bytes[..4092]);
        bytes[4092..4096].copy_from_slice(&checksum.to_le_bytes());
        let storage = MemoryStorage::from_bytes(bytes);
        let error = Journal::stored_identity(&storage, "journal").unwrap_err();
        assert!(
            matches!(&error, Error::TrackingLost { reason, .. } if reason.contains(named)),
            "{error}"
        );
    }
}
