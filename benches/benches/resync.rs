//! Resynchronization's hashing of a disk beside its baseline in the same run: plain reading of
//! the same image in the same 4 MiB pieces. Their ratio says whether hashing ever limits the read.

use blockrep::image::{Access, BlockImage, RawImage};
use blockrep::io::{FileStorage, Storage};
use blockrep::resync::BlockHashes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const DISK: u64 = 256 << 20;
const PIECE: usize = 4 << 20;

/// A fully allocated 256 MiB raw image of varied bytes in a tmpfs file (in memory, read through
/// `pread` like a disk in the page cache), or in the temporary directory where there is no tmpfs.
fn image(directory: &tempfile::TempDir) -> RawImage<FileStorage> {
    let path = directory.path().join("resync.raw");
    let storage = FileStorage::create_new(&path).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut piece = vec![0u8; PIECE];
    for offset in (0..DISK).step_by(PIECE) {
        for word in piece.chunks_exact_mut(8) {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            word.copy_from_slice(&state.to_le_bytes());
        }
        storage.write_at(&piece, offset).unwrap();
    }
    RawImage::open(storage, "resync.raw", Access::ReadOnly).unwrap()
}

fn hashing_against_reading(criterion: &mut Criterion) {
    let directory = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let image = image(&directory);
    let mut group = criterion.benchmark_group("resync_256m_tmpfs");
    group.throughput(Throughput::Bytes(DISK));
    group.sample_size(10);
    group.bench_function("block_hashes_compute", |bench| {
        bench.iter(|| BlockHashes::compute(&image, black_box(0x5EED), &|_| {}).unwrap())
    });
    let mut buffer = vec![0u8; PIECE];
    group.bench_function("baseline_read_4m_pieces", |bench| {
        bench.iter(|| {
            for offset in (0..image.virtual_size()).step_by(PIECE) {
                image.read_at(&mut buffer, offset).unwrap();
                black_box(&buffer);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, hashing_against_reading);
criterion_main!(benches);
