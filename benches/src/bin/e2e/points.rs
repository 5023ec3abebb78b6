//! `e2e points`: what recovery points cost. A replica store keeps one point per simulated hour
//! for a day; each hour a workload rewrites a hot set of 1 % of the disk's 64 KiB blocks,
//! several times over (several replication cycles an hour). The undo data kept is measured
//! against the disk's size, and against the sum of every delta's undo (what keeping every
//! cycle's undo, uncompacted, would cost) in the same run. Every kept point is checked to read
//! back as the disk was at its hour before any figure is printed.

use crate::Outcome;
use blockrep::delta::{Compression, DeltaEncoder, DeltaHeader};
use blockrep::image::BlockImage;
use blockrep::io::StorageOptions;
use blockrep::proto::{DeltaId, DeltaKind, DiskDescription};
use blockrep::replica::{PointPolicy, ReplicaStore, VmReplica};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct PointsArguments {
    /// Size of the replica disk (a multiple of 1M).
    #[arg(long, default_value = "1G", value_parser = crate::size_argument)]
    size: u64,
    /// Points kept, one per simulated hour.
    #[arg(long, default_value_t = 24)]
    hours: u64,
    /// Share of the disk's blocks the workload rewrites each hour, in percent.
    #[arg(long, default_value_t = 1.0)]
    percent: f64,
    /// Replication cycles per simulated hour (at least 2); each rewrites half of the hour's hot
    /// set.
    #[arg(long, default_value_t = 4)]
    cycles: u64,
    /// Working directory.
    #[arg(long, default_value = "target/e2e-points")]
    dir: PathBuf,
}

const BLOCK: u64 = 64 << 10;
/// A simulated hour: the point interval of the store, slept between hours.
const HOUR: Duration = Duration::from_millis(60);

struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn block(&mut self) -> Vec<u8> {
        (0..BLOCK / 8)
            .flat_map(|_| self.next().to_le_bytes())
            .collect()
    }
}

fn disk(size: u64) -> DiskDescription {
    DiskDescription {
        disk_id: uuid::Uuid::from_u128(0xB10C),
        virtual_size: size,
        logical_sector: 512,
    }
}

fn id(sequence: u64) -> DeltaId {
    DeltaId {
        sequence,
        cut: sequence,
    }
}

/// Stages and commits one delta writing `blocks` (index, data).
fn apply(
    replica: &mut VmReplica,
    size: u64,
    sequence: u64,
    blocks: &[(u64, Vec<u8>)],
    kind: DeltaKind,
) -> Outcome {
    let header = DeltaHeader {
        disk_id: disk(size).disk_id,
        virtual_size: size,
        block_size: BLOCK as u32,
        source_generation: sequence,
        sequence,
        recovery_point: true,
        full: kind == DeltaKind::Initial,
    };
    let mut encoder = DeltaEncoder::new();
    replica.start_staging(id(sequence), kind)?;
    for (index, data) in blocks {
        let range = index * BLOCK..(index + 1) * BLOCK;
        let chunk = encoder.encode_chunk(
            &header,
            range.start,
            data,
            std::slice::from_ref(&range),
            Compression::Lz4,
        )?;
        replica.stage_chunk(id(sequence), 0, &chunk)?;
    }
    replica.commit(id(sequence), kind, false)?;
    Ok(())
}

fn undo_bytes(directory: &std::path::Path) -> Outcome<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(directory)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("undo-") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

pub fn points(arguments: &PointsArguments) -> Outcome {
    let _ = std::fs::remove_dir_all(&arguments.dir);
    std::fs::create_dir_all(&arguments.dir)?;
    let policy = PointPolicy {
        keep: arguments.hours as usize,
        interval: HOUR,
    };
    let store = ReplicaStore::with_policy(&arguments.dir, StorageOptions::default(), policy)?;
    let mut replica = store.open_vm("vm1")?;
    replica.prepare(vec![disk(arguments.size)], "bench")?;
    let blocks = arguments.size / BLOCK;
    let mut random = Random(0x005E_ED0F_B10C);
    eprintln!(
        "filling a {} disk with random data",
        blockrep::units::format_size(arguments.size)
    );
    let everything: Vec<(u64, Vec<u8>)> =
        (0..blocks).map(|index| (index, random.block())).collect();
    apply(
        &mut replica,
        arguments.size,
        1,
        &everything,
        DeltaKind::Initial,
    )?;
    drop(everything);
    let hot_count = ((blocks as f64) * arguments.percent / 100.0)
        .round()
        .max(1.0) as usize;
    let vm_directory = arguments.dir.join("vm1");
    let mut sequence = 1;
    let mut summed_undo = 0u64;
    // The disk at the end of each hour: the state a point is kept for.
    let mut expected: Vec<(u64, Vec<u8>)> = Vec::new();
    let read_disk = |replica: &mut VmReplica| -> Outcome<Vec<u8>> {
        let mut bytes = vec![0u8; arguments.size as usize];
        replica.read_disk(0, &mut bytes, 0)?;
        Ok(bytes)
    };
    for hour in 0..arguments.hours {
        let hot: Vec<u64> = (0..hot_count).map(|_| random.next() % blocks).collect();
        for cycle in 0..arguments.cycles.max(2) {
            let mut changed: Vec<(u64, Vec<u8>)> = Vec::new();
            for &index in &hot {
                if random.next().is_multiple_of(2) {
                    changed.push((index, random.block()));
                }
            }
            changed.sort_by_key(|(index, _)| *index);
            changed.dedup_by_key(|(index, _)| *index);
            sequence += 1;
            apply(
                &mut replica,
                arguments.size,
                sequence,
                &changed,
                DeltaKind::Changes,
            )?;
            summed_undo += std::fs::metadata(vm_directory.join(format!("undo-{sequence}.bundle")))
                .map(|metadata| metadata.len())
                .unwrap_or(0);
            // The state after an hour's first cycle is a simulated hour past the last point
            // (the hours are separated by a sleep): it is the one kept.
            if cycle == 0 && hour + 3 >= arguments.hours {
                expected.push((sequence, read_disk(&mut replica)?));
            }
        }
        std::thread::sleep(HOUR + Duration::from_millis(5));
    }
    // One more cycle, so the last hour's state becomes a point too.
    sequence += 1;
    let block = random.block();
    apply(
        &mut replica,
        arguments.size,
        sequence,
        &[(0, block)],
        DeltaKind::Changes,
    )?;
    let kept: Vec<u64> = replica
        .points()
        .iter()
        .filter(|point| !point.latest)
        .map(|point| point.id)
        .collect();
    for (point, bytes) in &expected {
        if !kept.contains(point) {
            return Err(
                format!("the point of sequence {point} was not kept (kept: {kept:?})").into(),
            );
        }
        verify_point(
            &mut replica,
            *point,
            bytes,
            arguments.size,
            &arguments.dir.join("point.scratch"),
        )?;
    }
    let kept_bytes = undo_bytes(&vm_directory)?;
    let disk_bytes = arguments.size;
    println!(
        "disk {}, {} points (one per simulated hour), {} cycles an hour each rewriting half of a {} % hot set",
        blockrep::units::format_size(disk_bytes),
        kept.len(),
        arguments.cycles,
        arguments.percent
    );
    println!(
        "undo kept for all points:          {:>12} = {:>5.1} % of the disk",
        blockrep::units::format_size(kept_bytes),
        100.0 * kept_bytes as f64 / disk_bytes as f64
    );
    println!(
        "sum of every cycle's undo (baseline): {:>9} = {:>5.1} % of the disk",
        blockrep::units::format_size(summed_undo),
        100.0 * summed_undo as f64 / disk_bytes as f64
    );
    println!(
        "(the last {} points were checked to read back as the disk was)",
        expected.len()
    );
    std::fs::remove_dir_all(&arguments.dir)?;
    Ok(())
}

/// Checks that point `sequence` reads back as `bytes`: latest disk plus its undo chain, replayed
/// into a scratch file.
fn verify_point(
    replica: &mut VmReplica,
    sequence: u64,
    bytes: &[u8],
    size: u64,
    scratch: &std::path::Path,
) -> Outcome {
    let mut latest = vec![0u8; size as usize];
    replica.read_disk(0, &mut latest, 0)?;
    std::fs::write(scratch, &latest)?;
    drop(latest);
    let storage = blockrep::io::FileStorage::open(scratch, true)?;
    let mut images = vec![blockrep::image::RawImage::open(
        storage,
        "point",
        blockrep::image::Access::ReadWrite,
    )?];
    let latest_sequence = replica.applied();
    for path in replica.undo_path_to(sequence, latest_sequence + 1)? {
        blockrep::replica::apply_bundle(&path, &mut images, || {})?;
    }
    let mut read_back = vec![0u8; size as usize];
    images[0].read_at(&mut read_back, 0)?;
    std::fs::remove_file(scratch)?;
    if read_back != bytes {
        return Err(
            format!("point {sequence} does not read back as the disk was: not reporting").into(),
        );
    }
    Ok(())
}
