//! The replica's files: one directory per VM under the store, holding its catalogue, its
//! replica disks (VHDX, written through io_uring where the kernel allows) and what is staged of
//! the next delta. Format of the catalogue and the commit protocol: `docs/formats/replica.md`.
//!
//! A delta becomes the replica's state atomically. Changes are staged in a file first; the
//! commit makes the staging durable, records "committing N" in the catalogue, applies the
//! staging to every disk, flushes them and records "applied N". An initial replication is
//! written into new disk files beside the old ones, which the commit renames into place. A
//! crash anywhere leaves the catalogue saying either "applied N-1" (the staging is thrown away)
//! or "committing N" (the commit is redone from the durable staging on open: applying a delta
//! twice gives the same bytes). Never a disk between two deltas.

use super::bundle::{BundleWriter, apply_bundle, bundle_extents, write_contents};
use super::points::{PointPolicy, RecoveryPoint, record_applied, undo_chain};
use crate::delta::{DeltaHeader, HEADER_SIZE};
use crate::delta::{verify_delta, write_delta};
use crate::image::vhdx::{BlockSize, SectorSize, VhdxCreateOptions};
use crate::image::{Access, BlockImage, ContentStamp, RawImage, VhdxImage};
use crate::io::{FileLock, Storage, StorageOptions, file_storage, sync_directory};
use crate::protect::{ProtectedDisk, SharedDisk};
use crate::proto::{DeltaId, DeltaKind, DiskDescription, Fence, ReplicaVmRecord};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const CATALOGUE: &str = "catalogue.json";
const STAGE: &str = "delta.stage";
const CATALOGUE_VERSION: u32 = 1;

/// A replica disk as the store opens it.
pub(crate) type Disk = VhdxImage<Box<dyn Storage>>;

/// Disks tracked for onward replication, and the gate their cuts wait for.
type OnwardTracking = (Vec<Arc<ProtectedDisk>>, Arc<Mutex<()>>);

/// A replica disk as the store applies to it: its own VHDX, or an adopted disk of any format.
type OpenDisk = Box<dyn BlockImage>;

/// A recovery point as `blockrep points` lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PointInfo {
    /// The delta sequence the point is at.
    pub id: u64,
    /// When it was the latest state, seconds since the Unix epoch.
    pub time: f64,
    pub latest: bool,
    pub app_consistent: bool,
    /// Undo data kept for it (0 for the latest state, which is the disks themselves).
    pub bytes_kept: u64,
}

/// What the catalogue records of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Catalogue {
    version: u32,
    vm: String,
    /// Fingerprint of the primary's certificate.
    owner: String,
    disks: Vec<DiskDescription>,
    applied: u64,
    /// When `applied` was applied, seconds since the Unix epoch.
    #[serde(default)]
    applied_at: f64,
    /// The primary froze its applications for the cut of `applied`.
    #[serde(default)]
    applied_app_consistent: bool,
    /// The same, for the delta being committed.
    #[serde(default)]
    committing_app_consistent: bool,
    committing: Option<(DeltaId, DeltaKind)>,
    /// Older states kept, oldest first.
    #[serde(default)]
    points: Vec<RecoveryPoint>,
    /// Where the test failover copy is, while one exists.
    #[serde(default)]
    test_failover: Option<PathBuf>,
    /// The VM failed over to this site, when it has.
    #[serde(default)]
    failover: Option<FailoverRecord>,
    /// The disks are these files elsewhere (a primary's own disks, adopted as the replica of
    /// reverse replication), not `disk-N.vhdx` in the VM's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    external_disks: Option<Vec<PathBuf>>,
    /// Seeded by hand from a copy (`blockrep seed`): compared by hash before any delta, and the
    /// disks' ids taken from the primary's first hello.
    #[serde(default)]
    seeded: bool,
    /// The operator allowed the next initial replication to replace this replica
    /// (`blockrep reinitialize`); it is cleared when one commits.
    #[serde(default)]
    reinitialize: bool,
    /// The operator allowed the next planned failover to this site (`blockrep
    /// allow-handover`), which drops the recovery points; it is cleared when one takes over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    handover: bool,
    /// Each disk's content stamp as this store last left it (docs/formats/replica.md): a disk
    /// whose stamp moved was written or replaced outside blockrep.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stamps: Vec<ContentStamp>,
    /// Why the disks may differ from what was applied (changed outside blockrep): the
    /// primary must compare by hash before anything more is applied. Cleared once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compare_required: Option<String>,
}

/// A failover of the VM to the replica site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// The recovery point the VM was brought up from.
    pub point: u64,
    /// Committed: the failover disks became the VM's disks and the points were dropped.
    pub committed: bool,
    /// A planned failover: the primary handed over with nothing lost, disks compared equal.
    #[serde(default)]
    pub planned: bool,
    /// Replicate back to the old primary when it connects (`blockrep reverse`).
    #[serde(default)]
    pub reverse: bool,
    /// The old primary's copy must be compared by hash before replication back: it may hold
    /// writes made after its last shipped cut (an unplanned failover).
    #[serde(default)]
    pub resync: bool,
    /// A failback back to the old primary is under way: its final delta, this sequence, is
    /// applied there, which may take the VM over any moment. A server that restarts with
    /// this set must not run the VM again: it becomes the replica, at this sequence.
    #[serde(default)]
    pub handing_back: Option<u64>,
    /// An unplanned failover's disks are complete and durable (their copy finished). Until
    /// then they may be half written, or still being written: they cannot be committed.
    #[serde(default)]
    pub copied: bool,
    /// Which attempt at an unplanned failover this is: a copy made for one that was cancelled
    /// (and perhaps begun again) must neither go on writing nor count as this one's.
    #[serde(default)]
    pub attempt: u64,
}

impl FailoverRecord {
    /// The VM runs at this site: its disks are live, written by the VM.
    pub fn active(&self) -> bool {
        self.committed
    }
}

/// Where the store reads the time of day, in seconds since the Unix epoch, for what it records
/// (when a delta was applied, which recovery points to keep): the system clock in the daemons,
/// the simulator's virtual clock there.
#[derive(Clone)]
pub struct WallClock(Arc<dyn Fn() -> f64 + Send + Sync>);

impl WallClock {
    pub fn new(now: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        WallClock(Arc::new(now))
    }

    pub(crate) fn system() -> Self {
        WallClock::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |since| since.as_secs_f64())
        })
    }

    fn now(&self) -> f64 {
        (self.0)()
    }
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::system()
    }
}

impl std::fmt::Debug for WallClock {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("WallClock")
    }
}

/// Where a VM's replicas live.
#[derive(Debug, Clone)]
pub struct ReplicaStore {
    root: PathBuf,
    storage: StorageOptions,
    policy: PointPolicy,
    clock: WallClock,
    limits: super::Limits,
    /// The store's directory, locked by this store and its clones: two servers on one store
    /// would apply and commit over each other.
    _lock: Arc<FileLock>,
}

impl ReplicaStore {
    /// Opens (creating if needed) the store at `root`: one directory per VM, each with its
    /// catalogue, replica disks and recovery points.
    ///
    /// ```
    /// use blockrep::io::StorageOptions;
    /// use blockrep::replica::ReplicaStore;
    ///
    /// # fn main() -> blockrep::Result<()> {
    /// let directory = tempfile::tempdir().unwrap();
    /// let store = ReplicaStore::open(directory.path(), StorageOptions::default())?;
    /// assert!(store.vms()?.is_empty());
    /// // A VM not seen before: nothing applied, no recovery points yet.
    /// let vm = store.open_vm("vm1")?;
    /// assert_eq!(vm.applied(), 0);
    /// assert!(vm.points().is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn open(root: &Path, storage: StorageOptions) -> Result<Self> {
        Self::with_policy(root, storage, PointPolicy::default())
    }

    /// Opens the store, keeping recovery points by `policy`. The store is this process's
    /// alone until the last clone is dropped: another user is refused, named.
    pub fn with_policy(root: &Path, storage: StorageOptions, policy: PointPolicy) -> Result<Self> {
        let name = root.display().to_string();
        std::fs::create_dir_all(root).map_err(|error| Error::file(&name, "create store", error))?;
        let lock = FileLock::directory(root, &format!("replica store {name}"))?;
        Ok(ReplicaStore {
            root: root.to_owned(),
            storage,
            policy,
            clock: WallClock::system(),
            limits: super::Limits::default(),
            _lock: Arc::new(lock),
        })
    }

    /// Reads the time of day from `clock` instead of the system's.
    pub fn with_clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// Takes at most `limits` from each primary.
    pub fn with_limits(mut self, limits: super::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether `owner` may replicate `vm` with `disks` here: a VM the store holds already
    /// (its disks are checked against it by the protocol), or a new one within the owner's
    /// limits. Checked before anything is made for the VM.
    pub fn admit(&self, owner: &str, vm: &str, disks: &[DiskDescription]) -> Result<()> {
        check_vm_name(vm)?;
        if self.root.join(vm).join(CATALOGUE).exists() {
            return Ok(());
        }
        let mut usage = super::limits::Usage::default();
        for other in self.vms()? {
            let path = self.root.join(&other).join(CATALOGUE);
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let catalogue = parse_catalogue(&path, &bytes)?;
            if catalogue.owner == owner {
                usage.vms += 1;
                usage.bytes += catalogue
                    .disks
                    .iter()
                    .map(|disk| disk.virtual_size)
                    .sum::<u64>();
            }
        }
        match self.limits.refusal(usage, disks) {
            Some(reason) => Err(Error::InvalidArgument {
                what: "new VM",
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The VMs that have a catalogue in the store.
    pub fn vms(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.root)
            .map_err(|error| Error::file(&self.root.display().to_string(), "list store", error))?;
        let mut vms: Vec<String> = entries
            .flatten()
            .filter(|entry| entry.path().join(CATALOGUE).exists())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        vms.sort();
        Ok(vms)
    }

    /// Opens a VM's replica (finishing a commit a crash interrupted), or an empty one for a VM
    /// not seen before; nothing is written for it until `prepare`.
    pub fn open_vm(&self, vm: &str) -> Result<VmReplica> {
        self.open_vm_tracked(vm, None)
    }

    /// The same, applying through `tracking`'s disks (and cut gate) from the start, the
    /// recovery of an interrupted commit included.
    fn open_vm_tracked(&self, vm: &str, tracking: Option<OnwardTracking>) -> Result<VmReplica> {
        check_vm_name(vm)?;
        let directory = self.root.join(vm);
        let catalogue_path = directory.join(CATALOGUE);
        let catalogue = match std::fs::read(&catalogue_path) {
            Ok(bytes) => Some(parse_catalogue(&catalogue_path, &bytes)?),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                return Err(Error::file(
                    &catalogue_path.display().to_string(),
                    "read catalogue",
                    error,
                ));
            }
        };
        let mut replica = VmReplica {
            vm: vm.to_owned(),
            directory,
            storage: self.storage.clone(),
            catalogue,
            disks: Vec::new(),
            disk_locks: Vec::new(),
            staging: None,
            policy: self.policy,
            clock: self.clock.clone(),
            pinned: 0,
            pending_deletions: Vec::new(),
            recent_undo: Vec::new(),
            tracked: None,
            gate: Arc::default(),
            detached: false,
        };
        if let Some((disks, gate)) = tracking {
            replica.tracked = Some(disks);
            replica.gate = gate;
        }
        let changed = replica.changed_outside()?;
        replica.recover()?;
        replica.stamp_disks(changed)?;
        Ok(replica)
    }
}

impl ReplicaStore {
    /// A commit that failed (a full disk, say) stopped the VM's `machine`: opens its replica
    /// again, which finishes or rolls back the interrupted commit from what is durable, and
    /// lets the machine take deltas again. Returns whether it did; a VM that had not failed is
    /// left alone, and one whose replica still cannot be opened stays stopped (the error says
    /// why).
    pub fn recover_failed(
        &self,
        replica: &mut VmReplica,
        machine: &mut crate::proto::Replica,
    ) -> Result<bool> {
        if machine.failure().is_none() {
            return Ok(false);
        }
        self.reopen(replica)?;
        machine.recovered(replica.record());
        Ok(true)
    }

    /// Opens `replica` again from what is durable (finishing or rolling back an interrupted
    /// commit). Replicated onward, its disks stay tracked through it: the redone commit and
    /// every later delta must reach the third site, and cuts still fall between applies.
    fn reopen(&self, replica: &mut VmReplica) -> Result<()> {
        replica.release_disks();
        let tracking = replica
            .tracked
            .clone()
            .map(|disks| (disks, replica.apply_gate()));
        *replica = self.open_vm_tracked(&replica.vm, tracking)?;
        Ok(())
    }

    /// Makes existing disk files (a primary's own, at `paths`) the replica of `vm` for reverse
    /// replication from `owner`, counted as at delta `applied`. A catalogue already adopting
    /// the same files from the same owner is kept (it knows what was applied since).
    pub fn adopt(
        &self,
        vm: &str,
        owner: &str,
        disks: Vec<DiskDescription>,
        paths: Vec<PathBuf>,
        applied: u64,
    ) -> Result<VmReplica> {
        let mut replica = self.open_vm(vm)?;
        if let Some(existing) = &replica.catalogue
            && existing.owner == owner
            && existing.disks == disks
            && existing.external_disks.as_ref() == Some(&paths)
            && existing.applied >= applied
            && existing.failover.is_none()
        {
            return Ok(replica);
        }
        replica.discard_staging();
        replica.prepare(disks, owner)?;
        let mut catalogue = replica.catalogue()?.clone();
        catalogue.external_disks = Some(paths);
        catalogue.applied = applied;
        replica.write_catalogue(catalogue)?;
        Ok(replica)
    }

    /// Seeds `vm`'s replica from copies of its disks (from a backup, or copied by hand) for
    /// the primary whose certificate has `owner` as fingerprint: each copy (VHDX or raw) is
    /// copied into the store as its replica disk. The primary then compares by hash and ships
    /// only what differs (`blockrep protect --initial existing`). Refused when the VM already
    /// has a replica here.
    pub fn seed(&self, vm: &str, owner: &str, copies: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut replica = self.open_vm(vm)?;
        if replica.catalogue.is_some() {
            return Err(replica.refusal(
                "already has a replica here; remove its directory to seed it again".into(),
            ));
        }
        let mut disks = Vec::with_capacity(copies.len());
        let mut sources = Vec::with_capacity(copies.len());
        for copy in copies {
            let (image, disk_id, logical_sector) = crate::protect::open_image(copy, &self.storage)?;
            disks.push(DiskDescription {
                disk_id,
                virtual_size: image.virtual_size(),
                logical_sector,
            });
            sources.push(image);
        }
        replica.prepare(disks.clone(), owner)?;
        for (index, (source, description)) in sources.iter().zip(&disks).enumerate() {
            let path = replica.initial_path(index);
            let mut disk = replica.create_disk(&path, description)?;
            crate::image::copy_image(&**source, &mut disk, true, &mut |_| {})?;
            disk.close()?;
            std::fs::rename(&path, replica.disk_path(index)).map_err(|error| {
                Error::file(&path.display().to_string(), "seed the replica disk", error)
            })?;
        }
        sync_directory(&replica.directory)?;
        let mut catalogue = replica.catalogue()?.clone();
        catalogue.applied = 1;
        catalogue.seeded = true;
        replica.write_catalogue(catalogue)?;
        Ok(replica.disk_paths())
    }

    /// Removes what the store holds of `vm` (its adopted disks stay where they are).
    pub fn forget(&self, vm: &str) -> Result<()> {
        check_vm_name(vm)?;
        let directory = self.root.join(vm);
        match std::fs::remove_dir_all(&directory) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(Error::file(
                &directory.display().to_string(),
                "remove",
                error,
            )),
        }
    }
}

fn check_vm_name(vm: &str) -> Result<()> {
    let valid = !vm.is_empty()
        && vm.len() <= 64
        && !vm.starts_with('.')
        && vm
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            what: "VM name",
            reason: format!("{vm:?}: use 1 to 64 letters, digits, '-', '_' or '.'"),
        })
    }
}

fn parse_catalogue(path: &Path, bytes: &[u8]) -> Result<Catalogue> {
    let catalogue: Catalogue = serde_json::from_slice(bytes).map_err(|error| {
        Error::corrupt(
            &path.display().to_string(),
            format!("catalogue is damaged: {error}"),
        )
    })?;
    if catalogue.version != CATALOGUE_VERSION {
        return Err(Error::unsupported(
            &path.display().to_string(),
            format!(
                "catalogue version {} (this blockrep reads version {CATALOGUE_VERSION})",
                catalogue.version
            ),
        ));
    }
    Ok(catalogue)
}

/// What is staged of the next delta.
enum Staging {
    /// New disks being filled, renamed into place at commit.
    Initial { delta: DeltaId, disks: Vec<Disk> },
    /// Chunks appended to the stage file, a bundle.
    Changes { delta: DeltaId, file: BundleWriter },
}

/// One VM's replica: its catalogue, open disks and staging.
pub struct VmReplica {
    vm: String,
    directory: PathBuf,
    storage: StorageOptions,
    catalogue: Option<Catalogue>,
    disks: Vec<OpenDisk>,
    /// The disk files this store opened, locked while they are open: qemu refuses to write
    /// them, and a second server cannot (onward tracking and a VM running here lock them
    /// themselves, after the store let go).
    disk_locks: Vec<FileLock>,
    staging: Option<Staging>,
    policy: PointPolicy,
    clock: WallClock,
    /// Test failovers reading the undo files: while any runs, no undo file is deleted and no
    /// point expires.
    pinned: usize,
    pending_deletions: Vec<String>,
    /// Undo files made while pinned, by sequence: how a test failover of the latest state
    /// undoes the deltas applied while it copied.
    recent_undo: Vec<(u64, String)>,
    /// The disks as tracked by whoever replicates them onward (extended replication): applied
    /// through these, so the changes are tracked.
    tracked: Option<Vec<Arc<ProtectedDisk>>>,
    /// Held around each apply, so a cut for onward replication never splits a delta.
    gate: Arc<Mutex<()>>,
    /// An initial replication replaced the disk files under the tracked disks.
    detached: bool,
}

impl std::fmt::Debug for VmReplica {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VmReplica")
            .field("vm", &self.vm)
            .field("catalogue", &self.catalogue)
            .finish_non_exhaustive()
    }
}

impl VmReplica {
    /// What the protocol needs to know of the VM.
    pub fn record(&self) -> ReplicaVmRecord {
        match &self.catalogue {
            Some(catalogue) => ReplicaVmRecord {
                disks: Some(catalogue.disks.clone()),
                applied: catalogue.applied,
                owner: Some(catalogue.owner.clone()),
                fenced: catalogue.failover.as_ref().map(fence_for),
                handed_over: catalogue
                    .failover
                    .as_ref()
                    .filter(|failover| failover.planned)
                    .map(|failover| failover.point),
                seeded: catalogue.seeded,
                reinitialize: catalogue.reinitialize,
                compare_required: catalogue.compare_required.clone(),
            },
            None => ReplicaVmRecord::default(),
        }
    }

    pub(crate) fn vm(&self) -> &str {
        &self.vm
    }

    /// The replica disk files, in the primary's order.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        let count = self
            .catalogue
            .as_ref()
            .map_or(0, |catalogue| catalogue.disks.len());
        (0..count).map(|index| self.disk_path(index)).collect()
    }

    pub fn applied(&self) -> u64 {
        self.catalogue
            .as_ref()
            .map_or(0, |catalogue| catalogue.applied)
    }

    /// Records a new VM: its disks and the primary that owns it.
    pub fn prepare(&mut self, disks: Vec<DiskDescription>, owner: &str) -> Result<()> {
        std::fs::create_dir_all(&self.directory).map_err(|error| {
            Error::file(
                &self.directory.display().to_string(),
                "create VM directory",
                error,
            )
        })?;
        // The VM's directory is a name in the store's: durable before anything in it counts.
        if let Some(store) = self.directory.parent() {
            sync_directory(store)?;
        }
        for disk in &disks {
            check_disk(disk)?;
        }
        self.write_catalogue(Catalogue {
            version: CATALOGUE_VERSION,
            vm: self.vm.clone(),
            owner: owner.to_owned(),
            disks,
            applied: 0,
            applied_at: self.clock.now(),
            applied_app_consistent: false,
            committing_app_consistent: false,
            committing: None,
            points: Vec::new(),
            test_failover: None,
            failover: None,
            external_disks: None,
            seeded: false,
            reinitialize: false,
            handover: false,
            stamps: Vec::new(),
            compare_required: None,
        })
    }

    /// A copy that had to be compared (seeded by hand, or changed outside blockrep) was
    /// compared by its primary: its disks carry the primary's ids from now on, and it is an
    /// ordinary replica.
    pub fn adopt_seed(&mut self, disks: Vec<DiskDescription>) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        catalogue.disks = disks;
        catalogue.seeded = false;
        catalogue.compare_required = None;
        self.write_catalogue(catalogue)
    }

    /// Starts staging `delta`, dropping anything staged before.
    pub fn start_staging(&mut self, delta: DeltaId, kind: DeltaKind) -> Result<()> {
        self.discard_staging();
        let descriptions = self.catalogue()?.disks.clone();
        if kind == DeltaKind::Initial && self.catalogue()?.external_disks.is_some() {
            return Err(self.refusal(
                "an adopted disk takes changes only, never an initial replication".into(),
            ));
        }
        // The protocol refuses it first; the store, which would drop the points, checks too.
        if kind == DeltaKind::Initial
            && self.catalogue()?.applied > 0
            && !self.catalogue()?.reinitialize
        {
            return Err(self.refusal(
                "an initial replication would replace the replica and its recovery points: the replica host's operator must allow it first (`blockrep reinitialize`)".into(),
            ));
        }
        self.staging = Some(match kind {
            DeltaKind::Initial => {
                let mut disks = Vec::with_capacity(descriptions.len());
                for (index, description) in descriptions.iter().enumerate() {
                    disks.push(self.create_disk(&self.initial_path(index), description)?);
                }
                Staging::Initial { delta, disks }
            }
            DeltaKind::Changes => Staging::Changes {
                delta,
                file: BundleWriter::create(&self.directory.join(STAGE), &self.storage)?,
            },
        });
        Ok(())
    }

    /// Verifies chunk `payload` (a delta) for `disk` and stages it. A chunk that is damaged or
    /// does not fit the disk is refused, and nothing of it is staged.
    pub fn stage_chunk(&mut self, delta: DeltaId, disk: u16, payload: &[u8]) -> Result<()> {
        let description = *self
            .catalogue()?
            .disks
            .get(usize::from(disk))
            .ok_or_else(|| self.refusal(format!("chunk for disk {disk}, which does not exist")))?;
        let name = format!("{}: chunk of {delta} for disk {disk}", self.vm);
        let header = payload
            .get(..HEADER_SIZE)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| "truncated: shorter than a delta header".to_owned())
            .and_then(DeltaHeader::decode)
            .map_err(|problem| Error::Delta {
                name: name.clone(),
                problem,
            })?;
        if header.virtual_size != description.virtual_size
            || (!header.disk_id.is_nil() && header.disk_id != description.disk_id)
            || header.sequence != delta.sequence
        {
            return Err(self.refusal(format!(
                "{name} is for disk {} of {} bytes at sequence {}",
                header.disk_id, header.virtual_size, header.sequence
            )));
        }
        match &mut self.staging {
            Some(Staging::Initial {
                delta: staged,
                disks,
            }) if *staged == delta => {
                // One pass: each extent is written once its own checksum holds. A chunk found
                // damaged part-way is refused and sent again, and its resend overwrites what it
                // wrote; the new disk is not the replica until the commit, which flushes it.
                write_delta(Cursor::new(payload), &name, &mut disks[usize::from(disk)])?;
                Ok(())
            }
            Some(Staging::Changes {
                delta: staged,
                file,
            }) if *staged == delta => {
                verify_delta(Cursor::new(payload), &name)?;
                file.append(disk, payload)
            }
            _ => Err(self.refusal(format!("{delta} is not being staged"))),
        }
    }

    /// Makes the staged `delta` the replica's state on every disk, atomically.
    pub fn commit(&mut self, delta: DeltaId, kind: DeltaKind, app_consistent: bool) -> Result<()> {
        let staging = self.staging.take();
        match (staging, kind) {
            (
                Some(Staging::Initial {
                    delta: staged,
                    disks,
                }),
                DeltaKind::Initial,
            ) if staged == delta => {
                for disk in disks {
                    disk.close()?;
                }
                self.close_disks();
                if self.tracked.take().is_some() {
                    self.detached = true;
                }
                self.mark_committing(Some((delta, kind)), false)?;
                crash_point("replica-initial-commit");
                self.finish_initial(delta)
            }
            (
                Some(Staging::Changes {
                    delta: staged,
                    file,
                    ..
                }),
                DeltaKind::Changes,
            ) if staged == delta => {
                file.flush()?;
                drop(file);
                self.refuse_changed_disks()?;
                if self.policy.keep > 0 || self.pinned > 0 {
                    // What the delta overwrites, kept before the commit point: a redo after a
                    // crash must not take half-applied blocks for the old ones.
                    self.write_undo(delta)?;
                }
                self.mark_committing(Some((delta, kind)), app_consistent)?;
                self.finish_changes(delta)
            }
            (other, _) => {
                self.staging = other;
                Err(self.refusal(format!("{delta} is not what is staged")))
            }
        }
    }

    /// Reads the replica's disks, for checks and tests: disk `index`, `buf.len()` bytes at
    /// `offset`.
    pub fn read_disk(&mut self, index: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        self.open_disks()?;
        self.disks
            .get(index)
            .ok_or_else(|| self.refusal(format!("no disk {index}")))?
            .read_at(buf, offset)
    }

    /// The latest state and the kept recovery points, newest first.
    pub fn points(&self) -> Vec<PointInfo> {
        let Some(catalogue) = &self.catalogue else {
            return Vec::new();
        };
        let mut points = vec![PointInfo {
            id: catalogue.applied,
            time: catalogue.applied_at,
            latest: true,
            app_consistent: catalogue.applied_app_consistent,
            bytes_kept: 0,
        }];
        for point in catalogue.points.iter().rev() {
            let bytes_kept = point
                .undo
                .iter()
                .filter_map(|name| std::fs::metadata(self.directory.join(name)).ok())
                .map(|metadata| metadata.len())
                .sum();
            points.push(PointInfo {
                id: point.sequence,
                time: point.time,
                latest: false,
                app_consistent: point.app_consistent,
                bytes_kept,
            });
        }
        points
    }

    pub fn descriptions(&self) -> Vec<DiskDescription> {
        self.catalogue
            .as_ref()
            .map(|catalogue| catalogue.disks.clone())
            .unwrap_or_default()
    }

    /// Ranges of replica disk `index` that may hold data.
    pub(crate) fn allocated_ranges(&mut self, index: usize) -> Result<Vec<std::ops::Range<u64>>> {
        self.open_disks()?;
        self.disks
            .get(index)
            .ok_or_else(|| self.refusal(format!("no disk {index}")))?
            .allocated_ranges()
    }

    /// Holds every undo file and point until `unpin`, for a reader of them (a test failover);
    /// returns the latest sequence now.
    pub fn pin(&mut self) -> u64 {
        self.pinned += 1;
        self.applied()
    }

    /// Ends a `pin`; with none left, what was held for the readers is deleted.
    pub fn unpin(&mut self) {
        self.pinned = self.pinned.saturating_sub(1);
        if self.pinned > 0 {
            return;
        }
        let referenced: std::collections::HashSet<String> = self
            .catalogue
            .iter()
            .flat_map(|catalogue| catalogue.points.iter().flat_map(|point| point.undo.clone()))
            .collect();
        let mut unneeded = std::mem::take(&mut self.pending_deletions);
        unneeded.extend(
            std::mem::take(&mut self.recent_undo)
                .into_iter()
                .map(|(_, name)| name)
                .filter(|name| !referenced.contains(name)),
        );
        self.delete_undo(unneeded);
    }

    /// The undo files that take the current latest state back to `target`, in the order to
    /// apply them. `pinned_at` is the latest state when the caller pinned: reaching it needs
    /// only the deltas applied since, which the pin kept.
    pub fn undo_path_to(&self, target: u64, pinned_at: u64) -> Result<Vec<PathBuf>> {
        let names = if target == self.applied() {
            Vec::new()
        } else if target == pinned_at {
            let mut recent: Vec<&(u64, String)> = self
                .recent_undo
                .iter()
                .filter(|(sequence, _)| *sequence > target)
                .collect();
            recent.sort_by_key(|(sequence, _)| std::cmp::Reverse(*sequence));
            recent.into_iter().map(|(_, name)| name.clone()).collect()
        } else {
            undo_chain(&self.catalogue()?.points, target)
                .ok_or_else(|| self.refusal(format!("no recovery point {target} is kept")))?
        };
        Ok(names
            .into_iter()
            .map(|name| self.directory.join(name))
            .collect())
    }

    /// Where the VM's test failover copy is, if one exists.
    pub(crate) fn test_failover(&self) -> Option<PathBuf> {
        self.catalogue
            .as_ref()
            .and_then(|catalogue| catalogue.test_failover.clone())
    }

    /// Records (or clears) the VM's test failover copy.
    pub(crate) fn set_test_failover(&mut self, out: Option<PathBuf>) -> Result<()> {
        if out.is_some() {
            self.refuse_pending_commit()?;
        }
        let mut catalogue = self.catalogue()?.clone();
        catalogue.test_failover = out;
        self.write_catalogue(catalogue)
    }

    /// The operator allows the next initial replication from the primary to replace this
    /// replica, dropping its recovery points (`blockrep reinitialize`).
    pub fn allow_reinitialize(&mut self) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        catalogue.reinitialize = true;
        self.write_catalogue(catalogue)
    }

    /// The operator allows the next planned failover to this site, which drops the recovery
    /// points (`blockrep allow-handover`).
    pub fn allow_handover(&mut self) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        if catalogue.failover.is_some() {
            // A consent given now would wait for a handover long after this one ends.
            return Err(self.refusal(
                "has failed over to this site: a planned failover from here hands it back, with no points to lose".into(),
            ));
        }
        catalogue.handover = true;
        self.write_catalogue(catalogue)
    }

    /// Whether a primary's planned failover at `sequence` may take the VM over here: the
    /// replica must be at that delta, and the recovery points (which the VM running here
    /// would make useless) go only with the operator's consent, so that a primary alone can
    /// never erase them.
    pub fn check_take_over(&self, sequence: u64) -> Result<()> {
        let catalogue = self.catalogue()?;
        if catalogue.applied != sequence {
            return Err(self.refusal(format!(
                "handed over at delta {sequence}, but delta {} is applied here",
                catalogue.applied
            )));
        }
        match self.handover_needs_consent() {
            Some(refusal) => Err(self.refusal(refusal)),
            None => Ok(()),
        }
    }

    /// Why a planned failover to this site needs the operator's consent first: it would drop
    /// recovery points, and none was given. `None` when it may go ahead.
    pub fn handover_needs_consent(&self) -> Option<String> {
        let catalogue = self.catalogue.as_ref()?;
        let points = catalogue.points.len();
        (points > 0 && !catalogue.handover).then(|| format!(
            "a planned failover to this site drops the replica's {points} recovery point{}: the replica host's operator must allow it first (`blockrep allow-handover {}`)",
            if points == 1 { "" } else { "s" },
            self.vm
        ))
    }

    /// The failover of the VM to this site, if there is one.
    pub fn failover(&self) -> Option<FailoverRecord> {
        self.catalogue
            .as_ref()
            .and_then(|catalogue| catalogue.failover.clone())
    }

    /// Where failover disks are made: beside the replica's, until committed.
    pub fn failover_directory(&self) -> PathBuf {
        self.directory.join("failover")
    }

    /// Records an unplanned failover to `point` (its disks being made in
    /// `failover_directory`): from now on the primary is refused. Returns the attempt the copy
    /// is made for (see [`VmReplica::failover_copied`]).
    pub fn begin_failover(&mut self, point: u64) -> Result<u64> {
        self.refuse_pending_commit()?;
        let attempt = crate::resync::random_seed()?;
        let mut catalogue = self.catalogue()?.clone();
        catalogue.failover = Some(FailoverRecord {
            point,
            committed: false,
            planned: false,
            reverse: false,
            resync: true,
            handing_back: None,
            copied: false,
            attempt,
        });
        self.write_catalogue(catalogue)?;
        Ok(attempt)
    }

    /// Why the replica's disks may differ from what it applied (changed outside blockrep, not
    /// yet compared with the primary), if they may.
    pub fn compare_required(&self) -> Option<&str> {
        self.catalogue
            .as_ref()
            .and_then(|catalogue| catalogue.compare_required.as_deref())
    }

    /// Whether `attempt` is the unplanned failover under way (not cancelled, not committed):
    /// a copy made for it may go on.
    pub fn failover_attempt_stands(&self, attempt: u64) -> bool {
        self.failover()
            .is_some_and(|failover| !failover.committed && failover.attempt == attempt)
    }

    /// The unplanned failover's disks are made: durable (each was flushed when closed; their
    /// names are flushed now) and recorded complete, so that they may be committed.
    pub fn failover_copied(&mut self, attempt: u64) -> Result<()> {
        if !self.failover_attempt_stands(attempt) {
            return Err(
                self.refusal("the failover this copy was made for was cancelled or is done".into())
            );
        }
        sync_directory(&self.failover_directory())?;
        sync_directory(&self.directory)?;
        let mut catalogue = self.catalogue()?.clone();
        if let Some(failover) = &mut catalogue.failover {
            failover.copied = true;
        }
        self.write_catalogue(catalogue)
    }

    /// Finishes a commit that failed after it was recorded (a full disk, an I/O error left
    /// delta N half applied, "committing N" in the catalogue): a failover must start from a
    /// whole delta, never copy half of one or carry the record into a VM that runs here.
    /// Refused, with why, when it still cannot be finished.
    pub fn settle_commit(&mut self) -> Result<()> {
        let Some((delta, kind)) = self.catalogue()?.committing else {
            return Ok(());
        };
        tracing::info!(vm = %self.vm, %delta, "finishing a commit that failed before a failover");
        self.staging = None;
        let finished = match kind {
            DeltaKind::Initial => self.finish_initial(delta),
            DeltaKind::Changes => self.finish_changes(delta),
        };
        finished.map_err(|error| {
            self.refusal(format!(
                "{delta} failed to commit and still cannot be finished ({error}); free space or mend the disk, then try again"
            ))
        })
    }

    /// Refuses a failover step while a commit that failed is still recorded.
    fn refuse_pending_commit(&self) -> Result<()> {
        match self.catalogue()?.committing {
            Some((delta, _)) => Err(self.refusal(format!(
                "{delta} failed to commit and is not finished: settle it first (`settle_commit`)"
            ))),
            None => Ok(()),
        }
    }

    /// Drops a failover that was not committed: its disks go, replication may resume.
    pub(crate) fn cancel_failover(&mut self) -> Result<()> {
        match self.failover() {
            None => return Err(self.refusal("has not failed over".into())),
            Some(failover) if failover.committed => {
                return Err(
                    self.refusal("the failover is committed; it cannot be cancelled".into())
                );
            }
            Some(_) => {}
        }
        let _ = std::fs::remove_dir_all(self.failover_directory());
        let mut catalogue = self.catalogue()?.clone();
        catalogue.failover = None;
        self.write_catalogue(catalogue)
    }

    /// Makes the failover disks the VM's disks for good: they replace the replica disks, and
    /// the recovery points (histories of the replica the VM left) are dropped.
    pub fn commit_failover(&mut self) -> Result<Vec<PathBuf>> {
        let Some(failover) = self.failover() else {
            return Err(self.refusal("has not failed over".into()));
        };
        if failover.committed {
            return Err(self.refusal("the failover is already committed".into()));
        }
        if !failover.copied {
            return Err(self.refusal(
                "the failover's disks are still being made, or their copy was interrupted: wait for it, or cancel (`blockrep failover VM --cancel`) and fail over again".into(),
            ));
        }
        self.close_disks();
        let catalogue = self.catalogue()?.clone();
        for index in 0..catalogue.disks.len() {
            let from = self.failover_directory().join(format!("disk-{index}.vhdx"));
            let to = self.disk_path(index);
            if from.exists() {
                std::fs::rename(&from, &to).map_err(|error| {
                    Error::file(&to.display().to_string(), "commit the failover disk", error)
                })?;
            }
        }
        sync_directory(&self.directory)?;
        let _ = std::fs::remove_dir(self.failover_directory());
        self.run_here(
            catalogue,
            FailoverRecord {
                committed: true,
                ..failover
            },
        )?;
        Ok(self.disk_paths())
    }

    /// A planned failover handed the VM over at delta `sequence` (the disks compared equal):
    /// it runs here now. The recovery points go (the VM writes the disks from now on), so the
    /// operator's consent is required when there are any (`check_take_over`); it is used up.
    pub fn take_over(&mut self, sequence: u64, reverse: bool) -> Result<()> {
        self.check_take_over(sequence)?;
        let mut catalogue = self.catalogue()?.clone();
        catalogue.handover = false;
        self.run_here(
            catalogue,
            FailoverRecord {
                point: sequence,
                committed: true,
                planned: true,
                reverse,
                resync: false,
                handing_back: None,
                copied: false,
                attempt: 0,
            },
        )
    }

    /// Records that the VM runs here (`failover`, committed): its recovery points go, since
    /// the VM writes the disks from now on.
    fn run_here(&mut self, mut catalogue: Catalogue, failover: FailoverRecord) -> Result<()> {
        self.refuse_pending_commit()?;
        let dropped: Vec<String> = catalogue
            .points
            .drain(..)
            .flat_map(|point| point.undo)
            .collect();
        catalogue.failover = Some(failover);
        // The VM writes the disks from now on.
        catalogue.stamps.clear();
        self.write_catalogue(catalogue)?;
        self.delete_undo(dropped);
        Ok(())
    }

    /// Asks (or stops asking) for replication back to the old primary once it connects.
    pub(crate) fn set_reverse(&mut self, reverse: bool) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        match &mut catalogue.failover {
            Some(failover) if failover.active() => failover.reverse = reverse,
            Some(_) => {
                return Err(self.refusal(
                    "the failover is not committed: commit it (`blockrep failover VM --commit`) before reversing".into(),
                ));
            }
            None => return Err(self.refusal("has not failed over to this site".into())),
        }
        self.write_catalogue(catalogue)
    }

    /// Reverse replication compared and shipped what differed: no resync is owed any more.
    pub(crate) fn resynchronized(&mut self) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        if let Some(failover) = &mut catalogue.failover {
            failover.resync = false;
        }
        self.write_catalogue(catalogue)
    }

    /// Records (`Some`) or drops (`None`) a failback under way at final delta `sequence`:
    /// see [`FailoverRecord::handing_back`].
    pub(crate) fn set_handing_back(&mut self, sequence: Option<u64>) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        let Some(failover) = catalogue.failover.as_mut() else {
            return Err(self.refusal("does not run at this site".into()));
        };
        failover.handing_back = sequence;
        self.write_catalogue(catalogue)
    }

    /// The VM was handed back (a planned failover the other way) at delta `sequence`: this is
    /// a replica again, at that delta.
    pub fn hand_back(&mut self, sequence: u64) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        catalogue.failover = None;
        // The VM wrote the disks: their stamps are taken again at the next commit or open.
        catalogue.stamps.clear();
        catalogue.applied = sequence;
        catalogue.applied_at = self.clock.now();
        catalogue.applied_app_consistent = false;
        self.write_catalogue(catalogue)
    }

    /// Creates an empty disk like replica disk `index`, at `path`.
    pub(crate) fn create_copy(&self, index: usize, path: &Path) -> Result<Disk> {
        let description = *self
            .catalogue()?
            .disks
            .get(index)
            .ok_or_else(|| self.refusal(format!("no disk {index}")))?;
        self.create_disk(path, &description)
    }

    /// Why a replica disk differs from how this store left it, if one does: another program
    /// wrote it, or a copy was put in its place. Compared before anything writes the disks.
    /// A disk an interrupted initial replication replaces whole, the disks a VM that runs here
    /// writes, and disks applied through onward tracking (their journal watches them) are not
    /// compared.
    fn changed_outside(&mut self) -> Result<Option<String>> {
        let Some(catalogue) = &self.catalogue else {
            return Ok(None);
        };
        let initial_interrupted = matches!(catalogue.committing, Some((_, DeltaKind::Initial)));
        if catalogue.stamps.is_empty()
            || initial_interrupted
            || catalogue
                .failover
                .as_ref()
                .is_some_and(FailoverRecord::active)
        {
            return Ok(None);
        }
        // After a crash in the middle of an apply, a raw disk's times moved with its writes.
        let times_moved = catalogue.committing.is_some();
        let recorded = catalogue.stamps.clone();
        self.open_disks()?;
        for (index, (disk, recorded)) in self.disks.iter().zip(&recorded).enumerate() {
            if let Some(change) = recorded.changed_since(&disk.content_stamp()?, times_moved) {
                let path = self.disk_path(index);
                return Ok(Some(format!("replica disk {}: {change}", path.display())));
            }
        }
        Ok(None)
    }

    /// Records each disk's stamp as it is now, and `changed` (why the disks must be compared)
    /// until they are. The stamps are not moved here: onward tracking, when it opens the disks,
    /// checks them against its own journal first.
    fn stamp_disks(&mut self, changed: Option<String>) -> Result<()> {
        let Some(catalogue) = &self.catalogue else {
            return Ok(());
        };
        if catalogue.applied == 0
            || catalogue
                .failover
                .as_ref()
                .is_some_and(FailoverRecord::active)
        {
            return Ok(());
        }
        if let Some(reason) = &changed {
            tracing::warn!(vm = %self.vm, %reason, "a replica disk changed outside blockrep: the primary must compare before more is applied");
        }
        self.open_disks()?;
        let stamps = self.current_stamps()?;
        if changed.is_none() && self.catalogue()?.stamps == stamps {
            return Ok(());
        }
        let mut catalogue = self.catalogue()?.clone();
        catalogue.stamps = stamps;
        let mut dropped = Vec::new();
        if changed.is_some() {
            catalogue.compare_required = changed;
            dropped = untrusted_points(&mut catalogue, &self.vm);
        }
        self.write_catalogue(catalogue)?;
        self.delete_undo(dropped);
        Ok(())
    }

    /// The open disks' stamps, in order.
    fn current_stamps(&self) -> Result<Vec<ContentStamp>> {
        self.disks.iter().map(|disk| disk.content_stamp()).collect()
    }

    /// Refuses to apply over a disk changed outside blockrep since the last commit (checked
    /// before each apply, while the disks stay open): the change is recorded, so that the
    /// primary compares before anything more is applied.
    fn refuse_changed_disks(&mut self) -> Result<()> {
        let recorded = self.catalogue()?.stamps.clone();
        if recorded.is_empty() {
            return Ok(());
        }
        self.open_disks()?;
        let mut change = None;
        for (index, (disk, recorded)) in self.disks.iter().zip(&recorded).enumerate() {
            if let Some(found) = recorded.changed_since(&disk.content_stamp()?, false) {
                change = Some(format!(
                    "replica disk {}: {found}",
                    self.disk_path(index).display()
                ));
                break;
            }
        }
        let Some(change) = change else {
            return Ok(());
        };
        let mut catalogue = self.catalogue()?.clone();
        catalogue.compare_required = Some(change.clone());
        let dropped = untrusted_points(&mut catalogue, &self.vm);
        self.write_catalogue(catalogue)?;
        self.delete_undo(dropped);
        Err(self.refusal(format!("{change}: resynchronization required")))
    }

    fn recover(&mut self) -> Result<()> {
        let Some(catalogue) = &self.catalogue else {
            return Ok(());
        };
        if let Some((delta, _)) = catalogue.committing
            && catalogue
                .failover
                .as_ref()
                .is_some_and(FailoverRecord::active)
        {
            // Carried into a VM that runs here by an older version: redoing it would write an
            // old delta over the running VM's disks.
            tracing::warn!(vm = %self.vm, %delta, "dropping an unfinished commit recorded before the VM ran here");
            let mut catalogue = catalogue.clone();
            catalogue.committing = None;
            self.write_catalogue(catalogue)?;
            self.discard_staging();
            return Ok(());
        }
        let Some(catalogue) = &self.catalogue else {
            return Ok(());
        };
        match catalogue.committing {
            Some((delta, DeltaKind::Initial)) => {
                tracing::info!(vm = %self.vm, %delta, "finishing an initial replication interrupted by a crash");
                self.finish_initial(delta)?;
            }
            Some((delta, DeltaKind::Changes)) => {
                tracing::info!(vm = %self.vm, %delta, "redoing a commit interrupted by a crash");
                // The redo's first write moves the disks' stamps, as the first try's did: the
                // move is recorded first, so that a redo that fails too (the store still full)
                // is not taken for a change made outside blockrep.
                let app_consistent = catalogue.committing_app_consistent;
                self.open_disks()?;
                self.mark_committing(Some((delta, DeltaKind::Changes)), app_consistent)?;
                self.finish_changes(delta)?;
            }
            None => self.discard_staging(),
        }
        self.remove_orphan_undo();
        Ok(())
    }

    /// Deletes undo files no point names: written for a delta whose commit a crash prevented.
    fn remove_orphan_undo(&self) {
        let Some(catalogue) = &self.catalogue else {
            return;
        };
        let referenced: std::collections::HashSet<&String> = catalogue
            .points
            .iter()
            .flat_map(|point| &point.undo)
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.directory) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("undo-") && name.ends_with(".bundle") && !referenced.contains(&name)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Renames the new disks into place (those not renamed before a crash), then records
    /// the delta applied.
    fn finish_initial(&mut self, delta: DeltaId) -> Result<()> {
        for index in 0..self.catalogue()?.disks.len() {
            let from = self.initial_path(index);
            if from.exists() {
                let to = self.disk_path(index);
                std::fs::rename(&from, &to).map_err(|error| {
                    Error::file(
                        &to.display().to_string(),
                        "rename initial replica into place",
                        error,
                    )
                })?;
            }
        }
        sync_directory(&self.directory)?;
        self.mark_applied(delta, DeltaKind::Initial)?;
        self.open_disks()?;
        self.stamp_disks(None)
    }

    /// Applies the stage file to the disks, flushes them, then records the delta applied.
    fn finish_changes(&mut self, delta: DeltaId) -> Result<()> {
        self.open_disks()?;
        // As `mark_committing` recorded them.
        for disk in &mut self.disks {
            disk.begin_writes()?;
        }
        let stage = self.directory.join(STAGE);
        {
            let gate = Arc::clone(&self.gate);
            let _applying = gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Part of the delta on the disks, the rest not: the worst moment to die.
            apply_bundle(&stage, &mut self.disks, || crash_point("replica-apply"))?;
            for disk in &mut self.disks {
                disk.flush()?;
            }
        }
        self.mark_applied(delta, DeltaKind::Changes)?;
        let _ = std::fs::remove_file(&stage);
        if let Err(error) = self.compact_points() {
            // The points stay usable uncompacted; only space is lost.
            tracing::warn!(vm = %self.vm, %error, "cannot compact recovery points");
        }
        Ok(())
    }

    /// Merges the undo files of every point but the newest into one file each: a point then
    /// costs the union of what its deltas overwrote, not their sum (a block rewritten every
    /// cycle of the hour is kept once). The newest point's list still grows, so it waits.
    fn compact_points(&mut self) -> Result<()> {
        if self.pinned > 0 {
            return Ok(());
        }
        let points = self.catalogue()?.points.clone();
        for (index, point) in points
            .iter()
            .enumerate()
            .take(points.len().saturating_sub(1))
        {
            if point.undo.len() > 1 {
                self.compact_point(index, point)?;
            }
        }
        Ok(())
    }

    /// Replays `point`'s undo files, newest first, into sparse scratch files (so the oldest
    /// contents win), then writes the union of their extents as one file.
    fn compact_point(&mut self, index: usize, point: &RecoveryPoint) -> Result<()> {
        let descriptions = self.catalogue()?.disks.clone();
        let mut scratch_paths = Vec::with_capacity(descriptions.len());
        let mut images = Vec::with_capacity(descriptions.len());
        let mut union: Vec<Vec<std::ops::Range<u64>>> = vec![Vec::new(); descriptions.len()];
        for (disk, description) in descriptions.iter().enumerate() {
            let path = self.directory.join(format!("compact-{disk}.scratch"));
            let name = path.display().to_string();
            let scratch = crate::io::FileStorage::create(&path)
                .and_then(|scratch| scratch.set_len(description.virtual_size).map(|()| scratch))
                .map_err(|error| Error::file(&name, "create scratch", error))?;
            let storage: Box<dyn Storage> = Box::new(scratch);
            images.push(RawImage::open(storage, &name, Access::ReadWrite)?);
            scratch_paths.push(path);
        }
        let outcome = (|| -> Result<String> {
            for name in &point.undo {
                let path = self.directory.join(name);
                apply_bundle(&path, &mut images, || {})?;
                for (disk, extents) in bundle_extents(&path, descriptions.len())?
                    .into_iter()
                    .enumerate()
                {
                    union[disk].extend(extents);
                }
            }
            let union: Vec<Vec<std::ops::Range<u64>>> =
                union.into_iter().map(super::bundle::merge_ranges).collect();
            let merged = format!("undo-point-{}-{}.bundle", point.sequence, point.undo.len());
            let mut writer = BundleWriter::create(&self.directory.join(&merged), &self.storage)?;
            write_contents(
                &mut writer,
                &images,
                &union,
                &undo_headers(&descriptions, point.sequence),
            )?;
            writer.flush()?;
            sync_directory(&self.directory)?;
            Ok(merged)
        })();
        drop(images);
        for path in &scratch_paths {
            let _ = std::fs::remove_file(path);
        }
        let merged = outcome?;
        let mut catalogue = self.catalogue()?.clone();
        let old = std::mem::replace(&mut catalogue.points[index].undo, vec![merged]);
        self.write_catalogue(catalogue)?;
        self.delete_undo(old);
        Ok(())
    }

    /// Writes what the staged delta will overwrite, as `undo-N.bundle`, durably.
    fn write_undo(&mut self, delta: DeltaId) -> Result<()> {
        self.open_disks()?;
        let descriptions = self.catalogue()?.disks.clone();
        let extents = bundle_extents(&self.directory.join(STAGE), descriptions.len())?;
        let headers = undo_headers(&descriptions, delta.sequence - 1);
        let mut writer = BundleWriter::create(
            &self.directory.join(undo_name(delta.sequence)),
            &self.storage,
        )?;
        write_contents(&mut writer, &self.disks, &extents, &headers)?;
        writer.flush()?;
        sync_directory(&self.directory)
    }

    fn mark_committing(
        &mut self,
        committing: Option<(DeltaId, DeltaKind)>,
        app_consistent: bool,
    ) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        catalogue.committing = committing;
        catalogue.committing_app_consistent = app_consistent;
        if committing.is_some_and(|(_, kind)| kind == DeltaKind::Changes) && !self.disks.is_empty()
        {
            // The stamps the apply's first write leaves (it moves them: `finish_changes`),
            // recorded with the commit point, before they move: a redo after a failure or a
            // crash then finds the disks as recorded.
            catalogue.stamps = self
                .disks
                .iter()
                .map(|disk| disk.stamp_after_begin_writes())
                .collect::<Result<_>>()?;
        }
        self.write_catalogue(catalogue)
    }

    /// Records `delta` applied and keeps or drops recovery points by the policy; undo files no
    /// longer needed are deleted once the catalogue no longer names them.
    fn mark_applied(&mut self, delta: DeltaId, kind: DeltaKind) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        let mut unneeded = Vec::new();
        match kind {
            DeltaKind::Initial => {
                // The disks were replaced whole: no undo leads back from them.
                unneeded.extend(catalogue.points.drain(..).flat_map(|point| point.undo));
                catalogue.reinitialize = false;
                // New disks, whole: nothing outside blockrep changed them.
                catalogue.compare_required = None;
            }
            DeltaKind::Changes => {
                let undo = undo_name(delta.sequence);
                if self.directory.join(&undo).exists() {
                    if self.pinned > 0 {
                        self.recent_undo.push((delta.sequence, undo.clone()));
                    }
                    if self.policy.keep == 0 {
                        // Only a test failover wanted it: it goes when that ends.
                        if self.pinned == 0 {
                            unneeded.push(undo);
                        }
                    } else {
                        let policy = PointPolicy {
                            // No point expires while a test failover reads them.
                            keep: if self.pinned > 0 {
                                usize::MAX
                            } else {
                                self.policy.keep
                            },
                            ..self.policy
                        };
                        unneeded = record_applied(
                            &mut catalogue.points,
                            policy,
                            delta.sequence,
                            (catalogue.applied_at, catalogue.applied_app_consistent),
                            undo,
                        );
                    }
                } else if !catalogue.points.is_empty() {
                    tracing::warn!(vm = %self.vm, "no undo data for {delta} (recovery points were off): older recovery points dropped");
                    unneeded.extend(catalogue.points.drain(..).flat_map(|point| point.undo));
                }
            }
        }
        catalogue.applied = delta.sequence;
        catalogue.applied_at = self.clock.now();
        catalogue.applied_app_consistent =
            kind == DeltaKind::Changes && catalogue.committing_app_consistent;
        catalogue.committing = None;
        catalogue.committing_app_consistent = false;
        if kind == DeltaKind::Changes && !self.disks.is_empty() {
            // A disk's first write of a session moves its stamp, a raw disk's every write:
            // recorded with the delta.
            catalogue.stamps = self.current_stamps()?;
        }
        self.write_catalogue(catalogue)?;
        self.delete_undo(unneeded);
        Ok(())
    }

    /// Deletes undo files, or holds them while a test failover may read them.
    fn delete_undo(&mut self, names: Vec<String>) {
        if self.pinned > 0 {
            self.pending_deletions.extend(names);
            return;
        }
        for name in names {
            let _ = std::fs::remove_file(self.directory.join(name));
        }
    }

    /// Replaces the catalogue atomically: write beside, flush, rename, flush the directory.
    fn write_catalogue(&mut self, catalogue: Catalogue) -> Result<()> {
        let path = self.directory.join(CATALOGUE);
        let temporary = self.directory.join(format!("{CATALOGUE}.new"));
        let name = path.display().to_string();
        let bytes = serde_json::to_vec_pretty(&catalogue).map_err(|error| Error::Replication {
            peer: name.clone(),
            problem: format!("cannot write the catalogue: {error}"),
        })?;
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temporary)?;
            std::io::Write::write_all(&mut file, &bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|error| Error::file(&name, "write catalogue", error))?;
        sync_directory(&self.directory)?;
        self.catalogue = Some(catalogue);
        Ok(())
    }

    fn open_disks(&mut self) -> Result<()> {
        if !self.disks.is_empty() {
            return Ok(());
        }
        if let Some(tracked) = &self.tracked {
            self.disks = tracked
                .iter()
                .map(|disk| Box::new(SharedDisk(Arc::clone(disk))) as OpenDisk)
                .collect();
            return Ok(());
        }
        // All or none: a disk that fails to open leaves none open.
        let mut disks = Vec::new();
        let mut locks = Vec::new();
        for path in self.disk_paths() {
            locks.push(FileLock::open(&path)?);
            disks.push(crate::protect::open_image(&path, &self.storage)?.0);
        }
        self.disks = disks;
        self.disk_locks = locks;
        Ok(())
    }

    /// Closes the open disks and lets go of their locks.
    fn close_disks(&mut self) {
        self.disks.clear();
        self.disk_locks.clear();
    }

    /// Every disk's block hashes under `seed`.
    pub fn block_hashes(&mut self, seed: u64) -> Result<Vec<crate::resync::BlockHashes>> {
        self.open_disks()?;
        self.disks
            .iter()
            .map(|disk| crate::resync::BlockHashes::compute(&**disk, seed, &|_| {}))
            .collect()
    }

    /// Every disk's digest under `seed` (the root of its block hashes).
    pub fn digests(&mut self, seed: u64) -> Result<Vec<u128>> {
        Ok(self
            .block_hashes(seed)?
            .iter()
            .map(crate::resync::BlockHashes::digest)
            .collect())
    }

    /// Closes the open disks (so that another part of the process may open them).
    pub fn release_disks(&mut self) {
        self.close_disks();
    }

    /// Applies through `disks` (the same files, tracked by whoever replicates them onward)
    /// from now on, instead of opening the files itself.
    pub(crate) fn track_with(&mut self, disks: Vec<Arc<ProtectedDisk>>) -> Result<()> {
        self.close_disks();
        self.tracked = Some(disks);
        // Onward tracking stamped them anew as it opened them.
        self.stamp_disks(None)
    }

    /// Another writer takes the disks (onward tracking about to open them, which stamps them
    /// anew; the VM running here): the stamps recorded no longer describe them, and are taken
    /// again once this store writes them again (at its next commit or open).
    pub(crate) fn forget_stamps(&mut self) -> Result<()> {
        match &self.catalogue {
            Some(catalogue) if !catalogue.stamps.is_empty() => {
                let mut catalogue = catalogue.clone();
                catalogue.stamps.clear();
                self.write_catalogue(catalogue)
            }
            _ => Ok(()),
        }
    }

    /// Stops applying through tracked disks.
    pub(crate) fn untrack(&mut self) {
        self.close_disks();
        self.tracked = None;
    }

    /// Held around each apply: a cut taken while holding it falls between two deltas.
    pub(crate) fn apply_gate(&self) -> Arc<Mutex<()>> {
        Arc::clone(&self.gate)
    }

    /// Whether an initial replication replaced the files under the tracked disks since last
    /// asked (onward replication must start again from the new files).
    pub(crate) fn take_detached(&mut self) -> bool {
        std::mem::take(&mut self.detached)
    }

    fn create_disk(&self, path: &Path, description: &DiskDescription) -> Result<Disk> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|error| Error::file(&name, "create replica disk", error))?;
        let storage = file_storage(file, &self.storage)
            .map_err(|error| Error::file(&name, "create replica disk", error))?;
        let sector = SectorSize::new(u64::from(description.logical_sector))
            .map_err(|reason| self.refusal(reason))?;
        VhdxImage::create(
            storage,
            &name,
            &VhdxCreateOptions {
                virtual_size: description.virtual_size,
                block_size: BlockSize::DEFAULT,
                fixed: false,
                logical_sector_size: sector,
                physical_sector_size: SectorSize::Bytes4096,
                disk_id: Some(description.disk_id),
            },
        )
    }

    fn discard_staging(&mut self) {
        self.staging = None;
        let _ = std::fs::remove_file(self.directory.join(STAGE));
        for index in 0..self
            .catalogue
            .as_ref()
            .map_or(0, |catalogue| catalogue.disks.len())
        {
            let _ = std::fs::remove_file(self.initial_path(index));
        }
    }

    fn catalogue(&self) -> Result<&Catalogue> {
        self.catalogue
            .as_ref()
            .ok_or_else(|| self.refusal("the VM has no replica yet".into()))
    }

    fn disk_path(&self, index: usize) -> PathBuf {
        let external = self
            .catalogue
            .as_ref()
            .and_then(|catalogue| catalogue.external_disks.as_ref())
            .and_then(|paths| paths.get(index));
        match external {
            Some(path) => path.clone(),
            None => self.directory.join(format!("disk-{index}.vhdx")),
        }
    }

    fn initial_path(&self, index: usize) -> PathBuf {
        self.directory.join(format!("disk-{index}.vhdx.initial"))
    }

    fn refusal(&self, problem: String) -> Error {
        Error::Replication {
            peer: self.vm.clone(),
            problem,
        }
    }
}

/// Kills the process with SIGKILL at the named point when `BLOCKREP_CRASH_POINT` names it:
/// how the crash tests stop a real server between two steps of a commit, exactly there.
pub fn crash_point(name: &str) {
    static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| std::env::var("BLOCKREP_CRASH_POINT").ok());
    if chosen.as_deref() == Some(name) {
        tracing::warn!(point = name, "BLOCKREP_CRASH_POINT: killing the process");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// What a failover means for replication from the primary.
pub fn fence_for(failover: &FailoverRecord) -> Fence {
    Fence {
        reason: if failover.committed {
            format!(
                "failed over to the replica site from point {} and committed: replication from this primary has ended",
                failover.point
            )
        } else {
            format!(
                "failed over to the replica site from point {} (not committed): replication resumes if the failover is cancelled",
                failover.point
            )
        },
        permanent: failover.committed,
    }
}

/// Headers for undo deltas that lead back to state `sequence`.
fn undo_headers(descriptions: &[DiskDescription], sequence: u64) -> Vec<DeltaHeader> {
    descriptions
        .iter()
        .map(|disk| DeltaHeader {
            disk_id: disk.disk_id,
            virtual_size: disk.virtual_size,
            block_size: 64 << 10,
            source_generation: sequence,
            sequence,
            recovery_point: true,
            full: false,
        })
        .collect()
}

fn undo_name(sequence: u64) -> String {
    format!("undo-{sequence}.bundle")
}

/// A disk changed outside blockrep: every recovery point would be rebuilt from its undo over
/// the foreign bytes, which no undo holds the old contents of, so none is what it says it is.
/// They are dropped (their undo files named for deletion), loudly.
fn untrusted_points(catalogue: &mut Catalogue, vm: &str) -> Vec<String> {
    if !catalogue.points.is_empty() {
        tracing::warn!(%vm, points = catalogue.points.len(), "recovery points dropped: a replica disk changed outside blockrep, and they would rebuild that change");
    }
    catalogue
        .points
        .drain(..)
        .flat_map(|point| point.undo)
        .collect()
}

fn check_disk(disk: &DiskDescription) -> Result<()> {
    let sector = u64::from(disk.logical_sector);
    if disk.virtual_size == 0
        || disk.virtual_size > 64 << 40
        || SectorSize::new(sector).is_err()
        || !disk.virtual_size.is_multiple_of(sector)
    {
        return Err(Error::InvalidArgument {
            what: "replica disk",
            reason: format!(
                "{} bytes with {}-byte sectors cannot be a VHDX disk",
                disk.virtual_size, disk.logical_sector
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        let limits = super::super::Limits {
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
}
