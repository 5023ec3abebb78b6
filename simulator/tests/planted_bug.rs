//! The checks catch a real bug: with the engine's planted "confirm before durable" bug on (the
//! replica says a delta is applied before its commit has made it so), fuzzing finds a seed whose
//! run violates an invariant, within a bounded number of seeds. Without the bug, the same seeds
//! pass: the finding is the bug's, not noise.

use blockrep::planted::{Bug, plant};
use std::time::Duration;

const SEEDS: u64 = 12;

#[test]
fn fuzzing_finds_a_replica_that_confirms_before_it_is_durable() {
    plant(Bug::ConfirmBeforeDurable, true);
    let found = blockrep_sim::fuzz::run_seeds(1, SEEDS, Duration::from_secs(600), 1, |_, _| {})
        .unwrap_or_else(|error| panic!("{error}"));
    plant(Bug::ConfirmBeforeDurable, false);
    let Some((seed, report)) = found.failures.first() else {
        panic!(
            "{} seeds ran with the bug planted and none failed",
            found.seeds_run
        );
    };
    println!("seed {seed} caught the planted bug:\n{}", report.text());
    assert!(
        report
            .violations
            .iter()
            .any(|violation| violation.what.contains("differs from the primary's")),
        "the violation is not the replica's content: {}",
        report.text()
    );
    // The same seed without the bug holds.
    let clean = blockrep_sim::fuzz::run_seeds(*seed, 1, Duration::from_secs(600), 1, |_, _| {})
        .unwrap_or_else(|error| panic!("{error}"));
    assert!(
        clean.failures.is_empty(),
        "seed {seed} fails without the bug too:\n{}",
        clean.failures[0].1.text()
    );
}
