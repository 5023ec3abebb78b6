//! Each VM's replica: carrying out what the engine's `ReplicaSite` returns, on the simulated
//! disk's time.

use super::*;

impl World {
    /// The VM's replica on `host`, opened from the store the first time it is needed.
    pub(super) fn slot(&mut self, host: usize, vm: usize) -> Result<&mut Slot, String> {
        let name = &self.vms[vm].spec.name;
        let runtime = &mut self.hosts[host];
        let store = runtime.store.as_ref().ok_or("the replica host is down")?;
        match runtime.slots.entry(vm) {
            std::collections::btree_map::Entry::Occupied(slot) => Ok(slot.into_mut()),
            std::collections::btree_map::Entry::Vacant(entry) => {
                let replica = store.open_vm(name).map_err(|error| error.to_string())?;
                let machine = Replica::new(name, replica.record());
                Ok(entry.insert(Slot {
                    machine,
                    replica,
                    staged_bytes: 0,
                    hashes: None,
                }))
            }
        }
    }

    pub(super) fn drive_replica(&mut self, host: usize, vm: usize) {
        loop {
            let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
                return;
            };
            let Some(effect) = slot.replica_site().poll_effect() else {
                return;
            };
            self.trace.action(vm, 100 + site_effect_code(&effect));
            self.site_effect(host, vm, effect);
            if !self.hosts[host].up || self.hosts[host].disks.struck() {
                self.crash_host(host, "lost power during an operation");
                return;
            }
        }
    }

    pub(super) fn site_effect(&mut self, host: usize, vm: usize, effect: SiteEffect) {
        let incarnation = self.hosts[host].incarnation;
        let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
            return;
        };
        match effect {
            SiteEffect::Send {
                connection,
                message,
            } => self.send(connection, message, Way::ToPrimary),
            SiteEffect::Close { connection, reason } => self.close(connection, &reason, true),
            SiteEffect::Staged { bytes } => slot.staged_bytes += bytes,
            SiteEffect::StoreFailed { reason, .. } => {
                self.close_all(host, vm, &reason);
                self.lost_host_io(host, &reason);
            }
            SiteEffect::Apply {
                delta,
                kind,
                app_consistent,
            } => {
                // Applying takes the disk's time; the commit itself happens when it is done.
                let bytes = std::mem::take(&mut slot.staged_bytes) as f64 * 2.0;
                let delay = COMMIT_FLOOR + Duration::from_secs_f64(bytes / DISK_BYTES_PER_SECOND);
                self.agenda.add_after(
                    delay,
                    Event::Applied {
                        vm,
                        host,
                        incarnation,
                        delta,
                        kind,
                        app_consistent,
                    },
                );
            }
            SiteEffect::VerifyHandover {
                connection,
                sequence,
                seed,
                digests,
                reverse,
            } => {
                let outcome = self.verify_handover(host, vm, sequence, seed, &digests, reverse);
                if let Some(slot) = self.hosts[host].slots.get_mut(&vm) {
                    slot.replica_site()
                        .handover_verified(connection, sequence, outcome);
                }
            }
        }
    }

    pub(super) fn apply(
        &mut self,
        vm: usize,
        host: usize,
        incarnation: u64,
        delta: DeltaId,
        kind: DeltaKind,
        app_consistent: bool,
    ) {
        if self.hosts[host].incarnation != incarnation || !self.hosts[host].up {
            return;
        }
        // A fill to come strikes within this commit's writes, sized by the last one's.
        let disks = self.hosts[host].disks.clone();
        let filling = self.hosts[host].fill_at_commit;
        if filling {
            let writes = self.random.below(self.hosts[host].commit_writes.max(2));
            disks.fill_after(writes);
        }
        let before = disks.writes();
        let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
            return;
        };
        // Why it failed is the machine's to say; the fault that did it is the simulator's.
        let _ = slot.replica_site().apply(delta, kind, app_consistent);
        let runtime = &mut self.hosts[host];
        runtime.commit_writes = disks.writes() - before;
        if filling {
            if disks.is_full() {
                runtime.fill_at_commit = false;
            } else {
                // It ended before the fill struck: the next commit tries.
                disks.set_full(false);
            }
        }
        if self.hosts[host].disks.struck() {
            self.crash_host(host, "lost power while applying a delta");
            return;
        }
        self.drive_replica(host, vm);
    }
}

pub(super) fn site_effect_code(effect: &SiteEffect) -> u64 {
    match effect {
        SiteEffect::Send { message, .. } => 10 + message_code(message),
        SiteEffect::Staged { bytes } => 1 + (bytes << 8),
        SiteEffect::StoreFailed { .. } => 2,
        SiteEffect::Apply { delta, .. } => 5 + (delta.sequence << 8),
        SiteEffect::VerifyHandover { .. } => 6,
        SiteEffect::Close { .. } => 7,
    }
}
