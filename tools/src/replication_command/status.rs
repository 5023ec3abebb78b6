//! `blockrep status`: every daemon running here, as text or JSON.

use super::*;

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

pub(super) fn print_primary(vm: &serde_json::Value) {
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

pub(super) fn print_replica(vm: &serde_json::Value) {
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
