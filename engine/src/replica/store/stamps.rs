//! Each replica disk's content stamp, recorded with every commit: a disk written or replaced
//! outside blockrep is found at open and before each apply, and must be compared.

use super::*;

impl VmReplica {
    /// Why the replica's disks may differ from what it applied (changed outside blockrep, not
    /// yet compared with the primary), if they may.
    pub fn compare_required(&self) -> Option<&str> {
        self.catalogue
            .as_ref()
            .and_then(|catalogue| catalogue.compare_required.as_deref())
    }

    /// Why a replica disk differs from how this store left it, if one does: another program
    /// wrote it, or a copy was put in its place. Compared before anything writes the disks.
    /// A disk an interrupted initial replication replaces whole, the disks a VM that runs here
    /// writes, and disks applied through onward tracking (their journal watches them) are not
    /// compared.
    pub(super) fn changed_outside(&mut self) -> Result<Option<String>> {
        let Some(catalogue) = &self.catalogue else {
            return Ok(None);
        };
        let initial_interrupted = matches!(catalogue.committing, Some((_, DeltaKind::Initial)));
        if catalogue.stamps.is_empty()
            || initial_interrupted
            || catalogue
                .failover
                .as_ref()
                .is_some_and(FailoverRecord::active)
        {
            return Ok(None);
        }
        // After a crash in the middle of an apply, a raw disk's times moved with its writes.
        let times_moved = catalogue.committing.is_some();
        let recorded = catalogue.stamps.clone();
        self.open_disks()?;
        for (index, (disk, recorded)) in self.disks.iter().zip(&recorded).enumerate() {
            if let Some(change) = recorded.changed_since(&disk.content_stamp()?, times_moved) {
                let path = self.disk_path(index);
                return Ok(Some(format!("replica disk {}: {change}", path.display())));
            }
        }
        Ok(None)
    }

    /// Records each disk's stamp as it is now, and `changed` (why the disks must be compared)
    /// until they are. The stamps are not moved here: onward tracking, when it opens the disks,
    /// checks them against its own journal first.
    pub(super) fn stamp_disks(&mut self, changed: Option<String>) -> Result<()> {
        let Some(catalogue) = &self.catalogue else {
            return Ok(());
        };
        if catalogue.applied == 0
            || catalogue
                .failover
                .as_ref()
                .is_some_and(FailoverRecord::active)
        {
            return Ok(());
        }
        if let Some(reason) = &changed {
            tracing::warn!(vm = %self.vm, %reason, "a replica disk changed outside blockrep: the primary must compare before more is applied");
        }
        self.open_disks()?;
        let stamps = self.current_stamps()?;
        if changed.is_none() && self.catalogue()?.stamps == stamps {
            return Ok(());
        }
        let mut catalogue = self.catalogue()?.clone();
        catalogue.stamps = stamps;
        let mut dropped = Vec::new();
        if changed.is_some() {
            catalogue.compare_required = changed;
            dropped = untrusted_points(&mut catalogue, &self.vm);
        }
        self.write_catalogue(catalogue)?;
        self.delete_undo(dropped);
        Ok(())
    }

    /// The open disks' stamps, in order.
    pub(super) fn current_stamps(&self) -> Result<Vec<ContentStamp>> {
        self.disks.iter().map(|disk| disk.content_stamp()).collect()
    }

    /// Refuses to apply over a disk changed outside blockrep since the last commit (checked
    /// before each apply, while the disks stay open): the change is recorded, so that the
    /// primary compares before anything more is applied.
    pub(super) fn refuse_changed_disks(&mut self) -> Result<()> {
        let recorded = self.catalogue()?.stamps.clone();
        if recorded.is_empty() {
            return Ok(());
        }
        self.open_disks()?;
        let mut change = None;
        for (index, (disk, recorded)) in self.disks.iter().zip(&recorded).enumerate() {
            if let Some(found) = recorded.changed_since(&disk.content_stamp()?, false) {
                change = Some(format!(
                    "replica disk {}: {found}",
                    self.disk_path(index).display()
                ));
                break;
            }
        }
        let Some(change) = change else {
            return Ok(());
        };
        let mut catalogue = self.catalogue()?.clone();
        catalogue.compare_required = Some(change.clone());
        let dropped = untrusted_points(&mut catalogue, &self.vm);
        self.write_catalogue(catalogue)?;
        self.delete_undo(dropped);
        Err(self.refusal(format!("{change}: resynchronization required")))
    }

    /// Another writer takes the disks (onward tracking about to open them, which stamps them
    /// anew; the VM running here): the stamps recorded no longer describe them, and are taken
    /// again once this store writes them again (at its next commit or open).
    pub(crate) fn forget_stamps(&mut self) -> Result<()> {
        match &self.catalogue {
            Some(catalogue) if !catalogue.stamps.is_empty() => {
                let mut catalogue = catalogue.clone();
                catalogue.stamps.clear();
                self.write_catalogue(catalogue)
            }
            _ => Ok(()),
        }
    }
}
