//! A bounded in-memory backend with least-recently-used eviction, for the
//! CAS ([`MemoryCas`]) and the AC ([`MemoryAc`]).
//!
//! Keys are spread over shards by their digest's first bytes, each shard a
//! mutex around an LRU map with its own byte budget. A blob is kept as the
//! chunks it was written in, so a write never copies or reallocates; bytes
//! being written are charged to the budget as they arrive (evicting the
//! least recently used blobs to make room), so uploads in progress cannot
//! push the store past its size either. Critical sections are a map
//! operation and a reference count bump; no I/O or hashing happens under a
//! lock.

use std::hash::Hash;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use kiln_proto::limits::STORE_CHUNK_BYTES;
use kiln_proto::{Code, Error, Result};
use lru::LruCache;

use super::{AcKey, AcStore, BlobReader, BlobWriter, ByteRange, CasKey, CasStore, Client};

/// Fixed per-entry bookkeeping charged against the budget, so that millions
/// of tiny blobs cannot exceed it unnoticed.
const ENTRY_OVERHEAD_BYTES: u64 = 128;

/// A blob as the chunks it was written in.
#[derive(Debug, Clone, Default)]
struct Chunks {
    parts: Arc<Vec<Bytes>>,
    len: u64,
}

impl Chunks {
    fn one(data: Bytes) -> Self {
        let len = data.len() as u64;
        Self { parts: Arc::new(vec![data]), len }
    }

    /// Up to `max` bytes from `offset`: a slice of one chunk when it covers
    /// them, else a copy of several.
    fn read(&self, offset: u64, max: u64) -> Bytes {
        let end = self.len.min(offset + max);
        let mut start_of_part = 0u64;
        let mut out: Option<BytesMut> = None;
        for part in self.parts.iter() {
            let part_end = start_of_part + part.len() as u64;
            if part_end > offset && start_of_part < end {
                let from = offset.max(start_of_part) - start_of_part;
                let to = end.min(part_end) - start_of_part;
                // Both within `part`, an in-memory buffer.
                let slice = part.slice(usize::try_from(from).unwrap_or(0)..usize::try_from(to).unwrap_or(0));
                if out.is_none() && start_of_part <= offset && part_end >= end {
                    return slice;
                }
                out.get_or_insert_with(|| {
                    BytesMut::with_capacity(usize::try_from(end - offset).unwrap_or(0))
                })
                .extend_from_slice(&slice);
            }
            if part_end >= end {
                break;
            }
            start_of_part = part_end;
        }
        out.map(BytesMut::freeze).unwrap_or_default()
    }

    fn whole(&self) -> Bytes {
        self.read(0, self.len)
    }
}

/// Keys that say which shard they belong to.
trait Sharded: Hash + Eq + Clone {
    fn shard_bits(&self) -> u64;
}

impl Sharded for CasKey {
    fn shard_bits(&self) -> u64 {
        let h = self.digest.hash();
        u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
    }
}

impl Sharded for AcKey {
    fn shard_bits(&self) -> u64 {
        let h = self.action.hash();
        u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
    }
}

#[derive(Debug)]
struct Shard<K: Hash + Eq> {
    entries: LruCache<K, Chunks>,
    /// Bytes of stored entries, with their bookkeeping.
    stored_bytes: u64,
    /// Bytes of writes in progress.
    writing_bytes: u64,
}

impl<K: Hash + Eq> Shard<K> {
    /// Evicts the least recently used entries until the shard fits.
    fn fit(&mut self, capacity_bytes: u64) {
        while self.stored_bytes + self.writing_bytes > capacity_bytes {
            let Some((_, evicted)) = self.entries.pop_lru() else { break };
            self.stored_bytes -= charge(evicted.len);
        }
    }
}

/// The sharded LRU map under both stores.
#[derive(Debug)]
struct Core<K: Hash + Eq> {
    shards: Box<[Mutex<Shard<K>>]>,
    shard_capacity_bytes: u64,
}

fn charge(len: u64) -> u64 {
    len + ENTRY_OVERHEAD_BYTES
}

impl<K: Sharded> Core<K> {
    fn new(capacity_bytes: u64, blob_size_bytes_max: u64) -> Self {
        // As many shards as keep each at least twice the largest blob, at most 64.
        let per_shard_min =
            blob_size_bytes_max.saturating_add(ENTRY_OVERHEAD_BYTES).saturating_mul(2).max(1 << 20);
        let count = (capacity_bytes / per_shard_min).clamp(1, 64);
        let shards = (0..count)
            .map(|_| Mutex::new(Shard { entries: LruCache::unbounded(), stored_bytes: 0, writing_bytes: 0 }))
            .collect();
        Self { shards, shard_capacity_bytes: (capacity_bytes / count).max(1) }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, Shard<K>> {
        let index = usize::try_from(key.shard_bits() % self.shards.len() as u64).unwrap_or(0);
        // A panic while holding the lock cannot leave the map half-updated
        // in a way that serves wrong bytes, so a poisoned lock is usable.
        self.shards[index].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, key: &K) -> Option<Chunks> {
        self.shard(key).entries.get(key).cloned()
    }

    /// Charges `bytes` of a write in progress to `key`'s shard, evicting the
    /// least recently used entries to make room.
    fn reserve(&self, key: &K, bytes: u64) -> Result<()> {
        let mut shard = self.shard(key);
        if shard.writing_bytes + bytes > self.shard_capacity_bytes {
            return Err(Error::resource_exhausted(format!(
                "the memory store has no room for {bytes} more bytes of uploads in progress; raise its size"
            )));
        }
        shard.writing_bytes += bytes;
        shard.fit(self.shard_capacity_bytes);
        Ok(())
    }

    fn release(&self, key: &K, bytes: u64) {
        let mut shard = self.shard(key);
        shard.writing_bytes = shard.writing_bytes.saturating_sub(bytes);
    }

    /// Stores `value`, whose bytes were reserved as a write in progress.
    fn insert_reserved(&self, key: K, value: Chunks) {
        let mut shard = self.shard(&key);
        shard.writing_bytes = shard.writing_bytes.saturating_sub(value.len);
        shard.stored_bytes += charge(value.len);
        if let Some(old) = shard.entries.put(key, value) {
            shard.stored_bytes -= charge(old.len);
        }
        shard.fit(self.shard_capacity_bytes);
    }

    fn remove(&self, key: &K) {
        let mut shard = self.shard(key);
        if let Some(old) = shard.entries.pop(key) {
            shard.stored_bytes -= charge(old.len);
        }
    }

    fn charged_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                s.stored_bytes + s.writing_bytes
            })
            .sum()
    }

    fn capacity_bytes(&self) -> u64 {
        self.shard_capacity_bytes * self.shards.len() as u64
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entries.len())
            .sum()
    }
}

/// The in-memory CAS.
#[derive(Debug, Clone)]
pub struct MemoryCas {
    core: Arc<Core<CasKey>>,
}

impl MemoryCas {
    /// A store of `capacity_bytes` that can hold blobs of up to
    /// `blob_size_bytes_max` bytes.
    pub fn new(capacity_bytes: u64, blob_size_bytes_max: u64) -> Self {
        Self { core: Arc::new(Core::new(capacity_bytes, blob_size_bytes_max)) }
    }

    /// The largest blob this store can hold.
    pub fn blob_size_bytes_max(&self) -> u64 {
        self.core.shard_capacity_bytes.saturating_sub(ENTRY_OVERHEAD_BYTES)
    }

    /// Bytes charged: stored blobs with their bookkeeping, and writes in progress.
    pub fn charged_bytes(&self) -> u64 {
        self.core.charged_bytes()
    }

    pub fn len(&self) -> usize {
        self.core.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.core.capacity_bytes()
    }
}

/// Reads a blob of the memory CAS, a chunk at a time, looking it up again
/// for each chunk (a slow reader holds a chunk, never an evicted blob).
#[derive(Debug)]
pub struct MemoryReader {
    core: Arc<Core<CasKey>>,
    key: CasKey,
    pos: u64,
    end: u64,
    start: u64,
}

impl BlobReader for MemoryReader {
    fn len(&self) -> u64 {
        self.end - self.start
    }

    async fn next(&mut self) -> Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let Some(chunks) = self.core.get(&self.key) else {
            return Err(Error::not_found(format!("blob {} was evicted while it was being read", self.key)));
        };
        let chunk = chunks.read(self.pos, (self.end - self.pos).min(STORE_CHUNK_BYTES));
        if chunk.is_empty() {
            return Err(Error::new(Code::DataLoss, format!("blob {} ended early", self.key)));
        }
        self.pos += chunk.len() as u64;
        Ok(Some(chunk))
    }

    fn report_corrupt(&mut self, why: &str) {
        tracing::error!(blob = %self.key, why, "dropping a corrupt blob from the memory store");
        self.core.remove(&self.key);
    }
}

/// Writes a blob into the memory CAS, charging each chunk as it arrives.
#[derive(Debug)]
pub struct MemoryWriter {
    core: Arc<Core<CasKey>>,
    key: CasKey,
    parts: Vec<Bytes>,
    written: u64,
    reserved: u64,
}

impl BlobWriter for MemoryWriter {
    fn written(&self) -> u64 {
        self.written
    }

    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let len = chunk.len() as u64;
        if self.written + len > self.key.size_bytes() {
            return Err(Error::invalid_argument(format!(
                "upload of {} received more than {} bytes",
                self.key.digest,
                self.key.size_bytes()
            )));
        }
        self.core.reserve(&self.key, len)?;
        self.reserved += len;
        self.written += len;
        self.parts.push(chunk);
        Ok(())
    }

    async fn commit(mut self) -> Result<()> {
        if self.written != self.key.size_bytes() {
            return Err(Error::invalid_argument(format!(
                "upload of {} finished after {} bytes; the digest says {}",
                self.key.digest,
                self.written,
                self.key.size_bytes()
            )));
        }
        let value = Chunks { parts: Arc::new(std::mem::take(&mut self.parts)), len: self.written };
        // The reservation becomes the entry's charge.
        self.reserved = 0;
        self.core.insert_reserved(self.key.clone(), value);
        Ok(())
    }
}

impl Drop for MemoryWriter {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.core.release(&self.key, self.reserved);
        }
    }
}

impl CasStore for MemoryCas {
    type Reader = MemoryReader;
    type Writer = MemoryWriter;

    async fn read(&self, key: &CasKey, range: ByteRange) -> Result<MemoryReader> {
        let Some(chunks) = self.core.get(key) else {
            return Err(Error::not_found(format!("blob {key} not found")));
        };
        let (start, end) = range.resolve(chunks.len)?;
        Ok(MemoryReader { core: self.core.clone(), key: key.clone(), pos: start, end, start })
    }

    async fn write_from(&self, key: &CasKey, _client: Client) -> Result<MemoryWriter> {
        if charge(key.size_bytes()) > self.core.shard_capacity_bytes {
            return Err(Error::resource_exhausted(format!(
                "blob {key} is larger than this store can hold ({} bytes); raise the store's size",
                self.blob_size_bytes_max()
            )));
        }
        Ok(MemoryWriter {
            core: self.core.clone(),
            key: key.clone(),
            parts: Vec::new(),
            written: 0,
            reserved: 0,
        })
    }

    async fn find_missing(&self, keys: &[CasKey]) -> Result<Vec<CasKey>> {
        Ok(keys.iter().filter(|k| self.core.get(k).is_none()).cloned().collect())
    }
}

/// The in-memory AC.
#[derive(Debug, Clone)]
pub struct MemoryAc {
    core: Arc<Core<AcKey>>,
}

impl MemoryAc {
    pub fn new(capacity_bytes: u64, value_size_bytes_max: u64) -> Self {
        Self { core: Arc::new(Core::new(capacity_bytes, value_size_bytes_max)) }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.core.capacity_bytes()
    }

    pub fn charged_bytes(&self) -> u64 {
        self.core.charged_bytes()
    }

    pub fn len(&self) -> usize {
        self.core.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl AcStore for MemoryAc {
    async fn get(&self, key: &AcKey) -> Result<Bytes> {
        match self.core.get(key) {
            Some(chunks) => Ok(chunks.whole()),
            None => Err(Error::not_found(format!("no {key}"))),
        }
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        self.core.reserve(key, value.len() as u64)?;
        self.core.insert_reserved(key.clone(), Chunks::one(value));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::cast_possible_truncation)] // Test data arithmetic.

    use super::*;
    use crate::store::{put_all, read_all};
    use kiln_proto::DigestFunction;

    fn key(data: &[u8]) -> CasKey {
        CasKey::shared(DigestFunction::Sha256.compute(data))
    }

    #[tokio::test]
    async fn put_read_find_missing() {
        let store = MemoryCas::new(1 << 20, 1 << 10);
        let a = key(b"a");
        assert!(store.read(&a, ByteRange::ALL).await.unwrap_err().is_not_found());
        put_all(&store, &a, Bytes::from_static(b"a")).await.unwrap();
        assert_eq!(read_all(&store, &a, 10).await.unwrap(), Bytes::from_static(b"a"));
        let b = key(b"b");
        assert_eq!(store.find_missing(&[a.clone(), b.clone()]).await.unwrap(), vec![b]);
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn ranged_reads_across_written_chunks() {
        let store = MemoryCas::new(64 << 20, 16 << 20);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let k = key(&data);
        let mut w = store.write(&k).await.unwrap();
        for part in data.chunks(16 << 10) {
            w.write(Bytes::copy_from_slice(part)).await.unwrap();
        }
        w.commit().await.unwrap();
        for (offset, limit) in [(0u64, None), (1, Some(5u64)), (16_000, Some(2_000_000)), (2_999_999, None)] {
            let mut r = store.read(&k, ByteRange { offset, limit }).await.unwrap();
            let mut got = Vec::new();
            while let Some(chunk) = r.next().await.unwrap() {
                assert!(chunk.len() as u64 <= STORE_CHUNK_BYTES);
                got.extend_from_slice(&chunk);
            }
            let end = limit.map_or(data.len(), |l| (offset + l).min(data.len() as u64) as usize);
            assert_eq!(got, &data[offset as usize..end], "{offset} {limit:?}");
            assert_eq!(r.len(), got.len() as u64);
        }
    }

    #[tokio::test]
    async fn writes_in_progress_count_and_abandoned_ones_give_back() {
        let store = MemoryCas::new(3 * (1000 + ENTRY_OVERHEAD_BYTES), 1000);
        let blobs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000]).collect();
        for blob in &blobs[..3] {
            put_all(&store, &key(blob), Bytes::from(blob.clone())).await.unwrap();
        }
        // Touch the first so the second is the least recently used.
        assert!(store.find_missing(&[key(&blobs[0])]).await.unwrap().is_empty());
        let mut w = store.write(&key(&blobs[3])).await.unwrap();
        w.write(Bytes::from(blobs[3][..600].to_vec())).await.unwrap();
        assert!(
            store.find_missing(&[key(&blobs[1])]).await.unwrap().len() == 1,
            "evicted for the upload in progress"
        );
        drop(w);
        assert!(
            store.charged_bytes() <= 2 * (1000 + ENTRY_OVERHEAD_BYTES),
            "the abandoned upload gave its bytes back"
        );
        let missing = store.find_missing(&blobs.iter().map(|b| key(b)).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(missing, vec![key(&blobs[1]), key(&blobs[3])]);
    }

    #[tokio::test]
    async fn oversized_blobs_are_resource_exhausted() {
        let store = MemoryCas::new(1 << 20, 1 << 10);
        let data = vec![0u8; 2 << 20];
        let err = store.write(&key(&data)).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn incomplete_or_overlong_writes_are_refused() {
        let store = MemoryCas::new(1 << 20, 1 << 10);
        let k = key(b"hello");
        let mut w = store.write(&k).await.unwrap();
        w.write(Bytes::from_static(b"hel")).await.unwrap();
        assert!(w.write(Bytes::from_static(b"lo!")).await.is_err());
        assert!(w.commit().await.unwrap_err().message().contains("finished after 3 bytes"));
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn corrupt_reports_drop_the_blob() {
        let store = MemoryCas::new(1 << 20, 1 << 10);
        let k = key(b"x");
        put_all(&store, &k, Bytes::from_static(b"x")).await.unwrap();
        let mut r = store.read(&k, ByteRange::ALL).await.unwrap();
        r.report_corrupt("test");
        assert_eq!(store.find_missing(std::slice::from_ref(&k)).await.unwrap(), vec![k]);
    }

    #[tokio::test]
    async fn action_cache_values() {
        let ac = MemoryAc::new(1 << 20, 1 << 10);
        let k = AcKey::new("main", DigestFunction::Sha256.compute(b"action"));
        assert!(ac.get(&k).await.unwrap_err().is_not_found());
        ac.put(&k, Bytes::from_static(b"result")).await.unwrap();
        assert_eq!(ac.get(&k).await.unwrap(), Bytes::from_static(b"result"));
        assert!(ac.get(&AcKey::new("other", k.action)).await.unwrap_err().is_not_found());
    }
}
