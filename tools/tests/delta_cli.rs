//! `blockrep delta`: a disk carried on external media arrives byte for byte, and a damaged
//! delta is reported and refused without touching the target.

use std::path::Path;
use std::process::{Command, Output};

const MIB: usize = 1 << 20;

fn blockrep(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(arguments)
        .output()
        .expect("run blockrep")
}

fn ok(arguments: &[&str]) -> String {
    let output = blockrep(arguments);
    assert!(
        output.status.success(),
        "blockrep {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn disk(directory: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; 24 * MIB + 1536];
    for (index, byte) in data.iter_mut().enumerate() {
        match index / MIB % 4 {
            0 => {}
            1 => *byte = b"replica site "[index % 13],
            _ => *byte = (index.wrapping_mul(2654435761) >> 11) as u8,
        }
    }
    let raw = directory.join("source.raw");
    std::fs::write(&raw, &data).unwrap();
    let vhdx = directory.join("source.vhdx");
    ok(&[
        "image",
        "convert",
        text(&raw),
        text(&vhdx),
        "--block-size",
        "1M",
    ]);
    (vhdx, data)
}

#[test]
fn a_full_export_applied_at_the_other_site_gives_the_same_disk() {
    let directory = tempfile::tempdir().unwrap();
    let (source, data) = disk(directory.path());
    let delta = directory.path().join("initial.delta");
    ok(&["delta", "export", text(&source), text(&delta), "--full"]);
    let inspected: serde_json::Value =
        serde_json::from_str(&ok(&["delta", "inspect", "--json", text(&delta)])).unwrap();
    assert_eq!(inspected["intact"], true);
    assert!(
        inspected["stored_bytes"].as_u64() < inspected["data_bytes"].as_u64(),
        "text did not compress"
    );
    for target in ["replica.vhdx", "replica.raw"] {
        let target = directory.path().join(target);
        ok(&["delta", "apply", text(&delta), text(&target)]);
        let back = directory.path().join("back.raw");
        ok(&["image", "convert", "--force", text(&target), text(&back)]);
        assert!(
            std::fs::read(&back).unwrap() == data,
            "{target:?} differs from the source"
        );
    }
    // The replica keeps the source's disk id, so later deltas fit it.
    let id = |path: &Path| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&ok(&["image", "info", "--json", text(path)]))
            .unwrap()["vhdx"]["disk_id"]
            .clone()
    };
    assert_eq!(id(&source), id(&directory.path().join("replica.vhdx")));
    // Applying again changes nothing.
    ok(&[
        "delta",
        "apply",
        text(&delta),
        text(&directory.path().join("replica.vhdx")),
    ]);
}

#[test]
fn a_damaged_delta_is_reported_and_refused() {
    let directory = tempfile::tempdir().unwrap();
    let (source, _) = disk(directory.path());
    let delta = directory.path().join("initial.delta");
    ok(&["delta", "export", text(&source), text(&delta), "--full"]);
    let target = directory.path().join("replica.vhdx");
    ok(&["delta", "apply", text(&delta), text(&target)]);
    let before = std::fs::read(&target).unwrap();
    let mut bytes = std::fs::read(&delta).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&delta, &bytes).unwrap();
    let inspect = blockrep(&["delta", "inspect", text(&delta)]);
    assert_eq!(inspect.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("DAMAGED"));
    let apply = blockrep(&["delta", "apply", text(&delta), text(&target)]);
    assert_eq!(apply.status.code(), Some(1));
    assert!(
        std::fs::read(&target).unwrap() == before,
        "a refused delta changed the target"
    );
    let fresh = directory.path().join("fresh.vhdx");
    assert_eq!(
        blockrep(&["delta", "apply", text(&delta), text(&fresh)])
            .status
            .code(),
        Some(1)
    );
    assert!(!fresh.exists(), "a refused delta left a new target behind");
}

#[test]
fn a_delta_for_another_disk_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    let (source, _) = disk(directory.path());
    let delta = directory.path().join("initial.delta");
    ok(&["delta", "export", text(&source), text(&delta), "--full"]);
    let other = directory.path().join("other.vhdx");
    ok(&[
        "image",
        "create",
        text(&other),
        "--size",
        &(24 * MIB + 1536).to_string(),
    ]);
    let apply = blockrep(&["delta", "apply", text(&delta), text(&other)]);
    assert_eq!(apply.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&apply.stderr).contains("is for disk"));
}
