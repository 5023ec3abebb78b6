//! A handful of random scenarios (random links, workloads, partitions, crashes mid-operation,
//! full disks, failovers and failbacks) hold every invariant. `blockrep sim fuzz --seeds N`
//! runs as many as wanted; this keeps a few in every test run.

use std::time::Duration;

#[test]
fn random_scenarios_with_random_faults_hold_their_invariants() {
    let (mut faults, mut failovers) = (0, 0);
    let outcome = blockrep_sim::fuzz::run_seeds(
        1,
        10,
        Duration::from_secs(1500),
        usize::MAX,
        |seed, report| {
            println!(
                "seed {seed}: {} events, trace {}",
                report.events, report.trace_hash
            );
            // Every VM replicated: a run where nothing ships would hold every invariant.
            for vm in &report.vms {
                assert!(
                    vm.deltas_applied > 0,
                    "seed {seed}: {} never replicated",
                    vm.name
                );
            }
            faults += report.faults.len();
            failovers += report.failovers.len();
        },
    )
    .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(outcome.seeds_run, 10);
    if let Some((seed, report)) = outcome.failures.first() {
        panic!(
            "seed {seed} failed (replay: blockrep sim fuzz --seed {seed} --duration 1500s):\n{}",
            report.text()
        );
    }
    // The seeds did inject faults and fail VMs over.
    assert!(
        faults > 0 && failovers > 0,
        "{faults} faults, {failovers} failover steps"
    );
}
