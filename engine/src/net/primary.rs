//! The primary's driver: runs a [`Primary`] state machine over QUIC. It connects (and
//! reconnects), carries control messages on one bidirectional stream and chunks on several
//! unidirectional ones, has the [`ProtectedVm`] cut and read deltas on blocking threads, paces
//! chunks to `--max-rate`, and publishes the machine's status for `blockrep status`.

use super::events::{self, ReplicationEvent};
use super::frame::{read_frame, spawn_control_writer, write_message};
use super::identity::Identity;
use super::resync;
use super::tls::{client_config, is_authentication_failure};
use super::{ClientEndpoint, PeerConnection};
use crate::delta::DeltaEncoder;
use crate::protect::ProtectedVm;
use crate::protect::{AfterHandover, after_handover};
use crate::proto::{
    DeltaId, Message, Primary, PrimaryAction, PrimaryConfig, PrimaryStatus, ReplicationState,
    Tracking, chunk_frame_prefix,
};
use crate::{Error, Result};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// How a primary reaches its replica.
#[derive(Debug)]
pub enum Route {
    /// Dial the replica server at `replica` (the endpoint holds the pinned TLS setup).
    Dial {
        endpoint: ClientEndpoint,
        replica: SocketAddr,
    },
    /// The replica dials in: reverse replication, where the old primary, now the replica,
    /// keeps connecting to this site; the server hands its connections over.
    Incoming {
        peer: String,
        connections: mpsc::UnboundedReceiver<PeerConnection>,
    },
}

/// A QUIC client endpoint that presents `identity` and accepts only `trusted`.
pub fn client_endpoint(
    identity: &Identity,
    trusted: CertificateDer<'static>,
    replica: SocketAddr,
) -> Result<ClientEndpoint> {
    let peer = replica.to_string();
    let bind: SocketAddr = if replica.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|error| network(&peer, format!("cannot open a UDP socket: {error}")))?;
    endpoint.set_default_client_config(client_config(identity, trusted)?);
    Ok(ClientEndpoint(endpoint))
}

/// What an operator asks of a running primary.
pub enum PrimaryCommand {
    /// Planned failover (the VM's writes are already stopped): ship the final delta, have the
    /// replica compare and take over; `done` gets the final sequence or why it failed.
    HandOver {
        reverse: bool,
        done: oneshot::Sender<std::result::Result<u64, HandoverFailure>>,
        /// Told the final delta's sequence once the other side has applied it, before it is
        /// asked to take over.
        before_take_over: Option<BeforeTakeOver>,
    },
    /// Compare the disks by hash on the next connection and ship what differs.
    Resync,
    /// Compare the replica with this primary by hash, shipping nothing.
    Verify {
        done: oneshot::Sender<std::result::Result<crate::resync::Verification, String>>,
    },
}

/// Why a planned failover did not hand the VM over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverFailure {
    /// The VM did not go: the other side refused it, or replication stopped before the other
    /// side was asked to take it over. It may run here again.
    NotHandedOver(String),
    /// Replication stopped after the other side was asked to take the VM over: it may run
    /// there now, so it must not run here until that is settled.
    Unknown(String),
}

impl std::fmt::Display for HandoverFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoverFailure::NotHandedOver(reason) => formatter.write_str(reason),
            HandoverFailure::Unknown(reason) => write!(
                formatter,
                "{reason}; the other site may run the VM now, so its writes stay stopped here"
            ),
        }
    }
}

impl std::fmt::Debug for PrimaryCommand {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrimaryCommand::HandOver { reverse, .. } => formatter
                .debug_struct("HandOver")
                .field("reverse", reverse)
                .finish_non_exhaustive(),
            PrimaryCommand::Resync => formatter.write_str("Resync"),
            PrimaryCommand::Verify { .. } => formatter.write_str("Verify"),
        }
    }
}

/// How replication ended, when it did not fail.
#[derive(Debug)]
pub enum Ending {
    /// Stopped by the caller.
    Stopped,
    /// A planned failover handed the VM to the replica site at delta `sequence`.
    HandedOver { sequence: u64 },
    /// The VM runs at the replica's site (it failed over there): this side is to be its
    /// replica now, over `connection`, its copy counted as at delta `applied`.
    Reversed {
        connection: PeerConnection,
        applied: u64,
        resync: bool,
    },
}

/// Disk bytes compared and found different by a resynchronization.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncSummary {
    pub compared_bytes: u64,
    pub differing_bytes: u64,
}

/// Told when a resynchronization has marked what differs (it then ships as a delta).
pub type ResyncDone = Arc<dyn Fn(ResyncSummary) + Send + Sync>;

/// Told, on a blocking thread, the final delta's sequence of a planned failover once the other
/// side has applied it and before it is asked to take over; an error calls the failover off.
/// A failback records it durably, so that a crash from then on cannot run the VM at both sites.
pub type BeforeTakeOver = Arc<dyn Fn(u64) -> std::result::Result<(), String> + Send + Sync>;

/// How a primary runs.
pub struct PrimaryOptions {
    pub route: Route,
    pub config: PrimaryConfig,
    /// Data streams used at once.
    pub streams: usize,
    /// Bytes per second on the wire at most.
    pub max_rate: Option<u64>,
    /// True while the operator has replication paused.
    pub suspended: Option<watch::Receiver<bool>>,
    /// Run around application-consistent cuts.
    pub consistency_hook: Option<ConsistencyHook>,
    /// Operator requests (planned failover).
    pub commands: Option<mpsc::UnboundedReceiver<PrimaryCommand>>,
    /// Compare the replica's copy by hash on the first connection, marking what differs as
    /// changed, before replicating: its content is not known to match tracking.
    pub resync: Option<ResyncDone>,
    /// Compare by hash only inside this daily window; outside it, a resynchronization owed
    /// waits (and replication with it).
    pub resync_window: Option<crate::units::TimeWindow>,
    /// Cut only after this changes (a count of deltas applied to the disks being passed on):
    /// extended replication never cuts more often than the primary before it ships.
    pub source_changes: Option<watch::Receiver<u64>>,
    /// Where to send replication events (cycles shipped and missed, health, resync, failover
    /// steps), for an embedder; none when `None`.
    pub events: Option<super::events::EventSender>,
}

impl PrimaryOptions {
    /// Replicates by `config` over `route`, on 4 data streams, with nothing else asked: no
    /// rate limit, pause, hook, commands, resynchronization or events. Set the fields to ask
    /// for them.
    pub fn new(route: Route, config: PrimaryConfig) -> PrimaryOptions {
        PrimaryOptions {
            route,
            config,
            streams: 4,
            max_rate: None,
            suspended: None,
            consistency_hook: None,
            commands: None,
            resync: None,
            resync_window: None,
            source_changes: None,
            events: None,
        }
    }
}

impl std::fmt::Debug for PrimaryOptions {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PrimaryOptions")
            .field("route", &self.route)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A command that freezes the VM's applications before a cut and thaws them after: run as
/// `sh -c 'COMMAND "$1"' hook freeze`, then `... thaw`. A freeze that fails or outlasts its
/// timeout makes the cut crash-consistent (and thaws anyway).
#[derive(Debug, Clone)]
pub struct ConsistencyHook {
    pub command: String,
    pub timeout: Duration,
}

impl ConsistencyHook {
    fn run(&self, phase: &str) -> std::result::Result<(), String> {
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{} \"$1\"", self.command))
            .arg("consistency-hook")
            .arg(phase)
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot run the consistency hook: {error}"))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "the consistency hook's {phase} exited with {status}"
                    ));
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the consistency hook's {phase} took longer than {:?}",
                        self.timeout
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(error) => return Err(error.to_string()),
            }
        }
    }

    /// Runs `prepare` frozen; says whether the freeze held.
    fn around<T>(&self, prepare: impl FnOnce() -> T) -> (T, bool) {
        let frozen = match self.run("freeze") {
            Ok(()) => true,
            Err(reason) => {
                tracing::warn!(%reason, "this cut is crash-consistent only");
                false
            }
        };
        let outcome = prepare();
        if let Err(reason) = self.run("thaw") {
            tracing::error!(%reason, "thawing after the cut failed");
        }
        (outcome, frozen)
    }
}

/// What the status socket reports for a primary.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PrimaryReport {
    pub vm: String,
    pub replica: String,
    #[serde(flatten)]
    pub status: PrimaryStatus,
    /// Seconds since the last delta was applied, when one was.
    pub seconds_since_replication: Option<f64>,
    /// When the last delta was applied, in seconds since the Unix epoch.
    pub last_replication_unix_seconds: Option<f64>,
    pub average_latency_seconds: f64,
    pub last_delta_latency_seconds: f64,
    /// Disk bytes shipped, before compression.
    pub bytes_before_compression: u64,
    /// Bytes of chunks put on the wire.
    pub bytes_after_compression: u64,
    /// The last resynchronization by hash, when there was one.
    pub resync: Option<ResyncSummary>,
    /// The comparison under way: bytes compared, in all, and the time left.
    pub resynchronizing: Option<resync::ProgressReport>,
}

/// Shared with the status socket.
pub type SharedReport = Arc<Mutex<Option<PrimaryReport>>>;

enum Event {
    Connected {
        generation: u64,
        connection: quinn::Connection,
        control: quinn::SendStream,
        incoming: quinn::RecvStream,
    },
    ConnectFailed {
        reason: String,
        permanent: bool,
    },
    /// The comparison is done: what it found, or `None` when the replica holds no copy.
    /// A connection's comparison ended (its generation, and what it found).
    Resynchronized(u64, Option<ResyncSummary>),
    Verified {
        sequence: u64,
        outcome: Result<(u64, Vec<u128>)>,
    },
    Message {
        generation: u64,
        message: Message,
    },
    Lost {
        generation: u64,
        reason: String,
        permanent: bool,
    },
    Prepared {
        delta: DeltaId,
        outcome: Result<Vec<u64>>,
        app_consistent: bool,
    },
    /// A chunk of the delta in flight cannot be read: resending it would fail the same way.
    ChunkFailed {
        reason: String,
    },
}

/// The live connection and the tasks that serve it.
struct Link {
    connection: quinn::Connection,
    control: mpsc::UnboundedSender<Message>,
    /// Ends once the control messages sent were delivered.
    control_writer: tokio::task::JoinHandle<()>,
    chunks: mpsc::UnboundedSender<(DeltaId, u32)>,
}

/// Paces bytes to a rate (a token bucket holding at most a quarter second of credit).
struct Pacer {
    rate: u64,
    credit: f64,
    updated: Instant,
}

impl Pacer {
    fn delay_for(&mut self, bytes: u64) -> Duration {
        let now = Instant::now();
        let burst = self.rate as f64 / 4.0;
        self.credit = (self.credit
            + now.duration_since(self.updated).as_secs_f64() * self.rate as f64)
            .min(burst);
        self.updated = now;
        self.credit -= bytes as f64;
        if self.credit >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.credit / self.rate as f64)
        }
    }
}

/// Runs replication until `stop` turns true (a clean stop: the session says goodbye), a
/// planned failover hands the VM over, the replica says the VM runs at its site, or
/// replication fails for good. Its status is kept in `report` as it goes.
///
/// A replica server and a primary in one process; the status and recovery points queried; then
/// the primary stops and the VM fails over to the replica's site:
///
/// ```
/// use blockrep::delta::Compression;
/// use blockrep::io::StorageOptions;
/// use blockrep::net::{
///     Hosting, Identity, PrimaryOptions, ReplicaServer, Route, SharedReport, client_endpoint,
///     run_primary,
/// };
/// use blockrep::protect::ProtectedVm;
/// use blockrep::proto::PrimaryConfig;
/// use blockrep::replica::ReplicaStore;
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let directory = tempfile::tempdir()?;
/// # let path = |name: &str| directory.path().join(name);
/// std::fs::write(path("vm1.raw"), vec![0u8; 4 << 20])?;
/// let replica_id = Identity::create("replica", &path("replica-id"))?;
/// let primary_id = Identity::create("primary", &path("primary-id"))?;
/// tokio::runtime::Runtime::new()?.block_on(async {
///     let store = ReplicaStore::open(&path("store"), StorageOptions::default())?;
///     let server = ReplicaServer::start(
///         "127.0.0.1:0".parse()?,
///         store,
///         &replica_id,
///         vec![primary_id.certificate.clone()],
///         Hosting::Here(Box::default()),
///         None,
///     )
///     .await?;
///     let vm = Arc::new(ProtectedVm::open(
///         &[path("vm1.raw")],
///         &StorageOptions::default(),
///         Compression::Lz4,
///     )?);
///     let config = PrimaryConfig {
///         vm: "vm1".into(),
///         primary: "host-a".into(),
///         disks: vm.descriptions().to_vec(),
///         frequency: Duration::from_millis(200),
///         window: 16,
///         reconnect_min: Duration::from_millis(100),
///         reconnect_max: Duration::from_secs(1),
///         tracking: vm.tracking().clone(),
///         seed: 1,
///         app_consistent_every: None,
///     };
///     let endpoint =
///         client_endpoint(&primary_id, replica_id.certificate.clone(), server.address())?;
///     let mut options =
///         PrimaryOptions::new(Route::Dial { endpoint, replica: server.address() }, config);
///     options.streams = 2;
///     let report = SharedReport::default();
///     let (stop, stopped) = tokio::sync::watch::channel(false);
///     let primary = tokio::spawn(run_primary(Arc::clone(&vm), options, report.clone(), stopped));
///     vm.disks()[0].write_at(b"hello, replica", 0)?;
///
///     // The status, as `blockrep status` shows it: wait for two deltas applied.
///     let applied = || {
///         report.lock().unwrap().as_ref().map_or(0, |entry| entry.status.applied_sequence)
///     };
///     let deadline = std::time::Instant::now() + Duration::from_secs(60);
///     while applied() < 2 {
///         assert!(std::time::Instant::now() < deadline, "nothing was replicated");
///         tokio::time::sleep(Duration::from_millis(20)).await;
///     }
///     // The replica's points, newest first: the latest state at least at delta 2.
///     let points = server.points("vm1")?;
///     assert!(points[0].latest && points[0].id >= 2);
///
///     // The primary goes away; the VM fails over to the replica's latest point, for good.
///     let _ = stop.send(true);
///     primary.await??;
///     let failed_over = loop {
///         match server.unplanned_failover("vm1", None, false).await {
///             Ok(copy) => break copy,
///             // Refused while the primary's connection is still closing.
///             Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
///         }
///     };
///     assert!(failed_over.point >= 2);
///     let disks = server.commit_failover("vm1").await?;
///     assert_eq!(disks.len(), 1);
///     Ok::<_, Box<dyn std::error::Error>>(())
/// })?;
/// # Ok(())
/// # }
/// ```
pub async fn run_primary(
    vm: Arc<ProtectedVm>,
    options: PrimaryOptions,
    report: SharedReport,
    mut stop: watch::Receiver<bool>,
) -> Result<Ending> {
    let PrimaryOptions {
        route,
        config,
        streams,
        max_rate,
        suspended,
        consistency_hook,
        commands,
        resync,
        resync_window,
        source_changes,
        events: listeners,
    } = options;
    let listeners = listeners.as_ref();
    let mut status_events = super::events::StatusEvents::default();
    let mut resync_announced = false;
    let mut source_changes = source_changes;
    let (peer, dialer) = match route {
        Route::Dial { endpoint, replica } => {
            (replica.to_string(), Dialer::Dial { endpoint, replica })
        }
        Route::Incoming { peer, connections } => (
            peer,
            Dialer::Incoming(Arc::new(tokio::sync::Mutex::new(connections))),
        ),
    };
    let mut commands = commands;
    let mut handover_done: Option<oneshot::Sender<std::result::Result<u64, HandoverFailure>>> =
        None;
    let mut before_take_over: Option<BeforeTakeOver> = None;
    // The other side was asked to take the VM over: from then on a failure leaves it unknown
    // whether it did.
    let mut handover_requested = false;
    let mut last_resync: Option<ResyncSummary> = None;
    let progress = Arc::new(resync::Progress::default());
    let mut ending = Ending::Stopped;
    let (events, mut inbox) = mpsc::unbounded_channel();
    let mut primary = Primary::new(config.clone(), Instant::now());
    if resync.is_some() {
        primary.owe_comparison();
    }
    primary.remember_acknowledged(vm.acknowledged_delta());
    if source_changes.is_some() {
        primary.follow_source();
    }
    let mut link: Option<Link> = None;
    let mut generation = 0u64;
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let mut disk_bytes = 0u64;
    let pacer = max_rate.map(|rate| {
        Arc::new(tokio::sync::Mutex::new(Pacer {
            rate: rate.max(1),
            credit: 0.0,
            updated: Instant::now(),
        }))
    });
    let mut outcome = Ok(());
    let mut suspended = suspended;
    'run: loop {
        while let Some(action) = primary.poll_action() {
            match action {
                PrimaryAction::Connect => {
                    generation += 1;
                    if primary.comparison_owed() && !resync_announced {
                        resync_announced = true;
                        let reason = match &config.tracking {
                            Tracking::Lost(reason) => Some(reason.clone()),
                            Tracking::New | Tracking::Vouches => None,
                        };
                        events::send(
                            listeners,
                            &config.vm,
                            ReplicationEvent::ResyncStarted { reason },
                        );
                    }
                    let task = ConnectTask {
                        dialer: dialer.clone(),
                        generation,
                        events: events.clone(),
                        resync: primary.comparison_owed().then(|| Arc::clone(&vm)),
                        vm_name: config.vm.clone(),
                        progress: Arc::clone(&progress),
                        window: resync_window,
                    };
                    tokio::spawn(task.run());
                }
                PrimaryAction::Send(message) => {
                    if let Some(link) = &link {
                        let _ = link.control.send(message);
                    }
                }
                PrimaryAction::SendChunk { delta, index } => {
                    if let Some(link) = &link {
                        let _ = link.chunks.send((delta, index));
                    }
                }
                PrimaryAction::Cut {
                    delta,
                    kind,
                    app_consistent,
                } => {
                    let vm = Arc::clone(&vm);
                    let events = events.clone();
                    let hook = consistency_hook.clone().filter(|_| app_consistent);
                    tokio::task::spawn_blocking(move || {
                        let (outcome, app_consistent) = match hook {
                            Some(hook) => hook.around(|| vm.prepare(delta, kind)),
                            None => (vm.prepare(delta, kind), false),
                        };
                        let _ = events.send(Event::Prepared {
                            delta,
                            outcome,
                            app_consistent,
                        });
                    });
                }
                PrimaryAction::Acknowledged { delta, kind } => {
                    tracing::info!(vm = %config.vm, %delta, ?kind, "applied on the replica");
                    // Awaited: the cut that often follows at once must not start before
                    // tracking has forgotten this delta and its spool is gone.
                    let vm = Arc::clone(&vm);
                    let acknowledged = tokio::task::spawn_blocking(move || {
                        vm.acknowledge(delta).and_then(|()| vm.caught_up())
                    })
                    .await;
                    if let Ok(Err(error)) = acknowledged {
                        tracing::error!(%error, "cannot record an acknowledged delta; its changes ship again");
                    }
                }
                PrimaryAction::Disconnect { reason } => {
                    tracing::warn!(replica = %peer, %reason, "dropping the connection");
                    if let Some(link) = link.take() {
                        link.connection.close(1u32.into(), reason.as_bytes());
                    }
                    primary.connection_lost(Instant::now(), &reason);
                }
                PrimaryAction::Failed { reason } => {
                    events::send(
                        listeners,
                        &config.vm,
                        ReplicationEvent::Failed {
                            reason: reason.clone(),
                        },
                    );
                    tracing::error!(replica = %peer, %reason, "replication stopped");
                    if let Some(done) = handover_done.take() {
                        let _ = done.send(Err(if handover_requested {
                            HandoverFailure::Unknown(reason.clone())
                        } else {
                            HandoverFailure::NotHandedOver(reason.clone())
                        }));
                    }
                    outcome = Err(Error::Replication {
                        peer: peer.clone(),
                        problem: reason,
                    });
                    break 'run;
                }
                PrimaryAction::HandoverRefused { reason } => {
                    events::send(
                        listeners,
                        &config.vm,
                        ReplicationEvent::HandoverRefused {
                            reason: reason.clone(),
                        },
                    );
                    tracing::error!(vm = %config.vm, %reason, "the planned failover was refused; replication goes on");
                    handover_requested = false;
                    if let Some(done) = handover_done.take() {
                        let _ = done.send(Err(HandoverFailure::NotHandedOver(reason)));
                    }
                }
                PrimaryAction::Resync { reason } => {
                    tracing::warn!(vm = %config.vm, %reason, "resynchronizing: comparing the disks on the next connection");
                    if let Some(link) = link.take() {
                        link.connection.close(0u32.into(), b"resynchronizing");
                    }
                    primary.connection_lost(Instant::now(), &reason);
                }
                PrimaryAction::Verify { sequence } => {
                    tracing::info!(vm = %config.vm, sequence, "final delta applied; comparing the disks");
                    let vm = Arc::clone(&vm);
                    let events = events.clone();
                    let before = before_take_over.clone();
                    let name = config.vm.clone();
                    tokio::task::spawn_blocking(move || {
                        let outcome = crate::resync::random_seed()
                            .and_then(|seed| vm.digests(seed).map(|digests| (seed, digests)))
                            .and_then(|verified| match &before {
                                Some(before) => {
                                    before(sequence).map(|()| verified).map_err(|problem| {
                                        Error::Replication {
                                            peer: name,
                                            problem,
                                        }
                                    })
                                }
                                None => Ok(verified),
                            });
                        let _ = events.send(Event::Verified { sequence, outcome });
                    });
                }
                PrimaryAction::HandedOver { sequence } => {
                    events::send(
                        listeners,
                        &config.vm,
                        ReplicationEvent::HandedOver { sequence },
                    );
                    tracing::info!(vm = %config.vm, sequence, "planned failover done: the replica site runs the VM");
                    if let Some(done) = handover_done.take() {
                        let _ = done.send(Ok(sequence));
                    }
                    ending = Ending::HandedOver { sequence };
                    break 'run;
                }
                PrimaryAction::Reversed { applied, resync } => {
                    events::send(
                        listeners,
                        &config.vm,
                        ReplicationEvent::Reversed { applied, resync },
                    );
                    tracing::warn!(vm = %config.vm, applied, resync, "the VM runs at the replica's site: becoming its replica");
                    if let Some(link) = link.take() {
                        drop(link.control);
                        ending = Ending::Reversed {
                            connection: PeerConnection(link.connection),
                            applied,
                            resync,
                        };
                    }
                    break 'run;
                }
            }
        }
        publish(
            &report,
            &primary,
            &config,
            &peer,
            &wire_bytes,
            disk_bytes,
            last_resync,
            primary.comparison_owed().then(|| progress.report()),
        );
        if listeners.is_some() {
            for event in status_events.observe(&primary.status(Instant::now())) {
                events::send(listeners, &config.vm, event);
            }
        }
        let deadline = primary.poll_timeout();
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let suspension = async {
            match &mut suspended {
                Some(receiver) => match receiver.changed().await {
                    Ok(()) => Some(*receiver.borrow()),
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let command = async {
            match &mut commands {
                Some(receiver) => match receiver.recv().await {
                    Some(command) => command,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let source_change = async {
            match &mut source_changes {
                Some(receiver) => match receiver.changed().await {
                    Ok(()) => (),
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        // While disks are compared, the status is refreshed every second for its progress.
        let comparing = primary.comparison_owed();
        let refresh = async {
            if comparing {
                tokio::time::sleep(Duration::from_secs(1)).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = sleep => primary.handle_timeout(Instant::now()),
            () = refresh => {}
            () = source_change => primary.source_changed(),
            command = command => match command {
                PrimaryCommand::Resync => {
                    tracing::info!(vm = %config.vm, "resynchronization asked for: comparing the disks on the next connection");
                    primary.owe_comparison();
                    if let Some(link) = link.take() {
                        link.connection.close(0u32.into(), b"resynchronizing");
                        primary.connection_lost(Instant::now(), "resynchronizing");
                    }
                }
                PrimaryCommand::Verify { done } => match &dialer {
                    Dialer::Dial { endpoint, replica } => {
                        let (endpoint, replica, vm, name, progress) = (endpoint.clone(), *replica, Arc::clone(&vm), config.vm.clone(), Arc::clone(&progress));
                        tokio::spawn(async move {
                            let _ = done.send(verify_over_new_connection(&endpoint.0, replica, &vm, &name, &progress).await);
                        });
                    }
                    Dialer::Incoming(_) => {
                        let _ = done.send(Err("verify runs on the VM's first host".into()));
                    }
                },
                PrimaryCommand::HandOver { reverse, done, before_take_over: before } => {
                    match primary.hand_over(Instant::now(), reverse) {
                        Ok(()) => {
                            tracing::info!(vm = %config.vm, reverse, "planned failover: shipping the final delta");
                            handover_done = Some(done);
                            before_take_over = before;
                        }
                        Err(reason) => {
                            let _ = done.send(Err(HandoverFailure::NotHandedOver(reason)));
                        }
                    }
                }
            },
            Some(paused) = suspension => {
                tracing::info!(vm = %config.vm, paused, "replication {}", if paused { "suspended" } else { "resumed" });
                primary.suspend(Instant::now(), paused);
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break 'run;
                }
            }
            Some(event) = inbox.recv() => {
                let now = Instant::now();
                match event {
                    Event::Connected { generation: this, connection, control, incoming } => {
                        if this != generation {
                            connection.close(0u32.into(), b"superseded");
                            continue;
                        }
                        tracing::info!(replica = %peer, "connected");
                        link = Some(start_link(this, connection, control, incoming, &vm, &events, streams, pacer.clone(), &wire_bytes));
                        primary.connected(now);
                    }
                    Event::Resynchronized(this, _) if this != generation => {
                        // A comparison of a connection given up on: the next one compares.
                    }
                    Event::Resynchronized(_, summary) => {
                        resync_announced = false;
                        events::send(
                            listeners,
                            &config.vm,
                            ReplicationEvent::ResyncFinished { summary },
                        );
                        match summary {
                            None => {
                                tracing::info!(vm = %config.vm, "the replica holds no copy to compare with: initial replication");
                                primary.nothing_to_compare();
                            }
                            Some(summary) => {
                                tracing::info!(vm = %config.vm, compared = summary.compared_bytes, differing = summary.differing_bytes, "resynchronization compared the disks; what differs ships with the next delta");
                                // Owed until the replica welcomes this connection: a link lost in
                                // between compares again (the machine keeps that).
                                primary.resynchronized();
                                last_resync = Some(summary);
                                if let Some(done) = &resync {
                                    done(summary);
                                }
                            }
                        }
                    }
                    Event::Verified { sequence, outcome } => match outcome {
                        Ok((seed, digests)) => {
                            handover_requested = handover_done.is_some();
                            primary.verified(sequence, seed, digests);
                        }
                        Err(error) => {
                            let reason = format!("cannot prepare the handover: {error}");
                            tracing::error!(%reason);
                            // Only a handover still asked for ends here; one called off
                            // meanwhile has already been answered.
                            if let Some(done) = handover_done.take() {
                                let _ = done.send(Err(HandoverFailure::NotHandedOver(reason.clone())));
                                primary.verify_failed(Instant::now(), reason.clone());
                            }
                        }
                    },
                    Event::ConnectFailed { reason, permanent } => {
                        if permanent {
                            tracing::error!(replica = %peer, %reason, "the replica refused this primary's identity, or this primary refused the replica's; not retrying");
                            outcome = Err(Error::AuthenticationRefused { peer: peer.clone(), reason: reason.clone() });
                        } else {
                            tracing::warn!(replica = %peer, %reason, "cannot reach the replica; retrying");
                        }
                        primary.connect_failed(now, &reason, permanent);
                        if permanent {
                            break 'run;
                        }
                    }
                    Event::Message { generation: this, message } => {
                        // What a link sent before it was dropped (for a resync, say) is stale.
                        if this == generation && link.is_some() {
                            if let Message::Welcome { applied, staged: Some(staged), .. } = &message {
                                let chunks: u64 = staged.received.iter().map(|range| u64::from(range.end - range.start)).sum();
                                tracing::info!(replica = %peer, applied, delta = %staged.delta, chunks, "resuming: the replica already holds these chunks of the delta in flight");
                            }
                            primary.handle_message(now, message);
                        }
                    }
                    Event::Lost { generation: this, reason, permanent } => {
                        if this == generation && link.is_some() {
                            link = None;
                            if permanent {
                                tracing::error!(replica = %peer, %reason, "authentication refused; not retrying");
                                outcome = Err(Error::AuthenticationRefused { peer: peer.clone(), reason: reason.clone() });
                                primary.connect_failed(now, &reason, true);
                                break 'run;
                            }
                            tracing::warn!(replica = %peer, %reason, "connection lost; resuming after reconnecting");
                            primary.connection_lost(now, &reason);
                        }
                    }
                    Event::ChunkFailed { reason } => {
                        tracing::error!(replica = %peer, %reason, "replication stopped");
                        outcome = Err(Error::Replication { peer: peer.clone(), problem: reason });
                        break 'run;
                    }
                    Event::Prepared { delta, outcome, app_consistent } => match outcome {
                        Ok(chunk_bytes) => {
                            disk_bytes += chunk_bytes.iter().sum::<u64>();
                            tracing::debug!(%delta, chunks = chunk_bytes.len(), app_consistent, "delta prepared");
                            primary.delta_ready(now, delta, chunk_bytes, app_consistent);
                        }
                        Err(error) => {
                            tracing::error!(%delta, %error, "cannot prepare the delta; its changes ship with the next");
                            primary.delta_failed(now, delta, &error.to_string());
                        }
                    },
                }
            }
        }
    }
    // A handover cut short by the end (stopped, or the VM taken over elsewhere) is neither
    // done nor refused here: the asker hears the channel close, and does not resume writes
    // before it knows where the VM runs.
    drop(handover_done.take());
    if matches!(ending, Ending::Stopped) {
        primary.stop();
        while let Some(action) = primary.poll_action() {
            if let (PrimaryAction::Send(message), Some(link)) = (action, &link) {
                let _ = link.control.send(message);
            }
        }
    }
    publish(
        &report,
        &primary,
        &config,
        &peer,
        &wire_bytes,
        disk_bytes,
        last_resync,
        None,
    );
    if let Some(link) = link {
        // The goodbye is delivered before the close.
        drop(link.control);
        let _ = link.control_writer.await;
        link.connection.close(0u32.into(), b"goodbye");
    }
    if let Dialer::Dial { endpoint, .. } = &dialer
        && !matches!(ending, Ending::Reversed { .. })
    {
        tokio::time::timeout(Duration::from_secs(2), endpoint.0.wait_idle())
            .await
            .ok();
    }
    outcome.map(|()| ending)
}

/// What the other site says when a host that held a VM's copy connects: what to do next
/// (the engine's reading of the answer, `protect::after_handover`), and the connection to
/// serve as the VM's replica when that is what to do.
#[derive(Debug)]
pub struct Greeting {
    pub next: AfterHandover,
    pub connection: Option<PeerConnection>,
}

/// Connects to the other site and introduces the VM (`hello`, a `Message::Hello`): how a
/// host whose VM may run at the other site learns who runs it.
pub async fn greet(
    endpoint: &ClientEndpoint,
    replica: SocketAddr,
    hello: &Message,
) -> std::result::Result<Greeting, String> {
    let (connection, mut send, mut receive) = open_session(&endpoint.0, replica).await?;
    write_message(&mut send, hello)
        .await
        .map_err(|error| error.to_string())?;
    let answer = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut receive))
        .await
        .map_err(|_| "no answer to hello".to_owned())?
        .map_err(|error| error.to_string())?
        .ok_or("the other site closed the session without an answer")?;
    let next = after_handover(&answer);
    let connection = match next {
        AfterHandover::BecomeReplica { .. } => Some(PeerConnection(connection)),
        _ => {
            connection.close(0u32.into(), b"answered");
            None
        }
    };
    Ok(Greeting { next, connection })
}

/// A connection of its own to the replica server and its first stream, for a short exchange
/// beside replication's (a greeting, a verification).
async fn open_session(
    endpoint: &quinn::Endpoint,
    replica: SocketAddr,
) -> std::result::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
    let connection = endpoint
        .connect(replica, "blockrep-replica")
        .map_err(|error| format!("cannot connect: {error}"))?
        .await
        .map_err(|error| error.to_string())?;
    let (send, receive) = connection
        .open_bi()
        .await
        .map_err(|error| error.to_string())?;
    Ok((connection, send, receive))
}

/// Verification on a connection of its own, beside replication's.
async fn verify_over_new_connection(
    endpoint: &quinn::Endpoint,
    replica: SocketAddr,
    vm: &Arc<ProtectedVm>,
    name: &str,
    progress: &Arc<resync::Progress>,
) -> std::result::Result<crate::resync::Verification, String> {
    let (connection, mut control, mut incoming) = open_session(endpoint, replica).await?;
    let outcome = resync::verify(vm, name, &mut control, &mut incoming, progress)
        .await
        .map_err(|error| error.to_string());
    connection.close(0u32.into(), b"verified");
    outcome
}

/// How connections are made: dialled, or handed over by the server they came in on.
#[derive(Clone)]
enum Dialer {
    Dial {
        endpoint: ClientEndpoint,
        replica: SocketAddr,
    },
    Incoming(Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<PeerConnection>>>),
}

/// Makes one connection, compares the disks by hash first when asked, and reports.
struct ConnectTask {
    dialer: Dialer,
    generation: u64,
    events: mpsc::UnboundedSender<Event>,
    /// The VM, when a resynchronization is owed.
    resync: Option<Arc<ProtectedVm>>,
    vm_name: String,
    progress: Arc<resync::Progress>,
    window: Option<crate::units::TimeWindow>,
}

impl ConnectTask {
    async fn run(self) {
        let event = match self.connect().await {
            Ok((connection, control, incoming)) => Event::Connected {
                generation: self.generation,
                connection,
                control,
                incoming,
            },
            Err((reason, permanent)) => Event::ConnectFailed { reason, permanent },
        };
        let _ = self.events.send(event);
    }

    async fn connect(
        &self,
    ) -> std::result::Result<
        (quinn::Connection, quinn::SendStream, quinn::RecvStream),
        (String, bool),
    > {
        if let (Some(_), Some(window)) = (&self.resync, &self.window)
            && !window.contains_now()
        {
            return Err((
                format!("resynchronization required: it waits for its window {window}"),
                false,
            ));
        }
        let connection = match &self.dialer {
            Dialer::Dial { endpoint, replica } => {
                let connecting = endpoint
                    .0
                    .connect(*replica, "blockrep-replica")
                    .map_err(|error| (format!("cannot connect: {error}"), false))?;
                connecting
                    .await
                    .map_err(|error| (error.to_string(), is_authentication_failure(&error)))?
            }
            Dialer::Incoming(connections) => {
                let next = connections.lock().await.recv().await;
                next.ok_or_else(|| ("the server stopped".to_owned(), true))?
                    .0
            }
        };
        let (mut control, mut incoming) = connection
            .open_bi()
            .await
            .map_err(|error| (error.to_string(), is_authentication_failure(&error)))?;
        if let Some(vm) = &self.resync {
            let summary = resync::compare(
                vm,
                &self.vm_name,
                &mut control,
                &mut incoming,
                &self.progress,
            )
            .await
            .map_err(|error| {
                // A peer that refused this primary's identity closes the connection as soon
                // as it is used: that is final, not a resynchronization to retry.
                if let Some(reason) = connection.close_reason()
                    && is_authentication_failure(&reason)
                {
                    return (reason.to_string(), true);
                }
                connection.close(1u32.into(), b"resynchronization failed");
                (format!("resynchronization failed: {error}"), false)
            })?;
            let _ = self
                .events
                .send(Event::Resynchronized(self.generation, summary));
        }
        Ok((connection, control, incoming))
    }
}

fn network(peer: &str, problem: impl Into<String>) -> Error {
    Error::Network {
        peer: peer.to_owned(),
        problem: problem.into(),
    }
}

#[allow(clippy::too_many_arguments)]
fn publish(
    report: &SharedReport,
    primary: &Primary,
    config: &PrimaryConfig,
    peer: &str,
    wire_bytes: &AtomicU64,
    disk_bytes: u64,
    resync: Option<ResyncSummary>,
    resynchronizing: Option<Option<resync::ProgressReport>>,
) {
    let now = Instant::now();
    let mut status = primary.status(now);
    if resynchronizing.is_some() && status.state != ReplicationState::Stopped {
        status.state = ReplicationState::ResynchronizationRequired;
    }
    let entry = PrimaryReport {
        vm: config.vm.clone(),
        replica: peer.to_owned(),
        seconds_since_replication: status
            .last_replication
            .map(|at| now.saturating_duration_since(at).as_secs_f64()),
        last_replication_unix_seconds: status.last_replication.and_then(|at| {
            let ago = now.saturating_duration_since(at);
            std::time::SystemTime::now()
                .checked_sub(ago)?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|since| since.as_secs_f64())
        }),
        average_latency_seconds: status.average_latency.as_secs_f64(),
        last_delta_latency_seconds: status.last_delta_latency.as_secs_f64(),
        bytes_before_compression: disk_bytes,
        bytes_after_compression: wire_bytes.load(Ordering::Relaxed),
        resync,
        resynchronizing: resynchronizing.flatten(),
        status,
    };
    *report
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(entry);
}

/// Starts the tasks of a new connection: the control writer and reader, the chunk senders,
/// and a watcher that reports the connection's end.
#[allow(clippy::too_many_arguments)]
fn start_link(
    generation: u64,
    connection: quinn::Connection,
    control: quinn::SendStream,
    mut incoming: quinn::RecvStream,
    vm: &Arc<ProtectedVm>,
    events: &mpsc::UnboundedSender<Event>,
    streams: usize,
    pacer: Option<Arc<tokio::sync::Mutex<Pacer>>>,
    wire_bytes: &Arc<AtomicU64>,
) -> Link {
    let (control_sender, control_writer) = spawn_control_writer(control);
    let reader_events = events.clone();
    tokio::spawn(async move {
        loop {
            match read_frame(&mut incoming).await {
                Ok(Some(message)) => {
                    if reader_events
                        .send(Event::Message {
                            generation,
                            message,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(%error, "control stream ended");
                    return;
                }
            }
        }
    });
    let watcher = connection.clone();
    let watcher_events = events.clone();
    tokio::spawn(async move {
        let error = watcher.closed().await;
        let _ = watcher_events.send(Event::Lost {
            generation,
            permanent: is_authentication_failure(&error),
            reason: error.to_string(),
        });
    });
    let (chunk_sender, chunk_queue) = mpsc::unbounded_channel::<(DeltaId, u32)>();
    let chunk_queue = Arc::new(tokio::sync::Mutex::new(chunk_queue));
    for _ in 0..streams.max(1) {
        let queue = Arc::clone(&chunk_queue);
        let connection = connection.clone();
        let vm = Arc::clone(vm);
        let pacer = pacer.clone();
        let wire_bytes = Arc::clone(wire_bytes);
        let chunk_events = events.clone();
        tokio::spawn(async move {
            let mut stream: Option<quinn::SendStream> = None;
            let mut encoder = Some(DeltaEncoder::new());
            loop {
                let next = queue.lock().await.recv().await;
                let Some((delta, index)) = next else {
                    break;
                };
                let vm = Arc::clone(&vm);
                let mut taken = encoder.take().unwrap_or_default();
                let read = tokio::task::spawn_blocking(move || {
                    let chunk = vm.chunk(delta, index, &mut taken);
                    (chunk, taken)
                })
                .await;
                let (disk, payload) = match read {
                    Ok((Ok(chunk), returned)) => {
                        encoder = Some(returned);
                        chunk
                    }
                    Ok((Err(error), _)) => {
                        let _ = chunk_events.send(Event::ChunkFailed {
                            reason: format!("cannot read chunk {index} of {delta}: {error}"),
                        });
                        break;
                    }
                    Err(_) => break,
                };
                if let Some(pacer) = &pacer {
                    let delay = pacer.lock().await.delay_for(payload.len() as u64);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                if stream.is_none() {
                    match connection.open_uni().await {
                        Ok(opened) => stream = Some(opened),
                        Err(_) => break,
                    }
                }
                let Some(open) = stream.as_mut() else {
                    break;
                };
                let prefix = chunk_frame_prefix(delta, index, disk, payload.len());
                let length = (prefix.len() + payload.len()) as u64;
                if open.write_all(&prefix).await.is_err() || open.write_all(&payload).await.is_err()
                {
                    break;
                }
                wire_bytes.fetch_add(length, Ordering::Relaxed);
            }
            if let Some(mut stream) = stream {
                let _ = stream.finish();
            }
        });
    }
    Link {
        connection,
        control: control_sender,
        control_writer,
        chunks: chunk_sender,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_holds_bytes_to_the_rate_after_a_small_burst() {
        let mut pacer = Pacer {
            rate: 1_000_000,
            credit: 0.0,
            updated: Instant::now(),
        };
        // No credit yet: a megabyte waits about a second.
        let first = pacer.delay_for(1_000_000);
        assert!(
            first > Duration::from_millis(900) && first <= Duration::from_millis(1000),
            "{first:?}"
        );
        // Debt accumulates: the next megabyte waits about two seconds from now.
        let second = pacer.delay_for(1_000_000);
        assert!(second > Duration::from_millis(1900), "{second:?}");
    }
}
