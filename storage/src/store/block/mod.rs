//! The block store: a CAS and an action cache on one preallocated file or
//! raw block device each, used as a ring of blocks, with a compact
//! persistent index, storage threads with io_uring, crash safety, and
//! every read verified.
//!
//! - [`device`]: the device seam; [`faulty`]: a device that fails on purpose.
//! - [`format`]: records, index slots, headers, byte by byte.
//! - [`ring`]: logical positions, the tail that moves a block at a time,
//!   and the pins that keep a block from reuse while I/O holds it.
//! - [`index`]: the open-addressing table, by partitions.
//! - [`worker`]: the storage threads (copies forward and the scrub in its
//!   submodules); [`io`]: their I/O (io_uring or pread/pwrite); [`syncer`]:
//!   the sync protocol; [`open`]: what opening finds and may do;
//!   [`rebuild`]: a lost index rebuilt from the ring; [`engine`]: opening
//!   and closing.
//!
//! docs/storage-format.md describes the format, the sync protocol and the
//! recovery rules for operators.

use kiln_proto::limits::{
    BLOCK_PENDING_CRCS_MAX as PENDING_CRCS_MAX, BLOCK_SMALL_BLOB_BYTES as SMALL_BLOB_BYTES,
};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kiln_proto::limits::STORE_CHUNK_BYTES;
use kiln_proto::{Code, Error, Result};

use super::{AcKey, AcStore, BlobReader, BlobWriter, ByteRange, CasKey, CasStore};

pub mod device;
pub mod engine;
pub mod faulty;
pub mod format;
pub mod index;
pub mod io;
pub mod open;
pub mod rebuild;
pub mod ring;
pub mod syncer;
pub mod worker;

pub use engine::{BlockConfig, Devices, Engine};
pub use format::Kind;
pub use io::IoMode;

use format::{
    CRC_CHUNK_BYTES, Fingerprint, RECORD_HEADER_BYTES, SLOT_SIZE_BYTES_MAX, chunk_crc_append, crc_offset,
    record_len,
};
use worker::{Location, Request};

/// The CAS on a block store.
#[derive(Debug, Clone)]
pub struct BlockCas {
    engine: Arc<Engine>,
}

impl BlockCas {
    pub fn new(engine: Arc<Engine>) -> Self {
        assert_eq!(engine.kind, Kind::Cas);
        Self { engine }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The largest blob this store can hold.
    pub fn blob_size_bytes_max(&self) -> u64 {
        (self.engine.ring.capacity() / 4).min(SLOT_SIZE_BYTES_MAX) - 2 * CRC_CHUNK_BYTES
    }
}

/// Reads a blob of the block store, a chunk at a time, each verified.
#[derive(Debug)]
pub struct BlockReader {
    engine: Arc<Engine>,
    fp: Fingerprint,
    loc: Location,
    pos: u64,
    start: u64,
    end: u64,
    /// A small blob, read whole when opened.
    whole: Option<Bytes>,
}

impl BlobReader for BlockReader {
    fn len(&self) -> u64 {
        self.end - self.start
    }

    async fn next(&mut self) -> Result<Option<Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let to = (self.pos + STORE_CHUNK_BYTES).min(self.end);
        let chunk = match &self.whole {
            Some(data) => {
                data.slice(usize::try_from(self.pos).unwrap_or(0)..usize::try_from(to).unwrap_or(0))
            }
            None => {
                let (fp, loc, from) = (self.fp, self.loc, self.pos);
                self.engine.call(&fp, |reply| Request::Read { fp, loc, from, to, reply }).await?
            }
        };
        self.pos += chunk.len() as u64;
        if chunk.is_empty() {
            return Err(Error::new(Code::DataLoss, "the stored blob ended early"));
        }
        Ok(Some(chunk))
    }

    fn report_corrupt(&mut self, why: &str) {
        tracing::error!(fp = ?self.fp, why, "dropping a blob reported corrupt");
        self.engine.tell(&self.fp, Request::Forget { fp: self.fp, logical: self.loc.logical });
    }
}

/// Writes a blob into the block store: small blobs in one request at
/// commit, larger ones into space reserved at the first chunk, each chunk
/// checksummed as it passes.
#[derive(Debug)]
pub struct BlockWriter {
    engine: Arc<Engine>,
    fp: Fingerprint,
    size: u64,
    written: u64,
    /// Space of the record, once reserved.
    logical: Option<u64>,
    /// Small blobs wait here until commit.
    buffered: Vec<Bytes>,
    /// Checksum of the chunk being filled.
    crc: u32,
    crcs: Vec<u32>,
    crcs_written: u64,
}

impl BlockWriter {
    async fn reserve(&mut self) -> Result<u64> {
        if let Some(logical) = self.logical {
            return Ok(logical);
        }
        let size = self.size;
        let logical = self.engine.call(&self.fp, |reply| Request::Reserve { size, reply }).await?;
        self.logical = Some(logical);
        Ok(logical)
    }

    async fn send(&mut self, offset: u64, data: Bytes) -> Result<()> {
        let logical = self.reserve().await?;
        self.engine.call(&self.fp, |reply| Request::Write { logical, offset, data, reply }).await
    }

    /// Checksums `data` chunk by chunk (it starts at blob offset `at`).
    fn checksum(&mut self, at: u64, data: &[u8]) {
        let mut pos = at;
        let mut rest = data;
        while !rest.is_empty() {
            let in_chunk = pos % CRC_CHUNK_BYTES;
            let n =
                usize::try_from((CRC_CHUNK_BYTES - in_chunk).min(rest.len() as u64)).unwrap_or(rest.len());
            self.crc = chunk_crc_append(if in_chunk == 0 { 0 } else { self.crc }, &rest[..n]);
            pos += n as u64;
            rest = &rest[n..];
            if pos.is_multiple_of(CRC_CHUNK_BYTES) || pos == self.size {
                self.crcs.push(self.crc);
            }
        }
    }

    async fn flush_crcs(&mut self) -> Result<()> {
        if self.crcs.is_empty() {
            return Ok(());
        }
        // Dropped only once written: a failed flush is tried again.
        let bytes: Vec<u8> = self.crcs.iter().copied().flat_map(u32::to_le_bytes).collect();
        let count = self.crcs.len() as u64;
        let offset = crc_offset(self.size, self.crcs_written);
        self.send(offset, Bytes::from(bytes)).await?;
        self.crcs.clear();
        self.crcs_written += count;
        Ok(())
    }
}

impl BlobWriter for BlockWriter {
    fn written(&self) -> u64 {
        self.written
    }

    fn buffered(&self) -> u64 {
        if self.size <= SMALL_BLOB_BYTES { self.written } else { 0 }
    }

    fn resumable(&self) -> bool {
        self.logical.is_none_or(|logical| logical >= self.engine.ring.tail())
    }

    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        if self.written + chunk.len() as u64 > self.size {
            return Err(Error::invalid_argument(format!("upload received more than {} bytes", self.size)));
        }
        if chunk.is_empty() {
            return Ok(());
        }
        if self.size <= SMALL_BLOB_BYTES {
            self.written += chunk.len() as u64;
            self.buffered.push(chunk);
            return Ok(());
        }
        if self.crcs.len() >= PENDING_CRCS_MAX {
            self.flush_crcs().await?;
        }
        let at = self.written;
        // Checksummed once stored, so that a failed write changes nothing.
        self.send(RECORD_HEADER_BYTES + at, chunk.clone()).await?;
        self.checksum(at, &chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    async fn commit(mut self) -> Result<()> {
        if self.written != self.size {
            return Err(Error::invalid_argument(format!(
                "upload finished after {} bytes; the digest says {}",
                self.written, self.size
            )));
        }
        let fp = self.fp;
        if self.size <= SMALL_BLOB_BYTES {
            let data = match self.buffered.len() {
                1 => self.buffered.pop().unwrap_or_default(),
                _ => {
                    let mut all = BytesMut::with_capacity(usize::try_from(self.size).unwrap_or(0));
                    for part in self.buffered.drain(..) {
                        all.extend_from_slice(&part);
                    }
                    all.freeze()
                }
            };
            return self.engine.call(&fp, |reply| Request::Put { fp, data, reply }).await;
        }
        self.flush_crcs().await?;
        let loc = Location { logical: self.reserve().await?, size: self.size };
        self.engine.call(&fp, |reply| Request::Commit { fp, loc, reply }).await
    }
}

impl CasStore for BlockCas {
    type Reader = BlockReader;
    type Writer = BlockWriter;

    async fn read(&self, key: &CasKey, range: ByteRange) -> Result<BlockReader> {
        let fp = Fingerprint::cas(key);
        let (loc, whole) = self.engine.call(&fp, |reply| Request::Open { fp, reply }).await.map_err(|e| {
            if e.is_not_found() { Error::not_found(format!("blob {key} not found")) } else { e }
        })?;
        let (start, end) = range.resolve(loc.size)?;
        Ok(BlockReader { engine: self.engine.clone(), fp, loc, pos: start, start, end, whole })
    }

    async fn write(&self, key: &CasKey) -> Result<BlockWriter> {
        if key.size_bytes() > self.blob_size_bytes_max() {
            return Err(Error::resource_exhausted(format!(
                "blob {key} is larger than this store can hold ({} bytes); raise [storage] cas_size_bytes",
                self.blob_size_bytes_max()
            )));
        }
        Ok(BlockWriter {
            engine: self.engine.clone(),
            fp: Fingerprint::cas(key),
            size: key.size_bytes(),
            written: 0,
            logical: None,
            buffered: Vec::new(),
            crc: 0,
            crcs: Vec::new(),
            crcs_written: 0,
        })
    }

    async fn find_missing(&self, keys: &[CasKey]) -> Result<Vec<CasKey>> {
        let fps: Vec<Fingerprint> = keys.iter().map(Fingerprint::cas).collect();
        let present = self.engine.lookup(&fps).await?;
        Ok(keys.iter().zip(present).filter(|(_, p)| !p).map(|(k, _)| k.clone()).collect())
    }
}

/// The action cache on a block store.
#[derive(Debug, Clone)]
pub struct BlockAc {
    engine: Arc<Engine>,
}

impl BlockAc {
    pub fn new(engine: Arc<Engine>) -> Self {
        assert_eq!(engine.kind, Kind::Ac);
        Self { engine }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}

impl AcStore for BlockAc {
    async fn get(&self, key: &AcKey) -> Result<Bytes> {
        let fp = Fingerprint::ac(key);
        let (loc, whole) = self
            .engine
            .call(&fp, |reply| Request::Open { fp, reply })
            .await
            .map_err(|e| if e.is_not_found() { Error::not_found(format!("no {key}")) } else { e })?;
        match whole {
            Some(data) => Ok(data),
            None => {
                let to = loc.size;
                self.engine.call(&fp, |reply| Request::Read { fp, loc, from: 0, to, reply }).await
            }
        }
    }

    async fn put(&self, key: &AcKey, value: Bytes) -> Result<()> {
        let fp = Fingerprint::ac(key);
        if record_len(value.len() as u64) > self.engine.ring.capacity() / 4 {
            return Err(Error::resource_exhausted(
                "the action result is larger than the action cache can hold",
            ));
        }
        self.engine.call(&fp, |reply| Request::Put { fp, data: value, reply }).await
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_model;
#[cfg(test)]
mod tests_open;
#[cfg(test)]
mod tests_promises;
