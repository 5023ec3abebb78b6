//! Test and unplanned failovers on the server: the step is decided by the VM's
//! `ReplicaSite`, the point is copied piece by piece under the VM's lock.

use super::*;

/// A test failover's copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestCopy {
    pub vm: String,
    /// The point copied: the delta sequence the replica was at.
    pub point: u64,
    pub disks: Vec<PathBuf>,
}

pub(super) fn test_failover(
    slot: &Mutex<VmSlot>,
    vm: &str,
    point: Option<u64>,
    out: &Path,
) -> Result<TestCopy> {
    let copy = lock(slot).replica_site().begin_test_failover(point, out)?;
    let done = |copy: &TestCopy| ReplicationEvent::TestFailoverCreated {
        point: copy.point,
        disks: copy.disks.clone(),
    };
    make_copy(slot, vm, copy, done)
}

pub(super) fn unplanned_failover(
    slot: &Mutex<VmSlot>,
    vm: &str,
    point: Option<u64>,
    force: bool,
) -> Result<TestCopy> {
    let copy = {
        let mut guard = lock(slot);
        let copy = guard
            .replica_site()
            .begin_unplanned_failover(point, force)?;
        drive(&mut guard);
        copy
    };
    tracing::warn!(%vm, point = copy.target, "unplanned failover: replication from the primary is fenced off");
    make_copy(slot, vm, copy, |copy| ReplicationEvent::FailedOver {
        point: copy.point,
    })
}

/// Copies the point `copy` names, taking the VM's lock for each piece so that commits go on
/// between them, then ends it and tells `done` of it (under the VM's lock, so the event is in
/// order with the VM's other steps).
pub(super) fn make_copy(
    slot: &Mutex<VmSlot>,
    vm: &str,
    copy: PointCopy,
    done: impl FnOnce(&TestCopy) -> ReplicationEvent,
) -> Result<TestCopy> {
    let made = crate::replica::copy_point(
        &mut |piece| lock(slot).replica_site().copy_piece(&copy, piece),
        copy.pinned_at,
        copy.target,
        copy.disks,
        &copy.out,
    );
    let mut guard = lock(slot);
    let target = copy.target;
    let ended = guard.replica_site().end_copy(copy, made);
    drive(&mut guard);
    let made = TestCopy {
        vm: vm.to_owned(),
        point: target,
        disks: ended?,
    };
    guard.site.send(vm, done(&made));
    Ok(made)
}
