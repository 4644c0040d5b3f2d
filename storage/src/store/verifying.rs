//! Refuses CAS uploads whose bytes do not match their digest, and stored
//! copies of the wrong length.
//!
//! This is the one place where upload verification happens, so no service
//! can forget it: every CAS write path (BatchUpdateBlobs, ByteStream,
//! compressed or not) writes through this decorator, which hashes each chunk
//! as it passes and lets the blob become visible only if the whole matches
//! its digest. On reads it checks that the backend yields exactly the bytes
//! it announced; a backend that verifies its own data (the block store's
//! checksums) catches everything else, and a short or long read is reported
//! back to the backend as corruption.

use bytes::Bytes;
use kiln_proto::{Code, Digest, Error, Hasher, Result};

use super::{BlobReader, BlobWriter, ByteRange, CasKey, CasStore, Client};

#[derive(Debug, Clone)]
pub struct Verifying<S> {
    inner: S,
}

impl<S> Verifying<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

/// A writer that hashes what passes through it.
#[derive(Debug)]
pub struct VerifyingWriter<W> {
    inner: W,
    expected: Digest,
    hasher: Hasher,
    written: u64,
}

impl<W: BlobWriter> BlobWriter for VerifyingWriter<W> {
    fn written(&self) -> u64 {
        self.written
    }

    fn buffered(&self) -> u64 {
        self.inner.buffered()
    }

    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        if self.written + chunk.len() as u64 > self.expected.size_bytes() {
            return Err(Error::invalid_argument(format!(
                "upload of {} received more than {} bytes",
                self.expected,
                self.expected.size_bytes()
            )));
        }
        // Hashed and counted only once the store has the bytes: a failed
        // write leaves the hash and the offset where they were, so a
        // resumption works.
        self.inner.write(chunk.clone()).await?;
        self.hasher.update(&chunk);
        self.written += chunk.len() as u64;
        Ok(())
    }

    fn resumable(&self) -> bool {
        self.inner.resumable()
    }

    async fn commit(self) -> Result<()> {
        let refused = || {
            kiln_proto::metrics::global().upload_verification_failures.inc();
        };
        if self.written != self.expected.size_bytes() {
            refused();
            return Err(Error::invalid_argument(format!(
                "upload of {} finished after {} bytes; the digest says {}",
                self.expected,
                self.written,
                self.expected.size_bytes()
            )));
        }
        // The uncommitted inner writer is dropped on a mismatch: its space
        // goes back and nothing becomes visible.
        self.expected.check_hash(self.hasher.finalize()).inspect_err(|_| refused())?;
        self.inner.commit().await
    }
}

/// A reader that checks the backend yields exactly what it announced.
#[derive(Debug)]
pub struct VerifyingReader<R> {
    inner: R,
    key: CasKey,
    remaining: u64,
}

impl<R: BlobReader> VerifyingReader<R> {
    fn corrupt(&mut self, why: &str) -> Error {
        kiln_proto::metrics::global().data_loss.inc();
        tracing::error!(blob = %self.key, why, "backend returned wrong bytes");
        self.inner.report_corrupt(why);
        Error::new(Code::DataLoss, format!("blob {}: {why}; refusing to serve it", self.key))
    }
}

impl<R: BlobReader> BlobReader for VerifyingReader<R> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    async fn next(&mut self) -> Result<Option<Bytes>> {
        match self.inner.next().await? {
            Some(chunk) if chunk.len() as u64 > self.remaining => Err(self
                .corrupt(&format!("the stored copy has more bytes than the {} announced", self.inner.len()))),
            Some(chunk) => {
                self.remaining -= chunk.len() as u64;
                Ok(Some(chunk))
            }
            None if self.remaining > 0 => {
                Err(self.corrupt(&format!("the stored copy ended {} bytes early", self.remaining)))
            }
            None => Ok(None),
        }
    }

    fn report_corrupt(&mut self, why: &str) {
        self.inner.report_corrupt(why);
    }
}

impl<S: CasStore> CasStore for Verifying<S> {
    type Reader = VerifyingReader<S::Reader>;
    type Writer = VerifyingWriter<S::Writer>;

    async fn read(&self, key: &CasKey, range: ByteRange) -> Result<Self::Reader> {
        let inner = self.inner.read(key, range).await?;
        let (start, end) = range.resolve(key.size_bytes())?;
        let mut reader = VerifyingReader { remaining: inner.len(), inner, key: key.clone() };
        if reader.inner.len() != end - start {
            return Err(reader.corrupt(&format!(
                "the backend offers {} bytes where the digest implies {}",
                reader.inner.len(),
                end - start
            )));
        }
        Ok(reader)
    }

    async fn write_from(&self, key: &CasKey, client: Client) -> Result<Self::Writer> {
        let inner = self.inner.write_from(key, client).await?;
        Ok(VerifyingWriter {
            inner,
            expected: key.digest,
            hasher: key.digest.function().hasher(),
            written: 0,
        })
    }

    async fn find_missing(&self, keys: &[CasKey]) -> Result<Vec<CasKey>> {
        self.inner.find_missing(keys).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryCas, put_all, read_all};
    use kiln_proto::DigestFunction;

    #[tokio::test]
    async fn mismatched_upload_is_refused_and_not_stored() {
        let store = Verifying::new(MemoryCas::new(8 << 20, 1 << 20));
        for f in DigestFunction::ALL {
            let k = CasKey::shared(f.compute(b"right"));
            let err = put_all(&store, &k, Bytes::from_static(b"wrong")).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(read_all(&store, &k, 10).await.unwrap_err().is_not_found());
            put_all(&store, &k, Bytes::from_static(b"right")).await.unwrap();
            assert_eq!(read_all(&store, &k, 10).await.unwrap(), Bytes::from_static(b"right"));
        }
    }

    #[tokio::test]
    async fn large_blobs_are_verified_too() {
        let store = Verifying::new(MemoryCas::new(16 << 20, 4 << 20));
        let data = vec![7u8; 2 << 20];
        let k = CasKey::shared(DigestFunction::Sha256.compute(&data));
        let mut corrupt = data.clone();
        corrupt[1_234_567] ^= 1;
        let mut w = store.write(&k).await.unwrap();
        for part in corrupt.chunks(100_000) {
            w.write(Bytes::copy_from_slice(part)).await.unwrap();
        }
        assert!(w.commit().await.unwrap_err().message().contains("does not match"));
        assert!(store.find_missing(std::slice::from_ref(&k)).await.unwrap().len() == 1);
        put_all(&store, &k, Bytes::from(data)).await.unwrap();
    }
}
