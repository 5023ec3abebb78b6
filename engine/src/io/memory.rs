//! An in-memory store for tests and the simulator. It keeps what a flush made durable apart from
//! what was written since, so a test can crash it between any two steps and see what survives.

use super::Storage;
use std::io;
use std::sync::Mutex;

/// The largest store a test may grow; more is a bug in the test or in the code under it.
const MEMORY_LIMIT: u64 = 1 << 30;

#[derive(Debug, Clone)]
enum PendingChange {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    /// What readers see now.
    current: Vec<u8>,
    /// What survived the last flush.
    durable: Vec<u8>,
    /// Changes since the last flush, oldest first.
    pending: Vec<PendingChange>,
}

/// A `Vec<u8>` behind the [`Storage`] seam that can be crashed.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    state: Mutex<State>,
}

fn apply(bytes: &mut Vec<u8>, change: &PendingChange) {
    match change {
        PendingChange::Write { offset, data } => {
            let start = *offset as usize;
            let end = start + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
        }
        PendingChange::SetLen(size) => bytes.resize(*size as usize, 0),
    }
}

impl MemoryStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `bytes`, all of them durable.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemoryStorage {
            state: Mutex::new(State {
                current: bytes.clone(),
                durable: bytes,
                pending: Vec::new(),
            }),
        }
    }

    /// A copy of what readers see now.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Number of changes made since the last flush.
    #[cfg(test)]
    pub(crate) fn pending_changes(&self) -> usize {
        self.lock().pending.len()
    }

    /// Simulates a crash: of the changes since the last flush, those for which `survives(index)`
    /// is true reach the durable image (in their order); the rest are lost.
    pub fn crash(&self, mut survives: impl FnMut(usize) -> bool) {
        let mut state = self.lock();
        let pending = std::mem::take(&mut state.pending);
        let mut image = std::mem::take(&mut state.durable);
        for (index, change) in pending.iter().enumerate() {
            if survives(index) {
                apply(&mut image, change);
            }
        }
        state.current = image.clone();
        state.durable = image;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the vectors half-updated in a way that
        // matters to a test, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn change(&self, change: PendingChange) {
        let mut state = self.lock();
        apply(&mut state.current, &change);
        state.pending.push(change);
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.lock();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start.checked_add(buf.len()) {
            Some(end) if end <= state.current.len() => {
                buf.copy_from_slice(&state.current[start..end]);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the store",
            )),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > MEMORY_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "memory store limited to 1 GiB",
            ));
        }
        self.change(PendingChange::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.pending.clear();
        state.durable = state.current.clone();
        Ok(())
    }

    fn set_len(&self, size: u64) -> io::Result<()> {
        if size > MEMORY_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "memory store limited to 1 GiB",
            ));
        }
        self.change(PendingChange::SetLen(size));
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_flushed_writes_and_only_the_chosen_unflushed_ones() {
        let storage = MemoryStorage::new();
        storage.write_at(b"aaaa", 0).unwrap();
        storage.flush().unwrap();
        storage.write_at(b"bb", 0).unwrap();
        storage.write_at(b"cc", 2).unwrap();
        storage.crash(|index| index == 1);
        assert_eq!(storage.to_bytes(), b"aacc");
        assert_eq!(storage.pending_changes(), 0);
    }
}
