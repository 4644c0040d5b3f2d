//! `google.bytestream.ByteStream` over the CAS: Read, Write and
//! QueryWriteStatus, for `blobs/` and `compressed-blobs/zstd/`.
//!
//! Uploads are buffered until `finish_write`, then verified by the CAS's
//! [`Verifying`](crate::store::Verifying) decorator before they become
//! visible. An upload that breaks off is remembered (bounded) so that the
//! client can resume it at the offset `QueryWriteStatus` reports.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use kiln_proto::google::bytestream::byte_stream_server::ByteStream;
use kiln_proto::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use kiln_proto::resource::{Compressor, ReadResource, WriteResource};
use kiln_proto::{Digest, Error};
use lru::LruCache;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use super::compression::{self, Decompressor};
use crate::blob::{Blob, BlobBuilder};
use crate::limits::Limits;
use crate::store::{BlobStore, Key};
use kiln_auth::{Authorizer, Permission};

/// Upload admission is counted in units of this many bytes.
const PERMIT_UNIT_BYTES: u64 = 64 << 10;

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct ByteStreamService<C> {
    cas: C,
    limits: Limits,
    /// Unfinished identity uploads by resource name (without metadata).
    partial: Arc<Mutex<LruCache<String, Bytes>>>,
    in_flight: Arc<Semaphore>,
    auth: Authorizer,
}

impl<C> ByteStreamService<C> {
    pub fn new(cas: C, limits: Limits, auth: Authorizer) -> Self {
        let permits = usize::try_from(limits.uploads_in_flight_bytes_max / PERMIT_UNIT_BYTES)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        Self {
            cas,
            limits,
            partial: Arc::new(Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(limits.partial_uploads_max.max(1)).expect("at least 1"),
            ))),
            in_flight: Arc::new(Semaphore::new(permits)),
            auth,
        }
    }

    fn partial(&self) -> std::sync::MutexGuard<'_, LruCache<String, Bytes>> {
        self.partial.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The data of an upload in progress.
enum Upload {
    Plain(BlobBuilder),
    Zstd { decompressor: Decompressor, received_bytes: u64 },
}

impl Upload {
    /// Bytes received so far, in the offsets the client uses.
    fn received_bytes(&self) -> u64 {
        match self {
            Upload::Plain(builder) => builder.len(),
            Upload::Zstd { received_bytes, .. } => *received_bytes,
        }
    }

    fn append(&mut self, digest: &Digest, data: Vec<u8>) -> Result<(), Error> {
        match self {
            Upload::Plain(builder) => {
                if builder.len() + data.len() as u64 > digest.size_bytes() {
                    return Err(Error::invalid_argument(format!(
                        "upload of {digest} received more than {} bytes",
                        digest.size_bytes()
                    )));
                }
                builder.push(Bytes::from(data));
            }
            Upload::Zstd { decompressor, received_bytes } => {
                decompressor.write(&data)?;
                *received_bytes += data.len() as u64;
                debug_assert!(decompressor.len() as u64 <= digest.size_bytes());
            }
        }
        Ok(())
    }

    fn finish(self, digest: &Digest) -> Result<Blob, Error> {
        match self {
            Upload::Plain(builder) if builder.len() != digest.size_bytes() => {
                Err(Error::invalid_argument(format!(
                    "upload of {digest} finished after {} bytes; the digest says {}",
                    builder.len(),
                    digest.size_bytes()
                )))
            }
            Upload::Plain(builder) => Ok(builder.finish()),
            Upload::Zstd { decompressor, .. } => decompressor.finish().map(Blob::from),
        }
    }
}

impl<C: BlobStore + Clone> ByteStreamService<C> {
    async fn exists(&self, key: &Key) -> Result<bool, Status> {
        Ok(self.cas.find_missing(std::slice::from_ref(key)).await?.is_empty())
    }

    /// Starts or resumes an upload at `offset`.
    fn begin(&self, resource: &WriteResource, offset: i64) -> Result<Upload, Status> {
        let size = resource.digest.size_bytes();
        if resource.compressor == Compressor::Zstd {
            if offset != 0 {
                return Err(Status::invalid_argument(
                    "compressed uploads cannot be resumed; restart the upload at write_offset 0",
                ));
            }
            return Ok(Upload::Zstd { decompressor: Decompressor::new(size), received_bytes: 0 });
        }
        let name = resource.to_string();
        let resumed = self.partial().pop(&name);
        let function = resource.digest.function();
        match (offset, resumed) {
            (0, _) => Ok(Upload::Plain(BlobBuilder::new(function))),
            (offset, Some(buf)) if buf.len() as i64 == offset => {
                let mut builder = BlobBuilder::new(function);
                builder.push(buf);
                Ok(Upload::Plain(builder))
            }
            (offset, resumed) => Err(Status::invalid_argument(format!(
                "write_offset {offset} does not match the committed size {} of {name}; ask QueryWriteStatus",
                resumed.map_or(0, |b| b.len())
            ))),
        }
    }

    async fn receive(
        &self,
        resource: &WriteResource,
        first: WriteRequest,
        stream: &mut Streaming<WriteRequest>,
    ) -> Result<(Blob, u64), Status> {
        let digest = resource.digest;
        let mut upload = self.begin(resource, first.write_offset)?;
        let mut message = first;
        let name = message.resource_name.clone();
        loop {
            if !message.resource_name.is_empty() && message.resource_name != name {
                return Err(Status::invalid_argument(format!(
                    "resource_name changed within one upload: {:.200} then {:.200}",
                    name, message.resource_name
                )));
            }
            let received = upload.received_bytes();
            if u64::try_from(message.write_offset).ok() != Some(received) {
                return Err(Status::invalid_argument(format!(
                    "write_offset is {} but {received} bytes have been received",
                    message.write_offset
                )));
            }
            upload.append(&digest, std::mem::take(&mut message.data))?;
            if message.finish_write {
                break;
            }
            let idle = Duration::from_millis(self.limits.upload_idle_timeout_ms);
            let next = match tokio::time::timeout(idle, stream.message()).await {
                Ok(Ok(Some(m))) => {
                    message = m;
                    continue;
                }
                Ok(Ok(None)) => Status::invalid_argument("the write stream ended without finish_write"),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!(
                    "no upload data for {idle:?}; resume at the offset QueryWriteStatus reports"
                )),
            };
            if let Upload::Plain(builder) = upload {
                self.partial().put(resource.to_string(), builder.into_bytes());
            }
            return Err(next);
        }
        let received = upload.received_bytes();
        Ok((upload.finish(&digest)?, received))
    }
}

#[tonic::async_trait]
impl<C: BlobStore + Clone> ByteStream for ByteStreamService<C> {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let resource = ReadResource::parse(&request.get_ref().resource_name)?;
        self.auth.check(&request, &resource.instance_name, Permission::CasRead)?;
        let req = request.into_inner();
        if req.read_offset < 0 {
            return Err(Status::out_of_range(format!("read_offset {} is negative", req.read_offset)));
        }
        if req.read_limit < 0 {
            return Err(Status::invalid_argument(format!("read_limit {} is negative", req.read_limit)));
        }
        let data = self.cas.get(&Key::cas_in(&resource.instance_name, resource.digest)).await?;
        let size = data.len() as u64;
        let offset = u64::try_from(req.read_offset).expect("checked non-negative");
        if offset > size {
            return Err(Status::out_of_range(format!(
                "read_offset {offset} is past the end of {} ({size} bytes)",
                resource.digest
            )));
        }
        let limit = u64::try_from(req.read_limit).expect("checked non-negative");
        let end = if limit == 0 { size } else { size.min(offset.saturating_add(limit)) };
        let range = usize::try_from(offset).expect("in memory")..usize::try_from(end).expect("in memory");
        let mut data = data.slice(range);
        if resource.compressor == Compressor::Zstd {
            data = compression::compress(data).await?;
        }
        let chunk = self.limits.read_chunk_size_bytes;
        let chunks = (0..data.len().div_ceil(chunk)).map(move |i| {
            let end = ((i + 1) * chunk).min(data.len());
            Ok(ReadResponse { data: data[i * chunk..end].to_vec() })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let principal = Authorizer::principal(&request)?;
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("the write stream carried no request"));
        };
        let resource = WriteResource::parse(&first.resource_name)?;
        self.auth.require(&principal, &resource.instance_name, Permission::CasWrite)?;
        let digest = resource.digest;
        if digest.size_bytes() > self.limits.blob_size_bytes_max {
            return Err(Status::invalid_argument(format!(
                "blob {digest} is larger than max_cas_blob_size_bytes ({})",
                self.limits.blob_size_bytes_max
            )));
        }
        let key = Key::cas_in(&resource.instance_name, digest);
        if self.exists(&key).await? {
            // Per the REAPI: the full size for identity uploads, -1 for
            // compressed ones, however much the client has sent.
            let committed_size = match resource.compressor {
                Compressor::Identity => digest.size_bytes_i64(),
                Compressor::Zstd => -1,
            };
            return Ok(Response::new(WriteResponse { committed_size }));
        }
        let units = digest.size_bytes().div_ceil(PERMIT_UNIT_BYTES).max(1);
        let units = u32::try_from(units).expect("blob_size_bytes_max bounds the unit count");
        let _admission = self
            .in_flight
            .acquire_many(units)
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        let (data, received_bytes) = self.receive(&resource, first, &mut stream).await?;
        self.cas.put(&key, data).await?;
        tracing::debug!(blob = %digest, "ByteStream upload stored");
        // Bytes received in the offsets the client used (compressed bytes for
        // compressed uploads).
        let committed_size = i64::try_from(received_bytes).expect("bounded by the blob size limit");
        Ok(Response::new(WriteResponse { committed_size }))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let resource = WriteResource::parse(&request.get_ref().resource_name)?;
        self.auth.check(&request, &resource.instance_name, Permission::CasWrite)?;
        if self.exists(&Key::cas_in(&resource.instance_name, resource.digest)).await? {
            let committed_size = resource.digest.size_bytes_i64();
            return Ok(Response::new(QueryWriteStatusResponse { committed_size, complete: true }));
        }
        match self.partial().peek(&resource.to_string()) {
            Some(buf) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: i64::try_from(buf.len()).expect("in memory"),
                complete: false,
            })),
            None => Err(Status::not_found(format!("no upload in progress for {resource}"))),
        }
    }
}
