//! What a run reports: per VM the recovery point objective achieved, bytes written and
//! shipped, compression, cycles, failures and health over time; per link its use; per host its
//! crashes; every fault injected and every invariant violated; and the trace hash. As text for
//! a terminal, JSON for tools, and an HTML page with charts for people.

use crate::check::Violation;
use crate::scenario::Vm;
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (sorted in place); zeros when there are none.
    pub fn of(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(f64::total_cmp);
        let rank = |share: f64| {
            let index = ((share * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[index - 1]
        };
        Percentiles {
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthChange {
    pub seconds: f64,
    pub health: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VmReport {
    pub name: String,
    pub primary_host: String,
    pub replica_host: String,
    pub cloud: Option<String>,
    pub frequency_seconds: u64,
    /// Age of the replica's newest state, sampled every 10 s once it has one.
    pub rpo_seconds: Percentiles,
    pub bytes_written: u64,
    /// Disk bytes of the deltas applied.
    pub disk_bytes_shipped: u64,
    /// Bytes sent to the replica, messages included.
    pub wire_bytes: u64,
    /// Disk bytes shipped per byte on the wire.
    pub compression_ratio: f64,
    pub chunks_sent: u64,
    pub deltas_applied: u64,
    pub initial_replications: u64,
    /// Deltas whose replica state was checked against the guest's disks, and passed.
    pub checked_cuts: u64,
    pub successful_cycles: u64,
    pub missed_cycles: u64,
    pub resyncs: u64,
    pub resync_differing_bytes: u64,
    /// Times replication was reversed after a failover.
    pub reversals: u64,
    /// Checks that found pages a bit flip had damaged (expected, until a resync repairs them).
    pub damage_seen: u64,
    /// Guest writes that failed (a full disk).
    pub failed_writes: u64,
    pub failures: Vec<String>,
    pub final_state: String,
    pub health: Vec<HealthChange>,
    /// (seconds, RPO seconds), a minute apart.
    pub rpo_series: Vec<(f64, f64)>,
    /// (seconds, disk bytes of the delta in flight not yet staged), a minute apart.
    pub pending_series: Vec<(f64, u64)>,
}

impl VmReport {
    pub fn new(vm: &Vm, primary_host: &str, replica_host: &str) -> Self {
        VmReport {
            name: vm.name.clone(),
            primary_host: primary_host.to_owned(),
            replica_host: replica_host.to_owned(),
            cloud: vm.cloud.clone(),
            frequency_seconds: vm.policy.frequency.as_secs(),
            rpo_seconds: Percentiles::default(),
            bytes_written: 0,
            disk_bytes_shipped: 0,
            wire_bytes: 0,
            compression_ratio: 0.0,
            chunks_sent: 0,
            deltas_applied: 0,
            initial_replications: 0,
            checked_cuts: 0,
            successful_cycles: 0,
            missed_cycles: 0,
            resyncs: 0,
            resync_differing_bytes: 0,
            reversals: 0,
            damage_seen: 0,
            failed_writes: 0,
            failures: Vec::new(),
            final_state: String::new(),
            health: Vec::new(),
            rpo_series: Vec::new(),
            pending_series: Vec::new(),
        }
    }
}

/// A comparison of a replica with its primary by hash, shipping nothing (`blockrep verify`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    pub seconds: f64,
    pub vm: String,
    /// (disk, first byte, end byte) of each range found differing; `None` when the comparison
    /// could not be made.
    pub differing: Option<Vec<(u16, u64, u64)>>,
    pub pending_bytes: u64,
    pub problem: Option<String>,
}

/// A failover step (or reverse replication) and what it cost.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailoverReport {
    pub seconds: f64,
    pub vm: String,
    /// `unplanned` or `reverse`.
    pub kind: String,
    pub from: String,
    pub to: String,
    /// The recovery point (delta sequence) the VM started from.
    pub point: Option<u64>,
    /// Bytes the guest had written that the point does not hold.
    pub lost_bytes: u64,
    /// Age of the point when the VM failed over.
    pub rpo_seconds: Option<f64>,
    /// The VM's networks at the new site: mapped, or disconnected.
    pub networks: Vec<String>,
    /// The recovery plan and group it ran in.
    pub plan: Option<String>,
    /// The disks were compared with the point, page by page (for `reverse`: the old copy is
    /// compared by hash before anything ships).
    pub checked: bool,
    /// Why the step failed, or what could not be checked.
    pub problem: Option<String>,
}

impl FailoverReport {
    pub fn failed(
        now: std::time::Duration,
        vm: &str,
        plan: Option<String>,
        problem: String,
    ) -> Self {
        FailoverReport {
            seconds: now.as_secs_f64(),
            vm: vm.to_owned(),
            kind: "unplanned".into(),
            from: String::new(),
            to: String::new(),
            point: None,
            lost_bytes: 0,
            rpo_seconds: None,
            networks: Vec::new(),
            plan,
            checked: false,
            problem: Some(problem),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LinkReport {
    pub ends: (String, String),
    pub bandwidth_bytes: f64,
    /// Bytes carried each way, by minute.
    pub carried_per_minute: [Vec<u64>; 2],
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HostReport {
    pub name: String,
    pub crashes: u64,
    pub unflushed_writes_lost: u64,
    pub torn_writes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub simulated_seconds: f64,
    pub real_seconds: f64,
    pub events: u64,
    /// Hash of every event and engine action in order: equal for equal seeds.
    pub trace_hash: String,
    pub vms: Vec<VmReport>,
    pub links: Vec<LinkReport>,
    pub hosts: Vec<HostReport>,
    /// (seconds, what) for each fault injected.
    pub faults: Vec<(f64, String)>,
    pub failovers: Vec<FailoverReport>,
    pub verifications: Vec<VerifyReport>,
    pub violations: Vec<Violation>,
    /// Violations beyond those listed.
    pub more_violations: u64,
    /// The process's peak resident memory, when the system tells.
    pub peak_memory_bytes: Option<u64>,
}

/// The process's peak resident set (Linux's VmHWM).
pub fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn size(bytes: u64) -> String {
    blockrep::units::format_size(bytes)
}

fn clock(seconds: f64) -> String {
    let total = seconds as u64;
    format!(
        "{:02}:{:02}:{:02}",
        total / 3600,
        total / 60 % 60,
        total % 60
    )
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The report for a terminal.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {:?}, seed {}: {} simulated in {:.1} s ({} events), trace {}",
            self.scenario,
            self.seed,
            clock(self.simulated_seconds),
            self.real_seconds,
            self.events,
            self.trace_hash
        );
        let _ = writeln!(
            out,
            "{:<14} {:>5} {:>8} {:>8} {:>8} {:>10} {:>10} {:>6} {:>7} {:>6} {:>5}  health",
            "vm",
            "freq",
            "rpo p50",
            "rpo p99",
            "rpo max",
            "written",
            "shipped",
            "ratio",
            "applied",
            "missed",
            "init"
        );
        for vm in &self.vms {
            let health: Vec<String> = vm
                .health
                .iter()
                .map(|change| format!("{} {}", clock(change.seconds), change.health))
                .collect();
            let _ = writeln!(
                out,
                "{:<14} {:>4}s {:>7.0}s {:>7.0}s {:>7.0}s {:>10} {:>10} {:>6.2} {:>7} {:>6} {:>5}  {}",
                vm.name,
                vm.frequency_seconds,
                vm.rpo_seconds.p50,
                vm.rpo_seconds.p99,
                vm.rpo_seconds.max,
                size(vm.bytes_written),
                size(vm.disk_bytes_shipped),
                vm.compression_ratio,
                vm.deltas_applied,
                vm.missed_cycles,
                vm.initial_replications,
                health.join(", ")
            );
            for failure in &vm.failures {
                let _ = writeln!(out, "  {}: replication failed at {failure}", vm.name);
            }
        }
        for host in self.hosts.iter().filter(|host| host.crashes > 0) {
            let _ = writeln!(
                out,
                "host {}: {} crash(es), {} unflushed writes lost ({} torn)",
                host.name, host.crashes, host.unflushed_writes_lost, host.torn_writes
            );
        }
        for (seconds, what) in &self.faults {
            let _ = writeln!(out, "fault at {}: {what}", clock(*seconds));
        }
        for failover in &self.failovers {
            let _ = write!(
                out,
                "{} at {}: {}",
                failover.kind,
                clock(failover.seconds),
                failover.vm
            );
            if !failover.from.is_empty() {
                let _ = write!(out, " {} -> {}", failover.from, failover.to);
            }
            match (failover.kind.as_str(), failover.point) {
                ("reverse", Some(point)) if failover.checked => {
                    let _ = write!(out, ", the old copy compared by hash from point {point}");
                }
                ("reverse", Some(point)) => {
                    let _ = write!(
                        out,
                        ", from point {point} (a planned failover: equal copies)"
                    );
                }
                (_, Some(point)) => {
                    let _ = write!(out, ", point {point}, {} lost", size(failover.lost_bytes));
                }
                _ => {}
            }
            if let Some(rpo) = failover.rpo_seconds.filter(|rpo| *rpo > 0.0) {
                let _ = write!(out, " (point {rpo:.0} s old)");
            }
            if let Some(plan) = &failover.plan {
                let _ = write!(out, ", plan {plan}");
            }
            if !failover.networks.is_empty() {
                let _ = write!(out, ", networks: {}", failover.networks.join("; "));
            }
            if let Some(problem) = &failover.problem {
                let _ = write!(out, " [{problem}]");
            }
            let _ = writeln!(out);
        }
        for verification in &self.verifications {
            let _ = write!(
                out,
                "verify at {}: {}: ",
                clock(verification.seconds),
                verification.vm
            );
            let _ = match (&verification.differing, &verification.problem) {
                (Some(ranges), _) if ranges.is_empty() => writeln!(out, "equal"),
                (Some(ranges), _) => {
                    let listed: Vec<String> = ranges
                        .iter()
                        .map(|(disk, start, end)| format!("disk {disk} {start}..{end}"))
                        .collect();
                    writeln!(out, "differs at {}", listed.join(", "))
                }
                (None, problem) => {
                    writeln!(out, "not compared: {}", problem.as_deref().unwrap_or(""))
                }
            };
        }
        if let Some(peak) = self.peak_memory_bytes {
            let _ = writeln!(out, "peak memory {}", size(peak));
        }
        if self.violations.is_empty() {
            let _ = writeln!(out, "invariants held");
        } else {
            for violation in &self.violations {
                let _ = writeln!(out, "VIOLATION {violation}");
            }
            if self.more_violations > 0 {
                let _ = writeln!(out, "... and {} more violations", self.more_violations);
            }
        }
        out
    }
}
