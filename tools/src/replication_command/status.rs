//! `blockrep status`: every daemon running here, as text or JSON.

use super::*;
use blockrep::net::{PrimaryReport, ReplicaReport};

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS`, UTC.
pub(super) fn format_time(seconds: f64) -> String {
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

pub fn status(json: bool) -> Outcome {
    let directory = run_directory();
    let answers = query_all(&directory)?;
    if json {
        // The answers as the daemons gave them, for scripts.
        let answers: Vec<&serde_json::Value> = answers.iter().map(|(_, answer)| answer).collect();
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
    let mut unanswered = 0;
    for (socket, answer) in answers {
        if let Some(error) = answer.get("error").and_then(|error| error.as_str()) {
            // The socket itself refused (busy, or not this user's daemon).
            eprintln!("blockrep: {}: {error}", socket.display());
            unanswered += 1;
            continue;
        }
        match serde_json::from_value::<DaemonStatus>(answer) {
            Ok(DaemonStatus::Primary { vms }) => vms.iter().for_each(print_primary),
            Ok(DaemonStatus::Replica { vms, .. }) => vms.iter().for_each(print_replica),
            Err(error) => {
                // A daemon of another blockrep version, most likely: say so rather than show
                // its figures as zeros.
                eprintln!(
                    "blockrep: {}: its status cannot be read ({error}); is it another version of blockrep?",
                    socket.display()
                );
                unanswered += 1;
            }
        }
    }
    Ok(if unanswered > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub(super) fn print_primary(vm: &PrimaryReport) {
    let status = &vm.status;
    println!("{} (primary, replicating to {})", vm.vm, vm.replica);
    println!("  state:               {}", json_name(&status.state));
    println!("  health:              {}", json_name(&status.health));
    match vm.seconds_since_replication {
        Some(seconds) => println!("  last replication:    {seconds:.0} s ago"),
        None => println!("  last replication:    never"),
    }
    println!(
        "  pending:             {}",
        format_size(status.pending_bytes)
    );
    println!(
        "  delta size:          {} average, {} maximum",
        format_size(status.average_delta_bytes),
        format_size(status.maximum_delta_bytes)
    );
    println!("  average latency:     {:.2} s", vm.average_latency_seconds);
    println!(
        "  cycles:              {} successful, {} missed",
        status.successful_cycles, status.missed_cycles
    );
    println!(
        "  shipped:             {} before compression, {} after",
        format_size(vm.bytes_before_compression),
        format_size(vm.bytes_after_compression)
    );
    if let Some(progress) = &vm.resynchronizing {
        println!(
            "  resynchronizing:     {} of {} compared{}",
            format_size(progress.compared_bytes),
            format_size(progress.total_bytes),
            progress
                .eta_seconds
                .map(|seconds| format!(", about {seconds:.0} s left"))
                .unwrap_or_default()
        );
    }
    if let Some(resync) = &vm.resync {
        println!(
            "  last resync:         {} compared, {} differed (shipped)",
            format_size(resync.compared_bytes),
            format_size(resync.differing_bytes)
        );
    }
    if let Some(error) = &status.last_error {
        println!("  last error:          {error}");
    }
}

pub(super) fn print_replica(vm: &ReplicaReport) {
    println!("{} (replica)", vm.vm);
    if vm.busy {
        println!("  busy:                comparing or applying; the figures below are from before");
    }
    println!("  primary connected:   {}", vm.connected);
    println!("  applied delta:       {}", vm.applied_sequence);
    if let Some((sequence, staged, total)) = vm.staging {
        println!("  staging:             delta {sequence}, {staged} of {total} chunks");
    }
    if let Some(reason) = &vm.compare_required {
        println!(
            "  resynchronization required: {reason} (the primary compares on its next connection)"
        );
    }
    for disk in &vm.disks {
        println!("  disk:                {disk}");
    }
    println!(
        "  recovery points:     {} besides the latest",
        vm.recovery_points
    );
    if let Some(out) = &vm.test_failover {
        println!("  test failover:       {}", out.display());
    }
    if let Some(failover) = &vm.failover {
        if let Some(sequence) = failover.handing_back {
            println!(
                "  failing back:        final delta {sequence} applied at the old primary; the VM's writes are stopped here"
            );
        }
        println!(
            "  failed over:         to point {}{}",
            failover.point,
            if failover.committed {
                ", committed"
            } else {
                " (not committed)"
            }
        );
    }
    for (onward, label) in [
        (&vm.reverse, "replicating back:    "),
        (&vm.extended, "extended to:         "),
    ] {
        if let Some(onward) = onward {
            println!(
                "  {label}{} — {}, health {}, delta {} applied there{}",
                onward.replica,
                json_name(&onward.status.state),
                json_name(&onward.status.health),
                onward.status.applied_sequence,
                onward
                    .resync
                    .map(|resync| format!(
                        ", resynchronized: {} differed",
                        format_size(resync.differing_bytes)
                    ))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(error) = &vm.error {
        println!("  error:               {error}");
    }
}

/// A state's or health's name as the JSON status gives it (`replicating`, `normal`).
fn json_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}
