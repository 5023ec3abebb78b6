//! A VM running at this site: serving its disks, replicating it back to its first host, and
//! onward to a third site.

use super::*;

/// Makes a VM that failed over here run: tracked disks, NBD (for `Hosting::Here`), or tells
/// the caller (`Hosting::Caller`). `fresh` starts tracking afresh.
pub(super) fn host(slot: &mut VmSlot, vm: &str, fresh: bool) -> Result<()> {
    let Some(failover) = slot.replica.failover().filter(|failover| failover.active()) else {
        return Ok(());
    };
    let hosted = slot.hosted_state();
    if let Some(sequence) = slot.replica_site().failback_to_settle(None, hosted) {
        // Run here too and both sites would run the VM.
        return finish_failback(slot, sequence);
    }
    // The disks are the VM's now, no longer a replica to pass on; the onward primary lets go
    // of them before they are opened for the VM.
    if let Some(extended) = slot.extended.take() {
        extended.stop_and_wait(&slot.runtime.clone());
    }
    slot.replica.untrack();
    match &Arc::clone(&slot.site).hosting {
        Hosting::Here(options) => {
            if slot.hosted.is_none() {
                slot.replica.release_disks();
                slot.hosted = Some(HostedVm::open(
                    vm,
                    &slot.replica.disk_paths(),
                    options,
                    fresh,
                )?);
            }
            if failover.reverse {
                start_reverse(slot);
            }
        }
        Hosting::Caller(taken_over) => {
            let _ = taken_over.send(TakenOver {
                vm: vm.to_owned(),
                sequence: failover.point,
                reverse: failover.reverse,
            });
        }
    }
    Ok(())
}

/// Starts replicating a replica onward, when the server is set up for it and the replica
/// holds a state to pass on. `fresh`: its disk files are new, so onward replication starts
/// with an initial one.
pub(super) fn extend(slot: &mut VmSlot, fresh: bool) {
    let Hosting::Here(hosting) = &Arc::clone(&slot.site).hosting else {
        return;
    };
    let Some(options) = &hosting.extend else {
        return;
    };
    if slot.extended.is_some() || slot.replica.applied() == 0 || slot.replica.failover().is_some() {
        return;
    }
    // New disk files always start it; otherwise a start that failed (its disks in use, say)
    // is tried again after a growing pause, not at every delta applied under the VM's lock.
    let now = std::time::Instant::now();
    if !fresh && slot.onward_retry.not_before.is_some_and(|at| now < at) {
        return;
    }
    // A fresh start that failed is owed until one succeeds: the retries come from applied
    // deltas, which are not fresh.
    let fresh = fresh || slot.onward_retry.fresh_owed;
    let vm = slot.machine_name();
    let runtime = slot.runtime.clone();
    match ExtendedVm::start(&vm, &mut slot.replica, options, &runtime, fresh) {
        Ok(extended) => {
            slot.extended = Some(extended);
            slot.onward_retry = OnwardRetry::default();
        }
        Err(error) => {
            slot.onward_retry.fresh_owed = fresh;
            let pause = slot.onward_retry.failed(now);
            tracing::error!(%vm, %error, retry_in = ?pause, "cannot replicate onward");
        }
    }
}

/// The pause before onward replication is tried again after a start failed: doubling from
/// one second up to five minutes.
#[derive(Debug, Default)]
pub(super) struct OnwardRetry {
    not_before: Option<std::time::Instant>,
    pause: Duration,
    /// The start that failed was a fresh one (new disk files): the next is too.
    fresh_owed: bool,
}

impl OnwardRetry {
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(300);

    /// A start failed at `now`: the next waits a pause twice the last one's.
    pub(super) fn failed(&mut self, now: std::time::Instant) -> Duration {
        self.pause = (self.pause * 2).clamp(Self::FIRST, Self::LONGEST);
        self.not_before = Some(now + self.pause);
        self.pause
    }
}

/// Starts replication back for a VM running here.
pub(super) fn start_reverse(slot: &mut VmSlot) {
    let Hosting::Here(options) = &Arc::clone(&slot.site).hosting else {
        return;
    };
    let resync_owed = slot
        .replica
        .failover()
        .is_some_and(|failover| failover.resync);
    let runtime = slot.runtime.clone();
    let Some(hosted) = slot.hosted.as_mut() else {
        return;
    };
    let resync: Option<ResyncDone> = resync_owed.then(|| {
        let weak = slot.this.clone();
        Arc::new(move |summary| {
            tracing::info!(
                ?summary,
                "resynchronization compared the old primary's copy"
            );
            if let Some(slot) = weak.upgrade()
                && let Err(error) = lock(&slot).replica.resynchronized()
            {
                tracing::error!(%error, "cannot record the resynchronization");
            }
        }) as ResyncDone
    });
    hosted.start_reverse(options, &runtime, resync, slot.site.events.clone());
}
