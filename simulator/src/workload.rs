//! What the guests write: OLTP-like random 8 KiB writes over a hot set, sequential log appends,
//! bursty batch jobs, or nothing. Each VM's workload draws from its own generator, one second
//! of virtual time at a time.

use crate::content::{DiskModel, PAGE};
use crate::random::{Random, Zipf};
use serde::Deserialize;

/// A workload as a scenario names it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkloadSpec {
    /// Random 8 KiB writes; `hot_set_percent` of the disk takes the writes, ranked by Zipf's law
    /// with exponent `skew`.
    Oltp {
        #[serde(default = "default_oltp_rate")]
        writes_per_second: f64,
        #[serde(default = "default_hot_set")]
        hot_set_percent: f64,
        #[serde(default = "default_skew")]
        skew: f64,
    },
    /// Sequential appends of `write_kib` KiB, wrapping at the end of the disk.
    Log {
        #[serde(default = "default_log_rate")]
        writes_per_second: f64,
        #[serde(default = "default_log_size")]
        write_kib: u64,
    },
    /// Every `every_seconds`, a burst of `burst_mib` MiB of 1 MiB writes at random places.
    Batch {
        #[serde(default = "default_batch_every")]
        every_seconds: u64,
        #[serde(default = "default_batch_size")]
        burst_mib: u64,
    },
    Idle,
}

fn default_oltp_rate() -> f64 {
    20.0
}
fn default_hot_set() -> f64 {
    10.0
}
fn default_skew() -> f64 {
    1.1
}
fn default_log_rate() -> f64 {
    4.0
}
fn default_log_size() -> u64 {
    16
}
fn default_batch_every() -> u64 {
    600
}
fn default_batch_size() -> u64 {
    16
}

/// A VM's workload in progress.
#[derive(Debug)]
pub struct Workload {
    spec: WorkloadSpec,
    random: Random,
    zipf: Option<Zipf>,
    /// Where the hot set's ranks land on the disk: a fixed shuffle, so hot pages are spread.
    hot_stride: u64,
    log_position: u64,
    seconds: u64,
    /// Fractional writes carried to the next second.
    carry: f64,
}

/// Pages per OLTP write (8 KiB).
const OLTP_PAGES: u64 = 2;
const BATCH_PAGES: u64 = (1 << 20) / PAGE;

impl Workload {
    pub fn new(spec: WorkloadSpec, random: Random, disk_pages: u64) -> Self {
        let zipf = match &spec {
            WorkloadSpec::Oltp {
                hot_set_percent,
                skew,
                ..
            } => {
                let slots = ((disk_pages / OLTP_PAGES) as f64 * hot_set_percent / 100.0).max(1.0);
                Some(Zipf::new(slots as u64, *skew))
            }
            _ => None,
        };
        Workload {
            spec,
            random,
            zipf,
            // An odd stride visits every slot of a power-of-two disk once before repeating.
            hot_stride: 2_654_435_761,
            log_position: 0,
            seconds: 0,
            carry: 0.0,
        }
    }

    /// One second of the guest's writes, onto `disk` (the VM's first disk takes them all);
    /// returns the bytes written.
    pub fn second(&mut self, disk: &mut DiskModel) -> u64 {
        self.seconds += 1;
        let pages = disk.pages();
        let mut written = 0;
        match &self.spec {
            WorkloadSpec::Oltp {
                writes_per_second, ..
            } => {
                let slots = pages / OLTP_PAGES;
                for _ in 0..self.count(*writes_per_second) {
                    let rank = self
                        .zipf
                        .as_ref()
                        .map_or(0, |zipf| zipf.sample(&mut self.random));
                    let slot = rank.wrapping_mul(self.hot_stride) % slots.max(1);
                    disk.write(slot * OLTP_PAGES, OLTP_PAGES);
                    written += OLTP_PAGES * PAGE;
                }
            }
            WorkloadSpec::Log {
                writes_per_second,
                write_kib,
            } => {
                let size = (write_kib * 1024).div_ceil(PAGE).max(1);
                for _ in 0..self.count(*writes_per_second) {
                    if self.log_position + size > pages {
                        self.log_position = 0;
                    }
                    disk.write(self.log_position, size);
                    self.log_position += size;
                    written += size * PAGE;
                }
            }
            WorkloadSpec::Batch {
                every_seconds,
                burst_mib,
            } => {
                if self.seconds.is_multiple_of((*every_seconds).max(1)) {
                    for _ in 0..*burst_mib {
                        let slots = (pages / BATCH_PAGES).max(1);
                        disk.write(self.random.below(slots) * BATCH_PAGES, BATCH_PAGES);
                        written += BATCH_PAGES * PAGE;
                    }
                }
            }
            WorkloadSpec::Idle => {}
        }
        written
    }

    /// Writes this second at `rate` a second on average, fractions carried over.
    fn count(&mut self, rate: f64) -> u64 {
        self.carry += rate.max(0.0);
        let whole = self.carry.floor();
        self.carry -= whole;
        whole as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oltp_writes_concentrate_on_its_hot_set() {
        let spec = WorkloadSpec::Oltp {
            writes_per_second: 100.0,
            hot_set_percent: 5.0,
            skew: 1.1,
        };
        let mut disk = DiskModel::new(1, 64 << 20);
        let mut workload = Workload::new(spec, Random::new(2), disk.pages());
        for _ in 0..60 {
            workload.second(&mut disk);
        }
        let touched = disk
            .versions()
            .iter()
            .filter(|version| **version > 0)
            .count() as u64;
        // 6000 writes of two pages land on at most 5 % of the disk's pages.
        assert!(touched <= disk.pages() / 20, "{touched} pages touched");
        assert!(touched > 20);
    }

    #[test]
    fn log_appends_are_sequential_and_wrap() {
        let spec = WorkloadSpec::Log {
            writes_per_second: 4.0,
            write_kib: 16,
        };
        let mut disk = DiskModel::new(1, 64 * PAGE);
        let mut workload = Workload::new(spec, Random::new(2), disk.pages());
        workload.second(&mut disk);
        assert_eq!(disk.take_unwritten(), vec![(0, 16)]);
        for _ in 0..4 {
            workload.second(&mut disk);
        }
        // 80 pages appended on a 64-page disk: the last 16 wrapped to the start.
        assert_eq!(disk.versions()[0], 2);
        assert_eq!(disk.versions()[20], 1);
    }
}
