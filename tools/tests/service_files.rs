//! The systemd units in contrib/systemd run commands blockrep accepts: every flag of their
//! ExecStart lines is one the command knows (checked by parsing them with `--help` last), and
//! systemd itself accepts the server's unit when `systemd-analyze` is on the machine.

use std::path::Path;
use std::process::Command;

fn unit(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/systemd")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

/// The ExecStart line's arguments after the program, with the template's and the
/// environment file's placeholders filled in as an installation would.
fn exec_start_arguments(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    line.replace("%i", "vm1")
        .replace("$BLOCKREP_DISKS", "--disk /srv/vms/vm1.vhdx")
        .replace("${BLOCKREP_REPLICA}", "site-b:4433")
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_unit_runs_a_command_blockrep_accepts() {
    for name in ["blockrep-serve.service", "blockrep-protect@.service"] {
        let mut arguments = exec_start_arguments(&unit(name));
        arguments.push("--help".into());
        let output = Command::new(env!("CARGO_BIN_EXE_blockrep"))
            .args(&arguments)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{name}: blockrep refused {arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn systemd_accepts_the_server_unit() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    assert!(version.status.success());
    let directory = tempfile::tempdir().unwrap();
    let text = unit("blockrep-serve.service")
        .replace("/usr/local/bin/blockrep", env!("CARGO_BIN_EXE_blockrep"));
    let path = directory.path().join("blockrep-serve.service");
    std::fs::write(&path, text).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    // Only what concerns this unit counts: a container's own units may draw complaints.
    let about_it: Vec<&str> = said
        .lines()
        .filter(|line| line.contains("blockrep-serve.service"))
        .collect();
    assert!(about_it.is_empty(), "systemd-analyze: {about_it:?}");
}
