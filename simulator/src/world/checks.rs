//! The checks: every acknowledged cut against what the guest wrote, the recovery point
//! objective when the link has room, and the violations they find.

use super::*;

impl World {
    pub(super) fn violation(&mut self, vm: Option<usize>, what: String) {
        let now = self.agenda.now();
        let name = vm.map(|vm| self.vms[vm].spec.name.clone());
        self.checker
            .violation(Violation::new(now, self.seed, name.as_deref(), what));
    }

    /// The primary heard that `delta` is applied: the replica must now hold the disks as they
    /// were at its cut.
    pub(super) fn acknowledged(&mut self, vm: usize, delta: DeltaId, kind: DeltaKind) {
        let now = self.agenda.now();
        let runtime = &mut self.vms[vm];
        let Some(cut) = runtime.cuts.remove(&delta.sequence) else {
            return;
        };
        runtime.recovery_point = Some(cut.at);
        runtime.last_applied = now;
        runtime.caught_up = kind == DeltaKind::Changes;
        runtime.report.deltas_applied += 1;
        runtime.report.disk_bytes_shipped += cut.bytes;
        runtime.acknowledged = Some((
            delta.sequence,
            (kind == DeltaKind::Changes).then(|| cut.versions.clone()),
        ));
        if kind == DeltaKind::Initial {
            runtime.report.initial_replications += 1;
            // Read live, an initial replication is made consistent by the delta after it.
            runtime.verified = None;
            return;
        }
        let host = runtime.spec.replica_host;
        let name = runtime.spec.name.clone();
        let previous = runtime.verified.take();
        let cursor = runtime.sample_cursor;
        let disks_of_host = self.hosts[host].disks.clone();
        if disks_of_host.struck() {
            return; // The host is going down: its disks are checked after it restarts.
        }
        let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
            return;
        };
        let problem = disks_of_host.observing(|| {
        let mut problem = None;
        let mut damaged = false;
        let models = &self.vms[vm].models;
        let flipped = &self.vms[vm].flipped;
        'disks: for (disk, model) in models.iter().enumerate() {
            let pages = &model.pages();
            let versions = &cut.versions[disk];
            // What changed since the last check, and a rotating window of the rest.
            let mut pages_to_check: Vec<u64> = match &previous {
                Some(before) => (0..*pages)
                    .filter(|page| before[disk][*page as usize] != versions[*page as usize])
                    .collect(),
                None => (0..*pages).collect(),
            };
            let window = SAMPLED_PAGES.min(*pages);
            pages_to_check.extend((0..window).map(|step| (cursor + step) % pages));
            pages_to_check.sort_unstable();
            pages_to_check.dedup();
            // Read in runs of neighbouring pages, a MiB at most.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for page in pages_to_check {
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == page && *count < 256 => *count += 1,
                    _ => runs.push((page, 1)),
                }
            }
            let mut buffer = Vec::new();
            for (first, count) in runs {
                buffer.resize((count * PAGE) as usize, 0);
                if let Err(error) = slot.replica.read_disk(disk, &mut buffer, first * PAGE) {
                    problem = Some(format!("cannot read the replica's disk {disk}: {error}"));
                    break 'disks;
                }
                // Pages a bit flip damaged on purpose are expected to differ until a
                // resynchronization repairs them; anything else is the engine's doing.
                let mut from = first;
                while let Some(page) = first_difference(
                    &models[disk],
                    versions,
                    from,
                    &buffer[((from - first) * PAGE) as usize..],
                ) {
                    if !flipped.contains(&(disk, page)) {
                        problem = Some(format!(
                            "after {delta} was acknowledged, the replica's disk {disk} differs from the primary's at its cut, at byte {} (page {page})",
                            page * PAGE
                        ));
                        break 'disks;
                    }
                    damaged = true;
                    from = page + 1;
                }
            }
        }
        (problem, damaged)
        });
        let (problem, damaged) = problem;
        let runtime = &mut self.vms[vm];
        runtime.sample_cursor = cursor + SAMPLED_PAGES;
        if damaged {
            runtime.report.damage_seen += 1;
        } else if previous.is_none() && problem.is_none() {
            // A full check found every page right: whatever was flipped has been repaired.
            runtime.flipped.clear();
        }
        match problem {
            Some(what) => {
                self.checker
                    .violation(Violation::new(now, self.seed, Some(&name), what));
                runtime.verified = None;
            }
            None => {
                runtime.report.checked_cuts += 1;
                // Damage seen is looked for in full again next time, until repaired.
                runtime.verified = (!damaged).then_some(cut.versions);
            }
        }
    }

    pub(super) fn sample(&mut self) {
        let now = self.agenda.now();
        let instant = self.agenda.instant();
        for vm in 0..self.vms.len() {
            let link = self.link_for(vm);
            let replica_host = self.vms[vm].spec.replica_host;
            // Each outage in force runs unbroken from its start to now, so their union does
            // from the earliest start: exact, where sampling every 10 s would bridge a moment
            // of reach between two outages.
            let host_down =
                (!self.hosts[replica_host].up).then_some(self.hosts[replica_host].down_since);
            let link_down = self.links[link].severed_since(now);
            let quiet = now >= self.disturbed_until(vm, link) && self.link_has_room(link, now);
            let runtime = &mut self.vms[vm];
            runtime.unreachable_since = host_down.into_iter().chain(link_down).min();
            let rpo = runtime.recovery_point.map(|point| now - point);
            if let Some(rpo) = rpo {
                runtime.rpo_samples.push(rpo.as_secs_f64());
                if now.as_secs().is_multiple_of(60) {
                    runtime
                        .report
                        .rpo_series
                        .push((now.as_secs_f64(), rpo.as_secs_f64()));
                }
            }
            let Some(primary) = runtime.primary.as_ref().filter(|_| runtime.replicating) else {
                continue;
            };
            let status = primary.machine.status(instant);
            if now.as_secs().is_multiple_of(60) {
                runtime
                    .report
                    .pending_series
                    .push((now.as_secs_f64(), status.pending_bytes));
            }
            runtime.report.missed_cycles = status.missed_cycles;
            runtime.report.successful_cycles = status.successful_cycles;
            if runtime.last_health != Some(status.health) {
                runtime.last_health = Some(status.health);
                runtime.report.health.push(HealthChange {
                    seconds: now.as_secs_f64(),
                    health: status.health.to_string(),
                });
            }
            let observation = Observation {
                vm: &runtime.spec.name,
                health: status.health,
                last_applied: runtime.last_applied,
                unreachable_since: runtime
                    .unreachable_since
                    .map(|since| since.max(runtime.replication_started)),
                rpo: rpo.filter(|_| runtime.caught_up),
                frequency: runtime.spec.policy.frequency,
                quiet,
            };
            self.checker.observe(now, self.seed, &observation);
        }
    }

    /// Until when faults on the VM's hosts or link excuse it from its recovery point objective.
    pub(super) fn disturbed_until(&self, vm: usize, link: usize) -> SimTime {
        let spec = &self.vms[vm].spec;
        self.hosts[spec.host]
            .disturbed_until
            .max(self.hosts[spec.replica_host].disturbed_until)
            .max(
                self.link_disturbed_until
                    .get(&link)
                    .copied()
                    .unwrap_or_default(),
            )
    }

    /// The link carried less than half what it could over the last five whole minutes.
    pub(super) fn link_has_room(&self, link: usize, now: SimTime) -> bool {
        let minute = (now.as_secs() / 60) as usize;
        let capacity = self.links[link].spec.bandwidth * 60.0;
        self.links[link].carried.iter().all(|per_minute| {
            (minute.saturating_sub(5)..minute)
                .all(|m| (per_minute.get(m).copied().unwrap_or(0) as f64) < capacity / 2.0)
        })
    }
}
