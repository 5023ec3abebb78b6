//! Virtual time: the agenda of future events, taken in time order (ties in the order they were
//! added), so a run never depends on the host's clock or thread scheduling.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Virtual time since the start of the run.
pub type SimTime = Duration;

struct Entry<E> {
    at: SimTime,
    order: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Reversed, so that the max-heap yields the earliest entry.
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

pub struct Agenda<E> {
    entries: BinaryHeap<Entry<E>>,
    added: u64,
    now: SimTime,
    /// The engine's state machines take `std::time::Instant`: virtual time is laid over one
    /// taken at the start. They only compare and subtract instants, so the run stays the same.
    origin: Instant,
}

impl<E> Agenda<E> {
    pub fn new() -> Self {
        Agenda {
            entries: BinaryHeap::new(),
            added: 0,
            now: SimTime::ZERO,
            origin: Instant::now(),
        }
    }

    pub fn now(&self) -> SimTime {
        self.now
    }

    /// `now` as the instant the engine sees.
    pub fn instant(&self) -> Instant {
        self.origin + self.now
    }

    /// The virtual time of an instant the engine gave back.
    pub fn time_of(&self, instant: Instant) -> SimTime {
        instant.saturating_duration_since(self.origin)
    }

    /// Adds `event` at `at` (never before now).
    pub fn add(&mut self, at: SimTime, event: E) {
        self.added += 1;
        self.entries.push(Entry {
            at: at.max(self.now),
            order: self.added,
            event,
        });
    }

    pub fn add_after(&mut self, delay: Duration, event: E) {
        self.add(self.now + delay, event);
    }

    /// The next event at or before `until`, with the clock moved to it.
    pub fn next_until(&mut self, until: SimTime) -> Option<E> {
        if self.entries.peek().is_none_or(|entry| entry.at > until) {
            self.now = self.now.max(until);
            return None;
        }
        let entry = self.entries.pop()?;
        self.now = entry.at;
        Some(entry.event)
    }

    /// Events waiting.
    pub fn waiting(&self) -> usize {
        self.entries.len()
    }
}

impl<E> Default for Agenda<E> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_in_time_order_and_ties_in_the_order_added() {
        let mut agenda = Agenda::new();
        agenda.add(Duration::from_secs(5), "late");
        agenda.add(Duration::from_secs(1), "first");
        agenda.add(Duration::from_secs(1), "second");
        let until = Duration::from_secs(10);
        assert_eq!(agenda.next_until(until), Some("first"));
        assert_eq!(agenda.next_until(until), Some("second"));
        assert_eq!(agenda.now(), Duration::from_secs(1));
        assert_eq!(agenda.next_until(Duration::from_secs(3)), None);
        assert_eq!(agenda.now(), Duration::from_secs(3));
        assert_eq!(agenda.next_until(until), Some("late"));
    }
}
