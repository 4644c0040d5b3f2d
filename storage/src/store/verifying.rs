//! Refuses CAS uploads whose bytes do not match their digest.
//!
//! This is the one place where upload verification happens, so no service can
//! forget it: every CAS write path (BatchUpdateBlobs, ByteStream, compressed
//! or not) ends in `put` on this decorator. Large blobs are hashed on the
//! blocking pool so that one big upload does not stall other requests on the
//! same event loop. On `get` the length is checked against the digest, so a
//! faulty backend cannot make Kiln serve bytes of the wrong size.

use bytes::Bytes;
use kiln_proto::{Error, Result};

use super::{Blob, BlobStore, Key};

/// Blobs at least this large are hashed off the event loop.
const BLOCKING_HASH_SIZE_BYTES_MIN: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct Verifying<S> {
    inner: S,
}

impl<S> Verifying<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: BlobStore> BlobStore for Verifying<S> {
    async fn get(&self, key: &Key) -> Result<Bytes> {
        let data = self.inner.get(key).await?;
        // The full hash was checked on the way in; the length check is free
        // and catches a backend that returns the wrong entry.
        if data.len() as u64 != key.digest.size_bytes() {
            tracing::error!(blob = %key, len = data.len(), "backend returned a blob of the wrong size");
            return Err(Error::new(
                kiln_proto::Code::DataLoss,
                format!("blob {key}: stored copy has {} bytes; refusing to serve it", data.len()),
            ));
        }
        Ok(data)
    }

    async fn put(&self, key: &Key, blob: Blob) -> Result<()> {
        // A blob built by `BlobBuilder` carries the digest of exactly its
        // bytes, computed as they arrived: comparing it is the verification.
        if let Some(hashed) = blob.hashed_as() {
            if hashed != &key.digest {
                return Err(Error::invalid_argument(format!(
                    "blob {}: the uploaded data has digest {hashed}; the upload does not match its digest",
                    key.digest
                )));
            }
            return self.inner.put(key, blob).await;
        }
        let data = blob.data();
        if data.len() < BLOCKING_HASH_SIZE_BYTES_MIN {
            key.digest.verify(data)?;
        } else {
            let digest = key.digest;
            let check = data.clone();
            tokio::task::spawn_blocking(move || digest.verify(&check))
                .await
                .map_err(|e| Error::internal(format!("hashing task failed: {e}")))??;
        }
        self.inner.put(key, blob).await
    }

    async fn find_missing(&self, keys: &[Key]) -> Result<Vec<Key>> {
        self.inner.find_missing(keys).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use kiln_proto::{Code, DigestFunction};

    #[tokio::test]
    async fn mismatched_upload_is_refused_and_not_stored() {
        let store = Verifying::new(MemoryStore::new(8 << 20, 1));
        for f in DigestFunction::ALL {
            let k = Key::cas(f.compute(b"right"));
            let err = store.put(&k, Blob::from(Bytes::from_static(b"wrong"))).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(store.get(&k).await.unwrap_err().is_not_found());
            store.put(&k, Blob::from(Bytes::from_static(b"right"))).await.unwrap();
            assert_eq!(store.get(&k).await.unwrap(), Bytes::from_static(b"right"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_blobs_are_verified_too() {
        let store = Verifying::new(MemoryStore::new(16 << 20, 1));
        let data = Bytes::from(vec![7u8; 2 << 20]);
        let k = Key::cas(DigestFunction::Sha256.compute(&data));
        let mut corrupt = data.to_vec();
        corrupt[12345] ^= 1;
        assert!(store.put(&k, Blob::from(Bytes::from(corrupt))).await.is_err());
        store.put(&k, Blob::from(data)).await.unwrap();
    }
}
