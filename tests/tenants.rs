//! Tenants and privileges against a real `kiln serve`: what a token can do
//! (never more than its creator, never what rules grant certificate or
//! user principals), who sees inlined CAS bytes, how rules cover
//! subtenants, and that client input comes back bounded.

mod common;

use common::calls::{find_missing, get_ac, get_ac_result, opts, sha, update_ac, update_ac_with};
use common::{Kiln, bootstrap_token, token_config};
use kiln_proto::kiln::admin::tokens_client::TokensClient;
use kiln_proto::kiln::admin::{CreateTokenRequest, RotateTokenRequest};
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{ActionResult, BatchReadBlobsRequest, GetCapabilitiesRequest};
use kiln_tools::client::{ClientOptions, Connection, connect};
use tonic::Code;

async fn as_token(kiln: &Kiln, token: &str) -> Connection {
    common::calls::with_token(kiln.remote(), token).await
}

fn create(principal: &str, tenant: &str, perms: &[&str]) -> CreateTokenRequest {
    CreateTokenRequest {
        principal: principal.into(),
        tenant: tenant.into(),
        permissions: perms.iter().map(|p| (*p).to_owned()).collect(),
        ttl_seconds: 0,
    }
}

#[tokio::test]
async fn a_tenant_admin_cannot_mint_tokens_stronger_than_itself() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    // A rule written for certificate principals on another tenant.
    let rules =
        "[[auth.rules]]\nprincipal = \"ci-*\"\ntenant = \"other\"\npermissions = [\"read\", \"write\"]\n";
    let ops = bootstrap_token(&file, "ops", "*", "all", "never");
    let main_admin = bootstrap_token(&file, "main-admin", "main", "all", "never");
    let kiln = Kiln::start_with_config(&token_config(&file, rules));

    // The operator stores a result on `other`.
    let ops = as_token(&kiln, &ops).await;
    update_ac(&ops, "other").await.unwrap();

    // The admin of `main` mints a token whose principal the rule matches.
    let admin = as_token(&kiln, &main_admin).await;
    let minted = TokensClient::new(admin.channel())
        .create_token(create("ci-runner", "main", &["read", "write"]))
        .await
        .unwrap()
        .into_inner();
    let ci = as_token(&kiln, &minted.token).await;
    update_ac(&ci, "main").await.unwrap();
    for (what, result) in [("get", get_ac(&ci, "other").await), ("update", update_ac(&ci, "other").await)] {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{what}: {err:?}");
        assert!(err.message().contains("token:ci-runner"), "{what}: {}", err.message());
    }
    get_ac(&ops, "other").await.unwrap();

    // Nor can it grant on other tenants, or everywhere.
    let mut api = TokensClient::new(admin.channel());
    for (tenant, perms) in [("other", &["read"][..]), ("*", &["read"][..]), ("main", &["admin", "read"][..])]
    {
        let result = api.create_token(create("x", tenant, perms)).await;
        if tenant == "main" {
            result.unwrap();
            continue;
        }
        assert_eq!(result.unwrap_err().code(), Code::PermissionDenied, "{tenant}");
    }

    // An admin holding only read cannot grant write, nor rotate a write token.
    let reader_admin = bootstrap_token(&file, "reader-admin", "main", "admin,read", "never");
    let reader_admin = common::eventually(common::RELOAD_WAIT, "the new admin token", || async {
        let c = as_token(&kiln, &reader_admin).await;
        find_missing(&c, "main").await.ok().map(|()| c)
    })
    .await;
    let mut weak = TokensClient::new(reader_admin.channel());
    let err = weak.create_token(create("y", "main.dev", &["write"])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("cannot grant cas-write,ac-write"), "{}", err.message());
    weak.create_token(create("y", "main.dev", &["read"])).await.unwrap();
    let id = minted.info.unwrap().id;
    let err = weak.rotate_token(RotateTokenRequest { id }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "rotation hands out the grant again");
}

#[tokio::test]
async fn inlined_bytes_need_cas_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let writer = bootstrap_token(&file, "ci", "main", "read,write", "never");
    let ac_only = bootstrap_token(&file, "dashboard", "main", "ac-read", "never");
    let reader = bootstrap_token(&file, "dev", "main", "read", "never");
    let kiln = Kiln::start_with_config(&token_config(&file, ""));
    let result = ActionResult { stdout_raw: b"secret build output".to_vec(), ..Default::default() };
    update_ac_with(&as_token(&kiln, &writer).await, "main", result).await.unwrap();

    let dashboard = as_token(&kiln, &ac_only).await;
    let seen = get_ac_result(&dashboard, "main", true).await.unwrap();
    assert!(seen.stdout_raw.is_empty(), "inlined for a principal without cas-read");
    assert_eq!(
        seen.stdout_digest.unwrap(),
        sha(b"secret build output").to_proto(),
        "the digest still answers"
    );
    let err = ContentAddressableStorageClient::new(dashboard.channel())
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: "main".into(),
            digests: vec![sha(b"secret build output").to_proto()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let seen = get_ac_result(&as_token(&kiln, &reader).await, "main", true).await.unwrap();
    assert_eq!(seen.stdout_raw, b"secret build output");
}

#[tokio::test]
async fn rules_cover_subtenants_as_the_readme_says() {
    // README "Using Kiln from Bazel": CI writes `main`, everyone reads it,
    // and developers build on `main.dev.NAME`, reusing CI's results.
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let hash = |pw: &str| bcrypt::hash(pw, 4).unwrap();
    std::fs::write(&htpasswd, format!("ci-bot:{}\nalice:{}\n", hash("ci-pw"), hash("alice-pw"))).unwrap();
    let kiln = Kiln::start_with_config(&format!(
        "[auth]\nhtpasswd = \"{}\"\n\n\
         [[auth.rules]]\nprincipal = \"ci-*\"\ntenant = \"main\"\npermissions = [\"read\", \"write\"]\n\n\
         [[auth.rules]]\nprincipal = \"*\"\ntenant = \"main\"\npermissions = [\"read\"]\n",
        htpasswd.display()
    ));
    let basic = |cred: &str| ClientOptions { basic: Some(cred.to_owned()), ..opts(kiln.remote()) };
    let ci = connect(&basic("ci-bot:ci-pw")).await.unwrap();
    update_ac(&ci, "main").await.unwrap();
    update_ac(&ci, "main.ci.nightly").await.unwrap();
    let alice = connect(&basic("alice:alice-pw")).await.unwrap();
    // Reads on her subtenant fall through to CI's result on `main`.
    get_ac(&alice, "main.dev.alice").await.unwrap();
    find_missing(&alice, "main.dev.alice").await.unwrap();
    let err = update_ac(&alice, "main").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "developers cannot overwrite CI's results");
    let err = update_ac(&alice, "main.dev.alice").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "read on main is read on its subtenants, no more");
    assert_eq!(get_ac(&alice, "other").await.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn capabilities_need_some_permission_on_the_instance() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let token = bootstrap_token(&file, "ci", "main", "cas-read", "never");
    let kiln = Kiln::start_with_config(&token_config(&file, ""));
    let conn = as_token(&kiln, &token).await;
    let caps = |instance: &str| {
        let conn = conn.clone();
        let instance = instance.to_owned();
        async move {
            CapabilitiesClient::new(conn.channel())
                .get_capabilities(GetCapabilitiesRequest { instance_name: instance })
                .await
        }
    };
    caps("main").await.unwrap();
    caps("main.dev").await.unwrap();
    let err = caps("other").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("token:ci") && err.message().contains("other"), "{}", err.message());
    let anon = connect(&opts(kiln.remote())).await.unwrap();
    let err = CapabilitiesClient::new(anon.channel())
        .get_capabilities(GetCapabilitiesRequest { instance_name: "main".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn client_input_comes_back_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let token = bootstrap_token(&file, "ci", "main", "read", "never");
    let kiln = Kiln::start_with_config(&token_config(&file, ""));
    let conn = as_token(&kiln, &token).await;
    let huge = "x".repeat(200_000);
    for _ in 0..50 {
        let err = find_missing(&conn, &huge).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "the client sees the denial, not a metadata error");
        assert!(err.message().len() < 1024, "{} bytes", err.message().len());
        assert!(err.message().contains("200000 bytes"), "{}", err.message());
    }
    let err = get_ac(&conn, &format!("main/{}", "\n".repeat(5000))).await.unwrap_err();
    assert!(err.message().len() < 1024 && !err.message().contains('\n'), "{}", err.message());
    // Each denial was cut in the log, and 50 of them were logged twice
    // (the 1st and the 10th), not 50 times.
    let log = kiln.log();
    assert!(!log.contains(&"x".repeat(1000)), "a client string reached the log whole");
    let logged = log.lines().filter(|l| l.contains("permission denied")).count();
    assert!((1..=3).contains(&logged), "{logged} denial lines:\n{log}");
}
