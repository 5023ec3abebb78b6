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

    /// Whether a handover may have been recorded: anything at the record's path counts, and
    /// so does a path that cannot be looked at. A host that finds one asks the other site who
    /// runs the VM before it serves the disks: a damaged record must not make it run the VM.
    pub fn present(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(_) => true,
            Err(error) => error.kind() != std::io::ErrorKind::NotFound,
        }
    }

    /// The final delta of the handover recorded, if there is one; an error names what is wrong
    /// with a record that is there but is not one (see `present`).
    pub fn recorded(&self) -> Result<Option<u64>> {
        let invalid = |problem: String| {
            Error::file(
                &self.name(),
                "read",
                std::io::Error::new(std::io::ErrorKind::InvalidData, problem),
            )
        };
        match std::fs::symlink_metadata(&self.path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(Error::file(&self.name(), "look at", error)),
            // Opened only when it is a plain file: a FIFO would block the open.
            Ok(metadata) if !metadata.is_file() => {
                return Err(invalid(format!(
                    "not a handover record: a {:?}, not a file",
                    metadata.file_type()
                )));
            }
            Ok(_) => {}
        }
        let file = std::fs::File::open(&self.path)
            .map_err(|error| Error::file(&self.name(), "open", error))?;
        let mut bytes = Vec::new();
        file.take(RECORD_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|error| Error::file(&self.name(), "read", error))?;
        if bytes.len() as u64 > RECORD_BYTES {
            return Err(invalid(format!(
                "not a handover record: longer than {RECORD_BYTES} bytes"
            )));
        }
        let digits = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
        let sequence = std::str::from_utf8(digits)
            .ok()
            .filter(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| {
                invalid(format!(
                    "not a handover record (a delta sequence and a newline): {:?}",
                    String::from_utf8_lossy(&bytes)
                ))
            })?;
        Ok(Some(sequence))
    }

    /// Removes the record (the VM runs here, or this host is its replica now), durably.
    pub fn remove(&self, storage: &StorageOptions) -> Result<()> {
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
        assert!(!mark.present());
        mark.record(41, &storage).unwrap();
        assert!(mark.present());
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
        for damaged in [
            vec![b'7'; 1 << 20],
            b"5                                                               99".to_vec(),
            b"+5\n".to_vec(),
            b"".to_vec(),
            vec![0xff, b'\n'],
        ] {
            std::fs::write(mark.path(), &damaged).unwrap();
            let error = mark.recorded().unwrap_err().to_string();
            assert!(error.contains("vm1.raw.brhandover"), "{error}");
            assert!(error.contains("not a handover record"), "{error}");
            // A damaged record still counts: the host asks before it runs the VM.
            assert!(mark.present());
        }
        std::fs::remove_file(mark.path()).unwrap();
        std::fs::create_dir(mark.path()).unwrap();
        assert!(mark.present());
        let error = mark.recorded().unwrap_err().to_string();
        assert!(error.contains("not a file"), "{error}");
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
