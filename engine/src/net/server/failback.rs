//! A VM that runs here handed back to its first host (failback), and settling one a crash
//! interrupted. The decisions are the engine's (`replica::failback`); this carries them out:
//! it stops and resumes the VM's writes, flushes and closes its disks, and waits for answers.

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
            let (hosted_state, under_way) = (guard.hosted_state(), guard.failback.is_some());
            guard
                .replica_site()
                .may_fail_back(under_way, hosted_state)?;
            let before_take_over = record_final_delta(guard.this.clone(), Arc::clone(&state));
            let Some(hosted) = guard.hosted.as_mut() else {
                unreachable!("may_fail_back refuses a VM that does not run here");
            };
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
        let answer_unknown = matches!(failure, HandoverFailure::Unknown(_));
        let hosted_state = guard.hosted_state();
        let end = guard
            .replica_site()
            .failback_failed(answer_unknown, state.recorded, hosted_state)
            .map_err(|error| Error::Replication {
                peer: guard.machine_name(),
                problem: format!("{failure}; {error}"),
            })?;
        match end {
            FailbackEnd::HandedBack { sequence } => Ok(sequence),
            FailbackEnd::Open => Err(Error::Replication {
                peer: guard.machine_name(),
                problem: format!(
                    "{failure}; the failback completes when the old primary connects again"
                ),
            }),
            FailbackEnd::RunsHere => {
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
/// is asked to take the VM over: the VM's writes are made durable, then the engine records
/// the final delta (`ReplicaSite::record_final_delta`).
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
            .replica_site()
            .record_final_delta(sequence)
            .map_err(|error| error.to_string())?;
        state.recorded = Some(sequence);
        crate::replica::crash_point("failback-final-delta-recorded");
        Ok(())
    })
}

/// The VM runs at the old primary since a failback at delta `sequence`, and its disks here are
/// closed: this is its replica again, and replicates onward afresh.
pub(super) fn finish_failback(slot: &mut VmSlot, sequence: u64) -> Result<()> {
    if slot.replica_site().finish_failback(sequence)? {
        // The third site's copy is older than the failover: it starts again.
        extend(slot, true);
    }
    Ok(())
}

/// Settles a failback whose outcome was open, when the old primary (`owner`) connects: the
/// VM is closed here and this becomes its replica. Returns whether there was one to settle.
pub(super) async fn settle_failback(slot: &Arc<Mutex<VmSlot>>, owner: &str) -> Result<bool> {
    let (sequence, hosted) = {
        let mut guard = lock(slot);
        let hosted_state = guard.hosted_state();
        let Some(sequence) = guard
            .replica_site()
            .failback_to_settle(Some(owner), hosted_state)
        else {
            return Ok(false);
        };
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
