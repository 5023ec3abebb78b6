//! Reading a delta: verify every checksum of the whole delta first, then apply it. A damaged or
//! truncated delta is refused before a byte of the target changes, and applying the same delta
//! twice leaves the same bytes (every record says what a range holds, not how it changed).

use super::format::*;
use crate::image::BlockImage;
use crate::{Error, Result};
use std::io::{Read, Seek, SeekFrom};

/// What a verified delta holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeltaSummary {
    pub header: DeltaHeader,
    pub data_records: u64,
    pub zero_records: u64,
    /// Disk bytes the data records cover (uncompressed).
    pub data_bytes: u64,
    /// Payload bytes as stored (compressed where it paid).
    pub stored_bytes: u64,
    pub zero_bytes: u64,
    /// Size of the delta, trailer included.
    pub delta_bytes: u64,
}

/// Reads the stream, checking everything, and hands each extent to `extent` (data, or `None`
/// for zeros) once its own checksum is verified.
fn walk(
    mut reader: impl Read,
    name: &str,
    mut extent: impl FnMut(u64, u64, Option<&[u8]>) -> Result<()>,
) -> Result<DeltaSummary> {
    let problem = |text: String| Error::Delta {
        name: name.to_owned(),
        problem: text,
    };
    let truncated = |error: std::io::Error| {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            problem("truncated: the delta ends before its end record".into())
        } else {
            Error::file(name, "read delta", error)
        }
    };
    let mut running = 0u32;
    let mut header_bytes = [0u8; HEADER_SIZE];
    reader.read_exact(&mut header_bytes).map_err(truncated)?;
    running = crc32c::crc32c_append(running, &header_bytes);
    let header = DeltaHeader::decode(&header_bytes).map_err(problem)?;
    let mut summary = DeltaSummary {
        header: header.clone(),
        data_records: 0,
        zero_records: 0,
        data_bytes: 0,
        stored_bytes: 0,
        zero_bytes: 0,
        delta_bytes: HEADER_SIZE as u64,
    };
    let mut payload = Vec::new();
    // Grown to the largest extent met, not to the largest allowed: zeroing a MiB for every
    // small delta would cost more than decoding it.
    let mut data = Vec::new();
    let mut next_offset = 0u64;
    loop {
        let mut record_bytes = [0u8; RECORD_SIZE];
        reader.read_exact(&mut record_bytes).map_err(truncated)?;
        let at = summary.delta_bytes;
        summary.delta_bytes += RECORD_SIZE as u64;
        let record = Record::decode(&record_bytes)
            .map_err(|text| problem(format!("record at byte {at}: {text}")))?;
        if record.kind == KIND_END {
            if record.checksum != running {
                return Err(problem(
                    "checksum of the whole delta does not match its end record".into(),
                ));
            }
            if record.offset != summary.data_records + summary.zero_records {
                return Err(problem(format!(
                    "end record counts {} extents but the delta holds {}",
                    record.offset,
                    summary.data_records + summary.zero_records
                )));
            }
            let mut extra = [0u8; 1];
            if reader
                .read(&mut extra)
                .map_err(|error| Error::file(name, "read delta", error))?
                != 0
            {
                return Err(problem("bytes follow the end record".into()));
            }
            return Ok(summary);
        }
        running = crc32c::crc32c_append(running, &record_bytes);
        let length = u64::from(record.length);
        if length == 0
            || length > MAX_EXTENT
            || record.offset < next_offset
            || record
                .offset
                .checked_add(length)
                .is_none_or(|end| end > header.virtual_size)
        {
            return Err(problem(format!(
                "record at byte {at}: extent {}+{length} is empty, too long, out of order or past the disk",
                record.offset
            )));
        }
        next_offset = record.offset + length;
        match (record.kind, record.encoding) {
            (KIND_ZERO, _) => {
                if record.stored_length != 0 {
                    return Err(problem(format!(
                        "record at byte {at}: zero extent with a payload"
                    )));
                }
                extent(record.offset, length, None)?;
                summary.zero_records += 1;
                summary.zero_bytes += length;
            }
            (KIND_DATA, encoding @ (ENCODING_RAW | ENCODING_LZ4)) => {
                let stored = record.stored_length as usize;
                if stored > lz4_flex::block::get_maximum_output_size(MAX_EXTENT as usize) {
                    return Err(problem(format!(
                        "record at byte {at}: payload of {stored} bytes is too long"
                    )));
                }
                payload.resize(stored, 0);
                reader.read_exact(&mut payload).map_err(truncated)?;
                running = crc32c::crc32c_append(running, &payload);
                summary.delta_bytes += stored as u64;
                summary.stored_bytes += stored as u64;
                if data.len() < length as usize {
                    data.resize(length as usize, 0);
                }
                let bytes = &mut data[..length as usize];
                if encoding == ENCODING_LZ4 {
                    let unpacked =
                        lz4_flex::block::decompress_into(&payload, bytes).map_err(|error| {
                            problem(format!(
                                "record at byte {at}: lz4 payload is damaged: {error}"
                            ))
                        })?;
                    if unpacked != bytes.len() {
                        return Err(problem(format!(
                            "record at byte {at}: lz4 payload is short"
                        )));
                    }
                } else if stored == bytes.len() {
                    bytes.copy_from_slice(&payload);
                } else {
                    return Err(problem(format!(
                        "record at byte {at}: raw payload length differs from the extent"
                    )));
                }
                if crc32c::crc32c(bytes) != record.checksum {
                    return Err(problem(format!(
                        "record at byte {at}: data checksum mismatch (extent at {})",
                        record.offset
                    )));
                }
                extent(record.offset, length, Some(bytes))?;
                summary.data_records += 1;
                summary.data_bytes += length;
            }
            (kind, encoding) => {
                return Err(problem(format!(
                    "record at byte {at}: unknown kind {kind} or encoding {encoding}"
                )));
            }
        }
    }
}

/// Checks a whole delta: header, every record, every payload, the trailer.
pub fn verify_delta(reader: impl Read, name: &str) -> Result<DeltaSummary> {
    walk(reader, name, |_, _, _| Ok(()))
}

/// Adds an extent to ordered `extents`, merged with the last one when they touch.
fn push_merged(extents: &mut Vec<std::ops::Range<u64>>, offset: u64, length: u64) {
    match extents.last_mut() {
        Some(last) if last.end == offset => last.end += length,
        _ => extents.push(offset..offset + length),
    }
}

/// What the target of a delta already is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetState {
    /// The target's disk id, when it has one.
    pub disk_id: Option<uuid::Uuid>,
    /// The sequence number of the last delta applied to it, when known. A delta of changes must
    /// come after it; a full delta may always be applied.
    pub last_sequence: Option<u64>,
}

/// Verifies the whole delta, then applies it to `target`, which must have the delta's size and
/// fit `state` (disk id, sequence); then flushes the target.
pub fn apply_delta<R: Read + Seek>(
    mut reader: R,
    name: &str,
    target: &mut dyn BlockImage,
    state: TargetState,
) -> Result<DeltaSummary> {
    let summary = verify_delta(&mut reader, name)?;
    let header = &summary.header;
    let refuse = |problem: String| Error::Delta {
        name: name.to_owned(),
        problem,
    };
    if header.virtual_size != target.virtual_size() {
        return Err(refuse(format!(
            "the delta is for a disk of {} bytes, the target has {}",
            header.virtual_size,
            target.virtual_size()
        )));
    }
    if let Some(last) = state.last_sequence
        && !header.full
        && header.sequence <= last
    {
        return Err(refuse(format!(
            "delta sequence {} does not follow the last applied sequence {last}",
            header.sequence
        )));
    }
    if let Some(disk_id) = state.disk_id
        && !header.disk_id.is_nil()
        && disk_id != header.disk_id
    {
        return Err(refuse(format!(
            "the delta is for disk {}, the target is disk {disk_id}",
            header.disk_id
        )));
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|error| Error::file(name, "rewind delta", error))?;
    write_delta(reader, name, target)?;
    target.flush()?;
    Ok(summary)
}

/// A delta decoded whole with every checksum verified, its data held in memory, ready to be
/// written: for deltas small enough to hold (a chunk, an entry of a bundle), applying one then
/// costs one pass over its payloads instead of a verifying pass and a writing pass.
#[derive(Debug, Default)]
pub(crate) struct DecodedDelta {
    /// (disk offset, length, the extent's bytes in `data`, or `None` for zeros).
    extents: Vec<(u64, u64, Option<std::ops::Range<usize>>)>,
    data: Vec<u8>,
}

impl DecodedDelta {
    /// Writes every extent to `target`; does not flush.
    pub(crate) fn write_to(&self, target: &mut dyn BlockImage) -> Result<()> {
        for (offset, length, bytes) in &self.extents {
            match bytes {
                Some(range) => target.write_at(&self.data[range.clone()], *offset)?,
                None => target.zero_range(*offset, *length)?,
            }
        }
        Ok(())
    }
}

/// Verifies `reader` whole and keeps its data, up to `limit` bytes of it: `None` when the data
/// is larger (the delta is verified all the same; write it with [`write_delta`] then).
pub(crate) fn decode_delta(
    reader: impl Read,
    name: &str,
    limit: usize,
) -> Result<Option<DecodedDelta>> {
    let mut decoded = DecodedDelta::default();
    let mut fits = true;
    walk(reader, name, |offset, length, bytes| {
        if !fits {
            return Ok(());
        }
        match bytes {
            Some(bytes) if decoded.data.len() + bytes.len() > limit => {
                // Too large to hold: the rest is only verified, and what was held goes now.
                decoded = DecodedDelta::default();
                fits = false;
            }
            Some(bytes) => {
                let start = decoded.data.len();
                decoded.data.extend_from_slice(bytes);
                decoded
                    .extents
                    .push((offset, length, Some(start..decoded.data.len())));
            }
            None => decoded.extents.push((offset, length, None)),
        }
        Ok(())
    })?;
    Ok(fits.then_some(decoded))
}

/// The extents a delta's records cover, in order and merged where they touch, read from the
/// records alone: payloads are skipped, not decompressed nor checked. Only for a delta verified
/// before (one staged on the replica), where it saves a pass over the data.
pub(crate) fn listed_extents(
    mut reader: impl Read,
    name: &str,
) -> Result<Vec<std::ops::Range<u64>>> {
    let problem = |text: String| Error::Delta {
        name: name.to_owned(),
        problem: text,
    };
    let read = |reader: &mut dyn Read, buffer: &mut [u8]| {
        reader
            .read_exact(buffer)
            .map_err(|error| Error::file(name, "read delta", error))
    };
    let mut header = [0u8; HEADER_SIZE];
    read(&mut reader, &mut header)?;
    DeltaHeader::decode(&header).map_err(problem)?;
    let mut extents: Vec<std::ops::Range<u64>> = Vec::new();
    loop {
        let mut record_bytes = [0u8; RECORD_SIZE];
        read(&mut reader, &mut record_bytes)?;
        let record = Record::decode(&record_bytes).map_err(problem)?;
        if record.kind == KIND_END {
            return Ok(extents);
        }
        push_merged(&mut extents, record.offset, u64::from(record.length));
        let skipped = std::io::copy(
            &mut (&mut reader).take(u64::from(record.stored_length)),
            &mut std::io::sink(),
        )
        .map_err(|error| Error::file(name, "read delta", error))?;
        if skipped != u64::from(record.stored_length) {
            return Err(problem("truncated: a payload ends early".into()));
        }
    }
}

/// Writes a delta already verified whole (by [`verify_delta`]) to `target`, in one pass, each
/// extent only after its own checksum holds again; does not flush: the caller flushes once
/// after many deltas (the chunks of a replication cycle).
pub(crate) fn write_delta(
    reader: impl Read,
    name: &str,
    target: &mut dyn BlockImage,
) -> Result<DeltaSummary> {
    walk(reader, name, |offset, length, data| match data {
        Some(bytes) => target.write_at(bytes, offset),
        None => target.zero_range(offset, length),
    })
}
