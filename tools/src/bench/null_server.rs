//! A REAPI server that does no work: the baseline "plain tonic server", and
//! the load generator's own ceiling.
//!
//! It answers every call as cheaply as tonic allows: FindMissingBlobs reports
//! every digest missing, GetActionResult returns an empty result, ByteStream Read
//! streams zeros of the requested size, Write counts and discards.

use std::pin::Pin;

use futures::Stream;
use kiln_proto::google::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use kiln_proto::google::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest, WriteResponse,
};
use kiln_proto::reapi::action_cache_server::{ActionCache, ActionCacheServer};
use kiln_proto::reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use kiln_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse, GetActionResultRequest,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse,
    RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse,
    SplitBlobRequest, SplitBlobResponse, UpdateActionResultRequest, batch_read_blobs_response,
    batch_update_blobs_response,
};
use kiln_proto::resource::ReadResource;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

use kiln_proto::limits::TOOL_MESSAGE_SIZE_BYTES_MAX as MESSAGE_SIZE_BYTES_MAX;

/// Bytes per ByteStream Read response, as Kiln's default.
const READ_CHUNK_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, Default)]
pub struct NullServer;

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ContentAddressableStorage for NullServer {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        // Everything is missing: the same response a real server gives for
        // the benchmark's never-uploaded digests.
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: request.into_inner().blob_digests,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let responses = request
            .into_inner()
            .requests
            .into_iter()
            .map(|r| batch_update_blobs_response::Response {
                digest: r.digest,
                status: Some(Default::default()),
            })
            .collect();
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let responses = request
            .into_inner()
            .digests
            .into_iter()
            .map(|d| batch_read_blobs_response::Response {
                data: vec![0; usize::try_from(d.size_bytes.clamp(0, 1 << 24)).unwrap_or(0)],
                digest: Some(d),
                status: Some(Default::default()),
                compressor: 0,
            })
            .collect();
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = Boxed<GetTreeResponse>;

    async fn get_tree(&self, _: Request<GetTreeRequest>) -> Result<Response<Self::GetTreeStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }

    async fn split_blob(&self, _: Request<SplitBlobRequest>) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented("null server"))
    }

    type GetChunkMappingStream = Boxed<GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("null server"))
    }

    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("null server"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("null server"))
    }
}

#[tonic::async_trait]
impl ActionCache for NullServer {
    async fn get_action_result(
        &self,
        _: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        Ok(Response::new(ActionResult::default()))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        Ok(Response::new(request.into_inner().action_result.unwrap_or_default()))
    }
}

#[tonic::async_trait]
impl ByteStream for NullServer {
    type ReadStream = Boxed<ReadResponse>;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let size = ReadResource::parse(&request.get_ref().resource_name)?.digest.size_bytes();
        let chunks = (0..size.div_ceil(READ_CHUNK_BYTES)).map(move |i| {
            let n = (size - i * READ_CHUNK_BYTES).min(READ_CHUNK_BYTES);
            Ok(ReadResponse { data: vec![0; usize::try_from(n).expect("at most 1 MiB")] })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let mut received = 0i64;
        while let Some(message) = stream.message().await? {
            received += i64::try_from(message.data.len()).expect("message size");
            if message.finish_write {
                break;
            }
        }
        Ok(Response::new(WriteResponse { committed_size: received }))
    }

    async fn query_write_status(
        &self,
        _: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Err(Status::not_found("null server keeps no uploads"))
    }
}

/// Serves the null server on `listener` until `shutdown` completes, with the
/// same transport settings as `kiln serve`.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    kiln_proto::transport::server(&kiln_proto::limits::Limits::default())
        .add_service(
            ContentAddressableStorageServer::new(NullServer)
                .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX),
        )
        .add_service(ActionCacheServer::new(NullServer))
        .add_service(
            ByteStreamServer::new(NullServer)
                .max_decoding_message_size(MESSAGE_SIZE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_SIZE_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
