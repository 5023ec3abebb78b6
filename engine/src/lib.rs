//! blockrep: the block replication engine that agents embed.
//!
//! The high-level pieces, as an embedder uses them (`examples/embed.rs` puts them together):
//!
//! - [`protect::ProtectedVm`]: a VM's disks opened with change tracking; write through its
//!   [`protect::ProtectedVm::disks`].
//! - [`net::ReplicaServer`]: a replica server keeping VMs in a [`replica::ReplicaStore`]
//!   (recovery points, test, planned and unplanned failover, reverse replication), telling
//!   the deltas it applies and each failover step as replication events when asked.
//! - [`net::run_primary`]: replicates a protected VM to a replica server, reporting its status
//!   ([`net::PrimaryReport`]) and, when asked, replication events ([`net::ReplicationEvent`]).
//!
//! Below them, by layer: `image` (disk formats behind [`image::BlockImage`]), `io` (how bytes
//! reach a file, behind [`io::Storage`]), `track` (change tracking and its journal), `delta`
//! (the delta format), `proto` (the protocol as sans-IO state machines), `resync` (comparison by
//! hash), `nbd` (serving tracked disks to NBD clients such as qemu); see
//! `docs/architecture.md`.

// `pub` is the public API: an item that outside code cannot reach is `pub(crate)`.
#![warn(unreachable_pub)]

pub mod delta;
mod error;
pub mod image;
pub mod io;
pub mod nbd;
pub mod net;
#[doc(hidden)]
pub mod planted;
pub mod protect;
pub mod proto;
pub mod replica;
pub mod resync;
pub mod track;
pub mod units;

pub use error::{Error, Result};
