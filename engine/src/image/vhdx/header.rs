//! The two VHDX headers. The current header is the valid one with the higher sequence number;
//! an update rewrites the other one with the next sequence number, so a torn header write leaves
//! the previous header current and the image intact.

use super::format::*;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    /// Non-nil while the log holds entries that must be replayed.
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_SIZE];
        bytes[..4].copy_from_slice(HEADER_SIGNATURE);
        put_u64(&mut bytes, 8, self.sequence);
        put_guid(&mut bytes, 16, self.file_write_guid);
        put_guid(&mut bytes, 32, self.data_write_guid);
        put_guid(&mut bytes, 48, self.log_guid);
        put_u16(&mut bytes, 64, self.log_version);
        put_u16(&mut bytes, 66, self.version);
        put_u32(&mut bytes, 68, self.log_length);
        put_u64(&mut bytes, 72, self.log_offset);
        seal(&mut bytes, 4);
        bytes
    }

    /// Decodes a header, or says why it is not a valid one.
    pub fn decode(bytes: &[u8]) -> Result<Header, String> {
        if bytes.len() != HEADER_SIZE {
            return Err(format!("header is {} bytes, expected 4096", bytes.len()));
        }
        if &bytes[..4] != HEADER_SIGNATURE {
            return Err("no 'head' signature".into());
        }
        if !checksum_matches(bytes, 4) {
            return Err("checksum mismatch".into());
        }
        Ok(Header {
            sequence: u64_at(bytes, 8),
            file_write_guid: guid_at(bytes, 16),
            data_write_guid: guid_at(bytes, 32),
            log_guid: guid_at(bytes, 48),
            log_version: u16_at(bytes, 64),
            version: u16_at(bytes, 66),
            log_length: u32_at(bytes, 68),
            log_offset: u64_at(bytes, 72),
        })
    }
}

/// Which of the two header slots holds the current header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderSlot {
    First,
    Second,
}

impl HeaderSlot {
    pub(crate) fn offset(self) -> u64 {
        HEADER_OFFSETS[self.index()]
    }
    pub(crate) fn index(self) -> usize {
        match self {
            HeaderSlot::First => 0,
            HeaderSlot::Second => 1,
        }
    }
    pub(crate) fn other(self) -> HeaderSlot {
        match self {
            HeaderSlot::First => HeaderSlot::Second,
            HeaderSlot::Second => HeaderSlot::First,
        }
    }
}

/// Picks the current header from the decoded contents of both slots.
pub(super) fn current_header(
    first: &Result<Header, String>,
    second: &Result<Header, String>,
    first_bytes: &[u8],
    second_bytes: &[u8],
) -> Result<(HeaderSlot, Header), String> {
    match (first, second) {
        (Ok(one), Ok(two)) if one.sequence > two.sequence => Ok((HeaderSlot::First, one.clone())),
        (Ok(one), Ok(two)) if one.sequence < two.sequence => Ok((HeaderSlot::Second, two.clone())),
        (Ok(one), Ok(_)) if first_bytes == second_bytes => Ok((HeaderSlot::First, one.clone())),
        (Ok(one), Ok(_)) => Err(format!(
            "both headers have sequence number {} but differ",
            one.sequence
        )),
        (Ok(one), Err(_)) => Ok((HeaderSlot::First, one.clone())),
        (Err(_), Ok(two)) => Ok((HeaderSlot::Second, two.clone())),
        (Err(one), Err(two)) => Err(format!(
            "no valid header (header 1: {one}; header 2: {two})"
        )),
    }
}

/// The 64 KiB file type identifier: the signature and a UTF-16 creator string.
pub(super) fn encode_file_identifier(creator: &str) -> Vec<u8> {
    let mut bytes = vec![0u8; 64 * 1024];
    bytes[..8].copy_from_slice(FILE_SIGNATURE);
    let utf16: Vec<u8> = creator
        .encode_utf16()
        .take(CREATOR_LENGTH / 2 - 1)
        .flat_map(u16::to_le_bytes)
        .collect();
    bytes[CREATOR_OFFSET..CREATOR_OFFSET + utf16.len()].copy_from_slice(&utf16);
    bytes
}

/// The creator string of a file type identifier, for display.
pub(super) fn decode_creator(identifier: &[u8]) -> String {
    let units: Vec<u16> = identifier[CREATOR_OFFSET..CREATOR_OFFSET + CREATOR_LENGTH]
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .take_while(|&unit| unit != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sequence: u64) -> Header {
        Header {
            sequence,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        }
    }

    #[test]
    fn a_header_survives_encoding() {
        let header = sample(7);
        assert_eq!(Header::decode(&header.encode()).unwrap(), header);
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let mut bytes = sample(7).encode();
        bytes[100] ^= 1;
        assert_eq!(Header::decode(&bytes).unwrap_err(), "checksum mismatch");
    }

    #[test]
    fn the_valid_header_with_the_higher_sequence_is_current() {
        let old = sample(4);
        let new = sample(5);
        let (old_bytes, new_bytes) = (old.encode(), new.encode());
        let pick = current_header(&Ok(old.clone()), &Ok(new.clone()), &old_bytes, &new_bytes);
        assert_eq!(pick.unwrap(), (HeaderSlot::Second, new.clone()));
        // A torn write of the newer header leaves the older one current.
        let torn = Header::decode(&[0u8; 4096]);
        assert_eq!(
            current_header(&Ok(old.clone()), &torn, &old_bytes, &[0; 4096]).unwrap(),
            (HeaderSlot::First, old)
        );
    }

    #[test]
    fn equal_sequences_with_different_content_are_refused() {
        let (one, two) = (sample(3), sample(3));
        assert!(
            current_header(
                &Ok(one.clone()),
                &Ok(two.clone()),
                &one.encode(),
                &two.encode()
            )
            .is_err()
        );
    }
}
