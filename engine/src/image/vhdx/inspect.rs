//! Reading every VHDX structure in order (identifier, headers, log, region tables, metadata,
//! BAT) into an [`Inspection`]. Opening an image and checking one share this walk: `open` turns
//! the first problem into an error, `check` lists them all.

use super::bat::{Geometry, bat_problems};
use super::format::*;
use super::header::{Header, HeaderSlot, current_header, decode_creator};
use super::log::{Replay, find_active_sequence};
use super::metadata::{Metadata, MetadataError};
use super::region::{Region, RegionTable};
use crate::io::Storage;
use crate::{Error, Result};
use std::ops::Range;

/// Reads file bytes as they are after log replay: the log's writes laid over the file, and
/// zeros past its end up to the size replay would give it.
pub(super) struct FileReader<'a, S: Storage + ?Sized> {
    pub storage: &'a S,
    pub name: &'a str,
    pub replay: Option<&'a Replay>,
    /// Size of the file as stored.
    pub stored_size: u64,
}

impl<S: Storage + ?Sized> FileReader<'_, S> {
    pub(super) fn size(&self) -> u64 {
        self.replay.map_or(self.stored_size, |replay| {
            replay.file_size_after(self.stored_size)
        })
    }

    pub(super) fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size() {
            return Err(Error::corrupt(
                self.name,
                format!(
                    "file ends at {} but {} bytes are needed at {offset}",
                    self.size(),
                    buf.len()
                ),
            ));
        }
        let stored = (self.stored_size.saturating_sub(offset) as usize).min(buf.len());
        self.storage
            .read_at(&mut buf[..stored], offset)
            .map_err(|source| Error::io(self.name, "read", offset, source))?;
        buf[stored..].fill(0);
        if let Some(replay) = self.replay {
            replay.overlay(buf, offset);
        }
        Ok(())
    }

    pub(super) fn read_vec(&self, offset: u64, length: u64) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; length as usize];
        self.read(&mut bytes, offset)?;
        Ok(bytes)
    }
}

/// Everything read from a VHDX file, and the problems met on the way that did not stop the walk.
#[derive(Debug)]
pub(super) struct Inspection {
    pub creator: String,
    pub header_slot: HeaderSlot,
    pub header: Header,
    /// The active log sequence, when the log must be replayed.
    pub replay: Option<Replay>,
    pub stored_size: u64,
    pub bat_region: Region,
    pub metadata: Metadata,
    pub geometry: Geometry,
    pub bat: Vec<u64>,
    /// Problems that did not stop the walk (a damaged copy of a duplicated structure, BAT
    /// entries that are wrong): `open` refuses an image with any, `check` lists them.
    pub problems: Vec<String>,
    /// Things worth knowing that are not damage (a torn header write that the other copy covers).
    pub notes: Vec<String>,
}

/// The smallest file that can hold the fixed structures and the first region.
const MINIMUM_FILE_SIZE: u64 = 2 * ALIGNMENT;

/// Walks the structures of the VHDX image in `storage`.
pub(super) fn inspect<S: Storage + ?Sized>(storage: &S, name: &str) -> Result<Inspection> {
    let stored_size = storage
        .size()
        .map_err(|source| Error::file(name, "stat", source))?;
    let mut identifier = vec![0u8; 64 * 1024];
    if stored_size < identifier.len() as u64 {
        return Err(Error::NotVhdx {
            name: name.to_owned(),
            reason: format!("the file is only {stored_size} bytes long"),
        });
    }
    storage
        .read_at(&mut identifier, 0)
        .map_err(|source| Error::io(name, "read", 0, source))?;
    if &identifier[..8] != FILE_SIGNATURE {
        return Err(Error::NotVhdx {
            name: name.to_owned(),
            reason: "no 'vhdxfile' signature at offset 0".into(),
        });
    }
    if stored_size < MINIMUM_FILE_SIZE {
        return Err(Error::corrupt(
            name,
            format!("the file is only {stored_size} bytes long (truncated?)"),
        ));
    }
    let creator = decode_creator(&identifier);
    let mut problems = Vec::new();
    let mut notes = Vec::new();

    let plain = FileReader {
        storage,
        name,
        replay: None,
        stored_size,
    };
    let header_bytes: Vec<Vec<u8>> = HEADER_OFFSETS
        .iter()
        .map(|&offset| plain.read_vec(offset, HEADER_SIZE as u64))
        .collect::<Result<_>>()?;
    let decoded: Vec<_> = header_bytes
        .iter()
        .map(|bytes| Header::decode(bytes))
        .collect();
    let (header_slot, header) =
        current_header(&decoded[0], &decoded[1], &header_bytes[0], &header_bytes[1])
            .map_err(|problem| Error::corrupt(name, problem))?;
    if let Err(problem) = &decoded[header_slot.other().index()] {
        notes.push(format!(
            "header {} is not valid ({problem}); header {} is current (a torn header update leaves this, and the next write session rewrites it)",
            header_slot.other().index() + 1,
            header_slot.index() + 1
        ));
    }
    if header.version != 1 {
        return Err(Error::unsupported(
            name,
            format!("VHDX version {}", header.version),
        ));
    }

    let replay = read_log(&plain, &header, &mut problems)?;
    if let Some(replay) = &replay
        && stored_size < replay.flushed_file_offset
    {
        return Err(Error::corrupt(
            name,
            format!(
                "the log says the file held {} bytes, but it holds {stored_size}: it was truncated",
                replay.flushed_file_offset
            ),
        ));
    }
    let reader = FileReader {
        storage,
        name,
        replay: replay.as_ref(),
        stored_size,
    };
    let file_size = reader.size();

    let tables: Vec<(Vec<u8>, std::result::Result<RegionTable, String>)> = REGION_TABLE_OFFSETS
        .iter()
        .map(|&offset| {
            let bytes = reader.read_vec(offset, REGION_TABLE_SIZE as u64)?;
            let decoded = RegionTable::decode(&bytes);
            Ok((bytes, decoded))
        })
        .collect::<Result<_>>()?;
    let regions = match (&tables[0].1, &tables[1].1) {
        (Ok(first), Ok(_)) => {
            if tables[0].0 != tables[1].0 {
                problems.push("the two region tables differ".into());
            }
            first.clone()
        }
        (Ok(first), Err(problem)) => {
            problems.push(format!("region table 2 is not valid: {problem}"));
            first.clone()
        }
        (Err(problem), Ok(second)) => {
            problems.push(format!("region table 1 is not valid: {problem}"));
            second.clone()
        }
        (Err(first), Err(second)) => {
            return Err(Error::corrupt(
                name,
                format!("no valid region table (table 1: {first}; table 2: {second})"),
            ));
        }
    };
    for region in &regions.regions {
        if region.required && region.guid != BAT_REGION && region.guid != METADATA_REGION {
            return Err(Error::unsupported(
                name,
                format!("required region {} is unknown to this version", region.guid),
            ));
        }
    }
    let region_problems = regions.problems(file_size);
    if let Some(first) = region_problems.first() {
        return Err(Error::corrupt(name, first.clone()));
    }
    let (Some(bat_region), Some(metadata_region)) =
        (regions.find(BAT_REGION), regions.find(METADATA_REGION))
    else {
        return Err(Error::corrupt(name, "BAT or metadata region missing"));
    };

    let metadata_bytes = reader.read_vec(
        metadata_region.file_offset,
        u64::from(metadata_region.length),
    )?;
    let metadata = Metadata::decode(&metadata_bytes).map_err(|error| match error {
        MetadataError::Corrupt(problem) => Error::corrupt(name, problem),
        MetadataError::Unsupported(feature) => Error::unsupported(name, feature),
    })?;
    let geometry = Geometry::new(&metadata);
    let bat_bytes = geometry.bat_entries() * 8;
    if bat_bytes > u64::from(bat_region.length) {
        return Err(Error::corrupt(
            name,
            format!(
                "the BAT region holds {} bytes but {} entries ({bat_bytes} bytes) are needed",
                bat_region.length,
                geometry.bat_entries()
            ),
        ));
    }
    let raw_bat = reader.read_vec(bat_region.file_offset, bat_bytes)?;
    let bat: Vec<u64> = raw_bat
        .as_chunks::<8>()
        .0
        .iter()
        .map(|entry| u64::from_le_bytes(*entry))
        .collect();

    let mut reserved: Vec<(String, Range<u64>)> = vec![
        ("header area".into(), 0..ALIGNMENT),
        (
            "BAT region".into(),
            bat_region.file_offset..bat_region.end(),
        ),
        (
            "metadata region".into(),
            metadata_region.file_offset..metadata_region.end(),
        ),
    ];
    if header.log_length > 0 {
        reserved.push((
            "log".into(),
            header.log_offset..header.log_offset + u64::from(header.log_length),
        ));
    }
    problems.extend(bat_problems(
        &bat,
        &geometry,
        metadata.has_parent,
        file_size,
        &reserved,
    ));
    Ok(Inspection {
        creator,
        header_slot,
        header,
        replay,
        stored_size,
        bat_region,
        metadata,
        geometry,
        bat,
        problems,
        notes,
    })
}

/// Validates the log's place in the file and finds what must be replayed.
fn read_log<S: Storage + ?Sized>(
    reader: &FileReader<'_, S>,
    header: &Header,
    problems: &mut Vec<String>,
) -> Result<Option<Replay>> {
    let offset = header.log_offset;
    let length = u64::from(header.log_length);
    let placement_problem = if !offset.is_multiple_of(ALIGNMENT) || length % ALIGNMENT != 0 {
        Some(format!(
            "the log at {offset} (length {length}) is not 1 MiB aligned"
        ))
    } else if length > 0 && offset < ALIGNMENT {
        Some(format!("the log at {offset} lies in the header area"))
    } else if offset.saturating_add(length) > reader.stored_size {
        Some(format!(
            "the log at {offset} (length {length}) ends past the end of the file"
        ))
    } else {
        None
    };
    if header.log_guid.is_nil() {
        if let Some(problem) = placement_problem {
            problems.push(problem);
        }
        return Ok(None);
    }
    if let Some(problem) = placement_problem {
        return Err(Error::corrupt(reader.name, problem));
    }
    if header.log_version != 0 {
        return Err(Error::unsupported(
            reader.name,
            format!("log version {}", header.log_version),
        ));
    }
    let log = reader.read_vec(offset, length)?;
    Ok(find_active_sequence(&log, header.log_guid))
}
