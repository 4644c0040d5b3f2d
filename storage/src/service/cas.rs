//! `ContentAddressableStorage`: FindMissingBlobs, BatchUpdateBlobs,
//! BatchReadBlobs and GetTree.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use kiln_proto::reapi::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest, BatchUpdateBlobsResponse,
    FindMissingBlobsRequest, FindMissingBlobsResponse, GetChunkMappingRequest, GetChunkMappingResponse,
    GetTreeRequest, GetTreeResponse, RegisterChunkMappingRequest, RegisterChunkMappingResponse,
    SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse, batch_read_blobs_response,
    batch_update_blobs_request, batch_update_blobs_response, compressor,
};
use kiln_proto::{Digest, DigestFunction, Error};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::compression;
use crate::store::{CasKey, CasStore, Scope, put_all, read_all};
use kiln_proto::Code;
use kiln_proto::access::{Authorizer, CasRight, Permit, rights};
use kiln_proto::limits::{
    BATCH_BLOBS_IN_FLIGHT, Limits, TREE_READ_BATCH_BYTES_MAX, TREE_READ_BATCH_DIRECTORIES_MAX,
};
use kiln_proto::tree::{Batch, Reached, TreeWalk};

#[derive(Debug, Clone)]
pub struct CasService<C> {
    cas: C,
    limits: Limits,
    auth: Authorizer,
    /// Turns for GetTree walks (`tree_walks_max`).
    tree_walks: super::WalkTurns,
}

impl<C> CasService<C> {
    pub fn new(cas: C, limits: Limits, auth: Authorizer) -> Self {
        Self { cas, limits, auth, tree_walks: super::WalkTurns::new(&limits) }
    }

    /// Takes walk turns from `turns`, shared with other services.
    #[must_use]
    pub fn with_walk_turns(mut self, turns: super::WalkTurns) -> Self {
        self.tree_walks = turns;
        self
    }
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<GetTreeResponse, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<GetChunkMappingResponse, Status>> + Send>>;

fn parse_digests<R: CasRight>(
    permit: &Permit<R>,
    function: Option<DigestFunction>,
    digests: &[kiln_proto::reapi::Digest],
) -> Result<Vec<CasKey>, Status> {
    let scope = Scope::cas(permit);
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Digest::from_proto(function, d)
                .map(|d| CasKey::new(scope.clone(), d))
                .map_err(|e| e.context(format!("digest #{i}")))
        })
        .collect::<Result<_, Error>>()
        .map_err(Status::from)
}

impl<C: CasStore + Clone> CasService<C> {
    fn check_batch_size<'a>(
        &self,
        what: &str,
        digests: impl Iterator<Item = &'a Digest>,
    ) -> Result<(), Status> {
        let total: u64 = digests.map(Digest::size_bytes).fold(0, u64::saturating_add);
        if total > self.limits.batch_total_size_bytes_max {
            return Err(Error::invalid_argument(format!(
                "{what} totals {total} bytes; max_batch_total_size_bytes is {}: use ByteStream for large blobs or split the batch",
                self.limits.batch_total_size_bytes_max
            ))
            .into());
        }
        Ok(())
    }

    async fn update_one(
        &self,
        permit: &Permit<rights::CasWrite>,
        function: Option<DigestFunction>,
        req: batch_update_blobs_request::Request,
    ) -> (kiln_proto::reapi::Digest, Result<(), Error>) {
        let wire = req.digest.clone().unwrap_or_default();
        let digest = match Digest::from_required(function, req.digest.as_ref(), "digest") {
            Ok(d) => d,
            Err(e) => return (wire, Err(e)),
        };
        let data = match compressor::Value::try_from(req.compressor) {
            Ok(compressor::Value::Identity) => Ok(Bytes::from(req.data)),
            Ok(compressor::Value::Zstd) => {
                compression::decompress_exact(Bytes::from(req.data), digest.size_bytes()).await
            }
            _ => Err(Error::invalid_argument(format!(
                "compressor {} is not supported; use identity or zstd",
                req.compressor
            ))),
        };
        let result = match data {
            Ok(data) => put_all(&self.cas, &CasKey::of(permit, digest), data).await,
            Err(e) => Err(e),
        };
        (wire, result.map_err(|e| e.context(format!("blob {digest}"))))
    }

    /// One blob of a BatchReadBlobs call (its size is within the batch's,
    /// checked before).
    async fn read_one(&self, key: CasKey, zstd: bool) -> batch_read_blobs_response::Response {
        let mut response = batch_read_blobs_response::Response {
            digest: Some(key.digest().to_proto()),
            ..Default::default()
        };
        let data = match read_all(&self.cas, &key, self.limits.batch_total_size_bytes_max).await {
            Ok(data) if zstd && data.len() > 64 => {
                compression::compress(data).await.map(|c| (c, compressor::Value::Zstd))
            }
            Ok(data) => Ok((data, compressor::Value::Identity)),
            Err(e) => Err(e),
        };
        match data {
            Ok((data, c)) => {
                response.data = data.to_vec();
                response.compressor = c as i32;
                response.status = Some(Default::default());
            }
            Err(e) => response.status = Some(e.to_rpc_status()),
        }
        response
    }
}

#[tonic::async_trait]
impl<C: CasStore + Clone> ContentAddressableStorage for CasService<C> {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let permit = self.auth.permit::<rights::CasRead, _>(&request, &request.get_ref().instance_name)?;
        let req = request.into_inner();
        super::instance(&req.instance_name)?;
        let function = super::digest_function(req.digest_function)?;
        super::check_count("FindMissingBlobs", req.blob_digests.len(), self.limits.batch_digests_max)?;
        let keys = parse_digests(&permit, function, &req.blob_digests)?;
        let missing = self.cas.find_missing(&keys).await?;
        // `missing` is a subsequence of `keys`; answer with the request's own
        // (validated) digest messages rather than encoding them again.
        let mut missing = missing.into_iter().peekable();
        let missing_blob_digests: Vec<_> = req
            .blob_digests
            .into_iter()
            .zip(&keys)
            .filter_map(|(wire, key)| missing.next_if(|m| m == key).map(|_| wire))
            .collect();
        debug_assert!(missing.next().is_none(), "find_missing returned keys out of order");
        let metrics = kiln_proto::metrics::global();
        let tenant = kiln_proto::metrics::tenant_label(&req.instance_name);
        let absent = missing_blob_digests.len() as u64;
        let labels = |result| kiln_proto::metrics::LookupLabels { tenant: tenant.clone(), result };
        metrics.cas_find_missing.get_or_create(&labels("missing")).inc_by(absent);
        metrics.cas_find_missing.get_or_create(&labels("present")).inc_by(keys.len() as u64 - absent);
        Ok(Response::new(FindMissingBlobsResponse { missing_blob_digests }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let permit = self.auth.permit::<rights::CasWrite, _>(&request, &request.get_ref().instance_name)?;
        let req = request.into_inner();
        super::instance(&req.instance_name)?;
        let function = super::digest_function(req.digest_function)?;
        super::check_count("BatchUpdateBlobs", req.requests.len(), self.limits.batch_digests_max)?;
        // The call-level size check counts every declared size it can parse;
        // unparsable digests fail individually below.
        let declared: Vec<Digest> = req
            .requests
            .iter()
            .filter_map(|r| r.digest.as_ref().and_then(|d| Digest::from_proto(function, d).ok()))
            .collect();
        self.check_batch_size("BatchUpdateBlobs", declared.iter())?;
        // The store works on several blobs at once (a storage thread batches
        // what waits in its queue); answers keep the request's order.
        let responses = futures::stream::iter(req.requests)
            .map(|blob| self.update_one(&permit, function, blob))
            .buffered(BATCH_BLOBS_IN_FLIGHT)
            .map(|(digest, result)| {
                if let Err(e) = &result {
                    tracing::debug!(error = %e, "BatchUpdateBlobs: blob refused");
                }
                batch_update_blobs_response::Response {
                    digest: Some(digest),
                    status: Some(result.err().map(|e| e.to_rpc_status()).unwrap_or_default()),
                }
            })
            .collect()
            .await;
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let permit = self.auth.permit::<rights::CasRead, _>(&request, &request.get_ref().instance_name)?;
        let req = request.into_inner();
        super::instance(&req.instance_name)?;
        let function = super::digest_function(req.digest_function)?;
        super::check_count("BatchReadBlobs", req.digests.len(), self.limits.batch_digests_max)?;
        let keys = parse_digests(&permit, function, &req.digests)?;
        let digests: Vec<Digest> = keys.iter().map(CasKey::digest).collect();
        self.check_batch_size("BatchReadBlobs", digests.iter())?;
        let zstd = req.acceptable_compressors.contains(&(compressor::Value::Zstd as i32));
        let responses = futures::stream::iter(keys)
            .map(|key| self.read_one(key, zstd))
            .buffered(BATCH_BLOBS_IN_FLIGHT)
            .collect()
            .await;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = TreeStream;

    async fn get_tree(&self, request: Request<GetTreeRequest>) -> Result<Response<TreeStream>, Status> {
        let permit = self.auth.permit::<rights::CasRead, _>(&request, &request.get_ref().instance_name)?;
        let req = request.into_inner();
        super::instance(&req.instance_name)?;
        let function = super::digest_function(req.digest_function)?;
        let root = Digest::from_required(function, req.root_digest.as_ref(), "root_digest")?;
        let page_size = match usize::try_from(req.page_size) {
            Ok(0) => self.limits.tree_page_size_max,
            Ok(n) => n.min(self.limits.tree_page_size_max),
            Err(_) => return Err(Status::invalid_argument("page_size must not be negative")),
        };
        let skip = parse_page_token(&req.page_token)?;
        let turn = self.tree_walks.take("GetTree").await?;
        let mut pager = TreePager {
            source: TreeSource {
                cas: self.cas.clone(),
                scope: Scope::cas(&permit),
                directory_bytes_max: self.limits.grpc_message_size_bytes_max as u64 / 2,
            },
            walk: TreeWalk::new(root, self.limits.tree_directories_max as u64),
            page_size,
            page_bytes_max: self.limits.grpc_message_size_bytes_max / 2,
            directories_max: self.limits.tree_directories_max,
            skip,
        };
        // The root is read here, so that a missing or malformed root is the
        // call's own status; the rest streams.
        let first = pager.next().await?.unwrap_or_default();
        if let [Reached::Missing(_)] = first.as_slice() {
            return Err(Error::not_found(format!("GetTree root {root} is not in the CAS")).into());
        }
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            pager.run(first, tx).await;
            drop(turn);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn split_blob(&self, _: Request<SplitBlobRequest>) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented("SplitBlob is not supported (split_blob_support is false)"))
    }

    type GetChunkMappingStream = ChunkStream;

    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        Err(Status::unimplemented("GetChunkMapping is not supported (split_blob_support is false)"))
    }

    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("SpliceBlob is not supported (splice_blob_support is false)"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("RegisterChunkMapping is not supported (splice_blob_support is false)"))
    }
}

const PAGE_TOKEN_PREFIX: &str = "kiln-tree-v1:";

fn parse_page_token(token: &str) -> Result<usize, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token.strip_prefix(PAGE_TOKEN_PREFIX).and_then(|n| n.parse().ok()).ok_or_else(|| {
        Status::invalid_argument("page_token was not issued by this server; start without one")
    })
}

/// Reads a walk's directories from the store, a batch at a time.
struct TreeSource<C> {
    cas: C,
    scope: Scope,
    /// A directory larger than half a message cannot be returned in a page.
    directory_bytes_max: u64,
}

impl<C: CasStore> TreeSource<C> {
    async fn read(&self, digests: Vec<Digest>) -> Result<Vec<Option<Bytes>>, Error> {
        futures::stream::iter(digests)
            .map(|digest| self.read_one(digest))
            .buffered(TREE_READ_BATCH_DIRECTORIES_MAX)
            .try_collect()
            .await
    }

    async fn read_one(&self, digest: Digest) -> Result<Option<Bytes>, Error> {
        let key = CasKey::new(self.scope.clone(), digest);
        match read_all(&self.cas, &key, self.directory_bytes_max).await {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) if e.code() == Code::ResourceExhausted => Err(Error::new(
                Code::FailedPrecondition,
                format!("GetTree: directory {digest} is larger than a response page can hold"),
            )),
            Err(e) => Err(e.context(format!("GetTree directory {digest}"))),
        }
    }
}

/// The one tree walk ([`kiln_proto::tree`]), streamed in pages; missing
/// subdirectories are left out, as the REAPI says.
///
/// Page tokens are the number of directories already returned: the walk is
/// deterministic (directories are visited once, in BFS order), so a new
/// request can skip to that point without server-side state.
struct TreePager<C> {
    source: TreeSource<C>,
    walk: TreeWalk,
    page_size: usize,
    page_bytes_max: usize,
    directories_max: usize,
    skip: usize,
}

impl<C: CasStore> TreePager<C> {
    /// The walk's next directories.
    async fn next(&mut self) -> Result<Option<Vec<Reached>>, Error> {
        let batch = Batch {
            directories: TREE_READ_BATCH_DIRECTORIES_MAX,
            bytes: TREE_READ_BATCH_BYTES_MAX.min(self.source.directory_bytes_max),
        };
        let source = &self.source;
        self.walk.next(batch, |digests| source.read(digests)).await
    }

    async fn run(mut self, first: Vec<Reached>, tx: mpsc::Sender<Result<GetTreeResponse, Status>>) {
        if let Err(status) = self.stream(first, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
    }

    async fn stream(
        &mut self,
        first: Vec<Reached>,
        tx: &mpsc::Sender<Result<GetTreeResponse, Status>>,
    ) -> Result<(), Status> {
        let mut reached = first;
        let mut visited = 0usize;
        let mut page = Vec::new();
        let mut page_bytes = 0usize;
        loop {
            if self.walk.exceeded() {
                return Err(Error::resource_exhausted(format!(
                    "tree has more than {} directories",
                    self.directories_max
                ))
                .into());
            }
            let mut batch = reached.into_iter().peekable();
            while let Some(item) = batch.next() {
                let Reached::Directory(digest, directory) = item else { continue };
                visited += 1;
                if visited <= self.skip {
                    continue;
                }
                page_bytes += usize::try_from(digest.size_bytes()).unwrap_or(usize::MAX);
                page.push(directory);
                if page.len() >= self.page_size || page_bytes >= self.page_bytes_max {
                    let more = batch.peek().is_some() || !self.walk.is_done();
                    let token = if more { format!("{PAGE_TOKEN_PREFIX}{visited}") } else { String::new() };
                    let response =
                        GetTreeResponse { directories: std::mem::take(&mut page), next_page_token: token };
                    page_bytes = 0;
                    if tx.send(Ok(response)).await.is_err() {
                        return Ok(()); // The client went away.
                    }
                }
            }
            match self.next().await? {
                Some(next) => reached = next,
                None => break,
            }
        }
        if !page.is_empty() || visited <= self.skip {
            let _ = tx.send(Ok(GetTreeResponse { directories: page, next_page_token: String::new() })).await;
        }
        Ok(())
    }
}
