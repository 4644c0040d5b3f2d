//! The block store through a real `kiln serve`: restarts, SIGKILL under
//! upload load, flipped bytes in a stopped node's files, both I/O paths,
//! and a raw block device (a loop device).

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use std::path::Path;
use std::time::Duration;

use common::mounts::{LoopDevice, Tmpfs};
use common::{Kiln, eventually};
use kiln_proto::google::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::{
    ActionResult, FindMissingBlobsRequest, GetActionResultRequest, UpdateActionResultRequest,
};
use kiln_proto::{Digest, DigestFunction};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;

fn blob(seed: u64, len: usize) -> (Digest, Vec<u8>) {
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill(&mut data[..]);
    (DigestFunction::Sha256.compute(&data), data)
}

async fn upload(kiln: &Kiln, d: &Digest, data: &[u8]) -> Result<(), tonic::Status> {
    let name = format!("uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), d.hash_hex(), d.size_bytes());
    let chunk = 1 << 20;
    let reqs: Vec<WriteRequest> = data
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * chunk) as i64,
            finish_write: (i + 1) * chunk >= data.len(),
            data: c.to_vec(),
        })
        .collect();
    kiln.bytestream().await.write(futures::stream::iter(reqs)).await.map(drop)
}

/// Reads a blob, checking its digest as a client would.
async fn download(kiln: &Kiln, d: &Digest) -> Result<Vec<u8>, tonic::Status> {
    let req = ReadRequest {
        resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size_bytes()),
        ..Default::default()
    };
    let mut stream = kiln.bytestream().await.read(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.extend(m.data);
    }
    assert_eq!(DigestFunction::Sha256.compute(&out), *d, "served bytes do not match their digest");
    Ok(out)
}

async fn missing(kiln: &Kiln, digests: &[Digest]) -> Vec<Digest> {
    let req = FindMissingBlobsRequest {
        blob_digests: digests.iter().map(Digest::to_proto).collect(),
        ..Default::default()
    };
    let resp = kiln.cas().await.find_missing_blobs(req).await.unwrap().into_inner();
    resp.missing_blob_digests.iter().map(|d| Digest::from_proto(None, d).unwrap()).collect()
}

fn config_file(dir: &Path, storage: &str) -> String {
    let path = dir.join("kiln.toml");
    std::fs::write(&path, format!("[storage]\n{storage}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn blobs_and_action_results_survive_a_restart() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config_file(cfg_dir.path(), "");
    let kiln = Kiln::start_with(&["--config", &cfg]);
    let blobs: Vec<_> = [10usize, 5_000, 70_000, 1 << 20, 20 << 20]
        .iter()
        .enumerate()
        .map(|(i, n)| blob(i as u64, *n))
        .collect();
    for (d, data) in &blobs {
        upload(&kiln, d, data).await.unwrap();
    }
    let action = DigestFunction::Sha256.compute(b"the action");
    let result = ActionResult { exit_code: 0, stdout_raw: b"built".to_vec(), ..Default::default() };
    let update = UpdateActionResultRequest {
        instance_name: "main".into(),
        action_digest: Some(action.to_proto()),
        action_result: Some(result),
        ..Default::default()
    };
    kiln.ac().await.update_action_result(update).await.unwrap();
    let (status, log, data_dir) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");

    let kiln = Kiln::start_in(data_dir, &["--config", &cfg]);
    assert!(kiln.log_contains("store open"), "{}", kiln.log());
    for (d, data) in &blobs {
        assert_eq!(&download(&kiln, d).await.unwrap(), data);
    }
    let get = GetActionResultRequest {
        instance_name: "main".into(),
        action_digest: Some(action.to_proto()),
        inline_stdout: true,
        ..Default::default()
    };
    let got = kiln.ac().await.get_action_result(get).await.unwrap().into_inner();
    assert_eq!(got.stdout_raw, b"built");
}

/// Uploads blobs, waits for a sync that covers them (the syncer logs
/// each), keeps uploading, and kills the node mid-upload; again and again
/// on the same data directory. Every blob a sync covered is there after
/// each restart, and every blob served is right.
#[tokio::test]
async fn sigkill_under_upload_load_loses_nothing_synced() {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config_file(cfg_dir.path(), "sync_interval_ms = 200");
    let log = "info,kiln_storage::store::block::syncer=debug";
    let mut data_dir = tempfile::tempdir().unwrap();
    let mut synced: Vec<(Digest, Vec<u8>)> = Vec::new();
    let mut attempted: Vec<(Digest, Vec<u8>)> = Vec::new();
    let mut rng = StdRng::seed_from_u64(42);
    for round in 0..4u64 {
        let kiln = Kiln::start_logging(data_dir, &["--config", &cfg], log);
        for (d, data) in &synced {
            assert_eq!(
                &download(&kiln, d).await.unwrap_or_else(|e| panic!("round {round}: synced blob lost: {e}")),
                data
            );
        }
        for (d, data) in &attempted {
            if let Ok(got) = download(&kiln, d).await {
                assert_eq!(&got, data);
            }
        }
        // A batch, then a sync that happens after it.
        let batch: Vec<_> = (0..20).map(|i| blob(round * 1000 + i, rng.random_range(100..300_000))).collect();
        for (d, data) in &batch {
            upload(&kiln, d, data).await.unwrap();
        }
        kiln.clear_log();
        eventually(Duration::from_secs(60), "a sync after the batch", || async {
            kiln.log_contains("store synced").then_some(())
        })
        .await;
        synced.extend(batch);
        // More uploads, in flight when the node dies.
        let more: Vec<_> =
            (100..160).map(|i| blob(round * 1000 + i, rng.random_range(100..600_000))).collect();
        attempted.extend(more.iter().cloned());
        let uploads = more.iter().map(|(d, data)| upload(&kiln, d, data));
        let mut load = Box::pin(futures::future::join_all(uploads));
        // Let part of the load through, then kill it with uploads in flight.
        let _ = tokio::time::timeout(Duration::from_millis(rng.random_range(50..400)), &mut load).await;
        let pid = kiln.child.id().to_string();
        std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        drop(load);
        data_dir = kiln.kill();
    }
}

#[tokio::test]
async fn flipped_bytes_in_a_stopped_node_are_never_served() {
    let kiln = Kiln::start();
    let blobs: Vec<_> =
        (0..120).map(|i| blob(i, if i % 10 == 0 { 400_000 } else { 3_000 + i as usize })).collect();
    for (d, data) in &blobs {
        upload(&kiln, d, data).await.unwrap();
    }
    let (status, log, data_dir) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");
    let mut rng = StdRng::seed_from_u64(9);
    for (file, flips) in [("cas.data", 400), ("cas.index", 400)] {
        let path = data_dir.path().join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip within what is used: the first 8 MiB of data, the whole index.
        let span = bytes.len().min(8 << 20);
        for _ in 0..flips {
            let at = rng.random_range(0..span);
            bytes[at] ^= 1 << rng.random_range(0..8);
        }
        std::fs::write(&path, bytes).unwrap();
    }
    let kiln = Kiln::start_in(data_dir, &[]);
    let mut served = 0;
    let mut lost = Vec::new();
    for (d, data) in &blobs {
        match download(&kiln, d).await {
            Ok(got) => {
                assert_eq!(&got, data);
                served += 1;
            }
            Err(e) => {
                assert!(matches!(e.code(), Code::DataLoss | Code::NotFound), "{e:?}");
                lost.push(*d);
            }
        }
    }
    assert!(served > 0, "nothing survived");
    // What failed is reported missing, so clients upload it again.
    let still = missing(&kiln, &lost).await;
    assert_eq!(still.len(), lost.len(), "a blob that failed a read is still reported present");
    let (d, data) = blob(5555, 123_456);
    upload(&kiln, &d, &data).await.unwrap();
    assert_eq!(download(&kiln, &d).await.unwrap(), data);
}

#[tokio::test]
async fn both_io_paths_serve_and_say_which_runs() {
    for (io, expected) in [("pread", &["pread/pwrite"][..]), ("auto", &["io_uring", "pread/pwrite"][..])] {
        let cfg_dir = tempfile::tempdir().unwrap();
        let cfg = config_file(cfg_dir.path(), &format!("io = \"{io}\""));
        let kiln = Kiln::start_with(&["--config", &cfg]);
        let open = kiln.log().lines().find(|l| l.contains("store open")).unwrap_or_default().to_owned();
        assert!(expected.iter().any(|path| open.contains(path)), "{io}: {open}");
        let blobs: Vec<_> = (0..10).map(|i| blob(i, 50_000 * i as usize + 1)).collect();
        for (d, data) in &blobs {
            upload(&kiln, d, data).await.unwrap();
            assert_eq!(&download(&kiln, d).await.unwrap(), data);
        }
    }
}

/// A raw block device: a loop device over a file, where the machine allows
/// one (root, /dev/loop-control).
#[tokio::test]
async fn a_raw_block_device_through_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(96 << 20).unwrap();
    let Some(attached) = LoopDevice::attach(&backing) else { return };
    let device = attached.device.clone();
    let cfg_dir = tempfile::tempdir().unwrap();
    let storage = format!("cas_path = \"{device}\"");
    let cfg = config_file(cfg_dir.path(), &storage);
    // An unformatted device is refused, not overwritten.
    let data = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = common::kiln(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        &cfg,
        "--data-dir",
        data.path().to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("format_device"), "{stderr}");
    let cfg = config_file(cfg_dir.path(), &format!("{storage}\nformat_device = true"));
    let kiln = Kiln::start_in(data, &["--config", &cfg]);
    let blobs: Vec<_> = (0..8).map(|i| blob(i, 1 << (12 + i))).collect();
    for (d, bytes) in &blobs {
        upload(&kiln, d, bytes).await.unwrap();
    }
    let (status, log, data) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");
    let kiln = Kiln::start_in(data, &["--config", &cfg]);
    for (d, bytes) in &blobs {
        assert_eq!(&download(&kiln, d).await.unwrap(), bytes);
    }
    assert!(kiln.log().contains(&device), "the store names its device");
    // The device grows: the store keeps its size and every blob.
    let (status, log, data) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");
    std::fs::OpenOptions::new().write(true).open(&backing).unwrap().set_len(128 << 20).unwrap();
    attached.refresh_capacity();
    let kiln = Kiln::start_in(data, &["--config", &cfg]);
    for (d, bytes) in &blobs {
        assert_eq!(&download(&kiln, d).await.unwrap(), bytes, "lost when the device grew");
    }
    assert!(kiln.log().contains("larger than its store"), "{}", kiln.log());
}

/// With no size configured, a new store is sized from the free space; a
/// restart after the free space changed keeps the store as it is. On a
/// 2 GiB tmpfs, where the automatic size is a quarter of what is free.
#[tokio::test]
async fn the_automatic_size_never_empties_the_store_on_restart() {
    let Some(mount) = Tmpfs::mount("2g") else { return };
    let data = tempfile::tempdir_in(mount.path()).unwrap();
    let kiln = Kiln::start_in(data, &["--cas-size", "0"]);
    let (d, bytes) = blob(42, 100_000);
    upload(&kiln, &d, &bytes).await.unwrap();
    let (status, log, data) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");
    // 300 MB written elsewhere on the same filesystem.
    std::fs::write(mount.path().join("other"), vec![1u8; 300 << 20]).unwrap();
    let kiln = Kiln::start_in(data, &["--cas-size", "0"]);
    assert!(missing(&kiln, &[d]).await.is_empty(), "the blob was lost: {}", kiln.log());
    assert_eq!(download(&kiln, &d).await.unwrap(), bytes);
}

/// Two nodes given the same store file: the second is refused, naming the
/// first, and the first keeps serving what it acknowledged.
#[tokio::test]
async fn two_nodes_never_share_a_store_file() {
    let shared = tempfile::tempdir().unwrap();
    let cas = shared.path().join("cas.data");
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config_file(cfg_dir.path(), &format!("cas_path = \"{}\"", cas.display()));
    let first = Kiln::start_with(&["--config", &cfg]);
    let (d, bytes) = blob(7, 50_000);
    upload(&first, &d, &bytes).await.unwrap();
    let other = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = common::serve_refused(other.path(), &["--cas-size", "268435456", "--config", &cfg]);
    assert!(!ok, "a second node opened the same store");
    assert!(stderr.contains("is locked by process") && stderr.contains("kiln"), "{stderr}");
    assert_eq!(download(&first, &d).await.unwrap(), bytes);
}

/// A disk that fails its syncs: a loop device whose backing file lives on a
/// tmpfs that fills up, so writeback fails and `fdatasync` reports EIO.
/// Health turns NOT_SERVING, the status page says why, and uploads end with
/// a precise status instead of hanging.
#[tokio::test]
async fn a_store_that_cannot_sync_reports_not_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Some(mount) = Tmpfs::mount("40m") else { return };
    // Sparse: larger than the tmpfs can hold.
    let backing = mount.path().join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(96 << 20).unwrap();
    let Some(attached) = LoopDevice::attach(&backing) else { return };
    let device = attached.device.clone();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        cfg_dir.path(),
        &format!("cas_path = \"{device}\"\nformat_device = true\nsync_interval_ms = 200\nio = \"pread\""),
    );
    let kiln = Kiln::start_with(&["--config", &cfg]);
    let mut health = HealthClient::new(kiln.channel().await);
    let serving = |status: i32| status == ServingStatus::Serving as i32;
    let check = HealthCheckRequest { service: String::new() };
    assert!(serving(health.check(check.clone()).await.unwrap().into_inner().status));
    // Fill past what the tmpfs holds; uploads may fail once syncs do.
    for i in 0..60 {
        let (d, data) = blob(10_000 + i, 1 << 20);
        if let Err(e) = upload(&kiln, &d, &data).await {
            assert!(matches!(e.code(), Code::Unavailable), "{e:?}");
        }
    }
    eventually(Duration::from_secs(60), "health turns NOT_SERVING", || {
        let mut health = health.clone();
        let check = check.clone();
        async move {
            let status = health.check(check).await.ok()?.into_inner().status;
            (status == ServingStatus::NotServing as i32).then_some(())
        }
    })
    .await;
    let (status, page) = common::http::get(kiln.metrics_addr(), "/status.txt", None);
    assert_eq!(status, 200);
    assert!(page.contains("writes durable") && page.contains("NO:"), "{page}");
    assert!(kiln.log().contains("reporting NOT_SERVING"), "{}", kiln.log());
}

/// An operator changes the configured size: the node refuses to start and
/// says what to do, the store untouched; `--reformat-stores` (once) is the
/// only way to discard it, and the next start keeps the new store.
#[tokio::test]
async fn a_changed_size_is_refused_until_the_operator_reformats() {
    let kiln = Kiln::start_with(&["--cas-size", "33554432"]);
    let (d, bytes) = blob(77, 100_000);
    upload(&kiln, &d, &bytes).await.unwrap();
    let (status, log, data) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");
    let (ok, _, stderr) = common::serve_refused(data.path(), &["--cas-size", "67108864"]);
    assert!(!ok, "started with a contradicting size");
    assert!(
        stderr.contains("keeps the size it was formatted with") && stderr.contains("--reformat-stores"),
        "{stderr}"
    );
    // Untouched: the old size still serves the blob.
    let kiln = Kiln::start_in(data, &["--cas-size", "33554432"]);
    assert_eq!(download(&kiln, &d).await.unwrap(), bytes);
    let (status, log, data) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");
    let kiln = Kiln::start_in(data, &["--cas-size", "67108864", "--reformat-stores"]);
    assert_eq!(missing(&kiln, &[d]).await, vec![d], "the reformatted store still has the blob");
    assert!(kiln.log().contains("reformatting the store as asked"), "{}", kiln.log());
    upload(&kiln, &d, &bytes).await.unwrap();
    let (status, log, data) = kiln.stop_keeping_data();
    assert!(status.success(), "{log}");
    // The flag is not a setting: the next start keeps the new store.
    let kiln = Kiln::start_in(data, &["--cas-size", "67108864"]);
    assert_eq!(download(&kiln, &d).await.unwrap(), bytes);
}
