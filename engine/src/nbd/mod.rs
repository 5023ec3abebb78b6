//! An NBD server that exports disks, so that a VM or a tool (qemu, nbd-client, nbdkit's
//! clients) can read and write a tracked disk while every write lands in its change tracking.
//!
//! This module owns the NBD protocol (fixed newstyle handshake, simple replies) and the threads
//! that serve it; it reaches disks only through [`ExportedDisk`]. It must never change a disk
//! except on a client's request, never panic or stop serving because of what a client sends
//! (a bad request gets an error reply, a broken connection is closed and logged), and never
//! outlive its [`NbdServer`]: shutting down or dropping the server joins every thread.
//!
//! `protocol` holds the wire format and the decisions that need no socket; `server` does the I/O.

mod protocol;
mod server;

pub use server::{DEFAULT_SHUTDOWN_GRACE, NbdServer};

use crate::image::BlockImage;
use crate::track::TrackedDisk;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;

/// A disk an NBD client can read and write. `TrackedDisk` implements it so every write is
/// tracked. Calls come from several connection threads at once.
pub trait ExportedDisk: Send + Sync {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; the range lies inside the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()>;
    /// Writes `buf` at `offset`; the range lies inside the disk.
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::Result<()>;
    /// Makes `length` bytes at `offset` read as zeros (NBD's TRIM and WRITE_ZEROES).
    fn zero_range(&self, offset: u64, length: u64) -> crate::Result<()>;
    /// Makes every completed write durable, whichever connection made it.
    fn flush(&self) -> crate::Result<()>;
}

impl<I: BlockImage> ExportedDisk for TrackedDisk<I> {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        TrackedDisk::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> crate::Result<()> {
        TrackedDisk::write_at(self, buf, offset)
    }
    fn zero_range(&self, offset: u64, length: u64) -> crate::Result<()> {
        TrackedDisk::zero_range(self, offset, length)
    }
    fn flush(&self) -> crate::Result<()> {
        TrackedDisk::flush(self)
    }
}

/// Where an NBD server listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl NbdAddress {
    /// The NBD URI of `export` at this address, as qemu and libnbd take it:
    /// `nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`.
    pub fn uri(&self, export: &str) -> String {
        match self {
            NbdAddress::Unix(path) => format!(
                "nbd+unix:///{}?socket={}",
                percent_encode(export),
                percent_encode(&path.to_string_lossy())
            ),
            NbdAddress::Tcp(address) => format!("nbd://{address}/{}", percent_encode(export)),
        }
    }
}

/// Escapes everything but RFC 3986's unreserved characters and `/`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl FromStr for NbdAddress {
    type Err = NbdError;

    fn from_str(text: &str) -> Result<Self, NbdError> {
        let invalid = |reason: &str| NbdError::InvalidAddress {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid("the socket path is empty"));
            }
            return Ok(NbdAddress::Unix(PathBuf::from(path)));
        }
        if let Some(host_and_port) = text.strip_prefix("tcp:") {
            if let Ok(address) = host_and_port.parse() {
                return Ok(NbdAddress::Tcp(address));
            }
            // A host name (`localhost:10809`): its first address.
            return match host_and_port.to_socket_addrs() {
                Ok(mut addresses) => addresses
                    .next()
                    .map(NbdAddress::Tcp)
                    .ok_or_else(|| invalid("the host name has no address")),
                Err(error) => Err(invalid(&error.to_string())),
            };
        }
        Err(invalid("unknown kind of address"))
    }
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Unix(path) => write!(formatter, "unix:{}", path.display()),
            NbdAddress::Tcp(address) => write!(formatter, "tcp:{address}"),
        }
    }
}

/// What can go wrong starting or stopping an NBD server. Problems with one client are not
/// errors of the server: they are logged, and that connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD address {text:?}: {reason} (expected unix:PATH or tcp:HOST:PORT)")]
    InvalidAddress { text: String, reason: String },
    #[error("NBD exports: {reason}")]
    InvalidExports { reason: String },
    #[error("{address}: cannot listen: {source}")]
    Listen {
        address: NbdAddress,
        #[source]
        source: io::Error,
    },
    #[error("{address}: the path exists and is not a socket; refusing to replace it")]
    NotASocket { address: NbdAddress },
    #[error("{address}: another server is listening on this socket")]
    SocketInUse { address: NbdAddress },
    #[error("NBD server on {address}: {action} failed: {source}")]
    Io {
        address: NbdAddress,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("NBD server on {address}: thread {thread} panicked")]
    ThreadPanicked { address: NbdAddress, thread: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_the_same_way() {
        for text in [
            "unix:/run/blockrep/vm1.sock",
            "tcp:127.0.0.1:10809",
            "tcp:[::1]:0",
        ] {
            let address: NbdAddress = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
        }
        assert_eq!(
            "unix:relative.sock".parse::<NbdAddress>().unwrap(),
            NbdAddress::Unix(PathBuf::from("relative.sock"))
        );
    }

    #[test]
    fn addresses_without_a_kind_path_or_port_are_refused() {
        for text in [
            "/run/vm1.sock",
            "unix:",
            "tcp:127.0.0.1",
            "udp:1.2.3.4:5",
            "",
        ] {
            let error = text.parse::<NbdAddress>().unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains("expected unix:PATH or tcp:HOST:PORT"),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn uris_escape_names_and_paths() {
        let unix = NbdAddress::Unix(PathBuf::from("/tmp/a b/nbd.sock"));
        assert_eq!(
            unix.uri("vm 1"),
            "nbd+unix:///vm%201?socket=/tmp/a%20b/nbd.sock"
        );
        let tcp: NbdAddress = "tcp:127.0.0.1:10809".parse().unwrap();
        assert_eq!(tcp.uri("disk"), "nbd://127.0.0.1:10809/disk");
    }
}
