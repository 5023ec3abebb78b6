//! `blockrep serve` and `blockrep protect` as real processes, on two lab hosts made of network
//! namespaces joined by a veth pair (shaped with tbf where bandwidth matters), and on loopback:
//! writes made by qemu-io over NBD reach the replica byte for byte, a cycle sends about what
//! changed, a link cut in the middle of a delta resumes from what the replica holds, an unknown
//! primary is refused for good, and a replica server killed in the middle of an apply recovers.
//!
//! The namespace tests need root and `ip`/`tc` (iproute2); where they cannot run they print
//! `SKIPPED <test>: <why>` and return. Every test needs qemu-img and qemu-io (qemu-utils): where
//! they are missing, it skips, except under CI, where that is a failure. Every process a test
//! starts is killed and waited for, and every namespace deleted, also when the test fails.

mod common;

use common::have_qemu;
use common::lab::*;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_primary_and_a_replica_on_two_lab_hosts_end_with_the_same_bytes() {
    let test = "a_primary_and_a_replica_on_two_lab_hosts_end_with_the_same_bytes";
    let Some((_lab, site, mut serve, mut protect)) = lab_hosts(test, 1, "64M", None) else {
        return;
    };
    let random = site.random_file("random.bin", 2 * MIB, 1);
    let random_write = format!("write -s {} 40M 2M", text(&random));
    let rounds: [&[&str]; 3] = [
        &["write -P 0x11 0 4M", "write -P 0x22 20M 3M", &random_write],
        &["write -z 1M 2M", "write -P 0x33 60M 1M", "discard 20M 1M"],
        &[
            "write -P 0x44 2M 512k",
            "write -P 0x55 41M 4k",
            "write -z 63M 1M",
            "discard 21M 1M",
        ],
    ];
    for round in rounds {
        site.nbd_io(round);
        site.wait_until_replicated(&[&protect, &serve]);
    }
    protect.stop();
    assert!(
        protect.log().contains("applied on the replica"),
        "{}",
        protect.tail()
    );
    serve.stop();
    site.assert_replica_equals_primary();
}

#[test]
fn a_cycle_on_a_shaped_link_sends_about_what_changed_not_the_whole_disk() {
    let test = "a_cycle_on_a_shaped_link_sends_about_what_changed_not_the_whole_disk";
    let Some((lab, site, mut serve, mut protect)) = lab_hosts(test, 2, "256M", Some("100mbit"))
    else {
        return;
    };
    // A little data first, so the disk is mostly, not only, zeros.
    site.nbd_io(&["write -P 0x5a 0 4M"]);
    site.wait_until_replicated(&[&protect, &serve]);
    let before = lab.tx_bytes();
    let random = site.random_file("random.bin", MIB, 2);
    site.nbd_io(&[&format!("write -s {} 100M 1M", text(&random))]);
    site.wait_until_replicated(&[&protect, &serve]);
    let sent = lab.tx_bytes() - before;
    eprintln!("{test}: {sent} bytes on the wire for 1 MiB of random data on a 256 MiB disk");
    assert!(
        sent >= MIB,
        "only {sent} bytes on the wire for 1 MiB of random data"
    );
    assert!(
        sent < 8 * MIB,
        "{sent} bytes on the wire for 1 MiB changed on a 256 MiB disk"
    );
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

#[test]
fn a_link_cut_in_the_middle_of_a_large_delta_resumes_from_what_the_replica_holds() {
    let test = "a_link_cut_in_the_middle_of_a_large_delta_resumes_from_what_the_replica_holds";
    let Some((lab, site, mut serve, mut protect)) = lab_hosts(test, 3, "128M", Some("100mbit"))
    else {
        return;
    };
    // 64 MiB that do not compress: several seconds at 100 Mbit/s.
    let random = site.random_file("random.bin", 64 * MIB, 3);
    site.nbd_io(&[&format!("write -s {} 32M 64M", text(&random))]);
    let partly = site.wait_for_primary(
        "a large delta partly shipped",
        &[&protect, &serve],
        |status| {
            let total = status["in_flight_bytes"].as_u64().unwrap_or(0);
            let pending = status["pending_bytes"].as_u64().unwrap_or(0);
            total >= 16 * MIB && pending >= 8 * MIB && total - pending >= 2 * MIB
        },
    );
    lab.set_link(false);
    // Longer than the QUIC idle timeout (10 s): the connection really drops.
    std::thread::sleep(Duration::from_secs(12));
    lab.set_link(true);
    let chunks = wait_for(
        "the primary to resume the delta in flight",
        WAIT,
        || format!("cut at {partly}\n{}{}", protect.tail(), serve.tail()),
        || resumed_chunks(&protect.log()).into_iter().max(),
    );
    assert!(
        chunks > 0,
        "resumed with no chunks held by the replica\n{}",
        protect.tail()
    );
    eprintln!(
        "{test}: link cut with {} of {} bytes pending; resumed with {chunks} chunks already on the replica",
        partly["pending_bytes"], partly["in_flight_bytes"]
    );
    site.wait_until_replicated(&[&protect, &serve]);
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

#[test]
fn a_primary_with_an_unknown_certificate_is_refused_for_good() {
    let site = Site::new("16M");
    let (mut serve, address) = site.serve(None, "127.0.0.1:0", "serve.log", None);
    // The server allows only "primary"; this one presents "stranger".
    let mut protect = site.protect(None, &address, "sid");
    let status = protect.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "protect with an unknown certificate exited with {status}\n{}",
        protect.tail()
    );
    assert!(
        protect.log().contains("authentication refused"),
        "protect's stderr does not say why it stopped\n{}",
        protect.tail()
    );
    let vms: Vec<PathBuf> = std::fs::read_dir(site.store())
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.is_dir())
        .collect();
    assert!(vms.is_empty(), "the store holds {vms:?}");
    // A first start refused leaves the disk as it found it: no journal, no marker.
    let beside: Vec<String> = std::fs::read_dir(site.path(""))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("disk.vhdx."))
        .collect();
    assert!(beside.is_empty(), "left beside the disk: {beside:?}");
    assert!(serve.poll().is_none(), "{}", serve.tail());
    serve.stop();
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "its crash points (BLOCKREP_CRASH_POINT) exist only in debug builds"
)]
fn a_replica_server_killed_during_an_apply_recovers_and_ends_equal_to_the_primary() {
    let test = "a_replica_server_killed_during_an_apply_recovers_and_ends_equal_to_the_primary";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let (mut crashing, address) = site.serve(
        None,
        "127.0.0.1:0",
        "serve-crashing.log",
        Some("replica-apply"),
    );
    let mut protect = site.protect(None, &address, "pid");
    site.wait_for_primary("initial replication", &[&protect, &crashing], |status| {
        sequence(status) >= 1 && status["pending_bytes"] == 0
    });
    // Several chunks in one changes delta: the server dies after applying the first.
    let random = site.random_file("random.bin", 3 * MIB, 4);
    site.nbd_io(&[
        "write -P 0x61 0 1M",
        "write -P 0x62 8M 2M",
        &format!("write -s {} 30M 3M", text(&random)),
        "write -z 8M 64k",
    ]);
    let written = sequence(&site.wait_for_primary("the primary's status", &[&protect], |_| true));
    let status = crashing.wait_exit(WAIT);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the server was to die by SIGKILL at the crash point, but: {status}\n{}",
        crashing.tail()
    );
    assert!(
        crashing.log().contains("BLOCKREP_CRASH_POINT"),
        "{}",
        crashing.tail()
    );
    // A disk between two deltas is still a sound VHDX.
    run_ok(Command::new("qemu-img").args(["check", text(&site.replica_disk())]));
    let crashed_at = sequence(&site.primary_status().unwrap_or_default());
    let (mut serve, _) = site.serve(None, &address, "serve.log", None);
    let target = written.max(crashed_at) + 2;
    site.wait_for_primary(
        "the primary to reconnect and catch up",
        &[&protect, &serve],
        |status| {
            sequence(status) >= target
                && status["pending_bytes"] == 0
                && status["connected"] == true
        },
    );
    assert!(
        serve
            .log()
            .contains("redoing a commit interrupted by a crash"),
        "{}",
        serve.tail()
    );
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

#[test]
fn a_suspended_primary_ships_nothing_until_it_is_resumed() {
    let test = "a_suspended_primary_ships_nothing_until_it_is_resumed";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("16M");
    let (mut serve, address) = site.serve(None, "127.0.0.1:0", "serve.log", None);
    let mut protect = site.protect(None, &address, "pid");
    site.wait_until_replicated(&[&serve, &protect]);
    run_ok(site.blockrep().args(["suspend", "vm1"]));
    let paused = site.wait_for_primary("the suspended state", &[&serve, &protect], |status| {
        status["state"] == "suspended"
    });
    site.nbd_io(&["write -P 0x5c 1M 2M"]);
    // Three intervals pass: nothing is cut, nothing is missed.
    std::thread::sleep(Duration::from_secs(3));
    let still = site.primary_status().unwrap();
    assert_eq!(
        sequence(&still),
        sequence(&paused),
        "a suspended primary shipped a delta"
    );
    assert_eq!(still["missed_cycles"], paused["missed_cycles"]);
    run_ok(site.blockrep().args(["resume", "vm1"]));
    site.wait_until_replicated(&[&serve, &protect]);
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

#[test]
fn a_test_failover_gives_the_disk_as_it_was_at_the_latest_or_an_older_point() {
    let test = "a_test_failover_gives_the_disk_as_it_was_at_the_latest_or_an_older_point";
    let Some((_lab, site, mut serve, mut protect)) = lab_hosts(test, 4, "64M", None) else {
        return;
    };
    // The disk as initial replication left it: recovery point 1 once the next delta lands.
    let at_initial = site.capture_through_nbd("at-initial.raw");
    let random = site.random_file("random.bin", 2 * MIB, 4);
    site.nbd_io(&[
        "write -P 0x21 0 8M",
        &format!("write -s {} 16M 2M", text(&random)),
    ]);
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -z 1M 1M", "write -P 0x43 40M 64k"]);
    site.wait_until_replicated(&[&serve, &protect]);
    let now = site.capture_through_nbd("now.raw");
    let points: serde_json::Value =
        serde_json::from_str(&run_ok(site.blockrep().args(["points", "vm1", "--json"]))).unwrap();
    let ids: Vec<u64> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|point| point["id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&1), "point 1 is not listed: {points}");
    let older = site.test_failover(&["--point", "1"], "older.raw");
    assert_same_bytes(&at_initial, &older);
    // One test failover per VM at a time.
    let second = site
        .blockrep()
        .args([
            "failover",
            "vm1",
            "--test",
            "--out",
            text(&site.path("second")),
        ])
        .output()
        .unwrap();
    assert!(!second.status.success(), "a second test failover was made");
    assert!(String::from_utf8_lossy(&second.stderr).contains("--cleanup"));
    run_ok(
        site.blockrep()
            .args(["failover", "vm1", "--test", "--cleanup"]),
    );
    assert!(
        !site.path("older.raw.out").exists(),
        "cleanup left the copy"
    );
    let latest = site.test_failover(&["--point", "latest"], "latest.raw");
    assert_same_bytes(&now, &latest);
    run_ok(
        site.blockrep()
            .args(["failover", "vm1", "--test", "--cleanup"]),
    );
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

#[test]
fn an_unplanned_failover_after_the_primary_dies_mid_delta_gives_its_last_shipped_cut() {
    let test = "an_unplanned_failover_after_the_primary_dies_mid_delta_gives_its_last_shipped_cut";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let (mut serve, address) = site.serve(None, "127.0.0.1:0", "serve.log", None);
    // Slowed down, so the primary can be killed while a delta is on its way.
    let mut protect = site.protect_with(None, &address, "pid", &["--max-rate", "16M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -P 0x61 0 2M", "write -z 8M 1M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    let last_shipped = site.capture_through_nbd("last-shipped.raw");
    let shipped = sequence(&site.primary_status().unwrap());
    let random = site.random_file("random.bin", 32 * MIB, 9);
    site.nbd_io(&[&format!("write -s {} 16M 32M", text(&random))]);
    site.wait_for_primary(
        "the big delta to be on its way",
        &[&serve, &protect],
        |status| status["pending_bytes"].as_u64().unwrap_or(0) > 0 && sequence(status) == shipped,
    );
    protect.signal(libc::SIGKILL);
    protect.wait_exit(WAIT);
    // The replica notices the dead primary (QUIC idle timeout), then fails over.
    wait_for(
        "the replica to see the primary gone",
        WAIT,
        || format!("{:?}\n{}", site.replica_status(), serve.tail()),
        || {
            site.replica_status()
                .filter(|status| status["connected"] == false)
        },
    );
    run_ok(site.blockrep().args(["failover", "vm1", "--unplanned"]));
    let failover = site
        .store()
        .join("vm1")
        .join("failover")
        .join("disk-0.vhdx");
    run_ok(Command::new("qemu-img").args(["check", text(&failover)]));
    let failed_over = site.path("failed-over.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-O",
        "raw",
        text(&failover),
        text(&failed_over),
    ]));
    assert_same_bytes(&last_shipped, &failed_over);
    let status = site.replica_status().unwrap();
    assert_eq!(
        status["failover"]["point"].as_u64(),
        Some(shipped),
        "{status}"
    );
    assert_eq!(status["failover"]["committed"], false, "{status}");
    // Committed, the failover is final: the old primary is not taken as primary again; it
    // waits to be told to replicate back.
    run_ok(site.blockrep().args(["failover", "vm1", "--commit"]));
    let mut returning = site.protect(None, &address, "pid");
    wait_for(
        "the old primary to be refused",
        WAIT,
        || returning.tail(),
        || returning.log().contains("blockrep reverse").then_some(()),
    );
    assert!(returning.poll().is_none(), "{}", returning.tail());
    let refused = site
        .primary_status()
        .expect("the old primary answers its status");
    assert_eq!(sequence(&refused), 0, "{refused}");
    assert!(
        refused["last_error"]
            .as_str()
            .is_some_and(|error| error.contains("runs at the replica site")),
        "{refused}"
    );
    returning.stop();
    serve.stop();
}

/// The old primary held 32 MiB the replica never got when it died; the replica site wrote
/// 1 MiB after the failover. Reverse replication compares by hash and ships exactly those
/// 33 MiB; then a planned failback, a planned failover and a failback again, each ending with
/// both sites equal and nothing lost.
#[test]
fn reverse_replication_after_an_unplanned_failover_ships_only_what_differs_then_fails_back() {
    let test =
        "reverse_replication_after_an_unplanned_failover_ships_only_what_differs_then_fails_back";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let (mut serve, address) = site.serve_hosting("127.0.0.1:0", "serve.log", None);
    let replica_nbd = site.hosted_nbd();
    let mut protect = site.protect(None, &address, "pid");
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -P 0x61 0 2M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    // Written on the primary, never shipped: it dies first.
    site.nbd_io(&["write -P 0x62 16M 32M"]);
    protect.signal(libc::SIGKILL);
    protect.wait_exit(WAIT);
    wait_for(
        "the replica to see the primary gone",
        WAIT,
        || format!("{:?}\n{}", site.replica_status(), serve.tail()),
        || {
            site.replica_status()
                .filter(|status| status["connected"] == false)
        },
    );
    run_ok(site.blockrep().args(["failover", "vm1", "--unplanned"]));
    run_ok(site.blockrep().args(["failover", "vm1", "--commit"]));
    // The VM runs at the replica site and writes there.
    nbd_io_at(&replica_nbd, &["write -P 0x63 56M 1M"]);
    run_ok(site.blockrep().args(["reverse", "vm1"]));
    let mut returning = site.protect(None, &address, "pid");
    let status = wait_for(
        "the resynchronization",
        WAIT,
        || {
            format!(
                "{:?}\n{}{}",
                site.replica_status(),
                serve.tail(),
                returning.tail()
            )
        },
        || {
            site.replica_status()
                .filter(|status| !status["reverse"]["resync"].is_null())
                .filter(|status| status["reverse"]["pending_bytes"] == 0)
                .filter(|status| sequence(&status["reverse"]) > 0)
        },
    );
    assert_eq!(
        status["reverse"]["resync"]["differing_bytes"].as_u64(),
        Some(33 * MIB),
        "only the old primary's unshipped 32 MiB and the 1 MiB written after the failover differ: {status}"
    );
    assert_eq!(
        status["reverse"]["resync"]["compared_bytes"].as_u64(),
        Some(64 * MIB)
    );
    wait_until_equal(&site, &[&serve, &returning]);
    // Failback: a planned failover from the replica site, replication back to it at once.
    nbd_io_at(&replica_nbd, &["write -P 0x64 60M 1M"]);
    planned_failover(&site, &[&serve, &returning]);
    site.wait_for_primary(
        "the VM to run on its first host again",
        &[&serve, &returning],
        |status| status["state"] == "replicating" && sequence(status) > 0,
    );
    site.nbd_io(&["write -P 0x65 4M 1M"]);
    site.wait_until_replicated(&[&serve, &returning]);
    let before_failover = site.capture_through_nbd("before-planned.raw");
    // A planned failover from the first host, and back.
    planned_failover(&site, &[&serve, &returning]);
    let at_replica = site.path("at-replica.raw");
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &format!("nbd+unix:///?socket={}", text(&replica_nbd)),
        text(&at_replica),
    ]));
    assert_same_bytes(&before_failover, &at_replica);
    wait_for_reverse(&site, &[&serve, &returning]);
    nbd_io_at(&replica_nbd, &["write -P 0x66 30M 1M"]);
    planned_failover(&site, &[&serve, &returning]);
    site.wait_for_primary(
        "the VM to run on its first host again",
        &[&serve, &returning],
        |status| status["state"] == "replicating" && sequence(status) > 0,
    );
    site.wait_until_replicated(&[&serve, &returning]);
    // Every write, at either site, at every step, whole: 16M..48M (but for the later write at
    // 30M) is what the old primary wrote and the unplanned failover dropped.
    site.assert_written_at_home(
        "after the round trip",
        &[
            (0..2 * MIB, 0x61),
            (4 * MIB..5 * MIB, 0x65),
            (16 * MIB..30 * MIB, 0x00),
            (30 * MIB..31 * MIB, 0x66),
            (31 * MIB..48 * MIB, 0x00),
            (56 * MIB..57 * MIB, 0x63),
            (60 * MIB..61 * MIB, 0x64),
        ],
    );
    returning.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "its crash points (BLOCKREP_CRASH_POINT) exist only in debug builds"
)]
fn a_failback_killed_on_either_side_runs_the_vm_once_and_loses_nothing() {
    let test = "a_failback_killed_on_either_side_runs_the_vm_once_and_loses_nothing";
    if !have_qemu(test) {
        return;
    }
    // The replica server, before the first host is asked to take the VM over and after it
    // has; then the first host, as it takes the VM over.
    for (crash_point, server) in [
        ("failback-final-delta-recorded", true),
        ("failback-taken-over", true),
        ("took-over-here", false),
    ] {
        killed_during_failback(crash_point, server);
    }
}

/// A failback during which the replica server (`server`) or the first host is killed at
/// `crash_point`: once restarted, the first host runs the VM, the server is its replica, and
/// nothing written at either site is lost.
fn killed_during_failback(crash_point: &str, server: bool) {
    let site = Site::new("64M");
    let (mut serve, address) = site.serve_hosting(
        "127.0.0.1:0",
        "serve-first.log",
        server.then_some(crash_point),
    );
    let replica_nbd = site.hosted_nbd();
    let mut protect =
        site.protect_command(None, &address, "pid", &[], (!server).then_some(crash_point));
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -P 0x61 0 2M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    // To the replica site and back: the VM writes there, then its first host takes it over,
    // and one side dies in the middle.
    planned_failover(&site, &[&serve, &protect]);
    wait_for_reverse(&site, &[&serve, &protect]);
    nbd_io_at(&replica_nbd, &["write -P 0x62 8M 1M"]);
    let mut failback = site
        .blockrep()
        .args(["failover", "vm1", "--planned", "--reverse"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let crashing = if server { &mut serve } else { &mut protect };
    let status = crashing.wait_exit(WAIT);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{crash_point}: the process was to die there, but: {status}\n{}",
        crashing.tail()
    );
    if server {
        // Restarted, the server is the VM's replica: the first host runs the VM and
        // replicates to it, instead of being told to be the replica of a VM the server
        // would run too.
        serve = site.serve_hosting(&address, "serve.log", None).0;
    } else {
        protect = site.protect(None, &address, "pid");
    }
    site.wait_for_primary(
        "the first host to run the VM, replicating to the replica server",
        &[&serve, &protect],
        |status| status["state"] == "replicating" && status["connected"] == true,
    );
    // It may fail (its server died under it); what counts is how the sites end.
    let ended = wait_for(
        "the failback command to end",
        WAIT,
        || serve.tail(),
        || failback.try_wait().unwrap(),
    );
    assert!(
        serve.log().contains("failback done"),
        "{crash_point} (the failback command ended: {ended}): {}",
        serve.tail()
    );
    assert!(
        !serve.log().contains("cannot settle"),
        "{crash_point}: {}",
        serve.tail()
    );
    let replica = site.replica_status().expect("the replica server's status");
    assert!(replica["failover"].is_null(), "{crash_point}: {replica}");
    assert!(
        replica["applied_sequence"].as_u64() > Some(0),
        "{crash_point}: {replica}"
    );
    site.nbd_io(&["write -P 0x63 16M 1M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    // Nothing written at either site was lost.
    site.assert_written_at_home(crash_point, WRITTEN_AT_BOTH_SITES);
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

#[test]
fn a_first_host_restarted_after_handing_its_vm_over_serves_its_disks_to_no_one() {
    let test = "a_first_host_restarted_after_handing_its_vm_over_serves_its_disks_to_no_one";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let (mut serve, address) = site.serve_hosting("127.0.0.1:0", "serve.log", None);
    let mut protect = site.protect(None, &address, "pid");
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -P 0x61 0 2M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    // Handed over without replication back: the agent ends, and its host keeps nothing
    // running.
    allow_handover(&site);
    run_ok(site.blockrep().args(["failover", "vm1", "--planned"]));
    let ended = protect.wait_exit(WAIT);
    assert!(ended.success(), "{ended}\n{}", protect.tail());
    nbd_io_at(&site.hosted_nbd(), &["write -P 0x62 8M 1M"]);
    // Started again, it asks the other site before serving its disks, which would let a
    // second copy of the VM write: it waits while the VM runs there.
    let mut returning = site.protect(None, &address, "pid");
    wait_for(
        "the agent to wait for the other site",
        WAIT,
        || returning.tail(),
        || returning.log().contains("served to no one").then_some(()),
    );
    // Past a retry or two, still nothing served.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !returning.log().contains("disks served over NBD"),
        "{}",
        returning.tail()
    );
    // Once the VM replicates back, the host is its replica; a failback makes it the
    // primary again, and everything written at both sites is there.
    run_ok(site.blockrep().args(["reverse", "vm1"]));
    wait_for_reverse(&site, &[&serve, &returning]);
    planned_failover(&site, &[&serve, &returning]);
    site.wait_for_primary(
        "the VM to run on its first host again",
        &[&serve, &returning],
        |status| status["state"] == "replicating" && status["connected"] == true,
    );
    site.nbd_io(&["write -P 0x63 16M 1M"]);
    site.wait_until_replicated(&[&serve, &returning]);
    site.assert_written_at_home(test, WRITTEN_AT_BOTH_SITES);
    returning.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

/// What the failback tests write: at the first host, at the replica site, at the first host.
const WRITTEN_AT_BOTH_SITES: &[(std::ops::Range<u64>, u8)] = &[
    (0..2 * MIB, 0x61),
    (8 * MIB..9 * MIB, 0x62),
    (16 * MIB..17 * MIB, 0x63),
];

/// Extended replication: the replica server passes each VM on to a third site, which ends
/// equal to the primary; the replica shows the onward replication's health.
#[test]
fn a_replica_server_replicates_onward_to_a_third_site() {
    let test = "a_replica_server_replicates_onward_to_a_third_site";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    // The third site: its own store, identity "sid", allowing the replica server's.
    let third_store = site.path("store-c");
    let mut command = site.blockrep();
    command.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        text(&third_store),
        "--identity",
        text(&site.path("sid")),
        "--allow",
        text(&site.path("rid").join("identity.crt")),
    ]);
    let mut third = Daemon::spawn(
        "blockrep serve (third site)",
        command,
        site.path("third.log"),
    );
    let third_address = wait_for(
        "the third site to listen",
        WAIT,
        || third.tail(),
        || {
            let log = third.log();
            let line = log
                .lines()
                .find(|line| line.contains("serving replicas in"))?;
            Some(line.rsplit(" on ").next()?.trim().to_owned())
        },
    );
    let (mut serve, address) = site.serve_with(
        "127.0.0.1:0",
        &[
            "--extend-to",
            &third_address,
            "--extend-trust",
            text(&site.path("sid").join("identity.crt")),
            "--extend-frequency",
            "1s",
        ],
    );
    let mut protect = site.protect(None, &address, "pid");
    site.wait_until_replicated(&[&serve, &protect, &third]);
    let random = site.random_file("random.bin", 8 * MIB, 3);
    site.nbd_io(&[
        "write -P 0x41 0 3M",
        &format!("write -s {} 20M 8M", text(&random)),
        "write -z 1M 64k",
    ]);
    let shipped = site.wait_until_replicated(&[&serve, &protect, &third]);
    let status = wait_for(
        "the third site to catch up",
        WAIT,
        || {
            format!(
                "{:?}\n{}{}",
                site.replica_status_at(&address),
                serve.tail(),
                third.tail()
            )
        },
        || {
            site.replica_status_at(&address).filter(|status| {
                status["applied_sequence"].as_u64() >= Some(shipped)
                    && sequence(&status["extended"]) > 0
                    && status["extended"]["pending_bytes"] == 0
                    && status["extended"]["seconds_since_replication"]
                        .as_f64()
                        .is_some_and(|seconds| seconds < 1.0)
            })
        },
    );
    assert_eq!(
        status["extended"]["replica"],
        third_address.as_str(),
        "{status}"
    );
    let human = run_ok(site.blockrep().args(["status"]));
    assert!(human.contains("extended to:"), "{human}");
    protect.stop();
    // The third site catches up with the replica: its onward deltas stop changing once the
    // replica gets nothing new (onward cuts follow the primary's deltas).
    let settled = wait_for(
        "the third site to take the replica's last delta",
        WAIT,
        || serve.tail(),
        || {
            let before = site.replica_status_at(&address)?;
            std::thread::sleep(Duration::from_millis(2500));
            let after = site.replica_status_at(&address)?;
            (sequence(&before["extended"]) == sequence(&after["extended"])
                && after["extended"]["pending_bytes"] == 0)
                .then_some(after)
        },
    );
    assert!(sequence(&settled["extended"]) > 1, "{settled}");
    serve.stop();
    third.stop();
    let third_disk = third_store.join("vm1").join("disk-0.vhdx");
    run_ok(Command::new("qemu-img").args(["check", text(&third_disk)]));
    let (primary_raw, third_raw) = (site.path("primary.raw"), site.path("third.raw"));
    for (image, raw) in [(site.disk(), &primary_raw), (third_disk, &third_raw)] {
        run_ok(Command::new("qemu-img").args(["convert", "-O", "raw", text(&image), text(raw)]));
    }
    assert_same_bytes(&primary_raw, &third_raw);
}

/// A recovery plan with two groups, the second behind a failing pre-script, run against real
/// daemons: the planned run fails the first VM over and stops at the script, saying so, with
/// the second VM still replicating from its primary; the unplanned run (its primary killed)
/// goes on past the script and fails the second VM over, and reports the failure.
#[test]
fn a_recovery_plan_stops_a_planned_run_at_a_failing_script_and_not_an_unplanned_one() {
    let test = "a_recovery_plan_stops_a_planned_run_at_a_failing_script_and_not_an_unplanned_one";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let (mut serve, address) =
        site.serve_with("127.0.0.1:0", &["--nbd-dir", text(&site.path("nbd-b"))]);
    let mut first = site.protect(None, &address, "pid");
    // A second VM with its own disk.
    let second_disk = site.path("disk2.vhdx");
    run_ok(
        site.blockrep()
            .args(["image", "create", text(&second_disk), "--size", "32M"]),
    );
    let mut command = site.blockrep();
    command.args([
        "protect",
        "--name",
        "vm2",
        "--disk",
        text(&second_disk),
        "--replica",
        &address,
        "--identity",
        text(&site.path("pid")),
        "--trust",
        text(&site.path("rid").join("identity.crt")),
        "--frequency",
        "1s",
    ]);
    let mut second = Daemon::spawn("blockrep protect vm2", command, site.path("protect2.log"));
    site.wait_until_replicated(&[&serve, &first, &second]);
    let vm_status = |vm: &str| -> Option<serde_json::Value> {
        let output = site.blockrep().args(["status", "--json"]).output().ok()?;
        let answers: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        answers
            .as_array()?
            .iter()
            .filter(|answer| answer["role"] == "primary")
            .find_map(|answer| {
                answer["vms"]
                    .as_array()?
                    .iter()
                    .find(|entry| entry["vm"] == vm)
                    .cloned()
            })
    };
    wait_for(
        "vm2's initial replication",
        WAIT,
        || second.tail(),
        || vm_status("vm2").filter(|status| sequence(status) >= 1 && status["pending_bytes"] == 0),
    );
    let plan = site.path("plan.toml");
    std::fs::write(
        &plan,
        r#"name = "lab"
[[group]]
name = "first"
vms = ["vm1"]
[[group]]
name = "second"
vms = ["vm2"]
[[group.pre]]
name = "check the second site"
script = "echo checking; exit 3"
timeout = "10s"
"#,
    )
    .unwrap();
    allow_handover(&site);
    let planned = site
        .blockrep()
        .args(["plan", "run", text(&plan), "--planned", "--json"])
        .output()
        .unwrap();
    assert_eq!(planned.status.code(), Some(1), "{planned:?}");
    let report: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    assert_eq!(
        report["vms_failed_over"],
        serde_json::json!(["vm1"]),
        "{report}"
    );
    let stopped = report["stopped_at"]
        .as_u64()
        .expect("the run says where it stopped") as usize;
    let step = &report["steps"][stopped - 1];
    assert_eq!(step["name"], "check the second site", "{report}");
    assert_eq!(step["outcome"], "failed", "{report}");
    assert!(
        report["steps"].as_array().unwrap()[stopped..]
            .iter()
            .all(|step| step["outcome"] == "skipped"),
        "{report}"
    );
    // vm1 runs at the replica site now; vm2 still replicates from its primary.
    assert!(site.path("nbd-b").join("vm1.sock").exists());
    let before = sequence(&vm_status("vm2").unwrap());
    wait_for(
        "vm2 to go on replicating",
        WAIT,
        || second.tail(),
        || vm_status("vm2").filter(|status| sequence(status) > before),
    );
    // The primary of vm2 dies; the unplanned run goes past the failing script.
    second.signal(libc::SIGKILL);
    second.wait_exit(WAIT);
    wait_for(
        "the replica to see vm2's primary gone",
        WAIT,
        || serve.tail(),
        || {
            let output = site.blockrep().args(["status", "--json"]).output().ok()?;
            let answers: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            answers
                .as_array()?
                .iter()
                .filter(|answer| {
                    answer["role"] == "replica" && answer["listen"] == address.as_str()
                })
                .flat_map(|answer| answer["vms"].as_array().cloned().unwrap_or_default())
                .find(|entry| entry["vm"] == "vm2" && entry["connected"] == false)
        },
    );
    let unplanned = site
        .blockrep()
        .args(["plan", "run", text(&plan), "--unplanned", "--json"])
        .output()
        .unwrap();
    assert_eq!(unplanned.status.code(), Some(1), "{unplanned:?}");
    let report: serde_json::Value = serde_json::from_slice(&unplanned.stdout).unwrap();
    assert!(report["stopped_at"].is_null(), "{report}");
    assert!(
        report["vms_failed_over"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("vm2")),
        "{report}"
    );
    let script = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["name"] == "check the second site")
        .unwrap();
    assert_eq!(script["outcome"], "failed", "{report}");
    first.stop();
    serve.stop();
}

/// Tracking is lost (the journal deleted) while the disk changed behind blockrep's back: the
/// next start compares by hash and ships exactly the 3 MiB that differ, not the disk; a
/// recovery point from before still opens and is still right. `verify` then finds a byte
/// flipped in the replica and names its 64 KiB block; `resync` mends it.
#[test]
fn lost_tracking_resynchronizes_by_hash_and_verify_finds_a_flipped_byte() {
    let test = "lost_tracking_resynchronizes_by_hash_and_verify_finds_a_flipped_byte";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let policy = ["--recovery-point-interval", "1s"];
    let (mut serve, address) = site.serve_with("127.0.0.1:0", &policy);
    let mut protect = site.protect(None, &address, "pid");
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -P 0x51 0 4M"]);
    let point = site.wait_until_replicated(&[&serve, &protect]);
    let before = site.capture_through_nbd("before.raw");
    // A few cycles with nothing new: states equal to `before`, one a second kept as points.
    std::thread::sleep(Duration::from_secs(3));
    protect.stop();
    // Every state from `point` to the last before the stop holds `before`.
    let last = sequence(&site.replica_status().unwrap());
    // Behind blockrep's back: 3 MiB changed, and the journal gone.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "vhdx",
        text(&site.disk()),
        "-c",
        "write -P 0x77 10M 3M",
    ]));
    std::fs::remove_file(site.path("disk.vhdx.brtrack")).unwrap();
    let mut protect = site.protect(None, &address, "pid");
    let status = site.wait_for_primary("the resynchronization", &[&serve, &protect], |status| {
        status["resync"].is_object()
            && status["pending_bytes"] == 0
            && sequence(status) > last
            && status["last_delta_bytes"].as_u64() > Some(0)
    });
    assert_eq!(
        status["resync"]["differing_bytes"].as_u64(),
        Some(3 * MIB),
        "{status}"
    );
    assert_eq!(
        status["resync"]["compared_bytes"].as_u64(),
        Some(64 * MIB),
        "{status}"
    );
    assert_eq!(
        status["last_delta_bytes"].as_u64(),
        Some(3 * MIB),
        "the resync shipped other than what differs: {status}"
    );
    site.wait_until_replicated(&[&serve, &protect]);
    let verified = site.blockrep().args(["verify", "vm1"]).output().unwrap();
    assert!(verified.status.success(), "{verified:?}");
    // A point from before the resync.
    let listed = run_ok(site.blockrep().args(["points", "vm1", "--json"]));
    let points: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let kept = points
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["latest"] == false)
        .filter_map(|entry| entry["id"].as_u64())
        .filter(|id| (point..=last).contains(id))
        .max()
        .unwrap_or_else(|| panic!("no point between {point} and {last} is kept: {points}"));
    let older = site.test_failover(&["--point", &kept.to_string()], "older.raw");
    assert_same_bytes(&before, &older);
    run_ok(
        site.blockrep()
            .args(["failover", "vm1", "--test", "--cleanup"]),
    );
    // A byte of the replica rots while its server is down: its stamp cannot see that (a write
    // by another program would be caught at the server's start and compared at once).
    serve.stop();
    rot_byte(&site.replica_disk(), 5 * MIB);
    let (mut serve, _) = site.serve_with(&address, &policy);
    site.wait_until_replicated(&[&serve, &protect]);
    let verified = site
        .blockrep()
        .args(["verify", "vm1", "--json"])
        .output()
        .unwrap();
    assert_eq!(verified.status.code(), Some(1), "{verified:?}");
    let report: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(
        report["differing"],
        serde_json::json!([[0, {"start": 5 * MIB, "end": 5 * MIB + 65536}]]),
        "{report}"
    );
    run_ok(site.blockrep().args(["resync", "vm1"]));
    site.wait_for_primary(
        "the second resynchronization",
        &[&serve, &protect],
        |status| {
            status["resync"]["differing_bytes"].as_u64() == Some(65536)
                && status["pending_bytes"] == 0
        },
    );
    site.wait_until_replicated(&[&serve, &protect]);
    let verified = site.blockrep().args(["verify", "vm1"]).output().unwrap();
    assert!(verified.status.success(), "{verified:?}");
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

/// A replica seeded from an older copy of the disk (converted to raw, so even its disk id
/// differs) converges to the primary byte for byte, shipping only the 2 MiB written since the
/// copy was taken, and replication goes on from there.
#[test]
fn a_replica_seeded_from_an_older_copy_ships_only_what_changed_since() {
    let test = "a_replica_seeded_from_an_older_copy_ships_only_what_changed_since";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let disk = site.disk();
    let io = |command: &str| {
        run_ok(Command::new("qemu-io").args(["-f", "vhdx", text(&disk), "-c", command]));
    };
    io("write -P 0x11 0 8M");
    let copy = site.path("copy.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-O", "raw", text(&disk), text(&copy)]));
    io("write -P 0x22 20M 2M");
    run_ok(site.blockrep().args([
        "seed",
        "--store",
        text(&site.store()),
        "--name",
        "vm1",
        "--disk",
        text(&copy),
        "--primary",
        text(&site.path("pid").join("identity.crt")),
    ]));
    let (mut serve, address) = site.serve(None, "127.0.0.1:0", "serve.log", None);
    let mut protect = site.protect_with(None, &address, "pid", &["--initial", "existing"]);
    let status = site.wait_for_primary("the comparison", &[&serve, &protect], |status| {
        status["resync"].is_object()
            && status["pending_bytes"] == 0
            && sequence(status) >= 2
            && status["last_delta_bytes"].as_u64() > Some(0)
    });
    assert_eq!(
        status["resync"]["differing_bytes"].as_u64(),
        Some(2 * MIB),
        "{status}"
    );
    assert_eq!(
        status["last_delta_bytes"].as_u64(),
        Some(2 * MIB),
        "{status}"
    );
    site.nbd_io(&["write -P 0x33 40M 1M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

/// A resynchronization owed outside its window waits (and says why in the status); started
/// again without the window, it runs.
#[test]
fn a_resynchronization_waits_for_its_window() {
    let test = "a_resynchronization_waits_for_its_window";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("16M");
    let (mut serve, address) = site.serve(None, "127.0.0.1:0", "serve.log", None);
    let mut protect = site.protect(None, &address, "pid");
    let replicated = site.wait_until_replicated(&[&serve, &protect]);
    protect.stop();
    std::fs::remove_file(site.path("disk.vhdx.brtrack")).unwrap();
    // A window that does not hold now: two hours from now, for an hour (local time).
    let output = run_ok(Command::new("date").arg("+%H"));
    let hour: u32 = output.trim().parse().unwrap();
    let window = format!("{:02}:00-{:02}:00", (hour + 2) % 24, (hour + 3) % 24);
    let mut waiting = site.protect_with(None, &address, "pid", &["--resync-window", &window]);
    let status = site.wait_for_primary("the wait for the window", &[&serve, &waiting], |status| {
        status["last_error"]
            .as_str()
            .is_some_and(|error| error.contains("window"))
    });
    assert_eq!(status["state"], "resynchronization_required", "{status}");
    assert_eq!(sequence(&status), 0, "{status}");
    waiting.stop();
    let mut protect = site.protect(None, &address, "pid");
    site.wait_for_primary("the resynchronization", &[&serve, &protect], |status| {
        status["resync"].is_object() && sequence(status) > replicated
    });
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

/// A resynchronization killed while its delta is on the way (the primary SIGKILLed) is not
/// forgotten: the next start compares again and finishes, and the replica ends equal.
#[test]
fn a_resynchronization_killed_halfway_continues_and_finishes() {
    let test = "a_resynchronization_killed_halfway_continues_and_finishes";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let (mut serve, address) = site.serve(None, "127.0.0.1:0", "serve.log", None);
    let mut protect = site.protect(None, &address, "pid");
    site.wait_until_replicated(&[&serve, &protect]);
    protect.stop();
    // 24 MiB of random data behind blockrep's back, and the journal gone.
    let random = site.random_file("random.bin", 24 * MIB, 5);
    run_ok(Command::new("qemu-io").args([
        "-f",
        "vhdx",
        text(&site.disk()),
        "-c",
        &format!("write -s {} 8M 24M", text(&random)),
    ]));
    std::fs::remove_file(site.path("disk.vhdx.brtrack")).unwrap();
    // Slowed to 4 MiB/s, so the primary dies with the resync delta half shipped.
    let mut slow = site.protect_with(None, &address, "pid", &["--max-rate", "4M"]);
    site.wait_for_primary("the resync delta on its way", &[&serve, &slow], |status| {
        status["resync"].is_object()
            && status["in_flight_bytes"].as_u64() == Some(24 * MIB)
            && status["pending_bytes"]
                .as_u64()
                .is_some_and(|pending| pending < 20 * MIB)
    });
    slow.signal(libc::SIGKILL);
    slow.wait_exit(WAIT);
    let mut protect = site.protect(None, &address, "pid");
    let status = site.wait_for_primary(
        "the resynchronization to finish",
        &[&serve, &protect],
        |status| {
            status["resync"].is_object()
                && status["pending_bytes"] == 0
                && status["last_delta_bytes"].as_u64() > Some(0)
        },
    );
    assert_eq!(
        status["resync"]["differing_bytes"].as_u64(),
        Some(24 * MIB),
        "{status}"
    );
    site.wait_until_replicated(&[&serve, &protect]);
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

/// `GET path` on `address`: the status line and the body.
fn http_get(address: &str, path: &str) -> (String, String) {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The value of the sample `name` (with its labels) in exposition `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn free_tcp_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn metrics_endpoints_give_what_status_gives_as_prometheus_text() {
    let test = "metrics_endpoints_give_what_status_gives_as_prometheus_text";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("16M");
    let (serve_metrics, protect_metrics) = (free_tcp_address(), free_tcp_address());
    let (mut serve, address) = site.serve_with("127.0.0.1:0", &["--metrics", &serve_metrics]);
    let mut protect = site.protect_with(None, &address, "pid", &["--metrics", &protect_metrics]);
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -P 0x21 0 1M"]);
    let applied = site.wait_until_replicated(&[&serve, &protect]);
    let (status, primary) = http_get(&protect_metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    let scraped = sample(&primary, "blockrep_primary_applied_sequence{vm=\"vm1\"}")
        .unwrap_or_else(|| panic!("{primary}"));
    assert!(scraped >= applied as f64, "{scraped} < {applied}");
    assert_eq!(
        sample(&primary, "blockrep_primary_health{vm=\"vm1\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&primary, "blockrep_primary_connections"), Some(1.0));
    assert!(
        sample(
            &primary,
            "blockrep_primary_bytes_before_compression_total{vm=\"vm1\"}"
        )
        .is_some_and(|bytes| bytes >= MIB as f64),
        "{primary}"
    );
    let (status, replica) = http_get(&serve_metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(
        sample(&replica, "blockrep_replica_applied_sequence{vm=\"vm1\"}")
            .is_some_and(|sequence| sequence >= applied as f64),
        "{replica}"
    );
    assert_eq!(sample(&replica, "blockrep_replica_connections"), Some(1.0));
    // Apply throughput: bytes staged over seconds applying, both counters.
    assert!(
        replica.contains("# TYPE blockrep_replica_staged_bytes_total counter"),
        "{replica}"
    );
    assert!(
        sample(&replica, "blockrep_replica_staged_bytes_total{vm=\"vm1\"}")
            .is_some_and(|bytes| bytes > 0.0),
        "{replica}"
    );
    assert!(
        sample(&replica, "blockrep_replica_apply_seconds_total{vm=\"vm1\"}")
            .is_some_and(|seconds| seconds > 0.0),
        "{replica}"
    );
    let (status, _) = http_get(&serve_metrics, "/elsewhere");
    assert!(status.contains("404"), "{status}");
    protect.stop();
    serve.stop();
}

/// The files in the site's directory (logs and sockets aside), to show a refused command
/// created nothing.
fn site_files(site: &Site) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(site.path(""))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".log") && !name.ends_with(".sock"))
        .collect();
    names.sort();
    names
}

/// Runs a command that must be refused; gives what it printed.
fn run_refused(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success(),
        "{command:?} was not refused: {text}"
    );
    text
}

/// One owner per disk and per store: a second `protect` of a disk that another one serves, a
/// second `serve` on a store in use, and qemu-io writing the disk under blockrep are refused,
/// the holder named, nothing created; the first daemons go on and the replica stays equal.
#[test]
fn a_second_user_of_a_disk_or_a_store_is_refused_with_the_holder_named() {
    let test = "a_second_user_of_a_disk_or_a_store_is_refused_with_the_holder_named";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let (mut serve, address) = site.serve(None, "127.0.0.1:0", "serve.log", None);
    let mut protect = site.protect(None, &address, "pid");
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -P 0x71 0 1M"]);
    let before = site_files(&site);

    let second = run_refused(site.blockrep().args([
        "protect",
        "--name",
        "vm1b",
        "--disk",
        text(&site.disk()),
        "--replica",
        &address,
        "--identity",
        text(&site.path("pid")),
        "--trust",
        text(&site.path("rid").join("identity.crt")),
        "--nbd",
        &format!("unix:{}", text(&site.path("vm1b.sock"))),
    ]));
    let holder = format!("in use by process {}", protect.child.id());
    assert!(
        second.contains(&holder) && second.contains("protect"),
        "{second}"
    );

    let other_server = run_refused(site.blockrep().args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--store",
        text(&site.store()),
        "--identity",
        text(&site.path("rid")),
        "--allow",
        text(&site.path("pid").join("identity.crt")),
    ]));
    let holder = format!("in use by process {}", serve.child.id());
    assert!(
        other_server.contains("replica store") && other_server.contains(&holder),
        "{other_server}"
    );

    // qemu sees the lock too: a write under blockrep would never be tracked.
    let qemu = run_refused(Command::new("qemu-io").args([
        "-f",
        "vhdx",
        "-c",
        "write -P 0x72 0 4k",
        text(&site.disk()),
    ]));
    assert!(qemu.contains("lock"), "{qemu}");
    assert_eq!(site_files(&site), before, "a refused command left files");

    // The same name again, for another disk: refused before that disk is touched.
    let other = site.path("other.vhdx");
    run_ok(Command::new("qemu-img").args(["create", "-f", "vhdx", text(&other), "16M"]));
    let before = site_files(&site);
    let same_name = run_refused(site.blockrep().args([
        "protect",
        "--name",
        "vm1",
        "--disk",
        text(&other),
        "--replica",
        &address,
        "--identity",
        text(&site.path("pid")),
        "--trust",
        text(&site.path("rid").join("identity.crt")),
        "--nbd",
        &format!("unix:{}", text(&site.path("vm1b.sock"))),
    ]));
    assert!(
        same_name.contains("another `blockrep protect` of this name"),
        "{same_name}"
    );

    // A server whose port is taken makes no store.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let no_port = run_refused(site.blockrep().args([
        "serve",
        "--listen",
        &port,
        "--store",
        text(&site.path("new-store")),
        "--identity",
        text(&site.path("rid")),
        "--allow",
        text(&site.path("pid").join("identity.crt")),
    ]));
    assert!(no_port.contains("cannot listen"), "{no_port}");
    assert_eq!(site_files(&site), before, "a refused command left files");

    site.nbd_io(&["write -P 0x73 8M 1M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

/// A replica disk written by another program while the server was stopped is found at the
/// server's start (its DataWriteGuid moved): the primary is made to compare by hash, the
/// difference ships, and the replica ends equal to the primary.
#[test]
fn a_replica_disk_changed_outside_blockrep_is_repaired_by_a_comparison() {
    let test = "a_replica_disk_changed_outside_blockrep_is_repaired_by_a_comparison";
    if !have_qemu(test) {
        return;
    }
    let site = Site::new("64M");
    let (mut serve, address) = site.serve(None, "127.0.0.1:0", "serve.log", None);
    let mut protect = site.protect(None, &address, "pid");
    site.wait_until_replicated(&[&serve, &protect]);
    site.nbd_io(&["write -P 0x41 0 2M"]);
    site.wait_until_replicated(&[&serve, &protect]);
    serve.stop();
    run_ok(Command::new("qemu-io").args([
        "-f",
        "vhdx",
        "-c",
        "write -P 0x5a 1M 64k",
        text(&site.replica_disk()),
    ]));
    let (mut serve, _) = site.serve(None, &address, "serve-again.log", None);
    let status = site.wait_for_primary(
        "the primary to compare and ship the difference",
        &[&serve, &protect],
        |status| {
            status["resync"]["differing_bytes"]
                .as_u64()
                .is_some_and(|bytes| bytes > 0)
        },
    );
    assert_eq!(
        status["resync"]["differing_bytes"].as_u64(),
        Some(64 << 10),
        "only the block written outside differs: {status}"
    );
    assert!(
        serve.log().contains("changed outside blockrep"),
        "{}",
        serve.tail()
    );
    site.wait_until_replicated(&[&serve, &protect]);
    protect.stop();
    serve.stop();
    site.assert_replica_equals_primary();
}

/// Flips the byte of a VHDX file where virtual byte `at` is stored, behind every header: what
/// bit rot does (the DataWriteGuid stays).
fn rot_byte(image: &Path, at: u64) {
    use blockrep::image::{Access, VhdxImage};
    use std::os::unix::fs::FileExt;
    let storage = blockrep::io::FileStorage::open(image, false).unwrap();
    let offset = VhdxImage::open(storage, "replica", Access::ReadOnly)
        .unwrap()
        .file_offset(at)
        .unwrap()
        .unwrap_or_else(|| panic!("virtual byte {at} is not stored in {}", image.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 1;
    file.write_all_at(&byte, offset).unwrap();
}
