//! docs/operations.md runs: every `sh` block of the guide, in order, in one bash script, in an
//! empty directory, with the blockrep under test first on the PATH. A command that fails fails
//! the test, so the guide cannot drift from the code.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The guide's `sh` blocks, joined.
fn guide_script() -> String {
    let guide = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"),
    )
    .unwrap();
    let mut script = String::new();
    let mut inside = false;
    for line in guide.lines() {
        if inside {
            if line.starts_with("```") {
                inside = false;
            } else {
                script.push_str(line);
                script.push('\n');
            }
        } else if line == "```sh" {
            inside = true;
        }
    }
    script
}

#[test]
fn every_command_of_the_operations_guide_runs() {
    if !common::have_qemu("every_command_of_the_operations_guide_runs") {
        return;
    }
    let script = guide_script();
    assert!(script.contains("blockrep serve") && script.contains("blockrep verify"));
    let directory = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_blockrep"));
    let path = format!(
        "{}:{}",
        binary.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Whatever the guide leaves running is stopped when the script ends, however it ends.
    let framed =
        format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2> /dev/null || true' EXIT\n{script}");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(framed)
        .current_dir(directory.path())
        .env("PATH", path)
        .env("BLOCKREP_RUN_DIR", directory.path().join("run"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            // Killed, it fails below with what it printed and the daemons' logs.
            eprintln!("the guide's commands did not finish within 5 minutes");
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let logs: Vec<String> = [
        "site-a/protect.log",
        "site-a/protect-again.log",
        "site-b/serve.log",
    ]
    .iter()
    .map(|log| {
        let text = std::fs::read_to_string(directory.path().join(log)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        format!(
            "--- {log}:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
    .collect();
    assert!(
        output.status.success(),
        "the guide failed ({}):\n{}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        logs.join("\n")
    );
}
