//! [`CasClient`] over gRPC: any REAPI CAS, for workers that run apart from
//! their storage nodes. Blobs are verified against their digests on the way
//! in; errors keep their gRPC codes (a missing blob is NOT_FOUND).

use std::path::Path;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kiln_proto::google::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::{Directory, FindMissingBlobsRequest, GetTreeRequest};
use kiln_proto::resource::{Compressor, ReadResource, WriteResource};
use kiln_proto::{Code, Digest, DigestFunction, Error, Result};
use kiln_tools::client::{Connection, MESSAGE_SIZE_BYTES_MAX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cas::CasClient;

/// Bytes per ByteStream upload message.
const CHUNK_BYTES: usize = 1 << 20;

/// A CAS reached over gRPC, for one instance name and digest function.
#[derive(Debug, Clone)]
pub struct GrpcCas {
    connection: Connection,
    instance: String,
    function: DigestFunction,
}

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

impl GrpcCas {
    pub fn new(connection: Connection, instance: &str, function: DigestFunction) -> Self {
        GrpcCas { connection, instance: instance.to_owned(), function }
    }

    /// A fresh upload's ByteStream resource name for `digest`.
    fn write_name(&self, digest: &Digest) -> String {
        WriteResource {
            instance_name: self.instance.clone(),
            upload_id: uuid::Uuid::new_v4().to_string(),
            digest: *digest,
            compressor: Compressor::Identity,
        }
        .to_string()
    }

    /// Streams blob `digest`, handing each verified-so-far chunk to `sink`;
    /// fails if the bytes do not match the digest.
    async fn read_stream(&self, digest: &Digest, mut sink: impl AsyncSink) -> Result<()> {
        let resource = ReadResource {
            instance_name: self.instance.clone(),
            digest: *digest,
            compressor: Compressor::Identity,
        };
        let request = ReadRequest { resource_name: resource.to_string(), read_offset: 0, read_limit: 0 };
        let mut stream = self
            .connection
            .bytestream()
            .read(request)
            .await
            .map_err(|s| from_status(&format!("read blob {digest}"), &s))?
            .into_inner();
        let mut hasher = digest.function().hasher();
        let mut got = 0u64;
        while let Some(message) = stream.next().await {
            let message = message.map_err(|s| from_status(&format!("read blob {digest}"), &s))?;
            got += message.data.len() as u64;
            if got > digest.size_bytes() {
                return Err(Error::new(
                    Code::DataLoss,
                    format!("blob {digest} came back longer than its size"),
                ));
            }
            hasher.update(&message.data);
            sink.put(message.data).await?;
        }
        let actual = hasher.into_digest(got)?;
        if actual != *digest {
            return Err(Error::new(Code::DataLoss, format!("blob {digest} came back as {actual}")));
        }
        Ok(())
    }
}

/// Where streamed blob bytes go.
trait AsyncSink: Send {
    fn put(&mut self, data: Vec<u8>) -> impl std::future::Future<Output = Result<()>> + Send;
}

impl<T: AsyncSink> AsyncSink for &mut T {
    async fn put(&mut self, data: Vec<u8>) -> Result<()> {
        (**self).put(data).await
    }
}

struct FileSink<'a> {
    file: tokio::fs::File,
    path: &'a Path,
}

impl AsyncSink for FileSink<'_> {
    async fn put(&mut self, data: Vec<u8>) -> Result<()> {
        self.file.write_all(&data).await.map_err(|e| io("write", self.path, &e))
    }
}

struct MemorySink<'a>(&'a mut BytesMut);

impl AsyncSink for MemorySink<'_> {
    async fn put(&mut self, data: Vec<u8>) -> Result<()> {
        self.0.extend_from_slice(&data);
        Ok(())
    }
}

impl CasClient for GrpcCas {
    async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| io("create", path, &e))?;
        let mut sink = FileSink { file, path };
        self.read_stream(digest, &mut sink).await?;
        sink.file.flush().await.map_err(|e| io("write", path, &e))
    }

    async fn read_bytes(&self, digest: &Digest) -> Result<Bytes> {
        if digest.size_bytes() > MESSAGE_SIZE_BYTES_MAX as u64 {
            return Err(Error::resource_exhausted(format!("blob {digest} is too large to read into memory")));
        }
        let mut buf = BytesMut::with_capacity(usize::try_from(digest.size_bytes()).unwrap_or(0));
        self.read_stream(digest, MemorySink(&mut buf)).await?;
        Ok(buf.freeze())
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut missing = Vec::new();
        // Callers batch already; any length still works here.
        for chunk in digests.chunks(crate::inputs::FIND_MISSING_BATCH) {
            let request = FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                digest_function: self.function.to_proto() as i32,
            };
            let response = self
                .connection
                .cas()
                .find_missing_blobs(request)
                .await
                .map_err(|s| from_status("FindMissingBlobs", &s))?;
            for d in &response.get_ref().missing_blob_digests {
                missing.push(Digest::from_proto(Some(self.function), d)?);
            }
        }
        Ok(missing)
    }

    async fn upload_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        let mut file = tokio::fs::File::open(path).await.map_err(|e| io("open", path, &e))?;
        let name = self.write_name(digest);
        let size = digest.size_bytes();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let reader = {
            let path = path.to_owned();
            async move {
                let mut offset = 0u64;
                loop {
                    let mut buf = vec![0u8; CHUNK_BYTES];
                    let n = file.read(&mut buf).await.map_err(|e| io("read", &path, &e))?;
                    buf.truncate(n);
                    let finish = offset + n as u64 >= size;
                    let message = WriteRequest {
                        resource_name: if offset == 0 { name.clone() } else { String::new() },
                        write_offset: i64::try_from(offset).unwrap_or(i64::MAX),
                        finish_write: finish,
                        data: buf,
                    };
                    offset += n as u64;
                    if tx.send(message).await.is_err() || finish || n == 0 {
                        return Ok::<u64, Error>(offset);
                    }
                }
            }
        };
        let mut client = self.connection.bytestream();
        let upload = client.write(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (sent, response) = tokio::join!(reader, upload);
        // The server's answer first: it may answer before the last byte
        // when it holds the blob already (another action uploaded it), and
        // then the rest of the file is rightly never sent.
        match response {
            Ok(r) => check_committed(digest, r.get_ref().committed_size),
            Err(status) => {
                if sent? != size {
                    return Err(Error::internal(format!("{} changed while it was uploaded", path.display())));
                }
                Err(from_status(&format!("upload {digest}"), &status))
            }
        }
    }

    async fn upload_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        let name = self.write_name(digest);
        // Chunks are made as the stream is read: the blob is not held twice.
        let len = data.len();
        let messages = (0..len.div_ceil(CHUNK_BYTES).max(1)).map(move |i| {
            let start = i * CHUNK_BYTES;
            let end = (start + CHUNK_BYTES).min(len);
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

    async fn get_tree(&self, root: &Digest, count_max: u64) -> Result<Vec<Directory>> {
        let request = GetTreeRequest {
            instance_name: self.instance.clone(),
            root_digest: Some(root.to_proto()),
            page_size: 0,
            page_token: String::new(),
            digest_function: self.function.to_proto() as i32,
        };
        let mut stream = self
            .connection
            .cas()
            .get_tree(request)
            .await
            .map_err(|s| from_status("GetTree", &s))?
            .into_inner();
        let mut directories = Vec::new();
        while let Some(page) = stream.next().await {
            directories.extend(page.map_err(|s| from_status("GetTree", &s))?.directories);
            if directories.len() as u64 > count_max {
                break;
            }
        }
        Ok(directories)
    }
}

/// Gives [`GrpcCas`] clients over one connection.
#[derive(Debug, Clone)]
pub struct GrpcCasFactory(pub Connection);

impl crate::runner::CasFactory for GrpcCasFactory {
    type Client = GrpcCas;
    fn client(&self, instance: &str, function: DigestFunction) -> GrpcCas {
        GrpcCas::new(self.0.clone(), instance, function)
    }
}
