//! The replica server's driver: accepts QUIC connections from allowed primaries, routes each
//! to its VM's [`ReplicaSite`] (the `Replica` state machine and the store's copy together),
//! and carries out what it returns, on blocking threads. One process serves many VMs from many
//! primaries; each VM's work is serialized by its own lock, VMs proceed independently.
//!
//! Here: the server's API and each VM's slot. Beside it: `connection` (a primary's connection
//! and hash requests), `effects` (carrying out what a VM's `ReplicaSite` returns), `failover`
//! (test and unplanned failover), `failback` (handing a VM back, and settling a failback a
//! crash interrupted), `running` (a VM running here, replicated back and onward) and
//! `status`.

use super::events::{self, EventSender, ReplicationEvent};
use super::extension::ExtendedVm;
use super::frame::{read_frame, spawn_control_writer};
use super::hosting::{HostedVm, HostingOptions};
use super::identity::Identity;
use super::primary::{BeforeTakeOver, HandoverFailure, PrimaryReport, ResyncDone};
use super::tls::server_config;
use crate::proto::{ConnectionId, DeltaId, DeltaKind, Message, RefusalCode, Replica};
use crate::replica::{
    FailbackEnd, Hosted, PointCopy, PointInfo, ReplicaSite, ReplicaStore, SiteEffect, VmReplica,
};
use crate::{Error, Result};
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

mod connection;
mod effects;
mod failback;
mod failover;
mod running;
mod status;

use connection::*;
use effects::*;
use failback::*;
use failover::*;
use running::*;
use status::*;

pub use failover::TestCopy;
pub use status::ReplicaReport;

/// Who runs a VM that fails over to this server.
#[derive(Debug, Clone)]
pub enum Hosting {
    /// The server itself: tracked disks, NBD, replication back (a replica server).
    Here(Box<HostingOptions>),
    /// Whoever made the server (a primary acting as replica during reverse replication): it
    /// is told, and takes its VM back.
    Caller(mpsc::UnboundedSender<TakenOver>),
}

/// What the server's VMs share: who runs those that fail over here, and who hears of it.
struct Site {
    hosting: Hosting,
    events: Option<EventSender>,
    /// Each VM's last report, for when its replica is busy.
    last_reports: Mutex<HashMap<String, ReplicaReport>>,
}

impl Site {
    /// Tells `event` to the embedder, and logs it (deltas applied are logged where applied).
    fn send(&self, vm: &str, event: ReplicationEvent) {
        if !matches!(event, ReplicationEvent::DeltaApplied { .. }) {
            tracing::info!(%vm, ?event, "failover step");
        }
        events::send(self.events.as_ref(), vm, event);
    }
}

/// A planned failover handed a VM to this site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenOver {
    pub vm: String,
    pub sequence: u64,
    /// Replicate back to the other site at once.
    pub reverse: bool,
}

/// A primary's connection, as its VM's slot holds it.
struct Peer {
    connection: quinn::Connection,
    /// The control messages to send it.
    outgoing: mpsc::UnboundedSender<Message>,
    /// The task writing them; it ends once the last one was delivered.
    writer: tokio::task::JoinHandle<()>,
}

struct VmSlot {
    machine: Replica,
    replica: VmReplica,
    connections: HashMap<ConnectionId, Peer>,
    /// Where a connection's close waits for its last message: the slot is also driven from
    /// threads outside the runtime (the control socket's).
    runtime: tokio::runtime::Handle,
    site: Arc<Site>,
    /// The VM runs at this site (it failed over here).
    hosted: Option<HostedVm>,
    /// The replica is replicated onward to a third site.
    extended: Option<ExtendedVm>,
    /// When onward replication may be tried again after it could not start.
    onward_retry: OnwardRetry,
    /// A failback runs: no other may start.
    failback: Option<Arc<Mutex<Failback>>>,
    /// This slot, for the callbacks of what runs the VM here.
    this: std::sync::Weak<Mutex<VmSlot>>,
    totals: Totals,
}

/// What a VM's replica has taken in since the server started, for status and metrics.
#[derive(Debug, Default)]
struct Totals {
    staged_bytes: u64,
    applied_deltas: u64,
    apply_seconds: f64,
}

impl VmSlot {
    fn machine_name(&self) -> String {
        self.replica.vm().to_owned()
    }

    /// Whether the VM runs here, for the engine's failback decisions.
    fn hosted_state(&self) -> Hosted {
        match &self.hosted {
            None => Hosted::No,
            Some(hosted) => Hosted::Yes {
                reversing: hosted.reversing(),
            },
        }
    }

    /// The VM's machine and store, for a step that decides with both.
    fn replica_site(&mut self) -> ReplicaSite<'_> {
        ReplicaSite::new(&mut self.machine, &mut self.replica)
    }
}

type Vms = Arc<Mutex<HashMap<String, Arc<Mutex<VmSlot>>>>>;

/// A running replica server.
///
/// A server that tells its events; a primary replicates a VM to it; the server's status, a
/// recovery point's test failover copy, and the events that came:
///
/// ```
/// use blockrep::io::StorageOptions;
/// use blockrep::net::{Hosting, Identity, ReplicaServer, ReplicationEvent};
/// use blockrep::replica::ReplicaStore;
/// # use blockrep::delta::Compression;
/// # use blockrep::net::{PrimaryOptions, Route, SharedReport, client_endpoint, run_primary};
/// # use blockrep::protect::ProtectedVm;
/// # use blockrep::proto::PrimaryConfig;
/// # use std::sync::Arc;
/// # use std::time::Duration;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let directory = tempfile::tempdir()?;
/// # let path = |name: &str| directory.path().join(name);
/// # std::fs::write(path("vm1.raw"), vec![1u8; 4 << 20])?;
/// let replica_id = Identity::create("replica", &path("replica-id"))?;
/// let primary_id = Identity::create("primary", &path("primary-id"))?;
/// tokio::runtime::Runtime::new()?.block_on(async {
///     let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
///     let server = ReplicaServer::start(
///         "127.0.0.1:0".parse()?,
///         ReplicaStore::open(&path("store"), StorageOptions::default())?,
///         &replica_id,
///         vec![primary_id.certificate.clone()],
///         Hosting::Here(Box::default()),
///         Some(events),
///     )
///     .await?;
///     // A primary replicates vm1 here (see `run_primary`).
/// #   let vm = Arc::new(ProtectedVm::open(
/// #       &[path("vm1.raw")],
/// #       &StorageOptions::default(),
/// #       Compression::Lz4,
/// #   )?);
/// #   let options = PrimaryOptions::new(
/// #       Route::Dial {
/// #           endpoint: client_endpoint(
/// #               &primary_id,
/// #               replica_id.certificate.clone(),
/// #               server.address(),
/// #           )?,
/// #           replica: server.address(),
/// #       },
/// #       PrimaryConfig {
/// #           vm: "vm1".into(),
/// #           primary: "host-a".into(),
/// #           disks: vm.descriptions().to_vec(),
/// #           frequency: Duration::from_millis(200),
/// #           window: 16,
/// #           reconnect_min: Duration::from_millis(100),
/// #           reconnect_max: Duration::from_secs(1),
/// #           tracking: vm.tracking().clone(),
/// #           seed: 1,
/// #           app_consistent_every: None,
/// #       },
/// #   );
/// #   let (stop, stopped) = tokio::sync::watch::channel(false);
/// #   let primary = tokio::spawn(run_primary(vm, options, SharedReport::default(), stopped));
///
///     // Status, as `blockrep status` shows it on the replica's host.
///     let deadline = std::time::Instant::now() + Duration::from_secs(60);
///     while server.reports().first().map_or(0, |vm| vm.applied_sequence) < 2 {
///         assert!(std::time::Instant::now() < deadline, "nothing was replicated");
///         tokio::time::sleep(Duration::from_millis(20)).await;
///     }
///     assert!(server.reports()[0].connected);
///
///     // A test failover: a copy of the latest point, while replication goes on.
///     let copy = server.test_failover("vm1", None, &path("test")).await?;
///     assert_eq!(copy.disks.len(), 1);
///     server.cleanup_test_failover("vm1").await?;
///
///     // Every delta applied and each failover step came as an event.
///     let mut steps = Vec::new();
///     while let Ok(timed) = received.try_recv() {
///         if !matches!(timed.event, ReplicationEvent::DeltaApplied { .. }) {
///             steps.push(timed.event);
///         }
///     }
///     assert!(matches!(steps[0], ReplicationEvent::TestFailoverCreated { .. }));
///     assert_eq!(steps[1], ReplicationEvent::TestFailoverRemoved);
/// #   let _ = stop.send(true);
/// #   primary.await??;
///     server.shutdown().await;
///     Ok::<_, Box<dyn std::error::Error>>(())
/// })?;
/// # Ok(())
/// # }
/// ```
pub struct ReplicaServer {
    address: Option<SocketAddr>,
    vms: Vms,
    store: ReplicaStore,
    site: Arc<Site>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    next_connection: Arc<AtomicU64>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ReplicaServer {
    /// Binds `listen` and serves until `shutdown`. VMs already in the store are opened first,
    /// so a commit that a crash interrupted is finished before anyone connects. `events`
    /// hears of what happens to each VM here: deltas applied, failover steps, and the
    /// replication back of a VM that runs here.
    pub async fn start(
        listen: SocketAddr,
        store: ReplicaStore,
        identity: &Identity,
        allowed: Vec<CertificateDer<'static>>,
        hosting: Hosting,
        events: Option<EventSender>,
    ) -> Result<ReplicaServer> {
        let (site, vms) = open_site(&store, hosting, events).await?;
        let allowed_count = allowed.len();
        let endpoint = quinn::Endpoint::server(server_config(identity, allowed)?, listen).map_err(
            |error| Error::Network {
                peer: listen.to_string(),
                problem: format!("cannot listen: {error}"),
            },
        )?;
        let address = endpoint.local_addr().map_err(|error| Error::Network {
            peer: listen.to_string(),
            problem: error.to_string(),
        })?;
        tracing::info!(%address, identity = %identity.fingerprint(), allowed = allowed_count, "replica server listening");
        let (stop, stopped) = watch::channel(false);
        let next_connection = Arc::new(AtomicU64::new(1));
        let task = tokio::spawn(accept_loop(
            endpoint,
            store.clone(),
            Arc::clone(&vms),
            Arc::clone(&site),
            Arc::clone(&next_connection),
            stopped,
        ));
        Ok(ReplicaServer {
            address: Some(address),
            vms,
            store,
            site,
            stop,
            task,
            next_connection,
        })
    }

    /// A server that listens nowhere: its caller hands it connections it made itself (a
    /// primary that became the replica of its VM, over its own connection to the other site).
    /// `events` as for [`ReplicaServer::start`].
    pub async fn without_listener(
        store: ReplicaStore,
        hosting: Hosting,
        events: Option<EventSender>,
    ) -> Result<ReplicaServer> {
        let (site, vms) = open_site(&store, hosting, events).await?;
        let (stop, _) = watch::channel(false);
        Ok(ReplicaServer {
            address: None,
            vms,
            store,
            site,
            stop,
            task: tokio::spawn(async {}),
            next_connection: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Serves a connection this process made: the peer replicates to this side over it. Returns
    /// when the connection ends.
    pub async fn serve(&self, connection: super::PeerConnection) {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        serve_connection(
            id,
            connection.0,
            self.store.clone(),
            Arc::clone(&self.vms),
            Arc::clone(&self.site),
        )
        .await;
    }

    /// The address it listens on (none for a server made `without_listener`).
    pub fn address(&self) -> SocketAddr {
        self.address
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Each VM's state, for `blockrep status`. Never waits for a VM whose replica is busy (a
    /// long comparison holds it): that VM's last report is given, marked busy.
    pub fn reports(&self) -> Vec<ReplicaReport> {
        let slots: Vec<(String, Arc<Mutex<VmSlot>>)> = lock(&self.vms)
            .iter()
            .map(|(vm, slot)| (vm.clone(), Arc::clone(slot)))
            .collect();
        let mut last_reports = lock(&self.site.last_reports);
        let mut reports: Vec<ReplicaReport> = slots
            .into_iter()
            .map(|(vm, slot)| {
                let guard = match slot.try_lock() {
                    Ok(guard) => Some(guard),
                    Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                };
                match guard {
                    Some(slot) => {
                        let report = report(vm.clone(), &slot);
                        last_reports.insert(vm, report.clone());
                        report
                    }
                    None => ReplicaReport {
                        busy: true,
                        ..last_reports.get(&vm).cloned().unwrap_or(ReplicaReport {
                            vm,
                            ..ReplicaReport::default()
                        })
                    },
                }
            })
            .collect();
        reports.sort_by(|a, b| a.vm.cmp(&b.vm));
        reports
    }

    /// A VM's latest state and recovery points, newest first.
    pub fn points(&self, vm: &str) -> Result<Vec<PointInfo>> {
        let slot = self.slot(vm)?;
        let points = lock(&slot).replica.points();
        Ok(points)
    }

    /// Makes a test failover copy of `vm` at `point` (the latest state when `None`) in `out`,
    /// as VHDX disks, while replication goes on: the latest disks are copied piece by piece
    /// between commits, then every delta applied meanwhile and every newer point is undone.
    pub async fn test_failover(
        &self,
        vm: &str,
        point: Option<u64>,
        out: &Path,
    ) -> Result<TestCopy> {
        let slot = self.slot(vm)?;
        let out = out.to_owned();
        let name = vm.to_owned();
        blocking(vm, move || test_failover(&slot, &name, point, &out)).await
    }

    /// Removes `vm`'s test failover copy; returns where it was.
    pub async fn cleanup_test_failover(&self, vm: &str) -> Result<PathBuf> {
        let slot = self.slot(vm)?;
        blocking(vm, move || {
            let mut slot = lock(&slot);
            let out = slot
                .replica
                .test_failover()
                .ok_or_else(|| Error::Replication {
                    peer: slot.machine_name(),
                    problem: "no test failover to clean up".into(),
                })?;
            for index in 0..slot.replica.descriptions().len() {
                let _ = std::fs::remove_file(out.join(format!("disk-{index}.vhdx")));
            }
            let _ = std::fs::remove_dir(&out);
            slot.replica.set_test_failover(None)?;
            slot.site
                .send(slot.replica.vm(), ReplicationEvent::TestFailoverRemoved);
            Ok(out)
        })
        .await
    }

    /// Unplanned failover to `point` (the latest when `None`): replication from the primary is
    /// fenced off and the point is made into writable disks in the VM's `failover` directory.
    /// Refused while the primary is connected and replicating (split-brain guard) unless
    /// `force`.
    pub async fn unplanned_failover(
        &self,
        vm: &str,
        point: Option<u64>,
        force: bool,
    ) -> Result<TestCopy> {
        let slot = self.slot(vm)?;
        let name = vm.to_owned();
        blocking(vm, move || unplanned_failover(&slot, &name, point, force)).await
    }

    /// Commits a failover: its disks become the VM's, the older points go, and replication
    /// from the old primary has ended for good.
    pub async fn commit_failover(&self, vm: &str) -> Result<Vec<PathBuf>> {
        let slot = self.slot(vm)?;
        // The onward primary lets go of the disks before they become the VM's (waited for
        // outside the VM's lock). A failover that is not there to commit leaves it running;
        // one whose commit fails has it back once cancelled.
        let extended = {
            let slot = Arc::clone(&slot);
            blocking(vm, move || {
                let mut guard = lock(&slot);
                let committable = guard
                    .replica
                    .failover()
                    .is_some_and(|failover| !failover.committed);
                Ok(if committable {
                    guard.extended.take()
                } else {
                    None
                })
            })
            .await?
        };
        if let Some(extended) = extended {
            extended.stop().await;
        }
        blocking(vm, move || {
            let mut guard = lock(&slot);
            let (disks, point) = guard.replica_site().commit_failover()?;
            drive(&mut guard);
            let name = guard.machine_name();
            guard
                .site
                .send(&name, ReplicationEvent::FailoverCommitted { point });
            host(&mut guard, &name, true)?;
            Ok(disks)
        })
        .await
    }

    /// Replicates a VM that runs here back to its old primary, comparing by hash first when
    /// the old primary may hold writes this site never saw (an unplanned failover).
    pub async fn reverse(&self, vm: &str) -> Result<()> {
        let slot = self.slot(vm)?;
        blocking(vm, move || {
            let mut guard = lock(&slot);
            guard.replica_site().reverse()?;
            let starts = guard
                .hosted
                .as_ref()
                .is_some_and(|hosted| !hosted.reversing());
            if starts {
                // Told before the reverse primary starts, so its events come after.
                guard
                    .site
                    .send(guard.replica.vm(), ReplicationEvent::ReverseRequested);
            }
            start_reverse(&mut guard);
            Ok(())
        })
        .await
    }

    /// The replica host's operator allows the next initial replication from the VM's primary
    /// to replace its replica, dropping the recovery points: a primary alone never may.
    pub async fn allow_reinitialize(&self, vm: &str) -> Result<()> {
        let slot = self.slot(vm)?;
        blocking(vm, move || {
            let mut guard = lock(&slot);
            guard.replica.allow_reinitialize()?;
            guard.machine.allow_reinitialize();
            tracing::warn!(vm = %guard.replica.vm(), "the next initial replication may replace the replica and its recovery points");
            Ok(())
        })
        .await
    }

    /// The replica host's operator allows the next planned failover of `vm` to this site,
    /// which drops its recovery points (`blockrep allow-handover`).
    pub async fn allow_handover(&self, vm: &str) -> Result<()> {
        let slot = self.slot(vm)?;
        blocking(vm, move || {
            let mut guard = lock(&slot);
            guard.replica.allow_handover()?;
            tracing::warn!(vm = %guard.replica.vm(), "the next planned failover to this site may drop the recovery points");
            Ok(())
        })
        .await
    }

    /// Planned failover of a VM that runs here back to the old primary (failback): its writes
    /// stop (NBD clients are told), the final delta ships, the other side compares and takes
    /// over; this server is its replica again. Returns the final delta's sequence.
    pub async fn planned_failover(&self, vm: &str, reverse: bool) -> Result<u64> {
        let slot = self.slot(vm)?;
        // Run to its end even if the caller stops waiting: its writes resume, or it is handed
        // back, either way.
        tokio::spawn(fail_back(slot, vm.to_owned(), reverse))
            .await
            .map_err(|error| Error::Replication {
                peer: vm.to_owned(),
                problem: error.to_string(),
            })?
    }

    /// Cancels a failover not committed: its disks go, replication from the primary may
    /// resume, and so does onward replication.
    pub async fn cancel_failover(&self, vm: &str) -> Result<()> {
        let slot = self.slot(vm)?;
        blocking(vm, move || {
            let mut slot = lock(&slot);
            slot.replica_site().cancel_failover()?;
            drive(&mut slot);
            slot.site
                .send(slot.replica.vm(), ReplicationEvent::FailoverCancelled);
            extend(&mut slot, false);
            Ok(())
        })
        .await
    }

    fn slot(&self, vm: &str) -> Result<Arc<Mutex<VmSlot>>> {
        lock(&self.vms)
            .get(vm)
            .cloned()
            .ok_or_else(|| Error::Replication {
                peer: vm.to_owned(),
                problem: "no replica of this VM on this server".into(),
            })
    }

    pub fn store(&self) -> &ReplicaStore {
        &self.store
    }

    /// Stops accepting, closes every connection, stops the VMs running here (saving their
    /// tracking) and waits for the server's task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let slots: Vec<Arc<Mutex<VmSlot>>> = lock(&self.vms).values().cloned().collect();
        for slot in slots {
            let extended = lock(&slot).extended.take();
            drop(extended);
            let hosted = lock(&slot).hosted.take();
            if let Some(hosted) = hosted
                && let Err(error) = hosted.close().await
            {
                tracing::error!(%error, "closing a VM running here");
            }
        }
    }
}

/// The site's shared state and its VMs, each opened (a commit that a crash interrupted is
/// finished, a VM that runs here runs again).
async fn open_site(
    store: &ReplicaStore,
    hosting: Hosting,
    events: Option<EventSender>,
) -> Result<(Arc<Site>, Vms)> {
    let site = Arc::new(Site {
        hosting,
        events,
        last_reports: Mutex::default(),
    });
    let vms: Vms = Arc::default();
    for vm in store.vms()? {
        open_slot(store, &vms, &vm, &site).await?;
    }
    Ok((site, vms))
}

async fn open_slot(
    store: &ReplicaStore,
    vms: &Vms,
    vm: &str,
    site: &Arc<Site>,
) -> Result<Arc<Mutex<VmSlot>>> {
    if let Some(slot) = lock(vms).get(vm) {
        return Ok(Arc::clone(slot));
    }
    let opened = {
        let store = store.clone();
        let vm = vm.to_owned();
        tokio::task::spawn_blocking(move || store.open_vm(&vm))
            .await
            .map_err(|error| Error::Replication {
                peer: "store".into(),
                problem: error.to_string(),
            })??
    };
    let (slot, created) = {
        let mut vms = lock(vms);
        let mut created = false;
        let slot = vms.entry(vm.to_owned()).or_insert_with(|| {
            created = true;
            Arc::new_cyclic(|this| {
                Mutex::new(VmSlot {
                    machine: Replica::new(vm, opened.record()),
                    replica: opened,
                    connections: HashMap::new(),
                    runtime: tokio::runtime::Handle::current(),
                    site: Arc::clone(site),
                    hosted: None,
                    extended: None,
                    onward_retry: OnwardRetry::default(),
                    failback: None,
                    this: this.clone(),
                    totals: Totals::default(),
                })
            })
        });
        (Arc::clone(slot), created)
    };
    if created && matches!(site.hosting, Hosting::Here(_)) {
        // A VM that runs here since a failover runs again, its tracking continued.
        let handle = Arc::clone(&slot);
        let vm = vm.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&handle);
            host(&mut guard, &vm, false)?;
            extend(&mut guard, false);
            Ok::<_, Error>(())
        })
        .await
        .map_err(|error| Error::Replication {
            peer: "store".into(),
            problem: error.to_string(),
        })??;
    }
    if created {
        // Status has figures for the VM even if it is busy the first time it is asked.
        let report = slot
            .try_lock()
            .ok()
            .map(|guard| report(vm.to_owned(), &guard));
        if let Some(report) = report {
            lock(&site.last_reports).insert(vm.to_owned(), report);
        }
    }
    Ok(slot)
}

async fn dispatch(slot: &Arc<Mutex<VmSlot>>, id: ConnectionId, message: Message) {
    let slot = Arc::clone(slot);
    run_blocking(move || {
        let mut slot = lock(&slot);
        slot.machine.handle_message(id, message);
        drive(&mut slot);
    })
    .await;
}

/// Runs a step of `vm`'s on a blocking thread (it takes the VM's lock and does file I/O).
async fn blocking<T: Send + 'static>(
    vm: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| Error::Replication {
            peer: vm.to_owned(),
            problem: error.to_string(),
        })?
}

/// [`blocking`] for work that answers nothing: a panic in it is logged.
async fn run_blocking(work: impl FnOnce() + Send + 'static) {
    let done = blocking("replica work", move || {
        work();
        Ok(())
    });
    if let Err(error) = done.await {
        tracing::error!(%error, "replica work panicked");
    }
}

/// A commit that failed (a full disk, say) stopped the VM: when its primary comes back, the
/// replica is opened again and takes deltas again, if the store allows.
fn recover_after_failure(store: &ReplicaStore, slot: &mut VmSlot) {
    let VmSlot {
        replica, machine, ..
    } = slot;
    match store.recover_failed(replica, machine) {
        Ok(true) => {
            tracing::info!(vm = %replica.vm(), "reopened the replica after a failed commit; taking deltas again");
        }
        Ok(false) => {}
        Err(error) => {
            tracing::error!(vm = %replica.vm(), %error, "the replica still cannot be opened");
        }
    }
}

#[cfg(test)]
mod tests;
