//! Every service refuses a call its caller holds no permission for, with
//! PERMISSION_DENIED naming the principal, the permission and the
//! instance: each handler gets its store keys only from a permit (see
//! ARCHITECTURE.md, "Store keys are made from permits"), and these calls
//! show the checks are the right ones.

mod common;

use common::{Kiln, bootstrap_token, token_config};
use futures::StreamExt;
use kiln_proto::DigestFunction;
use kiln_proto::asset::fetch_client::FetchClient;
use kiln_proto::asset::push_client::PushClient;
use kiln_proto::asset::{FetchBlobRequest, PushBlobRequest};
use kiln_proto::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use kiln_proto::kiln::worker::workers_client::WorkersClient;
use kiln_proto::kiln::worker::{Register, WorkerMessage, worker_message};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, ExecuteRequest, FindMissingBlobsRequest, GetActionResultRequest,
    GetCapabilitiesRequest, GetTreeRequest, UpdateActionResultRequest,
};
use kiln_tools::client::{ClientOptions, Connection, connect};
use tonic::Code;

/// Each call of each service on `instance`, named, with its status code.
async fn every_call(conn: &Connection, instance: &str) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let digest = DigestFunction::Sha256.compute(b"x");
    let d = Some(digest.to_proto());
    let i = instance.to_owned();
    let blob = format!("{i}/blobs/{}/{}", digest.hash_hex(), digest.size_bytes());
    let upload = format!("{i}/uploads/0f8fad5b-d9cb-469f-a165-70867728950e/blobs/{}/1", digest.hash_hex());
    let mut cas = conn.cas();
    let mut bytestream = conn.bytestream();
    let mut ac = ActionCacheClient::new(conn.channel());
    let find = FindMissingBlobsRequest {
        instance_name: i.clone(),
        blob_digests: vec![d.clone().unwrap()],
        ..Default::default()
    };
    let read = BatchReadBlobsRequest {
        instance_name: i.clone(),
        digests: vec![d.clone().unwrap()],
        ..Default::default()
    };
    let tree = GetTreeRequest { instance_name: i.clone(), root_digest: d.clone(), ..Default::default() };
    let get =
        GetActionResultRequest { instance_name: i.clone(), action_digest: d.clone(), ..Default::default() };
    let update = UpdateActionResultRequest {
        instance_name: i.clone(),
        action_digest: d.clone(),
        action_result: Some(ActionResult::default()),
        ..Default::default()
    };
    let write = WriteRequest {
        resource_name: upload.clone(),
        write_offset: 0,
        finish_write: true,
        data: b"x".to_vec(),
    };
    let mut tree_call = cas.get_tree(tree).await;
    if let Ok(stream) = &mut tree_call {
        // The refusal may come as the stream's first message.
        if let Some(Err(e)) = stream.get_mut().next().await {
            tree_call = Err(e);
        }
    }
    let mut read_call = bytestream.read(ReadRequest { resource_name: blob, ..Default::default() }).await;
    if let Ok(stream) = &mut read_call
        && let Some(Err(e)) = stream.get_mut().next().await
    {
        read_call = Err(e);
    }
    let execute = ExecuteRequest { instance_name: i.clone(), action_digest: d.clone(), ..Default::default() };
    let mut execute_call = ExecutionClient::new(conn.channel()).execute(execute).await;
    if let Ok(stream) = &mut execute_call
        && let Some(Err(e)) = stream.get_mut().next().await
    {
        execute_call = Err(e);
    }
    vec![
        ("FindMissingBlobs", ok(cas.find_missing_blobs(find).await)),
        ("BatchUpdateBlobs", ok(cas.batch_update_blobs(common::upload_request(&i, &[b"x"])).await)),
        ("BatchReadBlobs", ok(cas.batch_read_blobs(read).await)),
        ("GetTree", ok(tree_call)),
        ("GetActionResult", ok(ac.get_action_result(get).await)),
        ("UpdateActionResult", ok(ac.update_action_result(update).await)),
        ("ByteStream.Read", ok(read_call)),
        ("ByteStream.Write", ok(bytestream.write(futures::stream::iter([write])).await)),
        (
            "QueryWriteStatus",
            ok(bytestream.query_write_status(QueryWriteStatusRequest { resource_name: upload }).await),
        ),
        (
            "GetCapabilities",
            ok(CapabilitiesClient::new(conn.channel())
                .get_capabilities(GetCapabilitiesRequest { instance_name: i.clone() })
                .await),
        ),
        ("Execute", ok(execute_call)),
        (
            "FetchBlob",
            ok(FetchClient::new(conn.channel())
                .fetch_blob(FetchBlobRequest {
                    instance_name: i.clone(),
                    uris: vec!["https://x/y".into()],
                    ..Default::default()
                })
                .await),
        ),
        (
            "PushBlob",
            ok(PushClient::new(conn.channel())
                .push_blob(PushBlobRequest {
                    instance_name: i.clone(),
                    uris: vec!["https://x/y".into()],
                    blob_digest: d.clone(),
                    ..Default::default()
                })
                .await),
        ),
    ]
}

/// The call's status alone.
fn ok<T>(r: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
    r.map(|_| ())
}

#[tokio::test]
async fn every_service_refuses_a_caller_without_the_permission() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let everything = bootstrap_token(&file, "main-all", "main", "all", "never");
    let reader = bootstrap_token(&file, "main-reader", "main", "cas-read", "never");
    let kiln = Kiln::start_with_config(&token_config(&file, ""));
    let all = common::calls::with_token(kiln.remote(), &everything).await;

    // Everything on `main` is nothing on `other`.
    for (call, result) in every_call(&all, "other").await {
        let err = result.expect_err(call);
        assert_eq!(err.code(), Code::PermissionDenied, "{call}: {err:?}");
        assert!(
            err.message().contains("token:main-all") && err.message().contains("other"),
            "{call}: {}",
            err.message()
        );
    }
    // cas-read on `main` reads the CAS and nothing else.
    let reader = common::calls::with_token(kiln.remote(), &reader).await;
    let readers =
        ["FindMissingBlobs", "BatchReadBlobs", "GetTree", "ByteStream.Read", "GetCapabilities", "FetchBlob"];
    for (call, result) in every_call(&reader, "main").await {
        match result {
            Err(e) if e.code() == Code::PermissionDenied => {
                assert!(!readers.contains(&call), "{call} refused to a CAS reader: {e:?}");
                assert!(e.message().contains("main"), "{call}: {}", e.message());
            }
            other => assert!(readers.contains(&call), "{call} let a CAS reader through: {other:?}"),
        }
    }
    // The worker port wants the worker permission, which `all` on a tenant
    // does not give.
    let workers = connect(&ClientOptions {
        token: Some(everything),
        ..common::calls::opts(format!("grpc://{}", kiln.worker_port()))
    })
    .await
    .unwrap();
    let register = WorkerMessage {
        kind: Some(worker_message::Kind::Register(Register {
            worker_id: "w".into(),
            properties: vec![],
            slots: 1,
        })),
    };
    let err =
        WorkersClient::new(workers.channel()).session(futures::stream::iter([register])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("worker"), "{}", err.message());
}
