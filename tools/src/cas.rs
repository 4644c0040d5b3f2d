//! `kiln cas put|get|missing`: moving files in and out of any REAPI CAS.

use std::path::{Path, PathBuf};

use crate::client::Connection;
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::google::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::FindMissingBlobsRequest;
use kiln_proto::resource::{Compressor, ReadResource, WriteResource};
use kiln_proto::{Digest, DigestFunction};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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

impl Cas {
    pub fn new(connection: Connection, instance: &str, function: DigestFunction) -> Self {
        Self { connection, instance: instance.to_owned(), function }
    }

    /// The digests among `digests` that the CAS does not hold.
    pub async fn missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let function = digests.first().map_or(self.function, Digest::function);
        if digests.iter().any(|d| d.function() != function) {
            bail!("all digests of one query must use the same digest function");
        }
        let request = FindMissingBlobsRequest {
            instance_name: self.instance.clone(),
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            digest_function: function.to_proto() as i32,
        };
        let response = self.connection.cas().find_missing_blobs(request).await.context("FindMissingBlobs")?;
        response
            .into_inner()
            .missing_blob_digests
            .iter()
            .map(|d| Digest::from_proto(Some(function), d).context("server returned an invalid digest"))
            .collect()
    }

    /// Uploads `path` unless the CAS already has it; returns its digest and
    /// whether it was uploaded.
    pub async fn put_file(&self, path: &Path) -> Result<(Digest, bool)> {
        let digest = hash_file(self.function, path).await?;
        if self.missing(&[digest]).await?.is_empty() {
            return Ok((digest, false));
        }
        let resource = WriteResource {
            instance_name: self.instance.clone(),
            upload_id: uuid::Uuid::new_v4().to_string(),
            compressor: Compressor::Identity,
            digest,
        };
        let bar = progress(digest.size_bytes(), &format!("put {}", path.display()));
        let (tx, rx) = mpsc::channel(4);
        let reader = tokio::spawn(send_file(path.to_owned(), resource.to_string(), tx, bar.clone()));
        let response = self.connection.bytestream().write(ReceiverStream::new(rx)).await;
        reader.await.context("file reader task")??;
        let committed = response.with_context(|| format!("ByteStream Write of {}", path.display()))?;
        bar.finish_and_clear();
        let committed = committed.into_inner().committed_size;
        if committed != digest.size_bytes_i64() {
            bail!(
                "server committed {committed} bytes of {}, expected {}",
                path.display(),
                digest.size_bytes()
            );
        }
        Ok((digest, true))
    }

    /// Downloads `digest` into `out`, verifying it before it appears there.
    pub async fn get_to_file(&self, digest: &Digest, out: &Path) -> Result<()> {
        let resource = ReadResource {
            instance_name: self.instance.clone(),
            compressor: Compressor::Identity,
            digest: *digest,
        };
        let request = ReadRequest { resource_name: resource.to_string(), read_offset: 0, read_limit: 0 };
        let mut stream = self
            .connection
            .bytestream()
            .read(request)
            .await
            .with_context(|| format!("ByteStream Read {digest}"))?
            .into_inner();
        let tmp = temp_path(out);
        let mut file =
            tokio::fs::File::create(&tmp).await.with_context(|| format!("create {}", tmp.display()))?;
        let mut hasher = digest.function().hasher();
        let mut received = 0u64;
        let bar = progress(digest.size_bytes(), &format!("get {digest}"));
        let result: Result<()> = async {
            while let Some(chunk) =
                stream.message().await.with_context(|| format!("ByteStream Read {digest}"))?
            {
                received += chunk.data.len() as u64;
                if received > digest.size_bytes() {
                    bail!("server sent more than {} bytes for {digest}", digest.size_bytes());
                }
                hasher.update(&chunk.data);
                file.write_all(&chunk.data).await?;
                bar.set_position(received);
            }
            digest.check_hash(hasher.finalize()).context("downloaded data does not match the digest")?;
            if received != digest.size_bytes() {
                bail!("server sent {received} bytes for {digest}");
            }
            file.flush().await?;
            Ok(())
        }
        .await;
        bar.finish_and_clear();
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, out).await.with_context(|| format!("rename to {}", out.display()))
    }
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
pub async fn hash_file(function: DigestFunction, path: &Path) -> Result<Digest> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Digest> {
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

async fn send_file(
    path: PathBuf,
    resource_name: String,
    tx: mpsc::Sender<WriteRequest>,
    bar: ProgressBar,
) -> Result<()> {
    let mut file = tokio::fs::File::open(&path).await.with_context(|| format!("open {}", path.display()))?;
    let size = file.metadata().await?.len();
    let mut offset = 0u64;
    let mut first = true;
    loop {
        let mut buf = vec![0u8; CHUNK_SIZE_BYTES];
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        let finish = offset + filled as u64 >= size || filled == 0;
        let request = WriteRequest {
            resource_name: if first { resource_name.clone() } else { String::new() },
            write_offset: i64::try_from(offset)?,
            finish_write: finish,
            data: buf,
        };
        first = false;
        offset += filled as u64;
        if tx.send(request).await.is_err() {
            return Ok(()); // The server answered early (the blob exists) or failed.
        }
        bar.set_position(offset);
        if finish {
            return Ok(());
        }
    }
}
