//! The checks catch real bugs: with one of the engine's planted bugs on, fuzzing finds a seed
//! whose run violates an invariant, within a stated number of seeds. Without the bug, the same
//! seed passes: the finding is the bug's, not noise. (`blockrep sim fuzz --plant BUG` does the
//! same from the command line, in a build with the `planted-bugs` feature.)
//!
//! A planted bug is switched on for the whole process, so the bugs are tried one after another
//! in one test.

use blockrep::planted::{Bug, plant};
use std::time::Duration;

/// Each bug, the seeds fuzzing gets to find it, the simulated minutes each seed runs, and what
/// the violation it causes says.
const BUGS: [(Bug, u64, u64, &str); 5] = [
    // The replica says a delta is applied before its commit made it durable.
    (
        Bug::ConfirmBeforeDurable,
        12,
        10,
        "differs from the primary's",
    ),
    // A planned failover takes over disks that differ from the primary's (a flipped bit).
    (
        Bug::HandoverWithoutEqualDigests,
        12,
        10,
        "planned failover at delta",
    ),
    // A failover whose copy a power cut interrupted is committed when the operator finishes it:
    // the VM runs on partly copied disks. (The failover comes 5-15 minutes in, and the operator
    // only after the host is back, hence the longer runs.)
    (
        Bug::CommitUnfinishedCopy,
        20,
        30,
        "unplanned failover to point",
    ),
    // A primary host restored without its journals loses power as it replaces them, between
    // the new journal and the marker that a comparison is owed: the next start trusts the new
    // journal, and the changes the lost one held never reach the replica.
    (
        Bug::JournalBeforeMarker,
        30,
        30,
        "differs from the primary's",
    ),
    // A first host asks the other site to take over without recording the handover, and runs
    // the VM again when restarted.
    (Bug::NoHandoverRecord, 30, 30, "runs at both sites"),
];

#[test]
fn fuzzing_finds_every_planted_bug_within_its_seeds() {
    for (bug, seeds, minutes, violation) in BUGS {
        let duration = Duration::from_secs(60 * minutes);
        plant(bug, true);
        let found = blockrep_sim::fuzz::run_seeds(1, seeds, duration, 1, |_, _| {});
        plant(bug, false);
        let found = found.unwrap_or_else(|error| panic!("{error}"));
        let Some((seed, report)) = found.failures.first() else {
            panic!(
                "{}: {} seeds ran with the bug planted and none failed",
                bug.name(),
                found.seeds_run
            );
        };
        println!("{}: seed {seed} caught it:\n{}", bug.name(), report.text());
        assert!(
            report
                .violations
                .iter()
                .any(|found| found.what.contains(violation)),
            "{}: the violation is not the one the bug causes: {}",
            bug.name(),
            report.text()
        );
        // The same seed without the bug holds.
        let clean = blockrep_sim::fuzz::run_seeds(*seed, 1, duration, 1, |_, _| {})
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(
            clean.failures.is_empty(),
            "{}: seed {seed} fails without the bug too:\n{}",
            bug.name(),
            clean.failures[0].1.text()
        );
    }
}
