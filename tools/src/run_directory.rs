//! The run directory, where daemons put their control sockets. Whoever can create files in it
//! can stand in for a daemon (and hear a failover request), so it is private: a directory, not a
//! symlink, owned by this user, with no group or other bits. A daemon creates it that way; a
//! daemon or a client finding it otherwise refuses it rather than use it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a run directory cannot be used; each names the directory.
#[derive(Debug, thiserror::Error)]
pub enum RunDirectoryError {
    #[error("run directory {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "run directory {path} is a symbolic link; remove it (blockrep makes the directory itself)"
    )]
    SymbolicLink { path: PathBuf },
    #[error("run directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "run directory {path} belongs to user {owner}, not to this user ({user}); remove it or set BLOCKREP_RUN_DIR"
    )]
    OwnedByAnother {
        path: PathBuf,
        owner: u32,
        user: u32,
    },
    #[error(
        "run directory {path} has mode {mode:04o}: others could replace its sockets; make it 0700 (chmod 700)"
    )]
    OpenToOthers { path: PathBuf, mode: u32 },
}

/// Where daemons put their sockets: `$BLOCKREP_RUN_DIR`; else `/run/blockrep` for root; for
/// anyone else `$XDG_RUNTIME_DIR/blockrep` (the user's own runtime directory, which systemd
/// keeps private) when that is set, else `/tmp/blockrep-UID`.
pub fn run_directory() -> PathBuf {
    choose_run_directory(
        std::env::var_os("BLOCKREP_RUN_DIR"),
        std::env::var_os("XDG_RUNTIME_DIR"),
        effective_user(),
    )
}

fn choose_run_directory(
    configured: Option<std::ffi::OsString>,
    runtime: Option<std::ffi::OsString>,
    user: u32,
) -> PathBuf {
    if let Some(directory) = configured {
        return PathBuf::from(directory);
    }
    if user == 0 {
        return PathBuf::from("/run/blockrep");
    }
    match runtime.map(PathBuf::from) {
        Some(runtime) if runtime.is_absolute() => runtime.join("blockrep"),
        _ => PathBuf::from(format!("/tmp/blockrep-{user}")),
    }
}

/// The user this process acts as, who must own the run directory.
pub fn effective_user() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `directory` private to this user when it does not exist (its parents as usual), and
/// checks it as `check_private` does either way.
pub fn prepare_private(directory: &Path) -> Result<(), RunDirectoryError> {
    let unreadable = |source| RunDirectoryError::Unreadable {
        path: directory.to_owned(),
        source,
    };
    if std::fs::symlink_metadata(directory).is_err() {
        if let Some(parent) = directory
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(unreadable)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(directory) {
            // The umask may have taken bits off; it never adds any, so 0700 stands after this.
            Ok(()) => std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700))
                .map_err(unreadable)?,
            // Another daemon made it meanwhile: the check below judges it.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(unreadable(error)),
        }
    }
    check_private(directory)
}

/// Refuses `directory` unless it is a directory (not a symbolic link to one), owned by this
/// user, with no group or other permission bits.
pub fn check_private(directory: &Path) -> Result<(), RunDirectoryError> {
    check_private_for(directory, effective_user())
}

/// `check_private` for the user `user`.
pub fn check_private_for(directory: &Path, user: u32) -> Result<(), RunDirectoryError> {
    let path = directory.to_owned();
    let metadata = match std::fs::symlink_metadata(directory) {
        Ok(metadata) => metadata,
        Err(source) => return Err(RunDirectoryError::Unreadable { path, source }),
    };
    if metadata.file_type().is_symlink() {
        return Err(RunDirectoryError::SymbolicLink { path });
    }
    if !metadata.is_dir() {
        return Err(RunDirectoryError::NotADirectory { path });
    }
    if metadata.uid() != user {
        return Err(RunDirectoryError::OwnedByAnother {
            path,
            owner: metadata.uid(),
            user,
        });
    }
    let mode = metadata.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(RunDirectoryError::OpenToOthers { path, mode });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_missing_run_directory_is_made_private_and_then_accepted() {
        let directory = tempfile::tempdir().unwrap();
        let run = directory.path().join("deeper/run");
        prepare_private(&run).unwrap();
        let metadata = std::fs::symlink_metadata(&run).unwrap();
        assert_eq!(metadata.mode() & 0o777, 0o700);
        assert_eq!(metadata.uid(), effective_user());
        prepare_private(&run).unwrap();
    }

    #[test]
    fn a_run_directory_with_group_or_other_bits_is_refused_with_its_mode() {
        let directory = tempfile::tempdir().unwrap();
        for mode in [0o750, 0o705, 0o1777] {
            set_mode(directory.path(), mode);
            let error = prepare_private(directory.path()).unwrap_err();
            assert!(
                matches!(error, RunDirectoryError::OpenToOthers { .. }),
                "{error}"
            );
            let message = error.to_string();
            assert!(
                message.contains(&format!("{mode:04o}"))
                    && message.contains(&directory.path().display().to_string()),
                "{message}"
            );
        }
        set_mode(directory.path(), 0o700);
        check_private(directory.path()).unwrap();
    }

    #[test]
    fn a_run_directory_owned_by_another_user_is_refused_naming_the_owner() {
        let directory = tempfile::tempdir().unwrap();
        // Tests run as root, who may give the directory away; otherwise it is judged as
        // another user would find it.
        let (path, user) = if effective_user() == 0 {
            std::os::unix::fs::chown(directory.path(), Some(65534), Some(65534)).unwrap();
            (directory.path(), 0)
        } else {
            (directory.path(), effective_user() + 1)
        };
        let error = check_private_for(path, user).unwrap_err();
        assert!(
            matches!(error, RunDirectoryError::OwnedByAnother { .. }),
            "{error}"
        );
        if effective_user() == 0 {
            let error = prepare_private(path).unwrap_err().to_string();
            assert!(error.contains("belongs to user 65534"), "{error}");
        }
    }

    #[test]
    fn a_symbolic_link_as_run_directory_is_refused_even_to_a_private_directory() {
        let directory = tempfile::tempdir().unwrap();
        let target = directory.path().join("target");
        std::fs::create_dir(&target).unwrap();
        set_mode(&target, 0o700);
        let link = directory.path().join("run");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let error = prepare_private(&link).unwrap_err();
        assert!(
            matches!(error, RunDirectoryError::SymbolicLink { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("symbolic link"), "{error}");
        let file = directory.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let error = check_private(&file).unwrap_err();
        assert!(
            matches!(error, RunDirectoryError::NotADirectory { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_user_gets_their_runtime_directory_else_one_in_tmp_and_root_gets_run() {
        let some = |text: &str| Some(std::ffi::OsString::from(text));
        assert_eq!(
            choose_run_directory(some("/srv/run"), some("/run/user/1000"), 1000),
            PathBuf::from("/srv/run")
        );
        assert_eq!(
            choose_run_directory(None, some("/run/user/1000"), 1000),
            PathBuf::from("/run/user/1000/blockrep")
        );
        assert_eq!(
            choose_run_directory(None, None, 1000),
            PathBuf::from("/tmp/blockrep-1000")
        );
        assert_eq!(
            choose_run_directory(None, some("relative"), 1000),
            PathBuf::from("/tmp/blockrep-1000")
        );
        assert_eq!(
            choose_run_directory(None, some("/run/user/0"), 0),
            PathBuf::from("/run/blockrep")
        );
    }
}
