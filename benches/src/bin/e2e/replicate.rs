//! `e2e replicate`: replication over loopback against what users would run instead, in one
//! run. Initial replication (a `blockrep serve` and a `blockrep protect` process) is timed next
//! to the disk's own sequential write speed and to rsync through an rsync daemon; then a share
//! of the disk's 64 KiB blocks is changed at random through NBD, as a VM would, and the time
//! from the cut to the delta applied on the replica is set next to `rsync --inplace
//! --no-whole-file` of the same change. Every replica is checked against the source before
//! any figure is printed, and each process's peak memory is read.

use crate::measure::{self, Step};
use crate::nbd_client::NbdClient;
use crate::sites::Sites;
use crate::{Outcome, blockrep_binary, have, source};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ReplicateArguments {
    /// Size of the test disk (a multiple of 1M).
    #[arg(long, default_value = "4G", value_parser = crate::size_argument)]
    size: u64,
    /// Timed runs of each line; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Percentage of the disk's 64 KiB blocks changed for the delta lines.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Working directory (on the disk to measure).
    #[arg(long, default_value = "target/e2e-replicate")]
    dir: PathBuf,
    /// Keep the working directory afterwards.
    #[arg(long)]
    keep: bool,
    /// Leave the page cache alone (by default, as root, it is dropped before each line).
    #[arg(long)]
    warm: bool,
}

pub(crate) const BLOCK: u64 = 64 << 10;

/// A child process that is killed if the harness stops early.
pub(crate) struct Daemon {
    child: Child,
    name: &'static str,
}

impl Daemon {
    pub(crate) fn spawn(name: &'static str, command: &mut Command) -> Outcome<Daemon> {
        let child = command
            .spawn()
            .map_err(|error| format!("cannot start {name}: {error}"))?;
        Ok(Daemon { child, name })
    }

    /// Peak resident memory so far (VmHWM).
    pub(crate) fn peak_memory(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
        let kilobytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kilobytes * 1024)
    }

    /// SIGINT, then wait; the daemon must exit 0.
    pub(crate) fn stop(mut self) -> Outcome {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("{} exited with {status}", self.name).into());
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An rsync daemon on loopback whose module `bench` is `DIRECTORY/rsync-destination`, with the
/// port it listens on.
pub(crate) fn start_rsync_daemon(directory: &Path) -> Outcome<(Daemon, u16)> {
    let destination = directory.join("rsync-destination");
    std::fs::create_dir_all(&destination)?;
    let port = free_port(false)?;
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let config = format!(
        "use chroot = no\nread only = no\n{}[bench]\npath = {}\n",
        if root { "uid = root\ngid = root\n" } else { "" },
        destination.display()
    );
    std::fs::write(directory.join("rsyncd.conf"), config)?;
    let daemon = Daemon::spawn(
        "rsync daemon",
        Command::new("rsync")
            .args([
                "--daemon",
                "--no-detach",
                "--address",
                "127.0.0.1",
                "--port",
            ])
            .arg(port.to_string())
            .arg("--config")
            .arg(directory.join("rsyncd.conf"))
            .stderr(Stdio::null()),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    Ok((daemon, port))
}

pub(crate) fn free_port(udp: bool) -> Outcome<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

/// What the running primary reports about vm1, through its control socket.
pub(crate) fn primary_report(run_directory: &Path) -> Option<serde_json::Value> {
    let mut stream = UnixStream::connect(run_directory.join("protect-vm1.sock")).ok()?;
    // The request line, then the end of it: the daemon answers at once instead of waiting
    // for a line that does not come.
    std::io::Write::write_all(&mut stream, b"status\n").ok()?;
    stream.shutdown(std::net::Shutdown::Write).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let answer: serde_json::Value = serde_json::from_str(&text).ok()?;
    answer["vms"].get(0).cloned()
}

pub(crate) fn wait_for(
    run_directory: &Path,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Outcome<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(report) = primary_report(run_directory)
            && done(&report)
        {
            return Ok(report);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The replica's and the primary's identities in `directory` (`replica-id`, `primary-id`),
/// made once.
pub(crate) fn make_identities(blockrep: &Path, directory: &Path) -> Outcome {
    for host in ["replica", "primary"] {
        let identity = directory.join(format!("{host}-id"));
        if !identity.join("identity.crt").exists() {
            let status = Command::new(blockrep)
                .args(["identity", "create", "--name", host, "--out"])
                .arg(&identity)
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                return Err("cannot make identities".into());
            }
        }
    }
    Ok(())
}

pub(crate) fn drop_caches(cold: bool) -> Outcome {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    if cold {
        std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    }
    Ok(())
}

/// The blocks to change: a seeded, distinct, random choice of `count` 64 KiB blocks.
pub(crate) fn changed_blocks(size: u64, count: u64, seed: u64) -> Vec<u64> {
    let blocks = size / BLOCK;
    let mut chosen = std::collections::BTreeSet::new();
    let mut state = seed | 1;
    while (chosen.len() as u64) < count.min(blocks) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chosen.insert(state % blocks);
    }
    chosen.into_iter().collect()
}

pub(crate) fn random_block(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut block = vec![0u8; BLOCK as usize];
    for word in block.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
    block
}

#[derive(Default, serde::Serialize)]
struct RunFigures {
    baseline_seconds: f64,
    blockrep_initial_seconds: f64,
    rsync_initial_seconds: Option<f64>,
    blockrep_delta_seconds: f64,
    rsync_delta_seconds: Option<f64>,
    serve_peak_memory: Option<u64>,
    protect_peak_memory: Option<u64>,
    delta_wire_bytes: u64,
}

pub fn replicate(arguments: &ReplicateArguments) -> Outcome {
    let directory = std::fs::canonicalize({
        std::fs::create_dir_all(&arguments.dir)?;
        &arguments.dir
    })?;
    let sites = Sites::new(blockrep_binary()?, directory.clone())?;
    let file = |name: &str| directory.join(name);
    let source = file("source.raw");
    eprintln!(
        "making a {} test disk at {}: {}",
        blockrep::units::format_size(arguments.size),
        source.display(),
        source::MIX
    );
    source::make_disk_like(&source, arguments.size)?;
    make_identities(&sites.blockrep, &directory)?;
    let rsync = have("rsync");
    let (rsync_daemon, rsync_port) = if rsync {
        let (daemon, port) = start_rsync_daemon(&directory)?;
        (Some(daemon), port)
    } else {
        eprintln!("SKIPPED rsync lines: rsync is not installed (apt-get install rsync)");
        (None, 0)
    };
    let rsync_target = format!("rsync://127.0.0.1:{rsync_port}/bench/source.raw");
    let cold = !arguments.warm && measure::cold_cache_possible();
    let change_count =
        ((arguments.size / BLOCK) as f64 * arguments.change_percent / 100.0).round() as u64;
    let mut runs = Vec::new();
    for run in 0..arguments.runs.max(1) {
        eprintln!("run {} of {}", run + 1, arguments.runs.max(1));
        let mut figures = RunFigures::default();
        let baseline = Step::baseline(
            "baseline",
            &source.to_string_lossy(),
            &file("baseline.out").to_string_lossy(),
            false,
        );
        figures.baseline_seconds = baseline.measure(cold)?.seconds;
        std::fs::remove_file(file("baseline.out"))?;
        if rsync {
            let _ = std::fs::remove_file(file("rsync-destination/source.raw"));
            drop_caches(cold)?;
            let started = Instant::now();
            let status = Command::new("rsync")
                .args(["--sparse"])
                .arg(&source)
                .arg(&rsync_target)
                .status()?;
            if !status.success() {
                return Err("rsync (initial) failed".into());
            }
            File::open(file("rsync-destination/source.raw"))?.sync_all()?;
            figures.rsync_initial_seconds = Some(started.elapsed().as_secs_f64());
            crate::resync::make_stale(&file("rsync-destination/source.raw"))?;
        }
        // blockrep: a fresh replica and fresh tracking each run.
        let run_directory = &sites.run_directory;
        let _ = std::fs::remove_dir_all(file("store"));
        for stale in ["source.raw.brtrack", "source.raw.brspool", "nbd.sock"] {
            let _ = std::fs::remove_file(file(stale));
        }
        let replica_port = free_port(true)?;
        drop_caches(cold)?;
        let serve = sites.serve(replica_port, &[])?;
        let started = Instant::now();
        let nbd = format!("unix:{}", file("nbd.sock").display());
        let protect = sites.protect(replica_port, &["--frequency", "10s", "--nbd", &nbd])?;
        wait_for(run_directory, "initial replication", |report| {
            report["applied_sequence"].as_u64() >= Some(1)
        })?;
        figures.blockrep_initial_seconds = started.elapsed().as_secs_f64();
        let settled = wait_for(run_directory, "the first cycle", |report| {
            report["applied_sequence"].as_u64() >= Some(2)
        })?;
        let applied = settled["applied_sequence"].as_u64().unwrap_or(0);
        let wire_before = settled["bytes_after_compression"].as_u64().unwrap_or(0);
        // The VM changes blocks at random, through NBD.
        let mut client = NbdClient::connect(&file("nbd.sock"))?;
        for (position, block) in changed_blocks(arguments.size, change_count, 0xC0FFEE + run as u64)
            .into_iter()
            .enumerate()
        {
            client.write(
                block * BLOCK,
                &random_block(position as u64 ^ (run as u64) << 32),
            )?;
        }
        client.flush()?;
        client.disconnect()?;
        drop_caches(cold)?;
        let shipped = wait_for(run_directory, "the delta", |report| {
            report["applied_sequence"].as_u64() > Some(applied)
                && report["pending_bytes"].as_u64() == Some(0)
        })?;
        let delta_bytes = shipped["last_delta_bytes"].as_u64().unwrap_or(0);
        if shipped["applied_sequence"].as_u64() != Some(applied + 1)
            || delta_bytes != change_count * BLOCK
        {
            return Err(format!(
                "the change did not ship as one delta ({delta_bytes} bytes in delta {:?}); run again",
                shipped["applied_sequence"]
            )
            .into());
        }
        figures.blockrep_delta_seconds = shipped["last_delta_latency_seconds"]
            .as_f64()
            .unwrap_or(0.0);
        figures.delta_wire_bytes =
            shipped["bytes_after_compression"].as_u64().unwrap_or(0) - wire_before;
        figures.serve_peak_memory = serve.peak_memory();
        figures.protect_peak_memory = protect.peak_memory();
        protect.stop()?;
        serve.stop()?;
        if rsync {
            drop_caches(cold)?;
            let started = Instant::now();
            crate::resync::run_rsync(&source, &rsync_target)?;
            File::open(file("rsync-destination/source.raw"))?.sync_all()?;
            figures.rsync_delta_seconds = Some(started.elapsed().as_secs_f64());
            if !measure::same_content(&source, &file("rsync-destination/source.raw"))? {
                return Err("rsync's copy differs from the source: not reporting speeds".into());
            }
        }
        verify_replica(&source, &file("store/vm1/disk-0.vhdx"))?;
        runs.push(figures);
    }
    drop(rsync_daemon);
    report(arguments, &runs, change_count, cold)?;
    if !arguments.keep {
        std::fs::remove_dir_all(&directory)?;
    }
    Ok(())
}

use std::fs::File;

pub(crate) fn verify_replica(source: &Path, replica: &Path) -> Outcome {
    if have("qemu-img") {
        let status = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "vhdx"])
            .arg(source)
            .arg(replica)
            .status()?;
        if !status.success() {
            return Err(format!(
                "{} does not equal the source: not reporting speeds",
                replica.display()
            )
            .into());
        }
    } else {
        eprintln!(
            "SKIPPED the replica check: qemu-img is not installed (apt-get install qemu-utils)"
        );
    }
    Ok(())
}

fn report(
    arguments: &ReplicateArguments,
    runs: &[RunFigures],
    change_count: u64,
    cold: bool,
) -> Outcome {
    let size = arguments.size as f64;
    let pick = |get: &dyn Fn(&RunFigures) -> Option<f64>| -> Option<f64> {
        let mut values: Vec<f64> = runs.iter().filter_map(get).collect();
        (!values.is_empty()).then(|| crate::report::median(&mut values))
    };
    let baseline = pick(&|run| Some(run.baseline_seconds)).unwrap_or(f64::NAN);
    let initial = pick(&|run| Some(run.blockrep_initial_seconds)).unwrap_or(f64::NAN);
    let rsync_initial = pick(&|run| run.rsync_initial_seconds);
    let delta = pick(&|run| Some(run.blockrep_delta_seconds)).unwrap_or(f64::NAN);
    let rsync_delta = pick(&|run| run.rsync_delta_seconds);
    let serve_memory = runs.iter().filter_map(|run| run.serve_peak_memory).max();
    let protect_memory = runs.iter().filter_map(|run| run.protect_peak_memory).max();
    let changed = change_count * BLOCK;
    let wire = runs
        .iter()
        .map(|run| run.delta_wire_bytes)
        .max()
        .unwrap_or(0);
    if arguments.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "scenario": "replicate",
                "virtual_size": arguments.size,
                "mix": source::MIX,
                "runs": runs,
                "changed_bytes": changed,
                "cold_page_cache": cold,
                "median": {
                    "baseline_seconds": baseline,
                    "blockrep_initial_seconds": initial,
                    "rsync_initial_seconds": rsync_initial,
                    "blockrep_delta_seconds": delta,
                    "rsync_delta_seconds": rsync_delta,
                },
            }))?
        );
        return Ok(());
    }
    let megabytes = |seconds: f64| size / seconds / 1e6;
    println!(
        "disk: {} ({}); median of {} runs; page cache {}",
        blockrep::units::format_size(arguments.size),
        source::MIX,
        runs.len(),
        if cold {
            "dropped before each line"
        } else {
            "warm"
        }
    );
    println!("\ninitial replication (MB/s over the virtual size)");
    println!(
        "{:<46} {:>9} {:>9} {:>11}",
        "line", "seconds", "MB/s", "x baseline"
    );
    let line = |name: &str, seconds: f64| {
        println!(
            "{name:<46} {seconds:>9.3} {:>9.0} {:>11.2}",
            megabytes(seconds),
            baseline / seconds
        );
    };
    line("O_DIRECT pwrite loop (baseline)", baseline);
    line("blockrep serve + protect, loopback QUIC", initial);
    if let Some(rsync) = rsync_initial {
        line("rsync --sparse via rsync daemon, loopback", rsync);
    }
    println!(
        "\ndelta: {} blocks of 64 KiB changed at random ({} = {}% of the disk); wire bytes {}",
        change_count,
        blockrep::units::format_size(changed),
        arguments.change_percent,
        blockrep::units::format_size(wire)
    );
    println!("{:<46} {:>9} {:>16}", "line", "seconds", "x blockrep time");
    println!(
        "{:<46} {delta:>9.3} {:>16.2}",
        "blockrep: cut to applied on the replica", 1.0
    );
    if let Some(rsync) = rsync_delta {
        println!(
            "{:<46} {rsync:>9.3} {:>16.2}",
            "rsync --inplace --no-whole-file via daemon",
            rsync / delta
        );
    }
    let show = |memory: Option<u64>| {
        memory.map_or("-".to_string(), |bytes| format!("{} MiB", bytes >> 20))
    };
    println!(
        "\npeak memory: blockrep serve {}, blockrep protect {}",
        show(serve_memory),
        show(protect_memory)
    );
    Ok(())
}
