//! The VHDX log: a circular buffer of entries, each a set of 4 KiB sector writes (data
//! descriptors) and zero runs (zero descriptors) to metadata that a writer made crash-safe by
//! logging them first. A file whose header carries a non-nil log GUID may hold an active
//! sequence of entries that must be replayed before its structures can be trusted.
//!
//! This module finds and decodes that sequence; applying it (to the file, or in memory for a
//! read-only open) is the caller's job.

use super::format::*;
use std::collections::BTreeMap;
use uuid::Uuid;

const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const DATA_DESCRIPTOR: &[u8; 4] = b"desc";
const ZERO_DESCRIPTOR: &[u8; 4] = b"zero";
const DATA_SECTOR: &[u8; 4] = b"data";
const ENTRY_HEADER_SIZE: usize = 64;
const DESCRIPTOR_SIZE: usize = 32;
const SECTOR: usize = LOG_SECTOR as usize;

/// One write the log asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    /// A whole 4 KiB sector at `file_offset`.
    Data { file_offset: u64, sector: Vec<u8> },
    /// `length` zero bytes at `file_offset`.
    Zero { file_offset: u64, length: u64 },
}

impl LogWrite {
    pub(crate) fn file_offset(&self) -> u64 {
        match self {
            LogWrite::Data { file_offset, .. } | LogWrite::Zero { file_offset, .. } => *file_offset,
        }
    }

    pub(crate) fn length(&self) -> u64 {
        match self {
            LogWrite::Data { sector, .. } => sector.len() as u64,
            LogWrite::Zero { length, .. } => *length,
        }
    }

    pub(crate) fn end(&self) -> u64 {
        self.file_offset() + self.length()
    }
}

/// A decoded log entry.
#[derive(Debug, Clone)]
struct Entry {
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: Vec<LogWrite>,
}

/// The active sequence of a log: what replay must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replay {
    /// The writes of every entry from the tail to the head, in order.
    pub writes: Vec<LogWrite>,
    /// The file must be at least this long, or it was truncated after the log was written.
    pub flushed_file_offset: u64,
    /// The file must be extended to at least this length.
    pub last_file_offset: u64,
    /// Number of entries in the sequence.
    pub entries: usize,
    /// Sequence number of the head entry.
    pub head_sequence: u64,
}

impl Replay {
    /// Overwrites `buf`, holding file bytes from `offset`, with what the log writes there.
    pub(crate) fn overlay(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        for write in &self.writes {
            let start = write.file_offset().max(offset);
            let stop = write.end().min(end);
            if start >= stop {
                continue;
            }
            let target = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            match write {
                LogWrite::Data {
                    file_offset,
                    sector,
                } => target.copy_from_slice(
                    &sector[(start - file_offset) as usize..(stop - file_offset) as usize],
                ),
                LogWrite::Zero { .. } => target.fill(0),
            }
        }
    }

    /// The file size after replay.
    pub(crate) fn file_size_after(&self, file_size: u64) -> u64 {
        let written = self.writes.iter().map(LogWrite::end).max().unwrap_or(0);
        file_size.max(self.last_file_offset).max(written)
    }
}

/// `length` bytes of the circular `log` from `position`, wrapping at its end.
fn wrapped(log: &[u8], position: u64, length: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(length as usize);
    let mut at = position as usize % log.len();
    let mut left = length as usize;
    while left > 0 {
        let step = left.min(log.len() - at);
        bytes.extend_from_slice(&log[at..at + step]);
        left -= step;
        at = (at + step) % log.len();
    }
    bytes
}

/// Decodes the entry starting at `position`, or `None` if none valid starts there.
fn decode_entry(log: &[u8], position: u64, log_guid: Uuid) -> Option<Entry> {
    let first = wrapped(log, position, LOG_SECTOR);
    if &first[..4] != ENTRY_SIGNATURE || guid_at(&first, 32) != log_guid {
        return None;
    }
    let length = u64::from(u32_at(&first, 8));
    let tail = u64::from(u32_at(&first, 12));
    let sequence = u64_at(&first, 16);
    let descriptor_count = u32_at(&first, 24) as usize;
    let log_length = log.len() as u64;
    if length == 0 || length % LOG_SECTOR != 0 || length > log_length {
        return None;
    }
    if tail % LOG_SECTOR != 0 || tail >= log_length || sequence == 0 {
        return None;
    }
    let descriptor_sectors =
        (ENTRY_HEADER_SIZE + descriptor_count * DESCRIPTOR_SIZE).div_ceil(SECTOR);
    let sectors = (length / LOG_SECTOR) as usize;
    if descriptor_sectors > sectors {
        return None;
    }
    let entry = wrapped(log, position, length);
    if !checksum_matches(&entry, 4) {
        return None;
    }
    let mut writes = Vec::with_capacity(descriptor_count);
    let mut data_sector = descriptor_sectors;
    for index in 0..descriptor_count {
        let at = ENTRY_HEADER_SIZE + index * DESCRIPTOR_SIZE;
        let descriptor = &entry[at..at + DESCRIPTOR_SIZE];
        let file_offset = u64_at(descriptor, 16);
        if u64_at(descriptor, 24) != sequence || !file_offset.is_multiple_of(LOG_SECTOR) {
            return None;
        }
        match &descriptor[..4] {
            signature if signature == DATA_DESCRIPTOR => {
                if data_sector >= sectors {
                    return None;
                }
                let data = &entry[data_sector * SECTOR..(data_sector + 1) * SECTOR];
                let stamp =
                    (u64::from(u32_at(data, 4)) << 32) | u64::from(u32_at(data, SECTOR - 4));
                if &data[..4] != DATA_SECTOR || stamp != sequence {
                    return None;
                }
                // The first 8 and last 4 bytes of the sector live in the descriptor.
                let mut sector = data.to_vec();
                sector[..8].copy_from_slice(&descriptor[8..16]);
                sector[SECTOR - 4..].copy_from_slice(&descriptor[4..8]);
                writes.push(LogWrite::Data {
                    file_offset,
                    sector,
                });
                data_sector += 1;
            }
            signature if signature == ZERO_DESCRIPTOR => {
                let length = u64_at(descriptor, 8);
                if !length.is_multiple_of(LOG_SECTOR) || file_offset.checked_add(length).is_none() {
                    return None;
                }
                writes.push(LogWrite::Zero {
                    file_offset,
                    length,
                });
            }
            _ => return None,
        }
    }
    if data_sector != sectors {
        return None;
    }
    Some(Entry {
        length,
        tail,
        sequence,
        flushed_file_offset: u64_at(&first, 48),
        last_file_offset: u64_at(&first, 56),
        writes,
    })
}

/// Finds the active sequence of `log` (the log region's bytes) for `log_guid`: the valid run of
/// entries with consecutive sequence numbers whose head has the highest sequence number and whose
/// head's tail points at an entry of the run. `None` means there is nothing to replay.
pub(crate) fn find_active_sequence(log: &[u8], log_guid: Uuid) -> Option<Replay> {
    if log.is_empty() || !(log.len() as u64).is_multiple_of(LOG_SECTOR) || log_guid.is_nil() {
        return None;
    }
    let log_length = log.len() as u64;
    let entries: BTreeMap<u64, Entry> = (0..log_length)
        .step_by(SECTOR)
        .filter(|&position| log[position as usize..position as usize + 4] == *ENTRY_SIGNATURE)
        .filter_map(|position| decode_entry(log, position, log_guid).map(|entry| (position, entry)))
        .collect();
    let mut best: Option<(u64, Vec<u64>)> = None;
    for (&start, first) in &entries {
        let mut chain = vec![start];
        let mut current = first;
        let mut covered = first.length;
        loop {
            let next_position = (chain[chain.len() - 1] + current.length) % log_length;
            match entries.get(&next_position) {
                Some(next)
                    if next.sequence == current.sequence + 1
                        && covered + next.length <= log_length =>
                {
                    covered += next.length;
                    chain.push(next_position);
                    current = next;
                }
                _ => break,
            }
        }
        let Some(tail_index) = chain.iter().position(|&position| position == current.tail) else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|(sequence, _)| current.sequence > *sequence)
        {
            best = Some((current.sequence, chain[tail_index..].to_vec()));
        }
    }
    let (head_sequence, chain) = best?;
    let head = &entries[chain.last()?];
    Some(Replay {
        writes: chain
            .iter()
            .flat_map(|position| entries[position].writes.iter().cloned())
            .collect(),
        flushed_file_offset: head.flushed_file_offset,
        last_file_offset: head.last_file_offset,
        entries: chain.len(),
        head_sequence,
    })
}

/// Encodes one log entry holding `writes` (data writes must be whole, aligned 4 KiB sectors).
/// blockrep's writer orders its updates instead of logging them; this exists so that tests and
/// tools can make the logs that other writers leave behind.
pub fn encode_entry(
    sequence: u64,
    tail: u32,
    log_guid: Uuid,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: &[LogWrite],
) -> Vec<u8> {
    let descriptor_sectors = (ENTRY_HEADER_SIZE + writes.len() * DESCRIPTOR_SIZE).div_ceil(SECTOR);
    let data_count = writes
        .iter()
        .filter(|write| matches!(write, LogWrite::Data { .. }))
        .count();
    let mut entry = vec![0u8; (descriptor_sectors + data_count) * SECTOR];
    entry[..4].copy_from_slice(ENTRY_SIGNATURE);
    let entry_length = entry.len() as u32;
    put_u32(&mut entry, 8, entry_length);
    put_u32(&mut entry, 12, tail);
    put_u64(&mut entry, 16, sequence);
    put_u32(&mut entry, 24, writes.len() as u32);
    put_guid(&mut entry, 32, log_guid);
    put_u64(&mut entry, 48, flushed_file_offset);
    put_u64(&mut entry, 56, last_file_offset);
    let mut data_sector = descriptor_sectors;
    for (index, write) in writes.iter().enumerate() {
        let at = ENTRY_HEADER_SIZE + index * DESCRIPTOR_SIZE;
        put_u64(&mut entry, at + 16, write.file_offset());
        put_u64(&mut entry, at + 24, sequence);
        match write {
            LogWrite::Data { sector, .. } => {
                assert_eq!(sector.len(), SECTOR, "a data write is one 4 KiB sector");
                entry[at..at + 4].copy_from_slice(DATA_DESCRIPTOR);
                entry[at + 4..at + 8].copy_from_slice(&sector[SECTOR - 4..]);
                entry[at + 8..at + 16].copy_from_slice(&sector[..8]);
                let data = &mut entry[data_sector * SECTOR..(data_sector + 1) * SECTOR];
                data[8..SECTOR - 4].copy_from_slice(&sector[8..SECTOR - 4]);
                data[..4].copy_from_slice(DATA_SECTOR);
                put_u32(data, 4, (sequence >> 32) as u32);
                put_u32(data, SECTOR - 4, sequence as u32);
                data_sector += 1;
            }
            LogWrite::Zero { length, .. } => {
                entry[at..at + 4].copy_from_slice(ZERO_DESCRIPTOR);
                put_u64(&mut entry, at + 8, *length);
            }
        }
    }
    seal(&mut entry, 4);
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(fill: u8) -> Vec<u8> {
        let mut sector = vec![fill; SECTOR];
        sector[0] = 0xAA; // lives in the descriptor
        sector[SECTOR - 1] = 0xBB; // lives in the descriptor
        sector
    }

    fn place(log: &mut [u8], position: usize, entry: &[u8]) {
        for (index, byte) in entry.iter().enumerate() {
            let at = (position + index) % log.len();
            log[at] = *byte;
        }
    }

    #[test]
    fn a_single_entry_is_the_active_sequence() {
        let guid = Uuid::new_v4();
        let writes = vec![
            LogWrite::Data {
                file_offset: 2 << 20,
                sector: sector(1),
            },
            LogWrite::Zero {
                file_offset: 3 << 20,
                length: 8192,
            },
        ];
        let mut log = vec![0u8; 1 << 20];
        place(
            &mut log,
            0,
            &encode_entry(5, 0, guid, 4 << 20, 5 << 20, &writes),
        );
        let replay = find_active_sequence(&log, guid).unwrap();
        assert_eq!(replay.writes, writes);
        assert_eq!(
            (replay.flushed_file_offset, replay.last_file_offset),
            (4 << 20, 5 << 20)
        );
        assert_eq!(replay.entries, 1);
        // Another log GUID means the entries are stale.
        assert!(find_active_sequence(&log, Uuid::new_v4()).is_none());
    }

    #[test]
    fn replay_starts_at_the_tail_of_the_newest_head_and_wraps_around() {
        let guid = Uuid::new_v4();
        let log_length = 64 * SECTOR;
        let mut log = vec![0u8; log_length];
        // An old, already applied entry at 0; then a sequence 7, 8 that wraps past the end.
        let old = encode_entry(
            3,
            0,
            guid,
            0,
            0,
            &[LogWrite::Data {
                file_offset: 0,
                sector: sector(9),
            }],
        );
        place(&mut log, 0, &old);
        let seventh_at = 62 * SECTOR;
        let seventh = encode_entry(
            7,
            seventh_at as u32,
            guid,
            0,
            0,
            &[LogWrite::Data {
                file_offset: 4096,
                sector: sector(7),
            }],
        );
        place(&mut log, seventh_at, &seventh);
        let eighth_at = (seventh_at + seventh.len()) % log_length;
        let eighth = encode_entry(
            8,
            seventh_at as u32,
            guid,
            0,
            0,
            &[LogWrite::Data {
                file_offset: 8192,
                sector: sector(8),
            }],
        );
        place(&mut log, eighth_at, &eighth);
        let replay = find_active_sequence(&log, guid).unwrap();
        assert_eq!(replay.entries, 2);
        assert_eq!(replay.head_sequence, 8);
        let offsets: Vec<u64> = replay.writes.iter().map(LogWrite::file_offset).collect();
        assert_eq!(offsets, vec![4096, 8192]);
    }

    #[test]
    fn a_torn_entry_is_not_replayed() {
        let guid = Uuid::new_v4();
        let mut log = vec![0u8; 16 * SECTOR];
        let first = encode_entry(
            1,
            0,
            guid,
            0,
            0,
            &[LogWrite::Data {
                file_offset: 0,
                sector: sector(1),
            }],
        );
        place(&mut log, 0, &first);
        let mut second = encode_entry(
            2,
            0,
            guid,
            0,
            0,
            &[LogWrite::Data {
                file_offset: 4096,
                sector: sector(2),
            }],
        );
        second[SECTOR + 100] ^= 0xFF; // a data sector half written
        place(&mut log, first.len(), &second);
        let replay = find_active_sequence(&log, guid).unwrap();
        assert_eq!(replay.head_sequence, 1);
        assert_eq!(replay.writes.len(), 1);
    }

    #[test]
    fn the_overlay_patches_reads_in_log_order() {
        let replay = Replay {
            writes: vec![
                LogWrite::Data {
                    file_offset: 4096,
                    sector: vec![1; SECTOR],
                },
                LogWrite::Zero {
                    file_offset: 4096 + 100,
                    length: 10,
                },
            ],
            flushed_file_offset: 0,
            last_file_offset: 0,
            entries: 1,
            head_sequence: 1,
        };
        let mut buf = vec![5u8; 200];
        replay.overlay(&mut buf, 4096 - 50);
        assert!(buf[..50].iter().all(|&b| b == 5));
        assert!(buf[50..150].iter().all(|&b| b == 1));
        assert!(buf[150..160].iter().all(|&b| b == 0));
        assert!(buf[160..].iter().all(|&b| b == 1));
    }
}
