//! The end-to-end comparison harness: in one run, on one machine, time blockrep against the
//! machine's own limit (a plain O_DIRECT write loop) and against the tools users would pick
//! instead (qemu-img), check every output, and report medians as ratios of the baseline.
//!
//! `cargo run --release -p blockrep-benches --bin e2e -- convert [--size 4G] [--runs 3] [--json]`
//! `cargo run --release -p blockrep-benches --bin e2e -- replicate [--size 4G] [--runs 3]`
//! `cargo run --release -p blockrep-benches --bin e2e -- points [--size 1G] [--hours 24]`
//! `cargo run --release -p blockrep-benches --bin e2e -- resync [--size 4G] [--runs 3]`

mod measure;
mod nbd_client;
mod points;
mod replicate;
mod report;
mod resync;
mod sites;
mod source;

use clap::{Parser, Subcommand};
use measure::{Sample, Step};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "e2e",
    about = "blockrep's end-to-end benchmarks, compared in one run"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Image conversion: raw -> VHDX and back, blockrep (io_uring and sync) against qemu-img
    /// and an O_DIRECT write loop.
    Convert(ConvertArguments),
    /// Replication over loopback: initial replication and a delta of changed blocks, blockrep
    /// (serve + protect) against rsync through an rsync daemon and an O_DIRECT write loop.
    Replicate(replicate::ReplicateArguments),
    /// Recovery points: the undo data a day of hourly points keeps, against the disk's size
    /// and against keeping every cycle's undo.
    Points(points::PointsArguments),
    /// Resynchronization: a replica that differs from the primary in a share of its blocks
    /// (tracking lost), blockrep's comparison by hash over loopback against rsync (local and
    /// through a daemon) and against reading both images.
    Resync(resync::ResyncArguments),
}

#[derive(clap::Args)]
struct ConvertArguments {
    /// Size of the test disk (a multiple of 1M).
    #[arg(long, default_value = "4G", value_parser = size_argument)]
    size: u64,
    /// Timed runs of each line; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Working directory for the test disk and outputs (on the disk to measure).
    #[arg(long, default_value = "target/e2e")]
    dir: PathBuf,
    /// Keep the test disk and outputs afterwards.
    #[arg(long)]
    keep: bool,
    /// Leave the page cache alone between steps (by default, as root, it is dropped so every
    /// step reads its input from the disk).
    #[arg(long)]
    warm: bool,
}

fn size_argument(text: &str) -> Result<u64, String> {
    let size = blockrep::units::parse_size(text).map_err(|error| error.to_string())?;
    if size == 0 || !size.is_multiple_of(1 << 20) {
        return Err(format!(
            "{text}: the size must be a positive multiple of 1M"
        ));
    }
    Ok(size)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.scenario {
        Scenario::Convert(arguments) => convert(&arguments),
        Scenario::Replicate(arguments) => replicate::replicate(&arguments),
        Scenario::Points(arguments) => points::points(&arguments),
        Scenario::Resync(arguments) => resync::resync(&arguments),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("e2e: error: {error}");
            ExitCode::FAILURE
        }
    }
}

type Outcome<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// The `blockrep` binary of this build, built first if needed.
fn blockrep_binary() -> Outcome<PathBuf> {
    let here = std::env::current_exe()?;
    let binary = here.with_file_name("blockrep");
    let profile_is_release = here.parent().and_then(Path::file_name) == Some("release".as_ref());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "-p", "blockrep-cli"]);
    if profile_is_release {
        build.arg("--release");
    } else {
        eprintln!("warning: e2e was built without --release; timings are not meaningful");
    }
    let status = build.status()?;
    if !status.success() || !binary.exists() {
        return Err(format!("could not build {}", binary.display()).into());
    }
    Ok(binary)
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

fn convert(arguments: &ConvertArguments) -> Outcome {
    let blockrep = blockrep_binary()?;
    let directory = &arguments.dir;
    std::fs::create_dir_all(directory)?;
    let file = |name: &str| directory.join(name).to_string_lossy().into_owned();
    let source = file("source.raw");
    eprintln!(
        "making a {} test disk at {source}: {}",
        blockrep::units::format_size(arguments.size),
        source::MIX
    );
    source::make_disk_like(Path::new(&source), arguments.size)?;

    let blockrep = blockrep.to_string_lossy().into_owned();
    let convert_with = |io: &str, output: &str| -> Vec<String> {
        [
            &blockrep, "image", "convert", "--force", "--io", io, &source, output,
        ]
        .iter()
        .map(|text| text.to_string())
        .collect()
    };
    let mut steps = vec![
        Step::baseline(
            "O_DIRECT pwrite loop (baseline)",
            &source,
            &file("baseline.out"),
            false,
        ),
        Step::baseline(
            "O_DIRECT pwrite loop, zeros skipped",
            &source,
            &file("baseline-sparse.out"),
            true,
        ),
        Step::command(
            "blockrep raw -> vhdx, io_uring",
            convert_with("uring", &file("blockrep-uring.vhdx")),
            &source,
            &file("blockrep-uring.vhdx"),
        ),
        Step::command(
            "blockrep raw -> vhdx, sync",
            convert_with("sync", &file("blockrep-sync.vhdx")),
            &source,
            &file("blockrep-sync.vhdx"),
        ),
    ];
    let qemu = have("qemu-img");
    if qemu {
        steps.push(Step::command(
            "qemu-img convert raw -> vhdx",
            [
                "qemu-img",
                "convert",
                "-O",
                "vhdx",
                &source,
                &file("qemu.vhdx"),
            ]
            .map(String::from)
            .to_vec(),
            &source,
            &file("qemu.vhdx"),
        ));
    } else {
        eprintln!("SKIPPED qemu-img lines: qemu-img is not installed (apt-get install qemu-utils)");
    }
    steps.push(Step::command(
        "blockrep vhdx -> raw",
        [
            &blockrep,
            "image",
            "convert",
            "--force",
            &file("blockrep-uring.vhdx"),
            &file("blockrep-back.raw"),
        ]
        .map(String::from)
        .to_vec(),
        &file("blockrep-uring.vhdx"),
        &file("blockrep-back.raw"),
    ));
    if qemu {
        steps.push(Step::command(
            "qemu-img convert vhdx -> raw",
            [
                "qemu-img",
                "convert",
                "-f",
                "vhdx",
                "-O",
                "raw",
                &file("blockrep-uring.vhdx"),
                &file("qemu-back.raw"),
            ]
            .map(String::from)
            .to_vec(),
            &file("blockrep-uring.vhdx"),
            &file("qemu-back.raw"),
        ));
    }

    let cold = !arguments.warm && measure::cold_cache_possible();
    if !arguments.warm && !cold {
        eprintln!(
            "note: not root, so the page cache cannot be dropped between steps: inputs are read warm"
        );
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); steps.len()];
    for run in 0..arguments.runs.max(1) {
        eprintln!("run {} of {}", run + 1, arguments.runs.max(1));
        // Rounds interleave the lines, so a slow spell of the machine hits them all alike.
        for (step, collected) in steps.iter().zip(&mut samples) {
            collected.push(step.measure(cold)?);
        }
        if run == 0 {
            verify(&source, directory, qemu)?;
        }
    }
    let rows = report::rows(&steps, &samples, arguments.size);
    if arguments.json {
        println!(
            "{}",
            report::json(&rows, arguments.size, arguments.runs, source::MIX, cold)?
        );
    } else {
        report::table(&rows, arguments.size, arguments.runs, source::MIX, cold);
    }
    if !arguments.keep {
        std::fs::remove_dir_all(directory)?;
    }
    Ok(())
}

/// Checks every output before any speed is reported: the round trips give back the source
/// byte for byte, and every VHDX holds exactly the source's content.
fn verify(source: &str, directory: &Path, qemu: bool) -> Outcome {
    let source = Path::new(source);
    let mut same = vec![
        directory.join("baseline.out"),
        directory.join("baseline-sparse.out"),
        directory.join("blockrep-back.raw"),
    ];
    if qemu {
        same.push(directory.join("qemu-back.raw"));
    }
    for output in &same {
        if !measure::same_content(source, output)? {
            return Err(format!(
                "{} differs from the source: not reporting speeds",
                output.display()
            )
            .into());
        }
    }
    if qemu {
        for image in ["blockrep-uring.vhdx", "blockrep-sync.vhdx", "qemu.vhdx"] {
            let image = directory.join(image);
            let status = std::process::Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", "vhdx"])
                .arg(source)
                .arg(&image)
                .status()?;
            if !status.success() {
                return Err(format!(
                    "{} does not hold the source's content: not reporting speeds",
                    image.display()
                )
                .into());
            }
        }
    }
    eprintln!("outputs verified: round trips are byte-identical to the source");
    Ok(())
}
