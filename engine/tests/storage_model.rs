//! Every store behaves like a byte array: the io_uring store (with and without O_DIRECT, with
//! writes in flight while later calls arrive) gives the same bytes as the portable one.

use blockrep::io::{FileStorage, Storage, UringOptions, UringStorage};
use proptest::prelude::*;
use std::fs::OpenOptions;

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Call {
    Write {
        offset: u64,
        length: usize,
        seed: u8,
    },
    Read {
        offset: u64,
        length: usize,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    Grow {
        size: u64,
    },
    Flush,
}

fn aligned_or_not() -> impl Strategy<Value = u64> {
    prop_oneof![(0..8 * MIB / 4096).prop_map(|page| page * 4096), 0..8 * MIB]
}

fn calls() -> impl Strategy<Value = Vec<Call>> {
    let call = prop_oneof![
        6 => (aligned_or_not(), prop_oneof![Just(4096usize), Just(MIB as usize), 1usize..(3 * MIB as usize)], any::<u8>())
            .prop_map(|(offset, length, seed)| Call::Write { offset, length, seed }),
        3 => (aligned_or_not(), 1usize..(2 * MIB as usize)).prop_map(|(offset, length)| Call::Read { offset, length }),
        1 => (aligned_or_not(), 1..MIB).prop_map(|(offset, length)| Call::Zero { offset, length }),
        1 => (0..12 * MIB).prop_map(|size| Call::Grow { size }),
        1 => Just(Call::Flush),
    ];
    prop::collection::vec(call, 1..40)
}

fn fill(seed: u8, length: usize) -> Vec<u8> {
    (0..length)
        .map(|index| seed.wrapping_add((index / 512) as u8) | 1)
        .collect()
}

fn run(calls: &[Call], direct: bool, queue_depth: u16) {
    let directory = tempfile::tempdir().unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(directory.path().join("f"))
        .unwrap();
    let options = UringOptions {
        queue_depth,
        buffer_size: 256 << 10,
        direct,
    };
    let storage = UringStorage::from_file(file, options).expect("io_uring");
    let mut model: Vec<u8> = Vec::new();
    for call in calls {
        match *call {
            Call::Write {
                offset,
                length,
                seed,
            } => {
                let data = fill(seed, length);
                storage.write_at(&data, offset).unwrap();
                let end = offset as usize + length;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].copy_from_slice(&data);
            }
            Call::Read { offset, length } => {
                let mut buffer = vec![0u8; length];
                let result = storage.read_at(&mut buffer, offset);
                let end = offset as usize + length;
                if end <= model.len() {
                    result.unwrap();
                    assert!(
                        buffer == model[offset as usize..end],
                        "read at {offset} differs"
                    );
                } else {
                    assert!(result.is_err(), "read past the end succeeded");
                }
            }
            Call::Zero { offset, length } => {
                if offset + length <= model.len() as u64 {
                    storage.write_zeroes(offset, length).unwrap();
                    model[offset as usize..(offset + length) as usize].fill(0);
                }
            }
            Call::Grow { size } => {
                if size > model.len() as u64 {
                    storage.set_len(size).unwrap();
                    model.resize(size as usize, 0);
                }
            }
            Call::Flush => storage.flush().unwrap(),
        }
    }
    storage.flush().unwrap();
    assert_eq!(storage.size().unwrap(), model.len() as u64);
    drop(storage);
    let portable = FileStorage::open(&directory.path().join("f"), false).unwrap();
    let mut on_disk = vec![0u8; model.len()];
    portable.read_at(&mut on_disk, 0).unwrap();
    assert!(on_disk == model, "file differs from the model");
}

fn uring_available() -> bool {
    match io_uring_probe() {
        Ok(()) => true,
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "io_uring unavailable under CI: {error}"
            );
            eprintln!("SKIPPED: io_uring is not available here: {error}");
            false
        }
    }
}

fn io_uring_probe() -> std::io::Result<()> {
    let file = tempfile::tempfile()?;
    UringStorage::from_file(file, UringOptions::default()).map(drop)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn the_io_uring_store_matches_a_byte_array(calls in calls(), direct in any::<bool>(), depth in prop_oneof![Just(1u16), Just(4u16), Just(32u16)]) {
        if uring_available() {
            run(&calls, direct, depth);
        }
    }
}

#[test]
fn a_write_that_fails_in_flight_fails_the_next_flush() {
    if !uring_available() {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("f");
    std::fs::write(&path, b"x").unwrap();
    // Opened read-only: the kernel refuses each write when it runs, after write_at returned.
    let storage = UringStorage::open(&path, false, UringOptions::default()).unwrap();
    let _ = storage.write_at(&[1u8; 8192], 0);
    let error = storage.flush().unwrap_err();
    assert!(
        error
            .to_string()
            .contains("write of 8192 bytes at 0 failed"),
        "{error}"
    );
    assert!(
        storage.write_at(&[1], 0).is_err(),
        "the failure must stay reported"
    );
}

#[test]
fn direct_writes_are_used_for_aligned_pieces_on_this_filesystem() {
    if !uring_available() {
        return;
    }
    let file = tempfile::tempfile_in(std::env::temp_dir()).unwrap();
    let storage = UringStorage::from_file(
        file,
        UringOptions {
            direct: true,
            ..UringOptions::default()
        },
    )
    .unwrap();
    if !storage.is_direct() {
        eprintln!(
            "SKIPPED direct_writes_are_used: the temporary directory's filesystem refuses O_DIRECT"
        );
        return;
    }
    storage.write_at(&vec![7u8; 2 << 20], 4096).unwrap();
    storage.write_at(&[9u8; 100], 10).unwrap();
    storage.flush().unwrap();
    let mut buffer = vec![0u8; 4096 + (2 << 20)];
    storage.read_at(&mut buffer, 0).unwrap();
    assert!(buffer[10..110].iter().all(|&b| b == 9));
    assert!(buffer[4096..].iter().all(|&b| b == 7));
}
