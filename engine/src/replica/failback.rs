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

    /// The operator asks for replication back to the old primary (`blockrep reverse`): it is
    /// told to become the VM's replica when it next connects (`answer_old_primary`). Returns
    /// whether its copy must be compared by hash first (an unplanned failover: it may hold
    /// writes made after its last shipped cut).
    pub fn reverse(&mut self) -> Result<bool> {
        self.replica.set_reverse(true)?;
        Ok(self
            .replica
            .failover()
            .is_some_and(|failover| failover.resync))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::StorageOptions;
    use crate::proto::{DeltaId, DeltaKind, DiskDescription};
    use crate::replica::{PointPolicy, ReplicaStore, VmReplica};
    use std::time::Duration;

    /// A replica of vm1 (owner "owner") with delta 1 applied, taken over here in a planned
    /// failover that replicates back: the VM runs at this site.
    fn taken_over(directory: &std::path::Path) -> (ReplicaStore, VmReplica, Replica) {
        let policy = PointPolicy {
            keep: 0,
            interval: Duration::from_secs(3600),
        };
        let store =
            ReplicaStore::with_policy(directory, StorageOptions::default(), policy).unwrap();
        let mut replica = store.open_vm("vm1").unwrap();
        let disk = DiskDescription {
            disk_id: uuid::Uuid::from_u128(9),
            virtual_size: 1 << 20,
            logical_sector: 512,
        };
        replica.prepare(vec![disk], "owner").unwrap();
        let delta = DeltaId {
            sequence: 1,
            cut: 1,
        };
        replica.start_staging(delta, DeltaKind::Initial).unwrap();
        replica.commit(delta, DeltaKind::Initial, false).unwrap();
        replica.take_over(1, true).unwrap();
        let machine = Replica::new("vm1", replica.record());
        (store, replica, machine)
    }

    const REVERSING: Hosted = Hosted::Yes { reversing: true };

    #[test]
    fn a_failback_starts_only_where_the_vm_runs_and_replicates_back() {
        let directory = tempfile::tempdir().unwrap();
        let (_store, mut replica, mut machine) = taken_over(directory.path());
        let site = ReplicaSite::new(&mut machine, &mut replica);
        assert!(site.may_fail_back(false, REVERSING).is_ok());
        for (under_way, hosted, refusal) in [
            (true, REVERSING, "under way"),
            (false, Hosted::No, "does not run at this site"),
            (false, Hosted::Yes { reversing: false }, "blockrep reverse"),
        ] {
            let error = site
                .may_fail_back(under_way, hosted)
                .unwrap_err()
                .to_string();
            assert!(error.contains(refusal), "{error}");
        }
    }

    #[test]
    fn a_recorded_failback_is_settled_at_a_restart_and_never_runs_the_vm_here_again() {
        let directory = tempfile::tempdir().unwrap();
        let (store, mut replica, mut machine) = taken_over(directory.path());
        let mut site = ReplicaSite::new(&mut machine, &mut replica);
        assert_eq!(site.failback_to_settle(None, Hosted::No), None);
        site.record_final_delta(4).unwrap();
        // Open again, as a restarted server finds it.
        drop(replica);
        let mut replica = store.open_vm("vm1").unwrap();
        let mut machine = Replica::new("vm1", replica.record());
        let mut site = ReplicaSite::new(&mut machine, &mut replica);
        // Only the VM's own primary settles it when it connects, and not while the VM is
        // being closed by another.
        assert_eq!(site.failback_to_settle(Some("stranger"), REVERSING), None);
        assert_eq!(site.failback_to_settle(Some("owner"), Hosted::No), None);
        assert_eq!(site.failback_to_settle(Some("owner"), REVERSING), Some(4));
        assert_eq!(site.failback_to_settle(None, Hosted::No), Some(4));
        // While it is settling, the old primary is asked to come back in a moment.
        match site.answer_old_primary("owner", Hosted::No) {
            Some(Message::Refused { code, .. }) => assert_eq!(code, RefusalCode::RunsAtReplicaSite),
            other => panic!("told {other:?}"),
        }
        assert!(site.finish_failback(4).unwrap());
        assert!(!site.finish_failback(4).unwrap(), "finished once");
        assert_eq!(site.replica.applied(), 4);
        assert!(site.replica.failover().is_none());
        assert_eq!(site.answer_old_primary("owner", Hosted::No), None);
    }

    #[test]
    fn a_failed_failback_runs_the_vm_here_unless_the_old_primary_may_run_it() {
        let directory = tempfile::tempdir().unwrap();
        let (_store, mut replica, mut machine) = taken_over(directory.path());
        let mut site = ReplicaSite::new(&mut machine, &mut replica);
        // Refused before anything was recorded: the VM goes on here.
        assert_eq!(
            site.failback_failed(false, None, REVERSING).unwrap(),
            FailbackEnd::RunsHere
        );
        // Recorded, then no answer: the old primary may run it; the writes stay stopped.
        site.record_final_delta(5).unwrap();
        assert_eq!(
            site.failback_failed(true, Some(5), REVERSING).unwrap(),
            FailbackEnd::Open
        );
        // Recorded, and the old primary's connection took the VM to close: handed back.
        assert_eq!(
            site.failback_failed(true, Some(5), Hosted::No).unwrap(),
            FailbackEnd::HandedBack { sequence: 5 }
        );
        // Recorded, then refused: the record goes and the VM runs here again.
        assert_eq!(
            site.failback_failed(false, Some(5), REVERSING).unwrap(),
            FailbackEnd::RunsHere
        );
        assert_eq!(site.failback_to_settle(None, Hosted::No), None);
    }

    #[test]
    fn a_returning_old_primary_is_told_to_become_the_replica_only_when_replication_goes_back() {
        let directory = tempfile::tempdir().unwrap();
        let (_store, mut replica, mut machine) = taken_over(directory.path());
        let site = ReplicaSite::new(&mut machine, &mut replica);
        assert_eq!(
            site.answer_old_primary("owner", REVERSING),
            Some(Message::Reverse {
                applied: 1,
                resync: false
            })
        );
        assert_eq!(
            site.answer_old_primary("owner", Hosted::Yes { reversing: false }),
            Some(Message::HandedOver { sequence: 1 })
        );
        match site.answer_old_primary("stranger", REVERSING) {
            Some(Message::Refused { code, .. }) => assert_eq!(code, RefusalCode::NotThisReplica),
            other => panic!("told {other:?}"),
        }
    }

    #[test]
    fn only_an_adopted_replica_is_forgotten_by_forget_adopted() {
        let directory = tempfile::tempdir().unwrap();
        let (store, replica, _machine) = taken_over(directory.path());
        assert!(!replica.is_adopted());
        drop(replica);
        let error = store.forget_adopted("vm1").unwrap_err().to_string();
        assert!(error.contains("would delete them"), "{error}");
        assert_eq!(store.vms().unwrap(), ["vm1"]);
        // An adopt a crash interrupted after its first catalogue write holds no disks: it goes.
        let disk = DiskDescription {
            disk_id: uuid::Uuid::from_u128(10),
            virtual_size: 1 << 20,
            logical_sector: 512,
        };
        store
            .open_vm("vm2")
            .unwrap()
            .prepare(vec![disk], "owner")
            .unwrap();
        store.forget_adopted("vm2").unwrap();
        assert_eq!(store.vms().unwrap(), ["vm1"]);
    }
}
