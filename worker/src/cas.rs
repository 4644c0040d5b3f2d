//! What the worker needs of a CAS. The gRPC implementation talks to any
//! REAPI CAS; tests may bring a directory-backed one.

use std::future::Future;
use std::path::Path;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use kiln_proto::limits::TREE_READ_BATCH_DIRECTORIES_MAX;
use kiln_proto::tree::{Batch, Tree};
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

    /// The tree under `root`, walked by the one rule of
    /// [`kiln_proto::tree`]: every directory once, with the digest it was
    /// read by; those the CAS lacks (the root too) listed in
    /// [`Tree::missing`], never skipped and never an error; the walk
    /// stopped once more than `count_max` distinct directories are named
    /// ([`Tree::exceeded`]: a larger tree is the caller's to refuse, and is
    /// not held first). [`read_tree`] over [`CasClient::read_bytes`].
    fn get_tree(&self, root: &Digest, count_max: u64) -> impl Future<Output = Result<Tree>> + Send {
        read_tree(self, *root, count_max)
    }
}

/// [`kiln_proto::tree::walk`] over `cas`'s verified reads, each batch of
/// directories read at once.
pub async fn read_tree<C: CasClient + ?Sized>(cas: &C, root: Digest, count_max: u64) -> Result<Tree> {
    kiln_proto::tree::walk(root, count_max, Batch::DEFAULT, |digests| read_directories(cas, digests)).await
}

/// The blobs `digests` names, in order; `None` for each the CAS lacks.
async fn read_directories<C: CasClient + ?Sized>(
    cas: &C,
    digests: Vec<Digest>,
) -> Result<Vec<Option<Bytes>>> {
    futures::stream::iter(digests)
        .map(|digest| async move {
            match cas.read_bytes(&digest).await {
                Ok(data) => Ok(Some(data)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e.context(format!("directory {digest}"))),
            }
        })
        .buffered(TREE_READ_BATCH_DIRECTORIES_MAX)
        .try_collect()
        .await
}
