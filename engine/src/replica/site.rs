//! One VM at the replica site: its protocol machine (`proto::Replica`) and its copy in the
//! store (`VmReplica`) together, and every decision that needs both. The drivers (the QUIC
//! server in `net::server`, the simulator) call these steps and carry out what they return;
//! they decide nothing themselves, so the simulator exercises the same decisions as the
//! daemon.
//!
//! # Call order
//!
//! 1. Feed the machine what came (`ReplicaSite::machine`: a message, a connection, a fence).
//! 2. Drain `poll_effect` until it returns `None`, carrying out each [`SiteEffect`]. Store
//!    steps the machine asks for (a new VM's disks, staging, a chunk) are done inside
//!    `poll_effect`; only what needs the driver comes out.
//! 3. An [`SiteEffect::Apply`] is answered by [`ReplicaSite::apply`] once the driver's disks
//!    may take it (at once in the daemon; after the simulated disk's time in the simulator).
//!    An [`SiteEffect::VerifyHandover`] is answered by [`ReplicaSite::verify_handover`], then
//!    (once the driver runs the VM, or failed to) [`ReplicaSite::handover_verified`].
//! 4. A failover is begun (`begin_test_failover`, `begin_unplanned_failover`), its point is
//!    copied a piece at a time ([`copy_point`](super::copy_point) with [`ReplicaSite::copy_piece`]), and ended
//!    (`end_copy`); then committed or cancelled. Drain `poll_effect` after each step: a fence
//!    changes what the machine says to a primary.
//!
//! Every step takes the store by `&mut`, so a driver holding the VM's lock for a step holds
//! it for the whole decision.

use super::{VmReplica, fence_for};
use crate::planted::{Bug, is_planted};
use crate::proto::{
    ConnectionId, DeltaId, DeltaKind, HandoverRefusal, Message, RefusalCode, Replica, ReplicaAction,
};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// What the driver carries out for a replicated VM.
#[derive(Debug)]
pub enum SiteEffect {
    /// Send `message` on `connection` (after what was queued before it).
    Send {
        connection: ConnectionId,
        message: Message,
    },
    /// Close `connection` once what was queued on it is delivered.
    Close {
        connection: ConnectionId,
        reason: String,
    },
    /// A chunk of `bytes` was staged (for the driver's counters and disk model).
    Staged { bytes: u64 },
    /// A store step failed (`step` says which): close every connection of the VM with
    /// `reason`; the machine has let its connection go.
    StoreFailed { step: &'static str, reason: String },
    /// Every chunk is staged: call `apply` when the disks may take the delta.
    Apply {
        delta: DeltaId,
        kind: DeltaKind,
        app_consistent: bool,
    },
    /// A primary hands the VM over: call `verify_handover` (it hashes every disk), run the VM
    /// here when that succeeded, then call `handover_verified`.
    VerifyHandover {
        connection: ConnectionId,
        sequence: u64,
        seed: u64,
        digests: Vec<u128>,
        reverse: bool,
    },
}

/// What a point's copy is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyPurpose {
    /// A test failover's copy, in a directory of the operator's choosing.
    Test,
    /// An unplanned failover's disks, for this attempt.
    Unplanned { attempt: u64 },
}

/// A point being copied: its undo files are pinned until `end_copy`.
#[derive(Debug, Clone)]
#[must_use = "a copy keeps the replica's undo pinned until `end_copy`"]
pub struct PointCopy {
    pub purpose: CopyPurpose,
    /// The point copied (a delta sequence).
    pub target: u64,
    pub pinned_at: u64,
    pub disks: usize,
    pub out: PathBuf,
}

/// A replicated VM's machine and store, borrowed together for one step.
pub struct ReplicaSite<'a> {
    pub machine: &'a mut Replica,
    pub replica: &'a mut VmReplica,
}

impl<'a> ReplicaSite<'a> {
    pub fn new(machine: &'a mut Replica, replica: &'a mut VmReplica) -> Self {
        ReplicaSite { machine, replica }
    }

    /// The next effect for the driver, doing the store steps the machine asks for on the way.
    pub fn poll_effect(&mut self) -> Option<SiteEffect> {
        loop {
            let effect = match self.machine.poll_action()? {
                ReplicaAction::Send {
                    connection,
                    message,
                } => SiteEffect::Send {
                    connection,
                    message,
                },
                ReplicaAction::Close { connection, reason } => {
                    SiteEffect::Close { connection, reason }
                }
                ReplicaAction::PrepareDisks { disks, owner } => {
                    match self.replica.prepare(disks, &owner) {
                        Ok(()) => continue,
                        Err(error) => self.store_failed("recording the new VM", error),
                    }
                }
                ReplicaAction::AdoptSeed { disks } => match self.replica.adopt_seed(disks) {
                    Ok(()) => continue,
                    Err(error) => self.store_failed("recording the seeded copy's disks", error),
                },
                ReplicaAction::StartStaging { delta, kind } => {
                    match self.replica.start_staging(delta, kind) {
                        Ok(()) => continue,
                        Err(error) => self.store_failed("setting up staging", error),
                    }
                }
                ReplicaAction::StageChunk {
                    delta,
                    index,
                    disk,
                    payload,
                } => match self.replica.stage_chunk(delta, disk, &payload) {
                    Ok(()) => {
                        self.machine.chunk_staged(delta, index);
                        SiteEffect::Staged {
                            bytes: payload.len() as u64,
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%delta, index, %error, "refused a chunk");
                        self.machine.chunk_not_staged(delta, index, &error);
                        continue;
                    }
                },
                ReplicaAction::Commit {
                    delta,
                    kind,
                    app_consistent,
                } => SiteEffect::Apply {
                    delta,
                    kind,
                    app_consistent,
                },
                ReplicaAction::VerifyHandover {
                    connection,
                    sequence,
                    seed,
                    digests,
                    reverse,
                } => SiteEffect::VerifyHandover {
                    connection,
                    sequence,
                    seed,
                    digests,
                    reverse,
                },
            };
            return Some(effect);
        }
    }

    fn store_failed(&mut self, step: &'static str, error: Error) -> SiteEffect {
        if let Some(connection) = self.machine.connection() {
            self.machine.disconnected(connection);
        }
        SiteEffect::StoreFailed {
            step,
            reason: error.to_string(),
        }
    }

    /// Makes the staged delta the replica's state on every disk and tells the machine either
    /// way; the error says why it was not applied.
    pub fn apply(
        &mut self,
        delta: DeltaId,
        kind: DeltaKind,
        app_consistent: bool,
    ) -> std::result::Result<(), String> {
        match self.replica.commit(delta, kind, app_consistent) {
            Ok(()) => {
                self.machine.committed(delta);
                Ok(())
            }
            Err(error) => {
                let reason = error.to_string();
                self.machine.commit_failed(delta, &reason);
                Err(reason)
            }
        }
    }

    /// Compares this replica's disks with the digests a primary handing over sent (made with
    /// `seed`), and takes the VM over when they match (with the operator's consent when points
    /// would go). The disks are let go of: the driver runs the VM on them next.
    pub fn verify_handover(
        &mut self,
        sequence: u64,
        seed: u64,
        digests: &[u128],
        reverse: bool,
    ) -> std::result::Result<(), HandoverRefusal> {
        // Refused before hashing when it could not be taken anyway.
        if let Some(reason) = self.replica.handover_needs_consent() {
            return Err(HandoverRefusal {
                code: RefusalCode::HandoverNeedsConsent,
                reason,
            });
        }
        let refused = HandoverRefusal::refused;
        self.replica
            .check_take_over(sequence)
            .map_err(|error| refused(problem(error)))?;
        let ours = self
            .replica
            .digests(seed)
            .map_err(|error| refused(format!("cannot hash the replica's disks: {error}")))?;
        if ours.len() != digests.len() {
            return Err(refused(format!(
                "the primary compared {} disks, the replica has {}",
                digests.len(),
                ours.len()
            )));
        }
        if let Some(disk) = (0..ours.len()).find(|&disk| ours[disk] != digests[disk])
            && !is_planted(Bug::HandoverWithoutEqualDigests)
        {
            return Err(refused(format!(
                "disk {disk} differs from the primary's after delta {sequence}: the failover is refused (run `blockrep verify` to see where)"
            )));
        }
        self.replica
            .take_over(sequence, reverse)
            .map_err(|error| refused(problem(error)))?;
        self.replica.release_disks();
        Ok(())
    }

    /// The VM taken over at `sequence` could not be run here: it is handed back, so that it
    /// runs at the primary again. Returns the refusal for `handover_verified`.
    pub fn not_hosted(&mut self, sequence: u64, error: &str) -> HandoverRefusal {
        if let Err(undo) = self.replica.hand_back(sequence) {
            tracing::error!(%undo, "cannot hand the VM back after failing to run it");
        }
        HandoverRefusal::refused(format!("cannot run the VM at this site: {error}"))
    }

    /// Tells the primary on `connection` whether the VM runs here now (it is told only once it
    /// does: told too early, it would leave the VM running nowhere).
    pub fn handover_verified(
        &mut self,
        connection: ConnectionId,
        sequence: u64,
        outcome: std::result::Result<(), HandoverRefusal>,
    ) {
        self.machine
            .handover_verified(connection, sequence, outcome);
    }

    /// Whether the primary `owner` may compare this replica's disks by hash, and at which
    /// delta the replica is (0: it holds no copy, so there is nothing to compare). A VM that
    /// failed over to this site is compared when replication comes back the other way.
    pub fn comparison(&self, owner: &str) -> std::result::Result<u64, String> {
        match self.machine.record().owner.as_deref() {
            None => Ok(0),
            Some(known) if known != owner => Err("this VM belongs to another primary".to_owned()),
            Some(_) if self.replica.failover().is_some() => Err(format!(
                "{} failed over to this site: it is compared when replication comes back to the other site (`blockrep reverse`)",
                self.replica.vm()
            )),
            Some(_) => Ok(self.replica.applied()),
        }
    }

    /// Begins a test failover's copy of `point` (the latest when `None`) into `out`, which
    /// must be empty; replication goes on meanwhile.
    pub fn begin_test_failover(&mut self, point: Option<u64>, out: &Path) -> Result<PointCopy> {
        if let Some(existing) = self.replica.test_failover() {
            return Err(self.refusal(format!(
                "a test failover exists at {}; remove it first with `blockrep failover {} --test --cleanup`",
                existing.display(),
                self.replica.vm()
            )));
        }
        self.replica.settle_commit()?;
        if let Some(reason) = self.replica.compare_required() {
            return Err(self.refusal(format!(
                "the replica's disks changed outside blockrep and are not yet compared with the primary ({reason}): a copy of them is not the primary's"
            )));
        }
        let target = self.point(point)?;
        if std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(self.refusal(format!("{} is not empty", out.display())));
        }
        self.replica.set_test_failover(Some(out.to_owned()))?;
        Ok(self.pin(CopyPurpose::Test, target, out.to_owned()))
    }

    /// Begins an unplanned failover to `point` (the latest when `None`): replication from the
    /// primary is fenced off first, then the point is copied into the VM's `failover`
    /// directory. Refused while the primary is connected (two primaries: split brain) or the
    /// disks changed outside blockrep, unless `force`.
    pub fn begin_unplanned_failover(
        &mut self,
        point: Option<u64>,
        force: bool,
    ) -> Result<PointCopy> {
        if let Some(failover) = self.replica.failover() {
            return Err(self.refusal(format!(
                "already failed over to point {}; commit or cancel that first",
                failover.point
            )));
        }
        if self.machine.connection().is_some() && !force {
            return Err(self.refusal(
                "the primary is still connected and replicating: failing over now would leave two primaries (split brain). Stop the primary (a primary that died is noticed within 10 s), or add --force".into(),
            ));
        }
        self.replica.settle_commit()?;
        if let Some(reason) = self.replica.compare_required()
            && !force
        {
            return Err(self.refusal(format!(
                "the replica's disks changed outside blockrep and are not yet compared with the primary ({reason}); fail over to them as they are with --force"
            )));
        }
        let target = self.point(point)?;
        let attempt = self.replica.begin_failover(target)?;
        self.fence();
        let out = self.replica.failover_directory();
        // What a killed attempt left: this attempt makes them anew.
        let _ = self.replica.storage().remove_dir_all(&out);
        Ok(self.pin(CopyPurpose::Unplanned { attempt }, target, out))
    }

    /// Runs one piece of `copy`: refused once its failover was cancelled (and perhaps begun
    /// again), so that a stale copy never becomes the VM's disks.
    pub fn copy_piece(
        &mut self,
        copy: &PointCopy,
        piece: &mut dyn FnMut(&mut VmReplica) -> Result<()>,
    ) -> Result<()> {
        if let CopyPurpose::Unplanned { attempt } = copy.purpose
            && !self.replica.failover_attempt_stands(attempt)
        {
            return Err(
                self.refusal("the failover was cancelled while its disks were being made".into())
            );
        }
        piece(self.replica)
    }

    /// Ends `copy`: the undo is unpinned and, when the copy was made, it is recorded (an
    /// unplanned failover's disks are complete and durable); otherwise what it made goes, and
    /// an unplanned failover that still stands is cancelled.
    pub fn end_copy(
        &mut self,
        copy: PointCopy,
        made: Result<Vec<PathBuf>>,
    ) -> Result<Vec<PathBuf>> {
        self.replica.unpin();
        let made = made.and_then(|paths| match copy.purpose {
            CopyPurpose::Test => Ok(paths),
            CopyPurpose::Unplanned { attempt } => {
                self.replica.failover_copied(attempt).map(|()| paths)
            }
        });
        if made.is_err() {
            match copy.purpose {
                CopyPurpose::Test => {
                    for index in 0..copy.disks {
                        let _ = self
                            .replica
                            .storage()
                            .remove_file(&copy.out.join(format!("disk-{index}.vhdx")));
                    }
                    let _ = self.replica.set_test_failover(None);
                }
                // Only this attempt is called off: one cancelled meanwhile, and perhaps begun
                // again, is not this copy's to undo.
                CopyPurpose::Unplanned { attempt } => {
                    if self.replica.failover_attempt_stands(attempt) {
                        let _ = self.replica.cancel_failover();
                        self.fence();
                    }
                }
            }
        }
        made
    }

    /// Makes the failover final: its disks become the VM's (the store lets go of them for the
    /// driver to run the VM on), the older points go, and the old primary is refused for good.
    /// Returns the disks and the point failed over to.
    pub fn commit_failover(&mut self) -> Result<(Vec<PathBuf>, u64)> {
        let disks = self.replica.commit_failover()?;
        self.fence();
        let point = self.replica.failover().map_or(0, |failover| failover.point);
        Ok((disks, point))
    }

    /// Cancels a failover not committed: its disks go and the primary may replicate again.
    pub fn cancel_failover(&mut self) -> Result<()> {
        self.replica.cancel_failover()?;
        self.fence();
        Ok(())
    }

    /// The machine's fence, from the store's failover record.
    fn fence(&mut self) {
        let fence = self.replica.failover().as_ref().map(fence_for);
        self.machine.fence(fence);
    }

    /// `point`, or the latest, when it can be copied.
    fn point(&self, point: Option<u64>) -> Result<u64> {
        let latest = self.replica.applied();
        if latest == 0 {
            return Err(self.refusal("initial replication has not completed".into()));
        }
        let target = point.unwrap_or(latest);
        if target != latest && !self.replica.points().iter().any(|kept| kept.id == target) {
            return Err(self.refusal(format!(
                "no recovery point {target} (see `blockrep points {}`)",
                self.replica.vm()
            )));
        }
        Ok(target)
    }

    fn pin(&mut self, purpose: CopyPurpose, target: u64, out: PathBuf) -> PointCopy {
        PointCopy {
            purpose,
            target,
            pinned_at: self.replica.pin(),
            disks: self.replica.descriptions().len(),
            out,
        }
    }

    fn refusal(&self, problem: String) -> Error {
        Error::Replication {
            peer: self.replica.vm().to_owned(),
            problem,
        }
    }
}

/// What a refusal says, without the VM's name (the replica machine adds it).
fn problem(error: Error) -> String {
    match error {
        Error::Replication { problem, .. } => problem,
        other => other.to_string(),
    }
}
