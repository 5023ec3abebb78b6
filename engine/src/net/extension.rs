//! Extended replication: a replica server replicating the VMs it receives onward to a third
//! site. The replica's disks are tracked while deltas are applied to them (the store applies
//! through the tracked disks), and each onward cut waits for the apply in progress, so it is
//! always a state the primary shipped, never half of one.

use super::primary::{PrimaryOptions, PrimaryReport, ResyncDone, Route, SharedReport, run_primary};
use crate::Result;
use crate::delta::Compression;
use crate::io::{StorageOptions, remove_if_present};
use crate::protect::{ProtectedVm, journal_path};
use crate::proto::PrimaryConfig;
use crate::replica::VmReplica;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Where and how often a replica server replicates its VMs onward.
#[derive(Debug, Clone)]
pub struct ExtensionOptions {
    /// The third site's replica server.
    pub target: SocketAddr,
    /// Presents this server's identity and accepts only the third site's certificate.
    pub endpoint: super::ClientEndpoint,
    pub frequency: Duration,
    pub storage: StorageOptions,
    pub streams: usize,
    /// This host's name, as the third site's logs show it.
    pub host_name: String,
}

/// One VM replicated onward.
pub(super) struct ExtendedVm {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Counts the deltas applied to the replica: onward cuts follow them.
    applies: watch::Sender<u64>,
    report: SharedReport,
}

impl ExtendedVm {
    /// Starts replicating `replica` onward: its disks are opened tracked (with journals beside
    /// them) and the store applies through them from now on. `fresh` drops old journals (the
    /// disk files were replaced).
    pub(super) fn start(
        name: &str,
        replica: &mut VmReplica,
        options: &ExtensionOptions,
        runtime: &tokio::runtime::Handle,
        fresh: bool,
    ) -> Result<ExtendedVm> {
        replica.release_disks();
        // Opening them tracked stamps the disks anew: the store's stamps go first.
        replica.forget_stamps()?;
        let paths = replica.disk_paths();
        if fresh {
            for path in &paths {
                remove_if_present(&journal_path(path))?;
            }
        }
        let vm = Arc::new(
            ProtectedVm::open(&paths, &options.storage, Compression::Lz4)?
                .with_gate(replica.apply_gate()),
        );
        replica.track_with(vm.disks().to_vec())?;
        let vm_tracking_owes_copy = vm.tracking().owes_copy();
        let config = PrimaryConfig {
            vm: name.to_owned(),
            primary: options.host_name.clone(),
            disks: vm.descriptions().to_vec(),
            frequency: options.frequency,
            window: 32,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            tracking: vm.tracking().clone(),
            seed: crate::resync::random_seed().unwrap_or(0xe7e7),
            app_consistent_every: None,
        };
        let (stop, stopped) = watch::channel(false);
        let (applies, applied) = watch::channel(0u64);
        let report = SharedReport::default();
        let mut primary_options = PrimaryOptions::new(
            Route::Dial {
                endpoint: options.endpoint.clone(),
                replica: options.target,
            },
            config,
        );
        primary_options.streams = options.streams;
        primary_options.source_changes = Some(applied);
        // Onward tracking that cannot vouch (a new or lost journal) compares with the third
        // site first: an initial replication over its copy would be refused there, and would
        // cost its recovery points.
        if vm_tracking_owes_copy {
            primary_options.resync = Some(Arc::new(|_| {}) as ResyncDone);
        }
        let vm_name = name.to_owned();
        let target = options.target;
        let task_report = Arc::clone(&report);
        let task = runtime.spawn(async move {
            match run_primary(vm, primary_options, task_report, stopped).await {
                Ok(_) => tracing::info!(vm = %vm_name, "extended replication stopped"),
                Err(error) => {
                    tracing::error!(vm = %vm_name, %target, %error, "extended replication stopped")
                }
            }
        });
        tracing::info!(vm = %name, %target, "replicating onward (extended replication)");
        Ok(ExtendedVm {
            stop,
            task: Some(task),
            applies,
            report,
        })
    }

    /// Stops the onward primary and waits (a few seconds at most) until it has let go of the
    /// disks, before someone else opens them.
    pub(super) async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(10), &mut task)
                .await
                .is_err()
        {
            // Stuck (on the network, say): dropped, it lets go of the disks all the same.
            tracing::warn!("onward replication did not stop within 10 s; aborting it");
            task.abort();
            let _ = task.await;
        }
    }

    /// [`ExtendedVm::stop`], from a blocking thread (one that holds the VM's slot).
    pub(super) fn stop_and_wait(self, runtime: &tokio::runtime::Handle) {
        runtime.block_on(self.stop());
    }

    /// A delta was applied to the replica: there is something new to pass on.
    pub(super) fn source_changed(&self) {
        self.applies.send_modify(|count| *count += 1);
    }

    /// The onward primary's status, for `blockrep status`.
    pub(super) fn report(&self) -> Option<PrimaryReport> {
        self.report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for ExtendedVm {
    /// Stops the onward primary (it says goodbye); its journals keep what was not shipped.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
