use super::*;
use crate::delta::{Compression, DeltaEncoder, DeltaHeader};
use crate::image::{Access, BlockImage, VhdxImage};
use crate::io::{FileStorage, StorageOptions};
use crate::proto::{DeltaId, DeltaKind, DiskDescription};
use crate::replica::PointPolicy;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

fn disk() -> DiskDescription {
    DiskDescription {
        disk_id: uuid::Uuid::from_u128(9),
        virtual_size: SIZE,
        logical_sector: 512,
    }
}

fn chunk(sequence: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let header = DeltaHeader {
        disk_id: disk().disk_id,
        virtual_size: SIZE,
        block_size: 64 << 10,
        source_generation: sequence,
        sequence,
        recovery_point: true,
        full: false,
    };
    let range = offset..offset + data.len() as u64;
    DeltaEncoder::new()
        .encode_chunk(
            &header,
            offset,
            data,
            std::slice::from_ref(&range),
            Compression::Lz4,
        )
        .unwrap()
}

fn id(sequence: u64) -> DeltaId {
    DeltaId {
        sequence,
        cut: sequence,
    }
}

/// Delta k writes byte k over region k (1 MiB at k MiB) and a counter block at 0.
fn apply(slot: &Mutex<VmSlot>, sequence: u64) {
    let mut slot = lock(slot);
    let replica = &mut slot.replica;
    replica
        .start_staging(id(sequence), DeltaKind::Changes)
        .unwrap();
    let region = vec![sequence as u8; MIB as usize];
    replica
        .stage_chunk(id(sequence), 0, &chunk(sequence, sequence * MIB, &region))
        .unwrap();
    replica
        .stage_chunk(
            id(sequence),
            0,
            &chunk(sequence, 0, &[sequence as u8; 4096]),
        )
        .unwrap();
    replica
        .commit(id(sequence), DeltaKind::Changes, false)
        .unwrap();
}

#[test]
fn a_test_failover_made_while_deltas_land_is_one_consistent_state() {
    for keep in [0, 24] {
        let directory = tempfile::tempdir().unwrap();
        let policy = PointPolicy {
            keep,
            interval: Duration::from_secs(3600),
        };
        let store =
            ReplicaStore::with_policy(directory.path(), StorageOptions::default(), policy).unwrap();
        let mut replica = store.open_vm("vm1").unwrap();
        replica.prepare(vec![disk()], "owner").unwrap();
        replica.start_staging(id(1), DeltaKind::Initial).unwrap();
        replica.commit(id(1), DeltaKind::Initial, false).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let slot = Arc::new_cyclic(|this| {
            Mutex::new(VmSlot {
                machine: Replica::new("vm1", replica.record()),
                replica,
                connections: HashMap::new(),
                runtime: runtime.handle().clone(),
                site: Arc::new(Site {
                    hosting: Hosting::Here(Box::default()),
                    events: None,
                    last_reports: Mutex::default(),
                }),
                hosted: None,
                extended: None,
                onward_retry: OnwardRetry::default(),
                failback: None,
                this: this.clone(),
                totals: Totals::default(),
            })
        });
        let writer = {
            let slot = Arc::clone(&slot);
            std::thread::spawn(move || {
                for sequence in 2..=40 {
                    apply(&slot, sequence);
                }
            })
        };
        while lock(&slot).replica.applied() < 6 {
            std::thread::yield_now();
        }
        let out = directory.path().join("test-failover");
        let copy = test_failover(&slot, "vm1", None, &out).unwrap();
        writer.join().unwrap();
        let image = VhdxImage::open(
            FileStorage::open(&copy.disks[0], false).unwrap(),
            "copy",
            Access::ReadOnly,
        )
        .unwrap();
        let mut counter = [0u8; 4096];
        image.read_at(&mut counter, 0).unwrap();
        let at = u64::from(counter[0]);
        assert_eq!(
            at, copy.point,
            "keep {keep}: the counter says {at}, the copy claims point {}",
            copy.point
        );
        let mut region = vec![0u8; MIB as usize];
        for sequence in 2..=40u64 {
            image.read_at(&mut region, sequence * MIB).unwrap();
            let expected = if sequence <= at { sequence as u8 } else { 0 };
            assert!(
                region[1..].iter().all(|&byte| byte == expected)
                    && (sequence == 0 || region[0] == expected),
                "keep {keep}: region {sequence} of a copy at point {at} holds {}",
                region[0]
            );
        }
        // Nothing held for the copy stays behind when no points are kept.
        if keep == 0 {
            let leftovers = std::fs::read_dir(directory.path().join("vm1"))
                .unwrap()
                .flatten()
                .filter(|entry| entry.file_name().to_string_lossy().starts_with("undo-"))
                .count();
            assert_eq!(leftovers, 0, "undo files left behind");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_does_not_wait_for_a_busy_replica_but_says_it_is_busy() {
    let directory = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(directory.path(), StorageOptions::default()).unwrap();
    {
        let mut replica = store.open_vm("vm1").unwrap();
        replica.prepare(vec![disk()], "owner").unwrap();
        replica.start_staging(id(1), DeltaKind::Initial).unwrap();
        replica.commit(id(1), DeltaKind::Initial, false).unwrap();
    }
    let (taken_over, _) = mpsc::unbounded_channel();
    let server = ReplicaServer::without_listener(store, Hosting::Caller(taken_over), None)
        .await
        .unwrap();
    // A long comparison holds the VM's slot, before status was ever asked.
    let slot = server.slot("vm1").unwrap();
    let held = lock(&slot);
    let busy = server.reports();
    assert!(busy[0].busy, "{busy:?}");
    assert_eq!(busy[0].vm, "vm1");
    assert_eq!(
        busy[0].applied_sequence, 1,
        "the figures read when it was opened"
    );
    drop(held);
    let idle = server.reports();
    assert_eq!(idle.len(), 1);
    assert!(!idle[0].busy);
    assert_eq!(idle[0].applied_sequence, 1);
    assert_eq!(busy[0].disks, idle[0].disks);
}

#[test]
fn a_resync_of_large_disks_is_given_time_to_hash_them() {
    assert_eq!(resync_timeout(0), Duration::from_secs(3600));
    assert_eq!(resync_timeout(64 << 30), Duration::from_secs(3600));
    // 4 TiB at 32 MiB/s: over 36 hours.
    assert_eq!(resync_timeout(4 << 40), Duration::from_secs(131_072));
}

#[test]
fn an_old_primary_connecting_while_a_failback_lets_the_vm_go_is_told_to_come_back() {
    let directory = tempfile::tempdir().unwrap();
    let policy = PointPolicy {
        keep: 0,
        interval: Duration::from_secs(3600),
    };
    let store =
        ReplicaStore::with_policy(directory.path(), StorageOptions::default(), policy).unwrap();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.prepare(vec![disk()], "owner").unwrap();
    replica.start_staging(id(1), DeltaKind::Initial).unwrap();
    replica.commit(id(1), DeltaKind::Initial, false).unwrap();
    // Handed over here, then a failback recorded its final delta and took the VM's hosting
    // away to close it: the machine still remembers the handover.
    replica.take_over(1, true).unwrap();
    replica.set_handing_back(Some(1)).unwrap();
    let mut machine = Replica::new("vm1", replica.record());
    machine.handover_verified(7, 1, Ok(()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let slot = Arc::new_cyclic(|this| {
        Mutex::new(VmSlot {
            machine,
            replica,
            connections: HashMap::new(),
            runtime: runtime.handle().clone(),
            site: Arc::new(Site {
                hosting: Hosting::Here(Box::default()),
                events: None,
                last_reports: Mutex::default(),
            }),
            hosted: None,
            extended: None,
            onward_retry: OnwardRetry::default(),
            failback: None,
            this: this.clone(),
            totals: Totals::default(),
        })
    });
    match answer_for_running_vm(&slot, "owner") {
        Some(Message::Refused { code, reason }) => {
            assert_eq!(code, RefusalCode::RunsAtReplicaSite, "{reason}");
            assert!(code.retry());
        }
        other => panic!("told {other:?}"),
    }
    // Once it is the replica again, the old primary is let through to its hello.
    lock(&slot).replica.hand_back(1).unwrap();
    assert!(answer_for_running_vm(&slot, "owner").is_none());
}

#[test]
fn onward_replication_that_cannot_start_waits_longer_each_time() {
    let now = std::time::Instant::now();
    let mut retry = OnwardRetry::default();
    let pauses: Vec<u64> = (0..12).map(|_| retry.failed(now).as_secs()).collect();
    assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
}
