//! TLS and mTLS server configuration from PEM files, reloaded when the files
//! change.
//!
//! Every reload builds a complete new rustls `ServerConfig` (certificate,
//! key, client CA bundle, CRLs) and swaps it in; new handshakes use it while
//! established connections keep theirs, so nothing is dropped, except that
//! every request re-checks its connection's client certificate against the
//! current CRLs and expiry. A reload that fails (a file missing, empty or
//! half-written, a key written before its certificate) keeps the last good
//! configuration, logs an error naming the file, and is tried again when
//! the files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use kiln_proto::access::ClientCertificate;
use kiln_proto::{Code, Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;

use crate::crl::{RevocationChecking, Revocations};
use crate::reload::{FileWatch, read_nonempty};

/// Which part of a client certificate names the principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrincipalFrom {
    /// The subject's common name.
    #[default]
    Cn,
    /// The first DNS, URI or email subject alternative name.
    San,
}

/// The PEM files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle for client certificates; enables mTLS.
    pub client_ca: Option<PathBuf>,
    /// Certificate revocation lists (PEM, several allowed) for client certificates.
    pub client_crl: Option<PathBuf>,
    /// Refuse handshakes without a client certificate (when `client_ca` is set).
    pub client_cert_required: bool,
}

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.iter().cloned());
        paths.extend(self.client_crl.iter().cloned());
        paths
    }
}

fn pem_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("{what} {}: {e}", path.display()))
}

fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_nonempty(path, what)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "holds no certificate"));
    }
    Ok(certs)
}

/// One complete, consistent configuration.
#[derive(Debug)]
struct Loaded {
    config: Arc<ServerConfig>,
    revocations: Option<Arc<Revocations>>,
}

fn build(files: &TlsFiles) -> Result<Loaded> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates("certificate file", &files.cert)?;
    let key_pem = read_nonempty(&files.key, "key file")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error("key file", &files.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(e.to_string()))?;
    let mut revocations = None;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let cas = certificates("client CA file", ca)?;
            let mut roots = RootCertStore::empty();
            for cert in &cas {
                roots.add(cert.clone()).map_err(|e| pem_error("client CA file", ca, e))?;
            }
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !files.client_cert_required {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier: Arc<dyn ClientCertVerifier> =
                verifier.build().map_err(|e| pem_error("client CA file", ca, e))?;
            let verifier = match &files.client_crl {
                None => verifier,
                Some(crl) => {
                    let set = Arc::new(Revocations::load(crl, &cas)?);
                    revocations = Some(set.clone());
                    Arc::new(RevocationChecking { inner: verifier, revocations: set })
                }
            };
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| pem_error("certificate and key files", &files.cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded { config: Arc::new(config), revocations })
}

/// A TLS server configuration that follows its files.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    loaded: ArcSwap<Loaded>,
    watch: Mutex<FileWatch>,
}

impl ReloadingTls {
    /// Loads the files; they must be valid at start-up.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>> {
        let watch = FileWatch::new(files.paths());
        let loaded = build(&files)?;
        if let Some(set) = &loaded.revocations {
            tracing::info!(revoked = set.len(), "client certificate revocation lists loaded");
        }
        Ok(Arc::new(Self { files, loaded: ArcSwap::from_pointee(loaded), watch: Mutex::new(watch) }))
    }

    pub fn reload_if_changed(&self) {
        if !self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).settled_change() {
            return;
        }
        match build(&self.files) {
            Ok(loaded) => {
                let revoked = loaded.revocations.as_ref().map(|r| r.len());
                self.loaded.store(Arc::new(loaded));
                tracing::info!(cert = %self.files.cert.display(), ?revoked, "TLS files reloaded");
            }
            Err(e) => tracing::error!(
                error = %e,
                "TLS files changed but do not load; keeping the last good certificates, CAs and CRLs"
            ),
        }
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.loaded.load().config.clone())
    }

    pub fn mtls(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Re-checks a connection's client certificate on a request: refused if
    /// the current CRLs revoke it or it has expired since the handshake.
    pub fn recheck(&self, cert: &ClientCertificate, now_unix_seconds: i64) -> Result<()> {
        if cert.not_after_unix_seconds < now_unix_seconds {
            return Err(Error::new(
                Code::Unauthenticated,
                "the client certificate has expired; reconnect with a valid one",
            ));
        }
        if let Some(set) = &self.loaded.load().revocations
            && let Some(why) = set.refusal(cert)
        {
            return Err(Error::new(
                Code::Unauthenticated,
                format!("the client certificate is refused: {why:?}"),
            ));
        }
        Ok(())
    }
}

/// The principal named by a client certificate.
pub fn principal_from_cert(der: &CertificateDer<'_>, from: PrincipalFrom) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    match from {
        PrincipalFrom::Cn => {
            cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned)
        }
        PrincipalFrom::San => {
            use x509_parser::extensions::GeneralName;
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|name| match name {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    Some((*s).to_owned())
                }
                _ => None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    #[test]
    fn principal_from_cn_or_san() {
        let mut params = CertificateParams::new(vec!["builder.example".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::Rfc822Name("ops@example.com".try_into().unwrap()));
        params.distinguished_name.push(DnType::CommonName, "ci-runner-7");
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let der = CertificateDer::from(cert.der().to_vec());
        assert_eq!(principal_from_cert(&der, PrincipalFrom::Cn).as_deref(), Some("ci-runner-7"));
        assert_eq!(principal_from_cert(&der, PrincipalFrom::San).as_deref(), Some("builder.example"));
        assert_eq!(principal_from_cert(&CertificateDer::from(vec![1, 2, 3]), PrincipalFrom::Cn), None);
    }

    #[test]
    fn half_configured_tls_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("missing.crt"),
            key: dir.path().join("missing.key"),
            client_ca: None,
            client_crl: None,
            client_cert_required: false,
        };
        let err = ReloadingTls::load(files).unwrap_err();
        assert!(err.message().contains("missing.crt"), "{}", err.message());
    }
}
