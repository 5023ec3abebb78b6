//! A disk written, reverted or replaced while blockrep was not tracking it is never vouched for
//! by its journal: the next open says a resynchronization is required, and why. Another
//! program's reads leave tracking trusted. The writes come from qemu-io (a conforming VHDX
//! writer) and from plain file writes, as a user's would.

mod common;

use blockrep::delta::Compression;
use blockrep::image::vhdx::{VhdxCreateOptions, VhdxImage};
use blockrep::io::{FileStorage, StorageOptions};
use blockrep::protect::ProtectedVm;
use blockrep::proto::Tracking;
use common::{have_qemu, run_ok};
use std::path::{Path, PathBuf};

const SIZE: u64 = 8 << 20;

fn open(disk: &Path) -> ProtectedVm {
    ProtectedVm::open(
        &[disk.to_path_buf()],
        &StorageOptions::default(),
        Compression::Lz4,
    )
    .unwrap()
}

/// Protects `disk`, writes through tracking, stops cleanly, and marks the replica caught up
/// (as an applied delta would), so that the next open is vouched for unless the disk changed.
fn protect_and_stop(disk: &Path) {
    let vm = open(disk);
    vm.disks()[0].write_at(&[1u8; 4096], 1 << 20).unwrap();
    vm.caught_up().unwrap();
    vm.close().unwrap();
    let vm = open(disk);
    assert_eq!(
        *vm.tracking(),
        Tracking::Vouches,
        "nothing changed {}",
        disk.display()
    );
    vm.close().unwrap();
}

fn lost_reason(disk: &Path) -> String {
    let vm = open(disk);
    let reason = match vm.tracking() {
        Tracking::Lost(reason) => reason.clone(),
        other => panic!(
            "{}: tracking {other:?} after an unseen change",
            disk.display()
        ),
    };
    vm.close().unwrap();
    reason
}

fn vhdx(directory: &Path) -> PathBuf {
    vhdx_named(directory, "vm1.vhdx")
}

fn vhdx_named(directory: &Path, name: &str) -> PathBuf {
    let path = directory.join(name);
    VhdxImage::create(
        FileStorage::create_new(&path).unwrap(),
        name,
        &VhdxCreateOptions::dynamic(SIZE),
    )
    .unwrap();
    path
}

#[test]
fn a_vhdx_written_by_qemu_io_while_unprotected_requires_a_resynchronization() {
    if !have_qemu("a_vhdx_written_by_qemu_io_while_unprotected_requires_a_resynchronization") {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    let disk = vhdx(directory.path());
    protect_and_stop(&disk);
    let name = disk.to_str().unwrap();

    // Reading with another program changes nothing.
    run_ok("qemu-io", &["-f", "vhdx", "-r", "-c", "read 0 64k", name]);
    let vm = open(&disk);
    assert_eq!(*vm.tracking(), Tracking::Vouches, "a read is not a change");
    vm.close().unwrap();

    run_ok(
        "qemu-io",
        &["-f", "vhdx", "-c", "write -P 0x5a 0 64k", name],
    );
    let reason = lost_reason(&disk);
    assert!(reason.contains("DataWriteGuid"), "{reason}");
    // The loss is remembered until the replica caught up, across a stop.
    let again = lost_reason(&disk);
    assert_eq!(again, reason);
    let vm = open(&disk);
    vm.caught_up().unwrap();
    vm.close().unwrap();
    let vm = open(&disk);
    assert_eq!(
        *vm.tracking(),
        Tracking::Vouches,
        "caught up by a comparison"
    );
    vm.close().unwrap();
}

#[test]
fn a_vhdx_put_back_from_an_older_copy_requires_a_resynchronization() {
    let directory = tempfile::tempdir().unwrap();
    let disk = vhdx(directory.path());
    protect_and_stop(&disk);
    let older = directory.path().join("older.vhdx");
    std::fs::copy(&disk, &older).unwrap();
    // blockrep writes on; then the older copy is restored over the disk.
    let vm = open(&disk);
    vm.disks()[0].write_at(&[2u8; 4096], 2 << 20).unwrap();
    vm.caught_up().unwrap();
    vm.close().unwrap();
    std::fs::copy(&older, &disk).unwrap();
    let reason = lost_reason(&disk);
    assert!(reason.contains("DataWriteGuid"), "{reason}");
}

#[test]
fn a_raw_disk_written_or_replaced_while_unprotected_requires_a_resynchronization() {
    let directory = tempfile::tempdir().unwrap();
    let disk = directory.path().join("vm1.raw");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    protect_and_stop(&disk);

    // Written in place by another program (same file, same size): its times moved. The
    // kernel keeps times to its clock tick, so the write is repeated until they do (a write
    // within blockrep's own last tick is the documented limit of this check).
    {
        use std::os::unix::fs::FileExt;
        let modified = || std::fs::metadata(&disk).unwrap().modified().unwrap();
        let before = modified();
        let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        for attempt in 0u8.. {
            file.write_all_at(&[9u8, attempt], 0).unwrap();
            if modified() != before {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    let reason = lost_reason(&disk);
    assert!(reason.contains("another program"), "{reason}");

    // Replaced by a copy of itself: another inode.
    let vm = open(&disk);
    vm.caught_up().unwrap();
    vm.close().unwrap();
    let copy = directory.path().join("copy.raw");
    std::fs::copy(&disk, &copy).unwrap();
    std::fs::rename(&copy, &disk).unwrap();
    let reason = lost_reason(&disk);
    assert!(reason.contains("inode"), "{reason}");
}

#[test]
fn a_lost_journal_is_owed_a_resynchronization_even_when_another_disk_fails_to_open() {
    let directory = tempfile::tempdir().unwrap();
    let first = directory.path().join("vm1.raw");
    std::fs::write(&first, vec![0u8; SIZE as usize]).unwrap();
    let second = vhdx_named(directory.path(), "vm1-data.vhdx");
    let both = [first.clone(), second.clone()];
    let vm = ProtectedVm::open(&both, &StorageOptions::default(), Compression::Lz4).unwrap();
    vm.caught_up().unwrap();
    vm.close().unwrap();

    // The first disk's journal is damaged, and the second disk cannot be opened this time: it
    // is there (and lockable) but is no image blockrep can open, so the first disk's journal
    // is handled before the second fails.
    let journal = directory.path().join("vm1.raw.brtrack");
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&journal, bytes).unwrap();
    let good = std::fs::read(&second).unwrap();
    let mut broken = b"vhdxfile".to_vec();
    broken.resize(4096, 0);
    std::fs::write(&second, broken).unwrap();
    let error = ProtectedVm::open(&both, &StorageOptions::default(), Compression::Lz4)
        .unwrap_err()
        .to_string();
    assert!(error.contains("vm1-data.vhdx"), "{error}");
    assert!(
        directory.path().join("vm1.raw.brtrack").exists(),
        "the first disk's journal was not reached: {error}"
    );

    // The damaged journal was replaced by a fresh one; the loss must not go with it.
    std::fs::write(&second, good).unwrap();
    let vm = ProtectedVm::open(&both, &StorageOptions::default(), Compression::Lz4).unwrap();
    assert!(
        matches!(vm.tracking(), Tracking::Lost(reason) if reason.contains("damaged")),
        "{:?}",
        vm.tracking()
    );
    vm.close().unwrap();
}

#[test]
fn a_vhdx_written_during_a_session_by_a_writer_that_ignores_the_lock_is_not_vouched_for() {
    let test =
        "a_vhdx_written_during_a_session_by_a_writer_that_ignores_the_lock_is_not_vouched_for";
    if !have_qemu(test) {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    let disk = vhdx(directory.path());
    protect_and_stop(&disk);
    let vm = open(&disk);
    vm.disks()[0].write_at(&[3u8; 4096], 0).unwrap();
    // qemu told not to lock writes under blockrep, which holds the disk.
    let options = format!(
        "driver=vhdx,file.driver=file,file.filename={},file.locking=off",
        disk.display()
    );
    run_ok(
        "qemu-io",
        &["--image-opts", &options, "-c", "write -P 0x66 2M 64k"],
    );
    vm.caught_up().unwrap();
    vm.close().unwrap();
    let reason = lost_reason(&disk);
    assert!(reason.contains("no stamp"), "{reason}");
}

#[test]
fn the_journals_remember_the_last_delta_the_replica_confirmed_across_a_stop() {
    use blockrep::proto::{DeltaId, DeltaKind};
    let directory = tempfile::tempdir().unwrap();
    let disk = directory.path().join("vm1.raw");
    std::fs::write(&disk, vec![0u8; SIZE as usize]).unwrap();
    let vm = open(&disk);
    assert_eq!(vm.acknowledged_delta(), None, "a new journal knows none");
    let initial = DeltaId {
        sequence: 1,
        cut: 1,
    };
    vm.prepare(initial, DeltaKind::Initial).unwrap();
    vm.acknowledge(initial).unwrap();
    assert_eq!(vm.acknowledged_delta(), Some(1));
    vm.disks()[0].write_at(&[5u8; 4096], 0).unwrap();
    let changes = DeltaId {
        sequence: 2,
        cut: 2,
    };
    vm.prepare(changes, DeltaKind::Changes).unwrap();
    vm.acknowledge(changes).unwrap();
    vm.caught_up().unwrap();
    vm.close().unwrap();
    assert_eq!(open(&disk).acknowledged_delta(), Some(2));
}
