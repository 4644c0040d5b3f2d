//! TLS and mTLS against a real `kiln serve`: client certificate principals,
//! CRLs (version 1 and 2) and their reload, certificate rotation, and what
//! happens when the files an operator edits are missing, empty or broken.

mod common;

use std::path::{Path, PathBuf};

use common::calls::{find_missing, get_ac, opts, update_ac};
use common::pki::{Ca, write_atomically};
use common::{Kiln, RELOAD_WAIT, eventually, kiln};
use kiln_tools::client::{ClientOptions, connect};
use tonic::Code;

struct MtlsSetup {
    _dir: tempfile::TempDir,
    ca: Ca,
    crl: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    kiln: Kiln,
}

fn config(server_cert: &Path, server_key: &Path, ca: &Path, crl: &Path) -> String {
    format!(
        r#"
[auth]
tls_cert = "{}"
tls_key = "{}"
client_ca = "{}"
client_crl = "{}"
reload_interval_ms = 200

[[auth.rules]]
principal = "ci-*"
tenant = "main"
permissions = ["read", "write"]

[[auth.rules]]
principal = "reader"
tenant = "main"
permissions = ["read"]
"#,
        server_cert.display(),
        server_key.display(),
        ca.display(),
        crl.display()
    )
}

fn start_mtls() -> MtlsSetup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let (server_cert, server_key) = ca.server("server", 1);
    let crl = dir.path().join("ca.crl");
    ca.write_crl(&crl, &[], 1);
    let kiln = Kiln::start_with_config(&config(&server_cert, &server_key, &ca.cert_path(), &crl));
    MtlsSetup { _dir: dir, ca, crl, server_cert, server_key, kiln }
}

impl MtlsSetup {
    fn client(&self, cert: Option<(PathBuf, PathBuf)>, ca: &Path) -> ClientOptions {
        let mut o = opts(format!("grpcs://127.0.0.1:{}", self.kiln.addr.port()));
        o.tls_ca = Some(ca.to_owned());
        if let Some((c, k)) = cert {
            o.tls_cert = Some(c);
            o.tls_key = Some(k);
        }
        o
    }

    fn client_cert(&self, cn: &str, serial: u64) -> ClientOptions {
        self.client(Some(self.ca.client(cn, serial)), &self.ca.cert_path())
    }
}

/// Connecting fails at the handshake, or the first call fails.
async fn refused(options: &ClientOptions) -> bool {
    match connect(options).await {
        Err(_) => true,
        Ok(conn) => find_missing(&conn, "main").await.is_err(),
    }
}

#[tokio::test]
async fn mtls_principals_tenants_and_refusals() {
    let s = start_mtls();
    let ci = connect(&s.client_cert("ci-runner", 10)).await.unwrap();
    find_missing(&ci, "main").await.unwrap();
    update_ac(&ci, "main").await.unwrap();
    let err = find_missing(&ci, "other").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("cert:ci-runner") && err.message().contains("other"), "{}", err.message());

    let reader = connect(&s.client_cert("reader", 11)).await.unwrap();
    get_ac(&reader, "main").await.unwrap();
    let err = update_ac(&reader, "main").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "a read-only principal cannot poison the AC");

    // No client certificate, or one from another CA: refused at the handshake.
    assert!(refused(&s.client(None, &s.ca.cert_path())).await);
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::new(other_dir.path(), "other");
    assert!(refused(&s.client(Some(other.client("ci-evil", 12)), &s.ca.cert_path())).await);
    // Plaintext to a TLS port fails too.
    assert!(
        connect(&opts(s.kiln.remote())).await.is_err()
            || find_missing(&connect(&opts(s.kiln.remote())).await.unwrap(), "main").await.is_err()
    );
}

#[tokio::test]
async fn crl_and_certificates_reload_without_restart() {
    let s = start_mtls();
    let good = s.ca.client("ci-revoked-later", 20);
    let before = connect(&s.client(Some(good.clone()), &s.ca.cert_path())).await.unwrap();
    find_missing(&before, "main").await.unwrap();

    // Revoke serial 20: new connections with it are refused, and so is the
    // next request on the connection it already has open.
    s.ca.write_crl(&s.crl, &[20], 2);
    let err = eventually(RELOAD_WAIT, "the CRL to apply to the open connection", || async {
        find_missing(&before, "main").await.err()
    })
    .await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("Revoked"), "{}", err.message());
    assert!(refused(&s.client(Some(good.clone()), &s.ca.cert_path())).await, "revoked by the CRL");
    let fresh = connect(&s.client_cert("ci-fresh", 21)).await.unwrap();
    find_missing(&fresh, "main").await.unwrap();

    // Rotate the server certificate to one from a new CA (and trust both for clients).
    let rotated_dir = tempfile::tempdir().unwrap();
    let new_ca = Ca::new(rotated_dir.path(), "rotated");
    let (cert, key) = new_ca.server("server-new", 2);
    let new_client = s.client(Some(s.ca.client("ci-after", 22)), &new_ca.cert_path());
    assert!(refused(&new_client).await, "clients trusting only the new CA fail before the rotation");
    write_atomically(&s.server_key, &std::fs::read_to_string(key).unwrap());
    write_atomically(&s.server_cert, &std::fs::read_to_string(cert).unwrap());
    let after =
        eventually(RELOAD_WAIT, "the rotated certificate", || async { connect(&new_client).await.ok() })
            .await;
    find_missing(&after, "main").await.unwrap();
    // The connection made before the rotation keeps working.
    find_missing(&fresh, "main").await.unwrap();
}

#[tokio::test]
async fn a_broken_crl_never_weakens_revocation() {
    let s = start_mtls();
    s.ca.write_crl(&s.crl, &[30], 2);
    let revoked = s.client_cert("ci-revoked", 30);
    eventually(RELOAD_WAIT, "the CRL revoking serial 30", || async { refused(&revoked).await.then_some(()) })
        .await;
    let open = connect(&s.client_cert("ci-open", 31)).await.unwrap();
    find_missing(&open, "main").await.unwrap();

    // Emptied in place (truncate, then nothing), missing, holding no CRL,
    // or half-written: each time the revoked certificate stays out, the
    // error names the CRL file, and everyone else keeps working.
    let good = std::fs::read_to_string(&s.crl).unwrap();
    let broken: [(&str, Option<String>); 4] = [
        ("empty", Some(String::new())),
        ("missing", None),
        ("no CRL", Some("# not a CRL\n".into())),
        ("half-written", Some(good[..good.len() / 2].to_owned())),
    ];
    for (what, content) in broken {
        s.kiln.clear_log();
        match content {
            Some(text) => std::fs::write(&s.crl, text).unwrap(),
            None => std::fs::remove_file(&s.crl).unwrap(),
        }
        eventually(RELOAD_WAIT, "the broken CRL to be refused", || async {
            s.kiln.log_contains("keeping the last good certificates").then_some(())
        })
        .await;
        assert!(s.kiln.log_contains("ca.crl"), "{what}: the error names the CRL file:\n{}", s.kiln.log());
        assert!(refused(&revoked).await, "{what}: the revoked certificate got in");
        find_missing(&open, "main").await.unwrap_or_else(|e| panic!("{what}: {e}"));
        find_missing(&connect(&s.client_cert("ci-new", 32)).await.unwrap(), "main").await.unwrap();
    }
}

#[test]
fn start_up_refuses_a_missing_empty_or_foreign_crl() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let (cert, key) = ca.server("server", 1);
    let crl = dir.path().join("clients.crl");
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = Ca::new(other_dir.path(), "stranger");
    let cases: [(&str, &str); 3] =
        [("missing", "clients.crl"), ("empty", "is empty"), ("foreign", "not signed by any CA")];
    for (what, needle) in cases {
        match what {
            "missing" => {}
            "empty" => std::fs::write(&crl, "").unwrap(),
            _ => stranger.write_crl(&crl, &[5], 1),
        }
        let cfg = dir.path().join("kiln.toml");
        std::fs::write(&cfg, config(&cert, &key, &ca.cert_path(), &crl)).unwrap();
        let data = tempfile::tempdir().unwrap();
        let (ok, _, stderr) = kiln(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data.path().to_str().unwrap(),
        ]);
        assert!(!ok, "{what}: kiln started without a usable CRL");
        assert!(stderr.contains("CRL file") && stderr.contains(needle), "{what}: {stderr}");
    }
}

#[tokio::test]
async fn version_1_crls_from_openssl_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let (cert, key) = ca.server("server", 1);
    let crl = dir.path().join("v1.crl");
    ca.write_v1_crl(&crl, &[40]);
    let kiln = Kiln::start_with_config(&config(&cert, &key, &ca.cert_path(), &crl));
    let s = MtlsSetup { _dir: dir, ca, crl, server_cert: cert, server_key: key, kiln };
    assert!(refused(&s.client_cert("ci-revoked", 40)).await, "serial 40 is revoked by the v1 CRL");
    let ok = connect(&s.client_cert("ci-fine", 41)).await.unwrap();
    find_missing(&ok, "main").await.unwrap();
    // A reload to another v1 CRL applies too.
    s.ca.write_v1_crl(&s.crl, &[40, 41]);
    let err =
        eventually(RELOAD_WAIT, "the new v1 CRL", || async { find_missing(&ok, "main").await.err() }).await;
    assert_eq!(err.code(), Code::Unauthenticated);
    let _ = (&s.server_cert, &s.server_key);
}
