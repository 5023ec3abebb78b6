//! Replication events as an embedder receives them, from both sides over QUIC on loopback:
//! the primary's cycles and handover, the replica server's deltas applied and failover steps,
//! and a failover committed on a server that replicates the VM onward to a third site.

mod common;

use blockrep::delta::Compression;
use blockrep::io::StorageOptions;
use blockrep::net::{
    Ending, ExtensionOptions, HandoverFailure, Hosting, HostingOptions, Identity, PrimaryCommand,
    PrimaryOptions, ReplicaServer, ReplicationEvent, Route, SharedReport, TimedEvent,
    client_endpoint, run_primary,
};
use blockrep::protect::ProtectedVm;
use blockrep::proto::PrimaryConfig;
use blockrep::replica::ReplicaStore;
use common::pattern;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

const MIB: usize = 1 << 20;

/// A primary for `vm1`, replicating every 200 ms.
struct Primary {
    vm: Arc<ProtectedVm>,
    report: SharedReport,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<blockrep::Result<Ending>>,
    events: mpsc::UnboundedReceiver<TimedEvent>,
    commands: mpsc::UnboundedSender<PrimaryCommand>,
}

impl Primary {
    fn start(
        directory: &Path,
        identity: &Identity,
        trusted: &Identity,
        server: &ReplicaServer,
    ) -> Primary {
        let disk = directory.join("vm1.raw");
        std::fs::write(&disk, pattern(3, 4 * MIB)).unwrap();
        let vm = Arc::new(
            ProtectedVm::open(&[disk], &StorageOptions::default(), Compression::Lz4).unwrap(),
        );
        let (events, received) = mpsc::unbounded_channel();
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let mut options = PrimaryOptions::new(
            Route::Dial {
                endpoint: client_endpoint(identity, trusted.certificate.clone(), server.address())
                    .unwrap(),
                replica: server.address(),
            },
            PrimaryConfig {
                vm: "vm1".into(),
                primary: "host-a".into(),
                disks: vm.descriptions().to_vec(),
                frequency: Duration::from_millis(200),
                window: 16,
                reconnect_min: Duration::from_millis(100),
                reconnect_max: Duration::from_secs(1),
                tracking: vm.tracking().clone(),
                seed: 11,
                app_consistent_every: None,
            },
        );
        options.streams = 2;
        options.commands = Some(command_receiver);
        options.events = Some(events);
        let report = SharedReport::default();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run_primary(
            Arc::clone(&vm),
            options,
            report.clone(),
            stopped,
        ));
        Primary {
            vm,
            report,
            stop,
            task,
            events: received,
            commands,
        }
    }

    fn applied(&self) -> u64 {
        self.report
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |entry| entry.status.applied_sequence)
    }

    /// Writes a little, then waits until `sequence` is applied.
    async fn replicate_until(&self, sequence: u64) {
        let disk = Arc::clone(&self.vm.disks()[0]);
        tokio::task::spawn_blocking(move || disk.write_at(&pattern(9, 100_000), 12_345))
            .await
            .unwrap()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.applied() < sequence {
            assert!(
                Instant::now() < deadline,
                "delta {sequence} was not applied"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn server(
    directory: &Path,
    name: &str,
    identity: &Identity,
    allowed: &Identity,
    hosting: HostingOptions,
) -> (ReplicaServer, mpsc::UnboundedReceiver<TimedEvent>) {
    let store = ReplicaStore::open(&directory.join(name), StorageOptions::default()).unwrap();
    let (events, received) = mpsc::unbounded_channel();
    let server = ReplicaServer::start(
        "127.0.0.1:0".parse().unwrap(),
        store,
        identity,
        vec![allowed.certificate.clone()],
        Hosting::Here(Box::new(hosting)),
        Some(events),
    )
    .await
    .unwrap();
    (server, received)
}

fn drain(received: &mut mpsc::UnboundedReceiver<TimedEvent>) -> Vec<ReplicationEvent> {
    let mut events = Vec::new();
    while let Ok(timed) = received.try_recv() {
        assert_eq!(timed.vm, "vm1");
        events.push(timed.event);
    }
    events
}

/// The events that are neither cycles nor health: the steps, in order.
fn steps(events: &[ReplicationEvent]) -> Vec<ReplicationEvent> {
    events
        .iter()
        .filter(|event| {
            !matches!(
                event,
                ReplicationEvent::DeltaApplied { .. }
                    | ReplicationEvent::CycleShipped { .. }
                    | ReplicationEvent::CyclesMissed { .. }
                    | ReplicationEvent::HealthChanged { .. }
            )
        })
        .cloned()
        .collect()
}

fn applied_sequences(events: &[ReplicationEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|event| match event {
            ReplicationEvent::DeltaApplied { sequence, .. } => Some(*sequence),
            _ => None,
        })
        .collect()
}

async fn failover_when_disconnected(server: &ReplicaServer) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match server.unplanned_failover("vm1", None, false).await {
            Ok(copy) => return copy.point,
            // Refused while the primary's connection is still closing.
            Err(error) if error.to_string().contains("still connected") => {
                assert!(Instant::now() < deadline, "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the failover failed: {error}"),
        }
    }
}

/// A replica server and a primary replicating `vm1` to it, both telling their events.
async fn two_sites() -> (
    tempfile::TempDir,
    ReplicaServer,
    mpsc::UnboundedReceiver<TimedEvent>,
    Primary,
) {
    let directory = tempfile::tempdir().unwrap();
    let replica_id = Identity::create("replica", &directory.path().join("replica-id")).unwrap();
    let primary_id = Identity::create("primary", &directory.path().join("primary-id")).unwrap();
    let (server, server_events) = server(
        directory.path(),
        "store",
        &replica_id,
        &primary_id,
        HostingOptions::default(),
    )
    .await;
    let primary = Primary::start(directory.path(), &primary_id, &replica_id, &server);
    (directory, server, server_events, primary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_server_tells_each_delta_applied_and_each_failover_step() {
    let (directory, server, mut server_events, mut primary) = two_sites().await;
    primary.replicate_until(3).await;

    let test_copy = server
        .test_failover("vm1", None, &directory.path().join("test"))
        .await
        .unwrap();
    server.cleanup_test_failover("vm1").await.unwrap();
    let _ = primary.stop.send(true);
    assert!(matches!(
        primary.task.await.unwrap().unwrap(),
        Ending::Stopped
    ));
    let first = failover_when_disconnected(&server).await;
    server.cancel_failover("vm1").await.unwrap();
    let point = failover_when_disconnected(&server).await;
    assert_eq!(point, first, "nothing was applied in between");
    server.commit_failover("vm1").await.unwrap();
    server.reverse("vm1").await.unwrap();

    let events = drain(&mut server_events);
    let applied = applied_sequences(&events);
    assert_eq!(
        applied,
        (1..=point).collect::<Vec<_>>(),
        "every delta applied is told once, in order"
    );
    let steps = steps(&events);
    let expected = [
        ReplicationEvent::TestFailoverCreated {
            point: test_copy.point,
            disks: test_copy.disks.clone(),
        },
        ReplicationEvent::TestFailoverRemoved,
        ReplicationEvent::FailedOver { point },
        ReplicationEvent::FailoverCancelled,
        ReplicationEvent::FailedOver { point },
        ReplicationEvent::FailoverCommitted { point },
        ReplicationEvent::ReverseRequested,
    ];
    assert!(steps.len() >= expected.len(), "{steps:?}");
    assert_eq!(steps[..expected.len()], expected);
    // Then the replication back, as a primary tells it: a comparison is owed to the old
    // primary, whose copy may hold writes this site never saw.
    assert!(
        steps[expected.len()..]
            .iter()
            .all(|step| matches!(step, ReplicationEvent::ResyncStarted { .. })),
        "{steps:?}"
    );
    // The primary told its cycles, up to the point the VM failed over at (a delta acknowledged
    // as the primary stopped may be applied without its having seen it).
    let shipped: Vec<u64> = drain(&mut primary.events)
        .iter()
        .filter_map(|event| match event {
            ReplicationEvent::CycleShipped { sequence, .. } => Some(*sequence),
            _ => None,
        })
        .collect();
    assert!(
        shipped.windows(2).all(|pair| pair[0] < pair[1]),
        "{shipped:?}"
    );
    assert!(
        shipped
            .last()
            .is_some_and(|last| *last >= 3 && *last <= point),
        "{shipped:?}, failed over at {point}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_is_told_by_both_sides() {
    let (_directory, server, mut server_events, mut primary) = two_sites().await;
    primary.replicate_until(2).await;

    // The VM's writes have stopped (nothing writes now). The replica keeps a recovery point,
    // which taking the VM over would drop: the primary alone may not.
    let (done, answer) = oneshot::channel();
    primary
        .commands
        .send(PrimaryCommand::HandOver {
            reverse: false,
            done,
            before_take_over: None,
        })
        .unwrap();
    match answer.await.unwrap() {
        Err(HandoverFailure::NotHandedOver(reason)) => {
            assert!(reason.contains("blockrep allow-handover vm1"), "{reason}")
        }
        other => panic!("a handover without consent ended with {other:?}"),
    }
    assert!(
        matches!(
            steps(&drain(&mut server_events)).as_slice(),
            [ReplicationEvent::HandoverRefused { .. }]
        ),
        "the server tells of the refusal"
    );
    // Replication goes on, and with the replica host's consent the VM goes.
    let refused_at = primary.applied();
    primary.replicate_until(refused_at + 1).await;
    server.allow_handover("vm1").await.unwrap();
    let (done, answer) = oneshot::channel();
    primary
        .commands
        .send(PrimaryCommand::HandOver {
            reverse: false,
            done,
            before_take_over: None,
        })
        .unwrap();
    let sequence = answer.await.unwrap().unwrap();
    match primary.task.await.unwrap().unwrap() {
        Ending::HandedOver { sequence: ended_at } => assert_eq!(ended_at, sequence),
        other => panic!("the primary ended with {other:?}"),
    }
    // A refusal for want of consent says nothing differs: no comparison, and the VM went.
    let told = steps(&drain(&mut primary.events));
    assert!(
        matches!(
            told.as_slice(),
            [
                ReplicationEvent::HandoverRefused { .. },
                ReplicationEvent::HandedOver { sequence: handed },
            ] if *handed == sequence
        ),
        "{told:?}"
    );
    let events = drain(&mut server_events);
    assert_eq!(
        steps(&events),
        vec![ReplicationEvent::HandoverAccepted {
            sequence,
            reverse: false
        }]
    );
    assert_eq!(applied_sequences(&events).last(), Some(&sequence));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_committed_from_async_code_stops_onward_replication() {
    let directory = tempfile::tempdir().unwrap();
    let replica_id = Identity::create("replica", &directory.path().join("replica-id")).unwrap();
    let third_id = Identity::create("third", &directory.path().join("third-id")).unwrap();
    let primary_id = Identity::create("primary", &directory.path().join("primary-id")).unwrap();
    let (third, mut third_events) = server(
        directory.path(),
        "third-store",
        &third_id,
        &replica_id,
        HostingOptions::default(),
    )
    .await;
    let extend = ExtensionOptions {
        target: third.address(),
        endpoint: client_endpoint(&replica_id, third_id.certificate.clone(), third.address())
            .unwrap(),
        frequency: Duration::from_millis(200),
        storage: StorageOptions::default(),
        streams: 2,
        host_name: "replica-site".into(),
    };
    let (server, _server_events) = server(
        directory.path(),
        "store",
        &replica_id,
        &primary_id,
        HostingOptions {
            extend: Some(extend),
            ..HostingOptions::default()
        },
    )
    .await;
    let primary = Primary::start(directory.path(), &primary_id, &replica_id, &server);
    primary.replicate_until(2).await;
    // The third site has taken a copy.
    let deadline = Instant::now() + Duration::from_secs(60);
    while applied_sequences(&drain(&mut third_events)).is_empty() {
        assert!(Instant::now() < deadline, "nothing reached the third site");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.reports()[0].extended.is_some());

    let _ = primary.stop.send(true);
    primary.task.await.unwrap().unwrap();
    failover_when_disconnected(&server).await;
    // Committing stops the onward primary before the disks become the VM's.
    let disks = server.commit_failover("vm1").await.unwrap();
    assert_eq!(disks.len(), 1);
    let report = &server.reports()[0];
    assert!(report.extended.is_none(), "onward replication still runs");
    assert!(
        report
            .failover
            .as_ref()
            .is_some_and(|failover| failover.committed)
    );
    server.shutdown().await;
    third.shutdown().await;
}
