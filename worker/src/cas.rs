//! What the worker needs of a CAS. The gRPC implementation talks to any
//! REAPI CAS; tests may bring a directory-backed one.

use std::future::Future;
use std::path::Path;

use bytes::Bytes;
use kiln_proto::reapi::Directory;
use kiln_proto::{Digest, Result};

/// A CAS for one instance name and digest function.
pub trait CasClient: Send + Sync + 'static {
    /// Writes blob `digest` to a new file at `path`, verified against the
    /// digest; NOT_FOUND when the CAS lacks it.
    fn read_to_file(&self, digest: &Digest, path: &Path) -> impl Future<Output = Result<()>> + Send;

    /// The whole blob (Directory, Command and other small messages),
    /// verified; NOT_FOUND when absent.
    fn read_bytes(&self, digest: &Digest) -> impl Future<Output = Result<Bytes>> + Send;

    /// The digests the CAS lacks, in the order given.
    fn find_missing(&self, digests: &[Digest]) -> impl Future<Output = Result<Vec<Digest>>> + Send;

    /// Uploads the file at `path`, whose digest is `digest`.
    fn upload_file(&self, digest: &Digest, path: &Path) -> impl Future<Output = Result<()>> + Send;

    /// Uploads `data`, whose digest is `digest`.
    fn upload_bytes(&self, digest: &Digest, data: Bytes) -> impl Future<Output = Result<()>> + Send;

    /// Every directory of the tree under `root` (the root first), each
    /// once; NOT_FOUND naming the first directory that is absent. Stops
    /// after `count_max` directories (returning them): a larger tree is the
    /// caller's to refuse, and must not be held first.
    fn get_tree(&self, root: &Digest, count_max: u64) -> impl Future<Output = Result<Vec<Directory>>> + Send;
}
