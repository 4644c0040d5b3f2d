//! The empty blob exists in every CAS, for every digest function.
//!
//! Clients never upload it (Bazel skips empty files), yet they reference it
//! in action results and directories. This decorator answers for it without
//! touching the backend.

use bytes::Bytes;
use kiln_proto::Result;

use super::{Blob, BlobStore, Key};

#[derive(Debug, Clone)]
pub struct EmptyBlob<S> {
    inner: S,
}

impl<S> EmptyBlob<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: BlobStore> BlobStore for EmptyBlob<S> {
    async fn get(&self, key: &Key) -> Result<Bytes> {
        if key.digest.is_empty_blob() {
            return Ok(Bytes::new());
        }
        self.inner.get(key).await
    }

    async fn put(&self, key: &Key, blob: Blob) -> Result<()> {
        if key.digest.is_empty_blob() && blob.is_empty() {
            return Ok(());
        }
        self.inner.put(key, blob).await
    }

    async fn find_missing(&self, keys: &[Key]) -> Result<Vec<Key>> {
        if !keys.iter().any(|k| k.digest.is_empty_blob()) {
            return self.inner.find_missing(keys).await;
        }
        let rest: Vec<Key> = keys.iter().filter(|k| !k.digest.is_empty_blob()).cloned().collect();
        self.inner.find_missing(&rest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use kiln_proto::DigestFunction;

    #[tokio::test]
    async fn empty_blob_always_exists() {
        let store = EmptyBlob::new(MemoryStore::new(1 << 20, 1));
        for f in DigestFunction::ALL {
            let k = Key::cas(f.empty());
            assert_eq!(store.get(&k).await.unwrap(), Bytes::new());
            assert!(store.find_missing(std::slice::from_ref(&k)).await.unwrap().is_empty());
            store.put(&k, Blob::from(Bytes::new())).await.unwrap();
        }
        let other = Key::cas(DigestFunction::Sha256.compute(b"x"));
        assert_eq!(store.find_missing(std::slice::from_ref(&other)).await.unwrap(), vec![other]);
    }
}
