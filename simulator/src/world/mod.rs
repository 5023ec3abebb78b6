//! The simulated deployment and its event loop. Each VM's primary runs the engine's own
//! `Primary` state machine over a real `ProtectedVm` (tracking, journals, spooled deltas); each
//! replica host runs the engine's `Replica` machine over a real `ReplicaStore`. Their files live
//! in a scratch directory, and every image and journal store is opened through the host's
//! fault layer. Only time, the network and the guests are simulated: messages cross links
//! with the sizes the wire encoding gives them, and disks take time to apply what they stage.

mod failover;
mod integrity;
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
    /// Raised at every crash.
    incarnation: u64,
    directory: PathBuf,
    /// How long the host stays down after a crash armed to strike mid-operation.
    down_for: Duration,
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
    /// A comparison by hash is owed before the next hello.
    resync: bool,
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
                incarnation: 0,
                directory,
                down_for: Duration::from_secs(60),
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

    fn storage_options(&self, host: usize) -> StorageOptions {
        StorageOptions {
            engine: blockrep::io::IoEngine::Sync,
            direct: false,
            layer: Some(self.hosts[host].disks.layer()),
        }
    }

    /// Starts (or restarts) a host: its replica store, and the primaries of the VMs it runs.
    fn start_host(&mut self, host: usize) -> Result<(), blockrep::Error> {
        let options = self.storage_options(host);
        let clock = Arc::clone(&self.clock);
        let recovery_points = self
            .vms
            .iter()
            .filter(|vm| vm.spec.replica_host == host)
            .map(|vm| vm.spec.policy.recovery_points)
            .max()
            .unwrap_or(0);
        let store = ReplicaStore::with_policy(
            &self.hosts[host].directory.join("replicas"),
            options.clone(),
            PointPolicy {
                keep: recovery_points,
                interval: Duration::from_secs(3600),
            },
        )?
        .with_clock(WallClock::new(move || {
            EPOCH_SECONDS + clock.load(Ordering::Relaxed) as f64 / 1e9
        }));
        let runtime = &mut self.hosts[host];
        runtime.store = Some(store);
        runtime.up = true;
        for vm in 0..self.vms.len() {
            if self.vms[vm].spec.host == host {
                self.start_vm_or_retry(vm, &options);
            }
        }
        Ok(())
    }

    /// Starts a VM on its host; when its disks refuse (full), says so and tries again later,
    /// as a service manager restarting the agent would.
    fn start_vm_or_retry(&mut self, vm: usize, options: &StorageOptions) {
        if let Err(error) = self.run_vm(vm, options, false) {
            let name = self.vms[vm].spec.name.clone();
            self.note_fault(format!(
                "VM {name} cannot start ({error}); trying again in 30 s"
            ));
            let host = self.vms[vm].spec.host;
            let incarnation = self.hosts[host].incarnation;
            self.agenda
                .add_after(Duration::from_secs(30), Event::RetryVm { vm, incarnation });
        }
    }

    /// Starts the VM on its host over its disks (`fresh`: they have just become its own, so
    /// tracking starts afresh), replicating if it is protected.
    fn run_vm(
        &mut self,
        vm: usize,
        options: &StorageOptions,
        fresh: bool,
    ) -> Result<(), blockrep::Error> {
        let runtime = &mut self.vms[vm];
        if fresh {
            blockrep::protect::forget_tracking(&runtime.paths)?;
        }
        let compression = if runtime.spec.policy.compression {
            Compression::Lz4
        } else {
            Compression::Off
        };
        let protected = ProtectedVm::open(&runtime.paths, options, compression)?;
        // After a crash: what the guest had put on its disks without a flush since was kept,
        // lost or torn; the record follows what the disks hold.
        for (model, disk) in runtime.models.iter_mut().zip(protected.disks()) {
            let mut bytes = vec![0u8; PAGE as usize];
            for (page, durable) in model.take_unflushed() {
                disk.read_at(&mut bytes, page * PAGE)?;
                model.found_on_disk(page, &bytes, durable);
            }
        }
        let mut machine = self.new_primary(vm, &protected, protected.tracking().clone());
        if !self.vms[vm].replicating {
            machine.stop();
        }
        self.vms[vm].last_applied = self.agenda.now();
        self.vms[vm].replication_started = self.agenda.now();
        self.sides += 1;
        let side = self.sides;
        let runtime = &mut self.vms[vm];
        runtime.primary = Some(PrimarySide {
            vm: protected,
            machine,
            encoder: DeltaEncoder::new(),
            connection: None,
            incarnation: self.hosts[runtime.spec.host].incarnation,
            side,
            resync: false,
            comparing: None,
        });
        // Cuts newer than the last acknowledged one stay: the replica may hold one of them.
        runtime.next_wake = None;
        let interrupted = std::mem::take(&mut runtime.writes_stopped);
        runtime.handover_reverse = false;
        if interrupted {
            self.planned_failed(vm, "interrupted: the VM's host restarted".into());
        }
        self.drive_primary(vm);
        Ok(())
    }

    fn new_primary(&mut self, vm: usize, protected: &ProtectedVm, tracking: Tracking) -> Primary {
        let runtime = &self.vms[vm];
        let config = PrimaryConfig {
            vm: runtime.spec.name.clone(),
            primary: self.hosts[runtime.spec.host].name.clone(),
            disks: protected.descriptions().to_vec(),
            frequency: runtime.spec.policy.frequency,
            window: 32,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            tracking,
            seed: self.random.draw(),
            app_consistent_every: None,
        };
        let mut primary = Primary::new(config, self.agenda.instant());
        primary.remember_acknowledged(protected.acknowledged_delta());
        primary
    }

    /// Starts replicating a VM that runs at its replica's old site back to it (the replica
    /// holds a copy: no initial replication), comparing by hash first when `resync`.
    fn start_reverse_replication(&mut self, vm: usize, resync: bool) {
        let Some(primary) = self.vms[vm].primary.take() else {
            return;
        };
        let machine = self.new_primary(vm, &primary.vm, Tracking::Vouches);
        self.sides += 1;
        let side = self.sides;
        self.vms[vm].replicating = true;
        // Health counts from the start of this replication.
        self.vms[vm].last_applied = self.agenda.now();
        self.vms[vm].replication_started = self.agenda.now();
        let runtime = &mut self.vms[vm];
        runtime.primary = Some(PrimarySide {
            machine,
            connection: None,
            resync,
            side,
            comparing: None,
            ..primary
        });
        runtime.cuts.clear();
        runtime.next_wake = None;
        self.drive_primary(vm);
    }

    /// Turns the VM off where it runs: its connection ends, its disks close, and what its
    /// guest had not yet written is gone.
    fn stop_vm(&mut self, vm: usize) {
        if let Some(connection) = self.current_connection(vm) {
            self.close(connection, "the VM was turned off", false);
        }
        let runtime = &mut self.vms[vm];
        runtime.next_wake = None;
        for model in &mut runtime.models {
            model.forget_unwritten();
        }
        if let Some(primary) = runtime.primary.take() {
            let host = runtime.spec.host;
            if let Err(error) = primary.vm.close() {
                self.lost_host_io(host, &error.to_string());
            }
        }
    }

    /// Bytes a message takes on the wire. A chunk is its payload and a small header; encoding
    /// it only to measure it would copy a MiB a chunk. A refusal's text names files by their
    /// path in the scratch directory, which must not make one run's timing differ from another's.
    fn wire_size(&self, message: &Message) -> u64 {
        match message {
            Message::Chunk { payload, .. } => payload.len() as u64 + 32,
            Message::Refused { code, reason } => Message::Refused {
                code: *code,
                reason: self.scrub(reason),
            }
            .encode()
            .len() as u64,
            other => other.encode().len() as u64,
        }
    }

    /// `text` with the scratch directory's path replaced by a fixed name.
    fn scrub(&self, text: &str) -> String {
        text.replace(&*self.scratch.path().to_string_lossy(), "<scratch>")
    }

    fn violation(&mut self, vm: Option<usize>, what: String) {
        let now = self.agenda.now();
        let name = vm.map(|vm| self.vms[vm].spec.name.clone());
        self.checker
            .violation(Violation::new(now, self.seed, name.as_deref(), what));
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
                self.note_fault(format!("host {} restarts", self.hosts[host].name));
                if let Err(error) = self.start_host(host) {
                    let now = self.agenda.now();
                    self.checker.violation(Violation::new(
                        now,
                        self.seed,
                        None,
                        format!("host {} cannot restart: {error}", self.hosts[host].name),
                    ));
                }
            }
            Event::RetryVm { vm, incarnation } => {
                let host = self.vms[vm].spec.host;
                if self.hosts[host].up
                    && self.hosts[host].incarnation == incarnation
                    && self.vms[vm].primary.is_none()
                {
                    let options = self.storage_options(host);
                    self.start_vm_or_retry(vm, &options);
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
                let full = full || self.hosts[host].full_periods > 0;
                self.hosts[host].disks.set_full(full);
                if !full {
                    self.note_fault(format!("host {}: disk space back", self.hosts[host].name));
                }
            }
            Event::Sample => {
                self.sample();
                self.agenda.add_after(SAMPLE_EVERY, Event::Sample);
            }
        }
    }

    fn primary_of(&mut self, vm: usize, side: u64) -> Option<&mut PrimarySide> {
        self.vms[vm]
            .primary
            .as_mut()
            .filter(|primary| primary.side == side)
    }

    // ---- the guests ----

    fn workload_second(&mut self) {
        for vm in &mut self.vms {
            if vm.primary.is_some() && !vm.writes_stopped {
                let written = vm.workload.second(&mut vm.models[0]);
                vm.report.bytes_written += written;
            }
        }
        if self
            .agenda
            .now()
            .as_secs()
            .is_multiple_of(GUEST_FLUSH_SECONDS)
        {
            for vm in 0..self.vms.len() {
                self.write_guest(vm);
            }
        }
        self.agenda
            .add_after(Duration::from_secs(1), Event::Workload);
    }

    /// Puts what the guest wrote since the last time on its disks, through tracking, and
    /// flushes them (the guest's own flush, before a cut can see the writes).
    fn write_guest(&mut self, vm: usize) {
        let runtime = &mut self.vms[vm];
        let Some(primary) = &runtime.primary else {
            return;
        };
        let mut buffer = Vec::new();
        for (index, model) in runtime.models.iter_mut().enumerate() {
            let disk = &primary.vm.disks()[index];
            for (first, count) in model.take_unwritten() {
                buffer.resize((count * PAGE) as usize, 0);
                for (offset, page) in buffer.chunks_mut(PAGE as usize).enumerate() {
                    let number = first + offset as u64;
                    crate::content::page_bytes(
                        model.identity(),
                        number,
                        model.versions()[number as usize],
                        page,
                    );
                }
                if disk.write_at(&buffer, first * PAGE).is_ok() {
                    model.reached_disk(first, count);
                } else {
                    // The guest saw its write fail (a full disk): it never happened.
                    model.failed(first, count);
                    runtime.report.failed_writes += 1;
                }
            }
            if disk.flush().is_ok() {
                model.flushed();
            }
        }
    }

    // ---- the primary's driver ----

    fn wake(&mut self, vm: usize) {
        let now = self.agenda.now();
        if self.vms[vm].next_wake != Some(now) {
            return; // Superseded by an earlier wake.
        }
        self.vms[vm].next_wake = None;
        let instant = self.agenda.instant();
        if let Some(primary) = &mut self.vms[vm].primary {
            primary.machine.handle_timeout(instant);
            self.drive_primary(vm);
        }
    }

    /// Carries out what the primary asks until it asks nothing, then sets its next wake.
    fn drive_primary(&mut self, vm: usize) {
        loop {
            let Some(primary) = &mut self.vms[vm].primary else {
                return;
            };
            let Some(action) = primary.machine.poll_action() else {
                break;
            };
            self.trace.action(vm, primary_action_code(&action));
            self.primary_action(vm, action);
        }
        let Some(primary) = &self.vms[vm].primary else {
            return;
        };
        if let Some(timeout) = primary.machine.poll_timeout() {
            let at = self.agenda.time_of(timeout);
            let runtime = &mut self.vms[vm];
            if runtime.next_wake.is_none_or(|next| at < next) {
                runtime.next_wake = Some(at);
                self.agenda.add(at, Event::Wake { vm });
            }
        }
    }

    fn primary_action(&mut self, vm: usize, action: PrimaryAction) {
        let now = self.agenda.now();
        let instant = self.agenda.instant();
        match action {
            PrimaryAction::Connect => self.connect(vm),
            PrimaryAction::Send(message) => {
                if let Some(connection) = self.current_connection(vm) {
                    self.send(connection, message, Way::ToReplica { ordered: true });
                }
            }
            PrimaryAction::SendChunk { delta, index } => {
                let Some(connection) = self.current_connection(vm) else {
                    return;
                };
                let Some(primary) = &mut self.vms[vm].primary else {
                    return;
                };
                match primary.vm.chunk(delta, index, &mut primary.encoder) {
                    Ok((disk, payload)) => {
                        let message = Message::Chunk {
                            delta,
                            index,
                            disk,
                            payload,
                        };
                        self.send(connection, message, Way::ToReplica { ordered: false });
                    }
                    Err(error) => {
                        self.lost_host_io(self.vms[vm].spec.host, &error.to_string());
                    }
                }
            }
            PrimaryAction::Cut { delta, kind, .. } => {
                self.write_guest(vm);
                let runtime = &mut self.vms[vm];
                let versions = runtime
                    .models
                    .iter()
                    .map(|model| model.versions().clone())
                    .collect();
                let Some(primary) = &mut runtime.primary else {
                    return;
                };
                match primary.vm.prepare(delta, kind) {
                    Ok(chunk_bytes) => {
                        runtime.cuts.insert(
                            delta.sequence,
                            CutRecord {
                                at: now,
                                kind,
                                versions,
                                bytes: chunk_bytes.iter().sum(),
                            },
                        );
                        // Older cuts can no longer be acknowledged.
                        runtime
                            .cuts
                            .retain(|sequence, _| *sequence >= delta.sequence);
                        primary
                            .machine
                            .delta_ready(instant, delta, chunk_bytes, false);
                    }
                    Err(error) => {
                        let reason = error.to_string();
                        primary.machine.delta_failed(instant, delta, &reason);
                        self.lost_host_io(self.vms[vm].spec.host, &reason);
                    }
                }
            }
            PrimaryAction::Acknowledged { delta, kind } => {
                if let Some(primary) = &self.vms[vm].primary
                    && let Err(error) = primary
                        .vm
                        .acknowledge(delta)
                        .and_then(|()| primary.vm.caught_up())
                {
                    self.lost_host_io(self.vms[vm].spec.host, &error.to_string());
                }
                self.acknowledged(vm, delta, kind);
            }
            PrimaryAction::Disconnect { reason } => {
                if let Some(connection) = self.current_connection(vm) {
                    self.close(connection, &reason, false);
                }
                if let Some(primary) = &mut self.vms[vm].primary {
                    primary.connection = None;
                    primary.machine.connection_lost(instant, &reason);
                }
            }
            PrimaryAction::Failed { reason } => {
                self.vms[vm]
                    .report
                    .failures
                    .push(format!("{:.0}s: {reason}", now.as_secs_f64()));
            }
            PrimaryAction::Resync { reason } => {
                self.vms[vm].report.resyncs += 1;
                // Whatever the comparison repairs is checked in full afterwards.
                self.vms[vm].verified = None;
                if let Some(connection) = self.current_connection(vm) {
                    self.close(connection, "resynchronizing", false);
                }
                if let Some(primary) = &mut self.vms[vm].primary {
                    primary.resync = true;
                    primary.connection = None;
                    primary.machine.connection_lost(instant, &reason);
                }
            }
            PrimaryAction::Verify { sequence } => {
                let seed = self.random.draw();
                let Some(primary) = &mut self.vms[vm].primary else {
                    return;
                };
                match primary.vm.digests(seed) {
                    Ok(digests) => primary.machine.verified(sequence, seed, digests),
                    Err(error) => {
                        let reason = error.to_string();
                        self.lost_host_io(self.vms[vm].spec.host, &reason);
                    }
                }
            }
            PrimaryAction::HandedOver { sequence } => self.handed_over(vm, sequence),
            PrimaryAction::HandoverRefused { reason } => {
                self.vms[vm].writes_stopped = false;
                self.planned_failed(vm, format!("refused: {reason}"));
            }
            PrimaryAction::Reversed { .. } => {
                let what = format!("{action:?}");
                self.violation(
                    Some(vm),
                    format!("the primary was told to become a replica, which the simulator never asks: {what}"),
                );
            }
        }
    }

    fn current_connection(&self, vm: usize) -> Option<ConnectionId> {
        self.vms[vm]
            .primary
            .as_ref()
            .and_then(|primary| primary.connection)
            .filter(|connection| {
                self.connections
                    .get(connection)
                    .is_some_and(Connection::open)
            })
    }

    fn link_between(&self, a: usize, b: usize) -> Option<usize> {
        let (site_a, site_b) = (self.hosts[a].site, self.hosts[b].site);
        self.link_of
            .get(&(site_a.min(site_b), site_a.max(site_b)))
            .copied()
    }

    fn link_for(&mut self, vm: usize) -> usize {
        let spec = &self.vms[vm].spec;
        let (primary, replica) = (spec.host, spec.replica_host);
        if let Some(link) = self.link_between(primary, replica) {
            return link;
        }
        // Hosts of one site, or sites the scenario did not join: a LAN.
        let (a, b) = (self.hosts[primary].site, self.hosts[replica].site);
        let link = self.links.len();
        self.links
            .push(Link::new(LinkSpec::local(), (a, b), self.random.fork()));
        self.link_of.insert((a.min(b), a.max(b)), link);
        link
    }

    fn connect(&mut self, vm: usize) {
        let link = self.link_for(vm);
        let replica_host = self.vms[vm].spec.replica_host;
        let side = self.vms[vm].primary.as_ref().map_or(0, |p| p.side);
        let now = self.agenda.now();
        let handshake = self.links[link].handshake(now);
        match handshake {
            Some(delay) if self.hosts[replica_host].up => {
                let connection = self.next_connection;
                self.next_connection += 1;
                self.connections.insert(
                    connection,
                    Connection {
                        vm,
                        link,
                        primary_side: side,
                        replica_host,
                        replica_incarnation: self.hosts[replica_host].incarnation,
                        closed_at: None,
                        last_to_replica: SimTime::ZERO,
                        last_to_primary: SimTime::ZERO,
                    },
                );
                if let Some(primary) = &mut self.vms[vm].primary {
                    primary.connection = Some(connection);
                }
                self.agenda
                    .add_after(delay, Event::Connected { connection });
            }
            _ => self.agenda.add_after(
                CONNECT_TIMEOUT,
                Event::ConnectFailed {
                    vm,
                    side,
                    reason: "the replica host does not answer",
                },
            ),
        }
    }

    fn connected(&mut self, connection: ConnectionId) {
        let Some(state) = self.connections.get(&connection).filter(|c| c.open()) else {
            return;
        };
        let vm = state.vm;
        let instant = self.agenda.instant();
        if self.vms[vm]
            .primary
            .as_ref()
            .is_some_and(|primary| primary.resync)
        {
            // Compared before the hello, as the daemon does.
            self.start_comparison(vm, connection);
            return;
        }
        if let Some(primary) = &mut self.vms[vm].primary {
            primary.machine.connected(instant);
        }
        self.drive_primary(vm);
    }

    /// Sends `message` across the connection's link: toward the replica (on the ordered
    /// control stream, or a data stream when not `ordered`) or back to the primary (always the
    /// control stream).
    fn send(&mut self, connection: ConnectionId, message: Message, way: Way) {
        let bytes = self.wire_size(&message);
        let Some(state) = self.connections.get(&connection) else {
            return;
        };
        let (vm, link) = (state.vm, state.link);
        let (from, after) = match way {
            Way::ToReplica { ordered } => (
                self.vms[vm].spec.host,
                if ordered {
                    state.last_to_replica
                } else {
                    SimTime::ZERO
                },
            ),
            Way::ToPrimary => (self.vms[vm].spec.replica_host, state.last_to_primary),
        };
        if let Way::ToReplica { .. } = way {
            self.vms[vm].report.wire_bytes += bytes;
            if let Message::Chunk { .. } = &message {
                self.vms[vm].report.chunks_sent += 1;
            }
        }
        let now = self.agenda.now();
        let Delivery::Arrives(at) = self.links[link].send(now, self.hosts[from].site, bytes, after)
        else {
            return;
        };
        let Some(state) = self.connections.get_mut(&connection) else {
            return;
        };
        let event = match way {
            Way::ToReplica { ordered } => {
                if ordered {
                    state.last_to_replica = at;
                }
                Event::ToReplica {
                    connection,
                    message,
                    sent: now,
                }
            }
            Way::ToPrimary => {
                state.last_to_primary = at;
                Event::ToPrimary {
                    connection,
                    message,
                    sent: now,
                }
            }
        };
        self.agenda.add(at, event);
    }

    fn primary_receives(&mut self, connection: ConnectionId, message: Message, sent: SimTime) {
        let Some(state) = self
            .connections
            .get(&connection)
            .filter(|c| c.carries(sent))
        else {
            return;
        };
        let vm = state.vm;
        let side = state.primary_side;
        let instant = self.agenda.instant();
        let Some(primary) = self.primary_of(vm, side) else {
            return;
        };
        if primary.connection != Some(connection) {
            return;
        }
        if primary.comparing.is_some() {
            self.primary_compares(vm, connection, message);
            return;
        }
        primary.machine.handle_message(instant, message);
        self.drive_primary(vm);
    }

    /// Ends a connection: the side that closes knows at once, the other hears after a round
    /// trip (or, when the link is severed, when its idle timeout runs out).
    fn close(&mut self, connection: ConnectionId, _reason: &str, by_replica: bool) {
        let now = self.agenda.now();
        let Some(state) = self.connections.get_mut(&connection) else {
            return;
        };
        if !state.open() {
            return;
        }
        state.closed_at = Some(now);
        // The other side hears after what was sent its way before the close.
        let queued = if by_replica {
            state.last_to_primary
        } else {
            state.last_to_replica
        };
        let link = state.link;
        let heard = if self.links[link].severed(now) {
            now + IDLE_TIMEOUT
        } else {
            (now + self.links[link].spec.latency).max(queued + Duration::from_micros(1))
        };
        self.agenda.add(
            heard,
            Event::PeerLost {
                connection,
                replica_side: !by_replica,
            },
        );
    }

    fn peer_lost(&mut self, connection: ConnectionId, replica_side: bool) {
        let Some(state) = self.connections.get(&connection) else {
            return;
        };
        let (vm, primary_side, host, replica_incarnation) = (
            state.vm,
            state.primary_side,
            state.replica_host,
            state.replica_incarnation,
        );
        let now = self.agenda.now();
        if let Some(state) = self.connections.get_mut(&connection) {
            state.closed_at.get_or_insert(now);
        }
        if replica_side {
            if self.hosts[host].incarnation == replica_incarnation
                && let Some(slot) = self.hosts[host].slots.get_mut(&vm)
            {
                slot.machine.disconnected(connection);
                self.drive_replica(host, vm);
            }
        } else {
            let instant = self.agenda.instant();
            if let Some(primary) = self.primary_of(vm, primary_side)
                && primary.connection == Some(connection)
            {
                primary.connection = None;
                primary
                    .machine
                    .connection_lost(instant, "the connection ended");
                self.drive_primary(vm);
            }
        }
    }

    // ---- the replica's driver ----

    fn replica_receives(&mut self, connection: ConnectionId, message: Message, sent: SimTime) {
        let Some(state) = self
            .connections
            .get(&connection)
            .filter(|c| c.carries(sent))
        else {
            return;
        };
        let (vm, host) = (state.vm, state.replica_host);
        if self.hosts[host].incarnation != state.replica_incarnation || !self.hosts[host].up {
            return;
        }
        if let Err(reason) = self.slot(host, vm) {
            // As the daemon does: the connection ends, the primary tries again later.
            self.close(connection, &reason, true);
            self.lost_host_io(host, &reason);
            return;
        }
        if self.replica_compares(host, vm, connection, &message) {
            return;
        }
        let owner = self.hosts[self.vms[vm].spec.host].name.clone();
        let runtime = &mut self.hosts[host];
        let Some(slot) = runtime.slots.get_mut(&vm) else {
            return;
        };
        match message {
            Message::Hello { version, disks, .. } => {
                if let Some(store) = &runtime.store {
                    // As the daemon does: a replica stopped by a failed commit is reopened.
                    let _ = store.recover_failed(&mut slot.replica, &mut slot.machine);
                }
                slot.machine.hello(connection, &owner, version, disks);
            }
            other => slot.machine.handle_message(connection, other),
        }
        self.drive_replica(host, vm);
    }

    /// The VM's replica on `host`, opened from the store the first time it is needed.
    fn slot(&mut self, host: usize, vm: usize) -> Result<&mut Slot, String> {
        let name = &self.vms[vm].spec.name;
        let runtime = &mut self.hosts[host];
        let store = runtime.store.as_ref().ok_or("the replica host is down")?;
        match runtime.slots.entry(vm) {
            std::collections::btree_map::Entry::Occupied(slot) => Ok(slot.into_mut()),
            std::collections::btree_map::Entry::Vacant(entry) => {
                let replica = store.open_vm(name).map_err(|error| error.to_string())?;
                let machine = Replica::new(name, replica.record());
                Ok(entry.insert(Slot {
                    machine,
                    replica,
                    staged_bytes: 0,
                    hashes: None,
                }))
            }
        }
    }

    fn drive_replica(&mut self, host: usize, vm: usize) {
        loop {
            let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
                return;
            };
            let Some(effect) = slot.replica_site().poll_effect() else {
                return;
            };
            self.trace.action(vm, 100 + site_effect_code(&effect));
            self.site_effect(host, vm, effect);
            if !self.hosts[host].up || self.hosts[host].disks.struck() {
                self.crash_host(host, "lost power during an operation");
                return;
            }
        }
    }

    fn site_effect(&mut self, host: usize, vm: usize, effect: SiteEffect) {
        let incarnation = self.hosts[host].incarnation;
        let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
            return;
        };
        match effect {
            SiteEffect::Send {
                connection,
                message,
            } => self.send(connection, message, Way::ToPrimary),
            SiteEffect::Close { connection, reason } => self.close(connection, &reason, true),
            SiteEffect::Staged { bytes } => slot.staged_bytes += bytes,
            SiteEffect::StoreFailed { reason, .. } => {
                self.close_all(host, vm, &reason);
                self.lost_host_io(host, &reason);
            }
            SiteEffect::Apply {
                delta,
                kind,
                app_consistent,
            } => {
                // Applying takes the disk's time; the commit itself happens when it is done.
                let bytes = std::mem::take(&mut slot.staged_bytes) as f64 * 2.0;
                let delay = COMMIT_FLOOR + Duration::from_secs_f64(bytes / DISK_BYTES_PER_SECOND);
                self.agenda.add_after(
                    delay,
                    Event::Applied {
                        vm,
                        host,
                        incarnation,
                        delta,
                        kind,
                        app_consistent,
                    },
                );
            }
            SiteEffect::VerifyHandover {
                connection,
                sequence,
                seed,
                digests,
                reverse,
            } => {
                let outcome = self.verify_handover(host, vm, sequence, seed, &digests, reverse);
                if let Some(slot) = self.hosts[host].slots.get_mut(&vm) {
                    slot.replica_site()
                        .handover_verified(connection, sequence, outcome);
                }
            }
        }
    }

    fn close_all(&mut self, host: usize, vm: usize, reason: &str) {
        let open: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, state)| state.vm == vm && state.open())
            .map(|(id, _)| *id)
            .collect();
        for connection in open {
            if let Some(slot) = self.hosts[host].slots.get_mut(&vm) {
                slot.machine.disconnected(connection);
            }
            self.close(connection, reason, true);
        }
    }

    fn apply(
        &mut self,
        vm: usize,
        host: usize,
        incarnation: u64,
        delta: DeltaId,
        kind: DeltaKind,
        app_consistent: bool,
    ) {
        if self.hosts[host].incarnation != incarnation || !self.hosts[host].up {
            return;
        }
        let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
            return;
        };
        // Why it failed is the machine's to say; the fault that did it is the simulator's.
        let _ = slot.replica_site().apply(delta, kind, app_consistent);
        if self.hosts[host].disks.struck() {
            self.crash_host(host, "lost power while applying a delta");
            return;
        }
        self.drive_replica(host, vm);
    }

    // ---- the checks ----

    /// The primary heard that `delta` is applied: the replica must now hold the disks as they
    /// were at its cut.
    fn acknowledged(&mut self, vm: usize, delta: DeltaId, kind: DeltaKind) {
        let now = self.agenda.now();
        let runtime = &mut self.vms[vm];
        let Some(cut) = runtime.cuts.remove(&delta.sequence) else {
            return;
        };
        runtime.recovery_point = Some(cut.at);
        runtime.last_applied = now;
        runtime.caught_up = kind == DeltaKind::Changes;
        runtime.report.deltas_applied += 1;
        runtime.report.disk_bytes_shipped += cut.bytes;
        runtime.acknowledged = Some((
            delta.sequence,
            (kind == DeltaKind::Changes).then(|| cut.versions.clone()),
        ));
        if kind == DeltaKind::Initial {
            runtime.report.initial_replications += 1;
            // Read live, an initial replication is made consistent by the delta after it.
            runtime.verified = None;
            return;
        }
        let host = runtime.spec.replica_host;
        let name = runtime.spec.name.clone();
        let previous = runtime.verified.take();
        let cursor = runtime.sample_cursor;
        let disks_of_host = self.hosts[host].disks.clone();
        if disks_of_host.struck() {
            return; // The host is going down: its disks are checked after it restarts.
        }
        let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
            return;
        };
        let problem = disks_of_host.observing(|| {
        let mut problem = None;
        let mut damaged = false;
        let models = &self.vms[vm].models;
        let flipped = &self.vms[vm].flipped;
        'disks: for (disk, model) in models.iter().enumerate() {
            let pages = &model.pages();
            let versions = &cut.versions[disk];
            // What changed since the last check, and a rotating window of the rest.
            let mut pages_to_check: Vec<u64> = match &previous {
                Some(before) => (0..*pages)
                    .filter(|page| before[disk][*page as usize] != versions[*page as usize])
                    .collect(),
                None => (0..*pages).collect(),
            };
            let window = SAMPLED_PAGES.min(*pages);
            pages_to_check.extend((0..window).map(|step| (cursor + step) % pages));
            pages_to_check.sort_unstable();
            pages_to_check.dedup();
            // Read in runs of neighbouring pages, a MiB at most.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for page in pages_to_check {
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == page && *count < 256 => *count += 1,
                    _ => runs.push((page, 1)),
                }
            }
            let mut buffer = Vec::new();
            for (first, count) in runs {
                buffer.resize((count * PAGE) as usize, 0);
                if let Err(error) = slot.replica.read_disk(disk, &mut buffer, first * PAGE) {
                    problem = Some(format!("cannot read the replica's disk {disk}: {error}"));
                    break 'disks;
                }
                // Pages a bit flip damaged on purpose are expected to differ until a
                // resynchronization repairs them; anything else is the engine's doing.
                let mut from = first;
                while let Some(page) = first_difference(
                    &models[disk],
                    versions,
                    from,
                    &buffer[((from - first) * PAGE) as usize..],
                ) {
                    if !flipped.contains(&(disk, page)) {
                        problem = Some(format!(
                            "after {delta} was acknowledged, the replica's disk {disk} differs from the primary's at its cut, at byte {} (page {page})",
                            page * PAGE
                        ));
                        break 'disks;
                    }
                    damaged = true;
                    from = page + 1;
                }
            }
        }
        (problem, damaged)
        });
        let (problem, damaged) = problem;
        let runtime = &mut self.vms[vm];
        runtime.sample_cursor = cursor + SAMPLED_PAGES;
        if damaged {
            runtime.report.damage_seen += 1;
        } else if previous.is_none() && problem.is_none() {
            // A full check found every page right: whatever was flipped has been repaired.
            runtime.flipped.clear();
        }
        match problem {
            Some(what) => {
                self.checker
                    .violation(Violation::new(now, self.seed, Some(&name), what));
                runtime.verified = None;
            }
            None => {
                runtime.report.checked_cuts += 1;
                // Damage seen is looked for in full again next time, until repaired.
                runtime.verified = (!damaged).then_some(cut.versions);
            }
        }
    }

    fn sample(&mut self) {
        let now = self.agenda.now();
        let instant = self.agenda.instant();
        for vm in 0..self.vms.len() {
            let link = self.link_for(vm);
            let replica_host = self.vms[vm].spec.replica_host;
            let unreachable = !self.hosts[replica_host].up || self.links[link].severed(now);
            let quiet = now >= self.disturbed_until(vm, link) && self.link_has_room(link, now);
            let runtime = &mut self.vms[vm];
            runtime.unreachable_since = match (unreachable, runtime.unreachable_since) {
                (false, _) => None,
                (true, since) => Some(since.unwrap_or(now)),
            };
            let rpo = runtime.recovery_point.map(|point| now - point);
            if let Some(rpo) = rpo {
                runtime.rpo_samples.push(rpo.as_secs_f64());
                if now.as_secs().is_multiple_of(60) {
                    runtime
                        .report
                        .rpo_series
                        .push((now.as_secs_f64(), rpo.as_secs_f64()));
                }
            }
            let Some(primary) = runtime.primary.as_ref().filter(|_| runtime.replicating) else {
                continue;
            };
            let status = primary.machine.status(instant);
            if now.as_secs().is_multiple_of(60) {
                runtime
                    .report
                    .pending_series
                    .push((now.as_secs_f64(), status.pending_bytes));
            }
            runtime.report.missed_cycles = status.missed_cycles;
            runtime.report.successful_cycles = status.successful_cycles;
            if runtime.last_health != Some(status.health) {
                runtime.last_health = Some(status.health);
                runtime.report.health.push(HealthChange {
                    seconds: now.as_secs_f64(),
                    health: status.health.to_string(),
                });
            }
            let observation = Observation {
                vm: &runtime.spec.name,
                health: status.health,
                last_applied: runtime.last_applied,
                unreachable_since: runtime
                    .unreachable_since
                    .map(|since| since.max(runtime.replication_started)),
                rpo: rpo.filter(|_| runtime.caught_up),
                frequency: runtime.spec.policy.frequency,
                quiet,
            };
            self.checker.observe(now, self.seed, &observation);
        }
    }

    /// Until when faults on the VM's hosts or link excuse it from its recovery point objective.
    fn disturbed_until(&self, vm: usize, link: usize) -> SimTime {
        let spec = &self.vms[vm].spec;
        self.hosts[spec.host]
            .disturbed_until
            .max(self.hosts[spec.replica_host].disturbed_until)
            .max(
                self.link_disturbed_until
                    .get(&link)
                    .copied()
                    .unwrap_or_default(),
            )
    }

    /// The link carried less than half what it could over the last five whole minutes.
    fn link_has_room(&self, link: usize, now: SimTime) -> bool {
        let minute = (now.as_secs() / 60) as usize;
        let capacity = self.links[link].spec.bandwidth * 60.0;
        self.links[link].carried.iter().all(|per_minute| {
            (minute.saturating_sub(5)..minute)
                .all(|m| (per_minute.get(m).copied().unwrap_or(0) as f64) < capacity / 2.0)
        })
    }

    // ---- faults ----

    fn note_fault(&mut self, what: String) {
        let now = self.agenda.now();
        self.faults.push((now, what));
    }

    fn fault(&mut self, action: Action) {
        match action {
            Action::Partition { sites, length } => {
                let now = self.agenda.now();
                let Some(&link) = self
                    .link_of
                    .get(&(sites.0.min(sites.1), sites.0.max(sites.1)))
                else {
                    return;
                };
                self.note_fault(format!(
                    "link {} - {} down for {}s",
                    self.scenario.sites[sites.0].name,
                    self.scenario.sites[sites.1].name,
                    length.as_secs_f64()
                ));
                let until = now + length + Duration::from_secs(600);
                let excused = self.link_disturbed_until.entry(link).or_default();
                *excused = (*excused).max(until);
                if self.links[link].cut(now, length) {
                    // Both ends time out after the idle timeout.
                    let across: Vec<ConnectionId> = self
                        .connections
                        .iter()
                        .filter(|(_, state)| state.link == link && state.open())
                        .map(|(id, _)| *id)
                        .collect();
                    for connection in across {
                        if let Some(state) = self.connections.get_mut(&connection) {
                            state.closed_at = Some(now);
                        }
                        for replica_side in [true, false] {
                            self.agenda.add_after(
                                IDLE_TIMEOUT,
                                Event::PeerLost {
                                    connection,
                                    replica_side,
                                },
                            );
                        }
                    }
                }
            }
            Action::CrashHost {
                host,
                down_for,
                during_io,
            } => {
                if during_io {
                    // Strikes within the host's next storage calls, mid-operation.
                    let calls = 1 + self.random.below(40);
                    self.hosts[host].disks.arm_crash(calls);
                    self.note_fault(format!(
                        "host {} will lose power within {calls} storage calls",
                        self.hosts[host].name
                    ));
                    self.hosts[host].down_for = down_for;
                    let incarnation = self.hosts[host].incarnation;
                    self.agenda.add_after(
                        Duration::from_secs(60),
                        Event::ForceCrash { host, incarnation },
                    );
                } else {
                    self.hosts[host].down_for = down_for;
                    self.crash_host(host, "lost power");
                }
            }
            Action::SiteOutage { site, length } => {
                self.note_fault(format!(
                    "site {} loses power for {}s",
                    self.scenario.sites[site].name,
                    length.as_secs_f64()
                ));
                for host in 0..self.hosts.len() {
                    if self.hosts[host].site != site {
                        continue;
                    }
                    self.hosts[host].down_for = length;
                    if self.hosts[host].up {
                        self.crash_host(host, "lost power with its site");
                    } else {
                        // Down already: it comes back with its site, not before.
                        self.hosts[host].restart_generation += 1;
                        let generation = self.hosts[host].restart_generation;
                        self.agenda
                            .add_after(length, Event::HostRestart { host, generation });
                    }
                }
            }
            Action::UnplannedFailover { plan, groups } => {
                self.unplanned_failover(plan.as_deref(), &groups);
            }
            Action::Reverse { vms } => self.reverse(&vms),
            Action::BitFlip { host } => self.flip_a_bit(host),
            Action::Verify { vms } => {
                for vm in vms {
                    self.verify(vm);
                }
            }
            Action::Resync { vms } => {
                let instant = self.agenda.instant();
                for vm in vms {
                    if let Some(connection) = self.current_connection(vm) {
                        self.close(connection, "resynchronizing", false);
                    }
                    if let Some(primary) = &mut self.vms[vm].primary {
                        primary.resync = true;
                        primary.connection = None;
                        primary
                            .machine
                            .connection_lost(instant, "resynchronization asked for");
                    }
                    self.vms[vm].report.resyncs += 1;
                    self.vms[vm].verified = None;
                    self.drive_primary(vm);
                }
            }
            Action::PlannedFailover { vms, reverse } => {
                for vm in vms {
                    self.planned_failover(vm, reverse);
                }
            }
            Action::DiskFull { host, length } => {
                self.note_fault(format!(
                    "host {}: disk full for {}s",
                    self.hosts[host].name,
                    length.as_secs_f64()
                ));
                self.hosts[host].disks.set_full(true);
                let now = self.agenda.now();
                let until = now + length + Duration::from_secs(600);
                self.hosts[host].disturbed_until = self.hosts[host].disturbed_until.max(until);
                self.hosts[host].full_periods += 1;
                self.agenda
                    .add_after(length, Event::DiskSpace { host, full: false });
            }
        }
    }

    /// An engine call on `host` failed. When the host lost power under it, crash it now.
    fn lost_host_io(&mut self, host: usize, _reason: &str) {
        if self.hosts[host].disks.struck() {
            self.crash_host(host, "lost power during an operation");
        }
    }

    /// The cluster restarts its VMs that ran on `host` (going down) on another node that is up,
    /// at the other site of a stretched cluster if need be.
    fn cluster_failover(&mut self, host: usize) {
        let now = self.agenda.now();
        for index in 0..self.scenario.clustered.len() {
            if self.clustered_on[index] != Some(host) {
                continue;
            }
            let vm = &self.scenario.clustered[index];
            let node = (0..self.hosts.len()).find(|&other| {
                other != host
                    && self.hosts[other].up
                    && self.scenario.hosts[other].cluster.as_deref() == Some(vm.cluster.as_str())
            });
            self.clustered_on[index] = node;
            let mut report =
                crate::report::FailoverReport::failed(now, &vm.name, None, String::new());
            report.kind = "cluster".into();
            report.from = self.hosts[host].name.clone();
            match node {
                Some(node) => {
                    report.to = self.hosts[node].name.clone();
                    report.problem = None;
                }
                None => report.problem = Some(format!("no node of cluster {} is up", vm.cluster)),
            }
            self.failovers.push(report);
        }
    }

    fn crash_host(&mut self, host: usize, how: &str) {
        if !self.hosts[host].up {
            return;
        }
        self.note_fault(format!("host {} {how}", self.hosts[host].name));
        self.cluster_failover(host);
        let runtime = &mut self.hosts[host];
        runtime.disks.crash();
        runtime.up = false;
        runtime.incarnation += 1;
        runtime.crashes += 1;
        runtime.store = None;
        runtime.slots.clear();
        for vm in 0..self.vms.len() {
            if self.vms[vm].spec.replica_host == host
                && self.vms[vm]
                    .taking_over
                    .as_ref()
                    .is_some_and(|side| side.incarnation != self.hosts[host].incarnation)
            {
                // It took the VM over and died: it starts it again once back.
                self.vms[vm].taking_over = None;
            }
            if self.vms[vm].spec.host == host {
                if self.vms[vm].taking_over.is_some() {
                    // The old primary died before it heard the other site took over.
                    let sequence = self.vms[vm].handover_sequence;
                    self.vms[vm].primary = None;
                    self.handed_over(vm, sequence);
                    continue;
                }
                let runtime = &mut self.vms[vm];
                runtime.primary = None;
                runtime.next_wake = None;
                for model in &mut runtime.models {
                    model.forget_unwritten();
                }
            }
        }
        // Its peers hear nothing more: they time out.
        let touching: Vec<(ConnectionId, bool)> = self
            .connections
            .iter()
            .filter(|(_, state)| state.open())
            .filter_map(|(id, state)| {
                let spec = &self.vms[state.vm].spec;
                if spec.replica_host == host {
                    Some((*id, false))
                } else if spec.host == host {
                    Some((*id, true))
                } else {
                    None
                }
            })
            .collect();
        let now = self.agenda.now();
        for (connection, replica_side) in touching {
            if let Some(state) = self.connections.get_mut(&connection) {
                state.closed_at = Some(now);
            }
            self.agenda.add_after(
                IDLE_TIMEOUT,
                Event::PeerLost {
                    connection,
                    replica_side,
                },
            );
        }
        let down_for = self.hosts[host].down_for;
        let now = self.agenda.now();
        self.hosts[host].restart_generation += 1;
        let generation = self.hosts[host].restart_generation;
        // Back up, its VMs may need a new initial replication or a resynchronization.
        let until = now + down_for + Duration::from_secs(1800);
        self.hosts[host].disturbed_until = self.hosts[host].disturbed_until.max(until);
        self.agenda
            .add_after(down_for, Event::HostRestart { host, generation });
    }

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

fn primary_action_code(action: &PrimaryAction) -> u64 {
    match action {
        PrimaryAction::Connect => 1,
        PrimaryAction::Send(message) => 10 + message_code(message),
        PrimaryAction::SendChunk { delta, index } => {
            40 + (delta.sequence << 20) + u64::from(*index)
        }
        PrimaryAction::Cut { delta, .. } => 2 + (delta.sequence << 8),
        PrimaryAction::Acknowledged { delta, .. } => 3 + (delta.sequence << 8),
        PrimaryAction::Disconnect { .. } => 4,
        PrimaryAction::Failed { .. } => 5,
        PrimaryAction::Verify { .. } => 6,
        PrimaryAction::HandedOver { .. } => 7,
        PrimaryAction::Reversed { .. } => 8,
        PrimaryAction::HandoverRefused { .. } => 9,
        PrimaryAction::Resync { .. } => 30,
    }
}

fn site_effect_code(effect: &SiteEffect) -> u64 {
    match effect {
        SiteEffect::Send { message, .. } => 10 + message_code(message),
        SiteEffect::Staged { bytes } => 1 + (bytes << 8),
        SiteEffect::StoreFailed { .. } => 2,
        SiteEffect::Apply { delta, .. } => 5 + (delta.sequence << 8),
        SiteEffect::VerifyHandover { .. } => 6,
        SiteEffect::Close { .. } => 7,
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
