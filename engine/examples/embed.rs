//! Embedding blockrep: a primary and a replica server in one process. The program makes a
//! 32 MiB disk, replicates it over QUIC on loopback, writes to it through change tracking
//! while replication runs, prints the replication events both sides send, and checks that the
//! replica ends equal to its disk.
//!
//! ```sh
//! cargo run --example embed -p blockrep
//! ```

use blockrep::delta::Compression;
use blockrep::image::{Access, BlockImage, VhdxImage};
use blockrep::io::{FileStorage, StorageOptions};
use blockrep::net::{
    Hosting, Identity, PrimaryOptions, ReplicaServer, ReplicationEvent, Route, SharedReport,
    client_endpoint, run_primary,
};
use blockrep::protect::ProtectedVm;
use blockrep::proto::PrimaryConfig;
use blockrep::replica::ReplicaStore;
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let directory = tempfile::tempdir()?;
    let disk_path = directory.path().join("disk.raw");
    std::fs::write(&disk_path, vec![0u8; 32 * MIB as usize])?;

    // Each side has an identity (a key and a self-signed certificate); each trusts the other's.
    let replica_identity = Identity::create("replica", &directory.path().join("replica-id"))?;
    let primary_identity = Identity::create("primary", &directory.path().join("primary-id"))?;

    // The replica server: one store for many VMs, open to the primaries it allows. It tells
    // the deltas it applies and the failover steps taken there on this channel.
    let (server_events, mut server_received) = mpsc::unbounded_channel();
    let store = ReplicaStore::open(&directory.path().join("store"), StorageOptions::default())?;
    let server = ReplicaServer::start(
        "127.0.0.1:0".parse()?,
        store,
        &replica_identity,
        vec![primary_identity.certificate.clone()],
        Hosting::Here(Box::default()),
        Some(server_events),
    )
    .await?;
    println!("replica server listening on {}", server.address());

    // The protected VM: its disks, tracked, with a journal beside each.
    let vm = Arc::new(ProtectedVm::open(
        std::slice::from_ref(&disk_path),
        &StorageOptions::default(),
        Compression::Lz4,
    )?);
    let config = PrimaryConfig {
        vm: "vm1".into(),
        primary: "this-host".into(),
        disks: vm.descriptions().to_vec(),
        frequency: Duration::from_millis(500),
        window: 16,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(2),
        tracking: vm.tracking().clone(),
        seed: blockrep::resync::random_seed()?,
        app_consistent_every: None,
    };
    let endpoint = client_endpoint(
        &primary_identity,
        replica_identity.certificate.clone(),
        server.address(),
    )?;
    // Replication events (cycles, health, resync, failover steps) come on this channel.
    let (events, mut received) = mpsc::unbounded_channel();
    let mut options = PrimaryOptions::new(
        Route::Dial {
            endpoint,
            replica: server.address(),
        },
        config,
    );
    options.streams = 2;
    options.events = Some(events);
    let report = SharedReport::default();
    let (stop, stopped) = watch::channel(false);
    let primary = tokio::spawn(run_primary(
        Arc::clone(&vm),
        options,
        report.clone(),
        stopped,
    ));

    // Writes go through the tracked disk while replication runs.
    let disk = Arc::clone(&vm.disks()[0]);
    for round in 0..8u8 {
        let writer = Arc::clone(&disk);
        tokio::task::spawn_blocking(move || {
            writer.write_at(&vec![round + 1; 256 << 10], u64::from(round) * 3 * MIB)
        })
        .await??;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let applied_sequence = || -> Result<(u64, u64), Box<dyn Error>> {
        let status = report.lock().map_err(|_| "report lock")?.clone();
        Ok(status.map_or((0, 0), |status| {
            (status.status.applied_sequence, status.status.pending_bytes)
        }))
    };
    // The delta in flight now may have been cut before the last write; the one after it was not.
    let (after_writes, _) = applied_sequence()?;

    // Wait for that later delta to be applied, and nothing pending.
    let deadline = Instant::now() + Duration::from_secs(60);
    let applied = loop {
        let (applied, pending) = applied_sequence()?;
        if applied >= after_writes + 2 && pending == 0 {
            break applied;
        }
        if Instant::now() > deadline {
            return Err("replication did not catch up within a minute".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop.send(true);
    primary.await??;
    println!("delta {applied} applied on the replica");
    let mut shipped = 0;
    while let Ok(timed) = received.try_recv() {
        let since_epoch = timed
            .at
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        println!("event at {since_epoch:.3}: {} {:?}", timed.vm, timed.event);
        if let ReplicationEvent::CycleShipped { .. } = timed.event {
            shipped += 1;
        }
    }
    if shipped == 0 {
        return Err("no cycle-shipped event came".into());
    }
    let mut applied_events = 0;
    while let Ok(timed) = server_received.try_recv() {
        if let ReplicationEvent::DeltaApplied {
            sequence,
            apply_time,
        } = timed.event
        {
            println!("replica applied delta {sequence} in {apply_time:?}");
            applied_events += 1;
        }
    }
    if applied_events < applied {
        return Err(
            format!("the replica told {applied_events} deltas applied of {applied}").into(),
        );
    }

    // The replica's disk equals the primary's.
    let mut ours = vec![0u8; 32 * MIB as usize];
    disk.read_at(&mut ours, 0)?;
    let replica = VhdxImage::open(
        FileStorage::open(&directory.path().join("store/vm1/disk-0.vhdx"), false)?,
        "replica",
        Access::ReadOnly,
    )?;
    let mut theirs = vec![0u8; 32 * MIB as usize];
    replica.read_at(&mut theirs, 0)?;
    if ours != theirs {
        return Err("the replica differs from the primary".into());
    }
    println!("the replica equals the primary: {} MiB compared", 32);
    Ok(())
}
