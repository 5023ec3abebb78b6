//! `blockrep identity`, `serve`, `protect` and `status`: replication between two hosts.

use crate::control::{ControlSocket, query_all, run_directory};
use blockrep::delta::Compression;
use blockrep::io::{IoEngine, StorageOptions};
use blockrep::nbd::{ExportedDisk, NbdAddress, NbdServer};
use blockrep::net::{
    Identity, PrimaryOptions, ReplicaServer, SharedReport, load_certificate, run_primary,
};
use blockrep::protect::ProtectedVm;
use blockrep::proto::{PrimaryConfig, ReplicationState};
use blockrep::replica::ReplicaStore;
use blockrep::units::{format_size, parse_duration, parse_rate};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

type Outcome = Result<ExitCode, Box<dyn std::error::Error>>;

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
    listen: SocketAddr,
    /// The directory that holds the replicas (one directory per VM).
    #[arg(long)]
    store: PathBuf,
    /// This server's identity directory (made with `blockrep identity create`).
    #[arg(long)]
    identity: PathBuf,
    /// Certificates of the primaries allowed to replicate here (repeat for several).
    #[arg(long = "allow", value_name = "CERT", required = true)]
    allowed: Vec<PathBuf>,
    #[command(flatten)]
    io: IoArguments,
}

#[derive(Args)]
pub struct ProtectArguments {
    /// The VM's name on the replica.
    #[arg(long)]
    name: String,
    /// The VM's disk images (VHDX or raw; repeat for several disks).
    #[arg(long = "disk", value_name = "IMAGE", required = true)]
    disks: Vec<PathBuf>,
    /// The replica server, HOST:PORT.
    #[arg(long)]
    replica: String,
    /// This primary's identity directory.
    #[arg(long)]
    identity: PathBuf,
    /// The replica server's certificate: the only one this primary accepts.
    #[arg(long, value_name = "CERT")]
    trust: PathBuf,
    /// Replication frequency: 30s, 5m, 15m, or any duration.
    #[arg(long, value_parser = duration_argument, default_value = "5m")]
    frequency: Duration,
    /// Serve the disks over NBD so a VM or qemu writes through change tracking:
    /// unix:PATH or tcp:ADDR. Each disk is an export named after its file; the first is
    /// also the default export.
    #[arg(long)]
    nbd: Option<NbdAddress>,
    /// Cap the bandwidth replication uses: 100Mbit, 1Gbit, or bytes per second (50M).
    #[arg(long, value_parser = rate_argument)]
    max_rate: Option<u64>,
    /// Compress deltas with lz4 where it pays.
    #[arg(long, value_enum, default_value = "on")]
    compression: Switch,
    /// Data streams used at once for large deltas.
    #[arg(long, default_value = "4", value_parser = clap::value_parser!(u16).range(1..=32))]
    streams: u16,
    #[command(flatten)]
    io: IoArguments,
}

#[derive(Args)]
pub struct IoArguments {
    /// I/O engine for disks: io_uring when the kernel allows it (auto), always io_uring
    /// (uring), or portable pread/pwrite (sync).
    #[arg(long, value_enum, default_value = "auto")]
    io: IoChoice,
}

#[derive(Clone, Copy, ValueEnum)]
enum IoChoice {
    Auto,
    Uring,
    Sync,
}

impl IoArguments {
    fn options(&self) -> StorageOptions {
        StorageOptions {
            engine: match self.io {
                IoChoice::Auto => IoEngine::Auto,
                IoChoice::Uring => IoEngine::Uring,
                IoChoice::Sync => IoEngine::Sync,
            },
            direct: false,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Switch {
    On,
    Off,
}

fn duration_argument(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|error| error.to_string())
}

fn rate_argument(text: &str) -> Result<u64, String> {
    parse_rate(text).map_err(|error| error.to_string())
}

pub fn identity(command: IdentityCommand) -> Outcome {
    match command {
        IdentityCommand::Create { name, out } => {
            let identity = Identity::create(&name, &out)?;
            println!("identity:    {name}");
            println!(
                "certificate: {}",
                Identity::certificate_path(&out).display()
            );
            println!("fingerprint: {}", identity.fingerprint());
        }
        IdentityCommand::Show { directory } => {
            let certificate = load_certificate(&directory)?;
            println!("fingerprint: {}", blockrep::net::fingerprint(&certificate));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Turns true on SIGINT or SIGTERM.
fn stop_on_signals() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("stopping");
        let _ = stop.send(true);
    });
    Ok(stopped)
}

pub fn serve(arguments: ServeArguments) -> Outcome {
    let identity = Identity::load(&arguments.identity)?;
    let allowed = arguments
        .allowed
        .iter()
        .map(|path| load_certificate(path))
        .collect::<Result<Vec<_>, _>>()?;
    let store = ReplicaStore::open(&arguments.store, arguments.io.options())?;
    runtime()?.block_on(async move {
        let mut stopped = stop_on_signals()?;
        let server = Arc::new(ReplicaServer::start(arguments.listen, store, &identity, allowed).await?);
        let address = server.address();
        eprintln!("blockrep: serving replicas in {} on {address}", arguments.store.display());
        let control = {
            let server = Arc::clone(&server);
            ControlSocket::bind(&run_directory().join(format!("serve-{}.sock", address.port())), move |_| {
                serde_json::json!({"role": "replica", "listen": address.to_string(), "vms": server.reports()})
            })?
        };
        while !*stopped.borrow() {
            if stopped.changed().await.is_err() {
                break;
            }
        }
        drop(control);
        if let Ok(server) = Arc::try_unwrap(server) {
            server.shutdown().await;
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn protect(arguments: ProtectArguments) -> Outcome {
    let identity = Identity::load(&arguments.identity)?;
    let trusted = load_certificate(&arguments.trust)?;
    let replica = arguments
        .replica
        .to_socket_addrs()
        .map_err(|error| format!("--replica {}: {error}", arguments.replica))?
        .next()
        .ok_or_else(|| format!("--replica {}: no address", arguments.replica))?;
    let compression = match arguments.compression {
        Switch::On => Compression::Lz4,
        Switch::Off => Compression::Off,
    };
    let vm = Arc::new(ProtectedVm::open(
        &arguments.disks,
        arguments.io.options(),
        compression,
    )?);
    // Whatever happens next, the disks are closed cleanly, so tracking is saved.
    let outcome = replicate_vm(&arguments, &vm, identity, trusted, replica);
    let closed = Arc::into_inner(vm)
        .ok_or("the disks are still in use")?
        .close();
    outcome?;
    closed?;
    eprintln!("blockrep: stopped; tracking saved");
    Ok(ExitCode::SUCCESS)
}

/// Serves the disks over NBD and replicates them until a signal or a final failure.
fn replicate_vm(
    arguments: &ProtectArguments,
    vm: &Arc<ProtectedVm>,
    identity: Identity,
    trusted: blockrep::net::Certificate,
    replica: SocketAddr,
) -> Result<(), Box<dyn std::error::Error>> {
    let nbd = match &arguments.nbd {
        Some(address) => {
            let exports: Vec<(String, Arc<dyn ExportedDisk>)> = vm
                .paths()
                .iter()
                .zip(vm.disks())
                .map(|(path, disk)| {
                    let name = path
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (name, Arc::clone(disk) as Arc<dyn ExportedDisk>)
                })
                .collect();
            let server = NbdServer::start(address, exports)?;
            eprintln!("blockrep: disks served over NBD at {}", server.address());
            Some(server)
        }
        None => None,
    };
    let config = PrimaryConfig {
        vm: arguments.name.clone(),
        primary: hostname(),
        disks: vm.descriptions().to_vec(),
        frequency: arguments.frequency,
        window: 32,
        reconnect_min: Duration::from_millis(500),
        reconnect_max: Duration::from_secs(30),
        needs_initial: vm.needs_initial(),
        seed: rand_seed(),
    };
    let (suspend, suspended) = watch::channel(false);
    let options = PrimaryOptions {
        replica,
        identity,
        trusted,
        config,
        streams: usize::from(arguments.streams),
        max_rate: arguments.max_rate,
        suspended: Some(suspended),
    };
    let report = SharedReport::default();
    let control = {
        let report = Arc::clone(&report);
        let suspend = suspend.clone();
        ControlSocket::bind(
            &run_directory().join(format!("protect-{}.sock", arguments.name)),
            move |request| {
                match request {
                    "suspend" => {
                        let _ = suspend.send(true);
                    }
                    "resume" => {
                        let _ = suspend.send(false);
                    }
                    _ => {}
                }
                let report = report
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                serde_json::json!({"role": "primary", "vms": report.into_iter().collect::<Vec<_>>()})
            },
        )?
    };
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| show_progress(Arc::clone(&report)));
    let outcome = runtime()?.block_on(async {
        let stopped = stop_on_signals()?;
        Ok::<_, std::io::Error>(run_primary(Arc::clone(vm), options, report, stopped).await)
    })?;
    if let Some((bar, stop)) = progress {
        let _ = stop.send(());
        bar.finish_and_clear();
    }
    drop(control);
    if let Some(server) = nbd {
        server.shutdown()?;
    }
    Ok(outcome?)
}

/// A progress bar for initial replication, on a terminal.
fn show_progress(report: SharedReport) -> (ProgressBar, std::sync::mpsc::Sender<()>) {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("initial replication");
    let (stop, stopped) = std::sync::mpsc::channel();
    let shown = bar.clone();
    std::thread::spawn(move || {
        while stopped.recv_timeout(Duration::from_millis(200)).is_err() {
            let Some(entry) = report
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
            else {
                continue;
            };
            if entry.status.state == ReplicationState::InitialReplication
                && entry.status.in_flight_bytes > 0
            {
                shown.set_length(entry.status.in_flight_bytes);
                shown.set_position(entry.status.in_flight_bytes - entry.status.pending_bytes);
            } else if entry.status.applied_sequence > 0 {
                shown.finish_and_clear();
                eprintln!("blockrep: initial replication complete; replicating changes");
                return;
            }
        }
    });
    (bar, stop)
}

/// `blockrep suspend VM` / `resume VM`: pause or go on with a running primary's replication.
pub fn suspend(vm: &str, paused: bool) -> Outcome {
    let path = run_directory().join(format!("protect-{vm}.sock"));
    crate::control::request(&path, if paused { "suspend" } else { "resume" }).map_err(|error| {
        format!(
            "no running primary for {vm} answered at {} ({error})",
            path.display()
        )
    })?;
    println!(
        "{vm}: replication {}",
        if paused { "suspended" } else { "resumed" }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn status(json: bool) -> Outcome {
    let directory = run_directory();
    let answers = query_all(&directory);
    if json {
        println!("{}", serde_json::to_string_pretty(&answers)?);
        return Ok(ExitCode::SUCCESS);
    }
    if answers.is_empty() {
        println!(
            "no blockrep primary or replica server is running (looked in {})",
            directory.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for answer in &answers {
        let role = answer["role"].as_str().unwrap_or("?");
        for vm in answer["vms"].as_array().into_iter().flatten() {
            match role {
                "primary" => print_primary(vm),
                _ => print_replica(vm),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_primary(vm: &serde_json::Value) {
    let size = |key: &str| format_size(vm[key].as_u64().unwrap_or(0));
    println!(
        "{} (primary, replicating to {})",
        vm["vm"].as_str().unwrap_or("?"),
        vm["replica"].as_str().unwrap_or("?")
    );
    println!(
        "  state:               {}",
        vm["state"].as_str().unwrap_or("?")
    );
    println!(
        "  health:              {}",
        vm["health"].as_str().unwrap_or("?")
    );
    match vm["seconds_since_replication"].as_f64() {
        Some(seconds) => println!("  last replication:    {seconds:.0} s ago"),
        None => println!("  last replication:    never"),
    }
    println!("  pending:             {}", size("pending_bytes"));
    println!(
        "  delta size:          {} average, {} maximum",
        size("average_delta_bytes"),
        size("maximum_delta_bytes")
    );
    println!(
        "  average latency:     {:.2} s",
        vm["average_latency_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  cycles:              {} successful, {} missed",
        vm["successful_cycles"].as_u64().unwrap_or(0),
        vm["missed_cycles"].as_u64().unwrap_or(0)
    );
    println!(
        "  shipped:             {} before compression, {} after",
        size("bytes_before_compression"),
        size("bytes_after_compression")
    );
    if let Some(error) = vm["last_error"].as_str() {
        println!("  last error:          {error}");
    }
}

fn print_replica(vm: &serde_json::Value) {
    println!("{} (replica)", vm["vm"].as_str().unwrap_or("?"));
    println!(
        "  primary connected:   {}",
        vm["connected"].as_bool().unwrap_or(false)
    );
    println!(
        "  applied delta:       {}",
        vm["applied_sequence"].as_u64().unwrap_or(0)
    );
    if let Some(staging) = vm["staging"].as_array() {
        println!(
            "  staging:             delta {}, {} of {} chunks",
            staging
                .first()
                .and_then(|value| value.as_u64())
                .unwrap_or(0),
            staging.get(1).and_then(|value| value.as_u64()).unwrap_or(0),
            staging.get(2).and_then(|value| value.as_u64()).unwrap_or(0)
        );
    }
    for disk in vm["disks"].as_array().into_iter().flatten() {
        println!("  disk:                {}", disk.as_str().unwrap_or("?"));
    }
    if let Some(error) = vm["error"].as_str() {
        println!("  error:               {error}");
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "primary".into())
}

/// A seed for cut numbers: different in every run, which is all it needs to be.
fn rand_seed() -> u64 {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0);
    time ^ (u64::from(std::process::id()) << 32)
}
