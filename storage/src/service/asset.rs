//! The Remote Asset API (`build.bazel.remote.asset.v1`): Push associates
//! URIs and qualifiers with content in the CAS; Fetch finds it again.
//!
//! - **Keys.** One record per URI, kind (blob or directory) and qualifier
//!   set (names unique, compared exactly, in any order): its key is the
//!   SHA-256 of their length-prefixed encoding, in the action-cache store's
//!   asset space for the instance (`AcKey::asset`). So assets are as
//!   persistent as action results, and evicted with them, oldest first.
//! - **Tenants.** Per instance name, like the action cache: a Fetch on
//!   `main.dev` finds what was pushed to `main.dev`, then to `main`, where
//!   the caller may read there. Fetch needs `cas-read`; Push `ac-write`.
//! - **Served only while complete.** A record is returned only while its
//!   content and everything it references (`references_blobs`,
//!   `references_directories`, every directory tree walked to its files)
//!   are in the caller's CAS, it has not expired (`expire_at`), and it is
//!   no older than `oldest_content_accepted`; otherwise Fetch fails with
//!   NOT_FOUND. Failures are gRPC errors, not only the response's inline
//!   status as the specification prefers: Bazel 4.2.3's downloader never
//!   reads that status and would take the empty digest of a miss for an
//!   empty file (BuildStream reads either). Push refuses content the CAS lacks
//!   with FAILED_PRECONDITION where the caller may read the CAS.
//! - **Bad input** is INVALID_ARGUMENT naming the field: no URI (clients
//!   probe this way), too many or too long URIs or qualifiers, a repeated
//!   qualifier name, a malformed digest, an `expire_at` in the past.

use std::time::{SystemTime, UNIX_EPOCH};

use kiln_proto::access::{Authorizer, Permit, rights};
use kiln_proto::asset::fetch_server::Fetch;
use kiln_proto::asset::push_server::Push;
use kiln_proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse, PushBlobRequest,
    PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, Qualifier,
};
use kiln_proto::limits::{
    ASSET_QUALIFIER_BYTES_MAX, ASSET_QUALIFIERS_MAX, ASSET_REFERENCES_MAX, ASSET_URI_BYTES_MAX,
    ASSET_URIS_MAX, Limits,
};
use kiln_proto::text::quoted;
use kiln_proto::tree::{Batch, walk};
use kiln_proto::{Code, Digest, DigestFunction, Error, reapi};
use prost::Message;
use tonic::{Request, Response, Status};

use super::origin::{Downloaded, Origin, Sri};
use crate::store::{AcKey, AcStore, BlobWriter, CasKey, CasStore, Scope, read_all};
use std::sync::Arc;

/// What an asset names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blob,
    Directory,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Blob => "blob",
            Kind::Directory => "directory",
        }
    }
}

/// What is stored for one URI.
#[derive(Clone, PartialEq, Message)]
struct Record {
    /// The blob, or the root Directory.
    #[prost(message, optional, tag = "1")]
    content: Option<reapi::Digest>,
    #[prost(message, repeated, tag = "2")]
    references_blobs: Vec<reapi::Digest>,
    #[prost(message, repeated, tag = "3")]
    references_directories: Vec<reapi::Digest>,
    /// Unix seconds; 0: never.
    #[prost(int64, tag = "4")]
    expire_at: i64,
    /// Unix seconds.
    #[prost(int64, tag = "5")]
    pushed_at: i64,
    #[prost(int32, tag = "6")]
    digest_function: i32,
}

/// Qualifiers, checked and sorted by name.
type Qualifiers = Vec<(String, String)>;

fn invalid(message: String) -> Status {
    Error::invalid_argument(message).into()
}

/// Checks a request's URIs and qualifiers; the qualifiers sorted.
fn check_names(uris: &[String], qualifiers: &[Qualifier]) -> Result<Qualifiers, Status> {
    if uris.is_empty() {
        return Err(invalid("at least one URI is required (uris is empty)".into()));
    }
    if uris.len() > ASSET_URIS_MAX {
        return Err(invalid(format!("{} URIs given; at most {ASSET_URIS_MAX} are accepted", uris.len())));
    }
    for (i, uri) in uris.iter().enumerate() {
        if uri.is_empty() || uri.len() > ASSET_URI_BYTES_MAX || uri.chars().any(char::is_control) {
            return Err(invalid(format!(
                "uris[{i}] {} must be 1 to {ASSET_URI_BYTES_MAX} bytes without control characters",
                quoted(uri)
            )));
        }
    }
    if qualifiers.len() > ASSET_QUALIFIERS_MAX {
        return Err(invalid(format!(
            "{} qualifiers given; at most {ASSET_QUALIFIERS_MAX} are accepted",
            qualifiers.len()
        )));
    }
    let mut sorted: Qualifiers = Vec::with_capacity(qualifiers.len());
    for (i, q) in qualifiers.iter().enumerate() {
        if q.name.is_empty() || q.name.len() + q.value.len() > ASSET_QUALIFIER_BYTES_MAX {
            return Err(invalid(format!(
                "qualifiers[{i}] {}: a name is required, and name and value together are at most \
                 {ASSET_QUALIFIER_BYTES_MAX} bytes",
                quoted(&q.name)
            )));
        }
        sorted.push((q.name.clone(), q.value.clone()));
    }
    sorted.sort();
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(invalid(format!(
            "qualifier {} appears more than once; names must be unique",
            quoted(&w[0].0)
        )));
    }
    Ok(sorted)
}

/// The key of one URI's record.
fn asset_key(kind: Kind, uri: &str, qualifiers: &Qualifiers) -> Digest {
    let mut encoded = Vec::with_capacity(64 + uri.len());
    let mut field = |text: &str| {
        encoded.extend_from_slice(&(text.len() as u64).to_be_bytes());
        encoded.extend_from_slice(text.as_bytes());
    };
    field(kind.name());
    field(uri);
    for (name, value) in qualifiers {
        field(name);
        field(value);
    }
    DigestFunction::Sha256.compute(&encoded)
}

fn unix_now() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

fn parse_all(
    function: Option<DigestFunction>,
    digests: &[reapi::Digest],
    field: &str,
) -> Result<Vec<Digest>, Status> {
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Digest::from_proto(function, d).map_err(|e| Status::from(e.context(format!("{field}[{i}]"))))
        })
        .collect()
}

/// Fetch and Push over the action-cache store (records) and the CAS
/// (content).
#[derive(Debug, Clone)]
pub struct AssetService<A, C> {
    ac: A,
    cas: C,
    limits: Limits,
    auth: Authorizer,
    /// Downloads what was not pushed, when configured.
    origin: Option<Arc<Origin>>,
    /// Turns for walking directory trees, shared with GetTree.
    tree_walks: super::WalkTurns,
}

/// One Push, taken apart.
struct PushArgs<'a> {
    instance: &'a str,
    uris: &'a [String],
    qualifiers: &'a [Qualifier],
    expire_at: Option<&'a kiln_proto::google::protobuf::Timestamp>,
    content: Option<&'a reapi::Digest>,
    references_blobs: &'a [reapi::Digest],
    references_directories: &'a [reapi::Digest],
    digest_function: i32,
}

/// One Fetch, taken apart.
struct FetchArgs<'a> {
    instance: &'a str,
    uris: &'a [String],
    qualifiers: &'a [Qualifier],
    oldest: Option<&'a kiln_proto::google::protobuf::Timestamp>,
    digest_function: i32,
}

/// The [`FetchArgs`] of a FetchBlob or FetchDirectory request.
macro_rules! fetch_args {
    ($req:expr) => {
        FetchArgs {
            instance: &$req.instance_name,
            uris: &$req.uris,
            qualifiers: &$req.qualifiers,
            oldest: $req.oldest_content_accepted.as_ref(),
            digest_function: $req.digest_function,
        }
    };
}

/// The [`PushArgs`] of a PushBlob or PushDirectory request, whose content
/// is its field `$content`.
macro_rules! push_args {
    ($req:expr, $content:ident) => {
        PushArgs {
            instance: &$req.instance_name,
            uris: &$req.uris,
            qualifiers: &$req.qualifiers,
            expire_at: $req.expire_at.as_ref(),
            content: $req.$content.as_ref(),
            references_blobs: &$req.references_blobs,
            references_directories: &$req.references_directories,
            digest_function: $req.digest_function,
        }
    };
}

/// What a Fetch found: the URI and its record.
type Found = Option<(String, Record)>;

impl<A: AcStore + Clone, C: CasStore + Clone> AssetService<A, C> {
    pub fn new(ac: A, cas: C, limits: Limits, auth: Authorizer) -> Self {
        Self { ac, cas, limits, auth, origin: None, tree_walks: super::WalkTurns::new(&limits) }
    }

    /// Takes walk turns from `turns`, shared with other services.
    #[must_use]
    pub fn with_walk_turns(mut self, turns: super::WalkTurns) -> Self {
        self.tree_walks = turns;
        self
    }

    /// Fetches blobs no pushed asset matches from their URLs.
    #[must_use]
    pub fn with_origin(mut self, origin: Option<Arc<Origin>>) -> Self {
        self.origin = origin;
        self
    }

    async fn push(
        &self,
        permit: &Permit<rights::AcWrite>,
        kind: Kind,
        args: PushArgs<'_>,
    ) -> Result<(), Status> {
        super::instance(args.instance)?;
        let qualifiers = check_names(args.uris, args.qualifiers)?;
        let function = super::digest_function(args.digest_function)?;
        let field = match kind {
            Kind::Blob => "blob_digest",
            Kind::Directory => "root_directory_digest",
        };
        let content = Digest::from_required(function, args.content, field)?;
        let references = args.references_blobs.len() + args.references_directories.len();
        if references > ASSET_REFERENCES_MAX {
            return Err(invalid(format!(
                "{references} references given; at most {ASSET_REFERENCES_MAX} are accepted"
            )));
        }
        parse_all(function, args.references_blobs, "references_blobs")?;
        parse_all(function, args.references_directories, "references_directories")?;
        let now = unix_now();
        let expire_at = match args.expire_at {
            None => 0,
            Some(t) if t.seconds <= now => {
                return Err(invalid(format!("expire_at ({} s since 1970) is not in the future", t.seconds)));
            }
            Some(t) => t.seconds,
        };
        let record = Record {
            content: Some(content.to_proto()),
            references_blobs: args.references_blobs.to_vec(),
            references_directories: args.references_directories.to_vec(),
            expire_at,
            pushed_at: now,
            digest_function: content.function().to_proto() as i32,
        };
        // Clients must upload the content first; where the caller may read
        // the CAS, say so now rather than serve nothing later.
        if let Some(reader) = self.auth.try_extend::<rights::CasRead, _>(permit, args.instance)
            && let Some(why) = self.incomplete(&reader, kind, &record).await?
        {
            return Err(
                Error::new(Code::FailedPrecondition, format!("{why}: upload it before pushing")).into()
            );
        }
        let encoded = bytes::Bytes::from(record.encode_to_vec());
        for uri in args.uris {
            let key = AcKey::asset(permit, asset_key(kind, uri, &qualifiers));
            self.ac.put(&key, encoded.clone()).await?;
        }
        tracing::debug!(kind = kind.name(), uris = args.uris.len(), content = %content, "asset pushed");
        Ok(())
    }

    async fn fetch(
        &self,
        permit: &Permit<rights::CasRead>,
        kind: Kind,
        args: FetchArgs<'_>,
    ) -> Result<Found, Status> {
        super::instance(args.instance)?;
        let qualifiers = check_names(args.uris, args.qualifiers)?;
        super::digest_function(args.digest_function)?;
        let oldest = args.oldest.map_or(i64::MIN, |t| t.seconds);
        let now = unix_now();
        for tenant in kiln_proto::tenant::lineage(args.instance) {
            let here = if tenant == args.instance {
                permit.clone()
            } else {
                let Some(there) = self.auth.try_extend::<rights::CasRead, _>(permit, tenant) else {
                    continue;
                };
                there
            };
            for uri in args.uris {
                let key = AcKey::asset(&here, asset_key(kind, uri, &qualifiers));
                let data = match self.ac.get(&key).await {
                    Ok(data) => data,
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e.into()),
                };
                let Ok(record) = Record::decode(data.as_ref()) else {
                    tracing::warn!(uri = %quoted(uri), "an asset record is unreadable; ignored");
                    continue;
                };
                let expired = record.expire_at != 0 && record.expire_at <= now;
                if expired || record.pushed_at < oldest {
                    continue;
                }
                if let Some(why) = self.incomplete(permit, kind, &record).await? {
                    tracing::debug!(uri = %quoted(uri), why, "asset not served: its content is incomplete");
                    continue;
                }
                return Ok(Some((uri.clone(), record)));
            }
        }
        Ok(None)
    }

    /// Downloads the first of the request's URLs that downloads (see
    /// `origin`), stores it in the caller's CAS and records it as an asset
    /// under that URL and the request's qualifiers: the URL and record, or
    /// the error of the last URL tried.
    async fn fetch_from_origin(
        &self,
        origin: &Arc<Origin>,
        permit: &Permit<rights::CasRead>,
        req: &FetchBlobRequest,
    ) -> Result<(String, Record), Status> {
        let qualifiers = check_names(&req.uris, &req.qualifiers)?;
        let mut sri = None;
        for (name, value) in &qualifiers {
            match name.as_str() {
                "checksum.sri" => sri = Some(Sri::parse(value)?),
                // Names the download for the client's own bookkeeping.
                "bazel.canonical_id" => {}
                other => {
                    let why =
                        format!("cannot check qualifier {} on content fetched from origin", quoted(other));
                    return Err(Error::not_found(why).into());
                }
            }
        }
        let instance = permit.tenant();
        let (Some(writer), Some(recorder)) = (
            self.auth.try_extend::<rights::CasWrite, _>(permit, instance),
            self.auth.try_extend::<rights::AcWrite, _>(permit, instance),
        ) else {
            let why = "fetching from origin needs cas-write and ac-write on the instance as well as cas-read";
            return Err(Error::not_found(why).into());
        };
        let function = super::digest_function(req.digest_function)?.unwrap_or(DigestFunction::Sha256);
        let mut last = Error::not_found("no URL given");
        for uri in &req.uris {
            if let Some(why) = origin.refuses(uri) {
                last = Error::new(Code::PermissionDenied, why);
                continue;
            }
            let (cas, writer) = (self.cas.clone(), writer.clone());
            let store = move |d: Downloaded| -> futures::future::BoxFuture<'static, kiln_proto::Result<()>> {
                Box::pin(async move { store_file(&cas, &CasKey::of(&writer, d.digest), &d).await })
            };
            let merge_key = format!("{}\n{}\n{uri}\n{sri:?}", Scope::cas(permit).as_str(), function.name());
            match origin.fetch(merge_key, uri.clone(), sri.clone(), function, store).await {
                Ok(digest) => {
                    let record = Record {
                        content: Some(digest.to_proto()),
                        pushed_at: unix_now(),
                        digest_function: function.to_proto() as i32,
                        ..Record::default()
                    };
                    let key = AcKey::asset(&recorder, asset_key(Kind::Blob, uri, &qualifiers));
                    self.ac.put(&key, bytes::Bytes::from(record.encode_to_vec())).await?;
                    tracing::info!(url = %quoted(uri), blob = %digest, "fetched from origin");
                    return Ok((uri.clone(), record));
                }
                Err(e) => {
                    tracing::info!(url = %quoted(uri), error = %e.message(), "fetch from origin failed");
                    last = e;
                }
            }
        }
        Err(last.into())
    }

    /// Why `record`'s content is not all in the CAS `permit` reads, if it
    /// is not: its blobs, and every directory tree it names to its files.
    async fn incomplete(
        &self,
        permit: &Permit<rights::CasRead>,
        kind: Kind,
        record: &Record,
    ) -> Result<Option<String>, Status> {
        let function = DigestFunction::from_proto(record.digest_function).map_err(Status::from)?;
        let content = Digest::from_required(function, record.content.as_ref(), "content")?;
        let mut blobs = parse_all(function, &record.references_blobs, "references_blobs")?;
        let mut directories = parse_all(function, &record.references_directories, "references_directories")?;
        match kind {
            Kind::Blob => blobs.push(content),
            Kind::Directory => directories.push(content),
        }
        let directory_bytes_max = self.limits.grpc_message_size_bytes_max as u64;
        let _turn = if directories.is_empty() { None } else { Some(self.tree_walks.take("tree").await?) };
        for root in directories {
            let fetch = |digests: Vec<Digest>| {
                let (cas, permit) = (&self.cas, permit);
                async move {
                    let mut out = Vec::with_capacity(digests.len());
                    for d in digests {
                        match read_all(cas, &CasKey::of(permit, d), directory_bytes_max).await {
                            Ok(data) => out.push(Some(data)),
                            Err(e) if e.is_not_found() => out.push(None),
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(out)
                }
            };
            let tree = match walk(root, self.limits.tree_directories_max as u64, Batch::DEFAULT, fetch).await
            {
                Ok(tree) => tree,
                Err(e) if matches!(e.code(), Code::InvalidArgument | Code::FailedPrecondition) => {
                    return Ok(Some(format!("directory {root} is not a tree: {}", e.message())));
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(missing) = tree.missing.first() {
                return Ok(Some(format!("directory {missing} of the tree {root} is not in the CAS")));
            }
            if tree.exceeded {
                return Ok(Some(format!("the tree {root} has more than tree_directories_max directories")));
            }
            for (_, directory) in &tree.directories {
                let files: Vec<reapi::Digest> =
                    directory.files.iter().filter_map(|f| f.digest.clone()).collect();
                blobs.extend(parse_all(function, &files, "files")?);
            }
            if blobs.len() > self.limits.referenced_blobs_max {
                return Ok(Some(format!(
                    "more than referenced_blobs_max ({}) files",
                    self.limits.referenced_blobs_max
                )));
            }
        }
        blobs.sort();
        blobs.dedup();
        for chunk in blobs.chunks(self.limits.batch_digests_max.max(1)) {
            let keys: Vec<CasKey> = chunk.iter().map(|d| CasKey::of(permit, *d)).collect();
            if let Some(missing) = self.cas.find_missing(&keys).await?.first() {
                return Ok(Some(format!("blob {} is not in the CAS", missing.digest())));
            }
        }
        Ok(None)
    }
}

/// Puts a downloaded file into the CAS under `key`, unless it is there.
async fn store_file<C: CasStore>(cas: &C, key: &CasKey, downloaded: &Downloaded) -> kiln_proto::Result<()> {
    use tokio::io::AsyncReadExt;
    if cas.find_missing(std::slice::from_ref(key)).await?.is_empty() {
        return Ok(());
    }
    let io = |e: std::io::Error| Error::internal(format!("read a download back: {e}"));
    let mut file = tokio::fs::File::open(&downloaded.file).await.map_err(io)?;
    let mut writer = cas.write(key).await?;
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let n = file.read(&mut buf).await.map_err(io)?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        writer.write(bytes::Bytes::from(buf)).await?;
    }
    writer.commit().await
}

fn timestamp(seconds: i64) -> Option<kiln_proto::google::protobuf::Timestamp> {
    (seconds != 0).then_some(kiln_proto::google::protobuf::Timestamp { seconds, nanos: 0 })
}

fn not_found(kind: Kind, uris: &[String]) -> Error {
    let first = uris.first().map(String::as_str).unwrap_or_default();
    Error::not_found(format!(
        "no {} asset for {} (and {} other URIs) with these qualifiers: none was pushed, or its content left the CAS",
        kind.name(),
        quoted(first),
        uris.len().saturating_sub(1)
    ))
}

#[tonic::async_trait]
impl<A: AcStore + Clone, C: CasStore + Clone> Fetch for AssetService<A, C> {
    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        let permit = self.auth.permit::<rights::CasRead, _>(&request, &request.get_ref().instance_name)?;
        let req = request.into_inner();
        let (uri, record) = match (self.fetch(&permit, Kind::Blob, fetch_args!(req)).await?, &self.origin) {
            (Some(found), _) => found,
            (None, Some(origin)) => self.fetch_from_origin(origin, &permit, &req).await?,
            (None, None) => return Err(not_found(Kind::Blob, &req.uris).into()),
        };
        let response = FetchBlobResponse {
            status: Some(Default::default()),
            uri,
            qualifiers: req.qualifiers,
            expires_at: timestamp(record.expire_at),
            blob_digest: record.content,
            digest_function: record.digest_function,
        };
        Ok(Response::new(response))
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        let permit = self.auth.permit::<rights::CasRead, _>(&request, &request.get_ref().instance_name)?;
        let req = request.into_inner();
        let response = match self.fetch(&permit, Kind::Directory, fetch_args!(req)).await? {
            Some((uri, record)) => FetchDirectoryResponse {
                status: Some(Default::default()),
                uri,
                qualifiers: req.qualifiers,
                expires_at: timestamp(record.expire_at),
                root_directory_digest: record.content,
                digest_function: record.digest_function,
            },
            None => return Err(not_found(Kind::Directory, &req.uris).into()),
        };
        Ok(Response::new(response))
    }
}

#[tonic::async_trait]
impl<A: AcStore + Clone, C: CasStore + Clone> Push for AssetService<A, C> {
    async fn push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        let permit = self.auth.permit::<rights::AcWrite, _>(&request, &request.get_ref().instance_name)?;
        let req = request.get_ref();
        self.push(&permit, Kind::Blob, push_args!(req, blob_digest)).await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        let permit = self.auth.permit::<rights::AcWrite, _>(&request, &request.get_ref().instance_name)?;
        let req = request.get_ref();
        self.push(&permit, Kind::Directory, push_args!(req, root_directory_digest)).await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}
