//! Memory bounds against a real `kiln serve`: uploads and reads are charged
//! as bytes are held, waits end, a careless or hostile client cannot block
//! others, and remembered partial uploads are bounded by bytes.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use std::time::Duration;

use common::Kiln;
use kiln_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
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
