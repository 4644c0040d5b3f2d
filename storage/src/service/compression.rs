//! zstd for ByteStream and batch transfers, with bounded output.
//!
//! Decompression writes into a buffer that refuses to grow past the declared
//! uncompressed size, so a small "zip bomb" upload cannot exhaust memory.

use std::io::Write;

use bytes::Bytes;
use kiln_proto::{Error, Result};

/// zstd level used when Kiln compresses for a client: fast, still effective.
const LEVEL: i32 = 1;

/// Blobs at least this large are compressed off the event loop.
const BLOCKING_SIZE_BYTES_MIN: usize = 1 << 20;

/// Compresses `data` for a client that accepts zstd.
pub(super) async fn compress(data: Bytes) -> Result<Bytes> {
    let small = data.len() < BLOCKING_SIZE_BYTES_MIN;
    let run = move || {
        zstd::bulk::compress(&data, LEVEL)
            .map(Bytes::from)
            .map_err(|e| Error::internal(format!("zstd compression failed: {e}")))
    };
    if small { run() } else { blocking(run).await }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("compression task failed: {e}")))?
}

/// Decompresses one whole zstd payload that must expand to exactly `size_bytes`.
pub(super) async fn decompress_exact(compressed: Bytes, size_bytes: u64) -> Result<Bytes> {
    let run = move || {
        let mut d = Decompressor::new(size_bytes);
        d.write(&compressed)?;
        d.finish()
    };
    if size_bytes < BLOCKING_SIZE_BYTES_MIN as u64 { run() } else { blocking(run).await }
}

/// Streaming decompression of one upload into a buffer bounded by the
/// declared uncompressed size.
pub(super) struct Decompressor {
    decoder: zstd::stream::write::Decoder<'static, Bounded>,
}

struct Bounded {
    buf: Vec<u8>,
    size_bytes_max: u64,
}

impl Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() as u64 + data.len() as u64 > self.size_bytes_max {
            return Err(std::io::Error::other("decompressed data is larger than the digest's size"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Decompressor {
    pub(super) fn new(size_bytes: u64) -> Self {
        let initial = usize::try_from(size_bytes.min(16 << 20)).expect("at most 16 MiB");
        let sink = Bounded { buf: Vec::with_capacity(initial), size_bytes_max: size_bytes };
        let decoder = zstd::stream::write::Decoder::new(sink).expect("zstd decoder context allocation");
        Self { decoder }
    }

    pub(super) fn write(&mut self, compressed: &[u8]) -> Result<()> {
        self.decoder
            .write_all(compressed)
            .map_err(|e| Error::invalid_argument(format!("invalid zstd data: {e}")))
    }

    /// Bytes decompressed so far.
    pub(super) fn len(&self) -> usize {
        self.decoder.get_ref().buf.len()
    }

    /// Completes decompression and checks the exact size.
    pub(super) fn finish(mut self) -> Result<Bytes> {
        self.decoder.flush().map_err(|e| Error::invalid_argument(format!("invalid zstd data: {e}")))?;
        let sink = self.decoder.into_inner();
        if (sink.buf.len() as u64) != sink.size_bytes_max {
            return Err(Error::invalid_argument(format!(
                "zstd data decompressed to {} bytes, but the digest says {}",
                sink.buf.len(),
                sink.size_bytes_max
            )));
        }
        Ok(Bytes::from(sink.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_bounds() {
        let data = Bytes::from(vec![42u8; 100_000]);
        let c = compress(data.clone()).await.unwrap();
        assert!(c.len() < 1000);
        assert_eq!(decompress_exact(c.clone(), 100_000).await.unwrap(), data);
        let err = decompress_exact(c.clone(), 99_999).await.unwrap_err();
        assert!(err.message().contains("larger than"), "{}", err.message());
        let err = decompress_exact(c, 100_001).await.unwrap_err();
        assert!(err.message().contains("decompressed to 100000"), "{}", err.message());
        let err = decompress_exact(Bytes::from_static(b"not zstd at all"), 5).await.unwrap_err();
        assert!(err.message().contains("invalid zstd"), "{}", err.message());
    }
}
