//! Deliberate bugs, compiled in only with the `planted-bugs` feature and off until a test
//! switches one on: the simulator's fuzzing must find a violating seed for each, or its checks
//! prove nothing.

use std::sync::atomic::{AtomicU32, Ordering};

/// A bug that can be planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Bug {
    /// The replica confirms a delta as applied when its last chunk is staged, before the
    /// commit has made it durable, so the primary forgets changes the replica may not hold.
    ConfirmBeforeDurable = 1,
}

static PLANTED: AtomicU32 = AtomicU32::new(0);

/// Switches `bug` on (or off) for the whole process.
pub fn plant(bug: Bug, on: bool) {
    let bit = 1 << bug as u32;
    if on {
        PLANTED.fetch_or(bit, Ordering::SeqCst);
    } else {
        PLANTED.fetch_and(!bit, Ordering::SeqCst);
    }
}

pub(crate) fn is_planted(bug: Bug) -> bool {
    PLANTED.load(Ordering::SeqCst) & (1 << bug as u32) != 0
}
