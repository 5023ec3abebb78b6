//! A VM that runs at this site (it failed over here) handed back to its old primary, and the
//! answer an old primary gets when it connects while the VM runs here. Every decision of a
//! failback is made here; the drivers (`net::server`, the simulator) stop and resume the VM's
//! writes, flush and close its disks, and carry the messages.
//!
//! # Call order of a failback
//!
//! 1. The driver stops the VM's writes; its primary ships the final delta.
//! 2. Once the old primary applied it, and before the primary asks it to take the VM over, the
//!    driver flushes the VM's disks and calls [`ReplicaSite::record_final_delta`]: from then
//!    on the old primary may run the VM, and this site never runs it again.
//! 3. Told it took over, the driver closes the VM's disks and calls
//!    [`ReplicaSite::finish_failback`]: this is the replica again.
//! 4. When the failback fails instead, [`ReplicaSite::failback_failed`] says whether the VM
//!    runs here again (writes resume), runs there, or its outcome is open.
//! 5. A failback whose outcome was open (no answer, or this host restarted after step 2) is
//!    settled by [`ReplicaSite::failback_to_settle`] when the old primary connects or when
//!    the host starts: the driver closes the VM, then calls `finish_failback`.

use super::ReplicaSite;
use crate::proto::{Message, RefusalCode, Replica};
use crate::{Error, Result};

/// Whether, and how, the VM runs here, as the driver knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hosted {
    /// The VM does not run here (or is being closed).
    No,
    /// It runs here; `reversing` when it replicates back to its old primary.
    Yes { reversing: bool },
}

/// How a failback that did not complete ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailbackEnd {
    /// It completed after all: the old primary runs the VM since `sequence` (it connected
    /// meanwhile and the failback was settled, or is being settled).
    HandedBack { sequence: u64 },
    /// Its outcome is open: the old primary holds the final delta and may run the VM. The VM's
    /// writes stay stopped; the failback is settled when the old primary connects again.
    Open,
    /// Not handed back: the VM goes on running here (resume its writes).
    RunsHere,
}

impl ReplicaSite<'_> {
    /// Refuses a failback that cannot start: one is under way or its outcome is open, or the
    /// VM does not run here, or runs here without replicating back (there would be no one to
    /// hand it to).
    pub fn may_fail_back(&self, under_way: bool, hosted: Hosted) -> Result<()> {
        let open = self
            .replica
            .failover()
            .and_then(|failover| failover.handing_back);
        if under_way || open.is_some() {
            return Err(self.failback_refusal("a failback is under way, or one's outcome is open (it is settled when the old primary connects, or when this server starts)"));
        }
        match hosted {
            Hosted::No => Err(self.failback_refusal(
                "does not run at this site; a planned failover runs where the VM runs",
            )),
            Hosted::Yes { reversing: false } => Err(self.failback_refusal(
                "not replicating back to the old primary: run `blockrep reverse` first, so the other site has the VM to take over",
            )),
            Hosted::Yes { reversing: true } => Ok(()),
        }
    }

    /// Records, durably, that the old primary holds the failback's final delta `sequence` and
    /// is about to be asked to take the VM over. The driver has flushed the VM's disks.
    pub fn record_final_delta(&mut self, sequence: u64) -> Result<()> {
        self.replica.set_handing_back(Some(sequence))
    }

    /// The VM runs at the old primary since the failback at delta `sequence` (its writes
    /// stopped here before the final delta, and its disks are closed): this is its replica
    /// again. Returns false when that was done already (by the old primary's connection, or
    /// by the failback itself); true when it was done now (the driver starts what a replica
    /// runs, onward replication for one).
    pub fn finish_failback(&mut self, sequence: u64) -> Result<bool> {
        if self.replica.failover().is_none() {
            return Ok(false);
        }
        self.replica.hand_back(sequence)?;
        *self.machine = Replica::new(self.replica.vm(), self.replica.record());
        tracing::info!(vm = %self.replica.vm(), sequence, "failback done: the VM runs at the other site; this is its replica again");
        Ok(true)
    }

    /// A failback that failed: `answer_unknown` when the old primary was asked to take over
    /// and never answered; `recorded_by_this` the final delta this failback recorded, if it
    /// got that far. Drops the record when the VM runs here again.
    pub fn failback_failed(
        &mut self,
        answer_unknown: bool,
        recorded_by_this: Option<u64>,
        hosted: Hosted,
    ) -> Result<FailbackEnd> {
        let Some(failover) = self.replica.failover() else {
            // The old primary connected meanwhile, and the failback was settled.
            return Ok(FailbackEnd::HandedBack {
                sequence: recorded_by_this.unwrap_or_default(),
            });
        };
        match (failover.handing_back, hosted) {
            // The old primary's connection took the VM to close, and finishes the failback.
            (Some(sequence), Hosted::No) => Ok(FailbackEnd::HandedBack { sequence }),
            // Asked to take over, and no answer: it may run the VM.
            (Some(_), _) if answer_unknown && recorded_by_this.is_some() => Ok(FailbackEnd::Open),
            (recorded, _) => {
                if recorded.is_some() {
                    self.replica.set_handing_back(None).map_err(|error| {
                        self.failback_refusal(&format!(
                            "the record of the failback cannot be removed, so the VM's writes stay stopped: {error}"
                        ))
                    })?;
                }
                Ok(FailbackEnd::RunsHere)
            }
        }
    }

    /// A failback whose outcome was not known (this host restarted after its final delta was
    /// recorded, or the old primary's answer was lost) is settled as handed back: the old
    /// primary holds the final delta and may run the VM already. Returns that delta when there
    /// is one to settle now: `owner` is the connecting primary (only the VM's own settles it;
    /// `None` when the host starts); `hosted` whether the VM is open here (while it is being
    /// closed, the closing side finishes).
    pub fn failback_to_settle(&self, owner: Option<&str>, hosted: Hosted) -> Option<u64> {
        let sequence = self.replica.failover()?.handing_back?;
        if let Some(owner) = owner
            && self.machine.record().owner.as_deref() != Some(owner)
        {
            return None;
        }
        if owner.is_some() && hosted == Hosted::No {
            return None;
        }
        tracing::warn!(
            sequence,
            "a failback was interrupted after its final delta: the VM runs at the other site, not here"
        );
        Some(sequence)
    }

    /// What a connecting old primary (`owner`) is told when its VM runs here: to become its
    /// replica when replication back is on; otherwise to wait. `None` when the VM does not run
    /// here: the machine answers it as any primary.
    pub fn answer_old_primary(&self, owner: &str, hosted: Hosted) -> Option<Message> {
        let failover = self.replica.failover()?;
        let Hosted::Yes { reversing } = hosted else {
            // A failback is letting the VM go here (its writes stopped before its final
            // delta): the old primary, which may run it already, comes back once this is its
            // replica, rather than hear that the VM was handed over here.
            return failover.handing_back.map(|_| Message::Refused {
                code: RefusalCode::RunsAtReplicaSite,
                reason: format!(
                    "{}: a failback is finishing at this site; this site becomes the replica in a moment",
                    self.replica.vm()
                ),
            });
        };
        if self.machine.record().owner.as_deref() != Some(owner) {
            return Some(Message::Refused {
                code: RefusalCode::NotThisReplica,
                reason: "this VM belongs to another primary".into(),
            });
        }
        Some(if reversing {
            Message::Reverse {
                applied: self.replica.applied(),
                resync: failover.resync,
            }
        } else if failover.planned {
            // It handed the VM over and may have missed the confirmation.
            Message::HandedOver {
                sequence: failover.point,
            }
        } else {
            Message::Refused {
                code: RefusalCode::RunsAtReplicaSite,
                reason: format!(
                    "{vm}: the VM runs at the replica site since a failover; run `blockrep reverse {vm}` there to replicate back to this host",
                    vm = self.replica.vm()
                ),
            }
        })
    }

    fn failback_refusal(&self, problem: &str) -> Error {
        Error::Replication {
            peer: self.replica.vm().to_owned(),
            problem: problem.to_owned(),
        }
    }
}
