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
//!
//! Here: the store, its catalogue and a VM's open replica. Beside it: `commit` (staging, the
//! commit and its redo), `undo` (recovery points), `failover` (the failover record and the
//! operator's consents), `stamps` (disks changed outside blockrep) and `onward` (hashes, and
//! tracking for extended replication).

use super::bundle::{BundleWriter, apply_bundle, bundle_extents, write_contents};
use super::points::{PointPolicy, RecoveryPoint, record_applied, undo_chain};
use crate::delta::{DeltaHeader, HEADER_SIZE};
use crate::delta::{verify_delta, write_delta};
use crate::image::vhdx::{BlockSize, SectorSize, VhdxCreateOptions};
use crate::image::{Access, BlockImage, ContentStamp, RawImage, VhdxImage};
use crate::io::{FileLock, Storage, StorageOptions, file_storage};
use crate::protect::{ProtectedDisk, SharedDisk};
use crate::proto::{DeltaId, DeltaKind, DiskDescription, Fence, ReplicaVmRecord};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod commit;
mod failover;
mod onward;
mod stamps;
mod undo;

use commit::Staging;
pub use failover::{FailoverRecord, fence_for};
use undo::{undo_headers, undo_name, untrusted_points};

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
            replica
                .storage()
                .rename(&path, &replica.disk_path(index))
                .map_err(|error| {
                    Error::file(&path.display().to_string(), "seed the replica disk", error)
                })?;
        }
        replica.storage().sync_directory(&replica.directory)?;
        let mut catalogue = replica.catalogue()?.clone();
        catalogue.applied = 1;
        catalogue.seeded = true;
        replica.write_catalogue(catalogue)?;
        Ok(replica.disk_paths())
    }

    /// Forgets `vm` when the store only keeps the record of the host's own disks (adopted:
    /// they stay where they are, for the VM to run on); refused for a replica whose disks live
    /// in the store, which forgetting would delete.
    pub fn forget_adopted(&self, vm: &str) -> Result<()> {
        check_vm_name(vm)?;
        let catalogue_path = self.root.join(vm).join(CATALOGUE);
        let bytes = match std::fs::read(&catalogue_path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => {
                return Err(Error::file(
                    &catalogue_path.display().to_string(),
                    "read catalogue",
                    error,
                ));
            }
        };
        // A catalogue without adopted disks and without disk files of its own is an adopt a
        // crash interrupted (its first catalogue write): nothing of value to keep.
        let holds_disks = std::fs::read_dir(self.root.join(vm))
            .map_err(|error| Error::file(&self.root.join(vm).display().to_string(), "list", error))?
            .flatten()
            .any(|entry| {
                entry
                    .path()
                    .extension()
                    .is_some_and(|extension| extension == "vhdx")
            });
        if parse_catalogue(&catalogue_path, &bytes)?
            .external_disks
            .is_none()
            && holds_disks
        {
            return Err(Error::Replication {
                peer: vm.to_owned(),
                problem:
                    "its replica's disks live in the store: not forgotten, which would delete them"
                        .into(),
            });
        }
        self.forget(vm)
    }

    /// Removes what the store holds of `vm` (its adopted disks stay where they are).
    pub fn forget(&self, vm: &str) -> Result<()> {
        check_vm_name(vm)?;
        let directory = self.root.join(vm);
        match self.storage.remove_dir_all(&directory) {
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

    /// Reads the replica's disks, for checks and tests: disk `index`, `buf.len()` bytes at
    /// `offset`.
    pub fn read_disk(&mut self, index: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        self.open_disks()?;
        self.disks
            .get(index)
            .ok_or_else(|| self.refusal(format!("no disk {index}")))?
            .read_at(buf, offset)
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

    /// Replaces the catalogue atomically: write beside, flush, rename, flush the directory.
    fn write_catalogue(&mut self, catalogue: Catalogue) -> Result<()> {
        let path = self.directory.join(CATALOGUE);
        let temporary = self.directory.join(format!("{CATALOGUE}.new"));
        let name = path.display().to_string();
        let bytes = serde_json::to_vec_pretty(&catalogue).map_err(|error| Error::Replication {
            peer: name.clone(),
            problem: format!("cannot write the catalogue: {error}"),
        })?;
        self.storage
            .replace_file(&path, &temporary, &bytes)
            .map_err(|error| Error::file(&name, "write catalogue", error))?;
        self.storage.sync_directory(&self.directory)?;
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

    /// How this replica's files are opened and its directory changed.
    pub(crate) fn storage(&self) -> &StorageOptions {
        &self.storage
    }

    /// Its disks are the host's own, kept where they are (`ReplicaStore::adopt`), not the
    /// store's.
    pub fn is_adopted(&self) -> bool {
        self.catalogue
            .as_ref()
            .is_some_and(|catalogue| catalogue.external_disks.is_some())
    }

    /// Closes the open disks (so that another part of the process may open them).
    pub fn release_disks(&mut self) {
        self.close_disks();
    }

    fn create_disk(&self, path: &Path, description: &DiskDescription) -> Result<Disk> {
        let name = path.display().to_string();
        let file = self
            .storage
            .create_file(path, true)
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
/// how the lab tests stop a real daemon between two steps, exactly there. Debug builds only
/// (what `cargo test` runs): a release build has no such switch. The engine's crash
/// coverage is the simulator's, which cuts a host's power through the storage layer at every
/// step (`StorageLayer::with_power_check`); these few points check the real processes end to
/// end.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn crash_point(_name: &str) {}

/// See the release build's `crash_point`.
#[cfg(debug_assertions)]
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
mod tests;
