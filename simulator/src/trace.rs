//! The run's fingerprint: every event taken and every action the engine asked for, with its
//! virtual time, hashed in order. Two runs of one seed must print the same hash.

use crate::agenda::SimTime;
use std::hash::Hasher;
use twox_hash::XxHash3_64;

pub struct Trace {
    hasher: XxHash3_64,
}

impl Trace {
    pub fn new(seed: u64) -> Self {
        let mut hasher = XxHash3_64::with_seed(0);
        hasher.write_u64(seed);
        Trace { hasher }
    }

    pub fn event(&mut self, now: SimTime, code: u64) {
        self.hasher.write_u128(now.as_nanos());
        self.hasher.write_u64(code);
    }

    pub fn action(&mut self, vm: usize, code: u64) {
        self.hasher.write_usize(vm);
        self.hasher.write_u64(code);
    }

    pub fn finish(&self) -> String {
        format!("{:016x}", self.hasher.finish())
    }
}
