//! Workers in their own processes (`kiln worker`) against a scheduler
//! without a local worker: a worker SIGKILLed mid-action loses nothing (the
//! action runs again elsewhere), and an action whose worker dies every time
//! fails after the bounded attempts instead of hanging; a worker serves
//! its own metrics and status page; its CAS client takes an early answer
//! for a blob the CAS already holds, and reports an input directory the
//! CAS lacks by its digest. And `kiln serve`'s local worker, a supervised
//! process of its own: killed mid-action, it is started again, the action
//! runs again and the cache never stops; it ends with `kiln serve`.
//!
//! Needs root: actions run in sandboxes mapped to other uids.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{KILN, Kiln};
use futures::StreamExt;
use kiln_proto::google::longrunning::{Operation, operation};
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{self, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse, execution_stage};
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
    /// What it printed on stdout (its metrics address).
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
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
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("KILN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kiln worker");
        let mut child = child;
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (pipe, sink) = (child.stdout.take().unwrap(), stdout.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        Worker { child, stdout, _dir: dir }
    }

    /// The address its metrics listener printed.
    async fn metrics_addr(&self) -> std::net::SocketAddr {
        common::eventually(Duration::from_secs(30), "the worker's metrics address", || {
            let printed = self.stdout.lock().unwrap().clone();
            let addr = printed.lines().find_map(|l| l.strip_prefix("kiln: metrics on ")?.parse().ok());
            async move { addr }
        })
        .await
    }

    /// Starts a worker and waits until the scheduler has registered it.
    async fn registered(kiln: &Kiln, id: &str) -> Worker {
        let worker = Worker::start(kiln, id);
        let needle = format!("worker registered worker={id}");
        common::eventually(Duration::from_secs(60), "the worker to register", || {
            let seen = kiln.log().contains(&needle);
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

/// Uploads an action running `sh -c script`; its digest.
async fn action(kiln: &Kiln, script: &str) -> Digest {
    action_in(kiln, script, &reapi::Directory::default()).await
}

/// Uploads an action running `sh -c script` in the input root `root` (the
/// Directory `root` itself, none of what it names); its digest.
async fn action_in(kiln: &Kiln, script: &str, root: &reapi::Directory) -> Digest {
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let action = reapi::Action {
        command_digest: Some(sha(&command.encode_to_vec()).to_proto()),
        input_root_digest: Some(sha(&root.encode_to_vec()).to_proto()),
        ..Default::default()
    };
    let blobs = [action.encode_to_vec(), command.encode_to_vec(), root.encode_to_vec()];
    kiln.upload("", &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>()).await;
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

/// GET `path` from an HTTP listener; the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

#[tokio::test]
async fn a_worker_serves_its_own_metrics_and_status() {
    let kiln = scheduler("");
    let worker = Worker::registered(&kiln, "observed").await;
    let addr = worker.metrics_addr().await;
    let digest = action(&kiln, "echo observed").await;
    let r = execute(&kiln, digest, |_| {}).await;
    assert_eq!(r.result.unwrap().exit_code, 0);
    let metrics = http_get(addr, "/metrics");
    for line in [
        "kiln_worker_slots 1",
        "kiln_worker_running_actions 0",
        "kiln_worker_runs_total{outcome=\"exited\"} 1",
        "kiln_worker_file_cache_capacity_bytes ",
        "kiln_worker_file_cache_entries ",
    ] {
        assert!(metrics.contains(line), "{line:?} in\n{metrics}");
    }
    assert!(!metrics.contains("kiln_store_capacity_bytes"), "a worker has no stores");
    let status = http_get(addr, "/status.txt");
    for want in ["== Configuration", "observed", "== Worker", "0 of 1 busy", "exited 1"] {
        assert!(status.contains(want), "{want:?} in\n{status}");
    }
    assert!(!status.contains("== Stores") && !status.contains("== Queue"), "{status}");
}

#[tokio::test]
async fn a_worker_uploading_a_blob_the_cas_already_holds_succeeds() {
    use kiln_worker::cas::CasClient;
    let kiln = Kiln::start();
    let connection =
        kiln_tools::client::connect(&common::calls::opts(kiln.remote())).await.expect("connect to the CAS");
    let cas = kiln_worker::grpc_cas::GrpcCas::new(connection, "", DigestFunction::Sha256);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("output.bin");
    let data: Vec<u8> = (0..32u32 << 20).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();
    std::fs::write(&file, &data).unwrap();
    let digest = sha(&data);
    cas.upload_file(&digest, &file).await.expect("the first upload");
    // Another action's identical output: the CAS answers after the first
    // chunk, and the rest of the file is never sent.
    cas.upload_file(&digest, &file).await.expect("an upload the CAS already holds");
    cas.upload_bytes(&digest, bytes::Bytes::from(data)).await.expect("the same, from memory");
}

/// A worker apart from its storage walks input trees by the same rule as
/// the local one: a directory the CAS lacks is a missing input named by its
/// digest, and the action runs once it is uploaded.
#[tokio::test]
async fn a_remote_worker_reports_a_missing_input_directory_by_its_digest() {
    let kiln = scheduler("");
    let _worker = Worker::registered(&kiln, "remote").await;
    let node = |name: &str, d: &reapi::Directory| reapi::DirectoryNode {
        name: name.into(),
        digest: Some(sha(&d.encode_to_vec()).to_proto()),
    };
    // `sub` holds the empty directory, which every CAS holds.
    let sub = reapi::Directory {
        directories: vec![node("empty", &reapi::Directory::default())],
        ..Default::default()
    };
    let root = reapi::Directory { directories: vec![node("sub", &sub)], ..Default::default() };
    let digest = action_in(&kiln, "test -d sub/empty", &root).await;
    let r = execute(&kiln, digest, |_| {}).await;
    let status = r.status.clone().unwrap_or_default();
    assert_eq!(status.code, tonic::Code::FailedPrecondition as i32, "{r:?}");
    let missing = sha(&sub.encode_to_vec());
    let text = String::from_utf8_lossy(&status.details[0].value).into_owned();
    assert!(text.contains(&format!("blobs/{}/{}", missing.hash_hex(), missing.size_bytes())), "{text}");
    kiln.upload("", &[&sub.encode_to_vec()]).await;
    let r = execute(&kiln, digest, |_| {}).await;
    assert_eq!(r.status.as_ref().map_or(0, |s| s.code), 0, "{r:?}");
    assert_eq!(r.result.unwrap().exit_code, 0);
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// The pid of `kiln serve`'s local worker process, once it is registered
/// (and is not `old`).
async fn local_worker(kiln: &Kiln, old: Option<u32>) -> u32 {
    common::eventually(Duration::from_secs(60), "the local worker's process", || {
        let pid = children(kiln.child.id()).into_iter().find(|&pid| {
            Some(pid) != old
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(15).any(|w| w == b"--supervised-by"))
        });
        let registered = kiln.log().matches("worker registered worker=local-").count();
        let expected = if old.is_some() { 2 } else { 1 };
        async move { pid.filter(|_| registered >= expected) }
    })
    .await
}

fn kill(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[tokio::test]
async fn a_killed_local_worker_is_started_again_and_its_action_runs_again() {
    let kiln = Kiln::start();
    let first = local_worker(&kiln, None).await;
    // What it inherited its connection on is /dev/null now: nothing it
    // starts can reach the socket.
    let stdin = std::fs::read_link(format!("/proc/{first}/fd/0")).unwrap();
    assert_eq!(stdin, std::path::Path::new("/dev/null"));
    let digest = action(&kiln, "sleep 2; echo survived").await;
    let r = execute(&kiln, digest, |n| {
        if n == 1 {
            kill(first);
        }
    })
    .await;
    assert_eq!(r.status.as_ref().map_or(0, |s| s.code), 0, "{r:?}");
    assert_eq!(r.result.as_ref().unwrap().exit_code, 0, "{r:?}");
    assert!(kiln.child.id() > 0 && alive(kiln.child.id()), "kiln serve lives on");
    let second = local_worker(&kiln, Some(first)).await;
    assert!(!alive(first));
    assert!(kiln.log_contains("the local worker's process ended"), "{}", kiln.log());
    assert_eq!(kiln.metric("kiln_local_worker_exits_total", &[]), 1.0);
    assert_eq!(kiln.metric("kiln_local_worker_up", &[]), 1.0);
    assert!(kiln.metric("kiln_scheduler_retries_total", &[]) >= 1.0);
    // The new process's figures are kiln serve's: it ran the action once.
    assert_eq!(kiln.metric("kiln_worker_runs_total", &["outcome=\"exited\""]), 1.0);
    let status = http_get(kiln.metrics_addr(), "/status.txt");
    assert!(status.contains(&format!("pid {second}")), "{status}");
    // And the cache answered throughout.
    assert!(kiln.missing(&[digest]).await.is_empty());
}

#[tokio::test]
async fn the_local_worker_ends_with_kiln_serve() {
    let kiln = Kiln::start();
    let worker = local_worker(&kiln, None).await;
    let _data = kiln.kill();
    common::eventually(Duration::from_secs(30), "the local worker to end", || {
        let gone = !alive(worker);
        async move { gone.then_some(()) }
    })
    .await;
}
