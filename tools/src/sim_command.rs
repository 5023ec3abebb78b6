//! `blockrep sim run | fuzz`: the simulator (crate blockrep-sim) from the command line.

use blockrep::units::parse_duration;
use blockrep_sim::{Report, RunOptions, Scenario};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

type Outcome = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Subcommand)]
pub enum SimCommand {
    /// Run a scenario: the real engine on simulated sites, hosts, links and faults, on a
    /// virtual clock. Prints the report (RPO per VM, bytes written and shipped, compression,
    /// missed cycles, failovers, health) and exits 1 when an invariant was violated.
    Run(RunArguments),
    /// Run random scenarios with random faults, one per seed, and print each failing seed with
    /// the command that replays it. Exits 1 when any seed failed.
    Fuzz(FuzzArguments),
}

#[derive(Args)]
pub struct RunArguments {
    /// The scenario file (TOML; see docs/simulator.md and simulator/scenarios/).
    scenario: PathBuf,
    /// The seed: the same seed gives the same run (default: the scenario's).
    #[arg(long)]
    seed: Option<u64>,
    /// Simulated time to run, such as 30m or 24h (default: the scenario's).
    #[arg(long, value_parser = parse_length)]
    duration: Option<Duration>,
    /// Also write the report as an HTML page with charts (DIR/report.html) and JSON
    /// (DIR/report.json).
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct FuzzArguments {
    /// How many seeds to run.
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Replay one seed and print its scenario and report.
    #[arg(long, conflicts_with_all = ["seeds", "first"])]
    seed: Option<u64>,
    /// Simulated time per seed.
    #[arg(long, default_value = "30m", value_parser = parse_length)]
    duration: Duration,
    /// Switch one of the engine's deliberate bugs on, to see the simulator find it (builds
    /// with the `planted-bugs` feature only).
    #[cfg(feature = "planted-bugs")]
    #[arg(long, value_name = "BUG", value_parser = parse_bug)]
    plant: Option<blockrep::planted::Bug>,
}

#[cfg(feature = "planted-bugs")]
fn parse_bug(text: &str) -> Result<blockrep::planted::Bug, String> {
    use blockrep::planted::Bug;
    Bug::ALL
        .into_iter()
        .find(|bug| bug.name() == text)
        .ok_or_else(|| {
            let names: Vec<&str> = Bug::ALL.iter().map(|bug| bug.name()).collect();
            format!("no planted bug {text:?}; there are: {}", names.join(", "))
        })
}

fn parse_length(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|error| error.to_string())
}

pub fn run(command: SimCommand) -> Outcome {
    match command {
        SimCommand::Run(arguments) => run_scenario(arguments),
        SimCommand::Fuzz(arguments) => fuzz(arguments),
    }
}

fn progress_bar(total: Duration) -> ProgressBar {
    let bar = ProgressBar::new(total.as_secs()).with_style(
        ProgressStyle::with_template(
            "{spinner} simulated {msg} [{bar:30}] {percent}% (elapsed {elapsed}, left {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

fn run_scenario(arguments: RunArguments) -> Outcome {
    let scenario = Scenario::load(&arguments.scenario)?;
    let seed = arguments.seed.unwrap_or(scenario.seed);
    let duration = arguments.duration.unwrap_or(scenario.duration);
    let bar = progress_bar(duration);
    let ticker = bar.clone();
    let report = blockrep_sim::run(
        scenario,
        RunOptions {
            seed,
            duration,
            progress: Some(Box::new(move |now, _| {
                ticker.set_position(now.as_secs());
                let seconds = now.as_secs();
                ticker.set_message(format!(
                    "{:02}:{:02}:{:02}",
                    seconds / 3600,
                    seconds / 60 % 60,
                    seconds % 60
                ));
            })),
        },
    )?;
    bar.finish_and_clear();
    if let Some(directory) = &arguments.report {
        write_report(directory, &report)?;
    }
    if arguments.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
        if let Some(directory) = &arguments.report {
            println!("report: {}", directory.join("report.html").display());
        }
        if !report.passed() {
            println!(
                "replay: blockrep sim run {} --seed {seed} --duration {}s",
                arguments.scenario.display(),
                duration.as_secs()
            );
        }
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn write_report(directory: &Path, report: &Report) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(directory)
        .map_err(|error| format!("{}: {error}", directory.display()))?;
    for (name, contents) in [
        ("report.html", blockrep_sim::html::html(report)),
        ("report.json", serde_json::to_string_pretty(report)?),
    ] {
        let path = directory.join(name);
        let (output, mut file) = crate::output_file::OutputFile::create(&path, true)?;
        std::io::Write::write_all(&mut file, contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|error| format!("{}: {error}", path.display()))?;
        output.commit()?;
    }
    Ok(())
}

fn fuzz(arguments: FuzzArguments) -> Outcome {
    #[cfg(feature = "planted-bugs")]
    if let Some(bug) = arguments.plant {
        eprintln!("blockrep: the engine's bug {:?} is planted", bug.name());
        blockrep::planted::plant(bug, true);
    }
    if let Some(seed) = arguments.seed {
        println!("{}", blockrep_sim::fuzz::scenario_for(seed));
        let outcome =
            blockrep_sim::fuzz::run_seeds(seed, 1, arguments.duration, 1, |_, report| {
                print!("{}", report.text());
            })?;
        return Ok(if outcome.failures.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let bar = ProgressBar::new(arguments.seeds).with_style(
        ProgressStyle::with_template(
            "{spinner} seed {pos}/{len} [{bar:30}] (elapsed {elapsed}, left {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let duration = arguments.duration;
    let outcome = blockrep_sim::fuzz::run_seeds(
        arguments.first,
        arguments.seeds,
        duration,
        usize::MAX,
        |seed, report| {
            bar.inc(1);
            if !report.passed() {
                bar.suspend(|| {
                    println!("seed {seed} FAILED: {}", report.violations[0]);
                    println!(
                        "  replay: blockrep sim fuzz --seed {seed} --duration {}s",
                        duration.as_secs()
                    );
                });
            }
        },
    )?;
    bar.finish_and_clear();
    println!(
        "{} seeds run, {} failed",
        outcome.seeds_run,
        outcome.failures.len()
    );
    Ok(if outcome.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
