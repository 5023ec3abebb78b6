//! The primary side of the protocol, as a state machine with no I/O. It decides when to
//! connect, when to cut a delta, which chunks to send and when a delta is safe on the replica;
//! its driver (the QUIC driver, or the simulator) does the connecting, reading and sending and
//! reports back. Time is passed in; `poll_timeout` says when to call `handle_timeout` next.
//!
//! One `Primary` serves one protected VM for the life of the process, across connections:
//! a delta in flight when the link drops is resumed on the next connection from the chunks the
//! replica reports staged, never restarted and never applied twice.

use super::chunks::ChunkSet;
use super::health::{CycleLog, Health};
use super::message::{DeltaId, DeltaKind, DiskDescription, Message, PROTOCOL_VERSION, RefusalCode};
use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

/// How a primary behaves.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub vm: String,
    /// The primary host's name, for the replica's logs and catalogue.
    pub primary: String,
    pub disks: Vec<DiskDescription>,
    /// Replication frequency: the time between cuts.
    pub frequency: Duration,
    /// Chunks sent and not yet confirmed staged, at most: bounds memory in flight.
    pub window: u32,
    /// The first wait before reconnecting; it doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Whether tracking vouches for the replica's copy. When it does not, the first delta is
    /// an initial replication (unless the driver compared the disks by hash first).
    pub tracking: Tracking,
    /// Mixed into the numbers that identify cuts; a driver draws it at random.
    pub seed: u64,
    /// How often a cut is made application-consistent (the driver runs a consistency hook
    /// around it); never when `None`.
    pub app_consistent_every: Option<Duration>,
}

/// Whether change tracking can vouch that the replica's copy plus the changes it tracked is
/// the primary's disks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Tracking {
    /// It can: the changes since the replica's last applied delta are all tracked.
    #[default]
    Vouches,
    /// A disk newly protected: the replica gets its first copy (or is compared by hash, when
    /// it already holds one).
    New,
    /// It cannot (a journal lost or damaged, a disk changed while it was not tracked): a
    /// resynchronization is required, and status says why (health critical) until it is done.
    Lost(String),
}

impl Tracking {
    /// Whether the replica needs a copy or a comparison before tracking's deltas mean anything.
    pub fn owes_copy(&self) -> bool {
        *self != Tracking::Vouches
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Open a connection to the replica, then call `connected` or `connect_failed`.
    Connect,
    /// Send a message on the control stream.
    Send(Message),
    /// Send chunk `index` of the delta on a data stream.
    SendChunk { delta: DeltaId, index: u32 },
    /// Cut every disk at one instant and prepare the delta, then call `delta_ready` (or
    /// `delta_failed`). An initial delta covers every allocated block instead.
    Cut {
        delta: DeltaId,
        kind: DeltaKind,
        /// Freeze applications around this cut (run the consistency hook).
        app_consistent: bool,
    },
    /// The replica applied this delta: its changes may be forgotten by tracking.
    Acknowledged { delta: DeltaId, kind: DeltaKind },
    /// Close the connection (the peer broke the protocol); `connection_lost` follows.
    Disconnect { reason: String },
    /// Replication cannot continue; retrying will not help.
    Failed { reason: String },
    /// Planned failover: the final delta is applied. Compute every disk's digest (block hashes
    /// seeded with a fresh seed; writes are stopped) and call `verified`.
    Verify { sequence: u64 },
    /// Planned failover done: the replica holds what this primary holds and runs the VM now.
    HandedOver { sequence: u64 },
    /// The VM runs at the replica's site (it failed over): this side is to become its replica,
    /// its copy counted as at delta `applied`, compared by hash first when `resync`.
    Reversed { applied: u64, resync: bool },
    /// The planned failover did not happen (the replica refused: its disks differ, say): the
    /// VM stays here and replication goes on; the disks are compared by hash on the next
    /// connection, so whatever differs ships.
    HandoverRefused { reason: String },
    /// The replica's copy cannot be trusted to match tracking (it went back): drop the
    /// connection, compare the disks by hash on the next one, then call `resynchronized`.
    Resync { reason: String },
}

/// Where a planned failover stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handover {
    /// Asked for: the final delta is cut when the one in flight (if any) is applied.
    Requested,
    /// The final delta is cut or in flight.
    Final(DeltaId),
    /// It is applied; the digests are being computed.
    Verifying(u64),
    /// The digests went to the replica; waiting for it to take over.
    Sent {
        sequence: u64,
        seed: u64,
        digests: Vec<u128>,
    },
}

/// Where replication of the VM stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationState {
    InitialReplication,
    Replicating,
    /// A planned failover is shipping its final delta or comparing the disks.
    FailingOver,
    /// The VM runs at the other site now.
    FailedOver,
    ResynchronizationRequired,
    /// Paused by the operator: tracking goes on, nothing is cut or sent.
    Suspended,
    Stopped,
    Error,
}

/// What `blockrep status` shows for a VM on its primary.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrimaryStatus {
    pub state: ReplicationState,
    pub health: Health,
    pub connected: bool,
    /// Time since the last delta was applied on the replica.
    #[serde(skip)]
    pub(crate) last_replication: Option<Instant>,
    /// Disk bytes of the delta in flight not yet staged on the replica.
    pub pending_bytes: u64,
    /// Disk bytes of the whole delta in flight.
    pub in_flight_bytes: u64,
    pub successful_cycles: u64,
    pub missed_cycles: u64,
    pub average_delta_bytes: u64,
    pub maximum_delta_bytes: u64,
    /// From cut to applied, averaged over the deltas applied.
    #[serde(skip)]
    pub(crate) average_latency: Duration,
    pub last_error: Option<String>,
    pub applied_sequence: u64,
    /// Disk bytes of the last delta applied.
    pub last_delta_bytes: u64,
    /// From cut to applied, for the last delta.
    #[serde(skip)]
    pub(crate) last_delta_latency: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not connected; connect at `retry_at`.
    Down {
        retry_at: Instant,
    },
    Connecting,
    /// Hello sent, waiting for the replica's answer.
    Greeting,
    Up,
    /// Refused for good, or stopped.
    Closed,
}

#[derive(Debug)]
struct InFlight {
    delta: DeltaId,
    kind: DeltaKind,
    cut_at: Instant,
    /// Disk bytes of each chunk, for pending-bytes accounting.
    chunk_bytes: Vec<u64>,
    staged: ChunkSet,
    /// Sent on this connection and not yet confirmed staged.
    outstanding: BTreeSet<u32>,
    /// Next index to consider sending on this connection.
    cursor: u32,
    begin_sent: bool,
    end_sent: bool,
    app_consistent: bool,
}

impl InFlight {
    fn count(&self) -> u32 {
        self.chunk_bytes.len() as u32
    }
}

/// Whether the disks must be compared by hash before replication goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    NotOwed,
    /// Compare on the next connection, before its hello.
    Owed,
    /// Compared on the current connection: owed again if it is lost before the replica
    /// welcomes it (a seeded or changed replica insists on the comparison).
    Compared,
}

/// The primary's state machine for one VM.
#[derive(Debug)]
pub struct Primary {
    config: PrimaryConfig,
    link: Link,
    backoff: Duration,
    /// The replica's last applied sequence, once it said.
    applied: Option<u64>,
    tracking: Tracking,
    /// A cut asked of the driver and not yet ready.
    cutting: Option<(DeltaId, DeltaKind, Instant)>,
    in_flight: Option<InFlight>,
    next_cut_at: Instant,
    /// A cycle came due while busy: cut as soon as the delta in flight is applied.
    cut_overdue: bool,
    /// When the last application-consistent cut was made.
    last_app_consistent: Option<Instant>,
    cuts: u64,
    failed: Option<String>,
    /// The failure needs a comparison by hash before replication can start again.
    failed_for_resync: bool,
    stopped: bool,
    suspended: bool,
    actions: VecDeque<PrimaryAction>,
    cycles: CycleLog,
    delta_sizes: (u64, u64, u64),
    latency_total: Duration,
    /// The last delta applied: its disk bytes and its time from cut to applied.
    last_delta: Option<(u64, Duration)>,
    last_replication: Option<Instant>,
    last_error: Option<String>,
    /// Since when the primary has been unable to send, if it is.
    cannot_send_since: Option<Instant>,
    handover: Option<Handover>,
    /// The planned failover asks the replica to replicate back at once.
    handover_reverse: bool,
    /// Cut only when the source changed since the last cut (`follow_source`): whether it has.
    source_changed: Option<bool>,
    handed_over: bool,
    /// Refusals that asked for a comparison since the replica last welcomed this primary.
    resync_refusals: u32,
    /// A comparison by hash the replica's copy needs before replication goes on.
    comparison: Comparison,
    /// Since when the replica has refused what this primary sends (its store full, a fence),
    /// until a delta is applied again: a welcome after a refusal is not being able to send.
    refused_since: Option<Instant>,
    /// The last delta the disks' journals say the replica confirmed, until the replica's
    /// first welcome has been checked against it.
    journal_acknowledged: Option<u64>,
}

/// Comparisons in a row that a replica may ask for without welcoming the primary after any:
/// past it, asking again is taken as a replica that cannot be satisfied (a disk it cannot
/// open, or a hostile peer), and replication stops saying so rather than reading both whole
/// disks again and again.
const RESYNC_REFUSALS_LIMIT: u32 = 3;

impl Primary {
    pub fn new(config: PrimaryConfig, now: Instant) -> Self {
        Primary {
            link: Link::Down { retry_at: now },
            backoff: config.reconnect_min,
            applied: None,
            tracking: config.tracking.clone(),
            cutting: None,
            in_flight: None,
            next_cut_at: now,
            cut_overdue: false,
            last_app_consistent: None,
            cuts: 0,
            failed: None,
            failed_for_resync: false,
            stopped: false,
            suspended: false,
            actions: VecDeque::new(),
            cycles: CycleLog::new(now),
            delta_sizes: (0, 0, 0),
            latency_total: Duration::ZERO,
            last_delta: None,
            last_replication: None,
            last_error: None,
            cannot_send_since: Some(now),
            handover: None,
            handover_reverse: false,
            source_changed: None,
            handed_over: false,
            resync_refusals: 0,
            comparison: Comparison::NotOwed,
            refused_since: None,
            journal_acknowledged: None,
            config,
        }
    }

    /// The last delta the disks' journals say the replica confirmed (`ProtectedVm::
    /// acknowledged_delta`): a replica that holds deltas past the next one holds changes these
    /// disks no longer have (they went back: a volume snapshot rolled back with its journal),
    /// and is compared by hash before anything more ships.
    pub fn remember_acknowledged(&mut self, delta: Option<u64>) {
        self.journal_acknowledged = delta;
    }

    /// The next action for the driver, in order.
    pub fn poll_action(&mut self) -> Option<PrimaryAction> {
        self.actions.pop_front()
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.link {
            Link::Down { retry_at } => Some(retry_at.min(self.next_cut_at)),
            Link::Closed => None,
            _ => Some(self.next_cut_at),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Link::Down { retry_at } = self.link
            && now >= retry_at
        {
            self.link = Link::Connecting;
            self.actions.push_back(PrimaryAction::Connect);
        }
        if self.link == Link::Closed {
            return;
        }
        let handing_over = self
            .handover
            .as_ref()
            .is_some_and(|handover| *handover != Handover::Requested);
        if now >= self.next_cut_at
            && (self.suspended || handing_over || self.source_changed == Some(false))
        {
            // Paused, failing over, or nothing new to pass on: no cycle is due, none is missed.
            while self.next_cut_at <= now {
                self.next_cut_at += self.config.frequency;
            }
        } else if now >= self.next_cut_at {
            if self.ready_to_cut() && self.applied.is_some() {
                self.cut(now);
            } else if self.applied.is_some() || self.in_flight.is_some() {
                // Busy shipping, or cut off from the replica: the cycle is missed and its
                // changes merge into the next cut.
                self.cycles.record(now, false);
                self.cut_overdue = true;
            }
            while self.next_cut_at <= now {
                self.next_cut_at += self.config.frequency;
            }
        }
    }

    /// The connection the last `Connect` asked for is up.
    pub fn connected(&mut self, _now: Instant) {
        if self.link != Link::Connecting {
            return;
        }
        self.link = Link::Greeting;
        self.actions.push_back(PrimaryAction::Send(Message::Hello {
            version: PROTOCOL_VERSION,
            vm: self.config.vm.clone(),
            primary: self.config.primary.clone(),
            disks: self.config.disks.clone(),
        }));
    }

    /// The connection could not be made. `permanent` (the replica refused our identity, say)
    /// ends replication; otherwise it is retried with backoff.
    pub fn connect_failed(&mut self, now: Instant, reason: &str, permanent: bool) {
        self.last_error = Some(reason.to_owned());
        if permanent {
            self.fail(reason.to_owned());
        } else {
            self.link_down(now);
        }
    }

    /// The connection dropped. What was staged stays staged; the rest is sent again.
    pub fn connection_lost(&mut self, now: Instant, reason: &str) {
        if matches!(self.link, Link::Closed | Link::Down { .. }) {
            return;
        }
        self.last_error = Some(reason.to_owned());
        self.link_down(now);
    }

    fn link_down(&mut self, now: Instant) {
        if self.link == Link::Closed {
            return;
        }
        self.cannot_send_since.get_or_insert(now);
        self.link = Link::Down {
            retry_at: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(self.config.reconnect_max);
        if let Some(delta) = &mut self.in_flight {
            delta.outstanding.clear();
            delta.cursor = 0;
            delta.begin_sent = false;
            delta.end_sent = false;
        }
    }

    /// A message arrived on the control stream.
    pub fn handle_message(&mut self, now: Instant, message: Message) {
        match message {
            Message::Welcome {
                version,
                applied,
                staged,
            } if self.link == Link::Greeting => {
                if version != PROTOCOL_VERSION {
                    return self.fail(format!(
                        "the replica speaks protocol version {version}, this primary {PROTOCOL_VERSION}"
                    ));
                }
                self.link = Link::Up;
                if self.comparison == Comparison::Compared {
                    self.comparison = Comparison::NotOwed;
                }
                self.cannot_send_since = self.refused_since;
                self.backoff = self.config.reconnect_min;
                self.last_error = None;
                self.welcome(now, applied, staged);
            }
            Message::Reverse { applied, resync } if self.link == Link::Greeting => {
                self.link = Link::Closed;
                self.stopped = true;
                self.actions
                    .push_back(PrimaryAction::Reversed { applied, resync });
            }
            Message::HandedOver { sequence }
                if matches!(self.link, Link::Up | Link::Greeting)
                    && matches!(&self.handover, Some(Handover::Sent { sequence: sent, .. }) if *sent == sequence) =>
            {
                self.link = Link::Closed;
                self.handed_over = true;
                self.handover = None;
                self.actions
                    .push_back(PrimaryAction::HandedOver { sequence });
            }
            Message::HandedOver { .. } if self.link == Link::Greeting => {
                self.fail("the VM runs at the replica site since a planned failover; run `blockrep reverse` there to replicate back to this host".into());
            }
            Message::Refused { code, reason } if self.handover.is_some() && !code.retry() => {
                self.handover = None;
                self.last_error = Some(format!("the replica refused the failover: {reason}"));
                self.actions.push_back(PrimaryAction::HandoverRefused {
                    reason: reason.clone(),
                });
                if code != RefusalCode::HandoverNeedsConsent {
                    // The disks may differ: compare them before going on.
                    self.link_down(now);
                    self.resync(format!("the replica refused the failover: {reason}"));
                }
            }
            Message::Refused {
                code: RefusalCode::ResynchronizationRequired,
                reason,
            } => {
                // The replica's copy changed outside blockrep: compare, then go on.
                self.resync_refusals += 1;
                if self.resync_refusals > RESYNC_REFUSALS_LIMIT {
                    return self.fail_resync(format!(
                        "the replica asked for a comparison {} times in a row without taking the compared copy: {reason}",
                        self.resync_refusals
                    ));
                }
                self.last_error = Some(format!("the replica refused: {reason}"));
                self.link_down(now);
                self.resync(reason);
            }
            Message::Refused {
                code: RefusalCode::Gap,
                reason,
            } => {
                self.last_error = Some(format!("the replica refused: {reason}"));
                self.refused_since.get_or_insert(now);
                self.fail_resync(format!("the replica refused: {reason}"));
            }
            Message::Refused { code, reason } => {
                self.last_error = Some(format!("the replica refused: {reason}"));
                self.refused_since.get_or_insert(now);
                if code.retry() {
                    self.actions.push_back(PrimaryAction::Disconnect {
                        reason: format!("the replica refused: {reason}"),
                    });
                } else {
                    self.fail(format!("the replica refused: {reason}"));
                }
            }
            Message::ChunksStaged { delta, received } if self.link == Link::Up => {
                if let Some(in_flight) = &mut self.in_flight
                    && in_flight.delta == delta
                {
                    for range in &received {
                        in_flight.staged.insert_range(range.clone());
                    }
                    let staged = &in_flight.staged;
                    in_flight
                        .outstanding
                        .retain(|index| !staged.contains(*index));
                    self.pump();
                }
            }
            Message::Applied { delta } if self.link == Link::Up => {
                if self
                    .in_flight
                    .as_ref()
                    .is_some_and(|in_flight| in_flight.delta == delta)
                {
                    self.applied = Some(delta.sequence);
                    self.finish(now);
                }
            }
            other => self.actions.push_back(PrimaryAction::Disconnect {
                reason: format!("unexpected message from the replica: {other:?}"),
            }),
        }
    }

    fn welcome(&mut self, now: Instant, applied: u64, staged: Option<super::message::Staged>) {
        self.resync_refusals = 0;
        let journal = self.journal_acknowledged.take();
        if let Some(acknowledged) = journal
            && applied > acknowledged + 1
            && self.applied.is_none()
            && !self.tracking.owes_copy()
        {
            self.link_down(now);
            self.resync(format!(
                    "the replica holds delta {applied}, but these disks' tracking was confirmed only up to delta {acknowledged}: the disks went back (a snapshot rolled back?): resynchronization required"
                ));
            return;
        }
        if let Some(acknowledged) = journal
            && applied < acknowledged
            && applied > 0
            && self.applied.is_none()
            && !self.tracking.owes_copy()
        {
            // It confirmed a later delta to these disks before: its whole copy went back (a
            // replica store restored from a backup, say), and what it lacks is no longer in
            // tracking.
            self.link_down(now);
            self.resync(format!(
                "the replica holds delta {applied}, but it had confirmed delta {acknowledged} to these disks: the replica went back (restored from an older copy?): resynchronization required"
            ));
            return;
        }
        if let Some(known) = self.applied
            && applied < known
            && applied > 0
        {
            // Restored from an older copy, say: what it lacks is no longer in tracking.
            self.applied = None;
            self.in_flight = None;
            self.cutting = None;
            if self.handover.take().is_some() {
                self.actions.push_back(PrimaryAction::HandoverRefused {
                    reason: format!("the replica went back from delta {known} to {applied}"),
                });
            }
            self.link_down(now);
            self.resync(format!(
                "the replica went back from delta {known} to {applied}: resynchronization required"
            ));
            return;
        }
        if let Some(known) = self.applied
            && applied < known
        {
            return self.fail(format!(
                "the replica lost its copy (it was at delta {known}): remove it and protect the VM again"
            ));
        }
        self.applied = Some(applied);
        match &self.handover {
            Some(Handover::Sent {
                sequence,
                seed,
                digests,
            }) if applied == *sequence => {
                // The link dropped while the replica compared: ask again.
                let message = Message::Handover {
                    sequence: *sequence,
                    seed: *seed,
                    digests: digests.clone(),
                    reverse: self.handover_reverse,
                };
                self.actions.push_back(PrimaryAction::Send(message));
                return;
            }
            Some(Handover::Verifying(_)) => return,
            _ => {}
        }
        if let Some(in_flight) = &mut self.in_flight {
            if applied >= in_flight.delta.sequence {
                // Applied, but the confirmation was lost with the link.
                return self.finish(now);
            }
            match staged {
                Some(staged) if staged.delta == in_flight.delta => {
                    in_flight.staged = ChunkSet::from_ranges(&staged.received);
                    in_flight.begin_sent = true;
                }
                _ => in_flight.staged = ChunkSet::new(),
            }
            self.pump();
        } else if self.cutting.is_none()
            && (applied == 0
                || self.tracking.owes_copy()
                || self.cut_overdue
                || self.handover == Some(Handover::Requested))
        {
            self.cut(now);
        }
    }

    /// The driver prepared the delta of a `Cut`: `chunk_bytes` holds each chunk's disk bytes;
    /// `app_consistent` says whether the consistency hook froze applications for it.
    pub fn delta_ready(
        &mut self,
        now: Instant,
        delta: DeltaId,
        chunk_bytes: Vec<u64>,
        app_consistent: bool,
    ) {
        let Some((cutting, kind, cut_at)) = self.cutting else {
            return;
        };
        if cutting != delta {
            return;
        }
        self.cutting = None;
        if app_consistent {
            self.last_app_consistent = Some(now);
        }
        self.in_flight = Some(InFlight {
            delta,
            kind,
            cut_at,
            chunk_bytes,
            staged: ChunkSet::new(),
            outstanding: BTreeSet::new(),
            cursor: 0,
            begin_sent: false,
            end_sent: false,
            app_consistent,
        });
        self.pump();
    }

    /// Preparing the delta failed (the spool could not be written, say). Its changes stay
    /// tracked; the cut is tried again at the next cycle.
    pub fn delta_failed(&mut self, now: Instant, delta: DeltaId, reason: &str) {
        if self.cutting.is_some_and(|(cutting, _, _)| cutting == delta) {
            self.cutting = None;
            self.last_error = Some(reason.to_owned());
            self.cycles.record(now, false);
            if self.handover == Some(Handover::Final(delta)) {
                // Cut again at the next cycle, not at once: a spool that keeps failing must
                // not spin.
                self.handover = Some(Handover::Requested);
            }
        }
    }

    /// A comparison by hash marked every block that differs from the replica as changed: the
    /// replica's copy plus the next delta is the disks, whatever tracking said before.
    pub fn resynchronized(&mut self) {
        self.comparison = Comparison::Compared;
        self.tracking = Tracking::Vouches;
        // What differs ships at once, not a cycle later.
        self.cut_overdue = true;
    }

    /// The disks are to be compared by hash on the next connection, before its hello (tracking
    /// cannot vouch for the replica, or the operator asked for it).
    pub fn owe_comparison(&mut self) {
        self.comparison = Comparison::Owed;
    }

    /// The next connection compares the disks by hash before its hello (`Connect`).
    pub fn comparison_owed(&self) -> bool {
        self.comparison != Comparison::NotOwed
    }

    /// The replica holds no copy to compare with: an initial replication follows instead.
    pub fn nothing_to_compare(&mut self) {
        self.comparison = Comparison::NotOwed;
    }

    /// Drops the connection and owes a comparison before the next one.
    fn resync(&mut self, reason: String) {
        self.comparison = Comparison::Owed;
        self.actions.push_back(PrimaryAction::Resync { reason });
    }

    /// Cuts only after `source_changed` said the source changed since the last cut: a replica
    /// passing its VMs on (extended replication) then never cuts more often than its own
    /// primary ships.
    pub fn follow_source(&mut self) {
        self.source_changed.get_or_insert(true);
    }

    /// The source changed (a delta was applied to the replica being passed on).
    pub fn source_changed(&mut self) {
        if self.source_changed.is_some() {
            self.source_changed = Some(true);
        }
    }

    /// Starts a planned failover: the caller has stopped the VM's writes. The final delta
    /// (everything written since the last cut) is cut as soon as nothing is in flight; once it
    /// is applied, `Verify` asks for the disks' digests.
    pub fn hand_over(&mut self, now: Instant, reverse: bool) -> Result<(), String> {
        if self.handover.is_some() {
            return Err("a planned failover is already under way".into());
        }
        if self.failed.is_some() || self.stopped {
            return Err("replication has stopped".into());
        }
        if self.applied.is_none() {
            return Err(
                "the other site has not connected yet: try again once replication runs".into(),
            );
        }
        if self.applied == Some(0)
            || self.tracking.owes_copy()
            || self.in_flight_kind() == Some(DeltaKind::Initial)
        {
            return Err("initial replication has not completed".into());
        }
        self.handover = Some(Handover::Requested);
        self.handover_reverse = reverse;
        self.suspended = false;
        self.cut(now);
        Ok(())
    }

    /// The digests `Verify` asked for, computed with `seed`.
    pub fn verified(&mut self, sequence: u64, seed: u64, digests: Vec<u128>) {
        if self.handover != Some(Handover::Verifying(sequence)) {
            return;
        }
        self.handover = Some(Handover::Sent {
            sequence,
            seed,
            digests: digests.clone(),
        });
        if self.link == Link::Up {
            self.actions
                .push_back(PrimaryAction::Send(Message::Handover {
                    sequence,
                    seed,
                    digests,
                    reverse: self.handover_reverse,
                }));
        }
    }

    /// The digests for a planned failover could not be made (reading the disks failed): the
    /// failover is refused here, the VM's writes resume, and the disks are compared by hash
    /// before replication goes on.
    pub fn verify_failed(&mut self, now: Instant, reason: String) {
        if !matches!(self.handover, Some(Handover::Verifying(_))) {
            return;
        }
        self.handover = None;
        self.last_error = Some(format!("cannot prepare the failover: {reason}"));
        self.actions.push_back(PrimaryAction::HandoverRefused {
            reason: reason.clone(),
        });
        self.link_down(now);
        self.resync(reason);
    }

    /// Pauses replication (no new cut; a delta in flight finishes) or resumes it, cutting at
    /// once what accumulated meanwhile.
    pub fn suspend(&mut self, now: Instant, suspended: bool) {
        if self.suspended == suspended {
            return;
        }
        self.suspended = suspended;
        if !suspended {
            self.cut_overdue = true;
            self.cut(now);
            self.next_cut_at = now + self.config.frequency;
        }
    }

    /// Ends replication cleanly: says goodbye if connected, and asks for nothing more.
    pub fn stop(&mut self) {
        if self.link == Link::Up || self.link == Link::Greeting {
            self.actions
                .push_back(PrimaryAction::Send(Message::Goodbye));
        }
        self.link = Link::Closed;
        self.stopped = true;
    }

    pub fn status(&self, now: Instant) -> PrimaryStatus {
        let state = if self.handed_over {
            ReplicationState::FailedOver
        } else if self.handover.is_some() {
            ReplicationState::FailingOver
        } else if self.stopped {
            ReplicationState::Stopped
        } else if self.failed.is_some() {
            if self.failed_for_resync {
                ReplicationState::ResynchronizationRequired
            } else {
                ReplicationState::Error
            }
        } else if matches!(self.tracking, Tracking::Lost(_)) {
            ReplicationState::ResynchronizationRequired
        } else if self.suspended {
            ReplicationState::Suspended
        } else if self.applied.unwrap_or(0) == 0
            || self.tracking.owes_copy()
            || self.in_flight_kind() == Some(DeltaKind::Initial)
        {
            ReplicationState::InitialReplication
        } else {
            ReplicationState::Replicating
        };
        let pending_bytes = self.in_flight.as_ref().map_or(0, |in_flight| {
            (0..in_flight.count())
                .filter(|index| !in_flight.staged.contains(*index))
                .map(|index| in_flight.chunk_bytes[index as usize])
                .sum()
        });
        let (count, total, maximum) = self.delta_sizes;
        PrimaryStatus {
            state,
            health: if self.failed.is_some() || matches!(self.tracking, Tracking::Lost(_)) {
                Health::Critical
            } else {
                self.cycles.health(
                    now,
                    self.cannot_send_since,
                    self.config.frequency.max(Duration::from_secs(60)),
                )
            },
            connected: self.link == Link::Up,
            last_replication: self.last_replication,
            pending_bytes,
            in_flight_bytes: self
                .in_flight
                .as_ref()
                .map_or(0, |in_flight| in_flight.chunk_bytes.iter().sum()),
            successful_cycles: self.cycles.successful(),
            missed_cycles: self.cycles.missed(),
            average_delta_bytes: total.checked_div(count).unwrap_or(0),
            maximum_delta_bytes: maximum,
            average_latency: self
                .latency_total
                .checked_div(count.max(1) as u32)
                .unwrap_or_default(),
            last_error: self
                .failed
                .clone()
                .or_else(|| match &self.tracking {
                    Tracking::Lost(reason) => Some(format!("resynchronization required: {reason}")),
                    _ => None,
                })
                .or_else(|| self.last_error.clone()),
            applied_sequence: self.applied.unwrap_or(0),
            last_delta_bytes: self.last_delta.map_or(0, |(bytes, _)| bytes),
            last_delta_latency: self
                .last_delta
                .map_or(Duration::ZERO, |(_, latency)| latency),
        }
    }

    fn in_flight_kind(&self) -> Option<DeltaKind> {
        self.in_flight
            .as_ref()
            .map(|in_flight| in_flight.kind)
            .or(self.cutting.map(|(_, kind, _)| kind))
    }

    fn ready_to_cut(&self) -> bool {
        self.link == Link::Up
            && self.in_flight.is_none()
            && self.cutting.is_none()
            && !self.suspended
            && matches!(self.handover, None | Some(Handover::Requested))
    }

    fn cut(&mut self, now: Instant) {
        if !self.ready_to_cut() {
            return;
        }
        let Some(applied) = self.applied else {
            return;
        };
        self.cuts += 1;
        let delta = DeltaId {
            sequence: applied + 1,
            cut: mix(self.config.seed ^ self.cuts),
        };
        let kind = if applied == 0 || self.tracking.owes_copy() {
            DeltaKind::Initial
        } else {
            DeltaKind::Changes
        };
        self.cut_overdue = false;
        if self.source_changed.is_some() {
            self.source_changed = Some(false);
        }
        self.cutting = Some((delta, kind, now));
        if self.handover == Some(Handover::Requested) {
            self.handover = Some(Handover::Final(delta));
        }
        let app_consistent = kind == DeltaKind::Changes
            && self.config.app_consistent_every.is_some_and(|every| {
                self.last_app_consistent
                    .is_none_or(|last| now.saturating_duration_since(last) >= every)
            });
        self.actions.push_back(PrimaryAction::Cut {
            delta,
            kind,
            app_consistent,
        });
    }

    /// Sends what the window allows: the begin, chunks not staged, then the end.
    fn pump(&mut self) {
        if self.link != Link::Up {
            return;
        }
        let Some(in_flight) = &mut self.in_flight else {
            return;
        };
        if !in_flight.begin_sent {
            in_flight.begin_sent = true;
            self.actions
                .push_back(PrimaryAction::Send(Message::DeltaBegin {
                    delta: in_flight.delta,
                    kind: in_flight.kind,
                    chunks: in_flight.count(),
                    recovery_point: true,
                    app_consistent: in_flight.app_consistent,
                }));
        }
        while (in_flight.outstanding.len() as u32) < self.config.window.max(1) {
            let Some(index) = in_flight
                .staged
                .first_missing(in_flight.cursor, in_flight.count())
            else {
                break;
            };
            in_flight.cursor = index + 1;
            in_flight.outstanding.insert(index);
            self.actions.push_back(PrimaryAction::SendChunk {
                delta: in_flight.delta,
                index,
            });
        }
        let all_sent = in_flight
            .staged
            .first_missing(in_flight.cursor, in_flight.count())
            .is_none();
        if all_sent && !in_flight.end_sent {
            in_flight.end_sent = true;
            self.actions
                .push_back(PrimaryAction::Send(Message::DeltaEnd {
                    delta: in_flight.delta,
                }));
        }
    }

    /// The delta in flight is applied on the replica.
    fn finish(&mut self, now: Instant) {
        let Some(in_flight) = self.in_flight.take() else {
            return;
        };
        self.refused_since = None;
        self.cannot_send_since = None;
        if in_flight.kind == DeltaKind::Initial {
            self.tracking = Tracking::Vouches;
        } else {
            self.cycles.record(now, true);
        }
        let bytes: u64 = in_flight.chunk_bytes.iter().sum();
        let (count, total, maximum) = self.delta_sizes;
        self.delta_sizes = (count + 1, total + bytes, maximum.max(bytes));
        let latency = now.saturating_duration_since(in_flight.cut_at);
        self.latency_total += latency;
        self.last_delta = Some((bytes, latency));
        self.last_replication = Some(now);
        self.actions.push_back(PrimaryAction::Acknowledged {
            delta: in_flight.delta,
            kind: in_flight.kind,
        });
        match self.handover {
            Some(Handover::Final(delta)) if delta == in_flight.delta => {
                self.handover = Some(Handover::Verifying(delta.sequence));
                self.actions.push_back(PrimaryAction::Verify {
                    sequence: delta.sequence,
                });
                return;
            }
            Some(Handover::Requested) => {
                self.cut(now);
                return;
            }
            _ => {}
        }
        if self.cut_overdue || in_flight.kind == DeltaKind::Initial {
            // The cycle after initial replication carries what changed during it.
            self.cut(now);
            self.next_cut_at = now + self.config.frequency;
        }
    }

    /// Replication ends for good: only an operator can start it again.
    fn fail(&mut self, reason: String) {
        self.failed = Some(reason.clone());

        self.link = Link::Closed;
        self.actions.push_back(PrimaryAction::Failed { reason });
    }

    /// Replication ends for good, and the copies must be compared by hash before it can
    /// start again (status: resynchronization required).
    fn fail_resync(&mut self, reason: String) {
        self.failed_for_resync = true;
        self.fail(reason);
    }
}

/// A 64-bit mixing function (SplitMix64's finaliser): distinct inputs give distinct,
/// well-spread cut numbers without a random source in the state machine.
fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9E37_79B9_7F4A_7C15);
    value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}
