//! `google.bytestream.ByteStream` over the CAS: Read, Write and
//! QueryWriteStatus, for `blobs/` and `compressed-blobs/zstd/`.
//!
//! Uploads stream into the store through its writer as their chunks arrive,
//! hashed on the way by the CAS's [`Verifying`](crate::store::Verifying)
//! decorator, and become visible only once verified. Every byte a request
//! holds in memory is charged to a budget while it does (see
//! [`super::admission`]): an upload's message until the store has taken it
//! (compressed and decompressed alike), a read's chunk until the network
//! has taken it. An upload that breaks off keeps its open writer (bounded)
//! so that the client can resume it at the offset `QueryWriteStatus`
//! reports.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use kiln_proto::access::{Authorizer, rights};
use kiln_proto::google::bytestream::byte_stream_server::ByteStream;
use kiln_proto::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use kiln_proto::limits::{Limits, STORE_CHUNK_BYTES};
use kiln_proto::resource::{Compressor, ReadResource, WriteResource};
use kiln_proto::text::quoted;
use kiln_proto::{Code, Error};
use tonic::{Request, Response, Status, Streaming};

use super::admission::{Budget, BudgetLimits, Charge};
use super::compression::{StreamDecoder, StreamEncoder};
use super::partial::PartialUploads;
use crate::store::{BlobReader, BlobWriter, ByteRange, CasKey, CasStore, Client};

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

pub struct ByteStreamService<C: CasStore> {
    cas: C,
    limits: Limits,
    partial: Arc<PartialUploads<C::Writer>>,
    uploads: Arc<Budget>,
    reads: Arc<Budget>,
    auth: Authorizer,
}

impl<C: CasStore + Clone> Clone for ByteStreamService<C> {
    fn clone(&self) -> Self {
        Self {
            cas: self.cas.clone(),
            limits: self.limits,
            partial: self.partial.clone(),
            uploads: self.uploads.clone(),
            reads: self.reads.clone(),
            auth: self.auth.clone(),
        }
    }
}

impl<C: CasStore> std::fmt::Debug for ByteStreamService<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteStreamService").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl<C: CasStore> ByteStreamService<C> {
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
                client_bytes_max: (limits.reads_in_flight_bytes_max / 4).max(STORE_CHUNK_BYTES),
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

/// An upload in progress: the store's writer, and for compressed uploads
/// the decoder in front of it.
enum Upload<W> {
    Plain(W),
    Zstd { decoder: Box<StreamDecoder>, writer: W },
}

impl<W: BlobWriter> Upload<W> {
    /// Bytes received so far, in the offsets the client uses.
    fn received_bytes(&self) -> u64 {
        match self {
            Upload::Plain(writer) => writer.written(),
            Upload::Zstd { decoder, .. } => decoder.received_bytes(),
        }
    }

    /// Hands one message's data to the store, charging what it holds in
    /// memory to `charge` until the store has taken it; what the writer
    /// keeps in memory until commit stays charged.
    async fn append(&mut self, data: Vec<u8>, charge: &mut Charge) -> Result<(), Error> {
        charge.grow(data.len() as u64).await?;
        match self {
            Upload::Plain(writer) => writer.write(Bytes::from(data)).await?,
            Upload::Zstd { decoder, writer } => {
                decoder.receive(data.len())?;
                let mut pos = 0;
                loop {
                    let (chunk, full) = decoder.step(&data, &mut pos)?;
                    let produced = chunk.len() as u64;
                    charge.grow(produced).await?;
                    if !chunk.is_empty() {
                        writer.write(chunk).await?;
                    }
                    charge.shrink(produced);
                    if pos == data.len() && !full {
                        break;
                    }
                }
            }
        }
        let held = match self {
            Upload::Plain(writer) | Upload::Zstd { writer, .. } => writer.buffered(),
        };
        charge.shrink(charge.bytes().saturating_sub(held));
        Ok(())
    }

    async fn finish(self) -> Result<(), Error> {
        match self {
            Upload::Plain(writer) => writer.commit().await,
            Upload::Zstd { decoder, writer } => {
                decoder.finish()?;
                writer.commit().await
            }
        }
    }
}

impl<C: CasStore + Clone> ByteStreamService<C> {
    async fn exists(&self, key: &CasKey) -> Result<bool, Status> {
        Ok(self.cas.find_missing(std::slice::from_ref(key)).await?.is_empty())
    }

    /// Starts or resumes an upload at `offset`.
    async fn begin(
        &self,
        resource: &WriteResource,
        key: &CasKey,
        offset: i64,
        client: Client,
    ) -> Result<Upload<C::Writer>, Status> {
        if resource.compressor == Compressor::Zstd {
            if offset != 0 {
                return Err(Status::invalid_argument(
                    "compressed uploads cannot be resumed; restart the upload at write_offset 0",
                ));
            }
            let decoder = Box::new(StreamDecoder::new(resource.digest.size_bytes())?);
            return Ok(Upload::Zstd { decoder, writer: self.cas.write_from(key, client).await? });
        }
        let name = resource.to_string();
        let committed = self.partial.committed(&name).unwrap_or(0);
        match u64::try_from(offset) {
            Ok(0) => {
                self.partial.forget(&name);
                Ok(Upload::Plain(self.cas.write_from(key, client).await?))
            }
            Ok(offset) if offset == committed => {
                let writer = self.partial.take_at(&name, offset).ok_or_else(|| {
                    Status::aborted(format!(
                        "upload {} was resumed or forgotten concurrently; ask QueryWriteStatus",
                        quoted(&name)
                    ))
                })?;
                Ok(Upload::Plain(writer))
            }
            _ => Err(Status::invalid_argument(format!(
                "write_offset {offset} does not match the committed size {committed} of {}; ask QueryWriteStatus",
                quoted(&name)
            ))),
        }
    }

    /// Receives an upload into the store and commits it; returns the bytes
    /// received, in the offsets the client used.
    async fn receive(
        &self,
        resource: &WriteResource,
        key: &CasKey,
        first: WriteRequest,
        stream: &mut Streaming<WriteRequest>,
        charge: &mut Charge,
    ) -> Result<u64, Status> {
        let mut upload = self.begin(resource, key, first.write_offset, charge.client()).await?;
        let mut message = first;
        let name = message.resource_name.clone();
        let idle = Duration::from_millis(self.limits.upload_idle_timeout_ms);
        // On failure: the status, and whether the bytes so far stay
        // resumable (the connection or the server failed, not the data).
        let outcome: Result<(), (Status, bool)> = async {
            loop {
                if !message.resource_name.is_empty() && message.resource_name != name {
                    let status = Status::invalid_argument(format!(
                        "resource_name changed within one upload: {} then {}",
                        quoted(&name),
                        quoted(&message.resource_name)
                    ));
                    return Err((status, true));
                }
                let received = upload.received_bytes();
                if u64::try_from(message.write_offset).ok() != Some(received) {
                    let status = Status::invalid_argument(format!(
                        "write_offset is {} but {received} bytes have been received; resume at the offset QueryWriteStatus reports",
                        message.write_offset
                    ));
                    return Err((status, true));
                }
                if let Err(e) = upload.append(std::mem::take(&mut message.data), charge).await {
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
                        let status = Status::deadline_exceeded(format!(
                            "no upload data for {idle:?}; resume at the offset QueryWriteStatus reports"
                        ));
                        return Err((status, true));
                    }
                };
            }
        }
        .await;
        if let Err((status, keep)) = outcome {
            if let Upload::Plain(writer) = upload
                && keep
                && writer.resumable()
            {
                self.partial.keep(resource.to_string(), writer);
            }
            return Err(status);
        }
        let received = upload.received_bytes();
        upload.finish().await?;
        Ok(received)
    }
}

/// A ByteStream Read in progress: the store's reader, one chunk at a time,
/// each charged to the read budget until the next is asked for.
struct ReadState<R> {
    reader: R,
    /// What is left of the store's last chunk.
    pending: Bytes,
    remaining: u64,
    chunk_bytes: u64,
    charge: Charge,
    encoder: Option<StreamEncoder>,
    done: bool,
}

impl<R: BlobReader> ReadState<R> {
    fn fail(&mut self, e: Error) -> Option<Result<ReadResponse, Status>> {
        self.done = true;
        Some(Err(e.into()))
    }

    async fn next(&mut self) -> Option<Result<ReadResponse, Status>> {
        while !self.done {
            // The previous chunk has been taken by the network stack (or by
            // the encoder, whose own buffers are bounded).
            self.charge.shrink(u64::MAX);
            if self.pending.is_empty() && self.remaining > 0 {
                if let Err(e) = self.charge.grow(self.remaining.min(STORE_CHUNK_BYTES)).await {
                    return self.fail(e);
                }
                match self.reader.next().await {
                    Ok(Some(chunk)) => self.pending = chunk,
                    Ok(None) => return self.fail(Error::new(Code::DataLoss, "the stored blob ended early")),
                    Err(e) => return self.fail(e),
                }
            }
            let take = self.pending.len().min(usize::try_from(self.chunk_bytes).unwrap_or(usize::MAX));
            let piece = self.pending.split_to(take);
            self.remaining = self.remaining.saturating_sub(piece.len() as u64);
            let last = self.remaining == 0;
            let out = match self.encoder.take() {
                None => piece.to_vec(),
                Some(encoder) => match encoder.chunk_async(piece, last).await {
                    Ok((encoder, out)) => {
                        self.encoder = Some(encoder);
                        out
                    }
                    Err(e) => return self.fail(e),
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
impl<C: CasStore + Clone> ByteStream for ByteStreamService<C> {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let resource = ReadResource::parse(&request.get_ref().resource_name)?;
        let permit = self.auth.permit::<rights::CasRead, _>(&request, &resource.instance_name)?;
        let req = request.into_inner();
        if req.read_offset < 0 {
            return Err(Status::out_of_range(format!("read_offset {} is negative", req.read_offset)));
        }
        if req.read_limit < 0 {
            return Err(Status::invalid_argument(format!("read_limit {} is negative", req.read_limit)));
        }
        let key = CasKey::of(&permit, resource.digest);
        let range = ByteRange {
            offset: req.read_offset.unsigned_abs(),
            limit: (req.read_limit > 0).then_some(req.read_limit.unsigned_abs()),
        };
        let reader = self.cas.read(&key, range).await?;
        let encoder = match resource.compressor {
            Compressor::Zstd => Some(StreamEncoder::new()?),
            Compressor::Identity => None,
        };
        let state = ReadState {
            remaining: reader.len(),
            reader,
            pending: Bytes::new(),
            chunk_bytes: self.limits.read_chunk_size_bytes as u64,
            charge: self.reads.charge(permit.caller().peer),
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
        let permit = self.auth.permit_for::<rights::CasWrite>(&caller, &resource.instance_name)?;
        let digest = resource.digest;
        if digest.size_bytes() > self.limits.blob_size_bytes_max {
            return Err(Status::invalid_argument(format!(
                "blob {digest} is larger than max_cas_blob_size_bytes ({})",
                self.limits.blob_size_bytes_max
            )));
        }
        let key = CasKey::of(&permit, digest);
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
        let received_bytes = self.receive(&resource, &key, first, &mut stream, &mut charge).await?;
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
        let permit = self.auth.permit::<rights::CasWrite, _>(&request, &resource.instance_name)?;
        if self.exists(&CasKey::of(&permit, resource.digest)).await? {
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
