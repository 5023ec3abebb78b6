//! `e2e resync`: a replica that differs from its primary in a share of its 64 KiB blocks, with
//! tracking lost (the journal deleted, the blocks changed behind blockrep's back), brought back
//! in line. Timed in one run: blockrep (serve + protect over loopback QUIC, comparing by hash
//! and shipping what differs), `rsync --inplace --no-whole-file` locally and through an rsync
//! daemon, and the machine's limit: reading both images once. Every copy is checked against
//! the source before any figure is printed; each blockrep process's peak memory is read.

use crate::measure;
use crate::replicate::{
    BLOCK, changed_blocks, drop_caches, free_port, random_block, start_rsync_daemon,
    verify_replica, wait_for,
};
use crate::sites::Sites;
use crate::{Outcome, blockrep_binary, have, source};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// No recovery points to keep, and no cycle due while the comparison runs: the line times the
/// resynchronization alone.
const SERVE: &[&str] = &["--recovery-points", "0"];
const PROTECT: &[&str] = &["--frequency", "1h"];

#[derive(clap::Args)]
pub struct ResyncArguments {
    /// Size of each test disk (a multiple of 1M).
    #[arg(long, default_value = "4G", value_parser = crate::size_argument)]
    size: u64,
    /// Timed runs of each line; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Percentage of the 64 KiB blocks that differ.
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Working directory (on the disk to measure).
    #[arg(long, default_value = "target/e2e-resync")]
    dir: PathBuf,
    /// Keep the working directory afterwards.
    #[arg(long)]
    keep: bool,
    /// Leave the page cache alone (by default, as root, it is dropped before each line).
    #[arg(long)]
    warm: bool,
}

#[derive(Default, serde::Serialize)]
struct RunFigures {
    read_both_seconds: f64,
    blockrep_seconds: f64,
    differing_bytes: u64,
    rsync_local_seconds: Option<f64>,
    rsync_daemon_seconds: Option<f64>,
    serve_peak_memory: Option<u64>,
    protect_peak_memory: Option<u64>,
}

pub fn resync(arguments: &ResyncArguments) -> Outcome {
    let directory = std::fs::canonicalize({
        std::fs::create_dir_all(&arguments.dir)?;
        &arguments.dir
    })?;
    let sites = Sites::new(blockrep_binary()?, directory)?;
    let source = sites.file("source.raw");
    eprintln!(
        "making a {} test disk at {}: {}",
        blockrep::units::format_size(arguments.size),
        source.display(),
        source::MIX
    );
    source::make_disk_like(&source, arguments.size)?;
    for stale in ["source.raw.brtrack", "source.raw.brspool"] {
        let _ = std::fs::remove_file(sites.file(stale));
    }
    let _ = std::fs::remove_dir_all(sites.file("store"));
    crate::replicate::make_identities(&sites.blockrep, &sites.directory)?;
    // The replica, made once by an initial replication (not timed).
    eprintln!("initial replication of the test disk (not timed)");
    let port = free_port(true)?;
    let serve = sites.serve(port, SERVE)?;
    let protect = sites.protect(port, PROTECT)?;
    wait_for(&sites.run_directory, "initial replication", |report| {
        report["applied_sequence"].as_u64() >= Some(1) && report["pending_bytes"] == 0
    })?;
    protect.stop()?;
    serve.stop()?;
    let rsync = have("rsync");
    let daemon_copy = sites.file("rsync-destination/source.raw");
    let (rsync_daemon, rsync_port) = if rsync {
        let (daemon, port) = start_rsync_daemon(&sites.directory)?;
        (Some(daemon), port)
    } else {
        eprintln!("SKIPPED rsync lines: rsync is not installed (apt-get install rsync)");
        (None, 0)
    };
    let local_copy = sites.file("rsync-local.raw");
    let cold = !arguments.warm && measure::cold_cache_possible();
    let change_count =
        ((arguments.size / BLOCK) as f64 * arguments.change_percent / 100.0).round() as u64;
    let mut runs = Vec::new();
    for run in 0..arguments.runs.max(1) {
        eprintln!("run {} of {}", run + 1, arguments.runs.max(1));
        let mut figures = RunFigures::default();
        // rsync's destinations start where the replica is: the source before this run's change.
        for (copy, wanted) in [(&local_copy, true), (&daemon_copy, rsync)] {
            if wanted {
                std::fs::copy(&source, copy)?;
                make_stale(copy)?;
            }
        }
        // The change, behind blockrep's back, and tracking lost.
        let file = OpenOptions::new().write(true).open(&source)?;
        for (position, block) in changed_blocks(arguments.size, change_count, 0x5EED + run as u64)
            .into_iter()
            .enumerate()
        {
            file.write_all_at(
                &random_block(position as u64 ^ 0xABCD ^ (run as u64) << 40),
                block * BLOCK,
            )?;
        }
        file.sync_all()?;
        drop(file);
        std::fs::remove_file(sites.file("source.raw.brtrack"))?;
        // The limit: reading both images once.
        let replica = sites.file("store/vm1/disk-0.vhdx");
        settle_cache(cold, &[&source, &local_copy])?;
        let started = Instant::now();
        crate::measure::read_through(&source)?;
        crate::measure::read_through(&local_copy)?;
        figures.read_both_seconds = started.elapsed().as_secs_f64();
        // blockrep: both sides hash their disk, and what differs ships.
        settle_cache(cold, &[&source, &replica])?;
        let port = free_port(true)?;
        let serve = sites.serve(port, SERVE)?;
        let started = Instant::now();
        let protect = sites.protect(port, PROTECT)?;
        let done = wait_for(&sites.run_directory, "the resynchronization", |report| {
            report["resync"].is_object()
                && report["state"] == "replicating"
                && report["pending_bytes"] == 0
                && report["last_delta_bytes"].as_u64().unwrap_or(0) > 0
        })?;
        figures.blockrep_seconds = started.elapsed().as_secs_f64();
        figures.differing_bytes = done["resync"]["differing_bytes"].as_u64().unwrap_or(0);
        figures.serve_peak_memory = serve.peak_memory();
        figures.protect_peak_memory = protect.peak_memory();
        protect.stop()?;
        serve.stop()?;
        if figures.differing_bytes != change_count * BLOCK {
            return Err(format!(
                "the resynchronization found {} bytes differing, {} were changed",
                figures.differing_bytes,
                change_count * BLOCK
            )
            .into());
        }
        verify_replica(&source, &replica)?;
        if rsync {
            settle_cache(cold, &[&source, &local_copy])?;
            let started = Instant::now();
            run_rsync(&source, &local_copy.to_string_lossy())?;
            File::open(&local_copy)?.sync_all()?;
            figures.rsync_local_seconds = Some(started.elapsed().as_secs_f64());
            settle_cache(cold, &[&source, &daemon_copy])?;
            let started = Instant::now();
            run_rsync(
                &source,
                &format!("rsync://127.0.0.1:{rsync_port}/bench/source.raw"),
            )?;
            File::open(&daemon_copy)?.sync_all()?;
            figures.rsync_daemon_seconds = Some(started.elapsed().as_secs_f64());
            for copy in [&local_copy, &daemon_copy] {
                if !measure::same_content(&source, copy)? {
                    return Err("rsync's copy differs from the source: not reporting speeds".into());
                }
            }
        }
        runs.push(figures);
    }
    drop(rsync_daemon);
    report(arguments, &runs, change_count, cold)?;
    if !arguments.keep {
        std::fs::remove_dir_all(&sites.directory)?;
    }
    Ok(())
}

/// Dates `copy` an hour back, as a real stale copy is: rsync's quick check (size, and time to
/// the second) must not take it for current when the source changed within the same second.
pub(crate) fn make_stale(copy: &Path) -> Outcome {
    let stale = std::time::SystemTime::now() - Duration::from_secs(3600);
    File::options()
        .write(true)
        .open(copy)?
        .set_modified(stale)?;
    Ok(())
}

pub(crate) fn run_rsync(source: &Path, destination: &str) -> Outcome {
    let status = Command::new("rsync")
        .args(["--inplace", "--no-whole-file"])
        .arg(source)
        .arg(destination)
        .status()?;
    if !status.success() {
        return Err(format!("rsync to {destination} failed").into());
    }
    Ok(())
}

/// Puts every line on the same footing: cold drops the page cache; warm reads the line's
/// inputs first, so each tool finds them in memory rather than whatever the step before left.
fn settle_cache(cold: bool, inputs: &[&Path]) -> Outcome {
    drop_caches(cold)?;
    if !cold {
        for input in inputs {
            crate::measure::read_through(input)?;
        }
    }
    Ok(())
}

fn report(
    arguments: &ResyncArguments,
    runs: &[RunFigures],
    change_count: u64,
    cold: bool,
) -> Outcome {
    let pick = |get: &dyn Fn(&RunFigures) -> Option<f64>| -> Option<f64> {
        let mut values: Vec<f64> = runs.iter().filter_map(get).collect();
        (!values.is_empty()).then(|| crate::report::median(&mut values))
    };
    let limit = pick(&|run| Some(run.read_both_seconds)).unwrap_or(f64::NAN);
    let blockrep = pick(&|run| Some(run.blockrep_seconds)).unwrap_or(f64::NAN);
    let local = pick(&|run| run.rsync_local_seconds);
    let daemon = pick(&|run| run.rsync_daemon_seconds);
    let serve_memory = runs.iter().filter_map(|run| run.serve_peak_memory).max();
    let protect_memory = runs.iter().filter_map(|run| run.protect_peak_memory).max();
    if arguments.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "scenario": "resync",
                "virtual_size": arguments.size,
                "mix": source::MIX,
                "changed_bytes": change_count * BLOCK,
                "cold_page_cache": cold,
                "runs": runs,
                "median": {
                    "read_both_seconds": limit,
                    "blockrep_seconds": blockrep,
                    "rsync_local_seconds": local,
                    "rsync_daemon_seconds": daemon,
                },
            }))?
        );
        return Ok(());
    }
    println!(
        "two {} images ({}) differing in {} blocks of 64 KiB ({} = {}%); median of {} runs; page cache {}",
        blockrep::units::format_size(arguments.size),
        source::MIX,
        change_count,
        blockrep::units::format_size(change_count * BLOCK),
        arguments.change_percent,
        runs.len(),
        if cold {
            "dropped before each line"
        } else {
            "warm"
        }
    );
    println!("{:<52} {:>9} {:>16}", "line", "seconds", "x blockrep time");
    let line = |name: &str, seconds: f64| {
        println!("{name:<52} {seconds:>9.3} {:>16.2}", seconds / blockrep);
    };
    line("read both images once (the limit)", limit);
    line("blockrep resync: serve + protect, loopback QUIC", blockrep);
    if let Some(seconds) = local {
        line("rsync --inplace --no-whole-file, local", seconds);
    }
    if let Some(seconds) = daemon {
        line("rsync --inplace --no-whole-file via daemon", seconds);
    }
    let show = |memory: Option<u64>| {
        memory.map_or("-".to_string(), |bytes| format!("{} MiB", bytes >> 20))
    };
    println!(
        "\npeak memory: blockrep serve {}, blockrep protect {}; hashes: 256 KiB per GiB of disk per side",
        show(serve_memory),
        show(protect_memory)
    );
    Ok(())
}
