//! A dirty bitmap: one bit per tracked block, set concurrently by writers without locks.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size set of block numbers, safe to add to from many threads at once.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl DirtyBitmap {
    pub fn new(blocks: u64) -> Self {
        DirtyBitmap {
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
        }
    }

    /// Number of blocks the bitmap covers.
    pub(crate) fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks blocks `first..=last` (clipped to the bitmap).
    pub(crate) fn mark(&self, first: u64, last: u64) {
        let last = last.min(self.blocks.saturating_sub(1));
        let mut block = first;
        while block <= last {
            let word = (block / 64) as usize;
            let low = block % 64;
            let high = (last - block + low).min(63);
            let mask = if high - low == 63 {
                u64::MAX
            } else {
                ((1u64 << (high - low + 1)) - 1) << low
            };
            // Relaxed is enough: the handover of a frozen bitmap to its reader is ordered by
            // the generation's writer count (see `TrackedDisk::cut`).
            self.words[word].fetch_or(mask, Ordering::Relaxed);
            block += high - low + 1;
        }
    }

    pub fn is_marked(&self, block: u64) -> bool {
        block < self.blocks
            && self.words[(block / 64) as usize].load(Ordering::Relaxed) & (1 << (block % 64)) != 0
    }

    /// Adds every block of `other` (of the same size).
    pub(crate) fn merge(&self, other: &DirtyBitmap) {
        for (word, theirs) in self.words.iter().zip(&other.words) {
            word.fetch_or(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|word| u64::from(word.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Runs of marked blocks, in order, as `first..end` block ranges.
    pub(crate) fn runs(&self) -> Vec<std::ops::Range<u64>> {
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for (index, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                let low = u64::from(bits.trailing_zeros());
                let length = u64::from((!(bits >> low)).trailing_zeros()).min(64 - low);
                let start = index as u64 * 64 + low;
                let end = (start + length).min(self.blocks);
                match runs.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => runs.push(start..end),
                }
                bits = if low + length >= 64 {
                    0
                } else {
                    bits & !(((1u64 << length) - 1) << low)
                };
            }
        }
        runs
    }

    /// The bitmap as little-endian words, for persisting.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|word| word.load(Ordering::Relaxed).to_le_bytes())
            .collect()
    }

    /// A bitmap of `blocks` from bytes made by `to_bytes`; `None` if the length does not fit.
    pub(crate) fn from_bytes(blocks: u64, bytes: &[u8]) -> Option<Self> {
        if bytes.len() as u64 != blocks.div_ceil(64) * 8 {
            return None;
        }
        Some(DirtyBitmap {
            words: bytes
                .as_chunks::<8>()
                .0
                .iter()
                .map(|word| AtomicU64::new(u64::from_le_bytes(*word)))
                .collect(),
            blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn marked_ranges_come_back_as_runs(blocks in 1u64..500, ranges in prop::collection::vec((0u64..500, 0u64..130), 0..12)) {
            let bitmap = DirtyBitmap::new(blocks);
            let mut model = vec![false; blocks as usize];
            for (first, length) in ranges {
                let last = first + length;
                bitmap.mark(first, last);
                for block in first..=last.min(blocks - 1) {
                    if block < blocks { model[block as usize] = true; }
                }
            }
            let mut from_runs = vec![false; blocks as usize];
            for run in bitmap.runs() {
                prop_assert!(run.start < run.end && run.end <= blocks);
                for block in run { from_runs[block as usize] = true; }
            }
            prop_assert_eq!(&from_runs, &model);
            prop_assert_eq!(bitmap.count(), model.iter().filter(|&&m| m).count() as u64);
            let copy = DirtyBitmap::from_bytes(blocks, &bitmap.to_bytes()).unwrap();
            prop_assert_eq!(copy.runs(), bitmap.runs());
        }
    }
}
