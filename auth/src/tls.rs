//! TLS and mTLS server configuration from PEM files, reloaded when the files
//! change.
//!
//! Every reload builds a complete new rustls `ServerConfig` (certificate,
//! key, client CA bundle, CRLs) and swaps it in; new handshakes use it while
//! established connections keep theirs, so nothing is dropped. A reload that
//! fails (say, the key was written before the certificate) keeps the old
//! configuration and tries again at the next poll.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use kiln_proto::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;

use crate::reload::FileWatch;

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

fn pem_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("{}: {e}", path.display()))
}

fn build(files: &TlsFiles) -> Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem_error(&files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(&files.cert, e))?;
    if certs.is_empty() {
        return Err(pem_error(&files.cert, "no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, e))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| pem_error(ca, e))? {
                roots.add(cert.map_err(|e| pem_error(ca, e))?).map_err(|e| pem_error(ca, e))?;
            }
            if roots.is_empty() {
                return Err(pem_error(ca, "no CA certificate found"));
            }
            let crls: Vec<CertificateRevocationListDer<'static>> = match &files.client_crl {
                None => Vec::new(),
                Some(crl) => CertificateRevocationListDer::pem_file_iter(crl)
                    .map_err(|e| pem_error(crl, e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| pem_error(crl, e))?,
            };
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).with_crls(crls);
            if !files.client_cert_required {
                verifier = verifier.allow_unauthenticated();
            }
            builder.with_client_cert_verifier(verifier.build().map_err(|e| pem_error(ca, e))?)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| pem_error(&files.cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A TLS server configuration that follows its files.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    config: ArcSwap<ServerConfig>,
    watch: Mutex<FileWatch>,
}

impl ReloadingTls {
    /// Loads the files; they must be valid at start-up.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>> {
        let watch = FileWatch::new(files.paths());
        let config = build(&files)?;
        Ok(Arc::new(Self { files, config: ArcSwap::from_pointee(config), watch: Mutex::new(watch) }))
    }

    pub fn reload_if_changed(&self) {
        let changed = self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).changed();
        if !changed {
            return;
        }
        match build(&self.files) {
            Ok(config) => {
                self.config.store(Arc::new(config));
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                // Try again at the next poll even if the files stay as they are.
                self.watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner).forget();
            }
        }
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    pub fn mtls(&self) -> bool {
        self.files.client_ca.is_some()
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
