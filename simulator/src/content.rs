//! What each simulated disk must hold: the version written last to each 4 KiB page. A page's
//! bytes are a function of (disk, page, version), so any state can be checked against a disk
//! without keeping a copy of it; version 0 is a page never written (zeros).

use std::collections::{BTreeMap, BTreeSet};

pub const PAGE: u64 = 4096;

/// Bytes of each page that are random; the rest repeats a short record, so deltas compress
/// about as a database's pages do.
const RANDOM_BYTES: usize = 1024;

/// The pages of one disk and their versions.
#[derive(Debug, Clone)]
pub struct DiskModel {
    identity: u64,
    versions: Vec<u32>,
    /// The highest version each page ever had: new writes number from it, so that a page
    /// never holds a version's bytes for two different writes (after a failover went back).
    highest: Vec<u32>,
    /// The versions the disk holds: `versions` but for the pages in `unwritten`.
    on_disk: Vec<u32>,
    /// Pages written since they were last put on the disk (`take_unwritten`).
    unwritten: BTreeSet<u64>,
    /// Pages put on the disk since its last flush, with the version durable before: a crash
    /// may keep, lose or tear them.
    unflushed: BTreeMap<u64, u32>,
    /// Contents no generated version has (a write a crash tore), by page and version.
    explicit: BTreeMap<(u64, u32), Vec<u8>>,
}

/// The versions of a disk's pages at one instant: what a cut froze.
pub type Versions = Vec<u32>;

impl DiskModel {
    pub fn new(identity: u64, size: u64) -> Self {
        DiskModel {
            identity,
            versions: vec![0; size.div_ceil(PAGE) as usize],
            highest: vec![0; size.div_ceil(PAGE) as usize],
            on_disk: vec![0; size.div_ceil(PAGE) as usize],
            unwritten: BTreeSet::new(),
            unflushed: BTreeMap::new(),
            explicit: BTreeMap::new(),
        }
    }

    pub fn pages(&self) -> u64 {
        self.versions.len() as u64
    }

    /// The guest wrote `count` pages from `first` (clipped to the disk).
    pub fn write(&mut self, first: u64, count: u64) {
        let end = (first + count).min(self.pages());
        for page in first..end {
            let index = page as usize;
            self.highest[index] = self.highest[index].wrapping_add(1).max(1);
            self.versions[index] = self.highest[index];
            self.unwritten.insert(page);
        }
    }

    /// The pages written since the last call, as runs `(first page, count)`, to be put on the
    /// disk and then confirmed with `reached_disk` or taken back with `failed`. Writes to one
    /// page in between are merged: only the last one can be seen by a cut, which comes after.
    pub fn take_unwritten(&mut self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for page in std::mem::take(&mut self.unwritten) {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page => *count += 1,
                _ => runs.push((page, 1)),
            }
        }
        runs
    }

    /// The disk holds `versions` now (the VM started again from a recovery point).
    pub fn reset_to(&mut self, versions: &Versions) {
        self.versions.clone_from(versions);
        self.on_disk.clone_from(versions);
        self.unwritten.clear();
    }

    /// The run's writes are on the disk (not yet flushed).
    pub fn reached_disk(&mut self, first: u64, count: u64) {
        for page in first..first + count {
            let index = page as usize;
            self.unflushed.entry(page).or_insert(self.on_disk[index]);
            self.on_disk[index] = self.versions[index];
        }
    }

    /// The disk was flushed: what reached it is durable.
    pub fn flushed(&mut self) {
        self.unflushed.clear();
    }

    /// After a crash: the pages that reached the disk without a flush since, with the version
    /// durable before; the crash decided what they hold.
    pub fn take_unflushed(&mut self) -> BTreeMap<u64, u32> {
        std::mem::take(&mut self.unflushed)
    }

    /// The disk holds `bytes` at `page` (read back after a crash, where the write since the
    /// last flush may have been kept, lost or torn): the model follows it. A torn page holds
    /// sectors of both versions and becomes a version of its own.
    pub fn found_on_disk(&mut self, page: u64, bytes: &[u8], durable: u32) {
        let index = page as usize;
        let mut expected = vec![0u8; PAGE as usize];
        for version in [self.versions[index], durable] {
            self.expected(page, version, &mut expected);
            if expected == bytes {
                self.versions[index] = version;
                self.on_disk[index] = version;
                return;
            }
        }
        self.highest[index] = self.highest[index].wrapping_add(1).max(1);
        let torn = self.highest[index];
        self.explicit.insert((page, torn), bytes.to_vec());
        self.versions[index] = torn;
        self.on_disk[index] = torn;
    }

    /// Fills `out` with what `page` holds at `version`.
    pub fn expected(&self, page: u64, version: u32, out: &mut [u8]) {
        match self.explicit.get(&(page, version)) {
            Some(bytes) => out.copy_from_slice(&bytes[..out.len()]),
            None => page_bytes(self.identity, page, version, out),
        }
    }

    /// The run's writes failed (the disk is full): the guest's pages are what the disk holds.
    pub fn failed(&mut self, first: u64, count: u64) {
        let range = first as usize..(first + count) as usize;
        self.versions[range.clone()].copy_from_slice(&self.on_disk[range]);
    }

    /// Writes that never reached the disk (the host crashed first) are forgotten: the pages go
    /// back to the versions the disk holds.
    pub fn forget_unwritten(&mut self) {
        for page in std::mem::take(&mut self.unwritten) {
            self.versions[page as usize] = self.on_disk[page as usize];
        }
    }

    /// The version of every page, as the guest wrote them.
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    pub fn identity(&self) -> u64 {
        self.identity
    }
}

/// Fills `out` (one page) with the bytes of `page` at `version` on disk `identity`.
pub fn page_bytes(identity: u64, page: u64, version: u32, out: &mut [u8]) {
    if version == 0 {
        out.fill(0);
        return;
    }
    let mut state = identity ^ page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(version) << 40;
    let (random, repeated) = out.split_at_mut(RANDOM_BYTES.min(out.len()));
    for word in random.chunks_mut(8) {
        state = splitmix(state);
        word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
    }
    // A 32-byte record naming the page and version, repeated: compressible, yet unique.
    let mut record = [0u8; 32];
    record[..8].copy_from_slice(&identity.to_le_bytes());
    record[8..16].copy_from_slice(&page.to_le_bytes());
    record[16..20].copy_from_slice(&version.to_le_bytes());
    record[20..].copy_from_slice(b"|blockrep-sm");
    for chunk in repeated.chunks_mut(record.len()) {
        chunk.copy_from_slice(&record[..chunk.len()]);
    }
}

fn splitmix(state: u64) -> u64 {
    let mut z = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The first page whose bytes in `actual` (read from page `first` on) differ from what
/// `versions` says `model`'s disk holds.
pub fn first_difference(
    model: &DiskModel,
    versions: &Versions,
    first: u64,
    actual: &[u8],
) -> Option<u64> {
    let mut expected = vec![0u8; PAGE as usize];
    for (index, bytes) in actual.chunks(PAGE as usize).enumerate() {
        let page = first + index as u64;
        model.expected(page, versions[page as usize], &mut expected);
        if bytes != &expected[..bytes.len()] {
            return Some(page);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_differ_by_version_and_page_and_version_zero_is_zeros() {
        let mut a = vec![0u8; PAGE as usize];
        let mut b = vec![0u8; PAGE as usize];
        page_bytes(1, 5, 1, &mut a);
        page_bytes(1, 5, 2, &mut b);
        assert_ne!(a, b);
        page_bytes(1, 6, 1, &mut b);
        assert_ne!(a, b);
        page_bytes(1, 5, 0, &mut b);
        assert!(b.iter().all(|byte| *byte == 0));
    }

    #[test]
    fn unwritten_pages_come_out_as_runs_once() {
        let mut disk = DiskModel::new(1, 64 * PAGE);
        disk.write(3, 2);
        disk.write(4, 3);
        disk.write(10, 1);
        assert_eq!(disk.take_unwritten(), vec![(3, 4), (10, 1)]);
        assert!(disk.take_unwritten().is_empty());
        assert_eq!(disk.versions()[4], 2);
        disk.reached_disk(3, 4);
        disk.write(4, 1);
        disk.take_unwritten();
        disk.failed(4, 1);
        assert_eq!(
            disk.versions()[4],
            2,
            "a failed write leaves the page as the disk has it"
        );
    }
}
