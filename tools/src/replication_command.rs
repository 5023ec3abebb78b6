//! `blockrep identity`, `serve`, `protect` and `status`: replication between two hosts.

use crate::control::{ControlSocket, query_all, run_directory};
use crate::peer::{Peer, check_may_create};
use blockrep::io::{IoEngine, StorageOptions};
use blockrep::nbd::NbdAddress;
use blockrep::net::{
    ExtensionOptions, Hosting, HostingOptions, Identity, ReplicaServer, SharedReport,
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
    /// Older recovery points kept per VM besides the latest state (0: only the latest).
    #[arg(long, default_value_t = 24)]
    recovery_points: usize,
    /// At most one recovery point is kept per interval.
    #[arg(long, value_parser = duration_argument, default_value = "1h")]
    recovery_point_interval: Duration,
    /// VMs one primary may replicate here; a new VM past it is refused, naming this flag.
    #[arg(long, value_name = "COUNT", default_value_t = Limits::default().vms_per_primary)]
    max_vms_per_primary: usize,
    /// Disks one VM may have.
    #[arg(long, value_name = "COUNT", default_value_t = Limits::default().disks_per_vm)]
    max_disks_per_vm: usize,
    /// The virtual size of all the disks of all the VMs of one primary, together: 256T, 10T.
    #[arg(long, value_name = "SIZE", value_parser = size_argument, default_value = "256T")]
    max_bytes_per_primary: u64,
    /// Serve the disks of each VM that fails over here over NBD, at DIR/VM.sock, so the VM
    /// (or qemu) writes through change tracking.
    #[arg(long, value_name = "DIR")]
    nbd_dir: Option<PathBuf>,
    /// How often a VM running here after a failover replicates back to its old primary.
    #[arg(long, value_parser = duration_argument, default_value = "5m")]
    reverse_frequency: Duration,
    /// Extended replication: replicate every VM kept here onward to the replica server at
    /// HOST:PORT (a third site). It must allow this server's identity.
    #[arg(long, value_name = "HOST:PORT", requires = "extend_trust")]
    extend_to: Option<String>,
    /// The third site's certificate: the only one accepted for extended replication.
    #[arg(long, value_name = "CERT")]
    extend_trust: Option<PathBuf>,
    /// How often the replicas are cut and shipped onward: 5m, 15m or any duration. A cut is
    /// made only after a new delta arrived from the primary, so never more often than it ships.
    #[arg(long, value_parser = duration_argument, default_value = "15m")]
    extend_frequency: Duration,
    #[command(flatten)]
    io: IoArguments,
    /// Serve the statistics of `blockrep status` as Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Read flags from a TOML file, one key per flag (`recovery-points = 24`); flags on the
    /// command line win. Example: docs/examples/serve.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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
enum IoChoice {
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

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum InitialMode {
    Auto,
    Full,
    Existing,
}

fn window_argument(text: &str) -> Result<blockrep::units::TimeWindow, String> {
    blockrep::units::TimeWindow::parse(text).map_err(|error| error.to_string())
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Switch {
    On,
    Off,
}

fn duration_argument(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|error| error.to_string())
}

fn size_argument(text: &str) -> Result<u64, String> {
    blockrep::units::parse_size(text).map_err(|error| error.to_string())
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

pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Turns true on SIGINT or SIGTERM.
pub(crate) fn stop_on_signals() -> std::io::Result<watch::Receiver<bool>> {
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
    let policy = PointPolicy {
        keep: arguments.recovery_points,
        interval: arguments.recovery_point_interval,
    };
    // Checked before the store is made: a taken port must leave nothing behind.
    if let Err(error) = std::net::UdpSocket::bind(arguments.listen) {
        return Err(format!("--listen {}: cannot listen: {error}", arguments.listen).into());
    }
    let limits = Limits {
        vms_per_primary: arguments.max_vms_per_primary,
        disks_per_vm: arguments.max_disks_per_vm,
        bytes_per_primary: arguments.max_bytes_per_primary,
    };
    let store = ReplicaStore::with_policy(&arguments.store, arguments.io.options(), policy)?
        .with_limits(limits);
    runtime()?.block_on(async move {
        let mut stopped = stop_on_signals()?;
        let extend = match &arguments.extend_to {
            Some(target) => {
                let address = target
                    .to_socket_addrs()
                    .map_err(|error| format!("--extend-to {target}: {error}"))?
                    .next()
                    .ok_or_else(|| format!("--extend-to {target}: no address"))?;
                let trust = arguments
                    .extend_trust
                    .as_ref()
                    .ok_or("--extend-to needs --extend-trust CERT")?;
                Some(ExtensionOptions {
                    target: address,
                    endpoint: client_endpoint(&identity, load_certificate(trust)?, address)?,
                    frequency: arguments.extend_frequency,
                    storage: arguments.io.options(),
                    streams: 4,
                    host_name: hostname(),
                })
            }
            None => None,
        };
        let hosting = Hosting::Here(Box::new(HostingOptions {
            nbd_directory: arguments.nbd_dir.clone(),
            storage: arguments.io.options(),
            frequency: arguments.reverse_frequency,
            streams: 4,
            host_name: hostname(),
            extend,
        }));
        let server = Arc::new(ReplicaServer::start(arguments.listen, store, &identity, allowed, hosting, None).await?);
        let address = server.address();
        eprintln!("blockrep: serving replicas in {} on {address}", arguments.store.display());
        let control_path = run_directory().join(format!("serve-{}.sock", address.port()));
        let control = {
            let server = Arc::clone(&server);
            let runtime = tokio::runtime::Handle::current();
            ControlSocket::bind_for_peers(&control_path, move |request, requester| {
                match serde_json::from_str::<ReplicaRequest>(request) {
                    Ok(request) => answer_replica_request(&server, &runtime, request, requester),
                    Err(_) => serde_json::json!({"role": "replica", "listen": address.to_string(), "vms": server.reports()}),
                }
            })?
        };
        let _metrics = arguments
            .metrics
            .map(|address| crate::metrics::MetricsServer::bind(address, &control_path))
            .transpose()?;
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

/// A progress bar for initial replication, on a terminal.
pub(crate) fn show_progress(report: SharedReport) -> (ProgressBar, std::sync::mpsc::Sender<()>) {
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

/// What `blockrep points` and `blockrep failover` ask a replica server.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
enum ReplicaRequest {
    Points {
        vm: String,
    },
    TestFailover {
        vm: String,
        point: Option<u64>,
        out: PathBuf,
    },
    CleanupTestFailover {
        vm: String,
    },
    UnplannedFailover {
        vm: String,
        point: Option<u64>,
        force: bool,
    },
    CommitFailover {
        vm: String,
    },
    CancelFailover {
        vm: String,
    },
    PlannedFailover {
        vm: String,
        reverse: bool,
    },
    Reverse {
        vm: String,
    },
    Reinitialize {
        vm: String,
    },
    AllowHandover {
        vm: String,
    },
}

fn answer_replica_request(
    server: &ReplicaServer,
    runtime: &tokio::runtime::Handle,
    request: ReplicaRequest,
    requester: &Peer,
) -> serde_json::Value {
    let outcome = match request {
        ReplicaRequest::Points { vm } => server
            .points(&vm)
            .map(|points| serde_json::json!({"vm": vm, "points": points})),
        // The server makes the copy with its own rights, which may be root's: it makes it only
        // where the requester could have made it with theirs. (The socket answers only root and
        // the server's own user, so today this refuses nothing the kernel would allow them;
        // it keeps a root server from being a way to write anywhere whatever the socket
        // admits.) The copy's directory is named by the requester, as the operations guide
        // shows, rather than confined under the store: a test copy goes where the operator
        // boots it from.
        ReplicaRequest::TestFailover { vm, point, out } => {
            if let Err(refused) = check_may_create(&out, requester) {
                return serde_json::json!({"error": format!("{vm}: test failover --out {refused}")});
            }
            runtime
                .block_on(server.test_failover(&vm, point, &out))
                .map(|copy| serde_json::json!(copy))
        }
        ReplicaRequest::CleanupTestFailover { vm } => runtime
            .block_on(server.cleanup_test_failover(&vm))
            .map(|out| serde_json::json!({"vm": vm, "removed": out})),
        ReplicaRequest::UnplannedFailover { vm, point, force } => runtime
            .block_on(server.unplanned_failover(&vm, point, force))
            .map(|copy| serde_json::json!(copy)),
        ReplicaRequest::CommitFailover { vm } => runtime
            .block_on(server.commit_failover(&vm))
            .map(|disks| serde_json::json!({"vm": vm, "disks": disks})),
        ReplicaRequest::CancelFailover { vm } => runtime
            .block_on(server.cancel_failover(&vm))
            .map(|()| serde_json::json!({"vm": vm})),
        ReplicaRequest::PlannedFailover { vm, reverse } => {
            runtime.block_on(server.planned_failover(&vm, reverse)).map(
                |sequence| serde_json::json!({"vm": vm, "sequence": sequence, "reverse": reverse}),
            )
        }
        ReplicaRequest::Reinitialize { vm } => runtime
            .block_on(server.allow_reinitialize(&vm))
            .map(|()| serde_json::json!({"vm": vm})),
        ReplicaRequest::AllowHandover { vm } => runtime
            .block_on(server.allow_handover(&vm))
            .map(|()| serde_json::json!({"vm": vm})),
        ReplicaRequest::Reverse { vm } => runtime
            .block_on(server.reverse(&vm))
            .map(|()| serde_json::json!({"vm": vm})),
    };
    match outcome {
        Ok(answer) => serde_json::json!({"ok": answer}),
        Err(error) => serde_json::json!({"error": error.to_string()}),
    }
}

/// Asks every running replica server; the answer of the one that knows the VM (or the last
/// error when none does).
fn ask_replica_servers(vm: &str, request: &ReplicaRequest) -> Result<serde_json::Value, String> {
    ask_replica_servers_at(vm, request, None)
}

/// Asks the replica server whose control socket is `server` (a relative path is in the run
/// directory), or every running one when `server` is `None`.
fn ask_replica_servers_at(
    vm: &str,
    request: &ReplicaRequest,
    server: Option<&Path>,
) -> Result<serde_json::Value, String> {
    let line = serde_json::to_string(request).map_err(|error| error.to_string())?;
    let directory = run_directory();
    let (sockets, mut last_error) = match server {
        Some(socket) => {
            let socket = directory.join(socket);
            let error = format!("{vm}: no replica server answered at {}", socket.display());
            (vec![socket], error)
        }
        None => (
            std::fs::read_dir(&directory)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|entry| entry.path())
                        .filter(|path| {
                            path.file_name()
                                .is_some_and(|name| name.to_string_lossy().starts_with("serve-"))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            format!(
                "{vm}: no replica server is running here (looked in {})",
                directory.display()
            ),
        ),
    };
    for socket in sockets {
        match crate::control::request(&socket, &line, None) {
            Ok(answer) if answer.get("ok").is_some() => return Ok(answer["ok"].clone()),
            Ok(answer) => {
                last_error = answer["error"].as_str().unwrap_or("no answer").to_owned();
            }
            Err(error) => last_error = format!("{}: {error}", socket.display()),
        }
    }
    Err(last_error)
}

/// `blockrep points VM`: the latest state and the recovery points a replica server keeps.
pub fn points(vm: &str, json: bool) -> Outcome {
    let answer = ask_replica_servers(vm, &ReplicaRequest::Points { vm: vm.to_owned() })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer["points"])?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>10}  {:<25} {:<22} {:>12}",
        "point", "time (UTC)", "consistency", "kept"
    );
    for point in answer["points"].as_array().into_iter().flatten() {
        let id = point["id"].as_u64().unwrap_or(0);
        let label = if point["latest"].as_bool() == Some(true) {
            format!("{id} (latest)")
        } else {
            id.to_string()
        };
        let consistency = if point["app_consistent"].as_bool() == Some(true) {
            "application-consistent"
        } else {
            "crash-consistent"
        };
        println!(
            "{label:>10}  {:<25} {consistency:<22} {:>12}",
            format_time(point["time"].as_f64().unwrap_or(0.0)),
            format_size(point["bytes_kept"].as_u64().unwrap_or(0))
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `blockrep failover VM --test`: a copy of a recovery point, or its removal.
pub fn test_failover(
    vm: &str,
    point: Option<&str>,
    out: Option<&std::path::Path>,
    cleanup: bool,
) -> Outcome {
    if cleanup {
        let answer = ask_replica_servers(
            vm,
            &ReplicaRequest::CleanupTestFailover { vm: vm.to_owned() },
        )?;
        println!(
            "{vm}: test failover removed from {}",
            answer["removed"].as_str().unwrap_or("?")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let out = out.ok_or("--out DIR is needed for a test failover")?;
    let out = std::path::absolute(out)?;
    let point = parse_point(vm, point)?;
    let answer = request_test_failover(vm, point, &out, None)?;
    println!("{vm}: test failover of point {} ready:", answer["point"]);
    for disk in answer["disks"].as_array().into_iter().flatten() {
        println!("  {}", disk.as_str().unwrap_or("?"));
    }
    Ok(ExitCode::SUCCESS)
}

/// A `--point` argument: an id, `latest` (`None`), or `latest-app-consistent`, the newest
/// point the primary made application-consistent.
fn parse_point(vm: &str, point: Option<&str>) -> Result<Option<u64>, String> {
    match point {
        None | Some("latest") => Ok(None),
        Some("latest-app-consistent") => {
            let answer = ask_replica_servers(vm, &ReplicaRequest::Points { vm: vm.to_owned() })?;
            answer["points"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|point| point["app_consistent"].as_bool() == Some(true))
                .and_then(|point| point["id"].as_u64())
                .map(Some)
                .ok_or_else(|| format!("{vm}: no application-consistent recovery point is kept"))
        }
        Some(text) => text.parse::<u64>().map(Some).map_err(|_| {
            format!("--point {text}: expected a point id, latest or latest-app-consistent")
        }),
    }
}

/// `blockrep failover VM --unplanned`: the VM comes up at the replica site from a point.
pub fn unplanned_failover(vm: &str, point: Option<&str>, force: bool) -> Outcome {
    let point = parse_point(vm, point)?;
    let answer = request_unplanned_failover(vm, point, force, None)?;
    println!(
        "{vm}: failed over to point {}; replication from the primary is fenced off. Writable disks:",
        answer["point"]
    );
    for disk in answer["disks"].as_array().into_iter().flatten() {
        println!("  {}", disk.as_str().unwrap_or("?"));
    }
    println!("then `blockrep failover {vm} --commit` to keep them, or `--cancel` to go back");
    Ok(ExitCode::SUCCESS)
}

/// Asks for a test failover of `point` (`None`: the latest) into `out`, of the replica server
/// at `server` or of whichever local one holds the VM; the answer names the point and disks.
pub fn request_test_failover(
    vm: &str,
    point: Option<u64>,
    out: &Path,
    server: Option<&Path>,
) -> Result<serde_json::Value, String> {
    let request = ReplicaRequest::TestFailover {
        vm: vm.to_owned(),
        point,
        out: out.to_owned(),
    };
    ask_replica_servers_at(vm, &request, server)
}

/// Asks for an unplanned failover to `point` (`None`: the latest), as `request_test_failover`
/// chooses the server; the answer names the point and the writable disks.
pub fn request_unplanned_failover(
    vm: &str,
    point: Option<u64>,
    force: bool,
    server: Option<&Path>,
) -> Result<serde_json::Value, String> {
    let request = ReplicaRequest::UnplannedFailover {
        vm: vm.to_owned(),
        point,
        force,
    };
    ask_replica_servers_at(vm, &request, server)
}

/// A planned failover of `vm`, replication reversed afterwards when `reverse`.
pub fn planned_failover(vm: &str, reverse: bool) -> Result<serde_json::Value, String> {
    // Where the VM runs: its own agent (`protect`) when it runs here as the primary, else a
    // replica server it failed over to (failback).
    let request =
        serde_json::json!({"request": "planned-failover", "reverse": reverse}).to_string();
    if let Ok(answer) = request_agent(vm, &request, None) {
        if answer.get("ok").is_some() {
            return Ok(answer["ok"].clone());
        }
        if let Some(error) = answer["error"].as_str() {
            // A refusal from the replica already names the VM.
            return Err(if error.starts_with(&format!("{vm}: ")) {
                error.to_owned()
            } else {
                format!("{vm}: {error}")
            });
        }
    }
    ask_replica_servers(
        vm,
        &ReplicaRequest::PlannedFailover {
            vm: vm.to_owned(),
            reverse,
        },
    )
}

/// `blockrep failover VM --planned [--reverse]`.
pub fn planned_failover_command(vm: &str, reverse: bool) -> Outcome {
    let answer = planned_failover(vm, reverse)?;
    println!(
        "{vm}: planned failover done at delta {}: both sites compared equal; the VM runs at the other site now{}",
        answer["sequence"],
        if reverse {
            ", replicating back here"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `blockrep reinitialize VM`, on the replica host: the primary's next initial replication
/// may replace the replica and drop its recovery points.
pub fn reinitialize(vm: &str) -> Outcome {
    ask_replica_servers(vm, &ReplicaRequest::Reinitialize { vm: vm.to_owned() })?;
    println!(
        "{vm}: the next initial replication from its primary may replace the replica; its recovery points go when it commits"
    );
    Ok(ExitCode::SUCCESS)
}

/// `blockrep allow-handover VM`, on the replica host: the next planned failover of the VM to
/// this site may take it over, dropping its recovery points.
pub fn allow_handover(vm: &str) -> Outcome {
    ask_replica_servers(vm, &ReplicaRequest::AllowHandover { vm: vm.to_owned() })?;
    println!(
        "{vm}: the next planned failover to this site may take the VM over; its recovery points go when it does"
    );
    Ok(ExitCode::SUCCESS)
}

/// `blockrep reverse VM`: replicate a VM that failed over here back to its old primary.
pub fn reverse(vm: &str) -> Outcome {
    ask_replica_servers(vm, &ReplicaRequest::Reverse { vm: vm.to_owned() })?;
    println!(
        "{vm}: replicating back to the old primary as soon as its `blockrep protect` connects (only blocks that differ are shipped)"
    );
    Ok(ExitCode::SUCCESS)
}

/// `blockrep failover VM --commit | --cancel`.
pub fn finish_failover(vm: &str, commit: bool) -> Outcome {
    let request = if commit {
        ReplicaRequest::CommitFailover { vm: vm.to_owned() }
    } else {
        ReplicaRequest::CancelFailover { vm: vm.to_owned() }
    };
    let answer = ask_replica_servers(vm, &request)?;
    if commit {
        println!("{vm}: failover committed; the VM's disks:");
        for disk in answer["disks"].as_array().into_iter().flatten() {
            println!("  {}", disk.as_str().unwrap_or("?"));
        }
    } else {
        println!("{vm}: failover cancelled; replication from the primary resumes when it connects");
    }
    Ok(ExitCode::SUCCESS)
}

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS`, UTC.
fn format_time(seconds: f64) -> String {
    let total = seconds as i64;
    let (days, rest) = (total.div_euclid(86_400), total.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, public domain).
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Sends `request` to the VM's agent (`blockrep protect`) on this host; its answer.
fn ask_primary(
    vm: &str,
    request: &str,
    timeout: Option<std::time::Duration>,
) -> Result<serde_json::Value, String> {
    let answer = request_agent(vm, request, timeout)?;
    match answer["error"].as_str() {
        Some(error) => Err(format!("{vm}: {error}")),
        None => Ok(answer),
    }
}

/// Sends `request` to the VM's agent; its answer as it is, an `{"error": ...}` included.
fn request_agent(
    vm: &str,
    request: &str,
    timeout: Option<std::time::Duration>,
) -> Result<serde_json::Value, String> {
    let path = agent_socket(vm);
    crate::control::request(&path, request, timeout).map_err(|error| {
        format!(
            "no running primary for {vm} answered at {} ({error})",
            path.display()
        )
    })
}

/// The control socket of the VM's agent (`blockrep protect`) on this host.
pub(crate) fn agent_socket(vm: &str) -> PathBuf {
    run_directory().join(format!("protect-{vm}.sock"))
}

/// `blockrep suspend VM` / `resume VM`: pause or go on with a running primary's replication.
pub fn suspend(vm: &str, paused: bool) -> Outcome {
    ask_primary(
        vm,
        if paused { "suspend" } else { "resume" },
        Some(std::time::Duration::from_secs(5)),
    )?;
    println!(
        "{vm}: replication {}",
        if paused { "suspended" } else { "resumed" }
    );
    Ok(ExitCode::SUCCESS)
}

/// `blockrep seed`: a VM's replica from copies of its disks.
pub fn seed(store: &Path, vm: &str, disks: &[PathBuf], primary: &Path) -> Outcome {
    let owner = blockrep::net::fingerprint(&load_certificate(primary)?);
    let store = ReplicaStore::open(store, StorageOptions::default())?;
    let seeded = store.seed(vm, &owner, disks)?;
    println!("{vm}: replica seeded from {} disk copies:", seeded.len());
    for disk in seeded {
        println!("  {}", disk.display());
    }
    println!(
        "start the primary with `blockrep protect --name {vm} ... --initial existing`: it compares by hash and ships only what differs"
    );
    Ok(ExitCode::SUCCESS)
}

/// `blockrep resync VM`: compare the disks by hash and ship what differs.
pub fn resync(vm: &str) -> Outcome {
    ask_primary(vm, "resync", Some(std::time::Duration::from_secs(5)))?;
    println!(
        "{vm}: resynchronizing: the disks are compared by hash, and what differs ships with the next delta (`blockrep status` shows the progress)"
    );
    Ok(ExitCode::SUCCESS)
}

/// `blockrep verify VM`: compare the replica with the primary by hash, shipping nothing. Exit 1
/// when they differ (beyond what the primary has not shipped yet).
pub fn verify(vm: &str, json: bool) -> Outcome {
    let answer = ask_primary(vm, r#"{"request":"verify"}"#, None)?;
    let verification = &answer["ok"];
    let differing = verification["differing"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(verification)?);
    } else {
        println!(
            "{vm}: compared {} ({} changed and not yet shipped, left out)",
            format_size(verification["compared_bytes"].as_u64().unwrap_or(0)),
            format_size(verification["pending_bytes"].as_u64().unwrap_or(0))
        );
        if differing.is_empty() {
            println!("the replica equals the primary");
        }
        for entry in &differing {
            let (start, end) = (
                entry[1]["start"].as_u64().unwrap_or(0),
                entry[1]["end"].as_u64().unwrap_or(0),
            );
            println!(
                "differs: disk {} bytes {start}..{end} ({})",
                entry[0],
                format_size(end - start)
            );
        }
    }
    Ok(if differing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn status(json: bool) -> Outcome {
    let directory = run_directory();
    let answers = query_all(&directory)?;
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
    let progress = &vm["resynchronizing"];
    if progress.is_object() {
        let (done, total) = (
            progress["compared_bytes"].as_u64().unwrap_or(0),
            progress["total_bytes"].as_u64().unwrap_or(0),
        );
        println!(
            "  resynchronizing:     {} of {} compared{}",
            format_size(done),
            format_size(total),
            progress["eta_seconds"]
                .as_f64()
                .map(|seconds| format!(", about {seconds:.0} s left"))
                .unwrap_or_default()
        );
    }
    if vm["resync"].is_object() {
        println!(
            "  last resync:         {} compared, {} differed (shipped)",
            format_size(vm["resync"]["compared_bytes"].as_u64().unwrap_or(0)),
            format_size(vm["resync"]["differing_bytes"].as_u64().unwrap_or(0))
        );
    }
    if let Some(error) = vm["last_error"].as_str() {
        println!("  last error:          {error}");
    }
}

fn print_replica(vm: &serde_json::Value) {
    println!("{} (replica)", vm["vm"].as_str().unwrap_or("?"));
    if vm["busy"].as_bool() == Some(true) {
        println!("  busy:                comparing or applying; the figures below are from before");
    }
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
    if let Some(reason) = vm["compare_required"].as_str() {
        println!(
            "  resynchronization required: {reason} (the primary compares on its next connection)"
        );
    }
    for disk in vm["disks"].as_array().into_iter().flatten() {
        println!("  disk:                {}", disk.as_str().unwrap_or("?"));
    }
    println!(
        "  recovery points:     {} besides the latest",
        vm["recovery_points"].as_u64().unwrap_or(0)
    );
    if let Some(out) = vm["test_failover"].as_str() {
        println!("  test failover:       {out}");
    }
    if let Some(sequence) = vm["failover"]["handing_back"].as_u64() {
        println!(
            "  failing back:        final delta {sequence} applied at the old primary; the VM's writes are stopped here"
        );
    }
    if vm["failover"].is_object() {
        let committed = vm["failover"]["committed"].as_bool() == Some(true);
        println!(
            "  failed over:         to point {}{}",
            vm["failover"]["point"],
            if committed {
                ", committed"
            } else {
                " (not committed)"
            }
        );
    }
    for (key, label) in [
        ("reverse", "replicating back:    "),
        ("extended", "extended to:         "),
    ] {
        let onward = &vm[key];
        if onward.is_object() {
            println!(
                "  {label}{} — {}, health {}, delta {} applied there{}",
                onward["replica"].as_str().unwrap_or("?"),
                onward["state"].as_str().unwrap_or("?"),
                onward["health"].as_str().unwrap_or("?"),
                onward["applied_sequence"].as_u64().unwrap_or(0),
                onward["resync"]["differing_bytes"]
                    .as_u64()
                    .map(|bytes| format!(", resynchronized: {} differed", format_size(bytes)))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(error) = vm["error"].as_str() {
        println!("  error:               {error}");
    }
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
mod tests {
    use super::*;

    #[test]
    fn a_failover_request_goes_to_the_named_server_only() {
        let directory = tempfile::tempdir().unwrap();
        // A run directory is private to its user, as a daemon makes it.
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o700);
        std::fs::set_permissions(directory.path(), private).unwrap();
        let named = directory.path().join("serve-1.sock");
        let _server = ControlSocket::bind(&named, |request| {
            serde_json::json!({"ok": serde_json::from_str::<serde_json::Value>(request).unwrap()})
        })
        .unwrap();
        let out = directory.path().join("copies/db1");
        let answer = request_test_failover("db1", None, &out, Some(&named)).unwrap();
        assert_eq!(answer["request"], "test-failover");
        assert_eq!(answer["out"], out.to_str().unwrap());
        let answer = request_unplanned_failover("db1", Some(4), true, Some(&named)).unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"request": "unplanned-failover", "vm": "db1", "point": 4, "force": true})
        );
        let missing = directory.path().join("serve-2.sock");
        let error = request_test_failover("db1", None, &out, Some(&missing)).unwrap_err();
        assert!(error.contains("serve-2.sock"), "{error}");
    }
}
