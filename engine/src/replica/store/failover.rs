//! A failover to the replica site as the store records it: test failover copies, an
//! unplanned failover begun, copied, committed or cancelled, a planned failover taken over or
//! handed back, and the operator's consents (docs/formats/replica.md, "Failover").

use super::*;

/// A failover of the VM to the replica site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// The recovery point the VM was brought up from.
    pub point: u64,
    /// Committed: the failover disks became the VM's disks and the points were dropped.
    pub committed: bool,
    /// A planned failover: the primary handed over with nothing lost, disks compared equal.
    #[serde(default)]
    pub planned: bool,
    /// Replicate back to the old primary when it connects (`blockrep reverse`).
    #[serde(default)]
    pub reverse: bool,
    /// The old primary's copy must be compared by hash before replication back: it may hold
    /// writes made after its last shipped cut (an unplanned failover).
    #[serde(default)]
    pub resync: bool,
    /// A failback back to the old primary is under way: its final delta, this sequence, is
    /// applied there, which may take the VM over any moment. A server that restarts with
    /// this set must not run the VM again: it becomes the replica, at this sequence.
    #[serde(default)]
    pub handing_back: Option<u64>,
    /// An unplanned failover's disks are complete and durable (their copy finished). Until
    /// then they may be half written, or still being written: they cannot be committed.
    #[serde(default)]
    pub copied: bool,
    /// Which attempt at an unplanned failover this is: a copy made for one that was cancelled
    /// (and perhaps begun again) must neither go on writing nor count as this one's.
    #[serde(default)]
    pub attempt: u64,
}

impl FailoverRecord {
    /// The VM runs at this site: its disks are live, written by the VM.
    pub fn active(&self) -> bool {
        self.committed
    }
}

/// What a failover means for replication from the primary.
pub fn fence_for(failover: &FailoverRecord) -> Fence {
    Fence {
        reason: if failover.committed {
            format!(
                "failed over to the replica site from point {} and committed: replication from this primary has ended",
                failover.point
            )
        } else {
            format!(
                "failed over to the replica site from point {} (not committed): replication resumes if the failover is cancelled",
                failover.point
            )
        },
        permanent: failover.committed,
    }
}

impl VmReplica {
    /// Where the VM's test failover copy is, if one exists.
    pub(crate) fn test_failover(&self) -> Option<PathBuf> {
        self.catalogue
            .as_ref()
            .and_then(|catalogue| catalogue.test_failover.clone())
    }

    /// Records (or clears) the VM's test failover copy.
    pub(crate) fn set_test_failover(&mut self, out: Option<PathBuf>) -> Result<()> {
        if out.is_some() {
            self.refuse_pending_commit()?;
        }
        let mut catalogue = self.catalogue()?.clone();
        catalogue.test_failover = out;
        self.write_catalogue(catalogue)
    }

    /// The operator allows the next initial replication from the primary to replace this
    /// replica, dropping its recovery points (`blockrep reinitialize`).
    pub fn allow_reinitialize(&mut self) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        catalogue.reinitialize = true;
        self.write_catalogue(catalogue)
    }

    /// The operator allows the next planned failover to this site, which drops the recovery
    /// points (`blockrep allow-handover`).
    pub fn allow_handover(&mut self) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        if catalogue.failover.is_some() {
            // A consent given now would wait for a handover long after this one ends.
            return Err(self.refusal(
                "has failed over to this site: a planned failover from here hands it back, with no points to lose".into(),
            ));
        }
        catalogue.handover = true;
        self.write_catalogue(catalogue)
    }

    /// Whether a primary's planned failover at `sequence` may take the VM over here: the
    /// replica must be at that delta, and the recovery points (which the VM running here
    /// would make useless) go only with the operator's consent, so that a primary alone can
    /// never erase them.
    pub fn check_take_over(&self, sequence: u64) -> Result<()> {
        let catalogue = self.catalogue()?;
        if catalogue.applied != sequence {
            return Err(self.refusal(format!(
                "handed over at delta {sequence}, but delta {} is applied here",
                catalogue.applied
            )));
        }
        match self.handover_needs_consent() {
            Some(refusal) => Err(self.refusal(refusal)),
            None => Ok(()),
        }
    }

    /// Why a planned failover to this site needs the operator's consent first: it would drop
    /// recovery points, and none was given. `None` when it may go ahead.
    pub fn handover_needs_consent(&self) -> Option<String> {
        let catalogue = self.catalogue.as_ref()?;
        let points = catalogue.points.len();
        (points > 0 && !catalogue.handover).then(|| format!(
            "a planned failover to this site drops the replica's {points} recovery point{}: the replica host's operator must allow it first (`blockrep allow-handover {}`)",
            if points == 1 { "" } else { "s" },
            self.vm
        ))
    }

    /// The failover of the VM to this site, if there is one.
    pub fn failover(&self) -> Option<FailoverRecord> {
        self.catalogue
            .as_ref()
            .and_then(|catalogue| catalogue.failover.clone())
    }

    /// Where failover disks are made: beside the replica's, until committed.
    pub fn failover_directory(&self) -> PathBuf {
        self.directory.join("failover")
    }

    /// Records an unplanned failover to `point` (its disks being made in
    /// `failover_directory`): from now on the primary is refused. Returns the attempt the copy
    /// is made for (see [`VmReplica::failover_copied`]).
    pub fn begin_failover(&mut self, point: u64) -> Result<u64> {
        self.refuse_pending_commit()?;
        let attempt = crate::resync::random_seed()?;
        let mut catalogue = self.catalogue()?.clone();
        catalogue.failover = Some(FailoverRecord {
            point,
            committed: false,
            planned: false,
            reverse: false,
            resync: true,
            handing_back: None,
            copied: false,
            attempt,
        });
        self.write_catalogue(catalogue)?;
        Ok(attempt)
    }

    /// Whether `attempt` is the unplanned failover under way (not cancelled, not committed):
    /// a copy made for it may go on.
    pub fn failover_attempt_stands(&self, attempt: u64) -> bool {
        self.failover()
            .is_some_and(|failover| !failover.committed && failover.attempt == attempt)
    }

    /// The unplanned failover's disks are made: durable (each was flushed when closed; their
    /// names are flushed now) and recorded complete, so that they may be committed.
    pub fn failover_copied(&mut self, attempt: u64) -> Result<()> {
        if !self.failover_attempt_stands(attempt) {
            return Err(
                self.refusal("the failover this copy was made for was cancelled or is done".into())
            );
        }
        self.storage.sync_directory(&self.failover_directory())?;
        self.storage.sync_directory(&self.directory)?;
        let mut catalogue = self.catalogue()?.clone();
        if let Some(failover) = &mut catalogue.failover {
            failover.copied = true;
        }
        self.write_catalogue(catalogue)
    }

    /// Refuses a failover step while a commit that failed is still recorded.
    pub(super) fn refuse_pending_commit(&self) -> Result<()> {
        match self.catalogue()?.committing {
            Some((delta, _)) => Err(self.refusal(format!(
                "{delta} failed to commit and is not finished: settle it first (`settle_commit`)"
            ))),
            None => Ok(()),
        }
    }

    /// Drops a failover that was not committed: its disks go, replication may resume.
    pub(crate) fn cancel_failover(&mut self) -> Result<()> {
        match self.failover() {
            None => return Err(self.refusal("has not failed over".into())),
            Some(failover) if failover.committed => {
                return Err(
                    self.refusal("the failover is committed; it cannot be cancelled".into())
                );
            }
            Some(_) => {}
        }
        let _ = self.storage.remove_dir_all(&self.failover_directory());
        let mut catalogue = self.catalogue()?.clone();
        catalogue.failover = None;
        self.write_catalogue(catalogue)
    }

    /// Makes the failover disks the VM's disks for good: they replace the replica disks, and
    /// the recovery points (histories of the replica the VM left) are dropped.
    pub fn commit_failover(&mut self) -> Result<Vec<PathBuf>> {
        let Some(failover) = self.failover() else {
            return Err(self.refusal("has not failed over".into()));
        };
        if failover.committed {
            return Err(self.refusal("the failover is already committed".into()));
        }
        if !failover.copied
            && !crate::planted::is_planted(crate::planted::Bug::CommitUnfinishedCopy)
        {
            return Err(self.refusal(
                "the failover's disks are still being made, or their copy was interrupted: wait for it, or cancel (`blockrep failover VM --cancel`) and fail over again".into(),
            ));
        }
        self.close_disks();
        let catalogue = self.catalogue()?.clone();
        for index in 0..catalogue.disks.len() {
            let from = self.failover_directory().join(format!("disk-{index}.vhdx"));
            let to = self.disk_path(index);
            if from.exists() {
                self.storage.rename(&from, &to).map_err(|error| {
                    Error::file(&to.display().to_string(), "commit the failover disk", error)
                })?;
            }
        }
        self.storage.sync_directory(&self.directory)?;
        let _ = self.storage.remove_dir(&self.failover_directory());
        self.run_here(
            catalogue,
            FailoverRecord {
                committed: true,
                ..failover
            },
        )?;
        Ok(self.disk_paths())
    }

    /// A planned failover handed the VM over at delta `sequence` (the disks compared equal):
    /// it runs here now. The recovery points go (the VM writes the disks from now on), so the
    /// operator's consent is required when there are any (`check_take_over`); it is used up.
    pub fn take_over(&mut self, sequence: u64, reverse: bool) -> Result<()> {
        self.check_take_over(sequence)?;
        let mut catalogue = self.catalogue()?.clone();
        catalogue.handover = false;
        self.run_here(
            catalogue,
            FailoverRecord {
                point: sequence,
                committed: true,
                planned: true,
                reverse,
                resync: false,
                handing_back: None,
                copied: false,
                attempt: 0,
            },
        )
    }

    /// Records that the VM runs here (`failover`, committed): its recovery points go, since
    /// the VM writes the disks from now on.
    pub(super) fn run_here(
        &mut self,
        mut catalogue: Catalogue,
        failover: FailoverRecord,
    ) -> Result<()> {
        self.refuse_pending_commit()?;
        let dropped: Vec<String> = catalogue
            .points
            .drain(..)
            .flat_map(|point| point.undo)
            .collect();
        catalogue.failover = Some(failover);
        // The VM writes the disks from now on.
        catalogue.stamps.clear();
        self.write_catalogue(catalogue)?;
        self.delete_undo(dropped);
        Ok(())
    }

    /// Asks (or stops asking) for replication back to the old primary once it connects.
    pub(crate) fn set_reverse(&mut self, reverse: bool) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        match &mut catalogue.failover {
            Some(failover) if failover.active() => failover.reverse = reverse,
            Some(_) => {
                return Err(self.refusal(
                    "the failover is not committed: commit it (`blockrep failover VM --commit`) before reversing".into(),
                ));
            }
            None => return Err(self.refusal("has not failed over to this site".into())),
        }
        self.write_catalogue(catalogue)
    }

    /// Reverse replication compared and shipped what differed: no resync is owed any more.
    pub(crate) fn resynchronized(&mut self) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        if let Some(failover) = &mut catalogue.failover {
            failover.resync = false;
        }
        self.write_catalogue(catalogue)
    }

    /// Records (`Some`) or drops (`None`) a failback under way at final delta `sequence`:
    /// see [`FailoverRecord::handing_back`].
    pub(crate) fn set_handing_back(&mut self, sequence: Option<u64>) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        let Some(failover) = catalogue.failover.as_mut() else {
            return Err(self.refusal("does not run at this site".into()));
        };
        failover.handing_back = sequence;
        self.write_catalogue(catalogue)
    }

    /// The VM was handed back (a planned failover the other way) at delta `sequence`: this is
    /// a replica again, at that delta.
    pub fn hand_back(&mut self, sequence: u64) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        catalogue.failover = None;
        // The VM wrote the disks: their stamps are taken again at the next commit or open.
        catalogue.stamps.clear();
        catalogue.applied = sequence;
        catalogue.applied_at = self.clock.now();
        catalogue.applied_app_consistent = false;
        self.write_catalogue(catalogue)
    }

    /// Creates an empty disk like replica disk `index`, at `path`.
    pub(crate) fn create_copy(&self, index: usize, path: &Path) -> Result<Disk> {
        let description = *self
            .catalogue()?
            .disks
            .get(index)
            .ok_or_else(|| self.refusal(format!("no disk {index}")))?;
        self.create_disk(path, &description)
    }
}
