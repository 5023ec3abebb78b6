//! Images left with a non-empty log by a writer that crashed: read-only opens apply the log in
//! memory, read-write opens replay it into the file (and a crash during replay is harmless).

mod common;

use blockrep::image::vhdx::log::{LogWrite, encode_entry};
use blockrep::image::vhdx::{Header, PayloadState, check};
use blockrep::image::{Access, BlockImage, VhdxImage};
use blockrep::io::{MemoryStorage, Storage};
use common::*;
use std::sync::Arc;
use uuid::Uuid;

const MIB: u64 = 1 << 20;
const LOG_OFFSET: u64 = MIB;
const BAT_OFFSET: u64 = 3 * MIB;

fn current_header(storage: &dyn Storage) -> (u64, Header) {
    [64u64 << 10, 128 << 10]
        .into_iter()
        .filter_map(|offset| {
            let mut bytes = vec![0u8; 4096];
            storage.read_at(&mut bytes, offset).ok()?;
            Header::decode(&bytes).ok().map(|header| (offset, header))
        })
        .max_by_key(|(_, header)| header.sequence)
        .unwrap()
}

/// Makes the state a logging writer leaves when it crashes after its log entries are durable
/// but before it wrote them in place: block 1 gets data at a new place past the end of the
/// file, and its BAT entry; block 0's data is partly zeroed. Returns the bytes block 1 holds.
fn leave_unreplayed_log(storage: &Arc<MemoryStorage>, entries_at: &[u64]) -> Vec<u8> {
    let size = storage.size().unwrap();
    let new_block = size.div_ceil(MIB) * MIB;
    let data = pattern(77, 8192);
    let mut bat_page = vec![0u8; 4096];
    storage.read_at(&mut bat_page, BAT_OFFSET).unwrap();
    bat_page[8..16].copy_from_slice(
        &PayloadState::FullyPresent {
            file_offset: new_block,
        }
        .encode()
        .to_le_bytes(),
    );
    let block0 = {
        let entry = u64::from_le_bytes(bat_page[..8].try_into().unwrap());
        PayloadState::decode(entry).unwrap().stored_at().unwrap()
    };
    let guid = Uuid::new_v4();
    let all_writes = [
        vec![LogWrite::Data {
            file_offset: new_block,
            sector: data[..4096].to_vec(),
        }],
        vec![
            LogWrite::Data {
                file_offset: new_block + 4096,
                sector: data[4096..].to_vec(),
            },
            LogWrite::Zero {
                file_offset: block0,
                length: 4096,
            },
        ],
        vec![LogWrite::Data {
            file_offset: BAT_OFFSET,
            sector: bat_page,
        }],
    ];
    // Spread the writes over as many entries as asked; the tail is the first entry.
    let groups: Vec<Vec<LogWrite>> = if entries_at.len() == 1 {
        vec![all_writes.concat()]
    } else {
        all_writes.to_vec()
    };
    let tail = entries_at[0] as u32;
    for (index, (writes, &position)) in groups.iter().zip(entries_at).enumerate() {
        let entry = encode_entry(10 + index as u64, tail, guid, size, new_block + MIB, writes);
        // The log is circular: an entry that reaches its end continues at its start.
        for (sector_index, sector) in entry.chunks(4096).enumerate() {
            let at = (position + sector_index as u64 * 4096) % MIB;
            storage.write_at(sector, LOG_OFFSET + at).unwrap();
        }
    }
    let (slot, header) = current_header(&**storage);
    let other = if slot == 64 << 10 {
        128 << 10
    } else {
        64 << 10
    };
    let dirty = Header {
        sequence: header.sequence + 1,
        log_guid: guid,
        ..header
    };
    storage.write_at(&dirty.encode(), other).unwrap();
    storage.flush().unwrap();
    data
}

fn image_with_block_zero() -> Arc<MemoryStorage> {
    let (storage, mut image) = create(&options(4 * MIB, MIB, 512, false));
    image.write_at(&[0xC3; 8192], 0).unwrap();
    image.close().unwrap();
    storage
}

fn assert_log_applied(image: &dyn BlockImage, data: &[u8]) {
    let mut block1 = vec![0u8; 8192];
    image.read_at(&mut block1, MIB).unwrap();
    assert!(block1 == data, "block 1 does not hold the logged data");
    let mut block0 = vec![0u8; 8192];
    image.read_at(&mut block0, 0).unwrap();
    assert!(
        block0[..4096].iter().all(|&b| b == 0),
        "the logged zero run is missing"
    );
    assert!(block0[4096..].iter().all(|&b| b == 0xC3));
}

#[test]
fn a_read_only_open_applies_the_log_in_memory_and_leaves_the_file_alone() {
    let storage = image_with_block_zero();
    let data = leave_unreplayed_log(&storage, &[0]);
    let before = storage.to_bytes();
    let image = reopen(&storage, Access::ReadOnly);
    assert!(image.info().log_pending_replay);
    assert_log_applied(&image, &data);
    drop(image);
    assert!(
        storage.to_bytes() == before,
        "a read-only open changed the file"
    );
    let report = check(&*storage, "test.vhdx").unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("must be replayed")),
        "{:?}",
        report.problems
    );
}

#[test]
fn a_read_write_open_replays_the_log_into_the_file() {
    let storage = image_with_block_zero();
    let data = leave_unreplayed_log(&storage, &[0, 8192, 16384]);
    let image = reopen(&storage, Access::ReadWrite);
    assert!(!image.info().log_pending_replay);
    assert_log_applied(&image, &data);
    drop(image);
    assert!(current_header(&*storage).1.log_guid.is_nil());
    let report = check(&*storage, "test.vhdx").unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_log_applied(&reopen(&storage, Access::ReadOnly), &data);
}

#[test]
fn a_log_sequence_that_wraps_around_the_end_of_the_log_is_replayed() {
    let storage = image_with_block_zero();
    // The log is 1 MiB; the second entry straddles its end.
    let data = leave_unreplayed_log(&storage, &[MIB - 12288, MIB - 4096, 4096]);
    assert_log_applied(&reopen(&storage, Access::ReadOnly), &data);
    assert_log_applied(&reopen(&storage, Access::ReadWrite), &data);
}

#[test]
fn a_crash_during_replay_is_replayed_again_on_the_next_open() {
    for survivors in [
        vec![false],
        vec![true, false],
        vec![false, true, true],
        vec![true],
    ] {
        let storage = image_with_block_zero();
        let data = leave_unreplayed_log(&storage, &[0, 8192, 16384]);
        // The replay writes, then the machine dies before its flush: some writes are lost.
        let interrupted = VhdxImage::open(
            NeverFlushes(storage.clone()),
            "test.vhdx",
            Access::ReadWrite,
        );
        assert!(interrupted.is_err());
        storage.crash(|index| survivors[index % survivors.len()]);
        let image = reopen(&storage, Access::ReadWrite);
        assert_log_applied(&image, &data);
        drop(image);
        let report = check(&*storage, "test.vhdx").unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }
}

/// Passes everything through but fails every flush: the machine dies at the first one.
struct NeverFlushes(Arc<MemoryStorage>);

impl Storage for NeverFlushes {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        Err(std::io::Error::other("injected crash"))
    }
    fn set_len(&self, size: u64) -> std::io::Result<()> {
        self.0.set_len(size)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.0.size()
    }
}
