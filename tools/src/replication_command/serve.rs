//! `blockrep identity` and `blockrep serve`: the replica server daemon, its runtime, signals
//! and progress.

use super::*;

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
        let server = Arc::new(
            ReplicaServer::start(arguments.listen, store, &identity, allowed, hosting, None)
                .await?,
        );
        let address = server.address();
        eprintln!(
            "blockrep: serving replicas in {} on {address}",
            arguments.store.display()
        );
        let control_path = run_directory().join(format!("serve-{}.sock", address.port()));
        let control = {
            let server = Arc::clone(&server);
            let runtime = tokio::runtime::Handle::current();
            ControlSocket::bind_for_peers(&control_path, move |request, requester| {
                match serde_json::from_str::<ReplicaRequest>(request) {
                    Ok(request) => answer_replica_request(&server, &runtime, request, requester),
                    Err(_) => DaemonStatus::Replica {
                        listen: address.to_string(),
                        vms: server.reports(),
                    }
                    .to_json(),
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
