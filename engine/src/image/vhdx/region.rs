//! The region table: where the BAT and the metadata region live. Both copies are identical; a
//! reader uses the first valid one.

use super::format::*;
use uuid::Uuid;

const ENTRY_SIZE: usize = 32;
const MAX_ENTRIES: usize = (REGION_TABLE_SIZE - 16) / ENTRY_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Region {
    pub guid: Uuid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

impl Region {
    pub(super) fn end(&self) -> u64 {
        self.file_offset + u64::from(self.length)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RegionTable {
    pub regions: Vec<Region>,
}

impl RegionTable {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; REGION_TABLE_SIZE];
        bytes[..4].copy_from_slice(REGION_TABLE_SIGNATURE);
        put_u32(&mut bytes, 8, self.regions.len() as u32);
        for (index, region) in self.regions.iter().enumerate() {
            let at = 16 + index * ENTRY_SIZE;
            put_guid(&mut bytes, at, region.guid);
            put_u64(&mut bytes, at + 16, region.file_offset);
            put_u32(&mut bytes, at + 24, region.length);
            put_u32(&mut bytes, at + 28, u32::from(region.required));
        }
        seal(&mut bytes, 4);
        bytes
    }

    /// Decodes a region table, or says why it is not a valid one.
    pub(super) fn decode(bytes: &[u8]) -> Result<RegionTable, String> {
        if &bytes[..4] != REGION_TABLE_SIGNATURE {
            return Err("no 'regi' signature".into());
        }
        if !checksum_matches(bytes, 4) {
            return Err("checksum mismatch".into());
        }
        let count = u32_at(bytes, 8) as usize;
        if count > MAX_ENTRIES {
            return Err(format!("{count} entries, at most {MAX_ENTRIES} fit"));
        }
        let regions = (0..count)
            .map(|index| {
                let at = 16 + index * ENTRY_SIZE;
                Region {
                    guid: guid_at(bytes, at),
                    file_offset: u64_at(bytes, at + 16),
                    length: u32_at(bytes, at + 24),
                    required: u32_at(bytes, at + 28) & 1 == 1,
                }
            })
            .collect();
        Ok(RegionTable { regions })
    }

    pub(super) fn find(&self, guid: Uuid) -> Option<Region> {
        self.regions
            .iter()
            .copied()
            .find(|region| region.guid == guid)
    }

    /// Structural problems: misaligned or overlapping regions, duplicates, unknown required ones,
    /// regions in the header area or past `file_size`.
    pub(super) fn problems(&self, file_size: u64) -> Vec<String> {
        let mut problems = Vec::new();
        for (index, region) in self.regions.iter().enumerate() {
            let name = region_name(region.guid);
            if region.file_offset % ALIGNMENT != 0 || u64::from(region.length) % ALIGNMENT != 0 {
                problems.push(format!(
                    "{name} region at {} (length {}) is not 1 MiB aligned",
                    region.file_offset, region.length
                ));
            }
            if region.file_offset < ALIGNMENT || region.length == 0 {
                problems.push(format!(
                    "{name} region at {} (length {}) lies in the header area or is empty",
                    region.file_offset, region.length
                ));
            }
            if region.file_offset.saturating_add(u64::from(region.length)) > file_size {
                problems.push(format!(
                    "{name} region at {} (length {}) ends past the end of the file ({file_size} bytes)",
                    region.file_offset, region.length
                ));
            }
            if region.required && region.guid != BAT_REGION && region.guid != METADATA_REGION {
                problems.push(format!("unknown required region {}", region.guid));
            }
            for other in &self.regions[index + 1..] {
                if other.guid == region.guid {
                    problems.push(format!("{name} region listed twice"));
                } else if region.file_offset < other.end() && other.file_offset < region.end() {
                    problems.push(format!(
                        "{name} region overlaps {} region",
                        region_name(other.guid)
                    ));
                }
            }
        }
        for required in [BAT_REGION, METADATA_REGION] {
            if self.find(required).is_none() {
                problems.push(format!("no {} region", region_name(required)));
            }
        }
        problems
    }
}

pub(super) fn region_name(guid: Uuid) -> String {
    match guid {
        BAT_REGION => "BAT".into(),
        METADATA_REGION => "metadata".into(),
        other => format!("region {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RegionTable {
        RegionTable {
            regions: vec![
                Region {
                    guid: BAT_REGION,
                    file_offset: 3 << 20,
                    length: 1 << 20,
                    required: true,
                },
                Region {
                    guid: METADATA_REGION,
                    file_offset: 2 << 20,
                    length: 1 << 20,
                    required: true,
                },
            ],
        }
    }

    #[test]
    fn a_region_table_survives_encoding() {
        let decoded = RegionTable::decode(&table().encode()).unwrap();
        assert_eq!(decoded, table());
        assert!(decoded.problems(8 << 20).is_empty());
    }

    #[test]
    fn overlapping_and_out_of_file_regions_are_reported() {
        let mut bad = table();
        bad.regions[1].file_offset = 3 << 20;
        let problems = bad.problems(3 << 20);
        assert!(
            problems.iter().any(|p| p.contains("overlaps")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("past the end")),
            "{problems:?}"
        );
    }

    #[test]
    fn an_unknown_required_region_is_reported() {
        let mut odd = table();
        odd.regions.push(Region {
            guid: Uuid::from_u128(1),
            file_offset: 5 << 20,
            length: 1 << 20,
            required: true,
        });
        assert!(
            odd.problems(8 << 20)
                .iter()
                .any(|p| p.contains("unknown required"))
        );
    }
}
