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

use super::Interrupted;
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
        let recorded = if self.failed_over_here(host, vm)? {
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

    /// The other site took `vm` over: the old host loses power now when the scenario asked
    /// for it, before it hears; an old host that is down already (the take-over arrived after
    /// it lost power) learns at its restart, and the other site runs the VM from now on.
    pub(super) fn after_taken_over(&mut self, vm: usize) {
        let host = self.vms[vm].spec.host;
        if self.hosts[host].crash_at_handover == Some(HandoverCrash::TakenOver) {
            self.hosts[host].crash_at_handover = None;
            self.crash_host(host, "lost power once the other site took its VM over");
        } else if !self.hosts[host].up {
            let sequence = self.vms[vm].handover_sequence;
            self.handed_over(vm, sequence, false);
        }
    }

    /// A planned failover of `vm` was refused, or could not be prepared: the VM runs where it
    /// ran, and what its host recorded of the handover goes (the engine's `failback_failed`,
    /// or the first host's mark), as the daemons do.
    pub(super) fn handover_called_off(&mut self, vm: usize) {
        let host = self.vms[vm].spec.host;
        if !self.hosts[host].up {
            return;
        }
        let dropped = match self.failed_over_here(host, vm) {
            Err(reason) => Err(reason),
            Ok(true) => self.slot(host, vm).and_then(|slot| {
                slot.replica_site()
                    .failback_failed(false, None, Hosted::Yes { reversing: true })
                    .map(drop)
                    .map_err(|error| error.to_string())
            }),
            Ok(false) => {
                let storage = self.storage_options(host);
                HandoverMark::for_disk(&self.vms[vm].paths[0])
                    .remove(&storage)
                    .map_err(|error| error.to_string())
            }
        };
        if let Err(reason) = dropped {
            self.lost_host_io(host, &reason);
        }
    }

    /// The VM failed over to `host` and runs there (its store holds the failover's record).
    /// An error (the store cannot be read) decides nothing: the caller tries again later.
    fn failed_over_here(&mut self, host: usize, vm: usize) -> Result<bool, String> {
        let name = &self.vms[vm].spec.name;
        let holds = self.hosts[host]
            .store
            .as_ref()
            .ok_or("the host is down")?
            .vms()
            .map_err(|error| error.to_string())?
            .contains(name);
        if !holds {
            return Ok(false);
        }
        let slot = self.slot(host, vm)?;
        Ok(slot
            .replica
            .failover()
            .is_some_and(|failover| failover.active()))
    }

    /// Asks again later who runs `vm`, from `host` (a restart asks anew: the question is kept
    /// in `interrupted` until it is settled).
    fn ask_again(&mut self, vm: usize, host: usize, reason: &str) {
        let reverse = self.vms[vm]
            .interrupted
            .is_some_and(|interrupted| interrupted.reverse);
        self.vms[vm].interrupted = Some(Interrupted { host, reverse });
        if !self.hosts[host].up {
            return;
        }
        let name = self.vms[vm].spec.name.clone();
        self.note_fault(format!(
            "VM {name}: {} does not know yet whether it runs the VM ({reason}); its disks are served to no one; asking again in 30 s",
            self.hosts[host].name
        ));
        let incarnation = self.hosts[host].incarnation;
        self.agenda.add_after(
            Duration::from_secs(30),
            Event::AskWhoRuns {
                vm,
                host,
                incarnation,
            },
        );
    }

    /// `host` restarted after it lost power while it handed `vm` over, or asks again: it
    /// settles the handover from what it recorded, as the engine decides.
    pub(super) fn settle_after_restart(&mut self, vm: usize, host: usize) {
        // Settled now, unless it asks again (`ask_again` keeps the question).
        let interrupted = self.vms[vm].interrupted.take();
        let reverse = interrupted.is_some_and(|interrupted| interrupted.reverse);
        if self.vms[vm].spec.host == host {
            if self.vms[vm].primary.is_some() {
                return;
            }
            self.start_or_ask(vm);
        } else {
            self.settle_taken_over(vm, host, reverse);
        }
    }

    /// The other site took `vm` over from `host`, which lost power before it heard. Back, the
    /// host finds what it recorded: a failback's record is settled, a handover mark makes it
    /// ask the other site; with neither it would run the VM again, at both sites.
    fn settle_taken_over(&mut self, vm: usize, host: usize, reverse: bool) {
        let other = self.hosts[self.vms[vm].spec.host].name.clone();
        let here = self.hosts[host].name.clone();
        match self.failed_over_here(host, vm) {
            Err(reason) => return self.ask_again(vm, host, &reason),
            Ok(true) => {
                let settled = self.slot(host, vm).map(|slot| {
                    let mut site = slot.replica_site();
                    site.failback_to_settle(None, Hosted::No)
                        .map(|sequence| site.finish_failback(sequence).map(|_| sequence))
                });
                match settled {
                    Err(reason) => self.ask_again(vm, host, &reason),
                    Ok(Some(Err(error))) => self.lost_host_io(host, &error.to_string()),
                    Ok(Some(Ok(sequence))) => {
                        if reverse {
                            self.replicate_back_to(vm, host, sequence);
                        }
                    }
                    Ok(None) => self.violation(
                        Some(vm),
                        format!("the VM runs at both sites: {here} restarts with its failover record and runs the VM, which {other} took over"),
                    ),
                }
                return;
            }
            Ok(false) => {}
        }
        let mark = HandoverMark::for_disk(&self.vms[vm].home_paths(host).unwrap_or_default()[0]);
        if !mark.present() {
            self.violation(
                Some(vm),
                format!("the VM runs at both sites: {here} restarts with no handover recorded and runs the VM, which {other} took over"),
            );
            return;
        }
        match self.ask_other_site(vm, host) {
            AfterHandover::BecomeReplica { applied } => self.replicate_back_to(vm, host, applied),
            // It waits for the operator there to reverse replication.
            AfterHandover::RunsThere { .. } => {}
            AfterHandover::RunHere => self.violation(
                Some(vm),
                format!(
                    "{other} runs the VM, yet answers {here} that it expects it as the primary"
                ),
            ),
            AfterHandover::AskAgain { reason } | AfterHandover::Refused { reason } => {
                self.ask_again(vm, host, &reason)
            }
        }
    }

    /// `host` is the replica of `vm` again at delta `applied`: replication goes back to it,
    /// unless it already does.
    fn replicate_back_to(&mut self, vm: usize, host: usize, applied: u64) {
        if self.vms[vm].replicating {
            return;
        }
        match self.become_replica(host, vm, applied) {
            Ok(()) => self.replicate_back(vm, applied, false),
            Err(reason) => self.ask_again(vm, host, &reason),
        }
    }

    /// Starts `vm` on its host unless a handover recorded there says it may run elsewhere:
    /// then the engine's decision is carried out, asking the other site when it must.
    pub(super) fn start_or_ask(&mut self, vm: usize) {
        let host = self.vms[vm].spec.host;
        match self.failed_over_here(host, vm) {
            Err(reason) => return self.ask_again(vm, host, &reason),
            Ok(false) => {}
            Ok(true) => {
                let settled = self.slot(host, vm).map(|slot| {
                    let mut site = slot.replica_site();
                    site.failback_to_settle(None, Hosted::No)
                        .map(|sequence| (sequence, site.finish_failback(sequence)))
                });
                match settled {
                    Err(reason) => return self.ask_again(vm, host, &reason),
                    Ok(None) => {}
                    Ok(Some((_, Err(error)))) => {
                        return self.lost_host_io(host, &error.to_string());
                    }
                    // The VM runs at its first host, which replicates to this host as ever
                    // (the daemon's agent there hears it is the primary when it next asks).
                    Ok(Some((sequence, Ok(_)))) => return self.handed_over(vm, sequence, true),
                }
            }
        }
        let mark = HandoverMark::for_disk(&self.vms[vm].paths[0]);
        if !mark.present() {
            let options = self.storage_options(host);
            self.forget_adopted_replica(host, vm);
            self.start_vm_or_retry(vm, &options);
            return;
        }
        let sequence = match mark.recorded() {
            Ok(recorded) => recorded.unwrap_or_default(),
            Err(error) => {
                self.violation(
                    Some(vm),
                    format!("a handover record the engine wrote is damaged: {error}"),
                );
                return;
            }
        };
        match self.ask_other_site(vm, host) {
            AfterHandover::RunHere => {
                let options = self.storage_options(host);
                if let Err(error) = mark.remove(&options) {
                    self.lost_host_io(host, &error.to_string());
                    return;
                }
                self.forget_adopted_replica(host, vm);
                self.start_vm_or_retry(vm, &options);
            }
            AfterHandover::RunsThere { .. } => self.handed_over(vm, sequence, false),
            AfterHandover::BecomeReplica { .. } => self.handed_over(vm, sequence, true),
            AfterHandover::AskAgain { reason } | AfterHandover::Refused { reason } => {
                self.ask_again(vm, host, &reason)
            }
        }
    }

    /// What the other site of `vm` answers `host` (its old primary, which recorded a handover)
    /// when it connects: the engine's answer for a VM that runs there; its machine welcomes its
    /// own primary otherwise.
    pub(super) fn ask_other_site(&mut self, vm: usize, host: usize) -> AfterHandover {
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
        let slot = match self.slot(other, vm) {
            Ok(slot) => slot,
            Err(reason) => return AfterHandover::AskAgain { reason },
        };
        // What the other site's server finds in its store: a failover record it runs the VM
        // from (as it does when it starts), a failback letting the VM go, or none.
        let failover = slot.replica.failover();
        let hosted = match &failover {
            Some(failover) if failover.active() && failover.handing_back.is_none() => Hosted::Yes {
                reversing: failover.reverse,
            },
            _ => Hosted::No,
        };
        match slot.replica_site().answer_old_primary(&owner, hosted) {
            Some(answer) => after_handover(&answer),
            // The machine answers its own primary: a failover not committed asks it to wait
            // (`FailedOver`); otherwise it is welcomed as the primary.
            None if failover.is_some() => AfterHandover::AskAgain {
                reason: "the VM failed over there and the failover is not committed".into(),
            },
            None => AfterHandover::RunHere,
        }
    }
}
