//! Who runs a VM after a planned failover that a crash interrupted. The engine decides; this
//! carries its decisions out on the simulated hosts, as the daemons do on real ones:
//!
//! - before a primary asks the other site to take its VM over, the handover is recorded
//!   durably: by the first host in its handover mark (`protect::HandoverMark`), by a site the
//!   VM failed over to in its failover record (`ReplicaSite::record_final_delta`);
//! - a host that starts with such a record does not run the VM before it knows: a failback's
//!   record is settled (`ReplicaSite::failback_to_settle`, `finish_failback`), and a first
//!   host asks the other site (`ReplicaSite::answer_old_primary`, read by
//!   `protect::after_handover`).

use super::*;
use crate::scenario::HandoverCrash;
use blockrep::protect::{AfterHandover, HandoverMark, after_handover};
use blockrep::replica::Hosted;

impl World {
    /// The handover of `vm` at final delta `sequence` is recorded where the VM runs, once its
    /// disks are flushed: from then on the other site may run it.
    pub(super) fn record_handover(&mut self, vm: usize, sequence: u64) -> Result<(), String> {
        let host = self.vms[vm].spec.host;
        let storage = self.storage_options(host);
        let primary = self.vms[vm]
            .primary
            .as_ref()
            .ok_or("the VM is not running")?;
        for disk in primary.vm.disks() {
            disk.flush().map_err(|error| error.to_string())?;
        }
        let recorded = if self.failed_over_here(host, vm) {
            self.slot(host, vm)?
                .replica_site()
                .record_final_delta(sequence)
        } else {
            HandoverMark::for_disk(&self.vms[vm].paths[0]).record(sequence, &storage)
        };
        recorded.map_err(|error| error.to_string())?;
        if self.hosts[host].crash_at_handover == Some(HandoverCrash::Recorded) {
            self.hosts[host].crash_at_handover = None;
            self.crash_host(host, "lost power right after recording a handover");
            return Err("lost power".into());
        }
        Ok(())
    }

    /// The other site took `vm` over from `host`: the host loses power now when the scenario
    /// asked for it, before it hears.
    pub(super) fn crash_when_taken_over(&mut self, host: usize) {
        if self.hosts[host].crash_at_handover == Some(HandoverCrash::TakenOver) {
            self.hosts[host].crash_at_handover = None;
            self.crash_host(host, "lost power once the other site took its VM over");
        }
    }

    /// The VM failed over to `host` and runs there (its store holds the failover's record).
    fn failed_over_here(&mut self, host: usize, vm: usize) -> bool {
        let name = &self.vms[vm].spec.name;
        let holds = self.hosts[host]
            .store
            .as_ref()
            .and_then(|store| store.vms().ok())
            .is_some_and(|names| names.contains(name));
        holds
            && self.slot(host, vm).is_ok_and(|slot| {
                slot.replica
                    .failover()
                    .is_some_and(|failover| failover.active())
            })
    }

    /// Starts `vm` on its host unless a handover recorded there says it may run elsewhere:
    /// then the engine's decision is carried out, asking the other site when it must.
    pub(super) fn start_or_ask(&mut self, vm: usize) {
        let host = self.vms[vm].spec.host;
        if self.failed_over_here(host, vm) {
            let settle = self
                .slot(host, vm)
                .ok()
                .and_then(|slot| slot.replica_site().failback_to_settle(None, Hosted::No));
            if let Some(sequence) = settle {
                let finished = self.slot(host, vm).and_then(|slot| {
                    slot.replica_site()
                        .finish_failback(sequence)
                        .map_err(|error| error.to_string())
                });
                // The VM runs at its first host, which replicates to this host as ever (the
                // daemon's agent there hears it is the primary when it next asks).
                match finished {
                    Ok(_) => self.handed_over(vm, sequence, true),
                    Err(error) => self.lost_host_io(host, &error),
                }
                return;
            }
        }
        let mark = HandoverMark::for_disk(&self.vms[vm].paths[0]);
        let recorded = match mark.recorded() {
            Ok(recorded) => recorded,
            Err(error) => {
                self.violation(
                    Some(vm),
                    format!("cannot read the handover record: {error}"),
                );
                return;
            }
        };
        let Some(sequence) = recorded else {
            let options = self.storage_options(host);
            self.forget_replica_of_own_vm(host, vm);
            self.start_vm_or_retry(vm, &options);
            return;
        };
        match self.ask_other_site(vm, host) {
            AfterHandover::RunHere => {
                let options = self.storage_options(host);
                if let Err(error) = mark.remove(&options) {
                    self.lost_host_io(host, &error.to_string());
                    return;
                }
                self.forget_replica_of_own_vm(host, vm);
                self.start_vm_or_retry(vm, &options);
            }
            AfterHandover::RunsThere { .. } => self.handed_over(vm, sequence, false),
            AfterHandover::BecomeReplica { .. } => self.handed_over(vm, sequence, true),
            AfterHandover::AskAgain { reason } | AfterHandover::Refused { reason } => {
                let name = self.vms[vm].spec.name.clone();
                self.note_fault(format!(
                    "VM {name} recorded a handover at delta {sequence}; its disks are served to no one until the other site answers ({reason}); asking again in 30 s"
                ));
                let incarnation = self.hosts[host].incarnation;
                self.agenda
                    .add_after(Duration::from_secs(30), Event::RetryVm { vm, incarnation });
            }
        }
    }

    /// What the other site of `vm` answers `host` (its old primary, which recorded a handover)
    /// when it connects: the engine's answer for a VM that runs there; its machine welcomes its
    /// own primary otherwise.
    fn ask_other_site(&mut self, vm: usize, host: usize) -> AfterHandover {
        let spec = &self.vms[vm].spec;
        let other = if spec.host == host {
            spec.replica_host
        } else {
            spec.host
        };
        if !self.hosts[other].up {
            return AfterHandover::AskAgain {
                reason: format!("{} does not answer", self.hosts[other].name),
            };
        }
        let owner = self.hosts[host].name.clone();
        let runs_there = self.vms[vm].spec.host == other || self.vms[vm].taking_over.is_some();
        let slot = match self.slot(other, vm) {
            Ok(slot) => slot,
            Err(reason) => return AfterHandover::AskAgain { reason },
        };
        let hosted = match slot.replica.failover() {
            Some(failover) if runs_there && failover.active() => Hosted::Yes {
                reversing: failover.reverse,
            },
            _ => Hosted::No,
        };
        match slot.replica_site().answer_old_primary(&owner, hosted) {
            Some(answer) => after_handover(&answer),
            None => AfterHandover::RunHere,
        }
    }
}
