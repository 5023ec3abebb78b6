//! Running one timed step: a command (wall time and peak memory from `wait4`) or the in-process
//! O_DIRECT baseline. Before each run the output is removed and dirty data is written back, so
//! no step pays for another's writeback.

use memmap2::MmapMut;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub seconds: f64,
    /// Peak resident memory of the command, when it ran as its own process.
    pub peak_memory: Option<u64>,
}

pub enum Action {
    /// Copy `source` to the output with a plain O_DIRECT pwrite loop; with `skip_zeros`, leave
    /// all-zero chunks as holes (the writes a sparse-aware tool cannot avoid).
    Baseline { source: PathBuf, skip_zeros: bool },
    /// Run a command.
    Command(Vec<String>),
}

pub struct Step {
    pub name: &'static str,
    pub action: Action,
    /// The file the step reads: cold steps find it out of the page cache, warm ones in it.
    pub input: PathBuf,
    pub output: PathBuf,
}

impl Step {
    pub fn baseline(name: &'static str, source: &str, output: &str, skip_zeros: bool) -> Self {
        Step {
            name,
            action: Action::Baseline {
                source: source.into(),
                skip_zeros,
            },
            input: source.into(),
            output: output.into(),
        }
    }

    pub fn command(name: &'static str, command: Vec<String>, input: &str, output: &str) -> Self {
        Step {
            name,
            action: Action::Command(command),
            input: input.into(),
            output: output.into(),
        }
    }

    pub fn measure(&self, cold: bool) -> io::Result<Sample> {
        match std::fs::remove_file(&self.output) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        // SAFETY: sync has no arguments and cannot fail.
        unsafe { libc::sync() };
        if cold {
            // Every step reads its input from the disk, as a conversion of a real disk would.
            std::fs::write("/proc/sys/vm/drop_caches", "3")?;
        } else {
            // Every step finds its input in the page cache, whoever read it last.
            read_through(&self.input)?;
        }
        match &self.action {
            Action::Baseline { source, skip_zeros } => {
                let started = Instant::now();
                direct_copy(source, &self.output, *skip_zeros)?;
                Ok(Sample {
                    seconds: started.elapsed().as_secs_f64(),
                    peak_memory: None,
                })
            }
            Action::Command(command) => {
                let started = Instant::now();
                let peak_memory = run(command)?;
                // Every line ends with its output durable: qemu-img does not flush by default.
                File::open(&self.output)?.sync_all()?;
                Ok(Sample {
                    seconds: started.elapsed().as_secs_f64(),
                    peak_memory: Some(peak_memory),
                })
            }
        }
    }
}

/// Whether the page cache can be dropped before each step (it takes root).
pub fn cold_cache_possible() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .is_ok()
}

/// Runs a command to completion; returns its peak resident memory in bytes.
fn run(command: &[String]) -> io::Result<u64> {
    let child = std::process::Command::new(&command[0])
        .args(&command[1..])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into the two locals.
    let waited = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if waited < 0 {
        return Err(io::Error::last_os_error());
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(io::Error::other(format!(
            "{command:?} failed (wait status {status})"
        )));
    }
    Ok(usage.ru_maxrss as u64 * 1024)
}

/// The disk's limit for these bytes: read 4 MiB, write it with O_DIRECT, repeat; then sync.
fn direct_copy(source: &Path, target: &Path, skip_zeros: bool) -> io::Result<()> {
    const CHUNK: usize = 4 << 20;
    let input = File::open(source)?;
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(target)?;
    let mut buffer = MmapMut::map_anon(CHUNK)?; // page aligned, as O_DIRECT needs
    let size = input.metadata()?.len();
    let mut offset = 0;
    while offset < size {
        let length = CHUNK.min((size - offset) as usize);
        input.read_exact_at(&mut buffer[..length], offset)?;
        if !(skip_zeros && blockrep::image::is_zero(&buffer[..length])) {
            output.write_all_at(&buffer[..length], offset)?;
        }
        offset += length as u64;
    }
    output.set_len(size)?;
    output.sync_all()
}

/// Reads a whole file, leaving it in the page cache.
pub(crate) fn read_through(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let mut buffer = vec![0u8; 4 << 20];
    let size = file.metadata()?.len();
    let mut offset = 0;
    while offset < size {
        let length = buffer.len().min((size - offset) as usize);
        file.read_exact_at(&mut buffer[..length], offset)?;
        offset += length as u64;
    }
    Ok(())
}

/// True when two files hold the same bytes.
pub fn same_content(first: &Path, second: &Path) -> io::Result<bool> {
    let (first, second) = (File::open(first)?, File::open(second)?);
    let size = first.metadata()?.len();
    if second.metadata()?.len() != size {
        return Ok(false);
    }
    let mut one = vec![0u8; 4 << 20];
    let mut two = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < size {
        let length = one.len().min((size - offset) as usize);
        first.read_exact_at(&mut one[..length], offset)?;
        second.read_exact_at(&mut two[..length], offset)?;
        if one[..length] != two[..length] {
            return Ok(false);
        }
        offset += length as u64;
    }
    Ok(true)
}
