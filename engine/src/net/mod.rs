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

/// A QUIC connection to the other site, as the drivers hand it from one role to the next (a
/// host told to become the replica keeps the connection it was told on). The engine's own
/// type, so embedders depend on no QUIC library.
#[derive(Clone, Debug)]
pub struct PeerConnection(pub(crate) quinn::Connection);

impl PeerConnection {
    /// The SHA-256 fingerprint of the certificate the peer presented.
    pub fn peer_fingerprint(&self) -> Option<String> {
        peer_fingerprint(&self.0)
    }
}

/// The SHA-256 fingerprint of the certificate the peer of `connection` presented.
pub(crate) fn peer_fingerprint(connection: &quinn::Connection) -> Option<String> {
    connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<Certificate>>().ok())
        .and_then(|certificates| certificates.first().map(fingerprint))
}

/// A QUIC client endpoint that presents this host's identity and accepts only the pinned peer
/// (`client_endpoint`); one serves every connection a host dials.
#[derive(Clone, Debug)]
pub struct ClientEndpoint(pub(crate) quinn::Endpoint);

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
