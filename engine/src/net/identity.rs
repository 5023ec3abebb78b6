//! Host identities: a private key and a self-signed certificate per host, kept as PEM files in
//! a directory (`identity.key`, readable by its owner only, and `identity.crt`). Trust is by
//! pinning: a peer is accepted when its certificate is one we were given, byte for byte, so
//! no certificate authority is involved and a certificate's names do not matter.

use crate::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const KEY_FILE: &str = "identity.key";
const CERTIFICATE_FILE: &str = "identity.crt";

/// A host's key and certificate.
#[derive(Debug)]
pub struct Identity {
    pub certificate: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn problem(path: &Path, text: impl Into<String>) -> Error {
    Error::Identity {
        path: path.display().to_string(),
        problem: text.into(),
    }
}

impl Identity {
    /// Makes a new identity for host `name` in `directory` (created if missing). Refuses to
    /// replace an identity already there: peers that trust it would be locked out.
    pub fn create(name: &str, directory: &Path) -> Result<Identity> {
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            return Err(Error::InvalidArgument {
                what: "identity name",
                reason: format!("{name:?}: use 1 to 64 printable characters"),
            });
        }
        std::fs::create_dir_all(directory)
            .map_err(|error| problem(directory, format!("cannot create directory: {error}")))?;
        let key_path = directory.join(KEY_FILE);
        let certificate_path = directory.join(CERTIFICATE_FILE);
        for path in [&key_path, &certificate_path] {
            if path.exists() {
                return Err(problem(
                    path,
                    "an identity already exists here; peers that trust it would be locked out, so it is kept",
                ));
            }
        }
        let key = rcgen::KeyPair::generate()
            .map_err(|error| problem(directory, format!("cannot generate a key: {error}")))?;
        let mut parameters = rcgen::CertificateParams::new(vec![sanitized_dns_name(name)])
            .map_err(|error| {
                problem(directory, format!("cannot describe a certificate: {error}"))
            })?;
        parameters
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let certificate = parameters
            .self_signed(&key)
            .map_err(|error| problem(directory, format!("cannot sign a certificate: {error}")))?;
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&certificate_path, certificate.pem().as_bytes(), 0o644)?;
        Ok(Identity {
            certificate: certificate.der().clone(),
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }

    /// Reads the identity in `directory`.
    pub fn load(directory: &Path) -> Result<Identity> {
        let key_path = directory.join(KEY_FILE);
        let certificate = load_certificate(&directory.join(CERTIFICATE_FILE))?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|error| {
            problem(
                &key_path,
                format!(
                    "not a readable private key ({error}); make one with `blockrep identity create`"
                ),
            )
        })?;
        Ok(Identity { certificate, key })
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.certificate)
    }

    /// Where an identity's certificate lives in its directory.
    pub fn certificate_path(directory: &Path) -> PathBuf {
        directory.join(CERTIFICATE_FILE)
    }
}

/// Reads a PEM certificate; `path` may also be an identity directory.
pub fn load_certificate(path: &Path) -> Result<CertificateDer<'static>> {
    let path = if path.is_dir() {
        path.join(CERTIFICATE_FILE)
    } else {
        path.to_owned()
    };
    CertificateDer::from_pem_file(&path).map_err(|error| {
        problem(
            &path,
            format!("not a readable PEM certificate ({error}); pass a peer's identity.crt"),
        )
    })
}

/// `sha256:` and the hex SHA-256 of the certificate's DER bytes: how logs and catalogues name
/// a peer.
pub fn fingerprint(certificate: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, certificate.as_ref());
    let hex: String = digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// Certificates need a DNS-like subject name; pinning never checks it, so any host name maps.
fn sanitized_dns_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(|c| c == '-' || c == '.');
    if trimmed.is_empty() {
        "blockrep-host".into()
    } else {
        trimmed.into()
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|error| problem(path, format!("cannot create: {error}")))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| problem(path, format!("cannot write: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_made_once_and_reads_back() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("host-a");
        let made = Identity::create("host a", &path).unwrap();
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(made.certificate, loaded.certificate);
        assert_eq!(made.fingerprint(), loaded.fingerprint());
        assert!(made.fingerprint().starts_with("sha256:"));
        let again = Identity::create("host a", &path).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");
        let mode = std::fs::metadata(path.join(KEY_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        assert_eq!(load_certificate(&path).unwrap(), made.certificate);
    }

    #[test]
    fn a_file_that_is_not_a_certificate_says_so() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("bogus.crt");
        std::fs::write(&path, "hello").unwrap();
        let error = load_certificate(&path).unwrap_err().to_string();
        assert!(error.contains("not a readable PEM certificate"), "{error}");
    }
}
