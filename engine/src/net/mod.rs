//! The network side: host identities, TLS with pinned certificates, and the QUIC drivers that
//! run the protocol's state machines over quinn on tokio. This module moves bytes and keeps
//! time; every replication decision is made in `proto`.

mod daemon_status;
mod events;
mod extension;
mod frame;
mod hosting;
mod identity;
mod primary;
mod resync;
mod server;
mod tls;

/// A peer's certificate (DER), as pinned or allowed.
type Certificate = rustls::pki_types::CertificateDer<'static>;

/// QUIC connections and endpoints, as the drivers take and hand them out.
pub use quinn::{Connection, Endpoint};

/// The SHA-256 fingerprint of the certificate the peer of `connection` presented.
pub fn peer_fingerprint(connection: &Connection) -> Option<String> {
    connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<Certificate>>().ok())
        .and_then(|certificates| certificates.first().map(fingerprint))
}

pub use daemon_status::DaemonStatus;
pub use events::{EventSender, ReplicationEvent, TimedEvent};
pub use extension::ExtensionOptions;
pub use hosting::{HostingOptions, close_when_free, exports};
pub use identity::{Identity, fingerprint, load_certificate};
pub use primary::{
    BeforeTakeOver, ConsistencyHook, Ending, Greeting, HandoverFailure, PrimaryCommand,
    PrimaryOptions, PrimaryReport, ResyncDone, ResyncSummary, Route, SharedReport, client_endpoint,
    greet, run_primary,
};
pub use resync::ProgressReport;
pub use server::{Hosting, ReplicaReport, ReplicaServer, TakenOver, TestCopy};
