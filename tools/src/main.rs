//! The `blockrep` command.

mod delta_command;
mod image_command;
mod output_file;

use clap::{Parser, Subcommand};
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
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`blockrep image info x | head`) instead of panicking on a failed print.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLOCKREP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Image(command) => image_command::run(command),
        Command::Delta(command) => delta_command::run(command),
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
