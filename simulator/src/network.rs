//! The simulated network between sites: one link per pair of sites, with a bandwidth shared by
//! every connection that crosses it (one queue each way), latency, jitter, loss and outages.
//!
//! QUIC carries the engine's messages, so the model follows QUIC: a lost packet is sent again
//! after about a round trip (the message arrives late, never not at all); the control stream
//! arrives in order while data streams may overtake each other; an outage shorter than the idle
//! timeout only delays what was sent, and a longer one ends every connection across the link.

use crate::agenda::SimTime;
use crate::random::Random;
use std::time::Duration;

/// After this long without hearing from its peer a QUIC connection ends (the engine's own
/// setting for its connections).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of QUIC, UDP and IP framing each message costs besides its own.
const OVERHEAD: u64 = 64;

/// How a link behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSpec {
    /// Bytes a second, each way.
    pub bandwidth: f64,
    pub latency: Duration,
    pub jitter: Duration,
    /// The share of messages that lose a packet and wait for its retransmission.
    pub loss: f64,
}

impl LinkSpec {
    /// Hosts of one site: a 10 Gbit/s LAN.
    pub fn local() -> Self {
        LinkSpec {
            bandwidth: 1.25e9,
            latency: Duration::from_micros(200),
            jitter: Duration::from_micros(50),
            loss: 0.0,
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Arrives(SimTime),
    /// Sent into an outage the connection will not survive.
    Lost,
}

#[derive(Debug, Clone, Copy)]
struct Outage {
    from: SimTime,
    until: SimTime,
}

impl Outage {
    /// Connections across the link end in it.
    fn fatal(&self) -> bool {
        self.until - self.from >= IDLE_TIMEOUT
    }
}

/// A link between two sites (or within one).
#[derive(Debug)]
pub struct Link {
    pub spec: LinkSpec,
    /// The sites at its ends: direction 0 carries from `ends.0` to `ends.1`.
    pub ends: (usize, usize),
    random: Random,
    busy_until: [SimTime; 2],
    outage: Option<Outage>,
    /// Bytes carried each way, by minute of the run.
    pub carried: [Vec<u64>; 2],
}

impl Link {
    pub fn new(spec: LinkSpec, ends: (usize, usize), random: Random) -> Self {
        Link {
            spec,
            ends,
            random,
            busy_until: [SimTime::ZERO; 2],
            outage: None,
            carried: [Vec::new(), Vec::new()],
        }
    }

    fn direction(&self, from_site: usize) -> usize {
        usize::from(from_site != self.ends.0)
    }

    /// Takes the link down from `from` for `length`; returns whether connections across it end.
    pub fn cut(&mut self, from: SimTime, length: Duration) -> bool {
        let mut outage = Outage {
            from,
            until: from + length,
        };
        // An outage within or overlapping one in force extends it, never shortens it.
        if let Some(current) = self.outage
            && current.from <= from
            && from < current.until
        {
            outage.from = current.from;
            outage.until = outage.until.max(current.until);
        }
        self.outage = Some(outage);
        outage.fatal()
    }

    /// Since when the link has been severed, when it is at `now`.
    pub fn severed_since(&self, now: SimTime) -> Option<SimTime> {
        self.severed(now)
            .then(|| self.outage.map(|outage| outage.from))
            .flatten()
    }

    /// The link is down at `now` for longer than connections survive.
    pub fn severed(&self, now: SimTime) -> bool {
        self.outage
            .is_some_and(|outage| outage.fatal() && outage.from <= now && now < outage.until)
    }

    /// When a message of `bytes` sent at `now` from `from_site` arrives; `after` is the arrival
    /// of the message before it on the same ordered stream (or zero).
    pub fn send(&mut self, now: SimTime, from_site: usize, bytes: u64, after: SimTime) -> Delivery {
        let mut start = now;
        if let Some(outage) = self.outage
            && outage.from <= now
            && now < outage.until
        {
            if outage.fatal() {
                return Delivery::Lost;
            }
            // A flap: QUIC sends it again once the link is back.
            start = outage.until;
        }
        let direction = self.direction(from_site);
        let bytes = bytes + OVERHEAD;
        let begin = start.max(self.busy_until[direction]);
        let done = begin + Duration::from_secs_f64(bytes as f64 / self.spec.bandwidth);
        self.busy_until[direction] = done;
        let minute = (begin.as_secs() / 60) as usize;
        let carried = &mut self.carried[direction];
        if carried.len() <= minute {
            carried.resize(minute + 1, 0);
        }
        carried[minute] += bytes;
        let mut arrival = done + self.spec.latency + self.random.up_to(self.spec.jitter);
        if self.spec.loss > 0.0 && self.random.chance(self.spec.loss) {
            // Detected after about a round trip, then sent again.
            arrival += self.spec.latency * 3 + Duration::from_millis(1);
        }
        Delivery::Arrives(arrival.max(after))
    }

    /// How long opening a connection takes at `now`, or `None` when it cannot be opened.
    pub fn handshake(&mut self, now: SimTime) -> Option<Duration> {
        if self.severed(now) {
            return None;
        }
        let wait = match self.outage {
            Some(outage) if outage.from <= now && now < outage.until => outage.until - now,
            _ => Duration::ZERO,
        };
        Some(wait + self.spec.latency * 2 + self.random.up_to(self.spec.jitter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(bandwidth: f64) -> Link {
        let spec = LinkSpec {
            bandwidth,
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
        };
        Link::new(spec, (0, 1), Random::new(1))
    }

    #[test]
    fn messages_queue_behind_each_other_at_the_link_speed() {
        let mut link = link(1e6);
        let now = Duration::from_secs(1);
        let first = link.send(now, 0, 1_000_000 - OVERHEAD, SimTime::ZERO);
        let second = link.send(now, 0, 1_000_000 - OVERHEAD, SimTime::ZERO);
        assert_eq!(first, Delivery::Arrives(Duration::from_millis(2010)));
        assert_eq!(second, Delivery::Arrives(Duration::from_millis(3010)));
        // The other way is a queue of its own.
        let back = link.send(now, 1, 1_000_000 - OVERHEAD, SimTime::ZERO);
        assert_eq!(back, Delivery::Arrives(Duration::from_millis(2010)));
    }

    #[test]
    fn a_flap_delays_and_an_outage_drops() {
        let mut link = link(1e9);
        let second = Duration::from_secs(1);
        assert!(!link.cut(second, Duration::from_secs(2)));
        let Delivery::Arrives(at) = link.send(second * 2, 0, 100, SimTime::ZERO) else {
            panic!("a flap dropped a message");
        };
        assert!(at >= second * 3);
        assert!(link.cut(second * 10, Duration::from_secs(60)));
        assert_eq!(
            link.send(second * 20, 0, 100, SimTime::ZERO),
            Delivery::Lost
        );
        assert_eq!(link.handshake(second * 20), None);
        assert!(link.handshake(second * 80).is_some());
    }
}
