//! A full consistency check of a VHDX file: every problem listed, not just the first.

use super::inspect::inspect;
use crate::io::Storage;
use crate::{Error, Result};

/// What `check` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// Damage: bad checksums, overlapping or out-of-file blocks, bad metadata, a log awaiting
    /// replay. An image is clean when this is empty.
    pub problems: Vec<String>,
    /// Facts worth knowing that are not damage.
    pub notes: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the VHDX image in `storage`. Damage is reported in the result; only a failure to
/// read the file at all is an error.
pub fn check<S: Storage + ?Sized>(storage: &S, name: &str) -> Result<CheckReport> {
    match inspect(storage, name) {
        Ok(inspection) => {
            let mut report = CheckReport {
                problems: inspection.problems,
                notes: inspection.notes,
            };
            if let Some(replay) = &inspection.replay {
                report.problems.push(format!(
                    "the log holds {} entries ({} writes) that must be replayed; `blockrep image check --repair` replays them",
                    replay.entries,
                    replay.writes.len()
                ));
            }
            if inspection.metadata.has_parent {
                report
                    .notes
                    .push("differencing image (has a parent): blockrep cannot open it yet".into());
            }
            Ok(report)
        }
        Err(error @ Error::Io { .. }) => Err(error),
        Err(Error::Corrupt { problem, .. }) => Ok(CheckReport {
            problems: vec![problem],
            notes: Vec::new(),
        }),
        Err(other) => Ok(CheckReport {
            problems: vec![other.to_string()],
            notes: Vec::new(),
        }),
    }
}
