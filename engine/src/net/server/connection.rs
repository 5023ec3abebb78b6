//! A primary's connection: the hello, routing its messages to the VM, and the hash requests
//! of a comparison.

use super::*;

/// How long a new connection has to introduce itself.
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a peer that asked for hashes has to compare them and say hello: an hour, or the
/// time to hash its disks at a slow 32 MiB/s when that is longer. A peer that dies is noticed
/// sooner, by QUIC's idle timeout; this bounds one that lives but never answers.
pub(super) fn resync_timeout(disk_bytes: u64) -> Duration {
    Duration::from_secs((disk_bytes / (32 << 20)).max(3600))
}

pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    store: ReplicaStore,
    vms: Vms,
    site: Arc<Site>,
    next_connection: Arc<AtomicU64>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let store = store.clone();
                let vms = Arc::clone(&vms);
                let site = Arc::clone(&site);
                let id = next_connection.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(connection) => serve_connection(id, connection, store, vms, site).await,
                        Err(error) => tracing::warn!(peer = %remote, %error, "refused a connection: the handshake failed"),
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    endpoint.close(0u32.into(), b"server stopping");
    tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle())
        .await
        .ok();
}

pub(super) async fn serve_connection(
    id: ConnectionId,
    connection: quinn::Connection,
    store: ReplicaStore,
    vms: Vms,
    site: Arc<Site>,
) {
    let remote = connection.remote_address();
    let owner = crate::net::peer_fingerprint(&connection);
    let Some(owner) = owner else {
        tracing::warn!(peer = %remote, "refused a connection without a client certificate");
        connection.close(3u32.into(), b"no client certificate");
        return;
    };
    let accepted = async {
        let (mut send, mut receive) = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (send, receive) = connection.accept_bi().await.ok()?;
            Some((send, receive))
        })
        .await
        .ok()??;
        let mut hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut receive))
            .await
            .ok()?
            .ok()??;
        let mut compared = false;
        if let Message::HashRequest { vm, seed } = hello {
            // A resynchronization first: the hashes, then the session's hello once the peer
            // has compared (hashing both disks takes a while).
            let resync_deadline = match hash_request(&store, &vms, &site, &vm, &owner).await {
                Ok(HashRequest {
                    slot,
                    applied,
                    disk_bytes,
                }) => {
                    let resync_deadline = resync_timeout(disk_bytes);
                    // The welcome first, so the primary hashes its disks while this side does.
                    let answered = tokio::time::timeout(resync_deadline, async {
                        crate::net::resync::answer_welcome(&mut send, applied).await?;
                        if applied == 0 {
                            return Ok(());
                        }
                        let hashes = replica_hashes(slot, seed).await.map_err(|reason| {
                            Error::Replication {
                                peer: vm.clone(),
                                problem: reason,
                            }
                        })?;
                        crate::net::resync::answer_hashes(&mut send, &mut receive, &hashes).await
                    })
                    .await;
                    if !matches!(answered, Ok(Ok(()))) {
                        return None;
                    }
                    compared = true;
                    resync_deadline
                }
                Err(reason) => {
                    let _ = send.write_all(&crate::net::resync::refusal(reason)).await;
                    let _ = send.finish();
                    return None;
                }
            };
            hello = tokio::time::timeout(resync_deadline, read_frame(&mut receive))
                .await
                .ok()?
                .ok()??;
        }
        Some((send, receive, hello, compared))
    }
    .await;
    let Some((send, mut receive, hello, compared)) = accepted else {
        tracing::warn!(peer = %remote, primary = %owner, "closing a connection that did not say hello");
        connection.close(3u32.into(), b"expected hello");
        return;
    };
    let Message::Hello {
        version,
        vm,
        primary,
        disks,
    } = hello
    else {
        connection.close(3u32.into(), b"expected hello");
        return;
    };
    // The names are the peer's, not yet checked: logged escaped.
    tracing::info!(peer = %remote, primary = ?primary, %owner, vm = ?vm, "primary connected");
    let admitted = {
        let (store, owner, vm, disks) = (store.clone(), owner.clone(), vm.clone(), disks.clone());
        blocking(&vm.clone(), move || store.admit(&owner, &vm, &disks)).await
    };
    let opened = match admitted {
        Ok(()) => open_slot(&store, &vms, &vm, &site).await,
        Err(error) => Err(error),
    };
    let slot = match opened {
        Ok(slot) => slot,
        Err(error) => {
            tracing::error!(vm = ?vm, %error, "cannot open the VM's replica");
            let refusal = Message::Refused {
                code: RefusalCode::NotThisReplica,
                reason: format!("{vm}: {error}"),
            };
            let (outgoing, writer) = spawn_control_writer(send);
            let _ = outgoing.send(refusal);
            drop(outgoing);
            let _ = writer.await;
            connection.close(4u32.into(), b"refused");
            return;
        }
    };
    // The old primary is back while a failback's outcome is open: it holds the final delta,
    // so the failback completes and it is welcomed as the primary.
    if let Err(error) = settle_failback(&slot, &owner).await {
        tracing::error!(%vm, %error, "cannot settle an interrupted failback");
        connection.close(4u32.into(), b"refused");
        return;
    }
    let (outgoing, writer) = spawn_control_writer(send);
    if let Some(answer) = answer_for_running_vm(&slot, &owner) {
        // The VM runs here: the connecting side is its old primary.
        let reversing = matches!(answer, Message::Reverse { .. });
        let _ = outgoing.send(answer);
        drop(outgoing);
        let _ = writer.await;
        let handed = reversing
            && lock(&slot)
                .hosted
                .as_ref()
                .is_some_and(|hosted| hosted.connect(connection.clone()));
        if handed {
            tracing::info!(peer = %remote, %vm, "the old primary connected: replicating back to it");
        } else {
            connection.close(4u32.into(), b"refused");
        }
        return;
    }
    lock(&slot).connections.insert(
        id,
        Peer {
            connection: connection.clone(),
            outgoing,
            writer,
        },
    );
    {
        let slot = Arc::clone(&slot);
        let owner = owner.clone();
        let store = store.clone();
        run_blocking(move || {
            let mut slot = lock(&slot);
            recover_after_failure(&store, &mut slot);
            if compared {
                slot.machine.compared(id);
            }
            slot.machine.hello(id, &owner, version, disks);
            drive(&mut slot);
        })
        .await;
    }
    // Data streams: chunks, in any order.
    let streams = {
        let connection = connection.clone();
        let slot = Arc::clone(&slot);
        tokio::spawn(async move {
            while let Ok(mut stream) = connection.accept_uni().await {
                let slot = Arc::clone(&slot);
                tokio::spawn(async move {
                    loop {
                        match read_frame(&mut stream).await {
                            Ok(Some(message @ Message::Chunk { .. })) => {
                                dispatch(&slot, id, message).await
                            }
                            Ok(Some(_)) => {
                                tracing::warn!(
                                    "a data stream carried a control message; ignoring the stream"
                                );
                                return;
                            }
                            Ok(None) => return,
                            Err(error) => {
                                tracing::debug!(%error, "data stream ended");
                                return;
                            }
                        }
                    }
                });
            }
        })
    };
    loop {
        match read_frame(&mut receive).await {
            Ok(Some(message)) => dispatch(&slot, id, message).await,
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(%error, %vm, "control stream ended");
                break;
            }
        }
    }
    let reason = connection.closed().await;
    streams.abort();
    tracing::info!(peer = %remote, %vm, %reason, "primary disconnected");
    run_blocking(move || {
        let mut slot = lock(&slot);
        slot.connections.remove(&id);
        slot.machine.disconnected(id);
        drive(&mut slot);
    })
    .await;
}

/// What a connecting old primary is told when its VM runs here (the engine decides:
/// `ReplicaSite::answer_old_primary`). `None` when the VM does not run here.
pub(super) fn answer_for_running_vm(slot: &Mutex<VmSlot>, owner: &str) -> Option<Message> {
    let mut slot = lock(slot);
    let hosted = slot.hosted_state();
    slot.replica_site().answer_old_primary(owner, hosted)
}

/// A comparison `owner` asked for of `vm`'s replica: the slot and what it has applied (0 when
/// it holds no copy), or why it may not compare (another owner, or the VM runs here now: its
/// disks are open for the VM, not to be opened again).
pub(super) async fn hash_request(
    store: &ReplicaStore,
    vms: &Vms,
    site: &Arc<Site>,
    vm: &str,
    owner: &str,
) -> std::result::Result<HashRequest, String> {
    let slot = open_slot(store, vms, vm, site)
        .await
        .map_err(|error| error.to_string())?;
    let (applied, disk_bytes) = {
        let mut slot = lock(&slot);
        let disk_bytes = slot
            .replica
            .descriptions()
            .iter()
            .map(|disk| disk.virtual_size)
            .sum();
        (slot.replica_site().comparison(owner)?, disk_bytes)
    };
    Ok(HashRequest {
        slot,
        applied,
        disk_bytes,
    })
}

/// A comparison a primary may make: of this VM's replica, at delta `applied` (0 when it
/// holds no copy), of `disk_bytes` in all.
pub(super) struct HashRequest {
    pub(super) slot: Arc<Mutex<VmSlot>>,
    pub(super) applied: u64,
    pub(super) disk_bytes: u64,
}

/// The block hashes of the replica's disks.
pub(super) async fn replica_hashes(
    slot: Arc<Mutex<VmSlot>>,
    seed: u64,
) -> std::result::Result<Vec<crate::resync::BlockHashes>, String> {
    tokio::task::spawn_blocking(move || {
        lock(&slot)
            .replica
            .block_hashes(seed)
            .map_err(|error| error.to_string())
    })
    .await
    .map_err(|error| error.to_string())?
}
