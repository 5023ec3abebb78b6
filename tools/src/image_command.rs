//! `blockrep image`: create, info, check and convert.

use crate::output_file::OutputFile;
use blockrep::image::vhdx::{self, BlockSize, SectorSize, VhdxCreateOptions};
use blockrep::image::{
    Access, BlockImage, ImageFormat, RawImage, VhdxImage, copy_image, open_path,
};
use blockrep::io::{FileStorage, IoEngine, Storage, StorageOptions, file_storage};
use blockrep::units::{format_size, parse_size};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

type Outcome = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Create an empty image: VHDX (dynamic or fixed) or raw, chosen by the file's extension.
    Create {
        /// The file to create (.vhdx for VHDX; .raw, .img or .bin for raw).
        file: PathBuf,
        /// Virtual disk size, for example 10G.
        #[arg(long, value_parser = size_argument)]
        size: u64,
        /// Format, when the extension does not say.
        #[arg(long, value_enum)]
        format: Option<FormatArgument>,
        #[command(flatten)]
        vhdx: VhdxOptions,
        #[command(flatten)]
        io: IoOptions,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Show an image's format, sizes and allocation.
    Info {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check a VHDX image's structures; exit 0 when clean, 1 with a list of problems otherwise.
    Check {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Replay a log left by a writer that crashed, then check again.
        #[arg(long)]
        repair: bool,
    },
    /// Convert between raw and VHDX. Zero ranges stay unallocated in the output.
    Convert {
        /// The image to read.
        input: PathBuf,
        /// The image to write; it appears only once complete.
        output: PathBuf,
        /// Input format (default: VHDX when the file says so or is named .vhdx, else raw).
        #[arg(long, value_enum)]
        from: Option<FormatArgument>,
        /// Output format (default: from the output's extension).
        #[arg(long, value_enum)]
        to: Option<FormatArgument>,
        #[command(flatten)]
        vhdx: VhdxOptions,
        #[command(flatten)]
        io: IoOptions,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
    },
}

/// How an output image's bytes reach the disk.
#[derive(Args)]
pub struct IoOptions {
    /// I/O engine for the output: io_uring when the kernel allows it (auto), always io_uring
    /// (uring), or portable pread/pwrite (sync).
    #[arg(long, value_enum, default_value = "auto")]
    io: IoArgument,
    /// With io_uring, write through the page cache. By default aligned data goes to the disk
    /// with O_DIRECT, which is faster and leaves the page cache to what will be read again.
    #[arg(long)]
    page_cache: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum IoArgument {
    Auto,
    Uring,
    Sync,
}

impl IoOptions {
    fn storage(&self, file: std::fs::File, name: &str) -> Result<Box<dyn Storage>, String> {
        let engine = match self.io {
            IoArgument::Auto => IoEngine::Auto,
            IoArgument::Uring => IoEngine::Uring,
            IoArgument::Sync => IoEngine::Sync,
        };
        file_storage(
            file,
            &StorageOptions {
                engine,
                direct: !self.page_cache,
                layer: None,
            },
        )
        .map_err(|error| format!("{name}: {error}"))
    }
}

/// Options for VHDX images being made.
#[derive(Args)]
pub struct VhdxOptions {
    /// VHDX block size: a power of two from 1M to 256M.
    #[arg(long, value_parser = block_size_argument, default_value = "32M")]
    block_size: BlockSize,
    /// Allocate every block up front (the fixed subformat).
    #[arg(long)]
    fixed: bool,
    /// Logical sector size (qemu reads only 512).
    #[arg(long, value_parser = sector_argument, default_value = "512")]
    logical_sector: SectorSize,
    /// Physical sector size.
    #[arg(long, value_parser = sector_argument, default_value = "4096")]
    physical_sector: SectorSize,
}

impl VhdxOptions {
    fn for_size(&self, virtual_size: u64) -> VhdxCreateOptions {
        VhdxCreateOptions {
            virtual_size,
            block_size: self.block_size,
            fixed: self.fixed,
            logical_sector_size: self.logical_sector,
            physical_sector_size: self.physical_sector,
            disk_id: None,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArgument {
    Raw,
    Vhdx,
}

impl From<FormatArgument> for ImageFormat {
    fn from(argument: FormatArgument) -> Self {
        match argument {
            FormatArgument::Raw => ImageFormat::Raw,
            FormatArgument::Vhdx => ImageFormat::Vhdx,
        }
    }
}

fn size_argument(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|error| error.to_string())
}

fn block_size_argument(text: &str) -> Result<BlockSize, String> {
    BlockSize::new(size_argument(text)?)
}

fn sector_argument(text: &str) -> Result<SectorSize, String> {
    SectorSize::new(size_argument(text)?)
}

pub fn run(command: ImageCommand) -> Outcome {
    match command {
        ImageCommand::Create {
            file,
            size,
            format,
            vhdx,
            io,
            force,
        } => create(&file, size, format, &vhdx, &io, force),
        ImageCommand::Info { file, json } => info(&file, json),
        ImageCommand::Check { file, json, repair } => check(&file, json, repair),
        ImageCommand::Convert {
            input,
            output,
            from,
            to,
            vhdx,
            io,
            force,
        } => convert(&input, &output, from, to, &vhdx, &io, force),
    }
}

fn output_format(
    path: &Path,
    chosen: Option<FormatArgument>,
    flag: &str,
) -> Result<ImageFormat, String> {
    chosen
        .map(ImageFormat::from)
        .or_else(|| ImageFormat::from_extension(path))
        .ok_or_else(|| {
            format!(
                "cannot tell the format of {} from its name: name it .vhdx or .raw, or pass {flag} raw|vhdx",
                path.display()
            )
        })
}

/// The format of an existing image: as told, else VHDX when named .vhdx or when the content
/// starts with the VHDX signature, else raw.
fn input_format(
    path: &Path,
    chosen: Option<FormatArgument>,
) -> Result<ImageFormat, Box<dyn std::error::Error>> {
    if let Some(chosen) = chosen {
        return Ok(chosen.into());
    }
    if ImageFormat::from_extension(path) == Some(ImageFormat::Vhdx) {
        return Ok(ImageFormat::Vhdx);
    }
    let storage = FileStorage::open(path, false)
        .map_err(|error| format!("{}: cannot open: {error}", path.display()))?;
    Ok(ImageFormat::detect(&storage).map_err(|error| format!("{}: {error}", path.display()))?)
}

/// Makes a new image of `format` in `storage`.
fn create_image(
    storage: Box<dyn Storage>,
    name: &str,
    format: ImageFormat,
    virtual_size: u64,
    vhdx: &VhdxOptions,
) -> blockrep::Result<Box<dyn BlockImage>> {
    Ok(match format {
        ImageFormat::Raw => Box::new(RawImage::create(storage, name, virtual_size)?),
        ImageFormat::Vhdx => Box::new(VhdxImage::create(
            storage,
            name,
            &vhdx.for_size(virtual_size),
        )?),
    })
}

fn describe(format: ImageFormat, vhdx: &VhdxOptions) -> String {
    match format {
        ImageFormat::Raw => "raw".into(),
        ImageFormat::Vhdx => format!(
            "vhdx, {}, {} blocks, {}-byte sectors",
            if vhdx.fixed { "fixed" } else { "dynamic" },
            format_size(vhdx.block_size.bytes()),
            vhdx.logical_sector.bytes()
        ),
    }
}

fn create(
    file: &Path,
    size: u64,
    format: Option<FormatArgument>,
    vhdx: &VhdxOptions,
    io: &IoOptions,
    force: bool,
) -> Outcome {
    let format = output_format(file, format, "--format")?;
    let (output, handle) = OutputFile::create(file, force)?;
    let name = output.target().display().to_string();
    let storage = io.storage(handle, &name)?;
    let mut image = create_image(storage, &name, format, size, vhdx)?;
    image.flush()?;
    drop(image);
    output.commit()?;
    println!(
        "created {} ({}, {})",
        file.display(),
        describe(format, vhdx),
        format_size(size)
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct InfoReport {
    file: String,
    format: ImageFormat,
    virtual_size: u64,
    allocated_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    vhdx: Option<vhdx::VhdxInfo>,
}

fn info(file: &Path, json: bool) -> Outcome {
    let format = input_format(file, None)?;
    let name = file.display().to_string();
    let storage =
        FileStorage::open(file, false).map_err(|error| format!("{name}: cannot open: {error}"))?;
    let (image, vhdx): (Box<dyn BlockImage>, _) = match format {
        ImageFormat::Raw => (
            Box::new(RawImage::open(storage, &name, Access::ReadOnly)?),
            None,
        ),
        ImageFormat::Vhdx => {
            let image = VhdxImage::open(storage, &name, Access::ReadOnly)?;
            let info = image.info();
            (Box::new(image), Some(info))
        }
    };
    let allocated_bytes = image
        .allocated_ranges()?
        .iter()
        .map(|range| range.end - range.start)
        .sum();
    let report = InfoReport {
        file: name,
        format,
        virtual_size: image.virtual_size(),
        allocated_bytes,
        vhdx,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("file:              {}", report.file);
    println!("format:            {}", report.format);
    println!("virtual size:      {}", size_and_bytes(report.virtual_size));
    println!(
        "allocated:         {}",
        size_and_bytes(report.allocated_bytes)
    );
    if let Some(vhdx) = &report.vhdx {
        println!("subformat:         {}", vhdx.subformat);
        println!("block size:        {}", format_size(vhdx.block_size));
        println!(
            "blocks:            {} allocated of {}",
            vhdx.allocated_blocks, vhdx.block_count
        );
        println!("logical sector:    {} bytes", vhdx.logical_sector_size);
        println!("physical sector:   {} bytes", vhdx.physical_sector_size);
        println!("disk id:           {}", vhdx.disk_id);
        println!("file size:         {}", size_and_bytes(vhdx.file_size));
        println!("header sequence:   {}", vhdx.header_sequence);
        println!("creator:           {}", vhdx.creator);
        if vhdx.log_pending_replay {
            println!(
                "log:               awaiting replay (applied in memory for reading; `blockrep image check --repair` replays it)"
            );
        } else {
            println!("log:               clean");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `64 MiB (67108864 bytes)`.
fn size_and_bytes(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_size(bytes))
}

fn check(file: &Path, json: bool, repair: bool) -> Outcome {
    let name = file.display().to_string();
    if repair {
        let storage = FileStorage::open(file, true)
            .map_err(|error| format!("{name}: cannot open: {error}"))?;
        let report = vhdx::check(&storage, &name)?;
        if report
            .problems
            .iter()
            .any(|problem| problem.contains("must be replayed"))
        {
            VhdxImage::open(storage, &name, Access::ReadWrite)?.close()?;
            eprintln!("{name}: log replayed");
        }
    }
    let storage =
        FileStorage::open(file, false).map_err(|error| format!("{name}: cannot open: {error}"))?;
    let report = vhdx::check(&storage, &name)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for note in &report.notes {
            println!("note: {note}");
        }
        if report.is_clean() {
            println!("{name}: no problems found");
        } else {
            println!("{name}: {} problem(s) found:", report.problems.len());
            for problem in &report.problems {
                println!("  - {problem}");
            }
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn convert(
    input: &Path,
    output: &Path,
    from: Option<FormatArgument>,
    to: Option<FormatArgument>,
    vhdx: &VhdxOptions,
    io: &IoOptions,
    force: bool,
) -> Outcome {
    let source_format = input_format(input, from)?;
    let target_format = output_format(output, to, "--to")?;
    let source = open_path(input, source_format, Access::ReadOnly)?;
    let virtual_size = source.virtual_size();
    let (pending, handle) = OutputFile::create(output, force)?;
    let name = pending.target().display().to_string();
    let mut target = create_image(
        io.storage(handle, &name)?,
        &name,
        target_format,
        virtual_size,
        vhdx,
    )?;

    let progress = ProgressBar::new(virtual_size);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} converting [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let statistics = copy_image(&*source, &mut *target, true, &mut |done| {
        progress.set_position(done)
    })?;
    progress.finish_and_clear();
    drop(target);
    pending.commit()?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "converted {} ({source_format}, {}) to {} ({}): read {}, wrote {}, in {seconds:.2} s ({}/s)",
        input.display(),
        format_size(virtual_size),
        output.display(),
        describe(target_format, vhdx),
        format_size(statistics.bytes_read),
        format_size(statistics.bytes_written),
        format_size((virtual_size as f64 / seconds.max(1e-9)) as u64),
    );
    Ok(ExitCode::SUCCESS)
}
