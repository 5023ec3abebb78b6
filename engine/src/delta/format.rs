//! Byte layouts of the delta format, version 1. All integers little-endian.

use uuid::Uuid;

pub(super) const MAGIC: &[u8; 8] = b"BRDELTA\n";
pub const FORMAT_VERSION: u16 = 1;
pub(crate) const HEADER_SIZE: usize = 72;
pub(super) const RECORD_SIZE: usize = 32;

pub(super) const KIND_DATA: u8 = 1;
pub(super) const KIND_ZERO: u8 = 2;
pub(super) const KIND_END: u8 = 3;

pub(super) const ENCODING_RAW: u8 = 0;
pub(super) const ENCODING_LZ4: u8 = 1;

pub(super) const FLAG_RECOVERY_POINT: u32 = 1 << 0;
pub(super) const FLAG_FULL: u32 = 1 << 1;

/// Largest extent one record covers.
pub(super) const MAX_EXTENT: u64 = 1 << 20;

/// What a delta says about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeltaHeader {
    pub disk_id: Uuid,
    pub virtual_size: u64,
    /// Tracking granularity the extents were cut at.
    pub block_size: u32,
    /// The tracking generation the delta holds.
    pub source_generation: u64,
    /// Position in the replication sequence; a full delta has 0.
    pub sequence: u64,
    /// The replica should keep a recovery point after applying it.
    pub recovery_point: bool,
    /// The delta holds the whole disk (initial replication), not only changes.
    pub full: bool,
}

impl DeltaHeader {
    pub(crate) fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes[10..12].copy_from_slice(&(HEADER_SIZE as u16).to_le_bytes());
        let flags = (u32::from(self.recovery_point) * FLAG_RECOVERY_POINT)
            | (u32::from(self.full) * FLAG_FULL);
        bytes[12..16].copy_from_slice(&flags.to_le_bytes());
        bytes[16..32].copy_from_slice(self.disk_id.as_bytes());
        bytes[32..40].copy_from_slice(&self.virtual_size.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.block_size.to_le_bytes());
        bytes[48..56].copy_from_slice(&self.source_generation.to_le_bytes());
        bytes[56..64].copy_from_slice(&self.sequence.to_le_bytes());
        let checksum = crc32c::crc32c(&bytes[..64]);
        bytes[64..68].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    pub(crate) fn decode(bytes: &[u8; HEADER_SIZE]) -> Result<Self, String> {
        if &bytes[..8] != MAGIC {
            return Err("not a blockrep delta (no BRDELTA signature)".into());
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(format!(
                "delta format version {version} is not supported (this blockrep reads version {FORMAT_VERSION})"
            ));
        }
        if u32_at(bytes, 64) != crc32c::crc32c(&bytes[..64]) {
            return Err("delta header checksum mismatch".into());
        }
        if bytes[68..72] != [0; 4] {
            return Err("delta header has non-zero reserved bytes".into());
        }
        if u16::from_le_bytes([bytes[10], bytes[11]]) as usize != HEADER_SIZE {
            return Err("delta header length is not 72".into());
        }
        let flags = u32_at(bytes, 12);
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[16..32]);
        Ok(DeltaHeader {
            disk_id: Uuid::from_bytes(id),
            virtual_size: u64_at(bytes, 32),
            block_size: u32_at(bytes, 40),
            source_generation: u64_at(bytes, 48),
            sequence: u64_at(bytes, 56),
            recovery_point: flags & FLAG_RECOVERY_POINT != 0,
            full: flags & FLAG_FULL != 0,
        })
    }
}

/// One record's fixed part: an extent, or the end of the delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    pub kind: u8,
    pub encoding: u8,
    /// Bytes of the disk the record covers (data and zero records).
    pub length: u32,
    /// Disk offset (data and zero records); the number of extent records (end record).
    pub offset: u64,
    /// Payload bytes that follow the record.
    pub stored_length: u32,
    /// CRC-32C of the uncompressed data (data records); of every byte before the end record
    /// (end record).
    pub checksum: u32,
}

impl Record {
    pub(super) fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut bytes = [0u8; RECORD_SIZE];
        bytes[0] = self.kind;
        bytes[1] = self.encoding;
        bytes[4..8].copy_from_slice(&self.length.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.offset.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.stored_length.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.checksum.to_le_bytes());
        let own = crc32c::crc32c(&bytes[..24]);
        bytes[24..28].copy_from_slice(&own.to_le_bytes());
        bytes
    }

    pub(super) fn decode(bytes: &[u8; RECORD_SIZE]) -> Result<Self, String> {
        if u32_at(bytes, 24) != crc32c::crc32c(&bytes[..24]) {
            return Err("record header checksum mismatch".into());
        }
        // Reserved bytes are outside the record's checksum: they must be zero.
        if bytes[2..4] != [0, 0] || bytes[28..32] != [0; 4] {
            return Err("record header has non-zero reserved bytes".into());
        }
        Ok(Record {
            kind: bytes[0],
            encoding: bytes[1],
            length: u32_at(bytes, 4),
            offset: u64_at(bytes, 8),
            stored_length: u32_at(bytes, 16),
            checksum: u32_at(bytes, 20),
        })
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
