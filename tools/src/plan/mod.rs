//! `blockrep plan run | check`: recovery plans, groups of VMs failed over in order with scripts
//! and manual steps before and after each group (docs/plans.md).

mod file;
mod report;
mod runner;
mod script;
mod steps;

use crate::replication_command;
use clap::{Args, Subcommand};
use file::{Action, Plan, VmEntry};
use runner::{Console, FailoverActions, Mode};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

type Outcome = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Run a recovery plan: for each group in order, its pre actions, its VMs' failovers, its
    /// post actions. A planned or test run stops at the first failed step; an unplanned run
    /// goes on and reports the failures. Exit status 0 only when every step succeeded.
    Run(RunArguments),
    /// Check a plan file and list the steps a run would take, running nothing.
    Check {
        /// The plan file (TOML; see docs/plans.md).
        plan: PathBuf,
    },
}

#[derive(Args)]
// clap lets `--planned --force` through when `--force` only `requires = "unplanned"`, so each
// mode's options conflict with the other modes instead.
#[command(group(clap::ArgGroup::new("mode").required(true).args(["test", "planned", "unplanned"])))]
pub struct RunArguments {
    /// The plan file (TOML; see docs/plans.md).
    plan: PathBuf,
    /// Test failover: each VM's latest point is copied to OUT/VM; replication goes on.
    #[arg(long, requires = "out")]
    test: bool,
    /// With --test: the directory the copies go to, one directory per VM.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["planned", "unplanned"])]
    out: Option<PathBuf>,
    /// Planned failover: the primary site is still there; a failed step stops the run.
    #[arg(long)]
    planned: bool,
    /// With --planned: replicate back from the recovery site once each VM is there.
    #[arg(long, conflicts_with_all = ["test", "unplanned"])]
    reverse: bool,
    /// Unplanned failover: the primary site is lost; each VM comes up from its latest point
    /// and the run goes on past failed steps.
    #[arg(long)]
    unplanned: bool,
    /// With --unplanned: fail over although a primary still replicates (split brain).
    #[arg(long, conflicts_with_all = ["test", "planned"])]
    force: bool,
    /// Answer every manual step with yes instead of asking on the terminal.
    #[arg(long)]
    yes: bool,
    /// Print one JSON report at the end instead of the steps and summary; scripts' output is
    /// kept in the report.
    #[arg(long)]
    json: bool,
}

pub fn run(command: PlanCommand) -> Outcome {
    match command {
        PlanCommand::Check { plan } => check(&plan),
        PlanCommand::Run(arguments) => run_plan(arguments),
    }
}

fn check(path: &std::path::Path) -> Outcome {
    let plan = Plan::load(path)?;
    let steps = steps::steps(&plan);
    let vms: usize = plan.groups.iter().map(|group| group.vms.len()).sum();
    println!(
        "plan {:?} ({}): {} groups, {vms} VMs, {} steps",
        plan.name,
        path.display(),
        plan.groups.len(),
        steps.len()
    );
    for (index, step) in steps.iter().enumerate() {
        let detail = match step.work {
            steps::Work::Action(Action::Script(script)) => format!(
                " (`{}`, timeout {})",
                script.command,
                script::format_duration(script.timeout)
            ),
            steps::Work::Failover(VmEntry {
                server: Some(server),
                ..
            }) => format!(" (on {})", server.display()),
            _ => String::new(),
        };
        println!(
            "[{}/{}] {}{detail}",
            index + 1,
            steps.len(),
            step.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_plan(arguments: RunArguments) -> Outcome {
    let plan = Plan::load(&arguments.plan)?;
    let mode = if arguments.test {
        let out = arguments.out.ok_or("--test needs --out DIR")?;
        Mode::Test {
            out: std::path::absolute(out)?,
        }
    } else if arguments.planned {
        Mode::Planned {
            reverse: arguments.reverse,
        }
    } else {
        Mode::Unplanned {
            force: arguments.force,
        }
    };
    let stdin = std::io::stdin();
    let input_is_terminal = stdin.is_terminal();
    let mut console = Console {
        progress: if arguments.json {
            Box::new(std::io::sink())
        } else {
            Box::new(std::io::stdout())
        },
        // The JSON document owns stdout, so questions go to the terminal through stderr.
        prompt: if arguments.json {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        },
        input: Box::new(stdin.lock()),
        input_is_terminal,
        assume_yes: arguments.yes,
        capture_output: arguments.json,
    };
    let report = runner::run(&plan, &mode, &ReplicaServers, &mut console)?;
    drop(console);
    if arguments.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        report.write_summary(&mut std::io::stdout())?;
    }
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The replica servers running here, asked over their control sockets.
struct ReplicaServers;

impl FailoverActions for ReplicaServers {
    fn fail_over(&self, vm: &VmEntry, mode: &Mode) -> Result<serde_json::Value, String> {
        let server = vm.server.as_deref();
        match mode {
            Mode::Test { out } => replication_command::request_test_failover(
                &vm.name,
                None,
                &out.join(&vm.name),
                server,
            ),
            // The planned failover finds the VM's servers itself.
            Mode::Planned { reverse } => replication_command::planned_failover(&vm.name, *reverse),
            Mode::Unplanned { force } => {
                replication_command::request_unplanned_failover(&vm.name, None, *force, server)
            }
        }
    }
}
