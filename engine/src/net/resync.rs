//! Resynchronization over a connection: before its first delta, a primary that cannot trust
//! tracking (reverse replication after an unplanned failover) asks the replica for the block
//! hashes of its disks, computes its own meanwhile, and marks every block that differs as
//! changed, so the next delta ships exactly those. The comparison runs on the control stream
//! before the session's hello; the replica answers with its hashes in pieces.

use super::frame::read_frame;
use super::primary::ResyncSummary;
use crate::protect::ProtectedVm;
use crate::proto::Message;
use crate::resync::{BlockHashes, disk_blocks, random_seed};
use crate::{Error, Result};
use bytes::Bytes;
use std::sync::Arc;

/// Blocks per `Hashes` message: 1 MiB of hashes, well under a frame's limit.
const PIECE_BLOCKS: u64 = 1 << 16;

fn failure(problem: impl Into<String>) -> Error {
    Error::Replication {
        peer: "resynchronization".into(),
        problem: problem.into(),
    }
}

/// The primary's side: asks for the replica's hashes of `vm`, compares, marks what differs.
pub(super) async fn compare(
    vm: &Arc<ProtectedVm>,
    name: &str,
    control: &mut quinn::SendStream,
    incoming: &mut quinn::RecvStream,
) -> Result<ResyncSummary> {
    let seed = random_seed()?;
    let request = Message::HashRequest {
        vm: name.to_owned(),
        seed,
    };
    control
        .write_all(&request.encode())
        .await
        .map_err(|error| failure(error.to_string()))?;
    let ours = {
        let vm = Arc::clone(vm);
        tokio::task::spawn_blocking(move || vm.block_hashes(seed))
    };
    let sizes: Vec<u64> = vm
        .descriptions()
        .iter()
        .map(|disk| disk.virtual_size)
        .collect();
    let mut theirs: Vec<Option<BlockHashes>> = vec![None; sizes.len()];
    let complete = |theirs: &[Option<BlockHashes>]| {
        theirs.iter().zip(&sizes).all(|(hashes, size)| {
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
    let ours = ours.await.map_err(|error| failure(error.to_string()))??;
    let theirs: Vec<BlockHashes> = theirs.into_iter().flatten().collect();
    let vm = Arc::clone(vm);
    tokio::task::spawn_blocking(move || {
        let mut summary = ResyncSummary::default();
        for (disk, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
            let differing = ours.differing(theirs)?;
            summary.compared_bytes += ours.virtual_size();
            summary.differing_bytes += differing
                .iter()
                .map(|range| range.end - range.start)
                .sum::<u64>();
            vm.mark_changed(disk, &differing)?;
        }
        Ok(summary)
    })
    .await
    .map_err(|error| failure(error.to_string()))?
}

/// The replica's side: `hashes` (one set per disk) as `Hashes` messages, in pieces.
pub(super) fn answer(hashes: &[BlockHashes]) -> Vec<Bytes> {
    let mut frames = Vec::new();
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
