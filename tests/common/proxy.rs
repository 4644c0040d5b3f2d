//! An HTTP/2 proxy between a gRPC client (Bazel) and Kiln that passes
//! every call through and can misbehave in one chosen way: for tests of
//! what happens when the network or the store changes between two calls.
//!
//! It works on HTTP/2 streams (the `h2` crate), so every service and
//! header passes unchanged; only the calls a fault names are decoded.

#![allow(clippy::print_stderr)] // why a proxied call failed, for a failing test's output

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kiln_proto::google::longrunning::{Operation, operation};
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::reapi::{
    ExecuteOperationMetadata, ExecuteResponse, FindMissingBlobsResponse, execution_stage,
};
use prost::Message;

const FIND_MISSING: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
const EXECUTE: &str = "/build.bazel.remote.execution.v2.Execution/Execute";
const WAIT_EXECUTION: &str = "/build.bazel.remote.execution.v2.Execution/WaitExecution";
const FAILED_PRECONDITION: i32 = 9;

/// The one way the proxy misbehaves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// The first FindMissingBlobs answer that names a missing blob loses
    /// one of them: the client believes the blob is stored (as if it were
    /// evicted right after the answer) and does not upload it.
    HideOneMissingBlob,
    /// The first Execute stream that reports EXECUTING ends right after
    /// that message with UNAVAILABLE (as a load balancer does when a
    /// connection drops), and its call to Kiln is cancelled.
    CutExecuteWhenExecuting,
}

/// What the proxy saw.
#[derive(Default)]
pub struct Seen {
    pub executes: AtomicU32,
    pub wait_executions: AtomicU32,
    /// Execute or WaitExecution answers that were FAILED_PRECONDITION.
    pub precondition_failures: AtomicU32,
    /// Digests hidden from the client (`hash/size`).
    pub hidden: Mutex<Vec<String>>,
    /// Streams cut.
    pub cut: AtomicU32,
    fault_done: AtomicBool,
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    /// Listens on a loopback port, forwarding to `upstream` (plaintext).
    pub fn start(upstream: SocketAddr, fault: Fault) -> Proxy {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let seen = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(tcp, upstream, fault, seen).await {
                        eprintln!("proxy: connection ended: {e}");
                    }
                });
            }
        });
        Proxy { addr, seen, _runtime: runtime }
    }

    /// `grpc://` address for Bazel.
    pub fn remote(&self) -> String {
        format!("grpc://{}", self.addr)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn connection(
    tcp: tokio::net::TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    seen: Arc<Seen>,
) -> Result<(), BoxError> {
    let up = tokio::net::TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    tcp.set_nodelay(true)?;
    let (client, driver) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake::<_, Bytes>(up)
        .await?;
    tokio::spawn(async move {
        let _ = driver.await;
    });
    let mut server = h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake::<_, Bytes>(tcp)
        .await?;
    while let Some(accepted) = server.accept().await {
        let (request, respond) = accepted?;
        let client = client.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            if let Err(e) = exchange(request, respond, client, fault, seen).await {
                eprintln!("proxy: call ended: {e}");
            }
        });
    }
    Ok(())
}

/// One call: the request through, the response back (possibly changed).
async fn exchange(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    client: h2::client::SendRequest<Bytes>,
    fault: Fault,
    seen: Arc<Seen>,
) -> Result<(), BoxError> {
    let path = request.uri().path().to_owned();
    match path.as_str() {
        EXECUTE => seen.executes.fetch_add(1, Ordering::SeqCst),
        WAIT_EXECUTION => seen.wait_executions.fetch_add(1, Ordering::SeqCst),
        _ => 0,
    };
    let (parts, mut body) = request.into_parts();
    let mut client = client.ready().await?;
    let (response, mut up_send) = client.send_request(http::Request::from_parts(parts, ()), false)?;
    tokio::spawn(async move {
        while let Some(chunk) = body.data().await {
            let Ok(chunk) = chunk else { return };
            let _ = body.flow_control().release_capacity(chunk.len());
            if up_send.send_data(chunk, false).is_err() {
                return;
            }
        }
        let _ = match body.trailers().await {
            Ok(Some(trailers)) => up_send.send_trailers(trailers),
            _ => up_send.send_data(Bytes::new(), true),
        };
    });

    let (parts, mut up_body) = response.await?.into_parts();
    if up_body.is_end_stream() {
        // Trailers-only (an error before any message): the status is in
        // these headers.
        if inspect_headers(&path, &parts.headers) {
            seen.precondition_failures.fetch_add(1, Ordering::SeqCst);
        }
        respond.send_response(http::Response::from_parts(parts, ()), true)?;
        return Ok(());
    }
    let mut send = respond.send_response(http::Response::from_parts(parts, ()), false)?;
    let inspect = path == EXECUTE || path == WAIT_EXECUTION;
    let hide = fault == Fault::HideOneMissingBlob && path == FIND_MISSING;
    let cut = fault == Fault::CutExecuteWhenExecuting && path == EXECUTE;
    let mut pending = BytesMut::new();
    while let Some(chunk) = up_body.data().await {
        let chunk = chunk?;
        let _ = up_body.flow_control().release_capacity(chunk.len());
        if !(inspect || hide) {
            send.send_data(chunk, false)?;
            continue;
        }
        pending.put(chunk);
        while let Some(message) = next_message(&mut pending) {
            if hide {
                let message = if seen.fault_done.load(Ordering::SeqCst) {
                    message
                } else {
                    hide_one(&message, &seen).into()
                };
                send.send_data(frame(&message), false)?;
                continue;
            }
            let executing = inspect_operation(&message, &seen);
            send.send_data(frame(&message), false)?;
            if cut && executing && !seen.fault_done.swap(true, Ordering::SeqCst) {
                seen.cut.fetch_add(1, Ordering::SeqCst);
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                trailers
                    .insert("grpc-message", http::HeaderValue::from_static("stream cut by the test proxy"));
                send.send_trailers(trailers)?;
                // Dropping the upstream body cancels the call to Kiln.
                return Ok(());
            }
        }
    }
    match up_body.trailers().await? {
        Some(trailers) => {
            if inspect_headers(&path, &trailers) {
                seen.precondition_failures.fetch_add(1, Ordering::SeqCst);
            }
            send.send_trailers(trailers)?;
        }
        None => send.send_data(Bytes::new(), true)?,
    }
    Ok(())
}

/// Whether an Execute or WaitExecution status is FAILED_PRECONDITION.
fn inspect_headers(path: &str, headers: &http::HeaderMap) -> bool {
    (path == EXECUTE || path == WAIT_EXECUTION) && headers.get("grpc-status").is_some_and(|v| v == "9")
}

/// Takes one whole gRPC message (uncompressed) off the front of `buf`.
fn next_message(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    assert_eq!(buf[0], 0, "the proxy decodes uncompressed messages only");
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap());
    out.put_slice(message);
    out.freeze()
}

/// Drops the first missing digest from a FindMissingBlobs answer.
fn hide_one(message: &[u8], seen: &Seen) -> Vec<u8> {
    let mut answer = FindMissingBlobsResponse::decode(message).unwrap();
    if let Some(d) = answer.missing_blob_digests.pop() {
        seen.hidden.lock().unwrap().push(format!("{}/{}", d.hash, d.size_bytes));
        seen.fault_done.store(true, Ordering::SeqCst);
    }
    answer.encode_to_vec()
}

/// Counts failed preconditions; whether the operation is EXECUTING.
fn inspect_operation(message: &[u8], seen: &Seen) -> bool {
    let op = Operation::decode(message).unwrap();
    if let Some(operation::Result::Response(any)) = &op.result {
        let response = ExecuteResponse::decode(any.value.as_slice()).unwrap();
        if response.status.as_ref().is_some_and(|s: &RpcStatus| s.code == FAILED_PRECONDITION) {
            seen.precondition_failures.fetch_add(1, Ordering::SeqCst);
        }
    }
    if let Some(operation::Result::Error(status)) = &op.result
        && status.code == FAILED_PRECONDITION
    {
        seen.precondition_failures.fetch_add(1, Ordering::SeqCst);
    }
    let stage = op.metadata.map(|m| ExecuteOperationMetadata::decode(m.value.as_slice()).unwrap().stage);
    !op.done && stage == Some(execution_stage::Value::Executing as i32)
}
