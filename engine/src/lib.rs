//! blockrep: the block replication engine that agents embed.
//!
//! Layers, top to bottom on the primary: `image` (disk formats behind [`image::BlockImage`]) and
//! `io` (how bytes reach a file, behind [`io::Storage`]). Later layers (tracking, deltas, the
//! protocol, the replica) build on these two; see `docs/architecture.md`. `nbd` serves tracked
//! disks to NBD clients such as qemu.

pub mod delta;
pub mod error;
pub mod image;
pub mod io;
pub mod nbd;
pub mod net;
#[cfg(feature = "planted-bugs")]
pub mod planted;
pub mod protect;
pub mod proto;
pub mod replica;
pub mod resync;
pub mod track;
pub mod units;

pub use error::{Error, Result};
