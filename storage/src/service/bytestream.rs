//! `google.bytestream.ByteStream` over the CAS: Read, Write and
//! QueryWriteStatus, for `blobs/` and `compressed-blobs/zstd/`.
//!
//! Uploads are hashed as their chunks arrive and verified by the CAS's
//! [`Verifying`](crate::store::Verifying) decorator before they become
//! visible. Every byte an upload holds is charged to the upload budget as
//! it arrives (compressed and decompressed alike), and every read chunk
//! waiting for the network to the read budget (see [`super::admission`]).
//! An upload that breaks off is remembered (bounded) so that the client can
//! resume it at the offset `QueryWriteStatus` reports.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use kiln_proto::access::{Authorizer, Permission};
use kiln_proto::google::bytestream::byte_stream_server::ByteStream;
use kiln_proto::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use kiln_proto::limits::Limits;
use kiln_proto::resource::{Compressor, ReadResource, WriteResource};
use kiln_proto::text::quoted;
use kiln_proto::{Code, Digest, Error};
use tonic::{Request, Response, Status, Streaming};

use super::admission::{Budget, BudgetLimits, Charge};
use super::compression::{StreamDecoder, StreamEncoder};
use super::partial::PartialUploads;
use crate::blob::{Blob, BlobBuilder};
use crate::store::{BlobStore, Key};

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[derive(Debug, Clone)]
pub struct ByteStreamService<C> {
    cas: C,
    limits: Limits,
    partial: Arc<PartialUploads>,
    uploads: Arc<Budget>,
    reads: Arc<Budget>,
    auth: Authorizer,
}

impl<C> ByteStreamService<C> {
    pub fn new(cas: C, limits: Limits, auth: Authorizer) -> Self {
        let timeout = Duration::from_millis(limits.admission_timeout_ms);
        let uploads = Budget::new(
            "uploads",
            "uploads_in_flight_bytes_max",
            BudgetLimits {
                total_bytes_max: limits.uploads_in_flight_bytes_max,
                client_bytes_max: limits.upload_client_bytes_max,
                waiting_bytes_max: limits.admission_waiting_bytes_max,
                timeout,
            },
        );
        let reads = Budget::new(
            "reads",
            "reads_in_flight_bytes_max",
            BudgetLimits {
                total_bytes_max: limits.reads_in_flight_bytes_max,
                client_bytes_max: (limits.reads_in_flight_bytes_max / 4)
                    .max(limits.read_chunk_size_bytes as u64),
                waiting_bytes_max: limits.admission_waiting_bytes_max,
                timeout,
            },
        );
        Self {
            cas,
            limits,
            partial: Arc::new(PartialUploads::new(
                limits.partial_uploads_max,
                limits.partial_uploads_bytes_max,
            )),
            uploads,
            reads,
            auth,
        }
    }
}

/// The data of an upload in progress, hashed as it arrives.
enum Upload {
    Plain(BlobBuilder),
    Zstd { decoder: Box<StreamDecoder>, builder: BlobBuilder },
}

impl Upload {
    /// Bytes received so far, in the offsets the client uses.
    fn received_bytes(&self) -> u64 {
        match self {
            Upload::Plain(builder) => builder.len(),
            Upload::Zstd { decoder, .. } => decoder.received_bytes(),
        }
    }

    /// Adds one message's data, charging what it holds to `charge` first.
    async fn append(&mut self, digest: &Digest, data: Vec<u8>, charge: &mut Charge) -> Result<(), Error> {
        match self {
            Upload::Plain(builder) => {
                if builder.len() + data.len() as u64 > digest.size_bytes() {
                    return Err(Error::invalid_argument(format!(
                        "upload of {digest} received more than {} bytes",
                        digest.size_bytes()
                    )));
                }
                charge.grow(data.len() as u64).await?;
                builder.push(Bytes::from(data));
            }
            Upload::Zstd { decoder, builder } => {
                decoder.receive(data.len())?;
                // The compressed message is held while it is decompressed.
                let compressed = data.len() as u64;
                charge.grow(compressed).await?;
                let mut pos = 0;
                loop {
                    let (chunk, full) = decoder.step(&data, &mut pos)?;
                    charge.grow(chunk.len() as u64).await?;
                    builder.push(chunk);
                    if pos == data.len() && !full {
                        break;
                    }
                }
                charge.shrink(compressed);
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
            Upload::Plain(builder) => builder.finish(),
            Upload::Zstd { decoder, builder } => {
                decoder.finish()?;
                builder.finish()
            }
        }
    }
}

impl<C: BlobStore + Clone> ByteStreamService<C> {
    async fn exists(&self, key: &Key) -> Result<bool, Status> {
        Ok(self.cas.find_missing(std::slice::from_ref(key)).await?.is_empty())
    }

    /// Starts or resumes an upload at `offset`.
    async fn begin(
        &self,
        resource: &WriteResource,
        offset: i64,
        charge: &mut Charge,
    ) -> Result<Upload, Status> {
        let size = resource.digest.size_bytes();
        let function = resource.digest.function();
        if resource.compressor == Compressor::Zstd {
            if offset != 0 {
                return Err(Status::invalid_argument(
                    "compressed uploads cannot be resumed; restart the upload at write_offset 0",
                ));
            }
            return Ok(Upload::Zstd {
                decoder: Box::new(StreamDecoder::new(size)?),
                builder: BlobBuilder::new(function),
            });
        }
        let name = resource.to_string();
        let committed = self.partial.committed(&name).unwrap_or(0);
        match u64::try_from(offset) {
            Ok(0) => {
                self.partial.forget(&name);
                Ok(Upload::Plain(BlobBuilder::new(function)))
            }
            Ok(offset) if offset == committed => {
                // Charge the remembered bytes before taking them, so a busy
                // server leaves them resumable.
                charge.grow(offset).await?;
                let data = self.partial.take_at(&name, offset).ok_or_else(|| {
                    Status::aborted(format!(
                        "upload {} was resumed or forgotten concurrently; ask QueryWriteStatus",
                        quoted(&name)
                    ))
                })?;
                let mut builder = BlobBuilder::new(function);
                builder.push(data);
                Ok(Upload::Plain(builder))
            }
            _ => Err(Status::invalid_argument(format!(
                "write_offset {offset} does not match the committed size {committed} of {}; ask QueryWriteStatus",
                quoted(&name)
            ))),
        }
    }

    async fn receive(
        &self,
        resource: &WriteResource,
        first: WriteRequest,
        stream: &mut Streaming<WriteRequest>,
        charge: &mut Charge,
    ) -> Result<(Blob, u64), Status> {
        let digest = resource.digest;
        let mut upload = self.begin(resource, first.write_offset, charge).await?;
        let mut message = first;
        let name = message.resource_name.clone();
        let idle = Duration::from_millis(self.limits.upload_idle_timeout_ms);
        // On failure: the status, and whether the bytes so far stay
        // resumable (the connection or the server failed, not the data).
        let outcome: Result<(), (Status, bool)> = async {
            loop {
                if !message.resource_name.is_empty() && message.resource_name != name {
                    return Err((
                        Status::invalid_argument(format!(
                            "resource_name changed within one upload: {} then {}",
                            quoted(&name),
                            quoted(&message.resource_name)
                        )),
                        true,
                    ));
                }
                let received = upload.received_bytes();
                if u64::try_from(message.write_offset).ok() != Some(received) {
                    return Err((
                        Status::invalid_argument(format!(
                            "write_offset is {} but {received} bytes have been received; resume at the offset QueryWriteStatus reports",
                            message.write_offset
                        )),
                        true,
                    ));
                }
                if let Err(e) = upload.append(&digest, std::mem::take(&mut message.data), charge).await {
                    let keep = matches!(e.code(), Code::ResourceExhausted | Code::Unavailable);
                    return Err((e.into(), keep));
                }
                if message.finish_write {
                    return Ok(());
                }
                message = match tokio::time::timeout(idle, stream.message()).await {
                    Ok(Ok(Some(m))) => m,
                    Ok(Ok(None)) => {
                        return Err((Status::invalid_argument("the write stream ended without finish_write"), true));
                    }
                    Ok(Err(status)) => return Err((status, true)),
                    Err(_) => {
                        return Err((
                            Status::deadline_exceeded(format!(
                                "no upload data for {idle:?}; resume at the offset QueryWriteStatus reports"
                            )),
                            true,
                        ));
                    }
                };
            }
        }
        .await;
        if let Err((status, keep)) = outcome {
            if let Upload::Plain(builder) = upload
                && keep
            {
                self.partial.keep(resource.to_string(), builder.into_bytes());
            }
            return Err(status);
        }
        let received = upload.received_bytes();
        Ok((upload.finish(&digest)?, received))
    }
}

/// A ByteStream Read in progress: one chunk at a time, each charged to the
/// read budget until the next is asked for. The blob is looked up again for
/// each chunk, so a reader that stalls holds one chunk, never the blob (an
/// evicted blob's memory is not kept alive by a slow reader; the read then
/// ends with the store's NOT_FOUND and the client retries).
struct ReadState<C> {
    cas: C,
    key: Key,
    pos: u64,
    end: u64,
    chunk_bytes: u64,
    charge: Charge,
    encoder: Option<StreamEncoder>,
    done: bool,
}

impl<C: BlobStore> ReadState<C> {
    async fn next(&mut self) -> Option<Result<ReadResponse, Status>> {
        while !self.done {
            // The previous chunk has been taken by the network stack (or by
            // the encoder, whose own buffers are bounded).
            self.charge.shrink(u64::MAX);
            let end = (self.pos + self.chunk_bytes).min(self.end);
            let last = end == self.end;
            if let Err(e) = self.charge.grow((end - self.pos).max(1)).await {
                self.done = true;
                return Some(Err(e.into()));
            }
            let piece = match self.cas.get(&self.key).await {
                // Within the blob: the read was checked against its size.
                Ok(blob) => blob.slice(
                    usize::try_from(self.pos).unwrap_or(usize::MAX)
                        ..usize::try_from(end).unwrap_or(usize::MAX),
                ),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e
                        .context(format!("reading {} at offset {}", self.key, self.pos))
                        .into()));
                }
            };
            self.pos = end;
            let out = match self.encoder.take() {
                None => piece.to_vec(),
                Some(encoder) => match encoder.chunk_async(piece, last).await {
                    Ok((encoder, out)) => {
                        self.encoder = Some(encoder);
                        out
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e.into()));
                    }
                },
            };
            self.done = last;
            if !out.is_empty() || last {
                return Some(Ok(ReadResponse { data: out }));
            }
        }
        None
    }
}

#[tonic::async_trait]
impl<C: BlobStore + Clone> ByteStream for ByteStreamService<C> {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let resource = ReadResource::parse(&request.get_ref().resource_name)?;
        let caller = self.auth.check(&request, &resource.instance_name, Permission::CasRead)?;
        let req = request.into_inner();
        if req.read_offset < 0 {
            return Err(Status::out_of_range(format!("read_offset {} is negative", req.read_offset)));
        }
        if req.read_limit < 0 {
            return Err(Status::invalid_argument(format!("read_limit {} is negative", req.read_limit)));
        }
        let key = Key::cas_in(&resource.instance_name, resource.digest);
        // The blob must exist before the stream starts (NOT_FOUND as a
        // status, not mid-stream); its size is the digest's.
        if !self.exists(&key).await? {
            return Err(Error::not_found(format!("blob {} not found", resource.digest)).into());
        }
        let size = resource.digest.size_bytes();
        let offset = req.read_offset.unsigned_abs();
        if offset > size {
            return Err(Status::out_of_range(format!(
                "read_offset {offset} is past the end of {} ({size} bytes)",
                resource.digest
            )));
        }
        let limit = req.read_limit.unsigned_abs();
        let end = if limit == 0 { size } else { size.min(offset.saturating_add(limit)) };
        let encoder = match resource.compressor {
            Compressor::Zstd => Some(StreamEncoder::new()?),
            Compressor::Identity => None,
        };
        let state = ReadState {
            cas: self.cas.clone(),
            key,
            pos: offset,
            end,
            chunk_bytes: self.limits.read_chunk_size_bytes as u64,
            charge: self.reads.charge(caller.peer),
            encoder,
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = Authorizer::caller(&request)?;
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("the write stream carried no request"));
        };
        let resource = WriteResource::parse(&first.resource_name)?;
        self.auth.require(&caller, &resource.instance_name, Permission::CasWrite)?;
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
        let mut charge = self.uploads.charge(caller.peer);
        let (blob, received_bytes) = self.receive(&resource, first, &mut stream, &mut charge).await?;
        self.cas.put(&key, blob).await?;
        drop(charge);
        tracing::debug!(blob = %digest, "ByteStream upload stored");
        // Bytes received in the offsets the client used (compressed bytes for
        // compressed uploads), bounded by the blob size limit.
        let committed_size = i64::try_from(received_bytes).unwrap_or(i64::MAX);
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
        match self.partial.committed(&resource.to_string()) {
            Some(len) => Ok(Response::new(QueryWriteStatusResponse {
                committed_size: i64::try_from(len).unwrap_or(i64::MAX),
                complete: false,
            })),
            None => Err(Error::new(Code::NotFound, format!("no upload in progress for {resource}")).into()),
        }
    }
}
