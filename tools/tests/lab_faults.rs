//! Faults end to end, with `blockrep serve` and `blockrep protect` as real processes: a replica
//! store that fills up in the middle of a delta (a small tmpfs mounted by the test), and both
//! daemons killed with SIGKILL at seeded random moments during replication, failover and
//! failback.
//!
//! The store tests need root (a mount, network namespaces), the kill test runs on loopback; all
//! need qemu-img/qemu-io. Where they cannot run they print `SKIPPED <test>: <why>` and return
//! (missing qemu under CI is a failure). Every process
//! a test starts is killed and waited for, every mount undone and every namespace deleted, also
//! when the test fails.
//!
//! The kill test runs `BLOCKREP_SOAK_ROUNDS` rounds (10 by default) from `BLOCKREP_SOAK_SEED`
//! (by default one taken from the clock, printed so a failing run can be replayed). With
//! `BLOCKREP_KEEP_FAILED_LABS` set, a failed test's files (the daemons' logs, store and disks)
//! are kept and their directory printed.

mod common;

use common::have_qemu;
use common::lab::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A size-limited tmpfs mounted over a directory; dropping it unmounts it (lazily when still
/// busy, so a failing test never leaves a mount behind).
struct SmallFilesystem {
    mount_point: PathBuf,
}

impl SmallFilesystem {
    /// Mounts a tmpfs of `size` at `mount_point` (made if missing), or says why the test
    /// skips and gives `None`.
    fn mount(test: &str, mount_point: &Path, size: &str) -> Option<SmallFilesystem> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED {test}: mounting a small filesystem needs root");
            return None;
        }
        std::fs::create_dir_all(mount_point).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("blockrep-test")
            .arg(mount_point)
            .output();
        match output {
            Ok(output) if output.status.success() => Some(SmallFilesystem {
                mount_point: mount_point.to_owned(),
            }),
            Ok(output) => {
                eprintln!(
                    "SKIPPED {test}: cannot mount a tmpfs: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(error) => {
                eprintln!("SKIPPED {test}: cannot run `mount` ({error})");
                None
            }
        }
    }

    /// Bytes an unprivileged writer may still put on the filesystem.
    fn free_bytes(&self) -> u64 {
        let path = std::ffi::CString::new(text(&self.mount_point)).unwrap();
        // SAFETY: statvfs is given a NUL-terminated path and a zeroed struct to fill.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        let result = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
        assert_eq!(result, 0, "statvfs {}", self.mount_point.display());
        stats.f_bavail * stats.f_frsize
    }

    /// Fills the filesystem with a file named `name` until only `left` bytes are free; gives
    /// the file.
    fn fill_leaving(&self, name: &str, left: u64) -> PathBuf {
        use std::io::Write;
        let path = self.mount_point.join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        let free = self.free_bytes();
        assert!(free > left, "only {free} bytes free, {left} to leave");
        // Non-zero bytes: a filesystem could keep zeros as holes.
        let piece = vec![0xa5u8; MIB as usize];
        let mut remaining = free - left;
        while remaining > 0 {
            let length = remaining.min(MIB) as usize;
            file.write_all(&piece[..length]).unwrap();
            remaining -= length as u64;
        }
        file.sync_all().unwrap();
        path
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.mount_point)
            .output()
            .is_ok_and(|output| output.status.success());
        if !unmounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .output();
        }
    }
}

/// The lines of `log` that say a delta of `kind` was applied on the replica.
fn applied_of_kind(log: &str, kind: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("applied on the replica") && line.contains(kind))
        .count()
}

/// The replica's disk as it is now, read past the server's lock: checked by `qemu-img check`
/// and saved as a raw file.
fn replica_as_raw(site: &Site, name: &str) -> PathBuf {
    let replica = site.replica_disk();
    run_ok(Command::new("qemu-img").args(["check", "-U", text(&replica)]));
    let raw = site.path(name);
    let _ = std::fs::remove_file(&raw);
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-U",
        "-O",
        "raw",
        text(&replica),
        text(&raw),
    ]));
    raw
}

/// The replica store fills in the middle of a delta: replication pauses and `status` says why
/// (the store named as full), the replica stays whole at its last applied delta, and once space
/// is freed replication resumes from where it stopped, with no new initial replication, and
/// the replica ends equal to the primary. `left` is what the store keeps free when the delta
/// comes: less than its stage (the store fills while staging) or enough for the stage but not
/// for applying it. Also checked: health critical after the interval's grace, a full store not
/// called a protocol violation, and no comparison by hash after a failed apply.
fn store_fills_during_a_delta(test: &str, subnet: u8, left: u64) {
    if !have_qemu(test) {
        return;
    }
    let Some(lab) = Lab::create(test, subnet) else {
        return;
    };
    let site = Site::new("64M");
    let Some(store) = SmallFilesystem::mount(test, &site.store(), "64M") else {
        return;
    };
    let (mut serve, address) = site.serve(
        Some(&lab.a),
        &format!("{}:4433", lab.address_a),
        "serve.log",
        None,
    );
    let mut protect = site.protect(Some(&lab.b), &address, "pid");
    site.wait_until_replicated(&[&protect, &serve]);
    site.nbd_io(&["write -P 0x31 0 4M"]);
    let applied = site.wait_until_replicated(&[&protect, &serve]);
    let at_applied = site.capture_through_nbd("at-applied.raw");
    let ballast = store.fill_leaving("ballast", left);
    // 16 MiB that do not compress: more than the store has left.
    let random = site.random_file("random.bin", 16 * MIB, 7);
    site.nbd_io(&[&format!("write -s {} 32M 16M", text(&random))]);
    let full = site.wait_for_primary(
        "the status to say the replica's store is full",
        &[&protect, &serve],
        |status| {
            status["last_error"]
                .as_str()
                .is_some_and(|error| error.contains("No space left on device"))
        },
    );
    eprintln!("{test}: the primary's status with the store full: {full}");
    // The error stays named while the primary retries (polled: it may reconnect meanwhile).
    wait_for(
        "`blockrep status` to name the full store",
        WAIT,
        || format!("{}{}", protect.tail(), serve.tail()),
        || {
            let human = run_ok(site.blockrep().args(["status"]));
            human.contains("No space left on device").then_some(())
        },
    );
    {
        // Unable to send for longer than the interval (a minute at least): critical.
        wait_for(
            "health critical while the store is full",
            Duration::from_secs(90),
            || {
                format!(
                    "{:?}\n{}{}",
                    site.primary_status(),
                    protect.tail(),
                    serve.tail()
                )
            },
            || {
                site.primary_status()
                    .filter(|status| status["health"] == "critical")
            },
        );
        let error = full["last_error"].as_str().unwrap();
        assert!(
            !error.contains("protocol violation"),
            "a full store is called the primary's fault: {full}"
        );
    }
    // Paused: the replica's applied delta does not move over several intervals.
    let held_at = sequence(&site.replica_status().expect("the replica server's status"));
    assert!(held_at >= applied, "{held_at} < {applied}");
    std::thread::sleep(Duration::from_secs(3));
    let replica = site.replica_status().expect("the replica server's status");
    eprintln!("{test}: the replica's status with the store full: {replica}");
    assert_eq!(sequence(&replica), held_at, "{replica}");
    {
        wait_for(
            "the replica's status to name the full store",
            WAIT,
            || format!("{:?}\n{}", site.replica_status(), serve.tail()),
            || {
                site.replica_status().filter(|status| {
                    status["error"]
                        .as_str()
                        .is_some_and(|error| error.contains("No space left on device"))
                })
            },
        );
    }
    // Paused, the replica is a sound VHDX that reads as the primary did at its last applied
    // delta (nothing was written between that and the big write): nothing of the new one shows.
    let held = replica_as_raw(&site, "held.raw");
    assert_same_bytes(&at_applied, &held);
    std::fs::remove_file(&ballast).unwrap();
    site.wait_until_replicated(&[&protect, &serve]);
    let resumed = site.primary_status().unwrap();
    eprintln!("{test}: the primary's status once space was freed: {resumed}");
    protect.stop();
    serve.stop();
    let log = protect.log();
    assert_eq!(
        applied_of_kind(&log, "kind=Initial"),
        1,
        "a second initial replication after the store was freed:\n{}",
        protect.tail()
    );
    {
        assert!(
            resumed["resync"].is_null() && !log.contains("resynchronization compared"),
            "the disks were compared by hash after the store was freed: {resumed}\n{}",
            serve.tail()
        );
    }
    site.assert_replica_equals_primary();
    drop(store);
}

#[test]
fn a_store_full_while_staging_is_named_on_both_sides_and_critical_after_the_interval() {
    let test = "a_store_full_while_staging_is_named_on_both_sides_and_critical_after_the_interval";
    store_fills_during_a_delta(test, 13, 6 * MIB);
}

#[test]
fn a_store_full_while_applying_is_critical_and_resumes_without_a_comparison() {
    let test = "a_store_full_while_applying_is_critical_and_resumes_without_a_comparison";
    store_fills_during_a_delta(test, 14, 24 * MIB);
}

/// A small seeded generator (xorshift64*): the kill test's moments and writes replay from
/// its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// An environment variable read as a number, or `default`.
fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
        Err(_) => default,
    }
}

const KILL_DISK: u64 = 32 * MIB;

/// `protect` slowed to 4 MiB/s, so a kill often lands in the middle of a delta.
fn start_slowed_protect(site: &Site, address: &str) -> Daemon {
    site.protect_with(None, address, "pid", &["--max-rate", "4M"])
}

/// What the kills hit, for the test's report.
#[derive(Default, Debug)]
struct Tally {
    /// Killed with the write's delta not yet acknowledged, and with it acknowledged.
    replication_in_flight: u32,
    replication_acknowledged: u32,
    /// Killed while the failover (or failback) command still ran, and after it ended.
    failover_running: u32,
    failover_ended: u32,
}

/// What the kill test drives: the site, both daemons, where the VM runs, and the disk as the
/// VM wrote it.
struct Soak {
    site: Site,
    address: String,
    serve: Daemon,
    protect: Daemon,
    at_home: bool,
    expected: Vec<u8>,
    /// Every write made, in order: (offset, length, where the VM ran), for telling which one a
    /// difference belongs to.
    writes: Vec<(u64, u64, &'static str)>,
    restarts: u32,
}

impl Soak {
    fn daemons(&self) -> [&Daemon; 2] {
        [&self.serve, &self.protect]
    }

    fn context(&self) -> String {
        format!(
            "primary: {:?}\nreplica: {:?}\n{}{}",
            self.site.primary_status(),
            self.site.replica_status(),
            self.serve.tail(),
            self.protect.tail()
        )
    }

    /// Where the VM's disk is served now.
    fn vm_socket(&self) -> PathBuf {
        if self.at_home {
            self.site.nbd_socket()
        } else {
            self.site.hosted_nbd()
        }
    }

    /// One write of random bytes where the VM runs, recorded in `expected`.
    fn write(&mut self, rng: &mut Rng, name: &str) {
        let length = (1 + rng.below(3)) * MIB;
        let offset = rng.below((KILL_DISK - length) / (64 << 10) + 1) * (64 << 10);
        let bytes = random_bytes(length, rng.next());
        let file = self.site.path(name);
        std::fs::write(&file, &bytes).unwrap();
        nbd_io_at(
            &self.vm_socket(),
            &[&format!("write -s {} {offset} {length}", text(&file))],
        );
        self.expected[offset as usize..(offset + length) as usize].copy_from_slice(&bytes);
        let at = if self.at_home {
            "home"
        } else {
            "the replica site"
        };
        self.writes.push((offset, length, at));
    }

    /// Where `found` differs from what was written: the byte ranges, and the writes (by their
    /// number, from 0) that last wrote into each.
    fn differences(&self, found: &[u8]) -> String {
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        for at in (0..found.len()).filter(|&at| found[at] != self.expected[at]) {
            match ranges.last_mut() {
                Some(range) if range.end == at => range.end = at + 1,
                _ => ranges.push(at..at + 1),
            }
        }
        ranges
            .iter()
            .map(|range| {
                let writers: Vec<String> = self
                    .writes
                    .iter()
                    .enumerate()
                    .filter(|(_, (offset, length, _))| {
                        (*offset as usize) < range.end && range.start < (offset + length) as usize
                    })
                    .map(|(number, (offset, length, at))| {
                        format!("write {number} ({offset}+{length} at {at})")
                    })
                    .collect();
                format!("bytes {range:?}: {}", writers.join(", "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Asserts the disk, as the VM reads it where it runs, holds every write made.
    fn assert_vm_holds_every_write(&self, context: &str) {
        let raw = self.site.path("vm.raw");
        let _ = std::fs::remove_file(&raw);
        capture_export(&self.vm_socket(), &raw);
        let found = std::fs::read(&raw).unwrap();
        if found != self.expected {
            panic!(
                "{context}: the VM's disk (at {}) differs from what was written\n{}\n{}",
                if self.at_home {
                    "home"
                } else {
                    "the replica site"
                },
                self.differences(&found),
                self.context()
            );
        }
    }

    /// The replica's latest point as a test failover copies it (checked by `qemu-img check`),
    /// the copy cleaned up after.
    fn latest_point(&self) -> Vec<u8> {
        let copy = self.site.path("point.out");
        run_ok(
            self.site
                .blockrep()
                .args(["failover", "vm1", "--test", "--out", text(&copy)]),
        );
        let disk = copy.join("disk-0.vhdx");
        run_ok(Command::new("qemu-img").args(["check", text(&disk)]));
        let raw = self.site.path("point.raw");
        let _ = std::fs::remove_file(&raw);
        run_ok(Command::new("qemu-img").args(["convert", "-O", "raw", text(&disk), text(&raw)]));
        run_ok(
            self.site
                .blockrep()
                .args(["failover", "vm1", "--test", "--cleanup"]),
        );
        std::fs::read(&raw).unwrap()
    }

    /// With the VM at home: once everything written is acknowledged, the replica's latest
    /// point holds every write.
    fn assert_replica_holds_every_write(&self, context: &str) {
        self.site.wait_until_replicated(&self.daemons());
        let point = self.latest_point();
        let differing: Vec<usize> = (0..point.len() / MIB as usize)
            .filter(|mib| {
                let range = mib * MIB as usize..(mib + 1) * MIB as usize;
                point[range.clone()] != self.expected[range]
            })
            .collect();
        assert!(
            differing.is_empty(),
            "{context}: everything acknowledged, the replica differs from the primary in MiB {differing:?}\n{}\n{}",
            self.differences(&point),
            self.context()
        );
    }

    /// SIGKILLs both daemons, the second `gap` milliseconds after the first, in `order`.
    fn kill_both(&mut self, serve_first: bool, gap: u64) {
        let (first, second) = if serve_first {
            (&mut self.serve, &mut self.protect)
        } else {
            (&mut self.protect, &mut self.serve)
        };
        first.signal(libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(gap));
        second.signal(libc::SIGKILL);
        first.wait_exit(WAIT);
        second.wait_exit(WAIT);
    }

    fn start_serve(&mut self) {
        self.restarts += 1;
        let log = format!("serve-{}.log", self.restarts);
        self.serve = self.site.serve_hosting(&self.address, &log, None).0;
    }

    fn start_protect(&mut self) {
        self.protect = start_slowed_protect(&self.site, &self.address);
    }

    /// Waits until the VM runs at exactly one site and replicates to the other with nothing
    /// pending; sets `at_home` from where it runs.
    fn wait_until_settled(&mut self, context: &str) {
        let site = &self.site;
        let at_home = wait_for(
            &format!("{context}: the VM to run at one site, replicating to the other"),
            WAIT,
            || self.context(),
            || {
                let primary = site.primary_status();
                let replica = site.replica_status();
                let home = primary.as_ref().is_some_and(|status| {
                    status["state"] == "replicating"
                        && status["connected"] == true
                        && status["pending_bytes"] == 0
                        && sequence(status) > 0
                }) && replica
                    .as_ref()
                    .is_some_and(|status| status["failover"].is_null());
                let away = replica.as_ref().is_some_and(|status| {
                    status["failover"]["committed"] == true
                        && status["reverse"]["state"] == "replicating"
                        && status["reverse"]["pending_bytes"] == 0
                });
                match (home, away) {
                    (true, false) => Some(true),
                    (false, true) => Some(false),
                    _ => None,
                }
            },
        );
        self.at_home = at_home;
    }
}

/// One round that kills both daemons while a delta is on its way. Between the kill and the
/// primary's return, the replica (its latest point, as a test failover copies it) is the
/// primary as of a cut: before the write or after it, and after it if the primary had seen
/// the delta holding it acknowledged.
fn killed_during_replication(soak: &mut Soak, rng: &mut Rng, round: u64, tally: &mut Tally) {
    // Everything written so far acknowledged: the replica starts from `before`.
    soak.site.wait_until_replicated(&soak.daemons());
    let before = soak.expected.clone();
    soak.write(rng, "round.bin");
    // Read after the write: the delta in flight then may be older than the write, the one
    // after it (one delta is in flight at a time) is cut after the write and holds it.
    let holding = sequence(&soak.site.primary_status().expect("the primary's status")) + 2;
    std::thread::sleep(Duration::from_millis(rng.below(2500)));
    let acknowledged = sequence(&soak.site.primary_status().unwrap_or_default());
    let serve_first = rng.below(2) == 0;
    soak.kill_both(serve_first, rng.below(300));
    soak.start_serve();
    let point = soak.latest_point();
    let context = format!(
        "round {round}: killed {} first, {acknowledged} acknowledged, the write in {holding} or later",
        if serve_first { "serve" } else { "protect" }
    );
    if acknowledged >= holding {
        tally.replication_acknowledged += 1;
        assert!(
            point == soak.expected,
            "{context}: the replica lost an acknowledged write\n{}",
            soak.context()
        );
    } else {
        tally.replication_in_flight += 1;
        assert!(
            point == soak.expected || point == before,
            "{context}: the replica is neither the state before the write nor after it\n{}",
            soak.context()
        );
    }
    soak.start_protect();
    soak.wait_until_settled(&context);
    soak.assert_vm_holds_every_write(&context);
}

/// One round that kills both daemons at a random moment of a planned failover (from home, or
/// a failback from the replica site): once both are back, the VM runs at exactly one site,
/// holding every write, and replicates to the other.
fn killed_during_a_failover(soak: &mut Soak, rng: &mut Rng, round: u64, tally: &mut Tally) {
    let from_home = soak.at_home;
    soak.write(rng, "round.bin");
    allow_handover(&soak.site);
    let mut failover = soak
        .site
        .blockrep()
        .args(["failover", "vm1", "--planned", "--reverse"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A planned failover of a quiet VM takes about a second here: most kills land inside it.
    std::thread::sleep(Duration::from_millis(rng.below(1000)));
    let ended = failover.try_wait().unwrap().is_some();
    if ended {
        tally.failover_ended += 1;
    } else {
        tally.failover_running += 1;
    }
    let serve_first = rng.below(2) == 0;
    soak.kill_both(serve_first, rng.below(300));
    // Its daemons gone, the command ends; whether it said it was done does not matter.
    let _ = failover.wait();
    soak.start_serve();
    soak.start_protect();
    let context = format!(
        "round {round}: a {} killed{}, {} first",
        if from_home { "failover" } else { "failback" },
        if ended { " after it ended" } else { "" },
        if serve_first { "serve" } else { "protect" }
    );
    soak.wait_until_settled(&context);
    soak.assert_vm_holds_every_write(&context);
}

/// Both daemons SIGKILLed at seeded random moments, round after round, while deltas are on
/// their way and during planned failovers and failbacks: the replica is always the primary as
/// of a cut no older than the last acknowledged one, the VM ends running at one site with
/// every write, and the replica ends equal to the primary.
#[test]
fn both_daemons_killed_at_random_moments_leave_the_replica_at_the_last_acknowledged_cut() {
    let test =
        "both_daemons_killed_at_random_moments_leave_the_replica_at_the_last_acknowledged_cut";
    if !have_qemu(test) {
        return;
    }
    let rounds = env_number("BLOCKREP_SOAK_ROUNDS", 10);
    let seed = env_number(
        "BLOCKREP_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    eprintln!("{test}: seed {seed} (replay with BLOCKREP_SOAK_SEED={seed}), {rounds} rounds");
    let mut rng = Rng(seed | 1);
    let site = Site::new("32M");
    let (serve, address) = site.serve_hosting("127.0.0.1:0", "serve-0.log", None);
    let protect = start_slowed_protect(&site, &address);
    site.wait_until_replicated(&[&serve, &protect]);
    let mut soak = Soak {
        site,
        address,
        serve,
        protect,
        at_home: true,
        expected: vec![0; KILL_DISK as usize],
        writes: Vec::new(),
        restarts: 0,
    };
    let mut tally = Tally::default();
    for round in 0..rounds {
        // Deltas are killed only from home (the acknowledged cut is the primary's to see).
        if soak.at_home && rng.below(3) > 0 {
            killed_during_replication(&mut soak, &mut rng, round, &mut tally);
        } else {
            killed_during_a_failover(&mut soak, &mut rng, round, &mut tally);
        }
        if soak.at_home {
            soak.assert_replica_holds_every_write(&format!("after round {round}"));
        }
        eprintln!(
            "{test}: round {round} done; the VM runs {}",
            if soak.at_home {
                "at home"
            } else {
                "at the replica site"
            }
        );
    }
    if !soak.at_home {
        planned_failover(&soak.site, &soak.daemons());
        soak.wait_until_settled("the last failback");
    }
    soak.write(&mut rng, "last.bin");
    soak.site.wait_until_replicated(&soak.daemons());
    soak.assert_vm_holds_every_write("at the end");
    soak.assert_replica_holds_every_write("at the end");
    soak.protect.stop();
    soak.serve.stop();
    soak.site.assert_replica_equals_primary();
    eprintln!("{test}: {rounds} rounds with seed {seed}: {tally:?}");
}
