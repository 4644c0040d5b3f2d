//! [`CasClient`] over gRPC: any REAPI CAS, for workers that run apart from
//! their storage nodes. The tools' verifying client
//! ([`kiln_tools::cas::Cas`]) does the work: blobs are verified against
//! their digests on the way in (DATA_LOSS naming the digest otherwise),
//! uploads must be committed whole, and errors keep their gRPC codes (a
//! missing blob is NOT_FOUND). Trees are walked by the trait's
//! [`CasClient::get_tree`], over these verified reads. An output larger
//! than the CAS advertises it takes (`max_cas_blob_size_bytes`) is
//! RESOURCE_EXHAUSTED, the action's limit, before a byte is sent.

use std::path::Path;

use bytes::Bytes;
use kiln_proto::{Digest, DigestFunction, Error, Result};
use kiln_tools::cas::Cas;
use kiln_tools::client::Connection;

use crate::cas::CasClient;

/// A CAS reached over gRPC, for one instance name and digest function.
#[derive(Debug, Clone)]
pub struct GrpcCas {
    cas: Cas,
    /// The largest blob the CAS takes, when it says.
    blob_size_max: Option<u64>,
}

impl GrpcCas {
    pub fn new(connection: Connection, instance: &str, function: DigestFunction) -> Self {
        GrpcCas { cas: Cas::new(connection, instance, function), blob_size_max: None }
    }

    fn check_size(&self, digest: &Digest) -> Result<()> {
        match self.blob_size_max {
            Some(max) if digest.size_bytes() > max => Err(Error::resource_exhausted(format!(
                "blob {digest} is larger than the CAS takes (max_cas_blob_size_bytes {max})"
            ))),
            _ => Ok(()),
        }
    }
}

impl CasClient for GrpcCas {
    async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        self.cas.read_to_file(digest, path).await
    }

    async fn read_bytes(&self, digest: &Digest) -> Result<Bytes> {
        self.cas.read_bytes(digest).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.cas.missing(digests).await
    }

    async fn upload_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        self.check_size(digest)?;
        self.cas.upload_file(digest, path).await
    }

    async fn upload_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.check_size(digest)?;
        self.cas.upload_bytes(digest, data).await
    }
}

/// Gives [`GrpcCas`] clients over one connection.
#[derive(Debug, Clone)]
pub struct GrpcCasFactory {
    connection: Connection,
    blob_size_max: Option<u64>,
}

impl GrpcCasFactory {
    /// Asks the CAS for the largest blob it takes (GetCapabilities); a CAS
    /// that does not say, or does not answer within `timeout`, is taken to
    /// have no limit, and its refusals are reported as they come.
    pub async fn new(connection: Connection, timeout: std::time::Duration) -> Self {
        use kiln_proto::reapi::GetCapabilitiesRequest;
        use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
        let mut client = CapabilitiesClient::new(connection.channel());
        let asked =
            tokio::time::timeout(timeout, client.get_capabilities(GetCapabilitiesRequest::default())).await;
        let blob_size_max = match asked {
            Ok(Ok(r)) => r
                .into_inner()
                .cache_capabilities
                .and_then(|c| u64::try_from(c.max_cas_blob_size_bytes).ok())
                .filter(|&max| max > 0),
            Ok(Err(status)) => {
                tracing::warn!(error = %status.message(), "the CAS did not say the largest blob it takes");
                None
            }
            Err(_) => {
                tracing::warn!(?timeout, "the CAS did not say the largest blob it takes in time");
                None
            }
        };
        GrpcCasFactory { connection, blob_size_max }
    }
}

impl crate::runner::CasFactory for GrpcCasFactory {
    type Client = GrpcCas;
    fn client(&self, instance: &str, function: DigestFunction) -> GrpcCas {
        GrpcCas {
            blob_size_max: self.blob_size_max,
            ..GrpcCas::new(self.connection.clone(), instance, function)
        }
    }
}
