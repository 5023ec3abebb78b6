//! Fixed facts of the MS-VHDX version 1 format: where structures sit, their signatures and GUIDs,
//! and the little-endian field access and CRC-32C checksums they all share.

use crate::units::{KIB, MIB};
use uuid::Uuid;

pub(crate) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// The file type identifier occupies the first 64 KiB; the creator string follows the signature.
pub(super) const CREATOR_OFFSET: usize = 8;
pub(super) const CREATOR_LENGTH: usize = 512;

pub(super) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub(super) const HEADER_SIZE: usize = 4 * KIB as usize;
pub(super) const HEADER_SIGNATURE: &[u8; 4] = b"head";

pub(super) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub(super) const REGION_TABLE_SIZE: usize = 64 * KIB as usize;
pub(super) const REGION_TABLE_SIGNATURE: &[u8; 4] = b"regi";

pub(super) const METADATA_TABLE_SIZE: usize = 64 * KIB as usize;
pub(super) const METADATA_SIGNATURE: &[u8; 8] = b"metadata";

/// Every region, the log and every payload block start on a 1 MiB boundary.
pub(super) const ALIGNMENT: u64 = MIB;
/// The log is a circular buffer of 4 KiB sectors.
pub(super) const LOG_SECTOR: u64 = 4 * KIB;

pub(super) const MIN_BLOCK_SIZE: u64 = MIB;
pub(super) const MAX_BLOCK_SIZE: u64 = 256 * MIB;
/// Largest virtual disk the format allows.
pub(super) const MAX_VIRTUAL_SIZE: u64 = 64 * crate::units::TIB;

pub(super) const BAT_REGION: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
pub(super) const METADATA_REGION: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);

pub(super) const FILE_PARAMETERS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub(super) const VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub(super) const VIRTUAL_DISK_ID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub(super) const LOGICAL_SECTOR_SIZE: Uuid =
    Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub(super) const PHYSICAL_SECTOR_SIZE: Uuid =
    Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub(super) const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);

pub(super) fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

pub(super) fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

pub(super) fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// GUIDs are stored in Microsoft's mixed-endian order.
pub(super) fn guid_at(bytes: &[u8], offset: usize) -> Uuid {
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&bytes[offset..offset + 16]);
    Uuid::from_bytes_le(raw)
}

pub(super) fn put_u16(bytes: &mut [u8], offset: usize, value: u16) {
    bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
}

pub(super) fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
    bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

pub(super) fn put_u64(bytes: &mut [u8], offset: usize, value: u64) {
    bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

pub(super) fn put_guid(bytes: &mut [u8], offset: usize, value: Uuid) {
    bytes[offset..offset + 16].copy_from_slice(&value.to_bytes_le());
}

/// CRC-32C of `bytes` with the 4-byte checksum field at `field` counted as zeros.
pub(super) fn checksum(bytes: &[u8], field: usize) -> u32 {
    let before = crc32c::crc32c(&bytes[..field]);
    let zeroed = crc32c::crc32c_append(before, &[0; 4]);
    crc32c::crc32c_append(zeroed, &bytes[field + 4..])
}

/// Stores the checksum of `bytes` in its field at `field`.
pub(super) fn seal(bytes: &mut [u8], field: usize) {
    let sum = checksum(bytes, field);
    put_u32(bytes, field, sum);
}

/// True when the checksum stored at `field` matches the content.
pub(super) fn checksum_matches(bytes: &[u8], field: usize) -> bool {
    u32_at(bytes, field) == checksum(bytes, field)
}

pub(super) fn align_up(value: u64, alignment: u64) -> u64 {
    value.div_ceil(alignment) * alignment
}
