//! The delta format (v1, `docs/formats/delta.md`): the changed extents of one generation of a
//! disk, each data extent checksummed and compressed when that pays, zero extents without
//! payload, and a trailer that tells a complete delta from a truncated one. This module encodes
//! deltas from an image, verifies them, and applies them to an image; it knows no sockets.

mod apply;
mod encode;
mod format;
mod spool;

pub use apply::{DeltaSummary, TargetState, apply_delta, verify_delta};
pub(crate) use apply::{decode_delta, listed_extents, write_delta};
pub use encode::{Compression, DeltaEncoder, EncodeStatistics, encode_delta};
pub(crate) use format::HEADER_SIZE;
pub use format::{DeltaHeader, FORMAT_VERSION};
pub(crate) use spool::{Spool, chunk_pieces};
