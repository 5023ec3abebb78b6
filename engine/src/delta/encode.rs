//! Encoding: read the changed extents from the image, find the zero blocks, compress what
//! compresses, and stream the records out.

use super::format::*;
use crate::image::{BlockImage, is_zero};
use crate::{Error, Result};
use std::io::Write;
use std::ops::Range;

/// What an encoding produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EncodeStatistics {
    pub data_records: u64,
    pub zero_records: u64,
    /// Disk bytes in data records, before compression.
    pub data_bytes: u64,
    /// Disk bytes in zero records.
    pub zero_bytes: u64,
    /// Bytes written, the whole delta.
    pub delta_bytes: u64,
}

/// Counts bytes and keeps the running checksum the trailer carries.
struct Output<W: Write> {
    writer: W,
    checksum: u32,
    written: u64,
}

impl<W: Write> Output<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)?;
        self.checksum = crc32c::crc32c_append(self.checksum, bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }
}

/// Writes a delta of `extents` (byte ranges of `image`, in order, not overlapping) to `writer`.
/// Blocks of `header.block_size` that read as zeros become zero records; data runs are cut at
/// 1 MiB and compressed with lz4 when that saves at least an eighth.
pub fn encode_delta(
    image: &dyn BlockImage,
    extents: &[Range<u64>],
    header: &DeltaHeader,
    writer: impl Write,
    name: &str,
) -> Result<EncodeStatistics> {
    DeltaEncoder::new().encode(image, extents, header, writer, name, Compression::Lz4)
}

/// Whether data records may be lz4-compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Compress a record when that saves at least an eighth of it.
    #[default]
    Lz4,
    /// Store every record raw (for links fast enough that compressing costs more than it saves).
    Off,
}

/// Encodes deltas, reusing its buffers from one delta to the next: encoding many small deltas
/// (the chunks of a replication cycle) then costs no allocation or page fault each. The buffers
/// grow to the longest extent encoded so far (at most 1 MiB), so an encoder made for a
/// small delta does not zero megabytes it never uses.
pub struct DeltaEncoder {
    buffer: Vec<u8>,
    compressed: Vec<u8>,
}

impl Default for DeltaEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DeltaEncoder {
    pub fn new() -> Self {
        DeltaEncoder {
            buffer: Vec::new(),
            compressed: Vec::new(),
        }
    }

    /// Grows the buffers to hold a run of `length` bytes and its compressed form.
    fn reserve(&mut self, length: usize) {
        if self.buffer.len() < length {
            self.buffer.resize(length, 0);
            self.compressed
                .resize(lz4_flex::block::get_maximum_output_size(length), 0);
        }
    }

    /// [`encode_delta`] with these buffers, choosing whether to compress.
    pub(crate) fn encode(
        &mut self,
        image: &dyn BlockImage,
        extents: &[Range<u64>],
        header: &DeltaHeader,
        writer: impl Write,
        name: &str,
        compression: Compression,
    ) -> Result<EncodeStatistics> {
        encode_into(image, extents, header, writer, name, compression, self)
    }
}

fn encode_into(
    image: &dyn BlockImage,
    extents: &[Range<u64>],
    header: &DeltaHeader,
    writer: impl Write,
    name: &str,
    compression: Compression,
    encoder: &mut DeltaEncoder,
) -> Result<EncodeStatistics> {
    let longest = extents
        .iter()
        .map(|extent| extent.end.saturating_sub(extent.start).min(MAX_EXTENT))
        .max()
        .unwrap_or(0);
    encoder.reserve(longest as usize);
    let DeltaEncoder { buffer, compressed } = encoder;
    let io = |source: std::io::Error| Error::file(name, "write delta", source);
    let block = u64::from(header.block_size).max(512);
    let mut output = Output {
        writer,
        checksum: 0,
        written: 0,
    };
    output.put(&header.encode()).map_err(io)?;
    let mut statistics = EncodeStatistics::default();
    let mut previous_end = 0;
    for extent in extents {
        if extent.start < previous_end || extent.end > image.virtual_size() {
            return Err(Error::InvalidArgument {
                what: "delta extents",
                reason: format!("{extent:?} is out of order or past the disk"),
            });
        }
        previous_end = extent.end;
        let mut position = extent.start;
        while position < extent.end {
            let length = MAX_EXTENT.min(extent.end - position);
            let data = &mut buffer[..length as usize];
            image.read_at(data, position)?;
            // Split the chunk into runs of zero and non-zero blocks.
            let mut run_start = 0usize;
            while run_start < data.len() {
                let block_end = |at: usize| {
                    ((((position + at as u64) / block) + 1) * block - position).min(length) as usize
                };
                let zero = is_zero(&data[run_start..block_end(run_start)]);
                let mut run_end = block_end(run_start);
                while run_end < data.len() && is_zero(&data[run_end..block_end(run_end)]) == zero {
                    run_end = block_end(run_end);
                }
                let offset = position + run_start as u64;
                let piece = &data[run_start..run_end];
                if zero {
                    let record = Record {
                        kind: KIND_ZERO,
                        encoding: ENCODING_RAW,
                        length: piece.len() as u32,
                        offset,
                        stored_length: 0,
                        checksum: 0,
                    };
                    output.put(&record.encode()).map_err(io)?;
                    statistics.zero_records += 1;
                    statistics.zero_bytes += piece.len() as u64;
                } else {
                    let checksum = crc32c::crc32c(piece);
                    let packed = match compression {
                        Compression::Lz4 => {
                            lz4_flex::block::compress_into(piece, compressed).unwrap_or(usize::MAX)
                        }
                        Compression::Off => usize::MAX,
                    };
                    let (encoding, payload) = if packed <= piece.len() - piece.len() / 8 {
                        (ENCODING_LZ4, &compressed[..packed])
                    } else {
                        (ENCODING_RAW, piece)
                    };
                    let record = Record {
                        kind: KIND_DATA,
                        encoding,
                        length: piece.len() as u32,
                        offset,
                        stored_length: payload.len() as u32,
                        checksum,
                    };
                    output.put(&record.encode()).map_err(io)?;
                    output.put(payload).map_err(io)?;
                    statistics.data_records += 1;
                    statistics.data_bytes += piece.len() as u64;
                }
                run_start = run_end;
            }
            position += length;
        }
    }
    let end = Record {
        kind: KIND_END,
        encoding: ENCODING_RAW,
        length: 0,
        offset: statistics.data_records + statistics.zero_records,
        stored_length: 0,
        checksum: output.checksum,
    };
    output.put(&end.encode()).map_err(io)?;
    output.writer.flush().map_err(io)?;
    statistics.delta_bytes = output.written;
    Ok(statistics)
}
