//! Tracked changes, cut into deltas and applied in order to a copy of the starting disk,
//! reproduce the source byte for byte; damaged deltas are refused and change nothing.

mod common;

use blockrep::delta::{DeltaHeader, TargetState, apply_delta, encode_delta, verify_delta};
use blockrep::image::{Access, BlockImage, RawImage};
use blockrep::io::MemoryStorage;
use blockrep::track::{Cut, TrackedDisk};
use common::*;
use proptest::prelude::*;
use std::io::Cursor;
use std::sync::Arc;
use uuid::Uuid;

const MIB: u64 = 1 << 20;

fn header(cut: &Cut, sequence: u64, disk_id: Uuid) -> DeltaHeader {
    DeltaHeader {
        disk_id,
        virtual_size: cut.virtual_size,
        block_size: cut.granularity as u32,
        source_generation: cut.generation,
        sequence,
        recovery_point: false,
        full: false,
    }
}

fn delta_of<I: BlockImage>(
    disk: &TrackedDisk<I>,
    cut: &Cut,
    sequence: u64,
    disk_id: Uuid,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode_delta(
        &*disk.image(),
        &cut.extents(),
        &header(cut, sequence, disk_id),
        &mut bytes,
        "delta",
    )
    .unwrap();
    bytes
}

fn raw(bytes: Vec<u8>) -> RawImage<MemoryStorage> {
    RawImage::open(MemoryStorage::from_bytes(bytes), "raw", Access::ReadWrite).unwrap()
}

#[derive(Debug, Clone)]
enum Step {
    Write {
        offset: u64,
        length: u64,
        seed: u64,
        zeros: bool,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    Cut,
}

fn steps(size: u64) -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        5 => (0..size, 1..(MIB + 70_000), any::<u64>(), prop::bool::weighted(0.2))
            .prop_map(|(offset, length, seed, zeros)| Step::Write { offset, length, seed, zeros }),
        1 => (0..size, 1..(2 * MIB)).prop_map(|(offset, length)| Step::Zero { offset, length }),
        2 => Just(Step::Cut),
    ];
    prop::collection::vec(step, 1..30)
}

fn replay(steps: &[Step], size: u64, granularity: u64, vhdx_target: bool) {
    let start = pattern(99, size as usize);
    let disk = TrackedDisk::new(raw(start.clone()), granularity).unwrap();
    let mut deltas = Vec::new();
    for step in steps.iter().chain(std::iter::once(&Step::Cut)) {
        match *step {
            Step::Write {
                offset,
                length,
                seed,
                zeros,
            } => {
                let length = length.min(size - offset);
                let data = if zeros {
                    vec![0; length as usize]
                } else {
                    pattern(seed, length as usize)
                };
                disk.write_at(&data, offset).unwrap();
            }
            Step::Zero { offset, length } => {
                disk.zero_range(offset, length.min(size - offset)).unwrap()
            }
            Step::Cut => {
                let cut = disk.cut();
                deltas.push(delta_of(&disk, &cut, deltas.len() as u64 + 1, Uuid::nil()));
            }
        }
    }
    let source = read_all(&*disk.image());
    let mut target: Box<dyn BlockImage> = if vhdx_target {
        let (_storage, mut image) = create(&options(size, MIB, 512, false));
        image.write_at(&start, 0).unwrap();
        Box::new(image)
    } else {
        Box::new(raw(start))
    };
    for delta in &deltas {
        apply_delta(
            Cursor::new(delta),
            "delta",
            &mut *target,
            TargetState::default(),
        )
        .unwrap();
    }
    assert!(
        read_all(&*target) == source,
        "replayed deltas differ from the source"
    );
}

/// An odd disk size, so the last tracked block is short.
const ODD_SIZE: u64 = 5 * MIB - 512 * 3;

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn applying_the_cut_deltas_in_order_reproduces_the_source(
        steps in steps(ODD_SIZE),
        granularity in prop_oneof![Just(4096u64), Just(64 << 10), Just(MIB)],
        vhdx_target in any::<bool>(),
    ) {
        replay(&steps, ODD_SIZE, granularity, vhdx_target);
    }
}

#[test]
fn no_write_is_lost_when_cuts_race_with_writers() {
    let size = 8 * MIB;
    let start = vec![0u8; size as usize];
    let disk = Arc::new(TrackedDisk::new(raw(start.clone()), 4096).unwrap());
    let writers: Vec<_> = (0..3u64)
        .map(|writer| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                let mut state = writer * 7919 + 1;
                for round in 0..3000u64 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let offset = (state >> 20) % (size - 9000);
                    let length = 1 + (state >> 7) % 9000;
                    let data = vec![(writer * 64 + round % 61) as u8 + 1; length as usize];
                    disk.write_at(&data, offset).unwrap();
                }
            })
        })
        .collect();
    let mut deltas = Vec::new();
    while writers.iter().any(|writer| !writer.is_finished()) {
        let cut = disk.cut();
        deltas.push(delta_of(&disk, &cut, deltas.len() as u64 + 1, Uuid::nil()));
    }
    for writer in writers {
        writer.join().unwrap();
    }
    let cut = disk.cut();
    deltas.push(delta_of(&disk, &cut, deltas.len() as u64 + 1, Uuid::nil()));
    assert!(deltas.len() > 2, "the cuts did not race with the writers");
    let mut target = raw(start);
    for delta in &deltas {
        apply_delta(
            Cursor::new(delta),
            "delta",
            &mut target,
            TargetState::default(),
        )
        .unwrap();
    }
    assert!(
        read_all(&target) == read_all(&*disk.image()),
        "a write was lost at a cut"
    );
}

fn sample_delta() -> (Vec<u8>, Vec<u8>) {
    let size = 3 * MIB;
    let start = vec![0u8; size as usize];
    let disk = TrackedDisk::new(raw(start.clone()), 64 << 10).unwrap();
    disk.write_at(&pattern(1, 200_000), 1000).unwrap(); // random: stored raw
    disk.write_at(&b"text compresses well ".repeat(10_000), MIB)
        .unwrap(); // lz4
    disk.write_at(&vec![0u8; 70_000], 2 * MIB + 5).unwrap(); // zero extents
    let cut = disk.cut();
    (delta_of(&disk, &cut, 1, Uuid::from_u128(7)), start)
}

#[test]
fn a_flipped_bit_anywhere_is_refused_and_leaves_the_target_unchanged() {
    let (delta, start) = sample_delta();
    let summary = verify_delta(Cursor::new(&delta), "delta").unwrap();
    assert!(
        summary.data_records >= 2 && summary.zero_records >= 1,
        "{summary:?}"
    );
    assert!(
        summary.stored_bytes < summary.data_bytes,
        "nothing was compressed"
    );
    let step = (delta.len() / 3000).max(1);
    for position in (0..delta.len()).step_by(step).chain([delta.len() - 1]) {
        let mut damaged = delta.clone();
        damaged[position] ^= 1 << (position % 8);
        assert!(
            verify_delta(Cursor::new(&damaged), "delta").is_err(),
            "flip at {position} not caught"
        );
        let mut target = raw(start.clone());
        assert!(
            apply_delta(
                Cursor::new(&damaged),
                "delta",
                &mut target,
                TargetState::default()
            )
            .is_err()
        );
        assert!(
            read_all(&target) == start,
            "a refused delta changed the target (flip at {position})"
        );
    }
}

#[test]
fn a_truncated_delta_is_refused() {
    let (delta, _) = sample_delta();
    for length in [
        0,
        10,
        72,
        100,
        delta.len() / 2,
        delta.len() - 32,
        delta.len() - 1,
    ] {
        let error = verify_delta(Cursor::new(&delta[..length]), "delta")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("truncated") || error.contains("signature"),
            "{length}: {error}"
        );
    }
    let mut longer = delta.clone();
    longer.push(0);
    assert!(
        verify_delta(Cursor::new(&longer), "delta")
            .unwrap_err()
            .to_string()
            .contains("follow the end")
    );
}

#[test]
fn applying_twice_gives_the_same_bytes_and_wrong_targets_are_refused() {
    let (delta, start) = sample_delta();
    let mut target = raw(start.clone());
    apply_delta(
        Cursor::new(&delta),
        "delta",
        &mut target,
        TargetState {
            disk_id: Some(Uuid::from_u128(7)),
            last_sequence: None,
        },
    )
    .unwrap();
    let once = read_all(&target);
    apply_delta(
        Cursor::new(&delta),
        "delta",
        &mut target,
        TargetState {
            disk_id: Some(Uuid::from_u128(7)),
            last_sequence: None,
        },
    )
    .unwrap();
    assert!(read_all(&target) == once);
    let other_disk = apply_delta(
        Cursor::new(&delta),
        "delta",
        &mut target,
        TargetState {
            disk_id: Some(Uuid::from_u128(8)),
            last_sequence: None,
        },
    );
    assert!(other_disk.unwrap_err().to_string().contains("is for disk"));
    let mut smaller = raw(vec![0; MIB as usize]);
    let wrong_size = apply_delta(
        Cursor::new(&delta),
        "delta",
        &mut smaller,
        TargetState::default(),
    );
    assert!(
        wrong_size
            .unwrap_err()
            .to_string()
            .contains("bytes, the target has")
    );
}

#[test]
fn a_delta_of_an_unknown_version_is_refused_by_name() {
    let (mut delta, _) = sample_delta();
    delta[8] = 9;
    let error = verify_delta(Cursor::new(&delta), "delta")
        .unwrap_err()
        .to_string();
    assert!(error.contains("version 9 is not supported"), "{error}");
}

#[test]
fn a_delta_that_does_not_follow_the_last_applied_one_is_refused() {
    let (delta, start) = sample_delta(); // sequence 1
    let mut target = raw(start);
    let after = |last| TargetState {
        disk_id: None,
        last_sequence: Some(last),
    };
    apply_delta(Cursor::new(&delta), "delta", &mut target, after(0)).unwrap();
    let error = apply_delta(Cursor::new(&delta), "delta", &mut target, after(1)).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("does not follow the last applied sequence 1"),
        "{error}"
    );
}
