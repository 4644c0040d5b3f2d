//! Walking a Directory tree held in a CAS: the one walk behind GetTree, an
//! action's input root, and anything else that reads a tree by its root.
//!
//! The walk is breadth-first and iterative (a queue, never recursion, so a
//! tree's depth costs no stack), reads each distinct directory once however
//! often the tree names it, and stops as soon as the tree names more than
//! `count_max` distinct directories, the root included, without reading the
//! rest. Directories are read through the caller's `fetch`, a batch at a
//! time within a [`Batch`], so that the caller decides how (a store, gRPC)
//! and how many at once; the order within a batch is kept, so the walk's
//! order is the same every time for the same CAS content.
//!
//! One rule for a directory the CAS lacks: the walk reports it
//! ([`Reached::Missing`], [`Tree::missing`]) and goes on with the rest of
//! the tree; it neither fails there nor drops it silently. Each caller then
//! answers as its own API says:
//!
//! - GetTree follows the REAPI ("If part of the tree is missing from the
//!   CAS, the server will return the portion present and omit the rest";
//!   "NOT_FOUND: The requested tree root is not present in the CAS"): a
//!   missing root is NOT_FOUND, a missing subdirectory is left out of the
//!   pages.
//! - An action's input root is materialized only whole: every missing
//!   directory (the root too) is a missing input, reported with the
//!   missing files as Execute's FAILED_PRECONDITION with one MISSING
//!   violation per digest, so that the client uploads them and retries.
//!
//! A blob that is not a Directory message, or a child without a valid
//! digest, ends the walk with an error naming the digest: INVALID_ARGUMENT
//! for the root (the caller's own argument), FAILED_PRECONDITION below it
//! (what the CAS holds does not form a tree).
//!
//! The empty Directory's digest is the empty blob's, which every CAS holds
//! (REAPI): it is never fetched.

use std::collections::{HashSet, VecDeque};
use std::future::Future;

use bytes::Bytes;
use prost::Message;

use crate::limits::{TREE_READ_BATCH_BYTES_MAX, TREE_READ_BATCH_DIRECTORIES_MAX};
use crate::reapi::Directory;
use crate::text::quoted;
use crate::{Code, Digest, Error, Result};

/// How much one `fetch` of a walk asks for: at most `directories` digests
/// whose sizes add up to at most `bytes` (a larger directory is read
/// alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub directories: usize,
    pub bytes: u64,
}

impl Batch {
    /// [`TREE_READ_BATCH_DIRECTORIES_MAX`] directories, at most
    /// [`TREE_READ_BATCH_BYTES_MAX`] bytes.
    pub const DEFAULT: Batch =
        Batch { directories: TREE_READ_BATCH_DIRECTORIES_MAX, bytes: TREE_READ_BATCH_BYTES_MAX };
}

/// A directory the walk reached, in breadth-first order.
#[derive(Debug, Clone, PartialEq)]
pub enum Reached {
    /// Read and decoded, with the digest it was read by.
    Directory(Digest, Directory),
    /// The CAS lacks it.
    Missing(Digest),
}

/// A walk in progress, for callers that hand on what it reaches as it goes
/// (GetTree's pages); [`walk`] collects a whole [`Tree`].
#[derive(Debug)]
pub struct TreeWalk {
    root: Digest,
    queue: VecDeque<Digest>,
    seen: HashSet<Digest>,
    count_max: u64,
    exceeded: bool,
}

impl TreeWalk {
    /// A walk from `root` that stops once more than `count_max` distinct
    /// directories are named.
    pub fn new(root: Digest, count_max: u64) -> TreeWalk {
        TreeWalk {
            root,
            queue: VecDeque::from([root]),
            seen: HashSet::from([root]),
            count_max,
            exceeded: false,
        }
    }

    /// Nothing is left to read (the tree is done, or exceeded).
    pub fn is_done(&self) -> bool {
        self.queue.is_empty()
    }

    /// The tree named more than `count_max` distinct directories; the walk
    /// stopped there, and the rest is neither read nor reported.
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    /// Reads the next directories in breadth-first order: `fetch` gets
    /// their digests and answers with each blob, in the same order, or
    /// `None` where the CAS lacks it. `None` once the walk is done.
    pub async fn next<F, Fut>(&mut self, batch: Batch, fetch: F) -> Result<Option<Vec<Reached>>>
    where
        F: FnOnce(Vec<Digest>) -> Fut,
        Fut: Future<Output = Result<Vec<Option<Bytes>>>>,
    {
        if self.queue.is_empty() {
            return Ok(None);
        }
        let digests = self.take(batch);
        let wanted: Vec<Digest> = digests.iter().filter(|d| !d.is_empty_blob()).copied().collect();
        let asked = wanted.len();
        let fetched = if wanted.is_empty() { Vec::new() } else { fetch(wanted).await? };
        if fetched.len() != asked {
            return Err(Error::internal(format!(
                "tree {}: asked for {asked} directories, got {} answers",
                self.root,
                fetched.len()
            )));
        }
        let mut fetched = fetched.into_iter();
        let mut reached = Vec::with_capacity(digests.len());
        for digest in digests {
            let data = if digest.is_empty_blob() { Some(Bytes::new()) } else { fetched.next().flatten() };
            let Some(data) = data else {
                reached.push(Reached::Missing(digest));
                continue;
            };
            let directory = Directory::decode(data).map_err(|e| {
                self.malformed(
                    &digest,
                    &format!("is named as a directory but is not a Directory message: {e}"),
                )
            })?;
            self.expand(&digest, &directory)?;
            reached.push(Reached::Directory(digest, directory));
        }
        Ok(Some(reached))
    }

    /// Takes the next batch off the queue: at least one digest.
    fn take(&mut self, batch: Batch) -> Vec<Digest> {
        let mut taken = Vec::new();
        let mut bytes = 0u64;
        while let Some(&next) = self.queue.front() {
            let after = bytes.saturating_add(next.size_bytes());
            if !taken.is_empty() && (taken.len() >= batch.directories || after > batch.bytes) {
                break;
            }
            taken.push(next);
            bytes = after;
            self.queue.pop_front();
        }
        taken
    }

    /// Queues the children of `directory` not seen before.
    fn expand(&mut self, digest: &Digest, directory: &Directory) -> Result<()> {
        if self.exceeded {
            return Ok(());
        }
        for child in &directory.directories {
            let named = Digest::from_required(Some(self.root.function()), child.digest.as_ref(), "digest")
                .map_err(|e| {
                    self.malformed(
                        digest,
                        &format!(
                            "names directory {} with a bad digest: {}",
                            quoted(&child.name),
                            e.message()
                        ),
                    )
                })?;
            if self.seen.insert(named) {
                if self.seen.len() as u64 > self.count_max {
                    self.exceeded = true;
                    self.queue.clear();
                    return Ok(());
                }
                self.queue.push_back(named);
            }
        }
        Ok(())
    }

    fn malformed(&self, digest: &Digest, what: &str) -> Error {
        if *digest == self.root {
            Error::invalid_argument(format!("the tree's root {digest} {what}"))
        } else {
            Error::new(
                Code::FailedPrecondition,
                format!("directory {digest} of the tree {} {what}", self.root),
            )
        }
    }
}

/// A whole walked tree.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tree {
    /// Every directory read, each once, in breadth-first order (the root
    /// first, when the CAS holds it), with the digest it was read by.
    pub directories: Vec<(Digest, Directory)>,
    /// Every directory the tree names that the CAS lacks, each once (the
    /// root alone, when it is absent).
    pub missing: Vec<Digest>,
    /// The tree named more than `count_max` distinct directories: the walk
    /// stopped there, and what it holds is only part of the tree.
    pub exceeded: bool,
}

/// Walks the tree under `root` (see the module documentation), reading
/// directories through `fetch` a `batch` at a time.
pub async fn walk<F, Fut>(root: Digest, count_max: u64, batch: Batch, mut fetch: F) -> Result<Tree>
where
    F: FnMut(Vec<Digest>) -> Fut,
    Fut: Future<Output = Result<Vec<Option<Bytes>>>>,
{
    let mut walk = TreeWalk::new(root, count_max);
    let mut tree = Tree::default();
    while let Some(reached) = walk.next(batch, &mut fetch).await? {
        for reached in reached {
            match reached {
                Reached::Directory(digest, directory) => tree.directories.push((digest, directory)),
                Reached::Missing(digest) => tree.missing.push(digest),
            }
        }
    }
    tree.exceeded = walk.exceeded();
    Ok(tree)
}
