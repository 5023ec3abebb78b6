//! A primary and a replica server in one process over QUIC on loopback: initial replication,
//! delta cycles while writes go on, pinned identities, and a replica equal to the primary.

mod common;

use blockrep::delta::Compression;
use blockrep::image::{Access, BlockImage, VhdxImage};
use blockrep::io::{FileStorage, StorageOptions};
use blockrep::net::{
    ConsistencyHook, Hosting, Identity, PrimaryOptions, ReplicaServer, Route, SharedReport,
    client_endpoint, run_primary,
};
use blockrep::protect::ProtectedVm;
use blockrep::proto::PrimaryConfig;
use blockrep::replica::ReplicaStore;
use common::pattern;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const MIB: u64 = 1 << 20;

fn config(vm: &ProtectedVm, frequency: Duration) -> PrimaryConfig {
    PrimaryConfig {
        vm: "vm1".into(),
        primary: "host-a".into(),
        disks: vm.descriptions().to_vec(),
        frequency,
        window: 16,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        tracking: vm.tracking().clone(),
        seed: 7,
        app_consistent_every: None,
    }
}

async fn wait_for(
    report: &SharedReport,
    what: &str,
    done: impl Fn(&blockrep::net::PrimaryReport) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(entry) = report.lock().unwrap().as_ref()
            && done(entry)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            report.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_replica(path: &Path) -> Vec<u8> {
    let image = VhdxImage::open(
        FileStorage::open(path, false).unwrap(),
        "replica",
        Access::ReadOnly,
    )
    .unwrap();
    let mut bytes = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut bytes, 0).unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_written_during_replication_arrives_whole_on_the_replica() {
    let directory = tempfile::tempdir().unwrap();
    let disk_path = directory.path().join("disk.raw");
    let mut initial = vec![0u8; 16 * MIB as usize];
    initial[..3 * MIB as usize].copy_from_slice(&pattern(1, 3 * MIB as usize));
    std::fs::write(&disk_path, &initial).unwrap();
    let replica_identity =
        Identity::create("replica", &directory.path().join("replica-id")).unwrap();
    let primary_identity =
        Identity::create("primary", &directory.path().join("primary-id")).unwrap();
    let store =
        ReplicaStore::open(&directory.path().join("store"), StorageOptions::default()).unwrap();
    let server = ReplicaServer::start(
        "127.0.0.1:0".parse().unwrap(),
        store,
        &replica_identity,
        vec![primary_identity.certificate.clone()],
        Hosting::Here(Box::default()),
        None,
    )
    .await
    .unwrap();
    let vm = Arc::new(
        ProtectedVm::open(
            std::slice::from_ref(&disk_path),
            &StorageOptions::default(),
            Compression::Lz4,
        )
        .unwrap(),
    );
    assert!(vm.tracking().owes_copy());
    let report = SharedReport::default();
    let (stop, stopped) = watch::channel(false);
    let mut options = PrimaryOptions::new(
        dial(&primary_identity, &replica_identity, server.address()),
        config(&vm, Duration::from_millis(300)),
    );
    options.streams = 3;
    let primary = tokio::spawn(run_primary(
        Arc::clone(&vm),
        options,
        report.clone(),
        stopped,
    ));
    wait_for(&report, "initial replication", |entry| {
        entry.status.applied_sequence >= 1
    })
    .await;
    // Writes go on across several cycles.
    let disk = Arc::clone(&vm.disks()[0]);
    for round in 0..6u64 {
        let data = pattern(100 + round, 200_000);
        let offset = (round * 2_345_678) % (15 * MIB);
        let writer = Arc::clone(&disk);
        tokio::task::spawn_blocking(move || writer.write_at(&data, offset).unwrap())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let writer = Arc::clone(&disk);
    tokio::task::spawn_blocking(move || writer.zero_range(0, 64 << 10).unwrap())
        .await
        .unwrap();
    let target = report
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .status
        .applied_sequence
        + 2;
    wait_for(&report, "two more cycles", |entry| {
        entry.status.applied_sequence >= target
    })
    .await;
    let final_report = report.lock().unwrap().clone().unwrap();
    assert!(final_report.status.successful_cycles >= 2);
    assert!(final_report.bytes_after_compression > 0);
    stop.send(true).unwrap();
    primary.await.unwrap().unwrap();
    server.shutdown().await;
    let mut source = vec![0u8; 16 * MIB as usize];
    disk.read_at(&mut source, 0).unwrap();
    drop(disk);
    let replica = read_replica(&directory.path().join("store/vm1/disk-0.vhdx"));
    assert!(replica == source, "the replica differs from the primary");
    let vm = Arc::try_unwrap(vm).unwrap();
    vm.close().unwrap();
}

/// Runs a primary presenting `presented` to a server with identity `server_identity` that
/// allows only `allowed`, the primary trusting `trusted`; returns the primary's error and
/// whether the store stayed empty.
async fn refused(
    directory: &Path,
    server_identity: &Identity,
    allowed: &Identity,
    presented: Identity,
    trusted: &Identity,
) -> (String, bool) {
    let disk_path = directory.join("disk.raw");
    std::fs::write(&disk_path, vec![1u8; MIB as usize]).unwrap();
    let store_path = directory.join("store");
    let store = ReplicaStore::open(&store_path, StorageOptions::default()).unwrap();
    let server = ReplicaServer::start(
        "127.0.0.1:0".parse().unwrap(),
        store,
        server_identity,
        vec![allowed.certificate.clone()],
        Hosting::Here(Box::default()),
        None,
    )
    .await
    .unwrap();
    let vm = Arc::new(
        ProtectedVm::open(&[disk_path], &StorageOptions::default(), Compression::Lz4).unwrap(),
    );
    let (_stop, stopped) = watch::channel(false);
    let mut options = PrimaryOptions::new(
        dial(&presented, trusted, server.address()),
        config(&vm, Duration::from_secs(1)),
    );
    options.streams = 2;
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        run_primary(vm, options, SharedReport::default(), stopped),
    )
    .await
    .expect("a refused primary must stop, not retry forever");
    server.shutdown().await;
    let untouched = std::fs::read_dir(&store_path).unwrap().next().is_none();
    (outcome.unwrap_err().to_string(), untouched)
}

fn dial(presented: &Identity, trusted: &Identity, replica: std::net::SocketAddr) -> Route {
    Route::Dial {
        endpoint: client_endpoint(presented, trusted.certificate.clone(), replica).unwrap(),
        replica,
    }
}

fn identity(directory: &Path, name: &str) -> Identity {
    Identity::create(name, &directory.join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_the_replica_does_not_allow_is_refused_for_good_and_writes_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let replica = identity(directory.path(), "replica");
    let allowed = identity(directory.path(), "allowed");
    let stranger = identity(directory.path(), "stranger");
    let (error, untouched) =
        refused(directory.path(), &replica, &allowed, stranger, &replica).await;
    assert!(error.contains("authentication refused"), "{error}");
    assert!(untouched, "the store was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_certificate_is_not_the_pinned_one_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    let replica = identity(directory.path(), "replica");
    let impostor = identity(directory.path(), "impostor");
    let primary = identity(directory.path(), "primary");
    let primary_certificate = Identity::load(&directory.path().join("primary")).unwrap();
    let (error, untouched) = refused(
        directory.path(),
        &impostor,
        &primary_certificate,
        primary,
        &replica,
    )
    .await;
    assert!(error.contains("authentication refused"), "{error}");
    assert!(untouched, "the store was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_keeps_two_vms_from_two_primaries_with_all_their_disks() {
    let directory = tempfile::tempdir().unwrap();
    let replica_identity =
        Identity::create("replica", &directory.path().join("replica-id")).unwrap();
    let first_identity = Identity::create("site-a", &directory.path().join("a-id")).unwrap();
    let second_identity = Identity::create("site-c", &directory.path().join("c-id")).unwrap();
    let store =
        ReplicaStore::open(&directory.path().join("store"), StorageOptions::default()).unwrap();
    let server = ReplicaServer::start(
        "127.0.0.1:0".parse().unwrap(),
        store,
        &replica_identity,
        vec![
            first_identity.certificate.clone(),
            second_identity.certificate.clone(),
        ],
        Hosting::Here(Box::default()),
        None,
    )
    .await
    .unwrap();
    let mut running = Vec::new();
    for (vm_name, identity, disks) in [("web", first_identity, 2usize), ("db", second_identity, 1)]
    {
        let paths: Vec<_> = (0..disks)
            .map(|index| {
                let path = directory.path().join(format!("{vm_name}-{index}.raw"));
                std::fs::write(
                    &path,
                    pattern(index as u64 + vm_name.len() as u64, 4 * MIB as usize),
                )
                .unwrap();
                path
            })
            .collect();
        let vm = Arc::new(
            ProtectedVm::open(&paths, &StorageOptions::default(), Compression::Lz4).unwrap(),
        );
        let report = SharedReport::default();
        let (stop, stopped) = watch::channel(false);
        let mut config = config(&vm, Duration::from_millis(200));
        config.vm = vm_name.into();
        // The web VM freezes its applications at every cut.
        let hook_log = directory.path().join(format!("{vm_name}-hook.log"));
        let consistency_hook = (vm_name == "web").then(|| ConsistencyHook {
            command: format!("echo >> {}", hook_log.display()),
            timeout: Duration::from_secs(10),
        });
        if consistency_hook.is_some() {
            config.app_consistent_every = Some(Duration::ZERO);
        }
        let mut options =
            PrimaryOptions::new(dial(&identity, &replica_identity, server.address()), config);
        options.streams = 2;
        options.consistency_hook = consistency_hook;
        let task = tokio::spawn(run_primary(
            Arc::clone(&vm),
            options,
            report.clone(),
            stopped,
        ));
        running.push((vm_name, vm, report, stop, task));
    }
    for (_, vm, report, _, _) in &running {
        wait_for(report, "initial replication", |entry| {
            entry.status.applied_sequence >= 1
        })
        .await;
        // A write to each disk in the same instant's cut.
        for (index, disk) in vm.disks().iter().enumerate() {
            let disk = Arc::clone(disk);
            tokio::task::spawn_blocking(move || {
                disk.write_at(&pattern(50 + index as u64, 100_000), MIB + 777)
                    .unwrap()
            })
            .await
            .unwrap();
        }
        let target = report
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .status
            .applied_sequence
            + 2;
        wait_for(report, "the writes", |entry| {
            entry.status.applied_sequence >= target
        })
        .await;
    }
    for (vm_name, vm, _, stop, task) in running {
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        for (index, disk) in vm.disks().iter().enumerate() {
            let mut source = vec![0u8; 4 * MIB as usize];
            disk.read_at(&mut source, 0).unwrap();
            let replica = read_replica(
                &directory
                    .path()
                    .join(format!("store/{vm_name}/disk-{index}.vhdx")),
            );
            assert!(
                replica == source,
                "{vm_name} disk {index} differs from its replica"
            );
        }
        Arc::try_unwrap(vm).unwrap().close().unwrap();
    }
    let web = server.points("web").unwrap();
    assert!(
        web[0].app_consistent,
        "the web VM's latest state is not application-consistent: {web:?}"
    );
    assert!(!server.points("db").unwrap()[0].app_consistent);
    let hook_calls = std::fs::read_to_string(directory.path().join("web-hook.log")).unwrap();
    let phases: Vec<&str> = hook_calls.split_whitespace().collect();
    assert!(
        phases.len() >= 2 && phases.chunks(2).all(|pair| pair == ["freeze", "thaw"]),
        "{phases:?}"
    );
    server.shutdown().await;
}
