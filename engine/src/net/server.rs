//! The replica server's driver: accepts QUIC connections from allowed primaries, routes each
//! to its VM's [`Replica`] state machine, and carries out what the machine asks on the VM's
//! [`VmReplica`] (staging, commits) on blocking threads. One process serves many VMs from many
//! primaries; each VM's work is serialized by its own lock, VMs proceed independently.

use super::events::{self, EventSender, ReplicationEvent};
use super::extension::ExtendedVm;
use super::frame::{read_frame, spawn_control_writer};
use super::hosting::{HostedVm, HostingOptions};
use super::identity::Identity;
use super::primary::{BeforeTakeOver, HandoverFailure, PrimaryReport, ResyncDone};
use super::tls::server_config;
use crate::proto::{ConnectionId, DeltaId, DeltaKind, Message, RefusalCode, Replica};
use crate::replica::{PointCopy, PointInfo, ReplicaSite, ReplicaStore, SiteEffect, VmReplica};
use crate::{Error, Result};
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long a new connection has to introduce itself.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer that asked for hashes has to compare them and say hello: an hour, or the
/// time to hash its disks at a slow 32 MiB/s when that is longer. A peer that dies is noticed
/// sooner, by QUIC's idle timeout; this bounds one that lives but never answers.
fn resync_timeout(disk_bytes: u64) -> Duration {
    Duration::from_secs((disk_bytes / (32 << 20)).max(3600))
}

/// What the status socket reports for each VM on the replica.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplicaReport {
    pub vm: String,
    /// The VM's replica was busy when asked (hashing its disks for a comparison, say, which
    /// takes minutes on a large disk): the other figures are the last ones read, if any.
    pub busy: bool,
    pub primary: Option<String>,
    pub connected: bool,
    pub applied_sequence: u64,
    /// The delta being staged: sequence, chunks staged, chunks in all.
    pub staging: Option<(u64, u64, u32)>,
    pub error: Option<String>,
    /// Why the replica's disks may differ from what it applied (changed outside blockrep),
    /// until its primary has compared them.
    pub compare_required: Option<String>,
    pub disks: Vec<String>,
    /// Recovery points kept besides the latest state.
    pub recovery_points: usize,
    /// The point a test failover copy was made of, and where it is.
    pub test_failover: Option<PathBuf>,
    /// The failover to this site, if there is one.
    pub failover: Option<crate::replica::FailoverRecord>,
    /// The VM runs here: replication back to the old primary, when it runs.
    pub reverse: Option<PrimaryReport>,
    /// Extended replication of this replica to a third site, when configured.
    pub extended: Option<PrimaryReport>,
    /// Chunk bytes staged (as received: compressed), since the server started.
    pub staged_bytes_total: u64,
    /// Deltas applied since the server started, and the seconds their commits took: apply
    /// throughput is the staged bytes over those seconds.
    pub applied_deltas_total: u64,
    pub apply_seconds_total: f64,
}

/// A VM's report, read off its slot.
fn report(vm: String, slot: &VmSlot) -> ReplicaReport {
    ReplicaReport {
        vm,
        busy: false,
        primary: slot.machine.record().owner.clone(),
        connected: slot.machine.connection().is_some(),
        applied_sequence: slot.machine.applied(),
        staging: slot
            .machine
            .staging()
            .map(|(delta, staged, total)| (delta.sequence, staged, total)),
        error: slot.machine.failure().map(str::to_owned),
        compare_required: slot.replica.compare_required().map(str::to_owned),
        disks: slot
            .replica
            .disk_paths()
            .iter()
            .map(|path| path.display().to_string())
            .collect(),
        recovery_points: slot.replica.points().len().saturating_sub(1),
        test_failover: slot.replica.test_failover(),
        failover: slot.replica.failover(),
        reverse: slot.hosted.as_ref().and_then(HostedVm::report),
        extended: slot.extended.as_ref().and_then(ExtendedVm::report),
        staged_bytes_total: slot.totals.staged_bytes,
        applied_deltas_total: slot.totals.applied_deltas,
        apply_seconds_total: slot.totals.apply_seconds,
    }
}

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

/// A test failover's copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestCopy {
    pub vm: String,
    /// The point copied: the delta sequence the replica was at.
    pub point: u64,
    pub disks: Vec<PathBuf>,
}

fn test_failover(
    slot: &Mutex<VmSlot>,
    vm: &str,
    point: Option<u64>,
    out: &Path,
) -> Result<TestCopy> {
    let copy = lock(slot).replica_site().begin_test_failover(point, out)?;
    let done = |copy: &TestCopy| ReplicationEvent::TestFailoverCreated {
        point: copy.point,
        disks: copy.disks.clone(),
    };
    make_copy(slot, vm, copy, done)
}

fn unplanned_failover(
    slot: &Mutex<VmSlot>,
    vm: &str,
    point: Option<u64>,
    force: bool,
) -> Result<TestCopy> {
    let copy = {
        let mut guard = lock(slot);
        let copy = guard
            .replica_site()
            .begin_unplanned_failover(point, force)?;
        drive(&mut guard);
        copy
    };
    tracing::warn!(%vm, point = copy.target, "unplanned failover: replication from the primary is fenced off");
    make_copy(slot, vm, copy, |copy| ReplicationEvent::FailedOver {
        point: copy.point,
    })
}

/// Copies the point `copy` names, taking the VM's lock for each piece so that commits go on
/// between them, then ends it and tells `done` of it (under the VM's lock, so the event is in
/// order with the VM's other steps).
fn make_copy(
    slot: &Mutex<VmSlot>,
    vm: &str,
    copy: PointCopy,
    done: impl FnOnce(&TestCopy) -> ReplicationEvent,
) -> Result<TestCopy> {
    let made = crate::replica::copy_point(
        &mut |piece| lock(slot).replica_site().copy_piece(&copy, piece),
        copy.pinned_at,
        copy.target,
        copy.disks,
        &copy.out,
    );
    let mut guard = lock(slot);
    let target = copy.target;
    let ended = guard.replica_site().end_copy(copy, made);
    drive(&mut guard);
    let made = TestCopy {
        vm: vm.to_owned(),
        point: target,
        disks: ended?,
    };
    guard.site.send(vm, done(&made));
    Ok(made)
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
    pub async fn serve(&self, connection: quinn::Connection) {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        serve_connection(
            id,
            connection,
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
            guard.replica.set_reverse(true)?;
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

async fn accept_loop(
    endpoint: quinn::Endpoint,
    store: ReplicaStore,
    vms: Vms,
    site: Arc<Site>,
    next_connection: Arc<AtomicU64>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let store = store.clone();
                let vms = Arc::clone(&vms);
                let site = Arc::clone(&site);
                let id = next_connection.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(connection) => serve_connection(id, connection, store, vms, site).await,
                        Err(error) => tracing::warn!(peer = %remote, %error, "refused a connection: the handshake failed"),
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    endpoint.close(0u32.into(), b"server stopping");
    tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
        .await
        .ok();
}

async fn serve_connection(
    id: ConnectionId,
    connection: quinn::Connection,
    store: ReplicaStore,
    vms: Vms,
    site: Arc<Site>,
) {
    let remote = connection.remote_address();
    let owner = super::peer_fingerprint(&connection);
    let Some(owner) = owner else {
        tracing::warn!(peer = %remote, "refused a connection without a client certificate");
        connection.close(3u32.into(), b"no client certificate");
        return;
    };
    let accepted = async {
        let (mut send, mut receive) = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (send, receive) = connection.accept_bi().await.ok()?;
            Some((send, receive))
        })
        .await
        .ok()??;
        let mut hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut receive))
            .await
            .ok()?
            .ok()??;
        let mut compared = false;
        if let Message::HashRequest { vm, seed } = hello {
            // A resynchronization first: the hashes, then the session's hello once the peer
            // has compared (hashing both disks takes a while).
            let resync_deadline = match hash_request(&store, &vms, &site, &vm, &owner).await {
                Ok(HashRequest {
                    slot,
                    applied,
                    disk_bytes,
                }) => {
                    let resync_deadline = resync_timeout(disk_bytes);
                    // The welcome first, so the primary hashes its disks while this side does.
                    let answered = tokio::time::timeout(resync_deadline, async {
                        super::resync::answer_welcome(&mut send, applied).await?;
                        if applied == 0 {
                            return Ok(());
                        }
                        let hashes = replica_hashes(slot, seed).await.map_err(|reason| {
                            Error::Replication {
                                peer: vm.clone(),
                                problem: reason,
                            }
                        })?;
                        super::resync::answer_hashes(&mut send, &mut receive, &hashes).await
                    })
                    .await;
                    if !matches!(answered, Ok(Ok(()))) {
                        return None;
                    }
                    compared = true;
                    resync_deadline
                }
                Err(reason) => {
                    let _ = send.write_all(&super::resync::refusal(reason)).await;
                    let _ = send.finish();
                    return None;
                }
            };
            hello = tokio::time::timeout(resync_deadline, read_frame(&mut receive))
                .await
                .ok()?
                .ok()??;
        }
        Some((send, receive, hello, compared))
    }
    .await;
    let Some((send, mut receive, hello, compared)) = accepted else {
        tracing::warn!(peer = %remote, primary = %owner, "closing a connection that did not say hello");
        connection.close(3u32.into(), b"expected hello");
        return;
    };
    let Message::Hello {
        version,
        vm,
        primary,
        disks,
    } = hello
    else {
        connection.close(3u32.into(), b"expected hello");
        return;
    };
    // The names are the peer's, not yet checked: logged escaped.
    tracing::info!(peer = %remote, primary = ?primary, %owner, vm = ?vm, "primary connected");
    let admitted = {
        let (store, owner, vm, disks) = (store.clone(), owner.clone(), vm.clone(), disks.clone());
        blocking(&vm.clone(), move || store.admit(&owner, &vm, &disks)).await
    };
    let opened = match admitted {
        Ok(()) => open_slot(&store, &vms, &vm, &site).await,
        Err(error) => Err(error),
    };
    let slot = match opened {
        Ok(slot) => slot,
        Err(error) => {
            tracing::error!(vm = ?vm, %error, "cannot open the VM's replica");
            let refusal = Message::Refused {
                code: RefusalCode::NotThisReplica,
                reason: format!("{vm}: {error}"),
            };
            let (outgoing, writer) = spawn_control_writer(send);
            let _ = outgoing.send(refusal);
            drop(outgoing);
            let _ = writer.await;
            connection.close(4u32.into(), b"refused");
            return;
        }
    };
    // The old primary is back while a failback's outcome is open: it holds the final delta,
    // so the failback completes and it is welcomed as the primary.
    if let Err(error) = settle_failback(&slot, &owner).await {
        tracing::error!(%vm, %error, "cannot settle an interrupted failback");
        connection.close(4u32.into(), b"refused");
        return;
    }
    let (outgoing, writer) = spawn_control_writer(send);
    if let Some(answer) = answer_for_running_vm(&slot, &owner) {
        // The VM runs here: the connecting side is its old primary.
        let reversing = matches!(answer, Message::Reverse { .. });
        let _ = outgoing.send(answer);
        drop(outgoing);
        let _ = writer.await;
        let handed = reversing
            && lock(&slot)
                .hosted
                .as_ref()
                .is_some_and(|hosted| hosted.connect(connection.clone()));
        if handed {
            tracing::info!(peer = %remote, %vm, "the old primary connected: replicating back to it");
        } else {
            connection.close(4u32.into(), b"refused");
        }
        return;
    }
    lock(&slot).connections.insert(
        id,
        Peer {
            connection: connection.clone(),
            outgoing,
            writer,
        },
    );
    {
        let slot = Arc::clone(&slot);
        let owner = owner.clone();
        let store = store.clone();
        run_blocking(move || {
            let mut slot = lock(&slot);
            recover_after_failure(&store, &mut slot);
            if compared {
                slot.machine.compared(id);
            }
            slot.machine.hello(id, &owner, version, disks);
            drive(&mut slot);
        })
        .await;
    }
    // Data streams: chunks, in any order.
    let streams = {
        let connection = connection.clone();
        let slot = Arc::clone(&slot);
        tokio::spawn(async move {
            while let Ok(mut stream) = connection.accept_uni().await {
                let slot = Arc::clone(&slot);
                tokio::spawn(async move {
                    loop {
                        match read_frame(&mut stream).await {
                            Ok(Some(message @ Message::Chunk { .. })) => {
                                dispatch(&slot, id, message).await
                            }
                            Ok(Some(_)) => {
                                tracing::warn!(
                                    "a data stream carried a control message; ignoring the stream"
                                );
                                return;
                            }
                            Ok(None) => return,
                            Err(error) => {
                                tracing::debug!(%error, "data stream ended");
                                return;
                            }
                        }
                    }
                });
            }
        })
    };
    loop {
        match read_frame(&mut receive).await {
            Ok(Some(message)) => dispatch(&slot, id, message).await,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(%error, %vm, "control stream ended");
                break;
            }
        }
    }
    let reason = connection.closed().await;
    streams.abort();
    tracing::info!(peer = %remote, %vm, %reason, "primary disconnected");
    run_blocking(move || {
        let mut slot = lock(&slot);
        slot.connections.remove(&id);
        slot.machine.disconnected(id);
        drive(&mut slot);
    })
    .await;
}

/// What a connecting old primary is told when its VM runs here: to become its replica when
/// replication back is on; otherwise to wait. `None` when the VM does not run here.
fn answer_for_running_vm(slot: &Mutex<VmSlot>, owner: &str) -> Option<Message> {
    let slot = lock(slot);
    let hosted = slot.hosted.as_ref()?;
    let failover = slot.replica.failover()?;
    if slot.machine.record().owner.as_deref() != Some(owner) {
        return Some(Message::Refused {
            code: RefusalCode::NotThisReplica,
            reason: "this VM belongs to another primary".into(),
        });
    }
    Some(if hosted.reversing() {
        Message::Reverse {
            applied: slot.replica.applied(),
            resync: failover.resync,
        }
    } else if failover.planned {
        // It handed the VM over and may have missed the confirmation.
        Message::HandedOver {
            sequence: failover.point,
        }
    } else {
        Message::Refused {
            code: RefusalCode::RunsAtReplicaSite,
            reason: format!(
                "{}: the VM runs at the replica site since a failover; run `blockrep reverse {}` there to replicate back to this host",
                slot.machine_name(),
                slot.machine_name()
            ),
        }
    })
}

/// A comparison `owner` asked for of `vm`'s replica: the slot and what it has applied (0 when
/// it holds no copy), or why it may not compare (another owner, or the VM runs here now: its
/// disks are open for the VM, not to be opened again).
async fn hash_request(
    store: &ReplicaStore,
    vms: &Vms,
    site: &Arc<Site>,
    vm: &str,
    owner: &str,
) -> std::result::Result<HashRequest, String> {
    let slot = open_slot(store, vms, vm, site)
        .await
        .map_err(|error| error.to_string())?;
    let (applied, disk_bytes) = {
        let slot = lock(&slot);
        let disk_bytes = slot
            .replica
            .descriptions()
            .iter()
            .map(|disk| disk.virtual_size)
            .sum();
        let applied = match slot.machine.record().owner.as_deref() {
            None => 0,
            Some(known) if known != owner => {
                return Err("this VM belongs to another primary".to_owned());
            }
            Some(_) if slot.replica.failover().is_some() || slot.hosted.is_some() => {
                return Err(format!(
                    "{vm} failed over to this site: it is compared when replication comes back to the other site (`blockrep reverse`)"
                ));
            }
            Some(_) => slot.replica.applied(),
        };
        (applied, disk_bytes)
    };
    Ok(HashRequest {
        slot,
        applied,
        disk_bytes,
    })
}

/// A comparison a primary may make: of this VM's replica, at delta `applied` (0 when it
/// holds no copy), of `disk_bytes` in all.
struct HashRequest {
    slot: Arc<Mutex<VmSlot>>,
    applied: u64,
    disk_bytes: u64,
}

/// The block hashes of the replica's disks.
async fn replica_hashes(
    slot: Arc<Mutex<VmSlot>>,
    seed: u64,
) -> std::result::Result<Vec<crate::resync::BlockHashes>, String> {
    tokio::task::spawn_blocking(move || {
        lock(&slot)
            .replica
            .block_hashes(seed)
            .map_err(|error| error.to_string())
    })
    .await
    .map_err(|error| error.to_string())?
}

/// A planned failover of a VM that runs here back to its old primary (see
/// `ReplicaServer::planned_failover`).
async fn fail_back(slot: Arc<Mutex<VmSlot>>, vm: String, reverse: bool) -> Result<u64> {
    let vm = vm.as_str();
    // Shared by the hook that records the final delta and by the failure below, each under
    // the VM's lock: a failback called off is never recorded afterwards.
    let state = Arc::new(Mutex::new(Failback::default()));
    let answer = {
        let (slot, state) = (Arc::clone(&slot), Arc::clone(&state));
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&slot);
            let vm = guard.machine_name();
            let open = guard
                .replica
                .failover()
                .and_then(|failover| failover.handing_back);
            if guard.failback.is_some() || open.is_some() {
                return Err(Error::Replication {
                    peer: vm,
                    problem: "a failback is under way, or one's outcome is open (it is settled when the old primary connects, or when this server starts)".into(),
                });
            }
            let before_take_over = record_final_delta(guard.this.clone(), Arc::clone(&state));
            let hosted = guard.hosted.as_mut().ok_or_else(|| Error::Replication {
                peer: vm.clone(),
                problem: "does not run at this site; a planned failover runs where the VM runs".into(),
            })?;
            // Refused before the writes stop when there is no one to hand over to.
            if !hosted.reversing() {
                return Err(Error::Replication {
                    peer: vm,
                    problem: "not replicating back to the old primary: run `blockrep reverse` first, so the other site has the VM to take over".into(),
                });
            }
            hosted.stop_writes()?;
            let asked = hosted.hand_over(reverse, before_take_over);
            match &asked {
                Ok(_) => guard.failback = Some(state),
                Err(_) => hosted.resume_writes()?,
            }
            asked
        })
        .await
        .map_err(|error| Error::Replication {
            peer: vm.to_owned(),
            problem: error.to_string(),
        })??
    };
    let failure = match answer.await {
        Ok(Ok(sequence)) => {
            crate::replica::crash_point("failback-taken-over");
            let hosted = lock(&slot).hosted.take();
            let Some(hosted) = hosted else {
                // The old primary's connection took the VM to close, and finishes it.
                lock(&slot).failback = None;
                return Ok(sequence);
            };
            let closed = hosted.close().await;
            return blocking(vm, move || {
                let mut guard = lock(&slot);
                guard.failback = None;
                // Not closed (its disks still held): the record stays, and a restart of this
                // server finishes the failback.
                closed?;
                finish_failback(&mut guard, sequence)?;
                Ok(sequence)
            })
            .await;
        }
        Ok(Err(failure)) => failure,
        Err(_) => HandoverFailure::Unknown("replication back stopped".into()),
    };
    blocking(vm, move || {
        let mut guard = lock(&slot);
        let mut state = lock(&state);
        state.called_off = true;
        guard.failback = None;
        let recorded = guard
            .replica
            .failover()
            .and_then(|failover| failover.handing_back);
        match (&failure, recorded) {
            // The old primary connected meanwhile: the failback was settled, or is being
            // settled (its connection took the VM to close).
            (_, _) if guard.replica.failover().is_none() => {
                Ok(state.recorded.unwrap_or_default())
            }
            (_, Some(sequence)) if guard.hosted.is_none() => Ok(sequence),
            // Asked to take over, and no answer: it may run the VM. The writes stay
            // stopped; the failback is settled when it connects again.
            (HandoverFailure::Unknown(_), Some(_)) if state.recorded.is_some() => Err(Error::Replication {
                peer: guard.machine_name(),
                problem: format!(
                    "{failure}; the failback completes when the old primary connects again"
                ),
            }),
            _ => {
                // Not handed over: the VM goes on running here.
                if recorded.is_some() {
                    guard.replica.set_handing_back(None).map_err(|error| {
                        Error::Replication {
                            peer: guard.machine_name(),
                            problem: format!("{failure}; and the record of the failback cannot be removed, so the VM's writes stay stopped: {error}"),
                        }
                    })?;
                }
                if let Some(hosted) = guard.hosted.as_mut() {
                    hosted.resume_writes()?;
                }
                Err(Error::Replication {
                    peer: guard.machine_name(),
                    problem: failure.to_string(),
                })
            }
        }
    })
    .await
}

/// A failback in progress, as its final-delta hook and its failure path see it.
#[derive(Debug, Default)]
struct Failback {
    /// The failback failed and was answered: the hook must not record it any more.
    called_off: bool,
    /// The final delta recorded, when it was.
    recorded: Option<u64>,
}

/// The hook a failback runs once the old primary has applied the final delta and before it
/// is asked to take the VM over: the VM's writes are made durable here, then the final
/// delta is recorded (`FailoverRecord::handing_back`), so that from then on a restart of this
/// server, or a reconnection of the old primary, never runs the VM here again.
fn record_final_delta(
    this: std::sync::Weak<Mutex<VmSlot>>,
    state: Arc<Mutex<Failback>>,
) -> BeforeTakeOver {
    Arc::new(move |sequence| {
        let slot = this.upgrade().ok_or("the replica server is stopping")?;
        let mut guard = lock(&slot);
        let mut state = lock(&state);
        if state.called_off {
            return Err("the failback was called off".into());
        }
        if let Some(hosted) = &guard.hosted {
            hosted.flush().map_err(|error| error.to_string())?;
        }
        guard
            .replica
            .set_handing_back(Some(sequence))
            .map_err(|error| error.to_string())?;
        state.recorded = Some(sequence);
        crate::replica::crash_point("failback-final-delta-recorded");
        Ok(())
    })
}

/// The VM runs at the old primary since a failback at delta `sequence`: this is its replica
/// again (the VM no longer runs here: its writes stopped before the final delta).
fn finish_failback(slot: &mut VmSlot, sequence: u64) -> Result<()> {
    if slot.replica.failover().is_none() {
        // Finished already, by the old primary's connection or by the failback itself.
        return Ok(());
    }
    slot.replica.hand_back(sequence)?;
    let vm = slot.machine_name();
    slot.machine = Replica::new(&vm, slot.replica.record());
    // The third site's copy is older than the failover: it starts again.
    extend(slot, true);
    tracing::info!(%vm, sequence, "failback done: the VM runs at the other site; this is its replica again");
    Ok(())
}

/// A failback whose outcome was not known here (its server restarted, or the old primary's
/// answer was lost): the old primary holds the final delta and may run the VM already, so it
/// is settled as handed back. The old primary takes the VM over when it connects, if it has
/// not yet. Returns whether there was one to settle.
async fn settle_failback(slot: &Arc<Mutex<VmSlot>>, owner: &str) -> Result<bool> {
    let (sequence, hosted) = {
        let mut guard = lock(slot);
        let handing_back = guard
            .replica
            .failover()
            .and_then(|failover| failover.handing_back);
        let Some(sequence) = handing_back else {
            return Ok(false);
        };
        // Only the VM's owner settles a failback; while the VM is being closed (by the
        // failback itself, or another settling) the owner connects again.
        if guard.machine.record().owner.as_deref() != Some(owner) {
            return Ok(false);
        }
        let Some(hosted) = guard.hosted.take() else {
            return Ok(false);
        };
        // A failback still waiting for its answer hears it from here: it is called off, and
        // finds the VM handed back.
        if let Some(running) = &guard.failback {
            lock(running).called_off = true;
        }
        (sequence, hosted)
    };
    tracing::warn!(
        sequence,
        "a failback was interrupted after its final delta: the VM runs at the other site, not here"
    );
    let closed = hosted.close().await;
    let slot = Arc::clone(slot);
    let vm = lock(&slot).machine_name();
    blocking(&vm, move || {
        let mut guard = lock(&slot);
        // Not closed (its disks still held): the record stays, and a restart of this server
        // finishes the failback.
        closed?;
        finish_failback(&mut guard, sequence)
    })
    .await?;
    Ok(true)
}

/// Makes a VM that failed over here run: tracked disks, NBD (for `Hosting::Here`), or tells
/// the caller (`Hosting::Caller`). `fresh` starts tracking afresh.
fn host(slot: &mut VmSlot, vm: &str, fresh: bool) -> Result<()> {
    let Some(failover) = slot.replica.failover().filter(|failover| failover.active()) else {
        return Ok(());
    };
    if let Some(sequence) = failover.handing_back {
        // A failback was under way when this server stopped: the old primary holds the final
        // delta and may run the VM already. Run here too and both sites would; so this is its
        // replica again, and the old primary takes the VM over when it reconnects, if it has
        // not yet.
        tracing::warn!(%vm, sequence, "a failback was interrupted after its final delta: the VM runs at the other site, not here");
        return finish_failback(slot, sequence);
    }
    // The disks are the VM's now, no longer a replica to pass on; the onward primary lets go
    // of them before they are opened for the VM.
    if let Some(extended) = slot.extended.take() {
        extended.stop_and_wait(&slot.runtime.clone());
    }
    slot.replica.untrack();
    match &Arc::clone(&slot.site).hosting {
        Hosting::Here(options) => {
            if slot.hosted.is_none() {
                slot.replica.release_disks();
                slot.hosted = Some(HostedVm::open(
                    vm,
                    &slot.replica.disk_paths(),
                    options,
                    fresh,
                )?);
            }
            if failover.reverse {
                start_reverse(slot);
            }
        }
        Hosting::Caller(taken_over) => {
            let _ = taken_over.send(TakenOver {
                vm: vm.to_owned(),
                sequence: failover.point,
                reverse: failover.reverse,
            });
        }
    }
    Ok(())
}

/// Starts replicating a replica onward, when the server is set up for it and the replica
/// holds a state to pass on. `fresh`: its disk files are new, so onward replication starts
/// with an initial one.
fn extend(slot: &mut VmSlot, fresh: bool) {
    let Hosting::Here(hosting) = &Arc::clone(&slot.site).hosting else {
        return;
    };
    let Some(options) = &hosting.extend else {
        return;
    };
    if slot.extended.is_some() || slot.replica.applied() == 0 || slot.replica.failover().is_some() {
        return;
    }
    let vm = slot.machine_name();
    let runtime = slot.runtime.clone();
    match ExtendedVm::start(&vm, &mut slot.replica, options, &runtime, fresh) {
        Ok(extended) => slot.extended = Some(extended),
        Err(error) => tracing::error!(%vm, %error, "cannot replicate onward"),
    }
}

/// Starts replication back for a VM running here.
fn start_reverse(slot: &mut VmSlot) {
    let Hosting::Here(options) = &Arc::clone(&slot.site).hosting else {
        return;
    };
    let resync_owed = slot
        .replica
        .failover()
        .is_some_and(|failover| failover.resync);
    let runtime = slot.runtime.clone();
    let Some(hosted) = slot.hosted.as_mut() else {
        return;
    };
    let resync: Option<ResyncDone> = resync_owed.then(|| {
        let weak = slot.this.clone();
        Arc::new(move |summary| {
            tracing::info!(
                ?summary,
                "resynchronization compared the old primary's copy"
            );
            if let Some(slot) = weak.upgrade()
                && let Err(error) = lock(&slot).replica.resynchronized()
            {
                tracing::error!(%error, "cannot record the resynchronization");
            }
        }) as ResyncDone
    });
    hosted.start_reverse(options, &runtime, resync, slot.site.events.clone());
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

/// Carries out what the machine asks until it asks nothing more.
fn drive(slot: &mut VmSlot) {
    while let Some(effect) = slot.replica_site().poll_effect() {
        match effect {
            SiteEffect::Send {
                connection,
                message,
            } => send(slot, connection, message),
            SiteEffect::Close { connection, reason } => close(slot, connection, reason),
            SiteEffect::Staged { bytes } => slot.totals.staged_bytes += bytes,
            SiteEffect::StoreFailed { step, reason } => {
                tracing::error!(%reason, "{step} failed");
                close_all(slot, &reason);
            }
            SiteEffect::Apply {
                delta,
                kind,
                app_consistent,
            } => apply(slot, delta, kind, app_consistent),
            SiteEffect::VerifyHandover {
                connection,
                sequence,
                seed,
                digests,
                reverse,
            } => take_over(slot, connection, sequence, seed, &digests, reverse),
        }
    }
}

fn send(slot: &VmSlot, connection: ConnectionId, message: Message) {
    if let Some(peer) = slot.connections.get(&connection) {
        let _ = peer.outgoing.send(message);
    }
}

fn close(slot: &mut VmSlot, connection: ConnectionId, reason: String) {
    if let Some(peer) = slot.connections.remove(&connection) {
        tracing::info!(%reason, "closing a connection");
        // What is queued (a refusal, say) is delivered before the close.
        let Peer {
            connection,
            outgoing,
            writer,
        } = peer;
        drop(outgoing);
        drop(slot.runtime.spawn(async move {
            let _ = writer.await;
            connection.close(0u32.into(), reason.as_bytes());
        }));
    }
}

fn apply(slot: &mut VmSlot, delta: DeltaId, kind: DeltaKind, app_consistent: bool) {
    let started = std::time::Instant::now();
    if let Err(error) = slot.replica_site().apply(delta, kind, app_consistent) {
        tracing::error!(%delta, %error, "applying failed");
        return;
    }
    let apply_time = started.elapsed();
    slot.totals.applied_deltas += 1;
    slot.totals.apply_seconds += apply_time.as_secs_f64();
    tracing::info!(%delta, ?kind, seconds = apply_time.as_secs_f64(), "applied");
    slot.site.send(
        slot.replica.vm(),
        ReplicationEvent::DeltaApplied {
            sequence: delta.sequence,
            apply_time,
        },
    );
    if let Some(extended) = &slot.extended {
        extended.source_changed();
    }
    let replaced = slot.replica.take_detached();
    if replaced {
        // New disk files: onward replication starts again from them.
        slot.extended = None;
    }
    extend(slot, replaced);
}

/// A planned failover: the VM is taken over and run here when the disks compare equal; the
/// primary is told only once it runs (told too early, it would leave the VM running nowhere).
fn take_over(
    slot: &mut VmSlot,
    connection: ConnectionId,
    sequence: u64,
    seed: u64,
    digests: &[u128],
    reverse: bool,
) {
    let vm = slot.machine_name();
    let outcome = slot
        .replica_site()
        .verify_handover(sequence, seed, digests, reverse)
        .and_then(|()| {
            host(slot, &vm, true)
                .map_err(|error| slot.replica_site().not_hosted(sequence, &error.to_string()))
        });
    match &outcome {
        Ok(()) => {
            tracing::info!(%vm, sequence, reverse, "planned failover: the disks equal the primary's; the VM runs here now");
            slot.site.send(
                &vm,
                ReplicationEvent::HandoverAccepted { sequence, reverse },
            );
        }
        Err(refusal) => {
            tracing::error!(%vm, reason = %refusal, "refused a planned failover");
            slot.site.send(
                &vm,
                ReplicationEvent::HandoverRefused {
                    reason: refusal.reason.clone(),
                },
            );
        }
    }
    slot.replica_site()
        .handover_verified(connection, sequence, outcome);
}

fn close_all(slot: &mut VmSlot, reason: &str) {
    for (_, peer) in slot.connections.drain() {
        peer.connection.close(5u32.into(), reason.as_bytes());
    }
}

#[cfg(test)]
mod tests {
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
                ReplicaStore::with_policy(directory.path(), StorageOptions::default(), policy)
                    .unwrap();
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
}
