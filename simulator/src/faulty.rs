//! A host's disks as the simulator breaks them. Every store the engine opens on a simulated
//! host (images and journals, through `StorageOptions::layer`) is wrapped here, so that:
//!
//! - a crash loses what was written since the last flush: each unflushed write reaches the
//!   disk whole, not at all, or torn (only its first 512-byte sectors), as a power cut leaves it;
//! - a crash can strike in the middle of an engine operation, after a chosen number of
//!   storage calls: from then on every call fails, as on a machine that lost power;
//! - a full disk refuses writes.
//!
//! Each store keeps the bytes its unflushed writes replaced; the list empties at every flush.

use crate::random::Random;
use blockrep::io::{Storage, StorageLayer};
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const SECTOR: usize = 512;

/// What an unflushed change replaced, so that a crash can take it back.
#[derive(Debug)]
enum Undo {
    Write {
        offset: u64,
        old: Vec<u8>,
        old_size: u64,
    },
    SetLen {
        old_size: u64,
        /// The bytes a shrink cut off.
        tail: Vec<u8>,
    },
}

/// One store the engine opened, and what of it is not yet durable.
struct Opened {
    inner: Box<dyn Storage>,
    unflushed: Mutex<Vec<Undo>>,
}

impl Opened {
    fn unflushed(&self) -> MutexGuard<'_, Vec<Undo>> {
        self.unflushed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

struct HostState {
    /// Raised by each crash: stores opened before it are dead.
    epoch: u64,
    /// A crash is armed to strike after this many more storage calls.
    crash_after: Option<u64>,
    /// An armed crash struck; the simulator has not yet carried it out (`crash`).
    struck: bool,
    /// The simulator itself is reading (a check): its calls do not bring an armed crash on.
    observing: bool,
    full: bool,
    /// The disk fills up after this many more writes.
    full_after: Option<u64>,
    /// Writes (and growths) the engine asked for so far.
    writes: u64,
    /// Every store that may hold unflushed writes (a store the engine closed without a flush
    /// still loses them in a power cut).
    opened: Vec<Arc<Opened>>,
    random: Random,
    /// Unflushed writes are recorded only on hosts that can lose power in the run: the record
    /// costs a read before every write.
    may_crash: bool,
    lost_writes: u64,
    torn_writes: u64,
}

/// The faults of one simulated host's storage; clones share them.
#[derive(Clone)]
pub struct HostDisks {
    state: Arc<Mutex<HostState>>,
}

impl HostDisks {
    /// A host's disks; `may_crash` when the run can cut its power (else a crash is refused).
    pub fn new(random: Random, may_crash: bool) -> Self {
        HostDisks {
            state: Arc::new(Mutex::new(HostState {
                epoch: 0,
                crash_after: None,
                struck: false,
                observing: false,
                full: false,
                full_after: None,
                writes: 0,
                opened: Vec::new(),
                random,
                may_crash,
                lost_writes: 0,
                torn_writes: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HostState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The layer to open this host's stores with.
    pub fn layer(&self) -> StorageLayer {
        let host = self.clone();
        let powered = self.clone();
        let epoch = self.lock().epoch;
        StorageLayer::new(move |inner| {
            let opened = Arc::new(Opened {
                inner,
                unflushed: Mutex::new(Vec::new()),
            });
            let mut state = host.lock();
            state
                .opened
                .retain(|store| Arc::strong_count(store) > 1 || !store.unflushed().is_empty());
            state.opened.push(Arc::clone(&opened));
            Box::new(FaultyStorage {
                opened,
                host: host.clone(),
                epoch: state.epoch,
            })
        })
        // A name created, renamed or removed is a step a crash can strike at, like a write.
        // Options made before a crash stay dead after it, as the stores opened with them do.
        .with_power_check(move || powered.step(Some(epoch)))
    }

    /// One storage step on this host: fails once the host lost power (or, for a store opened
    /// at `epoch`, since it was opened), and brings an armed crash on.
    fn step(&self, epoch: Option<u64>) -> io::Result<()> {
        let mut state = self.lock();
        if epoch.is_some_and(|epoch| epoch != state.epoch) || state.struck {
            return Err(io::Error::other("the host lost power"));
        }
        if state.observing {
            return Ok(());
        }
        if let Some(calls) = &mut state.crash_after {
            if *calls == 0 {
                state.crash_after = None;
                state.struck = true;
                return Err(io::Error::other("the host lost power"));
            }
            *calls -= 1;
        }
        Ok(())
    }

    /// Arms a crash to strike after `calls` more storage calls on this host.
    pub fn arm_crash(&self, calls: u64) {
        self.lock().crash_after = Some(calls);
    }

    /// Runs the simulator's own reads (checks) without counting them towards an armed crash.
    pub fn observing<R>(&self, read: impl FnOnce() -> R) -> R {
        self.lock().observing = true;
        let result = read();
        self.lock().observing = false;
        result
    }

    /// An armed crash struck during the last engine call: the host must be crashed now.
    pub fn struck(&self) -> bool {
        self.lock().struck
    }

    /// The disk is full (or has room again: a fill still to come is called off too).
    pub fn set_full(&self, full: bool) {
        let mut state = self.lock();
        state.full = full;
        state.full_after = None;
    }

    /// The disk fills up after `writes` more writes: in the middle of whatever writes then.
    pub fn fill_after(&self, writes: u64) {
        self.lock().full_after = Some(writes);
    }

    /// Calls off an armed crash that has not struck.
    pub fn disarm(&self) {
        self.lock().crash_after = None;
    }

    /// Whether the disk is full now.
    pub fn is_full(&self) -> bool {
        self.lock().full
    }

    /// Writes the engine asked for so far, to size a fill that strikes within an operation.
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Power is cut: every store opened so far fails from now on, and each unflushed write
    /// reaches the disk whole, not at all, or torn.
    pub fn crash(&self) {
        let mut state = self.lock();
        assert!(
            state.may_crash,
            "a host that was not to crash crashed: its unflushed writes were not recorded"
        );
        state.epoch += 1;
        state.crash_after = None;
        state.struck = false;
        for store in std::mem::take(&mut state.opened) {
            let changes = std::mem::take(&mut *store.unflushed());
            // Newest first, so that undoing a write restores what the one before it left.
            for change in changes.into_iter().rev() {
                let fate = state.random.below(10);
                if fate < 4 {
                    continue; // Four in ten reach the disk whole.
                }
                state.lost_writes += 1;
                match change {
                    Undo::Write {
                        offset,
                        old,
                        old_size,
                    } => {
                        let sectors = old.len().div_ceil(SECTOR);
                        // Two in ten are torn: their first sectors made it.
                        let kept = if fate < 6 && sectors > 1 {
                            state.torn_writes += 1;
                            1 + state.random.below(sectors as u64 - 1) as usize
                        } else {
                            0
                        };
                        let start = (kept * SECTOR).min(old.len());
                        let _ = store.inner.write_at(&old[start..], offset + start as u64);
                        // A write past the old end keeps its torn sectors, and no more.
                        let end = old_size.max(offset + start as u64);
                        if store.inner.size().is_ok_and(|size| size > end) {
                            let _ = store.inner.set_len(end);
                        }
                    }
                    Undo::SetLen { old_size, tail } => {
                        let _ = store.inner.set_len(old_size);
                        if !tail.is_empty() {
                            let _ = store.inner.write_at(&tail, old_size - tail.len() as u64);
                        }
                    }
                }
            }
        }
    }

    /// Unflushed writes lost by crashes so far, and how many of them were torn.
    pub fn losses(&self) -> (u64, u64) {
        let state = self.lock();
        (state.lost_writes, state.torn_writes)
    }
}

/// One store on a simulated host.
struct FaultyStorage {
    opened: Arc<Opened>,
    host: HostDisks,
    epoch: u64,
}

impl FaultyStorage {
    /// Fails the call when the host crashed since the store was opened, or the armed crash
    /// strikes now.
    fn alive(&self) -> io::Result<()> {
        self.host.step(Some(self.epoch))
    }

    /// Whether a write that needs space is refused; each one brings a coming fill nearer.
    fn full(&self) -> bool {
        let mut state = self.host.lock();
        if !state.observing {
            state.writes += 1;
            match state.full_after {
                Some(0) => {
                    state.full = true;
                    state.full_after = None;
                }
                Some(writes) => state.full_after = Some(writes - 1),
                None => {}
            }
        }
        state.full
    }
}

impl Storage for FaultyStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.alive()?;
        self.opened.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.alive()?;
        if self.full() {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on the simulated disk",
            ));
        }
        let inner = &self.opened.inner;
        if !self.host.lock().may_crash {
            return inner.write_at(buf, offset);
        }
        let old_size = inner.size()?;
        let mut old = vec![0u8; buf.len()];
        let present = old_size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if present > 0 {
            inner.read_at(&mut old[..present], offset)?;
        }
        self.opened.unflushed().push(Undo::Write {
            offset,
            old,
            old_size,
        });
        inner.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.alive()?;
        self.opened.inner.flush()?;
        self.opened.unflushed().clear();
        Ok(())
    }

    fn set_len(&self, size: u64) -> io::Result<()> {
        self.alive()?;
        let old_size = self.opened.inner.size()?;
        if size > old_size && self.full() {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on the simulated disk",
            ));
        }
        if !self.host.lock().may_crash {
            return self.opened.inner.set_len(size);
        }
        // A cut that is lost brings the bytes it cut off back as they were: one fate for both.
        let tail = if size < old_size {
            let mut tail = vec![0u8; (old_size - size) as usize];
            self.opened.inner.read_at(&mut tail, size)?;
            tail
        } else {
            Vec::new()
        };
        self.opened
            .unflushed()
            .push(Undo::SetLen { old_size, tail });
        self.opened.inner.set_len(size)
    }

    fn size(&self) -> io::Result<u64> {
        self.alive()?;
        self.opened.inner.size()
    }

    /// Passed on (a hole punched, as the daemons' stores do), not written as zeros: the trait's
    /// fallback would cost the simulator a buffer of zeros and a write for every zero extent.
    /// Punching a hole needs no space, so a full disk does not refuse it.
    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.alive()?;
        let inner = &self.opened.inner;
        if self.host.lock().may_crash {
            let old_size = inner.size()?;
            let present = old_size.saturating_sub(offset).min(length) as usize;
            let mut old = vec![0u8; present];
            inner.read_at(&mut old, offset)?;
            self.opened.unflushed().push(Undo::Write {
                offset,
                old,
                old_size,
            });
        }
        inner.write_zeroes(offset, length)
    }

    fn will_need(&self, offset: u64, length: u64) {
        self.opened.inner.will_need(offset, length);
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        self.alive()?;
        self.opened.inner.data_ranges()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockrep::io::MemoryStorage;

    fn open(host: &HostDisks, store: &Arc<MemoryStorage>) -> Box<dyn Storage> {
        let options = blockrep::io::StorageOptions {
            layer: Some(host.layer()),
            ..Default::default()
        };
        options.layered(Box::new(Arc::clone(store)))
    }

    #[test]
    fn a_crash_keeps_what_was_flushed_and_fails_the_stores_opened_before_it() {
        let host = HostDisks::new(Random::new(3), true);
        let memory = Arc::new(MemoryStorage::new());
        let store = open(&host, &memory);
        store.write_at(&[1; 4096], 0).unwrap();
        store.flush().unwrap();
        for round in 0..50u8 {
            store.write_at(&[round; 4096], 4096).unwrap();
        }
        host.crash();
        assert!(
            store.write_at(&[9; 512], 0).is_err(),
            "a dead store still writes"
        );
        let mut flushed = vec![0u8; 4096];
        memory.read_at(&mut flushed, 0).unwrap();
        assert_eq!(flushed, vec![1; 4096]);
        // The unflushed block holds, sector by sector, one of the values written or zeros.
        let mut block = vec![0u8; 4096];
        memory.read_at(&mut block, 4096).unwrap_or(());
        for sector in block.chunks(SECTOR) {
            assert!(sector.iter().all(|byte| *byte == sector[0]) && sector[0] < 50);
        }
        let (lost, _) = host.losses();
        assert!(lost > 0, "fifty unflushed writes and none lost");
        let reopened = open(&host, &memory);
        reopened.write_at(&[2; 512], 0).unwrap();
    }

    #[test]
    fn an_armed_crash_strikes_after_the_calls_given() {
        let host = HostDisks::new(Random::new(1), true);
        let memory = Arc::new(MemoryStorage::new());
        let store = open(&host, &memory);
        host.arm_crash(2);
        store.write_at(&[1; 512], 0).unwrap();
        store.flush().unwrap();
        assert!(store.write_at(&[2; 512], 512).is_err());
        assert!(host.struck());
        host.crash();
        assert!(!host.struck());
    }

    #[test]
    fn a_full_disk_refuses_writes_until_space_returns() {
        let host = HostDisks::new(Random::new(1), true);
        let memory = Arc::new(MemoryStorage::new());
        let store = open(&host, &memory);
        host.set_full(true);
        let error = store.write_at(&[1; 512], 0).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::StorageFull);
        host.set_full(false);
        store.write_at(&[1; 512], 0).unwrap();
    }
}
