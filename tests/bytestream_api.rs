//! ByteStream Read, Write and QueryWriteStatus against a real `kiln serve`.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use common::Kiln;
use kiln_proto::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use kiln_proto::reapi::FindMissingBlobsRequest;
use kiln_proto::{Digest, DigestFunction};
use tonic::Code;

fn sha(data: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(data)
}

fn upload_name(instance: &str, d: &Digest, compressed: bool) -> String {
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    let kind = if compressed { "compressed-blobs/zstd" } else { "blobs" };
    format!("{prefix}uploads/{}/{kind}/{}/{}", uuid::Uuid::new_v4(), d.hash_hex(), d.size_bytes())
}

/// Splits `data` into write requests of `chunk` bytes with correct offsets.
fn chunks(name: &str, data: &[u8], chunk: usize, finish: bool) -> Vec<WriteRequest> {
    let mut out: Vec<WriteRequest> = data
        .chunks(chunk.max(1))
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.to_owned() } else { String::new() },
            write_offset: (i * chunk) as i64,
            finish_write: false,
            data: c.to_vec(),
        })
        .collect();
    if out.is_empty() {
        out.push(WriteRequest { resource_name: name.to_owned(), ..Default::default() });
    }
    out.last_mut().unwrap().finish_write = finish;
    out
}

async fn read_all(kiln: &Kiln, name: &str, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
    let req = ReadRequest { resource_name: name.to_owned(), read_offset: offset, read_limit: limit };
    let mut stream = kiln.bytestream().await.read(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.extend(m.data);
    }
    Ok(out)
}

async fn is_missing(kiln: &Kiln, d: &Digest) -> bool {
    let req = FindMissingBlobsRequest { blob_digests: vec![d.to_proto()], ..Default::default() };
    !kiln.cas().await.find_missing_blobs(req).await.unwrap().into_inner().missing_blob_digests.is_empty()
}

#[tokio::test]
async fn chunked_write_then_ranged_reads() {
    let kiln = Kiln::start();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = sha(&data);
    let name = upload_name("team/ci", &d, false);
    let resp =
        kiln.bytestream().await.write(futures::stream::iter(chunks(&name, &data, 100_000, true))).await;
    assert_eq!(resp.unwrap().into_inner().committed_size, data.len() as i64);

    let read = format!("team/ci/blobs/{}/{}", d.hash_hex(), d.size_bytes());
    assert_eq!(read_all(&kiln, &read, 0, 0).await.unwrap(), data);
    assert_eq!(read_all(&kiln, &read, 10, 5).await.unwrap(), &data[10..15]);
    assert_eq!(read_all(&kiln, &read, 2_999_990, 100).await.unwrap(), &data[2_999_990..]);
    assert!(read_all(&kiln, &read, data.len() as i64, 0).await.unwrap().is_empty());
    let err = read_all(&kiln, &read, data.len() as i64 + 1, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    assert_eq!(read_all(&kiln, &read, -1, 0).await.unwrap_err().code(), Code::OutOfRange);
    assert_eq!(read_all(&kiln, &read, 0, -1).await.unwrap_err().code(), Code::InvalidArgument);

    // Writing it again returns at once with the full size.
    let again = vec![WriteRequest {
        resource_name: upload_name("team/ci.sub", &d, false),
        data: data[..10].to_vec(),
        ..Default::default()
    }];
    let resp = kiln.bytestream().await.write(futures::stream::iter(again)).await.unwrap();
    assert_eq!(resp.into_inner().committed_size, data.len() as i64);
    let status = QueryWriteStatusRequest { resource_name: upload_name("team/ci", &d, false) };
    let status = kiln.bytestream().await.query_write_status(status).await.unwrap().into_inner();
    assert!(status.complete);
    assert_eq!(status.committed_size, data.len() as i64);
    // Another base tenant does not share the blob.
    assert_eq!(
        read_all(&kiln, &format!("other/blobs/{}/{}", d.hash_hex(), d.size_bytes()), 0, 0)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn read_errors() {
    let kiln = Kiln::start();
    let d = sha(b"absent");
    let err = read_all(&kiln, &format!("blobs/{}/6", d.hash_hex()), 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for bad in ["", "blobs/abc/1", "blobs", "x/uploads/blobs/abc/1", "compressed-blobs/lz4/aa/1"] {
        let err = read_all(&kiln, bad, 0, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
    }
    // The empty blob can always be read.
    let empty = DigestFunction::Sha256.empty();
    assert!(read_all(&kiln, &format!("blobs/{}/0", empty.hash_hex()), 0, 0).await.unwrap().is_empty());
}

#[tokio::test]
async fn corrupt_or_malformed_uploads_are_refused_and_not_stored() {
    let kiln = Kiln::start();
    let data = vec![7u8; 10_000];
    let d = sha(&data);
    let mut bs = kiln.bytestream().await;

    let mut corrupt = data.clone();
    corrupt[5000] = 8;
    let err = bs
        .write(futures::stream::iter(chunks(&upload_name("", &d, false), &corrupt, 4096, true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("does not match"), "{}", err.message());

    let mut reqs = chunks(&upload_name("", &d, false), &data, 4096, true);
    reqs[1].write_offset = 1;
    let err = bs.write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("write_offset"), "{}", err.message());

    let too_much = [data.clone(), vec![1]].concat();
    let err = bs
        .write(futures::stream::iter(chunks(&upload_name("", &d, false), &too_much, 4096, true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let short = &data[..9_000];
    let err = bs
        .write(futures::stream::iter(chunks(&upload_name("", &d, false), short, 4096, true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let mut reqs = chunks(&upload_name("", &d, false), &data, 4096, true);
    reqs[1].resource_name = upload_name("other", &d, false);
    let err = bs.write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = bs.write(futures::stream::iter(Vec::<WriteRequest>::new())).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let bad_name =
        vec![WriteRequest { resource_name: format!("blobs/{}/1", d.hash_hex()), ..Default::default() }];
    assert_eq!(bs.write(futures::stream::iter(bad_name)).await.unwrap_err().code(), Code::InvalidArgument);

    let too_big = Digest::parse(None, &d.hash_hex(), 5 << 30).unwrap();
    let reqs = vec![WriteRequest { resource_name: upload_name("", &too_big, false), ..Default::default() }];
    let err = bs.write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("max_cas_blob_size_bytes"));

    assert!(is_missing(&kiln, &d).await, "nothing was stored");
}

#[tokio::test]
async fn interrupted_upload_resumes_at_committed_size() {
    let kiln = Kiln::start();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
    let d = sha(&data);
    let name = upload_name("", &d, false);
    let mut bs = kiln.bytestream().await;

    // The first 20 000 bytes, then the stream closes without finish_write.
    let first = chunks(&name, &data[..20_000], 10_000, false);
    let err = bs.write(futures::stream::iter(first)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let status =
        bs.query_write_status(QueryWriteStatusRequest { resource_name: name.clone() }).await.unwrap();
    let status = status.into_inner();
    assert_eq!((status.committed_size, status.complete), (20_000, false));

    let rest: Vec<WriteRequest> = chunks(&name, &data[20_000..], 10_000, true)
        .into_iter()
        .map(|mut r| {
            r.write_offset += 20_000;
            r
        })
        .collect();
    let resp = bs.write(futures::stream::iter(rest)).await.unwrap();
    assert_eq!(resp.into_inner().committed_size, 50_000);
    assert!(!is_missing(&kiln, &d).await);

    let unknown = QueryWriteStatusRequest { resource_name: upload_name("", &sha(b"nope"), false) };
    assert_eq!(bs.query_write_status(unknown).await.unwrap_err().code(), Code::NotFound);

    // Resuming at an offset the server does not have is refused.
    let d2 = sha(b"fresh");
    let reqs = vec![WriteRequest {
        resource_name: upload_name("", &d2, false),
        write_offset: 3,
        finish_write: true,
        data: b"sh".to_vec(),
    }];
    assert_eq!(bs.write(futures::stream::iter(reqs)).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn compressed_blobs_round_trip() {
    let kiln = Kiln::start();
    let data: Vec<u8> = b"kiln compresses ".iter().copied().cycle().take(2_000_000).collect();
    let d = DigestFunction::Blake3.compute(&data);
    let compressed = zstd::bulk::compress(&data, 3).unwrap();
    let name = format!(
        "ci/uploads/{}/compressed-blobs/zstd/blake3/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        data.len()
    );
    // Offsets of compressed uploads count compressed bytes.
    let resp =
        kiln.bytestream().await.write(futures::stream::iter(chunks(&name, &compressed, 1000, true))).await;
    assert_eq!(resp.unwrap().into_inner().committed_size, compressed.len() as i64);
    // Uploading it again ends at once with -1, as the REAPI specifies for compressed uploads.
    let again = kiln
        .bytestream()
        .await
        .write(futures::stream::iter(chunks(
            &name.replace("ci/uploads/", "ci/uploads/x"),
            &compressed[..10],
            10,
            false,
        )))
        .await;
    assert_eq!(again.unwrap().into_inner().committed_size, -1);

    let plain = format!("ci/blobs/blake3/{}/{}", d.hash_hex(), data.len());
    assert_eq!(read_all(&kiln, &plain, 0, 0).await.unwrap(), data);
    let zname = format!("ci/compressed-blobs/zstd/blake3/{}/{}", d.hash_hex(), data.len());
    let z = read_all(&kiln, &zname, 0, 0).await.unwrap();
    assert!(z.len() < data.len() / 10);
    assert_eq!(zstd::stream::decode_all(&z[..]).unwrap(), data);
    // Offsets of compressed reads count uncompressed bytes.
    let z = read_all(&kiln, &zname, 1_000_000, 16).await.unwrap();
    assert_eq!(zstd::stream::decode_all(&z[..]).unwrap(), &data[1_000_000..1_000_016]);

    // A zstd payload that expands past the declared size is refused.
    let small = sha(b"tiny");
    let name = format!("uploads/u/compressed-blobs/zstd/{}/4", small.hash_hex());
    let bomb = zstd::bulk::compress(&vec![0u8; 10 << 20], 3).unwrap();
    let err = kiln
        .bytestream()
        .await
        .write(futures::stream::iter(chunks(&name, &bomb, 4096, true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("more than the digest"), "{}", err.message());
    let err = kiln
        .bytestream()
        .await
        .write(futures::stream::iter(chunks(&name, b"garbage!", 4, true)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(is_missing(&kiln, &small).await);
}

#[tokio::test]
async fn stalled_upload_times_out_and_can_resume() {
    let kiln = Kiln::start_with_config("[limits]\nupload_idle_timeout_ms = 300\n");
    let data = vec![3u8; 8192];
    let d = sha(&data);
    let name = upload_name("", &d, false);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(chunks(&name, &data[..4096], 4096, false).remove(0)).await.unwrap();
    let started = std::time::Instant::now();
    let err =
        kiln.bytestream().await.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    drop(tx);
    let status =
        kiln.bytestream().await.query_write_status(QueryWriteStatusRequest { resource_name: name }).await;
    assert_eq!(status.unwrap().into_inner().committed_size, 4096);
}

/// zstd uploads pass whatever the compression ratio and however the client
/// packs its messages: 8 MiB of zeros and 2 MiB of text in one message (a few
/// hundred bytes each), random data in one 3 MiB message and in pieces.
#[tokio::test]
async fn compressed_uploads_pass_at_every_ratio_in_one_message_or_many() {
    let kiln = Kiln::start();
    let random: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zeros", vec![0u8; 8 << 20]),
        ("text", b"cc -c foo.c -o foo.o\n".iter().copied().cycle().take(2 << 20).collect()),
        ("random", random),
    ];
    for (what, data) in cases {
        let d = sha(&data);
        let compressed = zstd::bulk::compress(&data, 3).unwrap();
        for piece in [compressed.len(), 64 << 10] {
            let name = upload_name("", &d, true);
            let resp = kiln
                .bytestream()
                .await
                .write(futures::stream::iter(chunks(&name, &compressed, piece, true)))
                .await;
            let committed =
                resp.unwrap_or_else(|e| panic!("{what} in pieces of {piece}: {e:?}")).into_inner();
            assert!(committed.committed_size == compressed.len() as i64 || committed.committed_size == -1);
        }
        assert!(!is_missing(&kiln, &d).await, "{what}");
        let plain = format!("blobs/{}/{}", d.hash_hex(), data.len());
        assert!(read_all(&kiln, &plain, 0, 0).await.unwrap() == data, "{what}");
    }
}

fn pseudo(len: u32, seed: u32) -> Vec<u8> {
    (0..len).map(|j| (j.wrapping_mul(2_654_435_761) >> 7 ^ seed.wrapping_mul(977)) as u8).collect()
}

/// Uploads that declare a large blob, send a little and hang up take
/// nothing from the cache (scaled from 40 uploads of 60 MiB on a 256 MiB
/// store, which used to evict every blob); an upload that stalls while
/// others write more than the whole ring still completes: it waits in the
/// staging area, not in the ring.
#[tokio::test]
async fn abandoned_uploads_evict_nothing_and_a_stalled_one_completes() {
    let kiln = Kiln::start_with(&["--cas-size", "67108864"]);
    let mut bs = kiln.bytestream().await;
    let kept: Vec<Vec<u8>> = (0..20).map(|i| pseudo(1 << 20, i)).collect();
    for data in &kept {
        bs.write(futures::stream::iter(chunks(&upload_name("", &sha(data), false), data, 1 << 20, true)))
            .await
            .unwrap();
    }
    let ring_bytes = || kiln.metric("kiln_store_written_bytes_total", &["store=\"cas\""]);
    let written = ring_bytes();
    for i in 0..40u32 {
        let declared = Digest::parse(None, &format!("{:064x}", i + 1), 15 << 20).unwrap();
        let first = WriteRequest {
            resource_name: upload_name("", &declared, false),
            write_offset: 0,
            finish_write: false,
            data: vec![7; 70_000],
        };
        // The stream ends there: the client hung up.
        assert_eq!(bs.write(futures::stream::iter([first])).await.unwrap_err().code(), Code::InvalidArgument);
    }
    assert_eq!(ring_bytes(), written, "abandoned uploads moved the ring");
    assert!(kiln.metric("kiln_store_staged_bytes", &[]) <= 40.0 * 70_000.0);
    let (status, page) = common::http::get(kiln.metrics_addr(), "/status.txt", None);
    assert_eq!(status, 200);
    assert!(page.contains("CAS uploads in progress (staging area)"), "{page}");
    for data in &kept {
        assert!(!is_missing(&kiln, &sha(data)).await, "an abandoned upload evicted a blob");
    }
    let first = &kept[0];
    assert!(
        read_all(&kiln, &format!("blobs/{}/{}", sha(first).hash_hex(), first.len()), 0, 0).await.unwrap()
            == *first
    );

    // A 3 MiB upload stalls after its first mebibyte with the stream open.
    let data = pseudo(3 << 20, 99);
    let d = sha(&data);
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
    let upload = tokio::spawn({
        let mut bs = bs.clone();
        async move { bs.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await }
    });
    let mut parts = chunks(&upload_name("", &d, false), &data, 1 << 20, true).into_iter();
    tx.send(parts.next().unwrap()).await.unwrap();
    common::eventually(std::time::Duration::from_secs(20), "the first part is staged", || {
        let staged = kiln.metric("kiln_store_staged_bytes", &[]) >= f64::from(1u32 << 20);
        async move { staged.then_some(()) }
    })
    .await;
    // Others write more than the whole ring.
    for i in 0..80 {
        let other = pseudo(1 << 20, 1000 + i);
        let reqs = chunks(&upload_name("", &sha(&other), false), &other, 1 << 20, true);
        bs.write(futures::stream::iter(reqs)).await.unwrap();
    }
    assert!(ring_bytes() > written + f64::from(64u32 << 20), "the ring did not go round");
    for part in parts {
        tx.send(part).await.unwrap();
    }
    drop(tx);
    assert_eq!(upload.await.unwrap().unwrap().into_inner().committed_size, 3 << 20);
    assert!(read_all(&kiln, &format!("blobs/{}/{}", d.hash_hex(), data.len()), 0, 0).await.unwrap() == data);
}
