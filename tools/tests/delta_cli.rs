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

#[test]
fn an_export_since_the_journal_carries_only_the_tracked_changes() {
    use blockrep::image::{Access, BlockImage, VhdxImage};
    use blockrep::io::{FileStorage, Storage};
    use blockrep::track::{DirtyBitmap, Journal, JournalIdentity, Recovered, TrackedDisk};

    let directory = tempfile::tempdir().unwrap();
    let (source, _) = disk(directory.path());
    let replica = directory.path().join("replica.vhdx");
    let initial = directory.path().join("initial.delta");
    ok(&["delta", "export", text(&source), text(&initial), "--full"]);
    ok(&["delta", "apply", text(&initial), text(&replica)]);

    // An embedder tracks writes to the source with a journal, then shuts down cleanly.
    let journal_path = directory.path().join("source.vhdx.brtrack");
    {
        let image = VhdxImage::open(
            FileStorage::open(&source, true).unwrap(),
            "source",
            Access::ReadWrite,
        )
        .unwrap();
        let identity = JournalIdentity {
            disk_id: image.disk_id(),
            virtual_size: image.virtual_size(),
            granularity: 64 << 10,
            region_size: 64 << 20,
        };
        let storage: Box<dyn Storage> = Box::new(FileStorage::create_new(&journal_path).unwrap());
        let journal = Journal::create(storage, "journal", identity).unwrap();
        let fresh = Recovered {
            dirty: DirtyBitmap::new(image.virtual_size().div_ceil(64 << 10)),
            next_generation: 1,
            after_crash: false,
        };
        let tracked = TrackedDisk::with_journal(image, journal, fresh).unwrap();
        tracked
            .write_at(&[0xAB; 5000], 3 * MIB as u64 + 10)
            .unwrap();
        tracked.zero_range(MIB as u64, 70_000).unwrap();
        tracked.close().unwrap();
    }
    let delta = directory.path().join("changes.delta");
    ok(&[
        "delta",
        "export",
        text(&source),
        text(&delta),
        "--since",
        text(&journal_path),
    ]);
    let inspected: serde_json::Value =
        serde_json::from_str(&ok(&["delta", "inspect", "--json", text(&delta)])).unwrap();
    assert_eq!(inspected["header"]["full"], false);
    let covered =
        inspected["data_bytes"].as_u64().unwrap() + inspected["zero_bytes"].as_u64().unwrap();
    assert!(
        covered <= 3 * (64 << 10),
        "the delta holds more than the tracked blocks: {covered}"
    );
    ok(&["delta", "apply", text(&delta), text(&replica)]);
    // The same delta of changes again is out of sequence.
    let again = blockrep(&["delta", "apply", text(&delta), text(&replica)]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains("does not follow the last applied sequence")
    );
    let (from_source, from_replica) = (
        directory.path().join("a.raw"),
        directory.path().join("b.raw"),
    );
    ok(&["image", "convert", text(&source), text(&from_source)]);
    ok(&["image", "convert", text(&replica), text(&from_replica)]);
    assert!(std::fs::read(&from_source).unwrap() == std::fs::read(&from_replica).unwrap());
    // A journal that is not one is "tracking lost", with a non-zero exit.
    std::fs::write(&journal_path, b"garbage").unwrap();
    let lost = blockrep(&[
        "delta",
        "export",
        text(&source),
        text(&directory.path().join("x.delta")),
        "--since",
        text(&journal_path),
    ]);
    assert_eq!(lost.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&lost.stderr).contains("tracking lost: resynchronization required")
    );
}
