//! Resynchronization and verification over a connection. A primary that cannot trust tracking
//! (tracking lost, a replica that went back, reverse replication after an unplanned failover,
//! or by hand) asks the replica for the block hashes of its disks before the session's hello,
//! computes its own meanwhile, and marks every block that differs as changed, so the next
//! delta ships exactly those (staged and committed like any delta: the replica stays a usable
//! recovery point, its points are kept). Verification compares the same way and ships nothing.
//!
//! The exchange, on the control stream: the primary sends `HashRequest`; the replica answers
//! `Welcome` (applied 0: it holds no copy, nothing to compare), then each disk's group digests
//! (16 bytes per 64 MiB). The primary, its own hashes done, asks with `HashRanges` for the block
//! hashes of the groups that differ only; the replica sends them in pieces and `HashesDone`.
//! Two equal disks exchange their group digests and an empty request, nothing more.

use super::frame::{read_frame, write_message};
use super::primary::ResyncSummary;
use crate::Result;
use crate::protect::ProtectedVm;
use crate::proto::{Message, PROTOCOL_VERSION};
use crate::resync::exchange::{self, Comparison, Step, failure};
use crate::resync::{BlockHashes, Verification, random_seed};
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How far a comparison is, for `blockrep status`.
#[derive(Debug, Default)]
pub(super) struct Progress {
    total: AtomicU64,
    hashed: AtomicU64,
    started: Mutex<Option<Instant>>,
}

/// A comparison under way, as the status shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    pub(super) fn report(&self) -> Option<ProgressReport> {
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
    let Some((ours, differing)) = both_hashes(vm, name, control, incoming, progress).await? else {
        return Ok(None);
    };
    let vm = Arc::clone(vm);
    tokio::task::spawn_blocking(move || {
        let mut summary = ResyncSummary::default();
        for (disk, (ours, differing)) in ours.iter().zip(&differing).enumerate() {
            summary.compared_bytes += ours.virtual_size();
            summary.differing_bytes += crate::resync::bytes_in(differing);
            vm.mark_changed(disk, differing)?;
        }
        Ok(Some(summary))
    })
    .await
    .map_err(|error| failure(error.to_string()))?
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
    let (ours, differing) = both_hashes(vm, name, control, incoming, progress)
        .await?
        .ok_or_else(|| failure("the replica holds no copy of this VM yet"))?;
    Ok(Verification::new(
        ours.iter().map(BlockHashes::virtual_size),
        &differing,
        &vm.pending_extents(),
    ))
}

/// Asks for the replica's hashes and computes ours at the same time; gives our hashes and, per
/// disk, the byte ranges that differ. `None` when the replica holds no copy.
async fn both_hashes(
    vm: &Arc<ProtectedVm>,
    name: &str,
    control: &mut quinn::SendStream,
    incoming: &mut quinn::RecvStream,
    progress: &Arc<Progress>,
) -> Result<Option<(Vec<BlockHashes>, Vec<Vec<Range<u64>>>)>> {
    let seed = random_seed()?;
    let disks = vm.descriptions().len();
    let (mut comparison, request) = Comparison::start(name, seed, disks);
    send(control, &request).await?;
    if comparison.received(receive(incoming).await?)? == Step::NoCopy {
        return Ok(None);
    }
    progress.start(vm.descriptions().iter().map(|disk| disk.virtual_size).sum());
    let ours = {
        let (vm, progress) = (Arc::clone(vm), Arc::clone(progress));
        tokio::task::spawn_blocking(move || {
            vm.block_hashes_with_progress(seed, &|bytes| {
                progress.hashed.store(bytes, Ordering::Relaxed)
            })
        })
    };
    // Both sides hash at once: the replica's group digests come while ours are computed.
    for _ in 0..disks {
        comparison.received(receive(incoming).await?)?;
    }
    let ours = ours.await.map_err(|error| failure(error.to_string()))?;
    progress.finish();
    let mut step = comparison.hashed(ours?)?;
    loop {
        match step {
            Step::Send(message) => send(control, &message).await?,
            Step::Done(differing) => {
                let ours = comparison
                    .into_ours()
                    .ok_or_else(|| failure("our hashes went missing"))?;
                return Ok(Some((ours, differing)));
            }
            Step::NoCopy => return Ok(None),
            Step::Wait => {}
        }
        step = comparison.received(receive(incoming).await?)?;
    }
}

async fn send(control: &mut quinn::SendStream, message: &Message) -> Result<()> {
    write_message(control, message)
        .await
        .map_err(|error| failure(error.to_string()))
}

async fn receive(incoming: &mut quinn::RecvStream) -> Result<Message> {
    match read_frame(incoming)
        .await
        .map_err(|error| failure(error.to_string()))?
    {
        Some(Message::Refused { reason, .. }) => Err(failure(reason)),
        Some(message) => Ok(message),
        None => Err(failure("the replica closed the stream")),
    }
}

/// The replica's side, first: what it has applied (0 when it holds no copy, and nothing
/// follows). Sent before hashing, so that both sides hash at the same time.
pub(super) async fn answer_welcome(
    send_stream: &mut quinn::SendStream,
    applied: u64,
) -> Result<()> {
    send(
        send_stream,
        &Message::Welcome {
            version: PROTOCOL_VERSION,
            applied,
            staged: None,
        },
    )
    .await
}

/// The replica's side, its `hashes` (one set per disk) done: the group digests, then the block
/// hashes of the ranges the primary asks for.
pub(super) async fn answer_hashes(
    send_stream: &mut quinn::SendStream,
    receive_stream: &mut quinn::RecvStream,
    hashes: &[BlockHashes],
) -> Result<()> {
    for message in exchange::group_digests(hashes) {
        send(send_stream, &message).await?;
    }
    let ranges = match receive(receive_stream).await? {
        Message::HashRanges { ranges } => ranges,
        other => return Err(failure(format!("expected hash ranges, got {other:?}"))),
    };
    for message in exchange::block_hashes(hashes, &ranges)? {
        send(send_stream, &message).await?;
    }
    Ok(())
}

/// A refusal of a hash request, as the frame to send.
pub(super) fn refusal(reason: String) -> Bytes {
    Message::Refused {
        code: crate::proto::RefusalCode::HashesRefused,
        reason,
    }
    .encode()
}
