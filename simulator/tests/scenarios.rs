//! Every scenario in `simulator/scenarios/` runs, briefly, with its invariants held.

use blockrep_sim::{RunOptions, Scenario};
use std::path::Path;
use std::time::Duration;

fn run(file: &str, seed: u64, duration: Duration) -> blockrep_sim::Report {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    let scenario = Scenario::load(&path).unwrap_or_else(|error| panic!("{error}"));
    blockrep_sim::run(
        scenario,
        RunOptions {
            seed,
            duration,
            progress: None,
        },
    )
    .unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn two_sites() {
    let report = run("two-sites.toml", 1, Duration::from_secs(2 * 3600));
    println!("{}", report.text());
    assert!(report.passed(), "{}", report.text());
}

#[test]
fn the_same_seed_gives_the_same_trace_and_another_seed_does_not() {
    let first = run("two-sites.toml", 7, Duration::from_secs(1800));
    let again = run("two-sites.toml", 7, Duration::from_secs(1800));
    let other = run("two-sites.toml", 8, Duration::from_secs(1800));
    assert_eq!(first.trace_hash, again.trace_hash);
    assert_eq!(first.vms, again.vms, "same seed, other figures");
    assert_ne!(first.trace_hash, other.trace_hash);
}
