//! Carrying out what a VM's `ReplicaSite` returns: sending, closing, applying, and taking a
//! VM over in a planned failover.

use super::*;

/// Carries out what the machine asks until it asks nothing more.
pub(super) fn drive(slot: &mut VmSlot) {
    while let Some(effect) = slot.replica_site().poll_effect() {
        match effect {
            SiteEffect::Send {
                connection,
                message,
            } => send(slot, connection, message),
            SiteEffect::Close { connection, reason } => close(slot, connection, reason),
            SiteEffect::Staged { bytes } => slot.totals.staged_bytes += bytes,
            SiteEffect::StoreFailed { step, reason } => {
                tracing::error!(%reason, "{step} failed");
                close_all(slot, &reason);
            }
            SiteEffect::Apply {
                delta,
                kind,
                app_consistent,
            } => apply(slot, delta, kind, app_consistent),
            SiteEffect::VerifyHandover {
                connection,
                sequence,
                seed,
                digests,
                reverse,
            } => take_over(slot, connection, sequence, seed, &digests, reverse),
        }
    }
}

pub(super) fn send(slot: &VmSlot, connection: ConnectionId, message: Message) {
    if let Some(peer) = slot.connections.get(&connection) {
        let _ = peer.outgoing.send(message);
    }
}

pub(super) fn close(slot: &mut VmSlot, connection: ConnectionId, reason: String) {
    if let Some(peer) = slot.connections.remove(&connection) {
        tracing::info!(%reason, "closing a connection");
        // What is queued (a refusal, say) is delivered before the close.
        let Peer {
            connection,
            outgoing,
            writer,
        } = peer;
        drop(outgoing);
        drop(slot.runtime.spawn(async move {
            let _ = writer.await;
            connection.close(0u32.into(), reason.as_bytes());
        }));
    }
}

pub(super) fn apply(slot: &mut VmSlot, delta: DeltaId, kind: DeltaKind, app_consistent: bool) {
    let started = std::time::Instant::now();
    if let Err(error) = slot.replica_site().apply(delta, kind, app_consistent) {
        tracing::error!(%delta, %error, "applying failed");
        return;
    }
    let apply_time = started.elapsed();
    slot.totals.applied_deltas += 1;
    slot.totals.apply_seconds += apply_time.as_secs_f64();
    tracing::info!(%delta, ?kind, seconds = apply_time.as_secs_f64(), "applied");
    slot.site.send(
        slot.replica.vm(),
        ReplicationEvent::DeltaApplied {
            sequence: delta.sequence,
            apply_time,
        },
    );
    if let Some(extended) = &slot.extended {
        extended.source_changed();
    }
    let replaced = slot.replica.take_detached();
    if replaced {
        // New disk files: onward replication starts again from them.
        slot.extended = None;
    }
    extend(slot, replaced);
}

/// A planned failover: the VM is taken over and run here when the disks compare equal; the
/// primary is told only once it runs (told too early, it would leave the VM running nowhere).
pub(super) fn take_over(
    slot: &mut VmSlot,
    connection: ConnectionId,
    sequence: u64,
    seed: u64,
    digests: &[u128],
    reverse: bool,
) {
    let vm = slot.machine_name();
    let outcome = slot
        .replica_site()
        .verify_handover(sequence, seed, digests, reverse)
        .and_then(|()| {
            host(slot, &vm, true)
                .map_err(|error| slot.replica_site().not_hosted(sequence, &error.to_string()))
        });
    match &outcome {
        Ok(()) => {
            tracing::info!(%vm, sequence, reverse, "planned failover: the disks equal the primary's; the VM runs here now");
            slot.site.send(
                &vm,
                ReplicationEvent::HandoverAccepted { sequence, reverse },
            );
        }
        Err(refusal) => {
            tracing::error!(%vm, reason = %refusal, "refused a planned failover");
            slot.site.send(
                &vm,
                ReplicationEvent::HandoverRefused {
                    reason: refusal.reason.clone(),
                },
            );
        }
    }
    slot.replica_site()
        .handover_verified(connection, sequence, outcome);
}

pub(super) fn close_all(slot: &mut VmSlot, reason: &str) {
    for (_, peer) in slot.connections.drain() {
        peer.connection.close(5u32.into(), reason.as_bytes());
    }
}
