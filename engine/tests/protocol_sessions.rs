//! The primary and replica state machines driven against each other in virtual time, over a
//! link that drops at random moments (losing whatever was in flight). Whatever the schedule,
//! every delta is committed once, whole, in sequence, and the primary hears of each.

use blockrep::proto::{
    ConnectionId, DeltaId, DeltaKind, DiskDescription, Fence, HandoverRefusal, Message,
    PROTOCOL_VERSION, Primary, PrimaryAction, PrimaryConfig, RefusalCode, Replica, ReplicaAction,
    ReplicaVmRecord, ReplicationState, Tracking,
};
use bytes::Bytes;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use uuid::Uuid;

const FREQUENCY: Duration = Duration::from_secs(30);

fn config() -> PrimaryConfig {
    PrimaryConfig {
        vm: "vm1".into(),
        primary: "host-a".into(),
        disks: vec![
            DiskDescription {
                disk_id: Uuid::from_u128(1),
                virtual_size: 1 << 30,
                logical_sector: 512,
            },
            DiskDescription {
                disk_id: Uuid::from_u128(2),
                virtual_size: 1 << 20,
                logical_sector: 4096,
            },
        ],
        frequency: FREQUENCY,
        window: 3,
        reconnect_min: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(8),
        tracking: Tracking::New,
        seed: 42,
        app_consistent_every: None,
    }
}

/// vm1 as a replica holds it from "fingerprint-a", at delta `applied`, nothing else recorded.
fn replicated_from_a(applied: u64) -> ReplicaVmRecord {
    ReplicaVmRecord {
        disks: Some(config().disks),
        applied,
        owner: Some("fingerprint-a".into()),
        ..ReplicaVmRecord::default()
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    ToReplica,
    ToPrimary,
    Wait,
    DropLink,
    /// The replica's driver finishes staging one chunk.
    Stage,
    /// A chunk overtakes the control stream (data streams are not ordered with it).
    ChunkOvertakes,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => Just(Step::ToReplica),
        6 => Just(Step::ToPrimary),
        2 => Just(Step::Wait),
        1 => Just(Step::DropLink),
        4 => Just(Step::Stage),
        2 => Just(Step::ChunkOvertakes),
    ]
}

/// Both machines, a link between them, and what each side's driver did.
struct World {
    now: Instant,
    primary: Primary,
    replica: Replica,
    link: Option<ConnectionId>,
    next_connection: ConnectionId,
    to_replica: VecDeque<Message>,
    to_primary: VecDeque<Message>,
    /// Chunks per delta the primary cut.
    cut: BTreeMap<u64, (DeltaId, DeltaKind, u32)>,
    chunk_counts: VecDeque<u32>,
    staged: BTreeMap<DeltaId, BTreeSet<u32>>,
    /// Chunks handed to the replica's driver, not yet staged.
    staging: VecDeque<(DeltaId, u32)>,
    committed: Vec<(DeltaId, DeltaKind, BTreeSet<u32>)>,
    acknowledged: Vec<DeltaId>,
    welcomed: bool,
    /// The sequence a planned failover handed the VM over at.
    handed_over: Option<u64>,
}

impl World {
    fn new(chunk_counts: Vec<u32>) -> Self {
        let now = Instant::now();
        World {
            now,
            primary: Primary::new(config(), now),
            replica: Replica::new("vm1", ReplicaVmRecord::default()),
            link: None,
            next_connection: 1,
            to_replica: VecDeque::new(),
            to_primary: VecDeque::new(),
            cut: BTreeMap::new(),
            chunk_counts: chunk_counts.into(),
            staged: BTreeMap::new(),
            staging: VecDeque::new(),
            committed: Vec::new(),
            acknowledged: Vec::new(),
            welcomed: false,
            handed_over: None,
        }
    }

    fn run_actions(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(action) = self.primary.poll_action() {
                progressed = true;
                self.primary_action(action);
            }
            while let Some(action) = self.replica.poll_action() {
                progressed = true;
                self.replica_action(action);
            }
            if !progressed {
                break;
            }
        }
    }

    fn primary_action(&mut self, action: PrimaryAction) {
        match action {
            PrimaryAction::Connect => {
                let connection = self.next_connection;
                self.next_connection += 1;
                self.link = Some(connection);
                self.primary.connected(self.now);
            }
            PrimaryAction::Send(message) => {
                if self.link.is_some() {
                    self.to_replica.push_back(message);
                }
            }
            PrimaryAction::SendChunk { delta, index } => {
                let (_, _, count) = self.cut[&delta.sequence];
                assert!(index < count, "chunk {index} of {count} requested");
                if self.link.is_some() {
                    self.to_replica.push_back(Message::Chunk {
                        delta,
                        index,
                        disk: (index % 2) as u16,
                        payload: Bytes::from(format!("{}:{index}", delta.sequence)),
                    });
                }
            }
            PrimaryAction::Cut { delta, kind, .. } => {
                let count = self.chunk_counts.pop_front().unwrap_or(0);
                let previous = self.cut.insert(delta.sequence, (delta, kind, count));
                assert!(
                    previous.is_none_or(|(old, _, _)| old.cut != delta.cut),
                    "a sequence reused with the same cut number"
                );
                self.primary
                    .delta_ready(self.now, delta, vec![1 << 20; count as usize], false);
            }
            PrimaryAction::Acknowledged { delta, .. } => self.acknowledged.push(delta),
            PrimaryAction::Disconnect { reason } => panic!("primary disconnected: {reason}"),
            PrimaryAction::Failed { reason } => panic!("primary failed: {reason}"),
            // The disks' digest, modelled: the last delta cut (writes are stopped).
            PrimaryAction::Verify { sequence } => {
                let last_cut = *self.cut.keys().last().unwrap();
                self.primary
                    .verified(sequence, 7, vec![u128::from(last_cut)]);
            }
            PrimaryAction::HandedOver { sequence } => self.handed_over = Some(sequence),
            PrimaryAction::Reversed { .. } => panic!("the replica does not run the VM"),
            PrimaryAction::Resync { reason } => panic!("resynchronization asked for: {reason}"),
            PrimaryAction::HandoverRefused { reason } => panic!("handover refused: {reason}"),
        }
    }

    fn replica_action(&mut self, action: ReplicaAction) {
        match action {
            ReplicaAction::Send {
                connection,
                message,
            } => {
                if self.link == Some(connection) {
                    self.to_primary.push_back(message);
                }
            }
            ReplicaAction::AdoptSeed { .. } => panic!("nothing was seeded"),
            ReplicaAction::PrepareDisks { disks, owner } => {
                assert_eq!(disks.len(), 2);
                assert_eq!(owner, "fingerprint-a");
            }
            ReplicaAction::StartStaging { delta, .. } => {
                self.staged.insert(delta, BTreeSet::new());
                self.staging.retain(|(staging, _)| *staging == delta);
            }
            ReplicaAction::StageChunk {
                delta,
                index,
                payload,
                ..
            } => {
                assert_eq!(payload, Bytes::from(format!("{}:{index}", delta.sequence)));
                self.staging.push_back((delta, index));
            }
            ReplicaAction::Commit { delta, kind, .. } => {
                let chunks = self.staged.remove(&delta).unwrap();
                self.committed.push((delta, kind, chunks));
                self.replica.committed(delta);
            }
            // The replica's digest, modelled: the last delta committed.
            ReplicaAction::VerifyHandover {
                connection,
                sequence,
                digests,
                ..
            } => {
                let last_committed = self
                    .committed
                    .last()
                    .map_or(0, |(delta, _, _)| delta.sequence);
                let outcome = if digests == vec![u128::from(last_committed)] {
                    Ok(())
                } else {
                    Err(HandoverRefusal::refused("digests differ"))
                };
                self.replica
                    .handover_verified(connection, sequence, outcome);
            }
            ReplicaAction::Close { connection, reason } => {
                if self.link == Some(connection)
                    && !reason.contains("goodbye")
                    && !reason.contains("handed over")
                {
                    panic!("replica closed the connection: {reason}");
                }
            }
        }
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::ToReplica => {
                if let (Some(connection), Some(message)) = (self.link, self.to_replica.pop_front())
                {
                    match message {
                        Message::Hello { version, disks, .. } => {
                            self.replica
                                .hello(connection, "fingerprint-a", version, disks)
                        }
                        other => self.replica.handle_message(connection, other),
                    }
                }
            }
            Step::ToPrimary => {
                if let Some(message) = self.to_primary.pop_front() {
                    if matches!(message, Message::Welcome { .. }) {
                        self.welcomed = true;
                    }
                    self.primary.handle_message(self.now, message);
                }
            }
            Step::Wait => {
                if let Some(at) = self.primary.poll_timeout() {
                    self.now = self.now.max(at);
                }
                self.primary.handle_timeout(self.now);
            }
            Step::ChunkOvertakes => {
                let position = self
                    .to_replica
                    .iter()
                    .position(|message| matches!(message, Message::Chunk { .. }));
                if let (Some(connection), Some(position)) = (self.link, position)
                    && let Some(chunk) = self.to_replica.remove(position)
                {
                    self.replica.handle_message(connection, chunk);
                }
            }
            Step::Stage => {
                if let Some((delta, index)) = self.staging.pop_front() {
                    let fresh = self.staged.get_mut(&delta).unwrap().insert(index);
                    assert!(fresh, "chunk {index} of {delta} staged twice");
                    self.replica.chunk_staged(delta, index);
                }
            }
            Step::DropLink => {
                if let Some(connection) = self.link.take() {
                    self.to_replica.clear();
                    self.to_primary.clear();
                    self.replica.disconnected(connection);
                    self.primary.connection_lost(self.now, "link cut");
                }
            }
        }
        self.run_actions();
    }

    /// Runs without faults until every delta cut so far is acknowledged.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let cut = self.cut.len();
            if cut > 0 && self.acknowledged.len() == cut && self.to_replica.is_empty() {
                return;
            }
            if !self.staging.is_empty() {
                self.step(Step::Stage);
            } else if !self.to_replica.is_empty() {
                self.step(Step::ToReplica);
            } else if !self.to_primary.is_empty() {
                self.step(Step::ToPrimary);
            } else {
                self.step(Step::Wait);
            }
        }
        panic!(
            "did not settle: cut {:?}, acknowledged {:?}",
            self.cut, self.acknowledged
        );
    }

    fn check(&self) {
        for (position, (delta, kind, chunks)) in self.committed.iter().enumerate() {
            assert_eq!(
                delta.sequence,
                position as u64 + 1,
                "commits out of sequence"
            );
            let (cut, cut_kind, count) = self.cut[&delta.sequence];
            assert_eq!(
                cut, *delta,
                "committed a delta the primary did not cut last"
            );
            assert_eq!(cut_kind, *kind);
            assert_eq!(*chunks, (0..count).collect(), "{delta} committed partly");
        }
        assert_eq!(
            self.acknowledged,
            self.committed
                .iter()
                .map(|(delta, _, _)| *delta)
                .collect::<Vec<_>>()[..self.acknowledged.len()],
            "the primary heard of a delta that was not committed"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn every_delta_is_committed_once_whole_and_in_order_despite_link_drops(
        chunk_counts in prop::collection::vec(0u32..12, 1..8),
        steps in prop::collection::vec(step(), 0..400),
    ) {
        let mut world = World::new(chunk_counts);
        world.run_actions();
        for step in steps {
            world.step(step);
            world.check();
        }
        world.settle();
        world.check();
        prop_assert_eq!(world.committed[0].1, DeltaKind::Initial);
        prop_assert!(world.committed[1..].iter().all(|(_, kind, _)| *kind == DeltaKind::Changes));
    }
}

#[test]
fn a_gap_in_the_sequence_is_refused_as_resynchronization_required() {
    let mut replica = Replica::new("vm1", replicated_from_a(5));
    replica.hello(7, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    replica.handle_message(
        7,
        Message::DeltaBegin {
            delta: DeltaId {
                sequence: 9,
                cut: 1,
            },
            kind: DeltaKind::Changes,
            chunks: 1,
            recovery_point: true,
            app_consistent: false,
        },
    );
    let refusal = std::iter::from_fn(|| replica.poll_action())
        .find_map(|action| match action {
            ReplicaAction::Send {
                message: Message::Refused { code, reason },
                ..
            } => Some((reason, code)),
            _ => None,
        })
        .expect("refused");
    assert_eq!(refusal.1, RefusalCode::Gap, "{}", refusal.0);
}

#[test]
fn another_primary_or_other_disks_are_refused_for_good() {
    let record = replicated_from_a(1);
    let refusals = |owner: &str, disks: Vec<DiskDescription>| {
        let mut replica = Replica::new("vm1", record.clone());
        replica.hello(1, owner, PROTOCOL_VERSION, disks);
        std::iter::from_fn(|| replica.poll_action())
            .filter_map(|action| match action {
                ReplicaAction::Send {
                    message: Message::Refused { code, reason },
                    ..
                } => Some((reason, code)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let other_primary = refusals("fingerprint-b", config().disks);
    assert_eq!(other_primary[0].1, RefusalCode::NotThisReplica);
    assert!(!other_primary[0].1.retry());
    let other_disks = refusals("fingerprint-a", config().disks[..1].to_vec());
    assert_eq!(other_disks[0].1, RefusalCode::NotThisReplica);
    assert!(refusals("fingerprint-a", config().disks).is_empty());
}

#[test]
fn a_primary_refused_for_good_fails_and_says_why() {
    let now = Instant::now();
    let mut primary = Primary::new(config(), now);
    primary.handle_timeout(now);
    assert_eq!(primary.poll_action(), Some(PrimaryAction::Connect));
    primary.connected(now);
    assert!(matches!(
        primary.poll_action(),
        Some(PrimaryAction::Send(Message::Hello { .. }))
    ));
    primary.handle_message(
        now,
        Message::Refused {
            code: RefusalCode::NotThisReplica,
            reason: "vm1 is replicated from another primary".into(),
        },
    );
    assert!(matches!(
        primary.poll_action(),
        Some(PrimaryAction::Failed { reason }) if reason.contains("another primary")
    ));
    assert_eq!(primary.status(now).state, ReplicationState::Error);
    assert_eq!(primary.poll_timeout(), None);
}

#[test]
fn a_delta_that_outlasts_the_interval_counts_missed_cycles_and_the_next_cut_follows_at_once() {
    let mut world = World::new(vec![1, 3, 2]);
    world.run_actions();
    world.settle();
    // Initial replication done, and the first cycle's delta (cut right after it) too.
    assert_eq!(world.acknowledged.len(), 2);
    // Let two intervals pass while the next delta cannot be shipped.
    world.step(Step::Wait);
    let in_flight = world.cut.len();
    world.step(Step::DropLink);
    let before = world.primary.status(world.now).missed_cycles;
    world.now += FREQUENCY * 2;
    world.primary.handle_timeout(world.now);
    world.run_actions();
    assert!(world.primary.status(world.now).missed_cycles > before);
    world.settle();
    assert!(world.cut.len() >= in_flight);
    world.check();
}

#[test]
fn a_suspended_primary_cuts_nothing_and_resuming_cuts_at_once() {
    let mut world = World::new(vec![1, 2, 3]);
    world.run_actions();
    world.settle();
    let cut = world.cut.len();
    world.primary.suspend(world.now, true);
    assert_eq!(
        world.primary.status(world.now).state,
        ReplicationState::Suspended
    );
    let missed = world.primary.status(world.now).missed_cycles;
    for _ in 0..5 {
        world.step(Step::Wait);
    }
    assert_eq!(world.cut.len(), cut, "a suspended primary cut a delta");
    assert_eq!(world.primary.status(world.now).missed_cycles, missed);
    world.primary.suspend(world.now, false);
    world.run_actions();
    assert_eq!(world.cut.len(), cut + 1, "resuming did not cut at once");
    world.settle();
    world.check();
}

#[test]
fn a_primary_following_its_source_cuts_only_after_the_source_changed() {
    let mut world = World::new(vec![1, 2, 3, 4]);
    world.primary.follow_source();
    world.run_actions();
    world.settle();
    let cut = world.cut.len();
    let missed = world.primary.status(world.now).missed_cycles;
    for _ in 0..5 {
        world.step(Step::Wait);
    }
    assert_eq!(world.cut.len(), cut, "cut with nothing new to pass on");
    assert_eq!(world.primary.status(world.now).missed_cycles, missed);
    world.primary.source_changed();
    world.primary.source_changed();
    for _ in 0..5 {
        world.step(Step::Wait);
    }
    world.settle();
    assert_eq!(
        world.cut.len(),
        cut + 1,
        "one cut per change of the source, at most"
    );
    world.check();
}

#[test]
fn a_fenced_replica_refuses_its_primary_until_the_fence_is_lifted() {
    let record = replicated_from_a(3);
    let mut replica = Replica::new("vm1", record);
    let refusals = |replica: &mut Replica| {
        std::iter::from_fn(|| replica.poll_action())
            .filter_map(|action| match action {
                ReplicaAction::Send {
                    message: Message::Refused { code, reason },
                    ..
                } => Some((reason, code)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    replica.hello(1, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    assert!(refusals(&mut replica).is_empty());
    // Failing over refuses the connected primary at once, worth retrying (it may be cancelled).
    replica.fence(Some(Fence {
        reason: "failed over".into(),
        permanent: false,
    }));
    assert_eq!(
        refusals(&mut replica),
        vec![("vm1: failed over".to_string(), RefusalCode::FailedOver)]
    );
    assert_eq!(replica.connection(), None);
    replica.hello(2, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    assert_eq!(
        refusals(&mut replica)[0].1,
        RefusalCode::FailedOver,
        "a cancellable failover is worth retrying"
    );
    // Committed: refused for good.
    replica.fence(Some(Fence {
        reason: "committed".into(),
        permanent: true,
    }));
    replica.hello(3, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    assert_eq!(
        refusals(&mut replica)[0].1,
        RefusalCode::FailedOverForGood,
        "a committed failover is final"
    );
    // Cancelled: welcome again.
    replica.fence(None);
    replica.hello(4, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    assert!(refusals(&mut replica).is_empty());
    assert_eq!(replica.connection(), Some(4));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]
    #[test]
    fn a_planned_failover_hands_over_exactly_the_last_delta_despite_link_drops(
        chunk_counts in prop::collection::vec(0u32..6, 2..6),
        before in prop::collection::vec(step(), 0..150),
        after in prop::collection::vec(step(), 0..200),
    ) {
        let mut world = World::new(chunk_counts);
        world.run_actions();
        world.settle();
        for step in before {
            world.step(step);
        }
        world.primary.hand_over(world.now, false).unwrap();
        world.run_actions();
        for step in after {
            world.step(step);
            world.check();
        }
        for _ in 0..10_000 {
            if world.handed_over.is_some() {
                break;
            }
            if !world.staging.is_empty() {
                world.step(Step::Stage);
            } else if !world.to_replica.is_empty() {
                world.step(Step::ToReplica);
            } else if !world.to_primary.is_empty() {
                world.step(Step::ToPrimary);
            } else {
                world.step(Step::Wait);
            }
        }
        world.check();
        let last_cut = *world.cut.keys().last().unwrap();
        let last_committed = world.committed.last().unwrap().0.sequence;
        prop_assert_eq!(world.handed_over, Some(last_cut), "handed over short of the last cut");
        prop_assert_eq!(last_committed, last_cut);
        prop_assert_eq!(world.primary.status(world.now).state, ReplicationState::FailedOver);
        // Nothing is cut after the final delta, whatever the clock does.
        world.step(Step::Wait);
        prop_assert_eq!(*world.cut.keys().last().unwrap(), last_cut);
    }
}

#[test]
fn a_replica_stopped_by_a_failed_commit_takes_deltas_again_once_reopened() {
    let record = replicated_from_a(3);
    let mut replica = Replica::new("vm1", record.clone());
    let answers =
        |replica: &mut Replica| std::iter::from_fn(|| replica.poll_action()).collect::<Vec<_>>();
    replica.hello(1, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    answers(&mut replica);
    let delta = DeltaId {
        sequence: 4,
        cut: 9,
    };
    replica.handle_message(
        1,
        Message::DeltaBegin {
            delta,
            kind: DeltaKind::Changes,
            chunks: 1,
            recovery_point: true,
            app_consistent: false,
        },
    );
    replica.handle_message(
        1,
        Message::Chunk {
            delta,
            index: 0,
            disk: 0,
            payload: Bytes::from_static(b"chunk"),
        },
    );
    answers(&mut replica);
    replica.chunk_staged(delta, 0);
    replica.handle_message(1, Message::DeltaEnd { delta });
    assert!(
        answers(&mut replica)
            .iter()
            .any(|action| matches!(action, ReplicaAction::Commit { .. })),
        "a complete delta is committed"
    );
    // The disk was full: the VM stops, and a primary that comes back is told to retry.
    replica.commit_failed(delta, "no space left on device");
    answers(&mut replica);
    replica.hello(2, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    let refused = answers(&mut replica).into_iter().any(|action| {
        matches!(
            action,
            ReplicaAction::Send {
                message: Message::Refused {
                    code: RefusalCode::ReplicaFailed,
                    ..
                },
                ..
            }
        )
    });
    assert!(refused, "a stopped VM refuses, worth retrying");
    // Reopened (the store rolled the commit back): welcomed at what is applied, nothing staged.
    replica.recovered(record);
    replica.hello(3, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    let welcome = answers(&mut replica)
        .into_iter()
        .find_map(|action| match action {
            ReplicaAction::Send {
                message:
                    Message::Welcome {
                        applied, staged, ..
                    },
                ..
            } => Some((applied, staged)),
            _ => None,
        });
    assert_eq!(welcome, Some((3, None)));
}

#[test]
fn lost_tracking_is_shown_as_critical_with_its_reason_until_a_comparison_or_copy_catches_up() {
    let reason =
        "vm1.vhdx: the disk was written by another program while blockrep did not track it";
    let lost = PrimaryConfig {
        tracking: Tracking::Lost(reason.into()),
        ..config()
    };
    let now = Instant::now();
    let mut primary = Primary::new(lost.clone(), now);
    let status = primary.status(now);
    assert_eq!(status.state, ReplicationState::ResynchronizationRequired);
    assert_eq!(status.health, blockrep::proto::Health::Critical);
    let shown = status.last_error.unwrap_or_default();
    assert!(
        shown.contains("resynchronization required") && shown.contains(reason),
        "{shown}"
    );
    // The driver's comparison by hash found and marked every difference.
    primary.resynchronized();
    let status = primary.status(now);
    assert_ne!(status.state, ReplicationState::ResynchronizationRequired);
    assert!(status.last_error.is_none(), "{:?}", status.last_error);

    // A disk newly protected is an initial replication, not an alarm.
    let new = Primary::new(config(), now).status(now);
    assert_eq!(new.state, ReplicationState::InitialReplication);
    assert!(new.last_error.is_none());

    // Without a comparison the initial replication catches up instead.
    let mut world = World::new(vec![1, 2, 3]);
    world.primary = Primary::new(lost, world.now);
    world.run_actions();
    world.settle();
    world.check();
    let status = world.primary.status(world.now);
    assert_eq!(status.state, ReplicationState::Replicating, "{status:?}");
}

#[test]
fn a_primary_alone_cannot_replace_a_replica_and_its_points_with_an_initial_replication() {
    let record = replicated_from_a(3);
    let initial = |replica: &mut Replica, connection: ConnectionId| {
        replica.hello(
            connection,
            "fingerprint-a",
            PROTOCOL_VERSION,
            config().disks,
        );
        replica.handle_message(
            connection,
            Message::DeltaBegin {
                delta: DeltaId {
                    sequence: 4,
                    cut: 1,
                },
                kind: DeltaKind::Initial,
                chunks: 1,
                recovery_point: true,
                app_consistent: false,
            },
        );
        std::iter::from_fn(|| replica.poll_action()).collect::<Vec<_>>()
    };
    let mut replica = Replica::new("vm1", record);
    let actions = initial(&mut replica, 7);
    let refusal = actions
        .iter()
        .find_map(|action| match action {
            ReplicaAction::Send {
                message: Message::Refused { code, reason },
                ..
            } => Some((reason.clone(), *code)),
            _ => None,
        })
        .expect("refused");
    assert_eq!(
        refusal.1,
        RefusalCode::ReinitializeNeedsConsent,
        "{}",
        refusal.0
    );
    assert!(!refusal.1.retry());
    assert!(
        refusal.0.contains("blockrep reinitialize vm1"),
        "the refusal says what to run: {}",
        refusal.0
    );
    assert!(
        !actions
            .iter()
            .any(|action| matches!(action, ReplicaAction::StartStaging { .. })),
        "{actions:?}"
    );
    // With the replica host's consent it is staged.
    replica.allow_reinitialize();
    let actions = initial(&mut replica, 8);
    assert!(
        actions.iter().any(|action| matches!(
            action,
            ReplicaAction::StartStaging {
                kind: DeltaKind::Initial,
                ..
            }
        )),
        "{actions:?}"
    );
}

#[test]
fn chunks_before_their_begin_are_held_up_to_a_bound_in_bytes_not_only_in_count() {
    let record = replicated_from_a(1);
    let mut replica = Replica::new("vm1", record);
    replica.hello(7, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    while replica.poll_action().is_some() {}
    let delta = DeltaId {
        sequence: 2,
        cut: 5,
    };
    // Frames of 2 MiB (a hostile primary's; ours are near 1 MiB), none begun.
    let mut closed_at = None;
    for index in 0..30u32 {
        replica.handle_message(
            7,
            Message::Chunk {
                delta,
                index,
                disk: 0,
                payload: Bytes::from(vec![0u8; 2 << 20]),
            },
        );
        let closed = std::iter::from_fn(|| replica.poll_action())
            .any(|action| matches!(action, ReplicaAction::Close { .. }));
        if closed {
            closed_at = Some(index);
            break;
        }
    }
    // 40 MiB held at most: the 21st is refused, long before the count of 64.
    assert_eq!(closed_at, Some(20));
}

#[test]
fn a_replica_that_keeps_asking_for_comparisons_stops_replication_instead_of_looping() {
    let now = Instant::now();
    let mut primary = Primary::new(config(), now);
    let refusal = || Message::Refused {
        code: RefusalCode::ResynchronizationRequired,
        reason: "vm1: replica disk disk-0.vhdx: changed".into(),
    };
    let mut actions = Vec::new();
    for _ in 0..3 {
        primary.handle_message(now, refusal());
        actions.extend(std::iter::from_fn(|| primary.poll_action()));
    }
    assert_eq!(
        actions
            .iter()
            .filter(|action| matches!(action, PrimaryAction::Resync { .. }))
            .count(),
        3,
        "{actions:?}"
    );
    primary.handle_message(now, refusal());
    let last: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
    assert!(
        last.iter().any(|action| matches!(
            action,
            PrimaryAction::Failed { reason } if reason.contains("4 times in a row")
        )),
        "{last:?}"
    );
}

#[test]
fn a_replica_ahead_of_what_the_disks_journals_confirmed_is_compared_first() {
    let welcome = |applied| Message::Welcome {
        version: blockrep::proto::PROTOCOL_VERSION,
        applied,
        staged: None,
    };
    let connected = |primary: &mut Primary, now| {
        primary.handle_timeout(now);
        std::iter::from_fn(|| primary.poll_action()).for_each(drop);
        primary.connected(now);
        std::iter::from_fn(|| primary.poll_action()).for_each(drop);
    };
    let now = Instant::now();
    let vouching = PrimaryConfig {
        tracking: Tracking::Vouches,
        ..config()
    };
    // The journals say delta 7; the replica holds 9: the disks went back.
    let mut primary = Primary::new(vouching.clone(), now);
    primary.remember_acknowledged(Some(7));
    connected(&mut primary, now);
    primary.handle_message(now, welcome(9));
    let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
    assert!(
        actions.iter().any(|action| matches!(
            action,
            PrimaryAction::Resync { reason } if reason.contains("went back")
        )),
        "{actions:?}"
    );
    // The journals say delta 9; the replica holds 6: the replica's copy went back (a store
    // restored from a backup), and tracking no longer holds what it lacks.
    let mut primary = Primary::new(vouching.clone(), now);
    primary.remember_acknowledged(Some(9));
    connected(&mut primary, now);
    primary.handle_message(now, welcome(6));
    let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
    assert!(
        actions.iter().any(|action| matches!(
            action,
            PrimaryAction::Resync { reason } if reason.contains("the replica went back")
        )),
        "{actions:?}"
    );
    assert!(primary.comparison_owed());
    // One delta ahead is the delta in flight when the primary stopped: normal.
    let mut primary = Primary::new(vouching, now);
    primary.remember_acknowledged(Some(8));
    connected(&mut primary, now);
    primary.handle_message(now, welcome(9));
    let actions: Vec<_> = std::iter::from_fn(|| primary.poll_action()).collect();
    assert!(
        !actions
            .iter()
            .any(|action| matches!(action, PrimaryAction::Resync { .. })),
        "{actions:?}"
    );
}

#[test]
fn a_chunk_the_store_cannot_take_is_retried_not_called_a_violation() {
    let record = replicated_from_a(1);
    let delta = DeltaId {
        sequence: 2,
        cut: 5,
    };
    let full = blockrep::Error::Io {
        name: "store/vm1/stage".into(),
        action: "write",
        offset: Some(0),
        source: std::io::Error::from_raw_os_error(28),
    };
    let mut replica = Replica::new("vm1", record);
    replica.hello(7, "fingerprint-a", PROTOCOL_VERSION, config().disks);
    std::iter::from_fn(|| replica.poll_action()).for_each(drop);
    replica.chunk_not_staged(delta, 0, &full);
    let actions: Vec<_> = std::iter::from_fn(|| replica.poll_action()).collect();
    let refusal = actions.iter().find_map(|action| match action {
        ReplicaAction::Send {
            message: Message::Refused { code, reason },
            ..
        } => Some((reason.clone(), *code)),
        _ => None,
    });
    let (reason, code) = refusal.unwrap_or_else(|| panic!("not told: {actions:?}"));
    assert_eq!(
        code,
        RefusalCode::ReplicaFailed,
        "a full store is worth retrying, not a violation: {reason}"
    );
    assert!(code.retry());
}

#[test]
fn a_primary_the_replica_keeps_refusing_turns_critical_though_it_is_welcomed_each_time() {
    let start = Instant::now();
    let mut primary = Primary::new(
        PrimaryConfig {
            tracking: Tracking::Vouches,
            ..config()
        },
        start,
    );
    let welcome = || Message::Welcome {
        version: blockrep::proto::PROTOCOL_VERSION,
        applied: 1,
        staged: None,
    };
    let mut now = start;
    for _ in 0..6 {
        now += FREQUENCY;
        primary.handle_timeout(now);
        std::iter::from_fn(|| primary.poll_action()).for_each(drop);
        primary.connected(now);
        primary.handle_message(now, welcome());
        primary.handle_message(
            now,
            Message::Refused {
                code: RefusalCode::ReplicaFailed,
                reason: "vm1: the replica cannot stage delta 2: no space left on device".into(),
            },
        );
        // As the driver does: the connection closes for the reason the machine gives.
        let reason = std::iter::from_fn(|| primary.poll_action())
            .find_map(|action| match action {
                PrimaryAction::Disconnect { reason } => Some(reason),
                _ => None,
            })
            .expect("disconnected");
        primary.connection_lost(now, &reason);
    }
    let status = primary.status(now);
    assert_eq!(
        status.health,
        blockrep::proto::Health::Critical,
        "{status:?}"
    );
    assert!(
        status
            .last_error
            .unwrap_or_default()
            .contains("no space left"),
        "the reason is named"
    );
}
