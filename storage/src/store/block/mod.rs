//! The block store: a CAS and an action cache on one preallocated file or
//! raw block device each, used as a ring of blocks, with a compact
//! persistent index, storage threads with io_uring, crash safety, and
//! every read verified.
//!
//! - [`device`]: the device seam; [`faulty`]: a device that fails on purpose.
//! - [`format`]: records, index slots, headers, byte by byte.
//! - [`ring`]: logical positions, the tail that moves a block at a time,
//!   and the pins that keep a block from reuse while I/O holds it.
//! - [`index`]: the table (two buckets of 8 slots per key), by partitions.
//! - [`worker`]: the storage threads (copies forward and the scrub in its
//!   submodules); [`io`]: their I/O (io_uring or pread/pwrite); [`syncer`]:
//!   the sync protocol; [`open`]: what opening finds and may do;
//!   [`rebuild`]: a lost index rebuilt from the ring; [`engine`]: opening
//!   and closing; [`staging`]: where uploads wait until they are complete.
//!
//! docs/storage-format.md describes the format, the sync protocol and the
//! recovery rules for operators.

use kiln_proto::limits::{
    BLOCK_SMALL_BLOB_BYTES as SMALL_BLOB_BYTES, BLOCK_STAGED_COPY_ATTEMPTS as STAGED_COPY_ATTEMPTS,
};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kiln_proto::limits::STORE_CHUNK_BYTES;
use kiln_proto::{Code, Error, Result};

use super::{AcKey, AcStore, BlobReader, BlobWriter, ByteRange, CasKey, CasStore, Client};

pub mod device;
pub mod engine;
pub mod faulty;
pub mod format;
pub mod index;
pub mod indexfile;
pub mod io;
pub mod open;
pub mod rebuild;
pub mod ring;
pub mod staging;
pub mod syncer;
pub mod worker;

pub use engine::{BlockConfig, Devices, Engine};
pub use format::Kind;
pub use io::IoMode;

use format::{
    CRC_CHUNK_BYTES, Fingerprint, RECORD_HEADER_BYTES, SLOT_SIZE_BYTES_MAX, chunk_crc_append, crc_offset,
    record_len,
};
use staging::{StagedFile, Staging};
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

    /// The largest blob this store can hold: a quarter of the ring, and
    /// what one client may stage.
    pub fn blob_size_bytes_max(&self) -> u64 {
        (self.engine.ring.capacity() / 4)
            .min(SLOT_SIZE_BYTES_MAX)
            .min(self.staging().client_bytes_max())
            .saturating_sub(2 * CRC_CHUNK_BYTES)
    }

    fn staging(&self) -> Arc<Staging> {
        // A CAS engine always has one (`Engine::open_on`).
        self.engine.staging.clone().expect("a CAS engine has a staging area")
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
        self.engine.forget(&self.fp, self.loc.logical);
    }
}

/// Writes a blob into the block store: small blobs in one request at
/// commit; larger ones staged (see [`staging`]), unless they came whole in
/// one chunk, and copied into space of exactly their size at commit, each
/// chunk checksummed as it passes.
#[derive(Debug)]
pub struct BlockWriter {
    engine: Arc<Engine>,
    fp: Fingerprint,
    size: u64,
    written: u64,
    /// Small blobs, and larger ones that came whole, wait here until commit.
    buffered: Vec<Bytes>,
    /// Larger ones wait in the staging area.
    staged: Option<StagedFile>,
    /// Checksum of the chunk being filled.
    crc: u32,
    crcs: Vec<u32>,
}

impl BlockWriter {
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

    /// Copies the blob into new space of the ring and commits it. Should
    /// the ring pass that space while it is filled (a ring small for its
    /// load), the copy starts over in new space, a bounded number of times:
    /// the bytes are still in `from`.
    async fn store(&self, from: &Source<'_>) -> Result<()> {
        let mut attempts = 1;
        loop {
            let (fp, size) = (self.fp, self.size);
            let logical = self.engine.call(&fp, |reply| Request::Reserve { size, reply }).await?;
            match self.fill(from, logical).await {
                Err(e) if attempts < STAGED_COPY_ATTEMPTS && logical < self.engine.ring.tail() => {
                    tracing::debug!(fp = ?fp, attempts, error = %e, "the ring passed a staged copy; copying again");
                    attempts += 1;
                }
                done => return done,
            }
        }
    }

    async fn fill(&self, from: &Source<'_>, logical: u64) -> Result<()> {
        let fp = self.fp;
        let piece = STORE_CHUNK_BYTES;
        let mut at = 0;
        while at < self.size {
            let n = (self.size - at).min(piece);
            let data = match from {
                Source::Memory(all) => all.slice(usize_of(at)..usize_of(at + n)),
                Source::Staged(staged) => staged.read(at, usize_of(n)).await?,
            };
            let offset = RECORD_HEADER_BYTES + at;
            self.engine.call(&fp, |reply| Request::Write { logical, offset, data, reply }).await?;
            at += n;
        }
        let crcs_per_piece = usize::try_from(piece / 4).unwrap_or(1);
        for (i, crcs) in self.crcs.chunks(crcs_per_piece).enumerate() {
            let data = Bytes::from(crcs.iter().copied().flat_map(u32::to_le_bytes).collect::<Vec<u8>>());
            let offset = crc_offset(self.size, (i * crcs_per_piece) as u64);
            self.engine.call(&fp, |reply| Request::Write { logical, offset, data, reply }).await?;
        }
        let loc = Location { logical, size: self.size };
        self.engine.call(&fp, |reply| Request::Commit { fp, loc, reply }).await
    }
}

impl BlobWriter for BlockWriter {
    fn written(&self) -> u64 {
        self.written
    }

    fn buffered(&self) -> u64 {
        self.written - self.staged.as_ref().map_or(0, StagedFile::len)
    }

    /// A large blob that came whole is held in memory: an interrupted one is
    /// not kept (the client sends its one message again), so interrupted
    /// uploads cannot pile up in memory.
    fn resumable(&self) -> bool {
        self.buffered() <= SMALL_BLOB_BYTES
    }

    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        if self.written + chunk.len() as u64 > self.size {
            return Err(Error::invalid_argument(format!("upload received more than {} bytes", self.size)));
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let (at, n) = (self.written, chunk.len() as u64);
        let whole = at == 0 && n == self.size;
        if let Some(staged) = self.staged.as_mut().filter(|_| !whole) {
            // Checksummed once staged, so that a failed write changes nothing.
            staged.append(chunk.clone()).await?;
            self.checksum(at, &chunk);
        } else {
            // Small blobs get their checksums when their record is made.
            if self.staged.is_some() {
                self.checksum(at, &chunk);
            }
            self.buffered.push(chunk);
        }
        self.written += n;
        Ok(())
    }

    async fn commit(mut self) -> Result<()> {
        if self.written != self.size {
            return Err(Error::invalid_argument(format!(
                "upload finished after {} bytes; the digest says {}",
                self.written, self.size
            )));
        }
        if let Some(staged) = self.staged.take_if(|s| !s.is_empty()) {
            return self.store(&Source::Staged(&staged)).await;
        }
        let fp = self.fp;
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
        if self.size > SMALL_BLOB_BYTES {
            return self.store(&Source::Memory(data)).await;
        }
        self.engine.call(&fp, |reply| Request::Put { fp, data, reply }).await
    }
}

/// Where a blob's bytes are until they go into the ring.
enum Source<'a> {
    Memory(Bytes),
    Staged(&'a StagedFile),
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl CasStore for BlockCas {
    type Reader = BlockReader;
    type Writer = BlockWriter;

    async fn read(&self, key: &CasKey, range: ByteRange) -> Result<BlockReader> {
        let fp = self.engine.fingerprints.cas(key);
        let not_found = || Error::not_found(format!("blob {key} not found"));
        let (loc, whole) = self
            .engine
            .call(&fp, |reply| Request::Open { fp, reply })
            .await
            .map_err(|e| if e.is_not_found() { not_found() } else { e })?;
        // A fingerprint does not cover the size: the slot's must match.
        if loc.size != key.size_bytes() {
            return Err(not_found());
        }
        let (start, end) = range.resolve(loc.size)?;
        Ok(BlockReader { engine: self.engine.clone(), fp, loc, pos: start, start, end, whole })
    }

    async fn write_from(&self, key: &CasKey, client: Client) -> Result<BlockWriter> {
        if key.size_bytes() > self.blob_size_bytes_max() {
            return Err(Error::resource_exhausted(format!(
                "blob {key} is larger than this store can hold ({} bytes: a quarter of the ring, and what one client may stage); raise [storage] cas_size_bytes or upload_staging_bytes",
                self.blob_size_bytes_max()
            )));
        }
        Ok(BlockWriter {
            engine: self.engine.clone(),
            fp: self.engine.fingerprints.cas(key),
            size: key.size_bytes(),
            written: 0,
            buffered: Vec::new(),
            staged: (key.size_bytes() > SMALL_BLOB_BYTES).then(|| StagedFile::new(self.staging(), client)),
            crc: 0,
            crcs: Vec::new(),
        })
    }

    async fn find_missing(&self, keys: &[CasKey]) -> Result<Vec<CasKey>> {
        let fps = self.engine.fingerprints.cas_many(keys);
        let sizes = self.engine.lookup(&fps).await?;
        Ok(keys
            .iter()
            .zip(sizes)
            .filter(|(k, size)| *size != Some(k.size_bytes()))
            .map(|(k, _)| k.clone())
            .collect())
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
