//! Changes to names in directories (create, rename, remove, and the flush that makes them
//! durable), made through the storage options. A store's bytes pass through the storage layer;
//! these changes do not, so each asks the layer's power check first: after the simulator cuts a
//! host's power mid-operation, the rest of that operation changes nothing on its disk, as on a
//! real host that stopped there. In the daemons there is no check and each is the plain call.

use super::StorageOptions;
use std::io;
use std::path::Path;

impl StorageOptions {
    /// Fails when the host lost power (the simulator's crash); always passes in the daemons.
    pub fn powered(&self) -> io::Result<()> {
        match self.layer.as_ref().and_then(|layer| layer.power.as_ref()) {
            Some(check) => check(),
            None => Ok(()),
        }
    }

    /// Opens `path` for reading and writing, creating it (emptied first when `truncate`).
    pub(crate) fn create_file(&self, path: &Path, truncate: bool) -> io::Result<std::fs::File> {
        self.powered()?;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .open(path)
    }

    /// Removes a file; one that is not there is fine.
    pub(crate) fn remove_if_present(&self, path: &Path) -> crate::Result<()> {
        self.powered()
            .map_err(|error| crate::Error::file(&path.display().to_string(), "remove", error))?;
        super::remove_if_present(path)
    }

    pub(crate) fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.powered()?;
        std::fs::create_dir_all(path)
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.powered()?;
        std::fs::rename(from, to)
    }

    pub(crate) fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.powered()?;
        std::fs::remove_file(path)
    }

    pub(crate) fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.powered()?;
        std::fs::remove_dir(path)
    }

    pub(crate) fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.powered()?;
        std::fs::remove_dir_all(path)
    }

    /// Flushes `directory`, so that the names created, renamed or removed in it are durable.
    pub(crate) fn sync_directory(&self, directory: &Path) -> crate::Result<()> {
        self.powered().map_err(|error| {
            crate::Error::file(&directory.display().to_string(), "flush directory", error)
        })?;
        super::sync_directory(directory)
    }

    /// Replaces `path` with `bytes` atomically: written beside it as `temporary`, flushed, then
    /// renamed over it (the caller flushes the directory). A crash leaves the old file or the
    /// new one, never a mix.
    pub(crate) fn replace_file(
        &self,
        path: &Path,
        temporary: &Path,
        bytes: &[u8],
    ) -> io::Result<()> {
        self.powered()?;
        let mut file = std::fs::File::create(temporary)?;
        std::io::Write::write_all(&mut file, bytes)?;
        self.powered()?;
        file.sync_all()?;
        self.rename(temporary, path)
    }
}
