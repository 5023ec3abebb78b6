//! `blockrep points`, `failover`, `reinitialize`, `allow-handover` and `reverse`: what an
//! operator asks of a replica server or a primary agent.

use super::*;

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
pub(super) fn parse_point(vm: &str, point: Option<&str>) -> Result<Option<u64>, String> {
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
