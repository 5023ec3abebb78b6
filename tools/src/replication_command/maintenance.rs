//! `blockrep suspend`, `resume`, `seed`, `resync` and `verify`.

use super::*;

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
