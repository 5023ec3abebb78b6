//! Every scenario in `simulator/scenarios/` runs with its invariants held, and does what its
//! runbook says: the failovers happen in order, lose what they may and no more, and land on
//! the mapped networks.

use blockrep_sim::report::FailoverReport;
use blockrep_sim::{Report, RunOptions, Scenario};
use std::path::Path;
use std::time::Duration;

fn scenario(file: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    Scenario::load(&path).unwrap_or_else(|error| panic!("{error}"))
}

fn run(file: &str, seed: u64, duration: Option<Duration>) -> Report {
    let scenario = scenario(file);
    let duration = duration.unwrap_or(scenario.duration);
    let report = blockrep_sim::run(
        scenario,
        RunOptions {
            seed,
            duration,
            progress: None,
        },
    )
    .unwrap_or_else(|error| panic!("{error}"));
    println!("{}", report.text());
    assert!(report.passed(), "{file}: {}", report.text());
    for vm in &report.vms {
        assert!(
            vm.deltas_applied > 0,
            "{file}: {} never replicated",
            vm.name
        );
    }
    report
}

fn failovers<'a>(report: &'a Report, kind: &str) -> Vec<&'a FailoverReport> {
    report
        .failovers
        .iter()
        .filter(|failover| failover.kind == kind)
        .collect()
}

/// The scenario files, by name, in order.
fn scenario_files() -> Vec<String> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files: Vec<String> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    files
}

#[test]
fn every_scenario_file_is_covered_here() {
    assert_eq!(
        scenario_files(),
        [
            "bit-rot.toml",
            "failback-interrupted.toml",
            "handover-refused.toml",
            "network-mapping.toml",
            "site-outage.toml",
            "standalone-vmm.toml",
            "stretched-cluster.toml",
            "ten-vms.toml",
            "two-sites.toml"
        ],
        "a scenario was added or removed: give it a test here"
    );
}

#[test]
fn two_sites_ride_out_a_partition_a_flap_and_a_replica_crash() {
    let report = run("two-sites.toml", 1, None);
    for vm in &report.vms {
        assert!(
            vm.checked_cuts > 100,
            "{}: {} cuts checked",
            vm.name,
            vm.checked_cuts
        );
        let healths: Vec<&str> = vm
            .health
            .iter()
            .map(|change| change.health.as_str())
            .collect();
        // The three-minute partition outlasts a 30 s interval: critical, then normal again.
        assert!(healths.contains(&"critical"), "{}: {healths:?}", vm.name);
        assert_eq!(healths.last(), Some(&"normal"), "{}", vm.name);
    }
    assert!(report.hosts.iter().any(|host| host.crashes == 1));
    // The crash struck in the middle of the engine's work, not between two events.
    assert!(
        report.faults.iter().any(|(_, what)| {
            what.contains("lost power during an operation")
                || what.contains("lost power while applying a delta")
        }),
        "{:?}",
        report.faults
    );
}

#[test]
fn a_standalone_vmm_server_protects_itself_at_the_host_level() {
    let report = run("standalone-vmm.toml", 1, None);
    let vmm = report.vms.iter().find(|vm| vm.name == "vmm-1").unwrap();
    assert_eq!(
        (vmm.cloud.as_deref(), vmm.replica_host.as_str()),
        (None, "hv-backup")
    );
    // Replicated, and its replica checked page by page at acknowledged cuts.
    assert!(vmm.checked_cuts > 0, "{vmm:?}");
    let files = report.vms.iter().find(|vm| vm.name == "files-1").unwrap();
    assert_eq!(files.cloud.as_deref(), Some("protected"));
    assert!(files.checked_cuts > 10);
}

#[test]
fn a_vmm_server_in_a_protected_cloud_or_a_typo_is_refused_with_its_name() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/standalone-vmm.toml"),
    )
    .unwrap();
    let misplaced = text.replace("host = \"hv-vmm\"", "host = \"hv-main\"");
    let error = Scenario::parse(&misplaced, "misplaced.toml")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("vmm-1") && error.contains("protected cloud"),
        "{error}"
    );
    let typo = text.replace("recovery_points = 6", "recovery_point = 6");
    let error = Scenario::parse(&typo, "typo.toml").unwrap_err().to_string();
    assert!(error.contains("recovery_point"), "{error}");
}

#[test]
fn network_mapping_puts_a_mapped_vm_on_its_network_and_leaves_the_other_disconnected() {
    let report = run("network-mapping.toml", 1, None);
    let unplanned = failovers(&report, "unplanned");
    let networks = |vm: &str| {
        unplanned
            .iter()
            .find(|failover| failover.vm == vm)
            .unwrap()
            .networks
            .clone()
    };
    assert_eq!(networks("app-1"), ["corp -> corp-recovery"]);
    assert_eq!(networks("lab-1"), ["lab: disconnected (no mapping)"]);
    for failover in &unplanned {
        assert!(failover.checked, "{failover:?}");
    }
    // Reversed, each VM's old copy was compared and what the old site had written after the
    // point came back as differing blocks.
    assert_eq!(failovers(&report, "reverse").len(), 2);
    for vm in &report.vms {
        assert!(vm.resync_differing_bytes > 0, "{}", vm.name);
    }
}

#[test]
fn a_stretched_cluster_moves_its_vmm_server_and_the_plan_moves_the_rest_in_order() {
    let report = run("stretched-cluster.toml", 1, None);
    let cluster = failovers(&report, "cluster");
    assert_eq!(cluster.len(), 1);
    assert_eq!(
        (cluster[0].from.as_str(), cluster[0].to.as_str()),
        ("node-east", "node-west")
    );
    let plan: Vec<(&str, Option<&str>)> = failovers(&report, "unplanned")
        .iter()
        .map(|failover| (failover.vm.as_str(), failover.plan.as_deref()))
        .collect();
    assert_eq!(
        plan,
        [
            ("erp-1", Some("erp, group 1")),
            ("erp-2", Some("erp, group 2"))
        ]
    );
}

#[test]
fn a_complete_site_outage_fails_over_fails_back_and_loses_only_what_followed_the_last_cut() {
    let report = run("site-outage.toml", 1, None);
    // Each VM: failed over, reversed, failed back; the VMM server first, the workload by plan.
    for vm in ["vmm-1", "sql-1", "web-1"] {
        let kinds: Vec<&str> = report
            .failovers
            .iter()
            .filter(|failover| failover.vm == vm)
            .map(|failover| failover.kind.as_str())
            .collect();
        assert_eq!(kinds, ["unplanned", "reverse", "planned"], "{vm}");
    }
    let unplanned: Vec<&str> = failovers(&report, "unplanned")
        .iter()
        .map(|f| f.vm.as_str())
        .collect();
    assert_eq!(unplanned, ["vmm-1", "sql-1", "web-1"]);
    for failover in &report.failovers {
        assert!(failover.problem.is_none(), "{failover:?}");
        match failover.kind.as_str() {
            "unplanned" => assert!(failover.checked && failover.rpo_seconds.is_some()),
            "planned" => assert!(failover.checked && failover.lost_bytes == 0, "{failover:?}"),
            _ => {}
        }
    }
    // Back home and replicating the original way.
    for vm in &report.vms {
        assert_eq!(vm.final_state, "Replicating", "{}", vm.name);
    }
    let back: Vec<&str> = failovers(&report, "planned")
        .iter()
        .map(|f| f.to.as_str())
        .collect();
    assert_eq!(back, ["hv-p1", "hv-p2", "hv-p2"]);
}

#[test]
fn verify_finds_a_flipped_bit_and_a_resynchronization_repairs_it() {
    let report = run("bit-rot.toml", 1, None);
    let flipped: u64 = report
        .faults
        .iter()
        .find_map(|(_, what)| what.split("at byte ").nth(1)?.parse().ok())
        .expect("a bit was flipped");
    let found = report.verifications[0].differing.clone().unwrap();
    let block = flipped / (64 << 10) * (64 << 10);
    assert_eq!(
        found,
        [(0, block, block + (64 << 10))],
        "flipped byte {flipped}"
    );
    assert_eq!(report.verifications[1].differing, Some(Vec::new()));
    assert!(report.vms[0].resync_differing_bytes >= 64 << 10);
}

#[test]
fn a_handover_over_a_flipped_bit_is_refused_the_disks_are_repaired_and_the_next_goes_through() {
    let report = run("handover-refused.toml", 1, None);
    let planned = failovers(&report, "planned");
    assert_eq!(planned.len(), 2, "{planned:?}");
    let refused = planned[0].problem.as_deref().unwrap_or_default();
    assert!(
        refused.contains("disk 0 differs from the primary's"),
        "the replica's own verification refused it: {refused}"
    );
    assert!(!planned[0].checked);
    // The refusal made the primary compare: the flipped block was shipped again.
    assert!(report.vms[0].resyncs >= 1);
    assert!(report.vms[0].resync_differing_bytes >= 64 << 10);
    // The second goes through, compared by the simulator against all the guest wrote.
    assert!(planned[1].problem.is_none(), "{:?}", planned[1]);
    assert!(planned[1].checked && planned[1].lost_bytes == 0);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[test]
fn a_handover_interrupted_at_its_point_of_no_return_is_settled_and_the_vm_runs_at_one_site() {
    let report = run("failback-interrupted.toml", 1, None);
    let planned = failovers(&report, "planned");
    let moves: Vec<(&str, &str)> = planned
        .iter()
        .map(|failover| (failover.from.as_str(), failover.to.as_str()))
        .collect();
    // The failback settled when the recovery host came back (its crash at 26 min, down 2 min);
    // the planned failover the other way took effect when the recovery host took the VM over
    // (46 min), and the first host, back at 48 min, asked who runs the VM and became its
    // replica; then one more failback with nothing interrupted.
    assert_eq!(
        moves,
        [("hv-r", "hv-p"), ("hv-p", "hv-r"), ("hv-r", "hv-p")],
        "{planned:?}"
    );
    assert!(
        (planned[0].seconds - 28.0 * 60.0).abs() < 1.0,
        "{planned:?}"
    );
    assert!(
        (planned[1].seconds - 46.0 * 60.0).abs() < 60.0,
        "{planned:?}"
    );
    for failover in &planned {
        assert!(failover.problem.is_none(), "{failover:?}");
        assert_eq!(failover.lost_bytes, 0, "{failover:?}");
    }
    let asked: Vec<f64> = failovers(&report, "reverse")
        .iter()
        .filter(|reverse| reverse.to == "hv-p")
        .map(|reverse| reverse.seconds)
        .collect();
    assert!(
        asked.iter().any(|at| (at - 48.0 * 60.0).abs() < 1.0),
        "the first host became the replica when it was back: {asked:?}"
    );
    assert_eq!(report.hosts.iter().map(|host| host.crashes).sum::<u64>(), 2);
    assert!(report.violations.is_empty(), "{:?}", report.violations);
}

#[test]
fn ten_vms_replicate_for_a_while() {
    let report = run("ten-vms.toml", 1, Some(Duration::from_secs(600)));
    assert_eq!(report.vms.len(), 10);
}

#[test]
fn the_same_seed_gives_the_same_trace_and_another_seed_does_not() {
    let duration = Some(Duration::from_secs(1800));
    let first = run("standalone-vmm.toml", 7, duration);
    let again = run("standalone-vmm.toml", 7, duration);
    let other = run("standalone-vmm.toml", 8, duration);
    assert_eq!(first.trace_hash, again.trace_hash);
    assert_eq!(first.vms, again.vms, "same seed, other figures");
    assert_eq!(first.failovers, again.failovers);
    assert_ne!(first.trace_hash, other.trace_hash);
}

/// Every scenario for a simulated day (`cargo test -p blockrep-sim -- --ignored`): the long
/// runs, left out of the suite for time.
#[test]
#[ignore = "long: every scenario for 24 simulated hours"]
fn every_scenario_for_a_day() {
    for file in scenario_files() {
        run(&file, 1, Some(Duration::from_secs(24 * 3600)));
    }
}
