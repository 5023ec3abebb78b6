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
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// How long any one thing may take before the test gives up.
const WAIT: Duration = Duration::from_secs(60);
const BLOCKREP: &str = env!("CARGO_BIN_EXE_blockrep");

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs a command to completion; panics with its output unless it succeeds.
fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Random bytes (xorshift): they do not compress.
fn random_bytes(length: u64, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(length as usize + 8);
    while (bytes.len() as u64) < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(length as usize);
    bytes
}

/// Waits until `check` gives a value, polling; panics after `timeout` with `context()`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A `blockrep serve` or `blockrep protect` process, its stderr going to a file. Dropping it
/// kills the process (SIGKILL) and waits for it, unless it has already been waited for.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Daemon {
    fn spawn(name: &str, mut command: Command, log: PathBuf) -> Daemon {
        let stderr = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("start {name} ({command:?}): {error}"));
        Daemon {
            name: name.to_owned(),
            child,
            log,
            exited: None,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    fn tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "--- {} (pid {}) stderr, last lines:\n{}\n",
            self.name,
            self.child.id(),
            lines[start..].join("\n")
        )
    }

    fn signal(&self, signal: libc::c_int) {
        if self.exited.is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
            // not yet waited for, so it cannot have been reused.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }

    /// The exit status, if the process has exited.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().unwrap();
        }
        self.exited
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not exit within {timeout:?}\n{}",
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon with SIGINT, as an operator would, and expects exit status 0.
    fn stop(&mut self) {
        self.signal(libc::SIGINT);
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "{} exited with {status} after SIGINT\n{}",
            self.name,
            self.tail()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Two lab hosts: network namespaces A (the replica's) and B (the primary's) joined by a veth
/// pair, 10.231.N.1/30 in A and 10.231.N.2/30 in B. Dropping it deletes both namespaces, which
/// deletes the veth pair with them.
struct Lab {
    a: String,
    b: String,
    veth_b: String,
    address_a: String,
}

impl Lab {
    /// Makes the lab, or says why the test skips and gives `None`.
    fn create(test: &str, subnet: u8) -> Option<Lab> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED {test}: network namespaces need root");
            return None;
        }
        let pid = std::process::id();
        let a = format!("blockrep-{pid}-{subnet}-a");
        let b = format!("blockrep-{pid}-{subnet}-b");
        // Interface names hold at most 15 bytes: "br" + pid (at most 7 digits) + "x" + N + side.
        let veth_a = format!("br{pid}x{subnet}a");
        let veth_b = format!("br{pid}x{subnet}b");
        match Command::new("ip").args(["netns", "add", &a]).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => {
                eprintln!(
                    "SKIPPED {test}: `ip netns add` failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                return None;
            }
            Err(error) => {
                eprintln!("SKIPPED {test}: cannot run `ip` ({error}; apt-get install iproute2)");
                return None;
            }
        }
        let lab = Lab {
            a,
            b,
            veth_b,
            address_a: format!("10.231.{subnet}.1"),
        };
        let address_b = format!("10.231.{subnet}.2");
        run_ok(Command::new("ip").args(["netns", "add", &lab.b]));
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &lab.veth_b,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &veth_a, "netns", &lab.a]));
        run_ok(Command::new("ip").args(["link", "set", &lab.veth_b, "netns", &lab.b]));
        for (namespace, device, address) in [
            (&lab.a, &veth_a, &lab.address_a),
            (&lab.b, &lab.veth_b, &address_b),
        ] {
            run_ok(Command::new("ip").args([
                "-n",
                namespace,
                "addr",
                "add",
                &format!("{address}/30"),
                "dev",
                device,
            ]));
            run_ok(Command::new("ip").args(["-n", namespace, "link", "set", "lo", "up"]));
            run_ok(Command::new("ip").args(["-n", namespace, "link", "set", device, "up"]));
        }
        Some(lab)
    }

    /// A command run inside namespace `namespace`.
    fn exec(namespace: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", namespace, program]);
        command
    }

    /// Limits what B sends to A: a token bucket at `rate`.
    fn shape(&self, rate: &str) {
        // tc lives in /usr/sbin, which is not on every PATH.
        let tc = ["/usr/sbin/tc", "/sbin/tc"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or("tc");
        run_ok(Lab::exec(&self.b, tc).args([
            "qdisc",
            "add",
            "dev",
            &self.veth_b,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "256kbit",
            "latency",
            "50ms",
        ]));
    }

    /// Bytes B has sent on its veth.
    fn tx_bytes(&self) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/tx_bytes", self.veth_b);
        run_ok(Lab::exec(&self.b, "cat").arg(path))
            .trim()
            .parse()
            .unwrap()
    }

    fn set_link(&self, up: bool) {
        run_ok(Command::new("ip").args([
            "-n",
            &self.b,
            "link",
            "set",
            &self.veth_b,
            if up { "up" } else { "down" },
        ]));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for namespace in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One test's files: identities, the primary's disk, the replica's store, the run directory
/// for status sockets, and the NBD socket.
struct Site {
    directory: tempfile::TempDir,
}

impl Site {
    /// Makes the replica's and the primary's identities and the primary's disk.
    fn new(disk_size: &str) -> Site {
        let site = Site {
            directory: tempfile::tempdir().unwrap(),
        };
        // Private, as blockrep requires of a run directory.
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .create(site.run_directory())
            .unwrap();
        for (name, directory) in [("replica", "rid"), ("primary", "pid"), ("stranger", "sid")] {
            let out = site.path(directory);
            run_ok(site.blockrep().args([
                "identity",
                "create",
                "--name",
                name,
                "--out",
                text(&out),
            ]));
        }
        let disk = site.disk();
        run_ok(
            site.blockrep()
                .args(["image", "create", text(&disk), "--size", disk_size]),
        );
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    fn run_directory(&self) -> PathBuf {
        self.path("run")
    }

    fn disk(&self) -> PathBuf {
        self.path("disk.vhdx")
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    fn replica_disk(&self) -> PathBuf {
        self.store().join("vm1").join("disk-0.vhdx")
    }

    /// Kept out of the run directory, where `blockrep status` would take it for a daemon's.
    fn nbd_socket(&self) -> PathBuf {
        self.path("nbd.sock")
    }

    /// Sets what every blockrep process of the test shares.
    fn environment(&self, command: &mut Command) {
        command
            .env("BLOCKREP_RUN_DIR", self.run_directory())
            .env("BLOCKREP_LOG", "info")
            .env_remove("BLOCKREP_CRASH_POINT");
    }

    /// `blockrep` on this host (the root network namespace).
    fn blockrep(&self) -> Command {
        let mut command = Command::new(BLOCKREP);
        self.environment(&mut command);
        command
    }

    /// `blockrep serve` on this host with `extra` arguments.
    fn serve_with(&self, listen: &str, extra: &[&str]) -> (Daemon, String) {
        self.serve_command(None, listen, "serve.log", None, extra)
    }

    /// `blockrep serve`, in `namespace` when given, listening on `listen` (port 0 picks one).
    fn serve(
        &self,
        namespace: Option<&str>,
        listen: &str,
        log: &str,
        crash_point: Option<&str>,
    ) -> (Daemon, String) {
        self.serve_command(namespace, listen, log, crash_point, &[])
    }

    fn serve_command(
        &self,
        namespace: Option<&str>,
        listen: &str,
        log: &str,
        crash_point: Option<&str>,
        extra: &[&str],
    ) -> (Daemon, String) {
        let mut command = match namespace {
            Some(namespace) => Lab::exec(namespace, BLOCKREP),
            None => Command::new(BLOCKREP),
        };
        self.environment(&mut command);
        if let Some(point) = crash_point {
            command.env("BLOCKREP_CRASH_POINT", point);
        }
        command.args([
            "serve",
            "--listen",
            listen,
            "--store",
            text(&self.store()),
            "--identity",
            text(&self.path("rid")),
            "--allow",
            text(&self.path("pid").join("identity.crt")),
        ]);
        command.args(extra);
        let mut daemon = Daemon::spawn("blockrep serve", command, self.path(log));
        // "blockrep: serving replicas in STORE on ADDRESS"
        let address = wait_for(
            "the replica server to listen",
            WAIT,
            || daemon.tail(),
            || {
                let log = daemon.log();
                assert!(!log.contains("blockrep: error"), "{}", daemon.tail());
                let line = log
                    .lines()
                    .find(|line| line.contains("serving replicas in"))?;
                Some(line.rsplit(" on ").next()?.trim().to_owned())
            },
        );
        assert!(daemon.poll().is_none(), "{}", daemon.tail());
        (daemon, address)
    }

    /// `blockrep protect` of vm1 at `--frequency 1s`, its disk served over NBD.
    fn protect(&self, namespace: Option<&str>, replica: &str, identity: &str) -> Daemon {
        self.protect_with(namespace, replica, identity, &[])
    }

    /// `protect`, with `extra` arguments.
    fn protect_with(
        &self,
        namespace: Option<&str>,
        replica: &str,
        identity: &str,
        extra: &[&str],
    ) -> Daemon {
        self.protect_command(namespace, replica, identity, extra, None)
    }

    /// `protect`; it kills itself at `crash_point` when one is given (logging elsewhere).
    fn protect_command(
        &self,
        namespace: Option<&str>,
        replica: &str,
        identity: &str,
        extra: &[&str],
        crash_point: Option<&str>,
    ) -> Daemon {
        let mut command = match namespace {
            Some(namespace) => Lab::exec(namespace, BLOCKREP),
            None => Command::new(BLOCKREP),
        };
        self.environment(&mut command);
        if let Some(point) = crash_point {
            command.env("BLOCKREP_CRASH_POINT", point);
        }
        command.args([
            "protect",
            "--name",
            "vm1",
            "--disk",
            text(&self.disk()),
            "--replica",
            replica,
            "--identity",
            text(&self.path(identity)),
            "--trust",
            text(&self.path("rid").join("identity.crt")),
            "--frequency",
            "1s",
            "--nbd",
            &format!("unix:{}", text(&self.nbd_socket())),
        ]);
        command.args(extra);
        let log = if crash_point.is_some() {
            "protect-crashing.log"
        } else {
            "protect.log"
        };
        Daemon::spawn("blockrep protect", command, self.path(log))
    }

    /// The primary's answer in `blockrep status --json`, if a primary answers.
    fn primary_status(&self) -> Option<serde_json::Value> {
        let output = self.blockrep().args(["status", "--json"]).output().ok()?;
        if !output.status.success() {
            return None;
        }
        let answers: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        answers
            .as_array()?
            .iter()
            .find(|answer| answer["role"] == "primary")
            .and_then(|answer| answer["vms"].get(0).cloned())
    }

    /// Waits until the primary's status satisfies `done`; gives that status.
    fn wait_for_primary(
        &self,
        what: &str,
        daemons: &[&Daemon],
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(
            what,
            WAIT,
            || {
                let mut context = format!("primary status: {:?}\n", self.primary_status());
                for daemon in daemons {
                    context += &daemon.tail();
                }
                context
            },
            || {
                // A daemon that stopped with an error will not make progress: fail now.
                for daemon in daemons {
                    assert!(
                        !daemon.log().contains("blockrep: error"),
                        "{} stopped while waiting for {what}\n{}",
                        daemon.name,
                        daemon.tail()
                    );
                }
                self.primary_status().filter(|status| done(status))
            },
        )
    }

    /// Waits until everything written before the call is applied on the replica: a delta cut
    /// after the replica's current state was reported is applied, and nothing is pending.
    /// Gives the applied sequence.
    fn wait_until_replicated(&self, daemons: &[&Daemon]) -> u64 {
        let now = self.wait_for_primary("the primary's status", daemons, |_| true);
        let target = sequence(&now) + 2;
        let done = self.wait_for_primary(
            &format!("delta {target} applied and nothing pending"),
            daemons,
            |status| sequence(status) >= target && status["pending_bytes"] == 0,
        );
        sequence(&done)
    }

    /// Runs qemu-io commands on the primary's disk, through the NBD export.
    fn nbd_io(&self, commands: &[&str]) {
        let mut command = Command::new("qemu-io");
        command.args([
            "-f",
            "raw",
            &format!("nbd+unix:///?socket={}", text(&self.nbd_socket())),
        ]);
        for each in commands {
            command.args(["-c", each]);
        }
        let output = run_ok(&mut command);
        assert!(
            !output.contains("failed") && !output.contains("error"),
            "qemu-io {commands:?}: {output}"
        );
    }

    /// Writes a file of random bytes for `write -s`.
    fn random_file(&self, name: &str, length: u64, seed: u64) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, random_bytes(length, seed)).unwrap();
        path
    }

    /// Asserts that qemu reads the replica's disk exactly as the primary's, and that
    /// `qemu-img check` finds nothing wrong with the replica.
    fn assert_replica_equals_primary(&self) {
        let replica = self.replica_disk();
        run_ok(Command::new("qemu-img").args(["check", text(&replica)]));
        let primary_raw = self.path("primary.raw");
        let replica_raw = self.path("replica.raw");
        for (image, raw) in [(self.disk(), &primary_raw), (replica, &replica_raw)] {
            let _ = std::fs::remove_file(raw);
            run_ok(Command::new("qemu-img").args([
                "convert",
                "-O",
                "raw",
                text(&image),
                text(raw),
            ]));
        }
        assert_same_bytes(&primary_raw, &replica_raw);
    }
}

fn sequence(status: &serde_json::Value) -> u64 {
    status["applied_sequence"].as_u64().unwrap_or(0)
}

/// Compares two files a MiB at a time; on a difference, says which MiBs differ.
fn assert_same_bytes(primary: &Path, replica: &Path) {
    let (mut left, mut right) = (
        std::fs::File::open(primary).unwrap(),
        std::fs::File::open(replica).unwrap(),
    );
    let (left_size, right_size) = (
        left.metadata().unwrap().len(),
        right.metadata().unwrap().len(),
    );
    assert_eq!(left_size, right_size, "the replica's size differs");
    let mut differing = Vec::new();
    let (mut a, mut b) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut offset = 0;
    while offset < left_size {
        let length = MIB.min(left_size - offset) as usize;
        left.read_exact(&mut a[..length]).unwrap();
        right.read_exact(&mut b[..length]).unwrap();
        if a[..length] != b[..length] {
            differing.push(offset / MIB);
        }
        offset += length as u64;
    }
    assert!(
        differing.is_empty(),
        "the replica differs from the primary in MiB {differing:?}"
    );
}

/// The `chunks=N` of the primary's "resuming" log lines.
fn resumed_chunks(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|line| line.contains("resuming: the replica already holds"))
        .filter_map(|line| {
            let value = line.split("chunks=").nth(1)?;
            let digits: String = value.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// Two lab hosts for `test`: a replica server in namespace A and a primary of a `disk_size`
/// disk in B, over a veth pair shaped to `rate` when given, with initial replication done.
/// `None` (after saying why) when the test must skip.
fn lab_hosts(
    test: &str,
    subnet: u8,
    disk_size: &str,
    rate: Option<&str>,
) -> Option<(Lab, Site, Daemon, Daemon)> {
    if !have_qemu(test) {
        return None;
    }
    let lab = Lab::create(test, subnet)?;
    if let Some(rate) = rate {
        lab.shape(rate);
    }
    let site = Site::new(disk_size);
    let (serve, address) = site.serve(
        Some(&lab.a),
        &format!("{}:4433", lab.address_a),
        "serve.log",
        None,
    );
    let protect = site.protect(Some(&lab.b), &address, "pid");
    site.wait_for_primary("initial replication", &[&protect, &serve], |status| {
        sequence(status) >= 1 && status["pending_bytes"] == 0
    });
    Some((lab, site, serve, protect))
}

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

impl Site {
    /// The primary's disk as its NBD clients see it now, saved as a raw file.
    fn capture_through_nbd(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        run_ok(Command::new("qemu-img").args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("nbd+unix:///?socket={}", text(&self.nbd_socket())),
            text(&path),
        ]));
        path
    }

    /// Runs `blockrep failover vm1 --test ARGUMENTS` and returns the copy's disk, as raw.
    fn test_failover(&self, arguments: &[&str], raw: &str) -> PathBuf {
        let out = self.path(&format!("{raw}.out"));
        let mut command = self.blockrep();
        command.args(["failover", "vm1", "--test", "--out", text(&out)]);
        command.args(arguments);
        run_ok(&mut command);
        let disk = out.join("disk-0.vhdx");
        run_ok(Command::new("qemu-img").args(["check", text(&disk)]));
        let path = self.path(raw);
        run_ok(Command::new("qemu-img").args(["convert", "-O", "raw", text(&disk), text(&path)]));
        path
    }
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

impl Site {
    /// The answer for vm1 of the replica server listening on `listen`.
    fn replica_status_at(&self, listen: &str) -> Option<serde_json::Value> {
        let output = self.blockrep().args(["status", "--json"]).output().ok()?;
        let answers: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        answers
            .as_array()?
            .iter()
            .find(|answer| answer["role"] == "replica" && answer["listen"] == listen)
            .and_then(|answer| answer["vms"].get(0).cloned())
    }

    /// The replica server's answer for vm1 in `blockrep status --json`.
    fn replica_status(&self) -> Option<serde_json::Value> {
        let output = self.blockrep().args(["status", "--json"]).output().ok()?;
        let answers: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        answers
            .as_array()?
            .iter()
            // The replica server, not a returning primary keeping its copy as a replica.
            .find(|answer| answer["role"] == "replica" && answer["listen"] != "reverse replication")
            .and_then(|answer| answer["vms"].get(0).cloned())
    }
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

impl Site {
    /// Where a VM that fails over to the replica server is served over NBD.
    fn hosted_nbd(&self) -> PathBuf {
        self.path("nbd-b").join("vm1.sock")
    }

    /// `blockrep serve` that runs the VMs failing over to it (over NBD, at `hosted_nbd`) and
    /// replicates them back every second; it kills itself at `crash_point` when one is given.
    fn serve_hosting(
        &self,
        listen: &str,
        log: &str,
        crash_point: Option<&str>,
    ) -> (Daemon, String) {
        let nbd_directory = self.path("nbd-b");
        let options = [
            "--nbd-dir",
            text(&nbd_directory),
            "--reverse-frequency",
            "1s",
        ];
        self.serve_command(None, listen, log, crash_point, &options)
    }
}

/// What the failback tests write: at the first host, at the replica site, at the first host.
const WRITTEN_AT_BOTH_SITES: &[(std::ops::Range<u64>, u8)] = &[
    (0..2 * MIB, 0x61),
    (8 * MIB..9 * MIB, 0x62),
    (16 * MIB..17 * MIB, 0x63),
];

impl Site {
    /// Asserts that the disk, as the first host's NBD clients read it, holds every write.
    fn assert_written_at_home(&self, context: &str, written: &[(std::ops::Range<u64>, u8)]) {
        let home = std::fs::read(self.capture_through_nbd("home.raw")).unwrap();
        for (range, byte) in written {
            let (start, end) = (range.start as usize, range.end as usize);
            if let Some(wrong) = home[start..end].iter().position(|found| found != byte) {
                panic!(
                    "{context}: byte {} is {:#x}, not {byte:#x}",
                    start + wrong,
                    home[start + wrong]
                );
            }
        }
    }
}

/// `blockrep failover vm1 --planned --reverse`, wherever the VM runs; both sites compared equal.
fn planned_failover(site: &Site, daemons: &[&Daemon]) {
    let output = site
        .blockrep()
        .args(["failover", "vm1", "--planned", "--reverse"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "planned failover failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        daemons
            .iter()
            .map(|daemon| daemon.tail())
            .collect::<String>()
    );
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(answer.contains("compared equal"), "{answer}");
}

/// Waits until the replica site replicates back to the first host.
fn wait_for_reverse(site: &Site, daemons: &[&Daemon]) -> serde_json::Value {
    wait_for(
        "replication back to the first host",
        WAIT,
        || {
            format!("{:?}\n", site.replica_status())
                + &daemons
                    .iter()
                    .map(|daemon| daemon.tail())
                    .collect::<String>()
        },
        || {
            site.replica_status()
                .filter(|status| status["reverse"]["state"] == "replicating")
                .filter(|status| status["reverse"]["pending_bytes"] == 0)
        },
    )
}

/// Runs qemu-io commands on the NBD export at `socket`.
fn nbd_io_at(socket: &Path, commands: &[&str]) {
    let mut command = Command::new("qemu-io");
    command.args([
        "-f",
        "raw",
        &format!("nbd+unix:///?socket={}", text(socket)),
    ]);
    for each in commands {
        command.args(["-c", each]);
    }
    let output = run_ok(&mut command);
    assert!(
        !output.contains("failed") && !output.contains("error"),
        "qemu-io {commands:?}: {output}"
    );
}

/// Waits until the first host's disk equals the replica site's (reverse replication caught up).
fn wait_until_equal(site: &Site, daemons: &[&Daemon]) {
    wait_for(
        "the first host's copy to equal the replica site's",
        WAIT,
        || {
            daemons
                .iter()
                .map(|daemon| daemon.tail())
                .collect::<String>()
        },
        || {
            let (ours, theirs) = (site.path("ours.raw"), site.path("theirs.raw"));
            for (image, raw) in [(site.disk(), &ours), (site.replica_disk(), &theirs)] {
                let _ = std::fs::remove_file(raw);
                let converted = Command::new("qemu-img")
                    .args(["convert", "-U", "-O", "raw", text(&image), text(raw)])
                    .output()
                    .ok()?;
                if !converted.status.success() {
                    return None;
                }
            }
            (std::fs::read(&ours).ok()? == std::fs::read(&theirs).ok()?).then_some(())
        },
    );
}

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
