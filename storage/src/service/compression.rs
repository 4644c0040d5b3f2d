//! zstd for ByteStream and batch transfers, streaming and bounded.
//!
//! Decompression produces output a bounded chunk at a time, so an upload
//! can charge each chunk to its memory budget before keeping it, and it
//! refuses to produce more than the digest's declared size (a small "zip
//! bomb" cannot expand) or to accept more compressed bytes than any blob of
//! that size compresses to (a stream of empty frames cannot run forever).
//! Compression for reads works chunk by chunk as the client reads, never on
//! the whole blob up front.

use bytes::Bytes;
use kiln_proto::{Error, Result};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// zstd level used when Kiln compresses for a client: fast, still effective.
const LEVEL: i32 = 1;

/// Most bytes one decompression step produces.
pub(super) const DECODE_CHUNK_BYTES: usize = 1 << 20;

/// Blobs at least this large are compressed off the event loop.
const BLOCKING_SIZE_BYTES_MIN: usize = 1 << 20;

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("invalid zstd data: {e}"))
}

/// The most compressed bytes a blob of `size_bytes` may be sent as: zstd's
/// worst case for one frame, plus room for frame headers of a few frames.
pub(super) fn compressed_size_bytes_max(size_bytes: u64) -> u64 {
    let bound = zstd::zstd_safe::compress_bound(usize::try_from(size_bytes).unwrap_or(usize::MAX));
    (bound as u64).saturating_add(1 << 16)
}

/// Streaming decompression of one upload that must expand to exactly
/// `size_bytes`.
pub(super) struct StreamDecoder {
    decoder: Decoder<'static>,
    size_bytes: u64,
    produced_bytes: u64,
    received_bytes: u64,
    /// Whether the last step ended a frame with nothing left to flush.
    frame_complete: bool,
}

impl StreamDecoder {
    pub(super) fn new(size_bytes: u64) -> Result<Self> {
        let decoder = Decoder::new().map_err(|e| Error::internal(format!("zstd decoder: {e}")))?;
        Ok(Self {
            decoder,
            size_bytes,
            produced_bytes: 0,
            received_bytes: 0,
            frame_complete: size_bytes == 0,
        })
    }

    /// Compressed bytes received so far.
    pub(super) fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// Counts `n` more compressed bytes, refusing more than any blob of the
    /// declared size needs.
    pub(super) fn receive(&mut self, n: usize) -> Result<()> {
        self.received_bytes += n as u64;
        let max = compressed_size_bytes_max(self.size_bytes);
        if self.received_bytes > max {
            return Err(Error::invalid_argument(format!(
                "received {} compressed bytes for a blob of {} bytes; zstd never needs more than {max}",
                self.received_bytes, self.size_bytes
            )));
        }
        Ok(())
    }

    /// Decompresses from `input[*pos..]`, producing at most
    /// [`DECODE_CHUNK_BYTES`]; advances `pos`. Returns the output and
    /// whether it filled the step's room (then more may follow even without
    /// more input).
    pub(super) fn step(&mut self, input: &[u8], pos: &mut usize) -> Result<(Bytes, bool)> {
        let room = usize::try_from(self.size_bytes - self.produced_bytes).unwrap_or(usize::MAX);
        // One byte more than allowed, to notice data beyond the declared size.
        let mut out = Vec::with_capacity(room.saturating_add(1).min(DECODE_CHUNK_BYTES));
        let mut inb = InBuffer { src: input, pos: *pos };
        let mut outb = OutBuffer::around(&mut out);
        // A frame that ended with all input consumed has nothing left to
        // flush: running the decoder again would start reading a new frame's
        // header and make the finished frame look incomplete.
        if *pos == input.len() && self.frame_complete {
            return Ok((Bytes::new(), false));
        }
        let full = loop {
            let hint = self.decoder.run(&mut inb, &mut outb).map_err(invalid)?;
            self.frame_complete = hint == 0;
            if self.frame_complete && inb.pos == input.len() {
                break false;
            }
            if outb.pos() == outb.capacity() {
                break true;
            }
            if inb.pos == input.len() {
                break false;
            }
        };
        *pos = inb.pos;
        self.produced_bytes += out.len() as u64;
        if self.produced_bytes > self.size_bytes {
            return Err(Error::invalid_argument(format!(
                "zstd data decompresses to more than the digest's {} bytes",
                self.size_bytes
            )));
        }
        Ok((Bytes::from(out), full))
    }

    /// Checks that the data ended with a whole frame and the exact size.
    pub(super) fn finish(&self) -> Result<()> {
        if !self.frame_complete {
            return Err(Error::invalid_argument("invalid zstd data: the last frame is incomplete"));
        }
        if self.produced_bytes != self.size_bytes {
            return Err(Error::invalid_argument(format!(
                "zstd data decompressed to {} bytes, but the digest says {}",
                self.produced_bytes, self.size_bytes
            )));
        }
        Ok(())
    }
}

/// Decompresses all of `input`, step by step, calling `sink` with each chunk.
pub(super) fn decode_all(
    decoder: &mut StreamDecoder,
    input: &[u8],
    mut sink: impl FnMut(Bytes),
) -> Result<()> {
    decoder.receive(input.len())?;
    let mut pos = 0;
    loop {
        let (chunk, full) = decoder.step(input, &mut pos)?;
        if !chunk.is_empty() {
            sink(chunk);
        }
        if pos == input.len() && !full {
            return Ok(());
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("compression task failed: {e}")))?
}

/// Decompresses one whole zstd payload (a batch entry, bounded by the batch
/// size) that must expand to exactly `size_bytes`.
pub(super) async fn decompress_exact(compressed: Bytes, size_bytes: u64) -> Result<Bytes> {
    let run = move || {
        let mut decoder = StreamDecoder::new(size_bytes)?;
        let mut out = Vec::with_capacity(usize::try_from(size_bytes.min(16 << 20)).unwrap_or(0));
        decode_all(&mut decoder, &compressed, |chunk| out.extend_from_slice(&chunk))?;
        decoder.finish()?;
        Ok(Bytes::from(out))
    };
    if size_bytes < BLOCKING_SIZE_BYTES_MIN as u64 { run() } else { blocking(run).await }
}

/// Compresses a whole (batch-sized) blob for a client that accepts zstd.
pub(super) async fn compress(data: Bytes) -> Result<Bytes> {
    let small = data.len() < BLOCKING_SIZE_BYTES_MIN;
    let run = move || {
        zstd::bulk::compress(&data, LEVEL)
            .map(Bytes::from)
            .map_err(|e| Error::internal(format!("zstd compression failed: {e}")))
    };
    if small { run() } else { blocking(run).await }
}

/// Compresses a stream chunk by chunk, into one zstd frame.
pub(super) struct StreamEncoder {
    encoder: Encoder<'static>,
}

impl StreamEncoder {
    pub(super) fn new() -> Result<Self> {
        Ok(Self { encoder: Encoder::new(LEVEL).map_err(|e| Error::internal(format!("zstd encoder: {e}")))? })
    }

    /// Compresses `data`, returning what the encoder emitted (possibly
    /// nothing yet); `last` ends the frame.
    pub(super) fn chunk(&mut self, data: &[u8], last: bool) -> Result<Vec<u8>> {
        let failed = |e: std::io::Error| Error::internal(format!("zstd compression failed: {e}"));
        let room = zstd::zstd_safe::compress_bound(data.len()).max(4096);
        let mut out: Vec<u8> = Vec::with_capacity(room);
        let mut inb = InBuffer::around(data);
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(room);
            }
            let pos = out.len();
            let mut outb = OutBuffer::around_pos(&mut out, pos);
            let remaining = if inb.pos < data.len() {
                self.encoder.run(&mut inb, &mut outb).map_err(failed)?;
                1
            } else if last {
                self.encoder.finish(&mut outb, true).map_err(failed)?
            } else {
                0
            };
            if inb.pos == data.len() && remaining == 0 {
                return Ok(out);
            }
        }
    }

    /// Compresses `data` off the event loop when it is large.
    pub(super) async fn chunk_async(mut self, data: Bytes, last: bool) -> Result<(Self, Vec<u8>)> {
        if data.len() < BLOCKING_SIZE_BYTES_MIN / 16 {
            let out = self.chunk(&data, last)?;
            return Ok((self, out));
        }
        blocking(move || {
            let out = self.chunk(&data, last)?;
            Ok((self, out))
        })
        .await
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
        assert!(err.message().contains("more than"), "{}", err.message());
        let err = decompress_exact(c.clone(), 100_001).await.unwrap_err();
        assert!(err.message().contains("decompressed to 100000"), "{}", err.message());
        let err = decompress_exact(c.slice(..c.len() - 3), 100_000).await.unwrap_err();
        assert!(
            err.message().contains("incomplete") || err.message().contains("decompressed to"),
            "{}",
            err.message()
        );
        let err = decompress_exact(Bytes::from_static(b"not zstd at all"), 5).await.unwrap_err();
        assert!(err.message().contains("invalid zstd"), "{}", err.message());
    }

    #[test]
    fn streams_of_empty_frames_are_bounded() {
        let empty_frame = zstd::bulk::compress(b"", 1).unwrap();
        let mut decoder = StreamDecoder::new(10).unwrap();
        let mut refused = false;
        for _ in 0..100_000 {
            if decode_all(&mut decoder, &empty_frame, |_| {}).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "endless empty frames must be refused");
        assert!(decoder.received_bytes() <= compressed_size_bytes_max(10) + empty_frame.len() as u64);
    }

    #[test]
    fn large_outputs_come_in_bounded_chunks() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 7) as u8).collect();
        let compressed = zstd::bulk::compress(&data, 1).unwrap();
        let mut decoder = StreamDecoder::new(data.len() as u64).unwrap();
        let mut out = Vec::new();
        let mut largest = 0;
        decode_all(&mut decoder, &compressed, |chunk| {
            largest = largest.max(chunk.len());
            out.extend_from_slice(&chunk);
        })
        .unwrap();
        decoder.finish().unwrap();
        assert_eq!(out, data);
        assert!(largest <= DECODE_CHUNK_BYTES);
    }

    #[test]
    fn chunked_compression_is_one_valid_frame() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 13) as u8).collect();
        let mut encoder = StreamEncoder::new().unwrap();
        let mut stream = Vec::new();
        let chunks: Vec<&[u8]> = data.chunks(1 << 20).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            stream.extend(encoder.chunk(chunk, i + 1 == chunks.len()).unwrap());
        }
        assert_eq!(zstd::stream::decode_all(&stream[..]).unwrap(), data);
    }

    /// Data that compresses at every ratio, from none (random) to extreme
    /// (zeros), at sizes around the decoder's step.
    fn corpus() -> Vec<(&'static str, Vec<u8>)> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let mut random = vec![0u8; 3 << 20];
        rng.fill(&mut random[..]);
        let text: Vec<u8> = b"INFO building //pkg:target\n".iter().copied().cycle().take(2 << 20).collect();
        let mut padded = random[..300_000].to_vec();
        padded.resize(5 << 20, 0);
        vec![
            ("zeros 8 MiB", vec![0u8; 8 << 20]),
            ("zeros one step", vec![0u8; DECODE_CHUNK_BYTES]),
            ("zeros one step and a byte", vec![0u8; DECODE_CHUNK_BYTES + 1]),
            ("text 2 MiB", text),
            ("random 3 MiB", random),
            ("random then zeros", padded),
            ("one byte", vec![7]),
        ]
    }

    /// Every ratio, in one message and in many, at two levels and as several
    /// frames: the decoder yields exactly the data in bounded steps, and a
    /// declared size one byte off either way is refused.
    #[test]
    fn every_ratio_decodes_in_one_message_and_in_many() {
        for (name, data) in corpus() {
            for level in [1, 19] {
                let one = zstd::bulk::compress(&data, level).unwrap();
                let half = data.len() / 2;
                let mut frames = zstd::bulk::compress(&data[..half], level).unwrap();
                frames.extend(zstd::bulk::compress(&data[half..], level).unwrap());
                for (how, stream) in [("one frame", &one), ("two frames", &frames)] {
                    for piece in [usize::MAX, 1 << 20, 4096, 7] {
                        if piece == 7 && stream.len() > 200_000 {
                            continue; // Millions of messages prove nothing more.
                        }
                        let mut decoder = StreamDecoder::new(data.len() as u64).unwrap();
                        let mut out = Vec::with_capacity(data.len());
                        let mut largest = 0;
                        for part in stream.chunks(piece.min(stream.len()).max(1)) {
                            decode_all(&mut decoder, part, |c| {
                                largest = largest.max(c.len());
                                out.extend_from_slice(&c);
                            })
                            .unwrap_or_else(|e| {
                                panic!("{name}, level {level}, {how}, pieces of {piece}: {e:?}")
                            });
                        }
                        decoder
                            .finish()
                            .unwrap_or_else(|e| panic!("{name}, level {level}, {how}, {piece}: {e:?}"));
                        assert!(out == data, "{name}, level {level}, {how}, pieces of {piece}");
                        assert!(largest <= DECODE_CHUNK_BYTES);
                    }
                }
                let mut short = StreamDecoder::new(data.len() as u64 - 1).unwrap();
                let err = decode_all(&mut short, &one, |_| {}).unwrap_err();
                assert!(err.message().contains("more than the digest"), "{name}: {}", err.message());
                let mut long = StreamDecoder::new(data.len() as u64 + 1).unwrap();
                decode_all(&mut long, &one, |_| {}).unwrap();
                assert!(long.finish().unwrap_err().message().contains("decompressed to"), "{name}");
            }
        }
    }
}
