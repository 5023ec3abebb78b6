//! The invariants a run is held to, each stated apart from the engine's own bookkeeping.
//! What the engine must guarantee is checked where the simulator can see it happen:
//!
//! - when a primary hears a delta is applied, the replica holds exactly what the guest's disks
//!   held at that delta's cut (the simulator's own record of every page's version);
//! - replication health follows the rules `blockrep status` states: never "normal" when
//!   nothing was applied for an hour, "critical" once the replica has been unreachable for
//!   longer than the replication interval (a minute at least) and the time to notice;
//! - the recovery point objective holds when nothing is wrong and the link has room;
//! - what the simulation holds in memory stays bounded.

use crate::agenda::SimTime;
use blockrep::proto::Health;
use serde::Serialize;
use std::time::Duration;

/// Violations kept in full; more are counted.
const KEPT: usize = 50;

/// Nothing applied for this long: health may not be normal (the engine's rule is an hour;
/// the margin covers sampling).
const STALE: Duration = Duration::from_secs(3600 + 60);
/// Health turns critical once the primary could not send for its replication interval (at
/// least a minute); it notices within the idle timeout or a connection attempt's timeout.
/// Beyond both, with a margin for sampling, the health must say so.
const UNREACHABLE_MARGIN: Duration = Duration::from_secs(40);
const SHORTEST_GRACE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Violation {
    /// Simulated seconds from the start.
    pub seconds: f64,
    pub seed: u64,
    pub vm: Option<String>,
    pub what: String,
}

impl Violation {
    pub fn new(now: SimTime, seed: u64, vm: Option<&str>, what: String) -> Self {
        Violation {
            seconds: now.as_secs_f64(),
            seed,
            vm: vm.map(str::to_owned),
            what,
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "t={:.3}s seed={}", self.seconds, self.seed)?;
        if let Some(vm) = &self.vm {
            write!(formatter, " vm={vm}")?;
        }
        write!(formatter, ": {}", self.what)
    }
}

/// What a VM looked like at one sample, as the world sees it.
pub struct Observation<'a> {
    pub vm: &'a str,
    pub health: Health,
    /// Since when nothing was applied (since the start when nothing ever was).
    pub last_applied: SimTime,
    /// Since when the replica has been unreachable, if it is.
    pub unreachable_since: Option<SimTime>,
    /// The age of the replica's newest state, once it has one after an initial replication.
    pub rpo: Option<Duration>,
    pub frequency: Duration,
    /// No fault touched the VM's hosts or link lately and its link had room.
    pub quiet: bool,
}

#[derive(Default)]
pub struct Checker {
    violations: Vec<Violation>,
    more: u64,
    memory_reported: bool,
}

impl Checker {
    pub fn violation(&mut self, violation: Violation) {
        if self.violations.len() < KEPT {
            self.violations.push(violation);
        } else {
            self.more += 1;
        }
    }

    pub fn observe(&mut self, now: SimTime, seed: u64, seen: &Observation<'_>) {
        let mut fail = |what: String| {
            self.violation(Violation::new(now, seed, Some(seen.vm), what));
        };
        if seen.health == Health::Normal && now.saturating_sub(seen.last_applied) > STALE {
            fail(format!(
                "health is normal although nothing was applied for {:.0} s",
                (now - seen.last_applied).as_secs_f64()
            ));
        }
        if let Some(since) = seen.unreachable_since
            && now - since > seen.frequency.max(SHORTEST_GRACE) + UNREACHABLE_MARGIN
            && seen.health != Health::Critical
        {
            fail(format!(
                "health is {} although the replica has been unreachable for {:.0} s",
                seen.health,
                (now - since).as_secs_f64()
            ));
        }
        if let Some(rpo) = seen.rpo
            && seen.quiet
            && rpo > seen.frequency * 3 + Duration::from_secs(60)
        {
            fail(format!(
                "the replica is {:.0} s behind with a {} s frequency, no fault and a link with room",
                rpo.as_secs_f64(),
                seen.frequency.as_secs()
            ));
        }
    }

    /// The agenda holds a bounded number of events per VM: more means something piles up.
    pub fn bounded(&mut self, now: SimTime, agenda: usize, vms: usize, seed: u64) {
        let limit = 10_000 + 400 * vms;
        if agenda > limit && !self.memory_reported {
            self.memory_reported = true;
            self.violation(Violation::new(
                now,
                seed,
                None,
                format!("{agenda} events are waiting (the bound is {limit}): something piles up"),
            ));
        }
    }

    pub fn into_violations(self) -> (Vec<Violation>, u64) {
        (self.violations, self.more)
    }
}
