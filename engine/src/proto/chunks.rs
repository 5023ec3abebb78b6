//! A set of chunk indexes kept as ordered, merged ranges: what a replica has staged of a delta,
//! in a form that stays small however many chunks arrive (in order, mostly).

use std::ops::Range;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ChunkSet {
    ranges: Vec<Range<u32>>,
}

impl ChunkSet {
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// A set from ranges that may be unordered or overlap.
    pub(super) fn from_ranges(ranges: &[Range<u32>]) -> Self {
        let mut set = ChunkSet::new();
        for range in ranges {
            set.insert_range(range.clone());
        }
        set
    }

    pub(super) fn insert(&mut self, index: u32) {
        self.insert_range(index..index.saturating_add(1));
    }

    pub(super) fn insert_range(&mut self, range: Range<u32>) {
        if range.is_empty() {
            return;
        }
        // The first range that ends at or after the new one's start may touch it.
        let first = self.ranges.partition_point(|held| held.end < range.start);
        let mut merged = range;
        let mut last = first;
        while last < self.ranges.len() && self.ranges[last].start <= merged.end {
            merged.start = merged.start.min(self.ranges[last].start);
            merged.end = merged.end.max(self.ranges[last].end);
            last += 1;
        }
        self.ranges.splice(first..last, std::iter::once(merged));
    }

    pub(super) fn remove(&mut self, index: u32) {
        let at = self.ranges.partition_point(|held| held.end <= index);
        let Some(held) = self
            .ranges
            .get(at)
            .cloned()
            .filter(|held| held.start <= index)
        else {
            return;
        };
        let pieces = [held.start..index, index + 1..held.end];
        self.ranges.splice(
            at..=at,
            pieces.into_iter().filter(|piece| !piece.is_empty()),
        );
    }

    pub(super) fn contains(&self, index: u32) -> bool {
        let at = self.ranges.partition_point(|held| held.end <= index);
        self.ranges.get(at).is_some_and(|held| held.start <= index)
    }

    /// How many indexes the set holds.
    pub(super) fn len(&self) -> u64 {
        self.ranges
            .iter()
            .map(|range| u64::from(range.end - range.start))
            .sum()
    }

    /// True when every index below `count` is held.
    pub(super) fn covers(&self, count: u32) -> bool {
        self.first_missing(0, count).is_none()
    }

    pub(super) fn ranges(&self) -> &[Range<u32>] {
        &self.ranges
    }

    /// The first index below `count` not in the set, at or after `from`.
    pub(super) fn first_missing(&self, from: u32, count: u32) -> Option<u32> {
        let mut candidate = from;
        let at = self.ranges.partition_point(|held| held.end <= candidate);
        for held in &self.ranges[at..] {
            if held.start > candidate {
                break;
            }
            candidate = held.end;
        }
        (candidate < count).then_some(candidate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_set_holds_exactly_what_was_inserted_and_not_removed(
            indexes in prop::collection::vec((0u32..200, any::<bool>()), 0..300),
        ) {
            let mut set = ChunkSet::new();
            let mut model = std::collections::BTreeSet::new();
            for &(index, insert) in &indexes {
                if insert {
                    set.insert(index);
                    model.insert(index);
                } else {
                    set.remove(index);
                    model.remove(&index);
                }
            }
            for index in 0..210 {
                prop_assert_eq!(set.contains(index), model.contains(&index));
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            for pair in set.ranges().windows(2) {
                prop_assert!(pair[0].end < pair[1].start, "ranges not merged: {:?}", set.ranges());
            }
            let expected_missing = (0..200).find(|index| !model.contains(index));
            prop_assert_eq!(set.first_missing(0, 200), expected_missing);
            prop_assert_eq!(set.covers(200), expected_missing.is_none());
        }
    }
}
