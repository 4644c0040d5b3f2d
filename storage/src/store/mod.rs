//! The storage layer: small traits, backends, and decorators over them.
//!
//! Two stores with their own key types, so that a decorator written for one
//! cannot wrap the other:
//!
//! - [`CasStore`]: content-addressed blobs of any size, read as ranged
//!   streams ([`BlobReader`]: the length is known before the first byte) and
//!   written as streams ([`BlobWriter`]: chunks go into the store as they
//!   arrive, the blob becomes visible only at `commit`, and dropping an
//!   uncommitted writer gives its space back). Memory per stream stays at a
//!   chunk whatever the blob's size. A reader that finds the bytes it read
//!   wrong reports it back ([`BlobReader::report_corrupt`]) and the store
//!   that served them drops the entry.
//! - [`AcStore`]: small values (serialized `ActionResult`s) by action key.
//!
//! Every feature is a decorator in its own file: the empty blob, upload
//! verification, AC completeness. Backends sit at the bottom: the memory
//! store (tests, and a configurable backend) and the block store on a file
//! or block device. The composition root in the `kiln` binary builds the
//! trees.
//!
//! Nothing here knows gRPC or an async runtime: futures are plain `Future`s,
//! which are `Send` (see ARCHITECTURE.md, "Decisions"), so the services can
//! run them on any executor. Every method may run concurrently with every
//! other; backends synchronise internally.

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use kiln_proto::{Digest, Error, Result};

/// Who an upload comes from (its address), for its share of what a store
/// holds for uploads in progress; `None` for Kiln itself.
pub type Client = Option<std::net::IpAddr>;

pub mod block;
pub mod completeness_checking;
pub mod empty_blob;
pub mod memory;
pub mod verifying;

pub use completeness_checking::CompletenessChecking;
pub use empty_blob::EmptyBlob;
pub use memory::{MemoryAc, MemoryCas};
pub use verifying::Verifying;

use kiln_proto::access::{AcRight, AssetRight, CasRight, Permit};

/// The namespace a key lives in: the base tenant for the CAS
/// ([`Scope::cas`]), the whole instance name for the AC.
///
/// Outside this module a scope, and so a key, is made only from a
/// [`Permit`] for its tenant and a right of its kind: a service that
/// forgets to authorize cannot name a blob or a result.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(Arc<str>);

impl Scope {
    fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    #[cfg(test)]
    fn shared() -> Self {
        Self::new("")
    }

    /// The CAS scope of an instance name: its base tenant, so the CAS is
    /// shared by `main`, `main.dev` and `main.dev.alice`.
    fn cas_of(instance_name: &str) -> Self {
        Self::new(kiln_proto::tenant::base(instance_name))
    }

    /// The CAS scope `permit` may use.
    pub fn cas<R: CasRight>(permit: &Permit<R>) -> Self {
        Self::cas_of(permit.tenant())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a CAS blob is looked up by: its scope and its own digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CasKey {
    scope: Scope,
    digest: Digest,
}

impl CasKey {
    pub fn new(scope: Scope, digest: Digest) -> Self {
        Self { scope, digest }
    }

    /// The key of `digest` in the CAS `permit` may use.
    pub fn of<R: CasRight>(permit: &Permit<R>, digest: Digest) -> Self {
        Self { scope: Scope::cas(permit), digest }
    }

    /// A key in the shared scope (this module's tests).
    #[cfg(test)]
    fn shared(digest: Digest) -> Self {
        Self { scope: Scope::shared(), digest }
    }

    /// The key for a request on `instance_name` (this module's tests).
    #[cfg(test)]
    fn in_instance(instance_name: &str, digest: Digest) -> Self {
        Self { scope: Scope::cas_of(instance_name), digest }
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn size_bytes(&self) -> u64 {
        self.digest.size_bytes()
    }
}

impl std::fmt::Display for CasKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.scope.as_str().is_empty() {
            write!(f, "{}", self.digest)
        } else {
            write!(f, "{}/{}", self.scope.as_str(), self.digest)
        }
    }
}

/// What an action result is looked up by: the instance name (the tenant)
/// and the action's digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AcKey {
    instance: Scope,
    action: Digest,
}

impl AcKey {
    fn new(instance: &str, action: Digest) -> Self {
        Self { instance: Scope::new(instance), action }
    }

    /// The key of `action`'s result in the instance `permit` is for.
    pub fn of<R: AcRight>(permit: &Permit<R>, action: Digest) -> Self {
        Self::new(permit.tenant(), action)
    }

    /// The key of a Remote Asset record (`key` names its kind, URI and
    /// qualifiers) in the instance `permit` is for. Assets live in the
    /// action-cache store in a space of their own: the prefix holds a
    /// control character, which no instance name may.
    pub fn asset<R: AssetRight>(permit: &Permit<R>, key: Digest) -> Self {
        Self { instance: Scope(Arc::from(format!("\u{1}asset\u{1}{}", permit.tenant()))), action: key }
    }

    pub fn action(&self) -> Digest {
        self.action
    }

    pub fn instance(&self) -> &Scope {
        &self.instance
    }
}

impl std::fmt::Display for AcKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "action {} in {:?}", self.action, self.instance.as_str())
    }
}

/// Which bytes of a blob to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteRange {
    pub offset: u64,
    /// At most this many bytes; `None` to the end.
    pub limit: Option<u64>,
}

impl ByteRange {
    pub const ALL: ByteRange = ByteRange { offset: 0, limit: None };

    /// The bytes `offset..end` of a blob of `size` bytes; OUT_OF_RANGE when
    /// the offset lies past the end.
    pub fn resolve(self, size: u64) -> Result<(u64, u64)> {
        if self.offset > size {
            return Err(Error::out_of_range(format!(
                "read offset {} is past the end of the blob ({size} bytes)",
                self.offset
            )));
        }
        let end = match self.limit {
            Some(limit) => size.min(self.offset.saturating_add(limit)),
            None => size,
        };
        Ok((self.offset, end))
    }
}

/// A stream of a blob's bytes.
pub trait BlobReader: Send + 'static {
    /// How many bytes this reader yields in all, known before the first.
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next chunk, or `None` once `len` bytes have been yielded.
    fn next(&mut self) -> impl Future<Output = Result<Option<Bytes>>> + Send;

    /// Says that the bytes this reader yielded are wrong: the store that
    /// served them drops the blob, so that it is reported missing and
    /// uploaded again.
    fn report_corrupt(&mut self, why: &str);
}

/// A blob being written: chunks go into the store as they come, the blob
/// becomes visible at [`BlobWriter::commit`], and a writer dropped before it
/// gives its space back.
pub trait BlobWriter: Send + 'static {
    /// Bytes written so far.
    fn written(&self) -> u64;

    /// Bytes of the blob this writer holds in memory (not yet in the
    /// store) until it commits; callers keep them charged to a budget.
    fn buffered(&self) -> u64 {
        0
    }

    /// Whether an interrupted upload is worth keeping to go on from
    /// [`BlobWriter::written`] bytes: false when the store cannot keep its
    /// bytes cheaply (a large blob that came whole is held in memory); the
    /// client then starts again from 0.
    fn resumable(&self) -> bool {
        true
    }

    /// Writes the next bytes. On an error nothing of `chunk` counts as
    /// written: [`BlobWriter::written`] is unchanged, so a resumption at
    /// that offset sends the chunk again.
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = Result<()>> + Send;

    /// Makes the blob visible; fails if it is not complete (or, behind
    /// `Verifying`, not what its digest says).
    fn commit(self) -> impl Future<Output = Result<()>> + Send;
}

/// A store of content-addressed blobs.
pub trait CasStore: Send + Sync + 'static {
    type Reader: BlobReader;
    type Writer: BlobWriter;

    /// Opens a reader over `range` of the blob; NOT_FOUND if absent,
    /// OUT_OF_RANGE if the range starts past its end.
    fn read(&self, key: &CasKey, range: ByteRange) -> impl Future<Output = Result<Self::Reader>> + Send;

    /// Opens a writer for the blob `key` names (of `key.size_bytes()` bytes),
    /// on behalf of `client`: what a store holds for uploads in progress is
    /// bounded per client.
    fn write_from(&self, key: &CasKey, client: Client) -> impl Future<Output = Result<Self::Writer>> + Send;

    /// [`CasStore::write_from`] for Kiln itself (tests, tools, workers).
    fn write(&self, key: &CasKey) -> impl Future<Output = Result<Self::Writer>> + Send {
        self.write_from(key, None)
    }

    /// The keys that are absent, in the order given. Keys that are present
    /// have their lifetime extended as if they had been read.
    fn find_missing(&self, keys: &[CasKey]) -> impl Future<Output = Result<Vec<CasKey>>> + Send;
}

/// A store of action results.
pub trait AcStore: Send + Sync + 'static {
    /// The stored value, or NOT_FOUND.
    fn get(&self, key: &AcKey) -> impl Future<Output = Result<Bytes>> + Send;

    /// Stores `value` under `key`, replacing what was there.
    fn put(&self, key: &AcKey, value: Bytes) -> impl Future<Output = Result<()>> + Send;
}

/// Reads a whole blob of at most `size_bytes_max` bytes into memory (small
/// blobs: directories, trees, batch reads, inlined outputs).
pub async fn read_all<S: CasStore + ?Sized>(store: &S, key: &CasKey, size_bytes_max: u64) -> Result<Bytes> {
    if key.size_bytes() > size_bytes_max {
        return Err(Error::resource_exhausted(format!(
            "blob {key} is {} bytes; at most {size_bytes_max} are read whole here",
            key.size_bytes()
        )));
    }
    let mut reader = store.read(key, ByteRange::ALL).await?;
    let len = reader.len();
    let first = match reader.next().await? {
        None => return Ok(Bytes::new()),
        Some(chunk) if chunk.len() as u64 == len => return Ok(chunk),
        Some(chunk) => chunk,
    };
    // Several chunks: gather them (`len` is at most `size_bytes_max`).
    let mut all = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    all.extend_from_slice(&first);
    while let Some(chunk) = reader.next().await? {
        all.extend_from_slice(&chunk);
    }
    Ok(all.freeze())
}

/// Writes and commits a whole blob held in memory.
pub async fn put_all<S: CasStore + ?Sized>(store: &S, key: &CasKey, data: Bytes) -> Result<()> {
    let mut writer = store.write(key).await?;
    if !data.is_empty() {
        writer.write(data).await?;
    }
    writer.commit().await
}

impl<S: CasStore> CasStore for Arc<S> {
    type Reader = S::Reader;
    type Writer = S::Writer;

    fn read(&self, key: &CasKey, range: ByteRange) -> impl Future<Output = Result<Self::Reader>> + Send {
        (**self).read(key, range)
    }

    fn write_from(&self, key: &CasKey, client: Client) -> impl Future<Output = Result<Self::Writer>> + Send {
        (**self).write_from(key, client)
    }

    fn find_missing(&self, keys: &[CasKey]) -> impl Future<Output = Result<Vec<CasKey>>> + Send {
        (**self).find_missing(keys)
    }
}

impl<S: AcStore> AcStore for Arc<S> {
    fn get(&self, key: &AcKey) -> impl Future<Output = Result<Bytes>> + Send {
        (**self).get(key)
    }

    fn put(&self, key: &AcKey, value: Bytes) -> impl Future<Output = Result<()>> + Send {
        (**self).put(key, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_within_the_blob() {
        assert_eq!(ByteRange::ALL.resolve(10).unwrap(), (0, 10));
        assert_eq!(ByteRange { offset: 4, limit: Some(3) }.resolve(10).unwrap(), (4, 7));
        assert_eq!(ByteRange { offset: 8, limit: Some(30) }.resolve(10).unwrap(), (8, 10));
        assert_eq!(ByteRange { offset: 10, limit: None }.resolve(10).unwrap(), (10, 10));
        let err = ByteRange { offset: 11, limit: None }.resolve(10).unwrap_err();
        assert_eq!(err.code(), kiln_proto::Code::OutOfRange);
    }
}
