//! Making a recovery point into disks of its own (a test failover's copy, an unplanned
//! failover's disks) while the replica goes on applying deltas: the latest disks are copied
//! piece by piece, then every delta applied since the copy began and every newer point is
//! undone from the copy.

use super::{VmReplica, apply_bundle};
use crate::Result;
use crate::image::{BlockImage, is_zero};
use std::path::{Path, PathBuf};

/// Pieces the latest disks are copied in: the replica is borrowed for one piece at a time, so
/// commits go on between them.
const COPY_PIECE: u64 = 4 << 20;

/// A way to reach the VM's replica for one step at a time: the caller takes its lock (the
/// daemon) or simply lends it (the simulator) around each step.
pub type ReplicaAccess<'a> =
    dyn FnMut(&mut dyn FnMut(&mut VmReplica) -> Result<()>) -> Result<()> + 'a;

/// Copies the latest disks into `out` as `disk-N.vhdx`, then undoes back to point `target`.
/// The replica's undo files must be pinned (`VmReplica::pin`, which gave `pinned_at`).
pub fn copy_point(
    replica: &mut ReplicaAccess<'_>,
    pinned_at: u64,
    target: u64,
    disks: usize,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out)
        .map_err(|error| crate::Error::file(&out.display().to_string(), "create", error))?;
    let mut copies = Vec::with_capacity(disks);
    let mut paths = Vec::with_capacity(disks);
    let mut buffer = vec![0u8; COPY_PIECE as usize];
    for index in 0..disks {
        let path = out.join(format!("disk-{index}.vhdx"));
        let mut made = None;
        replica(&mut |replica| {
            made = Some((
                replica.create_copy(index, &path)?,
                replica.allocated_ranges(index)?,
            ));
            Ok(())
        })?;
        let (mut copy, ranges) = made.ok_or_else(|| crate::Error::InvalidArgument {
            what: "replica access",
            reason: "the step making the copy was not run".into(),
        })?;
        for range in ranges {
            let mut position = range.start;
            while position < range.end {
                let length = COPY_PIECE.min(range.end - position) as usize;
                replica(&mut |replica| replica.read_disk(index, &mut buffer[..length], position))?;
                if !is_zero(&buffer[..length]) {
                    copy.write_at(&buffer[..length], position)?;
                }
                position += length as u64;
            }
        }
        copies.push(copy);
        paths.push(path);
    }
    let mut undo = Vec::new();
    replica(&mut |replica| {
        undo = replica.undo_path_to(target, pinned_at)?;
        Ok(())
    })?;
    for bundle in undo {
        apply_bundle(&bundle, &mut copies, || {})?;
    }
    for copy in copies {
        copy.close()?;
    }
    Ok(paths)
}
