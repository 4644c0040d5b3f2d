//! The storage layer: one small trait and decorators over it.
//!
//! Every feature is a decorator in its own file that wraps another
//! [`BlobStore`]: the empty blob, upload verification, AC completeness. A
//! backend (today [`memory::MemoryStore`]) sits at the bottom. The composition
//! root in the `kiln` binary builds the tree.
//!
//! Locking contract: every method may run concurrently with every other;
//! backends synchronise internally.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use kiln_proto::{Digest, Result};

pub use crate::blob::Blob;

pub mod completeness_checking;
pub mod empty_blob;
pub mod memory;
pub mod verifying;

pub use completeness_checking::CompletenessChecking;
pub use empty_blob::EmptyBlob;
pub use memory::MemoryStore;
pub use verifying::Verifying;

/// The namespace a key lives in. The CAS uses the base tenant of the
/// instance name ([`Scope::cas_of`]); the AC uses the whole instance name, so
/// action results never cross tenants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(Arc<str>);

impl Scope {
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    pub fn shared() -> Self {
        Self::new("")
    }

    /// The CAS scope of an instance name: its base tenant, so the CAS is
    /// shared by `main`, `main.dev` and `main.dev.alice`.
    pub fn cas_of(instance_name: &str) -> Self {
        Self::new(kiln_proto::tenant::base(instance_name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a stored blob is looked up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub scope: Scope,
    pub digest: Digest,
}

impl Key {
    pub fn new(scope: Scope, digest: Digest) -> Self {
        Self { scope, digest }
    }

    /// A key in the shared scope (tests and tools).
    pub fn cas(digest: Digest) -> Self {
        Self { scope: Scope::shared(), digest }
    }

    /// A CAS key for a request on `instance_name`.
    pub fn cas_in(instance_name: &str, digest: Digest) -> Self {
        Self { scope: Scope::cas_of(instance_name), digest }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.scope.as_str().is_empty() {
            write!(f, "{}", self.digest)
        } else {
            write!(f, "{}/{}", self.scope.as_str(), self.digest)
        }
    }
}

/// A store of immutable blobs, used for the CAS and the AC alike.
///
/// In the CAS a blob's key is its own digest; in the AC the key is the
/// action's digest and the blob a serialized `ActionResult`.
pub trait BlobStore: Send + Sync + 'static {
    /// Returns the whole blob, or a `NotFound` error.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Bytes>> + Send;

    /// Stores a blob under `key`, replacing any blob already there.
    fn put(&self, key: &Key, blob: Blob) -> impl Future<Output = Result<()>> + Send;

    /// Returns the keys that are absent, in the order given. Keys that are
    /// present have their lifetime extended as if they had been read.
    fn find_missing(&self, keys: &[Key]) -> impl Future<Output = Result<Vec<Key>>> + Send;
}

impl<S: BlobStore> BlobStore for Arc<S> {
    fn get(&self, key: &Key) -> impl Future<Output = Result<Bytes>> + Send {
        (**self).get(key)
    }

    fn put(&self, key: &Key, blob: Blob) -> impl Future<Output = Result<()>> + Send {
        (**self).put(key, blob)
    }

    fn find_missing(&self, keys: &[Key]) -> impl Future<Output = Result<Vec<Key>>> + Send {
        (**self).find_missing(keys)
    }
}
