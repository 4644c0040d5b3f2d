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
    /// The CA's private key (PEM), for tools such as `openssl ca`.
    key_pem: String,
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
        let key = KeyPair::generate().unwrap();
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key).unwrap();
        let ca = Ca { issuer, key_pem, dir: dir.to_owned(), name: name.to_owned() };
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

impl Ca {
    /// Writes a version-1 CRL revoking `serials`, as `openssl ca -gencrl`
    /// writes by default (no CRL number configured).
    pub fn write_v1_crl(&self, path: &Path, serials: &[u64]) {
        let work = tempfile::tempdir().unwrap();
        let key = work.path().join("ca.key");
        std::fs::write(&key, &self.key_pem).unwrap();
        let index: String = serials
            .iter()
            .map(|s| format!("R\t301231235959Z\t260101000000Z\t{s:02X}\tunknown\t/CN=revoked\n"))
            .collect();
        std::fs::write(work.path().join("index.txt"), index).unwrap();
        let cnf = work.path().join("ca.cnf");
        std::fs::write(
            &cnf,
            format!(
                "[ca]\ndefault_ca = test\n[test]\ndatabase = {}\ndefault_md = sha256\ndefault_crl_days = 30\n",
                work.path().join("index.txt").display()
            ),
        )
        .unwrap();
        let tmp = work.path().join("crl.pem");
        let out = std::process::Command::new("openssl")
            .args(["ca", "-gencrl", "-batch", "-config"])
            .arg(&cnf)
            .arg("-keyfile")
            .arg(&key)
            .arg("-cert")
            .arg(self.cert_path())
            .arg("-out")
            .arg(&tmp)
            .output()
            .expect("run openssl (apt-get install openssl)");
        assert!(out.status.success(), "openssl ca -gencrl: {}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(&tmp).unwrap();
        let listed = std::process::Command::new("openssl")
            .args(["crl", "-noout", "-text", "-in"])
            .arg(&tmp)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&listed.stdout).contains("Version 1 (0x0)"), "not a v1 CRL");
        write_atomically(path, &text);
    }
}

/// Replaces a file by rename, as cert-manager and config tools do.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
