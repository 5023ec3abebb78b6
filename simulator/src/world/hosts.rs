//! The simulated hosts: starting and crashing them, and starting, stopping and running the
//! VMs on them.

use super::*;

impl World {
    pub(super) fn storage_options(&self, host: usize) -> StorageOptions {
        StorageOptions {
            engine: blockrep::io::IoEngine::Sync,
            direct: false,
            layer: Some(self.hosts[host].disks.layer()),
        }
    }

    /// A host comes back after a power cut; when asked, it loses power again within its first
    /// storage steps.
    pub(super) fn restart_host(&mut self, host: usize) {
        self.note_fault(format!("host {} restarts", self.hosts[host].name));
        if std::mem::take(&mut self.hosts[host].crash_on_restart) {
            let calls = 1 + self.random.below(12);
            self.hosts[host].disks.arm_crash(calls);
            self.note_fault(format!(
                "host {} will lose power within {calls} storage calls of its restart",
                self.hosts[host].name
            ));
        }
        let started = self.start_host(host);
        self.hosts[host].up_since = self.agenda.now();
        if self.hosts[host].disks.struck() {
            self.crash_host(host, "lost power during its restart");
            return;
        }
        // It started before a crash armed for its restart struck.
        self.hosts[host].disks.disarm();
        if let Err(error) = started {
            let now = self.agenda.now();
            self.checker.violation(Violation::new(
                now,
                self.seed,
                None,
                format!("host {} cannot restart: {error}", self.hosts[host].name),
            ));
        }
    }

    /// Starts (or restarts) a host: its replica store, and the primaries of the VMs it runs.
    pub(super) fn start_host(&mut self, host: usize) -> Result<(), blockrep::Error> {
        let options = self.storage_options(host);
        let clock = Arc::clone(&self.clock);
        let recovery_points = self
            .vms
            .iter()
            .filter(|vm| vm.spec.replica_host == host)
            .map(|vm| vm.spec.policy.recovery_points)
            .max()
            .unwrap_or(0);
        let store = ReplicaStore::with_policy(
            &self.hosts[host].directory.join("replicas"),
            options.clone(),
            PointPolicy {
                keep: recovery_points,
                interval: Duration::from_secs(3600),
            },
        )?
        .with_clock(WallClock::new(move || {
            EPOCH_SECONDS + clock.load(Ordering::Relaxed) as f64 / 1e9
        }));
        let runtime = &mut self.hosts[host];
        runtime.store = Some(store);
        runtime.up = true;
        for vm in 0..self.vms.len() {
            if self.vms[vm]
                .interrupted
                .is_some_and(|interrupted| interrupted.host == host)
            {
                self.settle_after_restart(vm, host);
            } else if self.vms[vm].spec.host == host {
                self.start_or_ask(vm);
            }
        }
        Ok(())
    }

    /// Starts a VM on its host; when its disks refuse (full), says so and tries again later,
    /// as a service manager restarting the agent would.
    pub(super) fn start_vm_or_retry(&mut self, vm: usize, options: &StorageOptions) {
        if let Err(error) = self.run_vm(vm, options, false) {
            let name = self.vms[vm].spec.name.clone();
            self.note_fault(format!(
                "VM {name} cannot start ({error}); trying again in 30 s"
            ));
            let host = self.vms[vm].spec.host;
            let incarnation = self.hosts[host].incarnation;
            self.agenda
                .add_after(Duration::from_secs(30), Event::RetryVm { vm, incarnation });
        }
    }

    /// Starts the VM on its host over its disks (`fresh`: they have just become its own, so
    /// tracking starts afresh), replicating if it is protected.
    pub(super) fn run_vm(
        &mut self,
        vm: usize,
        options: &StorageOptions,
        fresh: bool,
    ) -> Result<(), blockrep::Error> {
        if self.vms[vm].taking_over.is_some() {
            let host = self.hosts[self.vms[vm].spec.host].name.clone();
            self.violation(
                Some(vm),
                format!("the VM runs at both sites: {host} starts it while the other site has taken it over in a planned failover"),
            );
        }
        let runtime = &mut self.vms[vm];
        if fresh {
            blockrep::protect::forget_tracking(&runtime.paths)?;
        }
        let compression = if runtime.spec.policy.compression {
            Compression::Lz4
        } else {
            Compression::Off
        };
        let protected = ProtectedVm::open(&runtime.paths, options, compression)?;
        // After a crash: what the guest had put on its disks without a flush since was kept,
        // lost or torn; the record follows what the disks hold.
        for (model, disk) in runtime.models.iter_mut().zip(protected.disks()) {
            let mut bytes = vec![0u8; PAGE as usize];
            for (page, durable) in model.take_unflushed() {
                disk.read_at(&mut bytes, page * PAGE)?;
                model.found_on_disk(page, &bytes, durable);
            }
        }
        let mut machine = self.new_primary(vm, &protected, protected.tracking().clone());
        if !self.vms[vm].replicating {
            machine.stop();
        }
        self.vms[vm].last_applied = self.agenda.now();
        self.vms[vm].replication_started = self.agenda.now();
        self.sides += 1;
        let side = self.sides;
        let runtime = &mut self.vms[vm];
        runtime.primary = Some(PrimarySide {
            vm: protected,
            machine,
            encoder: DeltaEncoder::new(),
            connection: None,
            incarnation: self.hosts[runtime.spec.host].incarnation,
            side,
            comparing: None,
        });
        // Cuts newer than the last acknowledged one stay: the replica may hold one of them.
        runtime.next_wake = None;
        let interrupted = std::mem::take(&mut runtime.writes_stopped);
        runtime.handover_reverse = false;
        if interrupted {
            self.planned_failed(vm, "interrupted: the VM's host restarted".into());
        }
        self.drive_primary(vm);
        Ok(())
    }

    pub(super) fn new_primary(
        &mut self,
        vm: usize,
        protected: &ProtectedVm,
        tracking: Tracking,
    ) -> Primary {
        let runtime = &self.vms[vm];
        let config = PrimaryConfig {
            vm: runtime.spec.name.clone(),
            primary: self.hosts[runtime.spec.host].name.clone(),
            disks: protected.descriptions().to_vec(),
            frequency: runtime.spec.policy.frequency,
            window: 32,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            tracking,
            seed: self.random.draw(),
            app_consistent_every: None,
        };
        let mut primary = Primary::new(config, self.agenda.instant());
        primary.remember_acknowledged(protected.acknowledged_delta());
        primary
    }

    /// Starts replicating a VM that runs at its replica's old site back to it (the replica
    /// holds a copy: no initial replication), comparing by hash first when `resync`.
    pub(super) fn start_reverse_replication(&mut self, vm: usize, resync: bool) {
        let Some(primary) = self.vms[vm].primary.take() else {
            return;
        };
        let mut machine = self.new_primary(vm, &primary.vm, Tracking::Vouches);
        if resync {
            machine.owe_comparison();
        }
        self.sides += 1;
        let side = self.sides;
        self.vms[vm].replicating = true;
        // Health counts from the start of this replication.
        self.vms[vm].last_applied = self.agenda.now();
        self.vms[vm].replication_started = self.agenda.now();
        let runtime = &mut self.vms[vm];
        runtime.primary = Some(PrimarySide {
            machine,
            connection: None,
            side,
            comparing: None,
            ..primary
        });
        runtime.cuts.clear();
        runtime.next_wake = None;
        self.drive_primary(vm);
    }

    /// Turns the VM off where it runs: its connection ends, its disks close, and what its
    /// guest had not yet written is gone.
    pub(super) fn stop_vm(&mut self, vm: usize) {
        if let Some(connection) = self.current_connection(vm) {
            self.close(connection, "the VM was turned off", false);
        }
        let runtime = &mut self.vms[vm];
        runtime.next_wake = None;
        for model in &mut runtime.models {
            model.forget_unwritten();
        }
        if let Some(primary) = runtime.primary.take() {
            let host = runtime.spec.host;
            if let Err(error) = primary.vm.close() {
                self.lost_host_io(host, &error.to_string());
            }
        }
    }

    /// An engine call on `host` failed. When the host lost power under it, crash it now.
    pub(super) fn lost_host_io(&mut self, host: usize, _reason: &str) {
        if self.hosts[host].disks.struck() {
            self.crash_host(host, "lost power during an operation");
        }
    }

    /// The cluster restarts its VMs that ran on `host` (going down) on another node that is up,
    /// at the other site of a stretched cluster if need be.
    pub(super) fn cluster_failover(&mut self, host: usize) {
        let now = self.agenda.now();
        for index in 0..self.scenario.clustered.len() {
            if self.clustered_on[index] != Some(host) {
                continue;
            }
            let vm = &self.scenario.clustered[index];
            let node = (0..self.hosts.len()).find(|&other| {
                other != host
                    && self.hosts[other].up
                    && self.scenario.hosts[other].cluster.as_deref() == Some(vm.cluster.as_str())
            });
            self.clustered_on[index] = node;
            let mut report =
                crate::report::FailoverReport::failed(now, &vm.name, None, String::new());
            report.kind = "cluster".into();
            report.from = self.hosts[host].name.clone();
            match node {
                Some(node) => {
                    report.to = self.hosts[node].name.clone();
                    report.problem = None;
                }
                None => report.problem = Some(format!("no node of cluster {} is up", vm.cluster)),
            }
            self.failovers.push(report);
        }
    }

    pub(super) fn crash_host(&mut self, host: usize, how: &str) {
        if !self.hosts[host].up {
            return;
        }
        self.note_fault(format!("host {} {how}", self.hosts[host].name));
        self.cluster_failover(host);
        let runtime = &mut self.hosts[host];
        runtime.disks.crash();
        runtime.up = false;
        // One that went down again as it restarted was never reachable in between.
        if runtime.up_since < self.agenda.now() {
            runtime.down_since = self.agenda.now();
        }
        runtime.incarnation += 1;
        runtime.crashes += 1;
        runtime.store = None;
        runtime.slots.clear();
        for vm in 0..self.vms.len() {
            if self.vms[vm].spec.replica_host == host
                && self.vms[vm]
                    .taking_over
                    .as_ref()
                    .is_some_and(|side| side.incarnation != self.hosts[host].incarnation)
            {
                // It took the VM over and died: it starts it again once back.
                self.vms[vm].taking_over = None;
            }
            if self.vms[vm].spec.host == host {
                if self.vms[vm].writes_stopped {
                    // A handover under way: settled when the host is back, from what it
                    // recorded (`settle_after_restart`).
                    self.vms[vm].interrupted = Some(Interrupted {
                        host,
                        reverse: self.vms[vm].handover_reverse,
                    });
                }
                if self.vms[vm].taking_over.is_some() {
                    // The other site took the VM over and runs it from now on; this host
                    // learns so when it is back.
                    let sequence = self.vms[vm].handover_sequence;
                    self.vms[vm].primary = None;
                    self.handed_over(vm, sequence, false);
                    continue;
                }
                let runtime = &mut self.vms[vm];
                runtime.primary = None;
                runtime.next_wake = None;
                for model in &mut runtime.models {
                    model.forget_unwritten();
                }
            }
        }
        // Its peers hear nothing more: they time out.
        let touching: Vec<(ConnectionId, bool)> = self
            .connections
            .iter()
            .filter(|(_, state)| state.open())
            .filter_map(|(id, state)| {
                let spec = &self.vms[state.vm].spec;
                if spec.replica_host == host {
                    Some((*id, false))
                } else if spec.host == host {
                    Some((*id, true))
                } else {
                    None
                }
            })
            .collect();
        let now = self.agenda.now();
        for (connection, replica_side) in touching {
            if let Some(state) = self.connections.get_mut(&connection) {
                state.closed_at = Some(now);
            }
            self.agenda.add_after(
                IDLE_TIMEOUT,
                Event::PeerLost {
                    connection,
                    replica_side,
                },
            );
        }
        let down_for = self.hosts[host].down_for;
        let now = self.agenda.now();
        self.hosts[host].restart_generation += 1;
        let generation = self.hosts[host].restart_generation;
        // Back up, its VMs may need a new initial replication or a resynchronization.
        let until = now + down_for + Duration::from_secs(1800);
        self.hosts[host].disturbed_until = self.hosts[host].disturbed_until.max(until);
        self.agenda
            .add_after(down_for, Event::HostRestart { host, generation });
    }
}
