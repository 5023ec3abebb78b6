//! Micro-benchmarks of the hot pieces, each beside a baseline measured in the same run.

use blockrep::image::vhdx::VhdxCreateOptions;
use blockrep::image::{BlockImage, VhdxImage, is_zero};
use blockrep::io::{FileStorage, MemoryStorage, Storage, UringOptions, UringStorage};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const BLOCK: usize = 64 << 10;

fn zero_detection(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("zero_detection_64k");
    let zeros = vec![0u8; BLOCK];
    group.throughput(Throughput::Bytes(BLOCK as u64));
    group.bench_function("is_zero", |bench| bench.iter(|| is_zero(black_box(&zeros))));
    group.bench_function("baseline_iter_all", |bench| {
        bench.iter(|| black_box(&zeros).iter().all(|&byte| byte == 0))
    });
    group.finish();
}

fn vhdx_writes(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("vhdx_write_4m_chunks_to_memory");
    let chunk = vec![0x5Au8; 4 << 20];
    let size = 256u64 << 20;
    group.throughput(Throughput::Bytes(size));
    group.bench_function("vhdx_image", |bench| {
        bench.iter(|| {
            let mut image = VhdxImage::create(
                MemoryStorage::new(),
                "bench",
                &VhdxCreateOptions::dynamic(size),
            )
            .unwrap();
            for offset in (0..size).step_by(chunk.len()) {
                image.write_at(&chunk, offset).unwrap();
            }
            image.flush().unwrap();
        })
    });
    group.bench_function("baseline_memory_storage", |bench| {
        bench.iter(|| {
            let storage = MemoryStorage::new();
            for offset in (0..size).step_by(chunk.len()) {
                storage.write_at(&chunk, offset).unwrap();
            }
            storage.flush().unwrap();
        })
    });
    group.finish();
}

fn storage_writes(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("sequential_1m_writes_64m_then_flush");
    group.sample_size(10);
    let chunk = vec![0xA5u8; 1 << 20];
    let size = 64u64 << 20;
    group.throughput(Throughput::Bytes(size));
    let directory = tempfile::tempdir_in(".").unwrap();
    let write_all = |storage: &dyn Storage| {
        for offset in (0..size).step_by(chunk.len()) {
            storage.write_at(&chunk, offset).unwrap();
        }
        storage.flush().unwrap();
    };
    group.bench_function("file_storage_pwrite", |bench| {
        bench.iter(|| {
            let path = directory.path().join("sync");
            let _ = std::fs::remove_file(&path);
            write_all(&FileStorage::create_new(&path).unwrap());
        })
    });
    for direct in [false, true] {
        let name = if direct {
            "uring_storage_direct"
        } else {
            "uring_storage"
        };
        group.bench_function(name, |bench| {
            bench.iter(|| {
                let path = directory.path().join(name);
                let _ = std::fs::remove_file(&path);
                let file = std::fs::File::create_new(&path).unwrap();
                let options = UringOptions {
                    direct,
                    ..UringOptions::default()
                };
                write_all(&UringStorage::from_file(file, options).unwrap());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, zero_detection, vhdx_writes, storage_writes);
criterion_main!(benches);
