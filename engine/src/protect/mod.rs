//! The primary side's disks: a protected VM's images with their change tracking and journals,
//! and the deltas cut from them, as chunks. It prepares what the protocol asks for (an initial
//! replication, or a cycle's changes frozen at one instant across every disk) and hands out
//! chunks by index; it knows nothing of the network.
//!
//! Each disk's journal lives beside it (`IMAGE.brtrack`). A journal that is new, missing or
//! cannot be trusted, or a disk changed while it was not tracked, means the replica must be
//! rebuilt or compared: `tracking` says so, and why.

mod handover;

pub use handover::{AfterHandover, HandoverMark, after_handover};

use crate::delta::{Compression, DeltaEncoder, DeltaHeader, Spool, chunk_pieces};
use crate::image::{Access, BlockImage, ImageFormat, RawImage, VhdxImage};
use crate::io::{
    FileLock, FileStorage, Storage, StorageOptions, file_storage, remove_if_present, sync_directory,
};
use crate::planted::{Bug, is_planted};
use crate::proto::{CHUNK_DISK_BYTES, DeltaId, DeltaKind, DiskDescription, Tracking};
use crate::resync::BlockHashes;
use crate::track::{
    Cut, DEFAULT_GRANULARITY, DEFAULT_REGION_SIZE, DirtyBitmap, Journal, JournalIdentity,
    PreserveBlocks, Recovered, TrackedDisk,
};
use crate::{Error, Result};
use bytes::Bytes;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// A disk of a protected VM, tracked.
pub type ProtectedDisk = TrackedDisk<Box<dyn BlockImage>>;

/// What a prepared delta's chunks come from.
enum Source {
    /// Initial replication: each chunk is ranges of one disk, read when sent.
    Live(Vec<(u16, Vec<Range<u64>>)>),
    /// A cycle's changes, frozen in the spool; the generations cut, per disk.
    Spooled {
        spool: Arc<Spool>,
        generations: Vec<u64>,
    },
}

struct Prepared {
    delta: DeltaId,
    kind: DeltaKind,
    source: Source,
}

/// A protected VM's disks on the primary.
pub struct ProtectedVm {
    paths: Vec<PathBuf>,
    /// How the VM's files are opened (and layered, in the simulator): its spools too.
    storage: StorageOptions,
    disks: Vec<Arc<ProtectedDisk>>,
    descriptions: Vec<DiskDescription>,
    tracking: Tracking,
    compression: Compression,
    prepared: Mutex<Option<Arc<Prepared>>>,
    /// Held while cutting: whoever else writes the disks in steps that must not be split by a
    /// cut (a replica applying a delta) holds it around each step.
    gate: Option<Arc<Mutex<()>>>,
    /// Every image and journal, locked for this VM alone until it is closed: a second
    /// `protect` of the same disk would track it twice and each would ship half.
    _locks: Vec<FileLock>,
}

impl std::fmt::Debug for ProtectedVm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ProtectedVm")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// `IMAGE.brtrack.owed`: present while the replica has not caught up with a disk whose
/// tracking could not vouch for it. It holds why (empty for a disk newly protected).
fn owed_path(image: &Path) -> PathBuf {
    let mut name = journal_path(image).into_os_string();
    name.push(".owed");
    PathBuf::from(name)
}

/// Where a marker is written before it is renamed into place.
fn owed_temporary(image: &Path) -> PathBuf {
    let mut name = owed_path(image).into_os_string();
    name.push(".new");
    PathBuf::from(name)
}

/// The most of a marker's reason that is read back: it is our own text, but a file all the same.
const OWED_REASON_BYTES: u64 = 4096;

/// Writes the marker that a copy or comparison is owed, durably, unless one is there already
/// (its reason, from the run that found the loss, is kept).
fn owe_copy(image: &Path, tracking: &Tracking, storage: &StorageOptions) -> Result<()> {
    let path = owed_path(image);
    if path.exists() && !matches!(tracking, Tracking::Lost(_)) {
        return Ok(());
    }
    let reason = match tracking {
        Tracking::Lost(reason) => reason.as_str(),
        Tracking::New | Tracking::Vouches => "",
    };
    let name = path.display().to_string();
    storage
        .replace_file(&path, &owed_temporary(image), reason.as_bytes())
        .map_err(|error| Error::file(&name, "create", error))?;
    storage.sync_directory(path.parent().unwrap_or(Path::new(".")))
}

/// What a marker left by an earlier run says is owed: `None` when there is none.
fn owed_copy(image: &Path) -> Result<Option<Tracking>> {
    use std::io::Read;
    let path = owed_path(image);
    let mut reason = Vec::new();
    match std::fs::File::open(&path) {
        Ok(file) => file
            .take(OWED_REASON_BYTES)
            .read_to_end(&mut reason)
            .map_err(|error| Error::file(&path.display().to_string(), "read", error))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(Error::file(&path.display().to_string(), "open", error)),
    };
    Ok(Some(if reason.is_empty() {
        Tracking::New
    } else {
        Tracking::Lost(String::from_utf8_lossy(&reason).into_owned())
    }))
}

/// The stronger of two reasons a copy is owed: a loss is reported over a new disk.
fn worse(first: Tracking, second: Tracking) -> Tracking {
    match (first, second) {
        (Tracking::Lost(reason), _) | (_, Tracking::Lost(reason)) => Tracking::Lost(reason),
        (Tracking::New, _) | (_, Tracking::New) => Tracking::New,
        (Tracking::Vouches, Tracking::Vouches) => Tracking::Vouches,
    }
}

/// Starts tracking afresh for disks that have just become a VM's own (a failover made them
/// from a replica): their old journals, if any, no longer describe them.
pub fn forget_tracking(paths: &[PathBuf]) -> Result<()> {
    for path in paths {
        remove_if_present(&journal_path(path))?;
    }
    Ok(())
}

/// Removes what a first protection of `paths` wrote beside them (each journal and owed
/// marker), when it ended before the replica held anything: a refused first start leaves the
/// disks as it found them. Tracking that was new vouched for nothing, so nothing is lost.
pub fn remove_new_tracking(paths: &[PathBuf]) -> Result<()> {
    for path in paths {
        remove_if_present(&journal_path(path))?;
        remove_if_present(&owed_path(path))?;
        remove_if_present(&owed_temporary(path))?;
        if let Some(directory) = path.parent() {
            sync_directory(directory)?;
        }
    }
    Ok(())
}

/// `IMAGE.brtrack`: the disk's tracking journal.
pub fn journal_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".brtrack");
    PathBuf::from(name)
}

impl ProtectedVm {
    /// Opens the VM's disk images for writing, with their tracking journals. Writes made
    /// through [`ProtectedVm::disks`] are tracked; the first open of a disk asks for an
    /// initial replication.
    ///
    /// ```
    /// use blockrep::delta::Compression;
    /// use blockrep::proto::{DeltaId, DeltaKind};
    /// use blockrep::io::StorageOptions;
    /// use blockrep::protect::ProtectedVm;
    ///
    /// # fn main() -> blockrep::Result<()> {
    /// let directory = tempfile::tempdir().unwrap();
    /// let disk = directory.path().join("vm1.raw");
    /// std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap(); // a 4 MiB raw disk
    /// let vm = ProtectedVm::open(&[disk], &StorageOptions::default(), Compression::Lz4)?;
    /// assert!(vm.tracking().owes_copy(), "a new journal cannot vouch for any replica");
    ///
    /// // The guest's writes go through the tracked disk.
    /// vm.disks()[0].write_at(&[7u8; 8192], 1 << 20)?;
    ///
    /// // A cycle's cut: the changed blocks, frozen at one instant, as chunks to ship.
    /// let delta = DeltaId { sequence: 1, cut: 42 };
    /// let chunk_bytes = vm.prepare(delta, DeltaKind::Changes)?;
    /// assert_eq!(chunk_bytes.iter().sum::<u64>(), 64 << 10, "one 64 KiB block changed");
    /// # Ok(())
    /// # }
    /// ```
    pub fn open(
        paths: &[PathBuf],
        storage: &StorageOptions,
        compression: Compression,
    ) -> Result<Self> {
        let mut disks = Vec::new();
        let mut descriptions = Vec::new();
        let mut tracking = Tracking::Vouches;
        // Every disk is ours before any journal or marker is touched.
        let mut locks = paths
            .iter()
            .map(|path| FileLock::open(path))
            .collect::<Result<Vec<_>>>()?;
        for path in paths {
            let journal = journal_path(path);
            let journal_locked = journal.exists();
            if journal_locked {
                locks.push(FileLock::open(&journal)?);
            }
            let (disk, description, found) = open_disk(path, storage)?;
            if !journal_locked {
                locks.push(FileLock::open(&journal)?);
            }
            // A marker left by an earlier run that never caught up still stands.
            let owed = owed_copy(path)?.unwrap_or_default();
            tracking = worse(tracking, worse(owed, found));
            disks.push(Arc::new(disk));
            descriptions.push(description);
        }
        if let Tracking::Lost(reason) = &tracking {
            tracing::warn!(disks = ?paths, %reason, "resynchronization required");
        }
        if tracking.owes_copy() {
            // Until the replica has caught up (an initial replication or a comparison), a
            // journal that survives a stop or a crash must not vouch for it.
            for path in paths {
                owe_copy(path, &tracking, storage)?;
            }
        }
        Ok(ProtectedVm {
            paths: paths.to_vec(),
            storage: storage.clone(),
            disks,
            descriptions,
            tracking,
            compression,
            prepared: Mutex::new(None),
            gate: None,
            _locks: locks,
        })
    }

    /// Cuts wait for `gate`, so that they fall between the steps of whoever holds it.
    pub(crate) fn with_gate(mut self, gate: Arc<Mutex<()>>) -> Self {
        self.gate = Some(gate);
        self
    }

    pub fn descriptions(&self) -> &[DiskDescription] {
        &self.descriptions
    }

    /// The replica caught up (a delta after an initial replication or a comparison by hash is
    /// applied): tracking vouches for it from now on, across stops and crashes.
    pub fn caught_up(&self) -> Result<()> {
        for path in &self.paths {
            self.storage.remove_if_present(&owed_path(path))?;
            self.storage.remove_if_present(&owed_temporary(path))?;
        }
        Ok(())
    }

    /// The last delta the replica confirmed holding these disks' changes, as every journal
    /// says (the least of them); `None` before any.
    pub fn acknowledged_delta(&self) -> Option<u64> {
        self.disks
            .iter()
            .map(|disk| disk.acknowledged_delta().unwrap_or(0))
            .min()
            .filter(|&delta| delta > 0)
    }

    /// Whether tracking vouches for the replica, and if not why (a disk newly protected, a
    /// journal lost, a disk changed while it was not tracked).
    pub fn tracking(&self) -> &Tracking {
        &self.tracking
    }

    pub fn disks(&self) -> &[Arc<ProtectedDisk>] {
        &self.disks
    }

    pub(crate) fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Prepares `delta` and returns the disk bytes of each of its chunks. Changes are cut on
    /// every disk at one instant and spooled beside the first disk, frozen at the cut.
    pub fn prepare(&self, delta: DeltaId, kind: DeltaKind) -> Result<Vec<u64>> {
        let (source, chunk_bytes) = match kind {
            DeltaKind::Initial => {
                let mut chunks = Vec::new();
                let mut bytes = Vec::new();
                for (index, disk) in self.disks.iter().enumerate() {
                    let allocated = disk.image().allocated_ranges()?;
                    for piece in chunk_pieces(&allocated, CHUNK_DISK_BYTES) {
                        bytes.push(piece.iter().map(|range| range.end - range.start).sum());
                        chunks.push((index as u16, piece));
                    }
                }
                (Source::Live(chunks), bytes)
            }
            DeltaKind::Changes => {
                let _gate = self.gate.as_ref().map(|gate| {
                    gate.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                });
                let spool = Arc::new(Spool::create(&self.spool_path(), &self.storage)?);
                let (generations, bytes) = self.spool_changes(delta, &spool)?;
                (Source::Spooled { spool, generations }, bytes)
            }
        };
        *self.lock_prepared() = Some(Arc::new(Prepared {
            delta,
            kind,
            source,
        }));
        Ok(chunk_bytes)
    }

    /// Chunk `index` of the prepared delta: its disk, and the chunk (a delta of format v1).
    pub fn chunk(
        &self,
        delta: DeltaId,
        index: u32,
        encoder: &mut DeltaEncoder,
    ) -> Result<(u16, Bytes)> {
        let prepared = self
            .lock_prepared()
            .clone()
            .filter(|prepared| prepared.delta == delta)
            .ok_or_else(|| Error::InvalidArgument {
                what: "chunk",
                reason: format!("{delta} is not prepared"),
            })?;
        match &prepared.source {
            Source::Spooled { spool, .. } => spool.chunk(index),
            Source::Live(chunks) => {
                let (disk, ranges) =
                    chunks
                        .get(index as usize)
                        .ok_or_else(|| Error::InvalidArgument {
                            what: "chunk",
                            reason: format!("{delta} has no chunk {index}"),
                        })?;
                // Encoded straight from the image, read live (initial replication is made
                // consistent by the changes delta that follows it).
                let header = self.header(*disk, delta, prepared.kind, 0);
                let mut chunk = Vec::new();
                let image = self.disks[usize::from(*disk)].image();
                encoder.encode(
                    &**image,
                    ranges,
                    &header,
                    &mut chunk,
                    "chunk",
                    self.compression,
                )?;
                Ok((*disk, Bytes::from(chunk)))
            }
        }
    }

    /// The replica applied `delta`: tracking forgets its changes, the spool goes.
    pub fn acknowledge(&self, delta: DeltaId) -> Result<()> {
        let prepared = {
            let mut slot = self.lock_prepared();
            match &*slot {
                Some(prepared) if prepared.delta == delta => slot.take(),
                _ => None,
            }
        };
        let Some(prepared) = prepared else {
            return Ok(());
        };
        match &prepared.source {
            Source::Spooled { generations, .. } => {
                for (disk, generation) in self.disks.iter().zip(generations) {
                    disk.acknowledge_delta(*generation, delta.sequence)?;
                }
            }
            // An initial replication forgets no changes (the changes delta after it ships
            // them), but the replica holds its sequence.
            Source::Live(_) => {
                for disk in &self.disks {
                    disk.acknowledge_delta(0, delta.sequence)?;
                }
            }
        }
        if let Source::Spooled { spool, .. } = &prepared.source {
            spool.remove()?;
        }
        Ok(())
    }

    /// Every disk's block hashes under `seed`, read live (each read takes the disk's lock on
    /// its own, so the VM's writes go on between them).
    pub fn block_hashes(&self, seed: u64) -> Result<Vec<BlockHashes>> {
        self.block_hashes_with_progress(seed, &|_| {})
    }

    /// The same, saying how many bytes of all the disks are hashed so far.
    pub(crate) fn block_hashes_with_progress(
        &self,
        seed: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Vec<BlockHashes>> {
        let mut done = 0;
        let mut hashes = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            let base = done;
            hashes.push(BlockHashes::compute(
                &SharedDisk(Arc::clone(disk)),
                seed,
                &|bytes| progress(base + bytes),
            )?);
            done += disk.virtual_size();
        }
        Ok(hashes)
    }

    /// Every disk's digest under `seed` (the root of its block hashes): what a planned
    /// failover compares, with writes stopped.
    pub fn digests(&self, seed: u64) -> Result<Vec<u128>> {
        Ok(self
            .block_hashes(seed)?
            .iter()
            .map(BlockHashes::digest)
            .collect())
    }

    /// Each disk's ranges changed and not yet acknowledged by the replica.
    pub fn pending_extents(&self) -> Vec<Vec<Range<u64>>> {
        self.disks
            .iter()
            .map(|disk| disk.pending_extents())
            .collect()
    }

    /// Counts `ranges` of disk `disk` as changed: they ship with the next delta.
    pub fn mark_changed(&self, disk: usize, ranges: &[Range<u64>]) -> Result<()> {
        let disk = self.disks.get(disk).ok_or_else(|| Error::InvalidArgument {
            what: "disk",
            reason: format!("no disk {disk}"),
        })?;
        for range in ranges {
            disk.mark_changed(range.start, range.end - range.start)?;
        }
        Ok(())
    }

    /// Clean shutdown: flushes every disk and stores its unacknowledged changes in its
    /// journal. The disks must no longer be shared (the NBD server stopped).
    pub fn close(self) -> Result<()> {
        drop(self.prepared);
        let mut first_error = None;
        for (disk, path) in self.disks.into_iter().zip(&self.paths) {
            let outcome = match Arc::try_unwrap(disk) {
                Ok(disk) => disk.close().map(drop),
                Err(_) => Err(Error::InvalidArgument {
                    what: "shutdown",
                    reason: format!("{} is still in use", path.display()),
                }),
            };
            if let Err(error) = outcome {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn spool_path(&self) -> PathBuf {
        let mut name = self.paths[0].as_os_str().to_owned();
        name.push(".brspool");
        PathBuf::from(name)
    }

    fn header(&self, disk: u16, delta: DeltaId, kind: DeltaKind, generation: u64) -> DeltaHeader {
        let description = &self.descriptions[usize::from(disk)];
        DeltaHeader {
            disk_id: description.disk_id,
            virtual_size: description.virtual_size,
            block_size: self.disks[usize::from(disk)].granularity() as u32,
            source_generation: generation,
            sequence: delta.sequence,
            recovery_point: true,
            full: kind == DeltaKind::Initial,
        }
    }

    /// Cuts every disk at one instant and spools its changes as they were at the cut.
    fn spool_changes(&self, delta: DeltaId, spool: &Arc<Spool>) -> Result<(Vec<u64>, Vec<u64>)> {
        let disks: Vec<&ProtectedDisk> = self.disks.iter().map(|disk| &**disk).collect();
        let generation_of = |disk: &ProtectedDisk| disk.generation();
        let preservers: Vec<Arc<dyn PreserveBlocks>> = disks
            .iter()
            .enumerate()
            .map(|(index, disk)| {
                Arc::new(SpoolPreserver {
                    spool: Arc::clone(spool),
                    disk: index as u16,
                    header: self.header(
                        index as u16,
                        delta,
                        DeltaKind::Changes,
                        generation_of(disk),
                    ),
                    compression: self.compression,
                    encoder: Mutex::new(DeltaEncoder::new()),
                }) as Arc<dyn PreserveBlocks>
            })
            .collect();
        let cuts = TrackedDisk::cut_together(&disks, Some(preservers));
        let outcome = self.read_cuts(delta, spool, &disks, &cuts);
        let mut ended = Ok(());
        for disk in &disks {
            if let Err(error) = disk.end_snapshot() {
                ended = Err(error);
            }
        }
        match outcome.and(ended) {
            Ok(()) => Ok((
                cuts.iter().map(|cut| cut.generation).collect(),
                spool.chunk_disk_bytes(),
            )),
            Err(error) => {
                for (disk, cut) in disks.iter().zip(&cuts) {
                    disk.requeue(cut);
                }
                Err(error)
            }
        }
    }

    fn read_cuts(
        &self,
        delta: DeltaId,
        spool: &Spool,
        disks: &[&ProtectedDisk],
        cuts: &[Cut],
    ) -> Result<()> {
        let mut encoder = DeltaEncoder::new();
        let mut data = Vec::new();
        for (index, (disk, cut)) in disks.iter().zip(cuts).enumerate() {
            let header = self.header(index as u16, delta, DeltaKind::Changes, cut.generation);
            for piece in chunk_pieces(&cut.extents(), CHUNK_DISK_BYTES) {
                let start = piece[0].start;
                let end = piece[piece.len() - 1].end;
                data.resize((end - start) as usize, 0);
                let mut read = Vec::new();
                for range in &piece {
                    let into =
                        &mut data[(range.start - start) as usize..(range.end - start) as usize];
                    read.extend(disk.read_snapshot(into, range.start)?);
                }
                if read.is_empty() {
                    continue;
                }
                let chunk = encoder.encode_chunk(&header, start, &data, &read, self.compression)?;
                let bytes = read.iter().map(|range| range.end - range.start).sum();
                spool.append(index as u16, &chunk, bytes)?;
            }
        }
        Ok(())
    }

    fn lock_prepared(&self) -> std::sync::MutexGuard<'_, Option<Arc<Prepared>>> {
        self.prepared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Spools the old contents of a block a write is about to change, as a chunk of its own.
struct SpoolPreserver {
    spool: Arc<Spool>,
    disk: u16,
    header: DeltaHeader,
    compression: Compression,
    encoder: Mutex<DeltaEncoder>,
}

impl PreserveBlocks for SpoolPreserver {
    fn preserve(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut encoder = self
            .encoder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let range = offset..offset + data.len() as u64;
        let chunk = encoder.encode_chunk(
            &self.header,
            offset,
            data,
            std::slice::from_ref(&range),
            self.compression,
        )?;
        self.spool.append(self.disk, &chunk, data.len() as u64)
    }
}

/// A tracked disk seen as an image, shared: each call takes the disk's lock on its own (hashing
/// a live disk must not hold its writers off for the whole pass), and writes are tracked (a
/// replica server applying deltas to disks it also replicates onward).
pub(crate) struct SharedDisk(pub(crate) Arc<ProtectedDisk>);

impl BlockImage for SharedDisk {
    fn virtual_size(&self) -> u64 {
        self.0.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)
    }

    fn zero_range(&mut self, offset: u64, length: u64) -> Result<()> {
        self.0.zero_range(offset, length)
    }

    fn flush(&mut self) -> Result<()> {
        self.0.flush()
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>> {
        self.0.image().allocated_ranges()
    }

    fn content_stamp(&self) -> Result<crate::image::ContentStamp> {
        self.0.image().content_stamp()
    }
}

/// Opens a disk image for writing: VHDX or raw, by its extension, else by its first bytes
/// (a VHDX file taken for raw would be corrupted by the first write). Returns the image, its
/// disk id (nil for raw) and its logical sector size.
pub(crate) fn open_image(
    path: &Path,
    storage: &StorageOptions,
) -> Result<(Box<dyn BlockImage>, Uuid, u32)> {
    let name = path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| Error::file(&name, "open", error))?;
    let store = file_storage(file, storage).map_err(|error| Error::file(&name, "open", error))?;
    let format = match ImageFormat::from_extension(path) {
        Some(format) => format,
        None => ImageFormat::detect(&*store).map_err(|error| Error::file(&name, "read", error))?,
    };
    Ok(match format {
        ImageFormat::Vhdx => {
            let image = VhdxImage::open(store, &name, Access::ReadWrite)?;
            let (id, sector) = (image.disk_id(), image.logical_sector_size().bytes() as u32);
            (Box::new(image), id, sector)
        }
        ImageFormat::Raw => (
            Box::new(RawImage::open(store, &name, Access::ReadWrite)?),
            Uuid::nil(),
            512,
        ),
    })
}

/// A raw image has no id of its own: it is named by its absolute path, so that the id is the
/// same again when the journal that kept it is lost (the replica then still knows the disk,
/// and is compared by hash instead of copied again).
fn raw_disk_id(path: &Path) -> Uuid {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        absolute.as_os_str().as_encoded_bytes(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A journal reopened, with what it recovered.
struct Reopened {
    journal: Journal<Box<dyn Storage>>,
    recovered: Recovered,
    identity: JournalIdentity,
}

/// Reopens a disk's journal. `Err(Tracking)` when there is none (`New`) or when it cannot
/// vouch for the disk (`Lost`, with why: damaged, or the disk changed while not tracked); an
/// error when the journal cannot be read (a full or failing disk), so that a journal that may
/// be intact is not thrown away.
fn reopen_journal(
    journal_path: &Path,
    journal_name: &str,
    storage: &StorageOptions,
    image: &dyn BlockImage,
    disk_id: uuid::Uuid,
) -> Result<std::result::Result<Reopened, Tracking>> {
    let file = match FileStorage::open(journal_path, true) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Err(Tracking::New));
        }
        Err(error) => return Err(Error::file(journal_name, "open journal", error)),
    };
    let storage = storage.layered(Box::new(file));
    let found = image.content_stamp()?;
    let opened = Journal::stored_identity(&storage, journal_name).and_then(|stored| {
        // A raw image has no id of its own: the journal keeps the one it was given.
        let identity = JournalIdentity {
            disk_id: if disk_id.is_nil() {
                stored.disk_id
            } else {
                disk_id
            },
            virtual_size: image.virtual_size(),
            ..stored
        };
        let (journal, recovered) = Journal::open(storage, journal_name, identity, &found)?;
        Ok(Reopened {
            journal,
            recovered,
            identity,
        })
    });
    match opened {
        Ok(opened) => Ok(Ok(opened)),
        Err(Error::TrackingLost { reason, .. }) => Ok(Err(Tracking::Lost(reason))),
        Err(error) => Err(error),
    }
}

/// Opens one disk with its journal: continuing tracking when the journal holds, starting
/// afresh when it is new or cannot vouch for the disk, and saying which.
fn open_disk(
    path: &Path,
    storage: &StorageOptions,
) -> Result<(ProtectedDisk, DiskDescription, Tracking)> {
    let (image, disk_id, logical_sector) = open_image(path, storage)?;
    let journal_path = journal_path(path);
    let journal_name = journal_path.display().to_string();
    let virtual_size = image.virtual_size();
    let reopened = reopen_journal(&journal_path, &journal_name, storage, &*image, disk_id)?;
    let (journal, recovered, identity, tracking) = match reopened {
        Ok(Reopened {
            journal,
            recovered,
            identity,
        }) => (journal, recovered, identity, Tracking::Vouches),
        Err(tracking) => {
            if let Tracking::Lost(reason) = &tracking {
                tracing::warn!(journal = %journal_name, %reason, "tracking lost: resynchronization required; replacing the journal");
            }
            // The marker is durable before the journal that could not vouch is replaced: a
            // crash in between must not leave a fresh journal that vouches for nothing.
            let marker_first = !is_planted(Bug::JournalBeforeMarker);
            if marker_first {
                owe_copy(path, &tracking, storage)?;
            }
            let identity = JournalIdentity {
                disk_id: if disk_id.is_nil() {
                    raw_disk_id(path)
                } else {
                    disk_id
                },
                virtual_size,
                granularity: DEFAULT_GRANULARITY,
                region_size: DEFAULT_REGION_SIZE,
            };
            let file = storage
                .create_file(&journal_path, false)
                .map_err(|error| Error::file(&journal_name, "create journal", error))?;
            let journal = Journal::create(
                storage.layered(Box::new(FileStorage::from_file(file))),
                &journal_name,
                identity,
            )?;
            if !marker_first {
                owe_copy(path, &tracking, storage)?;
            }
            let recovered = Recovered {
                dirty: DirtyBitmap::new(virtual_size.div_ceil(identity.granularity)),
                next_generation: 1,
                after_crash: false,
            };
            (journal, recovered, identity, tracking)
        }
    };
    let description = DiskDescription {
        disk_id: identity.disk_id,
        virtual_size,
        logical_sector,
    };
    let disk = TrackedDisk::with_journal(image, journal, recovered)?;
    Ok((disk, description, tracking))
}
