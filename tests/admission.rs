//! Memory bounds against a real `kiln serve`: uploads and reads are charged
//! as bytes are held, waits end, a careless or hostile client cannot block
//! others, and remembered partial uploads are bounded by bytes.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use std::time::Duration;

use futures::StreamExt;

use common::Kiln;
use kiln_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use kiln_proto::transport::CONNECTION_WINDOW_BYTES;
use kiln_proto::{Digest, DigestFunction};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Fails a test that would otherwise hang, instead of hanging CI.
const HANG: Duration = Duration::from_secs(60);

fn sha(data: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(data)
}

fn upload_name(d: &Digest, size: u64) -> String {
    format!("uploads/{}/blobs/{}/{size}", uuid::Uuid::new_v4(), d.hash_hex())
}

fn message(name: &str, offset: usize, data: &[u8], finish: bool) -> WriteRequest {
    WriteRequest {
        resource_name: name.to_owned(),
        write_offset: offset as i64,
        finish_write: finish,
        data: data.to_vec(),
    }
}

/// Uploads `data` in one stream of `chunk`-sized messages.
async fn upload(kiln: &Kiln, data: &[u8], chunk: usize) -> Result<i64, tonic::Status> {
    let d = sha(data);
    let name = upload_name(&d, data.len() as u64);
    let reqs: Vec<WriteRequest> = data
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| message(&name, i * chunk, c, (i + 1) * chunk >= data.len()))
        .collect();
    let resp = kiln.bytestream().await.write(futures::stream::iter(reqs)).await?;
    Ok(resp.into_inner().committed_size)
}

/// Starts an upload of a blob of `declared` bytes, sends `prefix` and keeps
/// the stream open; returns the sender that keeps it open.
async fn start_stalled_upload(kiln: &Kiln, declared: u64, prefix: &[u8]) -> mpsc::Sender<WriteRequest> {
    let fake = sha(&declared.to_le_bytes());
    let name = upload_name(&fake, declared);
    let (tx, rx) = mpsc::channel(4);
    tx.send(message(&name, 0, prefix, false)).await.unwrap();
    let mut client = kiln.bytestream().await;
    tokio::spawn(async move {
        let _ = client.write(ReceiverStream::new(rx)).await;
    });
    tx
}

#[tokio::test]
async fn trickling_uploads_do_not_block_others() {
    // Three clients each announce a 1 GiB upload and send one byte.
    let kiln = Kiln::start();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(start_stalled_upload(&kiln, 1 << 30, b"x").await);
    }
    // A 1 KiB upload goes through at once: the tricklers hold one byte each.
    let small = vec![7u8; 1024];
    let committed = tokio::time::timeout(HANG, upload(&kiln, &small, 1024)).await.expect("blocked").unwrap();
    assert_eq!(committed, 1024);
    drop(stalled);
}

#[tokio::test]
async fn blobs_larger_than_the_upload_budget_stream_through() {
    // An upload budget of one 4 MiB message (and a decompressed chunk):
    // uploads hold a message at a time, never a whole blob.
    let kiln = Kiln::start_with_config(
        "[storage]\ncas_memory_bytes = 268435456\n[limits]\nblob_size_bytes_max = 67108864\n\
         grpc_message_size_bytes_max = 4194304\nbatch_total_size_bytes_max = 3145728\n\
         upload_client_bytes_max = 5242880\nuploads_in_flight_bytes_max = 5242880\n",
    );
    let uploads = (0..3u8).map(|seed| {
        let data: Vec<u8> = (0..(16u32 << 20)).map(|i| (i as u8).wrapping_mul(seed + 3)).collect();
        let kiln = &kiln;
        async move { (upload(kiln, &data, 1 << 20).await, data.len()) }
    });
    for (result, len) in futures::future::join_all(uploads).await {
        assert_eq!(result.unwrap(), len as i64);
    }
    let big: Vec<u8> = (0..(48u32 << 20)).map(|i| (i % 241) as u8).collect();
    let committed = tokio::time::timeout(HANG, upload(&kiln, &big, 1 << 20)).await.expect("blocked").unwrap();
    assert_eq!(committed, big.len() as i64);
}

#[tokio::test]
async fn huge_declared_sizes_are_refused_without_harm() {
    let kiln = Kiln::start_with_config(
        "[storage]\nbackend = \"memory\"\ncas_memory_bytes = 2251799813685248\n[limits]\nblob_size_bytes_max = 1125899906842624\n\
         upload_client_bytes_max = 1125899906842624\nuploads_in_flight_bytes_max = 1125899906842624\n",
    );
    let declared = 1u64 << 49;
    let name = upload_name(&sha(b"huge"), declared);
    let reqs = vec![message(&name, 0, b"one byte", true)];
    let err = kiln.bytestream().await.write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("finished after 8 bytes"), "{}", err.message());
    // The server is alive and well.
    assert_eq!(upload(&kiln, b"still serving", 100).await.unwrap(), 13);
}

#[tokio::test]
async fn empty_zstd_frames_are_refused_before_the_idle_timeout() {
    let kiln = Kiln::start();
    let empty = zstd::bulk::compress(b"", 1).unwrap();
    let target = sha(b"ten bytes!");
    let name = format!("uploads/{}/compressed-blobs/zstd/{}/10", uuid::Uuid::new_v4(), target.hash_hex());
    let frames: Vec<WriteRequest> =
        (0..20_000).map(|i| message(&name, i * empty.len(), &empty, false)).collect();
    let started = std::time::Instant::now();
    let err = kiln.bytestream().await.write(futures::stream::iter(frames)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("compressed bytes"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(30), "bounded by size, not the 60 s idle timeout");
}

#[tokio::test]
async fn wrong_offsets_keep_the_resumable_state() {
    let kiln = Kiln::start();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 13) as u8).collect();
    let d = sha(&data);
    let name = upload_name(&d, data.len() as u64);
    let mut bs = kiln.bytestream().await;
    let first = vec![message(&name, 0, &data[..20_000], false)];
    assert!(bs.write(futures::stream::iter(first)).await.is_err(), "no finish_write");
    let committed = |bs: &mut ByteStreamClient<tonic::transport::Channel>| {
        let req = QueryWriteStatusRequest { resource_name: name.clone() };
        let mut bs = bs.clone();
        async move { bs.query_write_status(req).await.unwrap().into_inner().committed_size }
    };
    assert_eq!(committed(&mut bs).await, 20_000);
    // Resuming at a wrong offset is refused, and the state stays.
    let wrong = vec![message(&name, 12_345, &data[12_345..], true)];
    assert_eq!(bs.write(futures::stream::iter(wrong)).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(committed(&mut bs).await, 20_000);
    // So does a wrong offset in the middle of a resumed stream.
    let stumble = vec![
        message(&name, 20_000, &data[20_000..30_000], false),
        message(&name, 31_000, &data[31_000..], true),
    ];
    assert_eq!(bs.write(futures::stream::iter(stumble)).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(committed(&mut bs).await, 30_000);
    let rest = vec![message(&name, 30_000, &data[30_000..], true)];
    assert_eq!(bs.write(futures::stream::iter(rest)).await.unwrap().into_inner().committed_size, 50_000);
}

#[tokio::test]
async fn partial_uploads_are_bounded_by_bytes() {
    let kiln = Kiln::start_with_config("[limits]\npartial_uploads_bytes_max = 100000\n");
    let mut bs = kiln.bytestream().await;
    let mut names = Vec::new();
    for i in 0..3u8 {
        let data = vec![i; 80_000];
        let name = upload_name(&sha(&data), data.len() as u64);
        let first = vec![message(&name, 0, &data[..40_000], false)];
        assert!(bs.write(futures::stream::iter(first)).await.is_err());
        names.push(name);
    }
    let status = |name: &String| {
        let mut bs = bs.clone();
        let req = QueryWriteStatusRequest { resource_name: name.clone() };
        async move { bs.query_write_status(req).await.map(|r| r.into_inner().committed_size) }
    };
    assert_eq!(status(&names[0]).await.unwrap_err().code(), Code::NotFound, "the oldest is forgotten");
    assert_eq!(status(&names[1]).await.unwrap(), 40_000);
    assert_eq!(status(&names[2]).await.unwrap(), 40_000);
}

#[tokio::test]
async fn stalled_reads_hold_bounded_memory() {
    let kiln = Kiln::start_with_config(
        "[limits]\nreads_in_flight_bytes_max = 2097152\nadmission_timeout_ms = 300\n",
    );
    // Incompressible bytes, so the compressed reader stalls too.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..(16u32 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert_eq!(upload(&kiln, &data, 4 << 20).await.unwrap(), data.len() as i64);
    let d = sha(&data);
    let read = |compressed: bool| ReadRequest {
        resource_name: if compressed {
            format!("compressed-blobs/zstd/{}/{}", d.hash_hex(), d.size_bytes())
        } else {
            format!("blobs/{}/{}", d.hash_hex(), d.size_bytes())
        },
        ..Default::default()
    };
    // Two readers start (one compressed) and stop reading: each holds at
    // most the chunk it is sending.
    let mut stalled = Vec::new();
    for compressed in [false, true] {
        let mut client = ByteStreamClient::new(kiln.slow_reader_channel().await);
        stalled.push(client.read(read(compressed)).await.unwrap().into_inner());
    }
    // A third reader finds the budget (two chunks) full and is told to retry.
    let err = common::eventually(HANG, "the read budget to fill", || async {
        let mut stream = kiln.bytestream().await.read(read(false)).await.ok()?.into_inner();
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    })
    .await;
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("reads_in_flight_bytes_max"), "{}", err.message());
    drop(stalled);
    let back = common::eventually(HANG, "the budget to free", || async {
        let mut stream = kiln.bytestream().await.read(read(false)).await.ok()?.into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await.ok()? {
            out.extend(m.data);
        }
        Some(out)
    })
    .await;
    assert_eq!(back, data);
}

#[tokio::test]
async fn stalled_responses_hold_bounded_memory() {
    let kiln = Kiln::start_with_config(
        "[limits]\ngrpc_message_size_bytes_max = 4194304\nbatch_total_size_bytes_max = 3145728\n\
         responses_in_flight_bytes_max = 8388608\nadmission_timeout_ms = 300\n",
    );
    let blobs: Vec<Vec<u8>> =
        (1..=3u8).map(|i| (0..1_000_000u32).map(|j| (j as u8) ^ i.wrapping_mul(37)).collect()).collect();
    for blob in &blobs {
        upload(&kiln, blob, 1 << 20).await.unwrap();
    }
    let request = || kiln_proto::reapi::BatchReadBlobsRequest {
        digests: blobs.iter().map(|b| sha(b).to_proto()).collect(),
        ..Default::default()
    };
    // A client asks for 3 MB and does not read the answer (it never opens
    // its flow-control window): that answer is charged to the client's
    // share (4 MiB), so the next 3 MB answer to it is refused.
    use common::h2raw::{DATA, END_HEADERS, END_STREAM, HEADERS, RawH2, grpc_message, grpc_request};
    let mut stalled = RawH2::connect(kiln.addr);
    stalled.handshake();
    let path = "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs";
    stalled.send(HEADERS, END_HEADERS, 1, &grpc_request(path)).unwrap();
    stalled.send(DATA, END_STREAM, 1, &grpc_message(&prost::Message::encode_to_vec(&request()))).unwrap();
    let err = common::eventually(HANG, "the stalled answer to fill the budget", || async {
        let mut client = kiln.cas().await.max_decoding_message_size(8 << 20);
        client.batch_read_blobs(request()).await.err()
    })
    .await;
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("responses_in_flight_bytes_max"), "{}", err.message());
    drop(stalled);
    let answer = common::eventually(HANG, "the budget to free", || async {
        kiln.cas().await.batch_read_blobs(request()).await.ok()
    })
    .await;
    assert!(answer.into_inner().responses.iter().all(|r| r.data.len() == 1_000_000));
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[tokio::test]
#[allow(clippy::print_stderr)] // The figure goes into docs/BENCHMARKS.md.
async fn ten_thousand_concurrent_uploads_hold_bounded_memory() {
    // 10,000 uploads of 60,000-byte blobs (which the block store keeps in
    // memory until they commit, charged to the upload budget) send their
    // bytes in 4 KB messages and never finish: 600 MB offered. Budgets of
    // 32 MiB held and 32 MiB waiting make most fail at once or after the
    // admission timeout, and the admitted ones end at the idle timeout, so
    // every call ends and the server's peak memory is known.
    const STREAMS: usize = 10_000;
    const CONNECTIONS: usize = 40;
    const SIZE: usize = 60_000;
    const MESSAGE: usize = 4_000;
    let kiln = Kiln::start_with_config(
        "[limits]\nuploads_in_flight_bytes_max = 33554432\nupload_client_bytes_max = 33554432\n\
         admission_waiting_bytes_max = 33554432\nadmission_timeout_ms = 2000\nupload_idle_timeout_ms = 3000\n",
    );
    let before = peak_rss_bytes(kiln.child.id());
    let data = bytes::Bytes::from(vec![5u8; MESSAGE]);
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(kiln.channel().await);
    }
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let mut client = ByteStreamClient::new(channels[i % CONNECTIONS].clone());
        let name = upload_name(&sha(&(i as u64).to_le_bytes()), SIZE as u64);
        let data = data.clone();
        calls.spawn(async move {
            let messages = (0..SIZE / MESSAGE).map(move |m| WriteRequest {
                resource_name: if m == 0 { name.clone() } else { String::new() },
                write_offset: (m * MESSAGE) as i64,
                finish_write: false,
                data: data.to_vec(),
            });
            let stream = futures::stream::iter(messages).chain(futures::stream::pending());
            client.write(stream).await.map(|_| ()).map_err(|s| s.code())
        });
    }
    let mut codes = std::collections::BTreeMap::new();
    let all = tokio::time::timeout(HANG, async {
        while let Some(code) = calls.join_next().await {
            *codes.entry(format!("{:?}", code.unwrap().err())).or_insert(0) += 1;
        }
    });
    all.await.expect("every call ends");
    let grown = peak_rss_bytes(kiln.child.id()).saturating_sub(before);
    eprintln!("peak RSS grew by {} MiB under {STREAMS} uploads; outcomes {codes:?}", grown >> 20);
    assert!(!codes.contains_key("None"), "no stalled upload succeeds: {codes:?}");
    assert!(codes.contains_key("Some(ResourceExhausted)"), "the budgets refused some: {codes:?}");
    assert!(
        codes.contains_key("Some(DeadlineExceeded)"),
        "admitted ones stalled to the idle timeout: {codes:?}"
    );
    // The memory model: the budgets (64 MiB here), what HTTP/2 flow
    // control lets each connection send unread, and the state of each
    // stream (about 14 KB idle, 25 KB with a message decoded; 48 KiB
    // allowed, as HTTP/2 buffers pin whole reads).
    let bound =
        (64 << 20) + CONNECTIONS as u64 * u64::from(CONNECTION_WINDOW_BYTES) + STREAMS as u64 * (48 << 10);
    assert!(grown < bound, "peak RSS grew by {} MiB, over the model's {} MiB", grown >> 20, bound >> 20);
    // The node still serves.
    let small = vec![9u8; 1000];
    assert_eq!(upload(&kiln, &small, 1000).await.unwrap(), 1000);
}
