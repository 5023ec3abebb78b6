//! The replication protocol as sans-IO state machines: [`Primary`] for the protected side,
//! [`Replica`] for the replica side, and the [`Message`]s between them (format in
//! `docs/formats/protocol.md`). They take events and the current time and return actions and
//! the next wake-up; they never touch sockets, files or clocks, so the QUIC driver (`net`) and
//! the simulator drive the very same code.

mod chunks;
mod health;
mod message;
mod primary;
mod replica;

pub use health::Health;
pub(crate) use message::{
    ALPN, CHUNK_DISK_BYTES, FRAME_HEADER, MAX_BODY, ProtocolError, chunk_frame_prefix,
    decode_frame_header,
};
pub use message::{
    DeltaId, DeltaKind, DiskDescription, Message, PROTOCOL_VERSION, RefusalCode, Staged,
};
pub use primary::{
    Primary, PrimaryAction, PrimaryConfig, PrimaryStatus, ReplicationState, Tracking,
};
pub use replica::{ConnectionId, Fence, HandoverRefusal, Replica, ReplicaAction, ReplicaVmRecord};
