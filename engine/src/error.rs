//! The engine's one error type. Every variant names the file (or image) it is about, and where it
//! can, the byte offset, so that a message read in a log says what, where and what to do.

use std::io;

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused or failed an I/O operation.
    #[error("{name}: {action} failed{}: {source}", offset.map(|at| format!(" at byte {at}")).unwrap_or_default())]
    Io {
        name: String,
        action: &'static str,
        /// Where in the file, for reads and writes.
        offset: Option<u64>,
        #[source]
        source: io::Error,
    },
    /// The file is not an image of the expected format at all.
    #[error("{name}: not a VHDX image: {reason}")]
    NotVhdx { name: String, reason: String },
    /// The file claims to be an image but its structures are damaged.
    #[error("{name}: corrupt image: {problem} (run `blockrep image check` for a full report)")]
    Corrupt { name: String, problem: String },
    /// The file is valid but uses a feature this version does not implement.
    #[error("{name}: unsupported: {feature}")]
    Unsupported { name: String, feature: String },
    /// A request reaches past the end of the virtual disk.
    #[error("{name}: {length} bytes at offset {offset} reach past the virtual size {virtual_size}")]
    OutOfRange {
        name: String,
        offset: u64,
        length: u64,
        virtual_size: u64,
    },
    /// A write was attempted on an image opened read-only.
    #[error("{name}: image is open read-only")]
    ReadOnly { name: String },
    /// A delta file is damaged, truncated, of an unknown version, or does not fit its target.
    #[error("{name}: {problem}")]
    Delta { name: String, problem: String },
    /// Another process (or another user in this one) holds the file: one owner at a time.
    #[error(
        "{name}: in use by {holder}; stop it first (one blockrep at a time may use a disk, its journal or a replica store)"
    )]
    InUse { name: String, holder: String },
    /// Change tracking cannot be trusted; only a comparison of both sides can recover.
    #[error("{name}: tracking lost: resynchronization required ({reason})")]
    TrackingLost { name: String, reason: String },
    /// A caller passed a value the engine cannot use (a size, a block size, a sector size).
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },
    /// A host identity or a trusted certificate cannot be made or read.
    #[error("{path}: {problem}")]
    Identity { path: String, problem: String },
    /// The peer could not be reached, or the connection failed; worth retrying.
    #[error("{peer}: {problem}")]
    Network { peer: String, problem: String },
    /// The peer refused our identity, or we refused its: retrying will not help.
    #[error("{peer}: authentication refused: {reason}")]
    AuthenticationRefused { peer: String, reason: String },
    /// The replication protocol was broken or replication was refused.
    #[error("{peer}: {problem}")]
    Replication { peer: String, problem: String },
}

impl Error {
    pub(crate) fn io(name: &str, action: &'static str, offset: u64, source: io::Error) -> Self {
        Error::Io {
            name: name.to_owned(),
            action,
            offset: Some(offset),
            source,
        }
    }

    /// An I/O error about the file as a whole (opening it, asking its size).
    pub(crate) fn file(name: &str, action: &'static str, source: io::Error) -> Self {
        Error::Io {
            name: name.to_owned(),
            action,
            offset: None,
            source,
        }
    }

    pub(crate) fn corrupt(name: &str, problem: impl Into<String>) -> Self {
        Error::Corrupt {
            name: name.to_owned(),
            problem: problem.into(),
        }
    }

    pub(crate) fn unsupported(name: &str, feature: impl Into<String>) -> Self {
        Error::Unsupported {
            name: name.to_owned(),
            feature: feature.into(),
        }
    }
}
