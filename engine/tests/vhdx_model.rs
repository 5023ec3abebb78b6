//! A VHDX image behaves like a plain byte array: any sequence of writes, zeroings, flushes and
//! reopenings gives the same bytes as the same sequence applied to a `Vec<u8>`.

mod common;

use blockrep::image::vhdx::check;
use blockrep::image::{Access, BlockImage};
use common::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

/// What a write carries: zero-heavy data is where allocation decisions go wrong.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Random,
    Zeros,
    /// Zeros but for one byte near the end.
    MostlyZeros,
}

#[derive(Debug, Clone)]
enum Operation {
    Write {
        offset: u64,
        length: u64,
        seed: u64,
        fill: Fill,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    Flush,
    Reopen,
}

/// Offsets near block boundaries are where the bugs live, so most land there.
fn offset_within(size: u64, block: u64) -> impl Strategy<Value = u64> {
    let blocks = size.div_ceil(block);
    prop_oneof![
        (0..blocks, -4096i64..4096).prop_map(move |(index, delta)| {
            ((index * block) as i64 + delta).clamp(0, size as i64 - 1) as u64
        }),
        0..size,
    ]
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![6 => Just(Fill::Random), 2 => Just(Fill::Zeros), 2 => Just(Fill::MostlyZeros)]
}

fn operations(size: u64, block: u64) -> impl Strategy<Value = Vec<Operation>> {
    let operation = prop_oneof![
        6 => (offset_within(size, block), 1..(block * 2 + 5000), any::<u64>(), fill())
            .prop_map(|(offset, length, seed, fill)| Operation::Write { offset, length, seed, fill }),
        2 => (offset_within(size, block), 1..(block * 3))
            .prop_map(|(offset, length)| Operation::Zero { offset, length }),
        1 => Just(Operation::Flush),
        1 => Just(Operation::Reopen),
    ];
    prop::collection::vec(operation, 1..24)
}

fn geometry() -> impl Strategy<Value = (u64, u64, u64, bool)> {
    // (virtual size, block size, logical sector, fixed); sizes deliberately not block multiples.
    (
        prop_oneof![Just(MIB), Just(2 * MIB)],
        prop_oneof![Just(512u64), Just(4096u64)],
        1u64..6,
        0u64..64,
        any::<bool>(),
    )
        .prop_map(|(block, sector, blocks, sectors, fixed)| {
            (blocks * block + sectors * sector, block, sector, fixed)
        })
}

fn run(size: u64, block: u64, sector: u64, fixed: bool, script: Vec<Operation>) {
    let (storage, mut image) = create(&options(size, block, sector, fixed));
    let mut model = vec![0u8; size as usize];
    for operation in script {
        match operation {
            Operation::Write {
                offset,
                length,
                seed,
                fill,
            } => {
                let length = length.min(size - offset);
                let data = match fill {
                    Fill::Random => pattern(seed, length as usize),
                    Fill::Zeros => vec![0; length as usize],
                    Fill::MostlyZeros => {
                        let mut data = vec![0; length as usize];
                        data[(length - 1 - seed % length.min(3000)) as usize] = 0x5A;
                        data
                    }
                };
                image.write_at(&data, offset).unwrap();
                model[offset as usize..(offset + length) as usize].copy_from_slice(&data);
            }
            Operation::Zero { offset, length } => {
                let length = length.min(size - offset);
                image.zero_range(offset, length).unwrap();
                model[offset as usize..(offset + length) as usize].fill(0);
            }
            Operation::Flush => image.flush().unwrap(),
            Operation::Reopen => {
                image.close().unwrap();
                image = reopen(&storage, Access::ReadWrite);
            }
        }
        assert!(read_all(&image) == model, "image and model differ");
    }
    image.close().unwrap();
    let report = check(&*storage, "test.vhdx").unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let image = reopen(&storage, Access::ReadOnly);
    assert!(
        read_all(&image) == model,
        "image and model differ after reopening"
    );
    for range in image.allocated_ranges().unwrap() {
        assert!(range.start < range.end && range.end <= size);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_and_zeroings_match_a_byte_array(
        (size, block, sector, fixed) in geometry(),
        script in operations(5 * MIB, MIB),
    ) {
        // Scripts are drawn for a 5 MiB disk and clipped to the drawn one.
        let script = script
            .into_iter()
            .filter(|operation| match operation {
                Operation::Write { offset, .. } | Operation::Zero { offset, .. } => *offset < size,
                _ => true,
            })
            .collect();
        run(size, block, sector, fixed, script);
    }
}

#[test]
fn writing_zeros_to_unallocated_blocks_allocates_nothing() {
    let (storage, mut image) = create(&options(8 * MIB + 512, MIB, 512, false));
    let size_before = storage_size(&storage);
    image
        .write_at(&vec![0u8; (8 * MIB + 512) as usize], 0)
        .unwrap();
    image.flush().unwrap();
    assert!(image.allocated_ranges().unwrap().is_empty());
    assert_eq!(storage_size(&storage), size_before);
}

#[test]
fn payload_blocks_are_allocated_at_1_mib_alignment() {
    let (storage, mut image) = create(&options(64 * MIB, 4 * MIB, 512, false));
    for block in [3u64, 0, 9] {
        image.write_at(b"data", block * 4 * MIB + 4000).unwrap();
    }
    image.close().unwrap();
    let image = reopen(&storage, Access::ReadOnly);
    assert_eq!(image.info().allocated_blocks, 3);
    assert_eq!(storage_size(&storage) % MIB, 0);
    assert!(check(&*storage, "test.vhdx").unwrap().is_clean());
}

#[test]
fn reads_and_writes_past_the_virtual_size_are_refused() {
    let (_storage, mut image) = create(&options(MIB + 512, MIB, 512, false));
    let error = image.write_at(&[1; 1024], MIB).unwrap_err().to_string();
    assert!(error.contains("past the virtual size"), "{error}");
    let mut buffer = [0u8; 2];
    assert!(image.read_at(&mut buffer, MIB + 511).is_err());
}

#[test]
fn a_read_only_image_refuses_writes() {
    let (storage, image) = create(&options(4 * MIB, MIB, 512, false));
    image.close().unwrap();
    let mut image = reopen(&storage, Access::ReadOnly);
    assert!(
        image
            .write_at(b"x", 0)
            .unwrap_err()
            .to_string()
            .contains("read-only")
    );
}

fn storage_size(storage: &SharedMemory) -> u64 {
    use blockrep::io::Storage;
    storage.size().unwrap()
}
