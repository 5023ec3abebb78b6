//! Change tracking: which blocks of a disk changed since the last cut. Writes mark a dirty
//! bitmap of the current generation; `cut` freezes it and opens the next. This module knows
//! nothing of how the changes are shipped.

mod bitmap;
mod journal;
mod tracked;

pub use bitmap::DirtyBitmap;
pub(crate) use journal::DEFAULT_REGION_SIZE;
pub use journal::{Journal, JournalIdentity, Recovered};
pub(crate) use tracked::PreserveBlocks;
pub use tracked::{Cut, DEFAULT_GRANULARITY, TrackedDisk};
