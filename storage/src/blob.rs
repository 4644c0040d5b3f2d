//! Blob data on its way into a store, and a builder that hashes uploads as
//! their chunks arrive.
//!
//! A [`Blob`] made from plain bytes carries no hash; the CAS's
//! [`Verifying`](crate::store::Verifying) decorator hashes it. A blob made by
//! [`BlobBuilder`] carries the digest of exactly its bytes, computed chunk by
//! chunk while the upload was still arriving; `Verifying` compares that
//! digest instead of hashing again. Only `BlobBuilder` can attach a digest.
//!
//! Hashing happens on the task that receives the upload. Handing chunks to a
//! separate hashing thread was measured slower on two cores (the client, the
//! receiver and the hasher contend; see docs/BENCHMARKS.md), and it is the
//! per-core design the thread-per-core server will want anyway.

use bytes::{Bytes, BytesMut};
use kiln_proto::{Digest, DigestFunction, Hasher, Result};

/// Data for [`BlobStore::put`](crate::store::BlobStore::put).
#[derive(Debug, Clone)]
pub struct Blob {
    data: Bytes,
    hashed_as: Option<Digest>,
}

impl Blob {
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// The digest of exactly these bytes, if a [`BlobBuilder`] computed it.
    pub fn hashed_as(&self) -> Option<&Digest> {
        self.hashed_as.as_ref()
    }
}

impl From<Bytes> for Blob {
    fn from(data: Bytes) -> Self {
        Self { data, hashed_as: None }
    }
}

impl From<&'static [u8]> for Blob {
    fn from(data: &'static [u8]) -> Self {
        Bytes::from_static(data).into()
    }
}

/// Collects an upload's chunks and hashes them as they come.
#[derive(Debug)]
pub struct BlobBuilder {
    function: DigestFunction,
    chunks: Vec<Bytes>,
    len: u64,
    hasher: Hasher,
}

impl BlobBuilder {
    /// A builder for an upload of `function` digests.
    pub fn new(function: DigestFunction) -> Self {
        Self { function, chunks: Vec::new(), len: 0, hasher: function.hasher() }
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds the next chunk.
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.hasher.update(&chunk);
        self.len += chunk.len() as u64;
        self.chunks.push(chunk);
    }

    /// The bytes so far, in one buffer (to keep an interrupted upload).
    pub fn into_bytes(self) -> Bytes {
        concat(self.chunks, self.len)
    }

    /// The finished blob, carrying the digest of its bytes.
    pub fn finish(self) -> Result<Blob> {
        let digest = Digest::new(self.function, self.hasher.finalize(), self.len)?;
        Ok(Blob { data: concat(self.chunks, self.len), hashed_as: Some(digest) })
    }
}

fn concat(mut chunks: Vec<Bytes>, len: u64) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    // The chunks are in memory, so their total fits in `usize`.
    let mut buf = BytesMut::with_capacity(usize::try_from(len).unwrap_or(0));
    for chunk in chunks {
        buf.extend_from_slice(&chunk);
    }
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_hashes_what_it_stores() {
        for size in [10u64, 3 << 20] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            for f in DigestFunction::ALL {
                let mut b = BlobBuilder::new(f);
                for chunk in data.chunks(100_000) {
                    b.push(Bytes::copy_from_slice(chunk));
                }
                assert_eq!(b.len(), size);
                let blob = b.finish().unwrap();
                assert_eq!(blob.data().as_ref(), &data[..]);
                assert_eq!(blob.hashed_as(), Some(&f.compute(&data)));
            }
        }
        let plain = Blob::from(Bytes::from_static(b"x"));
        assert!(plain.hashed_as().is_none());
    }
}
