//! Shared helpers for the integration tests: a real `kiln serve` process on
//! an ephemeral loopback port, and gRPC clients for it.

#![allow(dead_code)]

pub mod bazel;
pub mod pki;

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
    stderr: Option<std::thread::JoinHandle<String>>,
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
        let mut child = Command::new(KILN)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(args)
            .env("KILN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln serve");
        let stderr = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            line.clear();
            let n = stdout.read_line(&mut line).expect("read kiln stdout");
            assert!(n > 0, "kiln serve exited before listening: {}", stderr.join().unwrap_or_default());
            if let Some(addr) = line.trim().strip_prefix("kiln: serving on ") {
                break addr.parse().expect("address");
            }
            assert!(Instant::now() < deadline, "kiln serve did not start");
        };
        Kiln { child, addr, data_dir, stderr: Some(stderr) }
    }

    pub fn remote(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("connect")
    }

    pub async fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel().await).max_decoding_message_size(64 << 20)
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

    /// Sends SIGTERM and returns the exit status and everything logged.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        let status = wait_timeout(&mut self.child, Duration::from_secs(20));
        let log = self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        (status, log)
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
