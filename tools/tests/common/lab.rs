//! The lab's pieces, shared by the lab tests: `blockrep serve` and `blockrep protect` as child
//! processes (`Daemon`), two network namespaces joined by a veth pair (`Lab`), one test's files
//! and commands (`Site`), and the waits and checks the tests share. Every process a helper
//! starts is killed and waited for, and every namespace deleted, also when a test fails.

use super::have_qemu;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;
/// How long any one thing may take before the test gives up.
pub const WAIT: Duration = Duration::from_secs(60);
pub const BLOCKREP: &str = env!("CARGO_BIN_EXE_blockrep");

pub fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs a command to completion; panics with its output unless it succeeds.
pub fn run_ok(command: &mut Command) -> String {
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
pub fn random_bytes(length: u64, seed: u64) -> Vec<u8> {
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
pub fn wait_for<T>(
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
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub exited: Option<ExitStatus>,
}

impl Daemon {
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Daemon {
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn tail(&self) -> String {
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

    pub fn signal(&self, signal: libc::c_int) {
        if self.exited.is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
            // not yet waited for, so it cannot have been reused.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }

    /// The exit status, if the process has exited.
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().unwrap();
        }
        self.exited
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
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
    pub fn stop(&mut self) {
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
pub struct Lab {
    pub a: String,
    pub b: String,
    pub veth_b: String,
    pub address_a: String,
}

impl Lab {
    /// Makes the lab, or says why the test skips and gives `None`.
    pub fn create(test: &str, subnet: u8) -> Option<Lab> {
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
    pub fn exec(namespace: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", namespace, program]);
        command
    }

    /// Limits what B sends to A: a token bucket at `rate`.
    pub fn shape(&self, rate: &str) {
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
    pub fn tx_bytes(&self) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/tx_bytes", self.veth_b);
        run_ok(Lab::exec(&self.b, "cat").arg(path))
            .trim()
            .parse()
            .unwrap()
    }

    pub fn set_link(&self, up: bool) {
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
pub struct Site {
    directory: tempfile::TempDir,
}

impl Drop for Site {
    /// A failed test's files (daemon logs, stores, disks) stay for reading when
    /// `BLOCKREP_KEEP_FAILED_LABS` is set; otherwise they go with the test.
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("BLOCKREP_KEEP_FAILED_LABS").is_some() {
            let kept = std::mem::replace(&mut self.directory, tempfile::tempdir().unwrap()).keep();
            eprintln!("the failed test's files are kept in {}", kept.display());
        }
    }
}

impl Site {
    /// Makes the replica's and the primary's identities and the primary's disk.
    pub fn new(disk_size: &str) -> Site {
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

    pub fn path(&self, name: &str) -> PathBuf {
        self.directory.path().join(name)
    }

    pub fn run_directory(&self) -> PathBuf {
        self.path("run")
    }

    pub fn disk(&self) -> PathBuf {
        self.path("disk.vhdx")
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    pub fn replica_disk(&self) -> PathBuf {
        self.store().join("vm1").join("disk-0.vhdx")
    }

    /// Kept out of the run directory, where `blockrep status` would take it for a daemon's.
    pub fn nbd_socket(&self) -> PathBuf {
        self.path("nbd.sock")
    }

    /// Sets what every blockrep process of the test shares.
    pub fn environment(&self, command: &mut Command) {
        command
            .env("BLOCKREP_RUN_DIR", self.run_directory())
            .env("BLOCKREP_LOG", "info")
            .env_remove("BLOCKREP_CRASH_POINT");
    }

    /// `blockrep` on this host (the root network namespace).
    pub fn blockrep(&self) -> Command {
        let mut command = Command::new(BLOCKREP);
        self.environment(&mut command);
        command
    }

    /// `blockrep serve` on this host with `extra` arguments.
    pub fn serve_with(&self, listen: &str, extra: &[&str]) -> (Daemon, String) {
        self.serve_command(None, listen, "serve.log", None, extra)
    }

    /// `blockrep serve`, in `namespace` when given, listening on `listen` (port 0 picks one).
    pub fn serve(
        &self,
        namespace: Option<&str>,
        listen: &str,
        log: &str,
        crash_point: Option<&str>,
    ) -> (Daemon, String) {
        self.serve_command(namespace, listen, log, crash_point, &[])
    }

    pub fn serve_command(
        &self,
        namespace: Option<&str>,
        listen: &str,
        log: &str,
        crash_point: Option<&str>,
        extra: &[&str],
    ) -> (Daemon, String) {
        let mut command = self.daemon_command(namespace, crash_point);
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
    pub fn protect(&self, namespace: Option<&str>, replica: &str, identity: &str) -> Daemon {
        self.protect_with(namespace, replica, identity, &[])
    }

    /// `protect`, with `extra` arguments.
    pub fn protect_with(
        &self,
        namespace: Option<&str>,
        replica: &str,
        identity: &str,
        extra: &[&str],
    ) -> Daemon {
        self.protect_command(namespace, replica, identity, extra, None)
    }

    /// `protect`; it kills itself at `crash_point` when one is given (logging elsewhere).
    pub fn protect_command(
        &self,
        namespace: Option<&str>,
        replica: &str,
        identity: &str,
        extra: &[&str],
        crash_point: Option<&str>,
    ) -> Daemon {
        let mut command = self.daemon_command(namespace, crash_point);
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
    pub fn primary_status(&self) -> Option<serde_json::Value> {
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
    pub fn wait_for_primary(
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
    pub fn wait_until_replicated(&self, daemons: &[&Daemon]) -> u64 {
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
    pub fn nbd_io(&self, commands: &[&str]) {
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
    pub fn random_file(&self, name: &str, length: u64, seed: u64) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, random_bytes(length, seed)).unwrap();
        path
    }

    /// Asserts that qemu reads the replica's disk exactly as the primary's, and that
    /// `qemu-img check` finds nothing wrong with the replica.
    pub fn assert_replica_equals_primary(&self) {
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

pub fn sequence(status: &serde_json::Value) -> u64 {
    status["applied_sequence"].as_u64().unwrap_or(0)
}

/// Compares two files a MiB at a time; on a difference, says which MiBs differ.
pub fn assert_same_bytes(primary: &Path, replica: &Path) {
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
pub fn resumed_chunks(log: &str) -> Vec<u64> {
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
pub fn lab_hosts(
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
impl Site {
    /// `blockrep`, in `namespace` when given, with this site's environment; it kills itself
    /// at `crash_point` when one is given.
    fn daemon_command(&self, namespace: Option<&str>, crash_point: Option<&str>) -> Command {
        let mut command = match namespace {
            Some(namespace) => Lab::exec(namespace, BLOCKREP),
            None => Command::new(BLOCKREP),
        };
        self.environment(&mut command);
        if let Some(point) = crash_point {
            command.env("BLOCKREP_CRASH_POINT", point);
        }
        command
    }

    /// The primary's disk as its NBD clients see it now, saved as a raw file.
    pub fn capture_through_nbd(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        capture_export(&self.nbd_socket(), &path);
        path
    }

    /// Runs `blockrep failover vm1 --test ARGUMENTS` and returns the copy's disk, as raw.
    pub fn test_failover(&self, arguments: &[&str], raw: &str) -> PathBuf {
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
impl Site {
    /// The answer for vm1 of the replica server listening on `listen`.
    pub fn replica_status_at(&self, listen: &str) -> Option<serde_json::Value> {
        let output = self.blockrep().args(["status", "--json"]).output().ok()?;
        let answers: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        answers
            .as_array()?
            .iter()
            .find(|answer| answer["role"] == "replica" && answer["listen"] == listen)
            .and_then(|answer| answer["vms"].get(0).cloned())
    }

    /// The replica server's answer for vm1 in `blockrep status --json`.
    pub fn replica_status(&self) -> Option<serde_json::Value> {
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
impl Site {
    /// Where a VM that fails over to the replica server is served over NBD.
    pub fn hosted_nbd(&self) -> PathBuf {
        self.path("nbd-b").join("vm1.sock")
    }

    /// `blockrep serve` that runs the VMs failing over to it (over NBD, at `hosted_nbd`) and
    /// replicates them back every second; it kills itself at `crash_point` when one is given.
    pub fn serve_hosting(
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
impl Site {
    /// Asserts that the disk, as the first host's NBD clients read it, holds every write.
    pub fn assert_written_at_home(&self, context: &str, written: &[(std::ops::Range<u64>, u8)]) {
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
/// `blockrep allow-handover vm1` on the replica site: its operator consents to the next
/// planned failover there (which drops its recovery points). Refused, and not needed, while
/// the VM runs at the replica site.
pub fn allow_handover(site: &Site) {
    let output = site
        .blockrep()
        .args(["allow-handover", "vm1"])
        .output()
        .unwrap();
    let refusal = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() || refusal.contains("has failed over to this site"),
        "allow-handover failed: {refusal}"
    );
}

/// `blockrep failover vm1 --planned --reverse`, wherever the VM runs (consented to at the
/// replica site); both sites compared equal.
pub fn planned_failover(site: &Site, daemons: &[&Daemon]) {
    allow_handover(site);
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
pub fn wait_for_reverse(site: &Site, daemons: &[&Daemon]) -> serde_json::Value {
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
pub fn nbd_io_at(socket: &Path, commands: &[&str]) {
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
pub fn wait_until_equal(site: &Site, daemons: &[&Daemon]) {
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

/// Saves the disk exported at NBD `socket`, as its clients read it now, as the raw file `path`.
pub fn capture_export(socket: &Path, path: &Path) {
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &format!("nbd+unix:///?socket={}", text(socket)),
        text(path),
    ]));
}
