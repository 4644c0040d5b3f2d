//! A directory-backed CAS for the worker's tests, and tree builders.
//!
//! Blobs are real files, one per digest; every read and upload is checked
//! against its digest. Counters let tests assert how often the worker
//! fetched or uploaded, and a gate holds reads back so that tests can line
//! up concurrent requests deterministically.

#![allow(dead_code)] // each test file uses a different part

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, SymlinkNode};
use kiln_proto::tree::Tree;
use kiln_proto::{Digest, DigestFunction, Error, Result};
use kiln_worker::cas::CasClient;
use prost::Message;
use tokio::sync::watch;

#[derive(Debug)]
pub struct TestCas {
    dir: tempfile::TempDir,
    /// Calls to `read_to_file`, per digest, counted as they start.
    reads: Mutex<HashMap<Digest, u64>>,
    /// Digests uploaded, in order.
    uploads: Mutex<Vec<Digest>>,
    find_missing_calls: Mutex<u64>,
    /// Directories the last `get_tree` returned.
    tree_returned: Mutex<u64>,
    /// `read_to_file` waits while this is false.
    gate: watch::Sender<bool>,
}

impl TestCas {
    pub fn new() -> TestCas {
        TestCas {
            dir: tempfile::tempdir().unwrap(),
            reads: Mutex::new(HashMap::new()),
            uploads: Mutex::new(Vec::new()),
            find_missing_calls: Mutex::new(0),
            tree_returned: Mutex::new(0),
            gate: watch::channel(true).0,
        }
    }

    /// A CAS whose reads wait until [`TestCas::open_gate`].
    pub fn gated() -> TestCas {
        let cas = TestCas::new();
        cas.gate.send_replace(false);
        cas
    }

    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.path().join(format!("{}-{}-{}", digest.function(), digest.hash_hex(), digest.size_bytes()))
    }

    pub fn put(&self, data: &[u8]) -> Digest {
        self.put_with(DigestFunction::Sha256, data)
    }

    pub fn put_with(&self, function: DigestFunction, data: &[u8]) -> Digest {
        let digest = function.compute(data);
        std::fs::write(self.blob_path(&digest), data).unwrap();
        digest
    }

    pub fn put_directory(&self, function: DigestFunction, directory: &Directory) -> Digest {
        self.put_with(function, &directory.encode_to_vec())
    }

    pub fn remove(&self, digest: &Digest) {
        std::fs::remove_file(self.blob_path(digest)).unwrap();
    }

    pub fn get(&self, digest: &Digest) -> Option<Vec<u8>> {
        if digest.is_empty_blob() {
            return Some(Vec::new());
        }
        std::fs::read(self.blob_path(digest)).ok()
    }

    /// Whether any stored blob holds exactly `data`.
    pub fn holds_bytes(&self, data: &[u8]) -> bool {
        std::fs::read_dir(self.dir.path()).unwrap().any(|e| std::fs::read(e.unwrap().path()).unwrap() == data)
    }

    pub fn reads_of(&self, digest: &Digest) -> u64 {
        self.reads.lock().unwrap().get(digest).copied().unwrap_or(0)
    }

    pub fn total_reads(&self) -> u64 {
        self.reads.lock().unwrap().values().sum()
    }

    pub fn uploads(&self) -> Vec<Digest> {
        self.uploads.lock().unwrap().clone()
    }

    pub fn tree_returned(&self) -> u64 {
        *self.tree_returned.lock().unwrap()
    }

    pub fn find_missing_calls(&self) -> u64 {
        *self.find_missing_calls.lock().unwrap()
    }

    fn store_verified(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        digest.verify(data)?;
        std::fs::write(self.blob_path(digest), data).unwrap();
        self.uploads.lock().unwrap().push(*digest);
        Ok(())
    }

    fn present(&self, digest: &Digest) -> bool {
        digest.is_empty_blob() || self.blob_path(digest).exists()
    }
}

impl CasClient for TestCas {
    async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        *self.reads.lock().unwrap().entry(*digest).or_default() += 1;
        let mut gate = self.gate.subscribe();
        gate.wait_for(|open| *open).await.unwrap();
        let data = self.get(digest).ok_or_else(|| Error::not_found(format!("blob {digest}")))?;
        digest.verify(&data).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &data))
            .map_err(|e| Error::internal(format!("{}: {e}", path.display())))
    }

    async fn read_bytes(&self, digest: &Digest) -> Result<Bytes> {
        let data = self.get(digest).ok_or_else(|| Error::not_found(format!("blob {digest}")))?;
        digest.verify(&data).unwrap();
        Ok(Bytes::from(data))
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        *self.find_missing_calls.lock().unwrap() += 1;
        Ok(digests.iter().filter(|d| !self.present(d)).copied().collect())
    }

    async fn upload_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        let data = std::fs::read(path).map_err(|e| Error::internal(format!("{}: {e}", path.display())))?;
        self.store_verified(digest, &data)
    }

    async fn upload_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.store_verified(digest, &data)
    }

    async fn get_tree(&self, root: &Digest, count_max: u64) -> Result<Tree> {
        let tree = kiln_worker::cas::read_tree(self, *root, count_max).await?;
        *self.tree_returned.lock().unwrap() = tree.directories.len() as u64;
        Ok(tree)
    }
}

pub fn file(name: &str, digest: &Digest, executable: bool) -> FileNode {
    FileNode {
        name: name.to_owned(),
        digest: Some(digest.to_proto()),
        is_executable: executable,
        node_properties: None,
    }
}

pub fn dir(name: &str, digest: &Digest) -> DirectoryNode {
    DirectoryNode { name: name.to_owned(), digest: Some(digest.to_proto()) }
}

pub fn symlink(name: &str, target: &str) -> SymlinkNode {
    SymlinkNode { name: name.to_owned(), target: target.to_owned(), node_properties: None }
}

pub fn directory(
    files: Vec<FileNode>,
    directories: Vec<DirectoryNode>,
    symlinks: Vec<SymlinkNode>,
) -> Directory {
    Directory { files, directories, symlinks, node_properties: None }
}

/// Polls `check` until it holds, failing after `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "gave up after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How long tests wait for concurrent work to line up.
pub const WAIT: Duration = Duration::from_secs(20);
