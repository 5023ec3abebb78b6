//! A VM that runs at this site after a failover: its disks (the replica's, now live) are
//! tracked and served to the VM over NBD, and, once replication back is asked for, a primary
//! ships their changes to the old primary over the connections it keeps making to this
//! server (reverse replication).

use super::events::EventSender;
use super::primary::{
    BeforeTakeOver, Ending, HandoverFailure, PrimaryCommand, PrimaryOptions, ResyncDone, Route,
    SharedReport, run_primary,
};
use crate::delta::Compression;
use crate::io::StorageOptions;
use crate::nbd::{ExportedDisk, NbdAddress, NbdServer};
use crate::protect::{ProtectedVm, forget_tracking};
use crate::proto::{PrimaryConfig, Tracking};
use crate::{Error, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// What a replica server does with its VMs besides keeping them: runs those that fail over
/// to it, and replicates them onward to a third site.
#[derive(Debug, Clone)]
pub struct HostingOptions {
    /// Serve each running VM's disks over NBD at `DIRECTORY/VM.sock`.
    pub nbd_directory: Option<PathBuf>,
    pub storage: StorageOptions,
    /// Frequency of replication back to the old primary.
    pub frequency: Duration,
    pub streams: usize,
    /// This host's name, as the old primary's logs show it.
    pub host_name: String,
    /// Extended replication: where the VMs kept here are replicated onward.
    pub extend: Option<super::extension::ExtensionOptions>,
}

impl Default for HostingOptions {
    fn default() -> Self {
        HostingOptions {
            nbd_directory: None,
            storage: StorageOptions::default(),
            frequency: Duration::from_secs(300),
            streams: 4,
            host_name: "replica-site".into(),
            extend: None,
        }
    }
}

/// The primary shipping a hosted VM's changes back.
struct Reverse {
    connections: mpsc::UnboundedSender<super::PeerConnection>,
    commands: mpsc::UnboundedSender<PrimaryCommand>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Ending>>,
    report: SharedReport,
}

/// A VM running at this site.
pub(super) struct HostedVm {
    name: String,
    vm: Arc<ProtectedVm>,
    nbd: Option<NbdServer>,
    /// Where the disks are served, to serve them again after a failover that did not happen.
    nbd_address: Option<NbdAddress>,
    reverse: Option<Reverse>,
}

impl HostedVm {
    /// Opens the VM's disks with tracking. `fresh` starts tracking afresh (the disks have
    /// just become the VM's: equal to the other site's copy, or compared by hash later).
    pub(super) fn open(
        name: &str,
        paths: &[PathBuf],
        options: &HostingOptions,
        fresh: bool,
    ) -> Result<HostedVm> {
        if fresh {
            forget_tracking(paths)?;
        }
        let vm = Arc::new(ProtectedVm::open(
            paths,
            &options.storage,
            Compression::Lz4,
        )?);
        let nbd_address = match &options.nbd_directory {
            Some(directory) => {
                std::fs::create_dir_all(directory).map_err(|error| {
                    Error::file(&directory.display().to_string(), "create", error)
                })?;
                Some(NbdAddress::Unix(directory.join(format!("{name}.sock"))))
            }
            None => None,
        };
        let nbd = match &nbd_address {
            Some(address) => Some(serve_nbd(name, &vm, address)?),
            None => None,
        };
        Ok(HostedVm {
            name: name.to_owned(),
            vm,
            nbd,
            nbd_address,
            reverse: None,
        })
    }

    /// Starts replicating back to the old primary, over the connections it makes here.
    /// `resync` compares its copy by hash first; `events` hears of its cycles and handover.
    pub(super) fn start_reverse(
        &mut self,
        options: &HostingOptions,
        runtime: &tokio::runtime::Handle,
        resync: Option<ResyncDone>,
        events: Option<EventSender>,
    ) {
        if self.reverse.is_some() {
            return;
        }
        let (connections, incoming) = mpsc::unbounded_channel();
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let report = SharedReport::default();
        // Disks newly made the VM's are the other site's copy, compared as the failover says
        // (`resync`); a loss found when they were opened (written while not tracked, a damaged
        // journal) is compared whatever it says.
        let lost = matches!(self.vm.tracking(), Tracking::Lost(_));
        let config = PrimaryConfig {
            vm: self.name.clone(),
            primary: options.host_name.clone(),
            disks: self.vm.descriptions().to_vec(),
            frequency: options.frequency,
            window: 32,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(5),
            tracking: if lost {
                self.vm.tracking().clone()
            } else {
                Tracking::Vouches
            },
            seed: crate::resync::random_seed().unwrap_or(0x5eed),
            app_consistent_every: None,
        };
        let mut primary_options = PrimaryOptions::new(
            Route::Incoming {
                peer: format!("old primary of {}", self.name),
                connections: incoming,
            },
            config,
        );
        primary_options.streams = options.streams;
        primary_options.commands = Some(command_receiver);
        primary_options.resync = resync.or_else(|| lost.then(|| Arc::new(|_| {}) as ResyncDone));
        primary_options.events = events;
        let task = runtime.spawn(run_primary(
            Arc::clone(&self.vm),
            primary_options,
            Arc::clone(&report),
            stopped,
        ));
        tracing::info!(vm = %self.name, "replicating back to the old primary when it connects");
        self.reverse = Some(Reverse {
            connections,
            commands,
            stop,
            task,
            report,
        });
    }

    /// Whether replication back runs.
    pub(super) fn reversing(&self) -> bool {
        self.reverse.is_some()
    }

    /// Hands a connection from the old primary to the reverse primary.
    pub(super) fn connect(&self, connection: quinn::Connection) -> bool {
        match &self.reverse {
            Some(reverse) => reverse
                .connections
                .send(super::PeerConnection(connection))
                .is_ok(),
            None => false,
        }
    }

    /// The reverse primary's status, for `blockrep status`.
    pub(super) fn report(&self) -> Option<super::primary::PrimaryReport> {
        self.reverse.as_ref().and_then(|reverse| {
            reverse
                .report
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    /// Stops the VM's writes: NBD clients are told the export is shutting down.
    pub(super) fn stop_writes(&mut self) -> Result<()> {
        if let Some(server) = self.nbd.take() {
            server.shutdown().map_err(|error| Error::Replication {
                peer: self.name.clone(),
                problem: format!("stopping the NBD export: {error}"),
            })?;
        }
        Ok(())
    }

    /// Lets the VM's writes in again (a planned failover that did not happen).
    pub(super) fn resume_writes(&mut self) -> Result<()> {
        if let (None, Some(address)) = (&self.nbd, &self.nbd_address) {
            self.nbd = Some(serve_nbd(&self.name, &self.vm, address)?);
        }
        Ok(())
    }

    /// Makes every write the VM made durable (its data and the images' metadata).
    pub(super) fn flush(&self) -> Result<()> {
        for disk in self.vm.disks() {
            disk.flush()?;
        }
        Ok(())
    }

    /// Asks the reverse primary for a planned failover back; the answer comes on the
    /// returned channel.
    pub(super) fn hand_over(
        &self,
        reverse: bool,
        before_take_over: BeforeTakeOver,
    ) -> Result<oneshot::Receiver<std::result::Result<u64, HandoverFailure>>> {
        let replica = self.reverse.as_ref().ok_or_else(|| Error::Replication {
            peer: self.name.clone(),
            problem: "not replicating back to the old primary: run `blockrep reverse` first, \
                      so the other site has the VM to take over"
                .into(),
        })?;
        let (done, answer) = oneshot::channel();
        replica
            .commands
            .send(PrimaryCommand::HandOver {
                reverse,
                done,
                before_take_over: Some(before_take_over),
            })
            .map_err(|_| Error::Replication {
                peer: self.name.clone(),
                problem: "replication back has stopped".into(),
            })?;
        Ok(answer)
    }

    /// Stops everything and closes the disks, saving tracking.
    pub(super) async fn close(mut self) -> Result<()> {
        if let Some(reverse) = self.reverse.take() {
            let _ = reverse.stop.send(true);
            let _ = reverse.task.await;
        }
        let stopped = self.stop_writes();
        let vm = self.vm;
        let closed = tokio::task::spawn_blocking(move || close_when_free(vm))
            .await
            .map_err(|error| Error::Replication {
                peer: self.name.clone(),
                problem: error.to_string(),
            })?;
        stopped.and(closed)
    }
}

fn serve_nbd(name: &str, vm: &ProtectedVm, address: &NbdAddress) -> Result<NbdServer> {
    let server = NbdServer::start(address, exports(vm)).map_err(|error| Error::Replication {
        peer: name.to_owned(),
        problem: format!("cannot serve the disks over NBD: {error}"),
    })?;
    tracing::info!(vm = %name, address = %server.address(), "the VM's disks are served over NBD");
    Ok(server)
}

/// Closes the VM's disks (saving tracking) once nothing else holds them: a task that was
/// reading them (a verification, a connection being set up) gets a few seconds to let go.
pub fn close_when_free(mut vm: Arc<ProtectedVm>) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Arc::try_unwrap(vm) {
            Ok(vm) => return vm.close(),
            Err(still_shared) if std::time::Instant::now() < deadline => {
                vm = still_shared;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => {
                return Err(Error::InvalidArgument {
                    what: "shutdown",
                    reason: "the disks are still in use; tracking was not saved (the next start compares by hash)".into(),
                });
            }
        }
    }
}

/// Each disk as an NBD export named after its file; the first is also the default.
pub fn exports(vm: &ProtectedVm) -> Vec<(String, Arc<dyn ExportedDisk>)> {
    vm.paths()
        .iter()
        .zip(vm.disks())
        .map(|(path, disk)| {
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, Arc::clone(disk) as Arc<dyn ExportedDisk>)
        })
        .collect()
}
