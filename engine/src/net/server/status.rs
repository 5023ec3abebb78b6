//! What the server reports of each VM it keeps: state, health, progress and totals, for
//! `blockrep status` and the metrics endpoint.

use super::*;

/// What the status socket reports for each VM on the replica.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicaReport {
    pub vm: String,
    /// The VM's replica was busy when asked (hashing its disks for a comparison, say, which
    /// takes minutes on a large disk): the other figures are the last ones read, if any.
    pub busy: bool,
    pub primary: Option<String>,
    pub connected: bool,
    pub applied_sequence: u64,
    /// The delta being staged: sequence, chunks staged, chunks in all.
    pub staging: Option<(u64, u64, u32)>,
    pub error: Option<String>,
    /// Why the replica's disks may differ from what it applied (changed outside blockrep),
    /// until its primary has compared them.
    pub compare_required: Option<String>,
    pub disks: Vec<String>,
    /// Recovery points kept besides the latest state.
    pub recovery_points: usize,
    /// The point a test failover copy was made of, and where it is.
    pub test_failover: Option<PathBuf>,
    /// The failover to this site, if there is one.
    pub failover: Option<crate::replica::FailoverRecord>,
    /// The VM runs here: replication back to the old primary, when it runs.
    pub reverse: Option<PrimaryReport>,
    /// Extended replication of this replica to a third site, when configured.
    pub extended: Option<PrimaryReport>,
    /// Chunk bytes staged (as received: compressed), since the server started.
    pub staged_bytes_total: u64,
    /// Deltas applied since the server started, and the seconds their commits took: apply
    /// throughput is the staged bytes over those seconds.
    pub applied_deltas_total: u64,
    pub apply_seconds_total: f64,
}

/// A VM's report, read off its slot.
pub(super) fn report(vm: String, slot: &VmSlot) -> ReplicaReport {
    ReplicaReport {
        vm,
        busy: false,
        primary: slot.machine.record().owner.clone(),
        connected: slot.machine.connection().is_some(),
        applied_sequence: slot.machine.applied(),
        staging: slot
            .machine
            .staging()
            .map(|(delta, staged, total)| (delta.sequence, staged, total)),
        error: slot.machine.failure().map(str::to_owned),
        compare_required: slot.replica.compare_required().map(str::to_owned),
        disks: slot
            .replica
            .disk_paths()
            .iter()
            .map(|path| path.display().to_string())
            .collect(),
        recovery_points: slot.replica.points().len().saturating_sub(1),
        test_failover: slot.replica.test_failover(),
        failover: slot.replica.failover(),
        reverse: slot.hosted.as_ref().and_then(HostedVm::report),
        extended: slot.extended.as_ref().and_then(ExtendedVm::report),
        staged_bytes_total: slot.totals.staged_bytes,
        applied_deltas_total: slot.totals.applied_deltas,
        apply_seconds_total: slot.totals.apply_seconds,
    }
}
