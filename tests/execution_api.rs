//! The Execution API against a real `kiln serve` and its local worker,
//! spoken directly: missing inputs, timeouts, unsatisfiable platforms,
//! merging, WaitExecution, the Operations service and capabilities.
//!
//! Needs root: actions run in sandboxes mapped to other uids.

mod common;

use std::time::Duration;

use common::Kiln;
use futures::StreamExt;
use kiln_proto::google::longrunning::operations_client::OperationsClient;
use kiln_proto::google::longrunning::{GetOperationRequest, Operation, operation};
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    self, ExecuteRequest, ExecuteResponse, GetCapabilitiesRequest, WaitExecutionRequest,
};
use kiln_proto::{Digest, DigestFunction};
use prost::Message;

fn sha(data: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(data)
}

async fn upload(kiln: &Kiln, blobs: &[Vec<u8>]) {
    kiln.upload("", &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>()).await;
}

/// An action running `sh -c script` over an input root holding `files`;
/// returns its digest and the blobs to upload (the file contents last).
fn action(
    script: &str,
    files: &[(&str, &[u8])],
    timeout_s: i64,
    platform: &[(&str, &str)],
) -> (Digest, Vec<Vec<u8>>) {
    action_with_env(script, files, timeout_s, platform, &[("PATH", "/bin:/usr/bin")])
}

/// Like [`action`], with the Command's environment `env`.
fn action_with_env(
    script: &str,
    files: &[(&str, &[u8])],
    timeout_s: i64,
    platform: &[(&str, &str)],
    env: &[(&str, &str)],
) -> (Digest, Vec<Vec<u8>>) {
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: env
            .iter()
            .map(|(name, value)| reapi::command::EnvironmentVariable { name: (*name).into(), value: (*value).into() })
            .collect(),
        #[allow(deprecated)] // Bazel 4 sends output_files
        output_files: vec!["out.txt".into()],
        ..Default::default()
    };
    let dir = reapi::Directory {
        files: files
            .iter()
            .map(|(name, data)| reapi::FileNode {
                name: (*name).into(),
                digest: Some(sha(data).to_proto()),
                is_executable: false,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let properties = platform
        .iter()
        .map(|(n, v)| reapi::platform::Property { name: (*n).into(), value: (*v).into() })
        .collect();
    let action = reapi::Action {
        command_digest: Some(sha(&command.encode_to_vec()).to_proto()),
        input_root_digest: Some(sha(&dir.encode_to_vec()).to_proto()),
        timeout: (timeout_s > 0)
            .then_some(kiln_proto::google::protobuf::Duration { seconds: timeout_s, nanos: 0 }),
        platform: Some(reapi::Platform { properties }),
        ..Default::default()
    };
    let mut blobs = vec![action.encode_to_vec(), command.encode_to_vec(), dir.encode_to_vec()];
    blobs.extend(files.iter().map(|(_, d)| d.to_vec()));
    (sha(&blobs[0]), blobs)
}

fn response_of(op: &Operation) -> ExecuteResponse {
    match &op.result {
        Some(operation::Result::Response(any)) => ExecuteResponse::decode(any.value.as_slice()).unwrap(),
        other => panic!("operation {} has no response: {other:?}", op.name),
    }
}

/// Runs Execute to the end; the operations streamed.
async fn execute(kiln: &Kiln, action: Digest, skip_cache: bool) -> Vec<Operation> {
    execute_in(kiln, "", action, skip_cache).await
}

/// [`execute`] on the instance `instance`.
async fn execute_in(kiln: &Kiln, instance: &str, action: Digest, skip_cache: bool) -> Vec<Operation> {
    let mut client = ExecutionClient::new(kiln.channel().await);
    let request = ExecuteRequest {
        instance_name: instance.into(),
        action_digest: Some(action.to_proto()),
        skip_cache_lookup: skip_cache,
        ..Default::default()
    };
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let mut ops = Vec::new();
    let all = async {
        while let Some(op) = stream.next().await {
            ops.push(op.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all).await.expect("the operation ends");
    ops
}

fn status_code(r: &ExecuteResponse) -> i32 {
    r.status.as_ref().map_or(0, |s| s.code)
}

/// The PreconditionFailure of a FAILED_PRECONDITION response, as text to
/// find the MISSING violations' subjects in.
fn precondition_failure(r: &ExecuteResponse) -> String {
    assert_eq!(status_code(r), tonic::Code::FailedPrecondition as i32, "{r:?}");
    let details = &r.status.as_ref().unwrap().details;
    assert_eq!(details[0].type_url, "type.googleapis.com/google.rpc.PreconditionFailure");
    String::from_utf8_lossy(&details[0].value).into_owned()
}

/// A MISSING violation's subject for `digest`.
fn subject(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.hash_hex(), digest.size_bytes())
}

async fn stdout_of(kiln: &Kiln, r: &ExecuteResponse) -> Vec<u8> {
    let d = r.result.as_ref().unwrap().stdout_digest.clone().unwrap();
    let read = reapi::BatchReadBlobsRequest { digests: vec![d], ..Default::default() };
    kiln.cas().await.batch_read_blobs(read).await.unwrap().into_inner().responses.remove(0).data
}

#[tokio::test]
async fn capabilities_advertise_execution_for_bazel_4() {
    let kiln = Kiln::start();
    let caps = CapabilitiesClient::new(kiln.channel().await)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let exec = caps.execution_capabilities.expect("execution capabilities");
    assert!(exec.exec_enabled);
    #[allow(deprecated)]
    let singular = exec.digest_function;
    assert_eq!(singular, DigestFunction::Sha256.to_proto() as i32, "Bazel 4.2 reads the singular field");
    let low = caps.low_api_version.unwrap();
    assert_eq!((low.major, low.minor), (2, 0), "Bazel 4.2 refuses servers whose low version is above 2.0");
}

#[tokio::test]
async fn actions_run_and_missing_inputs_are_reported_all_at_once() {
    let kiln = Kiln::start();
    let (digest, blobs) = action("cat a b > out.txt; echo done", &[("a", b"alpha "), ("b", b"beta")], 0, &[]);
    // Everything but the two input files.
    upload(&kiln, &blobs[..3]).await;
    let ops = execute(&kiln, digest, false).await;
    assert!(!ops[0].done, "the first message comes at once");
    let text = precondition_failure(&response_of(ops.last().unwrap()));
    for data in [&b"alpha "[..], b"beta"] {
        assert!(text.contains(&subject(&sha(data))), "{text}");
    }
    // Uploaded, it runs.
    upload(&kiln, &blobs[3..]).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), 0, "{r:?}");
    let result = r.result.clone().unwrap();
    assert_eq!(result.exit_code, 0);
    assert_eq!(result.output_files[0].path, "out.txt");
    assert_eq!(stdout_of(&kiln, &r).await, b"done\n");
    let meta = result.execution_metadata.unwrap();
    assert!(meta.worker.starts_with("local-"), "{meta:?}");
    // And again: a cache hit.
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert!(r.cached_result);
}

/// An action `cat sub/f > out.txt` whose input root names the directory
/// `sub` by the digest of `sub`; its digest, the blobs of the action, and
/// `sub`'s digest.
fn action_with_subdirectory(sub: &[u8]) -> (Digest, Vec<Vec<u8>>, Digest) {
    let (_, mut blobs) = action("cat sub/f > out.txt", &[], 0, &[]);
    let root = reapi::Directory {
        directories: vec![reapi::DirectoryNode { name: "sub".into(), digest: Some(sha(sub).to_proto()) }],
        ..Default::default()
    };
    let mut action = reapi::Action::decode(blobs[0].as_slice()).unwrap();
    action.input_root_digest = Some(sha(&root.encode_to_vec()).to_proto());
    blobs[0] = action.encode_to_vec();
    blobs[2] = root.encode_to_vec();
    (sha(&blobs[0]), blobs, sha(sub))
}

/// The one rule for a missing directory: an input directory the CAS lacks
/// is a missing input like a missing file, named by its digest in the
/// PreconditionFailure, so that the client uploads it and the action runs.
#[tokio::test]
async fn a_missing_input_directory_is_reported_by_its_digest() {
    let kiln = Kiln::start();
    let file = b"in a subdirectory\n";
    let sub = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "f".into(),
            digest: Some(sha(file).to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (digest, blobs, missing) = action_with_subdirectory(&sub.encode_to_vec());
    upload(&kiln, &blobs).await;
    let text = precondition_failure(&response_of(execute(&kiln, digest, false).await.last().unwrap()));
    assert!(text.contains(&subject(&missing)), "{text}");
    upload(&kiln, &[sub.encode_to_vec(), file.to_vec()]).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!((status_code(&r), r.result.as_ref().map(|r| r.exit_code)), (0, Some(0)), "{r:?}");
}

/// A blob the input tree names as a directory but that is not a Directory
/// message fails the action as GetTree fails: FAILED_PRECONDITION naming
/// the digest (what the CAS holds does not form a tree).
#[tokio::test]
async fn an_input_directory_that_is_not_a_directory_fails_naming_it() {
    let kiln = Kiln::start();
    let junk = b"\xff\xff\xff\xff not a Directory message".to_vec();
    let (digest, mut blobs, junk_digest) = action_with_subdirectory(&junk);
    blobs.push(junk);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    let status = r.status.clone().unwrap_or_default();
    assert_eq!(status.code, tonic::Code::FailedPrecondition as i32, "{r:?}");
    assert!(status.message.contains(&junk_digest.hash_hex()), "{}", status.message);
}

#[tokio::test]
async fn timeouts_return_partial_output_and_kill_everything() {
    let kiln = Kiln::start();
    let (digest, blobs) = action("echo started; sleep 1000 & sleep 1000", &[], 1, &[]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), tonic::Code::DeadlineExceeded as i32, "{r:?}");
    assert_eq!(stdout_of(&kiln, &r).await, b"started\n", "the partial output comes back");
    let (big, blobs) = action("true", &[], 1_000_000, &[]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, big, false).await.last().unwrap());
    assert_eq!(status_code(&r), tonic::Code::InvalidArgument as i32, "a timeout above the maximum: {r:?}");
}

#[tokio::test]
async fn unsatisfiable_platforms_fail_naming_the_property() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, "[execution]\nunsatisfiable_grace_ms = 0\n").unwrap();
    let kiln = Kiln::start_with(&["--config", path.to_str().unwrap()]);
    let (digest, blobs) = action("true", &[], 0, &[("OSFamily", "windows")]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), tonic::Code::FailedPrecondition as i32, "{r:?}");
    let message = &r.status.unwrap().message;
    assert!(message.contains("OSFamily=windows") && message.contains("linux"), "{message}");
}

#[tokio::test]
async fn waiters_and_the_operations_service_see_the_same_operation() {
    let kiln = Kiln::start();
    let (digest, blobs) = action("sleep 1; echo slow", &[], 0, &[]);
    upload(&kiln, &blobs).await;
    let mut client = ExecutionClient::new(kiln.channel().await);
    let request = ExecuteRequest { action_digest: Some(digest.to_proto()), ..Default::default() };
    let mut first = client.execute(request).await.unwrap().into_inner();
    let name = first.next().await.unwrap().unwrap().name;
    drop(first);
    // The stream broke; the client comes back.
    let mut waiting =
        client.wait_execution(WaitExecutionRequest { name: name.clone() }).await.unwrap().into_inner();
    let mut last = None;
    while let Some(op) = waiting.next().await {
        last = Some(op.unwrap());
    }
    let last = last.unwrap();
    assert!(last.done);
    assert_eq!(status_code(&response_of(&last)), 0, "{:?}", response_of(&last));
    let got = OperationsClient::new(kiln.channel().await)
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done && got.name == name);
    let unknown = client.wait_execution(WaitExecutionRequest { name: "operations/nope".into() }).await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound, "Bazel then calls Execute again");
}

#[tokio::test]
async fn an_actions_life_is_in_the_log_by_its_operation_name() {
    let filter = "warn,kiln_scheduler=debug,kiln_worker=debug";
    let kiln = Kiln::start_logging(tempfile::tempdir().unwrap(), &[], filter);
    let (digest, blobs) = action("cat a > out.txt", &[("a", b"traced input")], 0, &[]);
    upload(&kiln, &blobs).await;
    let ops = execute(&kiln, digest, false).await;
    assert_eq!(status_code(&response_of(ops.last().unwrap())), 0);
    let operation = ops[0].name.clone();
    // From the operation name to its execution, then the execution's life
    // on the scheduler and on the worker.
    let stages = ["action queued", "action dispatched", "inputs fetched", "executed", "outputs uploaded"];
    let lines = common::eventually(Duration::from_secs(10), "every stage is logged", || {
        let log = kiln.log();
        let execution = log
            .lines()
            .find(|l| l.contains("action queued") && l.contains(&format!("operation={operation}")))
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("execution=")))
            .map(str::to_owned);
        async move {
            let execution = execution?;
            let lines: Vec<String> = log
                .lines()
                .filter(|l| {
                    l.contains(&format!("execution={execution} "))
                        || l.contains(&format!("execution={execution}}}"))
                })
                .map(str::to_owned)
                .collect();
            (stages.iter().all(|s| lines.iter().any(|l| l.contains(s)))
                && lines.iter().any(|l| l.contains("execution finished")))
            .then_some(lines)
        }
    })
    .await;
    let first = |s: &str| lines.iter().position(|l| l.contains(s)).unwrap();
    let order: Vec<usize> = stages.iter().map(|s| first(s)).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "stages in order:\n{}", lines.join("\n"));
    let finished = &lines[first("execution finished")];
    assert!(finished.contains(&operation) && finished.contains("code=\"OK\""), "{finished}");
    assert!(lines[first("inputs fetched")].contains("files=1 bytes=12"), "{}", lines.join("\n"));
    assert!(!kiln.log().contains('\x1b'), "a log that is not a terminal has no colour codes");
}

#[tokio::test]
async fn a_cancelled_action_gives_its_slot_back() {
    use kiln_proto::google::longrunning::CancelOperationRequest;
    let kiln = Kiln::start_with_config("[execution]\nlocal_worker_slots = 1\n");
    let (long, blobs) = action("sleep 300", &[], 0, &[]);
    upload(&kiln, &blobs).await;
    let mut client = ExecutionClient::new(kiln.channel().await);
    let request = ExecuteRequest { action_digest: Some(long.to_proto()), ..Default::default() };
    let mut stream = client.execute(request).await.unwrap().into_inner();
    let executing = reapi::execution_stage::Value::Executing as i32;
    let name = loop {
        let op = stream.next().await.expect("the operation goes on").unwrap();
        let meta =
            reapi::ExecuteOperationMetadata::decode(op.metadata.as_ref().unwrap().value.as_slice()).unwrap();
        if meta.stage == executing {
            break op.name;
        }
    };
    OperationsClient::new(kiln.channel().await)
        .cancel_operation(CancelOperationRequest { name })
        .await
        .unwrap();
    drop(stream);
    // The worker's only slot is free again: the next action runs.
    let (quick, blobs) = action("echo after > out.txt", &[], 0, &[]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, quick, false).await.last().unwrap());
    assert_eq!(status_code(&r), 0, "{r:?}");
    assert_eq!(r.result.unwrap().exit_code, 0);
}

#[tokio::test]
async fn priorities_outside_the_advertised_range_are_refused() {
    let kiln = Kiln::start();
    let (digest, blobs) = action("true", &[], 0, &[]);
    upload(&kiln, &blobs).await;
    let mut client = ExecutionClient::new(kiln.channel().await);
    for priority in [i32::MIN, -1001, 1001, i32::MAX] {
        let request = ExecuteRequest {
            action_digest: Some(digest.to_proto()),
            execution_policy: Some(reapi::ExecutionPolicy { priority }),
            ..Default::default()
        };
        let refused = client.execute(request).await.map(|_| ()).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{priority}: {refused:?}");
        assert!(refused.message().contains("-1000..=1000"), "{}", refused.message());
    }
    let request = ExecuteRequest {
        action_digest: Some(digest.to_proto()),
        execution_policy: Some(reapi::ExecutionPolicy { priority: -1000 }),
        ..Default::default()
    };
    assert!(client.execute(request).await.is_ok(), "the range's ends are accepted");
}

#[tokio::test]
async fn listing_operations_shows_only_the_callers_tenants_and_refuses_bad_pages() {
    use kiln_proto::google::longrunning::{ListOperationsRequest, WaitOperationRequest};
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    let ops = common::bootstrap_token(&tokens, "ops", "*", "all", "1d");
    let ci = common::bootstrap_token(&tokens, "ci", "main", "read,write,execute", "1d");
    let kiln = Kiln::start_with_config(&common::token_config(&tokens, ""));
    let connect = |token: &str| {
        let options = kiln_tools::client::ClientOptions {
            token: Some(token.to_owned()),
            ..common::calls::opts(kiln.remote())
        };
        async move { kiln_tools::client::connect(&options).await.unwrap() }
    };
    let (ops, ci) = (connect(&ops).await, connect(&ci).await);
    // ops runs an action on another tenant.
    let (digest, blobs) = action("true", &[], 0, &[]);
    let upload = common::upload_request("other", &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    ops.cas().batch_update_blobs(upload).await.unwrap();
    let request = ExecuteRequest {
        instance_name: "other".into(),
        action_digest: Some(digest.to_proto()),
        ..Default::default()
    };
    let mut stream = ExecutionClient::new(ops.channel()).execute(request).await.unwrap().into_inner();
    let name = stream.next().await.unwrap().unwrap().name;
    while stream.next().await.is_some() {}

    let mut listing = OperationsClient::new(ci.channel());
    let page = listing.list_operations(ListOperationsRequest::default()).await.unwrap().into_inner();
    assert!(page.operations.iter().all(|o| o.name != name), "ci sees no operation of another tenant");
    let all = OperationsClient::new(ops.channel()).list_operations(ListOperationsRequest::default()).await;
    assert!(all.unwrap().into_inner().operations.iter().any(|o| o.name == name), "ops does");
    let bad_page = ListOperationsRequest { page_size: -1, ..Default::default() };
    assert_eq!(listing.list_operations(bad_page).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let negative = WaitOperationRequest {
        name,
        timeout: Some(kiln_proto::google::protobuf::Duration { seconds: -5, nanos: 0 }),
    };
    let mut waiting = OperationsClient::new(ops.channel());
    assert_eq!(waiting.wait_operation(negative).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Skipping what ci may not see is not a refusal.
    let (status, metrics) = {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(kiln.metrics_addr()).unwrap();
        write!(tcp, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).unwrap();
        (text.starts_with("HTTP/1.1 200"), text)
    };
    assert!(status);
    assert!(!metrics.contains("kiln_auth_failures_total{"), "{metrics}");
}

/// An action that nests directories 40,000 deep in its exec root gets its
/// result, and the node lives on: its directory is removed without
/// recursion (a recursive removal overflowed the stack and took the whole
/// process down), the next action runs, and the CAS still answers.
#[tokio::test]
async fn an_action_nesting_directories_deeper_than_any_stack_does_not_take_the_node_down() {
    // 40,000 directories need as many inodes, whatever disk the worker
    // gives each slot on this machine.
    let kiln = Kiln::start_with_config("[execution.worker]\ndisk_inodes = 65536\n");
    let script = "echo ok > out.txt; exec python3 -c 'import os\nfor _ in range(40000):\n    os.mkdir(\"d\"); os.chdir(\"d\")'";
    let (digest, blobs) = action(script, &[], 0, &[]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), 0, "{r:?}");
    assert_eq!(r.result.as_ref().unwrap().exit_code, 0, "{r:?}");
    let build = kiln.data_dir.path().join("worker/build");
    common::eventually(Duration::from_secs(60), "the exec directory removed", || {
        let empty = std::fs::read_dir(&build).map(|mut d| d.next().is_none()).unwrap_or(false);
        async move { empty.then_some(()) }
    })
    .await;
    let (next, blobs) = action("echo again > out.txt", &[], 0, &[]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, next, false).await.last().unwrap());
    assert_eq!(status_code(&r), 0, "{r:?}");
    assert!(kiln.missing(&[digest]).await.is_empty(), "the CAS still holds the action");
}

/// A Command without `PATH` (what Pants and Buck2 send) gets the worker's
/// default one, and finds the usual tools; a Command's own variables win
/// over the worker's defaults.
#[tokio::test]
async fn actions_without_a_path_get_the_workers_default_environment() {
    let kiln = Kiln::start_with_config(
        "[execution.worker.environment]\nPATH = \"/usr/bin:/bin\"\nKILN_SITE = \"rack-7\"\n",
    );
    let script = "env | sort > out.txt; echo \"$PATH $KILN_SITE\"; command -v sleep";
    let (digest, blobs) = action_with_env(script, &[], 0, &[], &[]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), 0, "{r:?}");
    assert_eq!(r.result.as_ref().unwrap().exit_code, 0, "{r:?}");
    let out = String::from_utf8(stdout_of(&kiln, &r).await).unwrap();
    assert!(out.starts_with("/usr/bin:/bin rack-7\n") && out.contains("/sleep"), "{out}");
    let (digest, blobs) = action_with_env(script, &[], 0, &[], &[("KILN_SITE", "own"), ("PATH", "/bin")]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), 0, "{r:?}");
    let out = String::from_utf8(stdout_of(&kiln, &r).await).unwrap();
    assert!(out.starts_with("/bin own\n"), "{out}");
    // Without configuration, a standard PATH.
    let kiln = Kiln::start();
    let (digest, blobs) = action_with_env("echo \"$PATH\"", &[], 0, &[], &[]);
    upload(&kiln, &blobs).await;
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), 0, "{r:?}");
    let out = String::from_utf8(stdout_of(&kiln, &r).await).unwrap();
    assert_eq!(out.trim(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
}

/// A default variable the kernel could not pass is refused at start,
/// naming the key.
#[test]
fn a_default_variable_the_kernel_cannot_pass_is_refused() {
    let (ok, err) = common::serve_refused_config("[execution.worker.environment]\n\"A=B\" = \"x\"\n");
    assert!(!ok && err.contains("[execution.worker.environment]") && err.contains("A=B"), "{err}");
}

/// The worker's file cache is shared by every tenant, but a file is used
/// only if the action's own CAS holds it: naming another tenant's file by
/// its digest gets FAILED_PRECONDITION, exactly as a file nobody has.
#[tokio::test]
async fn a_tenant_cannot_read_another_tenants_input_through_the_workers_cache() {
    let kiln = Kiln::start();
    let secret: &[u8] = b"tenant b's secret";
    let (b_action, b_blobs) = action("cat s.txt > out.txt", &[("s.txt", secret)], 0, &[]);
    kiln.upload("teamb", &b_blobs.iter().map(Vec::as_slice).collect::<Vec<_>>()).await;
    let r = response_of(execute_in(&kiln, "teamb", b_action, false).await.last().unwrap());
    assert_eq!(status_code(&r), 0, "{r:?}");
    // Tenant A uploads everything but the file, once naming B's (now in the
    // worker's cache), once a file of the same size nobody has.
    let mut answers = Vec::new();
    for data in [secret, b"nobody's bytes!!!"] {
        let (a_action, a_blobs) = action("cat s.txt; cat s.txt > out.txt", &[("s.txt", data)], 0, &[]);
        kiln.upload("teama", &a_blobs[..3].iter().map(Vec::as_slice).collect::<Vec<_>>()).await;
        let r = response_of(execute_in(&kiln, "teama", a_action, false).await.last().unwrap());
        assert_eq!(status_code(&r), tonic::Code::FailedPrecondition as i32, "{r:?}");
        assert!(r.result.is_none_or(|result| result.stdout_raw.is_empty()), "the action ran");
        let status = r.status.unwrap();
        let text = String::from_utf8_lossy(&status.details[0].value).into_owned();
        let d = sha(data);
        assert!(text.contains(&format!("blobs/{}/{}", d.hash_hex(), d.size_bytes())), "{text}");
        answers.push((status.message.replace(&d.hash_hex(), "H"), text.replace(&d.hash_hex(), "H")));
    }
    assert_eq!(answers[0], answers[1], "a cached file is told apart from an absent one");
}

/// An output larger than the store can hold is the action's limit, not the
/// worker's trouble: RESOURCE_EXHAUSTED naming it, after one run, never
/// retried on another worker.
#[tokio::test]
async fn an_output_larger_than_the_store_takes_fails_once_with_resource_exhausted() {
    // A 16 MiB store takes blobs of at most a quarter of its ring.
    let kiln = Kiln::start_with(&["--cas-size", "16777216"]);
    let (digest, blobs) = action("head -c 8000000 /dev/zero > out.txt", &[], 0, &[]);
    upload(&kiln, &blobs).await;
    let retries = kiln.metric("kiln_scheduler_retries_total", &[]);
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), tonic::Code::ResourceExhausted as i32, "{r:?}");
    let message = r.status.unwrap().message;
    assert!(message.contains("larger than the CAS takes"), "{message}");
    assert_eq!(kiln.metric("kiln_scheduler_retries_total", &[]), retries, "the action was run again");
    assert_eq!(kiln.metric("kiln_worker_runs_total", &[]), 1.0);
}

/// `[execution.worker] output_collect_secs_max`: an 8 GiB sparse output,
/// whose hashing would take minutes, ends the action with
/// RESOURCE_EXHAUSTED at the bound, run once; a bad bound is refused at
/// start.
#[tokio::test]
async fn output_collection_is_bounded_in_time_and_run_once() {
    let (ok, err) = common::serve_refused_config("[execution.worker]\noutput_collect_secs_max = 0\n");
    assert!(!ok && err.contains("output_collect_secs_max"), "{err}");

    let kiln = Kiln::start_with_config("[execution.worker]\noutput_collect_secs_max = 1\n");
    let (digest, blobs) = action("truncate -s 8G out.txt", &[], 0, &[]);
    upload(&kiln, &blobs).await;
    let start = std::time::Instant::now();
    let r = response_of(execute(&kiln, digest, false).await.last().unwrap());
    assert_eq!(status_code(&r), tonic::Code::ResourceExhausted as i32, "{r:?}");
    let message = r.status.unwrap().message;
    assert!(message.contains("longer than the 1 s") && message.contains("out.txt"), "{message}");
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "{:?}", start.elapsed());
    assert_eq!(kiln.metric("kiln_scheduler_retries_total", &[]), 0.0, "the action was run again");
    assert_eq!(kiln.metric("kiln_worker_runs_total", &[]), 1.0);
}

/// `[execution.tenants.NAME]`: a tenant capped at one slot runs its actions
/// one at a time on a worker with two; a weight out of range is refused at
/// start, naming the tenant.
#[tokio::test]
async fn a_tenants_slot_cap_holds_and_bad_shares_are_refused() {
    let (ok, err) = common::serve_refused_config("[execution.tenants.main]\nweight = 0\n");
    assert!(!ok && err.contains("[execution.tenants.main] weight"), "{err}");

    let kiln = Kiln::start_with_config(
        "[execution]\nlocal_worker_slots = 2\n\n[execution.tenants.capped]\nslots_max = 1\n",
    );
    // Each prints when it started and ended, in nanoseconds.
    let script = |n: u32| format!("date +%s%N; sleep 0.5; date +%s%N; echo {n} > out.txt");
    let mut runs = Vec::new();
    for n in 0..2 {
        let (digest, blobs) = action(&script(n), &[], 0, &[]);
        kiln.upload("capped", &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>()).await;
        runs.push(digest);
    }
    let (a, b) =
        tokio::join!(execute_in(&kiln, "capped", runs[0], true), execute_in(&kiln, "capped", runs[1], true));
    let mut spans = Vec::new();
    for ops in [a, b] {
        let r = response_of(ops.last().unwrap());
        assert_eq!(status_code(&r), 0, "{r:?}");
        let d = r.result.unwrap().stdout_digest.unwrap();
        let read = reapi::BatchReadBlobsRequest {
            instance_name: "capped".into(),
            digests: vec![d],
            ..Default::default()
        };
        let out =
            kiln.cas().await.batch_read_blobs(read).await.unwrap().into_inner().responses.remove(0).data;
        let times: Vec<u128> = String::from_utf8(out).unwrap().lines().map(|l| l.parse().unwrap()).collect();
        spans.push((times[0], times[1]));
    }
    spans.sort_unstable();
    assert!(spans[0].1 <= spans[1].0, "the capped tenant ran two at once: {spans:?}");
}

/// Runs `script` as an action to the end; its response.
async fn run_script(kiln: &Kiln, script: &str) -> ExecuteResponse {
    let (digest, blobs) = action(script, &[], 0, &[]);
    upload(kiln, &blobs).await;
    response_of(execute(kiln, digest, true).await.last().unwrap())
}

/// `[execution.worker] disk_bytes` and `disk_inodes`: an action that fills
/// its disk with a file, with files, or with its stdout ends with
/// RESOURCE_EXHAUSTED, run once, while an action beside it writes what it
/// needs; the next action on the slot has the whole disk again. A size the
/// worker's filesystem cannot hold for every slot is refused at start.
#[tokio::test]
async fn an_action_that_fills_its_disk_fails_alone_with_resource_exhausted() {
    let kiln = Kiln::start_with_config(
        "[execution]\nlocal_worker_slots = 2\nunsatisfiable_grace_ms = 0\n\n[execution.worker]\ndisk_bytes = 67108864\ndisk_inodes = 4096\n",
    );
    // The worker offers its disk as a platform property, matched as a minimum.
    for (wanted, code) in [("1048576", tonic::Code::Ok), ("67108865", tonic::Code::FailedPrecondition)] {
        let (digest, blobs) = action("echo > out.txt", &[], 0, &[("disk-bytes", wanted)]);
        upload(&kiln, &blobs).await;
        let r = response_of(execute(&kiln, digest, true).await.last().unwrap());
        assert_eq!(status_code(&r), code as i32, "disk-bytes={wanted}: {r:?}");
    }
    let filler = "dd if=/dev/zero of=big bs=1M count=200 2>/dev/null; echo done > out.txt";
    let beside = "dd if=/dev/zero of=mine bs=1M count=40 2>/dev/null && sleep 0.2 && echo ok > out.txt";
    let (full, fine) = tokio::join!(run_script(&kiln, filler), run_script(&kiln, beside));
    assert_eq!(status_code(&full), tonic::Code::ResourceExhausted as i32, "{full:?}");
    let message = full.status.unwrap().message;
    assert!(message.contains("filled its disk") && message.contains("67108864"), "{message}");
    assert_eq!((status_code(&fine), fine.result.unwrap().exit_code), (0, 0));
    for script in [
        "i=0; while [ $i -lt 5000 ] && : > f$i; do i=$((i+1)); done; echo done > out.txt",
        "head -c 200000000 /dev/zero; echo done > out.txt",
    ] {
        let r = run_script(&kiln, script).await;
        assert_eq!(status_code(&r), tonic::Code::ResourceExhausted as i32, "{script}: {r:?}");
    }
    for _ in 0..2 {
        let r = run_script(&kiln, "dd if=/dev/zero of=again bs=1M count=50 2>/dev/null && echo ok > out.txt")
            .await;
        assert_eq!((status_code(&r), r.result.unwrap().exit_code), (0, 0), "the disk was not cleared");
    }
    assert_eq!(kiln.metric("kiln_scheduler_retries_total", &[]), 0.0, "an action was run again");

    let huge = Kiln::start_with_config("[execution.worker]\ndisk_bytes = 1125899906842624\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !huge.log_contains("do not fit") {
        assert!(std::time::Instant::now() < deadline, "{}", huge.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(huge.log_contains("Lower disk_bytes"), "{}", huge.log());
}

/// The exec root's source is invisible: the action's mount table names no
/// directory of the worker's.
#[tokio::test]
async fn an_actions_mount_table_shows_no_host_path_of_the_worker() {
    let kiln = Kiln::start();
    let r = run_script(&kiln, "cat /proc/self/mountinfo; echo > out.txt").await;
    assert_eq!(status_code(&r), 0, "{r:?}");
    let table = String::from_utf8(stdout_of(&kiln, &r).await).unwrap();
    assert!(table.contains(" /kiln/exec "), "{table}");
    let data_dir = kiln.data_dir.path().to_str().unwrap().to_owned();
    assert!(!table.contains(&data_dir) && !table.contains("/worker/"), "{table}");
}

/// A priority below 0 is used only by principals holding the `urgent`
/// permission; others run at 0 (counted), and both builds run.
#[tokio::test]
async fn only_urgent_principals_may_ask_for_priorities_below_zero() {
    use kiln_tools::client::{ClientOptions, connect};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.json");
    let dev = common::bootstrap_token(&file, "dev", "main", "execute,read,write", "never");
    let ci = common::bootstrap_token(&file, "ci", "main", "execute,read,write,urgent", "never");
    let kiln = Kiln::start_with_config(&common::token_config(&file, ""));
    let clamped = || kiln.metric("kiln_scheduler_priorities_clamped_total", &[]);
    for (n, (token, expected)) in [(dev, 1.0), (ci, 1.0)].into_iter().enumerate() {
        let conn =
            connect(&ClientOptions { token: Some(token), remote: kiln.remote(), ..Default::default() })
                .await
                .unwrap();
        let (digest, blobs) = action(&format!("echo {n} > out.txt"), &[], 0, &[]);
        let blobs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        conn.cas().batch_update_blobs(common::upload_request("main", &blobs)).await.unwrap();
        let request = ExecuteRequest {
            instance_name: "main".into(),
            action_digest: Some(digest.to_proto()),
            execution_policy: Some(reapi::ExecutionPolicy { priority: -500 }),
            ..Default::default()
        };
        let mut stream = ExecutionClient::new(conn.channel()).execute(request).await.unwrap().into_inner();
        let mut last = None;
        while let Some(op) = stream.next().await {
            last = Some(op.unwrap());
        }
        let r = response_of(&last.unwrap());
        assert_eq!(status_code(&r), 0, "{r:?}");
        assert_eq!(clamped(), expected, "after the build of token {n}");
    }
}
