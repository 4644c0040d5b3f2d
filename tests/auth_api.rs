//! Authentication against a real `kiln serve`: bearer tokens and their
//! admin API, basic auth, the identity header.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use common::calls::{find_missing, opts, update_ac};
use common::{Kiln, RELOAD_WAIT, bootstrap_token, eventually, kiln, token_config};
use kiln_proto::kiln::admin::tokens_client::TokensClient;
use kiln_proto::kiln::admin::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest};
use kiln_tools::client::{ClientOptions, connect};
use tonic::Code;

#[tokio::test]
async fn bearer_tokens_grant_revoke_expire() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let admin_token = bootstrap_token(&file, "ops", "*", "all", "never");
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

    // Expiry is enforced: a token whose expiry has passed (here: set in the
    // file, which every node reloads) stops working.
    let temp = bootstrap_token(&file, "temp", "main", "read", "30d");
    let temp_conn = connect(&with(&temp)).await.unwrap();
    eventually(RELOAD_WAIT, "the new token to load", || async {
        find_missing(&temp_conn, "main").await.ok()
    })
    .await;
    let mut records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    for record in records["tokens"].as_array_mut().unwrap() {
        if record["principal"] == "temp" {
            record["expires_unix_seconds"] = serde_json::json!(1);
        }
    }
    common::pki::write_atomically(&file, &records.to_string());
    let err = eventually(RELOAD_WAIT, "the expiry to apply", || async {
        find_missing(&temp_conn, "main").await.err()
    })
    .await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());
}

#[tokio::test]
async fn revocation_reaches_other_nodes_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shared-tokens.json");
    let admin_token = bootstrap_token(&file, "ops", "*", "all", "never");
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
    // Node A applies it at once; node B once it reloads the shared file.
    let bob_a = connect(&on(&a, &user_token)).await.unwrap();
    assert_eq!(find_missing(&bob_a, "main").await.unwrap_err().code(), Code::Unauthenticated);
    let err = eventually(RELOAD_WAIT, "node B to see the revocation", || async {
        find_missing(&bob_b, "main").await.err()
    })
    .await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());
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
        htpasswd.display()
    );
    let kiln = Kiln::start_with_config(&config);
    let basic = |cred: &str| ClientOptions { basic: Some(cred.to_owned()), ..opts(kiln.remote()) };
    update_ac(&connect(&basic("alice:s3cret")).await.unwrap(), "main").await.unwrap();
    find_missing(&connect(&basic("bob:secret")).await.unwrap(), "main").await.unwrap();
    let err = find_missing(&connect(&basic("bob:wrong")).await.unwrap(), "main").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains("wrong\""), "{}", err.message());

    // A file caught empty or half-written keeps the last good users...
    let alice = connect(&basic("alice:s3cret")).await.unwrap();
    for broken in ["", "alice:$2b$04$trunc"] {
        std::fs::write(&htpasswd, broken).unwrap();
        eventually(RELOAD_WAIT, "the broken file to be seen and refused", || async {
            kiln.log_contains("htpasswd file changed but does not load").then_some(())
        })
        .await;
        update_ac(&alice, "main").await.unwrap_or_else(|e| panic!("after {broken:?}: {e}"));
        kiln.clear_log();
    }
    // ...and a good one replaces them.
    std::fs::write(&htpasswd, "bob:$apr1$abcdefgh$h9FWgUz3n9YxylKLlR5SQ/\n").unwrap();
    let err = eventually(RELOAD_WAIT, "alice's removal to apply", || async {
        find_missing(&connect(&basic("alice:s3cret")).await.unwrap(), "main").await.err()
    })
    .await;
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
    let admin = bootstrap_token(&file, "ops", "main", "all", "never");
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
    let admin = bootstrap_token(&file, "ops", "*", "all", "never");
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
