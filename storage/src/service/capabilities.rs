//! `Capabilities.GetCapabilities`.

use kiln_proto::DigestFunction;
use kiln_proto::access::{Authorizer, rights};
use kiln_proto::limits::Limits;
use kiln_proto::reapi::capabilities_server::Capabilities;
use kiln_proto::reapi::{
    ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities, GetCapabilitiesRequest, SemVer,
    ServerCapabilities, compressor, symlink_absolute_path_strategy,
};
use kiln_proto::text::quoted;
use kiln_proto::{Code, Error};
use tonic::{Request, Response, Status};

/// `GetCapabilities` needs an authenticated caller (the layer sees to that)
/// holding at least one permission on the instance it asks about. The
/// answer reveals nothing tenant-specific, but refusing a caller who could
/// do nothing there tells a misconfigured client (a wrong instance name or
/// credentials) at its first call, before a build starts.
#[derive(Debug, Clone)]
pub struct CapabilitiesService {
    limits: Limits,
    auth: Authorizer,
    execution: Option<ExecutionCapabilities>,
}

impl CapabilitiesService {
    pub fn new(limits: Limits, auth: Authorizer) -> Self {
        Self { limits, auth, execution: None }
    }

    /// Advertises remote execution (when the scheduler serves Execute).
    #[must_use]
    pub fn with_execution(mut self, execution: ExecutionCapabilities) -> Self {
        self.execution = Some(execution);
        self
    }

    /// What this storage node offers; execution capabilities are added by
    /// the scheduler when it serves Execute.
    pub fn capabilities(&self) -> ServerCapabilities {
        let version = |major, minor| SemVer { major, minor, patch: 0, prerelease: String::new() };
        ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: DigestFunction::ALL.iter().map(|f| f.to_proto() as i32).collect(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                cache_priority_capabilities: None,
                max_batch_total_size_bytes: i64::try_from(self.limits.batch_total_size_bytes_max)
                    .unwrap_or(i64::MAX),
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
                max_cas_blob_size_bytes: i64::try_from(self.limits.blob_size_bytes_max).unwrap_or(i64::MAX),
                ..Default::default()
            }),
            execution_capabilities: self.execution.clone(),
            deprecated_api_version: Some(version(2, 0)),
            low_api_version: Some(version(2, 0)),
            high_api_version: Some(version(super::HIGH_API_VERSION.0, super::HIGH_API_VERSION.1)),
        }
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let instance = &request.get_ref().instance_name;
        super::instance(instance)?;
        let caller = Authorizer::caller(&request)?;
        if self.auth.permissions(&caller.principal, instance).is_empty() {
            // Same message and logging as any other denial.
            self.auth.permit_for::<rights::CasRead>(&caller, instance)?;
            return Err(Error::new(
                Code::PermissionDenied,
                format!("no permission on instance {}", quoted(instance)),
            )
            .into());
        }
        Ok(Response::new(self.capabilities()))
    }
}
