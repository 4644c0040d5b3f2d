//! A bounded in-memory backend with least-recently-used eviction.
//!
//! Keys are spread over shards by their digest's first bytes (digests are
//! uniformly distributed), each shard a mutex around an LRU map with its own
//! byte budget. Critical sections are a hash-map operation and a reference
//! count bump; no I/O or hashing happens under a lock.

use bytes::Bytes;
use kiln_proto::{Error, Result};
use lru::LruCache;
use std::sync::Mutex;

use super::{Blob, BlobStore, Key};

/// Fixed per-entry bookkeeping charged against the budget, so that millions of
/// tiny blobs cannot exceed it unnoticed.
const ENTRY_OVERHEAD_BYTES: u64 = 128;

#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity_bytes: u64,
}

#[derive(Debug)]
struct Shard {
    entries: LruCache<Key, Bytes>,
    size_bytes: u64,
}

impl MemoryStore {
    /// A store holding at most `capacity_bytes` across `shard_count` shards.
    pub fn new(capacity_bytes: u64, shard_count: usize) -> Self {
        assert!(shard_count > 0, "a memory store needs at least one shard");
        let shard_capacity_bytes = capacity_bytes / shard_count as u64;
        assert!(shard_capacity_bytes > 0, "memory store capacity {capacity_bytes} is too small");
        let shards = (0..shard_count)
            .map(|_| Mutex::new(Shard { entries: LruCache::unbounded(), size_bytes: 0 }))
            .collect();
        Self { shards, shard_capacity_bytes }
    }

    /// The largest blob this store can hold.
    pub fn blob_size_bytes_max(&self) -> u64 {
        self.shard_capacity_bytes - ENTRY_OVERHEAD_BYTES
    }

    /// Total bytes charged across all shards.
    pub fn size_bytes(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).size_bytes).sum()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        let h = key.digest.hash();
        let prefix = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        let index = usize::try_from(prefix % self.shards.len() as u64).expect("index below shard count");
        &self.shards[index]
    }
}

fn lock(shard: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    // A panic while holding the lock cannot leave the map half-updated in a
    // way that serves wrong bytes, so a poisoned lock is still usable.
    shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn charge(data: &Bytes) -> u64 {
    data.len() as u64 + ENTRY_OVERHEAD_BYTES
}

impl BlobStore for MemoryStore {
    async fn get(&self, key: &Key) -> Result<Bytes> {
        let mut shard = lock(self.shard(key));
        match shard.entries.get(key) {
            Some(data) => Ok(data.clone()),
            None => Err(Error::not_found(format!("blob {key} not found"))),
        }
    }

    async fn put(&self, key: &Key, blob: Blob) -> Result<()> {
        let data = blob.into_data();
        let cost = charge(&data);
        if cost > self.shard_capacity_bytes {
            return Err(Error::resource_exhausted(format!(
                "blob {key} of {} bytes is larger than this store can hold ({} bytes); raise the store's size",
                data.len(),
                self.blob_size_bytes_max()
            )));
        }
        let mut shard = lock(self.shard(key));
        if let Some(old) = shard.entries.put(key.clone(), data) {
            shard.size_bytes -= charge(&old);
        }
        shard.size_bytes += cost;
        while shard.size_bytes > self.shard_capacity_bytes {
            let (_, evicted) = shard.entries.pop_lru().expect("a shard over budget has entries");
            shard.size_bytes -= charge(&evicted);
        }
        assert!(shard.size_bytes <= self.shard_capacity_bytes);
        Ok(())
    }

    async fn find_missing(&self, keys: &[Key]) -> Result<Vec<Key>> {
        let mut missing = Vec::new();
        for key in keys {
            if lock(self.shard(key)).entries.get(key).is_none() {
                missing.push(key.clone());
            }
        }
        Ok(missing)
    }
}

impl MemoryStore {
    /// A store of `capacity_bytes` that can hold blobs of up to
    /// `blob_size_bytes_max`: as many shards as keep each shard at least
    /// twice that size, at most 64.
    pub fn for_blobs(capacity_bytes: u64, blob_size_bytes_max: u64) -> Self {
        let per_shard_min = blob_size_bytes_max.saturating_mul(2).max(1 << 20);
        let shards = (capacity_bytes / per_shard_min).clamp(1, 64);
        let store = Self::new(capacity_bytes, usize::try_from(shards).expect("at most 64"));
        assert!(store.blob_size_bytes_max() >= blob_size_bytes_max.min(capacity_bytes / 2));
        store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::DigestFunction;

    fn key(data: &[u8]) -> Key {
        Key::cas(DigestFunction::Sha256.compute(data))
    }

    #[tokio::test]
    async fn put_get_find_missing() {
        let store = MemoryStore::new(1 << 20, 4);
        let a = key(b"a");
        assert!(store.get(&a).await.unwrap_err().is_not_found());
        store.put(&a, Blob::from(Bytes::from_static(b"a"))).await.unwrap();
        assert_eq!(store.get(&a).await.unwrap(), Bytes::from_static(b"a"));
        let b = key(b"b");
        assert_eq!(store.find_missing(&[a.clone(), b.clone()]).await.unwrap(), vec![b]);
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn evicts_least_recently_used_within_budget() {
        let budget = 3 * (1000 + ENTRY_OVERHEAD_BYTES);
        let store = MemoryStore::new(budget, 1);
        let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000]).collect();
        for blob in &blobs[..3] {
            store.put(&key(blob), Blob::from(Bytes::from(blob.clone()))).await.unwrap();
        }
        // Touch the first so the second is the least recently used.
        assert!(store.find_missing(&[key(&blobs[0])]).await.unwrap().is_empty());
        store.put(&key(&blobs[3]), Blob::from(Bytes::from(blobs[3].clone()))).await.unwrap();
        assert!(store.size_bytes() <= budget);
        let missing = store.find_missing(&blobs.iter().map(|b| key(b)).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(missing, vec![key(&blobs[1])]);
    }

    #[tokio::test]
    async fn oversized_blob_is_resource_exhausted() {
        let store = MemoryStore::new(1024, 1);
        let data = vec![0u8; 2048];
        let err = store.put(&key(&data), Blob::from(Bytes::from(data))).await.unwrap_err();
        assert_eq!(err.code(), kiln_proto::Code::ResourceExhausted);
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn for_blobs_holds_the_largest_allowed_blob() {
        for (capacity, blob_max) in [(64u64 << 20, 20u64 << 20), (1 << 30, 1 << 20), (8 << 20, 4 << 20)] {
            let store = MemoryStore::for_blobs(capacity, blob_max);
            assert!(store.blob_size_bytes_max() >= blob_max, "{capacity} {blob_max}");
        }
        let store = MemoryStore::for_blobs(64 << 20, 20 << 20);
        let data = Bytes::from(vec![1u8; 20 << 20]);
        store.put(&key(&data), Blob::from(data)).await.unwrap();
    }

    #[tokio::test]
    async fn replacing_a_key_keeps_accounting_exact() {
        let store = MemoryStore::new(1 << 20, 1);
        let k = key(b"x");
        store.put(&k, Blob::from(Bytes::from_static(b"x"))).await.unwrap();
        store.put(&k, Blob::from(Bytes::from_static(b"x"))).await.unwrap();
        assert_eq!(store.size_bytes(), 1 + ENTRY_OVERHEAD_BYTES);
    }
}
