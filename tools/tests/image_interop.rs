//! `blockrep image` against the tools people already trust: qemu-img and qemu-io read what we
//! write, and we read what they write, byte for byte.
//!
//! The qemu tools come from Debian's qemu-utils (the test script installs them). Where they are
//! missing, each test says so and skips, except under CI, where a missing tool is a failure.

mod common;

use blockrep::image::vhdx::{Header, PayloadState};
use common::have_qemu;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn blockrep(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(arguments)
        .output()
        .expect("run blockrep")
}

fn run_ok(program: &str, arguments: &[&str]) -> String {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn blockrep_ok(arguments: &[&str]) -> String {
    let output = blockrep(arguments);
    assert!(
        output.status.success(),
        "blockrep {arguments:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn path(directory: &Path, name: &str) -> PathBuf {
    directory.join(name)
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A disk-like mix, 1 MiB at a time: zeros, random bytes, text, and half-zero chunks.
fn disk_like(size: u64, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut bytes = vec![0u8; size as usize];
    for (index, chunk) in bytes.chunks_mut(MIB as usize).enumerate() {
        match (index as u64 + seed) % 5 {
            0 | 3 => {}
            1 => chunk.iter_mut().for_each(|byte| *byte = random() as u8),
            2 => {
                let line = b"the quick brown fox replicates the lazy disk\n";
                for (position, byte) in chunk.iter_mut().enumerate() {
                    *byte = line[position % line.len()];
                }
            }
            _ => {
                let half = chunk.len() / 2;
                chunk[half..]
                    .iter_mut()
                    .for_each(|byte| *byte = random() as u8);
            }
        }
    }
    bytes
}

/// What qemu reads from a VHDX image, written out as raw.
fn qemu_to_raw(vhdx: &Path, raw: &Path) {
    let _ = std::fs::remove_file(raw);
    run_ok(
        "qemu-img",
        &["convert", "-f", "vhdx", "-O", "raw", text(vhdx), text(raw)],
    );
}

fn qemu_virtual_size(image: &Path) -> u64 {
    let json = run_ok("qemu-img", &["info", "--output=json", text(image)]);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["virtual-size"].as_u64().unwrap()
}

fn info_json(image: &Path) -> serde_json::Value {
    serde_json::from_str(&blockrep_ok(&["image", "info", "--json", text(image)])).unwrap()
}

#[test]
fn created_images_pass_qemu_img_check_and_show_their_size() {
    if !have_qemu("created_images_pass_qemu_img_check_and_show_their_size") {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    let sizes = [("100M", 100 * MIB), ("70001152", 70_001_152)];
    for (block, fixed) in [("1M", false), ("8M", true), ("32M", false), ("256M", false)] {
        for (size_text, size) in sizes {
            let image = path(
                directory.path(),
                &format!("new-{block}-{fixed}-{size}.vhdx"),
            );
            let mut arguments = vec![
                "image",
                "create",
                text(&image),
                "--size",
                size_text,
                "--block-size",
                block,
            ];
            if fixed {
                arguments.push("--fixed");
            }
            blockrep_ok(&arguments);
            run_ok("qemu-img", &["check", text(&image)]);
            assert_eq!(qemu_virtual_size(&image), size, "{image:?}");
            let info = info_json(&image);
            assert_eq!(
                info["vhdx"]["subformat"],
                if fixed { "fixed" } else { "dynamic" }
            );
        }
    }
}

#[test]
fn converted_images_give_back_the_same_bytes_through_qemu_img() {
    if !have_qemu("converted_images_give_back_the_same_bytes_through_qemu_img") {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    for (size, seed) in [(24 * MIB + 3 * 512, 1u64), (40 * MIB, 2)] {
        let source = path(directory.path(), &format!("source-{seed}.raw"));
        let original = disk_like(size, seed);
        std::fs::write(&source, &original).unwrap();
        for (block, fixed) in [
            ("1M", false),
            ("2M", true),
            ("4M", false),
            ("32M", false),
            ("32M", true),
        ] {
            let vhdx = path(
                directory.path(),
                &format!("out-{seed}-{block}-{fixed}.vhdx"),
            );
            let mut arguments = vec![
                "image",
                "convert",
                text(&source),
                text(&vhdx),
                "--block-size",
                block,
            ];
            if fixed {
                arguments.push("--fixed");
            }
            blockrep_ok(&arguments);
            run_ok("qemu-img", &["check", text(&vhdx)]);
            let through_qemu = path(directory.path(), "qemu.raw");
            qemu_to_raw(&vhdx, &through_qemu);
            assert!(
                std::fs::read(&through_qemu).unwrap() == original,
                "qemu reads {vhdx:?} differently"
            );
            let back = path(directory.path(), "back.raw");
            blockrep_ok(&["image", "convert", "--force", text(&vhdx), text(&back)]);
            assert!(
                std::fs::read(&back).unwrap() == original,
                "blockrep reads {vhdx:?} differently"
            );
            if !fixed {
                // Zero ranges stay unallocated: exactly the blocks with a non-zero byte are stored.
                let block_size = blockrep::units::parse_size(block).unwrap() as usize;
                let stored = original
                    .chunks(block_size)
                    .filter(|chunk| chunk.iter().any(|&b| b != 0))
                    .count();
                assert_eq!(
                    info_json(&vhdx)["vhdx"]["allocated_blocks"],
                    stored as u64,
                    "{vhdx:?}"
                );
            }
        }
    }
}

#[test]
fn what_qemu_io_writes_reads_back_identically() {
    if !have_qemu("what_qemu_io_writes_reads_back_identically") {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    for block_option in ["block_size=1048576", "block_size=33554432"] {
        let image = path(directory.path(), "qemu.vhdx");
        let _ = std::fs::remove_file(&image);
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vhdx",
                "-o",
                block_option,
                text(&image),
                "100M",
            ],
        );
        for command in [
            "write -P 0xaa 0 64k",
            "write -P 0x55 1044480 8192", // across the first 1 MiB boundary
            "write -P 0x3c 33550336 8192", // across the first 32 MiB boundary
            "write -P 0x11 40M 3M",
            "write -z 41M 512k",            // zeros inside written data
            "write -z 60M 1M",              // zeros where nothing was written
            "write -P 0x77 104853504 4096", // the last 4 KiB of the disk
        ] {
            run_ok("qemu-io", &["-f", "vhdx", "-c", command, text(&image)]);
        }
        let by_qemu = path(directory.path(), "by-qemu.raw");
        let by_us = path(directory.path(), "by-us.raw");
        qemu_to_raw(&image, &by_qemu);
        blockrep_ok(&["image", "convert", "--force", text(&image), text(&by_us)]);
        let ours = std::fs::read(&by_us).unwrap();
        assert!(
            ours == std::fs::read(&by_qemu).unwrap(),
            "{block_option}: contents differ"
        );
        assert!(ours[..65536].iter().all(|&b| b == 0xaa));
        blockrep_ok(&["image", "check", text(&image)]);
    }
}

/// Reads the current header of a VHDX file and the slot it is in.
fn current_header(bytes: &[u8]) -> (usize, Header) {
    [64usize << 10, 128 << 10]
        .into_iter()
        .filter_map(|offset| {
            Header::decode(&bytes[offset..offset + 4096])
                .ok()
                .map(|header| (offset, header))
        })
        .max_by_key(|(_, header)| header.sequence)
        .unwrap()
}

#[test]
fn a_log_left_by_qemu_is_applied_when_read_and_replayed_by_repair() {
    if !have_qemu("a_log_left_by_qemu_is_applied_when_read_and_replayed_by_repair") {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    let image = path(directory.path(), "crashed.vhdx");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "vhdx", text(&image), "64M"],
    );
    // qemu logs the BAT update of a first write to a block; `abort` kills it right after.
    let status = Command::new("qemu-io")
        .args([
            "-f",
            "vhdx",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "abort",
            text(&image),
        ])
        .output()
        .unwrap()
        .status;
    assert!(!status.success(), "qemu-io was expected to abort");
    // Recreate the moment before qemu wrote the logged BAT sector in place: point the header at
    // the log entry and undo the in-place BAT write.
    let mut bytes = std::fs::read(&image).unwrap();
    let (slot, header) = current_header(&bytes);
    let log = header.log_offset as usize;
    assert_eq!(&bytes[log..log + 4], b"loge", "qemu left no log entry");
    let log_guid = uuid::Uuid::from_bytes_le(bytes[log + 32..log + 48].try_into().unwrap());
    let logged_sector =
        u64::from_le_bytes(bytes[log + 64 + 16..log + 64 + 24].try_into().unwrap()) as usize;
    let entry = u64::from_le_bytes(bytes[logged_sector..logged_sector + 8].try_into().unwrap());
    assert!(matches!(
        PayloadState::decode(entry),
        Ok(PayloadState::FullyPresent { .. })
    ));
    bytes[logged_sector..logged_sector + 4096].fill(0);
    let other = if slot == 64 << 10 {
        128 << 10
    } else {
        64 << 10
    };
    let dirty = Header {
        sequence: header.sequence + 1,
        log_guid,
        ..header
    };
    bytes[other..other + 4096].copy_from_slice(&dirty.encode());
    std::fs::write(&image, &bytes).unwrap();

    // Read-only: the data is there through the log, and the file is untouched.
    let raw = path(directory.path(), "read.raw");
    blockrep_ok(&["image", "convert", text(&image), text(&raw)]);
    assert!(
        std::fs::read(&raw).unwrap()[..65536]
            .iter()
            .all(|&b| b == 0xab)
    );
    assert!(std::fs::read(&image).unwrap() == bytes);
    let check = blockrep(&["image", "check", text(&image)]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stdout).contains("must be replayed"));

    // Repair replays it; then qemu itself reads the data.
    blockrep_ok(&["image", "check", "--repair", text(&image)]);
    run_ok("qemu-img", &["check", text(&image)]);
    let through_qemu = path(directory.path(), "qemu.raw");
    qemu_to_raw(&image, &through_qemu);
    assert!(
        std::fs::read(&through_qemu).unwrap()[..65536]
            .iter()
            .all(|&b| b == 0xab)
    );
}
