//! The network side: host identities, TLS with pinned certificates, and the QUIC drivers that
//! run the protocol's state machines over quinn on tokio. This module moves bytes and keeps
//! time; every replication decision is made in `proto`.

mod frame;
mod hosting;
mod identity;
mod primary;
mod resync;
mod server;
mod tls;

/// A peer's certificate (DER), as pinned or allowed.
pub type Certificate = rustls::pki_types::CertificateDer<'static>;

pub use hosting::{HostingOptions, exports};
pub use identity::{Identity, fingerprint, load_certificate};
pub use primary::{
    ConsistencyHook, Ending, PrimaryCommand, PrimaryOptions, PrimaryReport, ResyncDone,
    ResyncSummary, Route, SharedReport, client_endpoint, run_primary,
};
pub use server::{Hosting, ReplicaReport, ReplicaServer, TakenOver, TestCopy};
pub use tls::{client_config, is_authentication_failure, server_config};
