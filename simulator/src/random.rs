//! The simulation's only source of chance: one seeded generator per concern, forked from the
//! run's seed in a fixed order, so the same seed gives the same run.

use rand_core::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Random(Pcg64Mcg);

impl Random {
    pub fn new(seed: u64) -> Self {
        Random(Pcg64Mcg::seed_from_u64(seed))
    }

    /// An independent generator for one concern (a VM's workload, a link), drawn from this one.
    pub fn fork(&mut self) -> Random {
        Random::new(self.draw())
    }

    pub fn draw(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `0..bound` (`bound` > 0), by multiplication rather than modulo so that
    /// every value is equally likely to within 2^-64.
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.draw()) * u128::from(bound)) >> 64) as u64
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.draw() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, probability: f64) -> bool {
        self.unit() < probability
    }

    /// A duration in `[0, most)`.
    pub fn up_to(&mut self, most: Duration) -> Duration {
        most.mul_f64(self.unit())
    }

    /// A duration in `[least, most)`.
    pub fn between(&mut self, least: Duration, most: Duration) -> Duration {
        least + self.up_to(most.saturating_sub(least))
    }
}

/// Draws ranks `0..n` with probability proportional to `1 / (rank + 1)^exponent` (Zipf), by
/// inverting a precomputed cumulative table: exact, and one binary search a draw. (The
/// rejection samplers of distribution crates suit huge `n`; hot sets here are small.)
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u64, exponent: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n.max(1))
            .map(|rank| {
                total += 1.0 / ((rank + 1) as f64).powf(exponent);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self, random: &mut Random) -> u64 {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let target = random.unit() * total;
        self.cumulative.partition_point(|&sum| sum <= target) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_numbers_and_another_does_not() {
        let draw = |seed| {
            let mut random = Random::new(seed);
            (0..8).map(|_| random.draw()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn zipf_favours_low_ranks_and_stays_in_range() {
        let zipf = Zipf::new(100, 1.2);
        let mut random = Random::new(1);
        let mut counts = [0u32; 100];
        for _ in 0..20_000 {
            counts[zipf.sample(&mut random) as usize] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[99]);
        // Rank 0 holds 1 / H(100, 1.2) of the mass: about 27 %.
        assert!((4_500..6_500).contains(&counts[0]), "{}", counts[0]);
    }
}
