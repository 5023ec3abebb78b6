//! Output files that appear whole or not at all: work goes into a hidden temporary file beside
//! the target, which is renamed over it only once complete and flushed. A failure (or a panic)
//! removes the temporary file, so no half-written image is ever left under the target's name.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

pub struct OutputFile {
    temporary: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl OutputFile {
    /// Starts a new output at `target`; refuses an existing target unless `overwrite`.
    pub fn create(target: &Path, overwrite: bool) -> io::Result<(Self, File)> {
        if !overwrite && target.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} already exists (use --force to replace it)",
                    target.display()
                ),
            ));
        }
        let file_name = target.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "output path has no file name")
        })?;
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(file_name);
        temporary_name.push(format!(".blockrep-{}.partial", std::process::id()));
        let temporary = target.with_file_name(temporary_name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temporary)
            .map_err(|error| {
                io::Error::new(error.kind(), format!("{}: {error}", temporary.display()))
            })?;
        Ok((
            OutputFile {
                temporary,
                target: target.to_owned(),
                committed: false,
            },
            file,
        ))
    }

    /// The name to use in messages while the output is being written.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Puts the finished (and already flushed) output in place.
    pub fn commit(mut self) -> io::Result<()> {
        std::fs::rename(&self.temporary, &self.target)?;
        self.committed = true;
        // The rename itself is durable once the directory is flushed.
        let directory = self
            .target
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty());
        if let Ok(directory) = File::open(directory.unwrap_or(Path::new("."))) {
            let _ = directory.sync_all();
        }
        Ok(())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}
