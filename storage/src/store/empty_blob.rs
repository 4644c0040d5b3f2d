//! The empty blob exists in every CAS, for every digest function.
//!
//! Clients never upload it (Bazel skips empty files), yet they reference it
//! in action results and directories. This decorator answers for it without
//! touching the backend.

use bytes::Bytes;
use kiln_proto::{Error, Result};

use super::{BlobReader, BlobWriter, ByteRange, CasKey, CasStore, Client};

#[derive(Debug, Clone)]
pub struct EmptyBlob<S> {
    inner: S,
}

impl<S> EmptyBlob<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// The empty blob's reader or writer, or the backend's.
#[derive(Debug)]
pub enum MaybeEmpty<T> {
    Empty,
    Inner(T),
}

impl<R: BlobReader> BlobReader for MaybeEmpty<R> {
    fn len(&self) -> u64 {
        match self {
            MaybeEmpty::Empty => 0,
            MaybeEmpty::Inner(r) => r.len(),
        }
    }

    async fn next(&mut self) -> Result<Option<Bytes>> {
        match self {
            MaybeEmpty::Empty => Ok(None),
            MaybeEmpty::Inner(r) => r.next().await,
        }
    }

    fn report_corrupt(&mut self, why: &str) {
        if let MaybeEmpty::Inner(r) = self {
            r.report_corrupt(why);
        }
    }
}

impl<W: BlobWriter> BlobWriter for MaybeEmpty<W> {
    fn written(&self) -> u64 {
        match self {
            MaybeEmpty::Empty => 0,
            MaybeEmpty::Inner(w) => w.written(),
        }
    }

    fn buffered(&self) -> u64 {
        match self {
            MaybeEmpty::Empty => 0,
            MaybeEmpty::Inner(w) => w.buffered(),
        }
    }

    fn resumable(&self) -> bool {
        match self {
            MaybeEmpty::Empty => true,
            MaybeEmpty::Inner(w) => w.resumable(),
        }
    }

    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        match self {
            MaybeEmpty::Empty if chunk.is_empty() => Ok(()),
            MaybeEmpty::Empty => Err(Error::invalid_argument("upload of the empty blob received data")),
            MaybeEmpty::Inner(w) => w.write(chunk).await,
        }
    }

    async fn commit(self) -> Result<()> {
        match self {
            MaybeEmpty::Empty => Ok(()),
            MaybeEmpty::Inner(w) => w.commit().await,
        }
    }
}

impl<S: CasStore> CasStore for EmptyBlob<S> {
    type Reader = MaybeEmpty<S::Reader>;
    type Writer = MaybeEmpty<S::Writer>;

    async fn read(&self, key: &CasKey, range: ByteRange) -> Result<Self::Reader> {
        if key.digest.is_empty_blob() {
            range.resolve(0)?;
            return Ok(MaybeEmpty::Empty);
        }
        self.inner.read(key, range).await.map(MaybeEmpty::Inner)
    }

    async fn write_from(&self, key: &CasKey, client: Client) -> Result<Self::Writer> {
        if key.digest.is_empty_blob() {
            return Ok(MaybeEmpty::Empty);
        }
        self.inner.write_from(key, client).await.map(MaybeEmpty::Inner)
    }

    async fn find_missing(&self, keys: &[CasKey]) -> Result<Vec<CasKey>> {
        if !keys.iter().any(|k| k.digest.is_empty_blob()) {
            return self.inner.find_missing(keys).await;
        }
        let rest: Vec<CasKey> = keys.iter().filter(|k| !k.digest.is_empty_blob()).cloned().collect();
        self.inner.find_missing(&rest).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryCas, put_all, read_all};
    use kiln_proto::DigestFunction;

    #[tokio::test]
    async fn empty_blob_always_exists() {
        let store = EmptyBlob::new(MemoryCas::new(1 << 20, 1 << 10));
        for f in DigestFunction::ALL {
            let k = CasKey::shared(f.empty());
            assert_eq!(read_all(&store, &k, 0).await.unwrap(), Bytes::new());
            assert!(store.find_missing(std::slice::from_ref(&k)).await.unwrap().is_empty());
            put_all(&store, &k, Bytes::new()).await.unwrap();
            let mut w = store.write(&k).await.unwrap();
            assert!(w.write(Bytes::from_static(b"x")).await.is_err());
        }
        let other = CasKey::shared(DigestFunction::Sha256.compute(b"x"));
        assert_eq!(store.find_missing(std::slice::from_ref(&other)).await.unwrap(), vec![other]);
    }
}
