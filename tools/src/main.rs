//! The `blockrep` command.

mod config_file;
mod connection_limit;
mod control;
mod delta_command;
mod image_command;
mod metrics;
mod output_file;
mod peer;
mod plan;
mod protect_command;
mod replication_command;
mod run_directory;
mod sim_command;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Block replication for Linux lab hosts: VHDX images, change tracking and replication of
/// virtual-machine disks to a second host, in the manner of Hyper-V Replica.
#[derive(Parser)]
#[command(name = "blockrep", version)]
#[command(
    after_help = "Exit status: 0 on success, 1 when the work failed or a check found \
problems, 2 when the command line is wrong.\nSizes: 512K, 64M, 10G, 1T (binary units) or plain bytes."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, inspect, check and convert disk images (VHDX and raw).
    #[command(subcommand)]
    Image(image_command::ImageCommand),
    /// Export, apply and inspect delta files (replication on external media).
    #[command(subcommand)]
    Delta(delta_command::DeltaCommand),
    /// Make or show a host identity (key and certificate) for replication over TLS.
    #[command(subcommand)]
    Identity(replication_command::IdentityCommand),
    /// Run a replica server: receive VMs' disks from allowed primaries into a store.
    Serve(replication_command::ServeArguments),
    /// Protect a VM: replicate its disks to a replica server, serving them over NBD so writes
    /// are tracked; runs until SIGINT or SIGTERM, then saves tracking and exits 0.
    Protect(replication_command::ProtectArguments),
    /// Pause a running primary's replication: tracking goes on, nothing is sent until resume.
    Suspend {
        /// The VM's name, as given to `protect --name`.
        vm: String,
    },
    /// Resume a suspended primary's replication, shipping what changed meanwhile at once.
    Resume {
        /// The VM's name, as given to `protect --name`.
        vm: String,
    },
    /// List a VM's recovery points on the replica server running here: the latest state and
    /// the older points kept (id, time, consistency, undo data kept).
    Points {
        vm: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fail a VM over: a test copy of a recovery point on the replica server running here
    /// (--test, made while replication goes on, one per VM at a time), a planned failover
    /// where the VM runs (--planned, nothing lost), or an unplanned failover on the replica
    /// server when the primary is gone (--unplanned; then --commit or --cancel).
    #[command(group(clap::ArgGroup::new("mode").required(true).args(["test", "planned", "unplanned", "commit", "cancel"])))]
    Failover {
        vm: String,
        /// Test failover: copy a point to --out as VHDX disks, leaving replication untouched.
        #[arg(long)]
        test: bool,
        /// Planned failover, run where the VM runs: its writes stop (NBD clients are told),
        /// the final delta ships, both sites compare their disks by hash, and the VM runs at
        /// the other site. Nothing is lost.
        #[arg(long)]
        planned: bool,
        /// With --planned: replicate back to this host at once.
        // `requires` does not hold for flags (their default counts as present): name the
        // modes a flag cannot go with instead.
        #[arg(long, conflicts_with_all = ["test", "unplanned", "commit", "cancel"])]
        reverse: bool,
        /// Unplanned failover: fence replication off and make the point writable disks (in the
        /// VM's `failover` directory of the store). Refused while the primary is connected.
        #[arg(long)]
        unplanned: bool,
        /// Make an unplanned failover final: its disks become the VM's, older points go.
        #[arg(long)]
        commit: bool,
        /// Undo an unplanned failover not committed: replication from the primary resumes.
        #[arg(long)]
        cancel: bool,
        /// The point: an id from `blockrep points`, latest, or latest-app-consistent.
        #[arg(long, value_name = "ID|latest|latest-app-consistent")]
        point: Option<String>,
        /// With --test: where the copy's disks go (a new or empty directory); the replica
        /// server makes it only where you could make it yourself.
        #[arg(long)]
        out: Option<PathBuf>,
        /// With --test: remove the VM's test failover copy.
        #[arg(long, conflicts_with_all = ["planned", "unplanned", "commit", "cancel"])]
        cleanup: bool,
        /// With --unplanned: fail over although the primary still replicates (split brain).
        #[arg(long, conflicts_with_all = ["test", "planned", "commit", "cancel"])]
        force: bool,
    },
    /// Seed a VM's replica on this replica host from copies of its disks (a backup, or files
    /// copied by hand), so that protecting it compares by hash and ships only what differs
    /// instead of copying everything (`blockrep protect ... --initial existing`).
    Seed {
        /// The replica server's store.
        #[arg(long)]
        store: PathBuf,
        /// The VM's name, as the primary protects it (`--name`).
        #[arg(long)]
        name: String,
        /// Copies of the VM's disks, in the primary's order (VHDX or raw; repeat).
        #[arg(long = "disk", value_name = "IMAGE", required = true)]
        disks: Vec<PathBuf>,
        /// The primary's certificate: the only primary that may replicate this VM.
        #[arg(long, value_name = "CERT")]
        primary: PathBuf,
    },
    /// Compare a VM's disks with its replica by hash and ship only what differs (after tracking
    /// was lost, or to be sure). Runs on the primary; `blockrep status` shows the progress.
    Resync { vm: String },
    /// Compare the replica with the primary by hash, shipping nothing: lists the ranges that
    /// differ (besides changes not shipped yet) and exits 1 when there are any.
    Verify {
        vm: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replicate a VM that failed over to this site back to its old primary (start its
    /// `blockrep protect` again there): only the blocks that differ are shipped.
    Reverse { vm: String },
    /// On the replica host: allow the VM's primary to replace its replica with a new initial
    /// replication (`protect --initial full`), dropping every recovery point. Without this a
    /// primary's initial replication of a replica that holds deltas is refused, so that a
    /// compromised primary cannot erase the points.
    Reinitialize { vm: String },
    /// On the replica host: allow the next planned failover of the VM to this site
    /// (`failover --planned` where it runs), which drops the replica's recovery points. Without
    /// this a planned failover to a replica that keeps points is refused, so that a
    /// compromised primary cannot erase them by handing the VM over.
    AllowHandover { vm: String },
    /// Recovery plans: fail groups of VMs over in order, with scripts and manual steps before
    /// and after each group (docs/plans.md).
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// The simulator: Hyper-V Replica sites, hosts, links and faults around the real engine,
    /// on a virtual clock (docs/simulator.md).
    #[command(subcommand)]
    Sim(sim_command::SimCommand),
    /// Print a shell completion script: `blockrep completions bash > /etc/bash_completion.d/blockrep`
    /// (zsh: a `_blockrep` file on `$fpath`; fish: `~/.config/fish/completions/blockrep.fish`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages, one per command (blockrep.1, blockrep-serve.1, blockrep-image-create.1,
    /// ...), into DIRECTORY: `blockrep man /usr/local/share/man/man1`.
    Man {
        /// Where to write them (made when missing).
        directory: PathBuf,
    },
    /// Show the state and health of the primaries and replica servers running here.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`blockrep image info x | head`) instead of panicking on a failed print.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let arguments = match config_file::expand::<Cli>(std::env::args_os().collect()) {
        Ok(arguments) => arguments,
        Err(error) => {
            eprintln!("blockrep: error: {error}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(arguments);
    // Daemons say what they do; one-shot commands speak only of trouble.
    let daemon = matches!(cli.command, Command::Serve(_) | Command::Protect(_));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLOCKREP_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if daemon { "info,quinn=warn" } else { "warn" })
            }),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if daemon {
        builder.init();
    } else {
        builder.without_time().init();
    }
    let outcome = match cli.command {
        Command::Image(command) => image_command::run(command),
        Command::Delta(command) => delta_command::run(command),
        Command::Identity(command) => replication_command::identity(command),
        Command::Serve(arguments) => replication_command::serve(arguments),
        Command::Protect(arguments) => protect_command::protect(arguments),
        Command::Reverse { vm } => replication_command::reverse(&vm),
        Command::Reinitialize { vm } => replication_command::reinitialize(&vm),
        Command::AllowHandover { vm } => replication_command::allow_handover(&vm),
        Command::Resync { vm } => replication_command::resync(&vm),
        Command::Seed {
            store,
            name,
            disks,
            primary,
        } => replication_command::seed(&store, &name, &disks, &primary),
        Command::Verify { vm, json } => replication_command::verify(&vm, json),
        Command::Status { json } => replication_command::status(json),
        Command::Suspend { vm } => replication_command::suspend(&vm, true),
        Command::Points { vm, json } => replication_command::points(&vm, json),
        Command::Failover {
            vm,
            test,
            planned,
            reverse,
            unplanned,
            commit,
            cancel: _,
            point,
            out,
            cleanup,
            force,
        } => {
            if test {
                replication_command::test_failover(&vm, point.as_deref(), out.as_deref(), cleanup)
            } else if planned {
                replication_command::planned_failover_command(&vm, reverse)
            } else if unplanned {
                replication_command::unplanned_failover(&vm, point.as_deref(), force)
            } else {
                replication_command::finish_failover(&vm, commit)
            }
        }
        Command::Resume { vm } => replication_command::suspend(&vm, false),
        Command::Plan(command) => plan::run(command),
        Command::Sim(command) => sim_command::run(command),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "blockrep",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { directory } => man_pages(&directory),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("blockrep: error: {error}");
            let mut source = std::error::Error::source(&*error);
            while let Some(cause) = source {
                // The engine's messages already embed their I/O cause; print only new text.
                if !error.to_string().contains(&cause.to_string()) {
                    eprintln!("  caused by: {cause}");
                }
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// Writes the man pages of every command into `directory`. They are made from the same
/// definitions as `--help`, so they cannot drift from it.
fn man_pages(directory: &std::path::Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(directory)
        .map_err(|error| format!("cannot make {}: {error}", directory.display()))?;
    clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), directory)
        .map_err(|error| format!("cannot write man pages to {}: {error}", directory.display()))?;
    eprintln!("blockrep: man pages written to {}", directory.display());
    Ok(ExitCode::SUCCESS)
}
