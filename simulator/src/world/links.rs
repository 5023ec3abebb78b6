//! Connections over the simulated links: connecting, sending with the link's latency and
//! bandwidth, closing, and hearing a peer lost.

use super::*;

impl World {
    /// Bytes a message takes on the wire. A chunk is its payload and a small header; encoding
    /// it only to measure it would copy a MiB a chunk. A refusal's text names files by their
    /// path in the scratch directory, which must not make one run's timing differ from another's.
    pub(super) fn wire_size(&self, message: &Message) -> u64 {
        match message {
            Message::Chunk { payload, .. } => payload.len() as u64 + 32,
            Message::Refused { code, reason } => Message::Refused {
                code: *code,
                reason: self.scrub(reason),
            }
            .encode()
            .len() as u64,
            other => other.encode().len() as u64,
        }
    }

    /// `text` with the scratch directory's path replaced by a fixed name.
    pub(super) fn scrub(&self, text: &str) -> String {
        text.replace(&*self.scratch.path().to_string_lossy(), "<scratch>")
    }

    pub(super) fn current_connection(&self, vm: usize) -> Option<ConnectionId> {
        self.vms[vm]
            .primary
            .as_ref()
            .and_then(|primary| primary.connection)
            .filter(|connection| {
                self.connections
                    .get(connection)
                    .is_some_and(Connection::open)
            })
    }

    pub(super) fn link_between(&self, a: usize, b: usize) -> Option<usize> {
        let (site_a, site_b) = (self.hosts[a].site, self.hosts[b].site);
        self.link_of
            .get(&(site_a.min(site_b), site_a.max(site_b)))
            .copied()
    }

    pub(super) fn link_for(&mut self, vm: usize) -> usize {
        let spec = &self.vms[vm].spec;
        let (primary, replica) = (spec.host, spec.replica_host);
        if let Some(link) = self.link_between(primary, replica) {
            return link;
        }
        // Hosts of one site, or sites the scenario did not join: a LAN.
        let (a, b) = (self.hosts[primary].site, self.hosts[replica].site);
        let link = self.links.len();
        self.links
            .push(Link::new(LinkSpec::local(), (a, b), self.random.fork()));
        self.link_of.insert((a.min(b), a.max(b)), link);
        link
    }

    pub(super) fn connect(&mut self, vm: usize) {
        let link = self.link_for(vm);
        let replica_host = self.vms[vm].spec.replica_host;
        let side = self.vms[vm].primary.as_ref().map_or(0, |p| p.side);
        let now = self.agenda.now();
        let handshake = self.links[link].handshake(now);
        match handshake {
            Some(delay) if self.hosts[replica_host].up => {
                let connection = self.next_connection;
                self.next_connection += 1;
                self.connections.insert(
                    connection,
                    Connection {
                        vm,
                        link,
                        primary_side: side,
                        replica_host,
                        replica_incarnation: self.hosts[replica_host].incarnation,
                        closed_at: None,
                        last_to_replica: SimTime::ZERO,
                        last_to_primary: SimTime::ZERO,
                    },
                );
                if let Some(primary) = &mut self.vms[vm].primary {
                    primary.connection = Some(connection);
                }
                self.agenda
                    .add_after(delay, Event::Connected { connection });
            }
            _ => self.agenda.add_after(
                CONNECT_TIMEOUT,
                Event::ConnectFailed {
                    vm,
                    side,
                    reason: "the replica host does not answer",
                },
            ),
        }
    }

    pub(super) fn connected(&mut self, connection: ConnectionId) {
        let Some(state) = self.connections.get(&connection).filter(|c| c.open()) else {
            return;
        };
        let vm = state.vm;
        let instant = self.agenda.instant();
        if self.vms[vm]
            .primary
            .as_ref()
            .is_some_and(|primary| primary.machine.comparison_owed())
        {
            // Compared before the hello, as the daemon does.
            self.start_comparison(vm, connection);
            return;
        }
        if let Some(primary) = &mut self.vms[vm].primary {
            primary.machine.connected(instant);
        }
        self.drive_primary(vm);
    }

    /// Sends `message` across the connection's link: toward the replica (on the ordered
    /// control stream, or a data stream when not `ordered`) or back to the primary (always the
    /// control stream).
    pub(super) fn send(&mut self, connection: ConnectionId, message: Message, way: Way) {
        let bytes = self.wire_size(&message);
        let Some(state) = self.connections.get(&connection) else {
            return;
        };
        let (vm, link) = (state.vm, state.link);
        let (from, after) = match way {
            Way::ToReplica { ordered } => (
                self.vms[vm].spec.host,
                if ordered {
                    state.last_to_replica
                } else {
                    SimTime::ZERO
                },
            ),
            Way::ToPrimary => (self.vms[vm].spec.replica_host, state.last_to_primary),
        };
        if let Way::ToReplica { .. } = way {
            self.vms[vm].report.wire_bytes += bytes;
            if let Message::Chunk { .. } = &message {
                self.vms[vm].report.chunks_sent += 1;
            }
        }
        let now = self.agenda.now();
        let Delivery::Arrives(at) = self.links[link].send(now, self.hosts[from].site, bytes, after)
        else {
            return;
        };
        let Some(state) = self.connections.get_mut(&connection) else {
            return;
        };
        let event = match way {
            Way::ToReplica { ordered } => {
                if ordered {
                    state.last_to_replica = at;
                }
                Event::ToReplica {
                    connection,
                    message,
                    sent: now,
                }
            }
            Way::ToPrimary => {
                state.last_to_primary = at;
                Event::ToPrimary {
                    connection,
                    message,
                    sent: now,
                }
            }
        };
        self.agenda.add(at, event);
    }

    pub(super) fn primary_receives(
        &mut self,
        connection: ConnectionId,
        message: Message,
        sent: SimTime,
    ) {
        let Some(state) = self
            .connections
            .get(&connection)
            .filter(|c| c.carries(sent))
        else {
            return;
        };
        let vm = state.vm;
        let side = state.primary_side;
        let instant = self.agenda.instant();
        let Some(primary) = self.primary_of(vm, side) else {
            return;
        };
        if primary.connection != Some(connection) {
            return;
        }
        if primary.comparing.is_some() {
            self.primary_compares(vm, connection, message);
            return;
        }
        primary.machine.handle_message(instant, message);
        self.drive_primary(vm);
    }

    /// Ends a connection: the side that closes knows at once, the other hears after a round
    /// trip (or, when the link is severed, when its idle timeout runs out).
    pub(super) fn close(&mut self, connection: ConnectionId, _reason: &str, by_replica: bool) {
        let now = self.agenda.now();
        let Some(state) = self.connections.get_mut(&connection) else {
            return;
        };
        if !state.open() {
            return;
        }
        state.closed_at = Some(now);
        // The other side hears after what was sent its way before the close.
        let queued = if by_replica {
            state.last_to_primary
        } else {
            state.last_to_replica
        };
        let link = state.link;
        let heard = if self.links[link].severed(now) {
            now + IDLE_TIMEOUT
        } else {
            (now + self.links[link].spec.latency).max(queued + Duration::from_micros(1))
        };
        self.agenda.add(
            heard,
            Event::PeerLost {
                connection,
                replica_side: !by_replica,
            },
        );
    }

    pub(super) fn peer_lost(&mut self, connection: ConnectionId, replica_side: bool) {
        let Some(state) = self.connections.get(&connection) else {
            return;
        };
        let (vm, primary_side, host, replica_incarnation) = (
            state.vm,
            state.primary_side,
            state.replica_host,
            state.replica_incarnation,
        );
        let now = self.agenda.now();
        if let Some(state) = self.connections.get_mut(&connection) {
            state.closed_at.get_or_insert(now);
        }
        if replica_side {
            if self.hosts[host].incarnation == replica_incarnation
                && let Some(slot) = self.hosts[host].slots.get_mut(&vm)
            {
                slot.machine.disconnected(connection);
                self.drive_replica(host, vm);
            }
        } else {
            let instant = self.agenda.instant();
            if let Some(primary) = self.primary_of(vm, primary_side)
                && primary.connection == Some(connection)
            {
                primary.connection = None;
                primary
                    .machine
                    .connection_lost(instant, "the connection ended");
                self.drive_primary(vm);
            }
        }
    }

    pub(super) fn replica_receives(
        &mut self,
        connection: ConnectionId,
        message: Message,
        sent: SimTime,
    ) {
        let Some(state) = self
            .connections
            .get(&connection)
            .filter(|c| c.carries(sent))
        else {
            return;
        };
        let (vm, host) = (state.vm, state.replica_host);
        if self.hosts[host].incarnation != state.replica_incarnation || !self.hosts[host].up {
            return;
        }
        if let Err(reason) = self.slot(host, vm) {
            // As the daemon does: the connection ends, the primary tries again later.
            self.close(connection, &reason, true);
            self.lost_host_io(host, &reason);
            return;
        }
        if self.replica_compares(host, vm, connection, &message) {
            return;
        }
        let owner = self.hosts[self.vms[vm].spec.host].name.clone();
        let runtime = &mut self.hosts[host];
        let Some(slot) = runtime.slots.get_mut(&vm) else {
            return;
        };
        match message {
            Message::Hello { version, disks, .. } => {
                if let Some(store) = &runtime.store {
                    // As the daemon does: a replica stopped by a failed commit is reopened.
                    let _ = store.recover_failed(&mut slot.replica, &mut slot.machine);
                }
                slot.machine.hello(connection, &owner, version, disks);
            }
            other => slot.machine.handle_message(connection, other),
        }
        self.drive_replica(host, vm);
    }

    pub(super) fn close_all(&mut self, host: usize, vm: usize, reason: &str) {
        let open: Vec<ConnectionId> = self
            .connections
            .iter()
            .filter(|(_, state)| state.vm == vm && state.open())
            .map(|(id, _)| *id)
            .collect();
        for connection in open {
            if let Some(slot) = self.hosts[host].slots.get_mut(&vm) {
                slot.machine.disconnected(connection);
            }
            self.close(connection, reason, true);
        }
    }
}
