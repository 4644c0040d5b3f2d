//! `kiln.admin.v1.Tokens`: token administration over gRPC, guarded by the
//! `admin` permission on the token's tenant.

use std::sync::Arc;

use kiln_proto::Error;
use kiln_proto::kiln::admin::tokens_server::Tokens;
use kiln_proto::kiln::admin::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse, RevokeTokenRequest,
    RevokeTokenResponse, RotateTokenRequest, TokenInfo,
};
use tonic::{Request, Response, Status};

use crate::layer::Authorizer;
use crate::permission::{Permission, Permissions};
use crate::tokens::{TokenRecord, TokenStore};

#[derive(Debug, Clone)]
pub struct TokenAdmin {
    store: Arc<TokenStore>,
    authorizer: Authorizer,
}

impl TokenAdmin {
    pub fn new(store: Arc<TokenStore>, authorizer: Authorizer) -> Self {
        Self { store, authorizer }
    }

    fn record<T>(&self, request: &Request<T>, id: &str) -> Result<TokenRecord, Status> {
        let record =
            self.store.get(id).ok_or_else(|| Status::not_found(format!("no token with id {id:?}")))?;
        self.authorizer.check(request, &record.tenant, Permission::Admin)?;
        Ok(record)
    }
}

pub fn info(record: &TokenRecord) -> TokenInfo {
    TokenInfo {
        id: record.id.clone(),
        principal: record.principal.clone(),
        tenant: record.tenant.clone(),
        permissions: record.permissions.clone(),
        created_unix_seconds: record.created_unix_seconds,
        expires_unix_seconds: record.expires_unix_seconds,
        revoked: record.revoked,
    }
}

#[tonic::async_trait]
impl Tokens for TokenAdmin {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let admin = self.authorizer.check(&request, &request.get_ref().tenant, Permission::Admin)?;
        let req = request.into_inner();
        let permissions = Permissions::parse(&req.permissions)?;
        let (token, record) = self.store.create(&req.principal, &req.tenant, permissions, req.ttl_seconds)?;
        tracing::info!(
            by = admin.name(),
            id = record.id,
            principal = record.principal,
            tenant = record.tenant,
            "token created"
        );
        Ok(Response::new(CreateTokenResponse { token, info: Some(info(&record)) }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let principal = Authorizer::principal(&request)?;
        let tokens = self
            .store
            .list()
            .iter()
            .filter(|r| self.authorizer.allows(&principal, &r.tenant, Permission::Admin))
            .map(info)
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn rotate_token(
        &self,
        request: Request<RotateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let old = self.record(&request, &request.get_ref().id)?;
        let (token, record) = self.store.rotate(&old.id)?;
        tracing::info!(old = old.id, new = record.id, "token rotated");
        Ok(Response::new(CreateTokenResponse { token, info: Some(info(&record)) }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let record = self.record(&request, &request.get_ref().id)?;
        let record = self.store.revoke(&record.id).map_err(|e: Error| Status::from(e))?;
        tracing::info!(id = record.id, "token revoked");
        Ok(Response::new(RevokeTokenResponse { info: Some(info(&record)) }))
    }
}
