use super::*;
use crate::delta::{Compression, DeltaEncoder, DeltaHeader};
use uuid::Uuid;

const SIZE: u64 = 4 << 20;

fn disks() -> Vec<DiskDescription> {
    vec![
        DiskDescription {
            disk_id: Uuid::from_u128(11),
            virtual_size: SIZE,
            logical_sector: 512,
        },
        DiskDescription {
            disk_id: Uuid::from_u128(12),
            virtual_size: SIZE / 2,
            logical_sector: 4096,
        },
    ]
}

fn chunk(disk: &DiskDescription, sequence: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let header = DeltaHeader {
        disk_id: disk.disk_id,
        virtual_size: disk.virtual_size,
        block_size: 64 << 10,
        source_generation: sequence,
        sequence,
        recovery_point: true,
        full: false,
    };
    DeltaEncoder::new()
        .encode_chunk(
            &header,
            offset,
            data,
            std::slice::from_ref(&(offset..offset + data.len() as u64)),
            Compression::Lz4,
        )
        .unwrap()
}

fn delta(sequence: u64) -> DeltaId {
    DeltaId {
        sequence,
        cut: sequence * 1000,
    }
}

fn read(replica: &mut VmReplica, disk: usize, offset: u64, length: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; length];
    replica.read_disk(disk, &mut bytes, offset).unwrap();
    bytes
}

/// A store holding vm1 after initial replication (disk 0 at 1 MiB: 0x11, disk 1 at 0: 0x22).
fn replicated() -> (tempfile::TempDir, ReplicaStore) {
    let directory = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(directory.path(), StorageOptions::default()).unwrap();
    let mut replica = store.open_vm("vm1").unwrap();
    assert!(replica.record().disks.is_none());
    replica.prepare(disks(), "sha256:owner").unwrap();
    replica.start_staging(delta(1), DeltaKind::Initial).unwrap();
    replica
        .stage_chunk(delta(1), 0, &chunk(&disks()[0], 1, 1 << 20, &[0x11; 65536]))
        .unwrap();
    replica
        .stage_chunk(delta(1), 1, &chunk(&disks()[1], 1, 0, &[0x22; 4096]))
        .unwrap();
    replica.commit(delta(1), DeltaKind::Initial, false).unwrap();
    assert_eq!(replica.applied(), 1);
    (directory, store)
}

#[test]
fn initial_replication_then_changes_reach_every_disk() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    assert_eq!(read(&mut replica, 0, 1 << 20, 65536), vec![0x11; 65536]);
    assert_eq!(read(&mut replica, 1, 0, 4096), vec![0x22; 4096]);
    replica.start_staging(delta(2), DeltaKind::Changes).unwrap();
    replica
        .stage_chunk(delta(2), 0, &chunk(&disks()[0], 2, 1 << 20, &[0x33; 4096]))
        .unwrap();
    replica.commit(delta(2), DeltaKind::Changes, false).unwrap();
    drop(replica);
    let reopened = &mut store.open_vm("vm1").unwrap();
    assert_eq!(reopened.applied(), 2);
    assert_eq!(read(reopened, 0, 1 << 20, 4096), vec![0x33; 4096]);
    assert_eq!(read(reopened, 0, (1 << 20) + 4096, 4096), vec![0x11; 4096]);
    assert_eq!(reopened.record().owner.as_deref(), Some("sha256:owner"));
}

#[test]
fn a_crash_after_the_commit_is_recorded_is_redone_on_open() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.start_staging(delta(2), DeltaKind::Changes).unwrap();
    replica
        .stage_chunk(delta(2), 1, &chunk(&disks()[1], 2, 8192, &[0x44; 8192]))
        .unwrap();
    // The commit's first steps, then the process dies before applying.
    if let Some(Staging::Changes { file, .. }) = replica.staging.take() {
        file.flush().unwrap();
    }
    replica
        .mark_committing(Some((delta(2), DeltaKind::Changes)), false)
        .unwrap();
    drop(replica);
    let mut recovered = store.open_vm("vm1").unwrap();
    assert_eq!(recovered.applied(), 2);
    assert_eq!(read(&mut recovered, 1, 8192, 8192), vec![0x44; 8192]);
    assert!(!recovered.directory.join(STAGE).exists());
}

#[test]
fn a_crash_before_the_commit_is_recorded_leaves_the_last_delta() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.start_staging(delta(2), DeltaKind::Changes).unwrap();
    replica
        .stage_chunk(delta(2), 0, &chunk(&disks()[0], 2, 1 << 20, &[0x55; 4096]))
        .unwrap();
    drop(replica);
    let mut reopened = store.open_vm("vm1").unwrap();
    assert_eq!(reopened.applied(), 1);
    assert_eq!(read(&mut reopened, 0, 1 << 20, 4096), vec![0x11; 4096]);
}

#[test]
fn an_initial_replication_interrupted_after_its_commit_is_recorded_completes() {
    let directory = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(directory.path(), StorageOptions::default()).unwrap();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.prepare(disks(), "sha256:owner").unwrap();
    replica.start_staging(delta(1), DeltaKind::Initial).unwrap();
    replica
        .stage_chunk(delta(1), 0, &chunk(&disks()[0], 1, 0, &[0x66; 512]))
        .unwrap();
    if let Some(Staging::Initial { disks, .. }) = replica.staging.take() {
        for disk in disks {
            disk.close().unwrap();
        }
    }
    replica
        .mark_committing(Some((delta(1), DeltaKind::Initial)), false)
        .unwrap();
    drop(replica);
    let mut recovered = store.open_vm("vm1").unwrap();
    assert_eq!(recovered.applied(), 1);
    assert_eq!(read(&mut recovered, 0, 0, 512), vec![0x66; 512]);
}

#[test]
fn chunks_that_are_damaged_or_for_another_disk_are_refused() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.start_staging(delta(2), DeltaKind::Changes).unwrap();
    let mut damaged = chunk(&disks()[0], 2, 0, &[1; 4096]);
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x10;
    assert!(replica.stage_chunk(delta(2), 0, &damaged).is_err());
    let other_disk = chunk(&disks()[1], 2, 0, &[1; 4096]);
    let error = replica.stage_chunk(delta(2), 0, &other_disk).unwrap_err();
    assert!(error.to_string().contains("is for disk"), "{error}");
    let wrong_sequence = chunk(&disks()[0], 3, 0, &[1; 4096]);
    assert!(replica.stage_chunk(delta(2), 0, &wrong_sequence).is_err());
    assert!(
        replica
            .stage_chunk(delta(2), 5, &chunk(&disks()[0], 2, 0, &[1; 512]))
            .is_err()
    );
}

/// The store at `root`, keeping `keep` points at most one per `interval`.
/// How many undo files vm1's directory holds.
fn undo_files(root: &Path) -> usize {
    std::fs::read_dir(root.join("vm1"))
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("undo-"))
        .count()
}

fn store_keeping(root: &Path, keep: usize, interval: std::time::Duration) -> ReplicaStore {
    let policy = PointPolicy { keep, interval };
    ReplicaStore::with_policy(root, StorageOptions::default(), policy).unwrap()
}

/// The replica's disks as they were at point `target`, from the latest state and undo.
fn at_point(replica: &mut VmReplica, target: u64) -> Vec<Vec<u8>> {
    let mut images: Vec<crate::image::RawImage<crate::io::MemoryStorage>> = disks()
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            let mut bytes = vec![0u8; disk.virtual_size as usize];
            replica.read_disk(index, &mut bytes, 0).unwrap();
            crate::image::RawImage::open(
                crate::io::MemoryStorage::from_bytes(bytes),
                "copy",
                Access::ReadWrite,
            )
            .unwrap()
        })
        .collect();
    let applied = replica.applied();
    for path in replica.undo_path_to(target, applied + 1).unwrap() {
        apply_bundle(&path, &mut images, || {}).unwrap();
    }
    images
        .iter()
        .map(|image| {
            let mut bytes = vec![0u8; image.virtual_size() as usize];
            image.read_at(&mut bytes, 0).unwrap();
            bytes
        })
        .collect()
}

fn apply_change(replica: &mut VmReplica, sequence: u64, disk: usize, offset: u64, data: &[u8]) {
    replica
        .start_staging(delta(sequence), DeltaKind::Changes)
        .unwrap();
    replica
        .stage_chunk(
            delta(sequence),
            disk as u16,
            &chunk(&disks()[disk], sequence, offset, data),
        )
        .unwrap();
    replica
        .commit(delta(sequence), DeltaKind::Changes, false)
        .unwrap();
}

#[test]
fn every_kept_point_reads_back_as_the_replica_was_then() {
    let (directory, _) = replicated();
    let store = store_keeping(directory.path(), 3, std::time::Duration::ZERO);
    let mut replica = store.open_vm("vm1").unwrap();
    let mut history = vec![(1, at_point(&mut replica, 1))];
    apply_change(&mut replica, 2, 0, (1 << 20) + 4096, &[0x33; 8192]);
    history.push((2, at_point(&mut replica, 2)));
    apply_change(&mut replica, 3, 1, 0, &[0x44; 4096]);
    history.push((3, at_point(&mut replica, 3)));
    apply_change(&mut replica, 4, 0, 1 << 20, &[0x55; 70_000]);
    let listed: Vec<u64> = replica.points().iter().map(|point| point.id).collect();
    assert_eq!(listed, vec![4, 3, 2, 1]);
    assert!(
        replica.points()[1..]
            .iter()
            .all(|point| point.bytes_kept > 0)
    );
    for (sequence, expected) in &history {
        assert!(
            at_point(&mut replica, *sequence) == *expected,
            "point {sequence} differs"
        );
    }
    // One more delta: the oldest point expires with its undo.
    apply_change(&mut replica, 5, 1, 8192, &[0x66; 4096]);
    let listed: Vec<u64> = replica.points().iter().map(|point| point.id).collect();
    assert_eq!(listed, vec![5, 4, 3, 2]);
    assert!(!directory.path().join("vm1").join(undo_name(2)).exists());
    assert!(replica.undo_path_to(1, 6).is_err());
    // Points survive a restart of the server.
    drop(replica);
    let mut reopened = store.open_vm("vm1").unwrap();
    assert_eq!(reopened.points().len(), 4);
    assert!(at_point(&mut reopened, 2) == history[1].1);
}

#[test]
fn a_point_whose_deltas_rewrote_one_block_keeps_it_once_after_compaction() {
    let (directory, _) = replicated();
    // An interval well above an apply's time on a loaded machine.
    let store = store_keeping(directory.path(), 24, std::time::Duration::from_millis(1000));
    let mut replica = store.open_vm("vm1").unwrap();
    let at_one = at_point(&mut replica, 1);
    let random = |seed: u8| -> Vec<u8> {
        let mut state = u64::from(seed) | 0x100;
        (0..65536)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    // Three deltas rewrite the same 64 KiB within point 1's interval.
    for sequence in 2..=4 {
        apply_change(&mut replica, sequence, 0, 2 << 20, &random(sequence as u8));
        if sequence == 3 {
            std::thread::sleep(std::time::Duration::from_millis(1050));
        }
    }
    let before = replica
        .points()
        .iter()
        .find(|point| point.id == 1)
        .unwrap()
        .bytes_kept;
    // The next state starts a new point: point 1's list is final and gets compacted.
    apply_change(&mut replica, 5, 1, 0, &[0x99; 4096]);
    let points = replica.points();
    let one = points.iter().find(|point| point.id == 1).unwrap();
    assert!(points.iter().any(|point| point.id == 4), "{points:?}");
    assert!(
        one.bytes_kept * 2 < before,
        "compaction kept {} of {before} bytes",
        one.bytes_kept
    );
    assert!(
        at_point(&mut replica, 1) == at_one,
        "point 1 changed by compaction"
    );
    let files = undo_files(directory.path());
    assert_eq!(files, 2, "the compacted files were not removed");
}

#[test]
fn a_pin_keeps_undo_even_when_no_points_are_kept() {
    let (directory, _) = replicated();
    let store = store_keeping(directory.path(), 0, std::time::Duration::ZERO);
    let mut replica = store.open_vm("vm1").unwrap();
    let before = at_point(&mut replica, 1);
    let pinned_at = replica.pin();
    apply_change(&mut replica, 2, 0, 1 << 20, &[0x77; 4096]);
    let undo = replica.undo_path_to(pinned_at, pinned_at).unwrap();
    assert_eq!(undo.len(), 1);
    assert!(before[0][1 << 20] == 0x11 && undo[0].exists());
    replica.unpin();
    assert!(!undo[0].exists(), "the held undo was not deleted at unpin");
    assert_eq!(replica.points().len(), 1);
}

#[test]
fn a_damaged_chunk_of_an_initial_replication_is_refused_and_its_resend_wins() {
    let directory = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(directory.path(), StorageOptions::default()).unwrap();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.prepare(disks(), "sha256:owner").unwrap();
    replica.start_staging(delta(1), DeltaKind::Initial).unwrap();
    let good = chunk(&disks()[0], 1, 0, &[0x77; 65536]);
    let mut damaged = good.clone();
    let last = damaged.len() - 40;
    damaged[last] ^= 1;
    assert!(replica.stage_chunk(delta(1), 0, &damaged).is_err());
    assert!(replica.stage_chunk(delta(1), 0, &good[..100]).is_err());
    replica.stage_chunk(delta(1), 0, &good).unwrap();
    replica.commit(delta(1), DeltaKind::Initial, false).unwrap();
    assert_eq!(read(&mut replica, 0, 0, 65536), vec![0x77; 65536]);
}

#[test]
fn vm_names_that_are_not_plain_file_names_are_refused() {
    let directory = tempfile::tempdir().unwrap();
    let store = ReplicaStore::open(directory.path(), StorageOptions::default()).unwrap();
    for name in ["", "..", "a/b", ".hidden", "x y"] {
        assert!(store.open_vm(name).is_err(), "{name:?} accepted");
    }
}

/// Stages delta 2 (0x44 at 8 KiB on disk 1) and records its commit, as a commit that then
/// failed to apply (a full disk) leaves the replica: "committing 2", half of it applied.
fn failed_commit(replica: &mut VmReplica) {
    replica.start_staging(delta(2), DeltaKind::Changes).unwrap();
    replica
        .stage_chunk(delta(2), 1, &chunk(&disks()[1], 2, 8192, &[0x44; 8192]))
        .unwrap();
    if let Some(Staging::Changes { file, .. }) = replica.staging.take() {
        file.flush().unwrap();
    }
    replica
        .mark_committing(Some((delta(2), DeltaKind::Changes)), false)
        .unwrap();
    replica.open_disks().unwrap();
    replica.disks[1].write_at(&[0x44; 4096], 8192).unwrap();
}

#[test]
fn a_failed_commit_is_finished_before_a_failover_and_never_carried_into_one() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    failed_commit(&mut replica);
    // Neither failover may start from half a delta.
    let refused = replica.begin_failover(1).unwrap_err().to_string();
    assert!(refused.contains("failed to commit"), "{refused}");
    let refused = replica
        .set_test_failover(Some(PathBuf::from("/nonexistent")))
        .unwrap_err()
        .to_string();
    assert!(refused.contains("failed to commit"), "{refused}");
    // Rolled forward, the failover starts from the whole delta, with no record of it.
    replica.settle_commit().unwrap();
    assert_eq!(replica.applied(), 2);
    assert_eq!(read(&mut replica, 1, 8192, 8192), vec![0x44; 8192]);
    replica.begin_failover(2).unwrap();
    assert!(replica.catalogue().unwrap().committing.is_none());
    // A restart finds nothing to redo.
    drop(replica);
    let reopened = store.open_vm("vm1").unwrap();
    assert!(reopened.catalogue().unwrap().committing.is_none());
}

#[test]
fn a_failover_whose_copy_did_not_finish_cannot_be_committed() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.begin_failover(1).unwrap();
    // A copy that is still running, or that a killed daemon left half made.
    let out = replica.failover_directory();
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("disk-0.vhdx"), b"half a disk").unwrap();
    let refused = replica.commit_failover().unwrap_err().to_string();
    assert!(refused.contains("still being made"), "{refused}");
    // The replica disks are untouched; the record survives a restart.
    assert_eq!(read(&mut replica, 0, 1 << 20, 65536), vec![0x11; 65536]);
    drop(replica);
    let mut reopened = store.open_vm("vm1").unwrap();
    assert!(reopened.commit_failover().is_err());
    // Made completely, it commits.
    reopened.cancel_failover().unwrap();
    let attempt = reopened.begin_failover(1).unwrap();
    let pinned_at = reopened.pin();
    let out = reopened.failover_directory();
    crate::replica::copy_point(&mut |step| step(&mut reopened), pinned_at, 1, 2, &out).unwrap();
    reopened.unpin();
    assert!(
        reopened.failover_copied(attempt + 1).is_err(),
        "another attempt's copy"
    );
    reopened.failover_copied(attempt).unwrap();
    let disks = reopened.commit_failover().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(read(&mut reopened, 0, 1 << 20, 65536), vec![0x11; 65536]);
}

#[test]
fn consent_to_reinitialize_lasts_until_an_initial_replication_commits() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    assert!(!replica.record().reinitialize);
    replica.allow_reinitialize().unwrap();
    // Another open of the VM (as after a restart) needs the disks let go of first.
    replica.release_disks();
    assert!(
        store.open_vm("vm1").unwrap().record().reinitialize,
        "durable"
    );
    replica.start_staging(delta(2), DeltaKind::Initial).unwrap();
    replica
        .stage_chunk(delta(2), 0, &chunk(&disks()[0], 2, 0, &[0x12; 4096]))
        .unwrap();
    replica.commit(delta(2), DeltaKind::Initial, false).unwrap();
    assert!(!replica.record().reinitialize, "used once");
    replica.release_disks();
    assert!(!store.open_vm("vm1").unwrap().record().reinitialize);
    // A second one, without consent, is refused by the store too.
    let refused = replica
        .start_staging(delta(3), DeltaKind::Initial)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("blockrep reinitialize"), "{refused}");
}

#[test]
fn a_handover_drops_points_only_with_the_operators_consent_used_once() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.start_staging(delta(2), DeltaKind::Changes).unwrap();
    replica
        .stage_chunk(delta(2), 0, &chunk(&disks()[0], 2, 0, &[0x12; 4096]))
        .unwrap();
    replica.commit(delta(2), DeltaKind::Changes, false).unwrap();
    let older = |replica: &VmReplica| replica.points().len() - 1;
    assert_eq!(older(&replica), 1, "state 1 is a point");
    // The primary alone cannot hand over: the point stays.
    let refused = replica.take_over(2, false).unwrap_err().to_string();
    assert!(refused.contains("blockrep allow-handover vm1"), "{refused}");
    assert!(refused.contains("1 recovery point"), "{refused}");
    assert_eq!(older(&replica), 1);
    assert!(replica.failover().is_none());
    replica.allow_handover().unwrap();
    replica.release_disks();
    let mut replica = store.open_vm("vm1").unwrap();
    // Consent does not excuse a handover at another delta.
    assert!(replica.take_over(1, false).is_err());
    replica.take_over(2, false).unwrap();
    assert_eq!(older(&replica), 0);
    assert!(replica.failover().unwrap().planned);
    // Used up, and not given while the VM runs here.
    let refused = replica.allow_handover().unwrap_err().to_string();
    assert!(refused.contains("failed over to this site"), "{refused}");
}

/// Writes `disk-0.vhdx` of vm1 as another conforming VHDX writer would (qemu-io does the
/// same): a new DataWriteGuid, then the data.
fn write_outside(directory: &Path, byte: u8) {
    let path = directory.join("vm1").join("disk-0.vhdx");
    let storage = crate::io::FileStorage::open(&path, true).unwrap();
    let mut image = VhdxImage::open(storage, "outside", Access::ReadWrite).unwrap();
    image.write_at(&[byte; 4096], 0).unwrap();
    image.close().unwrap();
}

#[test]
fn a_replica_disk_written_outside_blockrep_must_be_compared_before_more_is_applied() {
    let (directory, store) = replicated();
    let replica = store.open_vm("vm1").unwrap();
    assert_eq!(replica.record().compare_required, None);
    assert_eq!(replica.catalogue().unwrap().stamps.len(), 2, "recorded");
    drop(replica);
    write_outside(directory.path(), 0x99);
    let replica = store.open_vm("vm1").unwrap();
    let reason = replica.record().compare_required.unwrap_or_default();
    assert!(
        reason.contains("disk-0.vhdx") && reason.contains("DataWriteGuid"),
        "{reason}"
    );
    drop(replica);
    // It outlives a restart until the primary compared.
    let mut replica = store.open_vm("vm1").unwrap();
    assert!(replica.record().compare_required.is_some());
    replica.adopt_seed(disks()).unwrap();
    drop(replica);
    assert_eq!(
        store.open_vm("vm1").unwrap().record().compare_required,
        None
    );
}

#[test]
fn a_replica_disk_written_outside_while_open_is_refused_before_the_next_apply() {
    let (directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.start_staging(delta(2), DeltaKind::Changes).unwrap();
    replica
        .stage_chunk(delta(2), 0, &chunk(&disks()[0], 2, 1 << 20, &[0x33; 4096]))
        .unwrap();
    write_outside(directory.path(), 0x98);
    let refused = replica
        .commit(delta(2), DeltaKind::Changes, false)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("resynchronization required"), "{refused}");
    assert_eq!(
        replica.applied(),
        1,
        "nothing applied over the changed disk"
    );
    drop(replica);
    assert!(
        store
            .open_vm("vm1")
            .unwrap()
            .record()
            .compare_required
            .is_some()
    );
}

#[test]
fn a_replica_replicated_onward_stays_tracked_when_reopened_after_a_failed_commit() {
    use crate::delta::Compression;
    use crate::protect::ProtectedVm;
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    replica.release_disks();
    let onward = ProtectedVm::open(
        &replica.disk_paths(),
        &StorageOptions::default(),
        Compression::Lz4,
    )
    .unwrap()
    .with_gate(replica.apply_gate());
    replica.track_with(onward.disks().to_vec()).unwrap();
    let gate = replica.apply_gate();
    let shipped = DeltaId {
        sequence: 1,
        cut: 7,
    };
    onward.prepare(shipped, DeltaKind::Changes).unwrap();
    onward.acknowledge(shipped).unwrap();
    assert!(onward.pending_extents()[1].is_empty());
    // Delta 2's commit fails half applied; the server reopens the replica.
    failed_commit(&mut replica);
    onward
        .prepare(
            DeltaId {
                sequence: 2,
                cut: 8,
            },
            DeltaKind::Changes,
        )
        .unwrap();
    onward
        .acknowledge(DeltaId {
            sequence: 2,
            cut: 8,
        })
        .unwrap();
    store.reopen(&mut replica).unwrap();
    assert_eq!(replica.applied(), 2);
    assert!(replica.tracked.is_some(), "onward tracking was dropped");
    assert!(
        !onward.pending_extents()[1].is_empty(),
        "the redone commit bypassed onward tracking"
    );
    assert!(
        Arc::ptr_eq(&gate, &replica.apply_gate()),
        "the onward cuts no longer wait for the applies"
    );
}

#[test]
fn a_primary_is_held_to_its_limits_of_vms_disks_and_bytes_and_the_refusal_names_them() {
    let (directory, _) = replicated();
    let limits = crate::replica::Limits {
        vms_per_primary: 2,
        disks_per_vm: 2,
        bytes_per_primary: SIZE * 3,
    };
    let store = ReplicaStore::open(directory.path(), StorageOptions::default())
        .unwrap()
        .with_limits(limits);
    let refused = |vm: &str, disks: &[DiskDescription]| {
        store
            .admit("sha256:owner", vm, disks)
            .unwrap_err()
            .to_string()
    };
    // vm1 is held already (1.5 disks' worth): it is always admitted.
    store.admit("sha256:owner", "vm1", &disks()).unwrap();
    let three = [disks()[0], disks()[0], disks()[0]];
    assert!(refused("vm2", &three).contains("--max-disks-per-vm"));
    assert!(refused("vm2", &[disks()[0], disks()[0]]).contains("--max-bytes-per-primary"));
    store.admit("sha256:owner", "vm2", &[disks()[0]]).unwrap();
    // Another primary has its own allowance.
    store.admit("sha256:other", "vm3", &three[..2]).unwrap();
    let mut vm2 = store.open_vm("vm2").unwrap();
    vm2.prepare(vec![disks()[1]], "sha256:owner").unwrap();
    assert!(refused("vm4", &[disks()[1]]).contains("--max-vms-per-primary"));
}

#[test]
fn recovery_points_are_dropped_when_a_replica_disk_changed_outside_blockrep() {
    let (directory, _) = replicated();
    let store = store_keeping(directory.path(), 24, std::time::Duration::ZERO);
    let mut replica = store.open_vm("vm1").unwrap();
    apply_change(&mut replica, 2, 0, 2 << 20, &[0x21; 4096]);
    apply_change(&mut replica, 3, 0, 2 << 20, &[0x31; 4096]);
    assert!(replica.points().len() > 1, "{:?}", replica.points());
    drop(replica);
    write_outside(directory.path(), 0x97);
    let replica = store.open_vm("vm1").unwrap();
    assert!(replica.record().compare_required.is_some());
    assert_eq!(replica.points().len(), 1, "only the latest is left");
    let undo = undo_files(directory.path());
    assert_eq!(undo, 0, "their undo files went too");
}

#[test]
fn the_replica_disks_are_locked_while_the_store_holds_them_open() {
    let (_directory, store) = replicated();
    let mut replica = store.open_vm("vm1").unwrap();
    let disk = replica.disk_paths()[0].clone();
    let refused = FileLock::open(&disk).unwrap_err();
    assert!(matches!(refused, Error::InUse { .. }), "{refused}");
    replica.release_disks();
    FileLock::open(&disk).expect("let go with the disks");
}
