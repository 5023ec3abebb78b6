//! Making a new VHDX file. The layout is fixed and simple: the log at 1 MiB (1 MiB long), the
//! metadata region at 2 MiB (1 MiB), the BAT at 3 MiB, payload blocks after it.

use super::VhdxImage;
use super::bat::{BlockIndex, Geometry, PayloadState};
use super::format::*;
use super::header::{Header, encode_file_identifier};
use super::metadata::{BlockSize, Metadata, SectorSize};
use super::region::{Region, RegionTable};
use crate::image::Access;
use crate::io::Storage;
use crate::{Error, Result};
use uuid::Uuid;

const LOG_OFFSET: u64 = ALIGNMENT;
const LOG_LENGTH: u64 = ALIGNMENT;
const METADATA_OFFSET: u64 = 2 * ALIGNMENT;
const METADATA_LENGTH: u64 = ALIGNMENT;
const BAT_OFFSET: u64 = 3 * ALIGNMENT;

/// What a new VHDX image looks like.
#[derive(Debug, Clone)]
pub struct VhdxCreateOptions {
    pub virtual_size: u64,
    pub block_size: BlockSize,
    /// Fixed subformat: every block allocated up front.
    pub fixed: bool,
    pub logical_sector_size: SectorSize,
    pub physical_sector_size: SectorSize,
    /// The virtual disk id; a fresh random one when `None`.
    pub disk_id: Option<Uuid>,
}

impl VhdxCreateOptions {
    /// A dynamic image with 32 MiB blocks and 512-byte logical, 4096-byte physical sectors (what
    /// qemu and Hyper-V both read).
    pub fn dynamic(virtual_size: u64) -> Self {
        VhdxCreateOptions {
            virtual_size,
            block_size: BlockSize::DEFAULT,
            fixed: false,
            logical_sector_size: SectorSize::Bytes512,
            physical_sector_size: SectorSize::Bytes4096,
            disk_id: None,
        }
    }
}

impl<S: Storage> VhdxImage<S> {
    /// Writes a new, empty VHDX image into `storage` (whose previous content is discarded) and
    /// opens it for writing. The file type identifier is written last, after a flush, so a
    /// crash part-way leaves a file that no reader takes for a VHDX image.
    ///
    /// A new 64 MiB disk for a VM, then protected: its writes tracked from the start.
    ///
    /// ```
    /// use blockrep::delta::Compression;
    /// use blockrep::image::vhdx::{VhdxCreateOptions, VhdxImage};
    /// use blockrep::io::{FileStorage, StorageOptions};
    /// use blockrep::protect::ProtectedVm;
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let directory = tempfile::tempdir()?;
    /// let path = directory.path().join("vm1.vhdx");
    /// let image = VhdxImage::create(
    ///     FileStorage::create_new(&path)?,
    ///     "vm1.vhdx",
    ///     &VhdxCreateOptions::dynamic(64 << 20),
    /// )?;
    /// drop(image);
    /// let vm = ProtectedVm::open(&[path], &StorageOptions::default(), Compression::Lz4)?;
    /// vm.disks()[0].write_at(b"boot sector", 0)?;
    /// assert_eq!(vm.descriptions()[0].virtual_size, 64 << 20);
    /// # Ok(())
    /// # }
    /// ```
    pub fn create(storage: S, name: &str, options: &VhdxCreateOptions) -> Result<Self> {
        let metadata = Metadata {
            block_size: options.block_size,
            leave_blocks_allocated: options.fixed,
            has_parent: false,
            virtual_size: options.virtual_size,
            disk_id: options.disk_id.unwrap_or_else(Uuid::new_v4),
            logical_sector_size: options.logical_sector_size,
            physical_sector_size: options.physical_sector_size,
        };
        metadata
            .validate()
            .map_err(|reason| Error::InvalidArgument {
                what: "virtual size",
                reason,
            })?;
        let geometry = Geometry::new(&metadata);
        let bat_length = align_up(geometry.bat_entries() * 8, ALIGNMENT);
        let first_block = BAT_OFFSET + bat_length;
        let io = |action: &'static str, offset: u64| {
            move |source| Error::io(name, action, offset, source)
        };

        storage
            .set_len(0)
            .map_err(|source| Error::file(name, "truncate", source))?;
        let regions = RegionTable {
            regions: vec![
                Region {
                    guid: BAT_REGION,
                    file_offset: BAT_OFFSET,
                    length: bat_length as u32,
                    required: true,
                },
                Region {
                    guid: METADATA_REGION,
                    file_offset: METADATA_OFFSET,
                    length: METADATA_LENGTH as u32,
                    required: true,
                },
            ],
        };
        let table = regions.encode();
        for offset in REGION_TABLE_OFFSETS {
            storage
                .write_at(&table, offset)
                .map_err(io("write region table", offset))?;
        }
        storage
            .write_at(&metadata.encode(METADATA_LENGTH as usize), METADATA_OFFSET)
            .map_err(io("write metadata", METADATA_OFFSET))?;

        let payload_end = if options.fixed {
            let mut bat = vec![0u8; (geometry.bat_entries() * 8) as usize];
            for block in 0..geometry.block_count {
                let file_offset = first_block + block * geometry.block_size;
                let entry = PayloadState::FullyPresent { file_offset }.encode();
                let index = geometry.bat_index(BlockIndex(block)).0 as usize;
                bat[index * 8..index * 8 + 8].copy_from_slice(&entry.to_le_bytes());
            }
            storage
                .write_at(&bat, BAT_OFFSET)
                .map_err(io("write BAT", BAT_OFFSET))?;
            let payload = geometry.block_count * geometry.block_size;
            storage
                .preallocate(first_block, payload)
                .map_err(io("preallocate", first_block))?;
            first_block + payload
        } else {
            first_block
        };
        storage
            .set_len(payload_end)
            .map_err(io("extend", payload_end))?;

        let header = Header {
            sequence: 0,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH as u32,
            log_offset: LOG_OFFSET,
        };
        for (sequence, offset) in HEADER_OFFSETS.into_iter().enumerate() {
            let header = Header {
                sequence: sequence as u64,
                ..header.clone()
            };
            storage
                .write_at(&header.encode(), offset)
                .map_err(io("write header", offset))?;
        }
        storage
            .flush()
            .map_err(|source| Error::file(name, "flush", source))?;
        let creator = format!("blockrep {}", env!("CARGO_PKG_VERSION"));
        storage
            .write_at(&encode_file_identifier(&creator), 0)
            .map_err(io("write file identifier", 0))?;
        storage
            .flush()
            .map_err(|source| Error::file(name, "flush", source))?;
        VhdxImage::open(storage, name, Access::ReadWrite)
    }
}
