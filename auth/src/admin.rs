//! `kiln.admin.v1.Tokens`: token administration over gRPC.
//!
//! Creating, rotating or revoking a token needs `admin` on its tenant (`*`:
//! on every tenant). A token is a credential handed to someone, so whoever
//! creates or rotates one must also hold every permission it grants, on its
//! whole tenant: an admin of `main` can mint `read` tokens for `main.dev` if
//! it may read `main`, never a token stronger than itself.

use std::sync::Arc;

use kiln_proto::access::{ALL_TENANTS, Authorizer, Caller, Permission, Permissions};
use kiln_proto::kiln::admin::tokens_server::Tokens;
use kiln_proto::kiln::admin::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse, RevokeTokenRequest,
    RevokeTokenResponse, RotateTokenRequest, TokenInfo,
};
use kiln_proto::text::quoted;
use kiln_proto::{Code, Error};
use tonic::{Request, Response, Status};

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

    /// What `caller` holds on `tenant`, or everywhere for [`ALL_TENANTS`].
    fn held(&self, caller: &Caller, tenant: &str) -> Permissions {
        if tenant == ALL_TENANTS {
            self.authorizer.permissions_everywhere(&caller.principal)
        } else {
            self.authorizer.permissions(&caller.principal, tenant)
        }
    }

    /// Refuses unless `caller` may administer tokens on `tenant` and holds
    /// every permission in `granted` there.
    fn may_issue(&self, caller: &Caller, tenant: &str, granted: Permissions) -> Result<(), Status> {
        let held = self.held(caller, tenant);
        let shown =
            if tenant == ALL_TENANTS { "every tenant (*)".to_owned() } else { quoted(tenant).to_string() };
        if !held.contains(Permission::Admin) {
            return Err(Error::new(
                Code::PermissionDenied,
                format!("principal {} lacks the admin permission on {shown}", caller.principal),
            )
            .into());
        }
        let missing = granted.without(held);
        if !missing.is_empty() {
            return Err(Error::new(
                Code::PermissionDenied,
                format!(
                    "principal {} cannot grant {missing} on {shown}: a token may not be stronger than its creator",
                    caller.principal
                ),
            )
            .into());
        }
        Ok(())
    }

    fn record(&self, id: &str) -> Result<TokenRecord, Status> {
        self.store.get(id).ok_or_else(|| Status::not_found(format!("no token with id {}", quoted(id))))
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
        let caller = Authorizer::caller(&request)?;
        let req = request.into_inner();
        let permissions = Permissions::parse(&req.permissions)?;
        self.may_issue(&caller, &req.tenant, permissions)?;
        let (token, record) = self.store.create(&req.principal, &req.tenant, permissions, req.ttl_seconds)?;
        tracing::info!(
            by = %caller.principal,
            id = record.id,
            principal = %quoted(&record.principal),
            tenant = %quoted(&record.tenant),
            permissions = %permissions,
            "token created"
        );
        Ok(Response::new(CreateTokenResponse { token, info: Some(info(&record)) }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let caller = Authorizer::caller(&request)?;
        let tokens = self
            .store
            .list()
            .iter()
            .filter(|r| self.held(&caller, &r.tenant).contains(Permission::Admin))
            .map(info)
            .collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn rotate_token(
        &self,
        request: Request<RotateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = Authorizer::caller(&request)?;
        let old = self.record(&request.get_ref().id)?;
        // Rotation hands out a new secret with the old grant: the same rule
        // as creating it.
        let granted = Permissions::parse(&old.permissions)?;
        self.may_issue(&caller, &old.tenant, granted)?;
        let (token, record) = self.store.rotate(&old.id)?;
        tracing::info!(by = %caller.principal, old = old.id, new = record.id, "token rotated");
        Ok(Response::new(CreateTokenResponse { token, info: Some(info(&record)) }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = Authorizer::caller(&request)?;
        let record = self.record(&request.get_ref().id)?;
        self.may_issue(&caller, &record.tenant, Permissions::NONE)?;
        let record = self.store.revoke(&record.id)?;
        tracing::info!(by = %caller.principal, id = record.id, "token revoked");
        Ok(Response::new(RevokeTokenResponse { info: Some(info(&record)) }))
    }
}
