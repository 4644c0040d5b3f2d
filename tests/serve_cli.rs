//! `kiln serve` start-up and shutdown, health, and the `kiln cas` CLI.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Test data arithmetic.

mod common;

use std::time::{Duration, Instant};

use common::{Kiln, kiln};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test]
async fn health_reports_serving_and_sigterm_stops_cleanly() {
    // A long grace period, so that exiting before it ends is the test.
    let server = Kiln::start_with_config("shutdown_grace_ms = 60000\n");
    let mut health = HealthClient::new(server.channel().await);
    let resp = health.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(
        resp.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // An upload in flight when SIGTERM arrives, and an idle connection.
    let data = vec![9u8; 3 << 20];
    let d = kiln_proto::DigestFunction::Sha256.compute(&data);
    let name = format!("uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), d.hash_hex(), data.len());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let first = kiln_proto::google::bytestream::WriteRequest {
        resource_name: name.clone(),
        write_offset: 0,
        finish_write: false,
        data: data[..1 << 20].to_vec(),
    };
    tx.send(first).await.unwrap();
    let mut bs = server.bytestream().await;
    let upload = tokio::spawn(async move { bs.write(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let idle = server.channel().await;
    let pid = server.child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    common::eventually(Duration::from_secs(30), "SIGTERM to be handled", || async {
        server.log_contains("SIGTERM received").then_some(())
    })
    .await;
    // The upload in flight finishes within the grace period...
    let rest = kiln_proto::google::bytestream::WriteRequest {
        resource_name: String::new(),
        write_offset: 1 << 20,
        finish_write: true,
        data: data[1 << 20..].to_vec(),
    };
    tx.send(rest).await.unwrap();
    let committed =
        upload.await.unwrap().expect("the in-flight upload completes").into_inner().committed_size;
    assert_eq!(committed, data.len() as i64);
    // ...and the process exits without waiting out the grace for the idle
    // connection.
    let started = Instant::now();
    let (status, log) = server.stop();
    assert!(status.success(), "exit status {status:?}\n{log}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?} for an idle connection",
        started.elapsed()
    );
    assert!(!log.contains("connections still open after the grace period"), "{log}");
    drop(idle);
}

#[test]
fn a_data_dir_serves_one_process_only() {
    let first = Kiln::start();
    let (ok, _, stderr) =
        kiln(&["serve", "--listen", "127.0.0.1:0", "--data-dir", first.data_dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("in use by another kiln process"), "{stderr}");
}

#[test]
fn public_address_without_auth_needs_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) =
        kiln(&["serve", "--listen", "0.0.0.0:0", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
}

#[test]
fn bad_config_files_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kiln.toml");
    std::fs::write(&cfg, "[limits]\nbatch_total_size_bytes_max = 999999999\n").unwrap();
    let (ok, _, stderr) =
        kiln(&["serve", "--config", cfg.to_str().unwrap(), "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("batch_total_size_bytes_max"), "{stderr}");
    std::fs::write(&cfg, "[storage]\ncas_memory = 1\n").unwrap();
    let (ok, _, stderr) = kiln(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("cas_memory"), "{stderr}");
}

#[test]
fn config_command_prints_a_loadable_file() {
    let (ok, stdout, _) = kiln(&["config"]);
    assert!(ok);
    assert!(stdout.contains("cas_memory_bytes"));
    assert!(!stdout.contains("no authentication"), "the configuration says Kiln has no authentication");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kiln.toml");
    std::fs::write(&cfg, stdout.replace("127.0.0.1:8980", "127.0.0.1:0")).unwrap();
    let mut child = std::process::Command::new(common::KILN)
        .args([
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first line, as README promises.
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(line.starts_with("kiln: serving on 127.0.0.1:"), "{line}");
}

#[test]
fn cas_cli_put_get_missing() {
    let server = Kiln::start();
    let remote = server.remote();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.bin");
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    let small = dir.path().join("small.txt");
    std::fs::write(&small, b"hello kiln\n").unwrap();

    let (ok, out, err) =
        kiln(&["cas", "--remote", &remote, "put", big.to_str().unwrap(), small.to_str().unwrap()]);
    assert!(ok, "{err}");
    let digests: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(digests.len(), 2);
    assert!(out.lines().all(|l| l.ends_with("uploaded")), "{out}");

    let (ok, out, _) = kiln(&["cas", "--remote", &remote, "put", small.to_str().unwrap()]);
    assert!(ok && out.trim_end().ends_with("already present"), "{out}");

    let back = dir.path().join("back.bin");
    let (ok, _, err) = kiln(&["cas", "--remote", &remote, "get", digests[0], back.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&back).unwrap(), data);

    let absent = format!("{}/3", "ab".repeat(32));
    let (ok, out, _) = kiln(&["cas", "--remote", &remote, "missing", digests[0], digests[1], &absent]);
    assert!(ok);
    assert_eq!(out.trim(), absent);

    let (ok, _, err) = kiln(&["cas", "--remote", &remote, "get", &absent, back.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("NotFound") || err.contains("not found"), "{err}");
    assert_eq!(std::fs::read(&back).unwrap(), data, "a failed download leaves the old file alone");

    let (ok, out, err) =
        kiln(&["cas", "--remote", &remote, "--digest-function", "blake3", "put", small.to_str().unwrap()]);
    assert!(ok, "{err}");
    let b3 = out.split('\t').next().unwrap();
    assert!(b3.starts_with("blake3:"), "{out}");
    let (ok, _, err) = kiln(&["cas", "--remote", &remote, "get", b3, back.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&back).unwrap(), b"hello kiln\n");

    let (ok, _, err) = kiln(&["cas", "--remote", &remote, "missing", "not-a-digest"]);
    assert!(!ok);
    assert!(err.contains("HASH/SIZE"), "{err}");
}

/// A file the server refuses mid-upload (larger than it takes) is
/// reported with the server's reason, not as a file that changed.
#[test]
fn a_refused_upload_is_reported_by_the_servers_reason() {
    // A 16 MiB store takes blobs of at most a quarter of its ring.
    let server = Kiln::start_with(&["--cas-size", "16777216"]);
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.bin");
    // Larger than the flow-control windows: the server answers before all of it is sent.
    std::fs::write(&big, vec![7u8; 96 << 20]).unwrap();
    let (ok, _, err) = kiln(&["cas", "--remote", &server.remote(), "put", big.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("max_cas_blob_size_bytes") && !err.contains("changed"), "{err}");
}

#[test]
fn bench_reports_rates_and_latencies() {
    let server = Kiln::start();
    let remote = server.remote();
    for workload in [
        "ac-get",
        "ac-update",
        "find-missing",
        "bytestream-write",
        "bytestream-read",
        "batch-update",
        "batch-read",
    ] {
        let (ok, out, err) = kiln(&[
            "bench",
            "run",
            "--remote",
            &remote,
            workload,
            "--requests",
            "40",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--digests",
            "10",
            "--blob-size",
            "100000",
            "--total-bytes",
            "4000000",
            "--json",
        ]);
        assert!(ok, "{workload}: {err}");
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["errors"], 0, "{workload}: {out}");
        assert!(report["operations"].as_u64().unwrap() >= 4, "{workload}: {out}");
        assert!(report["p99_us"].as_u64().unwrap() > 0, "{workload}: {out}");
        if workload.starts_with("bytestream") || workload.starts_with("batch") {
            assert!(report["bytes_per_second"].as_f64().unwrap() > 0.0, "{workload}: {out}");
        }
    }
    let (ok, _, err) = kiln(&["bench", "run", "--remote", &remote, "ac-get", "--requests", "0"]);
    assert!(!ok && err.contains("between 1 and"), "{err}");
    let (ok, _, err) = kiln(&["bench", "run", "--remote", &remote, "teleport"]);
    assert!(!ok && err.contains("unknown workload"), "{err}");
}
