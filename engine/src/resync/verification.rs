//! What `blockrep verify` reports: where the replica differs from the primary, leaving out the
//! blocks the primary changed and has not had acknowledged yet (they are expected to differ).

use std::ops::Range;

/// Where the replica differs from the primary, besides what the primary has not shipped yet.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verification {
    pub compared_bytes: u64,
    /// Per differing range: the disk and the byte range.
    pub differing: Vec<(u16, Range<u64>)>,
    /// Changed on the primary and not yet acknowledged: left out of the comparison.
    pub pending_bytes: u64,
}

impl Verification {
    /// From each disk's size, the ranges its hashes found differing, and the ranges pending on
    /// the primary (read after the hashes, so a write racing the comparison is among them).
    pub fn new(
        sizes: impl IntoIterator<Item = u64>,
        differing: &[Vec<Range<u64>>],
        pending: &[Vec<Range<u64>>],
    ) -> Self {
        let mut verification = Verification {
            compared_bytes: 0,
            differing: Vec::new(),
            pending_bytes: pending.iter().map(|ranges| bytes_in(ranges)).sum(),
        };
        for (disk, (size, differing)) in sizes.into_iter().zip(differing).enumerate() {
            verification.compared_bytes += size;
            let holes = pending.get(disk).map_or(&[][..], Vec::as_slice);
            for range in differing {
                for part in subtract(range, holes) {
                    verification.differing.push((disk as u16, part));
                }
            }
        }
        verification
    }
}

pub(crate) fn bytes_in(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|range| range.end - range.start).sum()
}

/// `range` without the parts inside `holes` (ordered, not overlapping).
fn subtract(range: &Range<u64>, holes: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut parts = Vec::new();
    let mut start = range.start;
    for hole in holes {
        if hole.end <= start || hole.start >= range.end {
            continue;
        }
        if hole.start > start {
            parts.push(start..hole.start);
        }
        start = start.max(hole.end);
    }
    if start < range.end {
        parts.push(start..range.end);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtracting_holes_keeps_what_is_outside_them() {
        let none: Vec<Range<u64>> = Vec::new();
        assert_eq!(subtract(&(0..100), &none), vec![0..100]);
        assert_eq!(
            subtract(&(0..100), &[10..20, 50..60]),
            vec![0..10, 20..50, 60..100]
        );
        let (before, around, after) = (0..15, 0..30, 20..30);
        assert_eq!(
            subtract(&(10..20), std::slice::from_ref(&before)),
            vec![15..20]
        );
        assert_eq!(subtract(&(10..20), std::slice::from_ref(&around)), none);
        assert_eq!(
            subtract(&(10..20), std::slice::from_ref(&after)),
            vec![10..20]
        );
    }

    #[test]
    fn pending_changes_are_left_out_and_counted() {
        let (differing, pending_first, pending_second) = (0..40, 20..30, 0..5);
        let verification = Verification::new(
            [100, 50],
            &[Vec::from([differing]), Vec::new()],
            &[Vec::from([pending_first]), Vec::from([pending_second])],
        );
        assert_eq!(verification.differing, vec![(0, 0..20), (0, 30..40)]);
        assert_eq!(
            (verification.compared_bytes, verification.pending_bytes),
            (150, 15)
        );
    }
}
