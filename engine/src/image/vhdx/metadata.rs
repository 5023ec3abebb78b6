//! The metadata region: block size, virtual size, disk id and sector sizes.

use super::format::*;
use uuid::Uuid;

const ENTRY_SIZE: usize = 32;
const MAX_ENTRIES: usize = 2047;
const IS_VIRTUAL_DISK: u32 = 1 << 1;
const IS_REQUIRED: u32 = 1 << 2;

/// A payload block size: a power of two from 1 MiB to 256 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockSize(u32);

impl BlockSize {
    pub const DEFAULT: BlockSize = BlockSize(32 << 20);

    pub fn new(bytes: u64) -> Result<Self, String> {
        if bytes.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bytes) {
            Ok(BlockSize(bytes as u32))
        } else {
            Err(format!(
                "block size {bytes} is not a power of two from 1 MiB to 256 MiB"
            ))
        }
    }

    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }
}

/// A logical or physical sector size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SectorSize {
    #[serde(rename = "512")]
    Bytes512,
    #[serde(rename = "4096")]
    Bytes4096,
}

impl SectorSize {
    pub fn new(bytes: u64) -> Result<Self, String> {
        match bytes {
            512 => Ok(SectorSize::Bytes512),
            4096 => Ok(SectorSize::Bytes4096),
            other => Err(format!("sector size {other} is neither 512 nor 4096")),
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            SectorSize::Bytes512 => 512,
            SectorSize::Bytes4096 => 4096,
        }
    }
}

/// What the metadata region says about the virtual disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Metadata {
    pub block_size: BlockSize,
    /// Set for the fixed subformat: every block is allocated and stays so.
    pub leave_blocks_allocated: bool,
    /// Set for differencing images.
    pub has_parent: bool,
    pub virtual_size: u64,
    pub disk_id: Uuid,
    pub logical_sector_size: SectorSize,
    pub physical_sector_size: SectorSize,
}

/// Why metadata could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MetadataError {
    Corrupt(String),
    Unsupported(String),
}

impl Metadata {
    /// Checks the values against the format's limits.
    pub(super) fn validate(&self) -> Result<(), String> {
        let sector = self.logical_sector_size.bytes();
        if self.virtual_size == 0 || !self.virtual_size.is_multiple_of(sector) {
            return Err(format!(
                "virtual size {} is not a positive multiple of the {sector}-byte logical sector",
                self.virtual_size
            ));
        }
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(format!(
                "virtual size {} exceeds the format's 64 TiB limit",
                self.virtual_size
            ));
        }
        Ok(())
    }

    /// The metadata region's contents (table and items), `region_length` bytes long.
    pub(super) fn encode(&self, region_length: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; region_length];
        bytes[..8].copy_from_slice(METADATA_SIGNATURE);
        let items: [(Uuid, u32, Vec<u8>); 5] = [
            (FILE_PARAMETERS, IS_REQUIRED, {
                let mut value = self.block_size.0.to_le_bytes().to_vec();
                let flags =
                    u32::from(self.leave_blocks_allocated) | (u32::from(self.has_parent) << 1);
                value.extend_from_slice(&flags.to_le_bytes());
                value
            }),
            (
                VIRTUAL_DISK_SIZE,
                IS_REQUIRED | IS_VIRTUAL_DISK,
                self.virtual_size.to_le_bytes().to_vec(),
            ),
            (
                VIRTUAL_DISK_ID,
                IS_REQUIRED | IS_VIRTUAL_DISK,
                self.disk_id.to_bytes_le().to_vec(),
            ),
            (
                LOGICAL_SECTOR_SIZE,
                IS_REQUIRED | IS_VIRTUAL_DISK,
                (self.logical_sector_size.bytes() as u32)
                    .to_le_bytes()
                    .to_vec(),
            ),
            (
                PHYSICAL_SECTOR_SIZE,
                IS_REQUIRED | IS_VIRTUAL_DISK,
                (self.physical_sector_size.bytes() as u32)
                    .to_le_bytes()
                    .to_vec(),
            ),
        ];
        put_u16(&mut bytes, 10, items.len() as u16);
        let mut item_offset = METADATA_TABLE_SIZE;
        for (index, (guid, flags, value)) in items.iter().enumerate() {
            let at = 32 + index * ENTRY_SIZE;
            put_guid(&mut bytes, at, *guid);
            put_u32(&mut bytes, at + 16, item_offset as u32);
            put_u32(&mut bytes, at + 20, value.len() as u32);
            put_u32(&mut bytes, at + 24, *flags);
            bytes[item_offset..item_offset + value.len()].copy_from_slice(value);
            item_offset += value.len();
        }
        bytes
    }

    /// Decodes the metadata region's contents.
    pub(super) fn decode(region: &[u8]) -> Result<Metadata, MetadataError> {
        use MetadataError::{Corrupt, Unsupported};
        if region.len() < METADATA_TABLE_SIZE || &region[..8] != METADATA_SIGNATURE {
            return Err(Corrupt("metadata table has no 'metadata' signature".into()));
        }
        let count = usize::from(u16_at(region, 10));
        if count > MAX_ENTRIES {
            return Err(Corrupt(format!(
                "metadata table has {count} entries, at most {MAX_ENTRIES} are allowed"
            )));
        }
        let mut block_size = None;
        let mut virtual_size = None;
        let mut disk_id = None;
        let mut logical = None;
        let mut physical = None;
        for index in 0..count {
            let at = 32 + index * ENTRY_SIZE;
            let guid = guid_at(region, at);
            let offset = u32_at(region, at + 16) as usize;
            let length = u32_at(region, at + 20) as usize;
            let flags = u32_at(region, at + 24);
            let item_name = item_name(guid);
            let in_bounds = offset >= METADATA_TABLE_SIZE
                && offset
                    .checked_add(length)
                    .is_some_and(|end| end <= region.len());
            if !in_bounds {
                return Err(Corrupt(format!(
                    "metadata item {item_name} at {offset} (length {length}) lies outside the item area"
                )));
            }
            let value = &region[offset..offset + length];
            let expect = |wanted: usize| {
                if length == wanted {
                    Ok(())
                } else {
                    Err(Corrupt(format!(
                        "metadata item {item_name} is {length} bytes, expected {wanted}"
                    )))
                }
            };
            match guid {
                FILE_PARAMETERS => {
                    expect(8)?;
                    block_size = Some((u32_at(value, 0), u32_at(value, 4)));
                }
                VIRTUAL_DISK_SIZE => {
                    expect(8)?;
                    virtual_size = Some(u64_at(value, 0));
                }
                VIRTUAL_DISK_ID => {
                    expect(16)?;
                    disk_id = Some(guid_at(value, 0));
                }
                LOGICAL_SECTOR_SIZE => {
                    expect(4)?;
                    logical = Some(u32_at(value, 0));
                }
                PHYSICAL_SECTOR_SIZE => {
                    expect(4)?;
                    physical = Some(u32_at(value, 0));
                }
                PARENT_LOCATOR => {}
                unknown if flags & IS_REQUIRED != 0 => {
                    return Err(Unsupported(format!(
                        "unknown required metadata item {unknown}"
                    )));
                }
                _ => {}
            }
        }
        let missing = |name: &str| Corrupt(format!("metadata item {name} is missing"));
        let (block_bytes, file_flags) = block_size.ok_or_else(|| missing("File Parameters"))?;
        let metadata = Metadata {
            block_size: BlockSize::new(u64::from(block_bytes)).map_err(Corrupt)?,
            leave_blocks_allocated: file_flags & 1 != 0,
            has_parent: file_flags & 2 != 0,
            virtual_size: virtual_size.ok_or_else(|| missing("Virtual Disk Size"))?,
            disk_id: disk_id.ok_or_else(|| missing("Virtual Disk ID"))?,
            logical_sector_size: SectorSize::new(u64::from(
                logical.ok_or_else(|| missing("Logical Sector Size"))?,
            ))
            .map_err(|reason| Corrupt(format!("logical {reason}")))?,
            physical_sector_size: SectorSize::new(u64::from(
                physical.ok_or_else(|| missing("Physical Sector Size"))?,
            ))
            .map_err(|reason| Corrupt(format!("physical {reason}")))?,
        };
        metadata.validate().map_err(Corrupt)?;
        Ok(metadata)
    }
}

fn item_name(guid: Uuid) -> String {
    match guid {
        FILE_PARAMETERS => "File Parameters".into(),
        VIRTUAL_DISK_SIZE => "Virtual Disk Size".into(),
        VIRTUAL_DISK_ID => "Virtual Disk ID".into(),
        LOGICAL_SECTOR_SIZE => "Logical Sector Size".into(),
        PHYSICAL_SECTOR_SIZE => "Physical Sector Size".into(),
        PARENT_LOCATOR => "Parent Locator".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        Metadata {
            block_size: BlockSize::new(2 << 20).unwrap(),
            leave_blocks_allocated: true,
            has_parent: false,
            virtual_size: (100 << 20) + 3 * 4096,
            disk_id: Uuid::new_v4(),
            logical_sector_size: SectorSize::Bytes4096,
            physical_sector_size: SectorSize::Bytes4096,
        }
    }

    #[test]
    fn metadata_survives_encoding() {
        let metadata = sample();
        assert_eq!(
            Metadata::decode(&metadata.encode(1 << 20)).unwrap(),
            metadata
        );
    }

    #[test]
    fn block_sizes_outside_the_format_are_refused() {
        for bad in [0, 512 << 10, 3 << 20, 512 << 20] {
            assert!(BlockSize::new(bad).is_err(), "{bad}");
        }
        for good in [1 << 20, 32 << 20, 256 << 20] {
            assert!(BlockSize::new(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn a_virtual_size_that_is_not_a_sector_multiple_is_corrupt() {
        let mut metadata = sample();
        metadata.virtual_size = (1 << 20) + 512;
        let bytes = metadata.encode(1 << 20);
        assert!(matches!(
            Metadata::decode(&bytes),
            Err(MetadataError::Corrupt(_))
        ));
    }
}
