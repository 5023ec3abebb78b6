//! `blockrep protect`: a VM's agent on its host. While the VM runs here it is the primary: the
//! disks are tracked (and served over NBD) and replicated to the replica site. Once the VM runs
//! at the other site (a planned failover, or an unplanned one there followed by `blockrep
//! reverse`), the agent keeps this host's copy as that site's replica, applying what the other
//! site ships back, until a planned failover brings the VM home. This host always dials: the
//! direction of the data changes, the connection's does not, so no new address or trust is
//! needed for reverse replication.

use crate::control::ControlSocket;
use crate::replication_command::{
    InitialMode, ProtectArguments, Switch, agent_socket, hostname, rand_seed, runtime,
    show_progress, stop_on_signals,
};
use blockrep::delta::Compression;
use blockrep::nbd::NbdServer;
use blockrep::net::{
    ClientEndpoint, ConsistencyHook, DaemonStatus, Ending, Greeting, HandoverFailure, Hosting,
    Identity, PeerConnection, PrimaryCommand, PrimaryOptions, ReplicaServer, Route, SharedReport,
    client_endpoint, close_when_free, exports, greet, load_certificate, run_primary,
};
use blockrep::protect::{AfterHandover, HandoverMark, ProtectedVm};
use blockrep::proto::{DiskDescription, Message, PROTOCOL_VERSION, PrimaryConfig, Tracking};
use blockrep::replica::{PointPolicy, ReplicaStore};
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

type Failure = Box<dyn std::error::Error>;

/// What this host is to the VM.
enum Role {
    /// The VM runs here. `handed_back`: the other site just handed it over, its copy equal to
    /// this one, so tracking starts from here whatever the journals say.
    Primary {
        handed_back: bool,
        suspended: bool,
    },
    /// The VM runs at the other site; this host keeps its replica.
    Replica {
        descriptions: Vec<DiskDescription>,
        first: Option<(PeerConnection, u64)>,
    },
    Done,
}

pub fn protect(arguments: ProtectArguments) -> Result<ExitCode, Failure> {
    // Checked before anything is opened or written: a second agent of this name would find
    // its disks held anyway, but its journals must not be touched first.
    let control = agent_socket(&arguments.name);
    if std::os::unix::net::UnixStream::connect(&control).is_ok() {
        return Err(format!(
            "{}: another `blockrep protect` of this name runs (it answers at {}); stop it first",
            arguments.name,
            control.display()
        )
        .into());
    }
    let identity = Identity::load(&arguments.identity)?;
    let trusted = load_certificate(&arguments.trust)?;
    let replica = arguments
        .replica
        .to_socket_addrs()
        .map_err(|error| format!("--replica {}: {error}", arguments.replica))?
        .next()
        .ok_or_else(|| format!("--replica {}: no address", arguments.replica))?;
    runtime()?.block_on(async move {
        // One endpoint for the agent's life, whatever role it plays: each scrape asks its
        // socket. It is served on this runtime.
        let _metrics = arguments
            .metrics
            .map(|address| {
                crate::metrics::MetricsServer::bind(address, &agent_socket(&arguments.name))
            })
            .transpose()?;
        let stopped = stop_on_signals()?;
        let endpoint = client_endpoint(&identity, trusted, replica)?;
        let agent = Agent {
            arguments: &arguments,
            endpoint,
            replica,
            stopped,
        };
        // A host that was keeping the replica of its VM running elsewhere goes on doing so: it
        // must not serve the disks to writers before the other site says who runs the VM.
        let mut role = match adopted_descriptions(&arguments)? {
            Some(descriptions) => Role::Replica {
                descriptions,
                first: None,
            },
            None => Role::Primary {
                handed_back: false,
                suspended: false,
            },
        };
        loop {
            role = match role {
                Role::Primary {
                    handed_back,
                    suspended,
                } => agent.primary(handed_back, suspended).await?,
                Role::Replica {
                    descriptions,
                    first,
                } => agent.replica(descriptions, first).await?,
                Role::Done => return Ok(ExitCode::SUCCESS),
            }
        }
    })
}

/// Where this host keeps the replica of its VM while the VM runs at the other site.
fn replica_root(arguments: &ProtectArguments) -> PathBuf {
    let mut root = arguments.disks[0].clone().into_os_string();
    root.push(".brreplica");
    PathBuf::from(root)
}

/// This host's durable record of a planned failover to the other site (the engine's).
fn handover_mark(arguments: &ProtectArguments) -> HandoverMark {
    HandoverMark::for_disk(&arguments.disks[0])
}

/// The VM's disk descriptions, when this host keeps its replica (its store holds the VM).
fn adopted_descriptions(
    arguments: &ProtectArguments,
) -> Result<Option<Vec<DiskDescription>>, Failure> {
    let root = replica_root(arguments);
    if !root.join(&arguments.name).join("catalogue.json").exists() {
        return Ok(None);
    }
    let store = ReplicaStore::open(&root, arguments.io.options())?;
    let replica = store.open_vm(&arguments.name)?;
    Ok(Some(replica.descriptions()))
}

struct Agent<'a> {
    arguments: &'a ProtectArguments,
    endpoint: ClientEndpoint,
    replica: SocketAddr,
    stopped: watch::Receiver<bool>,
}

impl Agent<'_> {
    fn control_path(&self) -> PathBuf {
        agent_socket(&self.arguments.name)
    }

    /// Runs the VM here, replicating it, until stopped or until it runs at the other site.
    async fn primary(&self, handed_back: bool, suspended: bool) -> Result<Role, Failure> {
        let arguments = self.arguments;
        let compression = match arguments.compression {
            Switch::On => Compression::Lz4,
            Switch::Off => Compression::Off,
        };
        let vm = {
            let (disks, storage) = (arguments.disks.clone(), arguments.io.options());
            Arc::new(
                tokio::task::spawn_blocking(move || {
                    ProtectedVm::open(&disks, &storage, compression)
                })
                .await??,
            )
        };
        // A handover to the other site may have happened: ask before serving the disks
        // (unless the other site has just handed the VM back).
        if handed_back {
            handover_mark(arguments).remove(&arguments.io.options())?;
        } else if handover_mark(arguments).present() {
            match self.after_handover(vm.descriptions()).await? {
                Some(role) => {
                    tokio::task::spawn_blocking(move || close_when_free(vm)).await??;
                    return Ok(role);
                }
                None => handover_mark(arguments).remove(&arguments.io.options())?,
            }
        }
        let nbd = Arc::new(Mutex::new(start_nbd(arguments, &vm)?));
        let config = PrimaryConfig {
            vm: arguments.name.clone(),
            primary: hostname(),
            disks: vm.descriptions().to_vec(),
            frequency: arguments.frequency,
            window: 32,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            // Handed back: both sites compared equal, whatever tracking says.
            tracking: if handed_back {
                Tracking::Vouches
            } else {
                vm.tracking().clone()
            },
            seed: rand_seed(),
            app_consistent_every: arguments
                .consistency_hook
                .as_ref()
                .map(|_| arguments.app_consistent_every),
        };
        let (suspend, suspended_receiver) = watch::channel(suspended);
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let reverse_requested = Arc::new(AtomicBool::new(false));
        let mut options = PrimaryOptions::new(
            Route::Dial {
                endpoint: self.endpoint.clone(),
                replica: self.replica,
            },
            config,
        );
        options.streams = usize::from(arguments.streams);
        options.max_rate = arguments.max_rate;
        options.suspended = Some(suspended_receiver);
        options.consistency_hook =
            arguments
                .consistency_hook
                .clone()
                .map(|command| ConsistencyHook {
                    command,
                    timeout: arguments.hook_timeout,
                });
        options.commands = Some(command_receiver);
        // Tracking cannot vouch for the replica (a new or lost journal): compare by hash
        // first; a replica with no copy yet gets an initial replication instead.
        options.resync = match arguments.initial {
            InitialMode::Full => false,
            InitialMode::Auto => vm.tracking().owes_copy() && !handed_back,
            InitialMode::Existing => !handed_back,
        }
        .then(|| Arc::new(|_| {}) as blockrep::net::ResyncDone);
        options.resync_window = arguments.resync_window;
        let report = SharedReport::default();
        let control = {
            let report = Arc::clone(&report);
            let nbd = Arc::clone(&nbd);
            let reverse_requested = Arc::clone(&reverse_requested);
            let vm = Arc::clone(&vm);
            let arguments_nbd = arguments.nbd.clone();
            let mark = handover_mark(arguments);
            let storage = arguments.io.options();
            ControlSocket::bind(&self.control_path(), move |request| {
                match serde_json::from_str::<AgentRequest>(request) {
                    Ok(AgentRequest::PlannedFailover { reverse }) => {
                        reverse_requested.store(reverse, Ordering::Relaxed);
                        return planned_failover(
                            &commands,
                            &nbd,
                            &vm,
                            arguments_nbd.as_ref(),
                            reverse,
                            &mark,
                            &storage,
                        );
                    }
                    Ok(AgentRequest::Verify) => return verify(&commands),
                    Err(_) => {}
                }
                match request {
                    "resync" => {
                        let _ = commands.send(PrimaryCommand::Resync);
                    }
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
                DaemonStatus::Primary {
                    vms: report.into_iter().collect(),
                }
                .to_json()
            })?
        };
        let progress = (std::io::stderr().is_terminal() && !handed_back)
            .then(|| show_progress(Arc::clone(&report)));
        let outcome = run_primary(
            Arc::clone(&vm),
            options,
            Arc::clone(&report),
            self.stopped.clone(),
        )
        .await;
        if let Some((bar, stop)) = progress {
            let _ = stop.send(());
            bar.finish_and_clear();
        }
        drop(control);
        let server = nbd
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(server) = server {
            server.shutdown()?;
        }
        let descriptions = vm.descriptions().to_vec();
        let first_start = *vm.tracking() == Tracking::New;
        let closed = tokio::task::spawn_blocking(move || close_when_free(vm)).await?;
        let nothing_applied = report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_none_or(|entry| entry.status.applied_sequence == 0);
        if outcome.is_err() && first_start && nothing_applied && closed.is_ok() {
            // Refused before the replica held anything (an unknown certificate, say): leave no
            // journal or marker behind.
            blockrep::protect::remove_new_tracking(&arguments.disks)?;
        }
        let ending = outcome?;
        closed?;
        Ok(match ending {
            Ending::Stopped => {
                eprintln!("blockrep: stopped; tracking saved");
                Role::Done
            }
            Ending::HandedOver { sequence } if reverse_requested.load(Ordering::Relaxed) => {
                eprintln!(
                    "blockrep: planned failover done at delta {sequence}; the VM runs at the replica site, replicating back to this host"
                );
                Role::Replica {
                    descriptions,
                    first: None,
                }
            }
            Ending::HandedOver { sequence } => {
                eprintln!(
                    "blockrep: planned failover done at delta {sequence}; the VM runs at the replica site. Run `blockrep reverse {}` there and start this command again to replicate back",
                    arguments.name
                );
                Role::Done
            }
            Ending::Reversed {
                connection,
                applied,
                ..
            } => {
                eprintln!(
                    "blockrep: {} runs at the other site since a failover; this host keeps its replica now",
                    arguments.name
                );
                Role::Replica {
                    descriptions,
                    first: Some((connection, applied)),
                }
            }
        })
    }

    /// A handover to the other site was under way when this agent last ran: asks the other
    /// site who runs the VM, waiting (with the disks served to no one) until it answers.
    /// `None`: the VM runs here (the other site expects this host as its primary).
    async fn after_handover(
        &self,
        descriptions: &[DiskDescription],
    ) -> Result<Option<Role>, Failure> {
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            vm: self.arguments.name.clone(),
            primary: hostname(),
            disks: descriptions.to_vec(),
        };
        let mut stopped = self.stopped.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            let greeting = tokio::select! {
                greeting = greet(&self.endpoint, self.replica, &hello) => greeting,
                _ = stopped.changed() => return Ok(Some(Role::Done)),
            };
            let (next, connection) = match greeting {
                Ok(Greeting { next, connection }) => (next, connection),
                Err(reason) => (AfterHandover::AskAgain { reason }, None),
            };
            match (next, connection) {
                (AfterHandover::RunHere, _) => return Ok(None),
                (AfterHandover::BecomeReplica { applied }, Some(connection)) => {
                    return Ok(Some(Role::Replica {
                        descriptions: descriptions.to_vec(),
                        first: Some((connection, applied)),
                    }));
                }
                (AfterHandover::Refused { reason }, _) => {
                    return Err(format!(
                        "the other site refused: {reason}. {} records a planned failover to it; if the VM does not run there, remove that file",
                        handover_mark(self.arguments).path().display()
                    )
                    .into());
                }
                (next, _) => {
                    eprintln!(
                        "blockrep: a planned failover to the other site was under way; the disks are served to no one until it says who runs the VM ({})",
                        waiting_reason(&next)
                    );
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stopped.changed() => return Ok(Some(Role::Done)),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Keeps this host's copy as the replica of the VM running at the other site, until it
    /// is handed back (or the agent is stopped).
    async fn replica(
        &self,
        descriptions: Vec<DiskDescription>,
        mut pending: Option<(PeerConnection, u64)>,
    ) -> Result<Role, Failure> {
        let arguments = self.arguments;
        let policy = PointPolicy {
            keep: 0,
            interval: Duration::from_secs(3600),
        };
        let store =
            ReplicaStore::with_policy(&replica_root(arguments), arguments.io.options(), policy)?;
        let (taken_over, mut taken) = mpsc::unbounded_channel();
        let server: Arc<Mutex<Option<Arc<ReplicaServer>>>> = Arc::default();
        let _control = {
            let server = Arc::clone(&server);
            ControlSocket::bind(&self.control_path(), move |_| {
                let server = server
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let vms = server.map(|server| server.reports()).unwrap_or_default();
                DaemonStatus::Replica {
                    listen: "reverse replication".into(),
                    vms,
                }
                .to_json()
            })?
        };
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            vm: arguments.name.clone(),
            primary: hostname(),
            disks: descriptions.clone(),
        };
        let mut stopped = self.stopped.clone();
        let mut backoff = Duration::from_millis(200);
        loop {
            let (connection, applied) = match pending.take() {
                Some(first) => first,
                None => {
                    let greeting = tokio::select! {
                        greeting = greet(&self.endpoint, self.replica, &hello) => greeting,
                        _ = stopped.changed() => return Ok(Role::Done),
                    };
                    match greeting {
                        Ok(Greeting {
                            next: AfterHandover::BecomeReplica { applied },
                            connection: Some(connection),
                        }) => (connection, applied),
                        Ok(Greeting {
                            next: AfterHandover::RunHere,
                            ..
                        }) => {
                            tracing::warn!("the other site expects this host as the primary");
                            // The server of an earlier connection lets go of the store first.
                            shut_down(&server).await;
                            let forget = (store.clone(), arguments.name.clone());
                            tokio::task::spawn_blocking(move || forget.0.forget_adopted(&forget.1))
                                .await??;
                            // The other site said so: no handover to it stands.
                            handover_mark(arguments).remove(&arguments.io.options())?;
                            return Ok(Role::Primary {
                                handed_back: false,
                                suspended: false,
                            });
                        }
                        Ok(Greeting {
                            next: AfterHandover::Refused { reason },
                            ..
                        }) => {
                            return Err(format!("the other site refused: {reason}").into());
                        }
                        Ok(Greeting { next, .. }) => {
                            let reason = waiting_reason(&next);
                            tracing::warn!(%reason, "cannot replicate back yet; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                            continue;
                        }
                        Err(reason) => {
                            tracing::warn!(%reason, "cannot replicate back yet; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                            continue;
                        }
                    }
                }
            };
            backoff = Duration::from_millis(200);
            let running = server
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let running = match running {
                Some(running) => running,
                None => {
                    let owner = connection
                        .peer_fingerprint()
                        .ok_or("the other site presented no certificate")?;
                    let (adopting, vm, descriptions, paths) = (
                        store.clone(),
                        arguments.name.clone(),
                        descriptions.clone(),
                        arguments.disks.clone(),
                    );
                    tokio::task::spawn_blocking(move || {
                        adopting.adopt(&vm, &owner, descriptions, paths, applied)
                    })
                    .await??;
                    let started = Arc::new(
                        ReplicaServer::without_listener(
                            store.clone(),
                            Hosting::Caller(taken_over.clone()),
                            None,
                        )
                        .await?,
                    );
                    *server
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(Arc::clone(&started));
                    started
                }
            };
            tokio::select! {
                () = running.serve(connection) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(handed) = taken.recv() => {
                    blockrep::replica::crash_point("took-over-here");
                    eprintln!(
                        "blockrep: {} handed back at delta {}; it runs here again{}",
                        handed.vm,
                        handed.sequence,
                        if handed.reverse { ", replicating to the other site" } else { " (replication suspended: `blockrep resume` starts it)" }
                    );
                    drop(running);
                    shut_down(&server).await;
                    let forget = (store.clone(), arguments.name.clone());
                    tokio::task::spawn_blocking(move || forget.0.forget_adopted(&forget.1)).await??;
                    return Ok(Role::Primary { handed_back: true, suspended: !handed.reverse });
                }
                _ = stopped.changed() => {
                    drop(running);
                    shut_down(&server).await;
                    return Ok(Role::Done);
                }
            }
        }
    }
}

/// Why a host that asked the other site who runs the VM asks again.
fn waiting_reason(next: &AfterHandover) -> String {
    match next {
        AfterHandover::AskAgain { reason } => reason.clone(),
        AfterHandover::RunsThere { sequence } => format!(
            "the VM runs there since a planned failover at delta {sequence}; run `blockrep reverse` there to replicate back"
        ),
        other => format!("{other:?}"),
    }
}

async fn shut_down(server: &Mutex<Option<Arc<ReplicaServer>>>) {
    let taken = server
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(server) = taken.and_then(Arc::into_inner) {
        server.shutdown().await;
    }
}

fn start_nbd(arguments: &ProtectArguments, vm: &ProtectedVm) -> Result<Option<NbdServer>, Failure> {
    let Some(address) = &arguments.nbd else {
        return Ok(None);
    };
    let server = NbdServer::start(address, exports(vm))?;
    eprintln!("blockrep: disks served over NBD at {}", server.address());
    Ok(Some(server))
}

/// What the control socket takes besides the plain words.
#[derive(serde::Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
enum AgentRequest {
    PlannedFailover { reverse: bool },
    Verify,
}

/// Verification from the control socket: the answer when the comparison is done.
fn verify(commands: &mpsc::UnboundedSender<PrimaryCommand>) -> serde_json::Value {
    let (done, answer) = oneshot::channel();
    if commands.send(PrimaryCommand::Verify { done }).is_err() {
        return serde_json::json!({"error": "replication has stopped"});
    }
    match answer.blocking_recv() {
        Ok(Ok(verification)) => serde_json::json!({"ok": verification}),
        Ok(Err(reason)) => serde_json::json!({"error": reason}),
        Err(_) => {
            serde_json::json!({"error": "replication stopped before the comparison finished"})
        }
    }
}

/// Planned failover from the control socket: the VM's writes stop (NBD clients are told the
/// export is shutting down), then the final delta ships and the replica compares and takes
/// over. Writes resume here when it fails.
fn planned_failover(
    commands: &mpsc::UnboundedSender<PrimaryCommand>,
    nbd: &Mutex<Option<NbdServer>>,
    vm: &Arc<ProtectedVm>,
    address: Option<&blockrep::nbd::NbdAddress>,
    reverse: bool,
    mark: &HandoverMark,
    storage: &blockrep::io::StorageOptions,
) -> serde_json::Value {
    let server = nbd
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(server) = server
        && let Err(error) = server.shutdown()
    {
        return serde_json::json!({"error": format!("cannot stop the NBD export: {error}")});
    }
    let (done, answer) = oneshot::channel();
    // Shared by the hook and the refusal below: a handover called off is not recorded later.
    let called_off = Arc::new(Mutex::new(false));
    let (recorded, hook_storage) = (mark.clone(), storage.clone());
    let hook_called_off = Arc::clone(&called_off);
    let before_take_over: blockrep::net::BeforeTakeOver = Arc::new(move |sequence| {
        let called_off = hook_called_off
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *called_off {
            return Err("the planned failover was called off".into());
        }
        recorded
            .record(sequence, &hook_storage)
            .map_err(|error| format!("cannot record the handover: {error}"))
    });
    let outcome = match commands.send(PrimaryCommand::HandOver {
        reverse,
        done,
        before_take_over: Some(before_take_over),
    }) {
        Ok(()) => answer.blocking_recv().ok(),
        Err(_) => None,
    };
    match outcome {
        Some(Ok(sequence)) => {
            serde_json::json!({"ok": {"sequence": sequence, "reverse": reverse}})
        }
        Some(Err(HandoverFailure::Unknown(reason))) => {
            // The other site may run the VM now: the writes stay stopped here.
            serde_json::json!({"error": HandoverFailure::Unknown(reason).to_string()})
        }
        Some(Err(HandoverFailure::NotHandedOver(reason))) => {
            // Refused: the VM goes on running here.
            let mut called_off = called_off
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *called_off = true;
            if let Err(error) = mark.remove(storage) {
                return serde_json::json!({"error": format!("{reason}; and the record of the handover cannot be removed, so the disks stay unserved: {error}")});
            }
            if let Some(address) = address {
                match NbdServer::start(address, exports(vm)) {
                    Ok(server) => {
                        *nbd.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(server);
                    }
                    Err(error) => tracing::error!(%error, "cannot serve the disks again"),
                }
            }
            serde_json::json!({"error": reason})
        }
        // This agent is no longer the VM's primary (it just handed over or is stopping):
        // neither done nor refused here, so the caller asks where the VM runs now.
        None => serde_json::json!({"role": "leaving"}),
    }
}
