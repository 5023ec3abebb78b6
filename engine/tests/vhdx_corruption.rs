//! Damaged files (truncated, bit-flipped, garbage) give a clear error, never a panic, and never
//! an unbounded allocation. The property test is the parser's fuzz target, run for a bounded
//! number of cases in the suite.

mod common;

use blockrep::Error;
use blockrep::image::vhdx::check;
use blockrep::image::{Access, BlockImage, VhdxImage};
use blockrep::io::{MemoryStorage, Storage};
use common::*;
use proptest::prelude::*;
use std::sync::OnceLock;

const MIB: u64 = 1 << 20;

/// A small valid image with data in a few blocks, made once.
fn valid_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let (storage, mut image) = create(&options(6 * MIB + 1024, MIB, 512, false));
        image.write_at(&pattern(1, 300_000), 100).unwrap();
        image.write_at(&pattern(2, 70_000), 4 * MIB - 1000).unwrap();
        image.close().unwrap();
        storage.to_bytes()
    })
}

/// Opens, reads and checks `bytes` however it can; any outcome but a panic is fine.
fn exercise(bytes: Vec<u8>) -> Result<(), Error> {
    let storage = MemoryStorage::from_bytes(bytes);
    let report = check(&storage, "damaged.vhdx");
    let image = VhdxImage::open(storage, "damaged.vhdx", Access::ReadOnly)?;
    let mut buffer = vec![0u8; 256 << 10];
    for range in image.allocated_ranges()? {
        let mut position = range.start;
        while position < range.end {
            let length = (range.end - position).min(buffer.len() as u64) as usize;
            image.read_at(&mut buffer[..length], position)?;
            position += length as u64;
        }
    }
    let _ = image.info();
    report.map(|_| ())
}

#[derive(Debug, Clone)]
enum Damage {
    Truncate(u64),
    FlipBits(Vec<(u64, u8)>),
    Garbage { offset: u64, bytes: Vec<u8> },
}

fn damage() -> impl Strategy<Value = Damage> {
    let structures = 0..5 * MIB; // identifier, headers, region tables, log, metadata, BAT
    prop_oneof![
        (0..8 * MIB).prop_map(Damage::Truncate),
        prop::collection::vec((structures.clone(), 0u8..8), 1..16).prop_map(Damage::FlipBits),
        (structures, prop::collection::vec(any::<u8>(), 1..600))
            .prop_map(|(offset, bytes)| Damage::Garbage { offset, bytes }),
    ]
}

fn apply(damage: &Damage) -> Vec<u8> {
    let mut bytes = valid_image().to_vec();
    match damage {
        Damage::Truncate(length) => bytes.truncate(*length as usize),
        Damage::FlipBits(flips) => {
            for &(offset, bit) in flips {
                if let Some(byte) = bytes.get_mut(offset as usize) {
                    *byte ^= 1 << bit;
                }
            }
        }
        Damage::Garbage {
            offset,
            bytes: garbage,
        } => {
            for (index, value) in garbage.iter().enumerate() {
                if let Some(byte) = bytes.get_mut(*offset as usize + index) {
                    *byte = *value;
                }
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn damaged_images_never_panic(damage in damage()) {
        let _ = exercise(apply(&damage));
    }

    #[test]
    fn garbage_files_are_not_taken_for_vhdx(bytes in prop::collection::vec(any::<u8>(), 0..200_000)) {
        let result = exercise(bytes);
        prop_assert!(matches!(result, Err(Error::NotVhdx { .. })), "{result:?}");
    }
}

#[test]
fn every_single_bit_flip_in_the_structures_is_caught_or_harmless() {
    // Flipping any bit of the headers, region tables or metadata items either is detected
    // (checksums, validation) or leaves the data readable exactly as before.
    let original = valid_image();
    let expected = {
        let image = VhdxImage::open(
            MemoryStorage::from_bytes(original.to_vec()),
            "x",
            Access::ReadOnly,
        )
        .unwrap();
        read_all(&image)
    };
    let interesting = [
        (64 << 10, 80),
        (128 << 10, 80),
        (192 << 10, 80),
        (2 * MIB + (64 << 10), 40),
    ];
    for (start, length) in interesting {
        for offset in start..start + length {
            for bit in 0..8 {
                let mut bytes = original.to_vec();
                bytes[offset as usize] ^= 1 << bit;
                let storage = MemoryStorage::from_bytes(bytes);
                if let Ok(image) = VhdxImage::open(storage, "x", Access::ReadOnly)
                    && image.virtual_size() == expected.len() as u64
                {
                    assert!(
                        read_all(&image) == expected,
                        "flip at {offset} bit {bit} changed the data silently"
                    );
                }
            }
        }
    }
}

#[test]
fn a_truncated_image_is_reported_as_truncated() {
    let mut bytes = valid_image().to_vec();
    bytes.truncate(bytes.len() - MIB as usize);
    let message = VhdxImage::open(
        MemoryStorage::from_bytes(bytes),
        "cut.vhdx",
        Access::ReadOnly,
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("cut.vhdx") && message.contains("past the end of the file"),
        "{message}"
    );
}

#[test]
fn an_empty_file_is_not_a_vhdx_image() {
    let error = VhdxImage::open(MemoryStorage::new(), "empty.vhdx", Access::ReadOnly).unwrap_err();
    assert!(matches!(error, Error::NotVhdx { .. }), "{error}");
}

#[test]
fn both_headers_damaged_is_a_clear_error() {
    let mut bytes = valid_image().to_vec();
    bytes[(64 << 10) + 20] ^= 1;
    bytes[(128 << 10) + 20] ^= 1;
    let message = VhdxImage::open(MemoryStorage::from_bytes(bytes), "x.vhdx", Access::ReadOnly)
        .unwrap_err()
        .to_string();
    assert!(message.contains("no valid header"), "{message}");
}

#[test]
fn a_differencing_image_is_refused_clearly() {
    let (storage, image) = create(&options(4 * MIB, MIB, 512, false));
    image.close().unwrap();
    // Set HasParent in the File Parameters item (metadata region at 2 MiB, items at +64 KiB).
    let flags_at = 2 * MIB + (64 << 10) + 4;
    storage.write_at(&2u32.to_le_bytes(), flags_at).unwrap();
    let message = VhdxImage::open(storage.clone(), "child.vhdx", Access::ReadOnly)
        .unwrap_err()
        .to_string();
    assert!(message.contains("differencing"), "{message}");
}

#[test]
fn blocks_sharing_file_space_are_found_by_check_and_refused_by_open() {
    let (storage, mut image) = create(&options(4 * MIB, MIB, 512, false));
    image.write_at(&[1; 512], 0).unwrap();
    image.write_at(&[2; 512], MIB).unwrap();
    image.close().unwrap();
    // Point block 1's BAT entry (BAT at 3 MiB) at block 0's space.
    let mut entry = [0u8; 8];
    storage.read_at(&mut entry, 3 * MIB).unwrap();
    storage.write_at(&entry, 3 * MIB + 8).unwrap();
    let report = check(&*storage, "x.vhdx").unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("blocks 0 and 1 overlap")),
        "{:?}",
        report.problems
    );
    assert!(VhdxImage::open(storage.clone(), "x.vhdx", Access::ReadOnly).is_err());
}
