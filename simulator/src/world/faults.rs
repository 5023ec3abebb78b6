//! The scenario's events and faults: partitions, crashes, full disks, bit flips, failovers,
//! verifications and resynchronizations.

use super::*;

impl World {
    pub(super) fn note_fault(&mut self, what: String) {
        let now = self.agenda.now();
        self.faults.push((now, what));
    }

    /// The tracking journals of the VMs that run on `host` (down) are gone, as when the host
    /// is restored from a copy that lacks them: each must be compared with its replica.
    fn lose_journals(&mut self, host: usize) {
        let mut lost = 0;
        for vm in self.vms.iter().filter(|vm| vm.spec.host == host) {
            for path in &vm.paths {
                if std::fs::remove_file(blockrep::protect::journal_path(path)).is_ok() {
                    lost += 1;
                }
            }
        }
        self.note_fault(format!(
            "host {}: {lost} tracking journals lost",
            self.hosts[host].name
        ));
    }

    pub(super) fn fault(&mut self, action: Action) {
        match action {
            Action::Partition { sites, length } => {
                let now = self.agenda.now();
                let Some(&link) = self
                    .link_of
                    .get(&(sites.0.min(sites.1), sites.0.max(sites.1)))
                else {
                    return;
                };
                self.note_fault(format!(
                    "link {} - {} down for {}s",
                    self.scenario.sites[sites.0].name,
                    self.scenario.sites[sites.1].name,
                    length.as_secs_f64()
                ));
                let until = now + length + Duration::from_secs(600);
                let excused = self.link_disturbed_until.entry(link).or_default();
                *excused = (*excused).max(until);
                if self.links[link].cut(now, length) {
                    // Both ends time out after the idle timeout.
                    let across: Vec<ConnectionId> = self
                        .connections
                        .iter()
                        .filter(|(_, state)| state.link == link && state.open())
                        .map(|(id, _)| *id)
                        .collect();
                    for connection in across {
                        if let Some(state) = self.connections.get_mut(&connection) {
                            state.closed_at = Some(now);
                        }
                        for replica_side in [true, false] {
                            self.agenda.add_after(
                                IDLE_TIMEOUT,
                                Event::PeerLost {
                                    connection,
                                    replica_side,
                                },
                            );
                        }
                    }
                }
            }
            Action::CrashHost {
                host,
                down_for,
                during_io,
                journals_lost,
                again_on_restart,
                at_handover,
            } => {
                self.hosts[host].crash_on_restart |= again_on_restart;
                if let Some(point) = at_handover {
                    self.hosts[host].down_for = down_for;
                    self.hosts[host].crash_at_handover = Some(point);
                    self.note_fault(format!(
                        "host {} will lose power in its next planned failover ({point:?})",
                        self.hosts[host].name
                    ));
                } else if journals_lost {
                    self.hosts[host].down_for = down_for;
                    self.crash_host(host, "lost power");
                    self.lose_journals(host);
                } else if during_io {
                    // Strikes within the host's next storage calls, mid-operation.
                    let calls = 1 + self.random.below(40);
                    self.hosts[host].disks.arm_crash(calls);
                    self.note_fault(format!(
                        "host {} will lose power within {calls} storage calls",
                        self.hosts[host].name
                    ));
                    self.hosts[host].down_for = down_for;
                    let incarnation = self.hosts[host].incarnation;
                    self.agenda.add_after(
                        Duration::from_secs(60),
                        Event::ForceCrash { host, incarnation },
                    );
                } else {
                    self.hosts[host].down_for = down_for;
                    self.crash_host(host, "lost power");
                }
            }
            Action::SiteOutage { site, length } => {
                self.note_fault(format!(
                    "site {} loses power for {}s",
                    self.scenario.sites[site].name,
                    length.as_secs_f64()
                ));
                for host in 0..self.hosts.len() {
                    if self.hosts[host].site != site {
                        continue;
                    }
                    self.hosts[host].down_for = length;
                    if self.hosts[host].up {
                        self.crash_host(host, "lost power with its site");
                    } else {
                        // Down already: it comes back with its site, not before.
                        self.hosts[host].restart_generation += 1;
                        let generation = self.hosts[host].restart_generation;
                        self.agenda
                            .add_after(length, Event::HostRestart { host, generation });
                    }
                }
            }
            Action::UnplannedFailover { plan, groups } => {
                self.unplanned_failover(plan.as_deref(), &groups);
            }
            Action::Reverse { vms } => self.reverse(&vms),
            Action::BitFlip { host } => self.flip_a_bit(host),
            Action::Verify { vms } => {
                for vm in vms {
                    self.verify(vm);
                }
            }
            Action::Resync { vms } => {
                let instant = self.agenda.instant();
                for vm in vms {
                    if let Some(connection) = self.current_connection(vm) {
                        self.close(connection, "resynchronizing", false);
                    }
                    if let Some(primary) = &mut self.vms[vm].primary {
                        primary.machine.owe_comparison();
                        primary.connection = None;
                        primary
                            .machine
                            .connection_lost(instant, "resynchronization asked for");
                    }
                    self.vms[vm].report.resyncs += 1;
                    self.vms[vm].verified = None;
                    self.drive_primary(vm);
                }
            }
            Action::PlannedFailover { vms, reverse } => {
                for vm in vms {
                    self.planned_failover(vm, reverse);
                }
            }
            Action::DiskFull {
                host,
                length,
                during_io,
            } => {
                if during_io {
                    self.note_fault(format!(
                        "host {}: disk fills during its next commit, for {}s",
                        self.hosts[host].name,
                        length.as_secs_f64()
                    ));
                    self.hosts[host].fill_at_commit = true;
                } else {
                    self.note_fault(format!(
                        "host {}: disk full for {}s",
                        self.hosts[host].name,
                        length.as_secs_f64()
                    ));
                    self.hosts[host].disks.set_full(true);
                }
                let now = self.agenda.now();
                let until = now + length + Duration::from_secs(600);
                self.hosts[host].disturbed_until = self.hosts[host].disturbed_until.max(until);
                self.hosts[host].full_periods += 1;
                self.agenda
                    .add_after(length, Event::DiskSpace { host, full: false });
            }
        }
    }
}
