//! Asking a running daemon over its control socket: the replica server's requests, and the
//! primary agent's.

use super::*;

/// What `blockrep points` and `blockrep failover` ask a replica server.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub(super) enum ReplicaRequest {
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

pub(super) fn answer_replica_request(
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
pub(super) fn ask_replica_servers(
    vm: &str,
    request: &ReplicaRequest,
) -> Result<serde_json::Value, String> {
    ask_replica_servers_at(vm, request, None)
}

/// Asks the replica server whose control socket is `server` (a relative path is in the run
/// directory), or every running one when `server` is `None`.
pub(super) fn ask_replica_servers_at(
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

/// Sends `request` to the VM's agent (`blockrep protect`) on this host; its answer.
pub(super) fn ask_primary(
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
pub(super) fn request_agent(
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
