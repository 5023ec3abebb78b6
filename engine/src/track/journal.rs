//! The tracking journal (format v1, `docs/formats/journal.md`): what makes tracking survive
//! restarts and crashes. A clean shutdown stores the dirty bitmap; while tracking runs, the
//! first write to each coarse region in a generation is preceded by a durable mark of that
//! region (a modified-region table). After a crash, the stored bitmap plus every region marked
//! since the last acknowledged generation count as changed: a bounded superset, never a miss.
//! A journal that is missing, damaged or about another disk is reported, never trusted, and so
//! is one whose disk's content stamp (a VHDX DataWriteGuid, a raw file's identity and times)
//! moved while blockrep was not tracking it: another program wrote the disk, or an older copy
//! was put in its place.

use super::DirtyBitmap;
use crate::image::ContentStamp;
use crate::io::{FileStamp, Storage};
use crate::{Error, Result};
use std::sync::Mutex;
use uuid::Uuid;

const JOURNAL_VERSION: u16 = 2;
/// Where the disk's content stamp sits in the header page: its kind, then its fields.
const STAMP_OFFSET: usize = 80;
const STAMP_NONE: u32 = 0;
const STAMP_DATA_WRITE: u32 = 1;
const STAMP_FILE: u32 = 2;
/// Where the last delta sequence the replica confirmed sits in the header page.
const DELTA_OFFSET: usize = 136;
const MAGIC: &[u8; 8] = b"BRTRACK\n";
const PAGE: u64 = 4096;
const ENTRIES_PER_PAGE: u64 = 511;
const STATE_ACTIVE: u32 = 1;
const STATE_CLEAN: u32 = 2;
/// Coarse region size for the modified-region table unless told otherwise.
pub(crate) const DEFAULT_REGION_SIZE: u64 = 64 << 20;

/// Which disk a journal belongs to, and how it tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalIdentity {
    pub disk_id: Uuid,
    pub virtual_size: u64,
    pub granularity: u64,
    pub region_size: u64,
}

impl JournalIdentity {
    /// Why this tracking setup is impossible, if it is: every size below is divided by these,
    /// and a journal's header is read from a file that may be damaged or crafted.
    fn problem(&self) -> Option<String> {
        if !self.granularity.is_power_of_two() || !(4096..=64 << 20).contains(&self.granularity) {
            return Some(format!(
                "granularity {} is not a power of two from 4 KiB to 64 MiB",
                self.granularity
            ));
        }
        if !self.region_size.is_power_of_two()
            || self.region_size < self.granularity
            || self.region_size > u64::from(u32::MAX)
        {
            return Some(format!(
                "region size {} is not a power of two from the granularity to 2 GiB",
                self.region_size
            ));
        }
        None
    }

    fn blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.granularity)
    }
    fn regions(&self) -> u64 {
        self.virtual_size.div_ceil(self.region_size)
    }
    fn region_pages(&self) -> u64 {
        self.regions().div_ceil(ENTRIES_PER_PAGE)
    }
    fn bitmap_offset(&self) -> u64 {
        PAGE * (1 + self.region_pages())
    }
    fn bitmap_length(&self) -> u64 {
        self.blocks().div_ceil(64) * 8
    }
}

#[derive(Debug)]
struct State {
    /// Generation of each region's last mark; 0 = never.
    regions: Vec<u64>,
    generation: u64,
    acknowledged: u64,
    /// The disk's stamp: as this session found and left it while active, as it was closed
    /// when clean.
    stamp: ContentStamp,
    /// The last delta the replica confirmed applying with these changes (0: none yet).
    acknowledged_delta: u64,
}

/// An open journal. All methods make their change durable before returning.
pub struct Journal<S: Storage> {
    storage: S,
    name: String,
    identity: JournalIdentity,
    state: Mutex<State>,
}

impl<S: Storage> std::fmt::Debug for Journal<S> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Journal")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// What opening a journal recovered.
#[derive(Debug)]
pub struct Recovered {
    /// Blocks to count as changed.
    pub dirty: DirtyBitmap,
    /// The generation tracking continues with.
    pub next_generation: u64,
    /// True when the journal was not closed cleanly (a crash): `dirty` includes whole regions.
    pub after_crash: bool,
}

fn lost(name: &str, reason: impl Into<String>) -> Error {
    Error::TrackingLost {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// A journal read that failed. A journal shorter than its layout has lost its content; any
/// other failure is the storage's (a full or failing disk), which the caller must see rather
/// than throw tracking away: the journal may be intact once the disk is.
fn read_failed(name: &str, offset: u64, error: std::io::Error) -> Error {
    if error.kind() == std::io::ErrorKind::UnexpectedEof {
        lost(name, format!("journal truncated before byte {offset}"))
    } else {
        Error::file(name, "read journal", error)
    }
}

impl<S: Storage> Journal<S> {
    /// Starts a new journal (after a full copy: nothing is dirty), replacing any content.
    pub fn create(storage: S, name: &str, identity: JournalIdentity) -> Result<Self> {
        if let Some(reason) = identity.problem() {
            return Err(Error::InvalidArgument {
                what: "journal identity",
                reason,
            });
        }
        let io = |action| move |source| Error::file(name, action, source);
        storage.set_len(0).map_err(io("truncate journal"))?;
        storage
            .set_len(identity.bitmap_offset() + identity.bitmap_length())
            .map_err(io("size journal"))?;
        let journal = Journal {
            storage,
            name: name.to_owned(),
            identity,
            state: Mutex::new(State {
                regions: vec![0; identity.regions() as usize],
                generation: 1,
                acknowledged: 0,
                stamp: ContentStamp::Unknown,
                acknowledged_delta: 0,
            }),
        };
        for page in 0..identity.region_pages() {
            journal.write_region_page(&journal.lock(), page)?;
        }
        journal.write_header(&journal.lock(), STATE_ACTIVE, 0)?;
        journal.storage.flush().map_err(io("flush journal"))?;
        Ok(journal)
    }

    /// Opens an existing journal for `identity` and recovers what must count as changed.
    /// `found` is the disk's content stamp now, before anything writes it: a disk whose stamp
    /// moved while it was not tracked is not vouched for. Content that cannot be trusted is
    /// `Error::TrackingLost`; a storage that fails is an I/O error (tracking is not given up
    /// for a disk that is full or failing).
    pub fn open(
        storage: S,
        name: &str,
        identity: JournalIdentity,
        found: &ContentStamp,
    ) -> Result<(Self, Recovered)> {
        let read = |offset: u64, length: u64| -> Result<Vec<u8>> {
            let mut bytes = vec![0u8; length as usize];
            storage
                .read_at(&mut bytes, offset)
                .map_err(|error| read_failed(name, offset, error))?;
            Ok(bytes)
        };
        let size = storage
            .size()
            .map_err(|error| Error::file(name, "read journal", error))?;
        if size < PAGE {
            return Err(lost(name, "journal missing or empty"));
        }
        let header = read(0, PAGE)?;
        if &header[..8] != MAGIC {
            return Err(lost(name, "not a blockrep tracking journal"));
        }
        if u32_at(&header, 4092) != crc32c::crc32c(&header[..4092]) {
            return Err(lost(name, "journal header checksum mismatch"));
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version == 1 {
            return Err(lost(
                name,
                "journal version 1 records no stamp of the disk, so a change made while blockrep was stopped cannot be ruled out",
            ));
        }
        if version != JOURNAL_VERSION {
            return Err(lost(
                name,
                format!(
                    "journal version {version} is not supported (this blockrep reads version {JOURNAL_VERSION})"
                ),
            ));
        }
        let disk_id = Uuid::from_bytes(header[16..32].try_into().unwrap_or_default());
        let stored = JournalIdentity {
            disk_id,
            virtual_size: u64_at(&header, 32),
            granularity: u64::from(u32_at(&header, 40)),
            region_size: u64::from(u32_at(&header, 44)),
        };
        if let Some(problem) = stored.problem() {
            return Err(lost(name, format!("journal header: {problem}")));
        }
        if stored != identity {
            return Err(lost(
                name,
                format!(
                    "journal belongs to another disk or tracking setup (disk {}, {} bytes, granularity {}, region {}; expected disk {}, {} bytes, granularity {}, region {})",
                    stored.disk_id,
                    stored.virtual_size,
                    stored.granularity,
                    stored.region_size,
                    identity.disk_id,
                    identity.virtual_size,
                    identity.granularity,
                    identity.region_size
                ),
            ));
        }
        let clean = match u32_at(&header, 12) {
            STATE_CLEAN => true,
            STATE_ACTIVE => false,
            other => return Err(lost(name, format!("journal state {other} is unknown"))),
        };
        let recorded = decode_stamp(&header).map_err(|reason| lost(name, reason))?;
        if let Some(change) = recorded.changed_since(found, !clean) {
            return Err(lost(name, change));
        }
        let generation = u64_at(&header, 48);
        let acknowledged = u64_at(&header, 56);
        let mut regions = Vec::with_capacity(identity.regions() as usize);
        for page in 0..identity.region_pages() {
            let bytes = read(PAGE * (1 + page), PAGE)?;
            if u32_at(&bytes, 4092) != crc32c::crc32c(&bytes[..4092]) {
                return Err(lost(
                    name,
                    format!("journal region page {page} checksum mismatch"),
                ));
            }
            let left = identity.regions() - page * ENTRIES_PER_PAGE;
            for entry in 0..left.min(ENTRIES_PER_PAGE) {
                regions.push(u64_at(&bytes, entry as usize * 8));
            }
        }
        let bitmap_bytes = read(identity.bitmap_offset(), identity.bitmap_length())?;
        let stored_bitmap = if u32_at(&header, 72) == crc32c::crc32c(&bitmap_bytes) {
            DirtyBitmap::from_bytes(identity.blocks(), &bitmap_bytes)
        } else {
            None
        };
        let dirty = match (clean, stored_bitmap) {
            (true, Some(bitmap)) => bitmap,
            (true, None) => return Err(lost(name, "journal bitmap checksum mismatch")),
            (false, stored) => {
                // A crash: whatever the last clean shutdown stored, plus every region marked
                // since the last acknowledged generation.
                let dirty = stored.unwrap_or_else(|| DirtyBitmap::new(identity.blocks()));
                let per_region = identity.region_size / identity.granularity;
                for (region, &mark) in regions.iter().enumerate() {
                    if mark > acknowledged {
                        let first = region as u64 * per_region;
                        dirty.mark(first, first + per_region - 1);
                    }
                }
                dirty
            }
        };
        let newest_mark = regions.iter().copied().max().unwrap_or(0);
        let next_generation = generation.max(newest_mark) + 1;
        let journal = Journal {
            storage,
            name: name.to_owned(),
            identity,
            state: Mutex::new(State {
                regions,
                generation: next_generation,
                acknowledged,
                stamp: recorded,
                acknowledged_delta: u64_at(&header, DELTA_OFFSET),
            }),
        };
        // From here until a clean close, a crash must be assumed.
        journal.write_header(&journal.lock(), STATE_ACTIVE, u32_at(&header, 72))?;
        journal.flush()?;
        Ok((
            journal,
            Recovered {
                dirty,
                next_generation,
                after_crash: !clean,
            },
        ))
    }

    pub(crate) fn identity(&self) -> JournalIdentity {
        self.identity
    }

    /// Records the disk's stamp as this session leaves it (after its first write, or after
    /// `BlockImage::begin_writes`): after a crash, the disk must still show it.
    pub fn record_stamp(&self, stamp: ContentStamp) -> Result<()> {
        let mut state = self.lock();
        state.stamp = stamp;
        let bitmap_checksum = self.stored_bitmap_checksum()?;
        self.write_header(&state, STATE_ACTIVE, bitmap_checksum)?;
        drop(state);
        self.flush()
    }

    /// The granularity and region size a journal was made with, for callers that know only the
    /// disk; `open` then checks everything against the disk.
    pub fn stored_identity(storage: &S, name: &str) -> Result<JournalIdentity> {
        let mut header = vec![0u8; PAGE as usize];
        storage
            .read_at(&mut header, 0)
            .map_err(|error| read_failed(name, 0, error))?;
        if &header[..8] != MAGIC || u32_at(&header, 4092) != crc32c::crc32c(&header[..4092]) {
            return Err(lost(
                name,
                "not a blockrep tracking journal, or its header is damaged",
            ));
        }
        let stored = JournalIdentity {
            disk_id: Uuid::from_bytes(header[16..32].try_into().unwrap_or_default()),
            virtual_size: u64_at(&header, 32),
            granularity: u64::from(u32_at(&header, 40)),
            region_size: u64::from(u32_at(&header, 44)),
        };
        match stored.problem() {
            Some(problem) => Err(lost(name, format!("journal header: {problem}"))),
            None => Ok(stored),
        }
    }

    /// Durably marks the regions covering `offset..offset + length` as modified in
    /// `generation`, unless they already are. Must return before the write it covers starts.
    pub(crate) fn mark(&self, offset: u64, length: u64, generation: u64) -> Result<()> {
        if length == 0 {
            return Ok(());
        }
        let first = offset / self.identity.region_size;
        let last = (offset + length - 1) / self.identity.region_size;
        let mut state = self.lock();
        let mut pages = Vec::new();
        for region in first..=last.min(self.identity.regions() - 1) {
            let entry = &mut state.regions[region as usize];
            if *entry < generation {
                *entry = generation;
                let page = region / ENTRIES_PER_PAGE;
                if pages.last() != Some(&page) {
                    pages.push(page);
                }
            }
        }
        if pages.is_empty() {
            return Ok(());
        }
        state.generation = state.generation.max(generation);
        for page in pages {
            self.write_region_page(&state, page)?;
        }
        self.flush()
    }

    /// The last delta the replica confirmed applying with these changes (0: none yet). A
    /// replica that holds deltas past the next one holds changes these disks never made: they
    /// went back (a volume snapshot rolled back with its journal, say).
    pub(crate) fn acknowledged_delta(&self) -> u64 {
        self.lock().acknowledged_delta
    }

    /// Records that every generation up to `generation` is safely on the replica, so their
    /// region marks no longer count after a crash, and that it holds delta `delta`.
    pub(crate) fn acknowledge(&self, generation: u64, delta: u64) -> Result<()> {
        let mut state = self.lock();
        state.acknowledged = state.acknowledged.max(generation);
        state.acknowledged_delta = state.acknowledged_delta.max(delta);
        let bitmap_checksum = self.stored_bitmap_checksum()?;
        self.write_header(&state, STATE_ACTIVE, bitmap_checksum)?;
        self.flush()
    }

    /// Clean shutdown: stores `dirty` (every change not yet acknowledged), the generation, and
    /// the disk's stamp as blockrep leaves it (flushed), which the next open compares.
    pub fn close(self, dirty: &DirtyBitmap, generation: u64, stamp: ContentStamp) -> Result<()> {
        let bytes = dirty.to_bytes();
        self.storage
            .write_at(&bytes, self.identity.bitmap_offset())
            .map_err(|source| {
                Error::io(
                    &self.name,
                    "write journal bitmap",
                    self.identity.bitmap_offset(),
                    source,
                )
            })?;
        self.flush()?;
        let mut state = self.lock();
        state.generation = state.generation.max(generation);
        // This session's stamp moved under it: a writer that ignored the lock (qemu with
        // locking off) wrote the disk meanwhile. Recorded as no stamp, so nothing vouches for
        // the disk at the next open.
        state.stamp = match (&state.stamp, &stamp) {
            (ContentStamp::DataWrite(session), ContentStamp::DataWrite(now)) if session != now => {
                tracing::warn!(journal = %self.name, "the disk's DataWriteGuid moved during this session: another program wrote it");
                ContentStamp::Unknown
            }
            (ContentStamp::File(session), ContentStamp::File(now)) if !session.same_file(now) => {
                tracing::warn!(journal = %self.name, "the disk was replaced during this session");
                ContentStamp::Unknown
            }
            _ => stamp,
        };
        self.write_header(&state, STATE_CLEAN, crc32c::crc32c(&bytes))?;
        drop(state);
        self.flush()
    }

    fn stored_bitmap_checksum(&self) -> Result<u32> {
        let mut header = vec![0u8; PAGE as usize];
        self.storage
            .read_at(&mut header, 0)
            .map_err(|source| Error::io(&self.name, "read journal header", 0, source))?;
        Ok(u32_at(&header, 72))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|source| Error::file(&self.name, "flush journal", source))
    }

    fn write_header(&self, state: &State, journal_state: u32, bitmap_checksum: u32) -> Result<()> {
        let mut page = vec![0u8; PAGE as usize];
        page[..8].copy_from_slice(MAGIC);
        page[8..10].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
        page[12..16].copy_from_slice(&journal_state.to_le_bytes());
        page[16..32].copy_from_slice(self.identity.disk_id.as_bytes());
        page[32..40].copy_from_slice(&self.identity.virtual_size.to_le_bytes());
        page[40..44].copy_from_slice(&(self.identity.granularity as u32).to_le_bytes());
        page[44..48].copy_from_slice(&(self.identity.region_size as u32).to_le_bytes());
        page[48..56].copy_from_slice(&state.generation.to_le_bytes());
        page[56..64].copy_from_slice(&state.acknowledged.to_le_bytes());
        page[64..72].copy_from_slice(&self.identity.bitmap_length().to_le_bytes());
        page[72..76].copy_from_slice(&bitmap_checksum.to_le_bytes());
        encode_stamp(&state.stamp, &mut page[STAMP_OFFSET..]);
        page[DELTA_OFFSET..DELTA_OFFSET + 8]
            .copy_from_slice(&state.acknowledged_delta.to_le_bytes());
        let checksum = crc32c::crc32c(&page[..4092]);
        page[4092..].copy_from_slice(&checksum.to_le_bytes());
        self.storage
            .write_at(&page, 0)
            .map_err(|source| Error::io(&self.name, "write journal header", 0, source))
    }

    fn write_region_page(&self, state: &State, page: u64) -> Result<()> {
        let mut bytes = vec![0u8; PAGE as usize];
        let first = (page * ENTRIES_PER_PAGE) as usize;
        let last = (first + ENTRIES_PER_PAGE as usize).min(state.regions.len());
        for (index, mark) in state.regions[first..last].iter().enumerate() {
            bytes[index * 8..index * 8 + 8].copy_from_slice(&mark.to_le_bytes());
        }
        let checksum = crc32c::crc32c(&bytes[..4092]);
        bytes[4092..].copy_from_slice(&checksum.to_le_bytes());
        let offset = PAGE * (1 + page);
        self.storage
            .write_at(&bytes, offset)
            .map_err(|source| Error::io(&self.name, "write journal region page", offset, source))
    }
}

/// Kind at 0, then a GUID (16 bytes), or a file's device, inode and size (8 bytes each) and
/// its modification and change times (8 bytes of seconds, 4 of nanoseconds, each).
fn encode_stamp(stamp: &ContentStamp, bytes: &mut [u8]) {
    match stamp {
        ContentStamp::Unknown => bytes[..4].copy_from_slice(&STAMP_NONE.to_le_bytes()),
        ContentStamp::DataWrite(guid) => {
            bytes[..4].copy_from_slice(&STAMP_DATA_WRITE.to_le_bytes());
            bytes[4..20].copy_from_slice(guid.as_bytes());
        }
        ContentStamp::File(file) => {
            bytes[..4].copy_from_slice(&STAMP_FILE.to_le_bytes());
            bytes[4..12].copy_from_slice(&file.device.to_le_bytes());
            bytes[12..20].copy_from_slice(&file.inode.to_le_bytes());
            bytes[20..28].copy_from_slice(&file.size.to_le_bytes());
            bytes[28..36].copy_from_slice(&file.modified.0.to_le_bytes());
            bytes[36..40].copy_from_slice(&file.modified.1.to_le_bytes());
            bytes[40..48].copy_from_slice(&file.changed.0.to_le_bytes());
            bytes[48..52].copy_from_slice(&file.changed.1.to_le_bytes());
        }
    }
}

fn decode_stamp(header: &[u8]) -> std::result::Result<ContentStamp, String> {
    let at = STAMP_OFFSET;
    match u32_at(header, at) {
        STAMP_NONE => Ok(ContentStamp::Unknown),
        STAMP_DATA_WRITE => Ok(ContentStamp::DataWrite(Uuid::from_bytes(
            header[at + 4..at + 20].try_into().unwrap_or_default(),
        ))),
        STAMP_FILE => Ok(ContentStamp::File(FileStamp {
            device: u64_at(header, at + 4),
            inode: u64_at(header, at + 12),
            size: u64_at(header, at + 20),
            modified: (u64_at(header, at + 28) as i64, u32_at(header, at + 36)),
            changed: (u64_at(header, at + 40) as i64, u32_at(header, at + 48)),
        })),
        other => Err(format!(
            "journal records a disk stamp of unknown kind {other}"
        )),
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}
