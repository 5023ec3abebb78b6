//! Staging a delta and making it the replica's state atomically: the commit point, the redo
//! of an interrupted commit, and the undo each commit leaves for the recovery points.

use super::*;

/// What is staged of the next delta.
pub(super) enum Staging {
    /// New disks being filled, renamed into place at commit.
    Initial { delta: DeltaId, disks: Vec<Disk> },
    /// Chunks appended to the stage file, a bundle.
    Changes { delta: DeltaId, file: BundleWriter },
}

impl VmReplica {
    /// Records a new VM: its disks and the primary that owns it.
    pub fn prepare(&mut self, disks: Vec<DiskDescription>, owner: &str) -> Result<()> {
        self.storage
            .create_dir_all(&self.directory)
            .map_err(|error| {
                Error::file(
                    &self.directory.display().to_string(),
                    "create VM directory",
                    error,
                )
            })?;
        // The VM's directory is a name in the store's: durable before anything in it counts.
        if let Some(store) = self.directory.parent() {
            self.storage.sync_directory(store)?;
        }
        for disk in &disks {
            check_disk(disk)?;
        }
        self.write_catalogue(Catalogue {
            version: CATALOGUE_VERSION,
            vm: self.vm.clone(),
            owner: owner.to_owned(),
            disks,
            applied: 0,
            applied_at: self.clock.now(),
            applied_app_consistent: false,
            committing_app_consistent: false,
            committing: None,
            points: Vec::new(),
            test_failover: None,
            failover: None,
            external_disks: None,
            seeded: false,
            reinitialize: false,
            handover: false,
            stamps: Vec::new(),
            compare_required: None,
        })
    }

    /// A copy that had to be compared (seeded by hand, or changed outside blockrep) was
    /// compared by its primary: its disks carry the primary's ids from now on, and it is an
    /// ordinary replica.
    pub fn adopt_seed(&mut self, disks: Vec<DiskDescription>) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        catalogue.disks = disks;
        catalogue.seeded = false;
        catalogue.compare_required = None;
        self.write_catalogue(catalogue)
    }

    /// Starts staging `delta`, dropping anything staged before.
    pub fn start_staging(&mut self, delta: DeltaId, kind: DeltaKind) -> Result<()> {
        self.discard_staging();
        let descriptions = self.catalogue()?.disks.clone();
        if kind == DeltaKind::Initial && self.catalogue()?.external_disks.is_some() {
            return Err(self.refusal(
                "an adopted disk takes changes only, never an initial replication".into(),
            ));
        }
        // The protocol refuses it first; the store, which would drop the points, checks too.
        if kind == DeltaKind::Initial
            && self.catalogue()?.applied > 0
            && !self.catalogue()?.reinitialize
        {
            return Err(self.refusal(
                "an initial replication would replace the replica and its recovery points: the replica host's operator must allow it first (`blockrep reinitialize`)".into(),
            ));
        }
        self.staging = Some(match kind {
            DeltaKind::Initial => {
                let mut disks = Vec::with_capacity(descriptions.len());
                for (index, description) in descriptions.iter().enumerate() {
                    disks.push(self.create_disk(&self.initial_path(index), description)?);
                }
                Staging::Initial { delta, disks }
            }
            DeltaKind::Changes => Staging::Changes {
                delta,
                file: BundleWriter::create(&self.directory.join(STAGE), &self.storage)?,
            },
        });
        Ok(())
    }

    /// Verifies chunk `payload` (a delta) for `disk` and stages it. A chunk that is damaged or
    /// does not fit the disk is refused, and nothing of it is staged.
    pub fn stage_chunk(&mut self, delta: DeltaId, disk: u16, payload: &[u8]) -> Result<()> {
        let description = *self
            .catalogue()?
            .disks
            .get(usize::from(disk))
            .ok_or_else(|| self.refusal(format!("chunk for disk {disk}, which does not exist")))?;
        let name = format!("{}: chunk of {delta} for disk {disk}", self.vm);
        let header = payload
            .get(..HEADER_SIZE)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| "truncated: shorter than a delta header".to_owned())
            .and_then(DeltaHeader::decode)
            .map_err(|problem| Error::Delta {
                name: name.clone(),
                problem,
            })?;
        if header.virtual_size != description.virtual_size
            || (!header.disk_id.is_nil() && header.disk_id != description.disk_id)
            || header.sequence != delta.sequence
        {
            return Err(self.refusal(format!(
                "{name} is for disk {} of {} bytes at sequence {}",
                header.disk_id, header.virtual_size, header.sequence
            )));
        }
        match &mut self.staging {
            Some(Staging::Initial {
                delta: staged,
                disks,
            }) if *staged == delta => {
                // One pass: each extent is written once its own checksum holds. A chunk found
                // damaged part-way is refused and sent again, and its resend overwrites what it
                // wrote; the new disk is not the replica until the commit, which flushes it.
                write_delta(Cursor::new(payload), &name, &mut disks[usize::from(disk)])?;
                Ok(())
            }
            Some(Staging::Changes {
                delta: staged,
                file,
            }) if *staged == delta => {
                verify_delta(Cursor::new(payload), &name)?;
                file.append(disk, payload)
            }
            _ => Err(self.refusal(format!("{delta} is not being staged"))),
        }
    }

    /// Makes the staged `delta` the replica's state on every disk, atomically.
    pub fn commit(&mut self, delta: DeltaId, kind: DeltaKind, app_consistent: bool) -> Result<()> {
        let staging = self.staging.take();
        match (staging, kind) {
            (
                Some(Staging::Initial {
                    delta: staged,
                    disks,
                }),
                DeltaKind::Initial,
            ) if staged == delta => {
                for disk in disks {
                    disk.close()?;
                }
                self.close_disks();
                if self.tracked.take().is_some() {
                    self.detached = true;
                }
                self.mark_committing(Some((delta, kind)), false)?;
                crash_point("replica-initial-commit");
                self.finish_initial(delta)
            }
            (
                Some(Staging::Changes {
                    delta: staged,
                    file,
                    ..
                }),
                DeltaKind::Changes,
            ) if staged == delta => {
                file.flush()?;
                drop(file);
                self.refuse_changed_disks()?;
                if self.policy.keep > 0 || self.pinned > 0 {
                    // What the delta overwrites, kept before the commit point: a redo after a
                    // crash must not take half-applied blocks for the old ones.
                    self.write_undo(delta)?;
                }
                self.mark_committing(Some((delta, kind)), app_consistent)?;
                self.finish_changes(delta)
            }
            (other, _) => {
                self.staging = other;
                Err(self.refusal(format!("{delta} is not what is staged")))
            }
        }
    }

    /// Finishes a commit that failed after it was recorded (a full disk, an I/O error left
    /// delta N half applied, "committing N" in the catalogue): a failover must start from a
    /// whole delta, never copy half of one or carry the record into a VM that runs here.
    /// Refused, with why, when it still cannot be finished.
    pub fn settle_commit(&mut self) -> Result<()> {
        let Some((delta, kind)) = self.catalogue()?.committing else {
            return Ok(());
        };
        tracing::info!(vm = %self.vm, %delta, "finishing a commit that failed before a failover");
        self.staging = None;
        let finished = match kind {
            DeltaKind::Initial => self.finish_initial(delta),
            DeltaKind::Changes => self.finish_changes(delta),
        };
        finished.map_err(|error| {
            self.refusal(format!(
                "{delta} failed to commit and still cannot be finished ({error}); free space or mend the disk, then try again"
            ))
        })
    }

    pub(super) fn recover(&mut self) -> Result<()> {
        let Some(catalogue) = &self.catalogue else {
            return Ok(());
        };
        if let Some((delta, _)) = catalogue.committing
            && catalogue
                .failover
                .as_ref()
                .is_some_and(FailoverRecord::active)
        {
            // Carried into a VM that runs here by an older version: redoing it would write an
            // old delta over the running VM's disks.
            tracing::warn!(vm = %self.vm, %delta, "dropping an unfinished commit recorded before the VM ran here");
            let mut catalogue = catalogue.clone();
            catalogue.committing = None;
            self.write_catalogue(catalogue)?;
            self.discard_staging();
            return Ok(());
        }
        let Some(catalogue) = &self.catalogue else {
            return Ok(());
        };
        match catalogue.committing {
            Some((delta, DeltaKind::Initial)) => {
                tracing::info!(vm = %self.vm, %delta, "finishing an initial replication interrupted by a crash");
                self.finish_initial(delta)?;
            }
            Some((delta, DeltaKind::Changes)) => {
                tracing::info!(vm = %self.vm, %delta, "redoing a commit interrupted by a crash");
                // The redo's first write moves the disks' stamps, as the first try's did: the
                // move is recorded first, so that a redo that fails too (the store still full)
                // is not taken for a change made outside blockrep.
                let app_consistent = catalogue.committing_app_consistent;
                self.open_disks()?;
                self.mark_committing(Some((delta, DeltaKind::Changes)), app_consistent)?;
                self.finish_changes(delta)?;
            }
            None => self.discard_staging(),
        }
        self.remove_orphan_undo();
        Ok(())
    }

    /// Renames the new disks into place (those not renamed before a crash), then records
    /// the delta applied.
    pub(super) fn finish_initial(&mut self, delta: DeltaId) -> Result<()> {
        for index in 0..self.catalogue()?.disks.len() {
            let from = self.initial_path(index);
            if from.exists() {
                let to = self.disk_path(index);
                self.storage.rename(&from, &to).map_err(|error| {
                    Error::file(
                        &to.display().to_string(),
                        "rename initial replica into place",
                        error,
                    )
                })?;
            }
        }
        self.storage.sync_directory(&self.directory)?;
        self.mark_applied(delta, DeltaKind::Initial)?;
        self.open_disks()?;
        self.stamp_disks(None)
    }

    /// Applies the stage file to the disks, flushes them, then records the delta applied.
    pub(super) fn finish_changes(&mut self, delta: DeltaId) -> Result<()> {
        self.open_disks()?;
        // As `mark_committing` recorded them.
        for disk in &mut self.disks {
            disk.begin_writes()?;
        }
        let stage = self.directory.join(STAGE);
        {
            let gate = Arc::clone(&self.gate);
            let _applying = gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Part of the delta on the disks, the rest not: the worst moment to die.
            apply_bundle(&stage, &mut self.disks, || crash_point("replica-apply"))?;
            for disk in &mut self.disks {
                disk.flush()?;
            }
        }
        self.mark_applied(delta, DeltaKind::Changes)?;
        let _ = self.storage.remove_file(&stage);
        if let Err(error) = self.compact_points() {
            // The points stay usable uncompacted; only space is lost.
            tracing::warn!(vm = %self.vm, %error, "cannot compact recovery points");
        }
        Ok(())
    }

    /// Writes what the staged delta will overwrite, as `undo-N.bundle`, durably.
    pub(super) fn write_undo(&mut self, delta: DeltaId) -> Result<()> {
        self.open_disks()?;
        let descriptions = self.catalogue()?.disks.clone();
        let extents = bundle_extents(&self.directory.join(STAGE), descriptions.len())?;
        let headers = undo_headers(&descriptions, delta.sequence - 1);
        let mut writer = BundleWriter::create(
            &self.directory.join(undo_name(delta.sequence)),
            &self.storage,
        )?;
        write_contents(&mut writer, &self.disks, &extents, &headers)?;
        writer.flush()?;
        self.storage.sync_directory(&self.directory)
    }

    pub(super) fn mark_committing(
        &mut self,
        committing: Option<(DeltaId, DeltaKind)>,
        app_consistent: bool,
    ) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        catalogue.committing = committing;
        catalogue.committing_app_consistent = app_consistent;
        if committing.is_some_and(|(_, kind)| kind == DeltaKind::Changes) && !self.disks.is_empty()
        {
            // The stamps the apply's first write leaves (it moves them: `finish_changes`),
            // recorded with the commit point, before they move: a redo after a failure or a
            // crash then finds the disks as recorded.
            catalogue.stamps = self
                .disks
                .iter()
                .map(|disk| disk.stamp_after_begin_writes())
                .collect::<Result<_>>()?;
        }
        self.write_catalogue(catalogue)
    }

    /// Records `delta` applied and keeps or drops recovery points by the policy; undo files no
    /// longer needed are deleted once the catalogue no longer names them.
    pub(super) fn mark_applied(&mut self, delta: DeltaId, kind: DeltaKind) -> Result<()> {
        let mut catalogue = self.catalogue()?.clone();
        let mut unneeded = Vec::new();
        match kind {
            DeltaKind::Initial => {
                // The disks were replaced whole: no undo leads back from them.
                unneeded.extend(catalogue.points.drain(..).flat_map(|point| point.undo));
                catalogue.reinitialize = false;
                // New disks, whole: nothing outside blockrep changed them.
                catalogue.compare_required = None;
            }
            DeltaKind::Changes => {
                let undo = undo_name(delta.sequence);
                if self.directory.join(&undo).exists() {
                    if self.pinned > 0 {
                        self.recent_undo.push((delta.sequence, undo.clone()));
                    }
                    if self.policy.keep == 0 {
                        // Only a test failover wanted it: it goes when that ends.
                        if self.pinned == 0 {
                            unneeded.push(undo);
                        }
                    } else {
                        let policy = PointPolicy {
                            // No point expires while a test failover reads them.
                            keep: if self.pinned > 0 {
                                usize::MAX
                            } else {
                                self.policy.keep
                            },
                            ..self.policy
                        };
                        unneeded = record_applied(
                            &mut catalogue.points,
                            policy,
                            delta.sequence,
                            (catalogue.applied_at, catalogue.applied_app_consistent),
                            undo,
                        );
                    }
                } else if !catalogue.points.is_empty() {
                    tracing::warn!(vm = %self.vm, "no undo data for {delta} (recovery points were off): older recovery points dropped");
                    unneeded.extend(catalogue.points.drain(..).flat_map(|point| point.undo));
                }
            }
        }
        catalogue.applied = delta.sequence;
        catalogue.applied_at = self.clock.now();
        catalogue.applied_app_consistent =
            kind == DeltaKind::Changes && catalogue.committing_app_consistent;
        catalogue.committing = None;
        catalogue.committing_app_consistent = false;
        if kind == DeltaKind::Changes && !self.disks.is_empty() {
            // A disk's first write of a session moves its stamp, a raw disk's every write:
            // recorded with the delta.
            catalogue.stamps = self.current_stamps()?;
        }
        self.write_catalogue(catalogue)?;
        self.delete_undo(unneeded);
        Ok(())
    }

    pub(super) fn discard_staging(&mut self) {
        self.staging = None;
        let _ = self.storage.remove_file(&self.directory.join(STAGE));
        for index in 0..self
            .catalogue
            .as_ref()
            .map_or(0, |catalogue| catalogue.disks.len())
        {
            let _ = self.storage.remove_file(&self.initial_path(index));
        }
    }
}
