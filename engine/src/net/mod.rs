//! The network side: host identities, TLS with pinned certificates, and the QUIC drivers that
//! run the protocol's state machines over quinn on tokio. This module moves bytes and keeps
//! time; every replication decision is made in `proto`.

mod frame;
mod identity;
mod primary;
mod server;
mod tls;

/// A peer's certificate (DER), as pinned or allowed.
pub type Certificate = rustls::pki_types::CertificateDer<'static>;

pub use identity::{Identity, fingerprint, load_certificate};
pub use primary::{ConsistencyHook, PrimaryOptions, PrimaryReport, SharedReport, run_primary};
pub use server::{ReplicaReport, ReplicaServer, TestCopy};
pub use tls::{client_config, is_authentication_failure, server_config};
