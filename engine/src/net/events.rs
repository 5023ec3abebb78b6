//! Replication events for embedders: what happened to a VM's replication and when, sent on a
//! channel the embedder gives `run_primary` (`PrimaryOptions::events`) or a replica server
//! (`ReplicaServer::start`). The cycle and health events are read off the primary's status as
//! it changes, so they say what `blockrep status` would show, at the moment it changed.
//!
//! A primary sends the cycle, health and resync events, and those of a planned failover it
//! makes. A replica server sends the deltas it applies and the failover steps taken there;
//! for a VM running there after a failover, its replication back sends the primary's events.

use super::primary::ResyncSummary;
use crate::proto::{Health, PrimaryStatus};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Something that happened to a VM's replication. More kinds may come in later versions.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[non_exhaustive]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ReplicationEvent {
    /// Deltas were applied on the replica, up to `sequence`: `deltas` of them since the last
    /// event (usually one), and the last one's disk bytes and time from cut to applied.
    CycleShipped {
        sequence: u64,
        deltas: u64,
        disk_bytes: u64,
        latency: Duration,
    },
    /// Cycles came due and could not be cut (the link was down, or a delta still in flight);
    /// `missed` is the count since the primary started.
    CyclesMissed {
        missed: u64,
    },
    HealthChanged {
        from: Option<Health>,
        to: Health,
    },
    /// A comparison by hash began: tracking could not vouch for the replica, for `reason` when
    /// it was lost (a damaged journal, a disk changed while it was not tracked), or the
    /// operator asked for one, or the replica holds a copy of a disk newly protected.
    ResyncStarted {
        reason: Option<String>,
    },
    /// The comparison ended: what it compared and found differing (shipped with the next
    /// delta), or `None` when the replica held no copy (an initial replication follows).
    ResyncFinished {
        summary: Option<ResyncSummary>,
    },
    /// Planned failover: the final delta is applied and the other site runs the VM now.
    HandedOver {
        sequence: u64,
    },
    /// The planned failover was refused; replication goes on as before. The primary sends it
    /// whatever the reason; the replica sends it when its disks did not match the primary's or
    /// the VM could not run there.
    HandoverRefused {
        reason: String,
    },
    /// The VM runs at the replica's site: this side becomes its replica.
    Reversed {
        applied: u64,
        resync: bool,
    },
    /// Replication stopped for good.
    Failed {
        reason: String,
    },
    /// Replica side: a delta was committed to the replica's disks, taking `apply_time`.
    DeltaApplied {
        sequence: u64,
        apply_time: Duration,
    },
    /// Replica side: a test failover copy of recovery point `point` is ready in `disks`, while
    /// replication goes on.
    TestFailoverCreated {
        point: u64,
        disks: Vec<PathBuf>,
    },
    /// Replica side: the test failover copy was removed.
    TestFailoverRemoved,
    /// Replica side: unplanned failover to recovery point `point`; replication from the
    /// primary is fenced off and the point's disks are ready.
    FailedOver {
        point: u64,
    },
    /// Replica side: the failover to `point` was committed; the VM runs here from now on.
    FailoverCommitted {
        point: u64,
    },
    /// Replica side: the failover was cancelled; replication from the primary may resume.
    FailoverCancelled,
    /// Replica side: a planned failover handed the VM to this site at delta `sequence`; its
    /// disks equal the primary's and the VM runs here now.
    HandoverAccepted {
        sequence: u64,
        reverse: bool,
    },
    /// Replica side: the VM running here is to replicate back to its old primary.
    ReverseRequested,
}

/// An event of a VM, and when it happened.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TimedEvent {
    pub vm: String,
    pub at: SystemTime,
    #[serde(flatten)]
    pub event: ReplicationEvent,
}

/// Where a primary or a replica server sends its events. The channel is unbounded (sending
/// never holds up replication): the embedder reads it, or drops the receiver to stop them.
pub type EventSender = mpsc::UnboundedSender<TimedEvent>;

/// Turns successive statuses into the events between them.
#[derive(Debug, Default)]
pub(super) struct StatusEvents {
    applied: Option<u64>,
    missed: u64,
    health: Option<Health>,
}

impl StatusEvents {
    pub(super) fn observe(&mut self, status: &PrimaryStatus) -> Vec<ReplicationEvent> {
        let mut events = Vec::new();
        if let Some(applied) = self
            .applied
            .filter(|applied| status.applied_sequence > *applied)
        {
            events.push(ReplicationEvent::CycleShipped {
                sequence: status.applied_sequence,
                deltas: status.applied_sequence - applied,
                disk_bytes: status.last_delta_bytes,
                latency: status.last_delta_latency,
            });
        }
        self.applied = Some(status.applied_sequence);
        if status.missed_cycles > self.missed {
            events.push(ReplicationEvent::CyclesMissed {
                missed: status.missed_cycles,
            });
            self.missed = status.missed_cycles;
        }
        if self.health != Some(status.health) {
            events.push(ReplicationEvent::HealthChanged {
                from: self.health,
                to: status.health,
            });
            self.health = Some(status.health);
        }
        events
    }
}

/// Sends `event` of `vm`, stamped now, if anyone listens.
pub(super) fn send(events: Option<&EventSender>, vm: &str, event: ReplicationEvent) {
    if let Some(events) = events {
        let _ = events.send(TimedEvent {
            vm: vm.to_owned(),
            at: SystemTime::now(),
            event,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ReplicationState;

    fn status(applied: u64, missed: u64, health: Health) -> PrimaryStatus {
        PrimaryStatus {
            state: ReplicationState::Replicating,
            health,
            connected: true,
            last_replication: None,
            pending_bytes: 0,
            in_flight_bytes: 0,
            successful_cycles: applied,
            missed_cycles: missed,
            average_delta_bytes: 0,
            maximum_delta_bytes: 0,
            average_latency: Duration::ZERO,
            last_error: None,
            applied_sequence: applied,
            last_delta_bytes: 4096,
            last_delta_latency: Duration::from_millis(30),
        }
    }

    #[test]
    fn changes_between_statuses_become_events_once() {
        let mut events = StatusEvents::default();
        assert_eq!(
            events.observe(&status(0, 0, Health::Normal)),
            vec![ReplicationEvent::HealthChanged {
                from: None,
                to: Health::Normal
            }]
        );
        assert!(events.observe(&status(0, 0, Health::Normal)).is_empty());
        assert_eq!(
            events.observe(&status(2, 1, Health::Warning)),
            vec![
                ReplicationEvent::CycleShipped {
                    sequence: 2,
                    deltas: 2,
                    disk_bytes: 4096,
                    latency: Duration::from_millis(30)
                },
                ReplicationEvent::CyclesMissed { missed: 1 },
                ReplicationEvent::HealthChanged {
                    from: Some(Health::Normal),
                    to: Health::Warning
                },
            ]
        );
    }
}
