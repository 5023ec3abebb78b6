//! Resynchronization and verification over a connection. A primary that cannot trust tracking
//! (tracking lost, a replica that went back, reverse replication after an unplanned failover,
//! or by hand) asks the replica for the block hashes of its disks before the session's hello,
//! computes its own meanwhile, and marks every block that differs as changed, so the next
//! delta ships exactly those (staged and committed like any delta: the replica stays a usable
//! recovery point, its points are kept). Verification compares the same way and ships nothing.
//!
//! The replica answers a `HashRequest` with a `Welcome` first (applied 0: it holds no copy, so
//! there is nothing to compare), then its hashes in pieces.

use super::frame::read_frame;
use super::primary::ResyncSummary;
use crate::protect::ProtectedVm;
use crate::proto::{Message, PROTOCOL_VERSION};
use crate::resync::{BlockHashes, disk_blocks, random_seed};
use crate::{Error, Result};
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Blocks per `Hashes` message: 1 MiB of hashes, well under a frame's limit.
const PIECE_BLOCKS: u64 = 1 << 16;

fn failure(problem: impl Into<String>) -> Error {
    Error::Replication {
        peer: "resynchronization".into(),
        problem: problem.into(),
    }
}

/// How far a comparison is, for `blockrep status`.
#[derive(Debug, Default)]
pub struct Progress {
    total: AtomicU64,
    hashed: AtomicU64,
    started: Mutex<Option<Instant>>,
}

/// A comparison under way, as the status shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProgressReport {
    pub compared_bytes: u64,
    pub total_bytes: u64,
    /// Seconds left at the pace so far.
    pub eta_seconds: Option<f64>,
}

impl Progress {
    fn start(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.hashed.store(0, Ordering::Relaxed);
        *self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    fn finish(&self) {
        *self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The comparison under way, if one is.
    pub fn report(&self) -> Option<ProgressReport> {
        let started = (*self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))?;
        let (done, total) = (
            self.hashed.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        let elapsed = started.elapsed().as_secs_f64();
        let eta_seconds = (done > 0 && elapsed > 0.0)
            .then(|| total.saturating_sub(done) as f64 / (done as f64 / elapsed));
        Some(ProgressReport {
            compared_bytes: done,
            total_bytes: total,
            eta_seconds,
        })
    }
}

/// The primary's side of a resynchronization: marks what differs from the replica. `None`
/// when the replica holds no copy yet (initial replication is needed instead).
pub(super) async fn compare(
    vm: &Arc<ProtectedVm>,
    name: &str,
    control: &mut quinn::SendStream,
    incoming: &mut quinn::RecvStream,
    progress: &Arc<Progress>,
) -> Result<Option<ResyncSummary>> {
    let Some((ours, theirs)) = both_hashes(vm, name, control, incoming, progress).await? else {
        return Ok(None);
    };
    let vm = Arc::clone(vm);
    tokio::task::spawn_blocking(move || {
        let mut summary = ResyncSummary::default();
        for (disk, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
            let differing = ours.differing(theirs)?;
            summary.compared_bytes += ours.virtual_size();
            summary.differing_bytes += bytes_in(&differing);
            vm.mark_changed(disk, &differing)?;
        }
        Ok(Some(summary))
    })
    .await
    .map_err(|error| failure(error.to_string()))?
}

/// Where the replica differs from the primary, besides what the primary has not shipped yet.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verification {
    pub compared_bytes: u64,
    /// Per differing range: the disk and the byte range.
    pub differing: Vec<(u16, Range<u64>)>,
    /// Changed on the primary and not yet acknowledged: left out of the comparison.
    pub pending_bytes: u64,
}

/// Compares the replica with the primary by hash, shipping nothing. Blocks changed on the
/// primary and not yet acknowledged (read after the hashes, so a write racing the comparison
/// is among them) are expected to differ and left out.
pub(super) async fn verify(
    vm: &Arc<ProtectedVm>,
    name: &str,
    control: &mut quinn::SendStream,
    incoming: &mut quinn::RecvStream,
    progress: &Arc<Progress>,
) -> Result<Verification> {
    let (ours, theirs) = both_hashes(vm, name, control, incoming, progress)
        .await?
        .ok_or_else(|| failure("the replica holds no copy of this VM yet"))?;
    let pending = vm.pending_extents();
    let mut verification = Verification {
        compared_bytes: 0,
        differing: Vec::new(),
        pending_bytes: pending.iter().map(|ranges| bytes_in(ranges)).sum(),
    };
    for (disk, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
        verification.compared_bytes += ours.virtual_size();
        for range in ours.differing(theirs)? {
            for part in subtract(&range, &pending[disk]) {
                verification.differing.push((disk as u16, part));
            }
        }
    }
    Ok(verification)
}

/// Asks for the replica's hashes and computes ours at the same time.
async fn both_hashes(
    vm: &Arc<ProtectedVm>,
    name: &str,
    control: &mut quinn::SendStream,
    incoming: &mut quinn::RecvStream,
    progress: &Arc<Progress>,
) -> Result<Option<(Vec<BlockHashes>, Vec<BlockHashes>)>> {
    let seed = random_seed()?;
    let request = Message::HashRequest {
        vm: name.to_owned(),
        seed,
    };
    control
        .write_all(&request.encode())
        .await
        .map_err(|error| failure(error.to_string()))?;
    match read_frame(incoming)
        .await
        .map_err(|error| failure(error.to_string()))?
    {
        Some(Message::Welcome { applied: 0, .. }) => return Ok(None),
        Some(Message::Welcome { .. }) => {}
        Some(Message::Refused { reason, .. }) => return Err(failure(reason)),
        other => {
            return Err(failure(format!(
                "expected the replica's welcome, got {other:?}"
            )));
        }
    }
    let sizes: Vec<u64> = vm
        .descriptions()
        .iter()
        .map(|disk| disk.virtual_size)
        .collect();
    progress.start(sizes.iter().sum());
    let ours = {
        let (vm, progress) = (Arc::clone(vm), Arc::clone(progress));
        tokio::task::spawn_blocking(move || {
            vm.block_hashes_with_progress(seed, &|bytes| {
                progress.hashed.store(bytes, Ordering::Relaxed)
            })
        })
    };
    let theirs = receive_hashes(incoming, &sizes).await;
    let ours = ours.await.map_err(|error| failure(error.to_string()))?;
    progress.finish();
    Ok(Some((ours?, theirs?)))
}

async fn receive_hashes(
    incoming: &mut quinn::RecvStream,
    sizes: &[u64],
) -> Result<Vec<BlockHashes>> {
    let mut theirs: Vec<Option<BlockHashes>> = vec![None; sizes.len()];
    let complete = |theirs: &[Option<BlockHashes>]| {
        theirs.iter().zip(sizes).all(|(hashes, size)| {
            hashes
                .as_ref()
                .is_some_and(|hashes| hashes.blocks().end == disk_blocks(*size))
        })
    };
    while !complete(&theirs) {
        let message = read_frame(incoming)
            .await
            .map_err(|error| failure(error.to_string()))?;
        let (disk, payload) = match message {
            Some(Message::Hashes { disk, payload }) => (usize::from(disk), payload),
            Some(Message::Refused { reason, .. }) => return Err(failure(reason)),
            Some(other) => return Err(failure(format!("expected hashes, got {other:?}"))),
            None => return Err(failure("the replica closed the stream")),
        };
        let piece = BlockHashes::decode(&payload)?;
        match theirs.get_mut(disk) {
            None => {
                return Err(failure(format!(
                    "hashes for disk {disk}, which is not there"
                )));
            }
            Some(slot @ None) => *slot = Some(piece),
            Some(Some(known)) => known.merge(piece)?,
        }
    }
    Ok(theirs.into_iter().flatten().collect())
}

fn bytes_in(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|range| range.end - range.start).sum()
}

/// `range` without the parts inside `holes` (ordered, not overlapping).
fn subtract(range: &Range<u64>, holes: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut parts = Vec::new();
    let mut start = range.start;
    for hole in holes {
        if hole.end <= start || hole.start >= range.end {
            continue;
        }
        if hole.start > start {
            parts.push(start..hole.start);
        }
        start = start.max(hole.end);
    }
    if start < range.end {
        parts.push(start..range.end);
    }
    parts
}

/// The replica's side: the welcome (what it has applied; 0 when it holds no copy), then, when
/// it holds one, `hashes` (one set per disk) as `Hashes` messages, in pieces.
pub(super) fn answer(applied: u64, hashes: &[BlockHashes]) -> Vec<Bytes> {
    let mut frames = vec![
        Message::Welcome {
            version: PROTOCOL_VERSION,
            applied,
            staged: None,
        }
        .encode(),
    ];
    if applied == 0 {
        return frames;
    }
    for (disk, set) in hashes.iter().enumerate() {
        let blocks = set.blocks();
        let mut start = blocks.start;
        loop {
            let end = (start + PIECE_BLOCKS).min(blocks.end);
            frames.push(
                Message::Hashes {
                    disk: disk as u16,
                    payload: Bytes::from(set.encode(start..end)),
                }
                .encode(),
            );
            if end >= blocks.end {
                break;
            }
            start = end;
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::subtract;
    use std::ops::Range;

    #[test]
    fn subtracting_holes_keeps_what_is_outside_them() {
        let none: Vec<Range<u64>> = Vec::new();
        assert_eq!(subtract(&(0..100), &none), vec![0..100]);
        assert_eq!(
            subtract(&(0..100), &[10..20, 50..60]),
            vec![0..10, 20..50, 60..100]
        );
        let (before, around, after) = (0..15, 0..30, 20..30);
        assert_eq!(
            subtract(&(10..20), std::slice::from_ref(&before)),
            vec![15..20]
        );
        assert_eq!(subtract(&(10..20), std::slice::from_ref(&around)), none);
        assert_eq!(
            subtract(&(10..20), std::slice::from_ref(&after)),
            vec![10..20]
        );
    }
}
