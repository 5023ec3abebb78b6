//! Recovery points: older states of a replica kept as undo data, so their cost is the data the
//! later deltas overwrote, not a copy of the disk. Each kept point holds the undo files that
//! take the next newer state (the next point, or the latest) back to it, newest first; going
//! back to a point applies the undo of every newer point, then its own. This module decides
//! which states are kept; it touches no file.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Which recovery points a replica keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointPolicy {
    /// Older points kept besides the latest state; 0 keeps only the latest.
    pub keep: usize,
    /// At most one point per interval is kept.
    pub interval: Duration,
}

impl Default for PointPolicy {
    /// One point an hour for a day, as Hyper-V Replica offers.
    fn default() -> Self {
        PointPolicy {
            keep: 24,
            interval: Duration::from_secs(3600),
        }
    }
}

/// A kept recovery point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RecoveryPoint {
    /// The delta sequence the replica was at: the point's id.
    pub sequence: u64,
    /// When that delta was applied, seconds since the Unix epoch.
    pub time: f64,
    /// The primary made it application-consistent (a hook ran before the cut).
    pub app_consistent: bool,
    /// Undo files, newest first, taking the next newer state back to this point.
    pub undo: Vec<String>,
}

/// Records that delta `sequence` was applied over the state `sequence - 1` (applied at
/// `previous.0`, application-consistent when `previous.1`), whose undo is in `undo`. An
/// application-consistent state is always kept. Returns the undo files no longer needed.
pub(super) fn record_applied(
    points: &mut Vec<RecoveryPoint>,
    policy: PointPolicy,
    sequence: u64,
    previous: (f64, bool),
    undo: String,
) -> Vec<String> {
    let (previous_time, previous_app_consistent) = previous;
    if policy.keep == 0 {
        return vec![undo];
    }
    match points.last_mut() {
        Some(newest)
            if !previous_app_consistent
                && previous_time - newest.time < policy.interval.as_secs_f64() =>
        {
            // The previous state is not kept: its undo joins the newest point's.
            newest.undo.insert(0, undo);
        }
        _ => points.push(RecoveryPoint {
            sequence: sequence - 1,
            time: previous_time,
            app_consistent: previous_app_consistent,
            undo: vec![undo],
        }),
    }
    let mut expired = Vec::new();
    while points.len() > policy.keep {
        expired.extend(points.remove(0).undo);
    }
    expired
}

/// The undo files to apply, in order, to take the latest state back to point `sequence`; `None`
/// when no such point is kept.
pub(super) fn undo_chain(points: &[RecoveryPoint], sequence: u64) -> Option<Vec<String>> {
    let position = points.iter().position(|point| point.sequence == sequence)?;
    Some(
        points[position..]
            .iter()
            .rev()
            .flat_map(|point| point.undo.iter().cloned())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: f64 = 3600.0;

    fn policy(keep: usize) -> PointPolicy {
        PointPolicy {
            keep,
            interval: Duration::from_secs(3600),
        }
    }

    #[test]
    fn one_point_an_hour_is_kept_and_the_deltas_between_join_its_undo() {
        let mut points = Vec::new();
        // Deltas every 30 minutes: 2 applied at 0.5 h over 1 (applied at 0), 3 at 1 h, ...
        let mut expired = Vec::new();
        for sequence in 2..=6u64 {
            let previous_time = (sequence - 2) as f64 * HOUR / 2.0;
            expired.extend(record_applied(
                &mut points,
                policy(24),
                sequence,
                (previous_time, false),
                format!("u{sequence}"),
            ));
        }
        assert!(expired.is_empty());
        let kept: Vec<u64> = points.iter().map(|point| point.sequence).collect();
        assert_eq!(kept, vec![1, 3, 5]);
        assert_eq!(points[0].undo, vec!["u3", "u2"]);
        assert_eq!(points[2].undo, vec!["u6"]);
        // Back to 1 from the latest (6): u6, then 5's and 3's undo, newest first.
        assert_eq!(
            undo_chain(&points, 1).unwrap(),
            vec!["u6", "u5", "u4", "u3", "u2"]
        );
        assert_eq!(undo_chain(&points, 5).unwrap(), vec!["u6"]);
        assert_eq!(undo_chain(&points, 4), None);
    }

    #[test]
    fn the_oldest_points_expire_with_their_undo() {
        let mut points = Vec::new();
        let mut expired = Vec::new();
        for sequence in 2..=6u64 {
            expired.extend(record_applied(
                &mut points,
                policy(2),
                sequence,
                ((sequence - 2) as f64 * HOUR, false),
                format!("u{sequence}"),
            ));
        }
        assert_eq!(
            points
                .iter()
                .map(|point| point.sequence)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(expired, vec!["u2", "u3", "u4"]);
    }

    #[test]
    fn an_application_consistent_state_is_kept_whatever_the_interval() {
        let mut points = Vec::new();
        record_applied(&mut points, policy(24), 2, (0.0, false), "u2".into());
        record_applied(&mut points, policy(24), 3, (60.0, true), "u3".into());
        record_applied(&mut points, policy(24), 4, (120.0, false), "u4".into());
        let kept: Vec<(u64, bool)> = points
            .iter()
            .map(|point| (point.sequence, point.app_consistent))
            .collect();
        assert_eq!(kept, vec![(1, false), (2, true)]);
        assert_eq!(points[1].undo, vec!["u4", "u3"]);
    }

    #[test]
    fn keeping_no_points_keeps_no_undo() {
        let mut points = Vec::new();
        assert_eq!(
            record_applied(&mut points, policy(0), 2, (0.0, false), "u2".into()),
            vec!["u2"]
        );
        assert!(points.is_empty());
    }
}
