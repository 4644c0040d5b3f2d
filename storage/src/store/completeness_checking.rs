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
use kiln_proto::reapi::{ActionResult, Tree};
use kiln_proto::{Digest, DigestFunction, Error, Result};
use prost::Message;

use super::{Blob, BlobStore, Key, Scope};

/// Most blobs one action result may reference before it is treated as
/// incomplete (a bound on the work one GetActionResult can cause).
const REFERENCED_BLOBS_MAX: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct CompletenessChecking<A, C> {
    action_cache: A,
    cas: C,
}

impl<A, C> CompletenessChecking<A, C> {
    pub fn new(action_cache: A, cas: C) -> Self {
        Self { action_cache, cas }
    }
}

fn parse_all<'a>(
    scope: &Scope,
    function: DigestFunction,
    digests: impl Iterator<Item = &'a kiln_proto::reapi::Digest>,
    out: &mut Vec<Key>,
) -> Result<()> {
    for d in digests {
        out.push(Key::new(scope.clone(), Digest::from_proto(Some(function), d)?));
        if out.len() > REFERENCED_BLOBS_MAX {
            return Err(Error::not_found("action result references too many blobs"));
        }
    }
    Ok(())
}

impl<A: BlobStore, C: BlobStore> CompletenessChecking<A, C> {
    async fn check(&self, key: &Key, data: &Bytes) -> Result<()> {
        let function = key.digest.function();
        // Outputs live in the CAS of the action's base tenant.
        let scope = &Scope::cas_of(key.scope.as_str());
        let result = ActionResult::decode(data.as_ref())
            .map_err(|e| Error::not_found(format!("stored action result is unreadable: {e}")))?;
        let mut keys = Vec::new();
        parse_all(scope, function, result.output_files.iter().filter_map(|f| f.digest.as_ref()), &mut keys)?;
        parse_all(
            scope,
            function,
            result.stdout_digest.iter().chain(result.stderr_digest.iter()),
            &mut keys,
        )?;
        let mut trees = Vec::new();
        parse_all(
            scope,
            function,
            result.output_directories.iter().filter_map(|d| d.tree_digest.as_ref()),
            &mut trees,
        )?;
        parse_all(
            scope,
            function,
            result.output_directories.iter().filter_map(|d| d.root_directory_digest.as_ref()),
            &mut keys,
        )?;
        keys.extend(trees.iter().cloned());
        let missing = self.cas.find_missing(&keys).await?;
        if let Some(first) = missing.first() {
            return Err(Error::not_found(format!(
                "action result references {} blob(s) missing from the CAS, e.g. {first}",
                missing.len()
            )));
        }
        let mut files = Vec::new();
        for tree_key in &trees {
            let tree = self.cas.get(tree_key).await?;
            let tree = Tree::decode(tree.as_ref())
                .map_err(|e| Error::not_found(format!("output tree {tree_key} is unreadable: {e}")))?;
            for dir in tree.root.iter().chain(tree.children.iter()) {
                parse_all(scope, function, dir.files.iter().filter_map(|f| f.digest.as_ref()), &mut files)?;
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
        self.check(key, &data).await.map_err(|e| {
            tracing::debug!(action = %key, error = %e, "hiding incomplete action result");
            Error::not_found(format!("action result {key} is incomplete: {}", e.message()))
        })?;
        Ok(data)
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
        let ac = CompletenessChecking::new(MemoryStore::new(1 << 20, 1), cas.clone());
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
        let ac = CompletenessChecking::new(MemoryStore::new(1 << 20, 1), cas);
        let key = Key::new(Scope::new(""), DigestFunction::Sha256.compute(b"a"));
        ac.put(&key, Blob::from(Bytes::from_static(b"\xff\xff\xff"))).await.unwrap();
        assert!(ac.get(&key).await.unwrap_err().is_not_found());
    }
}
