//! Change tracking's cost on the write path, and delta encode/decode throughput, each beside a
//! baseline measured in the same run.

use blockrep::delta::{DeltaHeader, encode_delta, verify_delta};
use blockrep::image::{Access, BlockImage, RawImage};
use blockrep::io::MemoryStorage;
use blockrep::track::TrackedDisk;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const DISK: usize = 256 << 20;
const WRITES: usize = 4096;

fn image() -> RawImage<MemoryStorage> {
    RawImage::open(
        MemoryStorage::from_bytes(vec![0; DISK]),
        "bench",
        Access::ReadWrite,
    )
    .unwrap()
}

/// Offsets of 4 KiB random writes, the same for both sides.
fn offsets() -> Vec<u64> {
    let mut state = 0x853C_49E6_748F_EA9Bu64;
    (0..WRITES)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % (DISK as u64 / 4096)) * 4096
        })
        .collect()
}

fn tracking_overhead(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("random_4k_writes");
    group.throughput(Throughput::Bytes((WRITES * 4096) as u64));
    let offsets = offsets();
    let block = vec![0xC5u8; 4096];
    let mut bare = image();
    group.bench_function("baseline_bare_image", |bench| {
        bench.iter(|| {
            for &offset in &offsets {
                bare.write_at(black_box(&block), offset).unwrap();
            }
        })
    });
    let tracked = TrackedDisk::new(image(), 64 << 10).unwrap();
    group.bench_function("tracked_disk", |bench| {
        bench.iter(|| {
            for &offset in &offsets {
                tracked.write_at(black_box(&block), offset).unwrap();
            }
        })
    });
    group.finish();
}

/// A disk-like 64 MiB: per 1 MiB, 30% zeros, 30% text, 40% random.
fn mixed_disk() -> RawImage<MemoryStorage> {
    let size = 64 << 20;
    let mut bytes = vec![0u8; size];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for (index, chunk) in bytes.chunks_mut(1 << 20).enumerate() {
        match index * 7 % 10 {
            0..=2 => {}
            3..=5 => {
                let line = b"the replica keeps recovery points of every disk\n";
                for (position, byte) in chunk.iter_mut().enumerate() {
                    *byte = line[position % line.len()];
                }
            }
            _ => {
                for word in chunk.chunks_exact_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    word.copy_from_slice(&state.to_le_bytes());
                }
            }
        }
    }
    RawImage::open(MemoryStorage::from_bytes(bytes), "mixed", Access::ReadOnly).unwrap()
}

fn delta_throughput(criterion: &mut Criterion) {
    let disk = mixed_disk();
    let size = disk.virtual_size();
    let header = DeltaHeader {
        disk_id: uuid::Uuid::nil(),
        virtual_size: size,
        block_size: 64 << 10,
        source_generation: 1,
        sequence: 1,
        recovery_point: false,
        full: false,
    };
    let whole_disk = 0..size;
    let extents = std::slice::from_ref(&whole_disk);
    let mut group = criterion.benchmark_group("delta_64m_mixed_one_core");
    group.throughput(Throughput::Bytes(size));
    group.sample_size(10);
    let mut encoded = Vec::with_capacity(size as usize);
    group.bench_function("encode", |bench| {
        bench.iter(|| {
            encoded.clear();
            encode_delta(&disk, extents, &header, &mut encoded, "bench").unwrap();
        })
    });
    group.bench_function("decode_and_verify", |bench| {
        bench.iter(|| verify_delta(black_box(&encoded[..]), "bench").unwrap())
    });
    let source = vec![0x11u8; size as usize];
    let mut target = vec![0u8; size as usize];
    group.bench_function("baseline_memcpy", |bench| {
        bench.iter(|| target.copy_from_slice(black_box(&source)))
    });
    group.finish();
}

criterion_group!(benches, tracking_overhead, delta_throughput);
criterion_main!(benches);
