//! The daemons' command-line arguments (`blockrep identity`, `serve`, `protect`) and their
//! parsers.

use super::*;

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Make a host identity: a private key and a self-signed certificate. Give the
    /// certificate (DIR/identity.crt) to the peers that should trust this host.
    Create {
        /// The host's name, shown in peers' logs.
        #[arg(long)]
        name: String,
        /// The directory to write identity.key and identity.crt to.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show an identity's certificate fingerprint.
    Show { directory: PathBuf },
}

#[derive(Args)]
pub struct ServeArguments {
    /// The UDP address to listen on, for example 0.0.0.0:4433.
    #[arg(long)]
    pub(crate) listen: SocketAddr,
    /// The directory that holds the replicas (one directory per VM).
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// This server's identity directory (made with `blockrep identity create`).
    #[arg(long)]
    pub(crate) identity: PathBuf,
    /// Certificates of the primaries allowed to replicate here (repeat for several).
    #[arg(long = "allow", value_name = "CERT", required = true)]
    pub(crate) allowed: Vec<PathBuf>,
    /// Older recovery points kept per VM besides the latest state (0: only the latest).
    #[arg(long, default_value_t = 24)]
    pub(crate) recovery_points: usize,
    /// At most one recovery point is kept per interval.
    #[arg(long, value_parser = duration_argument, default_value = "1h")]
    pub(crate) recovery_point_interval: Duration,
    /// VMs one primary may replicate here; a new VM past it is refused, naming this flag.
    #[arg(long, value_name = "COUNT", default_value_t = Limits::default().vms_per_primary)]
    pub(crate) max_vms_per_primary: usize,
    /// Disks one VM may have.
    #[arg(long, value_name = "COUNT", default_value_t = Limits::default().disks_per_vm)]
    pub(crate) max_disks_per_vm: usize,
    /// The virtual size of all the disks of all the VMs of one primary, together: 256T, 10T.
    #[arg(long, value_name = "SIZE", value_parser = size_argument, default_value = "256T")]
    pub(crate) max_bytes_per_primary: u64,
    /// Serve the disks of each VM that fails over here over NBD, at DIR/VM.sock, so the VM
    /// (or qemu) writes through change tracking.
    #[arg(long, value_name = "DIR")]
    pub(crate) nbd_dir: Option<PathBuf>,
    /// How often a VM running here after a failover replicates back to its old primary.
    #[arg(long, value_parser = duration_argument, default_value = "5m")]
    pub(crate) reverse_frequency: Duration,
    /// Extended replication: replicate every VM kept here onward to the replica server at
    /// HOST:PORT (a third site). It must allow this server's identity.
    #[arg(long, value_name = "HOST:PORT", requires = "extend_trust")]
    pub(crate) extend_to: Option<String>,
    /// The third site's certificate: the only one accepted for extended replication.
    #[arg(long, value_name = "CERT")]
    pub(crate) extend_trust: Option<PathBuf>,
    /// How often the replicas are cut and shipped onward: 5m, 15m or any duration. A cut is
    /// made only after a new delta arrived from the primary, so never more often than it ships.
    #[arg(long, value_parser = duration_argument, default_value = "15m")]
    pub(crate) extend_frequency: Duration,
    #[command(flatten)]
    pub(crate) io: IoArguments,
    /// Serve the statistics of `blockrep status` as Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Read flags from a TOML file, one key per flag (`recovery-points = 24`); flags on the
    /// command line win. Example: docs/examples/serve.toml.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Args)]
pub struct ProtectArguments {
    /// The VM's name on the replica.
    #[arg(long)]
    pub(crate) name: String,
    /// The VM's disk images (VHDX or raw; repeat for several disks).
    #[arg(long = "disk", value_name = "IMAGE", required = true)]
    pub(crate) disks: Vec<PathBuf>,
    /// The replica server, HOST:PORT.
    #[arg(long)]
    pub(crate) replica: String,
    /// This primary's identity directory.
    #[arg(long)]
    pub(crate) identity: PathBuf,
    /// The replica server's certificate: the only one this primary accepts.
    #[arg(long, value_name = "CERT")]
    pub(crate) trust: PathBuf,
    /// Replication frequency: 30s, 5m, 15m, or any duration.
    #[arg(long, value_parser = duration_argument, default_value = "5m")]
    pub(crate) frequency: Duration,
    /// Serve the disks over NBD so a VM or qemu writes through change tracking:
    /// unix:PATH or tcp:ADDR. Each disk is an export named after its file; the first is
    /// also the default export.
    #[arg(long)]
    pub(crate) nbd: Option<NbdAddress>,
    /// Cap the bandwidth replication uses: 100Mbit, 1Gbit, or bytes per second (50M).
    #[arg(long, value_parser = rate_argument)]
    pub(crate) max_rate: Option<u64>,
    /// Compress deltas with lz4 where it pays.
    #[arg(long, value_enum, default_value = "on")]
    pub(crate) compression: Switch,
    /// A command that freezes the VM's applications (`fsfreeze`, a database checkpoint): run as
    /// `COMMAND freeze` before an application-consistent cut and `COMMAND thaw` after it.
    #[arg(long, value_name = "COMMAND")]
    pub(crate) consistency_hook: Option<String>,
    /// How long the hook may take before the cut goes ahead crash-consistent.
    #[arg(long, value_parser = duration_argument, default_value = "60s")]
    pub(crate) hook_timeout: Duration,
    /// How often a cut is application-consistent (needs --consistency-hook).
    #[arg(long, value_parser = duration_argument, default_value = "1h", requires = "consistency_hook")]
    pub(crate) app_consistent_every: Duration,
    /// When tracking cannot vouch for the replica (a new or lost journal): compare by hash if
    /// the replica holds a copy, else copy everything (auto); always copy everything (full); or
    /// compare at start even with tracking intact, for a replica seeded from a copy or a
    /// backup (existing).
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) initial: InitialMode,
    /// Compare by hash only inside this daily window of local time, for example 22:00-06:00;
    /// outside it, a resynchronization that is owed waits, and replication with it.
    #[arg(long, value_name = "HH:MM-HH:MM", value_parser = window_argument)]
    pub(crate) resync_window: Option<blockrep::units::TimeWindow>,
    /// Data streams used at once for large deltas.
    #[arg(long, default_value = "4", value_parser = clap::value_parser!(u16).range(1..=32))]
    pub(crate) streams: u16,
    #[command(flatten)]
    pub(crate) io: IoArguments,
    /// Serve the statistics of `blockrep status` as Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Read flags from a TOML file, one key per flag (`frequency = "5m"`); flags on the
    /// command line win. Example: docs/examples/protect.toml.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Args)]
pub struct IoArguments {
    /// I/O engine for disks: io_uring when the kernel allows it (auto), always io_uring
    /// (uring), or portable pread/pwrite (sync).
    #[arg(long, value_enum, default_value = "auto")]
    io: IoChoice,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum IoChoice {
    Auto,
    Uring,
    Sync,
}

impl IoArguments {
    pub(crate) fn options(&self) -> StorageOptions {
        StorageOptions {
            engine: match self.io {
                IoChoice::Auto => IoEngine::Auto,
                IoChoice::Uring => IoEngine::Uring,
                IoChoice::Sync => IoEngine::Sync,
            },
            direct: false,
            layer: None,
        }
    }
}

pub(super) fn window_argument(text: &str) -> Result<blockrep::units::TimeWindow, String> {
    blockrep::units::TimeWindow::parse(text).map_err(|error| error.to_string())
}

pub(super) fn duration_argument(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|error| error.to_string())
}

pub(super) fn size_argument(text: &str) -> Result<u64, String> {
    blockrep::units::parse_size(text).map_err(|error| error.to_string())
}

pub(super) fn rate_argument(text: &str) -> Result<u64, String> {
    parse_rate(text).map_err(|error| error.to_string())
}
