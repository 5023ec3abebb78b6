//! Helpers shared by the command's integration tests.
#![allow(dead_code)]

use std::process::Command;

/// True when qemu-img and qemu-io are installed; otherwise says why the test skips (and fails
/// under CI, where the test script installs them).
pub fn have_qemu(test: &str) -> bool {
    let present = ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success())
    });
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: qemu-img/qemu-io missing under CI"
        );
        eprintln!(
            "SKIPPED {test}: qemu-img or qemu-io is not installed (apt-get install qemu-utils)"
        );
    }
    present
}

pub mod lab;
