//! The replica side of the protocol for one VM, as a state machine with no I/O. It checks who
//! may write the VM and in which order deltas may come, collects a delta's chunks (in any
//! order, from several streams, again after a dropped link) and says when to commit it. The
//! driver stages chunks, commits deltas and reports back; the VM's state outlives connections,
//! so a primary that reconnects is told exactly what is already staged.

use super::chunks::ChunkSet;
use super::message::{
    DeltaId, DeltaKind, DiskDescription, Message, PROTOCOL_VERSION, RefusalCode, Staged,
};
use bytes::Bytes;
use std::collections::VecDeque;

/// Which connection of the driver's a message came on or goes to.
pub type ConnectionId = u64;

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaAction {
    Send {
        connection: ConnectionId,
        message: Message,
    },
    /// A new VM: create its catalogue and empty disks before anything is staged.
    PrepareDisks {
        disks: Vec<DiskDescription>,
        owner: String,
    },
    /// A copy that had to be compared (seeded by hand, or changed outside blockrep) was
    /// compared by its primary: record the primary's disk ids and that the copy is an
    /// ordinary replica from now on.
    AdoptSeed { disks: Vec<DiskDescription> },
    /// Set up staging for a delta, dropping whatever was staged of another one. An initial
    /// delta is staged into new, empty disks; changes into a staging file.
    StartStaging { delta: DeltaId, kind: DeltaKind },
    /// Stage one chunk (verify it first), then call `chunk_staged` or `chunk_not_staged`.
    StageChunk {
        delta: DeltaId,
        index: u32,
        disk: u16,
        payload: Bytes,
    },
    /// Every chunk is staged and the primary has sent them all: make the delta the replica's
    /// state atomically on every disk, then call `committed` or `commit_failed`.
    Commit {
        delta: DeltaId,
        kind: DeltaKind,
        /// The primary froze its applications for this delta's cut.
        app_consistent: bool,
    },
    /// Planned failover: the primary's final delta is applied here. Compute this replica's
    /// digest of every disk with `seed`, compare with `digests`, take the VM over when they
    /// match, then call `handover_verified`.
    VerifyHandover {
        connection: ConnectionId,
        sequence: u64,
        seed: u64,
        digests: Vec<u128>,
        reverse: bool,
    },
    /// Drop a connection.
    Close {
        connection: ConnectionId,
        reason: String,
    },
}

#[derive(Debug)]
struct Staging {
    delta: DeltaId,
    kind: DeltaKind,
    chunks: u32,
    staged: ChunkSet,
    /// Handed to the driver, not yet confirmed.
    requested: ChunkSet,
    end: bool,
    app_consistent: bool,
}

/// What a replica knows of a VM when it starts: from its catalogue.
#[derive(Debug, Clone, Default)]
pub struct ReplicaVmRecord {
    pub disks: Option<Vec<DiskDescription>>,
    /// The last delta applied; 0 before initial replication completes.
    pub applied: u64,
    /// The identity of the primary allowed to replicate this VM.
    pub owner: Option<String>,
    /// Replication from the primary is fenced off (the VM failed over to the replica site):
    /// why, and whether for good (a committed failover) or until the failover is cancelled.
    pub fenced: Option<Fence>,
    /// A planned failover handed the VM to this site at this delta: a primary that missed
    /// the confirmation is told again.
    pub handed_over: Option<u64>,
    /// The copy was seeded by hand (from a copy or a backup): the primary must compare by
    /// hash before replicating, and its disks' ids are taken from its first hello.
    pub seeded: bool,
    /// The replica host's operator allowed the next initial replication to replace a replica
    /// that holds deltas (and drop its recovery points). A primary alone never may.
    pub reinitialize: bool,
    /// Why the replica's disks may differ from what it applied (changed outside blockrep):
    /// the primary must compare by hash before anything more is applied.
    pub compare_required: Option<String>,
}

/// Why a replica takes nothing from its primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub reason: String,
    pub permanent: bool,
}

impl Fence {
    /// What a primary fenced off is told.
    pub fn code(&self) -> RefusalCode {
        if self.permanent {
            RefusalCode::FailedOverForGood
        } else {
            RefusalCode::FailedOver
        }
    }
}

/// Why the replica site did not take a VM over: the code the primary acts on, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverRefusal {
    pub code: RefusalCode,
    pub reason: String,
}

impl HandoverRefusal {
    /// Refused for `reason`: the disks differ, or cannot be compared or run here.
    pub fn refused(reason: impl Into<String>) -> Self {
        HandoverRefusal {
            code: RefusalCode::HandoverRefused,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for HandoverRefusal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.reason)
    }
}

/// The replica's state machine for one VM.
#[derive(Debug)]
pub struct Replica {
    vm: String,
    record: ReplicaVmRecord,
    connection: Option<ConnectionId>,
    staging: Option<Staging>,
    committing: Option<DeltaId>,
    failed: Option<String>,
    actions: VecDeque<ReplicaAction>,
    /// Chunks that arrived on a data stream before their delta's begin (streams are not
    /// ordered with each other), held until it comes.
    early: Vec<(DeltaId, u32, u16, Bytes)>,
    /// The connection whose primary compared the disks by hash before its hello.
    compared_on: Option<ConnectionId>,
}

/// Early chunks held at most, in count and in bytes: a chunk is under 1.1 MiB and the
/// primary's window of 32 bounds what can arrive before the begin, so a primary that follows
/// the protocol never reaches either; a frame may be 8 MiB, so the count alone would let a
/// hostile one park 512 MiB per VM.
const EARLY_LIMIT: usize = 64;
const EARLY_BYTES_LIMIT: usize = 40 << 20;

impl Replica {
    pub fn new(vm: &str, record: ReplicaVmRecord) -> Self {
        Replica {
            vm: vm.to_owned(),
            record,
            connection: None,
            staging: None,
            committing: None,
            failed: None,
            actions: VecDeque::new(),
            early: Vec::new(),
            compared_on: None,
        }
    }

    /// The primary on `connection` compared the disks by hash (a resynchronization) before its
    /// hello.
    pub fn compared(&mut self, connection: ConnectionId) {
        self.compared_on = Some(connection);
    }

    pub fn poll_action(&mut self) -> Option<ReplicaAction> {
        self.actions.pop_front()
    }

    pub(crate) fn applied(&self) -> u64 {
        self.record.applied
    }

    pub(crate) fn record(&self) -> &ReplicaVmRecord {
        &self.record
    }

    /// The connection currently replicating this VM.
    pub fn connection(&self) -> Option<ConnectionId> {
        self.connection
    }

    /// A primary introduced itself on `connection`; `owner` is its authenticated identity.
    pub fn hello(
        &mut self,
        connection: ConnectionId,
        owner: &str,
        version: u16,
        disks: Vec<DiskDescription>,
    ) {
        let refuse = |this: &mut Self, code: RefusalCode, reason: String| {
            this.send(
                connection,
                Message::Refused {
                    code,
                    reason: reason.clone(),
                },
            );
            this.actions
                .push_back(ReplicaAction::Close { connection, reason });
        };
        if version != PROTOCOL_VERSION {
            return refuse(
                self,
                RefusalCode::Version,
                format!(
                    "protocol version {version} is not supported (this replica speaks {PROTOCOL_VERSION})"
                ),
            );
        }
        if let Some(known) = &self.record.owner
            && known != owner
        {
            return refuse(
                self,
                RefusalCode::NotThisReplica,
                format!(
                    "{} is replicated from another primary ({known}); remove its replica to protect it from {owner}",
                    self.vm
                ),
            );
        }
        let compared = self.compared_on == Some(connection);
        if let Some(reason) = self.record.compare_required.clone() {
            if !compared {
                // The primary compares on its next connection, then says hello on it.
                return refuse(
                    self,
                    RefusalCode::ResynchronizationRequired,
                    format!("{}: {reason}: resynchronization required", self.vm),
                );
            }
            if self.record.disks.as_ref() == Some(&disks) {
                self.record.compare_required = None;
                self.actions.push_back(ReplicaAction::AdoptSeed {
                    disks: disks.clone(),
                });
            }
        }
        if self.record.seeded {
            if !compared {
                return refuse(
                    self,
                    RefusalCode::SeededCopy,
                    format!(
                        "{}: this replica was seeded from a copy; start the primary with `--initial existing` so the copies are compared first",
                        self.vm
                    ),
                );
            }
            let same_shape = self.record.disks.as_ref().is_some_and(|known| {
                known.len() == disks.len()
                    && known.iter().zip(&disks).all(|(seeded, primary)| {
                        seeded.virtual_size == primary.virtual_size
                            && seeded.logical_sector == primary.logical_sector
                    })
            });
            if same_shape {
                self.record.seeded = false;
                self.record.disks = Some(disks.clone());
                self.actions.push_back(ReplicaAction::AdoptSeed {
                    disks: disks.clone(),
                });
            }
        }
        match &self.record.disks {
            Some(known) if *known != disks => {
                return refuse(
                    self,
                    RefusalCode::NotThisReplica,
                    format!(
                        "{}: the primary's disks ({}) differ from the replica's ({}); remove the replica to start again",
                        self.vm,
                        describe(&disks),
                        describe(known)
                    ),
                );
            }
            Some(_) => {}
            None => {
                self.record.disks = Some(disks.clone());
                self.record.owner = Some(owner.to_owned());
                self.actions.push_back(ReplicaAction::PrepareDisks {
                    disks,
                    owner: owner.to_owned(),
                });
            }
        }
        if let Some(reason) = &self.failed {
            let reason = format!("{}: {reason}", self.vm);
            return refuse(self, RefusalCode::ReplicaFailed, reason);
        }
        if let Some(sequence) = self.record.handed_over {
            self.send(connection, Message::HandedOver { sequence });
            self.actions.push_back(ReplicaAction::Close {
                connection,
                reason: "handed over by a planned failover".into(),
            });
            return;
        }
        if let Some(fence) = &self.record.fenced {
            let reason = format!("{}: {}", self.vm, fence.reason);
            return refuse(self, fence.code(), reason);
        }
        if let Some(previous) = self.connection.replace(connection)
            && previous != connection
        {
            self.actions.push_back(ReplicaAction::Close {
                connection: previous,
                reason: "replaced by a new connection from the same primary".into(),
            });
        }
        let staged = self.staging.as_ref().map(|staging| Staged {
            delta: staging.delta,
            received: staging.staged.ranges().to_vec(),
        });
        self.send(
            connection,
            Message::Welcome {
                version: PROTOCOL_VERSION,
                applied: self.record.applied,
                staged,
            },
        );
    }

    /// A message (other than Hello) arrived on `connection`.
    pub fn handle_message(&mut self, connection: ConnectionId, message: Message) {
        if self.connection != Some(connection) {
            // A connection this VM no longer listens to (replaced, or never welcomed).
            return;
        }
        if let Message::Chunk { delta, .. } | Message::DeltaEnd { delta } = &message
            && delta.sequence <= self.record.applied
        {
            // Resent before the primary heard the delta was applied: already in place.
            return;
        }
        match message {
            Message::DeltaBegin {
                delta,
                kind,
                chunks,
                recovery_point: _,
                app_consistent,
            } => self.begin(connection, delta, kind, chunks, app_consistent),
            Message::Chunk {
                delta,
                index,
                disk,
                payload,
            } => {
                let disks = self.record.disks.as_ref().map_or(0, Vec::len);
                let Some(staging) = self
                    .staging
                    .as_mut()
                    .filter(|staging| staging.delta == delta)
                else {
                    if delta.sequence == self.record.applied + 1
                        && self.committing.is_none()
                        && self.early.len() < EARLY_LIMIT
                        && self.early_bytes() + payload.len() <= EARLY_BYTES_LIMIT
                    {
                        self.early.push((delta, index, disk, payload));
                        return;
                    }
                    return self.violation(
                        connection,
                        format!("chunk {index} of {delta}, which was not begun"),
                    );
                };
                if index >= staging.chunks || usize::from(disk) >= disks {
                    let chunks = staging.chunks;
                    return self.violation(
                        connection,
                        format!("chunk {index} for disk {disk} is outside {delta} ({chunks} chunks, {disks} disks)"),
                    );
                }
                // Every staged chunk was requested first: one set answers for both.
                if staging.requested.contains(index) {
                    return;
                }
                staging.requested.insert(index);
                self.actions.push_back(ReplicaAction::StageChunk {
                    delta,
                    index,
                    disk,
                    payload,
                });
            }
            Message::DeltaEnd { delta } => {
                match self
                    .staging
                    .as_mut()
                    .filter(|staging| staging.delta == delta)
                {
                    Some(staging) => staging.end = true,
                    None => {
                        return self
                            .violation(connection, format!("end of {delta}, which was not begun"));
                    }
                }
                self.commit_when_complete();
            }
            Message::Handover {
                sequence,
                seed,
                digests,
                reverse,
            } => {
                if self.staging.is_some() || self.committing.is_some() {
                    return self.violation(
                        connection,
                        "a failover handover while a delta is staged".into(),
                    );
                }
                if sequence != self.record.applied {
                    let reason = format!(
                        "{}: the primary hands over at delta {sequence}, this replica is at {}",
                        self.vm, self.record.applied
                    );
                    self.send(
                        connection,
                        Message::Refused {
                            code: RefusalCode::HandoverRefused,
                            reason: reason.clone(),
                        },
                    );
                    return;
                }
                self.actions.push_back(ReplicaAction::VerifyHandover {
                    connection,
                    sequence,
                    seed,
                    digests,
                    reverse,
                });
            }
            Message::Goodbye => {
                self.connection = None;
                self.actions.push_back(ReplicaAction::Close {
                    connection,
                    reason: "the primary said goodbye".into(),
                });
            }
            other => self.violation(connection, format!("unexpected message {other:?}")),
        }
    }

    fn begin(
        &mut self,
        connection: ConnectionId,
        delta: DeltaId,
        kind: DeltaKind,
        chunks: u32,
        app_consistent: bool,
    ) {
        if self.committing.is_some() {
            return self.violation(connection, format!("{delta} begun while another commits"));
        }
        if delta.sequence != self.record.applied + 1 {
            let reason = format!(
                "{}: {delta} does not follow the last applied delta {} (gap): resynchronization required",
                self.vm, self.record.applied
            );
            return self.refuse_for_good(connection, RefusalCode::Gap, reason);
        }
        if kind == DeltaKind::Initial && self.record.applied > 0 && !self.record.reinitialize {
            // Recovery points are what is left when the primary itself is compromised: a
            // primary alone cannot throw them away.
            let reason = format!(
                "{}: the replica holds delta {} and its recovery points; an initial replication would replace them. The replica host's operator must allow it first (`blockrep reinitialize {}`), or the primary compares instead (`--initial auto`)",
                self.vm, self.record.applied, self.vm
            );
            return self.refuse_for_good(connection, RefusalCode::ReinitializeNeedsConsent, reason);
        }
        if kind == DeltaKind::Changes && self.record.applied == 0 {
            return self.violation(
                connection,
                format!("{delta} holds changes, but initial replication has not completed"),
            );
        }
        if self
            .staging
            .as_ref()
            .is_some_and(|staging| staging.delta == delta)
        {
            return;
        }
        self.staging = Some(Staging {
            delta,
            kind,
            chunks,
            staged: ChunkSet::new(),
            requested: ChunkSet::new(),
            end: false,
            app_consistent,
        });
        self.actions
            .push_back(ReplicaAction::StartStaging { delta, kind });
        for (early, index, disk, payload) in std::mem::take(&mut self.early) {
            if early == delta {
                self.handle_message(
                    connection,
                    Message::Chunk {
                        delta,
                        index,
                        disk,
                        payload,
                    },
                );
            }
        }
    }

    /// The driver staged chunk `index` durably enough to survive a dropped link.
    pub fn chunk_staged(&mut self, delta: DeltaId, index: u32) {
        let Some(staging) = self
            .staging
            .as_mut()
            .filter(|staging| staging.delta == delta)
        else {
            return;
        };
        staging.staged.insert(index);
        if let Some(connection) = self.connection {
            self.send(
                connection,
                Message::ChunksStaged {
                    delta,
                    received: std::iter::once(index..index + 1).collect(),
                },
            );
        }
        self.commit_when_complete();
    }

    /// The driver refused a chunk (its checksums failed, or it does not fit the disk). The
    /// primary is told to send it again on a new connection.
    pub fn chunk_refused(&mut self, delta: DeltaId, index: u32, reason: &str) {
        self.forget_request(delta, index);
        if let Some(connection) = self.connection {
            self.violation(connection, format!("chunk {index} of {delta}: {reason}"));
        }
    }

    /// Staging failed with `error`: a chunk that does not verify is the primary's fault (a
    /// protocol violation); storage that fails (a full store, an I/O error) is this side's,
    /// and the primary is told so and retries, the delta resumed from what is staged.
    pub fn chunk_not_staged(&mut self, delta: DeltaId, index: u32, error: &crate::Error) {
        if !matches!(error, crate::Error::Io { .. }) {
            return self.chunk_refused(delta, index, &error.to_string());
        }
        self.forget_request(delta, index);
        // Shown in the replica's status until its replica is reopened (at the primary's next
        // hello), as a failed commit is.
        self.failed = Some(format!("staging {delta} failed: {error}"));
        if let Some(connection) = self.connection.take() {
            let reason = format!("{}: the replica cannot stage {delta}: {error}", self.vm);
            self.send(
                connection,
                Message::Refused {
                    code: RefusalCode::ReplicaFailed,
                    reason: reason.clone(),
                },
            );
            self.actions
                .push_back(ReplicaAction::Close { connection, reason });
        }
    }

    /// Forgets that chunk `index` was handed to the driver, so that a resend is staged.
    fn forget_request(&mut self, delta: DeltaId, index: u32) {
        if let Some(staging) = self
            .staging
            .as_mut()
            .filter(|staging| staging.delta == delta)
        {
            staging.requested.remove(index);
        }
    }

    /// The delta is applied on every disk, durably.
    pub fn committed(&mut self, delta: DeltaId) {
        if self.committing != Some(delta) {
            return;
        }
        self.committing = None;
        // The operator's consent to replace the replica serves one initial replication.
        if self
            .staging
            .as_ref()
            .is_some_and(|staging| staging.kind == DeltaKind::Initial)
        {
            self.record.reinitialize = false;
        }
        self.staging = None;
        self.record.applied = delta.sequence;
        if let Some(connection) = self.connection {
            self.send(connection, Message::Applied { delta });
        }
    }

    /// The replica compared its disks for a planned failover: on success the VM runs here
    /// from now on and the primary is told; otherwise it is told why not.
    pub fn handover_verified(
        &mut self,
        connection: ConnectionId,
        sequence: u64,
        outcome: Result<(), HandoverRefusal>,
    ) {
        match outcome {
            Ok(()) => {
                self.send(connection, Message::HandedOver { sequence });
                self.record.fenced = Some(Fence {
                    reason: "the VM runs at this site since a planned failover".into(),
                    permanent: true,
                });
                self.record.handed_over = Some(sequence);
                if self.connection == Some(connection) {
                    self.connection = None;
                }
            }
            Err(refusal) => {
                self.send(
                    connection,
                    Message::Refused {
                        code: refusal.code,
                        reason: format!("{}: {}", self.vm, refusal.reason),
                    },
                );
            }
        }
    }

    /// The commit failed; the VM takes no more deltas until the driver has reopened its replica
    /// (`recovered`).
    pub fn commit_failed(&mut self, delta: DeltaId, reason: &str) {
        if self.committing != Some(delta) {
            return;
        }
        self.committing = None;
        self.failed = Some(format!("applying {delta} failed: {reason}"));
        if let Some(connection) = self.connection.take() {
            self.send(
                connection,
                Message::Refused {
                    code: RefusalCode::ReplicaFailed,
                    reason: format!("{}: applying {delta} failed: {reason}", self.vm),
                },
            );
            self.actions.push_back(ReplicaAction::Close {
                connection,
                reason: reason.to_owned(),
            });
        }
    }

    /// Fences replication off (a failover) or lifts the fence (`None`: the failover was
    /// cancelled). A connected primary is refused at once.
    pub fn fence(&mut self, fence: Option<Fence>) {
        self.record.fenced = fence.clone();
        if let (Some(fence), Some(connection)) = (fence, self.connection.take()) {
            let reason = format!("{}: {}", self.vm, fence.reason);
            self.send(
                connection,
                Message::Refused {
                    code: fence.code(),
                    reason: reason.clone(),
                },
            );
            self.actions
                .push_back(ReplicaAction::Close { connection, reason });
        }
    }

    /// A connection ended. Staged chunks stay for the primary to resume.
    pub fn disconnected(&mut self, connection: ConnectionId) {
        if self.connection == Some(connection) {
            self.connection = None;
        }
    }

    /// The driver reopened the VM's replica after a failed commit, which finished or rolled
    /// back the interrupted commit from what was durable: deltas are taken again from
    /// `record`'s applied sequence, and nothing staged before counts.
    fn early_bytes(&self) -> usize {
        self.early
            .iter()
            .map(|(_, _, _, payload)| payload.len())
            .sum()
    }

    /// The replica host's operator allowed an initial replication to replace the replica.
    pub fn allow_reinitialize(&mut self) {
        self.record.reinitialize = true;
    }

    pub fn recovered(&mut self, record: ReplicaVmRecord) {
        self.failed = None;
        self.staging = None;
        self.committing = None;
        self.early.clear();
        self.record = record;
    }

    /// The failure that stopped this VM, if one did.
    pub(crate) fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The delta being staged: its id, chunks staged and total.
    pub(crate) fn staging(&self) -> Option<(DeltaId, u64, u32)> {
        self.staging
            .as_ref()
            .map(|staging| (staging.delta, staging.staged.len(), staging.chunks))
    }

    fn commit_when_complete(&mut self) {
        let Some(staging) = &self.staging else {
            return;
        };
        if staging.end && staging.staged.covers(staging.chunks) && self.committing.is_none() {
            let (delta, kind, app_consistent) =
                (staging.delta, staging.kind, staging.app_consistent);
            self.committing = Some(delta);
            #[cfg(feature = "planted-bugs")]
            if crate::planted::is_planted(crate::planted::Bug::ConfirmBeforeDurable)
                && let Some(connection) = self.connection
            {
                self.send(connection, Message::Applied { delta });
            }
            self.actions.push_back(ReplicaAction::Commit {
                delta,
                kind,
                app_consistent,
            });
        }
    }

    fn send(&mut self, connection: ConnectionId, message: Message) {
        self.actions.push_back(ReplicaAction::Send {
            connection,
            message,
        });
    }

    /// Tells the primary why it is refused (retrying will not help) and closes its connection.
    fn refuse_for_good(&mut self, connection: ConnectionId, code: RefusalCode, reason: String) {
        self.send(
            connection,
            Message::Refused {
                code,
                reason: reason.clone(),
            },
        );
        self.actions
            .push_back(ReplicaAction::Close { connection, reason });
    }

    fn violation(&mut self, connection: ConnectionId, reason: String) {
        if self.connection == Some(connection) {
            self.connection = None;
        }
        self.actions.push_back(ReplicaAction::Close {
            connection,
            reason: format!("{}: protocol violation: {reason}", self.vm),
        });
    }
}

fn describe(disks: &[DiskDescription]) -> String {
    disks
        .iter()
        .map(|disk| format!("{} of {} bytes", disk.disk_id, disk.virtual_size))
        .collect::<Vec<_>>()
        .join(", ")
}
