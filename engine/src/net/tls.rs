//! TLS for QUIC with pinned certificates. The replica server demands a client certificate and
//! accepts only those it was told to allow; a primary accepts only the one replica certificate
//! it pins. Either refusal happens inside the handshake, before any replication data flows.
//! Signatures are still verified (the peer must hold the pinned certificate's key); names,
//! issuers and dates are not, as there is no certificate authority to vouch for them.

use super::identity::{Identity, fingerprint};
use crate::proto::ALPN;
use crate::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;

/// How long a silent connection lives; keep-alives every [`KEEP_ALIVE`] keep a healthy idle
/// one open, so a dead link is noticed within this time.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// UDP payload of a 9000-byte jumbo frame over IPv6 (the larger header).
const JUMBO_PAYLOAD: u16 = 9000 - 48;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(text: impl Into<String>) -> Error {
    Error::Identity {
        path: "tls".into(),
        problem: text.into(),
    }
}

/// Flow-control windows large enough to keep a fast link full with a few chunks in flight,
/// and liveness settings that notice a dead link in seconds.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // Path MTU discovery may go up to jumbo frames (and loopback): fewer, larger packets cost
    // less CPU per byte, and discovery falls back to what the path carries.
    let mut mtu_discovery = quinn::MtuDiscoveryConfig::default();
    mtu_discovery.upper_bound(JUMBO_PAYLOAD);
    transport.mtu_discovery_config(Some(mtu_discovery));
    transport
        .stream_receive_window((16u32 << 20).into())
        .receive_window((64u32 << 20).into())
        .send_window(64 << 20)
        .max_concurrent_uni_streams(32u32.into())
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(10_000))),
        ));
    Arc::new(transport)
}

/// The replica server's QUIC configuration: its identity, and the primaries it allows.
pub(crate) fn server_config(
    identity: &Identity,
    allowed: Vec<CertificateDer<'static>>,
) -> Result<quinn::ServerConfig> {
    let provider = provider();
    let verifier = AllowList {
        allowed,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| tls_error(error.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![identity.certificate.clone()], identity.key())
        .map_err(|error| {
            tls_error(format!(
                "the identity's key does not fit its certificate: {error}"
            ))
        })?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|error| tls_error(error.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// A primary's QUIC configuration: its identity, and the one replica certificate it trusts.
pub(crate) fn client_config(
    identity: &Identity,
    pinned: CertificateDer<'static>,
) -> Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = Pinned {
        pinned,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| tls_error(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![identity.certificate.clone()], identity.key())
        .map_err(|error| {
            tls_error(format!(
                "the identity's key does not fit its certificate: {error}"
            ))
        })?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|error| tls_error(error.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// The handshake signature checks both verifiers share: the peer must hold the key of the
/// certificate it showed. (A macro, as the two traits declare the same methods separately.)
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            certificate: &CertificateDer<'_>,
            signature: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                certificate,
                signature,
                &self.algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            certificate: &CertificateDer<'_>,
            signature: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                certificate,
                signature,
                &self.algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}

/// The server's check of a primary: its certificate must be on the list.
#[derive(Debug)]
struct AllowList {
    allowed: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AllowList {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        if self.allowed.iter().any(|allowed| allowed == end_entity) {
            return Ok(ClientCertVerified::assertion());
        }
        tracing::warn!(
            peer = %fingerprint(end_entity),
            "refused a primary: its certificate is not among those allowed (--allow)"
        );
        Err(rustls::Error::General(
            "certificate not allowed by this replica".into(),
        ))
    }

    signature_checks!();
}

/// A primary's check of the replica: exactly the pinned certificate.
#[derive(Debug)]
struct Pinned {
    pinned: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if *end_entity == self.pinned {
            return Ok(ServerCertVerified::assertion());
        }
        tracing::warn!(
            peer = %fingerprint(end_entity),
            pinned = %fingerprint(&self.pinned),
            "refused the replica: its certificate is not the one trusted (--trust)"
        );
        Err(rustls::Error::General(format!(
            "the replica's certificate {} is not the trusted {}",
            fingerprint(end_entity),
            fingerprint(&self.pinned)
        )))
    }

    signature_checks!();
}

/// True when a connection ended because a TLS check failed (either side refused the other's
/// identity): retrying will fail the same way.
pub(crate) fn is_authentication_failure(error: &quinn::ConnectionError) -> bool {
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    match error {
        quinn::ConnectionError::TransportError(error) => crypto(u64::from(error.code)),
        quinn::ConnectionError::ConnectionClosed(close) => crypto(u64::from(close.error_code)),
        _ => false,
    }
}
