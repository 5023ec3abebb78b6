//! Deliberate bugs, live only with the `planted-bugs` feature and off until a test switches
//! one on: the simulator's fuzzing must find a violating seed for each, or its checks prove
//! nothing. Without the feature `is_planted` is a constant `false` and the bugs compile away.

#[cfg(feature = "planted-bugs")]
use std::sync::atomic::{AtomicU32, Ordering};

/// A bug that can be planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Bug {
    /// The replica confirms a delta as applied when its last chunk is staged, before the
    /// commit has made it durable, so the primary forgets changes the replica may not hold.
    ConfirmBeforeDurable = 1,
    /// The replica site takes a VM over in a planned failover without comparing its disks'
    /// digests with the primary's.
    HandoverWithoutEqualDigests = 2,
    /// An unplanned failover is committed though its copy never finished (a power cut
    /// interrupted it), so the VM runs on partly copied disks.
    CommitUnfinishedCopy = 3,
    /// A journal that could not vouch for its disk is replaced before the marker saying a
    /// comparison is owed is durable: a crash in between leaves a fresh journal that vouches
    /// for changes it never saw.
    JournalBeforeMarker = 4,
    /// A first host asks the other site to take its VM over without first recording the
    /// handover: restarted in between, it runs the VM again while the other site runs it too.
    NoHandoverRecord = 5,
}

impl Bug {
    /// Every bug, for a command line naming one.
    pub const ALL: [Bug; 5] = [
        Bug::ConfirmBeforeDurable,
        Bug::HandoverWithoutEqualDigests,
        Bug::CommitUnfinishedCopy,
        Bug::JournalBeforeMarker,
        Bug::NoHandoverRecord,
    ];

    /// The bug's name on a command line.
    pub fn name(self) -> &'static str {
        match self {
            Bug::ConfirmBeforeDurable => "confirm-before-durable",
            Bug::HandoverWithoutEqualDigests => "handover-without-equal-digests",
            Bug::CommitUnfinishedCopy => "commit-unfinished-copy",
            Bug::JournalBeforeMarker => "journal-before-marker",
            Bug::NoHandoverRecord => "no-handover-record",
        }
    }
}

#[cfg(feature = "planted-bugs")]
static PLANTED: AtomicU32 = AtomicU32::new(0);

/// Switches `bug` on (or off) for the whole process.
#[cfg(feature = "planted-bugs")]
pub fn plant(bug: Bug, on: bool) {
    let bit = 1 << bug as u32;
    if on {
        PLANTED.fetch_or(bit, Ordering::SeqCst);
    } else {
        PLANTED.fetch_and(!bit, Ordering::SeqCst);
    }
}

#[cfg(feature = "planted-bugs")]
pub(crate) fn is_planted(bug: Bug) -> bool {
    PLANTED.load(Ordering::SeqCst) & (1 << bug as u32) != 0
}

#[cfg(not(feature = "planted-bugs"))]
pub(crate) const fn is_planted(_bug: Bug) -> bool {
    false
}
