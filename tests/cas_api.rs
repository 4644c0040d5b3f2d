//! ContentAddressableStorage and Capabilities against a real `kiln serve`.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use common::Kiln;
use kiln_proto::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory, DirectoryNode, FileNode,
    FindMissingBlobsRequest, GetCapabilitiesRequest, GetTreeRequest, batch_update_blobs_request, compressor,
    digest_function,
};
use kiln_proto::{Digest, DigestFunction};
use prost::Message;
use tonic::Code;

fn sha(data: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(data)
}

fn blob(data: &[u8]) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request {
        digest: Some(sha(data).to_proto()),
        data: data.to_vec(),
        compressor: compressor::Value::Identity as i32,
    }
}

fn missing_req(digests: &[Digest]) -> FindMissingBlobsRequest {
    FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: digests.iter().map(Digest::to_proto).collect(),
        digest_function: 0,
    }
}

#[tokio::test]
async fn capabilities_advertise_what_is_served() {
    let kiln = Kiln::start();
    let caps = kiln.capabilities().await.get_capabilities(GetCapabilitiesRequest::default()).await.unwrap();
    let caps = caps.into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![digest_function::Value::Sha256 as i32, digest_function::Value::Blake3 as i32]
    );
    assert_eq!(cache.supported_compressors, vec![compressor::Value::Zstd as i32]);
    assert_eq!(cache.supported_batch_update_compressors, vec![compressor::Value::Zstd as i32]);
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    assert!(cache.action_cache_update_capabilities.unwrap().update_enabled);
    assert!(caps.execution_capabilities.unwrap().exec_enabled, "kiln serve executes too");
    assert_eq!(caps.low_api_version.unwrap().major, 2);
    let high = caps.high_api_version.unwrap();
    assert_eq!((high.major, high.minor), (2, 3));

    let bad = GetCapabilitiesRequest { instance_name: "a/blobs".into() };
    let err = kiln.capabilities().await.get_capabilities(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn find_missing_and_batch_round_trip() {
    let kiln = Kiln::start();
    let mut cas = kiln.cas().await;
    let (a, b) = (b"alpha".as_slice(), b"beta".as_slice());
    let empty = DigestFunction::Sha256.empty();

    let missing = cas.find_missing_blobs(missing_req(&[sha(a), sha(b), empty])).await.unwrap().into_inner();
    assert_eq!(
        missing.missing_blob_digests,
        vec![sha(a).to_proto(), sha(b).to_proto()],
        "empty blob always exists"
    );

    let req = BatchUpdateBlobsRequest { requests: vec![blob(a), blob(b)], ..Default::default() };
    let resp = cas.batch_update_blobs(req).await.unwrap().into_inner();
    assert!(resp.responses.iter().all(|r| r.status.as_ref().unwrap().code == 0), "{resp:?}");
    let missing = cas.find_missing_blobs(missing_req(&[sha(a), sha(b)])).await.unwrap().into_inner();
    assert!(missing.missing_blob_digests.is_empty());

    let gone = sha(b"never");
    let req = BatchReadBlobsRequest {
        digests: vec![sha(a).to_proto(), gone.to_proto(), empty.to_proto()],
        ..Default::default()
    };
    let resp = cas.batch_read_blobs(req).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].data, a);
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    assert_eq!(resp.responses[1].status.as_ref().unwrap().code, Code::NotFound as i32);
    assert!(resp.responses[1].data.is_empty());
    assert_eq!(resp.responses[2].status.as_ref().unwrap().code, 0);
}

#[tokio::test]
async fn batch_update_verifies_each_blob() {
    let kiln = Kiln::start();
    let mut cas = kiln.cas().await;
    let mut wrong_hash = blob(b"payload");
    wrong_hash.data = b"PAYLOAD".to_vec();
    let mut wrong_size = blob(b"sized");
    wrong_size.digest.as_mut().unwrap().size_bytes = 4;
    let mut bad_digest = blob(b"x");
    bad_digest.digest.as_mut().unwrap().hash = "xyz".into();
    let mut bad_compressor = blob(b"y");
    bad_compressor.compressor = compressor::Value::Deflate as i32;
    let mut bad_zstd = blob(b"z");
    bad_zstd.compressor = compressor::Value::Zstd as i32;
    let good_zstd = batch_update_blobs_request::Request {
        digest: Some(sha(&[9u8; 5000]).to_proto()),
        data: zstd::bulk::compress(&[9u8; 5000], 3).unwrap(),
        compressor: compressor::Value::Zstd as i32,
    };
    let req = BatchUpdateBlobsRequest {
        requests: vec![wrong_hash, wrong_size, bad_digest, bad_compressor, bad_zstd, good_zstd, blob(b"ok")],
        ..Default::default()
    };
    let resp = cas.batch_update_blobs(req).await.unwrap().into_inner();
    let codes: Vec<i32> = resp.responses.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    let inv = Code::InvalidArgument as i32;
    assert_eq!(codes, vec![inv, inv, inv, inv, inv, 0, 0], "{resp:?}");
    assert!(resp.responses[0].status.as_ref().unwrap().message.contains("does not match"));
    let missing =
        cas.find_missing_blobs(missing_req(&[sha(b"payload"), sha(b"sized"), sha(&[9u8; 5000])])).await;
    let missing = missing.unwrap().into_inner().missing_blob_digests;
    assert_eq!(
        missing,
        vec![sha(b"payload").to_proto(), sha(b"sized").to_proto()],
        "refused blobs are not stored"
    );
}

#[tokio::test]
async fn blake3_is_honoured_everywhere() {
    let kiln = Kiln::start();
    let mut cas = kiln.cas().await;
    let d = DigestFunction::Blake3.compute(b"blake");
    let req = BatchUpdateBlobsRequest {
        requests: vec![batch_update_blobs_request::Request {
            digest: Some(d.to_proto()),
            data: b"blake".to_vec(),
            compressor: 0,
        }],
        digest_function: digest_function::Value::Blake3 as i32,
        ..Default::default()
    };
    let resp = cas.batch_update_blobs(req.clone()).await.unwrap().into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    // Without digest_function the hash is taken for SHA-256 and fails to verify.
    let resp = cas.batch_update_blobs(BatchUpdateBlobsRequest { digest_function: 0, ..req }).await.unwrap();
    assert_eq!(resp.into_inner().responses[0].status.as_ref().unwrap().code, Code::InvalidArgument as i32);
    let mut find = missing_req(&[d]);
    find.digest_function = digest_function::Value::Blake3 as i32;
    assert!(cas.find_missing_blobs(find.clone()).await.unwrap().into_inner().missing_blob_digests.is_empty());
    find.digest_function = 0;
    assert_eq!(cas.find_missing_blobs(find).await.unwrap().into_inner().missing_blob_digests.len(), 1);
}

#[tokio::test]
async fn call_level_errors_are_precise() {
    let kiln = Kiln::start();
    let mut cas = kiln.cas().await;
    let bad = kiln_proto::reapi::Digest { hash: "ABC".into(), size_bytes: 1 };
    let err = cas
        .find_missing_blobs(FindMissingBlobsRequest { blob_digests: vec![bad], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("digest #0"), "{}", err.message());

    let negative = kiln_proto::reapi::Digest { hash: sha(b"").hash_hex(), size_bytes: -5 };
    let err = cas
        .find_missing_blobs(FindMissingBlobsRequest { blob_digests: vec![negative], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = cas
        .find_missing_blobs(FindMissingBlobsRequest { digest_function: 3, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("md5"));

    let err = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "x/uploads".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let many = vec![sha(b"d").to_proto(); 65_537];
    let err = cas
        .find_missing_blobs(FindMissingBlobsRequest { blob_digests: many, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 65536"));

    // Over max_batch_total_size_bytes: refused for the whole call.
    let big = vec![1u8; 3 << 20];
    let req = BatchUpdateBlobsRequest { requests: vec![blob(&big), blob(&big[1..])], ..Default::default() };
    let err = cas.batch_update_blobs(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("max_batch_total_size_bytes"), "{}", err.message());
    let req = BatchReadBlobsRequest {
        digests: vec![sha(&big).to_proto(), sha(&big[1..]).to_proto()],
        ..Default::default()
    };
    assert_eq!(cas.batch_read_blobs(req).await.unwrap_err().code(), Code::InvalidArgument);

    // A message over the gRPC limit is refused before it is decoded (tonic
    // reports OUT_OF_RANGE where grpc-java would say RESOURCE_EXHAUSTED).
    let huge = vec![0u8; 20 << 20];
    let req = BatchUpdateBlobsRequest { requests: vec![blob(&huge)], ..Default::default() };
    let err = cas.max_encoding_message_size(64 << 20).batch_update_blobs(req).await.unwrap_err();
    assert!(matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted), "{err:?}");
    assert!(err.message().contains("16777216"), "{}", err.message());
}

#[tokio::test]
async fn batch_read_with_zstd() {
    let kiln = Kiln::start();
    let mut cas = kiln.cas().await;
    let data = vec![b'k'; 100_000];
    cas.batch_update_blobs(BatchUpdateBlobsRequest { requests: vec![blob(&data)], ..Default::default() })
        .await
        .unwrap();
    let req = BatchReadBlobsRequest {
        digests: vec![sha(&data).to_proto()],
        acceptable_compressors: vec![compressor::Value::Zstd as i32],
        ..Default::default()
    };
    let resp = cas.batch_read_blobs(req).await.unwrap().into_inner();
    let r = &resp.responses[0];
    assert_eq!(r.compressor, compressor::Value::Zstd as i32);
    assert!(r.data.len() < 1000);
    assert_eq!(zstd::bulk::decompress(&r.data, 200_000).unwrap(), data);
}

fn dir(files: &[&str], dirs: &[(&str, Digest)]) -> Directory {
    Directory {
        files: files
            .iter()
            .map(|f| FileNode {
                name: (*f).into(),
                digest: Some(sha(f.as_bytes()).to_proto()),
                ..Default::default()
            })
            .collect(),
        directories: dirs
            .iter()
            .map(|(n, d)| DirectoryNode { name: (*n).into(), digest: Some(d.to_proto()) })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn get_tree_pages_through_the_whole_tree() {
    let kiln = Kiln::start();
    let mut cas = kiln.cas().await;
    // root -> a -> (c, d) ; root -> b ; d appears twice but is returned once.
    let c = dir(&["c1"], &[]);
    let d = dir(&["d1", "d2"], &[]);
    let a = dir(&[], &[("c", sha(&c.encode_to_vec())), ("d", sha(&d.encode_to_vec()))]);
    let b = dir(&["b1"], &[("d", sha(&d.encode_to_vec()))]);
    let missing = dir(&["gone"], &[]);
    let root = dir(
        &["r"],
        &[
            ("a", sha(&a.encode_to_vec())),
            ("b", sha(&b.encode_to_vec())),
            ("m", sha(&missing.encode_to_vec())),
        ],
    );
    let all = [&c, &d, &a, &b, &root];
    let requests = all.iter().map(|x| blob(&x.encode_to_vec())).collect();
    cas.batch_update_blobs(BatchUpdateBlobsRequest { requests, ..Default::default() }).await.unwrap();

    let mut token = String::new();
    let mut seen = Vec::new();
    let mut calls = 0;
    loop {
        calls += 1;
        let req = GetTreeRequest {
            root_digest: Some(sha(&root.encode_to_vec()).to_proto()),
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        };
        let mut stream = cas.get_tree(req).await.unwrap().into_inner();
        // Read only the first page of each stream, then resume with its token.
        let page = stream.message().await.unwrap().unwrap();
        assert!(page.directories.len() <= 2);
        seen.extend(page.directories);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(calls < 10);
    }
    assert_eq!(seen.len(), 5, "missing subdirectories are omitted, duplicates returned once");
    assert_eq!(seen[0], root);
    assert!(seen.contains(&d) && seen.contains(&c));

    let err = cas
        .get_tree(GetTreeRequest { root_digest: Some(sha(b"nothing").to_proto()), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = cas
        .get_tree(GetTreeRequest {
            root_digest: Some(sha(&root.encode_to_vec()).to_proto()),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = cas.get_tree(GetTreeRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("root_digest is required"));
}

#[tokio::test]
async fn get_tree_reports_blobs_that_are_not_directories() {
    let kiln = Kiln::start();
    let mut cas = kiln.cas().await;
    let not_a_directory = b"\xff\xff\xff\xff not a Directory message".to_vec();
    let root = dir(&["r"], &[("broken", sha(&not_a_directory))]);
    let requests = vec![blob(&not_a_directory), blob(&root.encode_to_vec())];
    cas.batch_update_blobs(BatchUpdateBlobsRequest { requests, ..Default::default() }).await.unwrap();
    let req =
        GetTreeRequest { root_digest: Some(sha(&root.encode_to_vec()).to_proto()), ..Default::default() };
    let mut stream = cas.get_tree(req).await.unwrap().into_inner();
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a tree with a broken directory was returned as if whole"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&sha(&not_a_directory).hash_hex()), "{}", err.message());
}

#[tokio::test]
async fn get_tree_walks_are_bounded() {
    let kiln = Kiln::start_with_config("[limits]\ntree_walks_max = 1\nadmission_timeout_ms = 300\n");
    let mut cas = kiln.cas().await;
    // A tree of 300 directories of ~4 KiB each, far more than a stalled
    // reader's 64 KiB window and the server's send buffer.
    let long = |i: usize, j: usize| format!("file-{i:04}-{j:02}-{}", "n".repeat(80));
    let leaves: Vec<Directory> = (0..300)
        .map(|i| {
            let names: Vec<String> = (0..30).map(|j| long(i, j)).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            dir(&refs, &[])
        })
        .collect();
    let children: Vec<(String, Digest)> =
        leaves.iter().enumerate().map(|(i, d)| (format!("d{i}"), sha(&d.encode_to_vec()))).collect();
    let child_refs: Vec<(&str, Digest)> = children.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    let root = dir(&[], &child_refs);
    for chunk in leaves.chunks(100) {
        let requests = chunk.iter().map(|d| blob(&d.encode_to_vec())).collect();
        cas.batch_update_blobs(BatchUpdateBlobsRequest { requests, ..Default::default() }).await.unwrap();
    }
    let requests = vec![blob(&root.encode_to_vec())];
    cas.batch_update_blobs(BatchUpdateBlobsRequest { requests, ..Default::default() }).await.unwrap();
    let req = || GetTreeRequest {
        root_digest: Some(sha(&root.encode_to_vec()).to_proto()),
        page_size: 1,
        ..Default::default()
    };
    // A Remote Asset naming the tree walks it too, on the same turns (its
    // files, whose contents are their names, must be in the CAS first).
    let names: Vec<String> = (0..300).flat_map(|i| (0..30).map(move |j| long(i, j))).collect();
    for chunk in names.chunks(1000) {
        let requests = chunk.iter().map(|n| blob(n.as_bytes())).collect();
        cas.batch_update_blobs(BatchUpdateBlobsRequest { requests, ..Default::default() }).await.unwrap();
    }
    let asset = kiln_proto::asset::PushDirectoryRequest {
        uris: vec!["https://example.com/tree".into()],
        root_directory_digest: Some(sha(&root.encode_to_vec()).to_proto()),
        ..Default::default()
    };
    kiln_proto::asset::push_client::PushClient::new(kiln.channel().await)
        .push_directory(asset)
        .await
        .unwrap();
    // A client that starts a walk and stops reading holds the only turn...
    let mut stalled =
        kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
            kiln.slow_reader_channel().await,
        );
    let held = stalled.get_tree(req()).await.unwrap().into_inner();
    // ...so another walk waits admission_timeout_ms, then is refused.
    let err = match cas.get_tree(req()).await {
        Err(e) => e,
        Ok(_) => panic!("a second walk started while the only turn was held"),
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("tree_walks_max"), "{}", err.message());
    let fetch = kiln_proto::asset::FetchDirectoryRequest {
        uris: vec!["https://example.com/tree".into()],
        ..Default::default()
    };
    let err = kiln_proto::asset::fetch_client::FetchClient::new(kiln.channel().await)
        .fetch_directory(fetch)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("tree_walks_max"), "{}", err.message());
    // Once the stalled client goes away, walks run again.
    drop(held);
    drop(stalled);
    let pages = common::eventually(common::RELOAD_WAIT, "the turn to come back", || {
        let mut cas = cas.clone();
        async move {
            let mut stream = cas.get_tree(req()).await.ok()?.into_inner();
            let mut n = 0;
            while let Some(page) = stream.message().await.ok()? {
                n += page.directories.len();
            }
            Some(n)
        }
    })
    .await;
    assert_eq!(pages, 301);
}

#[tokio::test]
async fn get_tree_refuses_a_tree_past_tree_directories_max() {
    let kiln = Kiln::start_with_config("[limits]\ntree_directories_max = 4\n");
    let mut cas = kiln.cas().await;
    let names: Vec<String> = (0..4).map(|i| format!("f{i}")).collect();
    let leaves: Vec<Directory> = names.iter().map(|n| dir(&[n.as_str()], &[])).collect();
    let children: Vec<(&str, Digest)> =
        names.iter().zip(&leaves).map(|(n, d)| (n.as_str(), sha(&d.encode_to_vec()))).collect();
    let small = dir(&[], &children[..3]);
    let large = dir(&[], &children);
    let mut requests: Vec<_> = leaves.iter().map(|d| blob(&d.encode_to_vec())).collect();
    requests.extend([blob(&small.encode_to_vec()), blob(&large.encode_to_vec())]);
    cas.batch_update_blobs(BatchUpdateBlobsRequest { requests, ..Default::default() }).await.unwrap();
    let walk = |root: &Directory| {
        let req =
            GetTreeRequest { root_digest: Some(sha(&root.encode_to_vec()).to_proto()), ..Default::default() };
        let mut cas = cas.clone();
        async move {
            let mut stream = cas.get_tree(req).await?.into_inner();
            let mut n = 0;
            while let Some(page) = stream.message().await? {
                n += page.directories.len();
            }
            Ok::<_, tonic::Status>(n)
        }
    };
    assert_eq!(walk(&small).await.unwrap(), 4, "the root and three: at the bound");
    let err = walk(&large).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("more than 4 directories"), "{}", err.message());
}
