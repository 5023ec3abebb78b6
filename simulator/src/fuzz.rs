//! Random scenarios with random faults, one per seed: a small two-site deployment whose link,
//! workloads and faults are all drawn from the seed, run for a short while. A failing seed is
//! replayed exactly by `blockrep sim fuzz --seed N`.

use crate::random::Random;
use crate::scenario::Scenario;
use std::fmt::Write;

/// The scenario seed `seed` stands for, as TOML (so it can be saved and read like any other).
pub fn scenario_for(seed: u64) -> String {
    let mut random = Random::new(seed ^ 0xF022_5EED);
    let mut text = String::new();
    let frequency = ["30s", "30s", "5m"][random.below(3) as usize];
    let bandwidth = ["20Mbit", "100Mbit", "1Gbit"][random.below(3) as usize];
    let latency_ms = 1 + random.below(40);
    let _ = write!(
        text,
        "name = \"fuzz {seed}\"\nduration = \"30m\"\nseed = {seed}\n\
         [[site]]\nname = \"primary\"\n[[site]]\nname = \"recovery\"\n\
         [[host]]\nname = \"hv-a\"\nsite = \"primary\"\n[[host]]\nname = \"hv-b\"\nsite = \"recovery\"\n\
         [[policy]]\nname = \"policy\"\nfrequency = \"{frequency}\"\nrecovery_points = {}\n\
         [[link]]\nsites = [\"primary\", \"recovery\"]\nbandwidth = \"{bandwidth}\"\n\
         latency = \"{latency_ms}ms\"\njitter = \"{}ms\"\nloss = {:.3}\n",
        random.below(4),
        1 + random.below(latency_ms),
        random.unit() * 0.02,
    );
    let vms = 1 + random.below(3);
    for vm in 0..vms {
        let workload = match random.below(4) {
            0 => format!(
                "{{ kind = \"oltp\", writes_per_second = {}, hot_set_percent = {}, skew = 1.{} }}",
                1 + random.below(40),
                1 + random.below(20),
                random.below(5)
            ),
            1 => format!(
                "{{ kind = \"log\", writes_per_second = {} }}",
                1 + random.below(8)
            ),
            2 => format!(
                "{{ kind = \"batch\", every_seconds = {}, burst_mib = {} }}",
                30 + random.below(300),
                1 + random.below(8)
            ),
            _ => "{ kind = \"idle\" }".to_owned(),
        };
        let _ = write!(
            text,
            "[[vm]]\nname = \"vm{vm}\"\nhost = \"hv-a\"\nreplica_host = \"hv-b\"\npolicy = \"policy\"\n\
             disks = [\"{}M\"]\nworkload = {workload}\n",
            [16, 32, 64][random.below(3) as usize]
        );
    }
    let names: Vec<String> = (0..vms).map(|vm| format!("\"vm{vm}\"")).collect();
    let names = names.join(", ");
    // When a planned failover happens and which host holds the replica then; when an
    // unplanned one happens.
    let mut planned = None;
    let mut unplanned = None;
    match random.below(4) {
        // An unplanned failover, reverse replication, then failback.
        0 => {
            let failover = 300 + random.below(600);
            let reverse = failover + 60 + random.below(240);
            let failback = reverse + 300 + random.below(300);
            unplanned = Some(failover);
            planned = Some((failback, "hv-a"));
            let _ = write!(
                text,
                "[[event]]\nkind = \"unplanned_failover\"\nat = \"{failover}s\"\nvms = [{names}]\n\
                 [[event]]\nkind = \"reverse\"\nat = \"{reverse}s\"\nvms = [{names}]\n\
                 [[event]]\nkind = \"planned_failover\"\nat = \"{failback}s\"\nvms = [{names}]\nreverse = true\n"
            );
        }
        // A planned failover and back.
        1 => {
            let there = 300 + random.below(600);
            let back = there + 300 + random.below(300);
            planned = Some((there, "hv-b"));
            let _ = write!(
                text,
                "[[event]]\nkind = \"planned_failover\"\nat = \"{there}s\"\nvms = [{names}]\nreverse = true\n\
                 [[event]]\nkind = \"planned_failover\"\nat = \"{back}s\"\nvms = [{names}]\nreverse = true\n"
            );
        }
        _ => {}
    }
    for _ in 0..random.below(4) {
        let at = 60 + random.below(1500);
        let _ = match random.below(4) {
            0 => write!(
                text,
                "[[event]]\nkind = \"partition\"\nat = \"{at}s\"\nsites = [\"primary\", \"recovery\"]\nlength = \"{}s\"\n",
                1 + random.below(180)
            ),
            1 => write!(
                text,
                "[[event]]\nkind = \"crash_host\"\nat = \"{at}s\"\nhost = \"{}\"\ndown_for = \"{}s\"\nduring_io = {}\n",
                ["hv-a", "hv-b"][random.below(2) as usize],
                5 + random.below(120),
                random.chance(0.5)
            ),
            2 => write!(
                text,
                "[[event]]\nkind = \"disk_full\"\nat = \"{at}s\"\nhost = \"{}\"\nlength = \"{}s\"\n",
                ["hv-a", "hv-b"][random.below(2) as usize],
                5 + random.below(120)
            ),
            _ => write!(
                text,
                "[[event]]\nkind = \"partition\"\nat = \"{at}s\"\nsites = [\"primary\", \"recovery\"]\nlength = \"{}s\"\n",
                1 + random.below(8)
            ),
        };
    }
    // Faults where a failover's own rules decide: a bit flipped on the replica shortly before
    // a planned failover (the digests must differ, and the handover be refused), and a full
    // replica store shortly before an unplanned failover (a commit may still be pending).
    if let Some((at, host)) = planned
        && random.chance(0.5)
    {
        let at = at.saturating_sub(20 + random.below(60));
        let _ = write!(
            text,
            "[[event]]\nkind = \"bit_flip\"\nat = \"{at}s\"\nhost = \"{host}\"\n"
        );
    }
    // The host handing its VM over loses power at the handover's point of no return: the
    // restarted host must settle it as the engine decides, never run the VM at both sites.
    if let Some((at, replica_host)) = planned
        && random.chance(0.3)
    {
        let host = if replica_host == "hv-a" {
            "hv-b"
        } else {
            "hv-a"
        };
        let point = if random.chance(0.5) {
            "recorded"
        } else {
            "taken-over"
        };
        let _ = write!(
            text,
            "[[event]]\nkind = \"crash_host\"\nat = \"{}s\"\nhost = \"{host}\"\ndown_for = \"{}s\"\nat_handover = \"{point}\"\n",
            at.saturating_sub(1),
            10 + random.below(120)
        );
    }
    let mut filled = false;
    if let Some(failover) = unplanned
        && random.chance(0.5)
    {
        filled = true;
        // Half the time the disk fills in the middle of a commit, which then stays pending.
        // Space comes back a few seconds before the failover (one, after a commit it cut
        // short): the primary, backing off, may not have come back to have the failed commit
        // finished.
        let during_commit = random.chance(0.5);
        let length = 20 + random.below(40);
        let early = if during_commit {
            1
        } else {
            1 + random.below(5)
        };
        let at = failover.saturating_sub(length + early);
        let _ = write!(
            text,
            "[[event]]\nkind = \"disk_full\"\nat = \"{at}s\"\nhost = \"hv-b\"\nlength = \"{length}s\"\nduring_io = {during_commit}\n"
        );
    }
    // Or the replica host losing power within the failover's first storage steps (its record,
    // its copy): the operator finishes or redoes it once the host is back. Not both: a restart
    // settles the pending commit a full disk may have left, which the failover must face.
    if let Some(failover) = unplanned
        && !filled
        && random.chance(0.5)
    {
        let _ = write!(
            text,
            "[[event]]\nkind = \"crash_host\"\nat = \"{}s\"\nhost = \"hv-b\"\ndown_for = \"{}s\"\nduring_io = true\n",
            failover - 1,
            5 + random.below(60)
        );
    }
    // A primary host that comes back without its tracking journals (each disk must then be
    // compared with its replica), most times losing power again as it replaces them.
    if random.chance(0.3) {
        let _ = write!(
            text,
            "[[event]]\nkind = \"crash_host\"\nat = \"{}s\"\nhost = \"hv-a\"\ndown_for = \"{}s\"\njournals_lost = true\nagain_on_restart = {}\n",
            60 + random.below(1200),
            5 + random.below(60),
            random.chance(0.7)
        );
    }
    text
}

/// The scenario of `seed`, read back through the scenario reader (which refusing it would be
/// a bug in the generator).
pub fn scenario(seed: u64) -> Result<Scenario, crate::ScenarioError> {
    Scenario::parse(&scenario_for(seed), &format!("fuzz seed {seed}"))
}

/// What fuzzing found.
#[derive(Debug, Default)]
pub struct FuzzOutcome {
    pub seeds_run: u64,
    /// Each failing seed with its report.
    pub failures: Vec<(u64, crate::Report)>,
}

/// Runs the scenarios of seeds `first..first + count`, each for `duration`, stopping after
/// `stop_after` failures; `each` hears of every seed's report as it finishes.
pub fn run_seeds(
    first: u64,
    count: u64,
    duration: std::time::Duration,
    stop_after: usize,
    mut each: impl FnMut(u64, &crate::Report),
) -> Result<FuzzOutcome, crate::SetupError> {
    let mut outcome = FuzzOutcome::default();
    for seed in first..first.saturating_add(count) {
        let scenario = scenario(seed)?;
        let report = crate::run(
            scenario,
            crate::RunOptions {
                seed,
                duration,
                progress: None,
            },
        )?;
        outcome.seeds_run += 1;
        each(seed, &report);
        if !report.passed() {
            outcome.failures.push((seed, report));
            if outcome.failures.len() >= stop_after {
                break;
            }
        }
    }
    Ok(outcome)
}
