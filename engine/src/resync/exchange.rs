//! The comparison exchange as state with no I/O, for every driver (the QUIC daemons, the
//! simulator): the primary's [`Comparison`] takes the replica's messages and its own hashes and
//! says what to send; the replica's side is two functions that turn its hashes into messages.
//!
//! On the control stream: the primary sends `HashRequest`; the replica answers `Welcome`
//! (applied 0: it holds no copy, nothing to compare) at once, so both sides hash at the same
//! time, then each disk's group digests. The primary, its own hashes done, asks with
//! `HashRanges` for the block hashes of the groups that differ; the replica sends them in pieces
//! and `HashesDone`.

use super::{BlockHashes, GROUP_BLOCKS};
use crate::proto::Message;
use crate::{Error, Result};
use bytes::Bytes;
use std::ops::Range;

/// Blocks per `Hashes` message: 1 MiB of hashes, well under a frame's limit.
const PIECE_BLOCKS: u64 = 1 << 16;

pub(crate) fn failure(problem: impl Into<String>) -> Error {
    Error::Replication {
        peer: "resynchronization".into(),
        problem: problem.into(),
    }
}

/// What the primary's side asks of its driver next.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Nothing to do until the next message or our own hashes.
    Wait,
    Send(Message),
    /// The replica holds no copy: an initial replication is needed instead.
    NoCopy,
    /// The comparison is complete: per disk, the byte ranges that differ, in order.
    Done(Vec<Vec<Range<u64>>>),
}

#[derive(Debug)]
enum Phase {
    Welcome,
    /// Collecting the replica's group digests (and our hashes).
    Groups,
    /// Asked for these block ranges; collecting their hashes, `received` blocks so far.
    Hashes {
        asked: Vec<(u16, Range<u64>)>,
        received: u64,
    },
    Finished,
}

/// The primary's side of one comparison of `disks` disks.
#[derive(Debug)]
pub struct Comparison {
    phase: Phase,
    groups: Vec<Option<Vec<u128>>>,
    ours: Option<Vec<BlockHashes>>,
    differing: Vec<Vec<Range<u64>>>,
}

impl Comparison {
    /// Starts a comparison of `vm`'s disks with hashes seeded by `seed`: send the message
    /// returned, then hash our disks with the same seed (`hashed`) while the replica answers.
    pub fn start(vm: &str, seed: u64, disks: usize) -> (Comparison, Message) {
        let comparison = Comparison {
            phase: Phase::Welcome,
            groups: vec![None; disks],
            ours: None,
            differing: vec![Vec::new(); disks],
        };
        let request = Message::HashRequest {
            vm: vm.to_owned(),
            seed,
        };
        (comparison, request)
    }

    /// Our own hashes, one set per disk, are ready.
    pub fn hashed(&mut self, ours: Vec<BlockHashes>) -> Result<Step> {
        if ours.len() != self.groups.len() {
            return Err(failure("our hashes do not cover every disk"));
        }
        self.ours = Some(ours);
        self.ask_when_ready()
    }

    /// Our hashes, once given.
    pub(crate) fn into_ours(self) -> Option<Vec<BlockHashes>> {
        self.ours
    }

    /// A message from the replica arrived.
    pub fn received(&mut self, message: Message) -> Result<Step> {
        let disks = self.groups.len();
        match (&mut self.phase, message) {
            (_, Message::Refused { reason, .. }) => Err(failure(reason)),
            (Phase::Welcome, Message::Welcome { applied: 0, .. }) => {
                self.phase = Phase::Finished;
                Ok(Step::NoCopy)
            }
            (Phase::Welcome, Message::Welcome { .. }) => {
                self.phase = Phase::Groups;
                Ok(Step::Wait)
            }
            (Phase::Groups, Message::GroupDigests { disk, digests })
                if usize::from(disk) < disks =>
            {
                self.groups[usize::from(disk)] = Some(digests);
                self.ask_when_ready()
            }
            (Phase::Hashes { asked, received }, Message::Hashes { disk, payload })
                if usize::from(disk) < disks =>
            {
                let theirs = BlockHashes::decode(&payload)?;
                let blocks = theirs.blocks();
                if !asked.iter().any(|(asked_disk, range)| {
                    *asked_disk == disk && range.start <= blocks.start && blocks.end <= range.end
                }) {
                    return Err(failure(format!(
                        "hashes of blocks {blocks:?} of disk {disk} were not asked for"
                    )));
                }
                let ours = self
                    .ours
                    .as_ref()
                    .ok_or_else(|| failure("hashes came before ours were done"))?;
                *received += blocks.end - blocks.start;
                let piece = ours[usize::from(disk)].piece(blocks)?;
                self.differing[usize::from(disk)].extend(piece.differing(&theirs)?);
                Ok(Step::Wait)
            }
            (Phase::Hashes { asked, received }, Message::HashesDone) => {
                // A replica that stops short must not pass for one whose blocks all matched.
                let owed: u64 = asked.iter().map(|(_, range)| range.end - range.start).sum();
                if *received != owed {
                    return Err(failure(format!(
                        "the replica sent hashes of {received} blocks of the {owed} asked for"
                    )));
                }
                self.phase = Phase::Finished;
                let mut differing = std::mem::take(&mut self.differing);
                for ranges in &mut differing {
                    ranges.sort_by_key(|range| range.start);
                }
                Ok(Step::Done(differing))
            }
            (phase, other) => Err(failure(format!(
                "unexpected {other:?} while {}",
                match phase {
                    Phase::Welcome => "waiting for the replica's welcome",
                    Phase::Groups => "waiting for group digests",
                    Phase::Hashes { .. } => "waiting for block hashes",
                    Phase::Finished => "done",
                }
            ))),
        }
    }

    /// With our hashes and every disk's group digests in, asks for the groups that differ.
    fn ask_when_ready(&mut self) -> Result<Step> {
        let (Phase::Groups, Some(ours)) = (&self.phase, &self.ours) else {
            return Ok(Step::Wait);
        };
        if self.groups.iter().any(Option::is_none) {
            return Ok(Step::Wait);
        }
        let mut asked = Vec::new();
        for (disk, (ours, theirs)) in ours.iter().zip(self.groups.iter().flatten()).enumerate() {
            for blocks in ours.differing_groups(theirs, GROUP_BLOCKS)? {
                asked.push((disk as u16, blocks));
            }
        }
        self.phase = Phase::Hashes {
            asked: asked.clone(),
            received: 0,
        };
        Ok(Step::Send(Message::HashRanges { ranges: asked }))
    }
}

/// The replica's group digests for each disk, once its `hashes` are done.
pub fn group_digests(hashes: &[BlockHashes]) -> Vec<Message> {
    hashes
        .iter()
        .enumerate()
        .map(|(disk, set)| Message::GroupDigests {
            disk: disk as u16,
            digests: set.group_digests(GROUP_BLOCKS),
        })
        .collect()
}

/// The replica's answer to `HashRanges`: the block hashes asked for, in pieces made as they
/// are sent (never all at once), then `HashesDone`. The ranges must be as a primary asks them:
/// each non-empty and inside its disk, in order of disk and block, none overlapping, so that the
/// answer holds each hash at most once; anything else is refused, saying what was wrong.
pub fn block_hashes<'a>(
    hashes: &'a [BlockHashes],
    ranges: &'a [(u16, Range<u64>)],
) -> Result<impl Iterator<Item = Message> + 'a> {
    let mut previous: Option<(u16, u64)> = None;
    for (disk, blocks) in ranges {
        let set = hashes
            .get(usize::from(*disk))
            .ok_or_else(|| failure(format!("hashes of disk {disk}, which is not there")))?;
        if blocks.start >= blocks.end || blocks.end > set.blocks().end {
            return Err(failure(format!(
                "hashes of blocks {blocks:?} of disk {disk}, which has blocks {:?}",
                set.blocks()
            )));
        }
        if previous
            .is_some_and(|(last_disk, last_end)| (*disk, blocks.start) < (last_disk, last_end))
        {
            return Err(failure(format!(
                "hash ranges out of order or overlapping at blocks {blocks:?} of disk {disk}"
            )));
        }
        previous = Some((*disk, blocks.end));
    }
    let pieces = ranges.iter().flat_map(move |(disk, blocks)| {
        let set = &hashes[usize::from(*disk)];
        let starts = (blocks.start..blocks.end).step_by(PIECE_BLOCKS as usize);
        starts.map(move |start| Message::Hashes {
            disk: *disk,
            payload: Bytes::from(set.encode(start..(start + PIECE_BLOCKS).min(blocks.end))),
        })
    });
    Ok(pieces.chain(std::iter::once(Message::HashesDone)))
}
