//! The replication protocol's messages and their byte layout (version 2,
//! `docs/formats/protocol.md`). Every message is a frame: a 4-byte little-endian body length, a
//! 1-byte kind, then the body. Decoding checks every length against the bytes it was given, so
//! a hostile peer can make a message fail but never make the reader allocate without bound.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::ops::Range;
use uuid::Uuid;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// The TLS application protocol name both sides insist on.
pub(crate) const ALPN: &[u8] = b"blockrep/1";
/// Bytes before a frame's body: its length and its kind.
pub(crate) const FRAME_HEADER: usize = 5;
/// The longest body a reader accepts. A chunk holds at most [`CHUNK_DISK_BYTES`] of disk, which
/// its lz4 or raw records fit in with room to spare.
pub(crate) const MAX_BODY: usize = 8 << 20;
/// Disk bytes one chunk covers at most.
pub(crate) const CHUNK_DISK_BYTES: u64 = 1 << 20;

const KIND_HELLO: u8 = 1;
const KIND_WELCOME: u8 = 2;
const KIND_REFUSED: u8 = 3;
const KIND_DELTA_BEGIN: u8 = 4;
const KIND_CHUNK: u8 = 5;
const KIND_CHUNKS_STAGED: u8 = 6;
const KIND_DELTA_END: u8 = 7;
const KIND_APPLIED: u8 = 8;
const KIND_GOODBYE: u8 = 9;
const KIND_REVERSE: u8 = 10;
const KIND_HANDOVER: u8 = 11;
const KIND_HANDED_OVER: u8 = 12;
const KIND_HASH_REQUEST: u8 = 13;
const KIND_HASHES: u8 = 14;
const KIND_GROUP_DIGESTS: u8 = 15;
const KIND_HASH_RANGES: u8 = 16;
const KIND_HASHES_DONE: u8 = 17;

/// Why a side refused, as the code the wire carries: the receiver acts on it (retry, compare,
/// give up), never on the reason's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
#[repr(u16)]
pub enum RefusalCode {
    /// The peer broke the protocol, or sent what cannot be taken.
    Violation = 1,
    /// The other side speaks another protocol version.
    Version = 2,
    /// The VM is replicated from another primary, or the primary's disks are not the
    /// replica's, or the replica cannot be opened for it: the operator must act.
    NotThisReplica = 3,
    /// The replica's copy was seeded by hand: the primary must start comparing
    /// (`--initial existing`).
    SeededCopy = 4,
    /// An initial replication would replace a replica that holds deltas: the replica host's
    /// operator must allow it first.
    ReinitializeNeedsConsent = 5,
    /// The replica's copy changed outside blockrep: compare the disks by hash, then go on.
    ResynchronizationRequired = 6,
    /// The replica could not stage or apply (a full disk, an I/O error): try again later.
    ReplicaFailed = 7,
    /// The VM failed over to the replica site, not yet committed: replication may resume if
    /// the failover is cancelled.
    FailedOver = 8,
    /// The VM failed over to the replica site for good (committed).
    FailedOverForGood = 9,
    /// The VM runs at the replica site; reverse replication there brings it back.
    RunsAtReplicaSite = 10,
    /// A planned failover was refused (the disks differ, or cannot be compared or run there):
    /// the VM's writes resume and the disks are compared by hash.
    HandoverRefused = 11,
    /// A planned failover needs the replica host's operator's consent first: nothing differs.
    HandoverNeedsConsent = 12,
    /// A request for block hashes that cannot be answered.
    HashesRefused = 13,
    /// The delta does not follow the replica's last: the copies must be compared by hash
    /// before replication can start again.
    Gap = 14,
}

impl RefusalCode {
    const ALL: [RefusalCode; 14] = [
        RefusalCode::Violation,
        RefusalCode::Version,
        RefusalCode::NotThisReplica,
        RefusalCode::SeededCopy,
        RefusalCode::ReinitializeNeedsConsent,
        RefusalCode::ResynchronizationRequired,
        RefusalCode::ReplicaFailed,
        RefusalCode::FailedOver,
        RefusalCode::FailedOverForGood,
        RefusalCode::RunsAtReplicaSite,
        RefusalCode::HandoverRefused,
        RefusalCode::HandoverNeedsConsent,
        RefusalCode::HashesRefused,
        RefusalCode::Gap,
    ];

    fn from_wire(code: u16) -> Option<RefusalCode> {
        Self::ALL.into_iter().find(|known| *known as u16 == code)
    }

    /// Trying again later may succeed without anyone acting.
    pub fn retry(self) -> bool {
        matches!(
            self,
            RefusalCode::ResynchronizationRequired
                | RefusalCode::ReplicaFailed
                | RefusalCode::FailedOver
                | RefusalCode::RunsAtReplicaSite
        )
    }
}

/// One disk of a protected VM, as the primary describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskDescription {
    pub disk_id: Uuid,
    pub virtual_size: u64,
    /// 512 or 4096: the replica VHDX gets the same logical sector size.
    pub logical_sector: u32,
}

/// Which delta: its place in the VM's sequence, and a number drawn when it was cut, so that a
/// resumed delta is told apart from a new one that reuses the sequence after a restart.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct DeltaId {
    pub sequence: u64,
    pub cut: u64,
}

impl std::fmt::Display for DeltaId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "delta {} (cut {:016x})", self.sequence, self.cut)
    }
}

/// What a delta holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeltaKind {
    /// Initial replication: every allocated block of every disk; the replica starts from zeros.
    Initial,
    /// The blocks that changed in one cycle.
    Changes,
}

/// What a replica holds of a delta it has not applied yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub(crate) delta: DeltaId,
    /// Chunk indexes staged, as ordered, non-overlapping ranges.
    pub(crate) received: Vec<Range<u32>>,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Primary to replica, first on a connection: who is protected, with which disks.
    Hello {
        version: u16,
        vm: String,
        primary: String,
        disks: Vec<DiskDescription>,
    },
    /// Replica to primary: the last delta applied (0: none, initial replication needed) and
    /// what is staged of the next one, so shipping resumes where it stopped.
    Welcome {
        version: u16,
        applied: u64,
        staged: Option<Staged>,
    },
    /// Either side: the session cannot go on. What the receiver does follows from `code`; the
    /// reason is for people.
    Refused { code: RefusalCode, reason: String },
    /// Primary to replica: a delta of `chunks` chunks follows.
    DeltaBegin {
        delta: DeltaId,
        kind: DeltaKind,
        chunks: u32,
        recovery_point: bool,
        /// The primary froze its applications for the cut (a consistency hook ran).
        app_consistent: bool,
    },
    /// Primary to replica, on a data stream: chunk `index` of a delta, for disk `disk` (its
    /// place in Hello's list). The payload is a complete delta in the delta format (v1).
    Chunk {
        delta: DeltaId,
        index: u32,
        disk: u16,
        payload: Bytes,
    },
    /// Replica to primary: these chunks are staged and need not be sent again.
    ChunksStaged {
        delta: DeltaId,
        received: Vec<Range<u32>>,
    },
    /// Primary to replica: every chunk of the delta has been sent.
    DeltaEnd { delta: DeltaId },
    /// Replica to primary: the delta is applied, durably, on every disk.
    Applied { delta: DeltaId },
    /// Primary to replica: a clean end of the session.
    Goodbye,
    /// Replica to primary, instead of Welcome: the VM runs at the replica's site now (it failed
    /// over), and the connecting side is to be its replica. The replica's old copy counts as
    /// at delta `applied`; `resync` says whether it must be compared by hash first (its own
    /// writes after its last shipped cut are unknown to the new primary).
    Reverse { applied: u64, resync: bool },
    /// Primary to replica, after the final delta of a planned failover was applied: each
    /// disk's digest (the root of its block hashes, seeded with `seed`) at delta `sequence`.
    /// The replica compares them with its own and takes the VM over.
    Handover {
        sequence: u64,
        seed: u64,
        digests: Vec<u128>,
        /// Replicate back to this primary at once.
        reverse: bool,
    },
    /// Replica to primary: its disks equal the primary's at `sequence`; the VM runs here now.
    HandedOver { sequence: u64 },
    /// Primary to replica, first on a connection when a resynchronization is owed (before
    /// Hello): send the block hashes of every disk of `vm`, seeded with `seed`.
    HashRequest { vm: String, seed: u64 },
    /// Replica to primary: a piece of disk `disk`'s block hashes, in the resync encoding.
    Hashes { disk: u16, payload: Bytes },
    /// Replica to primary, after its Welcome to a HashRequest: the digests of disk `disk`'s
    /// groups of 1024 blocks (64 MiB), so that equal groups need no block hashes.
    GroupDigests { disk: u16, digests: Vec<u128> },
    /// Primary to replica: send the block hashes of these block ranges (disk, blocks).
    HashRanges { ranges: Vec<(u16, Range<u64>)> },
    /// Replica to primary: every piece asked for was sent.
    HashesDone,
}

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error: {0}")]
pub(crate) struct ProtocolError(pub String);

fn error(text: impl Into<String>) -> ProtocolError {
    ProtocolError(text.into())
}

/// Reads a frame header: the kind and the body length, refusing bodies over [`MAX_BODY`].
pub(crate) fn decode_frame_header(
    header: [u8; FRAME_HEADER],
) -> Result<(u8, usize), ProtocolError> {
    let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if length > MAX_BODY {
        return Err(error(format!(
            "message of {length} bytes is longer than the limit of {MAX_BODY}"
        )));
    }
    Ok((header[4], length))
}

fn frame_header(kind: u8, body_length: usize) -> [u8; FRAME_HEADER] {
    let mut header = [0u8; FRAME_HEADER];
    header[..4].copy_from_slice(&(body_length as u32).to_le_bytes());
    header[4] = kind;
    header
}

/// The part of a chunk frame before its payload: sending it and then the payload (a slice of
/// the spool or of a buffer) avoids copying the payload into a frame.
pub(crate) fn chunk_frame_prefix(
    delta: DeltaId,
    index: u32,
    disk: u16,
    payload_length: usize,
) -> Bytes {
    let mut body = BytesMut::with_capacity(FRAME_HEADER + 22);
    body.put_slice(&frame_header(KIND_CHUNK, 22 + payload_length));
    body.put_u64_le(delta.sequence);
    body.put_u64_le(delta.cut);
    body.put_u32_le(index);
    body.put_u16_le(disk);
    body.freeze()
}

fn put_string(out: &mut BytesMut, text: &str) {
    out.put_u16_le(text.len() as u16);
    out.put_slice(text.as_bytes());
}

fn put_delta(out: &mut BytesMut, delta: DeltaId) {
    out.put_u64_le(delta.sequence);
    out.put_u64_le(delta.cut);
}

fn put_ranges(out: &mut BytesMut, ranges: &[Range<u32>]) {
    out.put_u32_le(ranges.len() as u32);
    for range in ranges {
        out.put_u32_le(range.start);
        out.put_u32_le(range.end);
    }
}

impl Message {
    /// The whole frame: header and body.
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::with_capacity(64);
        let kind = match self {
            Message::Hello {
                version,
                vm,
                primary,
                disks,
            } => {
                body.put_u16_le(*version);
                put_string(&mut body, vm);
                put_string(&mut body, primary);
                body.put_u16_le(disks.len() as u16);
                for disk in disks {
                    body.put_slice(disk.disk_id.as_bytes());
                    body.put_u64_le(disk.virtual_size);
                    body.put_u32_le(disk.logical_sector);
                }
                KIND_HELLO
            }
            Message::Welcome {
                version,
                applied,
                staged,
            } => {
                body.put_u16_le(*version);
                body.put_u64_le(*applied);
                match staged {
                    None => body.put_u8(0),
                    Some(staged) => {
                        body.put_u8(1);
                        put_delta(&mut body, staged.delta);
                        put_ranges(&mut body, &staged.received);
                    }
                }
                KIND_WELCOME
            }
            Message::Refused { code, reason } => {
                body.put_u16_le(*code as u16);
                put_string(&mut body, reason);
                KIND_REFUSED
            }
            Message::DeltaBegin {
                delta,
                kind,
                chunks,
                recovery_point,
                app_consistent,
            } => {
                put_delta(&mut body, *delta);
                body.put_u8(match kind {
                    DeltaKind::Initial => 1,
                    DeltaKind::Changes => 2,
                });
                body.put_u8(u8::from(*recovery_point) | (u8::from(*app_consistent) << 1));
                body.put_u32_le(*chunks);
                KIND_DELTA_BEGIN
            }
            Message::Chunk {
                delta,
                index,
                disk,
                payload,
            } => {
                let prefix = chunk_frame_prefix(*delta, *index, *disk, payload.len());
                let mut frame = BytesMut::with_capacity(prefix.len() + payload.len());
                frame.put_slice(&prefix);
                frame.put_slice(payload);
                return frame.freeze();
            }
            Message::ChunksStaged { delta, received } => {
                put_delta(&mut body, *delta);
                put_ranges(&mut body, received);
                KIND_CHUNKS_STAGED
            }
            Message::DeltaEnd { delta } => {
                put_delta(&mut body, *delta);
                KIND_DELTA_END
            }
            Message::Applied { delta } => {
                put_delta(&mut body, *delta);
                KIND_APPLIED
            }
            Message::Goodbye => KIND_GOODBYE,
            Message::Reverse { applied, resync } => {
                body.put_u64_le(*applied);
                body.put_u8(u8::from(*resync));
                KIND_REVERSE
            }
            Message::Handover {
                sequence,
                seed,
                digests,
                reverse,
            } => {
                body.put_u64_le(*sequence);
                body.put_u64_le(*seed);
                body.put_u8(u8::from(*reverse));
                body.put_u16_le(digests.len() as u16);
                for digest in digests {
                    body.put_u128_le(*digest);
                }
                KIND_HANDOVER
            }
            Message::HandedOver { sequence } => {
                body.put_u64_le(*sequence);
                KIND_HANDED_OVER
            }
            Message::HashRequest { vm, seed } => {
                put_string(&mut body, vm);
                body.put_u64_le(*seed);
                KIND_HASH_REQUEST
            }
            Message::Hashes { disk, payload } => {
                body.put_u16_le(*disk);
                body.put_slice(payload);
                KIND_HASHES
            }
            Message::GroupDigests { disk, digests } => {
                body.put_u16_le(*disk);
                body.put_u32_le(digests.len() as u32);
                for digest in digests {
                    body.put_u128_le(*digest);
                }
                KIND_GROUP_DIGESTS
            }
            Message::HashRanges { ranges } => {
                body.put_u32_le(ranges.len() as u32);
                for (disk, blocks) in ranges {
                    body.put_u16_le(*disk);
                    body.put_u64_le(blocks.start);
                    body.put_u64_le(blocks.end);
                }
                KIND_HASH_RANGES
            }
            Message::HashesDone => KIND_HASHES_DONE,
        };
        let mut frame = BytesMut::with_capacity(FRAME_HEADER + body.len());
        frame.put_slice(&frame_header(kind, body.len()));
        frame.put_slice(&body);
        frame.freeze()
    }

    /// Decodes a body of `kind`. A chunk's payload is a slice of `body`, not a copy.
    pub(crate) fn decode(kind: u8, mut body: Bytes) -> Result<Message, ProtocolError> {
        let message = match kind {
            KIND_HELLO => {
                let version = take_u16(&mut body)?;
                let vm = take_string(&mut body)?;
                let primary = take_string(&mut body)?;
                let count = take_u16(&mut body)?;
                let mut disks = Vec::with_capacity(usize::from(count).min(body.remaining() / 28));
                for _ in 0..count {
                    need(&body, 28)?;
                    let mut id = [0u8; 16];
                    body.copy_to_slice(&mut id);
                    disks.push(DiskDescription {
                        disk_id: Uuid::from_bytes(id),
                        virtual_size: body.get_u64_le(),
                        logical_sector: body.get_u32_le(),
                    });
                }
                Message::Hello {
                    version,
                    vm,
                    primary,
                    disks,
                }
            }
            KIND_WELCOME => {
                let version = take_u16(&mut body)?;
                let applied = take_u64(&mut body)?;
                let staged = match take_u8(&mut body)? {
                    0 => None,
                    1 => Some(Staged {
                        delta: take_delta(&mut body)?,
                        received: take_ranges(&mut body)?,
                    }),
                    other => return Err(error(format!("welcome: staged flag {other}"))),
                };
                Message::Welcome {
                    version,
                    applied,
                    staged,
                }
            }
            KIND_REFUSED => {
                let code = take_u16(&mut body)?;
                let code = RefusalCode::from_wire(code)
                    .ok_or_else(|| error(format!("unknown refusal code {code}")))?;
                let reason = take_string(&mut body)?;
                Message::Refused { code, reason }
            }
            KIND_DELTA_BEGIN => {
                let delta = take_delta(&mut body)?;
                let kind = match take_u8(&mut body)? {
                    1 => DeltaKind::Initial,
                    2 => DeltaKind::Changes,
                    other => return Err(error(format!("delta begin: unknown kind {other}"))),
                };
                let flags = take_u8(&mut body)?;
                let (recovery_point, app_consistent) = (flags & 1 != 0, flags & 2 != 0);
                let chunks = take_u32(&mut body)?;
                Message::DeltaBegin {
                    delta,
                    kind,
                    chunks,
                    recovery_point,
                    app_consistent,
                }
            }
            KIND_CHUNK => {
                let delta = take_delta(&mut body)?;
                let index = take_u32(&mut body)?;
                let disk = take_u16(&mut body)?;
                let payload = body.split_off(0);
                Message::Chunk {
                    delta,
                    index,
                    disk,
                    payload,
                }
            }
            KIND_CHUNKS_STAGED => Message::ChunksStaged {
                delta: take_delta(&mut body)?,
                received: take_ranges(&mut body)?,
            },
            KIND_DELTA_END => Message::DeltaEnd {
                delta: take_delta(&mut body)?,
            },
            KIND_APPLIED => Message::Applied {
                delta: take_delta(&mut body)?,
            },
            KIND_GOODBYE => Message::Goodbye,
            KIND_REVERSE => Message::Reverse {
                applied: take_u64(&mut body)?,
                resync: take_u8(&mut body)? != 0,
            },
            KIND_HANDOVER => {
                let sequence = take_u64(&mut body)?;
                let seed = take_u64(&mut body)?;
                let reverse = take_u8(&mut body)? != 0;
                let count = usize::from(take_u16(&mut body)?);
                need(&body, count * 16)?;
                let digests = (0..count).map(|_| body.get_u128_le()).collect();
                Message::Handover {
                    sequence,
                    seed,
                    digests,
                    reverse,
                }
            }
            KIND_HANDED_OVER => Message::HandedOver {
                sequence: take_u64(&mut body)?,
            },
            KIND_HASH_REQUEST => Message::HashRequest {
                vm: take_string(&mut body)?,
                seed: take_u64(&mut body)?,
            },
            KIND_HASHES => {
                let disk = take_u16(&mut body)?;
                Message::Hashes {
                    disk,
                    payload: body.split_off(0),
                }
            }
            KIND_GROUP_DIGESTS => {
                let disk = take_u16(&mut body)?;
                let count = take_u32(&mut body)? as usize;
                need(&body, count.saturating_mul(16))?;
                let digests = (0..count).map(|_| body.get_u128_le()).collect();
                Message::GroupDigests { disk, digests }
            }
            KIND_HASH_RANGES => {
                let count = take_u32(&mut body)? as usize;
                need(&body, count.saturating_mul(18))?;
                let mut ranges = Vec::with_capacity(count);
                for _ in 0..count {
                    let disk = body.get_u16_le();
                    let (start, end) = (body.get_u64_le(), body.get_u64_le());
                    if start >= end {
                        return Err(error("an empty or reversed block range"));
                    }
                    ranges.push((disk, start..end));
                }
                Message::HashRanges { ranges }
            }
            KIND_HASHES_DONE => Message::HashesDone,
            other => return Err(error(format!("unknown message kind {other}"))),
        };
        if body.has_remaining() {
            return Err(error(format!(
                "{} bytes follow a message of kind {kind}",
                body.remaining()
            )));
        }
        Ok(message)
    }
}

fn need(body: &Bytes, length: usize) -> Result<(), ProtocolError> {
    if body.remaining() < length {
        return Err(error("message is shorter than its fields"));
    }
    Ok(())
}

fn take_u8(body: &mut Bytes) -> Result<u8, ProtocolError> {
    need(body, 1)?;
    Ok(body.get_u8())
}

fn take_u16(body: &mut Bytes) -> Result<u16, ProtocolError> {
    need(body, 2)?;
    Ok(body.get_u16_le())
}

fn take_u32(body: &mut Bytes) -> Result<u32, ProtocolError> {
    need(body, 4)?;
    Ok(body.get_u32_le())
}

fn take_u64(body: &mut Bytes) -> Result<u64, ProtocolError> {
    need(body, 8)?;
    Ok(body.get_u64_le())
}

fn take_delta(body: &mut Bytes) -> Result<DeltaId, ProtocolError> {
    Ok(DeltaId {
        sequence: take_u64(body)?,
        cut: take_u64(body)?,
    })
}

fn take_string(body: &mut Bytes) -> Result<String, ProtocolError> {
    let length = usize::from(take_u16(body)?);
    need(body, length)?;
    let bytes = body.split_to(length);
    String::from_utf8(bytes.to_vec()).map_err(|_| error("a name is not UTF-8"))
}

fn take_ranges(body: &mut Bytes) -> Result<Vec<Range<u32>>, ProtocolError> {
    let count = take_u32(body)? as usize;
    need(body, count.saturating_mul(8))?;
    let mut ranges = Vec::with_capacity(count);
    let mut previous_end = 0;
    for _ in 0..count {
        let (start, end) = (body.get_u32_le(), body.get_u32_le());
        if start >= end || start < previous_end {
            return Err(error("chunk ranges are empty, overlapping or out of order"));
        }
        previous_end = end;
        ranges.push(start..end);
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(message: Message) {
        let frame = message.encode();
        let header: [u8; FRAME_HEADER] = frame[..FRAME_HEADER].try_into().unwrap();
        let (kind, length) = decode_frame_header(header).unwrap();
        assert_eq!(length, frame.len() - FRAME_HEADER);
        assert_eq!(
            Message::decode(kind, frame.slice(FRAME_HEADER..)).unwrap(),
            message
        );
    }

    #[test]
    fn every_message_survives_encoding() {
        let delta = DeltaId {
            sequence: 7,
            cut: 0xdead_beef,
        };
        round_trip(Message::Hello {
            version: PROTOCOL_VERSION,
            vm: "vm1".into(),
            primary: "host-a".into(),
            disks: vec![DiskDescription {
                disk_id: Uuid::from_u128(5),
                virtual_size: 1 << 30,
                logical_sector: 4096,
            }],
        });
        round_trip(Message::Welcome {
            version: 1,
            applied: 6,
            staged: Some(Staged {
                delta,
                received: vec![0..3, 5..9],
            }),
        });
        round_trip(Message::Welcome {
            version: 1,
            applied: 0,
            staged: None,
        });
        for code in RefusalCode::ALL {
            round_trip(Message::Refused {
                code,
                reason: "no".into(),
            });
        }
        round_trip(Message::DeltaBegin {
            delta,
            kind: DeltaKind::Initial,
            chunks: 12,
            recovery_point: true,
            app_consistent: true,
        });
        round_trip(Message::Chunk {
            delta,
            index: 3,
            disk: 1,
            payload: Bytes::from_static(b"payload"),
        });
        round_trip(Message::ChunksStaged {
            delta,
            received: vec![1..2, 4..9],
        });
        round_trip(Message::DeltaEnd { delta });
        round_trip(Message::Applied { delta });
        round_trip(Message::Goodbye);
        round_trip(Message::Reverse {
            applied: 9,
            resync: true,
        });
        round_trip(Message::Handover {
            sequence: 9,
            seed: 77,
            digests: vec![1, u128::MAX],
            reverse: true,
        });
        round_trip(Message::HandedOver { sequence: 9 });
        round_trip(Message::HashRequest {
            vm: "vm1".into(),
            seed: 3,
        });
        round_trip(Message::Hashes {
            disk: 1,
            payload: Bytes::from_static(b"hashes"),
        });
        round_trip(Message::GroupDigests {
            disk: 0,
            digests: vec![7, 8],
        });
        round_trip(Message::HashRanges {
            ranges: vec![(0, 0..1024), (1, 2048..2050)],
        });
        round_trip(Message::HashesDone);
    }

    #[test]
    fn truncated_or_padded_bodies_are_refused() {
        let frame = Message::DeltaEnd {
            delta: DeltaId {
                sequence: 1,
                cut: 2,
            },
        }
        .encode();
        let body = frame.slice(FRAME_HEADER..);
        for cut in 0..body.len() {
            assert!(Message::decode(frame[4], body.slice(..cut)).is_err());
        }
        let mut padded = body.to_vec();
        padded.push(0);
        assert!(Message::decode(frame[4], Bytes::from(padded)).is_err());
    }

    #[test]
    fn oversized_frames_and_unknown_kinds_are_refused() {
        let mut header = [0u8; FRAME_HEADER];
        header[..4].copy_from_slice(&((MAX_BODY + 1) as u32).to_le_bytes());
        assert!(decode_frame_header(header).is_err());
        assert!(Message::decode(200, Bytes::new()).is_err());
        let mut refusal = BytesMut::new();
        refusal.put_u16_le(999);
        put_string(&mut refusal, "no");
        let error = Message::decode(KIND_REFUSED, refusal.freeze()).unwrap_err();
        assert!(error.to_string().contains("refusal code 999"), "{error}");
    }

    #[test]
    fn a_hostile_range_count_does_not_allocate() {
        let mut body = BytesMut::new();
        body.put_u64_le(1);
        body.put_u64_le(1);
        body.put_u32_le(u32::MAX);
        assert!(Message::decode(KIND_CHUNKS_STAGED, body.freeze()).is_err());
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut body = BytesMut::new();
        put_delta(
            &mut body,
            DeltaId {
                sequence: 1,
                cut: 1,
            },
        );
        put_ranges(&mut body, &[0..4, 3..6]);
        assert!(Message::decode(KIND_CHUNKS_STAGED, body.freeze()).is_err());
    }
}
