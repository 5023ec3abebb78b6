//! Bundles: files of deltas for several disks, one entry after another — a u32 payload length,
//! a u16 disk index, then the payload, a complete delta (format v1) for that disk. Staging
//! holds a delta's chunks this way; undo data (what a delta overwrote) is kept the same way,
//! so one reader applies both. Entries are disjoint, so their order does not matter.

use crate::delta::{Compression, DeltaEncoder, DeltaHeader, chunk_pieces, write_delta};
use crate::image::BlockImage;
use crate::io::{FileStorage, Storage, StorageOptions};
use crate::proto::MAX_BODY;
use crate::{Error, Result};
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};

const ENTRY_HEADER: u64 = 6;
/// Disk bytes one undo entry covers at most, so an entry stays far below the u32 length and
/// the memory it takes to build stays bounded.
const UNDO_ENTRY_DISK_BYTES: u64 = 4 << 20;

/// Appends entries to a new bundle file.
pub(super) struct BundleWriter {
    path: PathBuf,
    storage: Box<dyn Storage>,
    end: u64,
}

impl BundleWriter {
    /// Creates (or empties) the bundle at `path`, written through `options`' layer.
    pub(super) fn create(path: &Path, options: &StorageOptions) -> Result<Self> {
        let storage = options
            .create_file(path, true)
            .map(|file| options.layered(Box::new(FileStorage::from_file(file))))
            .map_err(|error| Error::file(&path.display().to_string(), "create", error))?;
        Ok(BundleWriter {
            path: path.to_owned(),
            storage,
            end: 0,
        })
    }

    pub(super) fn append(&mut self, disk: u16, payload: &[u8]) -> Result<()> {
        let mut header = [0u8; ENTRY_HEADER as usize];
        header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..].copy_from_slice(&disk.to_le_bytes());
        self.storage
            .write_at(&header, self.end)
            .and_then(|()| self.storage.write_at(payload, self.end + ENTRY_HEADER))
            .map_err(|error| {
                Error::io(&self.path.display().to_string(), "write", self.end, error)
            })?;
        self.end += ENTRY_HEADER + payload.len() as u64;
        Ok(())
    }

    /// Makes every entry durable.
    pub(super) fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|error| Error::file(&self.path.display().to_string(), "flush", error))
    }
}

/// Calls `visit` with each entry of the bundle at `path`: its disk, its payload, and where it
/// starts. One entry is in memory at a time.
pub(super) fn for_each_entry(
    path: &Path,
    mut visit: impl FnMut(u16, &[u8], u64) -> Result<()>,
) -> Result<()> {
    let name = path.display().to_string();
    let storage =
        FileStorage::open(path, false).map_err(|error| Error::file(&name, "open", error))?;
    let size = storage
        .size()
        .map_err(|error| Error::file(&name, "read", error))?;
    let mut payload = Vec::new();
    let mut position = 0u64;
    while position < size {
        let mut header = [0u8; ENTRY_HEADER as usize];
        let mut length = 0usize;
        let read = storage.read_at(&mut header, position).and_then(|()| {
            length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if length > MAX_BODY.max(2 * UNDO_ENTRY_DISK_BYTES as usize) {
                return Err(std::io::Error::other("entry too long"));
            }
            payload.resize(length, 0);
            storage.read_at(&mut payload, position + ENTRY_HEADER)
        });
        read.map_err(|_| Error::corrupt(&name, format!("damaged entry at byte {position}")))?;
        visit(
            u16::from_le_bytes([header[4], header[5]]),
            &payload,
            position,
        )?;
        position += ENTRY_HEADER + length as u64;
    }
    Ok(())
}

/// Applies every entry of the bundle at `path` to its disk, without flushing them; `after_first`
/// runs once the first entry is on its disk.
pub fn apply_bundle<D: BlockImage>(
    path: &Path,
    disks: &mut [D],
    mut after_first: impl FnMut(),
) -> Result<()> {
    let name = path.display().to_string();
    let mut first = true;
    for_each_entry(path, |disk, payload, position| {
        let target = disks
            .get_mut(usize::from(disk))
            .ok_or_else(|| Error::corrupt(&name, format!("entry for disk {disk}")))?;
        // Every entry is verified whole before a byte of it is written; the caller flushes.
        // An entry is at most a chunk or an undo piece, so it is decoded once and held.
        let entry = format!("{name} at byte {position}");
        match crate::delta::decode_delta(Cursor::new(payload), &entry, DECODED_LIMIT)? {
            Some(decoded) => decoded.write_to(target)?,
            None => {
                write_delta(Cursor::new(payload), &entry, target)?;
            }
        }
        if std::mem::take(&mut first) {
            after_first();
        }
        Ok(())
    })
}

/// Entries whose data is larger than this are verified and written in two passes rather than
/// held in memory.
const DECODED_LIMIT: usize = 8 << 20;

/// The byte ranges each disk's entries cover (sorted, merged), for `disks` disks, from the
/// entries' records alone: the bundle was verified when it was staged, and is verified again
/// entry by entry when it is applied.
pub(super) fn bundle_extents(path: &Path, disks: usize) -> Result<Vec<Vec<Range<u64>>>> {
    let name = path.display().to_string();
    let mut extents: Vec<Vec<Range<u64>>> = vec![Vec::new(); disks];
    for_each_entry(path, |disk, payload, position| {
        let list = extents
            .get_mut(usize::from(disk))
            .ok_or_else(|| Error::corrupt(&name, format!("entry for disk {disk}")))?;
        list.extend(crate::delta::listed_extents(
            Cursor::new(payload),
            &format!("{name} at byte {position}"),
        )?);
        Ok(())
    })?;
    for list in &mut extents {
        *list = merge_ranges(std::mem::take(list));
    }
    Ok(extents)
}

/// Sorts ranges and merges those that overlap or touch.
pub(super) fn merge_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|range| range.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

/// Writes to `writer` what `disks` hold now in `extents` (per disk), as entries: the undo of a
/// change about to overwrite them. `header` gives each disk's id and size.
pub(super) fn write_contents<D: BlockImage>(
    writer: &mut BundleWriter,
    disks: &[D],
    extents: &[Vec<Range<u64>>],
    headers: &[DeltaHeader],
) -> Result<()> {
    let mut encoder = DeltaEncoder::new();
    for (index, (disk, ranges)) in disks.iter().zip(extents).enumerate() {
        for piece in chunk_pieces(ranges, UNDO_ENTRY_DISK_BYTES) {
            let mut payload = Vec::new();
            encoder.encode(
                disk,
                &piece,
                &headers[index],
                &mut payload,
                "undo",
                Compression::Lz4,
            )?;
            writer.append(index as u16, &payload)?;
        }
    }
    Ok(())
}
