//! The Remote Asset API against a real `kiln serve`: pushed assets are
//! fetched by any of their URIs with the same qualifiers, per tenant
//! (subtenants read through), across a restart; only while their content
//! is in the CAS, unexpired and new enough; bad requests get precise
//! statuses.

mod common;

use std::time::Duration;

use common::origin::Origin;
use common::{Kiln, bootstrap_token, token_config};
use kiln_proto::asset::fetch_client::FetchClient;
use kiln_proto::asset::push_client::PushClient;
use kiln_proto::asset::{
    FetchBlobRequest, FetchDirectoryRequest, PushBlobRequest, PushDirectoryRequest, Qualifier,
};
use kiln_proto::google::protobuf::Timestamp;
use kiln_proto::{Digest, DigestFunction, reapi};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

fn q(name: &str, value: &str) -> Qualifier {
    Qualifier { name: name.into(), value: value.into() }
}

fn uris(list: &[&str]) -> Vec<String> {
    list.iter().map(|u| (*u).to_owned()).collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn push_blob(instance: &str, at: &[&str], qualifiers: Vec<Qualifier>, blob: Digest) -> PushBlobRequest {
    PushBlobRequest {
        instance_name: instance.into(),
        uris: uris(at),
        qualifiers,
        blob_digest: Some(blob.to_proto()),
        ..Default::default()
    }
}

fn fetch_blob(instance: &str, at: &[&str], qualifiers: Vec<Qualifier>) -> FetchBlobRequest {
    FetchBlobRequest { instance_name: instance.into(), uris: uris(at), qualifiers, ..Default::default() }
}

/// The blob FetchBlob found, or the code it failed with. A failure is a
/// gRPC error (with no blob in an OK response, which Bazel 4.2.3 would
/// take for an empty file).
async fn fetched(channel: Channel, request: FetchBlobRequest) -> Result<(String, Digest), i32> {
    match FetchClient::new(channel).fetch_blob(request).await {
        Ok(r) => {
            let r = r.into_inner();
            assert_eq!(r.status.as_ref().map_or(0, |s| s.code), 0, "{r:?}");
            Ok((r.uri, Digest::from_proto(None, &r.blob_digest.unwrap()).unwrap()))
        }
        Err(status) => Err(status.code() as i32),
    }
}

const NOT_FOUND: i32 = Code::NotFound as i32;

#[tokio::test]
async fn pushed_assets_are_fetched_by_any_uri_and_the_same_qualifiers_across_a_restart() {
    let kiln = Kiln::start();
    let data = b"an archive".to_vec();
    let blob = DigestFunction::Sha256.compute(&data);
    kiln.upload("main", &[&data]).await;
    let mut push = PushClient::new(kiln.channel().await);
    let qualifiers = vec![q("checksum.sri", "sha256-abc"), q("vcs.branch", "main")];
    let at = ["https://example.com/a.tar.gz", "https://mirror.example.com/a.tar.gz"];
    push.push_blob(push_blob("main", &at, qualifiers.clone(), blob)).await.unwrap();

    // Any URI, the qualifiers in any order; from a subtenant too.
    let reversed: Vec<Qualifier> = qualifiers.iter().rev().cloned().collect();
    let found =
        fetched(kiln.channel().await, fetch_blob("main.dev", &["https://nowhere/x", at[1]], reversed)).await;
    assert_eq!(found, Ok((at[1].to_owned(), blob)));
    // Other qualifiers, none, another tenant: not found, inline.
    for (instance, qualifiers) in
        [("main", vec![q("checksum.sri", "sha256-other")]), ("main", vec![]), ("other", qualifiers.clone())]
    {
        let r = fetched(kiln.channel().await, fetch_blob(instance, &at, qualifiers.clone())).await;
        assert_eq!(r, Err(NOT_FOUND), "{instance} {qualifiers:?}");
    }
    // Newer content only: pushed before now + 60 s does not qualify.
    let mut newer = fetch_blob("main", &at, qualifiers.clone());
    newer.oldest_content_accepted = Some(Timestamp { seconds: unix_now() + 60, nanos: 0 });
    assert_eq!(fetched(kiln.channel().await, newer).await, Err(NOT_FOUND));

    // Persistent: the block store keeps it across a restart.
    let (status, _, dir) = kiln.stop_keeping_data();
    assert!(status.success());
    let kiln = Kiln::start_in(dir, &[]);
    let found = fetched(kiln.channel().await, fetch_blob("main", &at[..1], qualifiers)).await;
    assert_eq!(found, Ok((at[0].to_owned(), blob)));
}

#[tokio::test]
async fn an_asset_is_served_only_while_complete_and_unexpired() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    // A pusher that may not read the CAS cannot be told what it lacks.
    let pusher = bootstrap_token(&file, "pusher", "main", "ac-write", "never");
    let reader = bootstrap_token(&file, "reader", "main", "read,cas-write", "never");
    let all = bootstrap_token(&file, "all", "main", "all", "never");
    let kiln = Kiln::start_with_config(&token_config(&file, ""));
    let as_token = |token: String| {
        let remote = kiln.remote();
        async move { common::calls::with_token(remote, &token).await.channel() }
    };
    let (pusher, reader) = (as_token(pusher).await, as_token(reader).await);

    // A directory whose file is not uploaded yet.
    let file_data = b"source".to_vec();
    let file_digest = DigestFunction::Sha256.compute(&file_data);
    let root = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "a.c".into(),
            digest: Some(file_digest.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let root_data = root.encode_to_vec();
    let root_digest = DigestFunction::Sha256.compute(&root_data);
    let mut upload =
        kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
            reader.clone(),
        );
    upload.batch_update_blobs(common::upload_request("main", &[&root_data])).await.unwrap();
    let push = PushDirectoryRequest {
        instance_name: "main".into(),
        uris: uris(&["git+https://example.com/repo@v1"]),
        root_directory_digest: Some(root_digest.to_proto()),
        ..Default::default()
    };
    PushClient::new(pusher).push_directory(push).await.unwrap();
    let fetch = FetchDirectoryRequest {
        instance_name: "main".into(),
        uris: uris(&["git+https://example.com/repo@v1"]),
        ..Default::default()
    };
    let err = FetchClient::new(reader.clone()).fetch_directory(fetch.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "its file is not in the CAS yet");
    upload.batch_update_blobs(common::upload_request("main", &[&file_data])).await.unwrap();
    let r = FetchClient::new(reader.clone()).fetch_directory(fetch).await.unwrap().into_inner();
    assert_eq!(r.root_directory_digest, Some(root_digest.to_proto()), "{r:?}");

    // A pusher who may read the CAS is told what is missing.
    let missing = DigestFunction::Sha256.compute(b"never uploaded");
    let mut push = push_blob("main", &["https://example.com/b"], vec![], missing);
    push.expire_at = Some(Timestamp { seconds: unix_now() + 3600, nanos: 0 });
    let err = PushClient::new(kiln.channel().await).push_blob(push.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "anonymous callers have no token");
    let all = as_token(all).await;
    let err = PushClient::new(all.clone()).push_blob(push).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&missing.hash_hex()), "{}", err.message());

    // Expiry: served until expire_at, then not.
    upload.batch_update_blobs(common::upload_request("main", &[b"soon gone"])).await.unwrap();
    let soon = DigestFunction::Sha256.compute(b"soon gone");
    let mut push = push_blob("main", &["https://example.com/c"], vec![], soon);
    let expire = unix_now() + 2;
    push.expire_at = Some(Timestamp { seconds: expire, nanos: 0 });
    PushClient::new(all.clone()).push_blob(push).await.unwrap();
    let fetch = fetch_blob("main", &["https://example.com/c"], vec![]);
    let first = FetchClient::new(reader.clone()).fetch_blob(fetch.clone()).await;
    if let Ok(first) = first.map(tonic::Response::into_inner)
        && unix_now() < expire
    {
        assert_eq!(first.expires_at.map(|t| t.seconds), Some(expire), "{first:?}");
        assert_eq!(first.blob_digest, Some(soon.to_proto()));
    }
    common::eventually(Duration::from_secs(30), "the asset to expire", || {
        let (reader, fetch) = (reader.clone(), fetch.clone());
        async move {
            let r = FetchClient::new(reader).fetch_blob(fetch).await;
            r.is_err_and(|e| e.code() == Code::NotFound).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn bad_asset_requests_get_invalid_argument_naming_the_field() {
    let kiln = Kiln::start();
    let blob = DigestFunction::Sha256.compute(b"x");
    kiln.upload("", &[b"x"]).await;
    let long = "u".repeat(9000);
    let many: Vec<&str> = (0..65).map(|_| "https://example.com/x").collect();
    let qualifiers = |n: usize| (0..n).map(|i| q(&format!("q{i}"), "v")).collect::<Vec<_>>();
    let mut bad_digest = push_blob("", &["https://example.com/x"], vec![], blob);
    bad_digest.blob_digest = Some(reapi::Digest { hash: "zz".into(), size_bytes: 1 });
    let mut past = push_blob("", &["https://example.com/x"], vec![], blob);
    past.expire_at = Some(Timestamp { seconds: 1, nanos: 0 });
    let pushes = [
        (push_blob("", &[], vec![], blob), "at least one URI"),
        (push_blob("", &many, vec![], blob), "65 URIs"),
        (push_blob("", &[&long], vec![], blob), "uris[0]"),
        (push_blob("", &["https://example.com/x"], vec![q("a", "1"), q("a", "2")], blob), "more than once"),
        (push_blob("", &["https://example.com/x"], qualifiers(65), blob), "65 qualifiers"),
        (push_blob("", &["https://example.com/x"], vec![q("", "1")], blob), "qualifiers[0]"),
        (bad_digest, "blob_digest"),
        (past, "expire_at"),
    ];
    let mut push = PushClient::new(kiln.channel().await);
    for (request, needle) in pushes {
        let err = push.push_blob(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(err.message().contains(needle) && err.message().len() < 1024, "{needle}: {}", err.message());
    }
    let mut fetch = FetchClient::new(kiln.channel().await);
    for (request, needle) in [
        (fetch_blob("", &[], vec![]), "at least one URI"),
        (fetch_blob("", &["https://example.com/x"], vec![q("a", "1"), q("a", "1")]), "more than once"),
    ] {
        let err = fetch.fetch_blob(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    let err = fetch
        .fetch_directory(FetchDirectoryRequest { instance_name: "bad/../name".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// The code and message a FetchBlob failed with ((0, "") when it did not).
async fn fetch_status(kiln: &Kiln, uri: &str, qualifiers: Vec<Qualifier>) -> (i32, String) {
    let request = fetch_blob("", &[uri], qualifiers);
    match FetchClient::new(kiln.channel().await).fetch_blob(request).await {
        Ok(_) => (0, String::new()),
        Err(e) => (e.code() as i32, e.message().to_owned()),
    }
}

#[tokio::test]
async fn blobs_nobody_pushed_are_fetched_once_from_an_allowed_origin() {
    use base64::Engine as _;
    use sha2::Digest as _;
    let body = b"archive bytes ".repeat(5000);
    let origin = Origin::start([("file".to_owned(), body.clone())].into());
    let base = origin.base();
    let kiln = Kiln::start_with_config(&format!(
        "[assets]\nfetch_from_origin = true\nfetch_allow = [\"{base}\"]\nfetch_private_addresses = true\n"
    ));
    let sri =
        format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&body)));
    let digest = DigestFunction::Sha256.compute(&body);
    let file = format!("{base}file");
    for _ in 0..2 {
        let found =
            fetched(kiln.channel().await, fetch_blob("", &[&file], vec![q("checksum.sri", &sri)])).await;
        assert_eq!(found, Ok((file.clone(), digest)));
    }
    assert_eq!(origin.hits("/file"), 1, "the second fetch came from the asset Kiln recorded");
    assert!(kiln.missing(&[digest]).await.is_empty(), "the download is in the CAS");

    // Identical fetches at once share one download.
    let slow = format!("{base}slow/file");
    let all = (0..4).map(|_| fetched_owned(&kiln, fetch_blob("", &[&slow], vec![])));
    for found in futures::future::join_all(all).await {
        assert_eq!(found.map(|(_, d)| d), Ok(digest));
    }
    assert_eq!(origin.hits("/slow/file"), 1);

    // Redirects are followed within the allow-list.
    let moved = format!("{base}moved/file");
    assert_eq!(
        fetched(kiln.channel().await, fetch_blob("", &[&moved], vec![])).await.map(|(_, d)| d),
        Ok(digest)
    );

    // A wrong checksum, a URL outside the allow-list, a missing file.
    let (code, message) = fetch_status(&kiln, &file, vec![q("checksum.sri", "sha256-AAAA")]).await;
    assert_eq!(code, Code::Aborted as i32, "{message}");
    assert!(message.contains("checksum.sri"), "{message}");
    let elsewhere = format!("http://127.0.0.2:{}/file", origin.port);
    let (code, message) = fetch_status(&kiln, &elsewhere, vec![]).await;
    assert_eq!(code, Code::PermissionDenied as i32, "{message}");
    assert!(message.contains("fetch_allow"), "{message}");
    let (code, message) = fetch_status(&kiln, &format!("{base}none"), vec![]).await;
    assert_eq!(code, Code::NotFound as i32, "{message}");

    // By default neither a loopback address nor a name resolving to one.
    let closed = Kiln::start_with_config(&format!(
        "[assets]\nfetch_from_origin = true\nfetch_allow = [\"{base}\", \"http://localhost:{}/\"]\n",
        origin.port
    ));
    let before = origin.hits("/file");
    for url in [file.clone(), format!("http://localhost:{}/file", origin.port)] {
        let (code, message) = fetch_status(&closed, &url, vec![]).await;
        assert_ne!(code, 0, "{url}");
        assert!(message.contains("fetch_private_addresses"), "{url}: {message}");
    }
    assert_eq!(origin.hits("/file"), before, "nothing reached the origin");
    let (ok, err) = common::serve_refused_config("[assets]\nfetch_from_origin = true\n");
    assert!(!ok && err.contains("fetch_allow"), "{err}");
}

async fn fetched_owned(kiln: &Kiln, request: FetchBlobRequest) -> Result<(String, Digest), i32> {
    fetched(kiln.channel().await, request).await
}

/// Past `fetch_bytes_max` and `fetch_redirects_max` a download stops with
/// a status naming the setting; settings whose downloads could not all fit
/// on the disk at once are refused at start.
#[tokio::test]
async fn downloads_past_their_bounds_are_refused_naming_the_setting() {
    let origin = Origin::start([("file".to_owned(), vec![7u8; 100_000])].into());
    let base = origin.base();
    let kiln = Kiln::start_with_config(&format!(
        "[assets]\nfetch_from_origin = true\nfetch_allow = [\"{base}\"]\nfetch_private_addresses = true\n\
         fetch_bytes_max = 65536\nfetch_redirects_max = 0\n"
    ));
    let (code, message) = fetch_status(&kiln, &format!("{base}file"), vec![]).await;
    assert_eq!(code, Code::ResourceExhausted as i32, "{message}");
    assert!(message.contains("fetch_bytes_max"), "{message}");
    let (code, message) = fetch_status(&kiln, &format!("{base}moved/file"), vec![]).await;
    assert_ne!(code, 0, "{message}");
    assert!(message.contains("redirects"), "{message}");
    assert_eq!(origin.hits("/file"), 1, "the redirect was not followed");
    let (ok, err) = common::serve_refused_config(&format!(
        "[assets]\nfetch_from_origin = true\nfetch_allow = [\"{base}\"]\nfetch_bytes_max = 1125899906842624\n"
    ));
    assert!(!ok && err.contains("fetches_max") && err.contains("fetch_bytes_max"), "{err}");
}
