//! Certificates made in the tests: a CA, server and client certificates,
//! and CRLs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
}

impl Ca {
    /// A new CA whose files go to `dir`, named `name`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca = Ca { issuer, dir: dir.to_owned(), name: name.to_owned() };
        std::fs::write(ca.cert_path(), ca.issuer.pem()).unwrap();
        ca
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.crt", self.name))
    }

    fn leaf(&self, cn: &str, serial: u64, server: bool, file: &str) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(if server { vec!["localhost".to_owned()] } else { vec![] }).unwrap();
        if server {
            params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        } else {
            params.subject_alt_names.push(SanType::DnsName(format!("{cn}.example").try_into().unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.join(format!("{file}.crt"));
        let key_path = self.dir.join(format!("{file}.key"));
        write_atomically(&cert_path, &cert.pem());
        // PKCS#8, as Bazel requires for --tls_client_key.
        write_atomically(&key_path, &key.serialize_pem());
        (cert_path, key_path)
    }

    /// A server certificate for localhost and 127.0.0.1, written as `file`.crt/.key.
    pub fn server(&self, file: &str, serial: u64) -> (PathBuf, PathBuf) {
        self.leaf("localhost", serial, true, file)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str, serial: u64) -> (PathBuf, PathBuf) {
        self.leaf(cn, serial, false, &format!("client-{cn}-{serial}"))
    }

    /// Writes a CRL revoking `serials` to `path`.
    pub fn write_crl(&self, path: &Path, serials: &[u64], crl_number: u64) {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        write_atomically(path, &params.signed_by(&self.issuer).unwrap().pem().unwrap());
    }
}

/// Replaces a file by rename, as cert-manager and config tools do.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
