//! Shared helpers for the integration tests: a real `kiln serve` process on
//! an ephemeral loopback port, and gRPC clients for it.

#![allow(dead_code)]

pub mod bazel;
pub mod h2raw;
pub mod http;
pub mod mounts;
pub mod origin;
pub mod pki;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::google::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::transport::Channel;

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// A running `kiln serve`, killed when dropped.
pub struct Kiln {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: tempfile::TempDir,
    /// Everything it logged so far.
    log: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: Option<std::thread::JoinHandle<()>>,
    /// Lines printed on standard output.
    printed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Kiln {
    pub fn start() -> Kiln {
        Self::start_with(&[])
    }

    /// Starts `kiln serve` with a configuration file holding `toml`.
    pub fn start_with_config(toml: &str) -> Kiln {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, toml).expect("write config");
        let kiln = Self::start_with(&["--config", path.to_str().expect("utf-8 path")]);
        drop(dir); // kiln has read the file by the time it listens
        kiln
    }

    /// Starts `kiln serve` with extra arguments and waits until it listens.
    pub fn start_with(args: &[&str]) -> Kiln {
        let data_dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(data_dir, args)
    }

    /// Starts `kiln serve` on `data_dir` (say, to restart on the same state).
    /// Stores are 256 MiB unless `args` say otherwise: tests run several
    /// servers at once on machines of unknown disk size.
    pub fn start_in(data_dir: tempfile::TempDir, args: &[&str]) -> Kiln {
        Self::start_logging(data_dir, args, "info")
    }

    /// Like [`Kiln::start_in`], logging at `filter` (a `KILN_LOG` value).
    pub fn start_logging(data_dir: tempfile::TempDir, args: &[&str], filter: &str) -> Kiln {
        let size: &[&str] = if args.contains(&"--cas-size") { &[] } else { &["--cas-size", "268435456"] };
        let workers: &[&str] =
            if args.contains(&"--worker-listen") { &[] } else { &["--worker-listen", "127.0.0.1:0"] };
        let metrics: &[&str] =
            if args.contains(&"--metrics-listen") { &[] } else { &["--metrics-listen", "127.0.0.1:0"] };
        let mut child = Command::new(KILN)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(size)
            .args(workers)
            .args(metrics)
            .args(args)
            .env("KILN_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut all = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                all.push_str(&line);
                all.push('\n');
            }
        });
        // Standard output is read to its end, so that later lines never
        // meet a closed pipe.
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
        let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let keep = printed.clone();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                keep.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line.clone());
                let _ = lines_tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.trim().strip_prefix("kiln: serving on ") {
                        break addr.parse().expect("address");
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = stderr.join();
                    panic!("kiln serve exited before listening: {}", log.lock().unwrap());
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("kiln serve did not start"),
            }
        };
        Kiln { child, addr, data_dir, log, stderr: Some(stderr), printed }
    }

    /// The worker port, from the line `kiln serve` prints after its address.
    pub fn worker_port(&self) -> SocketAddr {
        self.printed_addr("kiln: workers connect on ")
    }

    /// The metrics listener's address, from the line `kiln serve` prints.
    /// The sum of the samples of metric `name` whose labels contain each of
    /// `labels`, scraped now.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (status, body) = http::get(self.metrics_addr(), "/metrics", None);
        assert_eq!(status, 200, "{body}");
        http::metric(&body, name, labels)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.printed_addr("kiln: metrics on ")
    }

    /// The address on the printed line that starts with `prefix`.
    fn printed_addr(&self, prefix: &str) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self
                .printed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned));
            if let Some(addr) = found {
                return addr.parse().expect("printed address");
            }
            assert!(Instant::now() < deadline, "kiln serve printed no line starting {prefix:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server has logged `needle` (since the last `clear_log`).
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(needle)
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Forgets what was logged so far.
    pub fn clear_log(&self) {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    pub fn remote(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("connect")
    }

    /// A channel to a client that reads slowly: the smallest HTTP/2 windows,
    /// so the server sees a stalled reader after 64 KiB.
    pub async fn slow_reader_channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .initial_stream_window_size(Some(65_535))
            .initial_connection_window_size(Some(65_535))
            .connect()
            .await
            .expect("connect")
    }

    pub async fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// Uploads `blobs` (SHA-256) to `instance` with BatchUpdateBlobs;
    /// asserts every one was stored.
    pub async fn upload(&self, instance: &str, blobs: &[&[u8]]) {
        let request = upload_request(instance, blobs);
        let response = self.cas().await.batch_update_blobs(request).await.unwrap().into_inner();
        assert!(
            response.responses.iter().all(|r| r.status.as_ref().is_some_and(|s| s.code == 0)),
            "{response:?}"
        );
    }

    /// Which of `digests` the CAS of the empty instance lacks.
    pub async fn missing(&self, digests: &[kiln_proto::Digest]) -> Vec<kiln_proto::reapi::Digest> {
        let request = kiln_proto::reapi::FindMissingBlobsRequest {
            blob_digests: digests.iter().map(kiln_proto::Digest::to_proto).collect(),
            ..Default::default()
        };
        self.cas().await.find_missing_blobs(request).await.unwrap().into_inner().missing_blob_digests
    }

    pub async fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel().await)
    }

    pub async fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    pub async fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel().await)
    }

    /// Kills the process (SIGKILL: no shutdown, no final sync) and hands
    /// back the data directory.
    pub fn kill(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("tempdir"))
    }

    /// Sends SIGTERM and returns the exit status and everything logged.
    pub fn stop(self) -> (std::process::ExitStatus, String) {
        let (status, log, _) = self.stop_keeping_data();
        (status, log)
    }

    /// Sends SIGTERM, waits for the exit, and hands back the data directory.
    pub fn stop_keeping_data(mut self) -> (std::process::ExitStatus, String, tempfile::TempDir) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let status = wait_timeout(&mut self.child, Duration::from_secs(20));
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
        let log = self.log();
        let data_dir = std::mem::replace(&mut self.data_dir, tempfile::tempdir().expect("tempdir"));
        (status, log, data_dir)
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "kiln did not exit in {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `kiln` binary with `args` and returns (success, stdout, stderr).
pub fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(KILN).args(args).output().expect("run kiln");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs `kiln serve` on `data_dir` with ephemeral listeners and `extra`
/// arguments, for a start that must fail: (success, stdout, stderr).
pub fn serve_refused(data_dir: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let dir = data_dir.to_str().expect("utf-8 path");
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--worker-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        dir,
    ];
    args.extend_from_slice(extra);
    kiln(&args)
}

/// Runs `kiln serve` with a configuration file holding `toml`, expecting
/// it to refuse to start; whether it started, and what it printed on
/// stderr.
pub fn serve_refused_config(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, toml).expect("write config");
    let (ok, _, err) = serve_refused(dir.path(), &["--config", path.to_str().expect("utf-8 path")]);
    (ok, err)
}

/// Polls `check` every 50 ms until it returns `Some`, failing with `what`
/// after `timeout`. Tests wait for asynchronous effects (a file reload, a
/// revocation reaching another node) this way, never with a fixed sleep.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "gave up after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long tests wait for reloads: generous, as CI machines are loaded;
/// a reload normally lands within two `reload_interval_ms`.
pub const RELOAD_WAIT: Duration = Duration::from_secs(30);

/// gRPC calls against a connection, for authorization tests.
pub mod calls {
    use kiln_proto::reapi::action_cache_client::ActionCacheClient;
    use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
    use kiln_proto::reapi::{
        ActionResult, FindMissingBlobsRequest, GetActionResultRequest, UpdateActionResultRequest,
    };
    use kiln_proto::{Digest, DigestFunction};
    use kiln_tools::client::{ClientOptions, Connection};

    pub fn sha(data: &[u8]) -> Digest {
        DigestFunction::Sha256.compute(data)
    }

    pub fn opts(remote: String) -> ClientOptions {
        ClientOptions { remote, ..ClientOptions::default() }
    }

    /// A connection to `remote` presenting the bearer token `token`.
    pub async fn with_token(remote: String, token: &str) -> Connection {
        let options = ClientOptions { token: Some(token.to_owned()), ..opts(remote) };
        kiln_tools::client::connect(&options).await.expect("connect with a token")
    }

    pub async fn find_missing(conn: &Connection, instance: &str) -> Result<(), tonic::Status> {
        let req = FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: vec![sha(b"x").to_proto()],
            ..Default::default()
        };
        ContentAddressableStorageClient::new(conn.channel()).find_missing_blobs(req).await.map(drop)
    }

    pub async fn update_ac_with(
        conn: &Connection,
        instance: &str,
        result: ActionResult,
    ) -> Result<(), tonic::Status> {
        let req = UpdateActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(sha(b"action").to_proto()),
            action_result: Some(result),
            ..Default::default()
        };
        ActionCacheClient::new(conn.channel()).update_action_result(req).await.map(drop)
    }

    pub async fn update_ac(conn: &Connection, instance: &str) -> Result<(), tonic::Status> {
        update_ac_with(conn, instance, ActionResult::default()).await
    }

    pub async fn get_ac_result(
        conn: &Connection,
        instance: &str,
        inline: bool,
    ) -> Result<ActionResult, tonic::Status> {
        let req = GetActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(sha(b"action").to_proto()),
            inline_stdout: inline,
            ..Default::default()
        };
        ActionCacheClient::new(conn.channel()).get_action_result(req).await.map(tonic::Response::into_inner)
    }

    pub async fn get_ac(conn: &Connection, instance: &str) -> Result<(), tonic::Status> {
        get_ac_result(conn, instance, false).await.map(drop)
    }
}

/// Creates a token directly in a token file, as an operator bootstraps.
pub fn bootstrap_token(
    file: &std::path::Path,
    principal: &str,
    tenant: &str,
    perms: &str,
    expires: &str,
) -> String {
    let (ok, out, err) = kiln(&[
        "token",
        "create",
        "--token-file",
        file.to_str().expect("utf-8 path"),
        "--principal",
        principal,
        "--tenant",
        tenant,
        "--perm",
        perms,
        "--expires",
        expires,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("created"), "{err}");
    out.trim().to_owned()
}

/// A BatchUpdateBlobs request storing `blobs` (SHA-256) in `instance`.
pub fn upload_request(instance: &str, blobs: &[&[u8]]) -> kiln_proto::reapi::BatchUpdateBlobsRequest {
    use kiln_proto::reapi::batch_update_blobs_request;
    let requests = blobs
        .iter()
        .map(|b| batch_update_blobs_request::Request {
            digest: Some(kiln_proto::DigestFunction::Sha256.compute(b).to_proto()),
            data: b.to_vec(),
            compressor: 0,
        })
        .collect();
    kiln_proto::reapi::BatchUpdateBlobsRequest {
        instance_name: instance.into(),
        requests,
        ..Default::default()
    }
}

/// `[auth]` for bearer tokens from `file`, reloaded every 200 ms, plus `extra`.
pub fn token_config(file: &std::path::Path, extra: &str) -> String {
    format!("[auth]\ntokens = true\ntoken_file = \"{}\"\nreload_interval_ms = 200\n{extra}", file.display())
}
