//! Certificate revocation lists for client certificates.
//!
//! Kiln checks revocation itself rather than through the TLS stack's
//! verifier, for three reasons: version-1 CRLs (what `openssl ca -gencrl`
//! writes unless a CRL number is configured) are accepted as well as
//! version 2; an error names the CRL file and the CRL in it; and the same
//! set answers, on every request, whether the certificate of an already
//! open connection has been revoked since its handshake (Bazel keeps one
//! connection for hours).
//!
//! Every CRL must be signed by a CA of the `client_ca` bundle. A file that is
//! missing, empty, holds no CRL, or holds one that does not parse or verify
//! is refused as a whole; the caller keeps the last good set. Client
//! certificates whose issuer has no CRL in the file are refused (fail
//! closed), as a CRL file that lost a CA's list must not let that CA's
//! revoked certificates in.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use kiln_proto::access::ClientCertificate;
use kiln_proto::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::reload::read_nonempty;

/// Serial numbers revoked, by issuer (DER of the issuer's name).
#[derive(Debug, Default)]
pub struct Revocations {
    by_issuer: HashMap<Vec<u8>, HashSet<Vec<u8>>>,
}

fn trim_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].to_vec()
}

fn crl_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("CRL file {}: {e}", path.display()))
}

impl Revocations {
    /// Loads the CRLs in `path`, each verified against a CA in `cas`.
    pub fn load(path: &Path, cas: &[CertificateDer<'static>]) -> Result<Self> {
        let pem = read_nonempty(path, "CRL file")?;
        let crls: Vec<CertificateRevocationListDer<'static>> =
            CertificateRevocationListDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| crl_error(path, format!("not a PEM file of CRLs: {e}")))?;
        if crls.is_empty() {
            return Err(crl_error(path, "holds no CRL (expected -----BEGIN X509 CRL----- blocks)"));
        }
        let cas: Vec<X509Certificate<'_>> = cas
            .iter()
            .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok().map(|(_, c)| c))
            .collect();
        let mut by_issuer: HashMap<Vec<u8>, HashSet<Vec<u8>>> = HashMap::new();
        for (i, der) in crls.iter().enumerate() {
            let n = i + 1;
            let (_, crl) = CertificateRevocationList::from_der(der.as_ref())
                .map_err(|e| crl_error(path, format!("CRL #{n} does not parse: {e}")))?;
            let issuer = crl.issuer();
            let signed = cas
                .iter()
                .filter(|ca| ca.subject().as_raw() == issuer.as_raw())
                .any(|ca| crl.verify_signature(ca.public_key()).is_ok());
            if !signed {
                return Err(crl_error(
                    path,
                    format!("CRL #{n} (issuer {issuer}) is not signed by any CA in client_ca"),
                ));
            }
            if crl.next_update().is_some_and(|next| next.timestamp() < now_unix()) {
                tracing::warn!(file = %path.display(), crl = n, %issuer, "CRL is past its next update; publish a fresh one");
            }
            let serials = by_issuer.entry(issuer.as_raw().to_vec()).or_default();
            serials.extend(crl.iter_revoked_certificates().map(|r| trim_serial(r.raw_serial())));
        }
        Ok(Self { by_issuer })
    }

    /// How many certificates are revoked, over all issuers.
    pub fn len(&self) -> usize {
        self.by_issuer.values().map(HashSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why `cert` must be refused, if it must.
    pub fn refusal(&self, cert: &ClientCertificate) -> Option<CertificateError> {
        match self.by_issuer.get(&cert.issuer) {
            None => Some(CertificateError::UnknownRevocationStatus),
            Some(serials) if serials.contains(&cert.serial) => Some(CertificateError::Revoked),
            Some(_) => None,
        }
    }

    /// Whether an intermediate certificate presented by a client is revoked
    /// (intermediates from issuers without a CRL pass).
    fn revokes(&self, cert: &ClientCertificate) -> bool {
        self.by_issuer.get(&cert.issuer).is_some_and(|s| s.contains(&cert.serial))
    }
}

fn now_unix() -> i64 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// What Kiln keeps of a certificate: issuer, serial, end of validity.
pub fn describe(der: &CertificateDer<'_>) -> Option<ClientCertificate> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    Some(ClientCertificate {
        issuer: cert.issuer().as_raw().to_vec(),
        serial: trim_serial(cert.raw_serial()),
        not_after_unix_seconds: cert.validity().not_after.timestamp(),
    })
}

/// Verifies client certificates with the TLS stack's verifier, then against
/// [`Revocations`].
#[derive(Debug)]
pub struct RevocationChecking {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub revocations: Arc<Revocations>,
}

impl ClientCertVerifier for RevocationChecking {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let refuse = |e: CertificateError| Err(rustls::Error::InvalidCertificate(e));
        let Some(leaf) = describe(end_entity) else {
            return refuse(CertificateError::BadEncoding);
        };
        if let Some(why) = self.revocations.refusal(&leaf) {
            return refuse(why);
        }
        if intermediates.iter().filter_map(|c| describe(c)).any(|c| self.revocations.revokes(&c)) {
            return refuse(CertificateError::Revoked);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType, IsCa,
        KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn crl(issuer: &CertifiedIssuer<'static, KeyPair>, serials: &[u64]) -> String {
        let now = rcgen::date_time_ymd(2026, 1, 1);
        CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(issuer)
        .unwrap()
        .pem()
        .unwrap()
    }

    fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, serial: u64) -> ClientCertificate {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "client");
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(&KeyPair::generate().unwrap(), issuer).unwrap();
        describe(cert.der()).unwrap()
    }

    #[test]
    fn revoked_serials_by_issuer_and_fail_closed_for_others() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (ca("a"), ca("b"));
        let path = dir.path().join("ca.crl");
        std::fs::write(&path, crl(&a, &[7, 300])).unwrap();
        let cas = vec![a.der().clone(), b.der().clone()];
        let set = Revocations::load(&path, &cas).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.refusal(&leaf(&a, 7)), Some(CertificateError::Revoked));
        assert_eq!(set.refusal(&leaf(&a, 300)), Some(CertificateError::Revoked));
        assert_eq!(set.refusal(&leaf(&a, 8)), None);
        assert_eq!(set.refusal(&leaf(&b, 8)), Some(CertificateError::UnknownRevocationStatus));
    }

    #[test]
    fn bad_files_are_refused_naming_the_crl_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, stranger) = (ca("a"), ca("stranger"));
        let cas = vec![a.der().clone()];
        let path = dir.path().join("clients.crl");
        let good = crl(&a, &[1]);
        let cases: [(&str, String); 5] = [
            ("is empty", String::new()),
            ("holds no CRL", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into()),
            ("not a PEM file", good[..good.len() / 2].to_owned()),
            ("does not parse", "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n".into()),
            ("not signed by any CA", crl(&stranger, &[1])),
        ];
        for (needle, text) in cases {
            std::fs::write(&path, text).unwrap();
            let err = Revocations::load(&path, &cas).unwrap_err().message().to_owned();
            assert!(err.contains("clients.crl") && err.contains(needle), "{needle}: {err}");
        }
        std::fs::remove_file(&path).unwrap();
        assert!(Revocations::load(&path, &cas).unwrap_err().message().contains("clients.crl"));
    }
}
