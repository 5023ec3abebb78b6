//! The simulated deployment and its event loop. Each VM's primary runs the engine's own
//! `Primary` state machine over a real `ProtectedVm` (tracking, journals, spooled deltas); each
//! replica host runs the engine's `ReplicaSite` (its `Replica` machine and a real `ReplicaStore`). Their files live
//! in a scratch directory, and every image and journal store is opened through the host's
//! fault layer. Only time, the network and the guests are simulated: messages cross links
//! with the sizes the wire encoding gives them, and disks take time to apply what they stage.
//!
//! Here: the world's state and its event loop. Beside it: `hosts`, `links`, `primary_side`,
//! `replica_side` (what the engine's machines ask, carried out), `faults` (the scenario's
//! events), `failover`, `resync`, `integrity` (bit flips, verification) and `checks`.

mod checks;
mod failover;
mod faults;
mod handover;
mod hosts;
mod integrity;
mod links;
mod primary_side;
mod replica_side;
mod resync;

use crate::agenda::{Agenda, SimTime};
use crate::check::{Checker, Observation, Violation};
use crate::content::{DiskModel, PAGE, Versions, first_difference};
use crate::faulty::HostDisks;
use crate::network::{Delivery, IDLE_TIMEOUT, Link, LinkSpec};
use crate::random::Random;
use crate::report::{HealthChange, Percentiles, Report, VmReport};
use crate::scenario::{Action, Scenario};
use crate::trace::Trace;
use crate::workload::Workload;
use blockrep::delta::{Compression, DeltaEncoder};
use blockrep::image::RawImage;
use blockrep::io::{FileStorage, StorageOptions};
use blockrep::protect::ProtectedVm;
use blockrep::proto::{
    ConnectionId, DeltaId, DeltaKind, Health, Message, Primary, PrimaryAction, PrimaryConfig,
    Replica, Tracking,
};
use blockrep::replica::{PointPolicy, ReplicaStore, SiteEffect, VmReplica, WallClock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How fast a simulated disk applies what a replica staged, and reads what is hashed.
const DISK_BYTES_PER_SECOND: f64 = 400e6;
/// Every commit costs at least this much (flushes, the catalogue's rename).
const COMMIT_FLOOR: Duration = Duration::from_millis(2);
/// A connection attempt to a host that does not answer gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Unix time at which every run starts, so recovery points get the same times each run.
const EPOCH_SECONDS: f64 = 1_800_000_000.0;
/// Pages besides the changed ones checked at each acknowledged delta, in turn, so that damage
/// anywhere on a replica is found within a few hours.
const SAMPLED_PAGES: u64 = 32;
/// Guests put their writes on their disks and flush every so many seconds (and before each
/// cut); a crash loses what they wrote since, as a guest's own cache would.
const GUEST_FLUSH_SECONDS: u64 = 5;
/// How often RPO and health are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// What a run is asked to do.
pub struct RunOptions {
    pub seed: u64,
    pub duration: Duration,
    /// Called every simulated minute with the time reached and the end.
    pub progress: Option<Box<dyn FnMut(SimTime, SimTime)>>,
}

#[derive(Debug)]
enum Event {
    /// A second of every VM's guest writes.
    Workload,
    Wake {
        vm: usize,
    },
    Connected {
        connection: ConnectionId,
    },
    ConnectFailed {
        vm: usize,
        side: u64,
        reason: &'static str,
    },
    ToReplica {
        connection: ConnectionId,
        message: Message,
        sent: SimTime,
    },
    ToPrimary {
        connection: ConnectionId,
        message: Message,
        sent: SimTime,
    },
    /// The replica's disk finished applying a delta.
    Applied {
        vm: usize,
        host: usize,
        incarnation: u64,
        delta: DeltaId,
        kind: DeltaKind,
        app_consistent: bool,
    },
    /// The peer of a connection went silent: the side on `host` notices.
    PeerLost {
        connection: ConnectionId,
        replica_side: bool,
    },
    Scheduled(Action),
    HostRestart {
        host: usize,
        generation: u64,
    },
    /// An armed crash that has not struck by now (the host did no I/O) strikes anyway.
    ForceCrash {
        host: usize,
        incarnation: u64,
    },
    /// A VM that could not start tries again.
    RetryVm {
        vm: usize,
        incarnation: u64,
    },
    /// A host that recorded a handover asks the other site again who runs the VM.
    AskWhoRuns {
        vm: usize,
        host: usize,
        incarnation: u64,
    },
    DiskSpace {
        host: usize,
        full: bool,
    },
    Sample,
}

impl Event {
    /// A number per kind, for the trace.
    fn code(&self) -> u64 {
        match self {
            Event::Workload => 1,
            Event::Wake { .. } => 2,
            Event::Connected { .. } => 3,
            Event::ConnectFailed { .. } => 4,
            Event::ToReplica { .. } => 5,
            Event::ToPrimary { .. } => 6,
            Event::Applied { .. } => 7,
            Event::PeerLost { .. } => 8,
            Event::Scheduled(_) => 9,
            Event::HostRestart { .. } => 10,
            Event::DiskSpace { .. } => 11,
            Event::Sample => 12,
            Event::ForceCrash { .. } => 13,
            Event::RetryVm { .. } => 14,
            Event::AskWhoRuns { .. } => 15,
        }
    }
}

/// Which way a message crosses a connection.
#[derive(Debug, Clone, Copy)]
enum Way {
    ToReplica { ordered: bool },
    ToPrimary,
}

struct Connection {
    vm: usize,
    link: usize,
    /// The incarnations of the two hosts it joins: a crash ends it.
    /// The primary that opened it.
    primary_side: u64,
    /// The host of the replica it reaches, and that host's incarnation: a failover that
    /// swaps the roles does not redirect it.
    replica_host: usize,
    replica_incarnation: u64,
    /// When either side ended it: messages sent before still arrive, as QUIC delivers what
    /// was queued before a close.
    closed_at: Option<SimTime>,
    /// Arrival of the last control message each way (control streams are ordered).
    last_to_replica: SimTime,
    last_to_primary: SimTime,
}

impl Connection {
    fn open(&self) -> bool {
        self.closed_at.is_none()
    }

    /// A message sent at `sent` is delivered.
    fn carries(&self, sent: SimTime) -> bool {
        self.closed_at.is_none_or(|closed| sent <= closed)
    }
}

struct HostRuntime {
    name: String,
    site: usize,
    disks: HostDisks,
    up: bool,
    /// When it last went down, and last came up.
    down_since: SimTime,
    up_since: SimTime,
    /// Raised at every crash.
    incarnation: u64,
    directory: PathBuf,
    /// How long the host stays down after a crash armed to strike mid-operation.
    down_for: Duration,
    /// It loses power again within the first storage steps of its next restart.
    crash_on_restart: bool,
    /// Its disk fills up in the middle of a commit (the next that writes enough).
    fill_at_commit: bool,
    /// It loses power at this step of its next planned failover.
    crash_at_handover: Option<crate::scenario::HandoverCrash>,
    /// Writes its last commit made.
    commit_writes: u64,
    store: Option<ReplicaStore>,
    /// The replicas this host keeps, by VM.
    slots: BTreeMap<usize, Slot>,
    crashes: u64,
    /// Faults on the host excuse its VMs' recovery point objective until then.
    disturbed_until: SimTime,
    /// Disk-full periods in force.
    full_periods: u32,
    /// Raised whenever a restart is scheduled: only the latest one happens.
    restart_generation: u64,
}

struct Slot {
    machine: Replica,
    replica: VmReplica,
    staged_bytes: u64,
    /// Its block hashes for the comparison in progress, until the primary asks for pieces.
    hashes: Option<Vec<blockrep::resync::BlockHashes>>,
}

impl Slot {
    /// The VM's machine and store, for a step that decides with both.
    fn replica_site(&mut self) -> blockrep::replica::ReplicaSite<'_> {
        blockrep::replica::ReplicaSite::new(&mut self.machine, &mut self.replica)
    }
}

struct PrimarySide {
    vm: ProtectedVm,
    machine: Primary,
    encoder: DeltaEncoder,
    connection: Option<ConnectionId>,
    /// Its host's incarnation when it started.
    incarnation: u64,
    /// Unique in the run: events meant for an earlier primary of the VM are told apart.
    side: u64,
    /// The comparison in progress on the current connection, and its seed.
    comparing: Option<(u64, blockrep::resync::exchange::Comparison)>,
}

/// A delta's cut: what the disks held then.
struct CutRecord {
    at: SimTime,
    kind: DeltaKind,
    versions: Vec<Versions>,
    /// Disk bytes the delta carries.
    bytes: u64,
}

struct VmRuntime {
    spec: crate::scenario::Vm,
    paths: Vec<PathBuf>,
    models: Vec<DiskModel>,
    workload: Workload,
    primary: Option<PrimarySide>,
    cuts: BTreeMap<u64, CutRecord>,
    /// The last delta checked on the replica, and the versions it held.
    verified: Option<Vec<Versions>>,
    /// The last delta the primary heard was applied, and the versions of its cut (`None` for
    /// an initial replication, which is read live and matches no single instant).
    acknowledged: Option<(u64, Option<Vec<Versions>>)>,
    /// The VM replicates (false after a failover, until reversed).
    replicating: bool,
    /// The recovery point the VM last failed over to.
    failed_over_at: Option<u64>,
    /// The VM's disk files on each host that has held them.
    homes: BTreeMap<usize, Vec<PathBuf>>,
    /// Replica pages (disk, page) a bit flip damaged, until a full check finds them repaired.
    flipped: std::collections::BTreeSet<(usize, u64)>,
    /// The site it was created at, whose networks are its own.
    origin_site: usize,
    /// A planned failover stopped the guest's writes.
    writes_stopped: bool,
    /// A planned failover in progress: the replica site took the VM over and runs it there,
    /// waiting for the old primary to hear so.
    taking_over: Option<PrimarySide>,
    /// The planned failover in progress replicates back at once.
    handover_reverse: bool,
    /// A host that lost power while it handed the VM over (its restart settles the
    /// handover), or that waits for the other site's answer.
    interrupted: Option<Interrupted>,
    /// The delta the planned failover in progress hands over at.
    handover_sequence: u64,
    /// Where the rotating check of unchanged pages goes on.
    sample_cursor: u64,
    /// The cut time of the newest delta the replica applied: its recovery point.
    recovery_point: Option<SimTime>,
    /// When the primary last heard a delta was applied.
    last_applied: SimTime,
    /// When its current primary started: health judges nothing from before.
    replication_started: SimTime,
    /// A changes delta was applied since the last initial replication.
    caught_up: bool,
    unreachable_since: Option<SimTime>,
    next_wake: Option<SimTime>,
    report: VmReport,
    rpo_samples: Vec<f64>,
    last_health: Option<Health>,
}

/// A handover a power cut interrupted, until the host settles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interrupted {
    host: usize,
    /// The handover asked for replication back.
    reverse: bool,
}

impl VmRuntime {
    /// The VM's disk files on `host`, if it has held them.
    fn home_paths(&self, host: usize) -> Option<Vec<PathBuf>> {
        self.homes.get(&host).cloned()
    }
}

pub struct World {
    scenario: Scenario,
    seed: u64,
    agenda: Agenda<Event>,
    random: Random,
    clock: Arc<AtomicU64>,
    /// Where the hosts' files are; its name differs from run to run, so it never reaches
    /// the trace or the report (`scrub`).
    scratch: tempfile::TempDir,
    hosts: Vec<HostRuntime>,
    vms: Vec<VmRuntime>,
    links: Vec<Link>,
    /// The link between each pair of sites, by site indexes.
    link_of: BTreeMap<(usize, usize), usize>,
    /// Outages excuse the VMs across a link from their recovery point objective until then.
    link_disturbed_until: BTreeMap<usize, SimTime>,
    connections: BTreeMap<ConnectionId, Connection>,
    next_connection: ConnectionId,
    trace: Trace,
    checker: Checker,
    faults: Vec<(SimTime, String)>,
    failovers: Vec<crate::report::FailoverReport>,
    verifications: Vec<crate::report::VerifyReport>,
    /// Where each clustered VM runs now.
    clustered_on: Vec<Option<usize>>,
    events: u64,
    /// Primaries started so far (their `side` numbers).
    sides: u64,
}

fn scratch_directory() -> std::io::Result<tempfile::TempDir> {
    // Memory-backed when the machine has it: the files are the engine's, not the subject.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("blockrep-sim-")
            .tempdir_in(shm)
    } else {
        tempfile::Builder::new().prefix("blockrep-sim-").tempdir()
    }
}

/// Why a run could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot make the simulation's scratch files: {0}")]
    Scratch(#[from] std::io::Error),
    #[error("{0}")]
    Engine(#[from] blockrep::Error),
    #[error("{0}")]
    Scenario(#[from] crate::ScenarioError),
}

impl World {
    pub fn new(scenario: Scenario, seed: u64) -> Result<World, SetupError> {
        let scratch = scratch_directory()?;
        let mut random = Random::new(seed);
        let clock = Arc::new(AtomicU64::new(0));
        let mut hosts = Vec::new();
        for (index, host) in scenario.hosts.iter().enumerate() {
            let directory = scratch.path().join(&host.name);
            std::fs::create_dir_all(&directory)?;
            let may_crash = scenario.events.iter().any(|event| match event.action {
                Action::CrashHost { host: crashed, .. } => crashed == index,
                Action::SiteOutage { site, .. } => site == host.site,
                _ => false,
            });
            hosts.push(HostRuntime {
                name: host.name.clone(),
                site: host.site,
                disks: HostDisks::new(random.fork(), may_crash),
                up: true,
                down_since: SimTime::ZERO,
                up_since: SimTime::ZERO,
                incarnation: 0,
                directory,
                down_for: Duration::from_secs(60),
                crash_on_restart: false,
                fill_at_commit: false,
                crash_at_handover: None,
                commit_writes: 0,
                store: None,
                slots: BTreeMap::new(),
                crashes: 0,
                disturbed_until: SimTime::ZERO,
                full_periods: 0,
                restart_generation: 0,
            });
        }
        let mut links = Vec::new();
        let mut link_of = BTreeMap::new();
        for (a, b, spec) in &scenario.links {
            link_of.insert((*a.min(b), *a.max(b)), links.len());
            links.push(Link::new(spec.clone(), (*a, *b), random.fork()));
        }
        let mut vms = Vec::new();
        for (index, spec) in scenario.vms.iter().enumerate() {
            let directory = hosts[spec.host].directory.join(&spec.name);
            std::fs::create_dir_all(&directory)?;
            let mut paths = Vec::new();
            let mut models = Vec::new();
            for (disk, size) in spec.disks.iter().enumerate() {
                let path = directory.join(format!("disk-{disk}.raw"));
                let storage = FileStorage::create(&path)?;
                RawImage::create(storage, &path.display().to_string(), *size)?;
                paths.push(path);
                models.push(DiskModel::new(
                    seed ^ (index as u64) << 32 ^ disk as u64,
                    *size,
                ));
            }
            let pages = models[0].pages();
            vms.push(VmRuntime {
                homes: BTreeMap::from([(spec.host, paths.clone())]),
                origin_site: hosts[spec.host].site,
                flipped: std::collections::BTreeSet::new(),
                workload: Workload::new(spec.workload.clone(), random.fork(), pages),
                report: VmReport::new(spec, &hosts[spec.host].name, &hosts[spec.replica_host].name),
                spec: spec.clone(),
                paths,
                models,
                primary: None,
                cuts: BTreeMap::new(),
                verified: None,
                acknowledged: None,
                replicating: true,
                failed_over_at: None,
                writes_stopped: false,
                taking_over: None,
                interrupted: None,
                handover_reverse: false,
                handover_sequence: 0,
                sample_cursor: 0,
                recovery_point: None,
                last_applied: SimTime::ZERO,
                replication_started: SimTime::ZERO,
                caught_up: false,
                unreachable_since: None,
                next_wake: None,
                rpo_samples: Vec::new(),
                last_health: None,
            });
        }
        let mut world = World {
            seed,
            agenda: Agenda::new(),
            random,
            clock,
            scratch,
            hosts,
            vms,
            links,
            link_of,
            link_disturbed_until: BTreeMap::new(),
            connections: BTreeMap::new(),
            next_connection: 1,
            trace: Trace::new(seed),
            checker: Checker::default(),
            faults: Vec::new(),
            failovers: Vec::new(),
            verifications: Vec::new(),
            clustered_on: scenario.clustered.iter().map(|vm| Some(vm.host)).collect(),
            events: 0,
            sides: 0,
            scenario,
        };
        for host in 0..world.hosts.len() {
            world.start_host(host)?;
        }
        for event in world.scenario.events.clone() {
            world.agenda.add(event.at, Event::Scheduled(event.action));
        }
        world.agenda.add(Duration::from_secs(1), Event::Workload);
        world.agenda.add(SAMPLE_EVERY, Event::Sample);
        Ok(world)
    }

    /// Runs the scenario to its end and reports.
    pub fn run(mut self, mut options: RunOptions) -> Report {
        let started = std::time::Instant::now();
        let end = options.duration;
        let mut next_progress = Duration::from_secs(60);
        while let Some(event) = self.agenda.next_until(end) {
            let now = self.agenda.now();
            self.clock.store(now.as_nanos() as u64, Ordering::Relaxed);
            self.events += 1;
            self.trace.event(now, event.code());
            self.handle(event);
            if now >= next_progress {
                next_progress = now + Duration::from_secs(60);
                if let Some(progress) = &mut options.progress {
                    progress(now, end);
                }
            }
            self.checker
                .bounded(now, self.agenda.waiting(), self.vms.len(), self.seed);
        }
        self.finish(started.elapsed(), end)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Workload => self.workload_second(),
            Event::Wake { vm } => self.wake(vm),
            Event::Connected { connection } => self.connected(connection),
            Event::ConnectFailed { vm, side, reason } => {
                let now = self.agenda.instant();
                if let Some(primary) = self.primary_of(vm, side) {
                    primary.machine.connect_failed(now, reason, false);
                    self.drive_primary(vm);
                }
            }
            Event::ToReplica {
                connection,
                message,
                sent,
            } => self.replica_receives(connection, message, sent),
            Event::ToPrimary {
                connection,
                message,
                sent,
            } => self.primary_receives(connection, message, sent),
            Event::Applied {
                vm,
                host,
                incarnation,
                delta,
                kind,
                app_consistent,
            } => self.apply(vm, host, incarnation, delta, kind, app_consistent),
            Event::PeerLost {
                connection,
                replica_side,
            } => self.peer_lost(connection, replica_side),
            Event::Scheduled(action) => self.fault(action),
            Event::HostRestart { host, generation } => {
                if generation != self.hosts[host].restart_generation || self.hosts[host].up {
                    return;
                }
                self.restart_host(host);
            }
            Event::RetryVm { vm, incarnation } => {
                let host = self.vms[vm].spec.host;
                if self.hosts[host].up
                    && self.hosts[host].incarnation == incarnation
                    && self.vms[vm].primary.is_none()
                {
                    self.start_or_ask(vm);
                }
            }
            Event::AskWhoRuns {
                vm,
                host,
                incarnation,
            } => {
                let asking = self.vms[vm]
                    .interrupted
                    .is_some_and(|interrupted| interrupted.host == host);
                if asking && self.hosts[host].up && self.hosts[host].incarnation == incarnation {
                    self.settle_after_restart(vm, host);
                }
            }
            Event::ForceCrash { host, incarnation } => {
                if self.hosts[host].incarnation == incarnation {
                    self.crash_host(host, "lost power");
                }
            }
            Event::DiskSpace { host, full } => {
                // Overlapping full periods: space returns when the last one ends.
                self.hosts[host].full_periods = self.hosts[host].full_periods.saturating_sub(1);
                if full {
                    self.hosts[host].disks.set_full(true);
                } else if self.hosts[host].full_periods == 0 {
                    self.hosts[host].disks.set_full(false);
                    self.hosts[host].fill_at_commit = false;
                    self.note_fault(format!("host {}: disk space back", self.hosts[host].name));
                }
            }
            Event::Sample => {
                self.sample();
                self.agenda.add_after(SAMPLE_EVERY, Event::Sample);
            }
        }
    }

    // ---- the guests ----

    // ---- the primary's driver ----

    // ---- the replica's driver ----

    // ---- the checks ----

    // ---- faults ----

    fn finish(mut self, real: Duration, end: SimTime) -> Report {
        let (mut violations, more_violations) = std::mem::take(&mut self.checker).into_violations();
        for violation in &mut violations {
            violation.what = self.scrub(&violation.what);
        }
        let faults: Vec<(SimTime, String)> = std::mem::take(&mut self.faults)
            .into_iter()
            .map(|(at, what)| (at, self.scrub(&what)))
            .collect();
        self.faults = faults;
        let mut failovers = std::mem::take(&mut self.failovers);
        for failover in &mut failovers {
            failover.problem = failover
                .problem
                .as_deref()
                .map(|problem| self.scrub(problem));
        }
        self.failovers = failovers;
        let scratch = self.scratch.path().to_string_lossy().into_owned();
        let mut vms = Vec::new();
        for runtime in &mut self.vms {
            let mut report = runtime.report.clone();
            report.failures = report
                .failures
                .iter()
                .map(|failure| failure.replace(&*scratch, "<scratch>"))
                .collect();
            report.rpo_seconds = Percentiles::of(&mut runtime.rpo_samples);
            report.compression_ratio = if report.wire_bytes > 0 {
                report.disk_bytes_shipped as f64 / report.wire_bytes as f64
            } else {
                0.0
            };
            report.final_state = match &runtime.primary {
                Some(primary) => {
                    format!("{:?}", primary.machine.status(self.agenda.instant()).state)
                }
                None => "host down".into(),
            };
            vms.push(report);
        }
        let links = self
            .links
            .iter()
            .map(|link| crate::report::LinkReport {
                ends: (
                    self.scenario.sites[link.ends.0].name.clone(),
                    self.scenario.sites[link.ends.1].name.clone(),
                ),
                bandwidth_bytes: link.spec.bandwidth,
                carried_per_minute: link.carried.clone(),
            })
            .collect();
        let hosts = self
            .hosts
            .iter()
            .map(|host| {
                let (lost, torn) = host.disks.losses();
                crate::report::HostReport {
                    name: host.name.clone(),
                    crashes: host.crashes,
                    unflushed_writes_lost: lost,
                    torn_writes: torn,
                }
            })
            .collect();
        Report {
            scenario: self.scenario.name.clone(),
            seed: self.seed,
            simulated_seconds: end.as_secs_f64(),
            real_seconds: real.as_secs_f64(),
            events: self.events,
            trace_hash: self.trace.finish(),
            vms,
            links,
            hosts,
            faults: self
                .faults
                .iter()
                .map(|(at, what)| (at.as_secs_f64(), what.clone()))
                .collect(),
            failovers: std::mem::take(&mut self.failovers),
            verifications: std::mem::take(&mut self.verifications),
            violations,
            more_violations,
            peak_memory_bytes: crate::report::peak_memory(),
        }
    }
}

fn message_code(message: &Message) -> u64 {
    match message {
        Message::Hello { .. } => 1,
        Message::Welcome { applied, .. } => 2 + (applied << 8),
        Message::Refused { .. } => 3,
        Message::DeltaBegin { delta, .. } => 4 + (delta.sequence << 8),
        Message::Chunk { index, .. } => 5 + (u64::from(*index) << 8),
        Message::ChunksStaged { .. } => 6,
        Message::DeltaEnd { delta } => 7 + (delta.sequence << 8),
        Message::Applied { delta } => 8 + (delta.sequence << 8),
        Message::Goodbye => 9,
        Message::Reverse { .. } => 10,
        Message::Handover { .. } => 11,
        Message::HandedOver { .. } => 12,
        Message::HashRequest { .. } => 13,
        Message::Hashes { .. } => 14,
        Message::GroupDigests { .. } => 15,
        Message::HashRanges { .. } => 16,
        Message::HashesDone => 17,
    }
}
