//! Replication health by Hyper-V Replica's rules: warning when more than 20 % of the cycles
//! of the last hour were missed or nothing was replicated for an hour, critical when the
//! primary cannot send at all. Only the last hour of cycles is kept, so memory stays bounded.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window over which missed cycles are counted.
const WINDOW: Duration = Duration::from_secs(3600);
/// Missed share above which health is a warning.
const MISSED_WARNING: f64 = 0.20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Normal,
    Warning,
    Critical,
}

impl std::fmt::Display for Health {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Health::Normal => "normal",
            Health::Warning => "warning",
            Health::Critical => "critical",
        })
    }
}

/// The outcome of each replication cycle of the last hour, and totals since the start.
#[derive(Debug)]
pub(crate) struct CycleLog {
    started: Instant,
    recent: VecDeque<(Instant, bool)>,
    last_success: Option<Instant>,
    successful: u64,
    missed: u64,
}

impl CycleLog {
    pub(super) fn new(now: Instant) -> Self {
        CycleLog {
            started: now,
            recent: VecDeque::new(),
            last_success: None,
            successful: 0,
            missed: 0,
        }
    }

    pub(super) fn record(&mut self, now: Instant, success: bool) {
        if success {
            self.successful += 1;
            self.last_success = Some(now);
        } else {
            self.missed += 1;
        }
        self.recent.push_back((now, success));
        while self
            .recent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > WINDOW)
        {
            self.recent.pop_front();
        }
    }

    pub(super) fn successful(&self) -> u64 {
        self.successful
    }

    pub(super) fn missed(&self) -> u64 {
        self.missed
    }

    /// Health at `now`. `cannot_send_since` is when the primary last lost the ability to send
    /// (link down, or refused), if it has not regained it.
    pub(super) fn health(
        &self,
        now: Instant,
        cannot_send_since: Option<Instant>,
        grace: Duration,
    ) -> Health {
        if cannot_send_since.is_some_and(|since| now.saturating_duration_since(since) > grace) {
            return Health::Critical;
        }
        let window: Vec<bool> = self
            .recent
            .iter()
            .filter(|(at, _)| now.saturating_duration_since(*at) <= WINDOW)
            .map(|(_, success)| *success)
            .collect();
        let missed = window.iter().filter(|success| !**success).count();
        if !window.is_empty() && missed as f64 > MISSED_WARNING * window.len() as f64 {
            return Health::Warning;
        }
        let quiet_since = self.last_success.unwrap_or(self.started);
        if now.saturating_duration_since(quiet_since) > WINDOW {
            return Health::Warning;
        }
        Health::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_a_fifth_missed_in_the_hour_is_a_warning() {
        let start = Instant::now();
        let mut log = CycleLog::new(start);
        for minute in 0..10 {
            log.record(start + Duration::from_secs(60 * minute), minute >= 2);
        }
        let now = start + Duration::from_secs(600);
        assert_eq!(
            log.health(now, None, Duration::from_secs(60)),
            Health::Normal
        );
        log.record(now, false);
        assert_eq!(
            log.health(now, None, Duration::from_secs(60)),
            Health::Warning
        );
        // An hour later those misses have left the window, but so has every success.
        let later = now + Duration::from_secs(3601);
        log.record(later, true);
        assert_eq!(
            log.health(later, None, Duration::from_secs(60)),
            Health::Normal
        );
    }

    #[test]
    fn an_hour_without_replication_is_a_warning_and_not_sending_is_critical() {
        let start = Instant::now();
        let log = CycleLog::new(start);
        let grace = Duration::from_secs(300);
        assert_eq!(log.health(start, None, grace), Health::Normal);
        assert_eq!(
            log.health(start + Duration::from_secs(3700), None, grace),
            Health::Warning
        );
        assert_eq!(
            log.health(start + Duration::from_secs(200), Some(start), grace),
            Health::Normal
        );
        assert_eq!(
            log.health(start + Duration::from_secs(400), Some(start), grace),
            Health::Critical
        );
    }
}
