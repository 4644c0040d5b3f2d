//! The one tree walk: breadth-first, each directory read once, missing
//! directories reported (never skipped, never an error), bounded by
//! `count_max`, malformed directories named, no recursion.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use kiln_proto::reapi::{Directory, DirectoryNode};
use kiln_proto::tree::{Batch, Reached, Tree, TreeWalk, walk};
use kiln_proto::{Code, Digest, DigestFunction, Result};
use prost::Message;

/// Runs a future whose every await is ready at once (the CAS below is a map).
fn ready<T>(future: impl Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("the walk waited on nothing"),
    }
}

/// A CAS of blobs by digest that counts what it was asked for.
#[derive(Default)]
struct Cas {
    blobs: HashMap<Digest, Bytes>,
    asked: RefCell<Vec<Vec<Digest>>>,
}

impl Cas {
    fn put(&mut self, data: Vec<u8>) -> Digest {
        let digest = DigestFunction::Sha256.compute(&data);
        self.blobs.insert(digest, Bytes::from(data));
        digest
    }

    fn put_directory(&mut self, children: &[(&str, Digest)]) -> Digest {
        self.put(directory(children).encode_to_vec())
    }

    /// A root naming `n` directories, each of which names one directory
    /// the CAS lacks; the root and its children.
    fn put_wide_root(&mut self, n: usize) -> (Digest, Vec<(String, Digest)>) {
        let children: Vec<(String, Digest)> = (0..n)
            .map(|i| {
                let gone = DigestFunction::Sha256.compute(format!("gone {i}").as_bytes());
                (format!("d{i:03}"), self.put_directory(&[("g", gone)]))
            })
            .collect();
        let named: Vec<(&str, Digest)> = children.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        (self.put_directory(&named), children)
    }

    async fn fetch(&self, digests: Vec<Digest>) -> Result<Vec<Option<Bytes>>> {
        let answers = digests.iter().map(|d| self.blobs.get(d).cloned()).collect();
        self.asked.borrow_mut().push(digests);
        Ok(answers)
    }

    fn walk(&self, root: Digest, count_max: u64, batch: Batch) -> Result<Tree> {
        ready(walk(root, count_max, batch, |digests| self.fetch(digests)))
    }

    fn reads(&self) -> Vec<Digest> {
        self.asked.borrow().iter().flatten().copied().collect()
    }
}

fn directory(children: &[(&str, Digest)]) -> Directory {
    Directory {
        directories: children
            .iter()
            .map(|(name, d)| DirectoryNode { name: (*name).to_owned(), digest: Some(d.to_proto()) })
            .collect(),
        ..Default::default()
    }
}

fn digests(tree: &Tree) -> Vec<Digest> {
    tree.directories.iter().map(|(d, _)| *d).collect()
}

#[test]
fn a_missing_directory_is_reported_and_the_rest_of_the_tree_walked() {
    let mut cas = Cas::default();
    let leaf = cas.put_directory(&[]);
    let deep_gone = DigestFunction::Sha256.compute(b"a directory two levels down, not here");
    let deep = cas.put_directory(&[("x", deep_gone)]);
    let present = cas.put_directory(&[("deep", deep)]);
    let gone = DigestFunction::Sha256.compute(b"a directory nobody uploaded");
    let also_gone = DigestFunction::Sha256.compute(b"another one");
    let root = cas.put_directory(&[("a", present), ("b", gone), ("c", also_gone), ("leaf", leaf)]);
    let tree = cas.walk(root, 100, Batch::DEFAULT).unwrap();
    assert_eq!(digests(&tree), vec![root, present, leaf, deep], "breadth-first, the root first");
    assert_eq!(tree.missing, vec![gone, also_gone, deep_gone]);
    assert!(!tree.exceeded);
    // The digest each directory was read by is kept, whatever prost would
    // encode it as now.
    let mut foreign = directory(&[]).encode_to_vec();
    foreign.extend_from_slice(&[120, 1]); // field 15: unknown to the REAPI
    let foreign = cas.put(foreign);
    let root = cas.put_directory(&[("f", foreign)]);
    assert_eq!(digests(&cas.walk(root, 100, Batch::DEFAULT).unwrap()), vec![root, foreign]);
}

#[test]
fn a_missing_root_is_the_only_thing_reported() {
    let cas = Cas::default();
    let root = DigestFunction::Sha256.compute(b"no such root");
    let tree = cas.walk(root, 100, Batch::DEFAULT).unwrap();
    assert_eq!(tree, Tree { directories: vec![], missing: vec![root], exceeded: false });
}

#[test]
fn each_directory_is_read_once_however_often_it_is_named() {
    let mut cas = Cas::default();
    let shared = cas.put_directory(&[]);
    let shared = cas.put_directory(&[("e", shared)]); // not the empty blob
    let gone = DigestFunction::Sha256.compute(b"gone");
    let a = cas.put_directory(&[("s", shared), ("t", shared), ("g", gone)]);
    let b = cas.put_directory(&[("s", shared), ("g", gone)]);
    let root = cas.put_directory(&[("a", a), ("b", b), ("s", shared)]);
    let tree = cas.walk(root, 100, Batch::DEFAULT).unwrap();
    assert_eq!(tree.missing, vec![gone], "a missing directory named twice is reported once");
    let mut reads = cas.reads();
    assert_eq!(reads.len(), 5, "root, a, b, shared, gone: {reads:?}");
    reads.sort();
    reads.dedup();
    assert_eq!(reads.len(), 5, "each once");
    assert!(!reads.contains(&DigestFunction::Sha256.empty()), "the empty directory is never fetched");
    assert_eq!(digests(&tree), vec![root, a, b, shared, DigestFunction::Sha256.empty()]);
}

#[test]
fn the_walk_stops_past_count_max_without_reading_the_rest() {
    let mut cas = Cas::default();
    let (root, children) = cas.put_wide_root(200);
    let tree = cas.walk(root, 11, Batch::DEFAULT).unwrap();
    assert!(tree.exceeded);
    assert_eq!(cas.reads(), vec![root], "the children past the bound are never read");
    // Exactly at the bound, the tree is whole.
    let five: Vec<(&str, Digest)> = children[..5].iter().map(|(n, d)| (n.as_str(), *d)).collect();
    let small = cas.put_directory(&five);
    let tree = cas.walk(small, 11, Batch::DEFAULT).unwrap();
    assert!(!tree.exceeded);
    assert_eq!((tree.directories.len(), tree.missing.len()), (6, 5), "missing directories count too");
    assert!(cas.walk(small, 10, Batch::DEFAULT).unwrap().exceeded);
}

#[test]
fn batches_keep_within_their_bounds_and_the_order() {
    let mut cas = Cas::default();
    let (root, leaves) = cas.put_wide_root(40);
    let tree = cas.walk(root, 1000, Batch { directories: 8, bytes: 1000 }).unwrap();
    let asked = cas.asked.borrow();
    assert!(asked.iter().all(|b| b.len() <= 8), "{asked:?}");
    assert!(asked.iter().all(|b| b.iter().map(Digest::size_bytes).sum::<u64>() <= 1000 || b.len() == 1));
    let order: Vec<Digest> = digests(&tree)[1..].to_vec();
    assert_eq!(order, leaves.iter().map(|(_, d)| *d).collect::<Vec<_>>(), "the tree's order");
    // A directory larger than the bytes of a batch is read alone.
    drop(asked);
    cas.asked.borrow_mut().clear();
    cas.walk(root, 1000, Batch { directories: 8, bytes: 1 }).unwrap();
    assert!(cas.asked.borrow().iter().all(|b| b.len() == 1));
}

#[test]
fn malformed_directories_are_named_by_their_digest() {
    let mut cas = Cas::default();
    let junk = cas.put(b"\xff\xff\xff\xff not a Directory message".to_vec());
    let error = cas.walk(junk, 100, Batch::DEFAULT).unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "the root is the caller's argument: {error}");
    assert!(error.message().contains(&junk.hash_hex()), "{error}");

    let root = cas.put_directory(&[("junk", junk)]);
    let error = cas.walk(root, 100, Batch::DEFAULT).unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "below the root, the CAS's content: {error}");
    assert!(error.message().contains(&junk.hash_hex()), "{error}");

    let mut no_digest = directory(&[]);
    no_digest.directories.push(DirectoryNode { name: "nameless".to_owned(), digest: None });
    let bad = cas.put(no_digest.encode_to_vec());
    let root = cas.put_directory(&[("bad", bad)]);
    let error = cas.walk(root, 100, Batch::DEFAULT).unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    assert!(error.message().contains(&bad.hash_hex()) && error.message().contains("nameless"), "{error}");
}

#[test]
fn a_tree_deeper_than_any_stack_is_walked() {
    // 20,000 levels on a 128 KiB stack: a recursive walk would overflow it.
    let mut cas = Cas::default();
    let mut digest = cas.put_directory(&[]);
    let mut chain = vec![digest];
    for _ in 0..20_000 {
        digest = cas.put_directory(&[("d", digest)]);
        chain.push(digest);
    }
    chain.reverse();
    let handle = std::thread::Builder::new()
        .stack_size(128 << 10)
        .spawn(move || {
            let tree = cas.walk(digest, 100_000, Batch::DEFAULT).unwrap();
            digests(&tree)
        })
        .unwrap();
    assert_eq!(handle.join().unwrap(), chain);
}

#[test]
fn a_walk_in_steps_hands_on_each_batch() {
    let mut cas = Cas::default();
    let gone = DigestFunction::Sha256.compute(b"gone");
    let a = cas.put_directory(&[("g", gone)]);
    let root = cas.put_directory(&[("a", a)]);
    let mut walk = TreeWalk::new(root, 10);
    let mut steps = Vec::new();
    while let Some(reached) = ready(walk.next(Batch::DEFAULT, |d| cas.fetch(d))).unwrap() {
        steps.push(reached);
    }
    assert!(walk.is_done() && !walk.exceeded());
    assert_eq!(steps.len(), 3, "one level at a time here: {steps:?}");
    assert!(matches!(steps[0][..], [Reached::Directory(d, _)] if d == root));
    assert_eq!(steps[2], vec![Reached::Missing(gone)]);
}
