//! ActionCache against a real `kiln serve`: isolation, completeness,
//! inlining and refusals.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use common::Kiln;
use kiln_proto::reapi::{ActionResult, GetActionResultRequest, OutputFile, UpdateActionResultRequest};
use kiln_proto::{Digest, DigestFunction};
use tonic::Code;

fn sha(data: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(data)
}

async fn upload(kiln: &Kiln, blobs: &[&[u8]]) {
    upload_to(kiln, "", blobs).await;
}

async fn upload_to(kiln: &Kiln, instance: &str, blobs: &[&[u8]]) {
    kiln.upload(instance, blobs).await;
}

fn result_with(out: &[u8], stdout: &[u8]) -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out/a.txt".into(),
            digest: Some(sha(out).to_proto()),
            ..Default::default()
        }],
        stdout_digest: Some(sha(stdout).to_proto()),
        exit_code: 0,
        ..Default::default()
    }
}

fn update(instance: &str, action: &Digest, result: ActionResult) -> UpdateActionResultRequest {
    UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        ..Default::default()
    }
}

fn get(instance: &str, action: &Digest) -> GetActionResultRequest {
    GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_proto()),
        ..Default::default()
    }
}

#[tokio::test]
async fn results_are_isolated_per_instance() {
    let kiln = Kiln::start();
    upload_to(&kiln, "team-a", &[b"output", b"log"]).await;
    let action = sha(b"action 1");
    let mut ac = kiln.ac().await;
    let stored =
        ac.update_action_result(update("team-a", &action, result_with(b"output", b"log"))).await.unwrap();
    assert_eq!(stored.into_inner(), result_with(b"output", b"log"));

    let got = ac.get_action_result(get("team-a", &action)).await.unwrap().into_inner();
    assert_eq!(got, result_with(b"output", b"log"));
    for other in ["team-b", "", "team-a/dev"] {
        let err = ac.get_action_result(get(other, &action)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "instance {other:?} must not see team-a's result");
    }
}

#[tokio::test]
async fn results_with_missing_outputs_are_not_served() {
    let kiln = Kiln::start();
    upload(&kiln, &[b"log"]).await;
    let action = sha(b"action 2");
    let mut ac = kiln.ac().await;
    ac.update_action_result(update("", &action, result_with(b"never uploaded", b"log"))).await.unwrap();
    let err = ac.get_action_result(get("", &action)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("missing from the CAS"), "{}", err.message());
    upload(&kiln, &[b"never uploaded"]).await;
    ac.get_action_result(get("", &action)).await.unwrap();
}

#[tokio::test]
async fn inlining_on_request() {
    let kiln = Kiln::start();
    upload(&kiln, &[b"file contents", b"stdout text"]).await;
    let action = sha(b"action 3");
    let mut ac = kiln.ac().await;
    ac.update_action_result(update("", &action, result_with(b"file contents", b"stdout text")))
        .await
        .unwrap();
    let plain = ac.get_action_result(get("", &action)).await.unwrap().into_inner();
    assert!(plain.stdout_raw.is_empty() && plain.output_files[0].contents.is_empty());
    let req = GetActionResultRequest {
        inline_stdout: true,
        inline_output_files: vec!["out/a.txt".into()],
        ..get("", &action)
    };
    let inlined = ac.get_action_result(req).await.unwrap().into_inner();
    assert_eq!(inlined.stdout_raw, b"stdout text");
    assert_eq!(inlined.output_files[0].contents, b"file contents");
}

#[tokio::test]
async fn inlined_uploads_move_to_the_cas() {
    let kiln = Kiln::start();
    let action = sha(b"action 4");
    let mut ac = kiln.ac().await;
    let result = ActionResult { stderr_raw: b"warning: x".to_vec(), ..Default::default() };
    ac.update_action_result(update("", &action, result)).await.unwrap();
    let got = ac.get_action_result(get("", &action)).await.unwrap().into_inner();
    assert_eq!(got.stderr_digest, Some(sha(b"warning: x").to_proto()));
    assert!(got.stderr_raw.is_empty());
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let kiln = Kiln::start();
    let mut ac = kiln.ac().await;
    let action = sha(b"action 5");

    let err = ac.get_action_result(GetActionResultRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("action_digest is required"));

    let no_result =
        UpdateActionResultRequest { action_digest: Some(action.to_proto()), ..Default::default() };
    let err = ac.update_action_result(no_result).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut bad = result_with(b"o", b"l");
    bad.output_files[0].digest = Some(kiln_proto::reapi::Digest { hash: "nothex".into(), size_bytes: 1 });
    let err = ac.update_action_result(update("", &action, bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("out/a.txt"), "{}", err.message());

    let mut no_digest = result_with(b"o", b"l");
    no_digest.output_files[0].digest = None;
    assert_eq!(
        ac.update_action_result(update("", &action, no_digest)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let mut huge = ActionResult::default();
    for i in 0..20_000 {
        huge.output_files.push(OutputFile {
            path: format!("out/file-{i:08}"),
            digest: Some(sha(b"x").to_proto()),
            ..Default::default()
        });
    }
    let err = ac.update_action_result(update("", &action, huge)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most"), "{}", err.message());

    let err = ac.get_action_result(get("a/actionResults", &action)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = ac.update_action_result(update("../x", &action, result_with(b"o", b"l"))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Nothing was stored by any of the refused updates.
    assert_eq!(ac.get_action_result(get("", &action)).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn subtenants_share_the_cas_and_read_through_to_parents() {
    let kiln = Kiln::start();
    // Blobs uploaded on `main.dev` live in the CAS of base tenant `main`.
    upload_to(&kiln, "main.dev", &[b"ci output", b"ci log"]).await;
    let action = sha(b"action 6");
    let mut ac = kiln.ac().await;
    ac.update_action_result(update("main", &action, result_with(b"ci output", b"ci log"))).await.unwrap();
    // A developer subtenant sees CI's result through read-through...
    let got = ac.get_action_result(get("main.dev.alice", &action)).await.unwrap().into_inner();
    assert_eq!(got, result_with(b"ci output", b"ci log"));
    // ...but what it writes stays its own.
    let dev_action = sha(b"action 7");
    ac.update_action_result(update("main.dev", &dev_action, result_with(b"ci output", b"ci log")))
        .await
        .unwrap();
    assert_eq!(ac.get_action_result(get("main", &dev_action)).await.unwrap_err().code(), Code::NotFound);
    ac.get_action_result(get("main.dev", &dev_action)).await.unwrap();
    // Another base tenant shares nothing.
    assert_eq!(ac.get_action_result(get("other", &action)).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn refused_updates_store_nothing() {
    let kiln = Kiln::start();
    let mut ac = kiln.ac().await;
    let action = sha(b"refused action");
    // Inlined output contents next to a malformed digest elsewhere in the result.
    let mut bad =
        ActionResult { stdout_raw: b"stdout that must not be stored".to_vec(), ..Default::default() };
    bad.output_files.push(OutputFile {
        path: "inlined".into(),
        contents: b"inlined file that must not be stored".to_vec(),
        ..Default::default()
    });
    bad.output_directories.push(kiln_proto::reapi::OutputDirectory {
        path: "dir".into(),
        tree_digest: Some(kiln_proto::reapi::Digest { hash: "nothex".into(), size_bytes: 3 }),
        ..Default::default()
    });
    let err = ac.update_action_result(update("", &action, bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A result too large once its inlined contents are moved out.
    let mut big =
        ActionResult { stderr_raw: b"stderr that must not be stored".to_vec(), ..Default::default() };
    big.output_files = (0..20_000)
        .map(|i| OutputFile {
            path: format!("out/{i:0>60}"),
            digest: Some(sha(b"x").to_proto()),
            ..Default::default()
        })
        .collect();
    let err = ac.update_action_result(update("", &action, big)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A mismatched inlined stdout.
    let lying = ActionResult {
        stdout_raw: b"these bytes".to_vec(),
        stdout_digest: Some(sha(b"other bytes").to_proto()),
        ..Default::default()
    };
    let err = ac.update_action_result(update("", &action, lying)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("stdout_raw"), "{}", err.message());

    let leftovers = [
        &b"stdout that must not be stored"[..],
        b"inlined file that must not be stored",
        b"stderr that must not be stored",
        b"these bytes",
    ];
    let req = kiln_proto::reapi::FindMissingBlobsRequest {
        blob_digests: leftovers.iter().map(|b| sha(b).to_proto()).collect(),
        ..Default::default()
    };
    let missing = kiln.cas().await.find_missing_blobs(req).await.unwrap().into_inner().missing_blob_digests;
    assert_eq!(missing.len(), leftovers.len(), "a refused update left blobs in the CAS");
    assert_eq!(ac.get_action_result(get("", &action)).await.unwrap_err().code(), Code::NotFound);
}
