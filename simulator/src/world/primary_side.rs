//! Each VM's guest and primary: the workload's writes, and carrying out what the engine's
//! `Primary` machine asks.

use super::*;

impl World {
    pub(super) fn primary_of(&mut self, vm: usize, side: u64) -> Option<&mut PrimarySide> {
        self.vms[vm]
            .primary
            .as_mut()
            .filter(|primary| primary.side == side)
    }

    pub(super) fn workload_second(&mut self) {
        for vm in &mut self.vms {
            if vm.primary.is_some() && !vm.writes_stopped {
                let written = vm.workload.second(&mut vm.models[0]);
                vm.report.bytes_written += written;
            }
        }
        if self
            .agenda
            .now()
            .as_secs()
            .is_multiple_of(GUEST_FLUSH_SECONDS)
        {
            for vm in 0..self.vms.len() {
                self.write_guest(vm);
            }
        }
        self.agenda
            .add_after(Duration::from_secs(1), Event::Workload);
    }

    /// Puts what the guest wrote since the last time on its disks, through tracking, and
    /// flushes them (the guest's own flush, before a cut can see the writes).
    pub(super) fn write_guest(&mut self, vm: usize) {
        let runtime = &mut self.vms[vm];
        let Some(primary) = &runtime.primary else {
            return;
        };
        let mut buffer = Vec::new();
        for (index, model) in runtime.models.iter_mut().enumerate() {
            let disk = &primary.vm.disks()[index];
            for (first, count) in model.take_unwritten() {
                buffer.resize((count * PAGE) as usize, 0);
                for (offset, page) in buffer.chunks_mut(PAGE as usize).enumerate() {
                    let number = first + offset as u64;
                    crate::content::page_bytes(
                        model.identity(),
                        number,
                        model.versions()[number as usize],
                        page,
                    );
                }
                if disk.write_at(&buffer, first * PAGE).is_ok() {
                    model.reached_disk(first, count);
                } else {
                    // The guest saw its write fail (a full disk): it never happened.
                    model.failed(first, count);
                    runtime.report.failed_writes += 1;
                }
            }
            if disk.flush().is_ok() {
                model.flushed();
            }
        }
    }

    pub(super) fn wake(&mut self, vm: usize) {
        let now = self.agenda.now();
        if self.vms[vm].next_wake != Some(now) {
            return; // Superseded by an earlier wake.
        }
        self.vms[vm].next_wake = None;
        let instant = self.agenda.instant();
        if let Some(primary) = &mut self.vms[vm].primary {
            primary.machine.handle_timeout(instant);
            self.drive_primary(vm);
        }
    }

    /// Carries out what the primary asks until it asks nothing, then sets its next wake.
    pub(super) fn drive_primary(&mut self, vm: usize) {
        loop {
            let Some(primary) = &mut self.vms[vm].primary else {
                return;
            };
            let Some(action) = primary.machine.poll_action() else {
                break;
            };
            self.trace.action(vm, primary_action_code(&action));
            self.primary_action(vm, action);
        }
        let Some(primary) = &self.vms[vm].primary else {
            return;
        };
        if let Some(timeout) = primary.machine.poll_timeout() {
            let at = self.agenda.time_of(timeout);
            let runtime = &mut self.vms[vm];
            if runtime.next_wake.is_none_or(|next| at < next) {
                runtime.next_wake = Some(at);
                self.agenda.add(at, Event::Wake { vm });
            }
        }
    }

    pub(super) fn primary_action(&mut self, vm: usize, action: PrimaryAction) {
        let now = self.agenda.now();
        let instant = self.agenda.instant();
        match action {
            PrimaryAction::Connect => self.connect(vm),
            PrimaryAction::Send(message) => {
                if let Some(connection) = self.current_connection(vm) {
                    self.send(connection, message, Way::ToReplica { ordered: true });
                }
            }
            PrimaryAction::SendChunk { delta, index } => {
                let Some(connection) = self.current_connection(vm) else {
                    return;
                };
                let Some(primary) = &mut self.vms[vm].primary else {
                    return;
                };
                match primary.vm.chunk(delta, index, &mut primary.encoder) {
                    Ok((disk, payload)) => {
                        let message = Message::Chunk {
                            delta,
                            index,
                            disk,
                            payload,
                        };
                        self.send(connection, message, Way::ToReplica { ordered: false });
                    }
                    Err(error) => {
                        self.lost_host_io(self.vms[vm].spec.host, &error.to_string());
                    }
                }
            }
            PrimaryAction::Cut { delta, kind, .. } => {
                self.write_guest(vm);
                let runtime = &mut self.vms[vm];
                let versions = runtime
                    .models
                    .iter()
                    .map(|model| model.versions().clone())
                    .collect();
                let Some(primary) = &mut runtime.primary else {
                    return;
                };
                match primary.vm.prepare(delta, kind) {
                    Ok(chunk_bytes) => {
                        runtime.cuts.insert(
                            delta.sequence,
                            CutRecord {
                                at: now,
                                kind,
                                versions,
                                bytes: chunk_bytes.iter().sum(),
                            },
                        );
                        // Older cuts can no longer be acknowledged.
                        runtime
                            .cuts
                            .retain(|sequence, _| *sequence >= delta.sequence);
                        primary
                            .machine
                            .delta_ready(instant, delta, chunk_bytes, false);
                    }
                    Err(error) => {
                        let reason = error.to_string();
                        primary.machine.delta_failed(instant, delta, &reason);
                        self.lost_host_io(self.vms[vm].spec.host, &reason);
                    }
                }
            }
            PrimaryAction::Acknowledged { delta, kind } => {
                if let Some(primary) = &self.vms[vm].primary
                    && let Err(error) = primary
                        .vm
                        .acknowledge(delta)
                        .and_then(|()| primary.vm.caught_up())
                {
                    self.lost_host_io(self.vms[vm].spec.host, &error.to_string());
                }
                self.acknowledged(vm, delta, kind);
            }
            PrimaryAction::Disconnect { reason } => {
                if let Some(connection) = self.current_connection(vm) {
                    self.close(connection, &reason, false);
                }
                if let Some(primary) = &mut self.vms[vm].primary {
                    primary.connection = None;
                    primary.machine.connection_lost(instant, &reason);
                }
            }
            PrimaryAction::Failed { reason } => {
                self.vms[vm]
                    .report
                    .failures
                    .push(format!("{:.0}s: {reason}", now.as_secs_f64()));
            }
            PrimaryAction::Resync { reason } => {
                self.vms[vm].report.resyncs += 1;
                // Whatever the comparison repairs is checked in full afterwards.
                self.vms[vm].verified = None;
                if let Some(connection) = self.current_connection(vm) {
                    self.close(connection, "resynchronizing", false);
                }
                if let Some(primary) = &mut self.vms[vm].primary {
                    primary.connection = None;
                    primary.machine.connection_lost(instant, &reason);
                }
            }
            PrimaryAction::Verify { sequence } => {
                let seed = self.random.draw();
                let Some(primary) = &mut self.vms[vm].primary else {
                    return;
                };
                let digests = primary.vm.digests(seed).map_err(|error| error.to_string());
                // As the daemons do: the digests, then the handover recorded, then sent.
                let outcome = digests
                    .and_then(|digests| self.record_handover(vm, sequence).map(|()| digests));
                let host = self.vms[vm].spec.host;
                match outcome {
                    Ok(digests) => {
                        if let Some(primary) = &mut self.vms[vm].primary {
                            primary.machine.verified(sequence, seed, digests);
                        }
                    }
                    Err(reason) if self.hosts[host].disks.struck() => {
                        self.lost_host_io(host, &reason);
                    }
                    Err(reason) => {
                        if let Some(primary) = &mut self.vms[vm].primary {
                            primary.machine.verify_failed(instant, reason);
                        }
                        self.drive_primary(vm);
                    }
                }
            }
            PrimaryAction::HandedOver { sequence } => {
                let reverse = self.vms[vm].handover_reverse;
                self.handed_over(vm, sequence, reverse);
            }
            PrimaryAction::HandoverRefused { reason } => {
                self.handover_called_off(vm);
                self.vms[vm].writes_stopped = false;
                self.planned_failed(vm, format!("refused: {reason}"));
            }
            PrimaryAction::Reversed { .. } => {
                let what = format!("{action:?}");
                self.violation(
                    Some(vm),
                    format!("the primary was told to become a replica, which the simulator never asks: {what}"),
                );
            }
        }
    }
}

pub(super) fn primary_action_code(action: &PrimaryAction) -> u64 {
    match action {
        PrimaryAction::Connect => 1,
        PrimaryAction::Send(message) => 10 + message_code(message),
        PrimaryAction::SendChunk { delta, index } => {
            40 + (delta.sequence << 20) + u64::from(*index)
        }
        PrimaryAction::Cut { delta, .. } => 2 + (delta.sequence << 8),
        PrimaryAction::Acknowledged { delta, .. } => 3 + (delta.sequence << 8),
        PrimaryAction::Disconnect { .. } => 4,
        PrimaryAction::Failed { .. } => 5,
        PrimaryAction::Verify { .. } => 6,
        PrimaryAction::HandedOver { .. } => 7,
        PrimaryAction::Reversed { .. } => 8,
        PrimaryAction::HandoverRefused { .. } => 9,
        PrimaryAction::Resync { .. } => 30,
    }
}
