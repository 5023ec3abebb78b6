//! The first host's durable record of a planned failover to the other site (`IMAGE.brhandover`
//! beside the VM's first disk).
//!
//! It is written once the other site holds the final delta and before it is asked to take the
//! VM over: from then on the other site may run the VM at any moment. A host that starts with
//! the record serves the disks to no one until the other site says who runs the VM
//! ([`after_handover`]); the record goes when the VM runs here again, or when this host
//! becomes its replica.

use crate::io::StorageOptions;
use crate::planted::{Bug, is_planted};
use crate::proto::Message;
use crate::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The most of a record that is read back: a sequence number and a newline.
const RECORD_BYTES: u64 = 64;

/// Where a VM's handover record is, for the disks it protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverMark {
    path: PathBuf,
}

impl HandoverMark {
    /// The record of the VM whose first disk is `first_disk`.
    pub fn for_disk(first_disk: &Path) -> Self {
        let mut path = first_disk.as_os_str().to_owned();
        path.push(".brhandover");
        HandoverMark {
            path: PathBuf::from(path),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn temporary(&self) -> PathBuf {
        let mut path = self.path.as_os_str().to_owned();
        path.push(".new");
        PathBuf::from(path)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// Records, durably, a handover at final delta `sequence` (through `storage`, so that a
    /// simulated power cut strikes between its steps as it would on a disk).
    pub fn record(&self, sequence: u64, storage: &StorageOptions) -> Result<()> {
        if is_planted(Bug::NoHandoverRecord) {
            return Ok(());
        }
        storage
            .replace_file(
                &self.path,
                &self.temporary(),
                format!("{sequence}\n").as_bytes(),
            )
            .map_err(|error| Error::file(&self.name(), "record the handover", error))?;
        storage.sync_directory(parent(&self.path))
    }

    /// The final delta of the handover recorded, if there is one.
    pub fn recorded(&self) -> Result<Option<u64>> {
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(Error::file(&self.name(), "open", error)),
        };
        let mut text = String::new();
        file.take(RECORD_BYTES)
            .read_to_string(&mut text)
            .map_err(|error| Error::file(&self.name(), "read", error))?;
        let sequence = text.trim().parse::<u64>().map_err(|_| {
            Error::file(
                &self.name(),
                "read",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "not a handover record (a delta sequence): {:?}",
                        text.trim()
                    ),
                ),
            )
        })?;
        Ok(Some(sequence))
    }

    /// Removes the record (the VM runs here, or this host is its replica now), durably.
    pub fn remove(&self, storage: &StorageOptions) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        storage.remove_if_present(&self.path)?;
        storage.remove_if_present(&self.temporary())?;
        storage.sync_directory(parent(&self.path))
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// What a host that recorded a handover does once the other site answered its `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterHandover {
    /// The other site expects this host as the VM's primary (the handover never happened):
    /// remove the record and run the VM here.
    RunHere,
    /// The VM runs at the other site, which replicates back to this host: become its replica,
    /// this host's copy counted as at delta `applied`.
    BecomeReplica { applied: u64 },
    /// The VM runs at the other site since the handover at `sequence`, which does not
    /// replicate back (yet): the disks stay served to no one, and the host asks again until
    /// the operator there runs `blockrep reverse`.
    RunsThere { sequence: u64 },
    /// No answer that settles it (the other site is unreachable, or asks to retry): ask again
    /// later, the disks served to no one meanwhile.
    AskAgain { reason: String },
    /// The other site refused for good: the operator must look (the record says a handover
    /// happened; the other site does not know the VM).
    Refused { reason: String },
}

/// What the other site's first answer to a host holding a handover record means.
pub fn after_handover(answer: &Message) -> AfterHandover {
    match answer {
        Message::Welcome { .. } => AfterHandover::RunHere,
        Message::Reverse { applied, .. } => AfterHandover::BecomeReplica { applied: *applied },
        Message::HandedOver { sequence } => AfterHandover::RunsThere {
            sequence: *sequence,
        },
        Message::Refused { code, reason } if code.retry() => AfterHandover::AskAgain {
            reason: reason.clone(),
        },
        Message::Refused { reason, .. } => AfterHandover::Refused {
            reason: reason.clone(),
        },
        other => AfterHandover::AskAgain {
            reason: format!("an unexpected answer: {other:?}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RefusalCode;

    #[test]
    fn a_recorded_handover_reads_back_and_goes_when_removed() {
        let directory = tempfile::tempdir().unwrap();
        let mark = HandoverMark::for_disk(&directory.path().join("vm1.raw"));
        let storage = StorageOptions::default();
        assert_eq!(mark.recorded().unwrap(), None);
        mark.record(41, &storage).unwrap();
        assert_eq!(mark.recorded().unwrap(), Some(41));
        mark.record(42, &storage).unwrap();
        assert_eq!(mark.recorded().unwrap(), Some(42));
        mark.remove(&storage).unwrap();
        assert_eq!(mark.recorded().unwrap(), None);
        mark.remove(&storage).unwrap();
    }

    #[test]
    fn a_damaged_record_is_refused_with_its_name() {
        let directory = tempfile::tempdir().unwrap();
        let mark = HandoverMark::for_disk(&directory.path().join("vm1.raw"));
        std::fs::write(mark.path(), vec![b'7'; 1 << 20]).unwrap();
        let error = mark.recorded().unwrap_err().to_string();
        assert!(error.contains("vm1.raw.brhandover"), "{error}");
        assert!(error.contains("not a handover record"), "{error}");
    }

    #[test]
    fn the_other_sites_answer_decides_who_runs_the_vm() {
        let welcome = Message::Welcome {
            version: 1,
            applied: 7,
            staged: None,
        };
        assert_eq!(after_handover(&welcome), AfterHandover::RunHere);
        assert_eq!(
            after_handover(&Message::Reverse {
                applied: 7,
                resync: false
            }),
            AfterHandover::BecomeReplica { applied: 7 }
        );
        assert_eq!(
            after_handover(&Message::HandedOver { sequence: 7 }),
            AfterHandover::RunsThere { sequence: 7 }
        );
        let finishing = Message::Refused {
            code: RefusalCode::RunsAtReplicaSite,
            reason: "a failback is finishing".into(),
        };
        assert!(matches!(
            after_handover(&finishing),
            AfterHandover::AskAgain { .. }
        ));
        let unknown = Message::Refused {
            code: RefusalCode::NotThisReplica,
            reason: "unknown VM".into(),
        };
        assert!(matches!(
            after_handover(&unknown),
            AfterHandover::Refused { .. }
        ));
    }
}
