//! Who is on the other end of a control connection (`SO_PEERCRED`, set by the kernel at
//! connect, so a client cannot lie about it), whether that user may talk to a daemon, and
//! whether they could create a path themselves: a daemon running as root must not create files
//! for a requester where the requester could not.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The process at the other end of a unix socket, as the kernel saw it connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Peer {
    /// The credentials of the process connected at `socket`.
    pub fn of(socket: &impl AsRawFd) -> std::io::Result<Peer> {
        let mut credentials = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: the descriptor is a socket we hold; the kernel writes at most `length` bytes
        // into `credentials`, which is a ucred as SO_PEERCRED asks.
        let result = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut credentials).cast(),
                &mut length,
            )
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Peer {
            pid: credentials.pid,
            uid: credentials.uid,
            gid: credentials.gid,
        })
    }
}

/// A user refused by a daemon's control socket.
#[derive(Debug, thiserror::Error)]
#[error(
    "user {uid} may not use this blockrep control socket: only root and the daemon's own user ({daemon}) may"
)]
pub struct PeerRefused {
    pub uid: u32,
    pub daemon: u32,
}

/// Root and the daemon's own user may ask a daemon anything; nobody else may ask it anything.
pub fn admit_peer(uid: u32, daemon: u32) -> Result<(), PeerRefused> {
    if uid == 0 || uid == daemon {
        Ok(())
    } else {
        Err(PeerRefused { uid, daemon })
    }
}

/// Why a requester may not have a path created for them; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum OutputRefused {
    #[error("{path}: give an absolute path without `..`")]
    NotAbsolute { path: PathBuf },
    #[error(
        "{path}: user {uid} may not create it ({directory} is not writable and searchable for them; only the requester's own and primary group's rights count)"
    )]
    NotWritable {
        path: PathBuf,
        directory: PathBuf,
        uid: u32,
    },
    #[error(
        "{path}: user {uid} may not reach it ({directory} is not searchable for them; only the requester's own and primary group's rights count)"
    )]
    NotSearchable {
        path: PathBuf,
        directory: PathBuf,
        uid: u32,
    },
    #[error("{path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
}

const WRITE: u32 = 0o2;
const SEARCH: u32 = 0o1;

/// Whether the permission bits of `metadata` give `want` (of read 4, write 2, search 1) to the
/// user `uid` of primary group `gid`, as the kernel would decide for a non-root user (ACLs and
/// supplementary groups aside, which can only refuse where the kernel would allow).
fn permits(metadata: &std::fs::Metadata, uid: u32, gid: u32, want: u32) -> bool {
    let mode = metadata.mode();
    let bits = if metadata.uid() == uid {
        mode >> 6
    } else if metadata.gid() == gid {
        mode >> 3
    } else {
        mode
    } & 0o7;
    bits & want == want
}

/// Refuses `path` unless `requester` could create it (or write into it, when it is an existing
/// directory) with their own rights: every directory above it searchable for them, and the
/// deepest one that exists writable. Root may create anything. Symbolic links are followed, as
/// the creation would follow them.
pub fn check_may_create(path: &Path, requester: &Peer) -> Result<(), OutputRefused> {
    if !path.is_absolute()
        || path
            .components()
            .any(|component| component == Component::ParentDir)
    {
        return Err(OutputRefused::NotAbsolute {
            path: path.to_owned(),
        });
    }
    if requester.uid == 0 {
        return Ok(());
    }
    let (uid, gid) = (requester.uid, requester.gid);
    let mut deepest_existing = None;
    for directory in path.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let metadata = match std::fs::metadata(directory) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
            Err(source) => {
                return Err(OutputRefused::Unreadable {
                    path: directory.to_owned(),
                    source,
                });
            }
        };
        if directory != path && !permits(&metadata, uid, gid, SEARCH) {
            return Err(OutputRefused::NotSearchable {
                path: path.to_owned(),
                directory: directory.to_owned(),
                uid,
            });
        }
        deepest_existing = Some((directory, metadata));
    }
    match deepest_existing {
        Some((_, metadata)) if permits(&metadata, uid, gid, WRITE | SEARCH) => Ok(()),
        Some((directory, _)) => Err(OutputRefused::NotWritable {
            path: path.to_owned(),
            directory: directory.to_owned(),
            uid,
        }),
        None => Err(OutputRefused::NotAbsolute {
            path: path.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn user(uid: u32) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid: uid,
        }
    }

    #[test]
    fn only_root_and_the_daemons_own_user_may_use_its_socket() {
        admit_peer(0, 1000).unwrap();
        admit_peer(1000, 1000).unwrap();
        admit_peer(0, 0).unwrap();
        let refused = admit_peer(1001, 1000).unwrap_err().to_string();
        assert!(
            refused.contains("user 1001") && refused.contains("(1000)"),
            "{refused}"
        );
        assert!(admit_peer(1000, 0).is_err());
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (one, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = Peer::of(&one).unwrap();
        assert_eq!(peer.uid, crate::run_directory::effective_user());
        assert_eq!(peer.pid, std::process::id() as i32);
    }

    #[test]
    fn a_requester_may_not_have_a_copy_made_in_a_directory_they_do_not_own() {
        let directory = tempfile::tempdir().unwrap();
        set_mode(directory.path(), 0o755);
        let theirs = directory.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        set_mode(&theirs, 0o755);
        if crate::run_directory::effective_user() == 0 {
            std::os::unix::fs::chown(&theirs, Some(4242), Some(4242)).unwrap();
        }
        let owner = std::fs::metadata(&theirs).unwrap().uid();
        // Its owner may, in it and below, in directories still to be made.
        check_may_create(&theirs.join("test-vm1"), &user(owner)).unwrap();
        check_may_create(&theirs.join("a/b/test-vm1"), &user(owner)).unwrap();
        check_may_create(&theirs, &user(owner)).unwrap();
        // Anyone else may not, nor in the directory above, which is not theirs either.
        let stranger = user(owner + 1);
        let refused = check_may_create(&theirs.join("test-vm1"), &stranger).unwrap_err();
        assert!(
            matches!(refused, OutputRefused::NotWritable { .. }),
            "{refused}"
        );
        let message = refused.to_string();
        assert!(
            message.contains(&format!("user {}", owner + 1))
                && message.contains(&theirs.display().to_string()),
            "{message}"
        );
        assert!(check_may_create(directory.path(), &stranger).is_err());
        // A directory open to all (as /tmp) is theirs to create in too.
        set_mode(&theirs, 0o1777);
        check_may_create(&theirs.join("test-vm1"), &stranger).unwrap();
        // But not below one they cannot search on the way, even one open to all.
        set_mode(&theirs, 0o700);
        let below = theirs.join("a");
        std::fs::create_dir(&below).unwrap();
        set_mode(&below, 0o777);
        let refused = check_may_create(&below.join("test-vm1"), &stranger).unwrap_err();
        assert!(
            matches!(refused, OutputRefused::NotSearchable { .. }),
            "{refused}"
        );
        // Root may create anything; no one may give a relative path or climb with `..`.
        check_may_create(&theirs.join("test-vm1"), &user(0)).unwrap();
        assert!(check_may_create(Path::new("relative/out"), &user(0)).is_err());
        assert!(check_may_create(&theirs.join("../x"), &user(owner)).is_err());
    }

    #[test]
    fn a_symbolic_link_is_judged_by_where_it_leads() {
        if crate::run_directory::effective_user() != 0 {
            return;
        }
        let directory = tempfile::tempdir().unwrap();
        set_mode(directory.path(), 0o755);
        let home = directory.path().join("home");
        let system = directory.path().join("system");
        for made in [&home, &system] {
            std::fs::create_dir(made).unwrap();
            set_mode(made, 0o755);
        }
        std::os::unix::fs::chown(&home, Some(4242), Some(4242)).unwrap();
        let link = home.join("link");
        std::os::unix::fs::symlink(&system, &link).unwrap();
        let refused = check_may_create(&link.join("test-vm1"), &user(4242)).unwrap_err();
        assert!(
            matches!(refused, OutputRefused::NotWritable { .. }),
            "{refused}"
        );
    }
}
