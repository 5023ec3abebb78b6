//! A VM that runs here handed back to its first host (failback), and settling one a crash
//! interrupted.

use super::*;

/// A planned failover of a VM that runs here back to its old primary (see
/// `ReplicaServer::planned_failover`).
pub(super) async fn fail_back(slot: Arc<Mutex<VmSlot>>, vm: String, reverse: bool) -> Result<u64> {
    let vm = vm.as_str();
    // Shared by the hook that records the final delta and by the failure below, each under
    // the VM's lock: a failback called off is never recorded afterwards.
    let state = Arc::new(Mutex::new(Failback::default()));
    let answer = {
        let (slot, state) = (Arc::clone(&slot), Arc::clone(&state));
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&slot);
            let vm = guard.machine_name();
            let open = guard
                .replica
                .failover()
                .and_then(|failover| failover.handing_back);
            if guard.failback.is_some() || open.is_some() {
                return Err(Error::Replication {
                    peer: vm,
                    problem: "a failback is under way, or one's outcome is open (it is settled when the old primary connects, or when this server starts)".into(),
                });
            }
            let before_take_over = record_final_delta(guard.this.clone(), Arc::clone(&state));
            let hosted = guard.hosted.as_mut().ok_or_else(|| Error::Replication {
                peer: vm.clone(),
                problem: "does not run at this site; a planned failover runs where the VM runs".into(),
            })?;
            // Refused before the writes stop when there is no one to hand over to.
            if !hosted.reversing() {
                return Err(Error::Replication {
                    peer: vm,
                    problem: "not replicating back to the old primary: run `blockrep reverse` first, so the other site has the VM to take over".into(),
                });
            }
            hosted.stop_writes()?;
            let asked = hosted.hand_over(reverse, before_take_over);
            match &asked {
                Ok(_) => guard.failback = Some(state),
                Err(_) => hosted.resume_writes()?,
            }
            asked
        })
        .await
        .map_err(|error| Error::Replication {
            peer: vm.to_owned(),
            problem: error.to_string(),
        })??
    };
    let failure = match answer.await {
        Ok(Ok(sequence)) => {
            crate::replica::crash_point("failback-taken-over");
            let hosted = lock(&slot).hosted.take();
            let Some(hosted) = hosted else {
                // The old primary's connection took the VM to close, and finishes it.
                lock(&slot).failback = None;
                return Ok(sequence);
            };
            let closed = hosted.close().await;
            return blocking(vm, move || {
                let mut guard = lock(&slot);
                guard.failback = None;
                // Not closed (its disks still held): the record stays, and a restart of this
                // server finishes the failback.
                closed?;
                finish_failback(&mut guard, sequence)?;
                Ok(sequence)
            })
            .await;
        }
        Ok(Err(failure)) => failure,
        Err(_) => HandoverFailure::Unknown("replication back stopped".into()),
    };
    blocking(vm, move || {
        let mut guard = lock(&slot);
        let mut state = lock(&state);
        state.called_off = true;
        guard.failback = None;
        let recorded = guard
            .replica
            .failover()
            .and_then(|failover| failover.handing_back);
        match (&failure, recorded) {
            // The old primary connected meanwhile: the failback was settled, or is being
            // settled (its connection took the VM to close).
            (_, _) if guard.replica.failover().is_none() => {
                Ok(state.recorded.unwrap_or_default())
            }
            (_, Some(sequence)) if guard.hosted.is_none() => Ok(sequence),
            // Asked to take over, and no answer: it may run the VM. The writes stay
            // stopped; the failback is settled when it connects again.
            (HandoverFailure::Unknown(_), Some(_)) if state.recorded.is_some() => Err(Error::Replication {
                peer: guard.machine_name(),
                problem: format!(
                    "{failure}; the failback completes when the old primary connects again"
                ),
            }),
            _ => {
                // Not handed over: the VM goes on running here.
                if recorded.is_some() {
                    guard.replica.set_handing_back(None).map_err(|error| {
                        Error::Replication {
                            peer: guard.machine_name(),
                            problem: format!("{failure}; and the record of the failback cannot be removed, so the VM's writes stay stopped: {error}"),
                        }
                    })?;
                }
                if let Some(hosted) = guard.hosted.as_mut() {
                    hosted.resume_writes()?;
                }
                Err(Error::Replication {
                    peer: guard.machine_name(),
                    problem: failure.to_string(),
                })
            }
        }
    })
    .await
}

/// A failback in progress, as its final-delta hook and its failure path see it.
#[derive(Debug, Default)]
pub(super) struct Failback {
    /// The failback failed and was answered: the hook must not record it any more.
    pub(super) called_off: bool,
    /// The final delta recorded, when it was.
    pub(super) recorded: Option<u64>,
}

/// The hook a failback runs once the old primary has applied the final delta and before it
/// is asked to take the VM over: the VM's writes are made durable here, then the final
/// delta is recorded (`FailoverRecord::handing_back`), so that from then on a restart of this
/// server, or a reconnection of the old primary, never runs the VM here again.
pub(super) fn record_final_delta(
    this: std::sync::Weak<Mutex<VmSlot>>,
    state: Arc<Mutex<Failback>>,
) -> BeforeTakeOver {
    Arc::new(move |sequence| {
        let slot = this.upgrade().ok_or("the replica server is stopping")?;
        let mut guard = lock(&slot);
        let mut state = lock(&state);
        if state.called_off {
            return Err("the failback was called off".into());
        }
        if let Some(hosted) = &guard.hosted {
            hosted.flush().map_err(|error| error.to_string())?;
        }
        guard
            .replica
            .set_handing_back(Some(sequence))
            .map_err(|error| error.to_string())?;
        state.recorded = Some(sequence);
        crate::replica::crash_point("failback-final-delta-recorded");
        Ok(())
    })
}

/// The VM runs at the old primary since a failback at delta `sequence`: this is its replica
/// again (the VM no longer runs here: its writes stopped before the final delta).
pub(super) fn finish_failback(slot: &mut VmSlot, sequence: u64) -> Result<()> {
    if slot.replica.failover().is_none() {
        // Finished already, by the old primary's connection or by the failback itself.
        return Ok(());
    }
    slot.replica.hand_back(sequence)?;
    let vm = slot.machine_name();
    slot.machine = Replica::new(&vm, slot.replica.record());
    // The third site's copy is older than the failover: it starts again.
    extend(slot, true);
    tracing::info!(%vm, sequence, "failback done: the VM runs at the other site; this is its replica again");
    Ok(())
}

/// A failback whose outcome was not known here (its server restarted, or the old primary's
/// answer was lost): the old primary holds the final delta and may run the VM already, so it
/// is settled as handed back. The old primary takes the VM over when it connects, if it has
/// not yet. Returns whether there was one to settle.
pub(super) async fn settle_failback(slot: &Arc<Mutex<VmSlot>>, owner: &str) -> Result<bool> {
    let (sequence, hosted) = {
        let mut guard = lock(slot);
        let handing_back = guard
            .replica
            .failover()
            .and_then(|failover| failover.handing_back);
        let Some(sequence) = handing_back else {
            return Ok(false);
        };
        // Only the VM's owner settles a failback; while the VM is being closed (by the
        // failback itself, or another settling) the owner connects again.
        if guard.machine.record().owner.as_deref() != Some(owner) {
            return Ok(false);
        }
        let Some(hosted) = guard.hosted.take() else {
            return Ok(false);
        };
        // A failback still waiting for its answer hears it from here: it is called off, and
        // finds the VM handed back.
        if let Some(running) = &guard.failback {
            lock(running).called_off = true;
        }
        (sequence, hosted)
    };
    tracing::warn!(
        sequence,
        "a failback was interrupted after its final delta: the VM runs at the other site, not here"
    );
    let closed = hosted.close().await;
    let slot = Arc::clone(slot);
    let vm = lock(&slot).machine_name();
    blocking(&vm, move || {
        let mut guard = lock(&slot);
        // Not closed (its disks still held): the record stays, and a restart of this server
        // finishes the failback.
        closed?;
        finish_failback(&mut guard, sequence)
    })
    .await?;
    Ok(true)
}
