//! Authentication and authorization against a real `kiln serve`: mTLS with
//! CRLs and certificate reload, bearer tokens, basic auth, tenants.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pki::{Ca, write_atomically};
use common::{Kiln, kiln};
use kiln_proto::kiln::admin::tokens_client::TokensClient;
use kiln_proto::kiln::admin::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    ActionResult, FindMissingBlobsRequest, GetActionResultRequest, UpdateActionResultRequest,
};
use kiln_proto::{Digest, DigestFunction};
use kiln_tools::client::{ClientOptions, Connection, connect};
use tonic::Code;

fn sha(data: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(data)
}

fn opts(remote: String) -> ClientOptions {
    ClientOptions { remote, ..ClientOptions::default() }
}

async fn find_missing(conn: &Connection, instance: &str) -> Result<(), tonic::Status> {
    let req = FindMissingBlobsRequest {
        instance_name: instance.into(),
        blob_digests: vec![sha(b"x").to_proto()],
        ..Default::default()
    };
    ContentAddressableStorageClient::new(conn.channel()).find_missing_blobs(req).await.map(drop)
}

async fn update_ac(conn: &Connection, instance: &str) -> Result<(), tonic::Status> {
    let req = UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(sha(b"action").to_proto()),
        action_result: Some(ActionResult::default()),
        ..Default::default()
    };
    ActionCacheClient::new(conn.channel()).update_action_result(req).await.map(drop)
}

async fn get_ac(conn: &Connection, instance: &str) -> Result<(), tonic::Status> {
    let req = GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(sha(b"action").to_proto()),
        ..Default::default()
    };
    ActionCacheClient::new(conn.channel()).get_action_result(req).await.map(drop)
}

fn toml_path(p: &Path) -> String {
    p.display().to_string()
}

struct MtlsSetup {
    _dir: tempfile::TempDir,
    ca: Ca,
    crl: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
    kiln: Kiln,
}

fn start_mtls() -> MtlsSetup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "main");
    let (server_cert, server_key) = ca.server("server", 1);
    let crl = dir.path().join("ca.crl");
    ca.write_crl(&crl, &[], 1);
    let config = format!(
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
        toml_path(&server_cert),
        toml_path(&server_key),
        toml_path(&ca.cert_path()),
        toml_path(&crl)
    );
    let kiln = Kiln::start_with_config(&config);
    MtlsSetup { _dir: dir, ca, crl, server_cert, server_key, kiln }
}

impl MtlsSetup {
    fn client(&self, cert: Option<(std::path::PathBuf, std::path::PathBuf)>, ca: &Path) -> ClientOptions {
        let mut o = opts(format!("grpcs://127.0.0.1:{}", self.kiln.addr.port()));
        o.tls_ca = Some(ca.to_owned());
        if let Some((c, k)) = cert {
            o.tls_cert = Some(c);
            o.tls_key = Some(k);
        }
        o
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
    let ci = connect(&s.client(Some(s.ca.client("ci-runner", 10)), &s.ca.cert_path())).await.unwrap();
    find_missing(&ci, "main").await.unwrap();
    update_ac(&ci, "main").await.unwrap();
    let err = find_missing(&ci, "other").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("ci-runner") && err.message().contains("other"), "{}", err.message());

    let reader = connect(&s.client(Some(s.ca.client("reader", 11)), &s.ca.cert_path())).await.unwrap();
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

    // Revoke serial 20: new connections with it are refused within a poll.
    s.ca.write_crl(&s.crl, &[20], 2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(refused(&s.client(Some(good.clone()), &s.ca.cert_path())).await, "revoked by the CRL");
    let fresh = connect(&s.client(Some(s.ca.client("ci-fresh", 21)), &s.ca.cert_path())).await.unwrap();
    find_missing(&fresh, "main").await.unwrap();

    // Rotate the server certificate to one from a new CA (and trust both for clients).
    let rotated_dir = tempfile::tempdir().unwrap();
    let new_ca = Ca::new(rotated_dir.path(), "rotated");
    let (cert, key) = new_ca.server("server-new", 2);
    let new_client = s.client(Some(s.ca.client("ci-after", 22)), &new_ca.cert_path());
    assert!(refused(&new_client).await, "clients trusting only the new CA fail before the rotation");
    write_atomically(&s.server_key, &std::fs::read_to_string(key).unwrap());
    write_atomically(&s.server_cert, &std::fs::read_to_string(cert).unwrap());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after = connect(&new_client).await.unwrap();
    find_missing(&after, "main").await.unwrap();
    // The connection made before the rotation keeps working.
    find_missing(&fresh, "main").await.unwrap();
}

fn token_config(data_dir_tokens: &Path, extra: &str) -> String {
    format!(
        "[auth]\ntokens = true\ntoken_file = \"{}\"\nreload_interval_ms = 200\n{extra}",
        toml_path(data_dir_tokens)
    )
}

/// Creates a token directly in the file, as an operator bootstraps.
fn bootstrap_token(file: &Path, principal: &str, tenant: &str, perms: &str, expires: &str) -> String {
    let (ok, out, err) = kiln(&[
        "token",
        "create",
        "--token-file",
        file.to_str().unwrap(),
        "--principal",
        principal,
        "--tenant",
        tenant,
        "--perm",
        perms,
        "--expires",
        expires,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("created"), "{err}");
    out.trim().to_owned()
}

#[tokio::test]
async fn bearer_tokens_grant_revoke_expire() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let admin_token = bootstrap_token(&file, "ops", "*", "admin", "never");
    let kiln = Kiln::start_with_config(&token_config(&file, ""));
    let with = |token: &str| ClientOptions { token: Some(token.to_owned()), ..opts(kiln.remote()) };

    // No credentials, garbage, a well-formed unknown token: UNAUTHENTICATED.
    let anon = connect(&opts(kiln.remote())).await.unwrap();
    let err = find_missing(&anon, "main").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("Bearer"), "{}", err.message());
    for bad in
        ["garbage", "kiln_0000000000000000000000000000000000000000000000", &kiln_auth::tokens::generate()]
    {
        let err = find_missing(&connect(&with(bad)).await.unwrap(), "main").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{bad}");
    }

    // The admin creates a developer token on main.dev through the admin API.
    let admin = connect(&with(&admin_token)).await.unwrap();
    let created = TokensClient::new(admin.channel())
        .create_token(CreateTokenRequest {
            principal: "alice".into(),
            tenant: "main.dev".into(),
            permissions: vec!["read".into(), "write".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let alice = connect(&with(&created.token)).await.unwrap();
    update_ac(&alice, "main.dev").await.unwrap();
    update_ac(&alice, "main.dev.alice").await.unwrap();
    let err = update_ac(&alice, "main").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "wrong tenant");
    assert!(!err.message().contains(&created.token));

    // Alice is no admin.
    let err = TokensClient::new(alice.channel())
        .create_token(CreateTokenRequest {
            principal: "mallory".into(),
            tenant: "main".into(),
            permissions: vec!["admin".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let listed = TokensClient::new(alice.channel()).list_tokens(ListTokensRequest {}).await.unwrap();
    assert!(listed.into_inner().tokens.is_empty(), "non-admins see no tokens");

    // Revocation takes effect at once on the serving node.
    let id = created.info.unwrap().id;
    TokensClient::new(admin.channel()).revoke_token(RevokeTokenRequest { id: id.clone() }).await.unwrap();
    let err = update_ac(&alice, "main.dev").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("revoked") && !err.message().contains(&created.token),
        "{}",
        err.message()
    );

    // Expiry is enforced.
    let short = bootstrap_token(&file, "temp", "main", "read", "1s");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let err = find_missing(&connect(&with(&short)).await.unwrap(), "main").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());
}

#[tokio::test]
async fn revocation_reaches_other_nodes_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shared-tokens.json");
    let admin_token = bootstrap_token(&file, "ops", "*", "admin", "never");
    let user_token = bootstrap_token(&file, "bob", "main", "read", "30d");
    let a = Kiln::start_with_config(&token_config(&file, ""));
    let b = Kiln::start_with_config(&token_config(&file, ""));
    let on = |k: &Kiln, t: &str| ClientOptions { token: Some(t.to_owned()), ..opts(k.remote()) };
    let bob_b = connect(&on(&b, &user_token)).await.unwrap();
    find_missing(&bob_b, "main").await.unwrap();

    // Revoke through node A's admin API (the CLI), then watch node B.
    let id = kiln_auth::tokens::TokenStore::open(&file)
        .unwrap()
        .list()
        .into_iter()
        .find(|r| r.principal == "bob")
        .unwrap()
        .id;
    let (ok, _, err) = kiln(&["token", "--remote", &a.remote(), "--token", &admin_token, "revoke", &id]);
    assert!(ok, "{err}");
    let started = std::time::Instant::now();
    loop {
        if find_missing(&bob_b, "main").await.is_err() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "node B still accepts a revoked token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn basic_auth_from_htpasswd_with_reload() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let bcrypt_hash = bcrypt::hash("s3cret", 4).unwrap();
    // apr1 hash of "secret" with salt abcdefgh (openssl passwd -apr1).
    std::fs::write(&htpasswd, format!("alice:{bcrypt_hash}\nbob:$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/\n"))
        .unwrap();
    let config = format!(
        "[auth]\nhtpasswd = \"{}\"\nreload_interval_ms = 200\nidentity_header = \"x-build-user\"\n\n[[auth.rules]]\nprincipal = \"*\"\ntenant = \"*\"\npermissions = [\"read\", \"write\"]\n",
        toml_path(&htpasswd)
    );
    let kiln = Kiln::start_with_config(&config);
    let basic = |cred: &str| ClientOptions { basic: Some(cred.to_owned()), ..opts(kiln.remote()) };
    update_ac(&connect(&basic("alice:s3cret")).await.unwrap(), "main").await.unwrap();
    find_missing(&connect(&basic("bob:secret")).await.unwrap(), "main").await.unwrap();
    let err = find_missing(&connect(&basic("bob:wrong")).await.unwrap(), "main").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains("wrong\""), "{}", err.message());

    std::fs::write(&htpasswd, "bob:$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = find_missing(&connect(&basic("alice:s3cret")).await.unwrap(), "main").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "alice was removed from the file");
}

#[tokio::test]
async fn identity_header_can_be_required_and_health_is_public() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let token = bootstrap_token(&file, "ci", "main", "read", "1d");
    let kiln = Kiln::start_with_config(&token_config(
        &file,
        "identity_header = \"x-build-user\"\nidentity_header_required = true\n",
    ));
    let conn = connect(&ClientOptions { token: Some(token), ..opts(kiln.remote()) }).await.unwrap();
    let err = find_missing(&conn, "main").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("x-build-user"), "{}", err.message());

    let mut health = tonic_health::pb::health_client::HealthClient::new(kiln.channel().await);
    let resp = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(
        resp.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn token_cli_rotate_and_list_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let admin = bootstrap_token(&file, "ops", "main", "admin", "never");
    let server = Kiln::start_with_config(&token_config(&file, ""));
    let remote = server.remote();
    // `kiln token ARGS` against the server, as the admin.
    let as_admin = |args: &[&str]| {
        let mut all = vec!["token", "--remote", remote.as_str(), "--token", admin.as_str()];
        all.extend_from_slice(args);
        kiln(&all)
    };
    let (ok, ci_token, err) = as_admin(&[
        "create",
        "--principal",
        "ci",
        "--tenant",
        "main.ci",
        "--perm",
        "read, write",
        "--expires",
        "30d",
    ]);
    assert!(ok, "{err}");
    let ci_token = ci_token.trim().to_owned();
    let (ok, listed, _) = as_admin(&["list"]);
    assert!(ok);
    let id = listed.lines().find(|l| l.contains("\tci\t")).unwrap().split('\t').next().unwrap().to_owned();
    assert!(listed.contains("cas-read,cas-write,ac-read,ac-write"), "{listed}");

    let (ok, rotated, err) = as_admin(&["rotate", &id]);
    assert!(ok, "{err}");
    let with = |t: &str| ClientOptions { token: Some(t.to_owned()), ..opts(remote.clone()) };
    update_ac(&connect(&with(rotated.trim())).await.unwrap(), "main.ci").await.unwrap();
    let err = update_ac(&connect(&with(&ci_token)).await.unwrap(), "main.ci").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "the old token stops working");
    let (_, listed, _) = as_admin(&["list"]);
    assert!(listed.lines().any(|l| l.starts_with(&id) && l.ends_with("revoked")), "{listed}");

    // An admin of `main` cannot mint tokens for another tenant.
    let (ok, _, err) = as_admin(&["create", "--principal", "x", "--tenant", "other", "--perm", "read"]);
    assert!(!ok && (err.contains("PermissionDenied") || err.contains("lacks the admin permission")), "{err}");
    // Bad permission names are refused with a precise message.
    let (ok, _, err) = as_admin(&["create", "--principal", "x", "--tenant", "main", "--perm", "fly"]);
    assert!(!ok && err.contains("unknown permission"), "{err}");
}

#[tokio::test]
async fn admin_api_refuses_bad_requests_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let admin = bootstrap_token(&file, "ops", "*", "admin", "never");
    let server = Kiln::start_with_config(&token_config(&file, ""));
    let conn = connect(&ClientOptions { token: Some(admin), ..opts(server.remote()) }).await.unwrap();
    let mut api = TokensClient::new(conn.channel());
    let create = |principal: &str, tenant: &str, perms: &[&str], ttl: i64| CreateTokenRequest {
        principal: principal.into(),
        tenant: tenant.into(),
        permissions: perms.iter().map(|p| (*p).to_owned()).collect(),
        ttl_seconds: ttl,
    };
    for (req, needle) in [
        (create("", "main", &["read"], 0), "principal"),
        (create("ci", "main/blobs", &["read"], 0), "reserved"),
        (create("ci", "main", &[], 0), "at least one permission"),
        (create("ci", "main", &["fly"], 0), "unknown permission"),
        (create("ci", "main", &["read"], -5), "negative"),
    ] {
        let err = api.create_token(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    let err = api.revoke_token(RevokeTokenRequest { id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let created = api.create_token(create("ci", "main", &["read"], 0)).await.unwrap().into_inner();
    let id = created.info.unwrap().id;
    api.revoke_token(RevokeTokenRequest { id: id.clone() }).await.unwrap();
    let err = api.rotate_token(kiln_proto::kiln::admin::RotateTokenRequest { id }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a revoked token cannot be rotated");

    let anon = connect(&opts(server.remote())).await.unwrap();
    let err = TokensClient::new(anon.channel()).list_tokens(ListTokensRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}
