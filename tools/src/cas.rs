//! A verifying client for any REAPI CAS: the one behind `kiln cas
//! put|get|missing` and the worker's gRPC `CasClient`.
//!
//! Reads are checked against their digest as they stream in: a blob that
//! comes back longer than its size, or whose bytes hash to another digest,
//! is DATA_LOSS naming the digest, and what was read is never handed on as
//! the blob (a file read is removed, a download appears only once
//! verified). An upload must be committed whole. Blobs move as ByteStream
//! resources (`{instance}/blobs/...` to read, `{instance}/uploads/{uuid}/blobs/...`
//! to write), uncompressed; errors keep their gRPC codes (a missing blob is
//! NOT_FOUND).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::google::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::limits::FIND_MISSING_BATCH;
use kiln_proto::reapi::FindMissingBlobsRequest;
use kiln_proto::resource::{Compressor, ReadResource, WriteResource};
use kiln_proto::{Code, Digest, DigestFunction, Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Connection, MESSAGE_SIZE_BYTES_MAX};

/// Size of each chunk sent in a ByteStream upload.
const CHUNK_SIZE_BYTES: usize = 1 << 20;

/// Blobs at least this large get a progress bar.
const PROGRESS_SIZE_BYTES_MIN: u64 = 16 << 20;

/// A CAS client bound to one instance name and digest function.
#[derive(Debug, Clone)]
pub struct Cas {
    connection: Connection,
    instance: String,
    function: DigestFunction,
}

/// A gRPC status as an [`Error`] with the same code.
fn from_status(what: &str, s: &tonic::Status) -> Error {
    Error::new(Code::from(s.code()), format!("{what}: {}", s.message()))
}

/// An upload's answer must commit the whole blob.
fn check_committed(digest: &Digest, committed: i64) -> Result<()> {
    if committed == digest.size_bytes_i64() {
        return Ok(());
    }
    Err(Error::internal(format!(
        "the CAS committed {committed} bytes of {digest} ({} sent)",
        digest.size_bytes()
    )))
}

fn io(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

/// Where a read's bytes go as they arrive.
enum Sink<'a> {
    Memory(&'a mut BytesMut),
    File { file: tokio::fs::File, path: &'a Path, bar: &'a ProgressBar, written: u64 },
}

impl Sink<'_> {
    async fn put(&mut self, data: &[u8]) -> Result<()> {
        match self {
            Sink::Memory(buffer) => buffer.extend_from_slice(data),
            Sink::File { file, path, bar, written } => {
                file.write_all(data).await.map_err(|e| io("write", path, &e))?;
                *written += data.len() as u64;
                bar.set_position(*written);
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        match self {
            Sink::Memory(_) => Ok(()),
            Sink::File { file, path, .. } => file.flush().await.map_err(|e| io("write", path, &e)),
        }
    }
}

impl Cas {
    pub fn new(connection: Connection, instance: &str, function: DigestFunction) -> Self {
        Self { connection, instance: instance.to_owned(), function }
    }

    /// A fresh upload's ByteStream resource name for `digest`.
    fn write_name(&self, digest: &Digest) -> String {
        WriteResource {
            instance_name: self.instance.clone(),
            upload_id: uuid::Uuid::new_v4().to_string(),
            compressor: Compressor::Identity,
            digest: *digest,
        }
        .to_string()
    }

    /// The digests among `digests` that the CAS does not hold, in the order
    /// given (in calls of at most [`FIND_MISSING_BATCH`] digests).
    pub async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let function = digests.first().map_or(self.function, Digest::function);
        if digests.iter().any(|d| d.function() != function) {
            return Err(Error::invalid_argument(
                "all digests of one query must use the same digest function",
            ));
        }
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_BATCH) {
            let request = FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                digest_function: function.to_proto() as i32,
            };
            let response = self
                .connection
                .cas()
                .find_missing_blobs(request)
                .await
                .map_err(|s| from_status("FindMissingBlobs", &s))?;
            for d in &response.get_ref().missing_blob_digests {
                let digest = Digest::from_proto(Some(function), d)
                    .map_err(|e| e.context("FindMissingBlobs answered an invalid digest"))?;
                missing.push(digest);
            }
        }
        Ok(missing)
    }

    /// Streams blob `digest` into `sink`, verifying it on the way: DATA_LOSS
    /// if it comes back longer than its size or as other bytes.
    async fn read_into(&self, digest: &Digest, sink: &mut Sink<'_>) -> Result<()> {
        let resource = ReadResource {
            instance_name: self.instance.clone(),
            compressor: Compressor::Identity,
            digest: *digest,
        };
        let request = ReadRequest { resource_name: resource.to_string(), read_offset: 0, read_limit: 0 };
        let what = || format!("read blob {digest}");
        let mut stream = self
            .connection
            .bytestream()
            .read(request)
            .await
            .map_err(|s| from_status(&what(), &s))?
            .into_inner();
        let mut hasher = digest.function().hasher();
        let mut got = 0u64;
        while let Some(message) = stream.next().await {
            let message = message.map_err(|s| from_status(&what(), &s))?;
            got += message.data.len() as u64;
            if got > digest.size_bytes() {
                return Err(Error::new(
                    Code::DataLoss,
                    format!("blob {digest} came back longer than its size"),
                ));
            }
            hasher.update(&message.data);
            sink.put(&message.data).await?;
        }
        let actual = hasher.into_digest(got)?;
        if actual != *digest {
            return Err(Error::new(Code::DataLoss, format!("blob {digest} came back as {actual}")));
        }
        sink.finish().await
    }

    /// The whole blob, verified; RESOURCE_EXHAUSTED past the largest
    /// message the tools take.
    pub async fn read_bytes(&self, digest: &Digest) -> Result<Bytes> {
        if digest.size_bytes() > MESSAGE_SIZE_BYTES_MAX as u64 {
            return Err(Error::resource_exhausted(format!("blob {digest} is too large to read into memory")));
        }
        let mut buffer = BytesMut::with_capacity(usize::try_from(digest.size_bytes()).unwrap_or(0));
        self.read_into(digest, &mut Sink::Memory(&mut buffer)).await?;
        Ok(buffer.freeze())
    }

    /// Writes blob `digest` to a new file at `path`, verified; on any
    /// failure the file is removed again.
    pub async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        self.read_to_file_with(digest, path, &ProgressBar::hidden()).await
    }

    async fn read_to_file_with(&self, digest: &Digest, path: &Path, bar: &ProgressBar) -> Result<()> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| io("create", path, &e))?;
        let mut sink = Sink::File { file, path, bar, written: 0 };
        let result = self.read_into(digest, &mut sink).await;
        drop(sink);
        if result.is_err() {
            let _ = tokio::fs::remove_file(path).await;
        }
        result
    }

    /// Uploads the file at `path`, whose digest is `digest`.
    pub async fn upload_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        self.upload_file_with(digest, path, &ProgressBar::hidden()).await
    }

    async fn upload_file_with(&self, digest: &Digest, path: &Path, bar: &ProgressBar) -> Result<()> {
        let mut file = tokio::fs::File::open(path).await.map_err(|e| io("open", path, &e))?;
        let name = self.write_name(digest);
        let size = digest.size_bytes();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Whether the file turned out shorter or longer than `digest` says;
        // a stream the server ended early (it answered) is not that.
        let reader = async move {
            let mut offset = 0u64;
            loop {
                let data = read_chunk(&mut file, path).await?;
                let n = data.len() as u64;
                let finish = offset + n >= size;
                let message = WriteRequest {
                    resource_name: if offset == 0 { name.clone() } else { String::new() },
                    write_offset: i64::try_from(offset).unwrap_or(i64::MAX),
                    finish_write: finish,
                    data,
                };
                offset += n;
                bar.set_position(offset);
                if tx.send(message).await.is_err() {
                    return Ok::<bool, Error>(false);
                }
                if finish || n == 0 {
                    return Ok(offset != size);
                }
            }
        };
        let mut client = self.connection.bytestream();
        let upload = client.write(ReceiverStream::new(rx));
        let (changed, response) = tokio::join!(reader, upload);
        // The server's answer first: it may answer before the last byte
        // when it holds the blob already (another upload finished it), and
        // then the rest of the file is rightly never sent; or refuse the
        // blob (too large for the store) before it has all of it.
        match response {
            Ok(r) => check_committed(digest, r.get_ref().committed_size),
            Err(status) => {
                if changed? {
                    return Err(Error::internal(format!("{} changed while it was uploaded", path.display())));
                }
                Err(from_status(&format!("upload {digest}"), &status))
            }
        }
    }

    /// Uploads `data`, whose digest is `digest`.
    pub async fn upload_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        let name = self.write_name(digest);
        // Chunks are made as the stream is read: the blob is not held twice.
        let len = data.len();
        let messages = (0..len.div_ceil(CHUNK_SIZE_BYTES).max(1)).map(move |i| {
            let start = i * CHUNK_SIZE_BYTES;
            let end = (start + CHUNK_SIZE_BYTES).min(len);
            WriteRequest {
                resource_name: if i == 0 { name.clone() } else { String::new() },
                write_offset: i64::try_from(start).unwrap_or(i64::MAX),
                finish_write: end == len,
                data: data[start..end].to_vec(),
            }
        });
        let response = self
            .connection
            .bytestream()
            .write(futures::stream::iter(messages))
            .await
            .map_err(|s| from_status(&format!("upload {digest}"), &s))?;
        check_committed(digest, response.get_ref().committed_size)
    }

    /// Uploads `path` unless the CAS already has it; returns its digest and
    /// whether it was uploaded.
    pub async fn put_file(&self, path: &Path) -> anyhow::Result<(Digest, bool)> {
        let digest = hash_file(self.function, path).await?;
        if self.missing(&[digest]).await?.is_empty() {
            return Ok((digest, false));
        }
        let bar = progress(digest.size_bytes(), &format!("put {}", path.display()));
        let result = self.upload_file_with(&digest, path, &bar).await;
        bar.finish_and_clear();
        result.with_context(|| format!("put {}", path.display()))?;
        Ok((digest, true))
    }

    /// Downloads `digest` into `out`, verifying it before it appears there.
    pub async fn get_to_file(&self, digest: &Digest, out: &Path) -> anyhow::Result<()> {
        let tmp = temp_path(out);
        // A leftover of an earlier, interrupted download.
        let _ = tokio::fs::remove_file(&tmp).await;
        let bar = progress(digest.size_bytes(), &format!("get {digest}"));
        let result = self.read_to_file_with(digest, &tmp, &bar).await;
        bar.finish_and_clear();
        result.with_context(|| format!("get {digest}"))?;
        tokio::fs::rename(&tmp, out).await.with_context(|| format!("rename to {}", out.display()))
    }
}

/// Up to [`CHUNK_SIZE_BYTES`] of `file`; fewer only at its end.
async fn read_chunk(file: &mut tokio::fs::File, path: &Path) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; CHUNK_SIZE_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await.map_err(|e| io("read", path, &e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}

fn temp_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".kiln-partial-{}", std::process::id()));
    out.with_file_name(name)
}

fn progress(total: u64, message: &str) -> ProgressBar {
    if total < PROGRESS_SIZE_BYTES_MIN {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

/// Hashes a file on the blocking pool.
pub async fn hash_file(function: DigestFunction, path: &Path) -> anyhow::Result<Digest> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Digest> {
        use std::io::Read;
        let mut file = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
        let mut hasher = function.hasher();
        let mut buf = vec![0u8; CHUNK_SIZE_BYTES];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).with_context(|| format!("read {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok(hasher.into_digest(size)?)
    })
    .await?
}
