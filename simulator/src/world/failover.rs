//! Failover in the simulated deployment, as Site Recovery runs it: an unplanned failover (alone
//! or through a recovery plan's groups) fences the replica, makes its latest recovery point
//! into disks with the engine's own copy, commits them and starts the VM at the replica site
//! on its mapped networks; reverse replication makes the old site's disks the replica again
//! at the delta the engine tells the returning host (`ReplicaSite::reverse`,
//! `answer_old_primary`), compared by hash first after an unplanned failover. Each step is
//! checked: the failed-over disks must hold exactly a
//! state the primary shipped, no older than the last cut it heard was applied.

use super::{Action, Duration, Event, World};
use crate::content::{PAGE, Versions, first_difference};
use crate::report::FailoverReport;
use blockrep::image::{Access, ImageFormat, open_path};
use blockrep::proto::HandoverRefusal;
use blockrep::replica::copy_point;
use std::path::PathBuf;

/// What a failover point should hold.
enum Expected {
    Known(Vec<Versions>),
    /// An initial replication: no single instant.
    Initial,
    /// Not a point the primary shipped.
    Unknown,
}

impl World {
    /// Fails `groups` of VMs over in order; `plan` names the recovery plan, if any.
    pub(super) fn unplanned_failover(&mut self, plan: Option<&str>, groups: &[Vec<usize>]) {
        for (index, group) in groups.iter().enumerate() {
            for &vm in group {
                let outcome = self.fail_over(vm);
                let now = self.agenda.now();
                let name = self.vms[vm].spec.name.clone();
                match outcome {
                    Ok(mut report) => {
                        report.plan = plan.map(|plan| format!("{plan}, group {}", index + 1));
                        self.failovers.push(report);
                    }
                    Err(reason) => {
                        self.retry_after_power_cut(vm);
                        self.failovers.push(FailoverReport::failed(
                            now,
                            &name,
                            plan.map(str::to_owned),
                            reason,
                        ))
                    }
                }
            }
        }
    }

    /// When the replica host lost power during `vm`'s failover (and the failover did not go
    /// through, only the VM's start failing), the host goes down and the operator tries again
    /// once it is back.
    fn retry_after_power_cut(&mut self, vm: usize) {
        let target = self.vms[vm].spec.replica_host;
        if !self.hosts[target].disks.struck() || !self.vms[vm].replicating {
            return;
        }
        self.crash_host(target, "lost power during a failover");
        let retry = self.hosts[target].down_for + Duration::from_secs(30);
        self.agenda.add_after(
            retry,
            Event::Scheduled(Action::UnplannedFailover {
                plan: None,
                groups: vec![vec![vm]],
            }),
        );
    }

    /// One VM's unplanned failover to its replica host, committed.
    fn fail_over(&mut self, vm: usize) -> Result<FailoverReport, String> {
        let now = self.agenda.now();
        let (old_host, target) = (self.vms[vm].spec.host, self.vms[vm].spec.replica_host);
        if !self.vms[vm].replicating {
            return Err("not replicated (failed over already, not reversed)".into());
        }
        if !self.hosts[target].up {
            return Err(format!("replica host {} is down", self.hosts[target].name));
        }
        // Refused before the VM is touched: there must be a point to fail over to.
        if self.slot(target, vm)?.replica.applied() == 0 {
            return Err("initial replication has not completed".into());
        }
        // What the guest had written, on disk or not, before its VM went off for good.
        let written: Vec<Versions> = self.vms[vm]
            .models
            .iter()
            .map(|model| model.versions().clone())
            .collect();
        self.stop_vm(vm);
        let runtime = &mut self.vms[vm];
        runtime.writes_stopped = false;
        runtime.handover_reverse = false;
        runtime.taking_over = None;
        // The operator failed the VM over: no handover is left to settle.
        runtime.interrupted = None;
        let rpo = runtime
            .recovery_point
            .map(|point| (now - point).as_secs_f64());
        let storage = self.storage_options(target);
        let slot = self.slot(target, vm)?;
        let step = |error: blockrep::Error| error.to_string();
        // An attempt a power cut interrupted is the operator's to finish, as the status tells
        // them: commit it (refused unless its copy completed), else cancel it and fail over
        // again (`blockrep failover VM --commit`, then `--cancel`).
        let interrupted = slot
            .replica
            .failover()
            .is_some_and(|record| !record.committed && !record.planned);
        let mut site = slot.replica_site();
        let finished = if interrupted {
            match site.commit_failover() {
                Ok(finished) => Some(finished),
                Err(_) => {
                    site.cancel_failover().map_err(step)?;
                    None
                }
            }
        } else {
            None
        };
        let (paths, point) = match finished {
            Some(finished) => finished,
            None => {
                // The VM was stopped above, as Site Recovery shuts a reachable primary down
                // before it fails over; the replica may not have heard its primary leave yet,
                // and is not waited for (as with `--force`).
                let copy = site.begin_unplanned_failover(None, true).map_err(step)?;
                let made = copy_point(
                    &mut |piece| site.copy_piece(&copy, piece),
                    copy.pinned_at,
                    copy.target,
                    copy.disks,
                    &copy.out,
                );
                site.end_copy(copy, made).map_err(step)?;
                site.commit_failover().map_err(step)?
            }
        };
        // The disks are the VM's now: the store lets go of them before the VM opens them.
        slot.replica.release_disks();
        self.drive_replica(target, vm);
        let expected = self.expected_at(vm, point);
        let mut report = FailoverReport {
            seconds: now.as_secs_f64(),
            vm: self.vms[vm].spec.name.clone(),
            kind: "unplanned".into(),
            from: self.hosts[old_host].name.clone(),
            to: self.hosts[target].name.clone(),
            point: Some(point),
            lost_bytes: 0,
            rpo_seconds: rpo,
            networks: self.networks_on(vm, target),
            plan: None,
            checked: false,
            problem: None,
        };
        match expected {
            Expected::Known(versions) => {
                if let Some(problem) = self.differs(vm, &paths, &versions, false) {
                    report.problem = Some(problem.clone());
                    self.violation(
                        Some(vm),
                        format!("unplanned failover to point {point}: {problem}"),
                    );
                }
                report.checked = true;
                report.lost_bytes = lost_bytes(&written, &versions);
                // The guest starts again from the point, bit flips and all: the damage is the
                // VM's now.
                for (model, versions) in self.vms[vm].models.iter_mut().zip(&versions) {
                    model.reset_to(versions);
                }
                self.adopt_flipped(vm, &paths);
            }
            Expected::Initial => {
                // An initial replication is read live: its content is no single instant of
                // the guest's, so it cannot be checked; the guest restarts from what it holds.
                report.problem = Some("the point is an initial replication: not checked".into());
                let versions = self.read_versions(vm, &paths);
                for (model, versions) in self.vms[vm].models.iter_mut().zip(&versions) {
                    model.reset_to(versions);
                }
            }
            Expected::Unknown => {
                self.violation(
                    Some(vm),
                    format!(
                        "unplanned failover to point {point}: the primary never shipped that point or one that new"
                    ),
                );
            }
        }
        // The VM runs at the replica site, unprotected until replication is reversed.
        let runtime = &mut self.vms[vm];
        runtime.spec.host = target;
        runtime.spec.replica_host = old_host;
        runtime.paths = paths.clone();
        runtime.replicating = false;
        runtime.failed_over_at = Some(point);
        runtime.homes.insert(target, paths.clone());
        runtime.recovery_point = None;
        runtime.caught_up = false;
        runtime.verified = None;
        runtime.acknowledged = None;
        runtime.cuts.clear();
        self.run_vm(vm, &storage, true)
            .map_err(|error| error.to_string())?;
        Ok(report)
    }

    /// Reverse replication for VMs that failed over: each old host keeps its own disks as the
    /// replica, and the new primary compares by hash before shipping.
    pub(super) fn reverse(&mut self, vms: &[usize]) {
        for &vm in vms {
            if let Err(reason) = self.reverse_one(vm) {
                let now = self.agenda.now();
                let name = self.vms[vm].spec.name.clone();
                let mut report = FailoverReport::failed(now, &name, None, reason);
                report.kind = "reverse".into();
                self.failovers.push(report);
            }
        }
    }

    /// `blockrep reverse` where the VM runs; the old host, asking who runs the VM, hears what
    /// the engine answers it (`ReplicaSite::answer_old_primary`) and becomes the replica at
    /// the delta it is told.
    fn reverse_one(&mut self, vm: usize) -> Result<(), String> {
        let (host, old_host) = (self.vms[vm].spec.host, self.vms[vm].spec.replica_host);
        if self.vms[vm].replicating {
            return Err("replicating already".into());
        }
        if !self.hosts[old_host].up || !self.hosts[host].up {
            return Err("a host is down".into());
        }
        let resync = self
            .slot(host, vm)?
            .replica_site()
            .reverse()
            .map_err(|error| error.to_string())?;
        let applied = match self.ask_other_site(vm, old_host) {
            blockrep::protect::AfterHandover::BecomeReplica { applied } => applied,
            other => {
                return Err(format!(
                    "the old host was not told to become the replica: {other:?}"
                ));
            }
        };
        self.become_replica(old_host, vm, applied)?;
        self.replicate_back(vm, applied, resync);
        Ok(())
    }

    /// The VM's old host is its replica now, at delta `applied`: replication goes back to it
    /// (comparing by hash first when `resync`), and the report says so.
    pub(super) fn replicate_back(&mut self, vm: usize, applied: u64, resync: bool) {
        let now = self.agenda.now();
        let (host, old_host) = (self.vms[vm].spec.host, self.vms[vm].spec.replica_host);
        self.vms[vm].report.reversals += 1;
        self.failovers.push(FailoverReport {
            seconds: now.as_secs_f64(),
            vm: self.vms[vm].spec.name.clone(),
            kind: "reverse".into(),
            from: self.hosts[host].name.clone(),
            to: self.hosts[old_host].name.clone(),
            point: Some(applied),
            lost_bytes: 0,
            rpo_seconds: None,
            networks: Vec::new(),
            plan: None,
            checked: resync,
            problem: None,
        });
        self.start_reverse_replication(vm, resync);
    }

    /// Makes `host` the replica of `vm` (which runs elsewhere now) at delta `applied`: a site
    /// the VM ran at after a failover hands it back; a site whose own disks the VM ran on
    /// adopts them.
    pub(super) fn become_replica(
        &mut self,
        host: usize,
        vm: usize,
        applied: u64,
    ) -> Result<(), String> {
        let name = self.vms[vm].spec.name.clone();
        let owner = self.hosts[self.vms[vm].spec.host].name.clone();
        let descriptions = self.vms[vm]
            .primary
            .as_ref()
            .ok_or("the VM is not running")?
            .vm
            .descriptions()
            .to_vec();
        let own_disks = self.vms[vm].home_paths(host);
        let holds = self.hosts[host]
            .store
            .as_ref()
            .and_then(|store| store.vms().ok())
            .is_some_and(|names| names.contains(&name));
        let slot = self.slot(host, vm)?;
        if holds
            && !slot.replica.is_adopted()
            && slot.replica.failover().is_none()
            && slot.replica.applied() >= applied
            && slot.replica.record().owner.as_deref() == Some(owner.as_str())
        {
            // Its replica already: a failback was settled here.
            return Ok(());
        }
        if slot
            .replica
            .failover()
            .is_some_and(|failover| failover.active())
        {
            slot.replica
                .hand_back(applied)
                .map_err(|error| error.to_string())?;
            slot.machine = blockrep::proto::Replica::new(&name, slot.replica.record());
            return Ok(());
        }
        let paths = own_disks.ok_or("no disks of the VM at that site")?;
        let store = self.hosts[host].store.as_ref().ok_or("the host is down")?;
        let replica = store
            .adopt(&name, &owner, descriptions, paths, applied)
            .map_err(|error| error.to_string())?;
        let machine = blockrep::proto::Replica::new(&name, replica.record());
        self.hosts[host].slots.insert(
            vm,
            super::Slot {
                machine,
                replica,
                staged_bytes: 0,
                hashes: None,
            },
        );
        Ok(())
    }

    /// Starts a planned failover where `vm` runs: its guest's writes stop (after reaching the
    /// disks), and the primary ships the last changes and asks the other site to take over.
    pub(super) fn planned_failover(&mut self, vm: usize, reverse: bool) {
        if !self.vms[vm].replicating || self.vms[vm].primary.is_none() {
            self.planned_failed(vm, "not replicating".into());
            return;
        }
        // A scenario's planned failover stands for the operators of both sites: the replica
        // site's consents to losing its recovery points (`blockrep allow-handover`), its
        // replica opened for that if it was not (after a restart, say).
        let replica_host = self.vms[vm].spec.replica_host;
        if self.hosts[replica_host].up {
            let consent = self.slot(replica_host, vm).and_then(|slot| {
                // A site the VM runs at is handing it back, and has no consent to give.
                match slot.replica.failover() {
                    Some(_) => Ok(()),
                    None => slot
                        .replica
                        .allow_handover()
                        .map_err(|error| error.to_string()),
                }
            });
            if let Err(error) = consent {
                self.planned_failed(vm, error);
                return;
            }
        }
        self.write_guest(vm);
        let instant = self.agenda.instant();
        let runtime = &mut self.vms[vm];
        runtime.writes_stopped = true;
        runtime.handover_reverse = reverse;
        let Some(primary) = &mut runtime.primary else {
            return;
        };
        if let Err(reason) = primary.machine.hand_over(instant, reverse) {
            runtime.writes_stopped = false;
            self.planned_failed(vm, reason);
            return;
        }
        self.drive_primary(vm);
    }

    pub(super) fn planned_failed(&mut self, vm: usize, reason: String) {
        let now = self.agenda.now();
        let name = self.vms[vm].spec.name.clone();
        let mut report = FailoverReport::failed(now, &name, None, reason);
        report.kind = "planned".into();
        self.failovers.push(report);
    }

    /// The replica site checks the primary's digests against its own disks and, when they
    /// match, takes the VM over and runs it; the primary is told only once it runs.
    pub(super) fn verify_handover(
        &mut self,
        host: usize,
        vm: usize,
        sequence: u64,
        seed: u64,
        digests: &[u128],
        reverse: bool,
    ) -> Result<(), HandoverRefusal> {
        let storage = self.storage_options(host);
        let compression = if self.vms[vm].spec.policy.compression {
            blockrep::delta::Compression::Lz4
        } else {
            blockrep::delta::Compression::Off
        };
        let slot = self.hosts[host]
            .slots
            .get_mut(&vm)
            .ok_or_else(|| HandoverRefusal::refused("no replica here"))?;
        slot.replica_site()
            .verify_handover(sequence, seed, digests, reverse)?;
        let paths = slot.replica.disk_paths();
        let opened = blockrep::protect::forget_tracking(&paths)
            .and_then(|()| blockrep::protect::ProtectedVm::open(&paths, &storage, compression));
        let protected = match opened {
            Ok(protected) => protected,
            Err(error) => {
                return Err(slot.replica_site().not_hosted(sequence, &error.to_string()));
            }
        };
        // A planned failover loses nothing: the disks hold all the guest wrote.
        let written: Vec<Versions> = self.vms[vm]
            .models
            .iter()
            .map(|model| model.versions().clone())
            .collect();
        if let Some(problem) = self.differs(vm, &paths, &written, true) {
            self.violation(
                Some(vm),
                format!("planned failover at delta {sequence}: {problem}"),
            );
        }
        let mut machine = self.new_primary(vm, &protected, blockrep::proto::Tracking::Vouches);
        machine.stop();
        self.sides += 1;
        let side = self.sides;
        let runtime = &mut self.vms[vm];
        runtime.homes.insert(host, paths);
        runtime.handover_sequence = sequence;
        runtime.taking_over = Some(super::PrimarySide {
            vm: protected,
            machine,
            encoder: blockrep::delta::DeltaEncoder::new(),
            connection: None,
            incarnation: self.hosts[host].incarnation,
            side,
            comparing: None,
        });
        self.after_taken_over(vm);
        Ok(())
    }

    /// The old primary heard the other site runs the VM now (or died before it heard): the
    /// roles swap, and replication goes back the other way when the failover asked for it.
    /// `reverse`: the old host becomes the VM's replica now (it asked for it, or was told
    /// so when it asked who runs the VM).
    pub(super) fn handed_over(&mut self, vm: usize, sequence: u64, reverse: bool) {
        let now = self.agenda.now();
        let incoming = self.vms[vm].taking_over.take();
        let (old_host, new_host) = (self.vms[vm].spec.host, self.vms[vm].spec.replica_host);
        if let Some(connection) = self.current_connection(vm) {
            self.close(connection, "handed over", false);
        }
        if let Some(old) = self.vms[vm].primary.take()
            && let Err(error) = old.vm.close()
        {
            self.lost_host_io(old_host, &error.to_string());
        }
        let runtime = &mut self.vms[vm];
        runtime.spec.host = new_host;
        runtime.spec.replica_host = old_host;
        runtime.paths = runtime.home_paths(new_host).unwrap_or_default();
        let reopen = incoming.is_none();
        runtime.primary = incoming;
        runtime.writes_stopped = false;
        runtime.replicating = false;
        runtime.failed_over_at = Some(sequence);
        runtime.recovery_point = None;
        runtime.caught_up = false;
        runtime.verified = None;
        // The disks hold what the guest wrote (checked when the other site took over): the
        // point a failover back before any new delta lands on.
        let written = runtime
            .models
            .iter()
            .map(|model| model.versions().clone())
            .collect();
        runtime.acknowledged = Some((sequence, Some(written)));
        runtime.cuts.clear();
        runtime.next_wake = None;
        let name = runtime.spec.name.clone();
        // It runs there again: a handover that host recorded is over.
        let storage = self.storage_options(new_host);
        let paths = self.vms[vm].paths.clone();
        if let Some(first) = paths.first()
            && self.hosts[new_host].up
            && let Err(error) = blockrep::protect::HandoverMark::for_disk(first).remove(&storage)
        {
            self.lost_host_io(new_host, &error.to_string());
        }
        if self.hosts[new_host].up {
            self.forget_adopted_replica(new_host, vm);
        }
        if reopen {
            // The replica site restarted after it took over: the VM starts there again.
            let storage = self.storage_options(new_host);
            if self.hosts[new_host].up
                && let Err(error) = self.run_vm(vm, &storage, true)
            {
                self.violation(
                    Some(vm),
                    format!("cannot run after a planned failover: {error}"),
                );
            }
        }
        let mut report = FailoverReport {
            seconds: now.as_secs_f64(),
            vm: name,
            kind: "planned".into(),
            from: self.hosts[old_host].name.clone(),
            to: self.hosts[new_host].name.clone(),
            point: Some(sequence),
            lost_bytes: 0,
            rpo_seconds: Some(0.0),
            networks: self.networks_on(vm, new_host),
            plan: None,
            checked: true,
            problem: None,
        };
        if reverse {
            match self.become_replica(old_host, vm, sequence) {
                Ok(()) => {
                    self.vms[vm].report.reversals += 1;
                    self.start_reverse_replication(vm, false);
                }
                Err(reason) => report.problem = Some(format!("cannot replicate back: {reason}")),
            }
        }
        self.failovers.push(report);
    }

    /// `host` runs `vm` on its own disks, which it kept as the VM's replica (adopted) while the
    /// VM ran at the other site: its store lets go of them, as a first host's agent does when
    /// it runs the VM again. A replica whose disks are the store's is kept when the VM failed
    /// over onto them; any other would be a VM run on a replica that never took it over.
    pub(super) fn forget_adopted_replica(&mut self, host: usize, vm: usize) {
        let name = self.vms[vm].spec.name.clone();
        let Some(store) = self.hosts[host].store.clone() else {
            return;
        };
        if !store.vms().is_ok_and(|names| names.contains(&name)) {
            return;
        }
        let (adopted, taken_over) = match self.slot(host, vm) {
            Ok(slot) => (
                slot.replica.is_adopted(),
                slot.replica
                    .failover()
                    .is_some_and(|failover| failover.active()),
            ),
            Err(reason) => return self.lost_host_io(host, &reason),
        };
        if !adopted {
            if !taken_over {
                self.violation(
                    Some(vm),
                    format!(
                        "{} runs the VM on a replica that never took it over",
                        self.hosts[host].name
                    ),
                );
            }
            return;
        }
        self.hosts[host].slots.remove(&vm);
        if let Err(error) = store.forget_adopted(&name) {
            self.lost_host_io(host, &error.to_string());
        }
    }

    /// What the replica's disks hold at `point`, from the simulator's record of the cuts:
    /// the last cut the primary heard was applied, or the one after it (applied, but the
    /// primary went before it heard). Anything else is a point the primary never shipped.
    fn expected_at(&self, vm: usize, point: u64) -> Expected {
        let runtime = &self.vms[vm];
        let last = runtime.acknowledged.as_ref();
        match last {
            Some((sequence, Some(versions))) if *sequence == point => {
                Expected::Known(versions.clone())
            }
            Some((sequence, None)) if *sequence == point => Expected::Initial,
            Some((sequence, _)) if point > *sequence => match runtime.cuts.get(&point) {
                Some(cut) if cut.kind == blockrep::proto::DeltaKind::Changes => {
                    Expected::Known(cut.versions.clone())
                }
                Some(_) => Expected::Initial,
                None => Expected::Unknown,
            },
            _ => Expected::Unknown,
        }
    }

    /// The versions disks at `paths` hold, page by page, as far as the guest's record tells
    /// them apart (a page matching no version the guest wrote counts as never written).
    fn read_versions(&self, vm: usize, paths: &[PathBuf]) -> Vec<Versions> {
        let models = &self.vms[vm].models;
        let mut all = Vec::new();
        for (disk, path) in paths.iter().enumerate() {
            let model = &models[disk];
            let mut versions = vec![0u32; model.pages() as usize];
            let format = ImageFormat::from_extension(path).unwrap_or(ImageFormat::Vhdx);
            if let Ok(image) = open_path(path, format, Access::ReadOnly) {
                let mut page = vec![0u8; PAGE as usize];
                let mut candidate = vec![0u8; PAGE as usize];
                for (number, version) in versions.iter_mut().enumerate() {
                    if image.read_at(&mut page, number as u64 * PAGE).is_err() {
                        continue;
                    }
                    // Newest first: the live copy holds the version written last or earlier.
                    let newest = model.versions()[number];
                    *version = (1..=newest)
                        .rev()
                        .find(|candidate_version| {
                            model.expected(number as u64, *candidate_version, &mut candidate);
                            candidate == page
                        })
                        .unwrap_or(0);
                }
            }
            all.push(versions);
        }
        all
    }

    /// The pages a bit flip damaged become what the disks at `paths` hold.
    fn adopt_flipped(&mut self, vm: usize, paths: &[PathBuf]) {
        let flipped = std::mem::take(&mut self.vms[vm].flipped);
        let mut bytes = vec![0u8; PAGE as usize];
        for (disk, page) in flipped {
            let Some(path) = paths.get(disk) else {
                continue;
            };
            let format = ImageFormat::from_extension(path).unwrap_or(ImageFormat::Vhdx);
            if let Ok(image) = open_path(path, format, Access::ReadOnly)
                && image.read_at(&mut bytes, page * PAGE).is_ok()
            {
                let model = &mut self.vms[vm].models[disk];
                let version = model.versions()[page as usize];
                model.found_on_disk(page, &bytes, version);
            }
        }
    }

    /// Where disks at `paths` differ from `versions`, if they do. Pages a bit flip damaged are
    /// expected to differ in a point's copy, unless `strict`: a planned failover's disks
    /// compared equal with the primary's, so nothing may differ there.
    fn differs(
        &self,
        vm: usize,
        paths: &[PathBuf],
        versions: &[Versions],
        strict: bool,
    ) -> Option<String> {
        let models = &self.vms[vm].models;
        let no_flips = std::collections::BTreeSet::new();
        let flipped = if strict {
            &no_flips
        } else {
            &self.vms[vm].flipped
        };
        for (disk, (path, expected)) in paths.iter().zip(versions).enumerate() {
            let format = ImageFormat::from_extension(path).unwrap_or(ImageFormat::Vhdx);
            let image = match open_path(path, format, Access::ReadOnly) {
                Ok(image) => image,
                Err(error) => return Some(format!("cannot open failed-over disk {disk}: {error}")),
            };
            let mut buffer = vec![0u8; 256 * PAGE as usize];
            let pages = models[disk].pages();
            let mut first = 0;
            while first < pages {
                let count = 256.min(pages - first);
                let bytes = &mut buffer[..(count * PAGE) as usize];
                if let Err(error) = image.read_at(bytes, first * PAGE) {
                    return Some(format!("cannot read failed-over disk {disk}: {error}"));
                }
                let mut from = first;
                while let Some(page) = first_difference(
                    &models[disk],
                    expected,
                    from,
                    &bytes[((from - first) * PAGE) as usize..],
                ) {
                    if !flipped.contains(&(disk, page)) {
                        return Some(format!(
                            "failed-over disk {disk} differs from the recovery point at byte {}",
                            page * PAGE
                        ));
                    }
                    from = page + 1;
                }
                first += count;
            }
        }
        None
    }

    /// The VM's networks on `host`: at its own site the ones it always had; elsewhere each
    /// mapped one, or disconnected, as Site Recovery attaches a failed-over VM.
    fn networks_on(&self, vm: usize, host: usize) -> Vec<String> {
        let networks = self.vms[vm].spec.networks.iter();
        if self.hosts[host].site == self.vms[vm].origin_site {
            return networks
                .map(|network| format!("{network} (its own)"))
                .collect();
        }
        networks
            .map(|network| {
                match self
                    .scenario
                    .mappings
                    .iter()
                    .find(|(source, _)| source == network)
                {
                    Some((_, target)) => format!("{network} -> {target}"),
                    None => format!("{network}: disconnected (no mapping)"),
                }
            })
            .collect()
    }
}

/// Bytes the guest wrote (`written`) that the point does not hold: what the failover lost.
fn lost_bytes(written: &[Versions], point: &[Versions]) -> u64 {
    written
        .iter()
        .zip(point)
        .map(|(written, point)| {
            written
                .iter()
                .zip(point)
                .filter(|(now, then)| now != then)
                .count() as u64
                * PAGE
        })
        .sum()
}
