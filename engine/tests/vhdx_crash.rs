//! A crash at any point (between writes, between the steps of a flush, in the middle of a header
//! update) leaves an image that opens, passes the check, and holds every byte that was flushed
//! and not written since.

mod common;

use blockrep::image::vhdx::check;
use blockrep::image::{Access, BlockImage, VhdxImage};
use blockrep::io::{MemoryStorage, Storage};
use common::*;
use proptest::prelude::*;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 6 * MIB + 4096;

/// A store whose flushes start failing after a set number, which is where the crash happens.
struct CrashingStorage {
    inner: Arc<MemoryStorage>,
    flushes_left: AtomicUsize,
}

impl Storage for CrashingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        let left = self.flushes_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::other("injected crash"));
        }
        self.flushes_left.store(left - 1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn set_len(&self, size: u64) -> io::Result<()> {
        self.inner.set_len(size)
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
}

#[derive(Debug, Clone)]
enum Step {
    Write { offset: u64, length: u64, seed: u64 },
    Zero { offset: u64, length: u64 },
    Flush,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        5 => (0..SIZE, 1..(2 * MIB), any::<u64>())
            .prop_map(|(offset, length, seed)| Step::Write { offset, length, seed }),
        1 => (0..SIZE, 1..(2 * MIB)).prop_map(|(offset, length)| Step::Zero { offset, length }),
        2 => Just(Step::Flush),
    ];
    prop::collection::vec(step, 1..16)
}

fn mark(touched: &mut [bool], range: Range<u64>) {
    touched[range.start as usize..range.end as usize].fill(true);
}

/// Runs `script` until the store's flushes run out, crashes keeping the unflushed changes
/// `survivors` picks, and checks what is left.
fn crash_and_check(script: &[Step], flush_budget: usize, survivors: &[bool], fixed: bool) {
    let memory = Arc::new(MemoryStorage::new());
    let (storage, image) = {
        let storage = Arc::new(CrashingStorage {
            inner: memory.clone(),
            flushes_left: AtomicUsize::new(usize::MAX),
        });
        let image = VhdxImage::create(
            storage.clone(),
            "crash.vhdx",
            &options(SIZE, MIB, 512, fixed),
        )
        .unwrap();
        (storage, image)
    };
    let mut image = image;
    storage.flushes_left.store(flush_budget, Ordering::SeqCst);
    let mut current = vec![0u8; SIZE as usize];
    let mut flushed = current.clone();
    let mut touched = vec![false; SIZE as usize];
    for step in script {
        let outcome = match *step {
            Step::Write {
                offset,
                length,
                seed,
            } => {
                let length = length.min(SIZE - offset);
                let data = pattern(seed, length as usize);
                mark(&mut touched, offset..offset + length);
                current[offset as usize..(offset + length) as usize].copy_from_slice(&data);
                image.write_at(&data, offset)
            }
            Step::Zero { offset, length } => {
                let length = length.min(SIZE - offset);
                mark(&mut touched, offset..offset + length);
                current[offset as usize..(offset + length) as usize].fill(0);
                image.zero_range(offset, length)
            }
            Step::Flush => image.flush().map(|()| {
                flushed.clone_from(&current);
                touched.fill(false);
            }),
        };
        if outcome.is_err() {
            break;
        }
    }
    // The process dies: nothing more reaches the store, not even the flush a drop would do.
    std::mem::forget(image);
    memory.crash(|index| {
        survivors
            .get(index % survivors.len().max(1))
            .copied()
            .unwrap_or(false)
    });

    let report = check(&*memory, "crash.vhdx").unwrap();
    assert!(report.is_clean(), "after the crash: {:?}", report.problems);
    let image = VhdxImage::open(memory.clone(), "crash.vhdx", Access::ReadWrite).unwrap();
    let after = read_all(&image);
    for (position, (&byte, &expected)) in after.iter().zip(&flushed).enumerate() {
        if !touched[position] {
            assert_eq!(byte, expected, "flushed byte at {position} lost");
        }
    }
    image.close().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_crash_anywhere_loses_no_flushed_data(
        script in steps(),
        flush_budget in 0usize..12,
        survivors in prop::collection::vec(any::<bool>(), 1..40),
        fixed in prop::bool::weighted(0.2),
    ) {
        crash_and_check(&script, flush_budget, &survivors, fixed);
    }
}

#[test]
fn a_crash_before_the_bat_is_published_keeps_the_old_block_contents() {
    // Every flush after the payload's one fails: the BAT update is lost; the block is not.
    let script = [
        Step::Write {
            offset: 0,
            length: MIB,
            seed: 1,
        },
        Step::Flush,
        Step::Write {
            offset: 2 * MIB,
            length: 100,
            seed: 2,
        },
        Step::Flush,
    ];
    for budget in 0..8 {
        for survivors in [vec![false], vec![true], vec![true, false]] {
            crash_and_check(&script, budget, &survivors, false);
        }
    }
}

#[test]
fn a_torn_header_update_leaves_the_previous_header_current() {
    let (storage, mut image) = create(&options(4 * MIB, MIB, 512, false));
    image.write_at(b"kept", 0).unwrap();
    image.close().unwrap();
    // The next session's header update is torn: the slot it rewrites holds garbage.
    let first = {
        let mut bytes = vec![0u8; 4096];
        storage.read_at(&mut bytes, 64 << 10).unwrap();
        blockrep::image::vhdx::Header::decode(&bytes).unwrap()
    };
    let second = {
        let mut bytes = vec![0u8; 4096];
        storage.read_at(&mut bytes, 128 << 10).unwrap();
        blockrep::image::vhdx::Header::decode(&bytes).unwrap()
    };
    let older = if first.sequence < second.sequence {
        64u64 << 10
    } else {
        128 << 10
    };
    storage.write_at(&[0xEE; 2048], older).unwrap();
    let report = check(&*storage, "test.vhdx").unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(
        report.notes.iter().any(|note| note.contains("not valid")),
        "{:?}",
        report.notes
    );
    let mut image = reopen(&storage, Access::ReadWrite);
    let mut word = [0u8; 4];
    image.read_at(&mut word, 0).unwrap();
    assert_eq!(&word, b"kept");
    // Writing again rewrites the torn slot, and both headers are valid afterwards.
    image.write_at(b"more", 8).unwrap();
    image.close().unwrap();
    assert!(check(&*storage, "test.vhdx").unwrap().notes.is_empty());
}
