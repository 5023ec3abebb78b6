//! Resynchronization in the simulation: the primary and the replica run the engine's own
//! comparison exchange (`blockrep::resync::exchange`) over the simulated connection, before the
//! primary's hello, as the daemons do; its messages cross the link with their real sizes.
//! Hashing itself takes no simulated time.

use super::{Way, World};
use blockrep::proto::{ConnectionId, Message};
use blockrep::resync::exchange::{self, Comparison, Step};

impl World {
    /// The connection is up and a comparison is owed: ask the replica for its hashes.
    pub(super) fn start_comparison(&mut self, vm: usize, connection: ConnectionId) {
        let seed = self.random.draw();
        let name = self.vms[vm].spec.name.clone();
        let Some(primary) = &mut self.vms[vm].primary else {
            return;
        };
        let (comparison, request) = Comparison::start(&name, seed, primary.vm.descriptions().len());
        primary.comparing = Some((seed, comparison));
        self.send(connection, request, Way::ToReplica { ordered: true });
    }

    /// A message for a primary that is comparing; false when it is not comparing.
    pub(super) fn primary_compares(
        &mut self,
        vm: usize,
        connection: ConnectionId,
        message: Message,
    ) -> bool {
        let Some(primary) = &mut self.vms[vm].primary else {
            return false;
        };
        let Some((seed, comparison)) = &mut primary.comparing else {
            return false;
        };
        let welcomed = matches!(message, Message::Welcome { applied, .. } if applied > 0);
        let mut outcome = comparison.received(message);
        if welcomed && outcome.is_ok() {
            // Our own hashes, while the replica computes its own.
            outcome = primary
                .vm
                .block_hashes(*seed)
                .and_then(|ours| comparison.hashed(ours));
        }
        match outcome {
            Ok(step) => self.comparison_step(vm, connection, step),
            Err(error) => self.comparison_failed(vm, connection, &error.to_string()),
        }
        true
    }

    fn comparison_step(&mut self, vm: usize, connection: ConnectionId, step: Step) {
        let instant = self.agenda.instant();
        match step {
            Step::Wait => {}
            Step::Send(message) => self.send(connection, message, Way::ToReplica { ordered: true }),
            Step::NoCopy => {
                // Nothing to compare: the replica starts from an initial replication.
                if let Some(primary) = &mut self.vms[vm].primary {
                    primary.comparing = None;
                    primary.machine.nothing_to_compare();
                    primary.machine.connected(instant);
                }
                self.drive_primary(vm);
            }
            Step::Done(differing) => {
                let runtime = &mut self.vms[vm];
                let Some(primary) = &mut runtime.primary else {
                    return;
                };
                primary.comparing = None;
                for (disk, ranges) in differing.iter().enumerate() {
                    runtime.report.resync_differing_bytes += ranges
                        .iter()
                        .map(|range| range.end - range.start)
                        .sum::<u64>();
                    if let Err(error) = primary.vm.mark_changed(disk, ranges) {
                        let reason = error.to_string();
                        self.comparison_failed(vm, connection, &reason);
                        return;
                    }
                }
                primary.machine.resynchronized();
                primary.machine.connected(instant);
                self.drive_primary(vm);
            }
        }
    }

    /// The comparison broke: the connection ends and the next one compares again.
    fn comparison_failed(&mut self, vm: usize, connection: ConnectionId, reason: &str) {
        let instant = self.agenda.instant();
        if let Some(primary) = &mut self.vms[vm].primary {
            primary.comparing = None;
            primary.connection = None;
            primary.machine.connect_failed(instant, reason, false);
        }
        self.close(connection, reason, false);
        self.drive_primary(vm);
    }

    /// A comparison message for the replica on `host`; false when it is not one.
    pub(super) fn replica_compares(
        &mut self,
        host: usize,
        vm: usize,
        connection: ConnectionId,
        message: &Message,
    ) -> bool {
        let answers = match message {
            Message::HashRequest { seed, .. } => {
                let seed = *seed;
                let owner = self.hosts[self.vms[vm].spec.host].name.clone();
                let Ok(slot) = self.slot(host, vm) else {
                    return true;
                };
                let applied = match slot.replica_site().comparison(&owner) {
                    Ok(applied) => applied,
                    Err(reason) => {
                        self.send(
                            connection,
                            Message::Refused {
                                code: blockrep::proto::RefusalCode::HashesRefused,
                                reason,
                            },
                            Way::ToPrimary,
                        );
                        return true;
                    }
                };
                let mut answers = vec![Message::Welcome {
                    version: blockrep::proto::PROTOCOL_VERSION,
                    applied,
                    staged: None,
                }];
                if applied > 0 {
                    slot.machine.compared(connection);
                    match slot.replica.block_hashes(seed) {
                        Ok(hashes) => {
                            answers.extend(exchange::group_digests(&hashes));
                            slot.hashes = Some(hashes);
                        }
                        Err(error) => {
                            answers = vec![Message::Refused {
                                code: blockrep::proto::RefusalCode::HashesRefused,
                                reason: error.to_string(),
                            }];
                        }
                    }
                }
                answers
            }
            Message::HashRanges { ranges } => {
                let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
                    return true;
                };
                let hashes = slot.hashes.take().unwrap_or_default();
                match exchange::block_hashes(&hashes, ranges) {
                    Ok(pieces) => pieces.collect(),
                    Err(error) => vec![Message::Refused {
                        code: blockrep::proto::RefusalCode::HashesRefused,
                        reason: error.to_string(),
                    }],
                }
            }
            _ => return false,
        };
        for answer in answers {
            self.send(connection, answer, Way::ToPrimary);
        }
        true
    }
}
