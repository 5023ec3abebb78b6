//! `blockrep identity`, `serve`, `protect` and `status`: replication between two hosts.
//!
//! Beside this: `arguments` (the daemons' flags), `serve`, `requests` (a daemon's control
//! socket, asked), `failover` (the operator's failover commands), `maintenance` (suspend,
//! seed, resync, verify) and `status`.

use crate::control::{ControlSocket, query_all, run_directory};
use crate::peer::{Peer, check_may_create};
use blockrep::io::{IoEngine, StorageOptions};
use blockrep::nbd::NbdAddress;
use blockrep::net::{
    DaemonStatus, ExtensionOptions, Hosting, HostingOptions, Identity, ReplicaServer, SharedReport,
    client_endpoint, load_certificate,
};
use blockrep::proto::ReplicationState;
use blockrep::replica::{Limits, PointPolicy, ReplicaStore};
use blockrep::units::{format_size, parse_duration, parse_rate};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

mod arguments;
mod failover;
mod maintenance;
mod requests;
mod serve;
mod status;

pub use arguments::*;
pub use failover::*;
pub use maintenance::*;
pub(crate) use requests::*;
pub use serve::*;
pub use status::*;

type Outcome = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum InitialMode {
    Auto,
    Full,
    Existing,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Switch {
    On,
    Off,
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "primary".into())
}

/// A seed for cut numbers: different in every run, which is all it needs to be.
pub(crate) fn rand_seed() -> u64 {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0);
    time ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests;
