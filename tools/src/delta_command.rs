//! `blockrep delta`: deltas on offline media, as Hyper-V's initial replication using external
//! media: export a disk (or its changes) to a file, carry it, apply it at the replica site.

use crate::output_file::OutputFile;
use blockrep::delta::{
    DeltaHeader, DeltaSummary, TargetState, apply_delta, encode_delta, verify_delta,
};
use blockrep::image::vhdx::{BlockSize, SectorSize, VhdxCreateOptions};
use blockrep::image::{Access, BlockImage, ImageFormat, RawImage, VhdxImage};
use blockrep::io::FileStorage;
use blockrep::track::{Cut, DEFAULT_GRANULARITY, Journal, JournalIdentity};
use blockrep::units::format_size;
use clap::Subcommand;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

type Outcome = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Subcommand)]
pub enum DeltaCommand {
    /// Write a delta of IMAGE: every allocated block (--full, initial replication on external
    /// media) or the blocks its tracking journal marks as changed (--since JOURNAL).
    Export {
        image: PathBuf,
        /// The delta file to write; it appears only once complete.
        output: PathBuf,
        /// Export the whole disk.
        #[arg(long, required_unless_present = "since", conflicts_with = "since")]
        full: bool,
        /// Export only what the tracking journal of IMAGE marks as not yet acknowledged.
        #[arg(long, value_name = "JOURNAL")]
        since: Option<PathBuf>,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Verify a delta completely, then apply it to TARGET. A TARGET that does not exist is
    /// created (VHDX or raw, by its extension) with the delta's disk id and size. The sequence
    /// applied is remembered in TARGET.applied; a delta of changes that does not come after it
    /// is refused.
    Apply { delta: PathBuf, target: PathBuf },
    /// Show a delta's header and contents and check its integrity (exit 1 if damaged).
    Inspect {
        delta: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: DeltaCommand) -> Outcome {
    match command {
        DeltaCommand::Export {
            image,
            output,
            full: _,
            since,
            force,
        } => export(&image, &output, since.as_deref(), force),
        DeltaCommand::Apply { delta, target } => apply(&delta, &target),
        DeltaCommand::Inspect { delta, json } => inspect(&delta, json),
    }
}

/// Opens an existing image by its content; returns it with its disk id (nil for raw).
fn open_image(
    path: &Path,
    access: Access,
) -> Result<(Box<dyn BlockImage>, uuid::Uuid), Box<dyn std::error::Error>> {
    let name = path.display().to_string();
    let storage = FileStorage::open(path, access == Access::ReadWrite)
        .map_err(|error| format!("{name}: cannot open: {error}"))?;
    let vhdx = ImageFormat::from_extension(path) == Some(ImageFormat::Vhdx)
        || ImageFormat::detect(&storage)? == ImageFormat::Vhdx;
    Ok(if vhdx {
        let image = VhdxImage::open(storage, &name, access)?;
        let disk_id = image.disk_id();
        (Box::new(image), disk_id)
    } else {
        (
            Box::new(RawImage::open(storage, &name, access)?),
            uuid::Uuid::nil(),
        )
    })
}

/// The changes a journal records for `image` as not yet acknowledged, as a cut of its latest
/// generation. The journal is left clean, holding the same changes (exporting forgets none).
fn journal_changes(
    journal_path: &Path,
    image: &dyn BlockImage,
    disk_id: uuid::Uuid,
) -> Result<Cut, Box<dyn std::error::Error>> {
    let name = journal_path.display().to_string();
    let storage: Box<dyn blockrep::io::Storage> =
        Box::new(FileStorage::open(journal_path, true).map_err(|error| {
            format!("{name}: tracking lost: resynchronization required (journal missing: {error})")
        })?);
    // A running `protect` holds the journal: reading and closing it under it would undo it.
    let _lock = blockrep::io::FileLock::open(journal_path)?;
    let stored = Journal::stored_identity(&storage, &name)?;
    let identity = JournalIdentity {
        disk_id,
        virtual_size: image.virtual_size(),
        ..stored
    };
    // A disk changed since tracking last saw it is refused here: its journal no longer says
    // what changed.
    let stamp = image.content_stamp()?;
    let (journal, recovered) = Journal::open(storage, &name, identity, &stamp)?;
    let generation = recovered.next_generation - 1;
    journal.close(&recovered.dirty, generation, stamp)?;
    Ok(Cut {
        generation,
        granularity: identity.granularity,
        virtual_size: identity.virtual_size,
        bitmap: recovered.dirty,
    })
}

fn export(image_path: &Path, output: &Path, since: Option<&Path>, force: bool) -> Outcome {
    let (image, disk_id) = open_image(image_path, Access::ReadOnly)?;
    let (extents, generation, granularity) = match since {
        Some(journal) => {
            let cut = journal_changes(journal, &*image, disk_id)?;
            (cut.extents(), cut.generation, cut.granularity)
        }
        None => (image.allocated_ranges()?, 0, DEFAULT_GRANULARITY),
    };
    let header = DeltaHeader {
        disk_id,
        virtual_size: image.virtual_size(),
        block_size: granularity as u32,
        source_generation: generation,
        sequence: generation,
        recovery_point: true,
        full: since.is_none(),
    };
    let (pending, file) = OutputFile::create(output, force)?;
    let name = pending.target().display().to_string();
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let statistics = encode_delta(&*image, &extents, &header, &mut writer, &name)?;
    let file = writer
        .into_inner()
        .map_err(|error| format!("{name}: {}", error.error()))?;
    file.sync_all()?;
    pending.commit()?;
    println!(
        "exported {} ({}) to {}: {} data in {} extents, {} zeros in {} extents, delta {}",
        image_path.display(),
        format_size(header.virtual_size),
        output.display(),
        format_size(statistics.data_bytes),
        statistics.data_records,
        format_size(statistics.zero_bytes),
        statistics.zero_records,
        format_size(statistics.delta_bytes),
    );
    Ok(ExitCode::SUCCESS)
}

fn open_delta(path: &Path) -> Result<BufReader<File>, String> {
    File::open(path)
        .map(|file| BufReader::with_capacity(1 << 20, file))
        .map_err(|error| format!("{}: cannot open: {error}", path.display()))
}

fn apply(delta: &Path, target: &Path) -> Outcome {
    let name = delta.display().to_string();
    if target.exists() {
        let (mut image, disk_id) = open_image(target, Access::ReadWrite)?;
        let state = TargetState {
            disk_id: (!disk_id.is_nil()).then_some(disk_id),
            last_sequence: read_applied_sequence(target)?,
        };
        let summary = apply_delta(open_delta(delta)?, &name, &mut *image, state)?;
        drop(image);
        record_applied_sequence(target, summary.header.sequence)?;
        report_applied(&summary, target);
        return Ok(ExitCode::SUCCESS);
    }
    // A new target: made under a temporary name from the delta's own header.
    let header = verify_delta(open_delta(delta)?, &name)?.header;
    let format = ImageFormat::from_extension(target).ok_or_else(|| {
        format!(
            "cannot tell the format of {} from its name: name it .vhdx or .raw",
            target.display()
        )
    })?;
    let (pending, file) = OutputFile::create(target, false)?;
    let target_name = pending.target().display().to_string();
    let storage = FileStorage::from_file(file);
    let mut image: Box<dyn BlockImage> = match format {
        ImageFormat::Raw => Box::new(RawImage::create(
            storage,
            &target_name,
            header.virtual_size,
        )?),
        ImageFormat::Vhdx => Box::new(VhdxImage::create(
            storage,
            &target_name,
            &VhdxCreateOptions {
                virtual_size: header.virtual_size,
                block_size: BlockSize::DEFAULT,
                fixed: false,
                logical_sector_size: SectorSize::Bytes512,
                physical_sector_size: SectorSize::Bytes4096,
                disk_id: (!header.disk_id.is_nil()).then_some(header.disk_id),
            },
        )?),
    };
    let summary = apply_delta(
        open_delta(delta)?,
        &name,
        &mut *image,
        TargetState::default(),
    )?;
    drop(image);
    pending.commit()?;
    record_applied_sequence(target, summary.header.sequence)?;
    report_applied(&summary, target);
    Ok(ExitCode::SUCCESS)
}

/// Where offline `delta apply` remembers the last sequence applied to a target, so that an
/// older delta of changes is refused. (The replica server keeps this in its own catalogue.)
fn sequence_file(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".applied");
    PathBuf::from(name)
}

fn read_applied_sequence(target: &Path) -> Result<Option<u64>, String> {
    match std::fs::read_to_string(sequence_file(target)) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            format!(
                "{}: not a sequence number; remove it to apply any delta",
                sequence_file(target).display()
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(format!("{}: {error}", sequence_file(target).display())),
    }
}

fn record_applied_sequence(target: &Path, sequence: u64) -> std::io::Result<()> {
    let (pending, mut file) = OutputFile::create(&sequence_file(target), true)?;
    use std::io::Write;
    writeln!(file, "{sequence}")?;
    file.sync_all()?;
    pending.commit()
}

fn report_applied(summary: &DeltaSummary, target: &Path) {
    println!(
        "applied delta (sequence {}, {} extents, {} data, {} zeros) to {}",
        summary.header.sequence,
        summary.data_records + summary.zero_records,
        format_size(summary.data_bytes),
        format_size(summary.zero_bytes),
        target.display()
    );
}

fn inspect(delta: &Path, json: bool) -> Outcome {
    let name = delta.display().to_string();
    match verify_delta(open_delta(delta)?, &name) {
        Ok(summary) => {
            if json {
                let mut value = serde_json::to_value(&summary)?;
                value["intact"] = serde_json::Value::Bool(true);
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let header = &summary.header;
                println!("delta:             {name}");
                println!("format version:    {}", blockrep::delta::FORMAT_VERSION);
                println!("disk id:           {}", header.disk_id);
                println!(
                    "virtual size:      {} ({} bytes)",
                    format_size(header.virtual_size),
                    header.virtual_size
                );
                println!(
                    "block size:        {}",
                    format_size(u64::from(header.block_size))
                );
                println!(
                    "kind:              {}",
                    if header.full {
                        "full (initial replication)"
                    } else {
                        "changes"
                    }
                );
                println!("generation:        {}", header.source_generation);
                println!("sequence:          {}", header.sequence);
                println!(
                    "recovery point:    {}",
                    if header.recovery_point { "yes" } else { "no" }
                );
                println!(
                    "extents:           {} data, {} zero",
                    summary.data_records, summary.zero_records
                );
                println!(
                    "data:              {} before compression, {} stored",
                    format_size(summary.data_bytes),
                    format_size(summary.stored_bytes)
                );
                println!("zeros:             {}", format_size(summary.zero_bytes));
                println!("delta size:        {}", format_size(summary.delta_bytes));
                println!("integrity:         intact (every checksum verified, end record present)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error @ blockrep::Error::Delta { .. }) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "intact": false, "problem": error.to_string() })
                );
            } else {
                println!("integrity:         DAMAGED: {error}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(other) => Err(other.into()),
    }
}
