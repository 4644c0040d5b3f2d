//! Workers in their own processes (`kiln worker`) against a scheduler
//! without a local worker: a worker SIGKILLed mid-action loses nothing (the
//! action runs again elsewhere), and an action whose worker dies every time
//! fails after the bounded attempts instead of hanging.
//!
//! Needs root: actions run in sandboxes mapped to other uids.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{KILN, Kiln};
use futures::StreamExt;
use kiln_proto::google::longrunning::{Operation, operation};
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    self, BatchUpdateBlobsRequest, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse,
    batch_update_blobs_request, execution_stage,
};
use kiln_proto::{Digest, DigestFunction};
use prost::Message;

fn sha(data: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(data)
}

/// A scheduler node without a local worker.
fn scheduler(extra: &str) -> Kiln {
    Kiln::start_with_config(&format!(
        "[execution]\nlocal_worker = false\nunsatisfiable_grace_ms = 120000\n{extra}"
    ))
}

/// A `kiln worker` process, killed on drop.
struct Worker {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(kiln: &Kiln, id: &str) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(KILN)
            .args(["worker", "--slots", "1", "--id", id])
            .arg("--scheduler")
            .arg(format!("grpc://{}", kiln.worker_port()))
            .arg("--cas")
            .arg(kiln.remote())
            .arg("--data-dir")
            .arg(dir.path())
            .env("KILN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kiln worker");
        Worker { child, _dir: dir }
    }

    /// Starts a worker and waits until the scheduler has registered it.
    async fn registered(kiln: &Kiln, id: &str) -> Worker {
        let worker = Worker::start(kiln, id);
        let needle = format!("worker registered worker={id}");
        common::eventually(Duration::from_secs(60), "the worker to register", || {
            let seen = plain(&kiln.log()).contains(&needle);
            async move { seen.then_some(()) }
        })
        .await;
        worker
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A log without its terminal colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Uploads an action running `sh -c script`; its digest.
async fn action(kiln: &Kiln, script: &str) -> Digest {
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let dir = reapi::Directory::default();
    let action = reapi::Action {
        command_digest: Some(sha(&command.encode_to_vec()).to_proto()),
        input_root_digest: Some(sha(&dir.encode_to_vec()).to_proto()),
        ..Default::default()
    };
    let blobs = [action.encode_to_vec(), command.encode_to_vec(), dir.encode_to_vec()];
    let requests = blobs
        .iter()
        .map(|b| batch_update_blobs_request::Request {
            digest: Some(sha(b).to_proto()),
            data: b.clone(),
            compressor: 0,
        })
        .collect();
    kiln.cas()
        .await
        .batch_update_blobs(BatchUpdateBlobsRequest { requests, ..Default::default() })
        .await
        .unwrap();
    sha(&blobs[0])
}

fn stage(op: &Operation) -> i32 {
    ExecuteOperationMetadata::decode(op.metadata.as_ref().unwrap().value.as_slice()).unwrap().stage
}

fn response(op: &Operation) -> ExecuteResponse {
    match &op.result {
        Some(operation::Result::Response(any)) => ExecuteResponse::decode(any.value.as_slice()).unwrap(),
        other => panic!("no response: {other:?}"),
    }
}

/// Runs the action; each time it reaches EXECUTING, `on_executing` is
/// called with the count so far. Returns the final response.
async fn execute(kiln: &Kiln, digest: Digest, mut on_executing: impl FnMut(u32)) -> ExecuteResponse {
    let mut client = ExecutionClient::new(kiln.channel().await);
    let request = ExecuteRequest { action_digest: Some(digest.to_proto()), ..Default::default() };
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let mut executing = 0;
    let mut previous = 0;
    let run = async {
        while let Some(op) = stream.next().await {
            let op = op.unwrap();
            if op.done {
                return response(&op);
            }
            let now = stage(&op);
            if now == execution_stage::Value::Executing as i32 && previous != now {
                executing += 1;
                on_executing(executing);
            }
            previous = now;
        }
        panic!("the stream ended without the operation done");
    };
    tokio::time::timeout(Duration::from_secs(180), run).await.expect("the operation ends")
}

#[tokio::test]
async fn a_worker_killed_mid_action_loses_nothing() {
    let kiln = scheduler("");
    let mut first = Some(Worker::registered(&kiln, "first").await);
    let mut second = None;
    let digest = action(&kiln, "sleep 2; echo survived").await;
    let r = execute(&kiln, digest, |n| {
        if n == 1 {
            // SIGKILL mid-action; another worker takes the action.
            first.take().unwrap().kill();
            second = Some(Worker::start(&kiln, "second"));
        }
    })
    .await;
    assert_eq!(r.status.as_ref().map_or(0, |s| s.code), 0, "{r:?}");
    let result = r.result.unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.execution_metadata.unwrap().worker, "second", "it ran to the end on the second worker");
}

#[tokio::test]
async fn an_action_whose_worker_dies_every_time_fails_after_the_bounded_attempts() {
    let kiln = scheduler("attempts_max = 3\n");
    let mut worker = Some(Worker::registered(&kiln, "w0").await);
    let digest = action(&kiln, "sleep 30").await;
    let r = execute(&kiln, digest, |n| {
        worker.take().unwrap().kill();
        worker = Some(Worker::start(&kiln, &format!("w{n}")));
    })
    .await;
    let status = r.status.unwrap();
    assert_eq!(status.code, tonic::Code::Unavailable as i32, "{status:?}");
    assert!(status.message.contains("3 times"), "{}", status.message);
}
