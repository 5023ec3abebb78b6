//! VHDX images (MS-VHDX version 1), dynamic and fixed, read and written.
//!
//! Crash safety without the log: a newly allocated block's payload is written first; its BAT
//! entry is published only by [`BlockImage::flush`], after a flush has made the payload durable,
//! and is followed by a second flush. A crash therefore leaves every BAT entry pointing either
//! nowhere or at complete data. Headers are updated by rewriting the non-current copy with the
//! next sequence number. `docs/formats/vhdx.md` spells the orderings out.
//!
//! A log left by another writer is replayed when the image is opened for writing, and applied in
//! memory when it is opened read-only.

mod bat;
mod check;
mod create;
mod format;
mod header;
mod inspect;
pub mod log;
mod metadata;
mod region;

pub(crate) use bat::BlockIndex;
pub use bat::PayloadState;
pub use check::{CheckReport, check};
pub use create::VhdxCreateOptions;
pub(crate) use format::FILE_SIGNATURE;
pub use header::Header;
pub(crate) use header::HeaderSlot;
pub use metadata::{BlockSize, SectorSize};

use super::{Access, BlockImage, check_range, is_zero};
use crate::io::Storage;
use crate::{Error, Result};
use bat::Geometry;
use format::{ALIGNMENT, align_up};
use inspect::{FileReader, inspect};
use log::{LogWrite, Replay};
use metadata::Metadata;
use region::Region;
use std::collections::BTreeSet;
use std::ops::Range;
use uuid::Uuid;

/// A summary of a VHDX image for display.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VhdxInfo {
    pub virtual_size: u64,
    pub block_size: u64,
    pub logical_sector_size: u64,
    pub physical_sector_size: u64,
    /// "fixed" or "dynamic".
    pub subformat: &'static str,
    pub disk_id: String,
    pub creator: String,
    pub header_sequence: u64,
    pub file_size: u64,
    pub block_count: u64,
    pub allocated_blocks: u64,
    pub chunk_ratio: u64,
    /// True when the image was opened read-only with a log that still awaits replay (the log
    /// was applied in memory for reading).
    pub log_pending_replay: bool,
}

/// A VHDX image over any [`Storage`].
pub struct VhdxImage<S: Storage> {
    storage: S,
    name: String,
    access: Access,
    creator: String,
    header_slot: HeaderSlot,
    header: Header,
    metadata: Metadata,
    geometry: Geometry,
    bat_region: Region,
    /// The BAT as the reader sees it, unpublished entries included.
    bat: Vec<u64>,
    /// BAT entries changed in memory whose payload is written but not yet flushed.
    unpublished: BTreeSet<u64>,
    /// Where the next block is allocated: past the end of the file, 1 MiB aligned.
    next_free: u64,
    /// Whether this session has already stamped the header with new write GUIDs.
    writing: bool,
    /// The DataWriteGuid this session stamps at its first change, drawn up front so that a
    /// caller can record it before the change (`BlockImage::stamp_after_begin_writes`).
    next_data_write_guid: Uuid,
    /// A log applied in memory (read-only open of an image that needs replay).
    replay: Option<Replay>,
    stored_size: u64,
}

impl<S: Storage> std::fmt::Debug for VhdxImage<S> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VhdxImage")
            .field("name", &self.name)
            .field("access", &self.access)
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> VhdxImage<S> {
    /// Opens a VHDX image. A pending log is replayed into the file when `access` is read-write,
    /// and applied in memory when read-only.
    pub fn open(storage: S, name: &str, access: Access) -> Result<Self> {
        let inspection = inspect(&storage, name)?;
        if inspection.metadata.has_parent {
            return Err(Error::unsupported(
                name,
                "differencing images (with a parent) are not supported yet",
            ));
        }
        if let Some(problem) = inspection.problems.first() {
            let more = inspection.problems.len() - 1;
            let others = if more > 0 {
                format!(" (and {more} more)")
            } else {
                String::new()
            };
            return Err(Error::corrupt(name, format!("{problem}{others}")));
        }
        let mut image = VhdxImage {
            name: name.to_owned(),
            access,
            creator: inspection.creator,
            header_slot: inspection.header_slot,
            header: inspection.header,
            metadata: inspection.metadata,
            geometry: inspection.geometry,
            bat_region: inspection.bat_region,
            bat: inspection.bat,
            unpublished: BTreeSet::new(),
            next_free: 0,
            writing: false,
            next_data_write_guid: Uuid::new_v4(),
            replay: inspection.replay,
            stored_size: inspection.stored_size,
            storage,
        };
        if access == Access::ReadWrite
            && let Some(replay) = image.replay.take()
        {
            image.replay_log(&replay)?;
        }
        image.next_free = align_up(image.file_size(), ALIGNMENT);
        Ok(image)
    }

    /// The name used in messages (usually the path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The store under the image.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    pub fn block_size(&self) -> u64 {
        self.geometry.block_size
    }

    pub(crate) fn is_fixed(&self) -> bool {
        self.metadata.leave_blocks_allocated
    }

    pub fn disk_id(&self) -> Uuid {
        self.metadata.disk_id
    }

    pub(crate) fn logical_sector_size(&self) -> SectorSize {
        self.metadata.logical_sector_size
    }

    /// The state of one payload block.
    pub(crate) fn block_state(&self, block: BlockIndex) -> Result<PayloadState> {
        let index = self.geometry.bat_index(block);
        let entry = self.bat.get(index.0 as usize).copied().unwrap_or(0);
        PayloadState::decode(entry).map_err(|state| {
            Error::corrupt(
                &self.name,
                format!("block {}: unknown BAT state {state}", block.0),
            )
        })
    }

    /// Where in the file virtual byte `offset` is stored, or `None` when its block is not
    /// (it reads as zeros): for tools that inspect or repair images, as `qemu-img map` would.
    pub fn file_offset(&self, offset: u64) -> Result<Option<u64>> {
        check_range(&self.name, offset, 1, self.geometry.virtual_size)?;
        let Some((block, inside, _)) = self.geometry.pieces(offset, 1).next() else {
            return Ok(None);
        };
        Ok(self
            .block_state(block)?
            .stored_at()
            .map(|file_offset| file_offset + inside))
    }

    pub fn info(&self) -> VhdxInfo {
        let allocated_blocks = (0..self.geometry.block_count)
            .filter(|&block| {
                matches!(self.block_state(BlockIndex(block)), Ok(state) if state.stored_at().is_some())
            })
            .count() as u64;
        VhdxInfo {
            virtual_size: self.geometry.virtual_size,
            block_size: self.geometry.block_size,
            logical_sector_size: self.metadata.logical_sector_size.bytes(),
            physical_sector_size: self.metadata.physical_sector_size.bytes(),
            subformat: if self.is_fixed() { "fixed" } else { "dynamic" },
            disk_id: self.metadata.disk_id.to_string(),
            creator: self.creator.clone(),
            header_sequence: self.header.sequence,
            file_size: self.file_size(),
            block_count: self.geometry.block_count,
            allocated_blocks,
            chunk_ratio: self.geometry.chunk_ratio,
            log_pending_replay: self.replay.is_some(),
        }
    }

    /// Flushes and closes the image, reporting any error that a drop would have to swallow.
    pub fn close(mut self) -> Result<()> {
        self.flush()
    }

    fn file_size(&self) -> u64 {
        self.replay.as_ref().map_or(self.stored_size, |replay| {
            replay.file_size_after(self.stored_size)
        })
    }

    fn reader(&self) -> FileReader<'_, S> {
        FileReader {
            storage: &self.storage,
            name: &self.name,
            replay: self.replay.as_ref(),
            stored_size: self.stored_size,
        }
    }

    fn io_error(
        &self,
        action: &'static str,
        offset: u64,
    ) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::io(&self.name, action, offset, source)
    }

    /// Applies a log left by another writer, then stamps the header with a nil log GUID.
    fn replay_log(&mut self, replay: &Replay) -> Result<()> {
        let new_size = replay.file_size_after(self.stored_size);
        if new_size > self.stored_size {
            self.storage
                .set_len(new_size)
                .map_err(self.io_error("extend for log replay", new_size))?;
        }
        for write in &replay.writes {
            let offset = write.file_offset();
            match write {
                LogWrite::Data { sector, .. } => self.storage.write_at(sector, offset),
                LogWrite::Zero { length, .. } => self.storage.write_zeroes(offset, *length),
            }
            .map_err(|source| Error::io(&self.name, "replay log write", offset, source))?;
        }
        self.storage
            .flush()
            .map_err(|source| Error::file(&self.name, "flush log replay", source))?;
        self.stored_size = new_size;
        // The replayed file is re-read so that the BAT and metadata reflect the log's writes.
        let inspection = inspect(&self.storage, &self.name)?;
        self.bat = inspection.bat;
        self.begin_writing()?;
        tracing::info!(image = %self.name, entries = replay.entries, "replayed the VHDX log");
        Ok(())
    }

    /// Before the first change of a session: new file and data write GUIDs, no active log,
    /// written to the non-current header slot with the next sequence number.
    fn begin_writing(&mut self) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Err(Error::ReadOnly {
                name: self.name.clone(),
            });
        }
        if self.writing {
            return Ok(());
        }
        let header = Header {
            sequence: self.header.sequence + 1,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: self.next_data_write_guid,
            log_guid: Uuid::nil(),
            ..self.header.clone()
        };
        let slot = self.header_slot.other();
        self.storage
            .write_at(&header.encode(), slot.offset())
            .map_err(self.io_error("write header", slot.offset()))?;
        self.storage
            .flush()
            .map_err(self.io_error("flush header", slot.offset()))?;
        self.header = header;
        self.header_slot = slot;
        self.writing = true;
        Ok(())
    }

    /// Stores `data` at `inside` bytes into `block`, allocating the block unless `data` is zeros.
    fn write_piece(&mut self, block: BlockIndex, inside: u64, data: &[u8]) -> Result<()> {
        let file_offset = match self.block_state(block)?.stored_at() {
            Some(file_offset) => file_offset,
            None if is_zero(data) => return Ok(()),
            None => self.allocate(block)?,
        };
        let at = file_offset + inside;
        self.storage
            .write_at(data, at)
            .map_err(self.io_error("write", at))
    }

    /// Reserves file space for `block` at the end of the file. The BAT entry changes in memory
    /// now and reaches the file at the next flush, after the payload is durable.
    fn allocate(&mut self, block: BlockIndex) -> Result<u64> {
        let file_offset = self.next_free;
        let end = file_offset + self.geometry.block_size;
        self.storage
            .set_len(end)
            .map_err(self.io_error("extend", end))?;
        self.stored_size = end;
        self.next_free = end;
        let index = self.geometry.bat_index(block).0;
        self.bat[index as usize] = PayloadState::FullyPresent { file_offset }.encode();
        self.unpublished.insert(index);
        Ok(file_offset)
    }

    /// Writes the 4 KiB BAT pages that hold unpublished entries.
    fn publish_bat(&mut self) -> Result<()> {
        const ENTRIES_PER_PAGE: u64 = 512;
        let pages: BTreeSet<u64> = self
            .unpublished
            .iter()
            .map(|index| index / ENTRIES_PER_PAGE)
            .collect();
        for page in pages {
            let first = page * ENTRIES_PER_PAGE;
            let last = (first + ENTRIES_PER_PAGE).min(self.bat.len() as u64);
            let bytes: Vec<u8> = self.bat[first as usize..last as usize]
                .iter()
                .flat_map(|entry| entry.to_le_bytes())
                .collect();
            let at = self.bat_region.file_offset + first * 8;
            self.storage
                .write_at(&bytes, at)
                .map_err(self.io_error("write BAT", at))?;
        }
        Ok(())
    }
}

impl<S: Storage> BlockImage for VhdxImage<S> {
    fn virtual_size(&self) -> u64 {
        self.geometry.virtual_size
    }

    fn content_stamp(&self) -> Result<super::ContentStamp> {
        // Read from the file, not from memory: another writer's new GUID shows even while
        // this image is open.
        let mut slots = [
            vec![0u8; format::HEADER_SIZE],
            vec![0u8; format::HEADER_SIZE],
        ];
        for (bytes, offset) in slots.iter_mut().zip(format::HEADER_OFFSETS) {
            self.storage
                .read_at(bytes, offset)
                .map_err(self.io_error("read header", offset))?;
        }
        let decoded = [Header::decode(&slots[0]), Header::decode(&slots[1])];
        let (_, header) = header::current_header(&decoded[0], &decoded[1], &slots[0], &slots[1])
            .map_err(|problem| Error::corrupt(&self.name, problem))?;
        Ok(super::ContentStamp::DataWrite(header.data_write_guid))
    }

    fn begin_writes(&mut self) -> Result<()> {
        self.begin_writing()
    }

    fn stamp_after_begin_writes(&self) -> Result<super::ContentStamp> {
        if self.writing {
            return self.content_stamp();
        }
        Ok(super::ContentStamp::DataWrite(self.next_data_write_guid))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(
            &self.name,
            offset,
            buf.len() as u64,
            self.geometry.virtual_size,
        )?;
        let mut done = 0usize;
        for (block, inside, length) in self.geometry.pieces(offset, buf.len() as u64) {
            let piece = &mut buf[done..done + length as usize];
            match self.block_state(block)?.stored_at() {
                Some(file_offset) => self.reader().read(piece, file_offset + inside)?,
                None => piece.fill(0),
            }
            done += length as usize;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(
            &self.name,
            offset,
            buf.len() as u64,
            self.geometry.virtual_size,
        )?;
        self.begin_writing()?;
        let geometry = self.geometry;
        let mut done = 0usize;
        for (block, inside, length) in geometry.pieces(offset, buf.len() as u64) {
            self.write_piece(block, inside, &buf[done..done + length as usize])?;
            done += length as usize;
        }
        Ok(())
    }

    fn zero_range(&mut self, offset: u64, length: u64) -> Result<()> {
        check_range(&self.name, offset, length, self.geometry.virtual_size)?;
        self.begin_writing()?;
        let geometry = self.geometry;
        for (block, inside, piece) in geometry.pieces(offset, length) {
            // Blocks stay allocated: their space is released to the filesystem by punching a
            // hole, and the BAT is not touched, so zeroing needs no metadata ordering at all.
            if let Some(file_offset) = self.block_state(block)?.stored_at() {
                let at = file_offset + inside;
                self.storage
                    .write_zeroes(at, piece)
                    .map_err(self.io_error("zero", at))?;
                if self.is_fixed() {
                    self.storage
                        .preallocate(at, piece)
                        .map_err(self.io_error("preallocate", at))?;
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.access == Access::ReadOnly {
            return Ok(());
        }
        self.storage
            .flush()
            .map_err(|source| Error::file(&self.name, "flush", source))?;
        if !self.unpublished.is_empty() {
            self.publish_bat()?;
            self.storage
                .flush()
                .map_err(|source| Error::file(&self.name, "flush BAT", source))?;
            self.unpublished.clear();
        }
        Ok(())
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for block in 0..self.geometry.block_count {
            let block = BlockIndex(block);
            if self.block_state(block)?.stored_at().is_none() {
                continue;
            }
            let range = self.geometry.block_range(block);
            match ranges.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => ranges.push(range),
            }
        }
        Ok(ranges)
    }

    fn will_need(&self, offset: u64, length: u64) {
        let end = offset
            .saturating_add(length)
            .min(self.geometry.virtual_size);
        if offset >= end {
            return;
        }
        for (block, inside, piece) in self.geometry.pieces(offset, end - offset) {
            if let Ok(Some(file_offset)) = self.block_state(block).map(PayloadState::stored_at) {
                self.storage.will_need(file_offset + inside, piece);
            }
        }
    }
}

impl<S: Storage> Drop for VhdxImage<S> {
    fn drop(&mut self) {
        if !self.unpublished.is_empty()
            && let Err(error) = self.flush()
        {
            tracing::error!(image = %self.name, %error, "closing VHDX image: flush failed; blocks written since the last flush may be lost");
        }
    }
}
