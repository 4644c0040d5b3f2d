//! [`CasClient`] over gRPC: any REAPI CAS, for workers that run apart from
//! their storage nodes. The tools' verifying client
//! ([`kiln_tools::cas::Cas`]) does the work: blobs are verified against
//! their digests on the way in (DATA_LOSS naming the digest otherwise),
//! uploads must be committed whole, and errors keep their gRPC codes (a
//! missing blob is NOT_FOUND). Trees are walked by the trait's
//! [`CasClient::get_tree`], over these verified reads.

use std::path::Path;

use bytes::Bytes;
use kiln_proto::{Digest, DigestFunction, Result};
use kiln_tools::cas::Cas;
use kiln_tools::client::Connection;

use crate::cas::CasClient;

/// A CAS reached over gRPC, for one instance name and digest function.
#[derive(Debug, Clone)]
pub struct GrpcCas(Cas);

impl GrpcCas {
    pub fn new(connection: Connection, instance: &str, function: DigestFunction) -> Self {
        GrpcCas(Cas::new(connection, instance, function))
    }
}

impl CasClient for GrpcCas {
    async fn read_to_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        self.0.read_to_file(digest, path).await
    }

    async fn read_bytes(&self, digest: &Digest) -> Result<Bytes> {
        self.0.read_bytes(digest).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.0.missing(digests).await
    }

    async fn upload_file(&self, digest: &Digest, path: &Path) -> Result<()> {
        self.0.upload_file(digest, path).await
    }

    async fn upload_bytes(&self, digest: &Digest, data: Bytes) -> Result<()> {
        self.0.upload_bytes(digest, data).await
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
