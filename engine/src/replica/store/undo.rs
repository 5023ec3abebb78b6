//! The recovery points kept as undo files: listing, pinning while a copy reads them, the undo
//! chain to a point, compaction and deletion.

use super::*;

/// Headers for undo deltas that lead back to state `sequence`.
pub(super) fn undo_headers(descriptions: &[DiskDescription], sequence: u64) -> Vec<DeltaHeader> {
    descriptions
        .iter()
        .map(|disk| DeltaHeader {
            disk_id: disk.disk_id,
            virtual_size: disk.virtual_size,
            block_size: 64 << 10,
            source_generation: sequence,
            sequence,
            recovery_point: true,
            full: false,
        })
        .collect()
}

pub(super) fn undo_name(sequence: u64) -> String {
    format!("undo-{sequence}.bundle")
}

/// A disk changed outside blockrep: every recovery point would be rebuilt from its undo over
/// the foreign bytes, which no undo holds the old contents of, so none is what it says it is.
/// They are dropped (their undo files named for deletion), loudly.
pub(super) fn untrusted_points(catalogue: &mut Catalogue, vm: &str) -> Vec<String> {
    if !catalogue.points.is_empty() {
        tracing::warn!(%vm, points = catalogue.points.len(), "recovery points dropped: a replica disk changed outside blockrep, and they would rebuild that change");
    }
    catalogue
        .points
        .drain(..)
        .flat_map(|point| point.undo)
        .collect()
}

impl VmReplica {
    /// The latest state and the kept recovery points, newest first.
    pub fn points(&self) -> Vec<PointInfo> {
        let Some(catalogue) = &self.catalogue else {
            return Vec::new();
        };
        let mut points = vec![PointInfo {
            id: catalogue.applied,
            time: catalogue.applied_at,
            latest: true,
            app_consistent: catalogue.applied_app_consistent,
            bytes_kept: 0,
        }];
        for point in catalogue.points.iter().rev() {
            let bytes_kept = point
                .undo
                .iter()
                .filter_map(|name| std::fs::metadata(self.directory.join(name)).ok())
                .map(|metadata| metadata.len())
                .sum();
            points.push(PointInfo {
                id: point.sequence,
                time: point.time,
                latest: false,
                app_consistent: point.app_consistent,
                bytes_kept,
            });
        }
        points
    }

    /// Holds every undo file and point until `unpin`, for a reader of them (a test failover);
    /// returns the latest sequence now.
    pub fn pin(&mut self) -> u64 {
        self.pinned += 1;
        self.applied()
    }

    /// Ends a `pin`; with none left, what was held for the readers is deleted.
    pub fn unpin(&mut self) {
        self.pinned = self.pinned.saturating_sub(1);
        if self.pinned > 0 {
            return;
        }
        let referenced: std::collections::HashSet<String> = self
            .catalogue
            .iter()
            .flat_map(|catalogue| catalogue.points.iter().flat_map(|point| point.undo.clone()))
            .collect();
        let mut unneeded = std::mem::take(&mut self.pending_deletions);
        unneeded.extend(
            std::mem::take(&mut self.recent_undo)
                .into_iter()
                .map(|(_, name)| name)
                .filter(|name| !referenced.contains(name)),
        );
        self.delete_undo(unneeded);
    }

    /// The undo files that take the current latest state back to `target`, in the order to
    /// apply them. `pinned_at` is the latest state when the caller pinned: reaching it needs
    /// only the deltas applied since, which the pin kept.
    pub fn undo_path_to(&self, target: u64, pinned_at: u64) -> Result<Vec<PathBuf>> {
        let names = if target == self.applied() {
            Vec::new()
        } else if target == pinned_at {
            let mut recent: Vec<&(u64, String)> = self
                .recent_undo
                .iter()
                .filter(|(sequence, _)| *sequence > target)
                .collect();
            recent.sort_by_key(|(sequence, _)| std::cmp::Reverse(*sequence));
            recent.into_iter().map(|(_, name)| name.clone()).collect()
        } else {
            undo_chain(&self.catalogue()?.points, target)
                .ok_or_else(|| self.refusal(format!("no recovery point {target} is kept")))?
        };
        Ok(names
            .into_iter()
            .map(|name| self.directory.join(name))
            .collect())
    }

    /// Deletes undo files no point names: written for a delta whose commit a crash prevented.
    pub(super) fn remove_orphan_undo(&self) {
        let Some(catalogue) = &self.catalogue else {
            return;
        };
        let referenced: std::collections::HashSet<&String> = catalogue
            .points
            .iter()
            .flat_map(|point| &point.undo)
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.directory) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("undo-") && name.ends_with(".bundle") && !referenced.contains(&name)
            {
                let _ = self.storage.remove_file(&entry.path());
            }
        }
    }

    /// Merges the undo files of every point but the newest into one file each: a point then
    /// costs the union of what its deltas overwrote, not their sum (a block rewritten every
    /// cycle of the hour is kept once). The newest point's list still grows, so it waits.
    pub(super) fn compact_points(&mut self) -> Result<()> {
        if self.pinned > 0 {
            return Ok(());
        }
        let points = self.catalogue()?.points.clone();
        for (index, point) in points
            .iter()
            .enumerate()
            .take(points.len().saturating_sub(1))
        {
            if point.undo.len() > 1 {
                self.compact_point(index, point)?;
            }
        }
        Ok(())
    }

    /// Replays `point`'s undo files, newest first, into sparse scratch files (so the oldest
    /// contents win), then writes the union of their extents as one file.
    pub(super) fn compact_point(&mut self, index: usize, point: &RecoveryPoint) -> Result<()> {
        let descriptions = self.catalogue()?.disks.clone();
        let mut scratch_paths = Vec::with_capacity(descriptions.len());
        let mut images = Vec::with_capacity(descriptions.len());
        let mut union: Vec<Vec<std::ops::Range<u64>>> = vec![Vec::new(); descriptions.len()];
        for (disk, description) in descriptions.iter().enumerate() {
            let path = self.directory.join(format!("compact-{disk}.scratch"));
            let name = path.display().to_string();
            let scratch = crate::io::FileStorage::create(&path)
                .and_then(|scratch| scratch.set_len(description.virtual_size).map(|()| scratch))
                .map_err(|error| Error::file(&name, "create scratch", error))?;
            let storage: Box<dyn Storage> = Box::new(scratch);
            images.push(RawImage::open(storage, &name, Access::ReadWrite)?);
            scratch_paths.push(path);
        }
        let outcome = (|| -> Result<String> {
            for name in &point.undo {
                let path = self.directory.join(name);
                apply_bundle(&path, &mut images, || {})?;
                for (disk, extents) in bundle_extents(&path, descriptions.len())?
                    .into_iter()
                    .enumerate()
                {
                    union[disk].extend(extents);
                }
            }
            let union: Vec<Vec<std::ops::Range<u64>>> = union
                .into_iter()
                .map(crate::replica::bundle::merge_ranges)
                .collect();
            let merged = format!("undo-point-{}-{}.bundle", point.sequence, point.undo.len());
            let mut writer = BundleWriter::create(&self.directory.join(&merged), &self.storage)?;
            write_contents(
                &mut writer,
                &images,
                &union,
                &undo_headers(&descriptions, point.sequence),
            )?;
            writer.flush()?;
            self.storage.sync_directory(&self.directory)?;
            Ok(merged)
        })();
        drop(images);
        for path in &scratch_paths {
            let _ = self.storage.remove_file(path);
        }
        let merged = outcome?;
        let mut catalogue = self.catalogue()?.clone();
        let old = std::mem::replace(&mut catalogue.points[index].undo, vec![merged]);
        self.write_catalogue(catalogue)?;
        self.delete_undo(old);
        Ok(())
    }

    /// Deletes undo files, or holds them while a test failover may read them.
    pub(super) fn delete_undo(&mut self, names: Vec<String>) {
        if self.pinned > 0 {
            self.pending_deletions.extend(names);
            return;
        }
        for name in names {
            let _ = self.storage.remove_file(&self.directory.join(name));
        }
    }
}
