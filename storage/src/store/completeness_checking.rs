//! Hides action results whose outputs are no longer in the CAS.
//!
//! A client that gets an action result must be able to download every blob it
//! references, or "builds without the bytes" fail much later. This decorator
//! wraps the AC: on `get` it decodes the `ActionResult`, checks its output
//! files, stdout/stderr and output directory trees (and every file inside the
//! trees) against the CAS, and reports `NotFound` if anything is missing. The
//! CAS's `find_missing` extends the lifetime of everything it finds, so a hit
//! keeps its outputs alive.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kiln_proto::reapi::{ActionResult, Tree};
use kiln_proto::{Digest, DigestFunction, Error, Result};
use prost::Message;

use super::{Blob, BlobStore, Key, Scope};

#[derive(Debug, Clone)]
pub struct CompletenessChecking<A, C> {
    action_cache: A,
    cas: C,
    /// Most blobs one check may look up, over all outputs and tree files.
    referenced_blobs_max: usize,
    /// Most output trees fetched at once.
    tree_fetches_max: usize,
}

impl<A, C> CompletenessChecking<A, C> {
    pub fn new(action_cache: A, cas: C, referenced_blobs_max: usize, tree_fetches_max: usize) -> Self {
        Self { action_cache, cas, referenced_blobs_max, tree_fetches_max: tree_fetches_max.max(1) }
    }
}

/// Keys gathered for one check, bounded in total.
struct Referenced {
    scope: Scope,
    function: DigestFunction,
    count: usize,
    max: usize,
}

impl Referenced {
    fn add<'a>(
        &mut self,
        digests: impl Iterator<Item = &'a kiln_proto::reapi::Digest>,
        out: &mut Vec<Key>,
    ) -> Result<()> {
        for d in digests {
            self.count += 1;
            if self.count > self.max {
                return Err(Error::not_found(format!(
                    "action result references more than {} blobs (referenced_blobs_max)",
                    self.max
                )));
            }
            let digest =
                Digest::from_proto(Some(self.function), d).map_err(|e| Error::not_found(e.message()))?;
            out.push(Key::new(self.scope.clone(), digest));
        }
        Ok(())
    }
}

async fn fetch<'a, C: BlobStore>(cas: &'a C, key: &'a Key) -> (&'a Key, Result<Bytes>) {
    (key, cas.get(key).await)
}

impl<A: BlobStore, C: BlobStore> CompletenessChecking<A, C> {
    /// `Ok` if every blob the result references is in the CAS; `NotFound`
    /// if one is missing; other errors keep their codes.
    async fn check(&self, key: &Key, data: &Bytes) -> Result<()> {
        let result = ActionResult::decode(data.as_ref()).map_err(|e| {
            tracing::error!(action = %key, error = %e, "stored action result does not decode; treating it as absent");
            Error::not_found(format!("stored action result is unreadable: {e}"))
        })?;
        // Outputs live in the CAS of the action's base tenant.
        let mut refs = Referenced {
            scope: Scope::cas_of(key.scope.as_str()),
            function: key.digest.function(),
            count: 0,
            max: self.referenced_blobs_max,
        };
        let mut keys = Vec::new();
        refs.add(result.output_files.iter().filter_map(|f| f.digest.as_ref()), &mut keys)?;
        refs.add(result.stdout_digest.iter().chain(result.stderr_digest.iter()), &mut keys)?;
        refs.add(
            result.output_directories.iter().filter_map(|d| d.root_directory_digest.as_ref()),
            &mut keys,
        )?;
        let mut trees = Vec::new();
        refs.add(result.output_directories.iter().filter_map(|d| d.tree_digest.as_ref()), &mut trees)?;
        keys.extend(trees.iter().cloned());
        let missing = self.cas.find_missing(&keys).await?;
        if let Some(first) = missing.first() {
            return Err(Error::not_found(format!(
                "action result references {} blob(s) missing from the CAS, e.g. {first}",
                missing.len()
            )));
        }
        // Fetch the trees concurrently, at most `tree_fetches_max` at once.
        let mut pending = FuturesUnordered::new();
        let mut queued = trees.iter();
        let mut files = Vec::new();
        loop {
            while pending.len() < self.tree_fetches_max {
                let Some(tree_key) = queued.next() else { break };
                pending.push(fetch(&self.cas, tree_key));
            }
            let Some((tree_key, tree)) = pending.next().await else { break };
            let tree = tree?;
            let tree = Tree::decode(tree.as_ref())
                .map_err(|e| Error::not_found(format!("output tree {tree_key} is unreadable: {e}")))?;
            for dir in tree.root.iter().chain(tree.children.iter()) {
                refs.add(dir.files.iter().filter_map(|f| f.digest.as_ref()), &mut files)?;
            }
        }
        let missing = self.cas.find_missing(&files).await?;
        if let Some(first) = missing.first() {
            return Err(Error::not_found(format!(
                "action result's output directories reference {} file(s) missing from the CAS, e.g. {first}",
                missing.len()
            )));
        }
        Ok(())
    }
}

impl<A: BlobStore, C: BlobStore> BlobStore for CompletenessChecking<A, C> {
    async fn get(&self, key: &Key) -> Result<Bytes> {
        let data = self.action_cache.get(key).await?;
        match self.check(key, &data).await {
            Ok(()) => Ok(data),
            Err(e) if e.is_not_found() => {
                tracing::debug!(action = %key, error = %e, "hiding incomplete action result");
                Err(Error::not_found(format!("action result {key} is incomplete: {}", e.message())))
            }
            // The CAS could not answer (unavailable, data loss ...): say so,
            // rather than pretend the result is absent.
            Err(e) => Err(e.context(format!("checking action result {key}"))),
        }
    }

    async fn put(&self, key: &Key, blob: Blob) -> Result<()> {
        self.action_cache.put(key, blob).await
    }

    async fn find_missing(&self, keys: &[Key]) -> Result<Vec<Key>> {
        self.action_cache.find_missing(keys).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmptyBlob, MemoryStore};
    use kiln_proto::reapi::{Directory, FileNode, OutputDirectory, OutputFile};
    use std::sync::Arc;

    async fn put_cas(cas: &impl BlobStore, data: &[u8]) -> Digest {
        let d = DigestFunction::Sha256.compute(data);
        cas.put(&Key::cas_in("main", d), Blob::from(Bytes::copy_from_slice(data))).await.unwrap();
        d
    }

    #[tokio::test]
    async fn hides_results_with_missing_outputs() {
        let cas = Arc::new(EmptyBlob::new(MemoryStore::new(1 << 20, 1)));
        let ac = CompletenessChecking::new(MemoryStore::new(1 << 20, 1), cas.clone(), 1000, 4);
        let file = put_cas(&*cas, b"output").await;
        let inner = put_cas(&*cas, b"in tree").await;
        let tree = Tree {
            root: Some(Directory {
                files: vec![FileNode {
                    name: "f".into(),
                    digest: Some(inner.to_proto()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        };
        let tree = put_cas(&*cas, &tree.encode_to_vec()).await;
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "out".into(),
                digest: Some(file.to_proto()),
                ..Default::default()
            }],
            output_directories: vec![OutputDirectory {
                path: "dir".into(),
                tree_digest: Some(tree.to_proto()),
                ..Default::default()
            }],
            stdout_digest: Some(DigestFunction::Sha256.empty().to_proto()),
            ..Default::default()
        };
        let key = Key::new(Scope::new("main"), DigestFunction::Sha256.compute(b"action"));
        ac.put(&key, Blob::from(Bytes::from(result.encode_to_vec()))).await.unwrap();
        ac.get(&key).await.unwrap();

        // A result whose tree references a file that is gone is hidden.
        let gone = DigestFunction::Sha256.compute(b"never uploaded");
        let tree2 = Tree {
            root: Some(Directory {
                files: vec![FileNode {
                    name: "g".into(),
                    digest: Some(gone.to_proto()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            children: vec![],
        };
        let tree2 = put_cas(&*cas, &tree2.encode_to_vec()).await;
        let mut bad = result.clone();
        bad.output_directories[0].tree_digest = Some(tree2.to_proto());
        let key2 = Key::new(Scope::new("main"), DigestFunction::Sha256.compute(b"action2"));
        ac.put(&key2, Blob::from(Bytes::from(bad.encode_to_vec()))).await.unwrap();
        let err = ac.get(&key2).await.unwrap_err();
        assert!(err.is_not_found());
        assert!(err.message().contains("missing from the CAS"), "{}", err.message());

        // So is one whose output file is gone.
        let mut bad = result;
        bad.output_files[0].digest = Some(gone.to_proto());
        ac.put(&key2, Blob::from(Bytes::from(bad.encode_to_vec()))).await.unwrap();
        assert!(ac.get(&key2).await.unwrap_err().is_not_found());
    }

    #[tokio::test]
    async fn garbage_is_not_served() {
        let cas = MemoryStore::new(1 << 20, 1);
        let ac = CompletenessChecking::new(MemoryStore::new(1 << 20, 1), cas, 1000, 4);
        let key = Key::new(Scope::new(""), DigestFunction::Sha256.compute(b"a"));
        ac.put(&key, Blob::from(Bytes::from_static(b"\xff\xff\xff"))).await.unwrap();
        assert!(ac.get(&key).await.unwrap_err().is_not_found());
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;
    use crate::store::MemoryStore;
    use kiln_proto::Code;
    use kiln_proto::reapi::{Directory, FileNode, OutputDirectory, OutputFile};

    /// A CAS that fails every call, as a broken backend would.
    #[derive(Debug, Clone)]
    struct Failing(Code);

    impl BlobStore for Failing {
        async fn get(&self, _: &Key) -> Result<Bytes> {
            Err(Error::new(self.0, "backend down"))
        }
        async fn put(&self, _: &Key, _: Blob) -> Result<()> {
            Err(Error::new(self.0, "backend down"))
        }
        async fn find_missing(&self, _: &[Key]) -> Result<Vec<Key>> {
            Err(Error::new(self.0, "backend down"))
        }
    }

    fn result_with(files: usize) -> ActionResult {
        ActionResult {
            output_files: (0..files)
                .map(|i| OutputFile {
                    path: format!("f{i}"),
                    digest: Some(DigestFunction::Sha256.compute(format!("{i}").as_bytes()).to_proto()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn cas_errors_keep_their_codes() {
        for code in [Code::Unavailable, Code::DataLoss, Code::Internal] {
            let ac = CompletenessChecking::new(MemoryStore::new(1 << 20, 1), Failing(code), 100, 4);
            let key = Key::new(Scope::new("main"), DigestFunction::Sha256.compute(b"a"));
            ac.put(&key, Blob::from(Bytes::from(result_with(1).encode_to_vec()))).await.unwrap();
            assert_eq!(ac.get(&key).await.unwrap_err().code(), code);
        }
    }

    #[tokio::test]
    async fn the_bound_counts_every_list_together() {
        let cas = std::sync::Arc::new(MemoryStore::new(1 << 20, 1));
        for i in 0..6 {
            let data = Bytes::from(format!("{i}"));
            cas.put(&Key::cas_in("main", DigestFunction::Sha256.compute(&data)), Blob::from(data))
                .await
                .unwrap();
        }
        // A tree with 3 files, referenced next to 3 output files: 7 blobs in all.
        let tree = Tree {
            root: Some(Directory {
                files: (3..6)
                    .map(|i| FileNode {
                        name: format!("t{i}"),
                        digest: Some(DigestFunction::Sha256.compute(format!("{i}").as_bytes()).to_proto()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            children: vec![],
        };
        let tree_bytes = Bytes::from(tree.encode_to_vec());
        let tree_digest = DigestFunction::Sha256.compute(&tree_bytes);
        cas.put(&Key::cas_in("main", tree_digest), Blob::from(tree_bytes)).await.unwrap();
        let mut result = result_with(3);
        result.output_directories.push(OutputDirectory {
            path: "d".into(),
            tree_digest: Some(tree_digest.to_proto()),
            ..Default::default()
        });
        let encoded = Bytes::from(result.encode_to_vec());
        let key = Key::new(Scope::new("main"), DigestFunction::Sha256.compute(b"a"));
        let tight = CompletenessChecking::new(MemoryStore::new(1 << 20, 1), cas.clone(), 6, 4);
        tight.put(&key, Blob::from(encoded.clone())).await.unwrap();
        let err = tight.get(&key).await.unwrap_err();
        assert!(err.is_not_found() && err.message().contains("referenced_blobs_max"), "{}", err.message());
        let enough = CompletenessChecking::new(MemoryStore::new(1 << 20, 1), cas, 7, 4);
        enough.put(&key, Blob::from(encoded)).await.unwrap();
        enough.get(&key).await.unwrap();
    }
}
